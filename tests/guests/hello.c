/*
 * hello.c - boot parameters, memory map and SMP bring-up check.
 *
 * Prints the PVH command line and memory map, finds the CPUs in the Intel
 * MP table, starts every AP with INIT-SIPI-SIPI (each AP does a locked
 * increment of a counter in the trampoline page and halts), then reports
 * "cpus: mp-table=N started=M" and powers off.
 */
#include "lib.h"

struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

#define CMDLINE_MAX	4096
#define TRAMP_PADDR	0x10000UL
#define SIPI_VECTOR	(TRAMP_PADDR >> 12)
#define LAPIC_DEFAULT	0xFEE00000UL
#define LAPIC_ID	0x020
#define LAPIC_SVR	0x0F0
#define LAPIC_ICR_LO	0x300
#define LAPIC_ICR_HI	0x310
#define ICR_PENDING	(1u << 12)
#define MAX_CPUS	256

extern const char ap_tramp_start[], ap_tramp_end[], ap_tramp_count[];

static u8 checksum(const u8 *p, usize n)
{
	u8 s = 0;

	while (n--)
		s = (u8)(s + *p++);
	return s;
}

static void print_cmdline(const struct hvm_start_info *si)
{
	const char *s = (const char *)(usize)si->cmdline_paddr;
	usize n = 0;

	puts("cmdline: ");
	if (s) {
		while (n < CMDLINE_MAX && s[n])
			n++;
		putn(s, n);
	}
	putc('\n');
}

static void print_memmap(const struct hvm_start_info *si)
{
	const struct hvm_memmap_entry *e;
	u64 ram = 0;

	if (si->version < 1 || si->memmap_paddr == 0 || si->memmap_entries == 0)
		fail("no memory map in start info");
	e = (const struct hvm_memmap_entry *)(usize)si->memmap_paddr;
	for (u32 i = 0; i < si->memmap_entries; i++) {
		puts("mem: ");
		put_hex(e[i].addr);
		putc(' ');
		put_hex(e[i].size);
		putc(' ');
		put_dec(e[i].type);
		putc('\n');
		if (e[i].type == 1)
			ram += e[i].size;
	}
	puts("mem-total-ram: ");
	put_dec(ram >> 10);
	puts(" KiB\n");
}

/* Search [base, base+len) on 16-byte boundaries for the MP floating pointer. */
static const u8 *mp_scan(usize base, usize len)
{
	for (usize p = base; p + 16 <= base + len; p += 16) {
		const u8 *f = (const u8 *)p;

		if (f[0] != '_' || f[1] != 'M' || f[2] != 'P' || f[3] != '_')
			continue;
		if (f[8] == 0 || checksum(f, (usize)f[8] * 16) != 0)
			continue;
		return f;
	}
	return 0;
}

static u32 rd16(const u8 *p) { return (u32)p[0] | (u32)p[1] << 8; }
static u32 rd32(const u8 *p) { return rd16(p) | rd16(p + 2) << 16; }

/* Fills ids[] with the APIC ids of the enabled processors; returns count. */
static u32 mp_cpus(u8 *ids, u64 *lapic)
{
	const u8 *f, *t, *e, *end;
	u32 n = 0;

	f = mp_scan(0x9FC00, 0x400);
	if (!f)
		f = mp_scan(0xF0000, 0x10000);
	if (!f)
		fail("no MP floating pointer");
	if (f[11] != 0)
		fail("MP default configuration (no config table) unsupported");
	t = (const u8 *)(usize)rd32(f + 4);
	if (!t)
		fail("MP floating pointer has no config table");
	if (t[0] != 'P' || t[1] != 'C' || t[2] != 'M' || t[3] != 'P')
		fail("MP config table signature");
	if (checksum(t, rd16(t + 4)) != 0)
		fail("MP config table checksum");
	*lapic = rd32(t + 36) ? rd32(t + 36) : LAPIC_DEFAULT;
	e = t + 44;
	end = t + rd16(t + 4);
	for (u32 i = 0; i < rd16(t + 34) && e < end; i++) {
		if (e[0] == 0) {		/* processor */
			if ((e[3] & 1) && n < MAX_CPUS)
				ids[n++] = e[1];
			e += 20;
		} else if (e[0] <= 4) {		/* bus, ioapic, io/local int */
			e += 8;
		} else {
			fail("MP config table: unknown entry type");
		}
	}
	return n;
}

static void icr_send(u64 lapic, u32 apic_id, u32 lo)
{
	mmio_write32(lapic + LAPIC_ICR_HI, apic_id << 24);
	mmio_write32(lapic + LAPIC_ICR_LO, lo);
	for (u32 i = 0; i < 100000; i++)
		if (!(mmio_read32(lapic + LAPIC_ICR_LO) & ICR_PENDING))
			break;
}

void guest_main(u32 start_info)
{
	const struct hvm_start_info *si =
		(const struct hvm_start_info *)(usize)start_info;
	static u8 ids[MAX_CPUS];
	volatile u32 *count;
	u64 lapic;
	u32 ncpu, self, started;

	serial_init();
	puts("VMD-TEST hello start\n");
	if (si->magic != HVM_START_MAGIC)
		fail("bad hvm_start_info magic");
	print_cmdline(si);
	print_memmap(si);

	ncpu = mp_cpus(ids, &lapic);
	if (ncpu == 0)
		fail("MP table lists no enabled processor");

	/* Trampoline at 0x10000; the counter lives in the copy. */
	memcpy((void *)TRAMP_PADDR, ap_tramp_start,
	       (usize)(ap_tramp_end - ap_tramp_start));
	count = (volatile u32 *)(TRAMP_PADDR + (usize)(ap_tramp_count - ap_tramp_start));
	*count = 0;

	mmio_write32(lapic + LAPIC_SVR, mmio_read32(lapic + LAPIC_SVR) | 0x1FF);
	self = mmio_read32(lapic + LAPIC_ID) >> 24;
	for (u32 i = 0; i < ncpu; i++) {
		if (ids[i] == self)
			continue;
		icr_send(lapic, ids[i], 0x0000C500);	/* INIT, level, assert */
		icr_send(lapic, ids[i], 0x00008500);	/* INIT, level, deassert */
		io_delay(200);
		icr_send(lapic, ids[i], 0x00004600 | SIPI_VECTOR);
		io_delay(20);
		icr_send(lapic, ids[i], 0x00004600 | SIPI_VECTOR);
	}
	for (u32 i = 0; i < 300000 && *count + 1 < ncpu; i++)
		io_delay(1);
	started = *count + 1;

	puts("cpus: mp-table=");
	put_dec(ncpu);
	puts(" started=");
	put_dec(started);
	putc('\n');
	if (started != ncpu)
		fail("not every CPU in the MP table started");
	puts("VMD-TEST hello done\n");
	poweroff();
}

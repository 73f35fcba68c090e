/*
 * blk.c - freestanding virtio-blk / virtio-rng driver for vmd's PCI tests.
 *
 * Scans PCI bus 0 through ports 0xCF8/0xCFC, finds virtio-blk (1af4:1042)
 * and virtio-rng (1af4:1044) functions, walks their capability lists for
 * the common/notify/ISR/device structures and MSI-X, and drives one queue
 * of 16 entries, polling the used ring.  BARs are used where the VMM put
 * them (vmd assigns them like firmware); a zero BAR gets an address here.
 * Then it runs the verbs on the command line, in order, and powers off:
 *
 *   stay              after the last verb, halt instead of powering off
 *   disk:N            use the N-th virtio-blk function (default 0)
 *   info              "blk: capacity=<sectors> features=0x.. ro=0|1"
 *   read:LBA:N        "read LBA N status S fnv 0x<FNV-1a 64> first <16 hex bytes>"
 *   write:LBA:N:B     write N sectors of byte B; "write LBA N status S"
 *   flush             "flush status S"
 *   id                "id status S <serial>"
 *   discard:LBA:N     "discard LBA N status S"
 *   zeroes:LBA:N:U    write zeroes (U=1: may unmap); "zeroes LBA N status S"
 *   msix              after a request: "msix irr=1" if the MSI-X vector
 *                     (LAPIC vector 0x40) is pending in the LAPIC's IRR
 *   intx              re-init without MSI-X, route the function's INTx
 *                     GSI (config 0x3C) through the IOAPIC to vector 0x50,
 *                     do a read: "intx gsi=G isr=1 irr=1"
 *   rng:N             N (<= 32) bytes from virtio-rng: "rng <hex>"
 *   bench:seq-read:MIB        "bench seq-read MIB MiB cycles C" (64 KiB reqs)
 *   bench:rand-read-4k:N      "bench rand-read-4k N reqs cycles C"
 *   bench:seq-write:MIB       "bench seq-write MIB MiB cycles C" (64 KiB
 *                     reqs from LBA 0, then one flush, all timed)
 *   evil:loop         a descriptor loop: "evil loop status 0x.. needs-reset=1",
 *                     then reset, re-init and a read: "recovered status 0"
 *   evil:oob          a read into memory beyond RAM: "evil oob status 1"
 *   evil:garbage      garbage into every register, then reset + read:
 *                     "evil garbage recovered status 0"
 *
 * Statuses are decimal (0 OK, 1 IOERR, 2 UNSUPP, 255: no answer).  Last
 * line: "VMD-TEST blk done".  Errors: "VMD-TEST error: <what>".
 * Interrupts stay disabled (IF=0); delivered ones just sit in the IRR.
 */
#include "lib.h"
#include "pci.h"
#include "virtio.h"

/* ---- PCI ---- */

/* ---- virtio ---- */

#define QS		16
#define BLK_F_RO	(1ULL << 5)
#define BLK_F_FLUSH	(1ULL << 9)
#define BLK_F_DISCARD	(1ULL << 13)
#define BLK_F_WZ	(1ULL << 14)
#define LAPIC		0xFEE00000UL
#define IOAPIC		0xFEC00000UL
#define MSI_VECTOR	0x40
#define INTX_VECTOR	0x50

struct vdev {
	int slot;
	u64 bar;
	struct virtio_caps cap;
	u64 features;
	u64 ring;	/* desc at ring, avail at +0x1000, used at +0x2000 */
	u16 avail_idx, used_seen, qnotify;
};

static struct vdev blk, rng;
static int blk_slots[8], nblk, rng_slot = -1;
/* Scratch outside the image (RAM is zero at boot). */
#define BLK_RING	0x300000UL
#define RNG_RING	0x310000UL
#define HDR		0x320000UL
#define STATUS		0x320100UL
#define DATA		0x400000UL

static struct desc *descs(struct vdev *d) { return (struct desc *)d->ring; }

static void vdev_probe(struct vdev *d, int slot)
{
	memset(d, 0, sizeof(*d));
	d->slot = slot;
	pci_wr(slot, 0x04, (pci_rd(slot, 0x04) & 0xffff) | 0x6);
	d->bar = bar_addr(slot, 0);
	virtio_caps(slot, &d->cap, 1);
	if (!d->cap.common || !d->cap.notify || !d->cap.isr)
		fail("virtio capabilities missing");
}

static void msix_enable(struct vdev *d, int on)
{
	u32 v = pci_rd(d->slot, d->cap.msix_cap);
	v = on ? (v | 0x80000000u) : (v & ~0xc0000000u);
	pci_wr(d->slot, d->cap.msix_cap, v);
}

/* Reset and set up queue 0; returns 0 or fails. */
static void vdev_init(struct vdev *d, u64 ring, u64 want, int use_msix)
{
	u64 c = d->cap.common;
	u64 f = virtio_start(c, 1000);
	d->features = f;
	virtio_features_ok(c, f & (want | F_VERSION_1));
	d->ring = ring;
	d->qnotify = virtio_queue(c, 0, QS, ring);
	if (use_msix && d->cap.msix_cap >= 0) {
		msix_enable(d, 1);
		wr32(d->cap.msix_table + 0, 0xFEE00000u);
		wr32(d->cap.msix_table + 4, 0);
		wr32(d->cap.msix_table + 8, MSI_VECTOR);
		wr32(d->cap.msix_table + 12, 0);
		wr16(c + 0x1a, 0);
		if (rd16(c + 0x1a) != 0)
			fail("MSI-X vector refused");
	} else if (d->cap.msix_cap >= 0) {
		msix_enable(d, 0);
	}
	wr16(c + 0x1c, 1);
	wr8(c + 0x14, 1 | 2 | 4 | 8);
	d->avail_idx = 0;
	d->used_seen = 0;
}

/* Makes chain head 0 available, notifies, polls.  Returns 0 when used. */
static int submit(struct vdev *d, u32 spins)
{
	volatile u16 *avail = (volatile u16 *)(d->ring + 0x1000);
	volatile u16 *used = (volatile u16 *)(d->ring + 0x2000);
	avail[2 + d->avail_idx % QS] = 0;
	barrier();
	d->avail_idx++;
	avail[1] = d->avail_idx;
	barrier();
	wr16(d->cap.notify + (u64)d->qnotify * d->cap.mult, 0);
	for (u32 i = 0; i < spins; i++) {
		if (used[1] != d->used_seen) {
			d->used_seen++;
			return 0;
		}
	}
	return -1;
}

/* One virtio-blk request; data_dir: 0 none, 1 device reads, 2 device writes. */
static int blk_req(u32 type, u64 sector, u64 data, u32 len, int data_dir)
{
	struct desc *q = descs(&blk);
	u32 *h = (u32 *)HDR;
	h[0] = type;
	h[1] = 0;
	*(u64 *)(HDR + 8) = sector;
	*(volatile u8 *)STATUS = 0xff;
	int n = 0;
	q[n] = (struct desc){ HDR, 16, DESC_NEXT, 1 };
	n++;
	if (data_dir) {
		q[n] = (struct desc){ data, len, (u16)(DESC_NEXT | (data_dir == 2 ? DESC_WRITE : 0)), (u16)(n + 1) };
		n++;
	}
	q[n] = (struct desc){ STATUS, 1, DESC_WRITE, 0 };
	if (submit(&blk, 3000000))
		return 255;
	return *(volatile u8 *)STATUS;
}

/* ---- output helpers ---- */

static void put_hex2(u8 b)
{
	const char *x = "0123456789abcdef";
	putc(x[b >> 4]);
	putc(x[b & 15]);
}

static u64 fnv(const u8 *p, u64 n)
{
	u64 h = 0xcbf29ce484222325ULL;
	while (n--) {
		h ^= *p++;
		h *= 0x100000001b3ULL;
	}
	return h;
}

static void say(const char *what, u64 lba, u64 n, int st)
{
	puts(what);
	putc(' ');
	put_dec(lba);
	putc(' ');
	put_dec(n);
	puts(" status ");
	put_dec((u64)st);
	putc('\n');
}

/* ---- command line ---- */

static const char *arg;	/* after "verb" */

static int starts(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

static u64 num(void)
{
	u64 v = 0;
	if (*arg == ':')
		arg++;
	if (arg[0] == '0' && arg[1] == 'x') {
		arg += 2;
		for (;; arg++) {
			char c = *arg;
			if (c >= '0' && c <= '9') v = v * 16 + (u64)(c - '0');
			else if (c >= 'a' && c <= 'f') v = v * 16 + (u64)(c - 'a' + 10);
			else break;
		}
		return v;
	}
	while (*arg >= '0' && *arg <= '9')
		v = v * 10 + (u64)(*arg++ - '0');
	return v;
}

static void need_blk(void)
{
	if (!blk.cap.common)
		fail("no virtio-blk device");
}

static void blk_select(int n, int msix)
{
	if (n >= nblk)
		fail("no such disk");
	vdev_probe(&blk, blk_slots[n]);
	vdev_init(&blk, BLK_RING, BLK_F_FLUSH | BLK_F_DISCARD | BLK_F_WZ | BLK_F_RO, msix);
}

static int lapic_irr(int vec)
{
	return (rd32(LAPIC + 0x200 + 0x10 * (u64)(vec / 32)) >> (vec % 32)) & 1;
}

static void do_read(u64 lba, u64 n)
{
	if (n > 2048)
		fail("read too large");
	memset((void *)DATA, 0, 16);
	int st = blk_req(0, lba, DATA, (u32)(n * 512), 2);
	puts("read ");
	put_dec(lba);
	putc(' ');
	put_dec(n);
	puts(" status ");
	put_dec((u64)st);
	puts(" fnv ");
	put_hex(fnv((const u8 *)DATA, n * 512));
	puts(" first ");
	for (int i = 0; i < 16; i++)
		put_hex2(((const u8 *)DATA)[i]);
	putc('\n');
}

static void evil_loop(void)
{
	struct desc *q = descs(&blk);
	q[0] = (struct desc){ HDR, 16, DESC_NEXT, 1 };
	q[1] = (struct desc){ DATA, 512, DESC_NEXT | DESC_WRITE, 0 };
	*(u32 *)HDR = 0;
	int r = submit(&blk, 300000);
	u8 st = rd8(blk.cap.common + 0x14);
	puts("evil loop used=");
	put_dec(r == 0);
	puts(" status ");
	put_hex(st);
	puts(" needs-reset=");
	put_dec((st & 0x40) != 0);
	putc('\n');
}

static void evil_garbage(void)
{
	u64 c = blk.cap.common;
	for (u64 off = 0; off < 0x40; off++)
		wr8(c + off, (u8)(0xa5 ^ off));
	for (u64 off = 0; off < 0x40; off += 4)
		wr32(c + off, 0xdeadbeef);
	for (u64 off = 0; off < 0x100; off += 4)
		wr32(blk.cap.device + off, 0xffffffff);
	for (u64 off = 0; off < 0x40; off += 4)
		wr32(blk.cap.msix_table + off, 0x12345678);
	wr32(blk.cap.notify + 0x800, 7);
	wr32(blk.bar + 0x3ffc, 1);
	(void)rd32(blk.bar + 0x3ffc);
	(void)rd8(blk.cap.isr);
	/* PCI config garbage (not the BAR or the command register). */
	for (int reg = 0x14; reg < 0x100; reg += 4)
		pci_wr(blk.slot, reg, 0xffffffff);
	pci_wr(blk.slot, 0x3c, 0);
	puts("evil garbage done\n");
}

static int stay;

static void run(const char *cmd)
{
	arg = cmd;
	while (*arg) {
		while (*arg == ' ')
			arg++;
		const char *tok = arg;
		while (*arg && *arg != ' ')
			arg++;
		const char *end = arg;
		arg = tok;
#define VERB(v) (starts(tok, v) && (arg = tok + sizeof(v) - 1, 1))
		if (VERB("stay")) {
			stay = 1;
		} else if (VERB("disk:")) {
			blk_select((int)num(), 1);
		} else if (VERB("info")) {
			need_blk();
			puts("blk: capacity=");
			put_dec(*(volatile u32 *)blk.cap.device | ((u64)rd32(blk.cap.device + 4) << 32));
			puts(" features=");
			put_hex(blk.features);
			puts(" ro=");
			put_dec((blk.features & BLK_F_RO) != 0);
			putc('\n');
		} else if (VERB("read:")) {
			need_blk();
			u64 lba = num(), n = num();
			do_read(lba, n);
		} else if (VERB("write:")) {
			need_blk();
			u64 lba = num(), n = num(), b = num();
			if (n > 2048)
				fail("write too large");
			memset((void *)DATA, (int)b, n * 512);
			say("write", lba, n, blk_req(1, lba, DATA, (u32)(n * 512), 1));
		} else if (VERB("flush")) {
			need_blk();
			puts("flush status ");
			put_dec((u64)blk_req(4, 0, 0, 0, 0));
			putc('\n');
		} else if (VERB("id")) {
			need_blk();
			memset((void *)DATA, 0, 21);
			int st = blk_req(8, 0, DATA, 20, 2);
			puts("id status ");
			put_dec((u64)st);
			putc(' ');
			puts((const char *)DATA);
			putc('\n');
		} else if (VERB("discard:") || VERB("zeroes:")) {
			need_blk();
			int zero = tok[0] == 'z';
			u64 lba = num(), n = num(), unmap = zero ? num() : 0;
			u64 *seg = (u64 *)DATA;
			seg[0] = lba;
			seg[1] = (n & 0xffffffffu) | ((unmap ? 1ULL : 0) << 32);
			int st = blk_req(zero ? 13 : 11, 0, DATA, 16, 1);
			say(zero ? "zeroes" : "discard", lba, n, st);
		} else if (VERB("msix")) {
			need_blk();
			wr32(LAPIC + 0xf0, 0x1ff);
			int st = blk_req(0, 0, DATA, 512, 2);
			puts("msix status ");
			put_dec((u64)st);
			puts(" irr=");
			put_dec((u64)lapic_irr(MSI_VECTOR));
			putc('\n');
		} else if (VERB("intx")) {
			need_blk();
			wr32(LAPIC + 0xf0, 0x1ff);
			vdev_init(&blk, BLK_RING, BLK_F_FLUSH, 0);
			u32 gsi = pci_rd(blk.slot, 0x3c) & 0xff;
			wr32(IOAPIC, 0x10 + 2 * gsi + 1);
			wr32(IOAPIC + 0x10, 0);
			wr32(IOAPIC, 0x10 + 2 * gsi);
			wr32(IOAPIC + 0x10, INTX_VECTOR | (1u << 15));
			int st = blk_req(0, 0, DATA, 512, 2);
			/* The interrupt travels: give it a moment. */
			int irr = 0;
			for (int i = 0; i < 20000 && !(irr = lapic_irr(INTX_VECTOR)); i++)
				;
			u8 isr = rd8(blk.cap.isr);
			puts("intx gsi=");
			put_dec(gsi);
			puts(" status ");
			put_dec((u64)st);
			puts(" isr=");
			put_dec(isr);
			puts(" irr=");
			put_dec((u64)irr);
			putc('\n');
		} else if (VERB("rng:")) {
			u64 n = num();
			if (rng_slot < 0)
				fail("no virtio-rng device");
			if (n > 32)
				n = 32;
			if (!rng.cap.common) {
				vdev_probe(&rng, rng_slot);
				vdev_init(&rng, RNG_RING, 0, 0);
			}
			u8 *buf = (u8 *)(DATA + 0x80000);
			descs(&rng)[0] = (struct desc){ (u64)buf, (u32)n, DESC_WRITE, 0 };
			int r = submit(&rng, 3000000);
			u32 got = ((volatile u32 *)(rng.ring + 0x2000))[2 * ((rng.used_seen - 1) % QS) + 2];
			puts("rng ");
			put_dec(r == 0 ? got : 0);
			putc(' ');
			for (u64 i = 0; i < n; i++)
				put_hex2(buf[i]);
			putc('\n');
		} else if (VERB("bench:seq-read:")) {
			need_blk();
			u64 mib = num();
			u64 t0 = rdtsc();
			int bad = 0;
			for (u64 i = 0; i < mib * 16; i++)
				bad |= blk_req(0, i * 128, DATA, 65536, 2);
			u64 t1 = rdtsc();
			puts("bench seq-read ");
			put_dec(mib);
			puts(" MiB status ");
			put_dec((u64)bad);
			puts(" cycles ");
			put_dec(t1 - t0);
			putc('\n');
		} else if (VERB("bench:seq-write:")) {
			need_blk();
			u64 mib = num();
			memset((void *)DATA, 0x5a, 65536);
			u64 t0 = rdtsc();
			int bad = 0;
			for (u64 i = 0; i < mib * 16; i++)
				bad |= blk_req(1, i * 128, DATA, 65536, 1);
			if (blk.features & BLK_F_FLUSH)
				bad |= blk_req(4, 0, 0, 0, 0);
			u64 t1 = rdtsc();
			puts("bench seq-write ");
			put_dec(mib);
			puts(" MiB status ");
			put_dec((u64)bad);
			puts(" cycles ");
			put_dec(t1 - t0);
			putc('\n');
		} else if (VERB("bench:rand-read-4k:")) {
			need_blk();
			u64 n = num();
			u64 cap = *(volatile u32 *)blk.cap.device | ((u64)rd32(blk.cap.device + 4) << 32);
			u64 x = 88172645463325252ULL, t0 = rdtsc();
			int bad = 0;
			for (u64 i = 0; i < n; i++) {
				x ^= x << 13; x ^= x >> 7; x ^= x << 17;
				bad |= blk_req(0, (x % (cap / 8)) * 8, DATA, 4096, 2);
			}
			u64 t1 = rdtsc();
			puts("bench rand-read-4k ");
			put_dec(n);
			puts(" reqs status ");
			put_dec((u64)bad);
			puts(" cycles ");
			put_dec(t1 - t0);
			putc('\n');
		} else if (VERB("evil:loop")) {
			need_blk();
			evil_loop();
			blk_select(0, 1);
			puts("recovered status ");
			put_dec((u64)blk_req(0, 0, DATA, 512, 2));
			putc('\n');
		} else if (VERB("evil:oob")) {
			need_blk();
			puts("evil oob status ");
			put_dec((u64)blk_req(0, 0, 0x7000000000ULL, 512, 2));
			putc('\n');
			puts("evil oob-hdr status ");
			descs(&blk)[0] = (struct desc){ 0x7000000000ULL, 16, DESC_NEXT, 1 };
			descs(&blk)[1] = (struct desc){ STATUS, 1, DESC_WRITE, 0 };
			*(volatile u8 *)STATUS = 0xff;
			put_dec(submit(&blk, 3000000) ? 255 : *(volatile u8 *)STATUS);
			putc('\n');
		} else if (VERB("evil:garbage")) {
			need_blk();
			evil_garbage();
			blk_select(0, 1);
			puts("evil garbage recovered status ");
			put_dec((u64)blk_req(0, 0, DATA, 512, 2));
			putc('\n');
		} else if (end != tok) {
			/* not ours: ignore (e.g. console=...) */
		}
		arg = end;
	}
}

void guest_main(u32 start_info)
{
	const struct hvm_start_info *si = (const struct hvm_start_info *)(usize)start_info;
	serial_init();
	puts("VMD-TEST blk start\n");
	for (int slot = 0; slot < 32; slot++) {
		u32 id = pci_rd(slot, 0);
		if (id == 0xffffffffu)
			continue;
		puts("pci 00:");
		put_hex2((u8)slot);
		puts(".0 ");
		put_hex(id & 0xffff);
		putc(':');
		put_hex(id >> 16);
		putc('\n');
		if (id == 0x10421af4u && nblk < 8)
			blk_slots[nblk++] = slot;
		if (id == 0x10441af4u)
			rng_slot = slot;
	}
	if (nblk)
		blk_select(0, 1);
	if (si->magic == HVM_START_MAGIC && si->cmdline_paddr)
		run((const char *)(usize)si->cmdline_paddr);
	puts("VMD-TEST blk done\n");
	if (stay)
		halt_forever();
	poweroff();
}

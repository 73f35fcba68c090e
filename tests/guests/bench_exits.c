/*
 * bench_exits.c - VM-exit rate benchmark guest (bench/run.sh).
 *
 * The nested KVM this project is tested on emulates CPL0 code (~1M
 * instructions/s) but runs CPL3 code natively, so the hot loops run in
 * ring 3 with IOPL=3: guest_main sets the U bit in the identity page tables,
 * loads a GDT with ring-3 segments and irets to user_main.  Each phase then
 * does N accesses that all exit to the VMM, between two marker lines:
 *
 *   VMD-BENCH exits n=N
 *   VMD-BENCH pio-out begin     ... N x outb to port 0x2e0 (unclaimed)
 *   VMD-BENCH pio-out end
 *   VMD-BENCH pio-in begin      ... N x inb from port 0x2e0
 *   VMD-BENCH pio-in end
 *   VMD-BENCH mmio-write begin  ... N x 32-bit store to 0xd0000000 (unclaimed)
 *   VMD-BENCH mmio-write end
 *   VMD-BENCH mmio-read begin   ... N x 32-bit load from 0xd0000000
 *   VMD-BENCH mmio-read end
 *   VMD-BENCH exits done
 *
 * The host times the lines as they arrive.  N comes from "n=DECIMAL" on the
 * command line (default 100000).  Then it powers off (from ring 3: the
 * writes to 0x604 are allowed with IOPL=3; if they do not end the VM, the
 * final hlt at CPL3 faults, and with a null IDT that is a triple fault).
 */
#include "lib.h"

#define BENCH_PORT	0x2e0
#define BENCH_MMIO	0xd0000000UL

struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
};

static u64 n_iter = 100000;

static u64 gdt[7] __attribute__((aligned(16))) = {
	0,
	0x00af9b000000ffffULL,	/* 0x08: 64-bit kernel code (as start.S) */
	0x00cf93000000ffffULL,	/* 0x10: kernel data (as start.S) */
	0x00affb000000ffffULL,	/* 0x18: 64-bit user code, DPL 3 */
	0x00cff3000000ffffULL,	/* 0x20: user data, DPL 3 */
	0, 0,			/* 0x28: 64-bit TSS, filled in at run time */
};

/* A TSS whose I/O permission bitmap allows every port to ring 3 (the
 * nested KVM here does not honour RFLAGS.IOPL for ring-3 code). */
static struct {
	u8 tss[104];
	u8 iomap[8192 + 1];
} __attribute__((packed, aligned(16))) tss;

static struct {
	u16 limit;
	u64 base;
} __attribute__((packed)) gdt_desc = { sizeof(gdt) - 1, (u64)gdt };

static u8 user_stack[16384] __attribute__((aligned(16)));

static void parse_n(const char *s)
{
	for (; *s; s++) {
		if (s[0] == 'n' && s[1] == '=' && s[2] >= '0' && s[2] <= '9') {
			u64 v = 0;
			for (s += 2; *s >= '0' && *s <= '9'; s++)
				v = v * 10 + (u64)(*s - '0');
			if (v)
				n_iter = v;
			return;
		}
	}
}

static void phase(const char *name, int kind)
{
	u64 n = n_iter;

	puts("VMD-BENCH ");
	puts(name);
	puts(" begin\n");
	switch (kind) {
	case 0:
		while (n--)
			outb(BENCH_PORT, 0);
		break;
	case 1:
		while (n--)
			(void)inb(BENCH_PORT);
		break;
	case 2:
		while (n--)
			mmio_write32(BENCH_MMIO, 0);
		break;
	default:
		while (n--)
			(void)mmio_read32(BENCH_MMIO);
		break;
	}
	puts("VMD-BENCH ");
	puts(name);
	puts(" end\n");
}

static void __attribute__((noreturn, used)) user_main(void)
{
	puts("VMD-BENCH exits n=");
	put_dec(n_iter);
	putc('\n');
	phase("pio-out", 0);
	phase("pio-in", 1);
	phase("mmio-write", 2);
	phase("mmio-read", 3);
	puts("VMD-BENCH exits done\n");
	poweroff();
}

void guest_main(u32 start_info)
{
	const struct hvm_start_info *si = (const void *)(usize)start_info;
	u64 cr3, *pml4, *pdpt, *pd;

	serial_init();
	if (si->magic == 0x336ec578 && si->cmdline_paddr)
		parse_n((const char *)(usize)si->cmdline_paddr);

	/* User access to the identity map: U bit at every level. */
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	pml4 = (u64 *)(cr3 & ~0xfffULL);
	pml4[0] |= 4;
	pdpt = (u64 *)(pml4[0] & ~0xfffULL);
	for (int i = 0; i < 4; i++) {
		pdpt[i] |= 4;
		pd = (u64 *)(pdpt[i] & ~0xfffULL);
		for (int j = 0; j < 512; j++)
			pd[j] |= 4;
	}
	__asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
	{
		u64 base = (u64)&tss, limit = sizeof(tss) - 1;

		tss.tss[102] = 104;		/* I/O map base */
		tss.iomap[8192] = 0xff;		/* terminator */
		gdt[5] = (limit & 0xffff) | ((base & 0xffffff) << 16) |
			 (0x89ULL << 40) | (((limit >> 16) & 0xf) << 48) |
			 (((base >> 24) & 0xff) << 56);
		gdt[6] = base >> 32;
	}
	__asm__ volatile("lgdt %0" : : "m"(gdt_desc));
	__asm__ volatile("ltr %w0" : : "r"(0x28));

	/* IOPL=3 in ring 0 first, then iretq to ring 3: SS, RSP, RFLAGS
	 * (IOPL=3, IF=0), CS, RIP. */
	__asm__ volatile("pushq $0x3002\n\tpopfq" : : : "memory", "cc");
	__asm__ volatile(
		"pushq $0x23\n\t"
		"pushq %0\n\t"
		"pushq $0x3002\n\t"
		"pushq $0x1b\n\t"
		"pushq %1\n\t"
		"iretq"
		:
		: "r"((u64)(user_stack + sizeof(user_stack) - 8)),
		  "r"((u64)user_main)
		: "memory");
	__builtin_unreachable();
}

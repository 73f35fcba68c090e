/* ring3.c - the ring-3 switch of net.c and bench_exits.c. */
#include "lib.h"
#include "ring3.h"

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

void enter_ring3(void (*user_main)(void))
{
	u64 cr3, *pml4, *pdpt, *pd;

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

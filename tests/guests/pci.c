/* pci.c - PCI configuration space helpers for the vmd test guests. */
#include "pci.h"

u32 pci_rd(int slot, int reg)
{
	outl(0xCF8, 0x80000000u | ((u32)slot << 11) | (u32)(reg & 0xfc));
	return inl(0xCFC);
}

void pci_wr(int slot, int reg, u32 v)
{
	outl(0xCF8, 0x80000000u | ((u32)slot << 11) | (u32)(reg & 0xfc));
	outl(0xCFC, v);
}

u8 pci_rd8(int slot, int reg)
{
	return (u8)(pci_rd(slot, reg) >> ((reg & 3) * 8));
}

/* Page tables for BARs a VMM placed above the 4 GiB start.S maps: one GiB
 * each (Firecracker's sit at 256 GiB and cannot be moved; Cloud
 * Hypervisor's near 64 TiB can only move within its 64-bit window). */
#define HIGH_GIBS 2
static u64 high_pdpt[HIGH_GIBS][512] __attribute__((aligned(4096)));
static u64 high_pd[HIGH_GIBS][512] __attribute__((aligned(4096)));
static int high_used;

/* Maps the GiB around a above 4 GiB (uncached, user-accessible for the
 * ring-3 guests); 0 when out of tables. */
static u64 high_gib[HIGH_GIBS];

static int map_high(u64 a)
{
	u64 cr3, *pml4, *pdpt;
	for (int i = 0; i < high_used; i++)
		if (high_gib[i] == a >> 30)
			return 1;	/* done already (maybe at CPL0: no CR3 here) */
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	pml4 = (u64 *)(cr3 & ~0xfffULL);
	u64 *e4 = &pml4[(a >> 39) & 511];
	if (!(*e4 & 1)) {
		if (high_used >= HIGH_GIBS)
			return 0;
		*e4 = (u64)high_pdpt[high_used] | 0x7;
	}
	pdpt = (u64 *)(*e4 & ~0xfffULL & ((1ULL << 52) - 1));
	u64 *e3 = &pdpt[(a >> 30) & 511];
	if (!(*e3 & 1)) {
		if (high_used >= HIGH_GIBS)
			return 0;
		high_gib[high_used] = a >> 30;
		u64 *pd = high_pd[high_used++];
		for (int i = 0; i < 512; i++)
			pd[i] = ((a >> 30) << 30) + ((u64)i << 21) + 0x9f;
		*e3 = (u64)pd | 0x7;
	}
	return 1;
}

u64 bar_addr(int slot, int idx)
{
	int reg = 0x10 + 4 * idx;
	u32 lo = pci_rd(slot, reg);
	int is64 = (lo & 6) == 4;
	u32 hi = is64 ? pci_rd(slot, reg + 4) : 0;
	if ((lo & ~0xfu) && !hi)
		return lo & ~0xfu;
	u64 high = ((u64)hi << 32) | (lo & ~0xfu);
	if (hi && map_high(high))
		return high;
	u32 a = 0xE8000000u + ((u32)slot << 16) + ((u32)idx << 12);
	pci_wr(slot, reg, a);
	if (is64)
		pci_wr(slot, reg + 4, 0);
	return a;
}

void pci_map_bars(void)
{
	for (int s = 0; s < 32; s++) {
		if ((pci_rd(s, 0) & 0xffff) == 0xffff)
			continue;
		for (int i = 0; i < 6; i++) {
			u32 lo = pci_rd(s, 0x10 + 4 * i);
			if (lo & 1)
				continue;	/* I/O BAR */
			if ((lo & 6) == 4 && pci_rd(s, 0x14 + 4 * i))
				bar_addr(s, i);	/* 64-bit, above 4 GiB: map it */
			if ((lo & 6) == 4)
				i++;
		}
	}
}

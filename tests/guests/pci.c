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

u64 bar_addr(int slot, int idx)
{
	int reg = 0x10 + 4 * idx;
	u32 lo = pci_rd(slot, reg);
	int is64 = (lo & 6) == 4;
	u32 hi = is64 ? pci_rd(slot, reg + 4) : 0;
	if ((lo & ~0xfu) && !hi)
		return lo & ~0xfu;
	u32 a = 0xE8000000u + ((u32)slot << 16) + ((u32)idx << 12);
	pci_wr(slot, reg, a);
	if (is64)
		pci_wr(slot, reg + 4, 0);
	return a;
}

/* pci.h - PCI bus 0 configuration space through ports 0xCF8/0xCFC. */
#ifndef GUEST_PCI_H
#define GUEST_PCI_H

#include "lib.h"

u32 pci_rd(int slot, int reg);		/* reg & ~3 */
void pci_wr(int slot, int reg, u32 v);	/* reg & ~3 */
u8 pci_rd8(int slot, int reg);

/*
 * Address of memory BAR `idx` (a capability names its BAR: vmd puts
 * everything in BAR 0, QEMU its modern virtio structures in BAR 4 and the
 * MSI-X table in BAR 1).  An unassigned BAR, or a 64-bit one above the
 * 4 GiB identity map, gets a fresh address below 4 GiB here.
 */
u64 bar_addr(int slot, int idx);
/* Maps every 64-bit BAR the VMM placed above 4 GiB; at CPL0, before a guest
 * enters ring 3 (bar_addr itself edits the page tables). */
void pci_map_bars(void);

#endif

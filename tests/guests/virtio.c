/* virtio.c - modern virtio-pci transport helpers for the vmd test guests. */
#include "virtio.h"
#include "pci.h"

void virtio_caps(int slot, struct virtio_caps *v, int msix)
{
	memset(v, 0, sizeof(*v));
	v->msix_cap = -1;
	for (int p = pci_rd8(slot, 0x34), n = 0; p && n < 32; p = pci_rd8(slot, p + 1), n++) {
		u8 id = pci_rd8(slot, p);
		if (id == 0x09) {
			u8 type = pci_rd8(slot, p + 3);
			u64 a = bar_addr(slot, pci_rd8(slot, p + 4)) + pci_rd(slot, p + 8);
			if (type == 1) v->common = a;
			if (type == 2) { v->notify = a; v->mult = pci_rd(slot, p + 16); }
			if (type == 3) v->isr = a;
			if (type == 4) v->device = a;
		} else if (id == 0x11) {
			v->msix_cap = p;
			if (msix) {
				u32 t = pci_rd(slot, p + 4);
				v->msix_table = bar_addr(slot, (int)(t & 7)) + (t & ~7u);
			}
		}
	}
}

u64 virtio_start(u64 c, int spins)
{
	wr8(c + 0x14, 0);
	for (int i = 0; i < spins && rd8(c + 0x14); i++)
		;
	wr8(c + 0x14, 1);
	wr8(c + 0x14, 1 | 2);
	wr32(c + 0x00, 0);
	u64 f = rd32(c + 0x04);
	wr32(c + 0x00, 1);
	f |= (u64)rd32(c + 0x04) << 32;
	return f;
}

void virtio_features_ok(u64 c, u64 f)
{
	wr32(c + 0x08, 0);
	wr32(c + 0x0c, (u32)f);
	wr32(c + 0x08, 1);
	wr32(c + 0x0c, (u32)(f >> 32));
	wr8(c + 0x14, 1 | 2 | 8);
	if (!(rd8(c + 0x14) & 8))
		fail("FEATURES_OK refused");
}

u16 virtio_queue(u64 c, u16 index, u16 qs, u64 ring)
{
	wr16(c + 0x16, index);
	if (rd16(c + 0x18) < qs)
		fail("queue too small");
	wr16(c + 0x18, qs);
	memset((void *)ring, 0, 0x3000);
	wr32(c + 0x20, (u32)ring);
	wr32(c + 0x24, 0);
	wr32(c + 0x28, (u32)(ring + 0x1000));
	wr32(c + 0x2c, 0);
	wr32(c + 0x30, (u32)(ring + 0x2000));
	wr32(c + 0x34, 0);
	return rd16(c + 0x1e);
}

/* virtio.h - the modern virtio-pci transport, as blk.c and net.c use it. */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include "lib.h"

#define barrier() __asm__ volatile("" ::: "memory")

static inline u8 rd8(u64 a) { return *(volatile u8 *)a; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)a; }
static inline void wr8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void wr16(u64 a, u16 v) { *(volatile u16 *)a = v; }
#define rd32 mmio_read32
#define wr32 mmio_write32

#define F_VERSION_1	(1ULL << 32)
#define DESC_NEXT	1
#define DESC_WRITE	2

struct desc { u64 addr; u32 len; u16 flags; u16 next; };

/* What a function's capability list says (0: structure not there). */
struct virtio_caps {
	u64 common, notify, isr, device;
	u32 mult;		/* notify_off_multiplier */
	int msix_cap;		/* config offset of the MSI-X capability, or -1 */
	u64 msix_table;		/* its table, only when walked with msix=1 */
};

/*
 * Walks the capability list of the function in `slot` (memory decoding
 * must be on): the virtio common/notify/ISR/device structures, and the
 * MSI-X capability; with `msix`, also the MSI-X table's address (which may
 * assign that BAR).  Does not check that anything was found.
 */
void virtio_caps(int slot, struct virtio_caps *v, int msix);

/*
 * Resets the device (then polls the status up to `spins` times for it to
 * read back 0), sets ACKNOWLEDGE and DRIVER and returns the 64 device
 * feature bits.
 */
u64 virtio_start(u64 common, int spins);

/* Writes the driver features `f` and sets FEATURES_OK; fails if refused. */
void virtio_features_ok(u64 common, u64 f);

/*
 * Selects queue `index`, fails if it has fewer than `qs` entries, sets its
 * size to `qs`, zeroes the three pages at `ring` and puts the descriptor
 * table there, the available ring at +0x1000 and the used ring at +0x2000.
 * Returns the queue's notify offset; the queue is not enabled yet.
 */
u16 virtio_queue(u64 common, u16 index, u16 qs, u64 ring);

#endif

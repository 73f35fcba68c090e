//! The virtqueue targets' input format, shared with the seed generator
//! (no dependencies).
//!
//! Input: byte 0 = flags, then an image of guest memory from address 0.
//!   bits 0-3: log2 of the queue size (clamped to the device's maximum);
//!   bit 4: VIRTIO_F_EVENT_IDX negotiated; bit 5: read-only (virtio-blk).
//! The descriptor table sits at 0, the available ring right after it and
//! the used ring after that (4-byte aligned); everything else is buffers.
//! Guest memory is three regions: [0, 64 KiB) and [64 KiB, 72 KiB)
//! (adjacent, so buffers may cross a region boundary) and a 4 KiB one at
//! 128 KiB after a hole.
#![allow(dead_code)]

pub const REGIONS: [(u64, usize); 3] = [(0, 0x10000), (0x10000, 0x2000), (0x20000, 0x1000)];
/// How much of the input can land in guest memory (the adjacent regions).
pub const IMAGE_MAX: usize = 0x12000;

pub const F_EVENT_IDX: u8 = 1 << 4;
pub const F_READ_ONLY: u8 = 1 << 5;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

pub fn queue_size(flags: u8, max: u16) -> u16 {
    (1u32 << (flags & 0xf)).min(u32::from(max)) as u16
}

#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// First byte after the used ring.
    pub end: u64,
}

pub fn layout(size: u16) -> Layout {
    let n = u64::from(size);
    let desc = 0;
    let avail = desc + 16 * n;
    let used = (avail + 6 + 2 * n + 3) & !3;
    Layout {
        desc,
        avail,
        used,
        end: used + 6 + 8 * n,
    }
}

/// Builds inputs: descriptors, available entries, buffer contents.
pub struct Builder {
    pub flags: u8,
    pub size: u16,
    pub layout: Layout,
    mem: Vec<u8>,
    avail: Vec<u16>,
}

impl Builder {
    pub fn new(flags: u8, max: u16) -> Builder {
        let size = queue_size(flags, max);
        let layout = layout(size);
        Builder {
            flags,
            size,
            layout,
            mem: Vec::new(),
            avail: Vec::new(),
        }
    }

    /// First address free for buffers.
    pub fn data_start(&self) -> u64 {
        (self.layout.end + 15) & !15
    }

    pub fn put(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        let end = addr as usize + bytes.len();
        if self.mem.len() < end {
            self.mem.resize(end, 0);
        }
        self.mem[addr as usize..end].copy_from_slice(bytes);
        self
    }

    pub fn desc_at(
        &mut self,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.put(table + 16 * u64::from(i), &d)
    }

    pub fn desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> &mut Self {
        let t = self.layout.desc;
        self.desc_at(t, i, addr, len, flags, next)
    }

    /// Makes the chain starting at `head` available.
    pub fn avail(&mut self, head: u16) -> &mut Self {
        self.avail.push(head);
        self
    }

    pub fn build(&mut self) -> Vec<u8> {
        let a = self.layout.avail;
        let idx = self.avail.len() as u16;
        self.put(a + 2, &idx.to_le_bytes());
        for (i, h) in self.avail.clone().into_iter().enumerate() {
            self.put(a + 4 + 2 * i as u64, &h.to_le_bytes());
        }
        let mut out = vec![self.flags];
        out.extend_from_slice(&self.mem);
        out
    }
}

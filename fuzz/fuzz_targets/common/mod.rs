//! Runs a virtio device's queue processing over guest memory built from
//! the input (see virtq_layout.rs for the format).

#![allow(dead_code)]

use std::cell::RefCell;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmd_vmm::devices::virtio::VirtioDevice;

#[path = "virtq_layout.rs"]
pub mod layout;
use layout::*;

thread_local! {
    static MEM: RefCell<Option<GuestMemoryMmap>> = const { RefCell::new(None) };
}

/// Fills guest memory from `image` (zeroes elsewhere) and lends it out.
fn with_memory<R>(image: &[u8], f: impl FnOnce(&GuestMemoryMmap) -> R) -> R {
    MEM.with(|m| {
        let mut m = m.borrow_mut();
        let mem = m.get_or_insert_with(|| {
            let ranges: Vec<(GuestAddress, usize)> =
                REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
            GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
        });
        static ZERO: [u8; 0x10000] = [0; 0x10000];
        for &(a, l) in &REGIONS {
            mem.write_slice(&ZERO[..l], GuestAddress(a)).unwrap();
        }
        let n = image.len().min(IMAGE_MAX);
        mem.write_slice(&image[..n], GuestAddress(0)).unwrap();
        f(mem)
    })
}

/// Sets up queue 0 of `dev` from the input and lets the device process it.
pub fn run(dev: &mut dyn VirtioDevice, data: &[u8]) {
    run_queue(dev, 0, data)
}

/// A queue of `max` entries over the input's rings, ready for a device.
pub fn queue_for(flags: u8, max: u16, mem: &GuestMemoryMmap) -> Queue {
    let size = queue_size(flags, max);
    let l = layout(size);
    let mut q = Queue::new(max).expect("queue");
    q.try_set_size(size).expect("power-of-two size");
    q.try_set_desc_table_address(GuestAddress(l.desc)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(l.avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(l.used)).unwrap();
    q.set_event_idx(flags & F_EVENT_IDX != 0);
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

/// Lends guest memory filled from `image` (public for targets with their
/// own queue handling).
pub fn with_guest<R>(image: &[u8], f: impl FnOnce(&GuestMemoryMmap) -> R) -> R {
    with_memory(image, f)
}

/// Sets up queue `index` of `dev` from the input and lets the device
/// process it.
pub fn run_queue(dev: &mut dyn VirtioDevice, index: usize, data: &[u8]) {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let max = dev.queue_max_sizes()[index];
    let l = layout(queue_size(flags, max));
    with_memory(image, |mem| {
        let mut q = queue_for(flags, max, mem);
        match dev.process_queue(index, &mut q, mem) {
            Ok(n) => {
                // Every chain the device consumed went to the used ring.
                assert_eq!(q.next_used(), n as u16);
                if n > 0 {
                    // (With nothing served the ring still holds the input's bytes.)
                    let used_idx: u16 = mem.read_obj(GuestAddress(l.used + 2)).unwrap();
                    assert_eq!(used_idx, n as u16);
                }
                // Nothing more is available: a second pass is a no-op.
                assert_eq!(dev.process_queue(index, &mut q, mem).ok(), Some(0));
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    })
}

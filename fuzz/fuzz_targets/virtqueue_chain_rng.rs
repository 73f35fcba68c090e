//! virtio-rng's descriptor-chain walker (`VirtioDevice::process_queue`)
//! over guest-controlled rings and buffers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmd_vmm::devices::virtio::rng::VirtioRng;

mod common;

fuzz_target!(|data: &[u8]| {
    let mut dev = VirtioRng::new();
    common::run(&mut dev, data);
});

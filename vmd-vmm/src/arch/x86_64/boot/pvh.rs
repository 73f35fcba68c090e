//! The Xen PVH boot protocol as Linux and QEMU use it: the guest starts in
//! 32-bit protected mode, paging off, with EBX pointing at `hvm_start_info`.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use super::{e820_map, BootError, BootInputs};
use crate::arch::x86_64::layout::{
    CMDLINE_ADDR, PVH_MEMMAP, PVH_MEMMAP_MAX, PVH_MODLIST, PVH_START_INFO,
};

/// "xEn3" with the high bit of the `x` set: hvm_start_info's magic.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Version 1 carries the memory map.
const START_INFO_VERSION: u32 = 1;

pub fn write_start_info(inputs: &BootInputs) -> Result<(), BootError> {
    let mem = inputs.mem;
    let map = e820_map(&inputs.ram);
    // Fixed by construction (at most five entries), checked all the same.
    debug_assert!(map.len() <= PVH_MEMMAP_MAX);
    for (i, &(addr, size, type_)) in map.iter().take(PVH_MEMMAP_MAX).enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        let at = PVH_MEMMAP + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(|e| BootError::Write("PVH memory map", e))?;
    }

    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: START_INFO_VERSION,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: map.len().min(PVH_MEMMAP_MAX) as u32,
        // Zero tells the guest to scan for the RSDP itself.
        rsdp_paddr: inputs.rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some((paddr, size)) = inputs.initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST))
            .map_err(|e| BootError::Write("PVH module list", e))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST;
    }
    mem.write_obj(info, GuestAddress(PVH_START_INFO))
        .map_err(|e| BootError::Write("PVH start info", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::PVH_START_INFO;

    #[test]
    fn memmap_follows_start_info() {
        assert_eq!(
            PVH_MEMMAP,
            PVH_START_INFO + std::mem::size_of::<hvm_start_info>() as u64
        );
        let end =
            PVH_MEMMAP + (PVH_MEMMAP_MAX * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        assert!(end <= PVH_MODLIST);
    }
}

//! The Linux boot protocol's 64-bit entry: a zero page (`boot_params`) at
//! [`ZERO_PAGE`], filled from a bzImage's setup header or, for a plain
//! vmlinux, from a minimal one we make up.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::{e820_map, BootError, BootInputs};
use crate::arch::x86_64::layout::{CMDLINE_ADDR, CMDLINE_MAX, ZERO_PAGE};

/// "HdrS": the setup header magic.
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// type_of_loader "undefined": we are not a registered boot loader.
const LOADER_UNDEFINED: u8 = 0xff;
/// xloadflags: the kernel has the 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// loadflags: protected-mode code is loaded at 1 MiB (a bzImage).
const LOADED_HIGH: u8 = 1 << 0;
/// Boot protocol 2.12 introduced xloadflags.
const PROTOCOL_XLOADFLAGS: u16 = 0x020c;
/// Offset of the 64-bit entry from the protected-mode load address.
const ENTRY64_OFFSET: u64 = 0x200;
/// initrd_addr_max a kernel implies when its header leaves it zero.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Highest address the kernel accepts for the initrd's last byte.
pub fn initrd_addr_max(hdr: &setup_header) -> u64 {
    match hdr.initrd_addr_max {
        0 => DEFAULT_INITRD_ADDR_MAX,
        n => u64::from(n),
    }
}

/// Checks that a bzImage can be entered in long mode and returns that
/// entry address.
fn bzimage_entry(hdr: &setup_header) -> Result<u64, BootError> {
    if hdr.boot_flag != BOOT_FLAG {
        return Err(BootError::BadBzImage("has no 0xAA55 boot flag"));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(BootError::BadBzImage("does not load high (zImage?)"));
    }
    if hdr.version < PROTOCOL_XLOADFLAGS || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::BadBzImage(
            "has no 64-bit entry point (needs boot protocol 2.12 with XLF_KERNEL_64)",
        ));
    }
    Ok(u64::from(hdr.code32_start) + ENTRY64_OFFSET)
}

/// Writes the zero page. With a bzImage header, returns its 64-bit entry.
pub fn write_zero_page(inputs: &BootInputs, bz: Option<setup_header>) -> Result<u64, BootError> {
    let mut params = boot_params::default();
    let entry = match bz {
        Some(hdr) => {
            let entry = bzimage_entry(&hdr)?;
            // A kernel states how long a command line it takes.
            let max = hdr.cmdline_size as usize;
            if max != 0 && inputs.cmdline_len > max {
                return Err(BootError::CmdlineTooLong {
                    len: inputs.cmdline_len,
                    max,
                });
            }
            params.hdr = hdr;
            entry
        }
        None => {
            params.hdr.boot_flag = BOOT_FLAG;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.cmdline_size = CMDLINE_MAX as u32;
            0
        }
    };
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    if let Some((addr, size)) = inputs.initrd {
        // Both lie in low RAM, below 4 GiB.
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    // Read by every kernel since 5.0 (boot protocol 2.14 put it in the
    // setup header; 2.15 moved it here); older ones scan for the RSDP.
    params.acpi_rsdp_addr = inputs.rsdp.unwrap_or(0);
    let map = e820_map(&inputs.ram);
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len() as u8;
    inputs
        .mem
        .write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|e| BootError::Write("zero page", e))?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good_header() -> setup_header {
        setup_header {
            boot_flag: BOOT_FLAG,
            header: HDRS_MAGIC,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            xloadflags: XLF_KERNEL_64,
            code32_start: 0x10_0000,
            ..Default::default()
        }
    }

    #[test]
    fn entry_is_load_address_plus_0x200() {
        assert_eq!(bzimage_entry(&good_header()).unwrap(), 0x10_0200);
    }

    #[test]
    fn rejects_images_without_64_bit_entry() {
        let mut h = good_header();
        h.xloadflags = 0;
        assert!(bzimage_entry(&h).is_err());
        let mut h = good_header();
        h.version = 0x0206;
        assert!(bzimage_entry(&h).is_err());
        let mut h = good_header();
        h.boot_flag = 0;
        assert!(bzimage_entry(&h).is_err());
    }

    #[test]
    fn initrd_limit_defaults() {
        let mut h = good_header();
        assert_eq!(initrd_addr_max(&h), 0x37ff_ffff);
        h.initrd_addr_max = 0x7fff_ffff;
        assert_eq!(initrd_addr_max(&h), 0x7fff_ffff);
    }
}

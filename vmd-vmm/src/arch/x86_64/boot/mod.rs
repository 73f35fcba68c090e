//! Loading a kernel and writing what its boot protocol expects.
//!
//! Three paths, picked by what the image is:
//! - an ELF with a Xen PVH note boots at its 32-bit PVH entry ([`pvh`]);
//! - any other ELF (a Linux vmlinux) boots at its 64-bit entry with a zero
//!   page ([`linux`]);
//! - a bzImage boots by the Linux boot protocol's 64-bit entry ([`linux`]).
//!
//! The command line and the e820 memory map are common to all three. A
//! BIOS image instead of a kernel boots by [`firmware`].

pub mod firmware;
pub mod linux;
pub mod pvh;

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::gdt;
use crate::arch::x86_64::layout::{
    ACPI_START, BIOS_ROM_END, CMDLINE_ADDR, CMDLINE_MAX, EBDA_END, EBDA_START, HIGH_RAM_START,
    KERNEL_START,
};
use crate::memory::RamLayout;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel: not an ELF or bzImage")]
    UnknownFormat,
    #[error("kernel: cannot load ELF image: {0}")]
    Elf(loader::Error),
    #[error("kernel: cannot load bzImage: {0}")]
    BzImage(loader::Error),
    #[error("kernel: bzImage {0}")]
    BadBzImage(&'static str),
    #[error("kernel: cannot read the image: {0}")]
    Read(std::io::Error),
    #[error("cmdline: {len} bytes, at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cmdline: contains a NUL byte")]
    CmdlineNul,
    #[error("initrd: cannot read it: {0}")]
    InitrdRead(std::io::Error),
    #[error("initrd: {size} bytes do not fit in guest RAM between the kernel (ends {kernel_end:#x}) and {limit:#x}")]
    InitrdTooBig {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("initrd: cannot load it: {0}")]
    InitrdLoad(GuestMemoryError),
    #[error("firmware: cannot map it below 4 GiB: {0}")]
    FirmwareMap(String),
    #[error("option ROM: {0}")]
    OptionRom(String),
    #[error("boot: cannot write the {0} to guest memory: {1}")]
    Write(&'static str, GuestMemoryError),
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 32-bit protected mode, paging off, EBX = start info.
    Pvh { entry: u64 },
    /// Long mode on the identity map, RSI = zero page.
    Linux64 { entry: u64 },
    /// Firmware: KVM's reset state, real mode at the reset vector.
    Firmware,
}

/// The e820 memory types we use.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One e820 entry: `(start, length, type)`.
pub type E820Entry = (u64, u64, u32);

/// The guest's memory map, the same for every boot path.
pub fn e820_map(ram: &RamLayout) -> Vec<E820Entry> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, EBDA_END - EBDA_START, E820_RESERVED),
        // ACPI tables and the BIOS ROM area (MP table) as one block.
        (ACPI_START, BIOS_ROM_END - ACPI_START, E820_RESERVED),
        (KERNEL_START, ram.low_end - KERNEL_START, E820_RAM),
    ];
    if ram.high_size > 0 {
        map.push((HIGH_RAM_START, ram.high_size, E820_RAM));
    }
    map
}

/// What the boot paths share once the kernel and initrd are in memory.
pub struct BootInputs<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub ram: RamLayout,
    /// Command line length without its NUL.
    pub cmdline_len: usize,
    /// `(address, size)` of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// Where the ACPI RSDP is, if the VM has ACPI tables.
    pub rsdp: Option<u64>,
}

/// Loads `kernel` (and `initrd`) into `mem`, writes the command line, the
/// memory map and the boot structures, and says where to start.
/// `ignore_pvh` boots a PVH-capable vmlinux by its 64-bit entry instead.
/// `rsdp` is handed to the kernel on every path (it need not scan for it).
pub fn load(
    mem: &GuestMemoryMmap,
    ram: RamLayout,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cmdline: &str,
    ignore_pvh: bool,
    rsdp: Option<u64>,
) -> Result<BootEntry, BootError> {
    let cmdline_len = write_cmdline(mem, cmdline, CMDLINE_MAX - 1)?;
    let image = load_kernel(mem, kernel, ignore_pvh)?;
    let kernel_end = image.kernel_end.max(KERNEL_START);

    let initrd_limit = match &image.kind {
        KernelKind::BzImage(hdr) => linux::initrd_addr_max(hdr),
        _ => u64::MAX,
    };
    let initrd = match initrd {
        Some(f) => Some(load_initrd(mem, &ram, f, kernel_end, initrd_limit)?),
        None => None,
    };

    gdt::write_gdt(mem)?;
    let inputs = BootInputs {
        mem,
        ram,
        cmdline_len,
        initrd,
        rsdp,
    };
    match image.kind {
        KernelKind::Pvh(entry) => {
            pvh::write_start_info(&inputs)?;
            Ok(BootEntry::Pvh { entry })
        }
        KernelKind::Elf64(entry) => {
            linux::write_zero_page(&inputs, None)?;
            gdt::write_page_tables(mem)?;
            Ok(BootEntry::Linux64 { entry })
        }
        KernelKind::BzImage(hdr) => {
            let entry = linux::write_zero_page(&inputs, Some(hdr))?;
            gdt::write_page_tables(mem)?;
            Ok(BootEntry::Linux64 { entry })
        }
    }
}

enum KernelKind {
    Pvh(u64),
    Elf64(u64),
    BzImage(setup_header),
}

struct LoadedKernel {
    kind: KernelKind,
    kernel_end: u64,
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
    ignore_pvh: bool,
) -> Result<LoadedKernel, BootError> {
    let himem = Some(GuestAddress(KERNEL_START));
    // An offset of zero loads at the ELF's own addresses but makes
    // linux-loader skip the PVH note.
    let offset = ignore_pvh.then_some(GuestAddress(0));
    match Elf::load(mem, offset, kernel, himem) {
        Ok(r) => {
            let kind = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => KernelKind::Pvh(a.0),
                _ => KernelKind::Elf64(r.kernel_load.0),
            };
            return Ok(LoadedKernel {
                kind,
                kernel_end: r.kernel_end,
            });
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {}
        Err(e) => return Err(BootError::Elf(e)),
    }
    match BzImage::load(mem, None, kernel, himem) {
        Ok(r) => {
            let hdr = r
                .setup_header
                .ok_or(BootError::BadBzImage("has no setup header"))?;
            Ok(LoadedKernel {
                kind: KernelKind::BzImage(hdr),
                kernel_end: r.kernel_end,
            })
        }
        Err(loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage)) => {
            Err(BootError::UnknownFormat)
        }
        // Too short to even hold a setup header: not a bzImage either.
        Err(loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageHeader)) => {
            Err(BootError::UnknownFormat)
        }
        Err(e) => Err(BootError::BzImage(e)),
    }
}

/// Writes the NUL-terminated command line; returns its length without NUL.
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<usize, BootError> {
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| BootError::Write("command line", e))?;
    Ok(cmdline.len())
}

/// Puts the initrd page-aligned as high as possible in low RAM, below
/// `limit` (the highest address the kernel accepts for its last byte).
fn load_initrd(
    mem: &GuestMemoryMmap,
    ram: &RamLayout,
    f: &mut File,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let size = f.seek(SeekFrom::End(0)).map_err(BootError::InitrdRead)?;
    f.rewind().map_err(BootError::InitrdRead)?;
    let top = ram.low_end.min(limit.saturating_add(1));
    let too_big = BootError::InitrdTooBig {
        size,
        kernel_end,
        limit: top,
    };
    let Some(addr) = top.checked_sub(size).map(|a| a & !0xfff) else {
        return Err(too_big);
    };
    if addr < kernel_end || size > usize::MAX as u64 {
        return Err(too_big);
    }
    mem.read_exact_volatile_from(GuestAddress(addr), f, size as usize)
        .map_err(BootError::InitrdLoad)?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_vm() {
        let ram = RamLayout::new(128 << 20).unwrap();
        assert_eq!(
            e820_map(&ram),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x400, E820_RESERVED),
                (0xe0000, 0x20000, E820_RESERVED),
                (0x10_0000, (128 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_big_vm_has_high_ram() {
        let ram = RamLayout::new(6 << 30).unwrap();
        let map = e820_map(&ram);
        assert_eq!(map[3], (0x10_0000, 0xd000_0000 - 0x10_0000, E820_RAM));
        assert_eq!(map[4], (1 << 32, (6 << 30) - 0xd000_0000, E820_RAM));
    }

    #[test]
    fn cmdline_limits() {
        let ram = RamLayout::new(4 << 20).unwrap();
        let mem = crate::memory::create(&ram).unwrap().mem;
        assert_eq!(write_cmdline(&mem, "console=ttyS0", 2047).unwrap(), 13);
        assert!(matches!(
            write_cmdline(&mem, &"x".repeat(2048), 2047),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            write_cmdline(&mem, "a\0b", 2047),
            Err(BootError::CmdlineNul)
        ));
    }
}

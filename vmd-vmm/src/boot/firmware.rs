//! Booting a BIOS image (SeaBIOS) instead of a kernel: the image sits at
//! the top of the 4 GiB space (a read-only slot, where the CPU's reset
//! vector points) and its last 128 KiB also at the top of the first MiB
//! (0xe0000-0xfffff, in RAM: SeaBIOS runs from there and writes its own
//! variables there). The boot CPU starts in KVM's reset state, real mode at
//! 0xf000:0xfff0; everything else (tables, memory map) the firmware builds
//! from fw_cfg and CMOS.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootError, E820Entry, E820_RAM, E820_RESERVED};
use crate::layout::{BIOS_ROM_END, HIGH_RAM_START, KVM_IDENTITY_MAP_ADDR};
use crate::memory::RamLayout;

/// BIOS images are whole multiples of this, from one unit up to 16 MiB
/// (the flash window below 4 GiB).
const FIRMWARE_UNIT: u64 = 64 << 10;
const FIRMWARE_MAX: u64 = 16 << 20;
/// How much of the image is also visible below 1 MiB.
pub const LOW_WINDOW: u64 = 128 << 10;
const FOUR_GIB: u64 = 1 << 32;

/// Where the whole image is mapped: its end is the end of the 4 GiB space.
pub fn high_base(size: u64) -> u64 {
    FOUR_GIB - size
}

/// Reads `f` whole when it looks like a BIOS image rather than a kernel:
/// neither ELF nor bzImage, and a size firmware comes in. `None` leaves
/// it to the kernel loaders (which reject what they do not know).
pub fn read_image(f: &mut File) -> Result<Option<Vec<u8>>, BootError> {
    let size = f.seek(SeekFrom::End(0)).map_err(BootError::Read)?;
    f.rewind().map_err(BootError::Read)?;
    if !(FIRMWARE_UNIT..=FIRMWARE_MAX).contains(&size) || !size.is_multiple_of(FIRMWARE_UNIT) {
        return Ok(None);
    }
    let mut image = vec![0u8; size as usize];
    f.read_exact(&mut image).map_err(BootError::Read)?;
    f.rewind().map_err(BootError::Read)?;
    let elf = image.starts_with(b"\x7fELF");
    // The Linux boot protocol's "HdrS" magic at 0x202.
    let bzimage = image.get(0x202..0x206) == Some(b"HdrS".as_slice());
    Ok((!elf && !bzimage).then_some(image))
}

/// The map handed to the firmware (fw_cfg `etc/e820`): all RAM, which it
/// carves up itself (EBDA, its own ROM area), and KVM's real-mode pages
/// (identity map and TSS, four pages), which it must leave alone.
pub fn e820_map(ram: &RamLayout) -> Vec<E820Entry> {
    let mut map = vec![
        (0, ram.low_end, E820_RAM),
        (KVM_IDENTITY_MAP_ADDR, 0x4000, E820_RESERVED),
    ];
    if ram.high_size > 0 {
        map.push((HIGH_RAM_START, ram.high_size, E820_RAM));
    }
    map
}

/// Copies the image's last 128 KiB (or all of a smaller one) below 1 MiB.
pub fn load_low(mem: &GuestMemoryMmap, image: &[u8]) -> Result<(), BootError> {
    let n = (image.len() as u64).min(LOW_WINDOW) as usize;
    let tail = &image[image.len() - n..];
    mem.write_slice(tail, GuestAddress(BIOS_ROM_END - n as u64))
        .map_err(|e| BootError::Write("firmware", e))
}

/// Guest memory holding the whole image at [`high_base`], to be handed
/// to KVM as a read-only slot.
pub fn high_copy(image: &[u8]) -> Result<GuestMemoryMmap, BootError> {
    let base = GuestAddress(high_base(image.len() as u64));
    let rom = GuestMemoryMmap::from_ranges(&[(base, image.len())])
        .map_err(|e| BootError::FirmwareMap(e.to_string()))?;
    rom.write_slice(image, base)
        .map_err(|e| BootError::Write("firmware", e))?;
    Ok(rom)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(bytes: &[u8]) -> File {
        let mut f = tempfile_in_tmp();
        f.write_all(bytes).unwrap();
        f
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!(
            "vmd-fw-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn a_bios_sized_blob_is_firmware_and_kernels_are_not() {
        let mut bios = vec![0u8; 128 << 10];
        bios[(128 << 10) - 16] = 0xea;
        assert_eq!(read_image(&mut file(&bios)).unwrap(), Some(bios.clone()));
        let mut elf = bios.clone();
        elf[..4].copy_from_slice(b"\x7fELF");
        assert_eq!(read_image(&mut file(&elf)).unwrap(), None);
        let mut bz = bios.clone();
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(read_image(&mut file(&bz)).unwrap(), None);
        assert_eq!(read_image(&mut file(&bios[..1000])).unwrap(), None);
    }

    #[test]
    fn low_and_high_copies() {
        let mut image = vec![0u8; 256 << 10];
        image[0] = 1;
        let last = image.len() - 1;
        image[last] = 0x5a;
        image[last - (128 << 10) + 1] = 7;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        load_low(&mem, &image).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xfffff)).unwrap(), 0x5a);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xe0000)).unwrap(), 7);
        let rom = high_copy(&image).unwrap();
        assert_eq!(rom.read_obj::<u8>(GuestAddress(0xfffc_0000)).unwrap(), 1);
        assert_eq!(rom.read_obj::<u8>(GuestAddress(0xffff_ffff)).unwrap(), 0x5a);
    }
}

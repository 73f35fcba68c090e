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
use crate::arch::x86_64::layout::{BIOS_ROM_END, HIGH_RAM_START, KVM_IDENTITY_MAP_ADDR};
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

/// The most an option ROM may be: SeaBIOS copies a ROM from fw_cfg whole
/// into the option ROM area below 1 MiB (0xc0000 up to its own code), so
/// iPXE's combined EFI+legacy images (about 240 KiB) do not fit there, its
/// legacy-only ones (about 75 KiB) do.
pub const OPTION_ROM_MAX: u64 = 128 << 10;

/// Reads a legacy PCI option ROM (iPXE's `pxe-virtio.rom`): at most
/// [`OPTION_ROM_MAX`], starting with the 0x55 0xaa signature.
pub fn read_option_rom(f: &mut File) -> Result<Vec<u8>, BootError> {
    let bad = |why: String| BootError::OptionRom(why);
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if size > OPTION_ROM_MAX {
        return Err(bad(format!(
            "{size} bytes, at most {OPTION_ROM_MAX} fit below 1 MiB (an EFI+legacy image? use the legacy pxe-*.rom)"
        )));
    }
    let mut rom = Vec::with_capacity(size as usize);
    f.rewind()
        .and_then(|()| f.read_to_end(&mut rom))
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if rom.len() < 512 || rom[..2] != [0x55, 0xaa] {
        return Err(bad("no option ROM signature (55 aa)".into()));
    }
    Ok(rom)
}

/// The fw_cfg file SeaBIOS looks up for a PCI device before mapping its
/// ROM BAR (`lookup_hardcode` in its optionroms.c): the ROM then runs with
/// that device's bus/device/function, as a ROM BAR's would.
pub fn pci_rom_file(vendor: u16, device: u16) -> String {
    format!("pci{vendor:04x},{device:04x}.rom")
}

/// SeaBIOS's `bootorder` for booting the NIC in bus 0 `slot` through its
/// option ROM (SeaBIOS searches `/pci@i0cf8/*@SLOT` for a PCI ROM's boot
/// entry), then `HALT`: nothing else boots, as for a disk or CD-ROM.
pub fn nic_bootorder(slot: usize) -> String {
    format!("/pci@i0cf8/ethernet@{slot:x}/ethernet-phy@0\nHALT")
}

/// SeaBIOS's `bootorder` for booting the disk or CD-ROM in bus 0 `slot`
/// and nothing else (as OpenBSD's vmd does). SeaBIOS matches each entry
/// against a glob it builds per device (`find_prio` in its boot.c), whose
/// `*` spans one path component: `/pci@i0cf8/*@SLOT` for a virtio-blk
/// disk, `/pci@i0cf8/*@SLOT/*@0/*@TARGET,LUN` for a virtio-scsi LUN.
/// `HALT` ends the list: no other device boots.
pub fn drive_bootorder(dev: vmd_proto::vm::BootDevice, slot: usize) -> String {
    use vmd_proto::vm::BootDevice;
    match dev {
        BootDevice::Cdrom => format!("/pci@i0cf8/scsi@{slot:x}/channel@0/disk@0,0\nHALT"),
        BootDevice::Disk | BootDevice::Net => format!("/pci@i0cf8/*@{slot:x}\nHALT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_boot_orders() {
        use vmd_proto::vm::BootDevice;
        assert_eq!(drive_bootorder(BootDevice::Disk, 1), "/pci@i0cf8/*@1\nHALT");
        assert_eq!(
            drive_bootorder(BootDevice::Cdrom, 0x1c),
            "/pci@i0cf8/scsi@1c/channel@0/disk@0,0\nHALT"
        );
    }
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
    fn option_roms_are_checked_and_named() {
        let mut rom = vec![0u8; 4096];
        rom[..2].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(read_option_rom(&mut file(&rom)).unwrap(), rom);
        assert!(read_option_rom(&mut file(&[0u8; 4096])).is_err());
        let mut big = vec![0u8; (OPTION_ROM_MAX + 512) as usize];
        big[..2].copy_from_slice(&[0x55, 0xaa]);
        assert!(read_option_rom(&mut file(&big)).is_err());
        assert_eq!(pci_rom_file(0x1af4, 0x1041), "pci1af4,1041.rom");
        assert_eq!(
            nic_bootorder(0x1a),
            "/pci@i0cf8/ethernet@1a/ethernet-phy@0\nHALT"
        );
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

//! QEMU's firmware configuration interface (fw_cfg), as SeaBIOS reads it:
//! a 16-bit selector at 0x510, a byte-wide data port at 0x511, and the DMA
//! interface whose descriptor address is written big-endian to 0x514 (high
//! half) and 0x518 (low half, which starts the transfer).
//!
//! Items are numbered blobs. Besides a few fixed ones (signature, ID, CPU
//! counts) there is a file directory (item 0x19) naming the rest, such as
//! `etc/e820`. Reading past an item's end gives zeros, as in QEMU, and an
//! unknown item is empty: SeaBIOS then reads zeros, its "not present".

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::BusDevice;

pub const FW_CFG_SIGNATURE: u16 = 0x0000;
pub const FW_CFG_ID: u16 = 0x0001;
pub const FW_CFG_RAM_SIZE: u16 = 0x0003;
pub const FW_CFG_NB_CPUS: u16 = 0x0005;
pub const FW_CFG_MAX_CPUS: u16 = 0x000f;
pub const FW_CFG_FILE_DIR: u16 = 0x0019;
/// The first selector handed to a file.
pub const FW_CFG_FILE_FIRST: u16 = 0x0020;

/// ID bits: the traditional port interface, and DMA.
const ID_TRADITIONAL: u32 = 1;
const ID_DMA: u32 = 1 << 1;

/// DMA control bits (big-endian in the descriptor).
const DMA_ERROR: u32 = 1 << 0;
const DMA_READ: u32 = 1 << 1;
const DMA_SKIP: u32 = 1 << 2;
const DMA_SELECT: u32 = 1 << 3;
const DMA_WRITE: u32 = 1 << 4;

/// A directory entry's name field, NUL-padded.
const FILE_NAME_LEN: usize = 56;
/// Reading the DMA register gives "QEMU CFG", as the spec says.
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;
/// No DMA transfer is longer than this (our largest file is far smaller);
/// a bigger length from the guest is an error, not a huge allocation.
const DMA_MAX_LEN: u32 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FwCfgError {
    #[error("fw_cfg: file name {0:?} is longer than {max} bytes", max = FILE_NAME_LEN - 1)]
    NameTooLong(String),
    #[error("fw_cfg: too many files")]
    TooMany,
}

/// The items, built before the VM runs and read-only afterwards.
#[derive(Debug, Default, Clone)]
pub struct FwCfgItems {
    fixed: Vec<(u16, Vec<u8>)>,
    files: Vec<(String, Vec<u8>)>,
}

impl FwCfgItems {
    /// Signature, ID and CPU counts; `ram` is the VM's RAM size.
    pub fn new(vcpus: u16, ram: u64) -> FwCfgItems {
        let mut items = FwCfgItems::default();
        items.set(FW_CFG_SIGNATURE, b"QEMU".to_vec());
        items.set(FW_CFG_ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec());
        items.set(FW_CFG_RAM_SIZE, ram.to_le_bytes().to_vec());
        items.set(FW_CFG_NB_CPUS, vcpus.to_le_bytes().to_vec());
        items.set(FW_CFG_MAX_CPUS, vcpus.to_le_bytes().to_vec());
        items
    }

    pub fn set(&mut self, key: u16, data: Vec<u8>) {
        self.fixed.retain(|(k, _)| *k != key);
        self.fixed.push((key, data));
    }

    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        if name.len() >= FILE_NAME_LEN {
            return Err(FwCfgError::NameTooLong(name.into()));
        }
        if self.files.len() >= usize::from(u16::MAX - FW_CFG_FILE_FIRST) {
            return Err(FwCfgError::TooMany);
        }
        self.files.push((name.into(), data));
        Ok(())
    }

    /// The directory: a big-endian count, then per file its big-endian
    /// size and selector, two reserved bytes and the padded name.
    fn directory(&self) -> Vec<u8> {
        let mut d = (self.files.len() as u32).to_be_bytes().to_vec();
        for (i, (name, data)) in self.files.iter().enumerate() {
            d.extend_from_slice(&(data.len() as u32).to_be_bytes());
            d.extend_from_slice(&(FW_CFG_FILE_FIRST + i as u16).to_be_bytes());
            d.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            d.extend_from_slice(&n);
        }
        d
    }
}

/// The device: registered at 0x510 with length 12 (selector, data, and
/// the DMA address register at 0x514-0x51b).
pub struct FwCfg {
    /// Item contents by selector, the directory and files included.
    items: Vec<(u16, Vec<u8>)>,
    selected: u16,
    offset: usize,
    dma_high: u32,
    mem: Arc<GuestMemoryMmap>,
}

/// Port offsets from 0x510.
const SELECTOR: u64 = 0;
const DATA: u64 = 1;
const DMA_HIGH: u64 = 4;
const DMA_LOW: u64 = 8;
pub const FW_CFG_PORT_LEN: u64 = 12;

impl FwCfg {
    pub fn new(items: FwCfgItems, mem: Arc<GuestMemoryMmap>) -> FwCfg {
        let mut all = items.fixed.clone();
        all.push((FW_CFG_FILE_DIR, items.directory()));
        for (i, (_, data)) in items.files.into_iter().enumerate() {
            all.push((FW_CFG_FILE_FIRST + i as u16, data));
        }
        FwCfg {
            items: all,
            selected: 0,
            offset: 0,
            dma_high: 0,
            mem,
        }
    }

    fn select(&mut self, key: u16) {
        self.selected = key;
        self.offset = 0;
    }

    fn current(&self) -> &[u8] {
        self.items
            .iter()
            .find(|(k, _)| *k == self.selected)
            .map_or(&[][..], |(_, d)| d.as_slice())
    }

    /// Copies the next `out.len()` bytes of the selected item (zeros past
    /// its end) and moves on.
    fn read_data(&mut self, out: &mut [u8]) {
        let item = self.current();
        let start = self.offset.min(item.len());
        let n = (item.len() - start).min(out.len());
        out[..n].copy_from_slice(&item[start..start + n]);
        out[n..].fill(0);
        self.offset = self.offset.saturating_add(out.len());
    }

    /// Runs the DMA descriptor at `addr` and writes its control word back:
    /// zero when done, the error bit when not.
    fn dma(&mut self, addr: u64) {
        let at = GuestAddress(addr);
        let mut desc = [0u8; 16];
        if self.mem.read_slice(&mut desc, at).is_err() {
            log::debug!("fw_cfg: DMA descriptor at {addr:#x} is outside RAM");
            return;
        }
        let be32 = |i: usize| u32::from_be_bytes([desc[i], desc[i + 1], desc[i + 2], desc[i + 3]]);
        let control = be32(0);
        let length = be32(4);
        let mut target = [0u8; 8];
        target.copy_from_slice(&desc[8..16]);
        let target = u64::from_be_bytes(target);
        let ok = self.dma_transfer(control, length, target);
        let done: u32 = if ok { 0 } else { DMA_ERROR };
        if self.mem.write_slice(&done.to_be_bytes(), at).is_err() {
            log::debug!("fw_cfg: cannot complete the DMA descriptor at {addr:#x}");
        }
    }

    fn dma_transfer(&mut self, control: u32, length: u32, target: u64) -> bool {
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        if control & DMA_WRITE != 0 {
            // Every item is read-only.
            return false;
        }
        if length > DMA_MAX_LEN {
            return false;
        }
        if control & DMA_READ != 0 {
            let mut buf = vec![0u8; length as usize];
            self.read_data(&mut buf);
            return self.mem.write_slice(&buf, GuestAddress(target)).is_ok();
        }
        if control & DMA_SKIP != 0 {
            self.offset = self.offset.saturating_add(length as usize);
        }
        true
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            DATA => self.read_data(data),
            DMA_HIGH..=15 => {
                let sig = DMA_SIGNATURE.to_be_bytes();
                let start = (offset - DMA_HIGH) as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = sig.get(start + i).copied().unwrap_or(0xff);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (SELECTOR, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (DMA_HIGH, 4) => {
                self.dma_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            }
            (DMA_LOW, 4) => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let addr = (u64::from(self.dma_high) << 32) | u64::from(low);
                self.dma_high = 0;
                self.dma(addr);
            }
            _ => {}
        }
    }
}

/// QEMU's BIOS linker/loader script (`etc/table-loader`): commands the
/// firmware runs to place fw_cfg files in its memory and patch pointers
/// between them, so that the tables we build need no fixed addresses.
/// Each command is 128 bytes, little-endian.
#[derive(Debug, Default, Clone)]
pub struct TableLoader {
    script: Vec<u8>,
}

const LOADER_ENTRY_LEN: usize = 128;
const LOADER_ALLOCATE: u32 = 1;
const LOADER_ADD_POINTER: u32 = 2;
const LOADER_ADD_CHECKSUM: u32 = 3;

/// Where ALLOCATE puts a file: anywhere in RAM the firmware reserves for
/// itself, or in the 0xe0000-0xfffff segment (where an RSDP must be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoaderZone {
    High = 1,
    Fseg = 2,
}

impl TableLoader {
    fn entry(&mut self, command: u32, names: &[&str], rest: &[u8]) -> Result<(), FwCfgError> {
        let mut e = command.to_le_bytes().to_vec();
        for name in names {
            if name.len() >= FILE_NAME_LEN {
                return Err(FwCfgError::NameTooLong((*name).into()));
            }
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            e.extend_from_slice(&n);
        }
        e.extend_from_slice(rest);
        e.resize(LOADER_ENTRY_LEN, 0);
        self.script.extend_from_slice(&e);
        Ok(())
    }

    /// Loads fw_cfg file `file` into `zone`, aligned to `align` bytes.
    pub fn allocate(&mut self, file: &str, align: u32, zone: LoaderZone) -> Result<(), FwCfgError> {
        let mut rest = align.to_le_bytes().to_vec();
        rest.push(zone as u8);
        self.entry(LOADER_ALLOCATE, &[file], &rest)
    }

    /// Adds `src`'s load address to the `size`-byte little-endian value at
    /// `offset` in `dest` (which holds an offset into `src`).
    pub fn add_pointer(
        &mut self,
        dest: &str,
        src: &str,
        offset: u32,
        size: u8,
    ) -> Result<(), FwCfgError> {
        let mut rest = offset.to_le_bytes().to_vec();
        rest.push(size);
        self.entry(LOADER_ADD_POINTER, &[dest, src], &rest)
    }

    /// Makes the bytes `start..start + length` of `file` sum to zero by
    /// adjusting the byte at `at`; after the pointers it covers.
    pub fn add_checksum(
        &mut self,
        file: &str,
        at: u32,
        start: u32,
        length: u32,
    ) -> Result<(), FwCfgError> {
        let mut rest = at.to_le_bytes().to_vec();
        rest.extend_from_slice(&start.to_le_bytes());
        rest.extend_from_slice(&length.to_le_bytes());
        self.entry(LOADER_ADD_CHECKSUM, &[file], &rest)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.script
    }
}

/// QEMU's `etc/e820` entry: address, length (little-endian u64s), type.
pub fn e820_file(map: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(map.len() * 20);
    for (addr, len, kind) in map {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> FwCfg {
        let mut items = FwCfgItems::new(2, 64 << 20);
        items
            .add_file("etc/e820", e820_file(&[(0, 0x9fc00, 1)]))
            .unwrap();
        items.add_file("bootorder", b"x\n".to_vec()).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        FwCfg::new(items, Arc::new(mem))
    }

    fn read(d: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
        d.write(SELECTOR, &key.to_le_bytes());
        let mut out = vec![0; n];
        for b in out.iter_mut() {
            let mut one = [0];
            d.read(DATA, &mut one);
            *b = one[0];
        }
        out
    }

    #[test]
    fn signature_id_and_cpus_through_the_ports() {
        let mut d = device();
        assert_eq!(read(&mut d, FW_CFG_SIGNATURE, 4), b"QEMU");
        assert_eq!(read(&mut d, FW_CFG_ID, 4), vec![3, 0, 0, 0]);
        assert_eq!(read(&mut d, FW_CFG_NB_CPUS, 2), vec![2, 0]);
        // Past the end, and unknown items: zeros.
        assert_eq!(read(&mut d, FW_CFG_NB_CPUS, 4), vec![2, 0, 0, 0]);
        assert_eq!(read(&mut d, 0x0e, 2), vec![0, 0]);
    }

    #[test]
    fn directory_names_the_files() {
        let mut d = device();
        let dir = read(&mut d, FW_CFG_FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &2u32.to_be_bytes());
        assert_eq!(&dir[4..8], &20u32.to_be_bytes());
        assert_eq!(&dir[8..10], &FW_CFG_FILE_FIRST.to_be_bytes());
        assert_eq!(&dir[12..20], b"etc/e820");
        assert_eq!(&dir[12 + 8], &0);
        assert_eq!(&dir[68 + 8..68 + 8 + 9], b"bootorder");
        assert_eq!(read(&mut d, FW_CFG_FILE_FIRST + 1, 2), b"x\n");
    }

    #[test]
    fn dma_select_read_and_skip() {
        let mut d = device();
        let desc = 0x1000u64;
        let put = |d: &FwCfg, control: u32, len: u32, to: u64| {
            let mut b = control.to_be_bytes().to_vec();
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&to.to_be_bytes());
            d.mem.write_slice(&b, GuestAddress(desc)).unwrap();
        };
        let control = |d: &FwCfg| d.mem.read_obj::<[u8; 4]>(GuestAddress(desc)).unwrap();
        put(
            &d,
            (u32::from(FW_CFG_SIGNATURE) << 16) | DMA_SELECT | DMA_READ,
            4,
            0x2000,
        );
        d.write(DMA_LOW, &(desc as u32).to_be_bytes());
        assert_eq!(control(&d), [0; 4]);
        assert_eq!(
            d.mem.read_obj::<[u8; 4]>(GuestAddress(0x2000)).unwrap(),
            *b"QEMU"
        );
        // Skip into the ID, then read its second byte onward.
        put(
            &d,
            (u32::from(FW_CFG_ID) << 16) | DMA_SELECT | DMA_SKIP,
            1,
            0,
        );
        d.write(DMA_LOW, &(desc as u32).to_be_bytes());
        put(&d, DMA_READ, 3, 0x2000);
        d.write(DMA_LOW, &(desc as u32).to_be_bytes());
        assert_eq!(
            d.mem.read_obj::<[u8; 3]>(GuestAddress(0x2000)).unwrap(),
            [0; 3]
        );
        // Writes are refused.
        put(&d, DMA_WRITE, 1, 0x2000);
        d.write(DMA_LOW, &(desc as u32).to_be_bytes());
        assert_eq!(control(&d), DMA_ERROR.to_be_bytes());
    }

    #[test]
    fn dma_register_reads_the_signature() {
        let mut d = device();
        let mut b = [0u8; 4];
        d.read(DMA_HIGH, &mut b);
        assert_eq!(&b, b"QEMU");
    }

    #[test]
    fn table_loader_commands_are_128_bytes_in_qemus_layout() {
        let mut l = TableLoader::default();
        l.allocate("etc/acpi/rsdp", 16, LoaderZone::Fseg).unwrap();
        l.add_pointer("etc/acpi/rsdp", "etc/acpi/tables", 24, 8)
            .unwrap();
        l.add_checksum("etc/acpi/rsdp", 8, 0, 20).unwrap();
        let b = l.into_bytes();
        assert_eq!(b.len(), 3 * 128);
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        assert_eq!(u32_at(0), 1);
        assert_eq!(&b[4..17], b"etc/acpi/rsdp");
        assert_eq!(b[17], 0);
        assert_eq!(u32_at(60), 16);
        assert_eq!(b[64], 2);
        assert_eq!(u32_at(128), 2);
        assert_eq!(&b[128 + 60..128 + 75], b"etc/acpi/tables");
        assert_eq!(u32_at(128 + 116), 24);
        assert_eq!(b[128 + 120], 8);
        assert_eq!(u32_at(256), 3);
        assert_eq!(
            (u32_at(256 + 60), u32_at(256 + 64), u32_at(256 + 68)),
            (8, 0, 20)
        );
        let mut l = TableLoader::default();
        assert!(l.allocate(&"x".repeat(56), 1, LoaderZone::High).is_err());
    }

    #[test]
    fn long_names_are_refused() {
        let mut items = FwCfgItems::new(1, 1 << 20);
        assert!(items.add_file(&"x".repeat(56), vec![]).is_err());
    }
}

//! PCI bus 0: configuration mechanism #1 (ports 0xcf8/0xcfc), a host
//! bridge at 00:00.0 and one function per slot (00:01.0 onward), with
//! memory BARs mapped on the MMIO bus wherever the guest puts them.
//!
//! The VMM assigns every BAR from [`PCI_MMIO_START`] and turns memory
//! decoding on before the guest starts, as firmware would, so a
//! direct-booted kernel (or a test guest) can use the devices as found;
//! a guest that moves a BAR (or switches decoding off) is followed: the
//! root re-maps the range on the MMIO bus and tells the function
//! ([`PciDevice::bar_moved`]) so it can move its ioeventfds.
//!
//! Interrupts: MSI-X (see [`msix`]) or INTx pin A on GSI
//! `PCI_INTX_GSI_BASE + (slot - 1) % PCI_INTX_GSI_COUNT` (see [`irq`]).

pub mod config;
pub mod irq;
pub mod msix;

use std::sync::{Arc, Mutex};

use crate::arch::x86_64::layout::{
    IOAPIC_ADDR, MMIO_GAP_START, PCI_INTX_GSI_BASE, PCI_INTX_GSI_COUNT, PCI_MMIO_END,
    PCI_MMIO_START,
};
use crate::bus::{Bus, BusDevice, SharedDevice};
pub use config::{PciConfig, PciIds};

/// Slots on bus 0 (device numbers 0-31; 0 is the host bridge).
pub const SLOTS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("PCI bus 0 is full ({SLOTS} slots)")]
    BusFull,
    #[error("the PCI MMIO window has no room for a BAR of {0:#x} bytes")]
    WindowFull(u64),
    #[error("mapping BAR at {addr:#x}: {err}")]
    Map {
        addr: u64,
        err: crate::bus::BusError,
    },
}

/// A PCI function: its configuration space plus what happens when the
/// guest changes it. Its BARs' contents are served by the [`BusDevice`]
/// registered with it (offsets relative to the BAR).
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;
    /// After a guest write of `len` bytes at `offset` (capability control
    /// registers may have changed).
    fn config_written(&mut self, _offset: usize, _len: usize) {}
    /// BAR `bar` now decodes at `addr` (`None`: not at all).
    fn bar_moved(&mut self, _bar: usize, _addr: Option<u64>) {}
}

/// The GSI of slot `slot`'s INTA#.
pub fn intx_gsi(slot: usize) -> u32 {
    PCI_INTX_GSI_BASE + (slot.saturating_sub(1) as u32) % PCI_INTX_GSI_COUNT
}

struct Slot {
    dev: Arc<Mutex<dyn PciDevice>>,
    /// Serves the BARs' contents (one device for all of them).
    bars: Option<SharedDevice>,
    /// Where each BAR is mapped on the MMIO bus now.
    mapped: [Option<u64>; config::BAR_COUNT],
}

pub struct PciRoot {
    /// CONFIG_ADDRESS as last written.
    address: u32,
    slots: Vec<Option<Slot>>,
    mmio: Arc<Bus>,
    /// Next free address in the BAR window.
    next_bar: u64,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciRoot {
    /// A bus with the host bridge in slot 0.
    pub fn new(mmio: Arc<Bus>) -> PciRoot {
        Self::with_bridge(mmio, HostBridge::new())
    }

    /// A bus with `bridge` in slot 0.
    pub fn with_bridge(mmio: Arc<Bus>, bridge: HostBridge) -> PciRoot {
        let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            dev: Arc::new(Mutex::new(bridge)),
            bars: None,
            mapped: [None; config::BAR_COUNT],
        });
        PciRoot {
            address: 0,
            slots,
            mmio,
            next_bar: PCI_MMIO_START,
        }
    }

    /// The slot the next [`PciRoot::add`] will use.
    pub fn next_slot(&self) -> Option<usize> {
        self.slots.iter().position(Option::is_none)
    }

    /// Assigns addresses to `dev`'s BARs from the window (firmware's
    /// job), enables memory decoding and bus mastering, maps them and
    /// plugs `dev` in the next free slot, which it returns.
    pub fn add(
        &mut self,
        dev: Arc<Mutex<dyn PciDevice>>,
        bars: SharedDevice,
    ) -> Result<usize, PciError> {
        let slot = self.next_slot().ok_or(PciError::BusFull)?;
        {
            let mut d = lock(&dev);
            for bar in 0..config::BAR_COUNT {
                let size = d.config().bar_size(bar);
                if size == 0 {
                    continue;
                }
                let addr = self.next_bar.next_multiple_of(size);
                if addr + size > PCI_MMIO_END {
                    return Err(PciError::WindowFull(size));
                }
                self.next_bar = addr + size;
                d.config_mut().set_bar(bar, addr as u32);
            }
            let cmd = d.config().command() | config::COMMAND_MEMORY | config::COMMAND_BUS_MASTER;
            d.config_mut().set_u16(config::COMMAND, cmd);
        }
        self.slots[slot] = Some(Slot {
            dev,
            bars: Some(bars),
            mapped: [None; config::BAR_COUNT],
        });
        self.remap(slot);
        Ok(slot)
    }

    /// Brings slot `slot`'s MMIO mappings in line with its BARs.
    fn remap(&mut self, slot: usize) {
        let Some(s) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let Some(bars) = s.bars.clone() else { return };
        let mut d = lock(&s.dev);
        for bar in 0..config::BAR_COUNT {
            let size = d.config().bar_size(bar);
            let want = d.config().bar_addr(bar).filter(|a| usable(*a, size));
            if want == s.mapped[bar] {
                continue;
            }
            if let Some(old) = s.mapped[bar].take() {
                self.mmio.remove(old);
            }
            let mut now = None;
            if let Some(addr) = want {
                match self.mmio.insert(addr, size, bars.clone()) {
                    Ok(()) => now = Some(addr),
                    Err(e) => log::warn!("00:{slot:02x}.0 BAR {bar}: {e}; left unmapped"),
                }
            }
            s.mapped[bar] = now;
            log::debug!("00:{slot:02x}.0 BAR {bar} now at {now:x?}");
            d.bar_moved(bar, now);
        }
    }

    /// (slot, register offset) CONFIG_ADDRESS selects on bus 0 function 0.
    fn selected(&self) -> Option<(usize, usize)> {
        let a = self.address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let slot = ((a >> 11) & 0x1f) as usize;
        let func = (a >> 8) & 0x7;
        (enabled && bus == 0 && func == 0).then_some((slot, (a & 0xfc) as usize))
    }

    fn config_read(&self, port_offset: usize, data: &mut [u8]) {
        let dev = self
            .selected()
            .and_then(|(slot, reg)| Some((self.slots.get(slot)?.as_ref()?, reg)));
        match dev {
            Some((s, reg)) => lock(&s.dev).config().read(reg + port_offset, data),
            None => data.fill(0xff),
        }
    }

    fn config_write(&mut self, port_offset: usize, data: &[u8]) {
        let Some((slot, reg)) = self.selected() else {
            return;
        };
        let Some(s) = self.slots.get(slot).and_then(Option::as_ref) else {
            return;
        };
        let offset = reg + port_offset;
        {
            let mut d = lock(&s.dev);
            d.config_mut().write(offset, data);
            d.config_written(offset, data.len());
        }
        let bars_end = config::BAR0 + 4 * config::BAR_COUNT;
        if offset < bars_end && offset + data.len() > config::COMMAND {
            self.remap(slot);
        }
    }
}

/// Whether a BAR at `addr` may be mapped: inside the MMIO gap below
/// 4 GiB, clear of the IOAPIC, LAPIC and KVM's pages, naturally aligned.
fn usable(addr: u64, size: u64) -> bool {
    let end = addr.saturating_add(size);
    addr >= MMIO_GAP_START && end <= u64::from(IOAPIC_ADDR) && addr.is_multiple_of(size.max(1))
}

/// CONFIG_ADDRESS (0xcf8): only dword accesses reach it (byte accesses
/// to 0xcf9 are the reset control register, a separate device).
pub struct ConfigAddress(pub Arc<Mutex<PciRoot>>);

impl BusDevice for ConfigAddress {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        if data.len() == 4 {
            data.copy_from_slice(&lock(&self.0).address.to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Ok(b) = <[u8; 4]>::try_from(data) {
            lock(&self.0).address = u32::from_le_bytes(b);
        }
    }
}

/// CONFIG_DATA (0xcfc-0xcff).
pub struct ConfigData(pub Arc<Mutex<PciRoot>>);

impl BusDevice for ConfigData {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).config_read(offset as usize & 3, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).config_write(offset as usize & 3, data);
    }
}

/// 00:00.0: a host bridge with no BARs. Intel's Q35 MCH ids, which Linux
/// and SeaBIOS accept as a plain host bridge.
pub struct HostBridge {
    config: PciConfig,
}

/// Intel's Q35 MCH and i440FX host bridge device ids.
const Q35_MCH: u16 = 0x29c0;
const I440FX: u16 = 0x1237;

impl HostBridge {
    pub fn new() -> HostBridge {
        Self::with_device(Q35_MCH)
    }

    /// For SeaBIOS: it would move PCI configuration space to MMCONFIG
    /// (which we lack) behind a Q35 MCH, but takes an i440FX as is.
    pub fn i440fx() -> HostBridge {
        Self::with_device(I440FX)
    }

    fn with_device(device: u16) -> HostBridge {
        HostBridge {
            config: PciConfig::new(PciIds {
                vendor: 0x8086,
                device,
                revision: 0,
                class: (0x06, 0x00, 0x00),
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dev {
        config: PciConfig,
        moves: Vec<Option<u64>>,
    }
    impl PciDevice for Dev {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn bar_moved(&mut self, _bar: usize, addr: Option<u64>) {
            self.moves.push(addr);
        }
    }
    struct Mem(u8);
    impl BusDevice for Mem {
        fn read(&mut self, _o: u64, d: &mut [u8]) {
            d.fill(self.0);
        }
        fn write(&mut self, _o: u64, _d: &[u8]) {}
    }

    fn setup() -> (Arc<Bus>, Arc<Mutex<Dev>>, Bus) {
        let mmio = Arc::new(Bus::new("MMIO"));
        let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone())));
        let mut config = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: (1, 0, 0),
            subsystem_vendor: 0x1af4,
            subsystem: 2,
        });
        config.add_mem32_bar(0, 0x4000).unwrap();
        let dev = Arc::new(Mutex::new(Dev {
            config,
            moves: Vec::new(),
        }));
        let slot = root
            .lock()
            .unwrap()
            .add(dev.clone(), Arc::new(Mutex::new(Mem(0x5a))))
            .unwrap();
        assert_eq!(slot, 1);
        let pio = Bus::new("pio");
        pio.insert(0xcf8, 1, Arc::new(Mutex::new(ConfigAddress(root.clone()))))
            .unwrap();
        pio.insert(0xcfc, 4, Arc::new(Mutex::new(ConfigData(root.clone()))))
            .unwrap();
        (mmio, dev, pio)
    }

    fn cfg_read(pio: &Bus, slot: u32, reg: u32) -> u32 {
        pio.write(0xcf8, &(0x8000_0000 | (slot << 11) | reg).to_le_bytes());
        let mut d = [0u8; 4];
        pio.read(0xcfc, &mut d);
        u32::from_le_bytes(d)
    }

    fn cfg_write(pio: &Bus, slot: u32, reg: u32, v: u32) {
        pio.write(0xcf8, &(0x8000_0000 | (slot << 11) | reg).to_le_bytes());
        pio.write(0xcfc, &v.to_le_bytes());
    }

    #[test]
    fn enumerate_and_follow_bar_moves() {
        let (mmio, dev, pio) = setup();
        assert_eq!(cfg_read(&pio, 0, 0), 0x29c0_8086);
        assert_eq!(cfg_read(&pio, 0, 8) >> 8, 0x06_0000);
        assert_eq!(cfg_read(&pio, 1, 0), 0x1042_1af4);
        assert_eq!(cfg_read(&pio, 2, 0), 0xffff_ffff);
        // Function 1 and other buses are empty.
        pio.write(
            0xcf8,
            &(0x8000_0000u32 | (1 << 11) | (1 << 8)).to_le_bytes(),
        );
        let mut d = [0u8; 4];
        pio.read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Pre-assigned and decoding.
        assert_eq!(cfg_read(&pio, 1, 0x10), 0xe000_0000);
        let mut b = [0u8; 4];
        mmio.read(0xe000_0010, &mut b);
        assert_eq!(b, [0x5a; 4]);
        // Sizing with decoding off, then a move.
        cfg_write(&pio, 1, 4, 0);
        mmio.read(0xe000_0010, &mut b);
        assert_eq!(b, [0xff; 4]);
        cfg_write(&pio, 1, 0x10, 0xffff_ffff);
        assert_eq!(cfg_read(&pio, 1, 0x10), 0xffff_c000);
        cfg_write(&pio, 1, 0x10, 0xe010_0000);
        cfg_write(&pio, 1, 4, 2);
        mmio.read(0xe010_0000, &mut b);
        assert_eq!(b, [0x5a; 4]);
        mmio.read(0xe000_0000, &mut b);
        assert_eq!(b, [0xff; 4]);
        // A BAR over RAM or the IOAPIC is not mapped.
        cfg_write(&pio, 1, 0x10, 0x0010_0000);
        cfg_write(&pio, 1, 0x10, 0xfec0_0000);
        let moves = dev.lock().unwrap().moves.clone();
        assert_eq!(
            moves,
            vec![Some(0xe000_0000), None, Some(0xe010_0000), None]
        );
        // Garbage: unaligned, partial and disabled accesses do no harm.
        pio.write(0xcf8, &[0xff]);
        pio.write(0xcfc, &[1, 2]);
        pio.write(0xcf8, &0x0000_0800u32.to_le_bytes());
        pio.write(0xcfe, &[0xff, 0xff]);
        assert_eq!(cfg_read(&pio, 1, 0), 0x1042_1af4);
    }
}

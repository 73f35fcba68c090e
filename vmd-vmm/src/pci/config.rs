//! A type-0 PCI configuration space (256 bytes): the standard header,
//! 32-bit memory BARs and a capability list, with a write mask so that the
//! guest can only change what real hardware lets it change.

/// Offsets in the type-0 header.
pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CLASS_PROG_IF: usize = 0x09;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_PTR: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

/// Command register bits.
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the capability list is valid.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Interrupt pin A.
pub const PIN_INTA: u8 = 1;
pub const BAR_COUNT: usize = 6;
/// Capabilities start after the header.
const CAP_START: usize = 0x40;
pub const CONFIG_SIZE: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Base class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("capability of {0} bytes does not fit in configuration space")]
    CapabilityTooLarge(usize),
    #[error("BAR {0} does not exist or is already in use")]
    BadBar(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BadBarSize(u64),
}

pub struct PciConfig {
    regs: [u8; CONFIG_SIZE],
    /// Bits the guest may change.
    wmask: [u8; CONFIG_SIZE],
    /// Size of each BAR; 0: not implemented.
    bar_size: [u64; BAR_COUNT],
    /// Where the next capability goes, and the last one's offset.
    cap_next: usize,
    cap_last: Option<usize>,
}

impl PciConfig {
    pub fn new(ids: PciIds) -> PciConfig {
        let mut c = PciConfig {
            regs: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            bar_size: [0; BAR_COUNT],
            cap_next: CAP_START,
            cap_last: None,
        };
        c.set_u16(VENDOR_ID, ids.vendor);
        c.set_u16(DEVICE_ID, ids.device);
        c.regs[REVISION] = ids.revision;
        c.regs[CLASS_PROG_IF] = ids.class.2;
        c.regs[CLASS_PROG_IF + 1] = ids.class.1;
        c.regs[CLASS_PROG_IF + 2] = ids.class.0;
        c.regs[HEADER_TYPE] = 0;
        c.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set_u16(SUBSYSTEM_ID, ids.subsystem);
        let cmd_mask = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.wmask[COMMAND..COMMAND + 2].copy_from_slice(&cmd_mask.to_le_bytes());
        c
    }

    /// Gives the function interrupt pin A with `line` in the interrupt
    /// line register (what firmware would leave there: its GSI).
    pub fn set_intx(&mut self, line: u8) {
        self.regs[INTERRUPT_PIN] = PIN_INTA;
        self.regs[INTERRUPT_LINE] = line;
        self.wmask[INTERRUPT_LINE] = 0xff;
    }

    /// Declares BAR `index` a 32-bit, non-prefetchable memory BAR.
    pub fn add_mem32_bar(&mut self, index: usize, size: u64) -> Result<(), ConfigError> {
        if index >= BAR_COUNT || self.bar_size[index] != 0 {
            return Err(ConfigError::BadBar(index));
        }
        if size < 16 || !size.is_power_of_two() || size > 1 << 31 {
            return Err(ConfigError::BadBarSize(size));
        }
        self.bar_size[index] = size;
        let mask = !(size as u32 - 1);
        let at = BAR0 + 4 * index;
        self.wmask[at..at + 4].copy_from_slice(&mask.to_le_bytes());
        Ok(())
    }

    /// Programs a BAR as firmware would.
    pub fn set_bar(&mut self, index: usize, addr: u32) {
        if index < BAR_COUNT && self.bar_size[index] != 0 {
            let at = BAR0 + 4 * index;
            let mask = !(self.bar_size[index] as u32 - 1);
            self.set_u32(at, addr & mask);
        }
    }

    pub fn bar_size(&self, index: usize) -> u64 {
        self.bar_size.get(index).copied().unwrap_or(0)
    }

    /// Where BAR `index` decodes now: `None` when memory decoding is off,
    /// the BAR is unimplemented or zero.
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let size = self.bar_size(index);
        if size == 0 || self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        let addr = u64::from(self.u32(BAR0 + 4 * index) & !0xf);
        (addr != 0).then_some(addr)
    }

    pub fn command(&self) -> u16 {
        self.u16(COMMAND)
    }

    /// Appends a capability: `body` starts with its id and a next-pointer
    /// placeholder; `wmask` (same length or shorter) says which of its bits
    /// the guest may write. Returns its offset.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u8]) -> Result<usize, ConfigError> {
        let len = body.len();
        let at = self.cap_next;
        if len < 2 || at + len > CONFIG_SIZE {
            return Err(ConfigError::CapabilityTooLarge(len));
        }
        self.regs[at..at + len].copy_from_slice(body);
        self.regs[at + 1] = 0;
        let m = wmask.len().min(len);
        self.wmask[at..at + m].copy_from_slice(&wmask[..m]);
        match self.cap_last {
            None => self.regs[CAPABILITIES_PTR] = at as u8,
            Some(prev) => self.regs[prev + 1] = at as u8,
        }
        let status = self.u16(STATUS) | STATUS_CAP_LIST;
        self.set_u16(STATUS, status);
        self.cap_last = Some(at);
        // Capabilities are dword aligned.
        self.cap_next = (at + len + 3) & !3;
        Ok(at)
    }

    /// A guest read; bytes past the space read as all-ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// A guest write, through the write mask.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SIZE {
                break;
            }
            let m = self.wmask[at];
            self.regs[at] = (self.regs[at] & !m) | (b & m);
        }
    }

    pub fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.regs[at], self.regs[at + 1]])
    }

    pub fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.regs[at],
            self.regs[at + 1],
            self.regs[at + 2],
            self.regs[at + 3],
        ])
    }

    pub fn set_u16(&mut self, at: usize, v: u16) {
        self.regs[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.regs[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfig {
        PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: (1, 0, 0),
            subsystem_vendor: 0x1af4,
            subsystem: 2,
        })
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = cfg();
        c.write(0, &[0xff; 4]);
        let mut d = [0u8; 4];
        c.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
        c.read(8, &mut d);
        assert_eq!(d, [1, 0, 0, 1]);
    }

    #[test]
    fn bar_sizing_and_decoding() {
        let mut c = cfg();
        c.add_mem32_bar(0, 0x4000).unwrap();
        assert!(c.add_mem32_bar(0, 0x4000).is_err());
        assert!(c.add_mem32_bar(1, 0x3000).is_err());
        c.write(BAR0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.u32(BAR0), 0xffff_c000);
        c.write(BAR0, &0xe000_1234u32.to_le_bytes());
        assert_eq!(c.u32(BAR0), 0xe000_0000);
        assert_eq!(c.bar_addr(0), None, "memory decoding is off");
        c.write(COMMAND, &[COMMAND_MEMORY as u8, 0]);
        assert_eq!(c.bar_addr(0), Some(0xe000_0000));
        assert_eq!(c.bar_addr(1), None);
        // Unimplemented BARs stay zero.
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.u32(BAR0 + 4), 0);
    }

    #[test]
    fn capability_chain() {
        let mut c = cfg();
        let a = c.add_capability(&[0x09, 0xaa, 5, 1, 2], &[]).unwrap();
        let b = c
            .add_capability(&[0x11, 0, 0, 0], &[0, 0, 0xff, 0xc0])
            .unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(c.regs[CAPABILITIES_PTR], 0x40);
        assert_eq!(c.regs[0x41], 0x48);
        assert_eq!(c.regs[0x49], 0);
        assert_ne!(c.u16(STATUS) & STATUS_CAP_LIST, 0);
        c.write(0x4a, &[0xff, 0xff]);
        assert_eq!(c.u16(0x4a), 0xc0ff);
        assert!(c.add_capability(&[0; 200], &[]).is_err());
    }
}

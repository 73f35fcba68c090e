//! The ACPI PM1a event and control registers. A guest powers off by
//! writing SLP_TYP 5 (S5, soft-off, as the DSDT's `\_S5` says) with SLP_EN
//! set. There is no SMI command port, so the machine is always in ACPI
//! mode: SCI_EN reads as set. The event block's power button status
//! raises the SCI (`vmctl stop` presses it).

use std::sync::Arc;

use vmd_proto::vm::ExitReason;

use crate::bus::BusDevice;
use crate::lifecycle::ExitSignal;

/// Always set: ACPI mode is on from power-up (the FADT has no SMI_CMD).
pub const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
/// The sleep type the DSDT's `\_S5` gives (see acpi.rs).
pub const SLP_TYP_S5: u16 = 5;

/// A 16-bit register; byte accesses to either half work too.
pub struct Pm1aControl {
    exit: Arc<ExitSignal>,
    value: u16,
}

impl Pm1aControl {
    pub fn new(exit: Arc<ExitSignal>) -> Pm1aControl {
        Pm1aControl {
            exit,
            value: SCI_EN,
        }
    }
}

impl BusDevice for Pm1aControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // SLP_EN always reads back as zero, SCI_EN as one.
        read_bytes(
            &((self.value & !SLP_EN) | SCI_EN).to_le_bytes(),
            offset,
            data,
        );
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = self.value.to_le_bytes();
        write_bytes(&mut bytes, offset, data);
        let v = u16::from_le_bytes(bytes);
        self.value = (v & !SLP_EN) | SCI_EN;
        let slp_typ = (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if v & SLP_EN != 0 {
            if slp_typ == SLP_TYP_S5 {
                log::info!("guest powered off (ACPI S5)");
                self.exit.request(ExitReason::PowerOff);
            } else {
                log::warn!("guest asked for unsupported sleep type {slp_typ}; ignored");
            }
        }
    }
}

/// Copies `regs[offset..]` into `data`; bytes past the end read as zero.
fn read_bytes(regs: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| regs.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// Writes `data` into `regs[offset..]`; bytes past the end are dropped.
fn write_bytes(regs: &mut [u8], offset: u64, data: &[u8]) {
    for (i, b) in data.iter().enumerate() {
        if let Some(slot) = usize::try_from(offset)
            .ok()
            .and_then(|o| regs.get_mut(o.checked_add(i)?))
        {
            *slot = *b;
        }
    }
}

// PM1 status/enable bits (ACPI 6.5, 4.8.3.1).
pub const TMR_STS: u16 = 1 << 0;
pub const GBL_STS: u16 = 1 << 5;
pub const PWRBTN_STS: u16 = 1 << 8;
pub const SLPBTN_STS: u16 = 1 << 9;
pub const RTC_STS: u16 = 1 << 10;
pub const WAK_STS: u16 = 1 << 15;
/// Enable bits that exist; the others are reserved and read as zero.
/// (Same positions as their status bits; bit 14 is PCIEXP_WAKE_DIS.)
const PM1_EN_MASK: u16 = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS | (1 << 14);

/// Drives the SCI line: called with the new level whenever it changes.
pub type SciLine = Box<dyn FnMut(bool) + Send>;

/// The PM1a event block: a 16-bit status register (write 1 to clear),
/// then a 16-bit enable register. The SCI is level-triggered: it stays
/// asserted while an enabled status bit is set, so a guest that clears the
/// bit (or disables it) lowers the line.
#[derive(Default)]
pub struct Pm1aEvent {
    status: u16,
    enable: u16,
    sci: Option<SciLine>,
    sci_level: bool,
}

impl Pm1aEvent {
    pub fn new() -> Pm1aEvent {
        Pm1aEvent::default()
    }

    pub fn with_sci(sci: SciLine) -> Pm1aEvent {
        Pm1aEvent {
            sci: Some(sci),
            ..Pm1aEvent::default()
        }
    }

    /// Sets status bits; returns whether any of them is enabled (the SCI
    /// is then asserted).
    pub fn raise(&mut self, bits: u16) -> bool {
        self.status |= bits;
        self.update_sci();
        self.status & self.enable != 0
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn enable(&self) -> u16 {
        self.enable
    }

    fn update_sci(&mut self) {
        let level = self.status & self.enable != 0;
        if level != self.sci_level {
            self.sci_level = level;
            if let Some(sci) = &mut self.sci {
                sci(level);
            }
        }
    }
}

impl BusDevice for Pm1aEvent {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut regs = [0u8; 4];
        regs[..2].copy_from_slice(&self.status.to_le_bytes());
        regs[2..].copy_from_slice(&self.enable.to_le_bytes());
        read_bytes(&regs, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Status bytes not written must not clear anything: start from 0.
        let mut regs = [0u8; 4];
        regs[2..].copy_from_slice(&self.enable.to_le_bytes());
        write_bytes(&mut regs, offset, data);
        self.status &= !u16::from_le_bytes([regs[0], regs[1]]);
        self.enable = u16::from_le_bytes([regs[2], regs[3]]) & PM1_EN_MASK;
        self.update_sci();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = Pm1aControl::new(exit.clone());
        pm.write(0, &(SLP_TYP_S5 << SLP_TYP_SHIFT).to_le_bytes());
        assert!(!exit.is_stopping());
        pm.write(0, &0x3400u16.to_le_bytes());
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn byte_writes_and_other_sleep_types() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = Pm1aControl::new(exit.clone());
        pm.write(1, &[(1 << 5) | (3 << 2)]); // S3 + SLP_EN: ignored
        assert!(!exit.is_stopping());
        pm.write(1, &[0x34]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        let mut r = [0u8; 2];
        pm.read(0, &mut r);
        assert_eq!(u16::from_le_bytes(r), 0x1400 | SCI_EN);
    }

    #[test]
    fn sci_en_always_reads_set() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = Pm1aControl::new(exit);
        let mut r = [0u8; 2];
        pm.read(0, &mut r);
        assert_eq!(u16::from_le_bytes(r), SCI_EN);
        pm.write(0, &[0, 0]);
        let mut b = [0u8];
        pm.read(0, &mut b);
        assert_eq!(b, [1]);
    }

    #[test]
    fn pm1_status_is_write_one_to_clear() {
        let mut ev = Pm1aEvent::new();
        assert!(!ev.raise(PWRBTN_STS | WAK_STS));
        let mut r = [0u8; 4];
        ev.read(0, &mut r);
        assert_eq!(u32::from_le_bytes(r), u32::from(PWRBTN_STS | WAK_STS));
        // Writing zeros (and the enable half) clears nothing.
        ev.write(0, &0u32.to_le_bytes());
        assert_eq!(ev.status(), PWRBTN_STS | WAK_STS);
        ev.write(1, &[(PWRBTN_STS >> 8) as u8]);
        assert_eq!(ev.status(), WAK_STS);
        ev.write(0, &WAK_STS.to_le_bytes());
        assert_eq!(ev.status(), 0);
    }

    #[test]
    fn pm1_enable_reads_back_defined_bits() {
        let mut ev = Pm1aEvent::new();
        ev.write(2, &0xffffu16.to_le_bytes());
        assert_eq!(ev.enable(), PM1_EN_MASK);
        let mut r = [0u8; 2];
        ev.read(2, &mut r);
        assert_eq!(u16::from_le_bytes(r), PM1_EN_MASK);
        // A 32-bit write sets enable and clears status at once.
        ev.raise(PWRBTN_STS);
        ev.write(
            0,
            &(u32::from(PWRBTN_STS) | (u32::from(PWRBTN_STS) << 16)).to_le_bytes(),
        );
        assert_eq!((ev.status(), ev.enable()), (0, PWRBTN_STS));
        assert!(ev.raise(PWRBTN_STS));
    }

    #[test]
    fn sci_follows_enabled_status() {
        let levels = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = levels.clone();
        let mut ev = Pm1aEvent::with_sci(Box::new(move |l| {
            seen.lock().unwrap().push(l);
        }));
        // Not enabled yet: pending, line low.
        assert!(!ev.raise(PWRBTN_STS));
        // Enabling a pending event asserts the line.
        ev.write(2, &PWRBTN_STS.to_le_bytes());
        // A second press changes nothing; clearing another bit neither.
        assert!(ev.raise(PWRBTN_STS));
        ev.write(0, &WAK_STS.to_le_bytes());
        assert_eq!(*levels.lock().unwrap(), [true]);
        // Write-1-to-clear lowers it.
        ev.write(0, &PWRBTN_STS.to_le_bytes());
        assert_eq!(*levels.lock().unwrap(), [true, false]);
        // Pressed while enabled: asserted at once; disabling lowers it.
        assert!(ev.raise(PWRBTN_STS));
        ev.write(2, &0u16.to_le_bytes());
        assert_eq!(*levels.lock().unwrap(), [true, false, true, false]);
    }
}

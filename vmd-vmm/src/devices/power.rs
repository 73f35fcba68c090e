//! The ACPI PM1a control register: a guest powers off by writing SLP_TYP
//! 5 (S5, soft-off, as our future ACPI tables will say) with SLP_EN set.

use std::sync::Arc;

use vmd_proto::vm::ExitReason;

use crate::bus::BusDevice;
use crate::control::ExitSignal;

const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
/// The sleep type our tables will give for S5.
pub const SLP_TYP_S5: u16 = 5;

/// A 16-bit register; byte accesses to either half work too.
pub struct Pm1aControl {
    exit: Arc<ExitSignal>,
    value: u16,
}

impl Pm1aControl {
    pub fn new(exit: Arc<ExitSignal>) -> Pm1aControl {
        Pm1aControl { exit, value: 0 }
    }
}

impl BusDevice for Pm1aControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // SLP_EN always reads back as zero.
        let bytes = (self.value & !SLP_EN).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| bytes.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = self.value.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(offset)
                .ok()
                .and_then(|o| bytes.get_mut(o + i))
            {
                *slot = *b;
            }
        }
        let v = u16::from_le_bytes(bytes);
        self.value = v & !SLP_EN;
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
        assert_eq!(u16::from_le_bytes(r), 0x1400);
    }
}

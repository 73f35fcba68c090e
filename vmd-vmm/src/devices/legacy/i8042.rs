//! Just enough of the i8042 keyboard controller for a guest to reset the
//! machine (command 0xFE, "pulse reset line"), plus the PCI reset control
//! register at 0xCF9. Neither has a keyboard behind it: the status port
//! says a byte is always waiting ([`STATUS`]), so a driver probing for a
//! controller flushes a few bytes, calls it stuck and gives up.

use std::sync::Arc;

use vmd_proto::vm::ExitReason;

use crate::bus::BusDevice;
use crate::lifecycle::ExitSignal;

/// Command port offset from the data port (0x64 - 0x60).
const CMD_OFFSET: u64 = 4;
/// Pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;
/// Output buffer full (a byte to read), input buffer empty. SeaBIOS and
/// Linux flush at most 16 bytes before using the controller and give up
/// when it never empties: 32 exits. An empty, ready controller (status 0)
/// instead made SeaBIOS send a self-test and poll 10,000 times (50 us
/// apart, each poll an exit) for the answer: ~0.7 s of every BIOS boot
/// (docs/BENCHMARKS.md). The input buffer stays empty, so a reset through
/// 0xFE is written at once.
const STATUS: u8 = 0x01;

/// Registered at 0x60 with length 5 (0x60-0x64).
pub struct I8042 {
    exit: Arc<ExitSignal>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> I8042 {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Data port: nothing real to read; status: see STATUS. The ports
        // in between are not ours.
        let v = match offset {
            0 => 0,
            CMD_OFFSET => STATUS,
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == CMD_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            log::info!("guest reset through the i8042");
            self.exit.request(ExitReason::Reboot);
        }
    }
}

/// Reset control register (0xCF9): writing bit 2 (reset CPU) resets.
pub struct ResetControl {
    exit: Arc<ExitSignal>,
    value: u8,
}

const RESET_CPU: u8 = 1 << 2;

impl ResetControl {
    pub fn new(exit: Arc<ExitSignal>) -> ResetControl {
        ResetControl { exit, value: 0 }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.value;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        // Only bits 1 (hard reset) and 3 (full reset) are stored.
        self.value = v & 0x0a;
        if v & RESET_CPU != 0 {
            log::info!("guest reset through port 0xcf9");
            self.exit.request(ExitReason::Reboot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_reboots() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut kbd = I8042::new(exit.clone());
        let mut b = [0xaa];
        kbd.read(CMD_OFFSET, &mut b);
        assert_eq!(b, [STATUS], "a byte waiting, ready for a command");
        kbd.write(CMD_OFFSET, &[0xaa]);
        assert!(!exit.is_stopping());
        kbd.write(0, &[CMD_RESET_CPU]);
        assert!(!exit.is_stopping());
        kbd.write(CMD_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }

    #[test]
    fn cf9_reboots_on_bit_2() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut rc = ResetControl::new(exit.clone());
        rc.write(0, &[0x02]);
        assert!(!exit.is_stopping());
        rc.write(0, &[0x06]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }
}

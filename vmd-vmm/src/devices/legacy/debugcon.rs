//! The firmware debug port (0x402, QEMU's "debugcon"): SeaBIOS writes its
//! log there byte by byte once a read of the port answers 0xe9. Lines go
//! to the VM's log at debug level (`vmd -v`).

use crate::bus::BusDevice;

/// What a read answers, so that SeaBIOS knows the port is there.
const READBACK: u8 = 0xe9;
/// A line longer than this is logged in pieces.
const MAX_LINE: usize = 512;

#[derive(Default)]
pub struct DebugCon {
    line: Vec<u8>,
}

impl DebugCon {
    fn flush(&mut self) {
        if !self.line.is_empty() {
            let text = String::from_utf8_lossy(&self.line);
            log::debug!("firmware: {}", text.trim_end());
            self.line.clear();
        }
    }
}

impl BusDevice for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(READBACK);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        for &b in data {
            match b {
                b'\n' => self.flush(),
                b'\r' | 0 => {}
                _ => {
                    self.line.push(b);
                    if self.line.len() >= MAX_LINE {
                        self.flush();
                    }
                }
            }
        }
    }
}

impl Drop for DebugCon {
    fn drop(&mut self) {
        self.flush();
    }
}

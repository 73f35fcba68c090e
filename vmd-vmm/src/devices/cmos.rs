//! CMOS RAM with an MC146818 real-time clock, read-only time. Linux reads
//! the clock at boot and spins while "update in progress" is set, so the
//! status registers must look like a sane, idle RTC. The time is the
//! host's UTC time, in BCD, 24-hour mode.

use crate::bus::BusDevice;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) clear.
const STATUS_A_VALUE: u8 = 0x26;
/// 24-hour mode, BCD, no interrupts enabled.
const STATUS_B_VALUE: u8 = 0x02;
/// Valid RAM and time (battery good).
const STATUS_D_VALUE: u8 = 0x80;
/// The index port's bit 7 is the NMI mask, not part of the index.
const INDEX_MASK: u8 = 0x7f;

/// Registered at 0x70 with length 2 (index, data).
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Cmos {
            index: 0,
            ram: [0; 128],
        }
    }
}

fn bcd(v: i32) -> u8 {
    let v = v.rem_euclid(100) as u8;
    ((v / 10) << 4) | (v % 10)
}

/// The host's UTC time as the RTC registers hold it.
fn now() -> Option<libc::tm> {
    // SAFETY: time(NULL) only returns a value.
    let t = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: tm is plain data; gmtime_r fills it and we check the result.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    let ok = unsafe { !libc::gmtime_r(&t, &mut tm).is_null() };
    ok.then_some(tm)
}

impl Cmos {
    fn register(&self, index: u8) -> u8 {
        let time = |f: fn(&libc::tm) -> i32| now().map_or(0, |tm| bcd(f(&tm)));
        match index {
            SECONDS => time(|t| t.tm_sec),
            MINUTES => time(|t| t.tm_min),
            HOURS => time(|t| t.tm_hour),
            WEEKDAY => time(|t| t.tm_wday + 1),
            DAY => time(|t| t.tm_mday),
            MONTH => time(|t| t.tm_mon + 1),
            YEAR => time(|t| t.tm_year),
            CENTURY => time(|t| (t.tm_year + 1900) / 100),
            STATUS_A => STATUS_A_VALUE,
            STATUS_B => STATUS_B_VALUE,
            STATUS_C => 0,
            STATUS_D => STATUS_D_VALUE,
            i => self.ram[usize::from(i & INDEX_MASK)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.index,
            _ => self.register(self.index),
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => self.index = v & INDEX_MASK,
            // The clock and status registers are read-only here; the rest
            // is plain RAM the guest may use.
            _ if self.index > STATUS_D && self.index != CENTURY => {
                self.ram[usize::from(self.index)] = v;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, index: u8) -> u8 {
        c.write(0, &[index | 0x80]);
        let mut b = [0];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn idle_clock_and_valid_time() {
        let mut c = Cmos::default();
        assert_eq!(read(&mut c, STATUS_A) & 0x80, 0);
        assert_eq!(read(&mut c, STATUS_D), 0x80);
        let month = read(&mut c, MONTH);
        assert!((0x01..=0x12).contains(&month));
        assert_eq!(read(&mut c, CENTURY), 0x20);
    }

    #[test]
    fn ram_is_writable_but_clock_is_not() {
        let mut c = Cmos::default();
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        c.write(0, &[STATUS_A]);
        c.write(1, &[0xff]);
        assert_eq!(read(&mut c, STATUS_A), STATUS_A_VALUE);
    }

    #[test]
    fn bcd_encoding() {
        assert_eq!(bcd(59), 0x59);
        assert_eq!(bcd(126), 0x26);
    }
}

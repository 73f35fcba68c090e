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

/// A UTC date and time, as the RTC registers hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UtcTime {
    year: i32,
    month: i32,
    day: i32,
    weekday: i32,
    hour: i32,
    minute: i32,
    second: i32,
}

/// Splits seconds since the epoch into a UTC date, by arithmetic alone:
/// libc's gmtime_r would load the time zone database on first use, and
/// the sandboxed VM process may open no files.
fn utc(secs: i64) -> UtcTime {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01, counting in 400-year eras
    // that start on March 1st so leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    UtcTime {
        year: year as i32,
        month: month as i32,
        day: day as i32,
        // 1970-01-01 was a Thursday (day 4, Sunday = 0).
        weekday: (days + 4).rem_euclid(7) as i32,
        hour: (rem / 3600) as i32,
        minute: (rem % 3600 / 60) as i32,
        second: (rem % 60) as i32,
    }
}

/// The host's UTC time now.
fn now() -> UtcTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    utc(secs)
}

/// Memory size registers, as QEMU's PC sets them for its BIOS.
const BASE_MEM_KB: u8 = 0x15;
const EXT_MEM_KB: u8 = 0x17;
const EXT_MEM_KB2: u8 = 0x30;
const MEM_ABOVE_16M: u8 = 0x34;
const MEM_ABOVE_4G: u8 = 0x5b;
const SMP_COUNT: u8 = 0x5f;

impl Cmos {
    /// The memory sizes and CPU count firmware reads: KiB below 640 KiB,
    /// KiB from 1 MiB (at most 0xffff), 64 KiB units from 16 MiB up to
    /// `low_end`, 64 KiB units above 4 GiB, and vCPUs minus one.
    pub fn set_machine(&mut self, low_end: u64, high_size: u64, vcpus: u32) {
        let put16 = |ram: &mut [u8; 128], at: u8, v: u64| {
            let v = v.min(0xffff) as u16;
            ram[usize::from(at)..usize::from(at) + 2].copy_from_slice(&v.to_le_bytes());
        };
        put16(&mut self.ram, BASE_MEM_KB, 640);
        let ext_kb = low_end.saturating_sub(1 << 20) >> 10;
        put16(&mut self.ram, EXT_MEM_KB, ext_kb);
        put16(&mut self.ram, EXT_MEM_KB2, ext_kb);
        put16(
            &mut self.ram,
            MEM_ABOVE_16M,
            low_end.saturating_sub(16 << 20) >> 16,
        );
        let high = (high_size >> 16).min(0xff_ffff) as u32;
        let at = usize::from(MEM_ABOVE_4G);
        self.ram[at..at + 3].copy_from_slice(&high.to_le_bytes()[..3]);
        self.ram[usize::from(SMP_COUNT)] = vcpus.saturating_sub(1).min(0xff) as u8;
    }

    fn register(&self, index: u8) -> u8 {
        let time = |f: fn(&UtcTime) -> i32| bcd(f(&now()));
        match index {
            SECONDS => time(|t| t.second),
            MINUTES => time(|t| t.minute),
            HOURS => time(|t| t.hour),
            WEEKDAY => time(|t| t.weekday + 1),
            DAY => time(|t| t.day),
            MONTH => time(|t| t.month),
            YEAR => time(|t| t.year % 100),
            CENTURY => time(|t| t.year / 100),
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

    #[test]
    fn utc_dates_by_arithmetic() {
        let t = utc(0);
        assert_eq!(
            (t.year, t.month, t.day, t.weekday, t.hour),
            (1970, 1, 1, 4, 0)
        );
        // 2000-02-29 12:34:56 UTC, a Tuesday.
        let t = utc(951_827_696);
        assert_eq!(
            (t.year, t.month, t.day, t.weekday, t.hour, t.minute, t.second),
            (2000, 2, 29, 2, 12, 34, 56)
        );
        // 2026-11-26 was a Thursday.
        let t = utc(1_795_651_200);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2026, 11, 26, 4));
    }

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
    fn machine_registers() {
        let mut c = Cmos::default();
        c.set_machine(64 << 20, 1 << 30, 2);
        assert_eq!((read(&mut c, 0x34), read(&mut c, 0x35)), (0x00, 0x03));
        assert_eq!((read(&mut c, 0x30), read(&mut c, 0x31)), (0x00, 0xfc));
        assert_eq!((read(&mut c, 0x5b), read(&mut c, 0x5c)), (0x00, 0x40));
        assert_eq!(read(&mut c, 0x5f), 1);
    }

    #[test]
    fn bcd_encoding() {
        assert_eq!(bcd(59), 0x59);
        assert_eq!(bcd(126), 0x26);
    }
}

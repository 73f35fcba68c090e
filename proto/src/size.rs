//! Scaled sizes ("512M", "1G"), shared by vmctl and vm.conf.
//!
//! Units are binary (K = 1024) and case-insensitive, with an optional
//! trailing "B": `512`, `512b`, `64k`, `256MB`, `1.5G`, `2T`. A plain number
//! is a byte count; a decimal fraction needs a unit and is rounded down to
//! whole bytes.

/// Why a size string was refused; every variant names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix")]
    Invalid(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Most fraction digits accepted ("1.123456789012345678G").
const MAX_FRACTION_DIGITS: usize = 18;

/// Unit letters in order of scale: B = 1024^0 ... E = 1024^6.
const UNITS: [u8; 7] = *b"BKMGTPE";

/// Parses a size such as "512M" into bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(s.to_string());
    let bytes = s.as_bytes();

    let int_end = bytes
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(bytes.len());
    let (int_digits, rest) = bytes.split_at(int_end);
    if int_digits.is_empty() {
        return Err(invalid());
    }

    let (frac_digits, rest) = match rest.split_first() {
        Some((b'.', after)) => {
            let end = after
                .iter()
                .position(|b| !b.is_ascii_digit())
                .unwrap_or(after.len());
            if end == 0 || end > MAX_FRACTION_DIGITS {
                return Err(invalid());
            }
            after.split_at(end)
        }
        _ => (&[][..], rest),
    };

    // What is left is the unit: "", "B", "K", "KB", ... (any case).
    let upper: Vec<u8> = rest.iter().map(u8::to_ascii_uppercase).collect();
    let shift = match upper.as_slice() {
        [] | [b'B'] => 0,
        [u] | [u, b'B'] => match *u {
            b'K' => 10,
            b'M' => 20,
            b'G' => 30,
            b'T' => 40,
            _ => return Err(invalid()),
        },
        _ => return Err(invalid()),
    };
    if shift == 0 && !frac_digits.is_empty() {
        // Fractions of a byte make no sense.
        return Err(invalid());
    }
    let scale: u64 = 1 << shift;

    let mut whole: u64 = 0;
    for &d in int_digits {
        whole = whole
            .checked_mul(10)
            .and_then(|w| w.checked_add(u64::from(d - b'0')))
            .ok_or_else(|| SizeError::Overflow(s.to_string()))?;
    }
    let whole = whole
        .checked_mul(scale)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))?;

    // fraction * scale / 10^digits, in u128: 10^18 * 2^40 fits easily.
    let mut num: u128 = 0;
    let mut den: u128 = 1;
    for &d in frac_digits {
        num = num * 10 + u128::from(d - b'0');
        den *= 10;
    }
    let frac = u64::try_from(num * u128::from(scale) / den)
        .map_err(|_| SizeError::Overflow(s.to_string()))?;

    whole
        .checked_add(frac)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// Formats a byte count for humans the way OpenBSD's fmt_scaled(3) does:
/// at most four characters plus the unit, one decimal below 100 units
/// ("1.0G", "88.1M"), whole numbers from 100 up ("512M", "1006M"), and
/// plain bytes below 1K ("100B", "0B").
pub fn format_size(n: u64) -> String {
    if n == 0 {
        return "0B".to_string();
    }
    // The largest unit that keeps the whole part below 1024.
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >> (10 * (unit + 1)) > 0 {
        unit += 1;
    }
    if unit == 0 {
        return format!("{n}B");
    }
    let letter = char::from(UNITS[unit]);
    let shift = 10 * unit;
    let mut whole = n >> shift;
    // The remainder in units of the next smaller scale (0..1024), then
    // rounded to tenths.
    let rem = (n & ((1u64 << shift) - 1)) >> (shift - 10);
    let mut tenths = (10 * rem + 512) / 1024;
    if tenths >= 10 {
        whole += 1;
        tenths = 0;
    }
    if whole >= 100 {
        if tenths >= 5 {
            whole += 1;
        }
        format!("{whole}{letter}")
    } else {
        format!("{whole}.{tenths}{letter}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("007"), Ok(7));
    }

    #[test]
    fn suffixes_any_case() {
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("1KB"), Ok(1024));
        assert_eq!(parse_size("1kb"), Ok(1024));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256mB"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2gb"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1tb"), Ok(1 << 40));
    }

    #[test]
    fn fractions() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
        assert_eq!(parse_size("1.0M"), Ok(1 << 20));
        // Rounded down to whole bytes.
        assert_eq!(parse_size("1.3K"), Ok(1331));
    }

    #[test]
    fn garbage_is_refused_and_named() {
        for s in [
            "", " 1M", "1M ", "M", "-1", "+1", "1X", "1MM", "1BB", "1.5", "1.5B", "1.", ".5G",
            "1..5G", "1,5G", "0x10", "1 M", "١M", "1.5.5G",
        ] {
            match parse_size(s) {
                Err(SizeError::Invalid(got)) => assert_eq!(got, s),
                other => panic!("{s:?}: expected Invalid, got {other:?}"),
            }
        }
        let msg = parse_size("12Q").unwrap_err().to_string();
        assert!(msg.contains("\"12Q\""), "{msg}");
    }

    #[test]
    fn overflow_is_refused_and_named() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        for s in [
            "18446744073709551616",
            "99999999999999999999999",
            "16777216T",
            "17179869184G",
            "18446744073709551615K",
        ] {
            match parse_size(s) {
                Err(SizeError::Overflow(got)) => assert_eq!(got, s),
                other => panic!("{s:?}: expected Overflow, got {other:?}"),
            }
        }
        assert!(parse_size("16777215.99T").is_ok());
        let msg = parse_size("99999999999999999999").unwrap_err().to_string();
        assert!(msg.contains("99999999999999999999"), "{msg}");
    }

    #[test]
    fn format_like_fmt_scaled() {
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(1), "1B");
        assert_eq!(format_size(1023), "1023B");
        assert_eq!(format_size(1024), "1.0K");
        assert_eq!(format_size(1536), "1.5K");
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(1 << 30), "1.0G");
        assert_eq!(format_size(3 << 29), "1.5G");
        assert_eq!(format_size(1006 << 20), "1006M");
        assert_eq!(format_size(88 * (1 << 20) + 100 * 1024), "88.1M");
        assert_eq!(format_size(10 << 30), "10.0G");
        assert_eq!(format_size(100 << 30), "100G");
        assert_eq!(format_size(1 << 40), "1.0T");
        assert_eq!(format_size(u64::MAX), "16.0E");
        // 9.96 rounds up to the next whole unit.
        assert_eq!(format_size((10 << 20) - 40 * 1024), "10.0M");
    }

    #[test]
    fn round_trip_of_whole_units() {
        for s in ["1.0K", "512M", "1.0G", "2.0T"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
    }
}

//! RFC 3339 for exported timestamps: UTC, microseconds, always the same width, so the
//! strings sort as the times do. Formatted on the stack: an export writes one per message.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::vault::Timestamp;

const LEN: usize = "2026-11-23T10:00:00.000000Z".len();

/// A formatted time, e.g. `2026-11-23T10:00:00.000000Z`.
#[derive(Clone, Copy)]
pub struct Rfc3339([u8; LEN]);

impl Rfc3339 {
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

pub fn rfc3339(t: Timestamp) -> Rfc3339 {
    let secs = t.seconds();
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    // Timestamps are years 1970-9999, so four digits always hold the year.
    digits(&mut out[0..4], y as u64);
    digits(&mut out[5..7], u64::from(m));
    digits(&mut out[8..10], u64::from(d));
    digits(&mut out[11..13], (rem / 3600) as u64);
    digits(&mut out[14..16], (rem / 60 % 60) as u64);
    digits(&mut out[17..19], (rem % 60) as u64);
    digits(&mut out[20..26], t.micros().rem_euclid(1_000_000) as u64);
    Rfc3339(out)
}

/// Writes `n` as zero-padded decimal filling `out`.
fn digits(out: &mut [u8], mut n: u64) {
    for b in out.iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(micros: i64) -> String {
        rfc3339(Timestamp::from_micros(micros).unwrap()).to_string()
    }

    #[test]
    fn formats_the_ends_of_the_range_and_a_leap_day() {
        assert_eq!(at(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(253_402_300_799_999_999), "9999-12-31T23:59:59.999999Z");
        assert_eq!(at(951_782_400_000_000), "2000-02-29T00:00:00.000000Z");
        assert_eq!(at(1_795_428_000_123_456), "2026-11-23T10:00:00.123456Z");
    }
}

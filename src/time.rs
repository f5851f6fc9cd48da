//! Wall-clock helpers: Unix seconds and RFC 3339 timestamps for the access log, without a
//! date crate. Durations on the request path use `tokio::time::Instant`; only what is
//! written down or sealed into tokens uses wall-clock time.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Writes `millis` since the epoch as `2026-11-23T10:04:05.123Z`.
pub fn write_rfc3339(out: &mut String, millis: u64) {
    let secs = millis / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        millis % 1000
    );
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days` algorithm, which works in 400-year eras).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
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

    fn fmt(ms: u64) -> String {
        let mut s = String::new();
        write_rfc3339(&mut s, ms);
        s
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(fmt(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 is a leap day in a century year divisible by 400.
        assert_eq!(fmt(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(fmt(1_795_341_845_123), "2026-11-22T10:04:05.123Z");
        assert_eq!(fmt(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }
}

//! Time as the vault sees it: integer Unix seconds, read from one clock that tests can move.

/// A source of the current time in Unix seconds.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Seconds since the Unix epoch.
    fn now(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

/// A clock for tests (`kagi server --test-clock`): the system time plus an offset that only
/// moves forward, so everything time-dependent (nbf, exp, token lifetimes, soft-delete
/// retention, purge dates) can be fast-forwarded without waiting.
#[derive(Debug, Default)]
pub struct TestClock {
    offset: std::sync::atomic::AtomicI64,
}

/// The furthest a test clock may be moved in one step: 100 years.
pub const MAX_TEST_CLOCK_ADVANCE: i64 = 100 * 365 * DAY;

impl TestClock {
    /// A test clock showing the system time.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `secs` (0 to [`MAX_TEST_CLOCK_ADVANCE`]) and returns the new
    /// time. `None` when `secs` is out of range or the offset would overflow.
    pub fn advance(&self, secs: i64) -> Option<i64> {
        if !(0..=MAX_TEST_CLOCK_ADVANCE).contains(&secs) {
            return None;
        }
        use std::sync::atomic::Ordering;
        self.offset
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| o.checked_add(secs))
            .ok()?;
        Some(self.now())
    }

    /// The seconds added to the system time so far.
    pub fn offset(&self) -> i64 {
        self.offset.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Clock for TestClock {
    fn now(&self) -> i64 {
        SystemClock.now().saturating_add(self.offset())
    }
}

/// Formats Unix seconds as RFC 3339 UTC (`2026-11-24T09:00:00Z`), as ARM writes dates.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Parses an RFC 3339 date (as [`rfc3339`] writes them) into Unix seconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// Seconds in a day.
pub const DAY: i64 = 86_400;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm), for
/// formats that count days themselves (the audit log's timestamps, PostgreSQL's dates).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            super::parse_rfc3339("2026-11-24T09:00:00Z"),
            Some(1_795_510_800)
        );
        assert_eq!(
            super::parse_rfc3339(&super::rfc3339(1_234_567)),
            Some(1_234_567)
        );
        assert_eq!(super::parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn civil_days_round_trip() {
        use super::{civil_from_days, days_from_civil};
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 1, 1), 10_957);
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for d in [-800_000, -1, 0, 59, 60, 11_016, 2_932_896] {
            let (y, m, day) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, day), d);
        }
    }

    #[test]
    fn test_clock_moves_forward_only() {
        use super::{Clock, MAX_TEST_CLOCK_ADVANCE, SystemClock, TestClock};
        let c = TestClock::new();
        let before = SystemClock.now();
        let now = c.advance(3600).unwrap();
        assert!(now >= before + 3600 && now <= SystemClock.now() + 3600);
        assert_eq!(c.offset(), 3600);
        assert!(c.advance(-1).is_none());
        assert!(c.advance(MAX_TEST_CLOCK_ADVANCE + 1).is_none());
        assert!(c.advance(0).is_some());
        assert_eq!(c.offset(), 3600);
    }
}

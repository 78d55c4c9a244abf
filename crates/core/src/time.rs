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

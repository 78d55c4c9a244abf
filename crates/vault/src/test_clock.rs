//! The movable test clock (`kagi server --test-clock`): every time-dependent rule (nbf, exp,
//! token lifetimes, soft-delete retention and purge dates) reads the platform's one clock, so
//! tests can fast-forward it instead of waiting.

use std::sync::Arc;

use kagi_core::time::{MAX_TEST_CLOCK_ADVANCE, TestClock};
use kagi_core::{ErrorCode, KvError};
use kagi_identity::Principal;

use crate::Platform;

impl Platform {
    /// Makes `clock` the platform's clock and enables [`Self::advance_test_clock`]. For tests
    /// and `kagi server --test-clock` only.
    #[must_use]
    pub fn with_test_clock(mut self, clock: Arc<TestClock>) -> Self {
        self.clock = clock.clone();
        self.directory.set_clock(clock.clone());
        self.test_clock = Some(clock);
        self
    }

    /// Whether the platform runs on a movable test clock.
    pub fn has_test_clock(&self) -> bool {
        self.test_clock.is_some()
    }

    /// The platform's current time (Unix seconds).
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// Checks that the platform has a test clock (404 otherwise) and that `caller` is the
    /// bootstrap administrator (403 otherwise).
    pub fn authorize_test_clock(&self, caller: &Principal) -> Result<&Arc<TestClock>, KvError> {
        let Some(clock) = &self.test_clock else {
            return Err(KvError::new(
                ErrorCode::NotFound,
                "This kagi server runs without a test clock.",
            ));
        };
        if caller.object_id != self.admin_object_id
            || !caller.tenant_id.eq_ignore_ascii_case(&self.default_tenant)
        {
            return Err(KvError::forbidden(
                "Only the bootstrap administrator may move the test clock.",
            )
            .with_inner("AuthorizationFailed"));
        }
        Ok(clock)
    }

    /// Moves the test clock forward by `secs` (0 to 100 years) and then purges the soft-deleted
    /// objects whose retention has ended by the new time, so a test sees the sweep's effect at
    /// once. Returns the new time. Only the bootstrap administrator may (403 otherwise); 404
    /// when the platform has no test clock; 400 for a negative or too large `secs`.
    ///
    /// Access tokens are validated against the same clock: after moving it more than a token's
    /// lifetime, clients simply obtain a new token.
    pub async fn advance_test_clock(&self, caller: &Principal, secs: i64) -> Result<i64, KvError> {
        let clock = self.authorize_test_clock(caller)?;
        if !(0..=MAX_TEST_CLOCK_ADVANCE).contains(&secs) {
            return Err(KvError::bad_parameter(format!(
                "advanceSeconds must be an integer from 0 to {MAX_TEST_CLOCK_ADVANCE} (100 years)."
            )));
        }
        let now = clock
            .advance(secs)
            .ok_or_else(|| KvError::bad_parameter("The test clock cannot move that far."))?;
        tracing::warn!(
            advanced = secs,
            offset = clock.offset(),
            now,
            "test clock moved forward"
        );
        self.purge_expired().await?;
        // Rotations and near-expiry/expired events due by the new time, at once.
        self.run_scheduler().await?;
        Ok(now)
    }
}

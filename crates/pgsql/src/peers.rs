//! CancelRequests a front end can serve neither itself (not one of its sessions) nor through a
//! splice (not the key of a connection it forwarded): behind a TCP load balancer a client's
//! cancel connection may land on a third front end. Such a request is passed on, once, to the
//! front ends [`crate::Gateway::cancel_peers`] names, with kagi's own request code
//! ([`crate::wire::PASSED_CANCEL_REQUEST`]), which they serve like a CancelRequest but never pass on
//! again: one hop, no loops. Anyone may send a CancelRequest, so the passing on is bounded:
//! [`PASSED_CANCELS_PER_SECOND`] a second per front end (a token bucket; the rest dropped),
//! each peer reached within the upstream timeout, all of them at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::forward;
use crate::gateway::Gateway;

/// Unknown CancelRequests passed on to the peers per second at most (also the burst).
pub(crate) const PASSED_CANCELS_PER_SECOND: u32 = 32;

/// A token bucket: [`PASSED_CANCELS_PER_SECOND`] tokens, refilled at that rate.
pub(crate) struct PassOnBudget {
    /// (tokens, when they were counted).
    state: Mutex<(f64, Instant)>,
}

impl Default for PassOnBudget {
    fn default() -> Self {
        Self {
            state: Mutex::new((f64::from(PASSED_CANCELS_PER_SECOND), Instant::now())),
        }
    }
}

impl PassOnBudget {
    /// Takes a token at `now`; whether there was one.
    fn take_at(&self, now: Instant) -> bool {
        let rate = f64::from(PASSED_CANCELS_PER_SECOND);
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, then) = &mut *state;
        let elapsed = now.saturating_duration_since(*then).as_secs_f64();
        *tokens = (*tokens + elapsed * rate).min(rate);
        *then = now.max(*then);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Passes CancelRequest (`pid`, `key`), which nothing here knows, on to every peer of
/// `gateway` at once (within the budget), and returns when each has been served or given up.
/// Failures are logged at debug level (they name the peer, never the key): a cancel is a best
/// effort, and an unauthenticated client could otherwise fill the log.
pub(crate) async fn pass_on(
    gateway: &dyn Gateway,
    budget: &PassOnBudget,
    pid: u32,
    key: u32,
    timeout: Duration,
) {
    if !budget.take_at(Instant::now()) {
        tracing::debug!(
            "more than {PASSED_CANCELS_PER_SECOND} unknown cancel requests a second: one dropped, not passed on"
        );
        return;
    }
    let mut sent = tokio::task::JoinSet::new();
    for peer in gateway.cancel_peers().await {
        let peer = Arc::new(peer);
        sent.spawn(async move {
            if let Err(e) = forward::cancel(&peer, pid, key, true, timeout).await {
                tracing::debug!(peer = %peer.name, address = %peer.address, reason = %e, "cannot pass a cancel request on");
            }
        });
    }
    while sent.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_burst_then_the_rate() {
        let budget = PassOnBudget::default();
        let t0 = Instant::now();
        let burst = (0..100).filter(|_| budget.take_at(t0)).count();
        assert_eq!(burst, PASSED_CANCELS_PER_SECOND as usize);
        assert!(!budget.take_at(t0));
        // A tenth of a second later: a tenth of the rate again.
        let later = t0 + Duration::from_millis(100);
        let refilled = (0..100).filter(|_| budget.take_at(later)).count();
        assert_eq!(refilled, (PASSED_CANCELS_PER_SECOND / 10) as usize);
        // Idle for long: never more than the burst.
        let much_later = t0 + Duration::from_secs(3600);
        let burst = (0..100).filter(|_| budget.take_at(much_later)).count();
        assert_eq!(burst, PASSED_CANCELS_PER_SECOND as usize);
        // A clock read earlier by another thread does not refill it.
        assert!(!budget.take_at(t0));
    }
}

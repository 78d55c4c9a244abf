//! What protects the token endpoint from abuse, all in memory and bounded: the number of
//! Argon2id verifications running at once (each takes 19 MiB and a core), lockouts after failed
//! passwords per user name and per source address, and the client assertions already used.
//!
//! None of it survives a restart, by choice: lockouts and the replay cache matter for minutes,
//! and writing them to the store would add a synchronous write to every failed sign-in (a cost
//! an attacker chooses). After a restart an assertion can be replayed once more within its
//! remaining lifetime, and lockouts start over.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How failures of one key (a user name, a source) lock it out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lockout {
    /// Failures that lock the key.
    pub threshold: u32,
    /// One failure is forgotten every this many seconds (a leaky bucket), so occasional
    /// mistakes never add up to a lockout.
    pub leak: i64,
    /// The first lockout, in seconds; each further failure doubles it.
    pub first: i64,
    /// The longest lockout, in seconds.
    pub max: i64,
    /// Keys tracked at most (memory bound).
    pub capacity: usize,
}

/// Per user name: five wrong passwords lock the name for 30 s, then 1, 2, 4 … up to 15 minutes.
/// A name that does not exist is counted and answered exactly like one that does.
pub(crate) const USER_LOCKOUT: Lockout = Lockout {
    threshold: 5,
    leak: 600,
    first: 30,
    max: 900,
    capacity: 10_000,
};

/// Per source address (IPv6: per /64): twenty failures, whatever the names, throttle the source
/// the same way. This stops spraying one password over many names. Behind a reverse proxy every
/// request comes from the proxy's address, so its users share one budget.
pub(crate) const SOURCE_LOCKOUT: Lockout = Lockout {
    threshold: 20,
    leak: 60,
    first: 30,
    max: 900,
    capacity: 10_000,
};

/// Client assertions remembered at most (each until its `exp`).
const REPLAY_CAPACITY: usize = 100_000;

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    last: i64,
    locked_until: i64,
}

impl Entry {
    /// The failures still counted at `now`.
    fn decayed(&self, now: i64, leak: i64) -> u32 {
        let forgotten = (now - self.last).max(0) / leak.max(1);
        self.failures
            .saturating_sub(u32::try_from(forgotten).unwrap_or(u32::MAX))
    }
}

/// Failure counts with lockouts, for one kind of key.
#[derive(Debug)]
pub(crate) struct FailureTable<K> {
    entries: HashMap<K, Entry>,
    policy: Lockout,
}

impl<K: Hash + Eq + Clone> FailureTable<K> {
    pub(crate) fn new(policy: Lockout) -> Self {
        Self {
            entries: HashMap::new(),
            policy,
        }
    }

    /// Seconds until `key` may try again, when it is locked out at `now`.
    pub(crate) fn locked(&self, key: &K, now: i64) -> Option<i64> {
        self.entries
            .get(key)
            .map(|e| e.locked_until - now)
            .filter(|left| *left > 0)
    }

    /// Counts a failure of `key` at `now`, locking it once it has failed too often.
    pub(crate) fn fail(&mut self, key: &K, now: i64) {
        let p = self.policy;
        if !self.entries.contains_key(key) && self.entries.len() >= p.capacity {
            self.make_room(now);
        }
        let e = self.entries.entry(key.clone()).or_insert(Entry {
            failures: 0,
            last: now,
            locked_until: 0,
        });
        e.failures = e.decayed(now, p.leak).saturating_add(1);
        e.last = now;
        if e.failures >= p.threshold {
            let doublings = (e.failures - p.threshold).min(20);
            e.locked_until = now + (p.first << doublings).min(p.max);
        }
    }

    /// Forgets `key`'s failures (its owner proved the password).
    pub(crate) fn clear(&mut self, key: &K) {
        self.entries.remove(key);
    }

    /// Drops what no longer matters; if the table is still full, the entry that matters least
    /// (unlocked and oldest, else the lockout that ends first).
    fn make_room(&mut self, now: i64) {
        let leak = self.policy.leak;
        self.entries
            .retain(|_, e| e.locked_until > now || e.decayed(now, leak) > 0);
        if self.entries.len() >= self.policy.capacity
            && let Some(k) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| (e.locked_until > now, e.locked_until, e.last))
                .map(|(k, _)| k.clone())
        {
            self.entries.remove(&k);
        }
    }
}

/// Why a client assertion is not accepted by the replay cache.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReplayRefusal {
    /// Its `jti` was used before, and the assertion has not expired.
    Replayed,
    /// The cache is full of assertions that have not expired.
    Full,
}

/// Client assertions already used, by a digest of (client, `jti`), each until it expires.
#[derive(Debug, Default)]
pub(crate) struct ReplayCache {
    seen: HashMap<Vec<u8>, i64>,
    capacity: usize,
}

impl ReplayCache {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            seen: HashMap::new(),
            capacity,
        }
    }

    /// Remembers `key` until `forget_at`, or refuses it when it is already remembered.
    pub(crate) fn remember(
        &mut self,
        key: Vec<u8>,
        forget_at: i64,
        now: i64,
    ) -> Result<(), ReplayRefusal> {
        if self.seen.get(&key).is_some_and(|t| *t > now) {
            return Err(ReplayRefusal::Replayed);
        }
        if self.seen.len() >= self.capacity {
            self.seen.retain(|_, t| *t > now);
            if self.seen.len() >= self.capacity {
                return Err(ReplayRefusal::Full);
            }
        }
        self.seen.insert(key, forget_at);
        Ok(())
    }
}

/// Bounds the Argon2id verifications running at once: a few run, a few more wait (not for
/// long), the rest are told to come back (429).
#[derive(Debug)]
pub(crate) struct HashGate {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    wait: Duration,
}

/// Takes a place in the queue of a [`HashGate`] and gives it back when dropped, even when the
/// request is abandoned while waiting.
struct Waiter<'a>(&'a AtomicUsize);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HashGate {
    pub(crate) fn new(permits: usize, max_waiting: usize, wait: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(permits)),
            waiting: AtomicUsize::new(0),
            max_waiting,
            wait,
        }
    }

    /// A permit to run one verification (moved into the blocking task, so it is held until the
    /// hash is done), or `None` when the queue is full or the wait ran out.
    pub(crate) async fn enter(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Some(p);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let _place = Waiter(&self.waiting);
        tokio::time::timeout(self.wait, self.permits.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

/// The token endpoint's guards (one per platform).
#[derive(Debug)]
pub(crate) struct TokenGuards {
    /// Concurrent password verifications.
    pub hashing: HashGate,
    /// Failed passwords per user name (lower-case, as typed).
    pub users: Mutex<FailureTable<String>>,
    /// Failed passwords per source.
    pub sources: Mutex<FailureTable<IpAddr>>,
    /// Client assertions already used.
    pub assertions: Mutex<ReplayCache>,
    /// Password hashes computed by the password grant (known and unknown users alike).
    pub hashes_run: AtomicU64,
    /// Serialises signing-key rotations.
    pub rotation: tokio::sync::Mutex<()>,
}

impl Default for TokenGuards {
    fn default() -> Self {
        // One verification per core: Argon2id is CPU-bound, so more at once only adds memory.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
        Self {
            hashing: HashGate::new(cores, 8 * cores, Duration::from_secs(10)),
            users: Mutex::new(FailureTable::new(USER_LOCKOUT)),
            sources: Mutex::new(FailureTable::new(SOURCE_LOCKOUT)),
            assertions: Mutex::new(ReplayCache::with_capacity(REPLAY_CAPACITY)),
            hashes_run: AtomicU64::new(0),
            rotation: tokio::sync::Mutex::new(()),
        }
    }
}

/// The key a source is throttled under: the address, or its /64 for IPv6 (one host commonly
/// holds a whole /64).
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// Locks a guard's table even if a panic poisoned it (the tables hold no invariant a panic
/// could break halfway).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const P: Lockout = Lockout {
        threshold: 3,
        leak: 100,
        first: 10,
        max: 35,
        capacity: 4,
    };

    #[test]
    fn failures_lock_with_doubling_then_leak_away() {
        let mut t = FailureTable::new(P);
        let k = "alice".to_string();
        t.fail(&k, 0);
        t.fail(&k, 0);
        assert_eq!(t.locked(&k, 0), None);
        t.fail(&k, 0);
        assert_eq!(t.locked(&k, 0), Some(10));
        assert_eq!(t.locked(&k, 10), None);
        t.fail(&k, 10);
        assert_eq!(t.locked(&k, 10), Some(20));
        t.fail(&k, 30);
        assert_eq!(t.locked(&k, 30), Some(35), "capped");
        // Two failures leak away in 200 s: the next one does not lock.
        t.clear(&k);
        t.fail(&k, 0);
        t.fail(&k, 0);
        t.fail(&k, 200);
        assert_eq!(t.locked(&k, 200), None);
        // Others are not affected.
        assert_eq!(t.locked(&"bob".to_string(), 30), None);
    }

    #[test]
    fn a_full_table_keeps_its_lockouts() {
        let mut t = FailureTable::new(P);
        for _ in 0..3 {
            t.fail(&0u32, 0);
        }
        for k in 1..20u32 {
            t.fail(&k, 0);
            assert!(t.entries.len() <= P.capacity);
        }
        assert!(
            t.locked(&0, 0).is_some(),
            "the locked key survives eviction"
        );
    }

    #[test]
    fn replays_are_refused_until_expiry_and_memory_is_bounded() {
        let mut c = ReplayCache::with_capacity(2);
        assert_eq!(c.remember(b"a".to_vec(), 100, 0), Ok(()));
        assert_eq!(
            c.remember(b"a".to_vec(), 100, 50),
            Err(ReplayRefusal::Replayed)
        );
        assert_eq!(c.remember(b"b".to_vec(), 100, 50), Ok(()));
        assert_eq!(c.remember(b"c".to_vec(), 100, 50), Err(ReplayRefusal::Full));
        // Once expired, entries make room (and the key is no longer a replay).
        assert_eq!(c.remember(b"c".to_vec(), 300, 100), Ok(()));
        assert_eq!(c.remember(b"a".to_vec(), 300, 100), Ok(()));
    }

    #[tokio::test]
    async fn the_hash_gate_admits_a_bounded_number_and_refuses_the_rest() {
        let gate = HashGate::new(1, 0, Duration::from_secs(3600));
        let held = gate.enter().await.unwrap();
        assert!(gate.enter().await.is_none(), "no queue: refused at once");
        drop(held);
        assert!(gate.enter().await.is_some());

        // One may wait; a waiter that gives up frees its place.
        let gate = HashGate::new(1, 1, Duration::from_secs(3600));
        let held = gate.enter().await.unwrap();
        {
            let waiting = gate.enter();
            tokio::pin!(waiting);
            assert!(futures_poll_once(waiting.as_mut()).await.is_none());
            assert_eq!(gate.waiting.load(Ordering::SeqCst), 1);
            assert!(gate.enter().await.is_none(), "the queue is full");
        }
        assert_eq!(gate.waiting.load(Ordering::SeqCst), 0);
        drop(held);
    }

    /// Polls a future once: `Some` if it finished.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[test]
    fn ipv6_sources_are_grouped_by_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let v4: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(v4), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}

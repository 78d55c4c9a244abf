//! What protects the token endpoint from abuse, all in memory and bounded: the number of
//! Argon2id verifications running at once (each takes 19 MiB and a core), lockouts after failed
//! passwords per user name and per source address, a budget of failed passwords for the whole
//! server, and the client assertions already used.
//!
//! A password attempt takes its place in every budget (name, source, server) before it is
//! hashed and settles it after ([`Attempt`]): attempts still being hashed count as failures
//! until they are known not to be, so however many arrive at once, no more are hashed than the
//! budgets allow.
//!
//! None of it survives a restart, by choice: lockouts and the replay cache matter for minutes,
//! and writing them to the store would add a synchronous write to every failed sign-in (a cost
//! an attacker chooses). After a restart an assertion can be replayed once more within its
//! remaining lifetime, and lockouts start over. On a store several nodes share, an assertion
//! this cache accepts is also recorded in the store (`Store::remember_assertion`: a write per
//! accepted, validly signed assertion, not per attempt), so no other node accepts it again.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kagi_core::time::Clock;
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

/// The whole server: failed password checks (attempts being hashed included) leak away at
/// `per_second`, and at most `burst` are outstanding. This bounds guessing that spreads over
/// names and sources (many /64s of one /48 say, which also push older sources out of a full
/// table): 5 a second is about 430,000 guesses a day over every name, against several times
/// that (one Argon2id per core, some 20 a second per core) without it. Successes give their
/// place back, so only failures use it up; while it is used up, every password grant is
/// answered 429, the price of bounding guessing that no per-key count can attribute.
pub(crate) const GLOBAL_FAILURES: Budget = Budget {
    per_second: 5,
    burst: 50,
};

/// Client assertions remembered at most (each until its `exp`).
const REPLAY_CAPACITY: usize = 100_000;

/// Client assertions remembered at most for one client: one client filling its share refuses
/// only its own assertions, and a hundred clients would have to fill theirs to refuse others'.
/// With assertions living at most [`MAX_ASSERTION_LIFETIME`], this is a new assertion every
/// 3.6 s, sustained, for one client (MSAL makes one per token request, about one an hour per
/// application instance).
pub(crate) const REPLAY_PER_CLIENT: usize = 1_000;

/// The longest a client assertion may be valid, in seconds, from its `nbf` (else `iat`, else
/// now) to its `exp`: what bounds how long the replay cache must remember it. MSAL makes them
/// valid for 10 minutes.
pub(crate) const MAX_ASSERTION_LIFETIME: i64 = 3600;

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    /// Attempts being hashed, counted as failures until they are settled.
    pending: u32,
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

/// Why an attempt may not be hashed now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Locked out for this many more seconds.
    Locked(i64),
    /// Attempts already being hashed use up what is left of the budget: come back in this
    /// many seconds, when they are settled.
    Busy(i64),
}

/// Seconds after which a [`Refusal::Busy`] attempt is worth trying again: pending attempts
/// settle within a hash (or the hash gate's wait).
const BUSY_RETRY: i64 = 1;

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

    /// Takes a place for one attempt of `key` at `now`, to be given back by [`Self::release`]:
    /// refused while `key` is locked, or when the attempts already pending would lock it if
    /// they failed. Below the threshold, the places left before it; once a lockout has run
    /// out with the failures not yet leaked away, one at a time (its failure locks again).
    pub(crate) fn reserve(&mut self, key: &K, now: i64) -> Result<(), Refusal> {
        if let Some(left) = self.locked(key, now) {
            return Err(Refusal::Locked(left));
        }
        let p = self.policy;
        let e = self.entry(key, now);
        let failures = e.decayed(now, p.leak);
        let places = p.threshold.saturating_sub(failures).max(1);
        if e.pending >= places {
            return Err(Refusal::Busy(BUSY_RETRY));
        }
        e.pending += 1;
        Ok(())
    }

    /// Gives back the place of a settled attempt of `key`.
    pub(crate) fn release(&mut self, key: &K) {
        if let Some(e) = self.entries.get_mut(key) {
            e.pending = e.pending.saturating_sub(1);
        }
    }

    /// `key`'s entry, made (with room made for it) if it has none.
    fn entry(&mut self, key: &K, now: i64) -> &mut Entry {
        if !self.entries.contains_key(key) && self.entries.len() >= self.policy.capacity {
            self.make_room(now);
        }
        self.entries.entry(key.clone()).or_insert(Entry {
            failures: 0,
            pending: 0,
            last: now,
            locked_until: 0,
        })
    }

    /// Counts a failure of `key` at `now`, locking it once it has failed too often.
    pub(crate) fn fail(&mut self, key: &K, now: i64) {
        let p = self.policy;
        let e = self.entry(key, now);
        e.failures = e.decayed(now, p.leak).saturating_add(1);
        e.last = now;
        if e.failures >= p.threshold {
            let doublings = (e.failures - p.threshold).min(20);
            e.locked_until = now + (p.first << doublings).min(p.max);
        }
    }

    /// Forgets `key`'s failures (its owner proved the password); attempts still pending keep
    /// their places.
    pub(crate) fn clear(&mut self, key: &K) {
        match self.entries.get_mut(key) {
            Some(e) if e.pending > 0 => {
                e.failures = 0;
                e.locked_until = 0;
            }
            _ => {
                self.entries.remove(key);
            }
        }
    }

    /// Drops what no longer matters; if the table is still full, the entry that matters least
    /// (nothing pending, unlocked and oldest, else the lockout that ends first).
    fn make_room(&mut self, now: i64) {
        let leak = self.policy.leak;
        self.entries
            .retain(|_, e| e.pending > 0 || e.locked_until > now || e.decayed(now, leak) > 0);
        if self.entries.len() >= self.policy.capacity
            && let Some(k) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| (e.pending > 0, e.locked_until > now, e.locked_until, e.last))
                .map(|(k, _)| k.clone())
        {
            self.entries.remove(&k);
        }
    }
}

/// A budget of failures for the whole server: a leaky bucket of whole seconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Budget {
    /// Failures forgotten each second.
    pub per_second: u32,
    /// Failures outstanding at most.
    pub burst: u32,
}

/// The places of a [`Budget`] in use.
#[derive(Debug)]
pub(crate) struct BudgetUse {
    policy: Budget,
    used: u32,
    last: i64,
}

impl BudgetUse {
    pub(crate) fn new(policy: Budget) -> Self {
        Self {
            policy,
            used: 0,
            last: i64::MIN,
        }
    }

    /// Takes a place at `now`, or tells how many seconds until one leaks free.
    pub(crate) fn reserve(&mut self, now: i64) -> Result<(), i64> {
        let p = self.policy;
        let leaked = now.saturating_sub(self.last).max(0);
        let leaked =
            u32::try_from(leaked.saturating_mul(i64::from(p.per_second))).unwrap_or(u32::MAX);
        self.used = self.used.saturating_sub(leaked);
        self.last = now;
        if self.used >= p.burst {
            let over = i64::from(self.used - p.burst + 1);
            let rate = i64::from(p.per_second.max(1));
            return Err((over + rate - 1) / rate);
        }
        self.used += 1;
        Ok(())
    }

    /// Gives a place back (the attempt did not fail).
    pub(crate) fn release(&mut self) {
        self.used = self.used.saturating_sub(1);
    }
}

/// Why a client assertion is not accepted by the replay cache.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReplayRefusal {
    /// Its `jti` was used before, and the assertion has not expired.
    Replayed,
    /// The cache, or this client's share of it, is full of assertions that have not expired.
    Full,
}

/// Client assertions already used, per client by a digest of its `jti`, each until it
/// expires; a client holds at most its share of the whole.
#[derive(Debug, Default)]
pub(crate) struct ReplayCache {
    seen: HashMap<String, HashMap<Vec<u8>, i64>>,
    total: usize,
    capacity: usize,
    per_client: usize,
}

impl ReplayCache {
    pub(crate) fn with_capacity(capacity: usize, per_client: usize) -> Self {
        Self {
            seen: HashMap::new(),
            total: 0,
            capacity,
            per_client,
        }
    }

    /// Remembers `client`'s `jti` (a digest) until `forget_at`, or refuses it when it is
    /// already remembered, or when there is no room for it.
    pub(crate) fn remember(
        &mut self,
        client: &str,
        jti: Vec<u8>,
        forget_at: i64,
        now: i64,
    ) -> Result<(), ReplayRefusal> {
        let mine = self.seen.get(client);
        if mine.and_then(|m| m.get(&jti)).is_some_and(|t| *t > now) {
            return Err(ReplayRefusal::Replayed);
        }
        if mine.is_some_and(|m| m.len() >= self.per_client) {
            self.forget_expired(Some(client), now);
            if self
                .seen
                .get(client)
                .is_some_and(|m| m.len() >= self.per_client)
            {
                return Err(ReplayRefusal::Full);
            }
        }
        if self.total >= self.capacity {
            self.forget_expired(None, now);
            if self.total >= self.capacity {
                return Err(ReplayRefusal::Full);
            }
        }
        let mine = self.seen.entry(client.to_string()).or_default();
        if mine.insert(jti, forget_at).is_none() {
            self.total += 1;
        }
        Ok(())
    }

    /// Forgets the expired assertions of `client`, or of everyone.
    fn forget_expired(&mut self, client: Option<&str>, now: i64) {
        let mut forgotten = 0;
        self.seen.retain(|c, m| {
            if client.is_none_or(|only| only == c) {
                let before = m.len();
                m.retain(|_, t| *t > now);
                forgotten += before - m.len();
            }
            !m.is_empty()
        });
        self.total -= forgotten;
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

    /// Requests waiting for a permit.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
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
    /// Failed passwords on the whole server.
    pub failures: Mutex<BudgetUse>,
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
            failures: Mutex::new(BudgetUse::new(GLOBAL_FAILURES)),
            assertions: Mutex::new(ReplayCache::with_capacity(
                REPLAY_CAPACITY,
                REPLAY_PER_CLIENT,
            )),
            hashes_run: AtomicU64::new(0),
            rotation: tokio::sync::Mutex::new(()),
        }
    }
}

/// Why a password attempt is not hashed now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Throttled {
    /// The source's budget.
    Source(Refusal),
    /// The user name's budget.
    User(Refusal),
    /// The server's budget of failures: seconds until a place is free.
    Server(i64),
}

/// How a password attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// It was not hashed: nothing is counted.
    NotRun,
    /// The password was wrong, or the name unknown, or the request abandoned.
    Failed,
    /// The password was right.
    Succeeded,
}

/// A password attempt's places in the source's, the user name's and the server's budgets,
/// taken before it is hashed ([`TokenGuards::begin`]) and given back when it is settled.
/// Dropped unsettled (the request abandoned while it waited or was hashed), it counts as a
/// failure: walking away from a request never buys a guess that is not counted.
#[derive(Debug)]
pub(crate) struct Attempt<'a> {
    guards: &'a TokenGuards,
    clock: &'a dyn Clock,
    user: String,
    source: Option<IpAddr>,
    user_held: bool,
    server_held: bool,
    settled: bool,
}

impl TokenGuards {
    /// Admits one password attempt by `user` from `source` (already keyed by [`source_key`])
    /// to be hashed, or tells why not; the places it takes are given back when it is settled.
    pub(crate) fn begin<'a>(
        &'a self,
        clock: &'a dyn Clock,
        user: String,
        source: Option<IpAddr>,
    ) -> Result<Attempt<'a>, Throttled> {
        let now = clock.now();
        let mut a = Attempt {
            guards: self,
            clock,
            user,
            source: None,
            user_held: false,
            server_held: false,
            settled: false,
        };
        if let Some(s) = source {
            if let Err(r) = lock(&self.sources).reserve(&s, now) {
                a.cancel();
                return Err(Throttled::Source(r));
            }
            a.source = Some(s);
        }
        if let Err(r) = lock(&self.users).reserve(&a.user, now) {
            a.cancel();
            return Err(Throttled::User(r));
        }
        a.user_held = true;
        if let Err(wait) = lock(&self.failures).reserve(now) {
            a.cancel();
            return Err(Throttled::Server(wait));
        }
        a.server_held = true;
        Ok(a)
    }
}

impl Attempt<'_> {
    /// Gives the places back without counting anything: the password was not hashed.
    pub(crate) fn cancel(mut self) {
        self.finish(Outcome::NotRun);
    }

    /// Settles the attempt by the password check's result: a failure counts against the
    /// name, the source and the server; a success clears the name's failures.
    pub(crate) fn settle(mut self, succeeded: bool) {
        self.finish(if succeeded {
            Outcome::Succeeded
        } else {
            Outcome::Failed
        });
    }

    fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let g = self.guards;
        let now = self.clock.now();
        let failed = outcome == Outcome::Failed;
        if let Some(s) = &self.source {
            let mut sources = lock(&g.sources);
            sources.release(s);
            if failed {
                sources.fail(s, now);
            }
        }
        if self.user_held {
            let mut users = lock(&g.users);
            users.release(&self.user);
            match outcome {
                Outcome::Failed => users.fail(&self.user, now),
                Outcome::Succeeded => users.clear(&self.user),
                Outcome::NotRun => {}
            }
        }
        if self.server_held && !failed {
            lock(&g.failures).release();
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.finish(Outcome::Failed);
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
        let mut c = ReplayCache::with_capacity(2, 2);
        assert_eq!(c.remember("x", b"a".to_vec(), 100, 0), Ok(()));
        assert_eq!(
            c.remember("x", b"a".to_vec(), 100, 50),
            Err(ReplayRefusal::Replayed)
        );
        assert_eq!(c.remember("x", b"b".to_vec(), 100, 50), Ok(()));
        assert_eq!(
            c.remember("y", b"c".to_vec(), 100, 50),
            Err(ReplayRefusal::Full)
        );
        // Once expired, entries make room (and the key is no longer a replay).
        assert_eq!(c.remember("y", b"c".to_vec(), 300, 100), Ok(()));
        assert_eq!(c.remember("x", b"a".to_vec(), 300, 100), Ok(()));
        assert_eq!(c.total, 2);
    }

    #[test]
    fn one_client_cannot_take_another_clients_room_in_the_replay_cache() {
        let mut c = ReplayCache::with_capacity(4, 2);
        assert_eq!(c.remember("greedy", b"1".to_vec(), 100, 0), Ok(()));
        assert_eq!(c.remember("greedy", b"2".to_vec(), 100, 0), Ok(()));
        assert_eq!(
            c.remember("greedy", b"3".to_vec(), 100, 0),
            Err(ReplayRefusal::Full),
            "its share is used up"
        );
        assert_eq!(c.remember("other", b"1".to_vec(), 100, 0), Ok(()));
        // Its own expired assertions make room for it.
        assert_eq!(c.remember("greedy", b"3".to_vec(), 300, 100), Ok(()));
        assert_eq!(c.total, 2);
    }

    #[test]
    fn the_server_budget_leaks_and_successes_give_their_place_back() {
        let mut b = BudgetUse::new(Budget {
            per_second: 2,
            burst: 3,
        });
        for _ in 0..3 {
            assert_eq!(b.reserve(10), Ok(()));
        }
        assert_eq!(b.reserve(10), Err(1));
        b.release();
        assert_eq!(b.reserve(10), Ok(()));
        assert_eq!(b.reserve(10), Err(1));
        // Two places leak free each second.
        assert_eq!(b.reserve(11), Ok(()));
        assert_eq!(b.reserve(11), Ok(()));
        assert_eq!(b.reserve(11), Err(1));
    }

    #[test]
    fn pending_attempts_count_against_the_threshold() {
        let mut t = FailureTable::new(P);
        let k = "alice".to_string();
        for _ in 0..3 {
            assert_eq!(t.reserve(&k, 0), Ok(()));
        }
        assert_eq!(t.reserve(&k, 0), Err(Refusal::Busy(BUSY_RETRY)));
        // One settles as a success: its place is free again, the others still pending.
        t.release(&k);
        t.clear(&k);
        assert_eq!(t.reserve(&k, 0), Ok(()));
        for _ in 0..3 {
            t.release(&k);
            t.fail(&k, 0);
        }
        assert_eq!(t.reserve(&k, 0), Err(Refusal::Locked(10)));
        // After the lockout, one attempt at a time while the failures have not leaked away.
        assert_eq!(t.reserve(&k, 10), Ok(()));
        assert_eq!(t.reserve(&k, 10), Err(Refusal::Busy(BUSY_RETRY)));
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

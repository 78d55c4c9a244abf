//! The takeover sweep's memory (docs/SEVERAL_NODES.md, "Homes"): with several nodes on one
//! store, a disk family or a SQL server whose home node is gone is taken over by another node
//! without waiting for a request. Each node that could take resources over looks for them
//! every few seconds; what it remembers between its passes is here: when it first saw each
//! absent home absent (a home is gone only once absent for a grace, so that a node restarting
//! quickly keeps what it holds), and each resource's failed tries (retried later and later,
//! and logged rarely: two nodes sweeping at once race for a takeover's lease, and a resource
//! that cannot be taken over waits for its home at every pass). Time is passed in.
//!
//! Which node takes a resource over is decided here too, so that the survivors of a lost
//! node share its resources rather than race for them: [`first_taker`] names, for a key and
//! the nodes able to take over, the one that does it, the same on every node that sees the
//! same running nodes (rendezvous hashing: a node joining or leaving moves only the keys it
//! wins or won). The others try themselves only once it has stopped making progress
//! ([`GoneHomes::others_may_take`]), in case it cannot.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::{ErrorCode, KvError};

/// The environment variable that sets the grace, in seconds: how long a node must have seen
/// a home absent before it takes that home's resources over.
pub const GRACE_VARIABLE: &str = "KAGI_TAKEOVER_AFTER";
/// The grace when [`GRACE_VARIABLE`] is not set: long enough for a node restarting quickly to
/// keep what it holds.
pub const DEFAULT_GRACE_SECONDS: u64 = 30;
/// The shortest and longest time between two passes of the sweep (within them, the grace).
pub const PASS_BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(5));
/// After a failed try, the next waits this long, doubled at each failure up to
/// [`RETRY_MAX`]: a resource that cannot be taken over (a SQL server with a geo-replication
/// link, a disk family whose log is not in the bucket…) is not checked again at every pass.
pub const RETRY_FIRST: Duration = Duration::from_secs(30);
/// The longest wait between two tries of one resource.
pub const RETRY_MAX: Duration = Duration::from_secs(600);
/// How often a resource that keeps waiting for its home (503: it cannot be taken over, or the
/// bucket cannot be reached) is logged.
pub const WAITING_SAID_EVERY: Duration = Duration::from_secs(3600);
/// How often any other failure of one resource's takeover is logged.
pub const FAILURE_SAID_EVERY: Duration = Duration::from_secs(600);
/// The least time a resource's first taker ([`first_taker`]) is left to take it over, after the
/// grace, before the other nodes try (it may be failing, or slow with many resources).
pub const OTHERS_WAIT_AT_LEAST: Duration = Duration::from_secs(30);

/// Who may take over a resource whose home is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taker {
    /// Only its first taker ([`first_taker`]); another node sends the request there.
    First,
    /// Any node able to (its first taker had its time: [`GoneHomes::others_may_take`]).
    Any,
}

/// The node that takes over first what is keyed `key` (a SQL server's gone home, so that a
/// node's servers stay together; a disk family, so that families spread), among
/// `candidates`, the running nodes able to take it over: the one with the highest weight for
/// the key. Every node seeing the same candidates names the same one, whatever their order;
/// `None` when there is none.
pub fn first_taker<'a>(
    key: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .max_by_key(|node| (weight(node, key), *node))
}

/// A node's weight for a key: 64-bit FNV-1a of the node's name, a 0xff byte (in neither:
/// names and keys are text) and the key, finished with SplitMix64's mixer so that close
/// names and keys spread. Fixed here rather than `std`'s hasher, which may change between
/// releases: nodes of two builds during an upgrade must agree.
fn weight(node: &str, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([0xff]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// What the sweep remembers between its passes: when this node first saw each absent home
/// absent, and the failed tries of each resource it tried to take over.
#[derive(Debug)]
pub struct GoneHomes {
    /// How long a home must have been seen absent before its resources are taken over.
    grace: Duration,
    /// Each home this node sees absent, by node name; forgotten once it is back.
    absent: HashMap<String, Absence>,
    /// Failed tries, by resource id.
    tries: HashMap<String, Tries>,
}

/// A home this node sees absent.
#[derive(Debug)]
struct Absence {
    /// When this node first saw it absent.
    since: Instant,
    /// How many resources it was home to at the last pass.
    left: usize,
    /// When that number last went down (its first taker is at work).
    moved: Instant,
}

/// The failed tries of one resource's takeover.
#[derive(Debug)]
struct Tries {
    /// Failures in a row.
    failures: u32,
    /// No try before.
    next: Instant,
    /// When a failure was last logged at warn.
    said: Option<Instant>,
}

/// How a failed try is logged.
#[derive(Debug, PartialEq, Eq)]
pub enum Say {
    /// At debug: a loser of a race for the takeover's lease looks like this the first time.
    Debug,
    /// At warn.
    Warn,
    /// Not at all: logged recently enough.
    Nothing,
}

impl GoneHomes {
    /// Nothing seen yet; a home is gone once seen absent for `grace`.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            absent: HashMap::new(),
            tries: HashMap::new(),
        }
    }

    /// The time between two passes: the grace, within [`PASS_BOUNDS`].
    pub fn every(&self) -> Duration {
        self.grace.clamp(PASS_BOUNDS.0, PASS_BOUNDS.1)
    }

    /// Notes which of `homes` (each resource's home: a home appears once per resource it
    /// holds) are absent from `live` at `now`; returns those seen absent for the grace. Homes
    /// back, or no longer anyone's, are forgotten.
    pub fn observe<'a>(
        &mut self,
        homes: impl Iterator<Item = &'a str>,
        live: &HashSet<String>,
        now: Instant,
    ) -> HashSet<String> {
        let mut left: HashMap<&str, usize> = HashMap::new();
        for home in homes.filter(|h| !live.contains(*h)) {
            *left.entry(home).or_default() += 1;
        }
        self.absent
            .retain(|home, _| left.contains_key(home.as_str()));
        for (home, left) in left {
            let a = self.absent.entry(home.to_string()).or_insert(Absence {
                since: now,
                left,
                moved: now,
            });
            if left < a.left {
                a.moved = now;
            }
            a.left = left;
        }
        self.absent
            .iter()
            .filter(|(_, a)| now.duration_since(a.since) >= self.grace)
            .map(|(home, _)| home.clone())
            .collect()
    }

    /// Who may take over, at `now`, the resources of `home` (seen gone by
    /// [`GoneHomes::observe`]): its first taker alone from the grace on, until it has let
    /// the grace (at least [`OTHERS_WAIT_AT_LEAST`]) pass without taking any of them (their
    /// number did not go down); then any node. A first taker at work on many resources keeps
    /// them: a lost node's SQL servers stay together however long they take.
    pub fn others_may_take(&self, home: &str, now: Instant) -> Taker {
        let wait = self.grace.max(OTHERS_WAIT_AT_LEAST);
        match self.absent.get(home) {
            Some(a) if now.duration_since((a.since + self.grace).max(a.moved)) >= wait => {
                Taker::Any
            }
            _ => Taker::First,
        }
    }

    /// Notes that one of `home`'s resources is being taken over at `now` (its first taker is
    /// at work on it, however long it takes): the others keep waiting.
    pub fn progressing(&mut self, home: &str, now: Instant) {
        if let Some(a) = self.absent.get_mut(home) {
            a.moved = now;
        }
    }

    /// Forgets the tries of every resource but `ids` (taken over, deleted, home back).
    pub fn keep_tries_of(&mut self, ids: impl Iterator<Item = String>) {
        let keep: HashSet<String> = ids.collect();
        self.tries.retain(|id, _| keep.contains(id));
    }

    /// Forgets everything (this node cannot take anything over now).
    pub fn forget_all(&mut self) {
        self.absent.clear();
        self.tries.clear();
    }

    /// Whether resource `id` may be tried at `now`.
    pub fn due(&self, id: &str, now: Instant) -> bool {
        self.tries.get(id).is_none_or(|t| now >= t.next)
    }

    /// Forgets the failed tries of `id` (taken over, or found served by a running node).
    pub fn succeeded(&mut self, id: &str) {
        self.tries.remove(id);
    }

    /// Notes a failed try of `id` at `now`, and says how to log it: a 503 (the lease lost to
    /// another node, or a resource waiting for its home) at debug the first time and then at
    /// warn once per [`WAITING_SAID_EVERY`]; any other failure at warn once per
    /// [`FAILURE_SAID_EVERY`].
    pub fn failed(&mut self, id: &str, e: &KvError, now: Instant) -> Say {
        let tries = self.tries.entry(id.to_string()).or_insert(Tries {
            failures: 0,
            next: now,
            said: None,
        });
        tries.failures = tries.failures.saturating_add(1);
        let wait = RETRY_FIRST.saturating_mul(1 << (tries.failures - 1).min(10));
        tries.next = now + wait.min(RETRY_MAX);
        let (first, every) = match e.code {
            ErrorCode::ServiceUnavailable => (Say::Debug, WAITING_SAID_EVERY),
            _ => (Say::Warn, FAILURE_SAID_EVERY),
        };
        if tries.failures == 1 && first == Say::Debug {
            return Say::Debug;
        }
        if tries.said.is_some_and(|at| now.duration_since(at) < every) {
            return Say::Nothing;
        }
        tries.said = Some(now);
        Say::Warn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(names: &[&str]) -> HashSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_home_is_gone_once_seen_absent_for_the_grace_and_forgotten_when_back() {
        let mut gone = GoneHomes::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let homes = ["a", "b", "a"];
        assert!(
            gone.observe(homes.into_iter(), &live(&["b"]), t0)
                .is_empty()
        );
        let t1 = t0 + Duration::from_secs(29);
        assert!(
            gone.observe(homes.into_iter(), &live(&["b"]), t1)
                .is_empty()
        );
        let t2 = t0 + Duration::from_secs(30);
        assert_eq!(
            gone.observe(homes.into_iter(), &live(&["b"]), t2),
            live(&["a"])
        );
        // Back (a quick restart): its clock starts again when it is next absent.
        assert!(
            gone.observe(homes.into_iter(), &live(&["a", "b"]), t2)
                .is_empty()
        );
        let t3 = t2 + Duration::from_secs(5);
        assert!(
            gone.observe(homes.into_iter(), &live(&["b"]), t3)
                .is_empty()
        );
        assert_eq!(
            gone.observe(
                homes.into_iter(),
                &live(&["b"]),
                t3 + Duration::from_secs(30)
            ),
            live(&["a"])
        );
        // No longer anyone's home: forgotten.
        gone.observe(["b"].into_iter(), &live(&[]), t3);
        assert_eq!(gone.absent.len(), 1);
    }

    #[test]
    fn the_first_taker_is_the_same_whatever_the_order_and_moves_only_what_it_must() {
        let nodes = ["n1", "n2", "n3", "n4"];
        let keys: Vec<String> = (0..400).map(|i| format!("family-{i}")).collect();
        let mut won = HashMap::new();
        for k in &keys {
            let t = first_taker(k, nodes).unwrap();
            let mut reversed = nodes;
            reversed.reverse();
            assert_eq!(first_taker(k, reversed), Some(t));
            *won.entry(t).or_insert(0) += 1;
        }
        // Spread: each of four nodes wins about a quarter (100 of 400; 60 is far out).
        for n in nodes {
            assert!(won[n] > 60, "{n} won {} of 400: {won:?}", won[n]);
        }
        // n4 leaves: only the keys it won move, and they spread over the others.
        let mut moved = HashMap::new();
        for k in &keys {
            let before = first_taker(k, nodes).unwrap();
            let after = first_taker(k, nodes[..3].iter().copied()).unwrap();
            if before != "n4" {
                assert_eq!(after, before);
            } else {
                *moved.entry(after).or_insert(0) += 1;
            }
        }
        assert_eq!(moved.len(), 3, "{moved:?}");
        assert_eq!(first_taker("k", std::iter::empty()), None);
        assert_eq!(first_taker("k", ["only"]), Some("only"));
        // Fixed across builds (an upgrade's nodes must agree): a known value.
        assert_eq!(weight("node-a", "key"), 0xd7d1_8edc_f8a1_594e);
        assert_ne!(weight("node-a", "key"), weight("node-a", "kez"));
        assert_ne!(weight("node-ak", "ey"), weight("node-a", "key"));
    }

    #[test]
    fn others_take_over_once_the_first_taker_had_its_time() {
        let t0 = Instant::now();
        // (grace, seconds after the home was first seen absent, who may take over): with a
        // grace of 2 s the first taker alone until 2 + 30 s; with 60 s, twice the grace.
        let cases = [
            (2, 2, Taker::First),
            (2, 31, Taker::First),
            (2, 32, Taker::Any),
            (60, 119, Taker::First),
            (60, 120, Taker::Any),
        ];
        for (grace, after, who) in cases {
            let mut gone = GoneHomes::new(Duration::from_secs(grace));
            gone.observe(["a"].into_iter(), &live(&["b"]), t0);
            let at = t0 + Duration::from_secs(after);
            assert_eq!(
                gone.others_may_take("a", at),
                who,
                "grace {grace}, {after} s"
            );
            // A home never seen absent: its first taker only.
            assert_eq!(gone.others_may_take("x", at), Taker::First);
        }
        // A first taker at work (the home's resources going down) keeps the others waiting.
        let mut gone = GoneHomes::new(Duration::from_secs(2));
        let secs = |n| t0 + Duration::from_secs(n);
        gone.observe(["a", "a", "a"].into_iter(), &live(&[]), t0);
        gone.observe(["a", "a"].into_iter(), &live(&[]), secs(20));
        assert_eq!(gone.others_may_take("a", secs(49)), Taker::First);
        gone.observe(["a", "a"].into_iter(), &live(&[]), secs(49));
        assert_eq!(gone.others_may_take("a", secs(50)), Taker::Any);
        // A count going up (a resource made there meanwhile) is no progress.
        gone.observe(["a", "a", "a"].into_iter(), &live(&[]), secs(51));
        assert_eq!(gone.others_may_take("a", secs(51)), Taker::Any);
        gone.observe(["a"].into_iter(), &live(&[]), secs(52));
        assert_eq!(gone.others_may_take("a", secs(81)), Taker::First);
        assert_eq!(gone.others_may_take("a", secs(82)), Taker::Any);
        // A takeover under way counts as progress.
        gone.progressing("a", secs(90));
        assert_eq!(gone.others_may_take("a", secs(119)), Taker::First);
        assert_eq!(gone.others_may_take("a", secs(120)), Taker::Any);
    }

    #[test]
    fn passes_come_every_grace_within_bounds() {
        assert_eq!(GoneHomes::new(Duration::ZERO).every(), PASS_BOUNDS.0);
        assert_eq!(
            GoneHomes::new(Duration::from_secs(2)).every(),
            Duration::from_secs(2)
        );
        assert_eq!(
            GoneHomes::new(Duration::from_secs(30)).every(),
            PASS_BOUNDS.1
        );
    }

    #[test]
    fn failures_back_off_and_are_said_rarely() {
        let mut gone = GoneHomes::new(Duration::from_secs(30));
        let waiting = KvError::new(ErrorCode::ServiceUnavailable, "waits for its home");
        let t0 = Instant::now();
        assert!(gone.due("s", t0));
        // A lost race for the lease: debug, and tried again later.
        assert_eq!(gone.failed("s", &waiting, t0), Say::Debug);
        assert!(!gone.due("s", t0 + RETRY_FIRST - Duration::from_secs(1)));
        assert!(gone.due("s", t0 + RETRY_FIRST));
        // Still failing: warn once, then quiet for a long while, with longer waits.
        let t1 = t0 + RETRY_FIRST;
        assert_eq!(gone.failed("s", &waiting, t1), Say::Warn);
        assert!(!gone.due("s", t1 + RETRY_FIRST));
        assert!(gone.due("s", t1 + RETRY_FIRST * 2));
        assert_eq!(
            gone.failed("s", &waiting, t1 + RETRY_FIRST * 2),
            Say::Nothing
        );
        assert_eq!(
            gone.failed("s", &waiting, t1 + WAITING_SAID_EVERY),
            Say::Warn
        );
        // The waits grow up to a bound.
        for i in 0..20 {
            gone.failed("s", &waiting, t1 + RETRY_MAX * i);
            assert!(gone.tries["s"].next <= t1 + RETRY_MAX * (i + 1));
        }
        assert_eq!(gone.tries["s"].next, t1 + RETRY_MAX * 20);
        // Any other failure: warn at once, then every few minutes.
        let broken = KvError::new(ErrorCode::InternalError, "broken");
        assert_eq!(gone.failed("x", &broken, t0), Say::Warn);
        assert_eq!(
            gone.failed("x", &broken, t0 + Duration::from_secs(60)),
            Say::Nothing
        );
        assert_eq!(
            gone.failed("x", &broken, t0 + FAILURE_SAID_EVERY),
            Say::Warn
        );
        // Taken over, or no longer a candidate: forgotten.
        gone.succeeded("x");
        assert!(gone.due("x", t0));
        gone.keep_tries_of(std::iter::empty());
        assert!(gone.tries.is_empty());
    }
}

//! The cache of a resource's unwrapped data key: used for a bounded lifetime, after which the
//! key vault is asked again (so a revoked key stops the resource within one lifetime), and
//! zeroized when it is replaced, evicted or dropped.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Dek;

/// One resource's cached data key.
#[derive(Default)]
pub struct DekSlot(Mutex<Option<Cached>>);

struct Cached {
    dek: Dek,
    at: Instant,
    kek_id: String,
}

impl std::fmt::Debug for DekSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DekSlot(..)")
    }
}

impl DekSlot {
    /// The cached data key, the id of the key encryption key it was last checked against,
    /// and when the key vault was last asked — if that was less than `lifetime` ago. An
    /// older one is evicted (and zeroized).
    pub fn get(&self, lifetime: Duration) -> Option<(Dek, String, Instant)> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|c| c.at.elapsed() >= lifetime) {
            *slot = None;
        }
        slot.as_ref()
            .map(|c| (c.dek.clone(), c.kek_id.clone(), c.at))
    }

    /// Caches `dek`, checked against `kek_id` at `at`.
    pub fn put(&self, dek: Dek, kek_id: String, at: Instant) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Cached { dek, at, kek_id });
    }

    /// Forgets the cached key.
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_key_is_served_for_its_lifetime_only() {
        let slot = DekSlot::default();
        assert!(slot.get(Duration::from_secs(60)).is_none());
        let at = Instant::now();
        slot.put(Dek::new([7; 32]), "pmk".into(), at);
        let (dek, kek, when) = slot.get(Duration::from_secs(60)).unwrap();
        assert_eq!((*dek, kek.as_str(), when), ([7; 32], "pmk", at));
        // A zero lifetime has always run out: the key is evicted, not served.
        assert!(slot.get(Duration::ZERO).is_none());
        assert!(slot.get(Duration::from_secs(60)).is_none());
        slot.put(Dek::new([8; 32]), "pmk".into(), at);
        slot.clear();
        assert!(slot.get(Duration::from_secs(60)).is_none());
    }
}

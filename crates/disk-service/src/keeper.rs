//! The key's life for disks, checked on the platform clock for every disk encryption set:
//!
//! - **Rotation (DK-6).** With `rotationToLatestKeyVersionEnabled`, a set whose key has a newer
//!   version moves to it: every disk of the set gets its data key wrapped under the new version
//!   (one record per disk, while disks stay open), `previousKeys` names the old version while
//!   that runs, then `activeKey.keyUrl` and `lastKeyRotationTimestamp` say it is done. A
//!   failure (the identity lost a permission, say) lands in `autoKeyRotationError`.
//! - **Revocation (DK-5).** The set's key is used as the disks use it: a disk's data key is
//!   unwrapped with the set's identity. When that fails definitely (key disabled or deleted,
//!   permission removed, identity gone), the disk enters a grace period; when it is over, every
//!   I/O of its open connections fails with EIO (the reason in NBD's error message), new
//!   connections and new access are refused naming the key, and once no disk of the family
//!   can use the data key, the store drops it; each step is logged in the set's and the disk's
//!   activity logs. When the key is usable again, the same accesses and connections work again
//!   with nothing lost. A key vault that cannot
//!   be reached (transient) changes nothing. An expired key stops nothing (as Azure).

use std::sync::Arc;
use std::time::Duration;

use kagi_cmk::{Resolved, VersionInUse};
use kagi_core::time::rfc3339;
use serde_json::{Value, json};

use crate::des::SetKey;
use crate::runtime::KeyState;
use crate::{DES_TYPE, DiskService};

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeeperReport {
    /// Sets moved to a newer key version.
    pub rotated: u64,
    /// Disks whose data key was wrapped under a newer version.
    pub rewrapped: u64,
    /// Disks that entered a grace period.
    pub failing: u64,
    /// Disks whose key was revoked after the grace period.
    pub revoked: u64,
    /// Disks that came back.
    pub restored: u64,
}

/// Runs [`DiskService::keep_keys`] every `keeper_tick` of its configuration (wall time; what
/// is due is decided on the platform clock), and the takeover sweep of families whose home
/// is gone (`crate::homes`).
pub fn spawn_keeper(svc: Arc<DiskService>) {
    // Families whose home is gone are taken over without waiting for a request.
    crate::homes::spawn_takeover_sweep(svc.clone());
    // Expiry on a task of its own: a key vault that hangs the keeper never keeps an expired
    // access's connections alive.
    let sweeper = svc.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(sweeper.config.keeper_tick);
        loop {
            t.tick().await;
            sweeper.expire_accesses().await;
        }
    });
    tokio::spawn(async move {
        let mut t = tokio::time::interval(svc.config.keeper_tick);
        let mut compacted = std::time::Instant::now();
        loop {
            t.tick().await;
            svc.keep_keys().await;
            if compacted.elapsed() >= COMPACTION_INTERVAL {
                compacted = std::time::Instant::now();
                svc.compact().await;
            }
        }
    });
}

/// How often the open families' logs are compacted.
const COMPACTION_INTERVAL: Duration = Duration::from_secs(600);

impl DiskService {
    /// One pass over every set whose check is due (every `key_poll_interval`, or at once
    /// while a disk is in its grace period).
    pub async fn keep_keys(&self) -> KeeperReport {
        let mut report = KeeperReport::default();
        for body in self.host.resources_of_type(DES_TYPE) {
            let body = self.set_view(body).await;
            let Some(set) = SetKey::of(&body) else {
                continue;
            };
            if !self.due(&set.id) {
                continue;
            }
            self.keep_set(&set.id, &mut report).await;
        }
        report
    }

    /// Whether set `id` is due a check now; if so, marks it checked.
    fn due(&self, id: &str) -> bool {
        let now = self.host.now();
        let poll = self.config.key_poll_interval.as_secs() as i64;
        let failing = self.disks_of(id).iter().any(|d| {
            d["id"]
                .as_str()
                .and_then(|i| self.open_disk(i))
                .is_some_and(|rt| matches!(rt.key_state(), KeyState::Failing { .. }))
        });
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        let last = checked.get(&id.to_ascii_lowercase()).copied();
        if failing || last.is_none_or(|t| now - t >= poll) {
            checked.insert(id.to_ascii_lowercase(), now);
            return true;
        }
        false
    }

    async fn keep_set(&self, set_id: &str, report: &mut KeeperReport) {
        // A change of the set (a PUT) and its rotation never interleave.
        let _g = self.lock_id(set_id).await;
        // Read again under the lock: a PUT may have changed it since the pass began.
        let Some(body) = self.host.resource(set_id) else {
            return;
        };
        let body = &self.set_view(body).await;
        let Some(set) = SetKey::of(body) else {
            return;
        };
        let set = &set;
        if set.auto_rotate {
            self.rotate(set, body, report).await;
        }
        // Healing: a resource made or switched into the set while it changed key (or left
        // half-way by a crash) gets its record under the key in force, and only that one.
        let (set, body) = match self.host.resource(&set.id) {
            Some(b) => {
                let b = self.set_view(b).await;
                match SetKey::of(&b) {
                    Some(s) => (s, b),
                    None => return,
                }
            }
            None => return,
        };
        let (set, body) = (&set, &body);
        if let Err(e) = self.rewrap_set(set, body, true).await {
            tracing::warn!(set = %set.id, error = %e, "disks of the set not all under its key yet");
        }
        let now = self.host.now();
        let grace = self.config.revocation_grace.as_secs() as i64;
        for disk in self.disks_of(&set.id) {
            let Some(id) = disk["id"].as_str() else {
                continue;
            };
            // Only open disks hold a data key; others are checked when opened.
            let Some(rt) = self.open_disk(id) else {
                continue;
            };
            match self.open_dek(&disk).await {
                Ok(dek) => {
                    if rt.key_state() != KeyState::Usable {
                        let inner = match crate::keys::disk_keys(self.host.as_ref(), &disk) {
                            Some(k) => k.inner_key().await.ok().flatten(),
                            None => None,
                        };
                        match rt.restore(crate::disks::family_keys(dek, inner)) {
                            Ok(()) => {
                                report.restored += 1;
                                let msg = format!(
                                    "The key '{}' is usable again; the disk is back.",
                                    set.kid
                                );
                                self.activity(&[id, &set.id], "Succeeded", &msg).await;
                            }
                            Err(e) => {
                                tracing::error!(disk = %id, error = %e, "the disk could not be unlocked")
                            }
                        }
                    }
                }
                Err(e) if e.code == kagi_core::ErrorCode::ServiceUnavailable => {
                    tracing::warn!(disk = %id, "the key vault could not be reached: {}", e.message);
                }
                Err(e) => {
                    let state = rt.key_state();
                    if state == KeyState::Usable {
                        rt.failing(now, &e.message);
                        report.failing += 1;
                        let msg = format!(
                            "The disk's key cannot be used: {} The disk stops after the grace period ({} s) unless the key is usable again.",
                            e.message, grace
                        );
                        self.activity(&[id, &set.id], "Failed", &msg).await;
                    }
                    if let KeyState::Failing { since, reason } = rt.key_state()
                        && now - since >= grace
                    {
                        rt.revoke(&reason);
                        self.forget_key_if_unused(&rt).await;
                        report.revoked += 1;
                        let msg = format!(
                            "The disk's key has been unusable since {}: I/O fails and new access is refused until the key is usable again. {reason}",
                            rfc3339(since)
                        );
                        self.activity(&[id, &set.id], "Failed", &msg).await;
                    }
                }
            }
        }
    }

    /// Compacts the log of every open family whose segments are at least half garbage
    /// (overwritten blocks, deleted disks and snapshots).
    pub async fn compact(&self) {
        let mut families: Vec<kagi_disk::Family> = Vec::new();
        for rt in self.open.lock().unwrap_or_else(|p| p.into_inner()).values() {
            if !rt.family.is_locked() && !families.iter().any(|f| f.id() == rt.family.id()) {
                families.push(rt.family.clone());
            }
        }
        for f in families {
            let id = f.id().to_string();
            match tokio::task::spawn_blocking(move || f.gc(0.5)).await {
                Ok(Ok(r)) if r.segments_deleted > 0 => {
                    tracing::info!(family = %id, freed = r.bytes_freed, "disk log compacted")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(family = %id, error = %e, "compaction failed"),
                Err(e) => tracing::warn!(family = %id, error = %e, "compaction stopped"),
            }
        }
    }

    /// Drops the data key of `rt`'s family (zeroized in the store) once no open disk of the
    /// family can use it: a family shared with disks under another, usable key keeps it.
    async fn forget_key_if_unused(&self, rt: &crate::runtime::DiskRuntime) {
        let family = rt.family.id().to_string();
        let all_revoked = {
            let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.values()
                .filter(|o| o.family.id() == family)
                .all(|o| o.revoked())
        };
        if all_revoked {
            // Flushes first: on a blocking thread, not under the map's lock.
            let family = rt.family.clone();
            let _ = tokio::task::spawn_blocking(move || family.lock()).await;
        }
    }

    /// Moves `set` to its key's newest version, when there is one.
    async fn rotate(&self, set: &SetKey, body: &Value, report: &mut KeeperReport) {
        let p = self.host.as_ref();
        let error = async |msg: String| {
            tracing::warn!(set = %set.id, "automatic key rotation failed: {msg}");
            if let Err(e) = self.note_rotation(&set.id, None, None, Some(&msg)).await {
                tracing::error!(set = %set.id, error = %e, "rotation state not recorded");
            }
        };
        let token = match p.identity_token(&set.id, set.user_assigned.as_deref()) {
            Ok(t) => t,
            Err(e) => return error(e.message).await,
        };
        let Ok(key) = self.keys.parse(&set.kid) else {
            return;
        };
        let Ok(versionless) = self.keys.parse(&key.versionless()) else {
            return;
        };
        let in_use = VersionInUse {
            kid: Some(set.kid.clone()),
            resolved_at: 0,
        };
        let newest = self
            .keys
            .resolve_version(&versionless, &token, &in_use, Duration::ZERO, p.now())
            .await;
        let kid = match newest {
            Ok(Resolved::Fresh { kid, changed: true }) => kid,
            Ok(_) => return,
            Err(f) => return error(f.reason()).await,
        };
        if let Err(e) = self
            .note_rotation(&set.id, None, Some(&set.kid), None)
            .await
        {
            return error(e.message).await;
        }
        let next = SetKey {
            kid: kid.clone(),
            ..set.clone()
        };
        // Added under the new version first, then the set names it, then the old records go:
        // at every moment some record the set's key opens exists.
        match self.rewrap_set(&next, body, false).await {
            Ok(added) => {
                report.rotated += 1;
                report.rewrapped += added;
                if let Err(e) = self.note_rotation(&set.id, Some(&kid), None, None).await {
                    return error(e.message).await;
                }
                if let Err(e) = self.rewrap_set(&next, body, true).await {
                    tracing::warn!(set = %set.id, error = %e, "older records not retired yet");
                }
                let msg = format!(
                    "Rotated from '{}' to '{kid}': {added} disk(s) re-wrapped.",
                    set.kid
                );
                self.activity(&[&set.id], "Succeeded", &msg).await;
            }
            Err(e) => {
                if let Err(e2) = self
                    .note_rotation(&set.id, None, Some(&set.kid), Some(&e.message))
                    .await
                {
                    tracing::error!(set = %set.id, error = %e2, "rotation state not recorded");
                }
            }
        }
    }

    /// An entry in the activity logs of `ids`.
    async fn activity(&self, ids: &[&str], status: &str, message: &str) {
        let p = self.host.as_ref();
        for id in ids {
            let entry = json!({
                "eventTimestamp": rfc3339(p.now()),
                "operationName": "Microsoft.Compute/diskEncryptionSets/keyCheck",
                "status": status,
                "resourceId": id,
                "caller": "Microsoft.Compute",
                "message": message,
            });
            if let Err(e) = p.append_activity(id, &entry).await {
                tracing::error!(resource = %id, error = %e, "activity log not written");
            }
        }
    }
}

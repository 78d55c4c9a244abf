//! Following a store that other kagi nodes write to (docs/SEVERAL_NODES.md).
//!
//! A node serves vaults and the directory from memory. When several nodes share a PostgreSQL
//! store, each write stamps its scope in the store's change feed (`kagi_store::changes`); this
//! module reloads a scope on a notification of it, and re-checks every scope's stamp
//! periodically, which covers notifications lost across a reconnect and a hot standby (which
//! has none). A scope is reloaded whole from the store: a vault (record, keys, secrets) under
//! the vault's write lock, so a local write is never undone by an older read.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kagi_core::VaultName;
use kagi_store::StoreError;
use kagi_store::changes::{DIRECTORY_SCOPE, VAULT_SCOPE_PREFIX};

use crate::Platform;
use crate::state::{Entry, KeyEntry, VaultState, VersionEntry};

/// How often a node re-checks every scope's stamp when no notification arrives.
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(1);

impl Platform {
    /// Follows the store's change feed until the process ends: spawn it once, on a node whose
    /// store other nodes share. Does nothing on a store that has no feed (SQLite).
    pub async fn follow_changes(self: Arc<Self>, recheck: Duration) {
        let mut seen: HashMap<String, i64> = match self.store.change_marks().await {
            Ok(marks) => marks.into_iter().collect(),
            Err(e) => {
                tracing::error!(error = %e, "change feed: cannot read the stamps; re-checking");
                HashMap::new()
            }
        };
        // What changed between this node's load and the first read of the stamps is not
        // known: reload everything once.
        let mut pending: BTreeSet<String> = seen.keys().cloned().collect();
        pending.insert(DIRECTORY_SCOPE.to_string());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<String>>(1024);
        tokio::spawn(watch(self.clone(), tx));
        let mut ticker = tokio::time::interval(recheck.max(Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut recheck_now = false;
            tokio::select! {
                note = rx.recv() => match note {
                    Some(Some(scope)) => {
                        pending.insert(scope);
                    }
                    // Notifications may have been lost (or the watch ended): look at every stamp.
                    Some(None) | None => recheck_now = true,
                },
                _ = ticker.tick() => recheck_now = true,
            }
            // Everything already queued is handled in this round, once per scope.
            while let Ok(note) = rx.try_recv() {
                match note {
                    Some(scope) => {
                        pending.insert(scope);
                    }
                    None => recheck_now = true,
                }
            }
            // Read the stamps before reloading notified scopes too: a scope reloaded now is
            // then not reloaded a second time by the next re-check (its stamp is already
            // seen), and a change after this read still shows as a newer stamp.
            if recheck_now || !pending.is_empty() {
                match self.store.change_marks().await {
                    Ok(marks) => {
                        for (scope, seq) in marks {
                            if seen.get(&scope) != Some(&seq) {
                                pending.insert(scope.clone());
                                seen.insert(scope, seq);
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "change feed: re-check failed"),
                }
            }
            let scopes = std::mem::take(&mut pending);
            for scope in scopes {
                match self.reload_scope(&scope).await {
                    Ok(true) => {}
                    // Not done (a local change kept racing it, or the store failed): again
                    // next round.
                    Ok(false) => {
                        pending.insert(scope);
                    }
                    Err(e) => {
                        tracing::warn!(scope, error = %e, "change feed: reload failed");
                        pending.insert(scope);
                    }
                }
            }
        }
    }

    /// Makes every request first catch up with the changes other nodes made to the store
    /// (`kagi server --consistency strict`): a change is then served by every node's next
    /// request, at the price of one store query per request. Off, a change reaches the other
    /// nodes within a notification (or the re-check interval).
    pub fn set_strict_reads(&self, on: bool) {
        self.strict_reads
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// Before serving a request (of vault `vault`, or of the management plane when `None`):
    /// reloads what changed in the store since memory last took it in, when
    /// [`Self::set_strict_reads`] is on. A store failure is logged and the request served
    /// from memory.
    pub async fn catch_up(&self, vault: Option<&str>) {
        if !self.strict_reads.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let marks = match vault {
            Some(v) => self.store.change_marks_for(v).await,
            None => self.store.change_marks().await,
        };
        let marks = match marks {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the change feed; serving from memory");
                return;
            }
        };
        for (scope, seq) in marks {
            let behind = self
                .applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&scope)
                .is_none_or(|applied| *applied < seq);
            if behind && let Err(e) = self.reload_scope(&scope).await {
                tracing::warn!(scope, error = %e, "catching up failed; serving from memory");
            }
        }
    }

    /// Records that memory reflects `scope` up to change `seq` (never moving backwards).
    fn note_applied(&self, scope: &str, seq: i64) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let entry = applied.entry(scope.to_string()).or_insert(seq);
        *entry = (*entry).max(seq);
    }

    /// The change number of `scope` now (read before a reload: what is loaded after it is at
    /// least that new).
    async fn current_mark(&self, scope: &str) -> Result<Option<i64>, StoreError> {
        let vault = scope.strip_prefix(VAULT_SCOPE_PREFIX).unwrap_or("");
        Ok(self
            .store
            .change_marks_for(vault)
            .await?
            .into_iter()
            .find(|(s, _)| s == scope)
            .map(|(_, seq)| seq))
    }

    /// Reloads one scope of the change feed; `false` when it must be tried again.
    async fn reload_scope(&self, scope: &str) -> Result<bool, StoreError> {
        let mark = self.current_mark(scope).await?;
        let done = self.reload_scope_now(scope).await?;
        if let (true, Some(seq)) = (done, mark) {
            self.note_applied(scope, seq);
        }
        Ok(done)
    }

    async fn reload_scope_now(&self, scope: &str) -> Result<bool, StoreError> {
        if scope == DIRECTORY_SCOPE {
            return self.directory.reload().await;
        }
        if let Some(name) = scope.strip_prefix(VAULT_SCOPE_PREFIX) {
            // A name that does not parse was not written by kagi: nothing of ours to reload.
            let Ok(name) = VaultName::parse(name) else {
                return Ok(true);
            };
            return self.reload_vault(&name).await;
        }
        // Scopes this node keeps nothing of in memory.
        Ok(true)
    }

    /// Makes the in-memory vault `name` the store's: reloaded in place (under its write lock),
    /// added when another node created it, removed when another node purged it.
    /// `false` when it must be tried again.
    pub(crate) async fn reload_vault(&self, name: &VaultName) -> Result<bool, StoreError> {
        let existing = self.vault_state(name);
        let _write = match &existing {
            Some(state) => Some(state.write.lock().await),
            None => None,
        };
        let record = self.store.get_vault(name).await?;
        let Some(record) = record else {
            if existing.is_some() {
                self.vaults_write().remove(name);
            }
            return Ok(true);
        };
        let keys = self.store.load_keys(name).await?;
        let secrets = self.store.load_secrets(name).await?;
        match existing.as_deref() {
            Some(state) => state.replace_contents(record, keys, secrets),
            None => {
                // A create in progress on this node puts the vault in the map itself.
                let creating = self.vault_creates.lock().unwrap_or_else(|p| p.into_inner());
                if creating.contains(name) {
                    // Its create here will fail (the name is taken): look again after it.
                    return Ok(false);
                }
                self.vaults_write().entry(name.clone()).or_insert_with(|| {
                    Arc::new(VaultState::new(record, keys).with_secrets(secrets))
                });
            }
        }
        Ok(true)
    }
}

/// Feeds the follower: each notified scope, `None` when notifications may have been lost.
async fn watch(platform: Arc<Platform>, tx: tokio::sync::mpsc::Sender<Option<String>>) {
    let mut watch = loop {
        match platform.store.watch_changes().await {
            Ok(Some(w)) => break w,
            // No notifications here (SQLite, a standby): the periodic re-check does it all.
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "change feed: cannot listen; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    loop {
        let note = match watch.next().await {
            Ok(note) => note,
            Err(e) => {
                tracing::warn!(error = %e, "change feed: notifications interrupted");
                tokio::time::sleep(Duration::from_millis(200)).await;
                None
            }
        };
        if tx.send(note).await.is_err() {
            return;
        }
    }
}

impl VaultState {
    /// Whether the vault, or any of its keys or secrets, is due to be purged at `now`.
    pub(crate) fn has_purge_due(&self, now: i64) -> bool {
        let due = |t: Option<i64>| t.is_some_and(|t| t <= now);
        due(self.record().purge_at)
            || self.keys().values().any(|e| due(e.purge_at))
            || crate::state::read(&self.secrets)
                .values()
                .any(|e| due(e.purge_at))
    }

    /// Replaces the record, keys and secrets with the store's, keeping each key version whose
    /// stored form did not change (and with it the private key it already opened).
    pub(crate) fn replace_contents(
        &self,
        record: kagi_store::VaultRecord,
        keys: Vec<kagi_store::KeyRecord>,
        secrets: Vec<kagi_store::SecretRecord>,
    ) {
        let mut fresh: crate::state::ObjectMap<VersionEntry> = Default::default();
        {
            let old = self.keys();
            for k in keys {
                let folded = k.name.folded();
                let previous = old.get(&folded);
                let versions = k
                    .versions
                    .into_iter()
                    .map(|v| {
                        previous
                            .and_then(|p| p.versions.iter().find(|e| e.version == v.version))
                            .filter(|e| {
                                e.seq == v.seq
                                    && e.info == v.info
                                    && e.sealed_private == v.sealed_private
                            })
                            .cloned()
                            .unwrap_or_else(|| Arc::new(VersionEntry::new(v)))
                    })
                    .collect();
                let entry: KeyEntry = Entry {
                    name: k.name,
                    deleted_at: k.deleted_at,
                    purge_at: k.purge_at,
                    versions,
                };
                fresh.insert(folded, entry);
            }
        }
        self.set_record(record);
        *self.keys_mut() = fresh;
        *crate::state::write(&self.secrets) = secrets
            .into_iter()
            .map(|s| (s.name.folded(), Entry::from_record(s)))
            .collect();
    }
}

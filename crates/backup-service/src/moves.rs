//! Moving a backup vault to another resource group or subscription (MISSION BK-9).
//!
//! A vault encrypted with a customer-managed key never moves: the move and its validation are
//! refused with `UserErrorCMKEncryptedVaultMoveNotSupported` (Azure Backup: "moving CMK
//! encrypted Recovery Services vault across Resource Groups and Subscriptions isn't
//! supported"). Also refused: a vault with registered backup agents (their machines address it
//! by its id), and a vault with jobs in progress.
//!
//! A vault with the platform key moves whole: its ARM resource, its managed identities and
//! workload bindings, its records (state, activity log, jobs, agent registry: service documents
//! re-keyed to the new id) — one store transaction, `kagi_vault` `move_service_resource` — and
//! the folder of its blobs `<data>/backup/{sub}/{rg}/{name}` (one `rename`; there may be none,
//! for a vault that never stored a blob). The two cannot be one atomic step, so a journal makes
//! the pair crash-safe:
//!
//! 1. under the vault's lock, with new jobs refused and none running, the platform key's
//!    binding is fixed in the state (`pmkBinding`: the key and its entries stay bound to the id
//!    the vault was created with, so nothing needs re-wrapping);
//! 2. `<data>/backup-moves/{uuid}.json` names the old and new id and folder (fsynced);
//! 3. the store transaction moves the resource — the commit point;
//! 4. the folder is renamed (and both parents fsynced), then the journal is removed.
//!
//! At start ([`crate::install`]), each journal left behind is finished: when the store has the
//! vault at its new id, the folder is renamed if it was not yet (the old folder exists and the
//! new one does not); otherwise the move never happened and the journal is dropped. A crash
//! therefore leaves the vault in one place, with its records and its folder.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kagi_core::{ErrorCode, KvError};
use kagi_vault::{Platform, Principal};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::state::{AGENT_REGISTRY, JOB, VaultState, io, vault_dir, write_atomic};
use crate::vaults::{CmkConfig, activity_entry};
use crate::{BackupService, VAULT_TYPE};

/// Folders of vaults being moved now (process-wide: the paths are those of one data directory).
static MOVING: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn moving() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    MOVING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the vault with this folder is being moved (requests that would start work on it
/// are refused meanwhile).
pub(crate) fn is_moving(dir: &Path) -> bool {
    moving().contains(dir)
}

/// Marks a folder as moving for as long as it lives.
struct MovingMark(PathBuf);

impl MovingMark {
    fn new(dir: &Path) -> Result<Self, KvError> {
        if !moving().insert(dir.to_path_buf()) {
            return Err(KvError::conflict(
                "The backup vault is already being moved; retry when that move has completed.",
            )
            .with_inner("UserErrorBackupVaultResourceMoveInProgress"));
        }
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for MovingMark {
    fn drop(&mut self) {
        moving().remove(&self.0);
    }
}

/// A move between its commit and the rename of the folder.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Journal {
    from_id: String,
    to_id: String,
    from_dir: PathBuf,
    to_dir: PathBuf,
}

fn journal_dir(data: &Path) -> PathBuf {
    data.join("backup-moves")
}

fn bad(inner: &'static str, message: String) -> KvError {
    KvError::new(ErrorCode::BadRequest, message).with_inner(inner)
}

/// `/subscriptions/{s}/resourceGroups/{g}/providers/Microsoft.RecoveryServices/vaults/{n}`
/// → (s, g, n).
pub(crate) fn parse_vault_id(id: &str) -> Result<(String, String, String), KvError> {
    let segs: Vec<&str> = id.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        [
            "subscriptions",
            s,
            "resourceGroups" | "resourcegroups",
            g,
            "providers",
            ns,
            "vaults",
            n,
        ] if ns.eq_ignore_ascii_case("Microsoft.RecoveryServices") => {
            Ok((s.to_string(), g.to_string(), n.to_string()))
        }
        _ => Err(KvError::new(
            ErrorCode::BadRequest,
            format!(
                "'{}' is not a backup vault id.",
                kagi_core::ids::printable(id)
            ),
        )),
    }
}

/// Renames `from` to `to` durably: the new parent is created, and both parents are fsynced so
/// the rename survives power loss. Nothing to do when `from` does not exist (a vault that
/// never stored a blob has no folder).
fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    if !from.exists() {
        return Ok(());
    }
    let to_parent = to
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent"))?;
    std::fs::create_dir_all(to_parent)?;
    std::fs::rename(from, to)?;
    std::fs::File::open(to_parent)?.sync_all()?;
    if let Some(from_parent) = from.parent() {
        std::fs::File::open(from_parent)?.sync_all()?;
    }
    Ok(())
}

/// Whether backup agents are registered to the vault (its agent registry has machines).
async fn has_agents(p: &Platform, vault_id: &str) -> Result<bool, KvError> {
    Ok(p.service_document(vault_id, AGENT_REGISTRY, "")
        .await?
        .is_some_and(|r| r["machines"].as_object().is_some_and(|m| !m.is_empty())))
}

impl BackupService {
    /// Checks (`dry_run`) or performs the move of a backup vault to `target_sub`/`target_rg`.
    /// Returns the vault as it is (or would be) stored after the move.
    pub(crate) async fn move_vault(
        self: &Arc<Self>,
        p: &Arc<Platform>,
        caller: &Principal,
        vault_id: &str,
        target_sub: &str,
        target_rg: &str,
        dry_run: bool,
    ) -> Result<Value, KvError> {
        self.ready(p).await?;
        let (sub, rg, name) = parse_vault_id(vault_id)?;
        let dir = vault_dir(&self.data_dir, &sub, &rg, &name);
        let refusals = async |body: &Value| -> Result<(), KvError> {
            if let Some(c) = CmkConfig::of(body) {
                return Err(bad(
                    "UserErrorCMKEncryptedVaultMoveNotSupported",
                    format!(
                        "The backup vault '{name}' encrypts its backup data with a \
                         customer-managed key ({}); a vault encrypted with a customer-managed key \
                         cannot move to another resource group or subscription. Keep it where it \
                         is, or create a new vault in the target.",
                        c.key_uri
                    ),
                ));
            }
            if has_agents(p, body["id"].as_str().unwrap_or(vault_id)).await? {
                return Err(bad(
                    "UserErrorVaultHasRegisteredAgents",
                    format!(
                        "Backup agents are registered to the backup vault '{name}' and address it \
                         by its id; unregister them before moving the vault."
                    ),
                ));
            }
            Ok(())
        };
        let body = p.get_service_resource(caller, &sub, &rg, VAULT_TYPE, &name)?;
        refusals(&body).await?;
        let planned = p
            .move_service_resource(caller, vault_id, target_sub, target_rg, true)
            .await?;
        if dry_run {
            return Ok(planned);
        }

        let lock = self.vault_lock(&dir.display().to_string());
        let _g = lock.lock().await;
        let _mark = MovingMark::new(&dir)?;
        // Requests that passed the gate just before the mark was set start their job without
        // awaiting; give them the moment they need to show up in the job list.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Under the lock, the vault is as the move will take it.
        let body = p.get_service_resource(caller, &sub, &rg, VAULT_TYPE, &name)?;
        refusals(&body).await?;
        let old_id = body["id"].as_str().unwrap_or(vault_id).to_string();
        self.wait_jobs_quiet(p, &old_id, &name).await?;
        let mut state = VaultState::load(p, &old_id)
            .await?
            .ok_or_else(|| io("move", format!("{old_id} has no state")))?;
        if state.pmk_binding.is_none() {
            state.pmk_binding = Some(old_id.to_ascii_lowercase());
            state.save(p, &old_id).await?;
        }
        let new_id = planned["id"].as_str().unwrap_or_default().to_string();
        let (_, new_rg, _) = parse_vault_id(&new_id)?;
        let new_dir = vault_dir(&self.data_dir, target_sub, &new_rg, &name);
        // Left over from a vault of that id deleted earlier: nothing owns it.
        if new_dir.exists() {
            std::fs::remove_dir_all(&new_dir).map_err(|e| io("move: stale target", e))?;
        }
        let journal = Journal {
            from_id: old_id.clone(),
            to_id: new_id.clone(),
            from_dir: dir.clone(),
            to_dir: new_dir.clone(),
        };
        let jfile = journal_dir(&self.data_dir).join(format!(
            "{}.json",
            kagi_core::ids::uuid_v4(kagi_crypto::random_array().map_err(|e| io("rng", e))?)
        ));
        write_atomic(
            &jfile,
            &serde_json::to_vec(&journal).map_err(|e| io("journal", e))?,
        )?;
        // The commit point: the resource, its identities and its records move together.
        let moved = match p
            .move_service_resource(caller, &old_id, target_sub, target_rg, false)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&jfile);
                return Err(e);
            }
        };
        // After the commit a failure here is finished by the journal at the next start.
        rename_durably(&dir, &new_dir).map_err(|e| io("move: rename vault folder", e))?;
        std::fs::remove_file(&jfile).map_err(|e| io("move: journal", e))?;
        self.forget_runtime(&dir);
        let v = crate::vaults::VaultCtx {
            id: new_id.clone(),
            body: moved.clone(),
            dir: new_dir,
        };
        self.log(
            p,
            &v,
            activity_entry(
                Some(caller),
                &new_id,
                "Microsoft.RecoveryServices/vaults/move/action",
                "Succeeded",
                &format!("Vault moved from {old_id} to {new_id}."),
                p.now(),
            ),
        )
        .await;
        tracing::info!(from = %old_id, to = %new_id, "backup vault moved");
        Ok(moved)
    }

    /// Refuses while a job of the vault runs, and waits (briefly) for jobs that just ended to
    /// finish writing their last state (which they write at the vault's old id).
    async fn wait_jobs_quiet(
        &self,
        p: &Platform,
        vault_id: &str,
        name: &str,
    ) -> Result<(), KvError> {
        let busy = || {
            KvError::conflict(format!(
                "The backup vault '{name}' has jobs in progress; move it when they have ended."
            ))
            .with_inner("UserErrorBackupJobsInProgress")
        };
        for _ in 0..60 {
            if self
                .jobs
                .list(p, vault_id)
                .await?
                .iter()
                .any(|j| j["status"] == "InProgress")
            {
                return Err(busy());
            }
            // The listing rewrote interrupted jobs; what is still InProgress in the store is a
            // job of this process writing its final state.
            let writing = p
                .service_documents(vault_id, JOB)
                .await?
                .iter()
                .any(|(_, j)| j["status"] == "InProgress");
            if !writing {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(busy())
    }

    /// Drops what the service caches under a folder that is gone.
    fn forget_runtime(&self, dir: &Path) {
        let prefix = dir.display().to_string();
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| !Path::new(k).starts_with(dir));
        self.vault_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| *k != prefix);
    }

    /// Finishes the moves a crash interrupted (see the module documentation).
    pub(crate) fn recover_moves(&self, p: &Platform) {
        let Ok(rd) = std::fs::read_dir(journal_dir(&self.data_dir)) else {
            return;
        };
        for e in rd.filter_map(Result::ok) {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Some(j) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Journal>(&b).ok())
            else {
                tracing::error!(journal = %path.display(), "unreadable backup vault move journal left in place");
                continue;
            };
            if p.service_resource(&j.to_id).is_some() {
                // The records moved with the resource; only the folder may be left to rename.
                let done = j.to_dir.exists();
                if !done && j.from_dir.exists() {
                    if let Err(err) = rename_durably(&j.from_dir, &j.to_dir) {
                        tracing::error!(error = %err, from = %j.from_id, to = %j.to_id, "backup vault move not finished");
                        continue;
                    }
                    tracing::warn!(from = %j.from_id, to = %j.to_id, "backup vault move finished after a restart");
                }
            } else {
                tracing::warn!(from = %j.from_id, to = %j.to_id, "backup vault move had not committed; the vault stays where it was");
            }
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::error!(error = %err, journal = %path.display(), "move journal not removed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_ids() {
        let got = parse_vault_id(
            "/subscriptions/S/resourceGroups/G/providers/Microsoft.RecoveryServices/vaults/N",
        )
        .ok();
        assert_eq!(got, Some(("S".into(), "G".into(), "N".into())));
        assert!(
            parse_vault_id(
                "/subscriptions/S/resourceGroups/G/providers/Microsoft.KeyVault/vaults/N"
            )
            .is_err()
        );
        assert!(parse_vault_id("/subscriptions/S").is_err());
    }

    #[test]
    fn moving_marks_are_exclusive_and_released() {
        let dir = PathBuf::from("/nonexistent/kagi-test/moving-mark");
        let first = MovingMark::new(&dir).ok();
        assert!(first.is_some());
        assert!(is_moving(&dir));
        assert!(MovingMark::new(&dir).is_err());
        drop(first);
        assert!(!is_moving(&dir));
    }
}

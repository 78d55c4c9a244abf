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
//! re-keyed to the new id) — one store transaction, `ServiceHost::move_resource` — and
//! the folder of its blobs `<data>/backup/{sub}/{rg}/{name}` (one `rename`; there may be none,
//! for a vault that never stored a blob). The two cannot be one atomic step, so a journal makes
//! the pair crash-safe:
//!
//! 1. under the locks of both the vault's folder and the target's (in path order), with new
//!    jobs refused and none running, and the target re-checked (no resource has the new id, no
//!    unfinished move names its folder; a folder left there is deleted only then), the platform key's
//!    binding is fixed in the state (`pmkBinding`: the key and its entries stay bound to the id
//!    the vault was created with, so nothing needs re-wrapping);
//! 2. `<data>/backup-moves/{uuid}.json` names the old and new id and folder (fsynced);
//! 3. the store transaction moves the resource — the commit point;
//! 4. the folder is renamed (and both parents fsynced), then the journal is removed. After the
//!    commit the move has happened: a rename that fails is answered as a success and retried
//!    from the journal in the background (the vault refuses work meanwhile), and no vault is
//!    created at a folder a journal names.
//!
//! At start ([`BackupService::new`]), each journal left behind is finished: when the store has the
//! vault at its new id, the folder is renamed if it was not yet (the old folder exists and the
//! new one does not); otherwise the move never happened and the journal is dropped. A journal
//! whose folders both exist is kept and reported; one whose folders are both missing, or whose
//! vault is at neither id, is reported and dropped. A crash therefore leaves the vault in one
//! place, with its records and its folder.
//!
//! With the blobs in a shared bucket (`kagi server --blobs s3://…`) a move is refused
//! (`UserErrorBackupVaultMoveNotSupported`): a bucket has no rename, and copying a vault's
//! objects to a new prefix while other nodes serve both ids is not made safe yet.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kagi_core::{ErrorCode, KvError};
use kagi_host::{MoveRequest, Principal, ServiceHost};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::resource::{CmkConfig, VaultCtx, activity_entry, vault_ref};
use crate::state::{AGENT_REGISTRY, JOB, VaultState, io, vault_dir, write_atomic};
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
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    kagi_fs::sync_dir(to_parent)?;
    kagi_fs::sync_parent(from)
}

/// Whether backup agents are registered to the vault (its agent registry has machines).
async fn has_agents(p: &dyn ServiceHost, vault_id: &str) -> Result<bool, KvError> {
    Ok(p.document(vault_id, AGENT_REGISTRY, "")
        .await?
        .is_some_and(|r| r["machines"].as_object().is_some_and(|m| !m.is_empty())))
}

fn jobs_busy(name: &str) -> KvError {
    KvError::conflict(format!(
        "The backup vault '{name}' has jobs in progress; move it when they have ended."
    ))
    .with_inner("UserErrorBackupJobsInProgress")
}

/// Refuses (403 `RequestDisallowedByPolicy`) a move a Deny policy assignment at the target
/// forbids: the vault, as it would be stored at `new_id`, is evaluated as a creation there.
async fn policy_check(p: &dyn ServiceHost, new_id: &str, planned: &Value) -> Result<(), KvError> {
    let mut candidate = planned.clone();
    candidate["type"] = Value::from(VAULT_TYPE);
    match p.policy_deny(new_id, &candidate).await? {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The journals of unfinished moves.
fn journals(data: &Path) -> Vec<(PathBuf, Option<Journal>)> {
    let Ok(rd) = std::fs::read_dir(journal_dir(data)) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|path| path.extension().is_some_and(|x| x == "json"))
        .map(|path| {
            let j = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Journal>(&b).ok());
            (path, j)
        })
        .collect()
}

/// Whether an unfinished move names `dir` (as its old or new folder): the folder belongs to
/// that move's vault, and nothing else may delete it. (An unreadable journal, reported at
/// start, names nothing.)
pub(crate) fn journal_names(data: &Path, dir: &Path) -> bool {
    journals(data).iter().any(|(_, j)| {
        j.as_ref()
            .is_some_and(|j| j.from_dir == dir || j.to_dir == dir)
    })
}

/// Renames the folder a committed move's journal names, then removes the journal. Refuses
/// when both folders exist (the journal is kept).
fn finish_rename(jfile: &Path, j: &Journal) -> std::io::Result<()> {
    if j.from_dir.exists() && j.to_dir.exists() {
        return Err(std::io::Error::other(format!(
            "both {} and {} exist; resolve by hand",
            j.from_dir.display(),
            j.to_dir.display()
        )));
    }
    rename_durably(&j.from_dir, &j.to_dir)?;
    std::fs::remove_file(jfile)
}

impl BackupService {
    /// Checks (`dry_run`) or performs the move of a backup vault to `target_sub`/`target_rg`.
    /// Returns the vault as it is (or would be) stored after the move.
    pub(crate) async fn move_vault_on(
        self: &Arc<Self>,
        host: &Arc<dyn ServiceHost>,
        caller: &Principal,
        vault_id: &str,
        target_sub: &str,
        target_rg: &str,
        dry_run: bool,
    ) -> Result<Value, KvError> {
        let p = host.as_ref();
        self.ready(p).await?;
        let (sub, rg, name) = parse_vault_id(vault_id)?;
        let dir = vault_dir(&self.data_dir, &sub, &rg, &name);
        let refusals = async |body: &Value| -> Result<(), KvError> {
            if !self.blobs.is_local() {
                return Err(bad(
                    "UserErrorBackupVaultMoveNotSupported",
                    format!(
                        "The backups of the backup vault '{name}' are in a bucket several kagi \
                         nodes share; moving such a vault to another resource group or \
                         subscription is not supported yet. Create a vault in the target and \
                         protect the folders there."
                    ),
                ));
            }
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
        let body = p.get_resource(caller, vault_ref(&sub, &rg, &name))?;
        refusals(&body).await?;
        let planned = p
            .move_resource(
                caller,
                MoveRequest {
                    id: vault_id,
                    subscription: target_sub,
                    resource_group: target_rg,
                    dry_run: true,
                },
            )
            .await?;
        let new_id = planned["id"].as_str().unwrap_or_default().to_string();
        policy_check(p, &new_id, &planned).await?;
        // Validation (and the pass before a multi-resource move) refuses a vault with jobs
        // running, so that such a move is refused before anything moves.
        self.refuse_running_jobs(p, body["id"].as_str().unwrap_or(vault_id), &name)
            .await?;
        if dry_run {
            return Ok(planned);
        }
        let (_, new_rg, _) = parse_vault_id(&new_id)?;
        let new_dir = vault_dir(&self.data_dir, target_sub, &new_rg, &name);

        // Both vaults' locks, in path order (a move the other way, or a vault created at the
        // target, waits for this one).
        let (first, second) = if dir <= new_dir {
            (&dir, &new_dir)
        } else {
            (&new_dir, &dir)
        };
        let l1 = self.vault_lock(&first.display().to_string());
        let l2 = self.vault_lock(&second.display().to_string());
        let _g1 = l1.lock().await;
        let _g2 = if first == second {
            None
        } else {
            Some(l2.lock().await)
        };
        let _mark = MovingMark::new(&dir)?;
        // Requests that passed the gate just before the mark was set start their job without
        // awaiting; give them the moment they need to show up in the job list.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Under the locks, the vault and the target are as the move will take them.
        let body = p.get_resource(caller, vault_ref(&sub, &rg, &name))?;
        refusals(&body).await?;
        let old_id = body["id"].as_str().unwrap_or(vault_id).to_string();
        let move_to = |dry_run| MoveRequest {
            id: &old_id,
            subscription: target_sub,
            resource_group: target_rg,
            dry_run,
        };
        // Nothing owns the new id now (a vault created or moved there meanwhile refuses).
        let planned = p.move_resource(caller, move_to(true)).await?;
        if !planned["id"]
            .as_str()
            .is_some_and(|i| i.eq_ignore_ascii_case(&new_id))
        {
            return Err(KvError::conflict(format!(
                "The target of the move of '{}' changed while it was being prepared; retry.",
                kagi_core::ids::printable(&old_id)
            ))
            .with_inner("UserErrorBackupVaultResourceMoveInProgress"));
        }
        policy_check(p, &new_id, &planned).await?;
        self.wait_jobs_quiet(p, &old_id, &name).await?;
        self.clear_target_folder(p, &new_id, &new_dir)?;
        let mut state = VaultState::load(p, &old_id)
            .await?
            .ok_or_else(|| io("move", format!("{old_id} has no state")))?;
        if state.pmk_binding.is_none() {
            state.pmk_binding = Some(old_id.to_ascii_lowercase());
            state.save(p, &old_id).await?;
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
        let moved = match p.move_resource(caller, move_to(false)).await {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&jfile);
                return Err(e);
            }
        };
        // After the commit the move has happened, whatever befalls the folder: a rename that
        // fails is retried from the journal (in the background now, and at the next start), and
        // the vault refuses work meanwhile.
        match rename_durably(&dir, &new_dir) {
            Ok(()) => {
                if let Err(err) = std::fs::remove_file(&jfile) {
                    // Finished (and removed) at the next start: the folder is in place.
                    tracing::error!(error = %err, journal = %jfile.display(), "move journal not removed");
                }
            }
            Err(err) => {
                tracing::error!(
                    error = %err, from = %old_id, to = %new_id,
                    "backup vault moved, but its folder could not be renamed yet; retrying"
                );
                self.retry_rename_later(jfile, journal);
            }
        }
        self.forget_runtime(&dir);
        let v = VaultCtx {
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

    /// Under both vaults' locks, before the commit: a folder at the target is deleted only
    /// when nothing can own it — no resource has the new id and no unfinished move names it.
    fn clear_target_folder(
        &self,
        p: &dyn ServiceHost,
        new_id: &str,
        new_dir: &Path,
    ) -> Result<(), KvError> {
        if journal_names(&self.data_dir, new_dir) {
            return Err(KvError::conflict(format!(
                "The folder of '{}' belongs to a backup vault whose move has not finished; retry \
                 when it has.",
                kagi_core::ids::printable(new_id)
            ))
            .with_inner("UserErrorBackupVaultResourceMoveInProgress"));
        }
        if !new_dir.exists() {
            return Ok(());
        }
        let empty = std::fs::read_dir(new_dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if p.resource(new_id).is_some() {
            if empty {
                return Ok(());
            }
            return Err(KvError::conflict(format!(
                "A resource '{}' already exists; it cannot be the target of a move.",
                kagi_core::ids::printable(new_id)
            ))
            .with_inner("TargetResourceAlreadyExists"));
        }
        // Left over from a vault of that id deleted earlier: nothing owns it.
        std::fs::remove_dir_all(new_dir).map_err(|e| io("move: stale target", e))
    }

    /// Retries the rename a journal names until it succeeds (the journal is then removed);
    /// the vault at the new id refuses work meanwhile.
    fn retry_rename_later(self: &Arc<Self>, jfile: PathBuf, j: Journal) {
        let mark = MovingMark::new(&j.to_dir).ok();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(from = %j.from_id, to = %j.to_id, "backup vault folder left at its old place until the next start");
            std::mem::forget(mark);
            return;
        };
        let svc = self.clone();
        rt.spawn(async move {
            let mut delay = Duration::from_secs(1);
            loop {
                tokio::time::sleep(delay).await;
                let (a, b) = if j.from_dir <= j.to_dir {
                    (&j.from_dir, &j.to_dir)
                } else {
                    (&j.to_dir, &j.from_dir)
                };
                let l1 = svc.vault_lock(&a.display().to_string());
                let l2 = svc.vault_lock(&b.display().to_string());
                let _g1 = l1.lock().await;
                let _g2 = l2.lock().await;
                match finish_rename(&jfile, &j) {
                    Ok(()) => {
                        tracing::warn!(from = %j.from_id, to = %j.to_id, "backup vault move finished");
                        break;
                    }
                    Err(err) => {
                        tracing::error!(error = %err, from = %j.from_id, to = %j.to_id, "backup vault folder still not renamed; retrying");
                        delay = (delay * 2).min(Duration::from_secs(60));
                    }
                }
            }
            drop(mark);
        });
    }

    /// Refuses (409 `UserErrorBackupJobsInProgress`) while a job of the vault runs.
    async fn refuse_running_jobs(
        &self,
        p: &dyn ServiceHost,
        vault_id: &str,
        name: &str,
    ) -> Result<(), KvError> {
        if self.any_job_running(p, vault_id).await? {
            return Err(jobs_busy(name));
        }
        Ok(())
    }

    async fn any_job_running(&self, p: &dyn ServiceHost, vault_id: &str) -> Result<bool, KvError> {
        Ok(self
            .jobs
            .list(p, vault_id)
            .await?
            .iter()
            .any(|j| j["status"] == "InProgress"))
    }

    /// Refuses while a job of the vault runs, and waits (briefly) for jobs that just ended to
    /// finish writing their last state (which they write at the vault's old id).
    async fn wait_jobs_quiet(
        &self,
        p: &dyn ServiceHost,
        vault_id: &str,
        name: &str,
    ) -> Result<(), KvError> {
        let busy = || jobs_busy(name);
        for _ in 0..60 {
            if self.any_job_running(p, vault_id).await? {
                return Err(busy());
            }
            // The listing rewrote interrupted jobs; what is still InProgress in the store is a
            // job of this process writing its final state.
            let writing = p
                .documents(vault_id, JOB)
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
        // The folder's lock stays: a request waiting on it must exclude those that come after.
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| !Path::new(k).starts_with(dir));
    }

    /// Finishes the moves a crash (or a failed rename) interrupted (see the module
    /// documentation). A journal that cannot be finished is kept and reported.
    pub(crate) fn recover_moves(self: &Arc<Self>, p: &dyn ServiceHost) {
        for (path, j) in journals(&self.data_dir) {
            let Some(j) = j else {
                tracing::error!(journal = %path.display(), "unreadable backup vault move journal left in place");
                continue;
            };
            let (from, to) = (j.from_dir.exists(), j.to_dir.exists());
            if p.resource(&j.to_id).is_some() {
                // The records moved with the resource; only the folder may be left to rename.
                match (from, to) {
                    (true, false) => {
                        if let Err(err) = rename_durably(&j.from_dir, &j.to_dir) {
                            tracing::error!(error = %err, from = %j.from_id, to = %j.to_id, "backup vault move not finished; retrying");
                            self.retry_rename_later(path, j);
                            continue;
                        }
                        tracing::warn!(from = %j.from_id, to = %j.to_id, "backup vault move finished after a restart");
                    }
                    (true, true) => {
                        tracing::error!(
                            from = %j.from_id, to = %j.to_id,
                            from_dir = %j.from_dir.display(), to_dir = %j.to_dir.display(),
                            journal = %path.display(),
                            "backup vault moved, but both its old and its new folder exist; the \
                             journal is kept (and neither folder is deleted) until they are merged by hand"
                        );
                        continue;
                    }
                    (false, true) => {}
                    (false, false) => {
                        tracing::error!(
                            from = %j.from_id, to = %j.to_id,
                            from_dir = %j.from_dir.display(), to_dir = %j.to_dir.display(),
                            "backup vault moved, but neither its old nor its new folder exists \
                             (none if it never stored a blob); dropping the journal"
                        );
                    }
                }
            } else if p.resource(&j.from_id).is_some() {
                tracing::warn!(from = %j.from_id, to = %j.to_id, "backup vault move had not committed; the vault stays where it was");
            } else {
                tracing::error!(
                    from = %j.from_id, to = %j.to_id,
                    from_dir = %j.from_dir.display(), to_dir = %j.to_dir.display(),
                    "backup vault move journal names a vault that exists at neither id; dropping it"
                );
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

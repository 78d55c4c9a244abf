//! Scheduled backups with retention (issue 5 item 5): an item with
//! `{"schedule": {"intervalHours": N}, "retention": {"keepLast": K}}` gets a Backup job every N
//! hours of the platform clock (so `kagi server --test-clock` moves it), counted from its
//! creation or its last scheduled backup; after a completed backup, recovery points beyond the
//! newest K are forgotten (their snapshot objects deleted; the packs they alone referenced
//! stay — pruning is not done yet). A sweep runs at start (catching up on what fell due while
//! kagi was down, once per item, not once per missed interval) and then every minute.

use std::sync::Arc;
use std::time::Duration;

use kagi_host::ServiceHost;
use serde_json::json;

use crate::resource::{VaultCtx, activity_entry};
use crate::state::{VaultState, vault_dir};
use crate::{BackupService, VAULT_TYPE};

/// Runs [`BackupService::run_schedules`] of `service` at start and then every `every`.
pub fn spawn_scheduler(
    service: Arc<BackupService>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let n = service.run_schedules().await;
            if n > 0 {
                tracing::info!(backups = n, "scheduled backups run");
            }
        }
    })
}

impl BackupService {
    /// Runs every scheduled backup that is due (one after the other, each a Backup job),
    /// then its retention. Returns the number of backup jobs run.
    pub async fn run_schedules(self: &Arc<Self>) -> usize {
        let host = &self.host.clone();
        let p = host.as_ref();
        if let Err(e) = self.ready(p).await {
            tracing::error!(error = %e.message, "scheduled backups skipped: records not imported");
            return 0;
        }
        let mut ran = 0;
        for body in p.resources_of_type(VAULT_TYPE) {
            let id = body["id"].as_str().unwrap_or_default().to_string();
            let Ok((sub, rg, name)) = crate::moves::parse_vault_id(&id) else {
                continue;
            };
            let dir = vault_dir(&self.data_dir, &sub, &rg, &name);
            // A vault being moved starts nothing; its schedule resumes at its new place.
            if crate::moves::is_moving(&dir) {
                continue;
            }
            let v = VaultCtx { id, body, dir };
            ran += self.run_vault_schedules(host, &v).await;
            let horizon = p.now() - crate::jobs::JOB_RETENTION_DAYS * kagi_core::time::DAY;
            match self.jobs.forget_ended(p, &v.id, horizon).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(vault = %v.id, jobs = n, "old jobs forgotten"),
                Err(e) => {
                    tracing::error!(vault = %v.id, error = %e.message, "old jobs not forgotten")
                }
            }
        }
        ran
    }

    async fn run_vault_schedules(
        self: &Arc<Self>,
        host: &Arc<dyn ServiceHost>,
        v: &VaultCtx,
    ) -> usize {
        let p = host.as_ref();
        let due: Vec<String> = match VaultState::load(p, &v.id).await {
            Ok(Some(s)) => s
                .items
                .iter()
                .filter(|(_, i)| i.next_scheduled().is_some_and(|t| p.now() >= t))
                .map(|(n, _)| n.clone())
                .collect(),
            _ => return 0,
        };
        let mut ran = 0;
        for name in due {
            // Claim the run (durably, under the vault's lock) before starting it.
            let item = {
                let Ok(_g) = self.lock_vault(&v.dir).await else {
                    continue;
                };
                let Ok(Some(mut s)) = VaultState::load(p, &v.id).await else {
                    continue;
                };
                let Some(i) = s.items.get_mut(&name) else {
                    continue;
                };
                if i.next_scheduled().is_none_or(|t| p.now() < t) {
                    continue;
                }
                i.last_scheduled = p.now();
                let item = i.clone();
                if s.save(p, &v.id).await.is_err() {
                    continue;
                }
                item
            };
            let Ok(job) = self.jobs.start(host, &v.id, "Backup", &name, p.now()).await else {
                continue;
            };
            ran += 1;
            let r = async {
                let mut stats = self.run_backup(p, v, &name, &item, &job).await?;
                stats["trigger"] = json!("Schedule");
                if let Some(keep) = item.keep_last {
                    let (gone, pruned) = self.apply_retention(p, v, &name, keep).await?;
                    stats["recoveryPointsForgotten"] = json!(gone);
                    if !pruned.is_null() {
                        stats["prune"] = pruned;
                    }
                }
                Ok::<_, kagi_core::KvError>(stats)
            }
            .await;
            match r {
                Ok(stats) => job.complete(p.now(), stats).await,
                Err(e) => {
                    self.log(
                        p,
                        v,
                        activity_entry(
                            None,
                            &v.id,
                            "Microsoft.RecoveryServices/vaults/backupJobs/backup",
                            "Failed",
                            &format!("Scheduled backup of '{name}': {}", e.message),
                            p.now(),
                        ),
                    )
                    .await;
                    job.fail(p.now(), &e).await;
                }
            }
        }
        ran
    }
}

//! `kagi backup …`: backup vaults (`Microsoft.RecoveryServices/vaults`), their encryption
//! (platform key or customer-managed key), protected folders, backup and restore jobs with a
//! progress bar, recovery points and the activity log.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Context;
use crate::client::Output;

const API: &str = "api-version=2024-04-01";

/// `kagi backup`.
#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(subcommand)]
    command: BackupCommand,
}

#[derive(Args, Debug)]
struct VaultRef {
    /// Backup vault name.
    #[arg(long)]
    vault: String,
    /// Resource group.
    #[arg(long, short = 'g')]
    resource_group: String,
}

#[derive(Subcommand, Debug)]
enum BackupCommand {
    /// Backup vaults.
    #[command(subcommand)]
    Vault(VaultCommand),
    /// Protected folders.
    #[command(subcommand)]
    Item(ItemCommand),
    /// Take a recovery point now and wait for it.
    Now {
        #[command(flatten)]
        v: VaultRef,
        /// Item name.
        #[arg(long)]
        item: String,
    },
    /// Restore a recovery point (or a sub-path of it) into a folder and wait.
    Restore {
        #[command(flatten)]
        v: VaultRef,
        /// Item name.
        #[arg(long)]
        item: String,
        /// Recovery point id (see `kagi backup recovery-points`).
        #[arg(long)]
        recovery_point: String,
        /// Absolute target folder (must be empty unless --overwrite).
        #[arg(long)]
        target: String,
        /// Restore only this path inside the backed-up folder.
        #[arg(long)]
        sub_path: Option<String>,
        /// Write into a folder that is not empty.
        #[arg(long)]
        overwrite: bool,
    },
    /// Verify an item's repository (every recovery point's trees and chunks; with
    /// --read-data every stored blob authenticates) and wait; fails when damage is found.
    Check {
        #[command(flatten)]
        v: VaultRef,
        /// Item name.
        #[arg(long)]
        item: String,
        /// Also read and authenticate every stored blob.
        #[arg(long)]
        read_data: bool,
    },
    /// Recovery points of an item, newest first.
    RecoveryPoints {
        #[command(flatten)]
        v: VaultRef,
        /// Item name.
        #[arg(long)]
        item: String,
    },
    /// Jobs of a vault.
    #[command(subcommand)]
    Job(JobCommand),
    /// The vault's activity log.
    Activity {
        #[command(flatten)]
        v: VaultRef,
    },
}

#[derive(Subcommand, Debug)]
enum VaultCommand {
    /// Create a vault (platform-managed key unless --key-uri with --user-assigned-identity).
    Create {
        #[command(flatten)]
        v: VaultRef,
        /// Region.
        #[arg(long)]
        location: String,
        /// Give the vault a system-assigned identity.
        #[arg(long)]
        system_assigned: bool,
        /// Resource id of a user-assigned identity to assign (and to reach the key with).
        #[arg(long)]
        user_assigned_identity: Option<String>,
        /// Customer-managed key at creation (BK-8: needs --user-assigned-identity).
        #[arg(long)]
        key_uri: Option<String>,
    },
    /// Show a vault.
    Show {
        #[command(flatten)]
        v: VaultRef,
    },
    /// List vaults (of a resource group, or of the subscription).
    List {
        /// Resource group.
        #[arg(long, short = 'g')]
        resource_group: Option<String>,
    },
    /// Delete a vault (refused while it protects items).
    Delete {
        #[command(flatten)]
        v: VaultRef,
    },
    /// Set the vault's identities.
    Identity {
        #[command(flatten)]
        v: VaultRef,
        /// None, SystemAssigned, UserAssigned or 'SystemAssigned, UserAssigned'.
        #[arg(long = "type")]
        identity_type: String,
        /// User-assigned identity resource ids.
        #[arg(long)]
        user_assigned: Vec<String>,
    },
    /// List the backup agents (machines) registered with the vault.
    Machines {
        #[command(flatten)]
        v: VaultRef,
    },
    /// Unregister a machine and delete its backups (its key vault secret stays).
    DeleteMachine {
        #[command(flatten)]
        v: VaultRef,
        /// The machine's name.
        #[arg(long)]
        machine: String,
        /// Confirm that the machine's backups are deleted.
        #[arg(long)]
        yes: bool,
    },
    /// Let the next registration of a machine name in with vault credentials alone (once; its
    /// backups are kept): for a machine whose passphrase and state are both lost.
    AllowReregistration {
        #[command(flatten)]
        v: VaultRef,
        /// The machine's name.
        #[arg(long)]
        machine: String,
        /// Validity in hours (default 48, at most 240).
        #[arg(long)]
        valid_hours: Option<u64>,
    },
    /// Download vault credentials for registering backup agents (`kagi agent register`).
    Credentials {
        #[command(flatten)]
        v: VaultRef,
        /// Write the credentials file here (mode 0600).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Validity in hours (default 48, at most 240).
        #[arg(long)]
        valid_hours: Option<u64>,
    },
    /// Move the vault to another resource group (and subscription, of the same tenant) with
    /// its protected items and recovery points; refused for a vault encrypted with a
    /// customer-managed key.
    Move {
        #[command(flatten)]
        v: VaultRef,
        /// Target resource group.
        #[arg(long)]
        target_resource_group: String,
        /// Target subscription (default: the vault's, from AZURE_SUBSCRIPTION_ID or the
        /// bootstrap subscription).
        #[arg(long)]
        target_subscription: Option<String>,
        /// Only check that the move would succeed.
        #[arg(long)]
        validate_only: bool,
    },
    /// Set the customer-managed key (runs as a ConfigureEncryption job).
    Encryption {
        #[command(flatten)]
        v: VaultRef,
        /// Key URI (versionless follows new versions; versioned pins).
        #[arg(long)]
        key_uri: String,
        /// Reach the key with this user-assigned identity (default: the system-assigned one).
        #[arg(long)]
        user_assigned_identity: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ItemCommand {
    /// Protect a folder of the kagi host (again with the same folder: change its schedule
    /// and retention; omitted ones are removed).
    Protect {
        #[command(flatten)]
        v: VaultRef,
        /// Item name.
        #[arg(long)]
        name: String,
        /// Absolute path of the folder.
        #[arg(long)]
        source: String,
        /// Take a recovery point every this many hours.
        #[arg(long)]
        schedule_hours: Option<u64>,
        /// Keep only the newest this many recovery points (after each scheduled backup).
        #[arg(long)]
        keep_last: Option<u64>,
    },
    /// List protected items.
    List {
        #[command(flatten)]
        v: VaultRef,
    },
}

#[derive(Subcommand, Debug)]
enum JobCommand {
    /// List jobs, newest first.
    List {
        #[command(flatten)]
        v: VaultRef,
    },
    /// Show a job.
    Show {
        #[command(flatten)]
        v: VaultRef,
        /// Job id.
        #[arg(long)]
        id: String,
    },
    /// Wait for a job to end, with a progress bar.
    Wait {
        #[command(flatten)]
        v: VaultRef,
        /// Job id.
        #[arg(long)]
        id: String,
    },
}

fn vault_path(ctx: &Context, v: &VaultRef) -> String {
    format!(
        "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.RecoveryServices/vaults/{}",
        ctx.base, ctx.subscription, v.resource_group, v.vault
    )
}

fn url(base: &str, tail: &str) -> String {
    format!("{base}{tail}?{API}")
}

/// The body of a request with an optional `validHours`.
fn validity(valid_hours: Option<u64>) -> Value {
    match valid_hours {
        Some(h) => json!({"validHours": h}),
        None => json!({}),
    }
}

fn show(ctx: &Context, v: &Value, summary: impl Fn(&Value) -> String) {
    match ctx.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        _ => println!("{}", summary(v)),
    }
}

fn vault_line(v: &Value) -> String {
    let enc = match v["properties"]["encryption"]["keyVaultProperties"]["keyUri"].as_str() {
        Some(k) => format!("CMK {k}"),
        None => "PMK".into(),
    };
    format!(
        "{}\t{}\t{}\tidentity {}",
        v["name"].as_str().unwrap_or(""),
        v["location"].as_str().unwrap_or(""),
        enc,
        v["identity"]["type"].as_str().unwrap_or("None")
    )
}

fn job_line(j: &Value) -> String {
    let mut s = format!(
        "{}\t{}\t{}\t{}\t{}",
        j["name"].as_str().unwrap_or(""),
        j["operation"].as_str().unwrap_or(""),
        j["status"].as_str().unwrap_or(""),
        j["entityFriendlyName"].as_str().unwrap_or(""),
        j["startTime"].as_str().unwrap_or("")
    );
    if let Some(m) = j["error"]["message"].as_str() {
        s.push_str(&format!("\terror: {m}"));
    }
    s
}

async fn wait(ctx: &Context, base: &str, id: &str) -> anyhow::Result<Value> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    // Long polling (RFC 7240 `Prefer: wait`): the server answers as soon as the job ends, or
    // after a second with its progress, so the end is seen within milliseconds.
    loop {
        let j = ctx
            .call_with(
                Method::GET,
                &url(base, &format!("/backupJobs/{id}")),
                None,
                &[("prefer", "wait=1")],
            )
            .await?;
        bar.set_message(format!(
            "{} {}",
            j["operation"].as_str().unwrap_or(""),
            j["entityFriendlyName"].as_str().unwrap_or("")
        ));
        bar.set_length(j["progress"]["total"].as_u64().unwrap_or(0));
        bar.set_position(j["progress"]["done"].as_u64().unwrap_or(0));
        if j["status"] != "InProgress" {
            bar.finish_and_clear();
            return Ok(j);
        }
        // An older server answers at once: do not spin.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mb(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

fn ended(ctx: &Context, j: &Value) -> anyhow::Result<()> {
    if j["status"] == "Failed" {
        bail!(
            "job {} failed: {} ({})",
            j["name"].as_str().unwrap_or(""),
            j["error"]["message"].as_str().unwrap_or(""),
            j["error"]["code"].as_str().unwrap_or("")
        );
    }
    show(ctx, j, |j| {
        let s = &j["stats"];
        match j["operation"].as_str() {
            Some("Backup") => format!(
                "recovery point {}: {} files, {} read ({} files unchanged); stored {} new ({} chunks new, {} deduplicated), {} added to storage; {} ms, {} MB/s{}",
                s["recoveryPointId"].as_str().unwrap_or(""),
                s["files"],
                mb(s["bytesRead"].as_u64().unwrap_or(0)),
                s["filesUnchanged"],
                mb(s["bytesNew"].as_u64().unwrap_or(0)),
                s["chunksNew"],
                s["chunksDeduplicated"],
                mb(s["bytesAdded"].as_u64().unwrap_or(0)),
                s["durationMs"],
                s["megabytesPerSecond"],
                match s["skipped"].as_array() {
                    Some(a) if !a.is_empty() => format!(
                        "; skipped {}: {:?}",
                        s["skippedCount"].as_u64().unwrap_or(a.len() as u64),
                        a
                    ),
                    _ => String::new(),
                }
            ),
            Some("Restore") => format!(
                "restored {} files, {} dirs, {} symlinks, {} in {} ms",
                s["files"],
                s["dirs"],
                s["symlinks"],
                mb(s["bytes"].as_u64().unwrap_or(0)),
                s["durationMs"]
            ),
            Some("Check") => format!(
                "no problems found{} in {} ms",
                if s["readData"] == true {
                    " (all data read)"
                } else {
                    ""
                },
                s["durationMs"]
            ),
            _ => job_line(j),
        }
    });
    Ok(())
}

/// Runs `kagi backup …`.
pub async fn run(ctx: &Context, args: BackupArgs) -> anyhow::Result<()> {
    match args.command {
        BackupCommand::Vault(cmd) => vault(ctx, cmd).await,
        BackupCommand::Item(ItemCommand::Protect {
            v,
            name,
            source,
            schedule_hours,
            keep_last,
        }) => {
            let base = vault_path(ctx, &v);
            let source = std::path::absolute(&source)?.display().to_string();
            let mut props = json!({"sourcePath": source});
            if let Some(h) = schedule_hours {
                props["schedule"] = json!({"intervalHours": h});
            }
            if let Some(k) = keep_last {
                props["retention"] = json!({"keepLast": k});
            }
            let r = ctx
                .call(
                    Method::PUT,
                    &url(&base, &format!("/backupProtectedItems/{name}")),
                    Some(&json!({"properties": props})),
                )
                .await?;
            show(ctx, &r, |r| {
                format!(
                    "{}\t{}",
                    r["name"].as_str().unwrap_or(""),
                    r["properties"]["sourcePath"].as_str().unwrap_or("")
                )
            });
            Ok(())
        }
        BackupCommand::Item(ItemCommand::List { v }) => {
            let r = ctx
                .call(
                    Method::GET,
                    &url(&vault_path(ctx, &v), "/backupProtectedItems"),
                    None,
                )
                .await?;
            show(ctx, &r, |r| {
                crate::commands::lines_of(r, |i| {
                    format!(
                        "{}\t{}",
                        i["name"].as_str().unwrap_or(""),
                        i["properties"]["sourcePath"].as_str().unwrap_or("")
                    )
                })
            });
            Ok(())
        }
        BackupCommand::Now { v, item } => {
            let base = vault_path(ctx, &v);
            let j = ctx
                .call(
                    Method::POST,
                    &url(&base, &format!("/backupProtectedItems/{item}/backup")),
                    None,
                )
                .await?;
            let j = wait(ctx, &base, j["name"].as_str().unwrap_or("")).await?;
            ended(ctx, &j)
        }
        BackupCommand::Restore {
            v,
            item,
            recovery_point,
            target,
            sub_path,
            overwrite,
        } => {
            let base = vault_path(ctx, &v);
            let target = std::path::absolute(&target)?.display().to_string();
            let mut body = json!({"recoveryPointId": recovery_point, "targetPath": target, "overwrite": overwrite});
            if let Some(s) = sub_path {
                body["subPath"] = json!(s);
            }
            let j = ctx
                .call(
                    Method::POST,
                    &url(&base, &format!("/backupProtectedItems/{item}/restore")),
                    Some(&body),
                )
                .await?;
            let j = wait(ctx, &base, j["name"].as_str().unwrap_or("")).await?;
            ended(ctx, &j)
        }
        BackupCommand::Check { v, item, read_data } => {
            let base = vault_path(ctx, &v);
            let j = ctx
                .call(
                    Method::POST,
                    &url(&base, &format!("/backupProtectedItems/{item}/check")),
                    Some(&json!({"readData": read_data})),
                )
                .await?;
            let j = wait(ctx, &base, j["name"].as_str().unwrap_or("")).await?;
            if let Some(p) = j["stats"]["problems"].as_array() {
                for m in p {
                    eprintln!("problem: {}", m.as_str().unwrap_or(""));
                }
            }
            ended(ctx, &j)
        }
        BackupCommand::RecoveryPoints { v, item } => {
            let r = ctx
                .call(
                    Method::GET,
                    &url(
                        &vault_path(ctx, &v),
                        &format!("/backupProtectedItems/{item}/recoveryPoints"),
                    ),
                    None,
                )
                .await?;
            show(ctx, &r, |r| {
                crate::commands::lines_of(r, |p| {
                    format!(
                        "{}\t{}\t{} files\t{}",
                        p["name"].as_str().unwrap_or(""),
                        p["properties"]["recoveryPointTime"].as_str().unwrap_or(""),
                        p["properties"]["files"],
                        mb(p["properties"]["bytes"].as_u64().unwrap_or(0))
                    )
                })
            });
            Ok(())
        }
        BackupCommand::Job(cmd) => match cmd {
            JobCommand::List { v } => {
                let r = ctx
                    .call(Method::GET, &url(&vault_path(ctx, &v), "/backupJobs"), None)
                    .await?;
                show(ctx, &r, |r| crate::commands::lines_of(r, job_line));
                Ok(())
            }
            JobCommand::Show { v, id } => {
                let r = ctx
                    .call(
                        Method::GET,
                        &url(&vault_path(ctx, &v), &format!("/backupJobs/{id}")),
                        None,
                    )
                    .await?;
                show(ctx, &r, job_line);
                Ok(())
            }
            JobCommand::Wait { v, id } => {
                let j = wait(ctx, &vault_path(ctx, &v), &id).await?;
                ended(ctx, &j)
            }
        },
        BackupCommand::Activity { v } => {
            let r = ctx
                .call(
                    Method::GET,
                    &url(&vault_path(ctx, &v), "/activityLog"),
                    None,
                )
                .await?;
            show(ctx, &r, |r| {
                crate::commands::lines_of(r, |e| {
                    format!(
                        "{}\t{}\t{}\t{}",
                        e["eventTimestamp"].as_str().unwrap_or(""),
                        e["operationName"].as_str().unwrap_or(""),
                        e["status"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or("")
                    )
                })
            });
            Ok(())
        }
    }
}

fn kek_identity(ua: &Option<String>) -> Value {
    match ua {
        Some(u) => json!({"useSystemAssignedIdentity": false, "userAssignedIdentity": u}),
        None => json!({"useSystemAssignedIdentity": true}),
    }
}

async fn vault(ctx: &Context, cmd: VaultCommand) -> anyhow::Result<()> {
    match cmd {
        VaultCommand::Create {
            v,
            location,
            system_assigned,
            user_assigned_identity,
            key_uri,
        } => {
            let ty = match (system_assigned, &user_assigned_identity) {
                (true, Some(_)) => "SystemAssigned, UserAssigned",
                (true, None) => "SystemAssigned",
                (false, Some(_)) => "UserAssigned",
                (false, None) => "None",
            };
            let mut identity = json!({"type": ty});
            if let Some(u) = &user_assigned_identity {
                identity["userAssignedIdentities"] = json!({u.clone(): {}});
            }
            let mut body = json!({"location": location, "identity": identity, "properties": {}});
            if let Some(k) = key_uri {
                body["properties"]["encryption"] = json!({
                    "keyVaultProperties": {"keyUri": k},
                    "kekIdentity": kek_identity(&user_assigned_identity),
                });
            }
            let r = ctx
                .call(Method::PUT, &url(&vault_path(ctx, &v), ""), Some(&body))
                .await?;
            show(ctx, &r, vault_line);
        }
        VaultCommand::Show { v } => {
            let r = ctx
                .call(Method::GET, &url(&vault_path(ctx, &v), ""), None)
                .await?;
            show(ctx, &r, vault_line);
        }
        VaultCommand::List { resource_group } => {
            let base = match resource_group {
                Some(g) => format!(
                    "{}/subscriptions/{}/resourceGroups/{g}/providers/Microsoft.RecoveryServices/vaults",
                    ctx.base, ctx.subscription
                ),
                None => format!(
                    "{}/subscriptions/{}/providers/Microsoft.RecoveryServices/vaults",
                    ctx.base, ctx.subscription
                ),
            };
            let r = ctx.call(Method::GET, &url(&base, ""), None).await?;
            show(ctx, &r, |r| crate::commands::lines_of(r, vault_line));
        }
        VaultCommand::Delete { v } => {
            ctx.call(Method::DELETE, &url(&vault_path(ctx, &v), ""), None)
                .await?;
        }
        VaultCommand::Machines { v } => {
            let r = ctx
                .call(
                    Method::GET,
                    &url(&vault_path(ctx, &v), "/registeredMachines"),
                    None,
                )
                .await?;
            show(ctx, &r, |r| {
                crate::commands::value_lines(r, &["name", "registered", "secretId"])
            });
        }
        VaultCommand::DeleteMachine { v, machine, yes } => {
            if !yes {
                bail!("this deletes every backup of {machine}; add --yes to confirm");
            }
            ctx.call(
                Method::DELETE,
                &url(
                    &vault_path(ctx, &v),
                    &format!("/registeredMachines/{machine}"),
                ),
                None,
            )
            .await?;
        }
        VaultCommand::AllowReregistration {
            v,
            machine,
            valid_hours,
        } => {
            let r = ctx
                .call(
                    Method::POST,
                    &url(
                        &vault_path(ctx, &v),
                        &format!("/registeredMachines/{machine}/allowReregistration"),
                    ),
                    Some(&validity(valid_hours)),
                )
                .await?;
            show(ctx, &r, |r| {
                format!(
                    "{} may be registered again with vault credentials alone until {} (once)",
                    r["name"].as_str().unwrap_or(""),
                    r["reregistrationAllowedUntil"].as_str().unwrap_or("")
                )
            });
        }
        VaultCommand::Credentials {
            v,
            out,
            valid_hours,
        } => {
            let body = validity(valid_hours);
            let r = ctx
                .call(
                    Method::POST,
                    &url(&vault_path(ctx, &v), "/vaultCredentials"),
                    Some(&body),
                )
                .await?;
            let bytes = zeroize::Zeroizing::new(serde_json::to_vec_pretty(&r)?);
            write_private(&out, &bytes)?;
            // What was written, never the credentials themselves: they stay in the file.
            let written = json!({
                "vaultName": r["vaultName"],
                "file": out.display().to_string(),
                "expiresOn": r["expiresOn"],
            });
            show(ctx, &written, |w| {
                format!(
                    "vault credentials for {} written to {} (valid until {})",
                    w["vaultName"].as_str().unwrap_or(""),
                    w["file"].as_str().unwrap_or(""),
                    w["expiresOn"].as_str().unwrap_or("")
                )
            });
        }
        VaultCommand::Move {
            v,
            target_resource_group,
            target_subscription,
            validate_only,
        } => {
            let id = vault_path(ctx, &v)
                .strip_prefix(&ctx.base)
                .unwrap_or_default()
                .to_string();
            let target_sub = target_subscription.unwrap_or_else(|| ctx.subscription.clone());
            crate::subscription::move_resources(
                ctx,
                &ctx.subscription,
                &v.resource_group,
                std::slice::from_ref(&id),
                &target_sub,
                &target_resource_group,
                validate_only,
            )
            .await?;
            if validate_only {
                let out = json!({"status": "Succeeded", "operation": "validateMoveResources", "resources": [id]});
                show(ctx, &out, |_| format!("backup vault {} can move", v.vault));
            } else {
                let moved = format!(
                    "{}/subscriptions/{target_sub}/resourceGroups/{target_resource_group}/providers/Microsoft.RecoveryServices/vaults/{}",
                    ctx.base, v.vault
                );
                let r = ctx.call(Method::GET, &url(&moved, ""), None).await?;
                show(ctx, &r, |r| {
                    format!("moved to {}", r["id"].as_str().unwrap_or(""))
                });
            }
        }
        VaultCommand::Identity {
            v,
            identity_type,
            user_assigned,
        } => {
            let mut identity = json!({"type": identity_type});
            if !user_assigned.is_empty() {
                identity["userAssignedIdentities"] = Value::Object(
                    user_assigned
                        .iter()
                        .map(|u| (u.clone(), json!({})))
                        .collect(),
                );
            }
            let r = ctx
                .call(
                    Method::PATCH,
                    &url(&vault_path(ctx, &v), ""),
                    Some(&json!({"identity": identity})),
                )
                .await?;
            show(ctx, &r, vault_line);
        }
        VaultCommand::Encryption {
            v,
            key_uri,
            user_assigned_identity,
        } => {
            let base = vault_path(ctx, &v);
            let r = ctx
                .call(
                    Method::PATCH,
                    &url(&base, ""),
                    Some(&json!({"properties": {"encryption": {
                        "keyVaultProperties": {"keyUri": key_uri},
                        "kekIdentity": kek_identity(&user_assigned_identity),
                    }}})),
                )
                .await?;
            // The key assignment job: wait for it (it re-wraps every item's data key).
            let jobs = ctx
                .call(Method::GET, &url(&base, "/backupJobs"), None)
                .await?;
            if let Some(id) = jobs["value"]
                .as_array()
                .and_then(|a| a.iter().find(|j| j["operation"] == "ConfigureEncryption"))
                .and_then(|j| j["name"].as_str())
            {
                let j = wait(ctx, &base, id).await?;
                if j["status"] == "Failed" {
                    return ended(ctx, &j);
                }
            }
            show(ctx, &r, vault_line);
        }
    }
    Ok(())
}

/// Writes a credentials file readable by its owner only.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

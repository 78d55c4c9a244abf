//! `kagi agent …`: the backup agent of a machine (MP-1..MP-7). A separate process from the
//! server with its own state directory; it encrypts on the machine and talks to the server only
//! through the agent routes. See `kagi-agent` and docs/AGENT.md.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use kagi_agent::{Agent, AgentError, PassphraseSource, ProgressFn, Registration, VaultCredentials};
use kagi_backup::Progress;
use serde_json::json;
use zeroize::Zeroizing;

use crate::client::Output;

/// `kagi agent`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The agent's state directory (machine credential, protected folders, working key).
    #[arg(long, env = "KAGI_AGENT_STATE", default_value = "./kagi-agent")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: AgentCommand,
}

/// Where a passphrase comes from on the command line.
#[derive(Args, Debug, Default)]
struct PassphraseArgs {
    /// Read the passphrase from this file ('-': standard input). At least 16 characters;
    /// one trailing newline is ignored.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Generate a passphrase (192 random bits).
    #[arg(long, conflicts_with = "passphrase_file")]
    generate_passphrase: bool,
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Register this machine with a backup vault.
    Register {
        /// Vault credentials file (`kagi backup vault credentials`).
        #[arg(long)]
        vault_credentials: PathBuf,
        /// This machine's fully qualified name (default: the host name).
        #[arg(long)]
        machine_name: Option<String>,
        #[command(flatten)]
        passphrase: PassphraseArgs,
        /// Keep the passphrase in this key vault (https://{vault}.{suffix}:{port}/), written by
        /// the backup vault's system-assigned identity as `AzBackup-<FQDN>-<vault>`.
        #[arg(long)]
        key_vault_uri: Option<String>,
    },
    /// Show the registration, the key vault and the protected folders.
    Status,
    /// Protect a folder of this machine (again: change its schedule and retention).
    Protect {
        /// The folder.
        path: PathBuf,
        /// Back up every N hours (`kagi agent run`).
        #[arg(long)]
        schedule_hours: Option<u64>,
        /// Keep the newest K recovery points of the folder.
        #[arg(long)]
        keep_last: Option<u64>,
    },
    /// Back up protected folders now (all of them, or those given).
    Backup {
        /// Folders (default: every protected folder).
        paths: Vec<PathBuf>,
    },
    /// List recovery points (of this machine, or of another one of the same vault).
    RecoveryPoints {
        /// The machine whose recovery points to list (default: this one).
        #[arg(long)]
        source_machine: Option<String>,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Restore a recovery point (of this machine, or of another one of the same vault).
    Restore {
        /// Recovery point id (default: the newest).
        #[arg(long)]
        recovery_point: Option<String>,
        /// Restore only this path inside the backed-up folder.
        #[arg(long)]
        sub_path: Option<PathBuf>,
        /// Target folder (must be empty unless --overwrite).
        #[arg(long)]
        target: PathBuf,
        /// Write into a non-empty target.
        #[arg(long)]
        overwrite: bool,
        /// Give files their recorded owner and group, and with them setuid/setgid bits (root
        /// only). Without it, files belong to the restoring user and lose those bits.
        #[arg(long)]
        restore_owners: bool,
        /// The machine whose backup to restore (default: this one).
        #[arg(long)]
        source_machine: Option<String>,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Change the passphrase (a new version of the key vault secret when one is used).
    SetPassphrase {
        #[command(flatten)]
        passphrase: PassphraseArgs,
        /// Keep the passphrase in this key vault from now on (default: the remembered one).
        #[arg(long)]
        key_vault_uri: Option<String>,
    },
    /// Scriptable machine setting (like Set-OBMachineSetting -KeyVaultUri): store the
    /// passphrase in a key vault and remember the URI.
    SetMachineSetting {
        /// The key vault.
        #[arg(long)]
        key_vault_uri: String,
        /// The passphrase (new or current) to keep there ('-': standard input).
        #[arg(long)]
        passphrase_file: PathBuf,
    },
    /// Machines registered with the same backup vault.
    Machines,
    /// Run scheduled backups until stopped.
    Run {
        /// How often to look for due backups.
        #[arg(long, default_value_t = 60)]
        interval_seconds: u64,
    },
}

/// Where a restore's passphrase comes from.
#[derive(Args, Debug, Default)]
struct SourceArgs {
    /// The source machine's passphrase in a file ('-': standard input).
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Read the source machine's passphrase from this key vault (newest version of
    /// `AzBackup-<FQDN>-<vault>`) with your own credentials: AZURE_TENANT_ID, AZURE_CLIENT_ID,
    /// AZURE_CLIENT_SECRET.
    #[arg(long, conflicts_with = "passphrase_file")]
    key_vault_uri: Option<String>,
}

fn read_passphrase_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let mut raw = Zeroizing::new(String::new());
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut raw)
            .context("cannot read the passphrase from standard input")?;
    } else {
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_string(&mut raw))
            .with_context(|| format!("cannot read the passphrase file {}", path.display()))?;
    }
    let trimmed = raw
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(&raw);
    Ok(Zeroizing::new(trimmed.to_string()))
}

/// The passphrase to use, and whether it was generated.
fn passphrase_of(a: &PassphraseArgs) -> anyhow::Result<(Zeroizing<String>, bool)> {
    match (&a.passphrase_file, a.generate_passphrase) {
        (Some(p), _) => Ok((read_passphrase_file(p)?, false)),
        (None, true) => Ok((kagi_agent::passphrase::generate()?, true)),
        (None, false) => bail!("give --passphrase-file FILE or --generate-passphrase"),
    }
}

fn host_name() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s != "(none)")
    };
    let host = read("/proc/sys/kernel/hostname").unwrap_or_else(|| "localhost".into());
    match read("/proc/sys/kernel/domainname") {
        Some(d) if !host.contains('.') => format!("{host}.{d}"),
        _ => host,
    }
}

fn bar(label: &str) -> (indicatif::ProgressBar, ProgressFn) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    let b = bar.clone();
    (
        bar,
        Arc::new(move |p: &Progress| {
            b.set_length(p.bytes_total);
            b.set_position(p.bytes_done);
        }),
    )
}

fn mb(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

fn print(output: Output, v: &serde_json::Value, table: impl FnOnce() -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => println!("{}", table()),
    }
}

/// Prints the registration warning that every command repeats until it is finished (MP-7).
fn warn_incomplete(dir: &Path) {
    if let Ok(Some(s)) = kagi_agent::AgentState::load(dir)
        && let Registration::Incomplete { reason } = &s.registration
    {
        eprintln!(
            "warning: the registration of this machine is incomplete ({reason}); run \
             `kagi agent register` again to finish it"
        );
    }
}

fn source_of<'a>(
    s: &'a SourceArgs,
    passphrase: &'a Option<Zeroizing<String>>,
    creds: &'a Option<(String, String, String)>,
) -> anyhow::Result<PassphraseSource<'a>> {
    Ok(match (&s.key_vault_uri, passphrase, creds) {
        (Some(uri), _, Some((t, c, k))) => PassphraseSource::KeyVault {
            uri,
            tenant: t,
            client_id: c,
            client_secret: k,
        },
        (Some(_), _, None) => bail!(
            "reading the passphrase from the key vault needs your credentials in \
             AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET"
        ),
        (None, Some(p), _) => PassphraseSource::Given(p),
        (None, None, _) => PassphraseSource::Local,
    })
}

fn env_creds() -> Option<(String, String, String)> {
    Some((
        std::env::var("AZURE_TENANT_ID").ok()?,
        std::env::var("AZURE_CLIENT_ID").ok()?,
        std::env::var("AZURE_CLIENT_SECRET").ok()?,
    ))
}

/// Runs `kagi agent …`.
pub async fn run(output: Output, args: AgentArgs) -> anyhow::Result<()> {
    let dir = args.state_dir;
    if !matches!(args.command, AgentCommand::Register { .. }) {
        warn_incomplete(&dir);
    }
    match args.command {
        AgentCommand::Register {
            vault_credentials,
            machine_name,
            passphrase,
            key_vault_uri,
        } => {
            let creds = VaultCredentials::read(&vault_credentials)?;
            let (pass, generated) = passphrase_of(&passphrase)?;
            let machine = machine_name.unwrap_or_else(host_name);
            // No key vault will keep a generated passphrase: show it before it is used, so
            // that a failure half-way cannot lose it.
            let shown = generated && key_vault_uri.is_none();
            if shown {
                eprintln!(
                    "generated passphrase (store it safely; without it these backups cannot be \
                     restored elsewhere): {}",
                    &*pass
                );
            }
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let (agent, outcome) = kagi_agent::register(
                &dir,
                kagi_agent::RegisterRequest {
                    credentials: &creds,
                    machine: &machine,
                    passphrase: &pass,
                    key_vault_uri: key_vault_uri.as_deref(),
                },
            )
            .await?;
            for w in &outcome.warnings {
                eprintln!("warning: {w}");
            }
            let v = json!({
                "generatedPassphrase": shown.then(|| pass.to_string()),
                "machineName": agent.state.machine_name,
                "vaultId": agent.state.vault_id,
                "secretId": outcome.secret_id,
                "registeredAgain": outcome.registered_again,
                "repositoryCreated": outcome.repository_created,
                "warnings": outcome.warnings,
            });
            print(output, &v, || {
                let mut s = format!(
                    "registered {} with {}{}",
                    agent.state.machine_name,
                    agent.state.vault_name,
                    if outcome.registered_again {
                        " (again; its backups are kept)"
                    } else {
                        ""
                    }
                );
                if let Some(id) = &outcome.secret_id {
                    s.push_str(&format!("\npassphrase kept in the key vault: {id}"));
                }
                if shown {
                    s.push_str(&format!("\ngenerated passphrase: {}", &*pass));
                }
                s
            });
        }
        AgentCommand::Status => {
            let a = Agent::open_any(&dir)?;
            let s = &a.state;
            let v = json!({
                "machineName": s.machine_name, "vaultId": s.vault_id,
                "registration": s.registration, "keyVaultUri": s.key_vault_uri,
                "secretId": s.secret_id, "folders": s.folders,
            });
            print(output, &v, || {
                let mut out = format!(
                    "machine {}\nvault {}\nregistration {}\nkey vault {}\nsecret {}",
                    s.machine_name,
                    s.vault_id,
                    match &s.registration {
                        Registration::Complete => "complete".to_string(),
                        Registration::Incomplete { reason } => format!("INCOMPLETE: {reason}"),
                    },
                    s.key_vault_uri.as_deref().unwrap_or("(none)"),
                    s.secret_id.as_deref().unwrap_or("(none)")
                );
                for f in &s.folders {
                    out.push_str(&format!(
                        "\nfolder {} schedule {:?} h keep-last {:?}",
                        f.path, f.schedule_hours, f.keep_last
                    ));
                }
                out
            });
        }
        AgentCommand::Protect {
            path,
            schedule_hours,
            keep_last,
        } => {
            let mut a = Agent::open(&dir)?;
            let f = a.protect(&path, schedule_hours, keep_last)?;
            print(output, &json!(f), || format!("protecting {}", f.path));
        }
        AgentCommand::Backup { paths } => {
            let mut a = Agent::open(&dir)?;
            let folders: Vec<String> = if paths.is_empty() {
                a.state.folders.iter().map(|f| f.path.clone()).collect()
            } else {
                paths
                    .iter()
                    .map(|p| {
                        std::fs::canonicalize(p)
                            .map(|p| p.display().to_string())
                            .with_context(|| format!("{}", p.display()))
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            if folders.is_empty() {
                bail!("no folder is protected: kagi agent protect PATH");
            }
            // JSON: one array of every folder's result, printed at the end.
            let mut results = Vec::new();
            for f in folders {
                let (pb, report) = bar(&format!("backup {f}"));
                let r = a.backup(&f, report).await;
                pb.finish_and_clear();
                let s = r?;
                for e in &s.skipped_entries {
                    eprintln!("warning: skipped {}: {}", e.path, e.reason);
                }
                if s.skipped_count > s.skipped_entries.len() as u64 {
                    eprintln!(
                        "warning: {} more entries skipped",
                        s.skipped_count - s.skipped_entries.len() as u64
                    );
                }
                let secs = (s.duration_ms as f64 / 1000.0).max(0.001);
                results.push(json!({"folder": f, "recoveryPoint": s.snapshot.id,
                    "files": s.snapshot.files, "bytesRead": s.bytes_read,
                    "bytesAdded": s.bytes_added, "chunksNew": s.chunks_new,
                    "chunksDeduplicated": s.chunks_dedup, "skipped": s.skipped,
                    "skippedCount": s.skipped_count, "seconds": secs}));
                if let Output::Table = output {
                    println!(
                        "{f}: recovery point {}\n  {} files, read {}, stored {} new ({} chunks new, {} deduplicated), {:.1} MB/s",
                        s.snapshot.id,
                        s.snapshot.files,
                        mb(s.bytes_read),
                        mb(s.bytes_added),
                        s.chunks_new,
                        s.chunks_dedup,
                        s.bytes_read as f64 / 1e6 / secs
                    );
                }
            }
            if let Output::Json = output {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&results).unwrap_or_default()
                );
            }
        }
        AgentCommand::RecoveryPoints {
            source_machine,
            source,
        } => {
            let a = Agent::open(&dir)?;
            let pass = source
                .passphrase_file
                .as_deref()
                .map(read_passphrase_file)
                .transpose()?;
            let creds = env_creds();
            let src = source_of(&source, &pass, &creds)?;
            let points = a.recovery_points(source_machine.as_deref(), &src).await?;
            let v = json!(
                points
                    .iter()
                    .map(
                        |p| json!({"id": p.id, "time": kagi_core::time::rfc3339(p.time),
                               "source": p.source, "files": p.files, "bytes": p.bytes})
                    )
                    .collect::<Vec<_>>()
            );
            print(output, &v, || {
                points
                    .iter()
                    .map(|p| {
                        format!(
                            "{}\t{}\t{}\t{} files\t{}",
                            p.id,
                            kagi_core::time::rfc3339(p.time),
                            p.source,
                            p.files,
                            mb(p.bytes)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        AgentCommand::Restore {
            recovery_point,
            sub_path,
            target,
            overwrite,
            restore_owners,
            source_machine,
            source,
        } => {
            let a = Agent::open(&dir)?;
            let pass = source
                .passphrase_file
                .as_deref()
                .map(read_passphrase_file)
                .transpose()?;
            let creds = env_creds();
            let src = source_of(&source, &pass, &creds)?;
            let rp = match recovery_point {
                Some(r) => r,
                None => a
                    .recovery_points(source_machine.as_deref(), &src)
                    .await?
                    .last()
                    .map(|p| p.id.clone())
                    .context("that machine has no recovery points")?,
            };
            let (pb, report) = bar(&format!("restore {rp}"));
            let r = a
                .restore(
                    source_machine.as_deref(),
                    &src,
                    &rp,
                    sub_path.as_deref(),
                    &target,
                    kagi_agent::RestoreOptions {
                        overwrite,
                        owners: restore_owners,
                        ..Default::default()
                    },
                    report,
                )
                .await;
            pb.finish_and_clear();
            let s = r?;
            print(
                output,
                &json!({"recoveryPoint": rp, "target": target, "files": s.files, "dirs": s.dirs,
                        "symlinks": s.symlinks, "bytes": s.bytes}),
                || {
                    format!(
                        "restored {rp} to {}: {} files, {} folders, {} symlinks, {}",
                        target.display(),
                        s.files,
                        s.dirs,
                        s.symlinks,
                        mb(s.bytes)
                    )
                },
            );
        }
        AgentCommand::SetPassphrase {
            passphrase,
            key_vault_uri,
        } => {
            let mut a = Agent::open(&dir)?;
            let (pass, generated) = passphrase_of(&passphrase)?;
            let keeps = key_vault_uri.is_some() || a.state.key_vault_uri.is_some();
            let shown = generated && !keeps;
            if shown {
                // Shown before it is used: a failure half-way cannot lose it.
                eprintln!(
                    "generated passphrase (store it safely; no key vault keeps it): {}",
                    &*pass
                );
            }
            let id = a.set_passphrase(&pass, key_vault_uri.as_deref()).await?;
            print(
                output,
                &json!({"secretId": id, "generatedPassphrase": shown.then(|| pass.to_string())}),
                || match &id {
                    Some(id) => format!("passphrase changed; kept in the key vault: {id}"),
                    None if shown => format!("passphrase changed; new passphrase: {}", &*pass),
                    None => "passphrase changed".into(),
                },
            );
        }
        AgentCommand::SetMachineSetting {
            key_vault_uri,
            passphrase_file,
        } => {
            let mut a = Agent::open(&dir)?;
            let pass = read_passphrase_file(&passphrase_file)?;
            let id = a.set_passphrase(&pass, Some(&key_vault_uri)).await?;
            print(
                output,
                &json!({"keyVaultUri": key_vault_uri, "secretId": id}),
                || {
                    format!(
                        "key vault {key_vault_uri} set; passphrase kept as {}",
                        id.as_deref().unwrap_or("?")
                    )
                },
            );
        }
        AgentCommand::Machines => {
            let a = Agent::open(&dir)?;
            let v = a.machines().await?;
            print(output, &v, || {
                crate::commands::value_lines(&v, &["name", "registered", "secretId"])
            });
        }
        AgentCommand::Run { interval_seconds } => {
            let mut a = Agent::open(&dir)?;
            eprintln!(
                "kagi agent: {} folder(s), checking every {interval_seconds} s",
                a.state.folders.len()
            );
            loop {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                if let Err(e) = a.refresh() {
                    eprintln!("cannot read the agent state: {e}");
                }
                for f in a.due(now) {
                    match a.backup(&f, Arc::new(|_: &Progress| {})).await {
                        Ok(s) => eprintln!(
                            "scheduled backup of {f}: recovery point {}, {} added",
                            s.snapshot.id,
                            mb(s.bytes_added)
                        ),
                        Err(AgentError::Unreachable(e)) => {
                            eprintln!("scheduled backup of {f}: server unreachable: {e}")
                        }
                        Err(e) => eprintln!("scheduled backup of {f} failed: {e}"),
                    }
                }
                tokio::time::sleep(Duration::from_secs(interval_seconds.max(1))).await;
            }
        }
    }
    Ok(())
}

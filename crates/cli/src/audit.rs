//! `kagi audit`: verify, query and export the audit log.
//!
//! These are local operator tools: they read `<data-dir>/audit/audit.jsonl` directly (no
//! server, no token), so they work while the server is stopped and need read access to the
//! data directory, which is the audit log's only protection besides its hash chain.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use kagi_audit::Filter;
use serde_json::Value;

use crate::client::Output;

/// `kagi audit …`.
#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check the hash chain: exit 0 with "ok: N records, chain intact", or 1 naming the first
    /// bad record.
    Verify {
        /// Verify this file instead of `<data-dir>/audit/audit.jsonl` (an export, say);
        /// repeat it for several.
        #[arg(long)]
        file: Vec<PathBuf>,
        /// Verify the log of every node of a shared store: each node's data directory (its
        /// `audit/audit.jsonl`, a chain of its own); repeat it for each node.
        #[arg(long)]
        node_dir: Vec<PathBuf>,
    },
    /// Show records (a short table, or JSON lines with `--output json`).
    Query(FilterArgs),
    /// Write records as JSON lines, exactly as stored (an unfiltered export still verifies).
    Export {
        /// The file to write (created mode 0600; an existing file is replaced).
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

/// Record filters; every one given must match.
#[derive(Args, Debug)]
struct FilterArgs {
    /// Records at or after this time (RFC 3339, or a date: 2026-01-31).
    #[arg(long)]
    since: Option<String>,
    /// Records at or before this time (RFC 3339, or a date).
    #[arg(long)]
    until: Option<String>,
    /// Operation name (KeyWrap, SecretGet, VaultPut, Authentication, …).
    #[arg(long)]
    operation: Option<String>,
    /// Success or Failure.
    #[arg(long)]
    result: Option<String>,
    /// The caller's object id.
    #[arg(long)]
    caller: Option<String>,
    /// Text contained in the resource id or the object id (a vault or key name, say).
    #[arg(long)]
    resource: Option<String>,
}

impl FilterArgs {
    fn filter(&self) -> anyhow::Result<Filter> {
        let time = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<i64>> {
            v.as_deref()
                .map(|t| {
                    kagi_audit::parse_rfc3339_ms(t).with_context(|| {
                        format!("--{flag} {t:?} is not an RFC 3339 time or a date")
                    })
                })
                .transpose()
        };
        if let Some(r) = &self.result
            && !r.eq_ignore_ascii_case("success")
            && !r.eq_ignore_ascii_case("failure")
        {
            bail!("--result must be Success or Failure, not {r:?}");
        }
        Ok(Filter {
            since_ms: time("since", &self.since)?,
            until_ms: time("until", &self.until)?,
            operation: self.operation.clone(),
            result: self.result.clone(),
            caller_oid: self.caller.clone(),
            resource: self.resource.clone(),
        })
    }
}

/// The audit file of a data directory.
fn audit_file(data_dir: &Path) -> PathBuf {
    data_dir
        .join(kagi_audit::AUDIT_DIR)
        .join(kagi_audit::AUDIT_FILE)
}

/// Runs `kagi audit`.
pub fn run(data_dir: &Path, output: Output, args: AuditArgs) -> anyhow::Result<()> {
    match args.command {
        AuditCommand::Verify { file, node_dir } => {
            let mut paths: Vec<PathBuf> = file;
            paths.extend(node_dir.iter().map(|d| audit_file(d)));
            if paths.is_empty() {
                paths.push(audit_file(data_dir));
            }
            let mut reports = Vec::new();
            let mut total = 0;
            for path in &paths {
                match kagi_audit::verify(path) {
                    Ok(report) => {
                        total += report.records;
                        reports.push(serde_json::json!({"file": path, "ok": true,
                            "records": report.records, "lastHash": report.last_hash}));
                        if !matches!(output, Output::Json) {
                            if paths.len() > 1 {
                                println!("{}:", path.display());
                            }
                            println!("ok: {} records, chain intact", report.records);
                            if !report.last_hash.is_empty() {
                                println!("last hash: {}", report.last_hash);
                            }
                        }
                    }
                    Err(kagi_audit::VerifyError::Broken { line, reason }) => {
                        bail!(
                            "the audit log {} is damaged or was tampered with: record at line \
                             {line}: {reason}",
                            path.display()
                        )
                    }
                    Err(e) => {
                        return Err(anyhow::Error::from(e).context(path.display().to_string()));
                    }
                }
            }
            if matches!(output, Output::Json) {
                if let [one] = reports.as_slice() {
                    println!(
                        "{}",
                        serde_json::json!({"ok": true, "records": one["records"],
                                                      "lastHash": one["lastHash"]})
                    );
                } else {
                    println!(
                        "{}",
                        serde_json::json!({"ok": true, "records": total, "logs": reports})
                    );
                }
            } else if paths.len() > 1 {
                println!(
                    "ok: {total} records in {} logs, every chain intact",
                    paths.len()
                );
            }
            Ok(())
        }
        AuditCommand::Query(f) => {
            let path = audit_file(data_dir);
            let entries = kagi_audit::query(&path, f.filter()?)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            if matches!(output, Output::Table) {
                writeln!(
                    out,
                    "{:>6}  {:<24}  {:<24}  {:<7}  {:>4}  {:<36}  ID",
                    "SEQ", "TIME", "OPERATION", "RESULT", "HTTP", "CALLER"
                )?;
            }
            for entry in entries {
                let entry = entry.map_err(anyhow::Error::msg)?;
                match output {
                    Output::Json => writeln!(out, "{}", entry.raw)?,
                    Output::Table => writeln!(out, "{}", table_row(&entry.record))?,
                }
            }
            out.flush()?;
            Ok(())
        }
        AuditCommand::Export { file, filter } => {
            let path = audit_file(data_dir);
            let entries = kagi_audit::query(&path, filter.filter()?)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&file)
                .with_context(|| format!("cannot create {}", file.display()))?;
            let mut out = std::io::BufWriter::new(f);
            let mut n = 0u64;
            for entry in entries {
                let entry = entry.map_err(anyhow::Error::msg)?;
                writeln!(out, "{}", entry.raw)?;
                n += 1;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"records": n, "file": file.display().to_string()})
                ),
                Output::Table => eprintln!("exported {n} records to {}", file.display()),
            }
            Ok(())
        }
    }
}

fn table_row(r: &Value) -> String {
    let s = |p: &str| {
        r.pointer(p)
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_default()
    };
    format!(
        "{:>6}  {:<24}  {:<24}  {:<7}  {:>4}  {:<36}  {}",
        s("/seq"),
        s("/time"),
        s("/operationName"),
        s("/resultType"),
        s("/httpStatusCode"),
        s("/identity/claim/oid"),
        s("/properties/id"),
    )
}

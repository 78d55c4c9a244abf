//! `kagi keyvault backup` and `kagi keyvault restore`: a whole vault to one encrypted file and
//! back, through the management API's jobs, with progress bars (the job's progress while it
//! runs, then bytes while the file is downloaded or uploaded).
//!
//! The passphrase is never a command-line argument (it would show in `ps`): it is read from a
//! file (`--passphrase-file`, first line) or an environment variable (`--passphrase-env`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::client::Context;
use crate::client::Output;

const ARM_API: &str = "2023-07-01";
const RG_API: &str = "2021-04-01";
/// Header carrying the passphrase of a restore (base64 of its UTF-8 bytes).
const PASSPHRASE_HEADER: &str = "x-kagi-backup-passphrase";

/// How the backup file's key is protected.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct Protection {
    /// A file whose first line is the passphrase (keep it 0600).
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// The name of an environment variable holding the passphrase.
    #[arg(long)]
    passphrase_env: Option<String>,
    /// A versioned RSA key id (https://{vault}.../keys/{name}/{version}) that wraps the file
    /// key; restoring needs unwrapKey on that key, so on another kagi use a passphrase.
    #[arg(long)]
    key_id: Option<String>,
}

/// `kagi keyvault backup`.
#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Vault name.
    #[arg(long)]
    name: String,
    /// Resource group (found by name when omitted).
    #[arg(long)]
    resource_group: Option<String>,
    /// The backup file to write (mode 0600; refused if it exists).
    #[arg(long)]
    file: PathBuf,
    #[command(flatten)]
    protection: Protection,
    /// Argon2id memory in MiB (default 64).
    #[arg(long)]
    kdf_memory_mib: Option<u32>,
    /// Argon2id passes (default 3).
    #[arg(long)]
    kdf_iterations: Option<u32>,
}

/// `kagi keyvault restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Target vault: an existing empty vault, or a new one with --location.
    #[arg(long)]
    name: String,
    /// Resource group (required with --location; found by name otherwise).
    #[arg(long)]
    resource_group: Option<String>,
    /// Create the vault in this region from the backup's settings.
    #[arg(long, requires = "resource_group")]
    location: Option<String>,
    /// The backup file.
    #[arg(long)]
    file: PathBuf,
    #[command(flatten)]
    protection: Protection,
}

fn read_passphrase(p: &Protection) -> anyhow::Result<Option<Zeroizing<String>>> {
    if let Some(path) = &p.passphrase_file {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the passphrase file {}", path.display()))?,
        );
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            bail!("the passphrase file {} is empty", path.display());
        }
        return Ok(Some(Zeroizing::new(line.to_string())));
    }
    if let Some(var) = &p.passphrase_env {
        let v = Zeroizing::new(
            std::env::var(var)
                .with_context(|| format!("the environment variable {var} is not set"))?,
        );
        if v.is_empty() {
            bail!("the environment variable {var} is empty");
        }
        return Ok(Some(v));
    }
    Ok(None)
}

fn error_text(v: &Value) -> String {
    let code = v["code"].as_str().unwrap_or("");
    let inner = v["innererror"]["code"]
        .as_str()
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    format!(
        "{code}{inner}: {}",
        v["message"].as_str().unwrap_or("no detail")
    )
}

fn job_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:10} [{bar:30}] {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

fn bytes_bar(total: u64, msg: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:10} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}

/// Polls a job until it ends, driving a progress bar; returns the ended job or fails with its
/// error.
async fn wait_job(ctx: &Context, job: &Value) -> anyhow::Result<Value> {
    let url = job["statusUrl"]
        .as_str()
        .context("the server answered no job status URL")?
        .to_string();
    let bar = job_bar(0);
    let mut delay = Duration::from_millis(100);
    loop {
        let j = ctx.call(Method::GET, &url, None).await?;
        let p = &j["progress"];
        bar.set_length(p["total"].as_u64().unwrap_or(0));
        bar.set_position(p["done"].as_u64().unwrap_or(0));
        bar.set_message(p["phase"].as_str().unwrap_or("").to_string());
        match j["status"].as_str() {
            Some("Completed") => {
                bar.finish_and_clear();
                return Ok(j);
            }
            Some("Failed") => {
                bar.abandon();
                bail!(
                    "job {} failed: {}",
                    j["id"].as_str().unwrap_or(""),
                    error_text(&j["error"])
                );
            }
            _ => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

fn vault_path(ctx: &Context, rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{name}",
        ctx.subscription
    )
}

fn print(output: Output, v: &Value, line: String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => println!("{line}"),
    }
}

/// Fails with the server's error when a response is not a success.
async fn check(r: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    let status = r.status();
    if status.is_success() {
        return Ok(r);
    }
    let v: Value = r.json().await.unwrap_or(Value::Null);
    bail!("{status} {}", error_text(&v["error"]))
}

/// Runs `kagi keyvault backup`.
pub async fn backup(ctx: &Context, a: BackupArgs) -> anyhow::Result<()> {
    if a.file.exists() {
        bail!("{} exists; choose a new file", a.file.display());
    }
    let vault = ctx.find_vault(&a.name, a.resource_group.as_deref()).await?;
    let id = vault["id"]
        .as_str()
        .context("vault without id")?
        .to_string();
    let mut body = json!({});
    if let Some(kid) = &a.protection.key_id {
        body["keyId"] = json!(kid);
    } else {
        let pass = read_passphrase(&a.protection)?.context("no passphrase")?;
        body["passphrase"] = json!(pass.as_str());
        let mut kdf = json!({});
        if let Some(m) = a.kdf_memory_mib {
            kdf["memoryKiB"] = json!(m.saturating_mul(1024));
        }
        if let Some(t) = a.kdf_iterations {
            kdf["iterations"] = json!(t);
        }
        if kdf.as_object().is_some_and(|o| !o.is_empty()) {
            body["kdf"] = kdf;
        }
    }
    let url = format!("{}{id}/backup?api-version={ARM_API}", ctx.base);
    let job = ctx.call(Method::POST, &url, Some(&body)).await;
    if let Some(p) = body.get_mut("passphrase") {
        // Not kept longer than needed (serde_json strings cannot be zeroized in place).
        *p = Value::Null;
    }
    let job = wait_job(ctx, &job?).await?;
    let result_url = job["resultUrl"]
        .as_str()
        .context("the completed job has no result URL")?;
    let (http, token) = ctx.streaming()?;
    let r = check(
        http.get(result_url)
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("GET {result_url} failed"))?,
    )
    .await?;
    let total = r.content_length().unwrap_or(0);
    let bar = bytes_bar(total, "download");
    let tmp = tmp_path(&a.file);
    let written = download(r, &tmp, &bar).await;
    let written = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if total != 0 && written != total {
        let _ = std::fs::remove_file(&tmp);
        bail!("the download ended after {written} of {total} bytes");
    }
    std::fs::rename(&tmp, &a.file).with_context(|| format!("cannot write {}", a.file.display()))?;
    bar.finish_and_clear();
    let mut out = job["result"].clone();
    out["file"] = json!(a.file.display().to_string());
    out["job"] = job["id"].clone();
    let line = format!(
        "{}: {} keys ({} versions), {} secrets ({} versions), {} role assignments -> {} ({written} bytes)",
        a.name,
        out["keys"],
        out["keyVersions"],
        out["secrets"],
        out["secretVersions"],
        out["roleAssignments"],
        a.file.display()
    );
    print(ctx.output, &out, line);
    Ok(())
}

fn tmp_path(file: &Path) -> PathBuf {
    let mut name = file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".part");
    file.with_file_name(name)
}

async fn download(mut r: reqwest::Response, tmp: &Path, bar: &ProgressBar) -> anyhow::Result<u64> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut n = 0u64;
    while let Some(chunk) = r.chunk().await.context("the download was interrupted")? {
        f.write_all(&chunk)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        n += chunk.len() as u64;
        bar.set_position(n);
    }
    f.sync_all()?;
    Ok(n)
}

/// Runs `kagi keyvault restore`.
pub async fn restore(ctx: &Context, a: RestoreArgs) -> anyhow::Result<()> {
    let size = std::fs::metadata(&a.file)
        .with_context(|| format!("cannot read {}", a.file.display()))?
        .len();
    let passphrase = read_passphrase(&a.protection)?;
    // Check the passphrase here first: a wrong one fails before anything is uploaded.
    if let Some(pass) = &passphrase {
        let path = a.file.clone();
        let pass = pass.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            use kagi_crypto::vault_backup::{BackupFileError, read_header};
            let mut f = std::io::BufReader::new(std::fs::File::open(&path)?);
            let header =
                read_header(&mut f).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            match header.unlock_with_passphrase(pass.as_bytes()) {
                Ok(_) => Ok(()),
                Err(BackupFileError::WrongKey) => bail!(
                    "the passphrase does not open {}; nothing was restored",
                    path.display()
                ),
                Err(e) => bail!("{}: {e}", path.display()),
            }
        })
        .await??;
    }
    let path = match (&a.location, &a.resource_group) {
        (Some(location), Some(rg)) => {
            ctx.call(
                Method::PUT,
                &format!(
                    "{}/subscriptions/{}/resourcegroups/{rg}?api-version={RG_API}",
                    ctx.base, ctx.subscription
                ),
                Some(&json!({"location": location})),
            )
            .await
            .or_else(|e| {
                if e.to_string().contains("InvalidResourceGroupLocation") {
                    Ok(Value::Null)
                } else {
                    Err(e)
                }
            })?;
            vault_path(ctx, rg, &a.name)
        }
        _ => {
            let vault = ctx.find_vault(&a.name, a.resource_group.as_deref()).await?;
            vault["id"]
                .as_str()
                .context("vault without id")?
                .to_string()
        }
    };
    let mut url = reqwest::Url::parse(&format!("{}{path}/restore", ctx.base))?;
    url.query_pairs_mut().append_pair("api-version", ARM_API);
    if let Some(l) = &a.location {
        url.query_pairs_mut().append_pair("location", l);
    }
    if let Some(k) = &a.protection.key_id {
        url.query_pairs_mut().append_pair("keyId", k);
    }
    let (http, token) = ctx.streaming()?;
    let mut req = http
        .post(url.clone())
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header(reqwest::header::CONTENT_LENGTH, size);
    if let Some(pass) = &passphrase {
        let encoded = Zeroizing::new(kagi_core::b64::encode(pass.as_bytes()));
        let mut v = reqwest::header::HeaderValue::from_str(&encoded)?;
        v.set_sensitive(true);
        req = req.header(PASSPHRASE_HEADER, v);
    }
    let bar = bytes_bar(size, "upload");
    let file = tokio::fs::File::open(&a.file)
        .await
        .with_context(|| format!("cannot read {}", a.file.display()))?;
    let counter = bar.clone();
    let stream = futures_util::stream::unfold(file, move |mut f| {
        let counter = counter.clone();
        async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 256 * 1024];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    counter.inc(n as u64);
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        }
    });
    let r = req
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| format!("POST {url} failed"))?;
    bar.finish_and_clear();
    let job: Value = check(r).await?.json().await?;
    let job = wait_job(ctx, &job).await?;
    let out = job["result"].clone();
    let skipped = out["roleAssignments"]["skipped"]
        .as_array()
        .map_or(0, Vec::len)
        + out["accessPolicies"]["skipped"]
            .as_array()
            .map_or(0, Vec::len);
    let line = format!(
        "{}: restored {} keys ({} versions), {} secrets ({} versions), {} role assignments from {}{}",
        a.name,
        out["keys"],
        out["keyVersions"],
        out["secrets"],
        out["secretVersions"],
        out["roleAssignments"]["restored"],
        out["source"]["name"].as_str().unwrap_or("?"),
        if skipped > 0 {
            format!("; {skipped} grants skipped (principals missing here; see --output json)")
        } else {
            String::new()
        }
    );
    if skipped > 0 && matches!(ctx.output, Output::Table) {
        for s in out["roleAssignments"]["skipped"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(
                out["accessPolicies"]["skipped"]
                    .as_array()
                    .into_iter()
                    .flatten(),
            )
        {
            eprintln!("skipped: {s}");
        }
    }
    print(ctx.output, &out, line);
    Ok(())
}

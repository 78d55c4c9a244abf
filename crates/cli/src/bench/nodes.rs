//! `kagi bench nodes`: unwrapKey and secret reads per second spread round-robin over the
//! nodes of one store (docs/SEVERAL_NODES.md), so one run per node count gives the shape of
//! scaling out; the same command against one SQLite node is the baseline.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use reqwest::Method;
use serde_json::json;

use super::http::{BenchVault, load_spread};
use crate::client::{Context, Output};

/// `kagi bench nodes` arguments.
#[derive(Args, Debug)]
pub(super) struct NodesArgs {
    /// The nodes' URLs (`https://localhost:8443,https://localhost:8444`); the CLI's
    /// `--data-dir` holds their shared CA and the administrator's credentials.
    #[arg(long, value_delimiter = ',', required = true)]
    servers: Vec<String>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Requests in flight at once (over all nodes).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Print results as JSON.
    #[arg(long)]
    pub(super) json: bool,
}

/// Makes a vault with an RSA-2048 key and a secret through the first node, waits until every
/// node serves them, measures unwrapKey (RSA-OAEP-256) and secret GET spread over the nodes,
/// and removes the vault.
pub(super) async fn run(data_dir: &Path, args: &NodesArgs) -> anyhow::Result<()> {
    let first = Context::new(&args.servers[0], data_dir, Output::Json).await?;
    let vault =
        BenchVault::create(first, format!("benchn{}", std::process::id()), "standard").await?;
    let measured = measure(data_dir, &vault, args).await;
    vault.remove().await;
    let (unwrap, secret_get) = measured?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "nodes": args.servers.len(), "concurrency": args.concurrency,
                "seconds": args.seconds, "unwrap": unwrap.json(), "secret_get": secret_get.json(),
            }))?
        );
    } else {
        println!(
            "nodes {}  op          ops/s   p50 ms   p99 ms",
            args.servers.len()
        );
        for (op, s) in [("unwrap", &unwrap), ("secret-get", &secret_get)] {
            println!(
                "         {op:<10} {:>8.0} {:>8.2} {:>8.2}",
                s.ops, s.p50_ms, s.p99_ms
            );
        }
    }
    Ok(())
}

async fn measure(
    data_dir: &Path,
    vault: &BenchVault,
    args: &NodesArgs,
) -> anyhow::Result<(super::http::Stats, super::http::Stats)> {
    let kid = vault
        .create_key("unwrap", json!({"kty": "RSA", "key_size": 2048}))
        .await?;
    let key_path = kid
        .strip_prefix(&vault.url)
        .context("the key id is not under the vault's URL")?
        .to_string();
    vault
        .ctx
        .call(
            Method::PUT,
            &format!("{}secrets/bench?api-version=7.6", vault.url),
            Some(&json!({"value": "a secret value of a realistic size, 64 bytes or so......"})),
        )
        .await?;
    let wrapped = vault
        .ctx
        .call(
            Method::POST,
            &format!("{kid}/wrapkey?api-version=7.6"),
            Some(&json!({"alg": "RSA-OAEP-256", "value": kagi_core::b64::encode(&[0x5a; 32])})),
        )
        .await?;
    let name = vault
        .url
        .trim_start_matches("https://")
        .split('.')
        .next()
        .context("vault URL")?
        .to_string();
    let mut nodes = Vec::new();
    for server in &args.servers {
        let ctx = Arc::new(
            Context::new(server, data_dir, Output::Json)
                .await?
                .clone_for_vault(&name)?,
        );
        let url = ctx.vault_url(&name);
        // Every node serves what the first made before the clock starts.
        let started = Instant::now();
        loop {
            let probe = ctx
                .call(
                    Method::GET,
                    &format!("{url}secrets/bench?api-version=7.6"),
                    None,
                )
                .await;
            if probe.is_ok() {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "{server} never served the vault"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        nodes.push((ctx, url));
    }
    let unwrap_targets = nodes
        .iter()
        .map(|(ctx, url)| {
            (
                ctx.clone(),
                format!("{url}{key_path}/unwrapkey?api-version=7.6"),
            )
        })
        .collect();
    let unwrap = load_spread(
        unwrap_targets,
        Method::POST,
        Some(json!({"alg": "RSA-OAEP-256", "value": wrapped["value"]})),
        args.seconds,
        args.concurrency,
    )
    .await?;
    let get_targets = nodes
        .iter()
        .map(|(ctx, url)| (ctx.clone(), format!("{url}secrets/bench?api-version=7.6")))
        .collect();
    let secret_get = load_spread(
        get_targets,
        Method::GET,
        None,
        args.seconds,
        args.concurrency,
    )
    .await?;
    Ok((unwrap, secret_get))
}

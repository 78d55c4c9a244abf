//! `kagi bench`: wrapKey/unwrapKey throughput and latency of a running server over HTTPS with
//! keep-alive, from this (separate) process, beside the raw in-process private-key rate of the
//! same crypto library.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use kagi_crypto::{EncryptionAlgorithm, KeyPair, RsaKeySize};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Context;
use crate::client::Output;

/// `kagi bench` arguments.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// RSA sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "2048,3072,4096")]
    sizes: Vec<u32>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Print results as JSON.
    #[arg(long)]
    json: bool,
}

struct Stats {
    ops: f64,
    p50_ms: f64,
    p99_ms: f64,
    count: usize,
}

fn stats(mut lat: Vec<Duration>, elapsed: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q) as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Stats {
        ops: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        count: lat.len(),
    }
}

async fn load(
    ctx: Arc<Context>,
    url: String,
    body: Value,
    seconds: u64,
    concurrency: usize,
) -> anyhow::Result<Stats> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (ctx, url, body) = (ctx.clone(), url.clone(), body.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                ctx.call(Method::POST, &url, Some(&body)).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok(stats(all, start.elapsed()))
}

/// Raw single-thread OAEP-SHA256 decryptions per second with the same library.
fn raw_rate(key: &KeyPair, seconds: u64) -> anyhow::Result<f64> {
    let ct = key
        .public_key()
        .encrypt(EncryptionAlgorithm::RsaOaep256, &[7u8; 32])?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        key.decrypt(EncryptionAlgorithm::RsaOaep256, &ct)?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Runs the benchmark against `server`.
pub async fn run(server: &str, data_dir: &Path, args: BenchArgs) -> anyhow::Result<()> {
    let base = Context::new(server, data_dir, Output::Json).await?;
    let vault = format!("bench{}", std::process::id());
    let tenant = base
        .call(
            Method::GET,
            &format!("{}/subscriptions?api-version=2021-04-01", base.base),
            None,
        )
        .await?["value"][0]["tenantId"]
        .as_str()
        .context("no subscription visible")?
        .to_string();
    let arm = |p: &str, api: &str| {
        format!(
            "{}/subscriptions/{}{p}?api-version={api}",
            base.base, base.subscription
        )
    };
    base.call(
        Method::PUT,
        &arm("/resourcegroups/bench", "2021-04-01"),
        Some(&json!({"location": "westeurope"})),
    )
    .await?;
    let vault_path = format!("/resourceGroups/bench/providers/Microsoft.KeyVault/vaults/{vault}");
    base.call(
        Method::PUT,
        &arm(&vault_path, "2023-07-01"),
        Some(&json!({"location": "westeurope", "properties": {"tenantId": tenant, "sku": {"family": "A", "name": "standard"}, "softDeleteRetentionInDays": 7}})),
    )
    .await?;
    let ctx = Arc::new(base.clone_for_vault(&vault)?);
    let mut results = Vec::new();
    for bits in &args.sizes {
        let size = RsaKeySize::from_bits(*bits).context("sizes are 2048, 3072 or 4096")?;
        let vurl = ctx.vault_url(&vault);
        let created = ctx
            .call(
                Method::POST,
                &format!("{vurl}keys/rsa{bits}/create?api-version=7.6"),
                Some(&json!({"kty": "RSA", "key_size": bits})),
            )
            .await?;
        let kid = created["key"]["kid"]
            .as_str()
            .context("no kid")?
            .to_string();
        let dek = kagi_core::b64::encode(&[0x5a; 32]);
        let wrap_url = format!("{kid}/wrapkey?api-version=7.6");
        let wrapped = ctx
            .call(
                Method::POST,
                &wrap_url,
                Some(&json!({"alg": "RSA-OAEP-256", "value": dek})),
            )
            .await?;
        let unwrap_body = json!({"alg": "RSA-OAEP-256", "value": wrapped["value"]});
        let wrap = load(
            ctx.clone(),
            wrap_url,
            json!({"alg": "RSA-OAEP-256", "value": dek}),
            args.seconds,
            args.concurrency,
        )
        .await?;
        let unwrap = load(
            ctx.clone(),
            format!("{kid}/unwrapkey?api-version=7.6"),
            unwrap_body,
            args.seconds,
            args.concurrency,
        )
        .await?;
        let key = tokio::task::spawn_blocking(move || KeyPair::generate_rsa(size, None)).await??;
        let raw = tokio::task::spawn_blocking({
            let s = args.seconds;
            move || raw_rate(&key, s)
        })
        .await??;
        results.push(json!({
            "bits": bits,
            "wrap": {"ops_per_s": wrap.ops, "p50_ms": wrap.p50_ms, "p99_ms": wrap.p99_ms, "count": wrap.count},
            "unwrap": {"ops_per_s": unwrap.ops, "p50_ms": unwrap.p50_ms, "p99_ms": unwrap.p99_ms, "count": unwrap.count},
            "raw_private_ops_per_s": raw,
            "unwrap_vs_raw": unwrap.ops / raw,
        }));
    }
    let _ = base
        .call(Method::DELETE, &arm(&vault_path, "2023-07-01"), None)
        .await;
    let _ = base
        .call(
            Method::POST,
            &arm(
                &format!(
                    "/providers/Microsoft.KeyVault/locations/westeurope/deletedVaults/{vault}/purge"
                ),
                "2023-07-01",
            ),
            None,
        )
        .await;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"concurrency": args.concurrency, "seconds": args.seconds, "results": results})
            )?
        );
    } else {
        println!(
            "RSA   op      ops/s     p50 ms   p99 ms   (raw in-process private ops/s, unwrap/raw)"
        );
        for r in &results {
            for op in ["wrap", "unwrap"] {
                println!(
                    "{:<5} {:<7} {:>8.0} {:>8.2} {:>8.2}",
                    r["bits"],
                    op,
                    r[op]["ops_per_s"].as_f64().unwrap_or(0.0),
                    r[op]["p50_ms"].as_f64().unwrap_or(0.0),
                    r[op]["p99_ms"].as_f64().unwrap_or(0.0)
                );
            }
            println!(
                "      raw     {:>8.0}                    unwrap/raw = {:.0}%",
                r["raw_private_ops_per_s"].as_f64().unwrap_or(0.0),
                100.0 * r["unwrap_vs_raw"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

//! `kagi bench`: wrapKey/unwrapKey throughput and latency of a running server over HTTPS with
//! keep-alive, from this (separate) process, beside the raw in-process private-key rate of the
//! same crypto library. `kagi bench hsm-raw` and `kagi bench hsm` measure a PKCS#11 token's
//! keys the same way ([`hsm`]).

mod hsm;
mod http;
mod nodes;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use kagi_crypto::{EncryptionAlgorithm, KeyPair, RsaKeySize};
use reqwest::Method;
use serde_json::{Value, json};

use self::http::{BenchVault, load};
use crate::client::Context;
use crate::client::Output;

/// `kagi bench` arguments: without a subcommand, wrapKey/unwrapKey of software RSA keys.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// Another measurement than wrapKey/unwrapKey of software keys.
    #[command(subcommand)]
    mode: Option<BenchMode>,
    /// RSA sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "2048,3072,4096")]
    sizes: Vec<u32>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Print results as JSON (as `--output json` does).
    #[arg(long)]
    json: bool,
}

/// The other measurements of `kagi bench`.
#[derive(Subcommand, Debug)]
enum BenchMode {
    /// RSA-OAEP decryption and RS256 signing per second of a key inside a PKCS#11 token,
    /// called directly from this process with N threads: the token's raw rate.
    HsmRaw(hsm::RawArgs),
    /// unwrapKey (RSA-OAEP) and sign (RS256) per second of an RSA-HSM key in a premium vault
    /// over HTTPS (and of a software RSA key beside it), N requests in flight.
    Hsm(hsm::HttpsArgs),
    /// unwrapKey and secret reads per second spread round-robin over the nodes of one store.
    Nodes(nodes::NodesArgs),
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

/// Runs the benchmark named by `args` against `server` (`hsm-raw` needs no server).
/// `--output json` asks for what `--json` does.
pub async fn run(
    server: &str,
    data_dir: &Path,
    output: Output,
    mut args: BenchArgs,
) -> anyhow::Result<()> {
    let json = args.json || matches!(output, Output::Json);
    args.json = json;
    match args.mode.take() {
        // The token's calls block: off the async workers, as the server's key generation.
        Some(BenchMode::HsmRaw(mut raw)) => {
            raw.json |= json;
            tokio::task::spawn_blocking(move || hsm::run_raw(&raw)).await?
        }
        Some(BenchMode::Hsm(mut https)) => {
            https.json |= json;
            hsm::run_https(server, data_dir, &https).await
        }
        Some(BenchMode::Nodes(mut n)) => {
            n.json |= json;
            nodes::run(data_dir, &n).await
        }
        None => run_rsa(server, data_dir, &args).await,
    }
}

/// wrapKey/unwrapKey of software RSA keys of each size, beside aws-lc's raw rate.
async fn run_rsa(server: &str, data_dir: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let base = Context::new(server, data_dir, Output::Json).await?;
    let vault =
        BenchVault::create(base, format!("bench{}", std::process::id()), "standard").await?;
    let measured = measure_rsa(&vault, args).await;
    vault.remove().await;
    let results = measured?;
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

async fn measure_rsa(vault: &BenchVault, args: &BenchArgs) -> anyhow::Result<Vec<Value>> {
    let mut results = Vec::new();
    for bits in &args.sizes {
        let size = RsaKeySize::from_bits(*bits).context("sizes are 2048, 3072 or 4096")?;
        let kid = vault
            .create_key(
                &format!("rsa{bits}"),
                json!({"kty": "RSA", "key_size": bits}),
            )
            .await?;
        let ctx = &vault.ctx;
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
            "wrap": wrap.json(),
            "unwrap": unwrap.json(),
            "raw_private_ops_per_s": raw,
            "unwrap_vs_raw": unwrap.ops / raw,
        }));
    }
    Ok(results)
}

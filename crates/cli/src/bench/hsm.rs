//! `kagi bench hsm-raw` and `kagi bench hsm`: the private-key rate of a PKCS#11 token called
//! directly from this process, and unwrapKey/sign of an RSA-HSM key over HTTPS, so the two can
//! be compared in one run (scripts/bench-hsm.sh, docs/BENCHMARKS.md).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use kagi_crypto::{
    EncryptionAlgorithm, KeyPair, KeySpec, PrivateKeyOps, RsaKeySize, SignatureAlgorithm,
};
use reqwest::Method;
use serde_json::{Value, json};

use super::http::{BenchVault, load};
use crate::client::{Context, Output};
use crate::hsm::Pkcs11Args;

/// The data key every unwrap recovers.
const DEK: [u8; 32] = [0x5a; 32];
/// The digest every signature signs (a SHA-256 digest's length).
const DIGEST: [u8; 32] = [0x42; 32];

/// `kagi bench hsm-raw` arguments.
#[derive(Args, Debug)]
pub(crate) struct RawArgs {
    /// The token to measure, as `kagi server` opens it.
    #[command(flatten)]
    pkcs11: Pkcs11Args,
    /// RSA size of the key generated in the token.
    #[arg(long, default_value_t = 2048)]
    size: u32,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Threads calling the token at once; one measurement per number given.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    threads: Vec<usize>,
    /// Also measure a software (aws-lc) key of the same size, as kagi's RSA keys use.
    #[arg(long)]
    software: bool,
    /// Print results as JSON (as `--output json` does).
    #[arg(long)]
    pub(crate) json: bool,
}

/// `kagi bench hsm` arguments.
#[derive(Args, Debug)]
pub(crate) struct HttpsArgs {
    /// RSA size of the keys.
    #[arg(long, default_value_t = 2048)]
    size: u32,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Requests in flight at once (one task and connection each); one measurement per
    /// number given.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    concurrency: Vec<usize>,
    /// Operations to measure: `unwrap`, `sign`, and `wrap` (a public-key operation on the
    /// RSA-HSM key's public half in kagi's memory: the cost of a request without its key).
    #[arg(long, value_delimiter = ',', default_value = "unwrap,sign,wrap")]
    ops: Vec<String>,
    /// Leave out the software RSA key measured beside the RSA-HSM key.
    #[arg(long)]
    no_software: bool,
    /// Print results as JSON (as `--output json` does).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Operations per second of `op` called by `threads` threads at once for `seconds`.
fn rate(
    threads: usize,
    seconds: u64,
    op: &(dyn Fn() -> anyhow::Result<()> + Sync),
) -> anyhow::Result<f64> {
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let counts = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        if let Err(e) = op() {
                            // The others stop too: a failing token gives no figure.
                            stop.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<u64>>>()
    })?;
    Ok(counts.iter().sum::<u64>() as f64 / start.elapsed().as_secs_f64())
}

/// Checks once that the key decrypts and signs correctly, then measures RSA-OAEP (SHA-1)
/// decryption and RS256 signing with each thread count.
fn measure_key(
    source: &str,
    key: &dyn PrivateKeyOps,
    threads: &[usize],
    seconds: u64,
) -> anyhow::Result<Vec<Value>> {
    let ct = key
        .public_key()
        .encrypt(EncryptionAlgorithm::RsaOaep, &DEK)?;
    anyhow::ensure!(
        key.decrypt(EncryptionAlgorithm::RsaOaep, &ct)?.as_slice() == DEK,
        "{source}: RSA-OAEP decryption gave another plaintext"
    );
    let sig = key.sign_digest(SignatureAlgorithm::RS256, &DIGEST)?;
    anyhow::ensure!(
        key.public_key()
            .verify_digest(SignatureAlgorithm::RS256, &DIGEST, &sig)?,
        "{source}: the RS256 signature does not verify"
    );
    let mut out = Vec::new();
    for &t in threads {
        let unwrap = rate(t, seconds, &|| {
            key.decrypt(EncryptionAlgorithm::RsaOaep, &ct)?;
            Ok(())
        })?;
        let sign = rate(t, seconds, &|| {
            key.sign_digest(SignatureAlgorithm::RS256, &DIGEST)?;
            Ok(())
        })?;
        out.push(json!({"source": source, "op": "unwrap", "threads": t, "ops_per_s": unwrap}));
        out.push(json!({"source": source, "op": "sign", "threads": t, "ops_per_s": sign}));
    }
    Ok(out)
}

/// `kagi bench hsm-raw`: generates an RSA key in the token, measures it and destroys it.
pub(crate) fn run_raw(args: &RawArgs) -> anyhow::Result<()> {
    let size = RsaKeySize::from_bits(args.size).context("--size is 2048, 3072 or 4096")?;
    let provider = args.pkcs11.open()?.context(
        "kagi bench hsm-raw needs --pkcs11-module, --pkcs11-token and --pkcs11-pin-file",
    )?;
    let key = provider.generate(KeySpec::Rsa(size))?;
    let measured = measure_key("token", key.ops.as_ref(), &args.threads, args.seconds);
    // The key goes whatever the measurement gave: the token is not left with a stray object.
    let destroyed = provider.destroy(&key.reference);
    let mut results = measured?;
    destroyed?;
    if args.software {
        let soft = KeyPair::generate_rsa(size, None)?;
        results.extend(measure_key("software", &soft, &args.threads, args.seconds)?);
    }
    if args.json {
        let doc = json!({
            "token": provider.describe(),
            "bits": args.size,
            "seconds": args.seconds,
            "results": results,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "# {} RSA-{}, in process, {}s per measurement",
        provider.describe(),
        args.size,
        args.seconds
    );
    println!("source    op      threads     ops/s");
    for r in &results {
        println!(
            "{:<9} {:<7} {:>7} {:>9.0}",
            r["source"].as_str().unwrap_or(""),
            r["op"].as_str().unwrap_or(""),
            r["threads"].as_u64().unwrap_or(0),
            r["ops_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// One operation over HTTPS: its URL and body, and the key it runs on.
struct Request {
    key: &'static str,
    op: &'static str,
    url: String,
    body: Value,
}

/// The requests measured on key `kid` (one unwrapKey ciphertext made by wrapKey first).
async fn requests(
    ctx: &Context,
    key: &'static str,
    kid: &str,
    with_wrap: bool,
) -> anyhow::Result<Vec<Request>> {
    let dek = kagi_core::b64::encode(&DEK);
    let wrap_url = format!("{kid}/wrapkey?api-version=7.6");
    let wrap_body = json!({"alg": "RSA-OAEP", "value": dek});
    let wrapped = ctx.call(Method::POST, &wrap_url, Some(&wrap_body)).await?;
    let mut out = vec![
        Request {
            key,
            op: "unwrap",
            url: format!("{kid}/unwrapkey?api-version=7.6"),
            body: json!({"alg": "RSA-OAEP", "value": wrapped["value"]}),
        },
        Request {
            key,
            op: "sign",
            url: format!("{kid}/sign?api-version=7.6"),
            body: json!({"alg": "RS256", "value": kagi_core::b64::encode(&DIGEST)}),
        },
    ];
    if with_wrap {
        // A public-key operation in kagi's memory: what a request costs without the key.
        out.push(Request {
            key,
            op: "wrap",
            url: wrap_url,
            body: wrap_body,
        });
    }
    Ok(out)
}

/// `kagi bench hsm`: a premium vault with an RSA-HSM key (and a software RSA key), their
/// unwrapKey and sign over HTTPS at each concurrency, then the vault purged.
pub(crate) async fn run_https(
    server: &str,
    data_dir: &Path,
    args: &HttpsArgs,
) -> anyhow::Result<()> {
    let size = RsaKeySize::from_bits(args.size).context("--size is 2048, 3072 or 4096")?;
    let base = Context::new(server, data_dir, Output::Json).await?;
    let vault =
        BenchVault::create(base, format!("benchhsm{}", std::process::id()), "premium").await?;
    let measured = measure_https(&vault, size, args).await;
    vault.remove().await;
    let results = measured?;
    if args.json {
        let doc = json!({"bits": args.size, "seconds": args.seconds, "results": results});
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "# RSA-{} over HTTPS, {}s per measurement",
        args.size, args.seconds
    );
    println!("key       op      in flight     ops/s   p50 ms   p99 ms");
    for r in &results {
        println!(
            "{:<9} {:<7} {:>9} {:>9.0} {:>8.2} {:>8.2}",
            r["key"].as_str().unwrap_or(""),
            r["op"].as_str().unwrap_or(""),
            r["concurrency"].as_u64().unwrap_or(0),
            r["ops_per_s"].as_f64().unwrap_or(0.0),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

async fn measure_https(
    vault: &BenchVault,
    size: RsaKeySize,
    args: &HttpsArgs,
) -> anyhow::Result<Vec<Value>> {
    let bits = size.bits();
    let hsm_kid = vault
        .create_key(
            &format!("hsm{bits}"),
            json!({"kty": "RSA-HSM", "key_size": bits}),
        )
        .await?;
    let mut reqs = requests(&vault.ctx, "hsm", &hsm_kid, true).await?;
    if !args.no_software {
        let soft_kid = vault
            .create_key(
                &format!("sw{bits}"),
                json!({"kty": "RSA", "key_size": bits}),
            )
            .await?;
        reqs.extend(requests(&vault.ctx, "software", &soft_kid, false).await?);
    }
    reqs.retain(|r| args.ops.iter().any(|o| o == r.op));
    anyhow::ensure!(!reqs.is_empty(), "--ops names none of unwrap, sign, wrap");
    let mut results = Vec::new();
    for &c in &args.concurrency {
        for r in &reqs {
            let s = load(
                vault.ctx.clone(),
                r.url.clone(),
                r.body.clone(),
                args.seconds,
                c.max(1),
            )
            .await?;
            let mut v = s.json();
            v["key"] = json!(r.key);
            v["op"] = json!(r.op);
            v["concurrency"] = json!(c.max(1));
            results.push(v);
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_every_thread_and_stops_on_error() {
        let ops = rate(2, 1, &|| Ok(())).unwrap();
        assert!(ops > 1000.0, "{ops}");
        let failed = rate(2, 5, &|| anyhow::bail!("token gone"));
        assert!(failed.unwrap_err().to_string().contains("token gone"));
    }

    #[test]
    fn software_key_measures_both_operations() {
        let key = KeyPair::generate_rsa(RsaKeySize::Rsa2048, None).unwrap();
        let r = measure_key("software", &key, &[1, 2], 1).unwrap();
        let ops: Vec<_> = r
            .iter()
            .map(|v| (v["op"].as_str().unwrap(), v["threads"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            ops,
            [("unwrap", 1), ("sign", 1), ("unwrap", 2), ("sign", 2)]
        );
        assert!(r.iter().all(|v| v["ops_per_s"].as_f64().unwrap() > 0.0));
    }
}

//! What every HTTPS benchmark shares: a throwaway vault to measure in, and a closed loop of
//! requests from concurrent tasks of this process with their latencies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Context;

/// Throughput and latency of one measurement.
pub(super) struct Stats {
    /// Requests answered per second.
    pub(super) ops: f64,
    /// Median latency.
    pub(super) p50_ms: f64,
    /// 99th-percentile latency.
    pub(super) p99_ms: f64,
    /// Requests answered.
    pub(super) count: usize,
}

impl Stats {
    /// The figures as JSON.
    pub(super) fn json(&self) -> Value {
        json!({"ops_per_s": self.ops, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "count": self.count})
    }
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

/// `concurrency` tasks each POST `body` to `url` again as soon as the answer arrives, for
/// `seconds`; the client keeps one connection per task alive.
pub(super) async fn load(
    ctx: Arc<Context>,
    url: String,
    body: Value,
    seconds: u64,
    concurrency: usize,
) -> anyhow::Result<Stats> {
    load_spread(
        vec![(ctx, url)],
        Method::POST,
        Some(body),
        seconds,
        concurrency,
    )
    .await
}

/// `concurrency` tasks each send `method` (with `body`) again as soon as the answer arrives,
/// for `seconds`, each request to the next of `targets` in turn (task `i` starting at target
/// `i`): the same work spread round-robin over several nodes.
pub(super) async fn load_spread(
    targets: Vec<(Arc<Context>, String)>,
    method: Method,
    body: Option<Value>,
    seconds: u64,
    concurrency: usize,
) -> anyhow::Result<Stats> {
    anyhow::ensure!(!targets.is_empty(), "no server to measure");
    let targets = Arc::new(targets);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let (targets, method, body) = (targets.clone(), method.clone(), body.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut next = task;
            while Instant::now() < deadline {
                let (ctx, url) = &targets[next % targets.len()];
                next += 1;
                let t = Instant::now();
                ctx.call(method.clone(), url, body.as_ref()).await?;
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

/// A key vault made for one benchmark run, in resource group `bench`.
pub(super) struct BenchVault {
    base: Context,
    path: String,
    name: String,
    /// A client that reaches the vault's host.
    pub(super) ctx: Arc<Context>,
    /// The vault's URL, with a trailing slash.
    pub(super) url: String,
}

impl BenchVault {
    fn arm(base: &Context, path: &str, api: &str) -> String {
        format!(
            "{}/subscriptions/{}{path}?api-version={api}",
            base.base, base.subscription
        )
    }

    /// Makes vault `name` with `sku` (`standard` or `premium`) as the CLI's user.
    pub(super) async fn create(base: Context, name: String, sku: &str) -> anyhow::Result<Self> {
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
        base.call(
            Method::PUT,
            &Self::arm(&base, "/resourcegroups/bench", "2021-04-01"),
            Some(&json!({"location": "westeurope"})),
        )
        .await?;
        let path = format!("/resourceGroups/bench/providers/Microsoft.KeyVault/vaults/{name}");
        base.call(
            Method::PUT,
            &Self::arm(&base, &path, "2023-07-01"),
            Some(&json!({"location": "westeurope", "properties": {"tenantId": tenant, "sku": {"family": "A", "name": sku}, "softDeleteRetentionInDays": 7}})),
        )
        .await?;
        let ctx = Arc::new(base.clone_for_vault(&name)?);
        let url = ctx.vault_url(&name);
        Ok(Self {
            base,
            path,
            name,
            ctx,
            url,
        })
    }

    /// Creates key `name` with the body `params` (`kty`, `key_size`) and returns its kid.
    pub(super) async fn create_key(&self, name: &str, params: Value) -> anyhow::Result<String> {
        let created = self
            .ctx
            .call(
                Method::POST,
                &format!("{}keys/{name}/create?api-version=7.6", self.url),
                Some(&params),
            )
            .await?;
        created["key"]["kid"]
            .as_str()
            .map(str::to_string)
            .context("no kid in the created key")
    }

    /// Deletes and purges the vault (and with it its keys, HSM objects included). Failures
    /// are ignored: the benchmark's figures are what matters, and a leftover vault of a
    /// throwaway server harms nothing.
    pub(super) async fn remove(self) {
        let _ = self
            .base
            .call(
                Method::DELETE,
                &Self::arm(&self.base, &self.path, "2023-07-01"),
                None,
            )
            .await;
        let purge = format!(
            "/providers/Microsoft.KeyVault/locations/westeurope/deletedVaults/{}/purge",
            self.name
        );
        let _ = self
            .base
            .call(
                Method::POST,
                &Self::arm(&self.base, &purge, "2023-07-01"),
                None,
            )
            .await;
    }
}

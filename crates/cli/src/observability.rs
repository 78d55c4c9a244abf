//! The server's logs and metrics: `--log-format text|json` (tracing on stderr; JSON puts one
//! object per line, each request's lines inside a `request` span carrying the audit record's
//! request id) and `--metrics-listen ADDR:PORT` (Prometheus metrics on a plain-HTTP listener
//! of their own). docs/METRICS.md describes both.

use std::sync::Arc;

/// How log lines are written on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines (tracing's default format).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (with `message`),
    /// and `span`/`spans` (a request's `request_id`).
    Json,
}

/// Installs the process's log subscriber: `KAGI_LOG` filters (default `info`).
pub(crate) fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KAGI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// With `--metrics-listen AT`: counts the server's requests, cryptographic operations, audit
/// batches and gauges, and serves them at `http://AT/metrics` (every address `AT` resolves
/// to). Without it, nothing is counted.
pub(crate) async fn serve_metrics(
    at: Option<&str>,
    platform: &Arc<kagi_vault::Platform>,
    services: &kagi_http::Services,
    audit: &kagi_audit::AuditLog,
) -> anyhow::Result<()> {
    let Some(at) = at else {
        return Ok(());
    };
    let (addrs, _) = crate::listen_addrs(at)?;
    let metrics = Arc::new(kagi_metrics::Metrics::new());
    for addr in addrs {
        let bound = kagi_metrics::serve(addr, metrics.clone())
            .await
            .map_err(|e| anyhow::anyhow!("--metrics-listen {at}: {e}"))?;
        println!("  metrics (Prometheus, plain HTTP): http://{bound}/metrics");
    }
    kagi_http::enable_metrics(platform.clone(), services, audit, metrics);
    Ok(())
}

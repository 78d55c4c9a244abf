//! kagi's Prometheus metrics (`kagi server --metrics-listen ADDR:PORT`).
//!
//! [`Metrics`] holds one server's registry: nothing here is global, so every test (and every
//! server in one process) has its own. The HTTP layer counts requests and cryptographic
//! operations into it, the audit log reports its batches, and [`GaugeSource`]s (the platform
//! and the storage services) are asked for their gauges when `/metrics` is scraped.
//! [`serve`] answers `GET /metrics` on a plain-HTTP listener of its own.
//!
//! Labels are bounded: operation names come from kagi's route tables (a name a provider or
//! ARM's generic naming derives from the path is admitted up to [`MAX_OPERATIONS`], then
//! counted as `Other`), statuses are HTTP codes, key types and operations are Key Vault's
//! fixed sets. No vault, key or resource name and no request id is ever a label.
//!
//! The metrics are listed in docs/METRICS.md.

#![forbid(unsafe_code)]

mod listener;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kagi_core::gauge::GaugeSample;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use listener::{MetricsError, serve};

/// Most distinct operation names taken from request paths (management operations named by
/// ARM's generic rule); later new names are counted as [`OTHER_OPERATION`].
pub const MAX_OPERATIONS: usize = 256;
/// The operation label of requests past [`MAX_OPERATIONS`].
pub const OTHER_OPERATION: &str = "Other";
/// The content type of the exposition (the OpenMetrics text format, which Prometheus scrapes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the request latency histogram.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// An operation name, as the audit record names the request.
#[derive(Clone, Copy, Debug)]
pub enum OperationName<'a> {
    /// From a fixed table in kagi's code (the route tables): always a label.
    Fixed(&'static str),
    /// Derived from the request (a provider's name or ARM's generic one): a label while fewer
    /// than [`MAX_OPERATIONS`] such names have been seen, else [`OTHER_OPERATION`].
    Derived(&'a str),
}

/// What reports gauges at scrape time.
pub trait GaugeSource: Send + Sync + std::fmt::Debug {
    /// The current samples (computed from memory: a scrape must stay cheap).
    fn gauges(&self) -> Vec<GaugeSample>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    operation: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CryptoLabels {
    kty: String,
    op: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS.iter().copied())
}

/// The metrics of one server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: HistogramFamily<OperationLabel>,
    crypto: Family<CryptoLabels, Counter>,
    audit_batch: Histogram,
    audit_sync: Histogram,
    derived_operations: Mutex<HashSet<String>>,
    sources: Arc<Sources>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry with every metric kagi exports.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "kagi_http_requests",
            "HTTPS requests answered, by operation (the audit record's operationName) and HTTP status.",
            requests.clone(),
        );
        let durations: HistogramFamily<OperationLabel> =
            Family::new_with_constructor(request_histogram);
        registry.register(
            "kagi_http_request_duration_seconds",
            "Time from a request's arrival to its answer (audit record written), by operation.",
            durations.clone(),
        );
        let crypto = Family::<CryptoLabels, Counter>::default();
        registry.register(
            "kagi_crypto_operations",
            "Cryptographic operations with vault keys that succeeded, by key type and operation.",
            crypto.clone(),
        );
        let audit_batch = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "kagi_audit_batch_records",
            "Audit records written per batch (one write and one fdatasync each).",
            audit_batch.clone(),
        );
        let audit_sync = Histogram::new(exponential_buckets(0.0001, 2.5, 12));
        registry.register(
            "kagi_audit_fsync_duration_seconds",
            "Time to write and fdatasync one audit batch.",
            audit_sync.clone(),
        );
        let sources = Arc::new(Sources::default());
        registry.register_collector(Box::new(sources.clone()));
        Self {
            registry,
            requests,
            durations,
            crypto,
            audit_batch,
            audit_sync,
            derived_operations: Mutex::new(HashSet::new()),
            sources,
        }
    }

    /// Counts one answered request.
    pub fn observe_request(&self, operation: OperationName<'_>, status: u16, elapsed: Duration) {
        let operation = match operation {
            OperationName::Fixed(name) => name.to_string(),
            OperationName::Derived(name) => self.derived_label(name),
        };
        self.requests
            .get_or_create(&RequestLabels {
                operation: operation.clone(),
                status: status.to_string(),
            })
            .inc();
        self.durations
            .get_or_create(&OperationLabel { operation })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one successful cryptographic operation (`kty`: `RSA`, `RSA-HSM`, `EC`,
    /// `EC-HSM`; `op`: `encrypt`, `decrypt`, `wrapkey`, `unwrapkey`, `sign`, `verify`).
    pub fn observe_crypto(&self, kty: &'static str, op: &'static str) {
        self.crypto
            .get_or_create(&CryptoLabels {
                kty: kty.to_string(),
                op: op.to_string(),
            })
            .inc();
    }

    /// Records one audit batch: how many records it held and how long its write and
    /// `fdatasync` took.
    pub fn observe_audit_batch(&self, records: usize, sync: Duration) {
        #[allow(clippy::cast_precision_loss)] // a batch holds at most a few thousand records
        self.audit_batch.observe(records as f64);
        self.audit_sync.observe(sync.as_secs_f64());
    }

    /// Adds a source of gauges, asked at every scrape.
    pub fn add_source(&self, source: Arc<dyn GaugeSource>) {
        self.sources
            .0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(source);
    }

    /// The exposition: every metric in the OpenMetrics text format, ending with `# EOF`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String fails only if an encoder refuses its input.
            tracing::warn!(error = %e, "metrics exposition not complete");
        }
        out
    }

    /// The label for a derived operation name: its printable identifier characters, if it is
    /// one of the first [`MAX_OPERATIONS`] seen, else [`OTHER_OPERATION`].
    fn derived_label(&self, name: &str) -> String {
        let clean: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '_' | '-'))
            .take(128)
            .collect();
        if clean.is_empty() {
            return "UnknownOperation".into();
        }
        let mut known = self
            .derived_operations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if known.contains(&clean) {
            return clean;
        }
        if known.len() >= MAX_OPERATIONS {
            return OTHER_OPERATION.into();
        }
        known.insert(clean.clone());
        clean
    }
}

/// The gauge sources of a registry, rendered as one collector.
#[derive(Debug, Default)]
struct Sources(RwLock<Vec<Arc<dyn GaugeSource>>>);

/// Whether `name` may be a metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sources = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        // One descriptor per name, whichever sources report it.
        let mut by_name: BTreeMap<&'static str, (&'static str, Vec<GaugeSample>)> = BTreeMap::new();
        for source in sources {
            for sample in source.gauges() {
                if !valid_metric_name(sample.name) {
                    continue;
                }
                by_name
                    .entry(sample.name)
                    .or_insert_with(|| (sample.help, Vec::new()))
                    .1
                    .push(sample);
            }
        }
        for (name, (help, samples)) in by_name {
            let mut metric = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for sample in samples {
                let labels: Vec<(&str, &str)> = sample
                    .labels
                    .iter()
                    .map(|(k, v)| (*k, v.as_str()))
                    .collect();
                ConstGauge::new(sample.value).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl GaugeSource for Fixed {
        fn gauges(&self) -> Vec<GaugeSample> {
            vec![
                GaugeSample::new("kagi_disks_open", "Disks open.", 2),
                GaugeSample::new("kagi_jobs", "Jobs.", 1)
                    .label("kind", "VaultBackup")
                    .label("state", "InProgress"),
                GaugeSample::new("bad name", "Skipped.", 1),
            ]
        }
    }

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.observe_request(
            OperationName::Fixed("KeyWrap"),
            200,
            Duration::from_millis(3),
        );
        m.observe_request(
            OperationName::Derived("Microsoft.Resources/subscriptions/resourceGroups/write"),
            201,
            Duration::from_millis(30),
        );
        m.observe_crypto("RSA", "wrapkey");
        m.observe_audit_batch(3, Duration::from_micros(800));
        m.add_source(Arc::new(Fixed));
        let text = m.render();
        assert!(
            text.contains(r#"kagi_http_requests_total{operation="KeyWrap",status="200"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"kagi_http_requests_total{operation="Microsoft.Resources/subscriptions/resourceGroups/write",status="201"} 1"#
        ));
        assert!(
            text.contains(r#"kagi_http_request_duration_seconds_count{operation="KeyWrap"} 1"#)
        );
        assert!(text.contains(r#"kagi_crypto_operations_total{kty="RSA",op="wrapkey"} 1"#));
        assert!(text.contains("kagi_audit_batch_records_count 1"));
        assert!(text.contains("kagi_audit_fsync_duration_seconds_count 1"));
        assert!(text.contains("kagi_disks_open 2"));
        assert!(text.contains(r#"kagi_jobs{kind="VaultBackup",state="InProgress"} 1"#));
        assert!(!text.contains("bad name"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn derived_operations_are_bounded() {
        let m = Metrics::new();
        for i in 0..(MAX_OPERATIONS + 10) {
            m.observe_request(
                OperationName::Derived(&format!("X/{i}/read")),
                404,
                Duration::ZERO,
            );
        }
        // Known names keep their label; fixed ones are never capped.
        m.observe_request(OperationName::Derived("X/0/read"), 404, Duration::ZERO);
        m.observe_request(OperationName::Fixed("KeyGet"), 404, Duration::ZERO);
        let text = m.render();
        assert!(text.contains(r#"kagi_http_requests_total{operation="Other",status="404"} 10"#));
        assert!(text.contains(r#"kagi_http_requests_total{operation="X/0/read",status="404"} 2"#));
        assert!(text.contains(r#"kagi_http_requests_total{operation="KeyGet",status="404"} 1"#));
        let fresh = Metrics::new();
        assert_eq!(fresh.derived_label("\"}{"), "UnknownOperation");
        assert_eq!(fresh.derived_label("a\"b"), "ab");
    }
}

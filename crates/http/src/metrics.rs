//! Metrics of one server (`kagi server --metrics-listen`): [`enable_metrics`] connects a
//! [`kagi_metrics::Metrics`] registry to the HTTPS front (requests by operation and status,
//! cryptographic operations by key type), the audit log (batches) and, at scrape time, the
//! platform's jobs and the storage services' gauges.

use std::sync::Arc;
use std::time::Duration;

use kagi_audit::{AuditLog, BatchObserver};
use kagi_core::gauge::GaugeSample;
use kagi_metrics::{GaugeSource, Metrics};
use kagi_vault::{Platform, Principal};

use crate::Services;

/// Counts into `metrics` from now on: every request `services` reaches, every successful
/// cryptographic operation, every batch of `audit`, and, at each scrape, the jobs of
/// `platform` and the gauges of every registered provider (those registered later too).
pub fn enable_metrics(
    platform: Arc<Platform>,
    services: &Services,
    audit: &AuditLog,
    metrics: Arc<Metrics>,
) {
    services.set_metrics(metrics.clone());
    if !audit.set_observer(Arc::new(AuditBatches(metrics.clone()))) {
        tracing::warn!("the audit log already reports to another registry");
    }
    metrics.add_source(Arc::new(ServerGauges {
        platform,
        services: services.clone(),
    }));
}

/// Audit batches, into the registry.
#[derive(Debug)]
struct AuditBatches(Arc<Metrics>);

impl BatchObserver for AuditBatches {
    fn batch_written(&self, records: usize, sync: Duration) {
        self.0.observe_audit_batch(records, sync);
    }
}

/// The gauges computed at scrape time: the platform's jobs and each provider's.
#[derive(Debug)]
struct ServerGauges {
    platform: Arc<Platform>,
    services: Services,
}

impl GaugeSource for ServerGauges {
    fn gauges(&self) -> Vec<GaugeSample> {
        let mut all = self.platform.job_gauges();
        for provider in self.services.providers() {
            all.extend(provider.gauges());
        }
        all
    }
}

/// Counts a data-plane request that succeeded, if it was a cryptographic operation, under
/// its key's type. Does nothing when metrics are off.
pub(crate) fn count_crypto(
    services: Option<&Services>,
    platform: &Platform,
    caller: &Principal,
    vault: &str,
    method: &str,
    path: &str,
) {
    use kagi_core::routes::DataPlaneRoute;
    let Some(metrics) = services.and_then(Services::metrics) else {
        return;
    };
    if let Ok(route @ DataPlaneRoute::KeyCrypto(_, _, op)) = DataPlaneRoute::parse(method, path)
        && let Some(kty) = platform.crypto_key_type(caller, vault, &route)
    {
        metrics.observe_crypto(kty.as_str(), op.segment());
    }
}

//! The storage services the server hands their requests to, besides the key vault (which the
//! platform serves): a registry of [`ResourceProvider`]s by ARM namespace, built by whoever
//! starts the server (`kagi server`, the test harness) and reaching each request through its
//! extensions. The management router hands a provider the requests of its route table; none
//! names a service.

use std::sync::{Arc, RwLock};

use kagi_host::ResourceProvider;

/// Resource types of the storage services to come (disk encryption sets, SQL servers):
/// trusted by vault firewalls already, as kagi listed them before their providers existed.
const PLANNED_TRUSTED_TYPES: &[&str] = &[
    "Microsoft.Compute/diskEncryptionSets",
    "Microsoft.Sql/servers",
];

/// The storage services of one server, by namespace. Cloning shares them.
#[derive(Clone, Debug, Default)]
pub struct Services {
    providers: Arc<RwLock<Vec<Arc<dyn ResourceProvider>>>>,
    read_only: crate::read_only::ReadOnlyFlag,
    /// Where requests and cryptographic operations are counted (`--metrics-listen`).
    metrics: Arc<std::sync::OnceLock<Arc<kagi_metrics::Metrics>>>,
}

impl Services {
    /// The services of `providers` (one per namespace; a later one of a namespace replaces an
    /// earlier one). A namespace nobody serves answers 404.
    pub fn new(providers: Vec<Arc<dyn ResourceProvider>>) -> Self {
        let s = Self::default();
        for p in providers {
            s.register(p);
        }
        s
    }

    /// Registers `provider`, replacing the one of its namespace if any (as a restarted server
    /// would build it anew); requests already being served finish on the one they started
    /// with.
    pub fn register(&self, provider: Arc<dyn ResourceProvider>) {
        let mut all = self.providers.write().unwrap_or_else(|p| p.into_inner());
        all.retain(|p| !p.namespace().eq_ignore_ascii_case(provider.namespace()));
        all.push(provider);
    }

    /// Makes the server read-only (`kagi server --read-only`): reads and cryptographic
    /// operations are served, every write is answered 503 `ServiceUnavailable` with a
    /// `Retry-After` (see docs/READ_ONLY.md).
    pub fn set_read_only(&self, on: bool) {
        self.read_only.set(on);
    }

    /// Whether the server refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only.get()
    }

    /// Counts every request and cryptographic operation into `metrics` from now on (see
    /// [`crate::enable_metrics`]). Only the first registry set is kept.
    pub(crate) fn set_metrics(&self, metrics: Arc<kagi_metrics::Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// The registry requests are counted into, when metrics are on.
    pub(crate) fn metrics(&self) -> Option<&Arc<kagi_metrics::Metrics>> {
        self.metrics.get()
    }

    /// Every registered provider.
    pub fn providers(&self) -> Vec<Arc<dyn ResourceProvider>> {
        self.providers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The provider of `namespace` (any case), if registered.
    pub fn provider(&self, namespace: &str) -> Option<Arc<dyn ResourceProvider>> {
        self.providers()
            .into_iter()
            .find(|p| p.namespace().eq_ignore_ascii_case(namespace))
    }

    /// The provider serving resource type `resource_type` (`Namespace/type`, any case).
    pub(crate) fn provider_of_type(
        &self,
        resource_type: &str,
    ) -> Option<Arc<dyn ResourceProvider>> {
        self.providers().into_iter().find(|p| {
            p.resource_types()
                .iter()
                .any(|t| t.eq_ignore_ascii_case(resource_type))
        })
    }

    /// The resource types of the registered providers that move (`moveResources`).
    pub(crate) fn movable_types(&self) -> Vec<&'static str> {
        self.providers()
            .iter()
            .flat_map(|p| {
                p.resource_types()
                    .iter()
                    .copied()
                    .filter(|t| p.movable(t))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The resource types whose system-assigned identities vault firewalls trust
    /// (`bypass: AzureServices`): those of the registered providers that say so, and those
    /// of the storage services to come.
    pub fn trusted_service_types(&self) -> Vec<String> {
        let mut types: Vec<String> = PLANNED_TRUSTED_TYPES
            .iter()
            .map(|t| t.to_string())
            .collect();
        for p in self.providers() {
            if p.trusted_for_vault_firewall() {
                types.extend(p.resource_types().iter().map(|t| t.to_string()));
            }
        }
        types
    }
}

//! Gauges that a service reports when metrics are scraped (`kagi server --metrics-listen`):
//! the state of its customer-managed-key consumers (backup vaults by protector state, disks
//! open, databases inaccessible, keys inside a revocation grace period) and of its jobs. A
//! service computes them from what it holds in memory; the metrics exporter only renders them.
//!
//! Labels are bounded sets (states, kinds, service names), never a resource's own name: a
//! scrape's size does not grow with the number of vaults, keys or disks.

/// One sample of a gauge: `name{labels} value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GaugeSample {
    /// The metric's full name (`kagi_disks_open`); samples of one name share `help`.
    pub name: &'static str,
    /// What the metric means (the exposition's `# HELP`).
    pub help: &'static str,
    /// Label names and values, each from a bounded set.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: i64,
}

impl GaugeSample {
    /// A sample without labels.
    pub fn new(name: &'static str, help: &'static str, value: i64) -> Self {
        Self {
            name,
            help,
            labels: Vec::new(),
            value,
        }
    }

    /// This sample with one more label.
    #[must_use]
    pub fn label(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.labels.push((name, value.into()));
        self
    }
}

/// `kagi_jobs{service, kind, state}`: jobs a service knows, by kind and state.
pub const JOBS: &str = "kagi_jobs";
/// Help of [`JOBS`].
pub const JOBS_HELP: &str =
    "Jobs known to the server (running, and ended ones still kept), by service, kind and state.";
/// `kagi_cmk_keys_in_grace{service}`: consumers whose key is unusable but which still work
/// because a revocation grace period runs.
pub const KEYS_IN_GRACE: &str = "kagi_cmk_keys_in_grace";
/// Help of [`KEYS_IN_GRACE`].
pub const KEYS_IN_GRACE_HELP: &str = "Customer-managed-key consumers whose key cannot be used but which keep working inside a revocation grace period, by service.";

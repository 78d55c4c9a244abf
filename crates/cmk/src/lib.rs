//! Customer-managed keys for kagi's storage services (backup vaults today; encrypted disks and
//! SQL databases with TDE next): what any of them needs to protect its data keys with a key in
//! a key vault, reached only through the key vault's data plane over HTTPS with the token of
//! the resource's own managed identity (so every use is authorized, firewalled and audited
//! like anyone's), or with a platform key kagi holds for it.
//!
//! - [`parse_key_uri`], [`KeyUri`]: key URIs of this platform's key vaults, versionless or
//!   pinned to a version;
//! - [`KeyAccess::validate`]: every rule for using a key (RSA 2048/3072/4096 or RSA-HSM,
//!   enabled, nbf/exp, soft delete and purge protection, same region and tenant, and the
//!   identity's get, list, wrapKey and unwrapKey probed), one error per rule;
//! - [`KeyAccess::resolve_version`]: the version of a versionless key in force, resolved at
//!   most once per poll interval;
//! - [`Kek`], [`WrappedKey`], [`KeyOwner`]: the key encryption key in force, the record of
//!   which key (version) wraps which data key, and the resource that keeps those records;
//! - [`KeyAccess::wrap`], [`KeyAccess::unwrap`] (RSA-OAEP-256, or AES-256-GCM under the
//!   platform key) and [`KeyAccess::data_key`]: a resource's data key, from a [`DekSlot`]
//!   (bounded lifetime, zeroized when replaced or dropped) or unwrapped, and re-wrapped under
//!   the key in force by adding one record — one idempotent, crash-safe step per data key,
//!   whatever the size of the data; [`KeyAccess::rewrap_all`]: the same for every data key of
//!   a resource that has many (the disks of a disk encryption set), O(number of data keys);
//! - [`record_to_json`], [`record_from_json`], [`random_dek`], [`key_failure_error`]: the
//!   record shape services keep in their documents, fresh data keys, failures as Azure errors;
//! - [`FailureKind`]: whether a failure is definite (4xx: disabled, deleted, expired,
//!   permission removed, identity gone) or transient (5xx, timeouts, unreachable).
//!
//! It knows the platform only through [`kagi_host::ServiceHost`].

#![forbid(unsafe_code)]

mod cache;
mod client;
mod kek;
mod records;
mod uri;
mod usable;
mod validate;

use std::net::SocketAddr;

use kagi_core::{ErrorCode, KvError};
use kagi_host::HostConfig;

pub use cache::DekSlot;
pub use client::{FailureKind, VaultClient, VaultFailure};
pub use kek::{
    Dek, Kek, KekRef, KeyError, KeyFailure, KeyOwner, OpenedKey, Resolved, Rewrapped, VersionInUse,
    WrappedKey,
};
pub use records::{
    dek_from, key_failure_error, push_record, random_dek, record_from_json, record_to_json,
    records_in,
};
pub use uri::{KeyUri, parse_key_uri};
pub use usable::key_unusable;
pub use validate::KeyRequest;

/// A 400 with Azure's inner error code.
pub fn bad(inner: &'static str, message: impl Into<String>) -> KvError {
    KvError::new(ErrorCode::BadRequest, message).with_inner(inner)
}

/// A storage service's access to customer-managed keys: the key vaults' data plane and the
/// platform's host names, for one kind of consumer.
#[derive(Debug)]
pub struct KeyAccess {
    client: VaultClient,
    dns_suffix: String,
    port: u16,
    consumer: &'static str,
    /// Whether a key past its expiry still unwraps (disks: Azure keeps them running).
    unwrap_after_expiry: bool,
    /// Whether the key vault may be in another region than the resource (TDE protectors).
    any_region: bool,
}

impl KeyAccess {
    /// Access for `consumer` (what errors call the resource that needs the key: "backup
    /// vault") on the platform `config` describes, reaching every key vault host at
    /// `connect`, trusting the platform's CA (`tls/ca.pem` in its data directory) and naming
    /// itself `user_agent`.
    pub fn new(
        config: &HostConfig,
        connect: SocketAddr,
        consumer: &'static str,
        user_agent: &str,
    ) -> Self {
        Self {
            client: VaultClient::new(connect, config.data_dir.join("tls/ca.pem"), user_agent),
            dns_suffix: config.dns_suffix.clone(),
            port: config.port,
            consumer,
            unwrap_after_expiry: false,
            any_region: false,
        }
    }

    /// The same, for a consumer whose data stays readable under an expired key (Azure's
    /// managed disks): expiry still refuses new wraps and validation, never an unwrap.
    pub fn unwrapping_after_expiry(self) -> Self {
        Self {
            unwrap_after_expiry: true,
            ..self
        }
    }

    /// The same, for a consumer whose key vault may be in another region (Azure SQL's TDE
    /// protector): validation skips the same-region rule.
    pub fn in_any_region(self) -> Self {
        Self {
            any_region: true,
            ..self
        }
    }

    /// Parses a key URI (or a versioned key id) of this platform.
    pub fn parse(&self, uri: &str) -> Result<KeyUri, KvError> {
        parse_key_uri(uri, &self.dns_suffix, self.port, self.consumer)
    }

    /// The key vaults' data plane (for what else the service stores there, such as secrets).
    pub fn client(&self) -> &VaultClient {
        &self.client
    }
}

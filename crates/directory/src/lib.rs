//! The directory: who may call kagi and how they get a token.
//!
//! [`Directory`] holds the in-memory directory ([`State`]: principals, identity-carrying
//! resources, role definitions and assignments, locks, certificate credentials, subscriptions)
//! and answers for principals (service principals, users, certificate credentials), the
//! token endpoint (grants, their guards, the signing key and its rotation), role definitions
//! and assignments (RBAC) and management locks. The platform owns one and delegates to it.
//! This crate knows nothing of vaults: deciding a data-plane call against a vault's access
//! model is the vault crate's, which asks the directory for it.
//!
//! Managed identities and their resources, workload bindings, subscriptions and moves, and
//! policy assignments still live in the vault crate, over [`Directory::state`]; so does the
//! check that a scope exists (it may name a vault) before a role assignment or lock is put.

#![forbid(unsafe_code)]

mod applications;
mod graph;
mod locks;
mod principals;
mod reload;
mod role_filters;
mod roles;
mod state;
mod token_guards;
mod tokens;

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use kagi_core::time::Clock;
use kagi_core::{ErrorCode, KvError};
use kagi_crypto::RootKey;
use kagi_identity::{Principal, TokenIssuer};
use kagi_store::Store;

pub use kagi_identity::kind;
pub use state::State;
pub use tokens::{TOKEN_LIFETIME, TokenGrant, TokenRequestError, load_token_issuer};

/// Why the directory could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] kagi_store::StoreError),
    /// The token signing key could not be created or opened under the root key.
    #[error("root key: {0}")]
    RootKey(String),
    /// Stored state is inconsistent.
    #[error("{0}")]
    Corrupt(String),
}

/// The directory service: its in-memory state, written through to the store.
#[derive(Debug)]
pub struct Directory {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    root: Arc<dyn RootKey>,
    issuer: TokenIssuer,
    /// `https://{suffix}:{port}`: the token audience and the token endpoint's base.
    authority: String,
    admin_object_id: String,
    state: RwLock<State>,
    /// Counts changes this node applies to `state` ([`Self::state_mut`]), so that a reload
    /// from the store ([`Self::reload`]) that raced one starts over instead of undoing it.
    local_changes: std::sync::atomic::AtomicU64,
    /// The token endpoint's throttles and replay cache, and the signing-key rotation lock.
    guards: token_guards::TokenGuards,
}

/// What the directory is built from.
#[derive(Debug)]
pub struct Parts {
    /// The store it writes through to.
    pub store: Arc<dyn Store>,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// The root key the signing key is sealed under.
    pub root: Arc<dyn RootKey>,
    /// The token issuer ([`load_token_issuer`]).
    pub issuer: TokenIssuer,
    /// `https://{suffix}:{port}`.
    pub authority: String,
    /// The bootstrap administrator's object id.
    pub admin_object_id: String,
    /// The directory as loaded ([`State::load`]).
    pub state: State,
}

impl Directory {
    /// The directory over its parts.
    pub fn new(parts: Parts) -> Self {
        Self {
            store: parts.store,
            clock: parts.clock,
            root: parts.root,
            issuer: parts.issuer,
            authority: parts.authority,
            admin_object_id: parts.admin_object_id,
            state: RwLock::new(parts.state),
            local_changes: Default::default(),
            guards: Default::default(),
        }
    }

    /// Makes `clock` the directory's clock (the platform's movable test clock).
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
    }

    /// The in-memory directory, for reading.
    pub fn state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The in-memory directory, for a change already committed to the store.
    pub fn state_mut(&self) -> RwLockWriteGuard<'_, State> {
        let guard = self.state.write().unwrap_or_else(|p| p.into_inner());
        self.local_changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        guard
    }

    /// Refuses (403 `AuthorizationFailed`) anyone but the bootstrap administrator.
    pub fn require_admin(&self, caller: &Principal) -> Result<(), KvError> {
        if caller.object_id == self.admin_object_id {
            Ok(())
        } else {
            Err(KvError::forbidden(format!(
                "The client '{}' with object id '{}' does not have authorization to manage \
                 identities, roles or locks.",
                caller.client_id, caller.object_id
            ))
            .with_inner("AuthorizationFailed"))
        }
    }

    /// Refuses tokens of principals that no longer exist.
    pub fn check_principal_exists(&self, p: &Principal) -> Result<(), KvError> {
        if self.state().principals.contains_key(&p.object_id) {
            Ok(())
        } else {
            Err(KvError::unauthorized(
                "AKV10000: The principal this token was issued to no longer exists.",
            ))
        }
    }

    /// Validates a bearer token for this platform's resource and returns its principal.
    pub fn authenticate(&self, bearer: &str) -> Result<Principal, KvError> {
        let principal = self
            .issuer
            .validate(bearer, &[&self.authority], self.clock.now())
            .map(|c| c.principal())
            .map_err(|e| KvError::unauthorized(format!("AKV10000: {e}.")))?;
        self.check_principal_exists(&principal)?;
        Ok(principal)
    }

    /// The JSON Web Key Set of the token service.
    pub fn jwks(&self) -> serde_json::Value {
        self.issuer.jwks(self.clock.now())
    }

    /// The seconds-since-epoch at which a token issued now expires.
    pub fn token_expires_on(&self) -> i64 {
        self.clock.now() + TOKEN_LIFETIME - 1
    }
}

/// Logs a failure of kagi itself and answers the client with a bare 500.
fn internal(context: &str, e: impl std::fmt::Display) -> KvError {
    tracing::error!(context, error = %e, "internal failure");
    KvError::internal()
}

/// 400 `BadRequest` with `message`.
pub fn bad(message: impl Into<String>) -> KvError {
    KvError::new(ErrorCode::BadRequest, message)
}

/// Sixteen random bytes (for GUIDs), or 500.
pub fn random16() -> Result<[u8; 16], KvError> {
    kagi_crypto::random_array().map_err(|e| internal("rng", e))
}

/// A new credential secret (32 random bytes, base64url), or 500.
///
/// Never one starting with `-` or `_`: users pass secrets as command-line arguments
/// (`az login --password S`), and argparse and getopt take a leading `-` for an option —
/// one secret in 32 would otherwise fail to sign in. Drawing again costs under a bit.
pub fn new_secret() -> Result<String, KvError> {
    loop {
        let secret =
            kagi_core::b64::encode(&kagi_crypto::random_bytes(32).map_err(|e| internal("rng", e))?);
        if secret.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Ok(secret);
        }
    }
}

/// `text` as a lower-case GUID, or 400 naming it.
pub fn guid(text: &str) -> Result<String, KvError> {
    kagi_core::ids::ObjectId::parse(text)
        .map(|g| g.to_string())
        .map_err(|_| {
            bad(format!(
                "'{}' is not a GUID.",
                kagi_core::ids::printable(text)
            ))
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_never_start_like_a_command_line_option() {
        for _ in 0..2000 {
            let s = super::new_secret().unwrap();
            assert!(s.starts_with(|c: char| c.is_ascii_alphanumeric()), "{s}");
            assert_eq!(s.len(), 43);
        }
    }
}

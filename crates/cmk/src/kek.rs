//! Key encryption keys and the data keys they wrap.
//!
//! A resource has one data key (DEK), kept only wrapped: each [`WrappedKey`] is the DEK
//! wrapped by one key encryption key (KEK) — the resource's platform key (AES-256-GCM, bound
//! to the resource by additional data it chooses) or a version of the customer's RSA key
//! (RSA-OAEP-256 through the key vault's `wrapKey`). Adopting a new KEK (a new key version, a
//! new key) adds one record under it — 32 bytes wrapped, whatever the size of the data; the
//! records under older KEKs stay until the resource says otherwise (a backup item removes them
//! once a backup under the new one has completed). Adding is idempotent (nothing is added when
//! a record under the KEK in force exists) and crash-safe (the old records still open the key
//! until the new one is durable).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use kagi_core::KvError;
use kagi_crypto::data_key::DataKey;
use zeroize::Zeroizing;

use crate::validate::internal;
use crate::{DekSlot, FailureKind, KeyAccess, KeyUri, VaultFailure, key_unusable};

/// An unwrapped data key (zeroized when dropped).
pub type Dek = Zeroizing<[u8; 32]>;

/// The key encryption key in force for a resource.
pub enum Kek {
    /// The resource's platform key, held by kagi (sealed under the root key).
    Platform(Dek),
    /// A version of the customer's key, used with a token of the resource's identity.
    Customer {
        /// The versioned key id.
        kid: String,
        /// The identity's access token.
        token: String,
        /// The identity as errors name it.
        who: String,
    },
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kek::Platform(_) => f.write_str("Kek::Platform(..)"),
            Kek::Customer { kid, who, .. } => write!(f, "Kek::Customer({kid}, {who})"),
        }
    }
}

impl Kek {
    /// `pmk` for the platform key, the versioned key id otherwise.
    pub fn id(&self) -> String {
        self.reference().id()
    }

    /// How records wrapped under it name it.
    pub fn reference(&self) -> KekRef {
        match self {
            Kek::Platform(_) => KekRef::Platform,
            Kek::Customer { kid, .. } => KekRef::Customer(kid.clone()),
        }
    }
}

/// Which key encryption key wrapped a data key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KekRef {
    /// The resource's platform key.
    Platform,
    /// That version of the customer's key (the versioned key id).
    Customer(String),
    /// A kind this kagi does not know (never opened).
    Unknown,
}

impl KekRef {
    /// `pmk` for the platform key (and, as earlier kagi counted them, unknown kinds), the
    /// versioned key id otherwise.
    pub fn id(&self) -> String {
        match self {
            KekRef::Customer(kid) => kid.clone(),
            KekRef::Platform | KekRef::Unknown => "pmk".into(),
        }
    }
}

/// A data key wrapped by one key encryption key: the record of which key wraps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    /// The record's id (`{created}-{random hex}`).
    pub id: String,
    /// The key that wrapped it.
    pub kek: KekRef,
    /// The wrapped data key.
    pub wrapped: Vec<u8>,
    /// When it was wrapped (Unix seconds).
    pub created: i64,
}

/// The resource that owns a data key: where its wrapped copies are kept, and its platform key.
#[async_trait]
pub trait KeyOwner: Send + Sync {
    /// Every wrapped copy of the resource's data key.
    async fn wrapped_keys(&self) -> Result<Vec<WrappedKey>, KvError>;

    /// Adds a wrapped copy (never replacing one); durable when this returns.
    async fn add_wrapped_key(&self, key: WrappedKey) -> Result<(), KvError>;

    /// The resource's platform key, for copies wrapped under it.
    async fn platform_key(&self) -> Result<Dek, KvError>;

    /// The additional data binding a copy wrapped under the platform key to this resource.
    async fn platform_aad(&self) -> Result<Vec<u8>, KvError>;
}

/// A key that could not be used: why (naming the key and the identity, for the resource's
/// activity log and the answer), and whether that lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFailure {
    /// What failed.
    pub message: String,
    /// Definite or transient.
    pub kind: FailureKind,
}

/// Why a key could not protect or give back a data key.
#[derive(Debug)]
pub enum KeyError {
    /// The key could not be used.
    Access(KeyFailure),
    /// No wrapped copy of the data key opened: how the first tried failed (`None`: there is
    /// none).
    Unopened(Option<KeyFailure>),
    /// A failure of kagi itself or of the resource's records.
    Other(KvError),
}

impl From<KvError> for KeyError {
    fn from(e: KvError) -> Self {
        KeyError::Other(e)
    }
}

fn access(message: String, f: &VaultFailure) -> KeyError {
    KeyError::Access(KeyFailure {
        message,
        kind: f.kind(),
    })
}

fn definite(message: impl Into<String>) -> KeyError {
    KeyError::Access(KeyFailure {
        message: message.into(),
        kind: FailureKind::Definite,
    })
}

/// A resource's data key, opened by [`KeyAccess::data_key`].
pub struct OpenedKey {
    /// The data key.
    pub dek: Dek,
    /// The id of the key encryption key in force ([`Kek::id`]).
    pub kek_id: String,
    /// Wrapped copies added to adopt that key (0 or 1).
    pub written: u64,
}

/// Shows everything but the key.
impl std::fmt::Debug for OpenedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedKey")
            .field("kek_id", &self.kek_id)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

/// What [`KeyAccess::rewrap_all`] did to each data key it was given, in order.
#[derive(Debug, Default)]
pub struct Rewrapped {
    /// Data keys that gained a copy wrapped under the key in force.
    pub added: u64,
    /// Data keys that already had one (nothing was asked of the key vault for them).
    pub already: u64,
    /// Data keys that could not be re-wrapped: their position in the list given, and why.
    /// Their older copies still open them.
    pub failed: Vec<(usize, KeyError)>,
}

/// The version of a versionless key in force, as last resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionInUse {
    /// The versioned key id.
    pub kid: Option<String>,
    /// When it was resolved (Unix seconds).
    pub resolved_at: i64,
}

/// The version [`KeyAccess::resolve_version`] found in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// The key URI names its version.
    Pinned(String),
    /// The version resolved less than a poll interval ago.
    Recent(String),
    /// Asked of the key vault now; `changed` when it differs from the one in use (to be
    /// recorded with the time, and logged).
    Fresh {
        /// The versioned key id.
        kid: String,
        /// Whether it differs from the version in use.
        changed: bool,
    },
}

impl Resolved {
    /// The versioned key id.
    pub fn kid(&self) -> &str {
        match self {
            Resolved::Pinned(k) | Resolved::Recent(k) | Resolved::Fresh { kid: k, .. } => k,
        }
    }
}

impl KeyAccess {
    /// The version of `key` in force: its own when pinned; the one in use when it was
    /// resolved less than `poll` ago (and is a version of this key); otherwise the key
    /// vault's current version, read with `token`.
    pub async fn resolve_version(
        &self,
        key: &KeyUri,
        token: &str,
        in_use: &VersionInUse,
        poll: Duration,
        now: i64,
    ) -> Result<Resolved, VaultFailure> {
        if let Some(ver) = &key.version {
            return Ok(Resolved::Pinned(key.versioned(ver)));
        }
        // A version of another key (the key changed and a crash came before its version was
        // recorded) is never used for this one.
        let prefix = format!("{}/", key.versionless().to_ascii_lowercase());
        let in_use = match &in_use.kid {
            Some(k) if !k.to_ascii_lowercase().starts_with(&prefix) => VersionInUse::default(),
            _ => in_use.clone(),
        };
        let due = now - in_use.resolved_at >= poll.as_secs() as i64;
        if let (Some(kid), false) = (&in_use.kid, due) {
            return Ok(Resolved::Recent(kid.clone()));
        }
        let bundle = self.client.get_key(key, token).await?;
        let kid = bundle["key"]["kid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let changed = in_use.kid.as_deref() != Some(kid.as_str());
        Ok(Resolved::Fresh { kid, changed })
    }

    /// Wraps `dek` under `kek` for `owner`: the record to add.
    pub async fn wrap(
        &self,
        owner: &dyn KeyOwner,
        kek: &Kek,
        dek: &Dek,
        now: i64,
    ) -> Result<WrappedKey, KeyError> {
        let wrapped = match kek {
            Kek::Platform(k) => {
                let pmk = DataKey::from_bytes(k).map_err(|e| internal("pmk", e))?;
                pmk.seal(&owner.platform_aad().await?, dek.as_ref())
                    .map_err(|e| internal("pmk wrap", e))?
            }
            Kek::Customer { kid, token, who } => {
                let uri = self.parse(kid)?;
                self.client
                    .wrap(&uri, token, dek.as_ref())
                    .await
                    .map_err(|f| {
                        access(
                            format!(
                                "The key '{kid}' could not wrap a data key for the {who}: {}",
                                f.reason()
                            ),
                            &f,
                        )
                    })?
                    .1
            }
        };
        let raw = kagi_crypto::random_bytes(16).map_err(|e| internal("rng", e))?;
        let hex: String = raw.iter().map(|x| format!("{x:02x}")).collect();
        Ok(WrappedKey {
            id: format!("{now}-{hex}"),
            kek: kek.reference(),
            wrapped,
            created: now,
        })
    }

    /// Unwraps one record of `owner`'s data key: under the platform key, or — with `kek`'s
    /// token, after checking that the key is still usable — under the customer key version
    /// it names.
    pub async fn unwrap(
        &self,
        owner: &dyn KeyOwner,
        kek: &Kek,
        record: &WrappedKey,
        now: i64,
    ) -> Result<Dek, KeyError> {
        // Every wrap has bytes (RSA-OAEP: the modulus size; AES-GCM: at least the tag).
        if record.wrapped.is_empty() {
            return Err(definite("the key entry is damaged"));
        }
        let plain = match (&record.kek, kek) {
            (KekRef::Platform, _) => {
                let k = owner
                    .platform_key()
                    .await
                    .map_err(|e| definite(e.message))?;
                let pmk = DataKey::from_bytes(&k).map_err(|e| definite(e.to_string()))?;
                let aad = owner
                    .platform_aad()
                    .await
                    .map_err(|e| definite(e.message))?;
                pmk.open(&aad, &record.wrapped)
                    .map_err(|_| definite("the platform key does not open this entry"))?
            }
            (KekRef::Customer(kid), Kek::Customer { token, who, .. }) => {
                let uri = self.parse(kid).map_err(|e| definite(e.message))?;
                let bundle = self.client.get_key(&uri, token).await.map_err(|f| {
                    access(
                        format!(
                            "The key '{kid}' could not be read by the {who}: {}",
                            f.reason()
                        ),
                        &f,
                    )
                })?;
                if let Some((inner, why)) = key_unusable(&bundle, now, self.consumer)
                    && !(inner == "KeyExpired" && self.unwrap_after_expiry)
                {
                    return Err(definite(format!(
                        "The key '{kid}' cannot be used: {why} ({inner})"
                    )));
                }
                self.client
                    .unwrap(&uri, token, &record.wrapped)
                    .await
                    .map_err(|f| {
                        access(
                            format!(
                                "The key '{kid}' could not unwrap the data key for the {who}: {}",
                                f.reason()
                            ),
                            &f,
                        )
                    })?
            }
            _ => return Err(definite("the entry's key is unknown")),
        };
        let plain = Zeroizing::new(plain);
        let mut d = Zeroizing::new([0u8; 32]);
        if plain.len() != 32 {
            return Err(definite("the unwrapped data key has the wrong length"));
        }
        d.copy_from_slice(&plain);
        Ok(d)
    }

    /// `owner`'s data key under `kek`: from `slot` while its `lifetime` lasts, otherwise
    /// unwrapped (records under `kek` first, newest first); then, when no record under `kek`
    /// exists, one is added (the re-wrap of a key change: idempotent, crash-safe, one record
    /// per data key). The lifetime counts from the last time the key vault was asked.
    pub async fn data_key(
        &self,
        owner: &dyn KeyOwner,
        kek: &Kek,
        slot: &DekSlot,
        lifetime: Duration,
        now: i64,
    ) -> Result<OpenedKey, KeyError> {
        let kek_id = kek.id();
        let cached = slot.get(lifetime);
        let cached_at = cached.as_ref().map(|c| c.2);
        let (dek, has_current) = match cached {
            Some((d, id, _)) => (d, id == kek_id),
            None => {
                let mut records = owner.wrapped_keys().await?;
                let has_current = records.iter().any(|r| r.kek.id() == kek_id);
                // Under a customer key, a record under the platform key opens the data key
                // only while no customer record exists (the first adoption of a customer
                // key): otherwise it would be a way around a revoked one.
                if matches!(kek, Kek::Customer { .. })
                    && records.iter().any(|r| matches!(r.kek, KekRef::Customer(_)))
                {
                    records.retain(|r| !matches!(r.kek, KekRef::Platform));
                }
                records.sort_by_key(|r| (r.kek.id() != kek_id, -r.created));
                let mut first_err = None;
                let mut found = None;
                for r in &records {
                    match self.unwrap(owner, kek, r, now).await {
                        Ok(d) => {
                            found = Some(d);
                            break;
                        }
                        Err(KeyError::Access(failure)) => {
                            first_err.get_or_insert(failure);
                        }
                        Err(e) => return Err(e),
                    }
                }
                match found {
                    Some(d) => (d, has_current),
                    None => return Err(KeyError::Unopened(first_err)),
                }
            }
        };
        let mut written = 0;
        if !has_current {
            let record = self.wrap(owner, kek, &dek, now).await?;
            owner.add_wrapped_key(record).await?;
            written = 1;
        }
        let at = match (cached_at, written) {
            (Some(t), 0) => t,
            _ => Instant::now(),
        };
        slot.put(dek.clone(), kek_id.clone(), at);
        Ok(OpenedKey {
            dek,
            kek_id,
            written,
        })
    }

    /// Re-wraps every data key in `owners` (say every disk of a disk encryption set) under
    /// `kek`: one step per data key, whatever the size of the data behind it. Idempotent: a
    /// data key that already has a copy under `kek` costs one read of its records and nothing
    /// else, so a re-run after a crash does only what is left. Crash-safe: a copy is added,
    /// never replaced, so the older copies open the key until the new one is durable (removing
    /// them later is the resource's decision). A data key that fails is reported and the rest
    /// go on; the failure is definite or transient as for [`KeyAccess::data_key`].
    pub async fn rewrap_all(
        &self,
        owners: &[&dyn KeyOwner],
        kek: &Kek,
        now: i64,
    ) -> Result<Rewrapped, KeyError> {
        let kek_id = kek.id();
        let mut done = Rewrapped::default();
        for (i, owner) in owners.iter().enumerate() {
            let has_current = owner
                .wrapped_keys()
                .await?
                .iter()
                .any(|r| r.kek.id() == kek_id);
            if has_current {
                done.already += 1;
                continue;
            }
            // A slot of its own: nothing cached, so the key vault is asked now.
            let fresh = DekSlot::default();
            match self
                .data_key(*owner, kek, &fresh, Duration::ZERO, now)
                .await
            {
                Ok(opened) => done.added += opened.written,
                Err(KeyError::Other(e)) => return Err(KeyError::Other(e)),
                Err(e) => done.failed.push((i, e)),
            }
        }
        Ok(done)
    }
}

//! A disk family's data key (DEK) and the records of the keys that wrap it.
//!
//! Each disk family (a disk, its incremental snapshots and the disks made from them) has one
//! AES-256 DEK, generated when the family is made and never changed. Each resource keeps it
//! only wrapped, in its own `keys` document: under the family's platform key (DK-1; sealed
//! under kagi's root key, bound to the family) for a resource on the platform key, or under its
//! set's key version through the key vault with the set's identity (DK-2, DK-3) for a resource
//! under a set, which then keeps no platform record. Rotation adds one record under the new
//! version (`kagi_cmk::KeyAccess::rewrap_all`): 32 bytes wrapped per resource, whatever its
//! size; the older records go once the set names the new version.

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kagi_cmk::{
    Dek, KekRef, KeyError, KeyOwner, WrappedKey, dek_from, random_dek, record_from_json,
    record_to_json, records_in,
};
use kagi_core::{ErrorCode, KvError};
use kagi_host::ServiceHost;
use serde_json::{Value, json};
use zeroize::Zeroizing;

/// The document kind of a disk's key records.
const KEYS_DOC: &str = "keys";

/// A failure of kagi itself (never a client's mistake), logged with what failed.
pub(crate) fn internal(what: &str, e: impl std::fmt::Display) -> KvError {
    tracing::error!(error = %e, "disk service: {what}");
    KvError::new(
        ErrorCode::InternalError,
        format!("The disk service failed: {what}."),
    )
}

/// Runs `f` (store work that reads, writes and fsyncs files) on a blocking thread; its
/// failure is kagi's own, reported as `what`.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, kagi_disk::DiskError> + Send + 'static,
) -> Result<T, KvError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(what, e))?
        .map_err(|e| internal(what, e))
}

/// The seal label of a disk family's platform key.
fn pmk_label(family: &str) -> String {
    format!("disk-pmk/{family}")
}

/// Where a `keys` document says the resource's data is.
fn place_in(doc: &Value) -> Result<Place, KvError> {
    match (doc["family"].as_str(), doc["volume"].as_str()) {
        (Some(f), Some(v)) => Ok(Place {
            family: f.to_string(),
            volume: v.to_string(),
        }),
        _ => Err(internal("disk keys", "no family recorded")),
    }
}

/// `plain` sealed under the platform key `pmk`, bound to `aad`.
fn seal_under(pmk: &Dek, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, KvError> {
    kagi_crypto::data_key::DataKey::from_bytes(pmk)
        .and_then(|k| k.seal(aad, plain))
        .map_err(|e| internal("pmk wrap", e))
}

/// What binds a family's data key, wrapped under its platform key, to the family.
fn dek_aad(family: &str) -> Vec<u8> {
    format!("kagi/disk-dek/v1/{family}").into_bytes()
}

/// What binds a family's inner layer key to the family.
fn inner_aad(family: &str) -> Vec<u8> {
    format!("kagi/disk-inner-key/v1/{family}").into_bytes()
}

/// The keys of one disk or snapshot, as a [`KeyOwner`] for kagi-cmk: records of its family's
/// data key in its `keys` document (under its resource id), the family's platform key sealed
/// beside them, and where its data is (family and volume). Every disk and snapshot of a family
/// holds its own copy of these records, so that each can be re-wrapped, revoked and deleted on
/// its own.
pub(crate) struct DiskKeys<'a> {
    pub(crate) host: &'a dyn ServiceHost,
    /// The resource id (where its documents are).
    pub(crate) disk_id: String,
}

/// Where a disk's or snapshot's data is in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    /// The family (what the platform key and its wraps are bound to).
    pub(crate) family: String,
    /// The volume in it.
    pub(crate) volume: String,
}

impl DiskKeys<'_> {
    async fn doc(&self) -> Result<Value, KvError> {
        Ok(self
            .host
            .document(&self.disk_id, KEYS_DOC, "dek")
            .await?
            .unwrap_or_else(|| json!({"records": []})))
    }

    /// Creates a new family's keys for the resource whose data is at `place`: a platform key
    /// (sealed) and the DEK wrapped under it, and with `double` the inner layer's key (DK-9),
    /// wrapped under the platform key too. Returns the DEK.
    pub(crate) async fn create(
        &self,
        now: i64,
        double: bool,
        place: &Place,
    ) -> Result<Dek, KvError> {
        let pmk = random_dek()?;
        let sealed = self
            .host
            .seal_secret(&pmk_label(&place.family), pmk.as_ref())?;
        let dek = random_dek()?;
        let wrapped = seal_under(&pmk, &dek_aad(&place.family), dek.as_ref())?;
        let record = WrappedKey {
            id: format!("{now}-pmk"),
            kek: KekRef::Platform,
            wrapped,
            created: now,
        };
        let mut doc = json!({"pmk": B64.encode(&sealed), "records": [record_to_json(&record)],
            "family": place.family, "volume": place.volume});
        if double {
            let inner = random_dek()?;
            let wrapped = seal_under(&pmk, &inner_aad(&place.family), inner.as_ref())?;
            doc["inner"] = json!(B64.encode(wrapped));
        }
        self.host
            .put_document(&self.disk_id, KEYS_DOC, "dek", &doc)
            .await?;
        Ok(dek)
    }

    /// Gives this resource the keys of `from` (of the same family) for its data at `place`:
    /// an incremental snapshot, or a disk made from one, shares its source's data key.
    pub(crate) async fn copy_from(
        &self,
        from: &DiskKeys<'_>,
        place: &Place,
    ) -> Result<(), KvError> {
        let mut doc = from.doc().await?;
        doc["family"] = json!(place.family);
        doc["volume"] = json!(place.volume);
        self.host
            .put_document(&self.disk_id, KEYS_DOC, "dek", &doc)
            .await
    }

    /// Where the resource's data is.
    pub(crate) async fn place(&self) -> Result<Place, KvError> {
        place_in(&self.doc().await?)
    }

    /// The family of the resource, if it has keys recorded (it exists, or is being made).
    pub(crate) async fn family_if_any(&self) -> Result<Option<String>, KvError> {
        Ok(self
            .host
            .document(&self.disk_id, KEYS_DOC, "dek")
            .await?
            .and_then(|d| d["family"].as_str().map(str::to_string)))
    }

    /// The family's platform key, as the document `doc` keeps it sealed.
    fn pmk_in(&self, doc: &Value) -> Result<Dek, KvError> {
        let sealed = doc["pmk"]
            .as_str()
            .and_then(|s| B64.decode(s).ok())
            .ok_or_else(|| internal("disk keys", "no platform key"))?;
        let family = place_in(doc)?.family;
        let opened = self.host.open_secret(&pmk_label(&family), &sealed)?;
        dek_from(&opened.secret, "platform key")
    }

    /// The inner layer's key of a double-encrypted family (`None`: single layer).
    pub(crate) async fn inner_key(&self) -> Result<Option<Dek>, KvError> {
        let doc = self.doc().await?;
        let Some(wrapped) = doc["inner"].as_str().and_then(|s| B64.decode(s).ok()) else {
            return Ok(None);
        };
        let pmk = self.pmk_in(&doc)?;
        let family = place_in(&doc)?.family;
        let plain = kagi_crypto::data_key::DataKey::from_bytes(&pmk)
            .and_then(|k| k.open(&inner_aad(&family), &wrapped))
            .map(Zeroizing::new)
            .map_err(|e| internal("inner key", e))?;
        dek_from(&plain, "inner key").map(Some)
    }

    /// Keeps only the records under the key in force: the customer key version `keep`, or
    /// with `None` the platform key. Called once a record under that key is durable and the
    /// resource names it: a resource under a customer key then has no record that opens
    /// without that key (revoking or purging it leaves nothing readable), and a resource back
    /// on the platform key needs no customer key.
    pub(crate) async fn retire_others(&self, keep: Option<&str>) -> Result<(), KvError> {
        let mut doc = self.doc().await?;
        let records: Vec<Value> = doc["records"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| match (record_from_json(r).kek, keep) {
                (KekRef::Customer(kid), Some(k)) => kid.eq_ignore_ascii_case(k),
                (KekRef::Platform, None) => true,
                _ => false,
            })
            .collect();
        if records.is_empty() {
            // Never leave a resource with no way to its data key.
            return Err(internal("disk keys", "no record under the key in force"));
        }
        if doc["records"].as_array().map(Vec::len) == Some(records.len()) {
            return Ok(());
        }
        doc["records"] = json!(records);
        self.host
            .put_document(&self.disk_id, KEYS_DOC, "dek", &doc)
            .await
    }
}

#[async_trait]
impl KeyOwner for DiskKeys<'_> {
    async fn wrapped_keys(&self) -> Result<Vec<WrappedKey>, KvError> {
        Ok(records_in(&self.doc().await?))
    }

    async fn add_wrapped_key(&self, key: WrappedKey) -> Result<(), KvError> {
        let mut doc = self.doc().await?;
        kagi_cmk::push_record(&mut doc, &key);
        self.host
            .put_document(&self.disk_id, KEYS_DOC, "dek", &doc)
            .await
    }

    async fn platform_key(&self) -> Result<Dek, KvError> {
        self.pmk_in(&self.doc().await?)
    }

    async fn platform_aad(&self) -> Result<Vec<u8>, KvError> {
        Ok(dek_aad(&self.place().await?.family))
    }
}

/// The key records of the disk or snapshot `body`.
pub(crate) fn disk_keys<'a>(host: &'a dyn ServiceHost, body: &Value) -> Option<DiskKeys<'a>> {
    Some(DiskKeys {
        host,
        disk_id: body["id"].as_str()?.to_string(),
    })
}

/// A key failure as an Azure error (inner code `KeyVaultAccessForbidden`).
pub(crate) fn key_error(e: KeyError) -> KvError {
    kagi_cmk::key_failure_error(e, "KeyVaultAccessForbidden")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_keys_are_bound_to_their_family() {
        assert_ne!(dek_aad("f1"), dek_aad("f2"));
        assert_ne!(dek_aad("f1"), inner_aad("f1"));
        assert_ne!(pmk_label("f1"), pmk_label("f2"));
    }
}

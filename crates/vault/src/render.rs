//! Wire shapes of the keys API: KeyBundle, DeletedKeyBundle and list items.

use kagi_core::b64;
use kagi_core::key::{KeyVersionInfo, PublicJwk};
use kagi_core::time::DAY;
use kagi_store::VaultRecord;
use serde_json::{Map, Value, json};

use crate::state::{KeyEntry, VersionEntry};

/// What rendering needs to know about the vault.
pub(crate) struct VaultView<'a> {
    pub(crate) uri: String,
    pub(crate) record: &'a VaultRecord,
}

impl VaultView<'_> {
    pub(crate) fn key_id(&self, name: &str, version: Option<&str>) -> String {
        match version {
            Some(v) => format!("{}keys/{name}/{v}", self.uri),
            None => format!("{}keys/{name}", self.uri),
        }
    }

    fn attributes(&self, info: &KeyVersionInfo) -> Value {
        let a = &info.attributes;
        let mut m = Map::new();
        m.insert("enabled".into(), json!(a.enabled));
        if let Some(nbf) = a.nbf {
            m.insert("nbf".into(), json!(nbf));
        }
        if let Some(exp) = a.exp {
            m.insert("exp".into(), json!(exp));
        }
        m.insert("created".into(), json!(a.created));
        m.insert("updated".into(), json!(a.updated));
        m.insert(
            "recoveryLevel".into(),
            json!(self.record.properties.recovery_level()),
        );
        m.insert(
            "recoverableDays".into(),
            json!(self.record.properties.soft_delete_retention_in_days),
        );
        m.insert("exportable".into(), json!(a.exportable));
        Value::Object(m)
    }

    fn with_tags(&self, mut v: Value, info: &KeyVersionInfo) -> Value {
        if !info.tags.is_empty() {
            v["tags"] = json!(info.tags);
        }
        v
    }

    /// A KeyBundle for one version.
    pub(crate) fn bundle(&self, name: &str, e: &VersionEntry) -> Value {
        let mut key = Map::new();
        key.insert(
            "kid".into(),
            json!(self.key_id(name, Some(e.version.as_str()))),
        );
        key.insert("kty".into(), json!(e.info.kty.as_str()));
        key.insert(
            "key_ops".into(),
            json!(
                e.info
                    .key_ops
                    .iter()
                    .map(|o| o.as_str())
                    .collect::<Vec<_>>()
            ),
        );
        match &e.info.public {
            PublicJwk::Rsa { n, e } => {
                key.insert("n".into(), json!(b64::encode(n)));
                key.insert("e".into(), json!(b64::encode(e)));
            }
            PublicJwk::Ec { crv, x, y } => {
                key.insert("crv".into(), json!(crv));
                key.insert("x".into(), json!(b64::encode(x)));
                key.insert("y".into(), json!(b64::encode(y)));
            }
        }
        self.with_tags(
            json!({"key": Value::Object(key), "attributes": self.attributes(&e.info)}),
            &e.info,
        )
    }

    fn deleted_fields(&self, mut v: Value, k: &KeyEntry) -> Value {
        let deleted = k.deleted_at.unwrap_or_default();
        v["recoveryId"] = json!(format!("{}deletedkeys/{}", self.uri, k.name));
        v["deletedDate"] = json!(deleted);
        v["scheduledPurgeDate"] = json!(k.purge_at.unwrap_or(
            deleted + i64::from(self.record.properties.soft_delete_retention_in_days) * DAY
        ));
        v
    }

    /// A DeletedKeyBundle (the current version of a deleted key).
    pub(crate) fn deleted_bundle(&self, k: &KeyEntry) -> Value {
        let v = k
            .latest()
            .map(|e| self.bundle(k.name.as_str(), e))
            .unwrap_or_else(|| json!({}));
        self.deleted_fields(v, k)
    }

    /// A KeyItem for `GET /keys` (versionless kid, current version's attributes).
    pub(crate) fn item(&self, k: &KeyEntry) -> Value {
        match k.latest() {
            Some(e) => self.with_tags(
                json!({"kid": self.key_id(k.name.as_str(), None), "attributes": self.attributes(&e.info)}),
                &e.info,
            ),
            None => json!({"kid": self.key_id(k.name.as_str(), None)}),
        }
    }

    /// A KeyItem for `GET /keys/{name}/versions`.
    pub(crate) fn version_item(&self, name: &str, e: &VersionEntry) -> Value {
        self.with_tags(
            json!({"kid": self.key_id(name, Some(e.version.as_str())), "attributes": self.attributes(&e.info)}),
            &e.info,
        )
    }

    /// A DeletedKeyItem.
    pub(crate) fn deleted_item(&self, k: &KeyEntry) -> Value {
        let v = self.item(k);
        self.deleted_fields(v, k)
    }
}

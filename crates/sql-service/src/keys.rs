//! A database's data key (DEK) and the records of the keys that wrap it.
//!
//! Each database keeps its DEK only wrapped, in its own `dbkeys` document under the server:
//! under the server's platform key (sealed under kagi's root key) while the protector is
//! `ServiceManaged`, under the protector's key version through the key vault otherwise. A
//! protector change adds one record under the new key, and once the server names it the
//! older records go (see `protector.rs`).

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kagi_cmk::{Dek, KeyOwner, WrappedKey, dek_from, record_to_json, records_in};
use kagi_core::{ErrorCode, KvError};
use kagi_host::ServiceHost;
use serde_json::{Value, json};

/// The document kind of a database's key records (named by the database id, so that a new
/// database of a dropped one's name never meets its records).
pub(crate) const DBKEYS_DOC: &str = "dbkeys";
/// The document kind of the server's own settings (`protector`, `pmk`, `logins`, `health`).
pub(crate) const SERVER_DOC: &str = "sql";

/// A failure of kagi itself (never a client's mistake), logged with what failed.
pub(crate) fn internal(what: &str, e: impl std::fmt::Display) -> KvError {
    tracing::error!(error = %e, "SQL service: {what}");
    KvError::new(
        ErrorCode::InternalError,
        format!("The SQL service failed: {what}."),
    )
}

/// The seal label of a server's platform key.
fn pmk_label(server_id: &str) -> String {
    format!("sql-pmk/{}", server_id.to_ascii_lowercase())
}

/// What binds a DEK wrapped under the platform key to its database.
fn dek_aad(database_id: &str) -> Vec<u8> {
    format!("kagi/sql-dek/v1/{database_id}").into_bytes()
}

/// Creates the server's platform key (the `ServiceManaged` protector), sealed under the
/// root key, unless it has one.
pub(crate) async fn ensure_server_pmk(
    host: &dyn ServiceHost,
    server_id: &str,
) -> Result<(), KvError> {
    if host.document(server_id, SERVER_DOC, "pmk").await?.is_some() {
        return Ok(());
    }
    let pmk = kagi_cmk::random_dek()?;
    let sealed = host.seal_secret(&pmk_label(server_id), pmk.as_ref())?;
    host.put_document(
        server_id,
        SERVER_DOC,
        "pmk",
        &json!({ "sealed": B64.encode(sealed) }),
    )
    .await
}

/// The server's platform key.
pub(crate) async fn server_pmk(host: &dyn ServiceHost, server_id: &str) -> Result<Dek, KvError> {
    let doc = host
        .document(server_id, SERVER_DOC, "pmk")
        .await?
        .ok_or_else(|| internal("server keys", "no platform key"))?;
    let sealed = doc["sealed"]
        .as_str()
        .and_then(|s| B64.decode(s).ok())
        .ok_or_else(|| internal("server keys", "a damaged platform key"))?;
    let opened = host.open_secret(&pmk_label(server_id), &sealed)?;
    dek_from(&opened.secret, "server platform key")
}

/// The key records of one database, as a [`KeyOwner`] for kagi-cmk.
pub(crate) struct DbKeys<'a> {
    pub(crate) host: &'a dyn ServiceHost,
    /// The server's resource id (where the documents are).
    pub(crate) server_id: String,
    /// The database's id (the document's name).
    pub(crate) db: String,
    /// The database id (a GUID), which the platform-key wrap is bound to.
    pub(crate) database_id: String,
}

impl DbKeys<'_> {
    async fn doc(&self) -> Result<Value, KvError> {
        Ok(self
            .host
            .document(&self.server_id, DBKEYS_DOC, &self.db)
            .await?
            .unwrap_or_else(|| json!({"records": []})))
    }

    async fn put(&self, doc: &Value) -> Result<(), KvError> {
        self.host
            .put_document(&self.server_id, DBKEYS_DOC, &self.db, doc)
            .await
    }

    /// Keeps only the records under `keep` (a versioned key id, or `"pmk"`): called once a
    /// record under it is durable and the server names it, so that no record opens the DEK
    /// without the protector in force (revoking or purging an old key leaves nothing
    /// readable through it).
    pub(crate) async fn retire_others(&self, keep: &str) -> Result<(), KvError> {
        let mut doc = self.doc().await?;
        let all = records_in(&doc);
        let kept: Vec<Value> = all
            .iter()
            .filter(|r| r.kek.id().eq_ignore_ascii_case(keep))
            .map(record_to_json)
            .collect();
        if kept.is_empty() {
            // Never leave a database with no way to its data key.
            return Err(internal(
                "database keys",
                "no record under the key in force",
            ));
        }
        if kept.len() == all.len() {
            return Ok(());
        }
        doc["records"] = json!(kept);
        self.put(&doc).await
    }

    /// Removes the records (the database is dropped).
    pub(crate) async fn delete(&self) -> Result<(), KvError> {
        self.host
            .delete_document(&self.server_id, DBKEYS_DOC, &self.db)
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl KeyOwner for DbKeys<'_> {
    async fn wrapped_keys(&self) -> Result<Vec<WrappedKey>, KvError> {
        Ok(records_in(&self.doc().await?))
    }

    async fn add_wrapped_key(&self, key: WrappedKey) -> Result<(), KvError> {
        let mut doc = self.doc().await?;
        kagi_cmk::push_record(&mut doc, &key);
        self.put(&doc).await
    }

    async fn platform_key(&self) -> Result<Dek, KvError> {
        server_pmk(self.host, &self.server_id).await
    }

    async fn platform_aad(&self) -> Result<Vec<u8>, KvError> {
        Ok(dek_aad(&self.database_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_wraps_are_bound_to_their_database_and_server() {
        assert_ne!(dek_aad("a"), dek_aad("b"));
        assert_ne!(pmk_label("/s/1"), pmk_label("/s/2"));
        assert_eq!(pmk_label("/S/1"), pmk_label("/s/1"));
    }
}

//! The secrets service (`kagi_vault::Platform`) without HTTP: a real SQLite store in a temporary
//! directory, a real root key, real tokens, and the movable test clock of
//! `kagi server --test-clock`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use kagi_core::key::BackupBlob;
use kagi_core::secret::{MAX_VALUE_BYTES, SecretSetParameters, SecretUpdateParameters};
use kagi_core::time::{DAY, TestClock};
use kagi_core::vault::VaultInput;
use kagi_core::{ErrorCode, KvError};
use kagi_crypto::AesRootKey;
use kagi_store::{SqlStore, Store};
use kagi_vault::{BootstrapAdmin, ListQuery, Platform, Principal};
use serde_json::{Value, json};

const API: &str = "2026-04-01";
/// A value that must never appear in the database files.
const MARKER: &str = "kagi-plaintext-marker-7f3e9c1d2b";

mod common;

use common::{ROOT, config, open, sign_in, token};

struct Env {
    dir: tempfile::TempDir,
    clock: Arc<TestClock>,
    p: Platform,
    creds: BootstrapAdmin,
    admin: Principal,
}

impl Env {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock::new());
        let (p, created) = open(dir.path(), &clock).await;
        let creds = created.expect("first start creates the administrator");
        let admin = sign_in(&p, &creds).await;
        Self {
            dir,
            clock,
            p,
            creds,
            admin,
        }
    }

    /// Closes and reopens the platform on the same data directory and clock.
    async fn reopen(&mut self) {
        let (p, created) = open(self.dir.path(), &self.clock).await;
        assert!(created.is_none());
        self.p = p;
        self.admin = sign_in(&self.p, &self.creds).await;
    }

    async fn vault(&self, name: &str, properties: Value) {
        self.p
            .put_resource_group(
                &self.admin,
                &self.creds.subscription_id,
                "rg1",
                serde_json::from_value(json!({"location": "westeurope"})).unwrap(),
            )
            .await
            .unwrap();
        let mut props = json!({
            "tenantId": self.creds.tenant_id,
            "sku": {"family": "A", "name": "standard"},
            "softDeleteRetentionInDays": 7,
        });
        for (k, v) in properties.as_object().unwrap() {
            props[k] = v.clone();
        }
        let input: VaultInput =
            serde_json::from_value(json!({"location": "westeurope", "properties": props})).unwrap();
        self.p
            .put_vault(
                &self.admin,
                &self.creds.subscription_id,
                "rg1",
                name,
                input,
                false,
            )
            .await
            .unwrap();
    }

    async fn set(&self, vault: &str, name: &str, body: Value) -> Result<Value, KvError> {
        let params: SecretSetParameters = serde_json::from_value(body).unwrap();
        self.p.set_secret(&self.admin, vault, name, params).await
    }

    fn get(&self, vault: &str, name: &str, version: Option<&str>) -> Result<Value, KvError> {
        self.p.get_secret(&self.admin, vault, name, version)
    }

    async fn update(
        &self,
        vault: &str,
        name: &str,
        version: Option<&str>,
        body: Value,
    ) -> Result<Value, KvError> {
        let params: SecretUpdateParameters = serde_json::from_value(body).unwrap();
        self.p
            .update_secret(&self.admin, vault, name, version, params)
            .await
    }
}

fn q(maxresults: Option<&str>, skiptoken: Option<String>) -> ListQuery {
    ListQuery {
        maxresults: maxresults.map(str::to_string),
        skiptoken,
        api_version: API.into(),
    }
}

fn version_of(bundle: &Value) -> String {
    bundle["id"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string()
}

fn status(r: Result<Value, KvError>) -> (u16, Option<&'static str>) {
    let e = r.unwrap_err();
    (e.status(), e.inner)
}

#[tokio::test]
async fn set_get_versions_update_and_disable() {
    let env = Env::new().await;
    env.vault("sv1", json!({})).await;
    let first = env
        .set(
            "sv1",
            "Db-Password",
            json!({"value": "one", "contentType": "text/plain", "tags": {"env": "test"}}),
        )
        .await
        .unwrap();
    let v1 = version_of(&first);
    assert_eq!(v1.len(), 32);
    assert!(v1.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(
        first["id"],
        format!("https://sv1.localhost:8443/secrets/Db-Password/{v1}")
    );
    assert_eq!(first["value"], "one");
    assert_eq!(first["contentType"], "text/plain");
    assert_eq!(first["tags"]["env"], "test");
    let a = &first["attributes"];
    assert_eq!(a["enabled"], true);
    assert_eq!(a["recoveryLevel"], "CustomizedRecoverable+Purgeable");
    assert_eq!(a["recoverableDays"], 7);
    assert_eq!(a["created"], a["updated"]);
    assert!(a.get("nbf").is_none() && a.get("exp").is_none());

    let second = env
        .set("sv1", "db-password", json!({"value": "two"}))
        .await
        .unwrap();
    let v2 = version_of(&second);
    assert_ne!(v1, v2);
    // The name keeps the case it was first set with.
    assert!(
        second["id"]
            .as_str()
            .unwrap()
            .contains("/secrets/Db-Password/")
    );
    assert!(second.get("contentType").is_none());

    // Newest, by version, and case-insensitive names.
    assert_eq!(env.get("sv1", "DB-PASSWORD", None).unwrap()["value"], "two");
    assert_eq!(
        env.get("sv1", "db-password", Some("")).unwrap()["value"],
        "two"
    );
    assert_eq!(
        env.get("sv1", "db-password", Some(&v1)).unwrap()["value"],
        "one"
    );

    // Update the old version: no value in the answer, and the value is unchanged.
    let upd = env
        .update(
            "sv1",
            "db-password",
            Some(&v1),
            json!({"contentType": "application/json", "tags": {"a": "b"}}),
        )
        .await
        .unwrap();
    assert!(upd.get("value").is_none());
    assert_eq!(upd["contentType"], "application/json");
    assert_eq!(upd["tags"], json!({"a": "b"}));
    assert_eq!(
        env.get("sv1", "db-password", Some(&v1)).unwrap()["value"],
        "one"
    );

    // Disable the newest: get refuses with 403 SecretDisabled, the old version still reads.
    let upd = env
        .update(
            "sv1",
            "db-password",
            None,
            json!({"attributes": {"enabled": false}}),
        )
        .await
        .unwrap();
    assert_eq!(upd["attributes"]["enabled"], false);
    assert_eq!(version_of(&upd), v2);
    let e = env.get("sv1", "db-password", None).unwrap_err();
    assert_eq!(e.status(), 403);
    assert_eq!(e.code, ErrorCode::Forbidden);
    assert_eq!(e.inner, Some("SecretDisabled"));
    assert_eq!(
        e.message,
        "Operation get is not allowed on a disabled secret."
    );
    assert!(env.get("sv1", "db-password", Some(&v1)).is_ok());

    // Versions list: versioned ids, no values.
    let list = env
        .p
        .list_secret_versions(&env.admin, "sv1", "db-password", &q(None, None))
        .unwrap();
    let items = list["value"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for item in items {
        assert!(item.get("value").is_none());
        assert!(
            item["id"]
                .as_str()
                .unwrap()
                .contains("/secrets/Db-Password/")
        );
    }
    assert!(list["nextLink"].is_null());

    // Not found.
    let e = env.get("sv1", "nope", None).unwrap_err();
    assert_eq!(e.status(), 404);
    assert_eq!(e.code, ErrorCode::SecretNotFound);
    assert_eq!(
        e.message,
        "A secret with (name/id) nope was not found in this key vault."
    );
    let missing = "0".repeat(32);
    assert_eq!(
        env.get("sv1", "db-password", Some(&missing))
            .unwrap_err()
            .status(),
        404
    );
    assert_eq!(
        status(
            env.update("sv1", "nope", None, json!({"contentType": "x"}))
                .await
        )
        .0,
        404
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_is_stored() {
    let env = Env::new().await;
    env.vault("sv2", json!({})).await;
    let max = "v".repeat(MAX_VALUE_BYTES);
    assert!(env.set("sv2", "big", json!({"value": max})).await.is_ok());
    let over = "v".repeat(MAX_VALUE_BYTES + 1);
    let e = env
        .set("sv2", "toobig", json!({"value": over}))
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.code), (400, ErrorCode::BadParameter));
    assert!(!e.message.contains("vvvv"));
    assert_eq!(
        status(env.set("sv2", "noval", json!({"contentType": "x"})).await).0,
        400
    );
    let long_ct = "c".repeat(256);
    assert_eq!(
        status(
            env.set("sv2", "ct", json!({"value": "x", "contentType": long_ct}))
                .await
        )
        .0,
        400
    );
    assert_eq!(
        status(env.set("sv2", "bad_name", json!({"value": "x"})).await).0,
        400
    );
    assert_eq!(
        status(
            env.set(
                "sv2",
                "times",
                json!({"value": "x", "attributes": {"nbf": 200, "exp": 100}})
            )
            .await
        )
        .0,
        400
    );
    let names: Vec<String> = env
        .p
        .list_secrets(&env.admin, "sv2", &q(None, None))
        .unwrap()["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["https://sv2.localhost:8443/secrets/big"]);
}

#[tokio::test]
async fn values_are_sealed_at_rest_and_survive_reopen() {
    let mut env = Env::new().await;
    env.vault("sv3", json!({})).await;
    let set = env
        .set(
            "sv3",
            "marker",
            json!({"value": MARKER, "contentType": "text/plain", "tags": {"t": "1"}}),
        )
        .await
        .unwrap();
    env.set("sv3", "marker", json!({"value": format!("{MARKER}-v2")}))
        .await
        .unwrap();
    let v1 = version_of(&set);

    // Neither the database nor its write-ahead log holds the value in the clear.
    let mut bytes = Vec::new();
    for f in ["kagi.db", "kagi.db-wal"] {
        if let Ok(b) = std::fs::read(env.dir.path().join(f)) {
            bytes.extend(b);
        }
    }
    assert!(bytes.len() > 4096, "the store wrote nothing?");
    let needle = &MARKER.as_bytes()[..20];
    assert!(
        !bytes.windows(needle.len()).any(|w| w == needle),
        "plaintext secret found in the store files"
    );

    // Debug output of the platform holds no value either.
    let debug = format!("{:?}", env.p);
    assert!(!debug.contains(&MARKER[..20]));

    env.reopen().await;
    let got = env.get("sv3", "marker", Some(&v1)).unwrap();
    assert_eq!(got["value"], MARKER);
    assert_eq!(got["contentType"], "text/plain");
    assert_eq!(got["tags"]["t"], "1");
    assert_eq!(
        env.get("sv3", "MARKER", None).unwrap()["value"],
        format!("{MARKER}-v2")
    );
}

#[tokio::test]
async fn delete_recover_purge_and_conflicts() {
    let mut env = Env::new().await;
    env.vault("sv4", json!({})).await;
    env.set("sv4", "s1", json!({"value": "a"})).await.unwrap();
    env.set("sv4", "s1", json!({"value": "b"})).await.unwrap();
    let now = env.p.now();
    let d = env.p.delete_secret(&env.admin, "sv4", "s1").await.unwrap();
    assert!(d.get("value").is_none());
    assert_eq!(
        d["recoveryId"],
        "https://sv4.localhost:8443/deletedsecrets/s1"
    );
    let deleted = d["deletedDate"].as_i64().unwrap();
    assert!(deleted >= now);
    assert_eq!(d["scheduledPurgeDate"].as_i64().unwrap(), deleted + 7 * DAY);
    assert!(d["id"].as_str().unwrap().contains("/secrets/s1/"));

    // Gone from the live API; the name cannot be reused.
    assert_eq!(env.get("sv4", "s1", None).unwrap_err().status(), 404);
    let e = env
        .set("sv4", "s1", json!({"value": "c"}))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 409);
    assert_eq!(e.inner, Some("ObjectIsDeletedButRecoverable"));
    assert!(
        env.p
            .list_secrets(&env.admin, "sv4", &q(None, None))
            .unwrap()["value"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let listed = env
        .p
        .list_deleted_secrets(&env.admin, "sv4", &q(None, None))
        .unwrap();
    assert_eq!(
        listed["value"][0]["id"],
        "https://sv4.localhost:8443/secrets/s1"
    );
    assert_eq!(
        listed["value"][0]["recoveryId"],
        "https://sv4.localhost:8443/deletedsecrets/s1"
    );
    assert!(env.p.get_deleted_secret(&env.admin, "sv4", "s1").is_ok());

    // Deleted state survives a restart.
    env.reopen().await;
    assert!(env.p.get_deleted_secret(&env.admin, "sv4", "s1").is_ok());

    let r = env
        .p
        .recover_deleted_secret(&env.admin, "sv4", "s1")
        .await
        .unwrap();
    assert!(r.get("value").is_none());
    assert_eq!(env.get("sv4", "s1", None).unwrap()["value"], "b");
    let e = env
        .p
        .get_deleted_secret(&env.admin, "sv4", "s1")
        .unwrap_err();
    assert_eq!((e.status(), e.code), (404, ErrorCode::SecretNotFound));
    assert_eq!(
        env.p
            .recover_deleted_secret(&env.admin, "sv4", "s1")
            .await
            .unwrap_err()
            .status(),
        404
    );

    // Delete and purge: the name is free again and the old versions are gone.
    env.p.delete_secret(&env.admin, "sv4", "s1").await.unwrap();
    env.p
        .purge_deleted_secret(&env.admin, "sv4", "s1")
        .await
        .unwrap();
    assert_eq!(
        env.p
            .purge_deleted_secret(&env.admin, "sv4", "s1")
            .await
            .unwrap_err()
            .status(),
        404
    );
    env.set("sv4", "s1", json!({"value": "fresh"}))
        .await
        .unwrap();
    let versions = env
        .p
        .list_secret_versions(&env.admin, "sv4", "s1", &q(None, None))
        .unwrap();
    assert_eq!(versions["value"].as_array().unwrap().len(), 1);
    env.reopen().await;
    assert_eq!(env.get("sv4", "s1", None).unwrap()["value"], "fresh");
    assert_eq!(
        env.p
            .delete_secret(&env.admin, "sv4", "missing")
            .await
            .unwrap_err()
            .status(),
        404
    );
}

#[tokio::test]
async fn purge_protection_holds_until_retention_ends() {
    let env = Env::new().await;
    env.vault("sv5", json!({"enablePurgeProtection": true}))
        .await;
    env.set("sv5", "held", json!({"value": "x"})).await.unwrap();
    let d = env
        .p
        .delete_secret(&env.admin, "sv5", "held")
        .await
        .unwrap();
    assert_eq!(d["attributes"]["recoveryLevel"], "CustomizedRecoverable");
    let e = env
        .p
        .purge_deleted_secret(&env.admin, "sv5", "held")
        .await
        .unwrap_err();
    assert_eq!(e.status(), 403);
    assert_eq!(e.inner, Some("PurgeProtectionEnabled"));
    // Retention (7 days) ends: the clock endpoint's sweep purges it.
    let now = env
        .p
        .advance_test_clock(&env.admin, 7 * DAY + 1)
        .await
        .unwrap();
    assert_eq!(now, env.p.now());
    assert_eq!(
        env.p
            .get_deleted_secret(&env.admin, "sv5", "held")
            .unwrap_err()
            .status(),
        404
    );
}

#[tokio::test]
async fn backup_and_restore() {
    let env = Env::new().await;
    env.vault("sv6", json!({})).await;
    env.vault("sv7", json!({})).await;
    let first = env
        .set("sv6", "Backed", json!({"value": "one", "tags": {"k": "v"}}))
        .await
        .unwrap();
    env.set(
        "sv6",
        "backed",
        json!({"value": MARKER, "contentType": "ct"}),
    )
    .await
    .unwrap();
    let blob = env.p.backup_secret(&env.admin, "sv6", "backed").unwrap();
    assert!(blob.value.starts_with(b"KAGI-SECRET-BACKUP\x01"));
    let needle = &MARKER.as_bytes()[..20];
    assert!(!blob.value.windows(needle.len()).any(|w| w == needle));

    // Restore refuses a live name, and a soft-deleted one.
    let again = || BackupBlob {
        value: blob.value.clone(),
    };
    assert_eq!(
        env.p
            .restore_secret(&env.admin, "sv6", again())
            .await
            .unwrap_err()
            .status(),
        409
    );
    env.p
        .delete_secret(&env.admin, "sv6", "backed")
        .await
        .unwrap();
    let e = env
        .p
        .restore_secret(&env.admin, "sv6", again())
        .await
        .unwrap_err();
    assert_eq!(e.inner, Some("ObjectIsDeletedButRecoverable"));

    // Into another vault: every version, values intact, no value in the answer.
    let r = env
        .p
        .restore_secret(&env.admin, "sv7", again())
        .await
        .unwrap();
    assert!(r.get("value").is_none());
    assert_eq!(r["contentType"], "ct");
    assert!(
        r["id"]
            .as_str()
            .unwrap()
            .starts_with("https://sv7.localhost:8443/secrets/Backed/")
    );
    assert_eq!(env.get("sv7", "backed", None).unwrap()["value"], MARKER);
    let old = env.get("sv7", "backed", Some(&version_of(&first))).unwrap();
    assert_eq!(old["value"], "one");
    assert_eq!(old["tags"]["k"], "v");

    // After purge, back into the original vault.
    env.p
        .purge_deleted_secret(&env.admin, "sv6", "backed")
        .await
        .unwrap();
    env.p
        .restore_secret(&env.admin, "sv6", again())
        .await
        .unwrap();
    assert_eq!(env.get("sv6", "backed", None).unwrap()["value"], MARKER);

    // Tampered, foreign or key blobs are refused with 400.
    let mut bad = blob.value.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let e = env
        .p
        .restore_secret(&env.admin, "sv7", BackupBlob { value: bad })
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.inner), (400, Some("InvalidBackupBlob")));
    let e = env
        .p
        .restore_secret(
            &env.admin,
            "sv7",
            BackupBlob {
                value: b"KAGI-KEY-BACKUP\x01xyz".to_vec(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), 400);
    assert_eq!(
        env.p
            .backup_secret(&env.admin, "sv7", "missing")
            .unwrap_err()
            .status(),
        404
    );
}

#[tokio::test]
async fn lists_page_by_maxresults_and_skiptoken() {
    let env = Env::new().await;
    env.vault("sv8", json!({})).await;
    for i in 0..30 {
        env.set(
            "sv8",
            &format!("s{i:02}"),
            json!({"value": format!("v{i}")}),
        )
        .await
        .unwrap();
    }
    for _ in 0..3 {
        env.set("sv8", "s00", json!({"value": "again"}))
            .await
            .unwrap();
    }
    let first = env
        .p
        .list_secrets(&env.admin, "sv8", &q(None, None))
        .unwrap();
    assert_eq!(first["value"].as_array().unwrap().len(), 25);
    assert!(first["value"][0].get("value").is_none());
    let next = first["nextLink"].as_str().unwrap();
    assert!(
        next.starts_with("https://sv8.localhost:8443/secrets?api-version=2026-04-01&$skiptoken=")
    );
    assert!(next.ends_with("&maxresults=25"));
    let token = next
        .split("$skiptoken=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_string();
    let second = env
        .p
        .list_secrets(&env.admin, "sv8", &q(None, Some(token)))
        .unwrap();
    assert_eq!(second["value"].as_array().unwrap().len(), 5);
    assert!(second["nextLink"].is_null());

    // Walk with maxresults=7: every name once, in order.
    let mut seen = Vec::new();
    let mut token = None;
    loop {
        let page = env
            .p
            .list_secrets(&env.admin, "sv8", &q(Some("7"), token.clone()))
            .unwrap();
        for item in page["value"].as_array().unwrap() {
            seen.push(
                item["id"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string(),
            );
        }
        match page["nextLink"].as_str() {
            Some(link) => {
                token = Some(
                    link.split("$skiptoken=")
                        .nth(1)
                        .unwrap()
                        .split('&')
                        .next()
                        .unwrap()
                        .to_string(),
                )
            }
            None => break,
        }
    }
    let want: Vec<String> = (0..30).map(|i| format!("s{i:02}")).collect();
    assert_eq!(seen, want);

    let versions = env
        .p
        .list_secret_versions(&env.admin, "sv8", "s00", &q(Some("2"), None))
        .unwrap();
    assert_eq!(versions["value"].as_array().unwrap().len(), 2);
    assert!(
        versions["nextLink"]
            .as_str()
            .unwrap()
            .starts_with("https://sv8.localhost:8443/secrets/s00/versions?")
    );
    assert_eq!(
        env.p
            .list_secrets(&env.admin, "sv8", &q(Some("26"), None))
            .unwrap_err()
            .status(),
        400
    );
}

#[tokio::test]
async fn test_clock_moves_validity_and_retention() {
    let mut env = Env::new().await;
    env.vault("sv9", json!({})).await;
    let old_token = token(&env.p, &env.creds).await;
    let now = env.p.now();
    env.set(
        "sv9",
        "expiring",
        json!({"value": "x", "attributes": {"exp": now + 3600}}),
    )
    .await
    .unwrap();
    env.set(
        "sv9",
        "later",
        json!({"value": "y", "attributes": {"nbf": now + 1800}}),
    )
    .await
    .unwrap();
    assert!(env.get("sv9", "expiring", None).is_ok());
    let e = env.get("sv9", "later", None).unwrap_err();
    assert_eq!((e.status(), e.inner), (403, Some("SecretNotYetValid")));

    // Only the bootstrap administrator moves the clock; bad amounts are 400.
    let mut other = env.admin.clone();
    other.object_id = "00000000-0000-4000-8000-000000000001".into();
    let e = env.p.advance_test_clock(&other, 60).await.unwrap_err();
    assert_eq!(e.status(), 403);
    // Others also need an access policy for secrets.
    assert_eq!(
        env.p
            .get_secret(&other, "sv9", "expiring", None)
            .unwrap_err()
            .status(),
        403
    );
    assert_eq!(
        env.p
            .advance_test_clock(&env.admin, -1)
            .await
            .unwrap_err()
            .status(),
        400
    );
    assert_eq!(
        env.p
            .advance_test_clock(&env.admin, 101 * 365 * DAY)
            .await
            .unwrap_err()
            .status(),
        400
    );

    let after = env.p.advance_test_clock(&env.admin, 7200).await.unwrap();
    assert!(after >= now + 7200);
    let e = env.get("sv9", "expiring", None).unwrap_err();
    assert_eq!((e.status(), e.inner), (403, Some("SecretExpired")));
    assert_eq!(env.get("sv9", "later", None).unwrap()["value"], "y");
    // Listing and updating still work on an expired secret.
    assert_eq!(
        env.p
            .list_secrets(&env.admin, "sv9", &q(None, None))
            .unwrap()["value"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    env.update(
        "sv9",
        "expiring",
        None,
        json!({"attributes": {"exp": after + 3600}}),
    )
    .await
    .unwrap();
    assert_eq!(env.get("sv9", "expiring", None).unwrap()["value"], "x");

    // Tokens follow the same clock: the two-hour-old token is refused, a new one works.
    assert_eq!(env.p.authenticate(&old_token).unwrap_err().status(), 401);
    env.admin = sign_in(&env.p, &env.creds).await;
    let d = env
        .p
        .delete_secret(&env.admin, "sv9", "later")
        .await
        .unwrap();
    assert!(d["deletedDate"].as_i64().unwrap() >= after);
    env.reopen().await;
    assert!(env.p.has_test_clock());

    // Retention is 7 days: after 6 days the secret is still recoverable, after 8 it is gone.
    env.p.advance_test_clock(&env.admin, 6 * DAY).await.unwrap();
    assert!(env.p.get_deleted_secret(&env.admin, "sv9", "later").is_ok());
    env.p.advance_test_clock(&env.admin, 2 * DAY).await.unwrap();
    env.admin = sign_in(&env.p, &env.creds).await;
    assert_eq!(
        env.p
            .get_deleted_secret(&env.admin, "sv9", "later")
            .unwrap_err()
            .status(),
        404
    );
    // Purged for good: not back after a restart, and the name is free.
    env.reopen().await;
    assert!(
        env.p
            .get_deleted_secret(&env.admin, "sv9", "later")
            .is_err()
    );
    env.set("sv9", "later", json!({"value": "new"}))
        .await
        .unwrap();
}

#[tokio::test]
async fn platform_without_test_clock_refuses_to_move_time() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqlStore::open_sqlite(&dir.path().join("kagi.db"))
            .await
            .unwrap(),
    );
    let (p, created) = Platform::open_with(
        config(dir.path()),
        Arc::new(kagi_core::time::SystemClock),
        Arc::new(AesRootKey::from_bytes(&ROOT)),
        store,
    )
    .await
    .unwrap();
    let admin = sign_in(&p, &created.unwrap()).await;
    assert!(!p.has_test_clock());
    let e = p.advance_test_clock(&admin, 10).await.unwrap_err();
    assert_eq!(e.status(), 404);
}

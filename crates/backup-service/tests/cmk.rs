//! Backup vaults end to end, over the real HTTPS server in-process: the service reaches the
//! customer's key only through the key vault's data plane with its identity's token.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::ops::{Deref, DerefMut};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use kagi_testkit::{BackupKeys, Options, TestServer};
use serde_json::{Value, json};

/// The shared harness, with this file's resources (resource group `rg1` and what is in it).
struct Server(TestServer);

impl Deref for Server {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.0
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut TestServer {
        &mut self.0
    }
}

/// A server whose backup service keeps data keys `cache` long and polls key versions every
/// `poll`; the administrator logged in.
async fn start(cache: Duration, poll: Duration) -> Server {
    Server(
        TestServer::start(Options {
            backup_service: Some(BackupKeys {
                key_cache_lifetime: cache,
                key_poll_interval: poll,
            }),
            ..Options::default()
        })
        .await,
    )
}

impl Server {
    async fn rp_names(&self, item: &str) -> Vec<String> {
        let (st, r) = self
            .arm("GET", &format!("{item}/recoveryPoints"), None)
            .await;
        assert_eq!(st, 200, "{r}");
        r["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect()
    }
    fn rg(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/rg1",
            self.admin.subscription_id
        )
    }
    fn bv(&self, name: &str) -> String {
        format!(
            "{}/providers/Microsoft.RecoveryServices/vaults/{name}",
            self.rg()
        )
    }
    /// Resource group, a key vault (purge protection on unless `soft`), an RSA and an EC key.
    async fn setup(&self) {
        let (s, _) = self
            .arm(
                "PUT",
                &format!(
                    "/subscriptions/{}/resourcegroups/rg1",
                    self.admin.subscription_id
                ),
                Some(json!({"location": "westeurope"})),
            )
            .await;
        assert_eq!(s, 201);
        for (name, purge, loc) in [
            ("kv1", true, "westeurope"),
            ("kv2", true, "northeurope"),
            ("kvsoft", false, "westeurope"),
        ] {
            let (s, v) = self
                .arm(
                    "PUT",
                    &format!("{}/providers/Microsoft.KeyVault/vaults/{name}", self.rg()),
                    Some(json!({"location": loc, "properties": {
                        "tenantId": self.admin.tenant_id, "sku": {"family": "A", "name": "standard"},
                        "enablePurgeProtection": purge, "softDeleteRetentionInDays": 7}})),
                )
                .await;
            assert_eq!(s, 201, "{v}");
            let (s, v) = self
                .data(
                    "POST",
                    name,
                    "/keys/cmk/create",
                    Some(json!({"kty": "RSA", "key_size": 2048})),
                )
                .await;
            assert_eq!(s, 200, "{v}");
        }
        let (s, _) = self
            .data(
                "POST",
                "kv1",
                "/keys/eck/create",
                Some(json!({"kty": "EC", "crv": "P-256"})),
            )
            .await;
        assert_eq!(s, 200);
    }
    /// Grants `oid` these key permissions on `vault` (access policy).
    async fn grant(&self, vault: &str, oid: &str, perms: &[&str]) {
        let (s, v) = self
            .arm(
                "PUT",
                &format!("{}/providers/Microsoft.KeyVault/vaults/{vault}", self.rg()),
                Some(json!({"location": "westeurope", "properties": {"accessPolicies": [
                    {"tenantId": self.admin.tenant_id, "objectId": oid, "permissions": {"keys": perms}}]}})),
            )
            .await;
        assert!(s == 200 || s == 201, "{v}");
    }
    async fn uami(&self, name: &str) -> (String, String) {
        let (s, v) = self
            .arm(
                "PUT",
                &format!(
                    "{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}",
                    self.rg()
                ),
                Some(json!({"location": "westeurope"})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        (
            v["id"].as_str().unwrap().to_string(),
            v["properties"]["principalId"].as_str().unwrap().to_string(),
        )
    }
    fn key_uri(&self, vault: &str, key: &str) -> String {
        self.vault_url(vault, &format!("/keys/{key}"))
    }
    /// Waits for a job of backup vault `vault` (in `rg1`) to end.
    async fn wait_job(&self, vault: &str, job: &Value) -> Value {
        self.0.wait_job(&self.bv(vault), job).await
    }
    async fn backup(&self, vault: &str, item: &str) -> Value {
        self.0.backup(&self.bv(vault), item).await
    }
    async fn restore(&self, vault: &str, item: &str, rp: &str, target: &Path) -> Value {
        self.0.restore(&self.bv(vault), item, rp, target).await
    }
    fn item_keys(&self, vault: &str, item: &str) -> Vec<String> {
        let d = self
            .backup_vault_dir(&self.admin.subscription_id, "rg1", vault)
            .join("items")
            .join(item)
            .join("keys");
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }
}

fn make_source(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub/empty")).unwrap();
    std::fs::write(dir.join("a.txt"), b"hello backup\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("sub/big.bin"), &big).unwrap();
    std::fs::set_permissions(dir.join("a.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("a.txt", dir.join("link")).unwrap();
}

fn assert_same(a: &Path, b: &Path) {
    let mut ea: Vec<_> = std::fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut eb: Vec<_> = std::fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    ea.sort();
    eb.sort();
    assert_eq!(ea, eb, "{} vs {}", a.display(), b.display());
    for n in ea {
        let (pa, pb) = (a.join(&n), b.join(&n));
        let (ma, mb) = (
            std::fs::symlink_metadata(&pa).unwrap(),
            std::fs::symlink_metadata(&pb).unwrap(),
        );
        assert_eq!(ma.file_type(), mb.file_type());
        assert_eq!(
            ma.permissions().mode(),
            mb.permissions().mode(),
            "{}",
            pa.display()
        );
        if ma.is_dir() {
            assert_same(&pa, &pb);
        } else if ma.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&pa).unwrap(),
                std::fs::read_link(&pb).unwrap()
            );
        } else {
            assert_eq!(std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pmk_backup_restore_and_cmk_rules() {
    let s = start(Duration::from_secs(600), Duration::from_secs(3600)).await;
    s.setup().await;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_source(&src);

    // BK-1: PMK by default.
    let (st, v) = s
        .arm(
            "PUT",
            &s.bv("bv1"),
            Some(json!({"location": "westeurope", "identity": {"type": "SystemAssigned"}})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert!(v["properties"].get("encryption").is_none());
    assert!(v["identity"]["principalId"].is_string());

    // BK-2: a failed protection attempt counts.
    let (st, e) = s
        .arm(
            "PUT",
            &format!("{}/backupProtectedItems/i1", s.bv("bv1")),
            Some(json!({"properties": {"sourcePath": "/does/not/exist"}})),
        )
        .await;
    assert_eq!(st, 400);
    assert_eq!(e["error"]["innererror"]["code"], "InvalidSourcePath");
    let oid = v["identity"]["principalId"].as_str().unwrap().to_string();
    s.grant("kv1", &oid, &["get", "list", "wrapKey", "unwrapKey"])
        .await;
    let (st, e) = s
        .arm(
            "PUT",
            &s.bv("bv1"),
            Some(json!({"properties": {"encryption": {
            "keyVaultProperties": {"keyUri": s.key_uri("kv1", "cmk")},
            "kekIdentity": {"useSystemAssignedIdentity": true}}}})),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(
        e["error"]["innererror"]["code"],
        "CmkNotAllowedAfterProtection"
    );

    // PMK backup and restore, byte for byte.
    let (st, it) = s
        .arm(
            "PUT",
            &format!("{}/backupProtectedItems/i1", s.bv("bv1")),
            Some(json!({"properties": {"sourcePath": src}})),
        )
        .await;
    assert_eq!(st, 201, "{it}");
    let j = s.backup("bv1", "i1").await;
    assert_eq!(j["status"], "Completed", "{j}");
    assert_eq!(j["operation"], "Backup");
    let rp = j["stats"]["recoveryPointId"].as_str().unwrap().to_string();
    let (st, rps) = s
        .arm(
            "GET",
            &format!("{}/backupProtectedItems/i1/recoveryPoints", s.bv("bv1")),
            None,
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(rps["value"][0]["name"], rp.as_str());
    let j2 = s.backup("bv1", "i1").await;
    assert_eq!(j2["stats"]["chunksNew"], 0, "{j2}");
    let out = work.path().join("out-pmk");
    let r = s.restore("bv1", "i1", &rp, &out).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_same(&src, &out);
    // Not empty: refused unless overwrite.
    let r = s.restore("bv1", "i1", &rp, &out).await;
    assert_eq!(r["status"], "Failed");

    // A vault that was never used: each BK-4 rule.
    let (st, v2) = s
        .arm(
            "PUT",
            &s.bv("bv2"),
            Some(json!({"location": "westeurope", "identity": {"type": "SystemAssigned"}})),
        )
        .await;
    assert_eq!(st, 201);
    let oid2 = v2["identity"]["principalId"].as_str().unwrap().to_string();
    let try_key = |uri: String| {
        let s = &s;
        async move {
            let (st, e) = s
                .arm(
                    "PUT",
                    &s.bv("bv2"),
                    Some(json!({"properties": {"encryption": {
                    "keyVaultProperties": {"keyUri": uri},
                    "kekIdentity": {"useSystemAssignedIdentity": true}}}})),
                )
                .await;
            (
                st,
                e["error"]["innererror"]["code"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                e,
            )
        }
    };
    let p = s.port;
    for (uri, want) in [
        ("not-a-uri".to_string(), "InvalidKeyUri"),
        (
            "https://kv1.vault.azure.net/keys/cmk".to_string(),
            "KeyVaultHostNotServed",
        ),
        (
            format!("https://kv1.localhost:{p}/secrets/cmk"),
            "KeyUriIsSecret",
        ),
        (
            format!("https://nokv.localhost:{p}/keys/cmk"),
            "KeyVaultNotFound",
        ),
        (
            format!("https://kv2.localhost:{p}/keys/cmk"),
            "KeyVaultRegionMismatch",
        ),
        (
            format!("https://kvsoft.localhost:{p}/keys/cmk"),
            "KeyVaultSoftDeleteOrPurgeProtectionDisabled",
        ),
        (
            format!("https://kv1.localhost:{p}/keys/cmk"),
            "IdentityLacksKeyPermission",
        ),
    ] {
        let (st, code, e) = try_key(uri.clone()).await;
        assert_eq!((st, code.as_str()), (400, want), "{uri}: {e}");
    }
    // Permissions one by one: each missing one is named.
    for (perms, missing) in [
        (vec!["list", "wrapKey", "unwrapKey"], "'get'"),
        (vec!["get", "wrapKey", "unwrapKey"], "'list'"),
        (vec!["get", "list", "unwrapKey"], "'wrapKey'"),
        (vec!["get", "list", "wrapKey"], "'unwrapKey'"),
    ] {
        s.grant("kv1", &oid2, &perms).await;
        let (st, code, e) = try_key(s.key_uri("kv1", "cmk")).await;
        assert_eq!(
            (st, code.as_str()),
            (400, "IdentityLacksKeyPermission"),
            "{e}"
        );
        assert!(
            e["error"]["message"].as_str().unwrap().contains(missing),
            "{e}"
        );
        assert!(
            e["error"]["message"].as_str().unwrap().contains(&oid2),
            "{e}"
        );
    }
    s.grant("kv1", &oid2, &["get", "list", "wrapKey", "unwrapKey"])
        .await;
    let (st, code, _) = try_key(s.key_uri("kv1", "eck")).await;
    assert_eq!((st, code.as_str()), (400, "KeyTypeNotRsa"));
    let (st, code, _) = try_key(format!(
        "{}/0123456789abcdef0123456789abcdef",
        s.key_uri("kv1", "cmk")
    ))
    .await;
    assert_eq!((st, code.as_str()), (400, "KeyVersionNotFound"));
    let (st, _) = s
        .data(
            "PATCH",
            "kv1",
            "/keys/cmk",
            Some(json!({"attributes": {"enabled": false}})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, code, _) = try_key(s.key_uri("kv1", "cmk")).await;
    assert_eq!((st, code.as_str()), (400, "KeyDisabled"));
    s.data(
        "PATCH",
        "kv1",
        "/keys/cmk",
        Some(json!({"attributes": {"enabled": true}})),
    )
    .await;
    // All good: CMK on, as a job, in the activity log.
    let (st, code, e) = try_key(s.key_uri("kv1", "cmk")).await;
    assert_eq!((st, code.as_str()), (200, ""), "{e}");
    assert_eq!(
        e["properties"]["encryption"]["keyVaultProperties"]["keyUri"],
        s.key_uri("kv1", "cmk")
    );
    let (_, jobs) = s
        .arm("GET", &format!("{}/backupJobs", s.bv("bv2")), None)
        .await;
    let cfg = jobs["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["operation"] == "ConfigureEncryption" && j["status"] != "Failed")
        .unwrap()
        .clone();
    assert_eq!(s.wait_job("bv2", &cfg).await["status"], "Completed");
    let (_, log) = s
        .arm("GET", &format!("{}/activityLog", s.bv("bv2")), None)
        .await;
    assert!(
        log["value"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |e| e["operationName"] == "Microsoft.RecoveryServices/vaults/encryption/write"
                    && e["status"] == "Succeeded"
            ),
        "{log}"
    );
    // BK-3: never back to PMK.
    let (st, e) = s
        .arm(
            "PUT",
            &s.bv("bv2"),
            Some(json!({"properties": {"encryption": null}})),
        )
        .await;
    assert_eq!(
        (st, e["error"]["innererror"]["code"].as_str()),
        (400, Some("CannotDisableCustomerManagedKey"))
    );
    // The identity in use cannot be removed.
    let (st, _) = s
        .arm(
            "PUT",
            &s.bv("bv2"),
            Some(json!({"identity": {"type": "None"}})),
        )
        .await;
    assert_eq!(st, 400);

    // BK-8: CMK at creation needs a user-assigned identity.
    let (st, e) = s.arm("PUT", &s.bv("bv3"), Some(json!({"location": "westeurope", "identity": {"type": "SystemAssigned"},
        "properties": {"encryption": {"keyVaultProperties": {"keyUri": s.key_uri("kv1", "cmk")}, "kekIdentity": {"useSystemAssignedIdentity": true}}}}))).await;
    assert_eq!(
        (st, e["error"]["innererror"]["code"].as_str()),
        (400, Some("SystemAssignedIdentityNotAllowedAtCreation"))
    );
    let (uid, uoid) = s.uami("u1").await;
    let body = json!({"location": "westeurope", "identity": {"type": "UserAssigned", "userAssignedIdentities": {uid.clone(): {}}},
        "properties": {"encryption": {"keyVaultProperties": {"keyUri": s.key_uri("kv1", "cmk")}, "kekIdentity": {"userAssignedIdentity": uid}}}});
    let (st, e) = s.arm("PUT", &s.bv("bv3"), Some(body.clone())).await;
    assert_eq!(
        (st, e["error"]["innererror"]["code"].as_str()),
        (400, Some("IdentityLacksKeyPermission")),
        "{e}"
    );
    let (st, _) = s.arm("GET", &s.bv("bv3"), None).await;
    assert_eq!(st, 404, "a refused creation leaves no vault");
    s.grant("kv1", &uoid, &["get", "list", "wrapKey", "unwrapKey"])
        .await;
    let (st, e) = s.arm("PUT", &s.bv("bv3"), Some(body)).await;
    assert_eq!(st, 201, "{e}");
    assert_eq!(
        e["properties"]["encryption"]["kekIdentity"]["userAssignedIdentity"],
        uid.as_str()
    );

    // CMK backup and restore, byte for byte, with the key reached over HTTPS.
    let (st, it) = s
        .arm(
            "PUT",
            &format!("{}/backupProtectedItems/i1", s.bv("bv3")),
            Some(json!({"properties": {"sourcePath": src}})),
        )
        .await;
    assert_eq!(st, 201, "{it}");
    let j = s.backup("bv3", "i1").await;
    assert_eq!(j["status"], "Completed", "{j}");
    let out = work.path().join("out-cmk");
    let r = s
        .restore(
            "bv3",
            "i1",
            j["stats"]["recoveryPointId"].as_str().unwrap(),
            &out,
        )
        .await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_same(&src, &out);
    let keys = s.item_keys("bv3", "i1");
    assert_eq!(keys.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_rewraps_only_and_revocation_stops_jobs() {
    // Key cache 1 s, versionless URIs resolved on every job.
    let s = start(Duration::from_secs(1), Duration::from_secs(0)).await;
    s.setup().await;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_source(&src);
    let (uid, uoid) = s.uami("u1").await;
    s.grant("kv1", &uoid, &["get", "list", "wrapKey", "unwrapKey"])
        .await;
    let (st, v) = s.arm("PUT", &s.bv("bv"), Some(json!({"location": "westeurope",
        "identity": {"type": "UserAssigned", "userAssignedIdentities": {uid.clone(): {}}},
        "properties": {"encryption": {"keyVaultProperties": {"keyUri": s.key_uri("kv1", "cmk")}, "kekIdentity": {"userAssignedIdentity": uid}}}}))).await;
    assert_eq!(st, 201, "{v}");
    s.arm(
        "PUT",
        &format!("{}/backupProtectedItems/i1", s.bv("bv")),
        Some(json!({"properties": {"sourcePath": src}})),
    )
    .await;
    let j1 = s.backup("bv", "i1").await;
    assert_eq!(j1["status"], "Completed", "{j1}");
    let rp1 = j1["stats"]["recoveryPointId"].as_str().unwrap().to_string();
    let before = s.item_keys("bv", "i1");
    assert_eq!(before.len(), 1);

    // BK-5: rotate; the next job adopts the new version by writing exactly one keys/ entry,
    // and the old entry stays until a backup job has completed.
    let (st, _) = s
        .data("POST", "kv1", "/keys/cmk/rotate", Some(json!({})))
        .await;
    assert_eq!(st, 200);
    let (st, rps) = s
        .arm(
            "GET",
            &format!("{}/backupProtectedItems/i1/recoveryPoints", s.bv("bv")),
            None,
        )
        .await;
    assert_eq!(st, 200, "{rps}");
    let during = s.item_keys("bv", "i1");
    assert_eq!(
        during.len(),
        2,
        "one new wrapped data key, the old one kept"
    );
    let data_files = |s: &Server| {
        let d = s
            .backup_vault_dir(&s.admin.subscription_id, "rg1", "bv")
            .join("items/i1/data");
        walk(&d)
    };
    let data_before = data_files(&s);
    let j2 = s.backup("bv", "i1").await;
    assert_eq!(j2["status"], "Completed", "{j2}");
    let after = s.item_keys("bv", "i1");
    assert_eq!(
        after.len(),
        1,
        "the old version's entry is removed after one more backup"
    );
    assert!(!before.contains(&after[0]));
    assert_eq!(
        j2["stats"]["chunksNew"], 0,
        "rotation re-encrypted no data: {j2}"
    );
    let data_after = data_files(&s);
    assert!(
        data_before.iter().all(|f| data_after.contains(f)),
        "no pack rewritten"
    );

    // Revocation: disable the key; after one cache lifetime the job fails naming the key.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.data(
        "PATCH",
        "kv1",
        "/keys/cmk",
        Some(json!({"attributes": {"enabled": false}})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let j3 = s.backup("bv", "i1").await;
    assert_eq!(j3["status"], "Failed", "{j3}");
    let msg = j3["error"]["message"].as_str().unwrap();
    assert!(msg.contains("/keys/cmk"), "{msg}");
    assert!(
        msg.contains("disabled") || msg.contains("KeyDisabled"),
        "{msg}"
    );
    let out = work.path().join("denied");
    let r = s.restore("bv", "i1", &rp1, &out).await;
    assert_eq!(r["status"], "Failed", "{r}");
    let (_, log) = s
        .arm("GET", &format!("{}/activityLog", s.bv("bv")), None)
        .await;
    assert!(
        log["value"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |e| e["operationName"] == "Microsoft.RecoveryServices/vaults/keyAccess"
                    && e["status"] == "Failed"
            ),
        "{log}"
    );
    // One "new version in use" per version adopted (the rotation), not one per job.
    let changes = log["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["operationName"] == "Microsoft.RecoveryServices/vaults/encryption/keyVersionChanged"
        })
        .count();
    assert_eq!(changes, 1, "{log}");
    // Enabled again: jobs succeed with no repair, old recovery points still restore.
    s.data(
        "PATCH",
        "kv1",
        "/keys/cmk",
        Some(json!({"attributes": {"enabled": true}})),
    )
    .await;
    let j4 = s.backup("bv", "i1").await;
    assert_eq!(j4["status"], "Completed", "{j4}");
    let out = work.path().join("back");
    let r = s.restore("bv", "i1", &rp1, &out).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_same(&src, &out);

    // Permission removed: same story, reason from the vault (ForbiddenByPolicy).
    s.grant("kv1", &uoid, &["list"]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let j5 = s.backup("bv", "i1").await;
    assert_eq!(j5["status"], "Failed", "{j5}");
    assert!(
        j5["error"]["message"].as_str().unwrap().contains("403"),
        "{j5}"
    );
    s.grant("kv1", &uoid, &["get", "list", "wrapKey", "unwrapKey"])
        .await;
    let j6 = s.backup("bv", "i1").await;
    assert_eq!(j6["status"], "Completed", "{j6}");
}

fn walk(d: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_detects_a_corrupted_pack() {
    let s = start(Duration::from_secs(600), Duration::from_secs(3600)).await;
    s.setup().await;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_source(&src);
    let (st, v) = s
        .arm("PUT", &s.bv("bvc"), Some(json!({"location": "westeurope"})))
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, it) = s
        .arm(
            "PUT",
            &format!("{}/backupProtectedItems/i1", s.bv("bvc")),
            Some(json!({"properties": {"sourcePath": src}})),
        )
        .await;
    assert_eq!(st, 201, "{it}");
    let j = s.backup("bvc", "i1").await;
    assert_eq!(j["status"], "Completed", "{j}");
    let rp = j["stats"]["recoveryPointId"].as_str().unwrap().to_string();
    let check = |read: bool| {
        let s = &s;
        async move {
            let (st, j) = s
                .arm(
                    "POST",
                    &format!("{}/backupProtectedItems/i1/check", s.bv("bvc")),
                    Some(json!({"readData": read})),
                )
                .await;
            assert_eq!(st, 202, "{j}");
            assert_eq!(j["operation"], "Check");
            s.wait_job("bvc", &j).await
        }
    };
    // A clean repository checks clean, with and without reading the data.
    for read in [false, true] {
        let c = check(read).await;
        assert_eq!(c["status"], "Completed", "{c}");
        assert_eq!(c["stats"]["healthy"], true, "{c}");
    }
    // Flip one byte in the middle of the largest pack (content of sub/big.bin).
    let data = s
        .backup_vault_dir(&s.admin.subscription_id, "rg1", "bvc")
        .join("items/i1/data");
    let mut packs = walk(&data)
        .into_iter()
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_file())
        .collect::<Vec<_>>();
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let victim = packs.last().unwrap();
    let mut bytes = std::fs::read(victim).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0x40;
    std::fs::write(victim, &bytes).unwrap();
    // Reading the data finds it; the job fails and names the damage.
    let c = check(true).await;
    assert_eq!(c["status"], "Failed", "{c}");
    assert_eq!(c["error"]["code"], "RepositoryDamaged", "{c}");
    assert_eq!(c["stats"]["healthy"], false, "{c}");
    assert!(
        !c["stats"]["problems"].as_array().unwrap().is_empty(),
        "{c}"
    );
    let (_, log) = s
        .arm("GET", &format!("{}/activityLog", s.bv("bvc")), None)
        .await;
    assert!(log.to_string().contains("backupJobs/check"), "{log}");
    // And a restore of the damaged recovery point fails rather than writing bad data.
    let out = work.path().join("out");
    let r = s.restore("bvc", "i1", &rp, &out).await;
    assert_eq!(r["status"], "Failed", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_cmk_deny_audit_disabled() {
    let s = start(Duration::from_secs(600), Duration::from_secs(3600)).await;
    s.setup().await;
    let sub = format!("/subscriptions/{}", s.admin.subscription_id);
    let def = "/providers/Microsoft.Authorization/policyDefinitions/kagi-backup-vaults-cmk";
    let assign = |scope: String, effect: Option<&'static str>| {
        let s = &s;
        async move {
            let mut props = json!({"policyDefinitionId": def});
            if let Some(e) = effect {
                props["parameters"] = json!({"effect": {"value": e}});
            }
            let (st, v) = s
                .arm(
                    "PUT",
                    &format!("{scope}/providers/Microsoft.Authorization/policyAssignments/cmk"),
                    Some(json!({"properties": props})),
                )
                .await;
            assert!(st == 200 || st == 201, "{v}");
            v
        }
    };
    let unassign = |scope: String| {
        let s = &s;
        async move {
            let (st, _) = s
                .arm(
                    "DELETE",
                    &format!("{scope}/providers/Microsoft.Authorization/policyAssignments/cmk"),
                    None,
                )
                .await;
            assert_eq!(st, 200);
        }
    };
    let pmk = json!({"location": "westeurope"});
    let (uid, uoid) = s.uami("u1").await;
    s.grant("kv1", &uoid, &["get", "list", "wrapKey", "unwrapKey"])
        .await;
    let cmk = json!({"location": "westeurope",
        "identity": {"type": "UserAssigned", "userAssignedIdentities": {uid.clone(): {}}},
        "properties": {"encryption": {"keyVaultProperties": {"keyUri": s.key_uri("kv1", "cmk")}, "kekIdentity": {"userAssignedIdentity": uid}}}});

    // Bad assignments are refused.
    let (st, e) = s
        .arm(
            "PUT",
            &format!("{sub}/providers/Microsoft.Authorization/policyAssignments/x"),
            Some(json!({"properties": {"policyDefinitionId": def, "parameters": {"effect": {"value": "Modify"}}}})),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    let (st, e) = s
        .arm(
            "PUT",
            &format!("{sub}/providers/Microsoft.Authorization/policyAssignments/x"),
            Some(json!({"properties": {"policyDefinitionId": "/providers/Microsoft.Authorization/policyDefinitions/none"}})),
        )
        .await;
    assert_eq!(st, 404, "{e}");

    for scope in [sub.clone(), s.rg()] {
        // Deny: a PMK vault is refused (creation and update), a CMK vault is allowed.
        let a = assign(scope.clone(), Some("Deny")).await;
        assert_eq!(a["properties"]["effect"], "Deny", "{a}");
        let (st, got) = s
            .arm(
                "GET",
                &format!("{scope}/providers/Microsoft.Authorization/policyAssignments/cmk"),
                None,
            )
            .await;
        assert_eq!(st, 200);
        assert_eq!(got["id"], a["id"]);
        let (st, e) = s.arm("PUT", &s.bv("pmk1"), Some(pmk.clone())).await;
        assert_eq!(st, 403, "{e}");
        assert_eq!(
            e["error"]["innererror"]["code"],
            "RequestDisallowedByPolicy"
        );
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("policyAssignments/cmk"),
            "{e}"
        );
        let (st, v) = s.arm("PUT", &s.bv("cmk1"), Some(cmk.clone())).await;
        assert!(st == 200 || st == 201, "{v}");
        // Audit (the default): allowed, reported non-compliant.
        assign(scope.clone(), None).await;
        let (st, v) = s.arm("PUT", &s.bv("pmk1"), Some(pmk.clone())).await;
        assert!(st == 200 || st == 201, "{v}");
        let (st, states) = s
            .arm(
                "POST",
                &format!(
                    "{sub}/providers/Microsoft.PolicyInsights/policyStates/latest/queryResults"
                ),
                None,
            )
            .await;
        assert_eq!(st, 200, "{states}");
        let state_of = |name: &str| {
            states["value"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| {
                    r["resourceId"]
                        .as_str()
                        .unwrap()
                        .ends_with(&format!("/{name}"))
                })
                .map(|r| r["complianceState"].as_str().unwrap().to_string())
        };
        assert_eq!(
            state_of("pmk1").as_deref(),
            Some("NonCompliant"),
            "{states}"
        );
        assert_eq!(state_of("cmk1").as_deref(), Some("Compliant"), "{states}");
        // Deny again: updating the existing PMK vault is refused and logged in its activity log.
        assign(scope.clone(), Some("Deny")).await;
        let (st, e) = s
            .arm("PATCH", &s.bv("pmk1"), Some(json!({"tags": {"a": "b"}})))
            .await;
        assert_eq!(st, 403, "{e}");
        let (_, log) = s
            .arm("GET", &format!("{}/activityLog", s.bv("pmk1")), None)
            .await;
        assert!(log.to_string().contains("disallowed by policy"), "{log}");
        // Disabled: nothing evaluated, nothing reported.
        assign(scope.clone(), Some("Disabled")).await;
        let (st, v) = s.arm("PUT", &s.bv("pmk2"), Some(pmk.clone())).await;
        assert_eq!(st, 201, "{v}");
        let (_, states) = s
            .arm(
                "GET",
                &format!(
                    "{sub}/providers/Microsoft.PolicyInsights/policyStates/latest/queryResults"
                ),
                None,
            )
            .await;
        assert_eq!(states["value"].as_array().unwrap().len(), 0, "{states}");
        let (_, list) = s
            .arm(
                "GET",
                &format!("{sub}/providers/Microsoft.Authorization/policyAssignments"),
                None,
            )
            .await;
        assert_eq!(list["value"].as_array().unwrap().len(), 1, "{list}");
        unassign(scope.clone()).await;
        for v in ["pmk1", "pmk2", "cmk1"] {
            s.arm("DELETE", &s.bv(v), None).await;
        }
    }
    // A resource group elsewhere is not governed by a group-scoped Deny.
    assign(
        format!(
            "/subscriptions/{}/resourceGroups/other",
            s.admin.subscription_id
        ),
        Some("Deny"),
    )
    .await;
    let (st, v) = s.arm("PUT", &s.bv("pmk3"), Some(pmk.clone())).await;
    assert_eq!(st, 201, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduled_backups_with_retention() {
    let mut s = start(Duration::from_secs(600), Duration::from_secs(3600)).await;
    s.setup().await;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_source(&src);
    let (st, v) = s
        .arm("PUT", &s.bv("bvs"), Some(json!({"location": "westeurope"})))
        .await;
    assert_eq!(st, 201, "{v}");
    let item = format!("{}/backupProtectedItems/i1", s.bv("bvs"));
    let (st, e) = s
        .arm(
            "PUT",
            &item,
            Some(json!({"properties": {"sourcePath": src, "schedule": {"intervalHours": 0}}})),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["innererror"]["code"], "InvalidSchedule");
    let (st, it) = s
        .arm(
            "PUT",
            &item,
            Some(json!({"properties": {"sourcePath": src, "schedule": {"intervalHours": 6}, "retention": {"keepLast": 2}}})),
        )
        .await;
    assert_eq!(st, 201, "{it}");
    assert_eq!(it["properties"]["schedule"]["intervalHours"], 6);
    assert_eq!(it["properties"]["retention"]["keepLast"], 2);
    assert!(it["properties"]["nextScheduledBackup"].is_string(), "{it}");
    let svc = s.backup_service();
    // Nothing is due before the interval has passed.
    assert_eq!(svc.run_schedules().await, 0);
    s.clock.advance(5 * 3600).unwrap();
    s.login().await;
    assert_eq!(svc.run_schedules().await, 0);
    // Each interval brings one Backup job; a sweep runs only what is due.
    let mut seen = Vec::new();
    for round in 1..=4 {
        s.clock.advance(3600 + 5).unwrap();
        s.login().await;
        assert_eq!(svc.run_schedules().await, 1, "round {round}");
        assert_eq!(svc.run_schedules().await, 0, "round {round}");
        std::fs::write(src.join(format!("r{round}")), format!("{round}")).unwrap();
        let (_, jobs) = s
            .arm("GET", &format!("{}/backupJobs", s.bv("bvs")), None)
            .await;
        let j = &jobs["value"][0];
        assert_eq!(j["status"], "Completed", "{j}");
        assert_eq!(j["operation"], "Backup");
        assert_eq!(j["stats"]["trigger"], "Schedule");
        seen.push(j["stats"]["recoveryPointId"].as_str().unwrap().to_string());
        // Retention: the newest two recovery points stay.
        let now = s.rp_names(&item).await;
        assert_eq!(now.len(), round.min(2), "{now:?}");
        assert_eq!(now[0], *seen.last().unwrap());
        if round > 2 {
            assert_eq!(
                j["stats"]["recoveryPointsForgotten"],
                json!([seen[round - 3].clone()]),
                "{j}"
            );
        }
        s.clock.advance(5 * 3600).unwrap();
        s.login().await;
    }
    // What is kept still restores.
    let last = s.rp_names(&item).await;
    let out = work.path().join("out");
    let r = s.restore("bvs", "i1", &last[1], &out).await;
    assert_eq!(r["status"], "Completed", "{r}");
    // The schedule can be removed; then nothing more runs.
    let (st, it) = s
        .arm(
            "PUT",
            &item,
            Some(json!({"properties": {"sourcePath": src}})),
        )
        .await;
    assert_eq!(st, 200, "{it}");
    assert!(it["properties"]["schedule"].is_null(), "{it}");
    s.clock.advance(48 * 3600).unwrap();
    assert_eq!(svc.run_schedules().await, 0);
}

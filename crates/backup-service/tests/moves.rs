//! BK-9 end to end, over the real HTTPS server in-process: backup vaults moving between
//! resource groups and subscriptions (ARM `moveResources`), a CMK vault refused, a crash in the
//! middle of a move finished at the next start, and a tenant move that stops a CMK vault until
//! its identity and key are configured again.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kagi_testkit::{BackupKeys, Options, TestServer};
use serde_json::{Value, json};

const SUB2: &str = "5e1f0000-0000-4000-8000-00000000b0b2";
const TENANT2: &str = "7e2a0000-0000-4000-8000-0000000077e2";

/// The shared harness, with this file's resources.
struct Server(TestServer);

impl Deref for Server {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.0
    }
}

async fn start() -> Server {
    Server(
        TestServer::start(Options {
            backup_service: Some(BackupKeys {
                // No cache: every job asks the key vault, so re-wrapping after a tenant move
                // really unwraps the old entries with the new identity.
                key_cache_lifetime: Duration::ZERO,
                key_poll_interval: Duration::from_secs(3600),
            }),
            ..Options::default()
        })
        .await,
    )
}

impl Server {
    fn sub1(&self) -> String {
        self.admin.subscription_id.clone()
    }

    fn rg(sub: &str, rg: &str) -> String {
        format!("/subscriptions/{sub}/resourceGroups/{rg}")
    }

    fn bv(sub: &str, rg: &str, name: &str) -> String {
        format!(
            "{}/providers/Microsoft.RecoveryServices/vaults/{name}",
            Self::rg(sub, rg)
        )
    }

    /// Creates the platform-key vault `bv`, protects `src` (made by [`make_source`]) as item
    /// `docs` and backs it up: the recovery point's id.
    async fn backed_up_vault(&self, bv: &str, src: &Path) -> String {
        make_source(src);
        let (st, _) = self
            .arm("PUT", bv, Some(json!({"location": "westeurope"})))
            .await;
        assert_eq!(st, 201);
        self.protect(bv, "docs", src).await;
        self.backup(bv, "docs").await["stats"]["recoveryPointId"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn put_rg(&self, sub: &str, rg: &str) {
        let (s, v) = self
            .arm(
                "PUT",
                &Self::rg(sub, rg),
                Some(json!({"location": "westeurope"})),
            )
            .await;
        assert!(s == 200 || s == 201, "{v}");
    }

    /// `moveResources` / `validateMoveResources` as Azure's pollers do them: the POST, then
    /// the `Location` until it answers 204. Returns the POST's status and body when refused.
    async fn move_res(
        &self,
        source: &str,
        ids: &[&str],
        target: &str,
        validate: bool,
    ) -> Result<(), (u16, Value)> {
        let action = if validate {
            "validateMoveResources"
        } else {
            "moveResources"
        };
        let url = format!(
            "https://localhost:{}{source}/{action}?api-version=2021-04-01",
            self.port
        );
        let (st, h, v) = self
            .call(
                "POST",
                url,
                &self.token,
                Some(json!({"resources": ids, "targetResourceGroup": target})),
            )
            .await;
        if st != 202 {
            return Err((st, v));
        }
        assert_eq!(h["retry-after"], "1");
        let loc = h["location"].to_str().unwrap().to_string();
        assert!(loc.contains("/operationresults/"), "{loc}");
        let (st, _, v) = self.call("GET", loc, &self.token, None).await;
        assert_eq!(st, 204, "{v}");
        Ok(())
    }

    async fn protect(&self, vault: &str, item: &str, src: &Path) {
        let (s, v) = self
            .arm(
                "PUT",
                &format!("{vault}/backupProtectedItems/{item}"),
                Some(json!({"properties": {"sourcePath": src}})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }

    fn folder(&self, sub: &str, rg: &str, name: &str) -> PathBuf {
        self.backup_vault_dir(sub, rg, name)
    }

    fn key_uri(&self, vault: &str, key: &str) -> String {
        self.vault_url(vault, &format!("/keys/{key}"))
    }

    /// A key vault with purge protection and an RSA key `k1`, in tenant `tenant`.
    async fn key_vault(&self, sub: &str, rg: &str, name: &str, tenant: &str) {
        let (s, v) = self
            .arm(
                "PUT",
                &format!(
                    "{}/providers/Microsoft.KeyVault/vaults/{name}",
                    Self::rg(sub, rg)
                ),
                Some(json!({"location": "westeurope", "properties": {
                    "tenantId": tenant, "sku": {"family": "A", "name": "standard"},
                    "enablePurgeProtection": true, "softDeleteRetentionInDays": 7}})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let (s, v) = self
            .data(
                "POST",
                name,
                "/keys/k1/create",
                Some(json!({"kty": "RSA", "key_size": 2048})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
    }

    /// Replaces the key vault's access policies by one for `oid` in `tenant` (and sets the
    /// vault's tenantId).
    async fn only_grant(&self, sub: &str, rg: &str, kv: &str, tenant: &str, oid: &str) {
        let (s, v) = self
            .arm(
                "PUT",
                &format!(
                    "{}/providers/Microsoft.KeyVault/vaults/{kv}",
                    Self::rg(sub, rg)
                ),
                Some(
                    json!({"location": "westeurope", "properties": {"tenantId": tenant,
                    "accessPolicies": [{"tenantId": tenant, "objectId": oid,
                    "permissions": {"keys": ["get", "list", "wrapKey", "unwrapKey"]}}]}}),
                ),
            )
            .await;
        assert!(s == 200 || s == 201, "{v}");
    }
}

fn make_source(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("a.txt"), b"hello moves\n").unwrap();
    let big: Vec<u8> = (0..700_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(dir.join("sub/big.bin"), &big).unwrap();
}

fn assert_same(a: &Path, b: &Path) {
    for rel in ["a.txt", "sub/big.bin"] {
        assert_eq!(
            std::fs::read(a.join(rel)).unwrap(),
            std::fs::read(b.join(rel)).unwrap(),
            "{rel}"
        );
    }
}

fn inner(v: &Value) -> &str {
    v["error"]["innererror"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pmk_vault_moves_and_cmk_vault_stays() {
    let s = start().await;
    let sub1 = s.sub1();
    s.put_rg(&sub1, "rg1").await;
    s.put_rg(&sub1, "rg2").await;
    // A second subscription, in the same tenant.
    let (st, v) = s
        .call(
            "PUT",
            format!(
                "https://localhost:{}/kagi/admin/subscriptions/{SUB2}",
                s.port
            ),
            &s.token,
            Some(json!({})),
        )
        .await
        .into_second();
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["tenantId"], s.admin.tenant_id.as_str());
    s.put_rg(SUB2, "rg3").await;

    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_source(&src);
    let bv1 = Server::bv(&sub1, "rg1", "bv1");
    let (st, v) = s
        .arm(
            "PUT",
            &bv1,
            Some(json!({"location": "westeurope", "identity": {"type": "SystemAssigned"}})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let principal = v["identity"]["principalId"].as_str().unwrap().to_string();
    s.protect(&bv1, "docs", &src).await;
    let j = s.backup(&bv1, "docs").await;
    assert_eq!(j["status"], "Completed", "{j}");
    let rp1 = j["stats"]["recoveryPointId"].as_str().unwrap().to_string();
    let admin = s.platform.authenticate(&s.token).unwrap();
    let binding = s.platform.bind_workload(&admin, &bv1, None).await;
    // Backup vaults are not workloads; the binding route exists for identity resources only.
    let binding = binding.ok();

    // Validate, then move within the subscription.
    let source1 = Server::rg(&sub1, "rg1");
    let target2 = Server::rg(&sub1, "rg2");
    s.move_res(&source1, &[&bv1], &target2, true).await.unwrap();
    assert!(s.folder(&sub1, "rg1", "bv1").join("items").exists());
    s.move_res(&source1, &[&bv1], &target2, false)
        .await
        .unwrap();
    let (st, _) = s.arm("GET", &bv1, None).await;
    assert_eq!(st, 404);
    let bv2 = Server::bv(&sub1, "rg2", "bv1");
    let (st, v) = s.arm("GET", &bv2, None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["id"], bv2.as_str());
    assert_eq!(v["identity"]["principalId"], principal.as_str());
    assert!(!s.folder(&sub1, "rg1", "bv1").exists());
    assert!(s.folder(&sub1, "rg2", "bv1").join("items").exists());
    // Its identity moved with it: tokens are issued for the new id, none for the old.
    assert!(s.platform.identity_token(&bv2, None).is_ok());
    assert!(s.platform.identity_token(&bv1, None).is_err());
    if let Some(env) = binding {
        let secret = env["IDENTITY_HEADER"].as_str().unwrap();
        let grant = s
            .platform
            .managed_identity_token(secret, &format!("https://localhost:{}", s.port), None)
            .await
            .unwrap();
        assert!(!grant.access_token.is_empty());
    }
    let (st, log) = s.arm("GET", &format!("{bv2}/activityLog"), None).await;
    assert_eq!(st, 200);
    assert!(log.to_string().contains("Vault moved from"), "{log}");

    // Backups continue, and the earlier recovery point restores byte for byte.
    let j = s.backup(&bv2, "docs").await;
    assert_eq!(j["status"], "Completed", "{j}");
    let out = work.path().join("r1");
    let r = s.restore(&bv2, "docs", &rp1, &out).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_same(&src, &out);

    // Across subscriptions.
    let bv3 = Server::bv(SUB2, "rg3", "bv1");
    s.move_res(&target2, &[&bv2], &Server::rg(SUB2, "rg3"), false)
        .await
        .unwrap();
    let (st, v) = s.arm("GET", &bv3, None).await;
    assert_eq!(st, 200, "{v}");
    let out = work.path().join("r2");
    let r = s.restore(&bv3, "docs", &rp1, &out).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_same(&src, &out);
    let (st, rps) = s
        .arm(
            "GET",
            &format!("{bv3}/backupProtectedItems/docs/recoveryPoints"),
            None,
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(rps["value"].as_array().unwrap().len(), 2);

    // Refusals: the same group, a resource elsewhere, a type kagi does not move.
    let (st, e) = s
        .move_res(
            &Server::rg(SUB2, "rg3"),
            &[&bv3],
            &Server::rg(SUB2, "rg3"),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!((st, inner(&e)), (400, "InvalidTargetResourceGroup"), "{e}");
    let (st, e) = s
        .move_res(&source1, &[&bv3], &target2, true)
        .await
        .unwrap_err();
    assert_eq!(
        (st, inner(&e)),
        (400, "ResourceNotInSourceResourceGroup"),
        "{e}"
    );
    let (st, v) = s
        .arm(
            "PUT",
            &format!(
                "{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u1",
                Server::rg(&sub1, "rg1")
            ),
            Some(json!({"location": "westeurope"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let uami = v["id"].as_str().unwrap().to_string();
    let (st, e) = s
        .move_res(&source1, &[&uami], &target2, true)
        .await
        .unwrap_err();
    assert_eq!((st, inner(&e)), (400, "ResourceMoveNotSupported"), "{e}");

    // A CMK vault (BK-8: key at creation, user-assigned identity) never moves.
    s.key_vault(&sub1, "rg1", "kv1", &s.admin.tenant_id).await;
    let uami_oid = v["properties"]["principalId"].as_str().unwrap().to_string();
    s.only_grant(&sub1, "rg1", "kv1", &s.admin.tenant_id, &uami_oid)
        .await;
    let bvc = Server::bv(&sub1, "rg1", "bvc");
    let (st, v) = s
        .arm(
            "PUT",
            &bvc,
            Some(json!({"location": "westeurope",
                "identity": {"type": "UserAssigned", "userAssignedIdentities": {uami.clone(): {}}},
                "properties": {"encryption": {"keyVaultProperties": {"keyUri": s.key_uri("kv1", "k1")},
                    "kekIdentity": {"userAssignedIdentity": uami}}}})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    for validate in [true, false] {
        let (st, e) = s
            .move_res(&source1, &[&bvc], &target2, validate)
            .await
            .unwrap_err();
        assert_eq!(st, 409, "{e}");
        assert_eq!(e["error"]["code"], "ResourceMoveProviderValidationFailed");
        assert_eq!(inner(&e), "UserErrorCMKEncryptedVaultMoveNotSupported");
        assert_eq!(e["error"]["details"][0]["target"], bvc.as_str());
        assert_eq!(
            e["error"]["details"][0]["code"],
            "UserErrorCMKEncryptedVaultMoveNotSupported"
        );
    }
    // Nothing moved: not even the PMK vault named with it.
    let bvp = Server::bv(&sub1, "rg1", "bvp");
    let (st, _) = s
        .arm("PUT", &bvp, Some(json!({"location": "westeurope"})))
        .await;
    assert_eq!(st, 201);
    let (st, e) = s
        .move_res(&source1, &[&bvp, &bvc], &target2, false)
        .await
        .unwrap_err();
    assert_eq!(st, 409, "{e}");
    assert_eq!(s.arm("GET", &bvp, None).await.0, 200);
    assert_eq!(s.arm("GET", &bvc, None).await.0, 200);

    // A key vault moves (same tenant) and its keys keep working under the same URI.
    let kv1 = format!(
        "{}/providers/Microsoft.KeyVault/vaults/kv1",
        Server::rg(&sub1, "rg1")
    );
    s.move_res(&source1, &[&kv1], &target2, false)
        .await
        .unwrap();
    let (st, v) = s
        .arm(
            "GET",
            &format!(
                "{}/providers/Microsoft.KeyVault/vaults/kv1",
                Server::rg(&sub1, "rg2")
            ),
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s.data("GET", "kv1", "/keys/k1", None).await;
    assert_eq!(st, 200, "{v}");
}

/// A crash after the store committed a move and before the folder was renamed: the journal
/// finishes the rename at the next start. A journal whose move never committed is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_interrupted_by_a_crash_is_finished_at_start() {
    let s = start().await;
    let sub1 = s.sub1();
    s.put_rg(&sub1, "rg1").await;
    s.put_rg(&sub1, "rg2").await;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let bv1 = Server::bv(&sub1, "rg1", "bv1");
    let rp1 = s.backed_up_vault(&bv1, &src).await;
    s.move_res(
        &Server::rg(&sub1, "rg1"),
        &[&bv1],
        &Server::rg(&sub1, "rg2"),
        false,
    )
    .await
    .unwrap();
    let bv2 = Server::bv(&sub1, "rg2", "bv1");
    // As if the process had died between the commit and the rename.
    let (old, new) = (s.folder(&sub1, "rg1", "bv1"), s.folder(&sub1, "rg2", "bv1"));
    std::fs::rename(&new, &old).unwrap();
    let journals = s.dir().join("backup-moves");
    std::fs::create_dir_all(&journals).unwrap();
    std::fs::write(
        journals.join("a.json"),
        json!({"fromId": bv1, "toId": bv2, "fromDir": old, "toDir": new}).to_string(),
    )
    .unwrap();
    // And one whose move never committed (the store has no vault at its target).
    let ghost = Server::bv(&sub1, "rg2", "ghost");
    std::fs::write(
        journals.join("b.json"),
        json!({"fromId": bv2, "toId": ghost, "fromDir": new, "toDir": s.folder(&sub1, "rg2", "ghost")})
            .to_string(),
    )
    .unwrap();
    s.install_backup_service();
    assert!(new.join("items").exists());
    assert!(!old.exists());
    assert!(!s.folder(&sub1, "rg2", "ghost").exists());
    assert_eq!(std::fs::read_dir(&journals).unwrap().count(), 0);
    let out = work.path().join("r1");
    let r = s.restore(&bv2, "docs", &rp1, &out).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_same(&src, &out);
}

/// ID-3, BK-9: after its subscription moves to another tenant, a CMK vault's backups and
/// restores fail, naming the cause and the fix, until its identity and key are configured
/// again in the new tenant; then the earlier recovery points restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_move_stops_cmk_until_identity_and_key_are_configured_again() {
    let s = start().await;
    let t1 = s.admin.tenant_id.clone();
    let (st, _, v) = s
        .call(
            "PUT",
            format!(
                "https://localhost:{}/kagi/admin/subscriptions/{SUB2}",
                s.port
            ),
            &s.token,
            None,
        )
        .await;
    assert_eq!(st, 201, "{v}");
    s.put_rg(SUB2, "rg").await;
    s.key_vault(SUB2, "rg", "kvt", &t1).await;
    let bv = Server::bv(SUB2, "rg", "bvt");
    let (st, v) = s
        .arm(
            "PUT",
            &bv,
            Some(json!({"location": "westeurope", "identity": {"type": "SystemAssigned"}})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let old_principal = v["identity"]["principalId"].as_str().unwrap().to_string();
    assert_eq!(v["identity"]["tenantId"], t1.as_str());
    s.only_grant(SUB2, "rg", "kvt", &t1, &old_principal).await;
    let (st, v) = s
        .arm(
            "PATCH",
            &bv,
            Some(json!({"properties": {"encryption": {
                "keyVaultProperties": {"keyUri": s.key_uri("kvt", "k1")},
                "kekIdentity": {"useSystemAssignedIdentity": true}}}})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_source(&src);
    s.protect(&bv, "docs", &src).await;
    let j = s.backup(&bv, "docs").await;
    assert_eq!(j["status"], "Completed", "{j}");
    let rp1 = j["stats"]["recoveryPointId"].as_str().unwrap().to_string();
    // A role assignment in the subscription: a tenant move deletes it.
    let (st, v) = s
        .arm(
            "PUT",
            &format!(
                "/subscriptions/{SUB2}/providers/Microsoft.Authorization/roleAssignments/0f0e0000-0000-4000-8000-000000000001"
            ),
            Some(json!({"properties": {
                "roleDefinitionId": "/providers/Microsoft.Authorization/roleDefinitions/21090545-7ca7-4776-b22c-e363652d74d2",
                "principalId": old_principal}})),
        )
        .await;
    assert_eq!(st, 201, "{v}");

    // The subscription moves to a new tenant.
    let (st, _, moved) = s
        .call(
            "POST",
            format!(
                "https://localhost:{}/kagi/admin/subscriptions/{SUB2}/changeDirectory",
                s.port
            ),
            &s.token,
            Some(json!({"tenantId": TENANT2})),
        )
        .await;
    assert_eq!(st, 200, "{moved}");
    assert_eq!(moved["previousTenantId"], t1.as_str());
    assert_eq!(moved["tenantCreated"], true);
    assert_eq!(moved["roleAssignmentsRemoved"], 1);
    assert_eq!(moved["keyVaultsWithPreviousTenantId"], json!(["kvt"]));
    assert!(
        moved["resourcesWithIdentitiesInPreviousTenant"]
            .to_string()
            .contains("bvt")
    );
    // The administrator still manages it, and gets tokens in the new tenant.
    let t2_token = s.token_in(TENANT2).await;
    assert_eq!(s.arm("GET", &bv, None).await.0, 200);
    // The identity left in the old tenant gets no token.
    let e = s.platform.identity_token(&bv, None).unwrap_err();
    assert_eq!(e.inner, Some("ManagedIdentityTenantMismatch"));

    // Backups and restores fail, naming the cause and the fix, in the job and the activity log.
    let j = s.backup(&bv, "docs").await;
    assert_eq!(j["status"], "Failed", "{j}");
    assert_eq!(j["error"]["code"], "UserErrorCMKTenantMismatch", "{j}");
    let m = j["error"]["message"].as_str().unwrap();
    assert!(
        m.contains(TENANT2) && m.contains("kagi backup vault encryption"),
        "{m}"
    );
    let out = work.path().join("r-fail");
    let r = s.restore(&bv, "docs", &rp1, &out).await;
    assert_eq!(r["status"], "Failed", "{r}");
    assert_eq!(r["error"]["code"], "UserErrorCMKTenantMismatch", "{r}");
    let (_, log) = s.arm("GET", &format!("{bv}/activityLog"), None).await;
    assert!(
        log.to_string().contains("UserErrorCMKTenantMismatch") || log.to_string().contains(TENANT2),
        "{log}"
    );

    // Reconfigure: the identity off and on (a new one, in the new tenant)…
    let (st, v) = s
        .arm("PATCH", &bv, Some(json!({"identity": {"type": "None"}})))
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s
        .arm(
            "PATCH",
            &bv,
            Some(json!({"identity": {"type": "SystemAssigned"}})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let new_principal = v["identity"]["principalId"].as_str().unwrap().to_string();
    assert_ne!(new_principal, old_principal);
    assert_eq!(v["identity"]["tenantId"], TENANT2);
    // …the key vault into the new tenant, granting the new identity, with a new key…
    s.only_grant(SUB2, "rg", "kvt", TENANT2, &new_principal)
        .await;
    let (st, _) = s.data("GET", "kvt", "/keys/k1", None).await;
    assert_eq!(
        st, 401,
        "a token of the old tenant no longer opens the vault"
    );
    let (st, v) = s
        .data_as(
            &t2_token,
            "POST",
            "kvt",
            "/keys/k2/create",
            Some(json!({"kty": "RSA", "key_size": 2048})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    // Still refused until the key is set again.
    let j = s.backup(&bv, "docs").await;
    assert_eq!(j["error"]["code"], "UserErrorCMKTenantMismatch", "{j}");
    // …and the encryption key set again: the data keys are re-wrapped.
    let (st, v) = s
        .arm(
            "PATCH",
            &bv,
            Some(json!({"properties": {"encryption": {
                "keyVaultProperties": {"keyUri": s.key_uri("kvt", "k2")},
                "kekIdentity": {"useSystemAssignedIdentity": true}}}})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    // Two ConfigureEncryption jobs now (started in the same second): the second re-wrapped
    // the item's data key.
    let (_, jobs) = s.arm("GET", &format!("{bv}/backupJobs"), None).await;
    let mut rewrapped = Vec::new();
    for j in jobs["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["operation"] == "ConfigureEncryption")
    {
        let j = s.wait_job(&bv, j).await;
        assert_eq!(j["status"], "Completed", "{j}");
        rewrapped.push(j["stats"]["keyEntriesWritten"].as_u64().unwrap());
    }
    rewrapped.sort();
    assert_eq!(rewrapped, vec![0, 1]);
    let j = s.backup(&bv, "docs").await;
    assert_eq!(j["status"], "Completed", "{j}");
    let out = work.path().join("r-ok");
    let r = s.restore(&bv, "docs", &rp1, &out).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_same(&src, &out);
}

trait IntoSecond {
    fn into_second(self) -> (u16, Value);
}

impl IntoSecond for (u16, reqwest::header::HeaderMap, Value) {
    fn into_second(self) -> (u16, Value) {
        (self.0, self.2)
    }
}

/// Two moves to the same target id at once: the one that waits for the other is refused and
/// deletes nothing (the vault that arrived first keeps its backups).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_moves_to_one_target_lose_nothing() {
    let s = start().await;
    let sub1 = s.sub1();
    for g in ["ra", "rb", "rc"] {
        s.put_rg(&sub1, g).await;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_source(&src);
    let mut rps = Vec::new();
    for g in ["ra", "rc"] {
        let bv = Server::bv(&sub1, g, "bv");
        let (st, _) = s
            .arm("PUT", &bv, Some(json!({"location": "westeurope"})))
            .await;
        assert_eq!(st, 201);
        s.protect(&bv, "docs", &src).await;
        let j = s.backup(&bv, "docs").await;
        assert_eq!(j["status"], "Completed", "{j}");
        rps.push(j["stats"]["recoveryPointId"].as_str().unwrap().to_string());
    }
    let target = Server::rg(&sub1, "rb");
    let (ra, rc) = (Server::rg(&sub1, "ra"), Server::rg(&sub1, "rc"));
    let (bva, bvc) = (Server::bv(&sub1, "ra", "bv"), Server::bv(&sub1, "rc", "bv"));
    let (ids_a, ids_c) = ([bva.as_str()], [bvc.as_str()]);
    let first = s.move_res(&ra, &ids_a, &target, false);
    let second = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.move_res(&rc, &ids_c, &target, false).await
    };
    let (a, c) = tokio::join!(first, second);
    assert!(a.is_ok(), "{a:?}");
    let (st, e) = c.unwrap_err();
    assert_eq!(st, 409, "{e}");
    // The vault from ra is at rb with its backups; the one from rc stayed with its own.
    let bvb = Server::bv(&sub1, "rb", "bv");
    let out = work.path().join("rb");
    let r = s.restore(&bvb, "docs", &rps[0], &out).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_same(&src, &out);
    let out = work.path().join("rc");
    let r = s.restore(&bvc, "docs", &rps[1], &out).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_same(&src, &out);
}

/// A rename that fails after the commit: the move has happened (answered as such), the
/// rename is retried from the journal, and a vault created at the old id meanwhile cannot wipe
/// the moved vault's folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rename_failing_after_the_commit_is_retried_and_nothing_is_wiped() {
    let s = start().await;
    let sub1 = s.sub1();
    s.put_rg(&sub1, "ra").await;
    s.put_rg(&sub1, "rz").await;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let bva = Server::bv(&sub1, "ra", "bv");
    let rp = s.backed_up_vault(&bva, &src).await;
    // An obstacle the rename cannot get past (as ENOSPC or EACCES would be).
    let new = s.folder(&sub1, "rz", "bv");
    let obstacle = new.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(obstacle.parent().unwrap()).unwrap();
    std::fs::write(&obstacle, b"x").unwrap();
    s.move_res(
        &Server::rg(&sub1, "ra"),
        &[&bva],
        &Server::rg(&sub1, "rz"),
        false,
    )
    .await
    .unwrap();
    let bvz = Server::bv(&sub1, "rz", "bv");
    assert_eq!(s.arm("GET", &bvz, None).await.0, 200);
    // The folder is still at the old place: a vault created there must not wipe it.
    let (st, e) = s
        .arm("PUT", &bva, Some(json!({"location": "westeurope"})))
        .await;
    assert_eq!(st, 409, "{e}");
    assert!(s.folder(&sub1, "ra", "bv").join("items").exists());
    // Once the obstacle is gone, the retry finishes the move.
    std::fs::remove_file(&obstacle).unwrap();
    let journals = s.dir().join("backup-moves");
    for _ in 0..100 {
        if new.join("items").exists() && std::fs::read_dir(&journals).unwrap().count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(new.join("items").exists());
    assert_eq!(std::fs::read_dir(&journals).unwrap().count(), 0);
    let out = work.path().join("r");
    let r = s.restore(&bvz, "docs", &rp, &out).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_same(&src, &out);
}

/// Refusals that change nothing: a lock on a key inside a key vault, a Deny policy at the
/// target, a key vault named in a group it is not in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moves_refused_by_locks_below_policies_and_wrong_groups() {
    let s = start().await;
    let sub1 = s.sub1();
    for g in ["ra", "rb", "rc"] {
        s.put_rg(&sub1, g).await;
    }
    let (ra, rb, rc) = (
        Server::rg(&sub1, "ra"),
        Server::rg(&sub1, "rb"),
        Server::rg(&sub1, "rc"),
    );
    let kv = |g: &str, n: &str| {
        format!(
            "{}/providers/Microsoft.KeyVault/vaults/{n}",
            Server::rg(&sub1, g)
        )
    };

    // A CanNotDelete lock on a key of the vault.
    s.key_vault(&sub1, "ra", "kvlock", &s.admin.tenant_id).await;
    let (st, v) = s
        .arm(
            "PUT",
            &format!(
                "{}/keys/k1/providers/Microsoft.Authorization/locks/nodel",
                kv("ra", "kvlock")
            ),
            Some(json!({"properties": {"level": "CanNotDelete"}})),
        )
        .await;
    assert!(st == 200 || st == 201, "{v}");
    for validate in [true, false] {
        let (st, e) = s
            .move_res(&ra, &[&kv("ra", "kvlock")], &rb, validate)
            .await
            .unwrap_err();
        assert_eq!((st, inner(&e)), (409, "ScopeLocked"), "{e}");
    }
    assert_eq!(s.arm("GET", &kv("ra", "kvlock"), None).await.0, 200);

    // A key vault named in a group it is not in.
    s.key_vault(&sub1, "rc", "kvelse", &s.admin.tenant_id).await;
    for validate in [true, false] {
        let (st, e) = s
            .move_res(&ra, &[&kv("ra", "kvelse")], &rb, validate)
            .await
            .unwrap_err();
        assert_eq!(
            (st, inner(&e)),
            (400, "ResourceNotInSourceResourceGroup"),
            "{e}"
        );
    }
    assert_eq!(s.arm("GET", &kv("rc", "kvelse"), None).await.0, 200);
    assert_eq!(s.arm("GET", &kv("rb", "kvelse"), None).await.0, 404);

    // A Deny policy at the target refuses a platform-key vault there.
    let (st, v) = s
        .arm(
            "PUT",
            &format!("{rc}/providers/Microsoft.Authorization/policyAssignments/cmk"),
            Some(json!({"properties": {
                "policyDefinitionId": "/providers/Microsoft.Authorization/policyDefinitions/kagi-backup-vaults-cmk",
                "parameters": {"effect": {"value": "Deny"}}}})),
        )
        .await;
    assert!(st == 200 || st == 201, "{v}");
    let bva = Server::bv(&sub1, "ra", "bvdeny");
    let (st, _) = s
        .arm("PUT", &bva, Some(json!({"location": "westeurope"})))
        .await;
    assert_eq!(st, 201);
    for validate in [true, false] {
        let (st, e) = s.move_res(&ra, &[&bva], &rc, validate).await.unwrap_err();
        assert_eq!((st, inner(&e)), (403, "RequestDisallowedByPolicy"), "{e}");
    }
    assert_eq!(s.arm("GET", &bva, None).await.0, 200);
    assert_eq!(
        s.arm("GET", &Server::bv(&sub1, "rc", "bvdeny"), None)
            .await
            .0,
        404
    );
}

/// Validation, and the pass before a move of several resources, refuse a vault with a job
/// running: nothing moves (not even the key vault named first).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn running_jobs_refuse_validation_and_multi_resource_moves() {
    let s = start().await;
    let sub1 = s.sub1();
    s.put_rg(&sub1, "ra").await;
    s.put_rg(&sub1, "rb").await;
    let (ra, rb) = (Server::rg(&sub1, "ra"), Server::rg(&sub1, "rb"));
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // Enough incompressible data for the backup to run a while.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..6 {
        let data: Vec<u8> = (0..16_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(src.join(format!("f{i}.bin")), data).unwrap();
    }
    s.key_vault(&sub1, "ra", "kvbusy", &s.admin.tenant_id).await;
    let kv = format!("{ra}/providers/Microsoft.KeyVault/vaults/kvbusy");
    let bv = Server::bv(&sub1, "ra", "bvbusy");
    let (st, _) = s
        .arm("PUT", &bv, Some(json!({"location": "westeurope"})))
        .await;
    assert_eq!(st, 201);
    s.protect(&bv, "docs", &src).await;
    let (st, job) = s
        .arm(
            "POST",
            &format!("{bv}/backupProtectedItems/docs/backup"),
            None,
        )
        .await;
    assert_eq!(st, 202, "{job}");
    for validate in [true, false] {
        let (st, e) = s
            .move_res(&ra, &[&kv, &bv], &rb, validate)
            .await
            .unwrap_err();
        assert_eq!(
            (st, inner(&e)),
            (409, "UserErrorBackupJobsInProgress"),
            "{e}"
        );
    }
    let j = s.wait_job(&bv, &job).await;
    assert_eq!(j["status"], "Completed", "{j}");
    assert_eq!(s.arm("GET", &kv, None).await.0, 200);
    assert_eq!(s.arm("GET", &bv, None).await.0, 200);
}

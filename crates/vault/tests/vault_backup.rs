//! Whole-vault backup and restore through the service (`kagi_vault::Platform`) without HTTP:
//! real SQLite stores in temporary directories, real root keys (a different one per
//! instance), real tokens, and the job API the management routes use.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kagi_core::KvError;
use kagi_core::b64;
use kagi_core::key::{
    KeyCreateParameters, KeyOperationParameters, KeySignParameters, KeyUpdateParameters,
    KeyVerifyParameters,
};
use kagi_core::secret::{SecretSetParameters, SecretUpdateParameters};
use kagi_core::time::{Clock, TestClock};
use kagi_core::vault::VaultInput;
use kagi_crypto::{AesRootKey, DigestAlgorithm};
use kagi_store::{SqlStore, Store};
use kagi_vault::{BackupRequest, BootstrapAdmin, ListQuery, Platform, Principal, RestoreRequest};
use serde_json::{Value, json};
use zeroize::Zeroizing;

mod common;

use common::{config, sign_in};

const PASS: &str = "correct horse battery staple";
/// Crypto User, a built-in role.
const CRYPTO_USER: &str = "12338af0-0e69-4776-bea7-57ae8d297424";

struct Env {
    _dir: tempfile::TempDir,
    p: Arc<Platform>,
    store: Arc<dyn Store>,
    clock: Arc<TestClock>,
    creds: BootstrapAdmin,
    admin: Principal,
}

impl Env {
    async fn new(root: u8) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock::new());
        let store: Arc<dyn Store> = Arc::new(
            SqlStore::open_sqlite(&dir.path().join("kagi.db"))
                .await
                .unwrap(),
        );
        let (p, created) = Platform::open_with(
            config(dir.path()),
            clock.clone(),
            Arc::new(AesRootKey::from_bytes(&[root; 32])),
            store.clone(),
        )
        .await
        .unwrap();
        let p = Arc::new(p.with_test_clock(clock.clone()));
        let creds = created.unwrap();
        let admin = sign_in(&p, &creds).await;
        p.put_resource_group(
            &admin,
            &creds.subscription_id,
            "rg1",
            serde_json::from_value(json!({"location": "westeurope"})).unwrap(),
        )
        .await
        .unwrap();
        Self {
            _dir: dir,
            p,
            store,
            clock,
            creds,
            admin,
        }
    }

    fn sub(&self) -> &str {
        &self.creds.subscription_id
    }

    async fn vault(&self, name: &str, extra: Value) {
        let mut props = json!({
            "tenantId": self.creds.tenant_id,
            "sku": {"family": "A", "name": "premium"},
            "softDeleteRetentionInDays": 30,
        });
        for (k, v) in extra.as_object().unwrap() {
            props[k] = v.clone();
        }
        let input: VaultInput = serde_json::from_value(
            json!({"location": "westeurope", "tags": {"team": "payments"}, "properties": props}),
        )
        .unwrap();
        self.p
            .put_vault(&self.admin, self.sub(), "rg1", name, input, false)
            .await
            .unwrap();
    }

    async fn key(&self, vault: &str, name: &str, params: Value) -> String {
        let params: KeyCreateParameters = serde_json::from_value(params).unwrap();
        let b = self
            .p
            .create_key(&self.admin, vault, name, params)
            .await
            .unwrap();
        version_of(b["key"]["kid"].as_str().unwrap())
    }

    async fn secret(&self, vault: &str, name: &str, body: Value) -> String {
        let params: SecretSetParameters = serde_json::from_value(body).unwrap();
        let b = self
            .p
            .set_secret(&self.admin, vault, name, params)
            .await
            .unwrap();
        version_of(b["id"].as_str().unwrap())
    }

    fn wrap(&self, vault: &str, key: &str, version: &str, dek: &[u8]) -> Vec<u8> {
        self.op(vault, key, version, "wrapkey", dek).unwrap()
    }

    fn op(
        &self,
        vault: &str,
        key: &str,
        version: &str,
        segment: &str,
        value: &[u8],
    ) -> Result<Vec<u8>, KvError> {
        let params: KeyOperationParameters =
            serde_json::from_value(json!({"alg": "RSA-OAEP-256", "value": b64::encode(value)}))
                .unwrap();
        let out = self
            .p
            .key_operation(&self.admin, vault, key, Some(version), segment, params)?;
        Ok(b64::decode(out["value"].as_str().unwrap()).unwrap())
    }

    async fn wait(&self, job: &Value) -> Value {
        let id = job["id"].as_str().unwrap();
        for _ in 0..3000 {
            let j = self.p.job(&self.admin, id).await.unwrap();
            if j["status"] != "InProgress" {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("job {id} did not end");
    }

    async fn backup(&self, vault: &str, req: Value) -> Vec<u8> {
        let req: BackupRequest = serde_json::from_value(req).unwrap();
        let job = self
            .p
            .start_vault_backup(&self.admin, self.sub(), "rg1", vault, req)
            .await
            .unwrap();
        assert_eq!(job["status"], "InProgress");
        let done = self.wait(&job).await;
        assert_eq!(done["status"], "Completed", "{done}");
        assert_eq!(done["progress"]["done"], done["progress"]["total"]);
        let (path, len) = self
            .p
            .job_result_file(&self.admin, job["id"].as_str().unwrap())
            .await
            .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(done["resultBytes"], len);
        mode_is_private(&path);
        bytes
    }

    /// Starts a restore of `file` (as the HTTP route does: into an upload file first).
    async fn start_restore(
        &self,
        vault: &str,
        file: &[u8],
        passphrase: Option<&str>,
        location: Option<&str>,
    ) -> Result<Value, KvError> {
        let (path, _) = self.p.create_restore_upload().unwrap();
        std::fs::write(&path, file).unwrap();
        let r = self
            .p
            .start_vault_restore(
                &self.admin,
                self.sub(),
                "rg1",
                vault,
                path.clone(),
                RestoreRequest {
                    passphrase: passphrase.map(|p| Zeroizing::new(p.to_string())),
                    key_id: None,
                    location: location.map(str::to_string),
                },
            )
            .await;
        if r.is_err() {
            assert!(!path.exists(), "a refused upload is removed");
        }
        r
    }

    async fn restore(
        &self,
        vault: &str,
        file: &[u8],
        passphrase: Option<&str>,
        location: Option<&str>,
    ) -> Value {
        let job = self
            .start_restore(vault, file, passphrase, location)
            .await
            .unwrap();
        let done = self.wait(&job).await;
        assert_eq!(done["status"], "Completed", "{done}");
        done["result"].clone()
    }

    fn versions(&self, vault: &str, key: &str) -> Vec<String> {
        let q = ListQuery {
            maxresults: Some("25".into()),
            skiptoken: None,
            api_version: "7.6".into(),
        };
        let mut v: Vec<String> = self
            .p
            .list_key_versions(&self.admin, vault, key, &q)
            .unwrap()["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| version_of(i["kid"].as_str().unwrap()))
            .collect();
        v.sort();
        v
    }

    async fn vault_json(&self, vault: &str) -> Value {
        self.p
            .get_vault(&self.admin, self.sub(), "rg1", vault)
            .await
            .unwrap()
    }
}

fn mode_is_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", path.display());
}

fn version_of(id: &str) -> String {
    id.rsplit('/').next().unwrap().to_string()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    kagi_crypto::digest(DigestAlgorithm::Sha256, data)
}

/// Everything a key version shows, with the vault's host taken out of its id.
fn key_view(p: &Platform, admin: &Principal, vault: &str, key: &str, version: &str) -> Value {
    let mut b = p.get_key(admin, vault, key, Some(version)).unwrap();
    let kid = b["key"]["kid"].as_str().unwrap().to_string();
    b["key"]["kid"] = json!(kid.split_once("/keys/").unwrap().1);
    vault_level_out(b)
}

/// Takes out the attributes that come from the vault (its retention), compared on their own.
fn vault_level_out(mut b: Value) -> Value {
    let a = b["attributes"].as_object_mut().unwrap();
    a.remove("recoverableDays");
    a.remove("recoveryLevel");
    b
}

fn secret_view(p: &Platform, admin: &Principal, vault: &str, name: &str, version: &str) -> Value {
    let mut b = p.get_secret(admin, vault, name, Some(version)).unwrap();
    let id = b["id"].as_str().unwrap().to_string();
    b["id"] = json!(id.split_once("/secrets/").unwrap().1);
    vault_level_out(b)
}

async fn service_principal(env: &Env) -> String {
    let sp = env
        .p
        .create_service_principal(&env.admin, "backup-reader")
        .await
        .unwrap();
    sp["objectId"].as_str().unwrap().to_string()
}

async fn assign(env: &Env, scope: &str, principal: &str) {
    let id = kagi_core::ids::uuid_v4(kagi_crypto::random_bytes(16).unwrap().try_into().unwrap());
    let (status, _) = env
        .p
        .put_role_assignment(
            &env.admin,
            scope,
            &id,
            json!({"properties": {
                "roleDefinitionId": format!("/providers/Microsoft.Authorization/roleDefinitions/{CRYPTO_USER}"),
                "principalId": principal,
            }}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201);
}

fn vault_scope(env: &Env, vault: &str) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/{vault}",
        env.sub()
    )
}

fn assignments(env: &Env, vault: &str) -> Vec<Value> {
    env.p
        .list_role_assignments(&env.admin, &vault_scope(env, vault))
        .unwrap()["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| {
            a["properties"]["scope"]
                .as_str()
                .unwrap()
                .contains(&format!("/vaults/{vault}"))
        })
        .cloned()
        .collect()
}

/// What the source vault holds, to compare after the restore.
struct Source {
    rsa: Vec<String>,
    ec: String,
    db: Vec<String>,
    dek: Vec<u8>,
    wrapped_v1: Vec<u8>,
    wrapped_v3: Vec<u8>,
    digest: Vec<u8>,
    signature: Vec<u8>,
}

async fn populate(env: &Env, vault: &str, principal: &str) -> Source {
    env.vault(
        vault,
        json!({
            "enablePurgeProtection": true,
            "networkAcls": {"bypass": "AzureServices", "defaultAction": "Allow",
                            "ipRules": [{"value": "10.1.0.0/16"}]},
            "accessPolicies": [{"tenantId": env.creds.tenant_id, "objectId": principal,
                                "permissions": {"keys": ["get", "unwrapKey"], "secrets": ["get"]}}],
        }),
    )
    .await;
    let mut rsa = vec![
        env.key(
            vault,
            "Rsa-Key",
            json!({"kty": "RSA", "key_size": 2048, "tags": {"purpose": "dek"},
                   "key_ops": ["wrapKey", "unwrapKey", "sign", "verify"]}),
        )
        .await,
    ];
    let rotated = env
        .p
        .rotate_key(&env.admin, vault, "Rsa-Key")
        .await
        .unwrap();
    rsa.push(version_of(rotated["key"]["kid"].as_str().unwrap()));
    let rotated = env
        .p
        .rotate_key(&env.admin, vault, "Rsa-Key")
        .await
        .unwrap();
    rsa.push(version_of(rotated["key"]["kid"].as_str().unwrap()));
    // The middle version disabled, with an expiry.
    let upd: KeyUpdateParameters =
        serde_json::from_value(json!({"attributes": {"enabled": false, "exp": 4102444800i64}}))
            .unwrap();
    env.p
        .update_key(&env.admin, vault, "Rsa-Key", Some(&rsa[1]), upd)
        .await
        .unwrap();
    let ec = env
        .key(
            vault,
            "ec",
            // HSM keys need a token: their backups are covered by tests/conformance/test_hsm.py.
            json!({"kty": "EC", "crv": "P-384", "tags": {"curve": "p384"}}),
        )
        .await;
    env.key(vault, "gone", json!({"kty": "RSA", "key_size": 2048}))
        .await;
    env.p.delete_key(&env.admin, vault, "gone").await.unwrap();

    let mut db = Vec::new();
    for (i, ct) in [
        ("one", "text/plain"),
        ("two", "application/json"),
        ("three", ""),
    ]
    .iter()
    .enumerate()
    {
        let mut body = json!({"value": format!("{}-{}", ct.0, "x".repeat(i * 1000)),
                              "tags": {"n": i.to_string()}});
        if !ct.1.is_empty() {
            body["contentType"] = json!(ct.1);
        }
        db.push(env.secret(vault, "db-password", body).await);
    }
    let upd: SecretUpdateParameters =
        serde_json::from_value(json!({"attributes": {"enabled": false}})).unwrap();
    env.p
        .update_secret(&env.admin, vault, "db-password", Some(&db[0]), upd)
        .await
        .unwrap();
    env.secret(vault, "old", json!({"value": "retired"})).await;
    env.p.delete_secret(&env.admin, vault, "old").await.unwrap();

    assign(env, &vault_scope(env, vault), principal).await;
    assign(
        env,
        &format!("{}/keys/rsa-key", vault_scope(env, vault)),
        principal,
    )
    .await;

    let dek = kagi_crypto::random_bytes(32).unwrap();
    let wrapped_v1 = env.wrap(vault, "Rsa-Key", &rsa[0], &dek);
    let wrapped_v3 = env.wrap(vault, "Rsa-Key", &rsa[2], &dek);
    let digest = sha256(b"signed before the backup");
    let params: KeySignParameters =
        serde_json::from_value(json!({"alg": "ES384", "value": b64::encode(&sha384(b"x"))}))
            .unwrap();
    let signature = b64::decode(
        env.p.sign(&env.admin, vault, "ec", None, params).unwrap()["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    Source {
        rsa,
        ec,
        db,
        dek,
        wrapped_v1,
        wrapped_v3,
        digest,
        signature,
    }
}

fn sha384(data: &[u8]) -> Vec<u8> {
    kagi_crypto::digest(DigestAlgorithm::Sha384, data)
}

/// Compares every key and secret version of `a`/`av` with `b`/`bv`.
fn assert_same_content(a: &Env, av: &str, b: &Env, bv: &str, s: &Source) {
    for v in &s.rsa {
        assert_eq!(
            key_view(&a.p, &a.admin, av, "Rsa-Key", v),
            key_view(&b.p, &b.admin, bv, "Rsa-Key", v),
            "Rsa-Key/{v}"
        );
    }
    assert_eq!(a.versions(av, "Rsa-Key"), b.versions(bv, "Rsa-Key"));
    assert_eq!(
        key_view(&a.p, &a.admin, av, "ec", &s.ec),
        key_view(&b.p, &b.admin, bv, "ec", &s.ec)
    );
    // The disabled version stays disabled; the newest stays current.
    let disabled =
        b.p.get_key(&b.admin, bv, "Rsa-Key", Some(&s.rsa[1]))
            .unwrap();
    assert_eq!(disabled["attributes"]["enabled"], false);
    assert_eq!(disabled["attributes"]["exp"], 4102444800i64);
    let current = b.p.get_key(&b.admin, bv, "Rsa-Key", None).unwrap();
    assert_eq!(
        version_of(current["key"]["kid"].as_str().unwrap()),
        s.rsa[2]
    );
    // Secrets: every enabled version's value, content type, tags and attributes.
    for v in &s.db[1..] {
        assert_eq!(
            secret_view(&a.p, &a.admin, av, "db-password", v),
            secret_view(&b.p, &b.admin, bv, "db-password", v)
        );
    }
    let e =
        b.p.get_secret(&b.admin, bv, "db-password", Some(&s.db[0]))
            .unwrap_err();
    assert_eq!(e.inner, Some("SecretDisabled"));
    // Soft-deleted objects keep their deletion and purge dates.
    let (ka, kb) = (
        a.p.get_deleted_key(&a.admin, av, "gone").unwrap(),
        b.p.get_deleted_key(&b.admin, bv, "gone").unwrap(),
    );
    assert_eq!(ka["deletedDate"], kb["deletedDate"]);
    assert_eq!(ka["scheduledPurgeDate"], kb["scheduledPurgeDate"]);
    let (sa, sb) = (
        a.p.get_deleted_secret(&a.admin, av, "old").unwrap(),
        b.p.get_deleted_secret(&b.admin, bv, "old").unwrap(),
    );
    assert_eq!(sa["deletedDate"], sb["deletedDate"]);
    assert_eq!(
        vault_level_out(sa)["attributes"],
        vault_level_out(sb)["attributes"]
    );
    // Data protected before the backup opens after it, under the same versions.
    assert_eq!(
        b.op(bv, "Rsa-Key", &s.rsa[0], "unwrapkey", &s.wrapped_v1)
            .unwrap(),
        s.dek
    );
    assert_eq!(
        b.op(bv, "Rsa-Key", &s.rsa[2], "unwrapkey", &s.wrapped_v3)
            .unwrap(),
        s.dek
    );
    let verify: KeyVerifyParameters = serde_json::from_value(json!({
        "alg": "ES384", "digest": b64::encode(&sha384(b"x")), "value": b64::encode(&s.signature)
    }))
    .unwrap();
    assert_eq!(
        b.p.verify(&b.admin, bv, "ec", Some(&s.ec), verify).unwrap()["value"],
        true
    );
    // And the other way: wrapped at the target, unwrapped at the source.
    let again = b.wrap(bv, "Rsa-Key", &s.rsa[2], &s.digest);
    assert_eq!(
        a.op(av, "Rsa-Key", &s.rsa[2], "unwrapkey", &again).unwrap(),
        s.digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passphrase_backup_restores_into_another_instance() {
    let src = Env::new(0x11).await;
    let principal = service_principal(&src).await;
    let s = populate(&src, "src-vault", &principal).await;
    let file = src
        .backup(
            "src-vault",
            json!({"passphrase": PASS, "kdf": {"memoryKiB": 8192, "iterations": 1}}),
        )
        .await;
    // Nothing sensitive outside the encryption.
    let text = String::from_utf8_lossy(&file);
    for needle in ["db-password", "Rsa-Key", "one-", "src-vault", "BEGIN"] {
        assert!(!text.contains(needle), "{needle} appears in the file");
    }

    let dst = Env::new(0x22).await;
    // A wrong passphrase is refused before anything is written, and no vault appears.
    let e = dst
        .start_restore(
            "dst-vault",
            &file,
            Some("not the passphrase"),
            Some("westeurope"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.status(), e.inner),
        (400, Some("BackupPassphraseMismatch"))
    );
    let e = dst
        .start_restore("dst-vault", &file, None, Some("westeurope"))
        .await
        .unwrap_err();
    assert_eq!(e.inner, Some("BackupPassphraseRequired"));
    assert!(
        dst.p
            .get_vault(&dst.admin, dst.sub(), "rg1", "dst-vault")
            .await
            .is_err()
    );
    // A damaged file fails its job (after the key check) and creates nothing.
    let mut damaged = file.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x40;
    let job = dst
        .start_restore("dst-vault", &damaged, Some(PASS), Some("westeurope"))
        .await
        .unwrap();
    let failed = dst.wait(&job).await;
    assert_eq!(failed["status"], "Failed");
    assert_eq!(
        failed["error"]["innererror"]["code"], "InvalidBackupFile",
        "{failed}"
    );
    assert!(
        dst.p
            .get_vault(&dst.admin, dst.sub(), "rg1", "dst-vault")
            .await
            .is_err()
    );
    let truncated = &file[..file.len() - 10];
    let job = dst
        .start_restore("dst-vault", truncated, Some(PASS), Some("westeurope"))
        .await
        .unwrap();
    assert_eq!(dst.wait(&job).await["status"], "Failed");

    // The restore, creating the vault from the backup's settings.
    let report = dst
        .restore("dst-vault", &file, Some(PASS), Some("westeurope"))
        .await;
    assert_eq!(report["createdVault"], true);
    assert_eq!(report["keys"], 3);
    assert_eq!(report["keyVersions"], 5);
    assert_eq!(report["deletedKeys"], 1);
    assert_eq!(report["secrets"], 2);
    assert_eq!(report["secretVersions"], 4);
    assert_eq!(report["deletedSecrets"], 1);
    assert_eq!(report["source"]["name"], "src-vault");
    // The principal exists only at the source: its grants are reported, not restored.
    assert_eq!(report["roleAssignments"]["restored"], 0);
    assert_eq!(
        report["roleAssignments"]["skipped"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        report["accessPolicies"]["skipped"][0]["objectId"],
        json!(principal)
    );
    assert_same_content(&src, "src-vault", &dst, "dst-vault", &s);

    // The settings came along (tenant: the target's; access policy: its principal is absent).
    let a = src.vault_json("src-vault").await;
    let b = dst.vault_json("dst-vault").await;
    for field in [
        "sku",
        "enablePurgeProtection",
        "enableRbacAuthorization",
        "softDeleteRetentionInDays",
        "networkAcls",
        "publicNetworkAccess",
        "enableSoftDelete",
    ] {
        assert_eq!(a["properties"][field], b["properties"][field], "{field}");
    }
    assert_eq!(b["tags"]["team"], "payments");
    assert_eq!(b["properties"]["tenantId"], json!(dst.creds.tenant_id));
    assert_eq!(b["properties"]["accessPolicies"], json!([]));

    // The target is no longer empty: a second restore into it is refused.
    let e = dst
        .start_restore("dst-vault", &file, Some(PASS), None)
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.inner), (409, Some("VaultNotEmpty")));
    // Restoring "as new" over an existing name is refused too.
    let e = dst
        .start_restore("dst-vault", &file, Some(PASS), Some("westeurope"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_id_backup_restores_into_an_empty_vault_of_the_same_instance() {
    let env = Env::new(0x33).await;
    let principal = service_principal(&env).await;
    let s = populate(&env, "kv-a", &principal).await;
    env.vault("kv-keys", json!({})).await;
    let wrapper = env
        .key(
            "kv-keys",
            "backup-kek",
            json!({"kty": "RSA", "key_size": 3072}),
        )
        .await;
    let kid = format!("https://kv-keys.localhost:8443/keys/backup-kek/{wrapper}");
    // A key id without a version, or of an EC key, is refused at once.
    let e = env
        .p
        .start_vault_backup(
            &env.admin,
            env.sub(),
            "rg1",
            "kv-a",
            serde_json::from_value(
                json!({"keyId": "https://kv-keys.localhost:8443/keys/backup-kek"}),
            )
            .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), 400);
    let e = env
        .p
        .start_vault_backup(
            &env.admin,
            env.sub(),
            "rg1",
            "kv-a",
            serde_json::from_value(
                json!({"keyId": format!("https://kv-a.localhost:8443/keys/ec/{}", s.ec)}),
            )
            .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), 400, "{e}");
    let file = env.backup("kv-a", json!({"keyId": kid})).await;

    // Into an existing, empty vault with another retention: settings merge, retention stays.
    env.vault("kv-b", json!({"softDeleteRetentionInDays": 7}))
        .await;
    let report = env.restore("kv-b", &file, None, None).await;
    assert_eq!(report["createdVault"], false);
    assert_eq!(report["roleAssignments"]["restored"], 2);
    assert_eq!(report["accessPolicies"]["skipped"], json!([]));
    assert!(
        report["notes"][0]
            .as_str()
            .unwrap()
            .contains("softDeleteRetentionInDays")
    );
    assert_same_content(&env, "kv-a", &env, "kv-b", &s);
    let b = env.vault_json("kv-b").await;
    assert_eq!(b["properties"]["softDeleteRetentionInDays"], 7);
    assert_eq!(b["properties"]["enablePurgeProtection"], true);
    assert_eq!(
        b["properties"]["accessPolicies"][0]["objectId"],
        json!(principal)
    );
    assert_eq!(b["properties"]["sku"]["name"], "premium");
    // The role assignments now name kv-b's scopes.
    let scopes: Vec<String> = assignments(&env, "kv-b")
        .iter()
        .map(|a| a["properties"]["scope"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(scopes.len(), 2, "{scopes:?}");
    assert!(
        scopes
            .iter()
            .any(|s| s.ends_with("/vaults/kv-b/keys/rsa-key"))
    );

    // A wrapping key that can no longer unwrap refuses the restore at once.
    env.vault("kv-c", json!({})).await;
    let upd: KeyUpdateParameters =
        serde_json::from_value(json!({"attributes": {"enabled": false}})).unwrap();
    env.p
        .update_key(&env.admin, "kv-keys", "backup-kek", Some(&wrapper), upd)
        .await
        .unwrap();
    let e = env
        .start_restore("kv-c", &file, None, None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), 403, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_administrator_runs_backups_and_reads_jobs() {
    let env = Env::new(0x44).await;
    env.vault("kv-x", json!({})).await;
    let sp = env
        .p
        .create_service_principal(&env.admin, "someone")
        .await
        .unwrap();
    let form = HashMap::from([
        ("grant_type".to_string(), "client_credentials".to_string()),
        (
            "client_id".to_string(),
            sp["clientId"].as_str().unwrap().to_string(),
        ),
        (
            "client_secret".to_string(),
            sp["clientSecret"].as_str().unwrap().to_string(),
        ),
        (
            "scope".to_string(),
            format!("{}/.default", env.p.config().authority()),
        ),
    ]);
    let grant = env
        .p
        .client_credentials(&env.creds.tenant_id, &form)
        .await
        .map_err(|e| e.error_description)
        .unwrap();
    let other = env.p.authenticate(&grant.access_token).unwrap();
    let e = env
        .p
        .start_vault_backup(
            &other,
            env.sub(),
            "rg1",
            "kv-x",
            serde_json::from_value(json!({"passphrase": PASS})).unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), 403);
    let job = env
        .p
        .start_vault_backup(
            &env.admin,
            env.sub(),
            "rg1",
            "kv-x",
            serde_json::from_value(
                json!({"passphrase": PASS, "kdf": {"memoryKiB": 1024, "iterations": 1}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    assert_eq!(env.p.job(&other, id).await.unwrap_err().status(), 403);
    assert_eq!(
        env.p
            .job_result_file(&other, id)
            .await
            .unwrap_err()
            .status(),
        403
    );
    env.wait(&job).await;
    assert_eq!(
        env.p
            .job(&env.admin, "0123456789abcdef0123456789abcdef")
            .await
            .unwrap_err()
            .status(),
        404
    );
    // Bad requests.
    for body in [
        json!({}),
        json!({"passphrase": "short"}),
        json!({"passphrase": PASS, "keyId": "https://kv-x.localhost/keys/k/0123456789abcdef0123456789abcdef"}),
        json!({"passphrase": PASS, "kdf": {"memoryKiB": 1}}),
    ] {
        let e = env
            .p
            .start_vault_backup(
                &env.admin,
                env.sub(),
                "rg1",
                "kv-x",
                serde_json::from_value(body.clone()).unwrap(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.status(), 400, "{body}");
    }
    let e = env
        .p
        .start_vault_backup(
            &env.admin,
            env.sub(),
            "rg1",
            "no-such-vault",
            serde_json::from_value(json!({"passphrase": PASS})).unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_running_when_the_server_stopped_are_failed_as_interrupted() {
    use kagi_core::jobs::{Job, JobKind, JobProgress, JobStatus};
    let env = Env::new(0x55).await;
    // What a server killed during a backup leaves: a job row in progress and a partial file.
    let jobs = env._dir.path().join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let id = "00112233445566778899aabbccddeeff";
    let row = Job {
        id: id.into(),
        kind: JobKind::VaultBackup,
        resource: "/subscriptions/s/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/v"
            .into(),
        status: JobStatus::InProgress,
        progress: JobProgress::default(),
        start_time: 1,
        end_time: None,
        error: None,
        result: None,
        result_bytes: None,
    };
    std::fs::write(
        jobs.join(format!("{id}.json")),
        serde_json::to_vec(&row).unwrap(),
    )
    .unwrap();
    std::fs::write(jobs.join(format!("{id}.part")), b"partial").unwrap();
    std::fs::write(jobs.join("feedface.upload"), b"upload").unwrap();
    let j = env.p.job(&env.admin, id).await.unwrap();
    assert_eq!(j["status"], "Failed");
    assert_eq!(j["error"]["code"], "JobInterrupted");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("interrupted")
    );
    assert!(!jobs.join(format!("{id}.part")).exists());
    assert!(!jobs.join("feedface.upload").exists());
    // The row on disk says so too.
    let stored: Job =
        serde_json::from_slice(&std::fs::read(jobs.join(format!("{id}.json"))).unwrap()).unwrap();
    assert_eq!(stored.status, JobStatus::Failed);
    assert_eq!(
        env.p
            .job_result_file(&env.admin, id)
            .await
            .unwrap_err()
            .inner,
        Some("JobFailed")
    );
}

/// A job found only in the store (run by another process on a store no other node shares) is
/// answered from its mirror there; no node holds its lease, so it is answered as interrupted,
/// and it has no result. (On PostgreSQL a job whose node still holds the lease is answered as
/// running: tests/conformance/test_several_nodes.py.)
#[tokio::test]
async fn a_job_of_another_process_is_read_from_the_store_as_interrupted() {
    let env = Env::new(7).await;
    let id = "00112233445566778899aabbccddeeff";
    let now = env.clock.now();
    let job = json!({
        "id": id, "kind": "VaultBackup", "resource": "/subscriptions/s/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/v",
        "status": "InProgress",
        "progress": {"done": 2, "total": 6, "unit": "objects", "phase": "encrypt"},
        "startTime": now, "endTime": null, "error": null, "result": null, "resultBytes": null,
    });
    env.store
        .put_service_document(
            kagi_vault::JOBS_KEY,
            &kagi_store::ServiceDocument {
                kind: "vault-job".into(),
                name: id.into(),
                body: json!({"job": job, "node": "other", "heartbeat": now}).to_string(),
                updated: now,
            },
        )
        .await
        .unwrap();
    let seen = env.p.job(&env.admin, id).await.unwrap();
    assert_eq!(seen["status"], "Failed", "{seen}");
    assert_eq!(seen["progress"]["done"], 2);
    assert!(
        seen["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("interrupted"),
        "{seen}"
    );
    assert_eq!(
        env.p
            .job_result_file(&env.admin, id)
            .await
            .unwrap_err()
            .status(),
        409
    );
    // Unknown ids stay unknown.
    assert_eq!(
        env.p
            .job(&env.admin, "ffeeddccbbaa99887766554433221100")
            .await
            .unwrap_err()
            .status(),
        404
    );
}

//! Behaviour of the vault service (`kagi_vault::Platform`) without HTTP: a real SQLite store
//! in a temporary directory, a real root key, real tokens from the client-credentials grant,
//! and a clock the tests move by hand (so retention and expiry never depend on timing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use kagi_core::key::{
    BackupBlob, KeyCreateParameters, KeyOperationParameters, KeySignParameters,
    KeyUpdateParameters, KeyVerifyParameters,
};
use kagi_core::time::{Clock, DAY};
use kagi_core::vault::VaultInput;
use kagi_core::{ErrorCode, KvError, b64};
use kagi_crypto::{AesRootKey, DigestAlgorithm, RootKey};
use kagi_store::{PrincipalRecord, SqlStore, Store};
use kagi_vault::{
    BootstrapAdmin, ListQuery, Platform, PlatformConfig, Principal, ResourceGroupInput,
    StartupError, TokenRequestError,
};
use serde_json::{Value, json};

// ----- fixtures -----

/// 2026-01-01T00:00:00Z: where every test clock starts.
const T0: i64 = 1_767_225_600;
const ROOT: [u8; 32] = [0x42; 32];
const OTHER_ROOT: [u8; 32] = [0x24; 32];
const API: &str = "7.5";

/// A clock that moves only when a test says so.
#[derive(Debug)]
struct TestClock(AtomicI64);

impl TestClock {
    fn new() -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(T0)))
    }

    fn advance(&self, seconds: i64) {
        self.0.fetch_add(seconds, Ordering::SeqCst);
    }

    fn set(&self, t: i64) {
        self.0.store(t, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn config(dir: &Path) -> PlatformConfig {
    PlatformConfig {
        data_dir: dir.to_path_buf(),
        dns_suffix: "localhost".into(),
        port: 8443,
    }
}

async fn open(
    dir: &Path,
    clock: &Arc<TestClock>,
    root: &[u8; 32],
) -> Result<(Platform, Option<BootstrapAdmin>), StartupError> {
    let store: Arc<dyn Store> =
        Arc::new(SqlStore::open_sqlite(&dir.join("kagi.db")).await.unwrap());
    Platform::open_with(
        config(dir),
        clock.clone(),
        Arc::new(AesRootKey::from_bytes(root)),
        store,
    )
    .await
}

/// A started platform with its bootstrap administrator signed in.
struct Env {
    dir: tempfile::TempDir,
    clock: Arc<TestClock>,
    p: Platform,
    admin_creds: BootstrapAdmin,
    admin: Principal,
}

impl Env {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (p, created) = open(dir.path(), &clock, &ROOT).await.unwrap();
        let admin_creds = created.expect("first start creates the bootstrap administrator");
        assert_eq!(admin_creds.tenant_id, p.default_tenant());
        assert_eq!(admin_creds.subscription_id, p.default_subscription());
        assert_eq!(admin_creds.authority, "https://localhost:8443");
        let admin = sign_in(
            &p,
            &admin_creds.tenant_id,
            &admin_creds.client_id,
            &admin_creds.client_secret,
        )
        .await;
        Self {
            dir,
            clock,
            p,
            admin_creds,
            admin,
        }
    }

    fn tenant(&self) -> String {
        self.admin_creds.tenant_id.clone()
    }

    fn sub(&self) -> String {
        self.admin_creds.subscription_id.clone()
    }

    /// A fresh token for the administrator (after the clock moved past the old one's expiry).
    async fn refresh_admin(&mut self) {
        self.admin = sign_in(
            &self.p,
            &self.admin_creds.tenant_id,
            &self.admin_creds.client_id,
            &self.admin_creds.client_secret,
        )
        .await;
    }

    /// Creates resource group `rg1` (if needed) and a vault in it.
    async fn vault(&self, name: &str, properties: Value) -> Value {
        self.p
            .put_resource_group(
                &self.admin,
                &self.sub(),
                "rg1",
                ResourceGroupInput {
                    location: "westeurope".into(),
                    tags: None,
                },
            )
            .await
            .unwrap();
        let mut props = json!({
            "tenantId": self.tenant(),
            "sku": {"family": "A", "name": "standard"},
        });
        for (k, v) in properties.as_object().unwrap() {
            props[k] = v.clone();
        }
        let (status, v) = self
            .p
            .put_vault(
                &self.admin,
                &self.sub(),
                "rg1",
                name,
                vault_input(json!({"location": "westeurope", "properties": props})),
                false,
            )
            .await
            .unwrap();
        assert_eq!(status, 201);
        v
    }

    async fn create(&self, vault: &str, name: &str, params: Value) -> Result<Value, KvError> {
        self.p
            .create_key(&self.admin, vault, name, create_params(params))
            .await
    }

    fn op(
        &self,
        vault: &str,
        name: &str,
        version: Option<&str>,
        segment: &str,
        value: &[u8],
    ) -> Result<Vec<u8>, KvError> {
        op_as(&self.p, &self.admin, vault, name, version, segment, value)
    }

    fn get(&self, vault: &str, name: &str) -> Result<Value, KvError> {
        self.p.get_key(&self.admin, vault, name, None)
    }

    async fn update(&self, vault: &str, name: &str, body: Value) -> Result<Value, KvError> {
        self.p
            .update_key(
                &self.admin,
                vault,
                name,
                None,
                serde_json::from_value::<KeyUpdateParameters>(body).unwrap(),
            )
            .await
    }
}

fn token_form(client_id: &str, secret: &str, scope: &str) -> HashMap<String, String> {
    HashMap::from([
        ("grant_type".to_string(), "client_credentials".to_string()),
        ("client_id".to_string(), client_id.to_string()),
        ("client_secret".to_string(), secret.to_string()),
        ("scope".to_string(), scope.to_string()),
    ])
}

async fn token(p: &Platform, tenant: &str, client_id: &str, secret: &str) -> String {
    let scope = format!("{}/.default", p.config().authority());
    let grant = p
        .client_credentials(tenant, &token_form(client_id, secret, &scope))
        .await
        .unwrap_or_else(|e| panic!("token refused: {} {}", e.status, e.error_description));
    assert_eq!(grant.token_type, "Bearer");
    assert_eq!(grant.expires_in, 3599);
    grant.access_token
}

async fn sign_in(p: &Platform, tenant: &str, client_id: &str, secret: &str) -> Principal {
    let t = token(p, tenant, client_id, secret).await;
    p.authenticate(&t).unwrap()
}

/// Provisions service principals out of band: written straight into the store, then the
/// platform is restarted on it (principals are loaded at start, as the bootstrap administrator
/// is). Returns the records, in the order of `wanted` (tenant, secret).
async fn add_principals(env: &mut Env, wanted: &[(&str, &str)]) -> Vec<PrincipalRecord> {
    let store = SqlStore::open_sqlite(&env.dir.path().join("kagi.db"))
        .await
        .unwrap();
    let mut out = Vec::new();
    for (i, (tenant, secret)) in wanted.iter().enumerate() {
        let r = PrincipalRecord {
            object_id: uuid(),
            tenant_id: tenant.to_string(),
            client_id: uuid(),
            display_name: format!("app {i}"),
            secret_hash: kagi_identity::hash_secret(secret),
            kind: "ServicePrincipal".into(),
            created: env.clock.now(),
            resource_id: None,
        };
        store.put_principal(&r).await.unwrap();
        out.push(r);
    }
    let (p, created) = open(env.dir.path(), &env.clock, &ROOT).await.unwrap();
    assert!(created.is_none());
    env.p = p;
    env.refresh_admin().await;
    out
}

fn uuid() -> String {
    let b: [u8; 16] = kagi_crypto::random_bytes(16).unwrap().try_into().unwrap();
    kagi_core::ids::uuid_v4(b)
}

fn vault_input(v: Value) -> VaultInput {
    serde_json::from_value(v).unwrap()
}

fn create_params(v: Value) -> KeyCreateParameters {
    serde_json::from_value(v).unwrap()
}

fn rsa() -> Value {
    json!({"kty": "RSA", "key_size": 2048})
}

fn ec() -> Value {
    json!({"kty": "EC", "crv": "P-256"})
}

fn op_as(
    p: &Platform,
    caller: &Principal,
    vault: &str,
    name: &str,
    version: Option<&str>,
    segment: &str,
    value: &[u8],
) -> Result<Vec<u8>, KvError> {
    let params: KeyOperationParameters =
        serde_json::from_value(json!({"alg": "RSA-OAEP-256", "value": b64::encode(value)}))
            .unwrap();
    let out = p.key_operation(caller, vault, name, version, segment, params)?;
    Ok(b64::decode(out["value"].as_str().unwrap()).unwrap())
}

fn sign(
    p: &Platform,
    caller: &Principal,
    vault: &str,
    name: &str,
    alg: &str,
    digest: &[u8],
) -> Result<Vec<u8>, KvError> {
    let params: KeySignParameters =
        serde_json::from_value(json!({"alg": alg, "value": b64::encode(digest)})).unwrap();
    let out = p.sign(caller, vault, name, None, params)?;
    Ok(b64::decode(out["value"].as_str().unwrap()).unwrap())
}

fn verify(
    p: &Platform,
    caller: &Principal,
    vault: &str,
    name: &str,
    alg: &str,
    digest: &[u8],
    sig: &[u8],
) -> Result<bool, KvError> {
    let params: KeyVerifyParameters = serde_json::from_value(
        json!({"alg": alg, "digest": b64::encode(digest), "value": b64::encode(sig)}),
    )
    .unwrap();
    let out = p.verify(caller, vault, name, None, params)?;
    Ok(out["value"].as_bool().unwrap())
}

fn sha256(data: &[u8]) -> Vec<u8> {
    kagi_crypto::digest(DigestAlgorithm::Sha256, data)
}

/// The version (last path segment) of a versioned kid.
fn version_of(bundle: &Value) -> String {
    let kid = bundle["key"]["kid"].as_str().unwrap();
    kid.rsplit('/').next().unwrap().to_string()
}

/// Asserts an error's status, code and inner code exactly.
#[track_caller]
fn assert_err<T: std::fmt::Debug>(
    r: Result<T, KvError>,
    status: u16,
    code: ErrorCode,
    inner: Option<&str>,
) -> KvError {
    let e = r.expect_err("expected an error");
    assert_eq!(
        (e.status(), e.code, e.inner),
        (status, code, inner),
        "unexpected error: {e}"
    );
    e
}

#[track_caller]
fn assert_token_err<T>(
    r: Result<T, TokenRequestError>,
    status: u16,
    error: &str,
    code: u32,
) -> TokenRequestError {
    let Err(e) = r else {
        panic!("expected a token refusal")
    };
    assert_eq!(
        (e.status, e.error, e.error_codes.as_slice()),
        (status, error, &[code][..]),
        "unexpected refusal: {}",
        e.error_description
    );
    assert!(
        e.error_description.starts_with(&format!("AADSTS{code}: ")),
        "{}",
        e.error_description
    );
    e
}

// ----- tests -----

#[tokio::test]
async fn vaults_keys_wrap_unwrap_sign_verify() {
    let env = Env::new().await;
    let p = &env.p;

    // Resource group: 201 when created, 200 when it existed, 409 for another location.
    let rg = |loc: &str| ResourceGroupInput {
        location: loc.into(),
        tags: None,
    };
    let (status, body) = p
        .put_resource_group(&env.admin, &env.sub(), "rg1", rg("westeurope"))
        .await
        .unwrap();
    assert_eq!(status, 201);
    assert_eq!(body["name"], "rg1");
    let (status, _) = p
        .put_resource_group(&env.admin, &env.sub(), "RG1", rg("westeurope"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_err(
        p.put_resource_group(&env.admin, &env.sub(), "rg1", rg("northeurope"))
            .await,
        409,
        ErrorCode::Conflict,
        Some("InvalidResourceGroupLocation"),
    );

    let v = env.vault("vault-one", json!({})).await;
    assert_eq!(v["name"], "vault-one");
    assert_eq!(
        v["properties"]["vaultUri"],
        "https://vault-one.localhost:8443/"
    );
    assert_eq!(v["properties"]["softDeleteRetentionInDays"], 90);
    assert_eq!(v["properties"]["enableSoftDelete"], true);
    assert_eq!(v["properties"]["enablePurgeProtection"], false);
    let got = p
        .get_vault(&env.admin, &env.sub(), "rg1", "vault-one")
        .await
        .unwrap();
    assert_eq!(got, v);
    // Vault names are global: another resource group cannot take it.
    p.put_resource_group(&env.admin, &env.sub(), "rg2", rg("westeurope"))
        .await
        .unwrap();
    assert_err(
        p.put_vault(
            &env.admin,
            &env.sub(),
            "rg2",
            "Vault-One",
            vault_input(json!({"location": "westeurope", "properties": {
                "tenantId": env.tenant(), "sku": {"family": "A", "name": "standard"}}})),
            false,
        )
        .await,
        409,
        ErrorCode::VaultAlreadyExists,
        None,
    );

    // RSA-2048.
    let k = env.create("vault-one", "rsa-key", rsa()).await.unwrap();
    assert_eq!(k["key"]["kty"], "RSA");
    assert_eq!(
        b64::decode(k["key"]["n"].as_str().unwrap()).unwrap().len(),
        256
    );
    assert_eq!(k["key"]["e"], "AQAB");
    assert!(
        k["key"]["kid"]
            .as_str()
            .unwrap()
            .starts_with("https://vault-one.localhost:8443/keys/rsa-key/")
    );
    assert_eq!(version_of(&k).len(), 32);
    assert_eq!(k["attributes"]["enabled"], true);
    assert_eq!(k["attributes"]["created"], T0);
    assert_eq!(k["attributes"]["recoverableDays"], 90);
    assert!(k.get("key").unwrap().get("d").is_none(), "no private part");

    // wrapKey / unwrapKey round trip, with and without the version in the path; the segment
    // is matched case-insensitively as it is in the URL.
    let dek = kagi_crypto::random_bytes(32).unwrap();
    let wrapped = env
        .op("vault-one", "rsa-key", None, "wrapkey", &dek)
        .unwrap();
    assert_eq!(wrapped.len(), 256);
    assert_ne!(wrapped, dek);
    assert_eq!(
        env.op("vault-one", "rsa-key", None, "unwrapKey", &wrapped)
            .unwrap(),
        dek
    );
    let ver = version_of(&k);
    assert_eq!(
        env.op("vault-one", "RSA-KEY", Some(&ver), "unwrapkey", &wrapped)
            .unwrap(),
        dek
    );
    // encrypt / decrypt.
    let ct = env
        .op("vault-one", "rsa-key", None, "encrypt", b"hello")
        .unwrap();
    assert_eq!(
        env.op("vault-one", "rsa-key", None, "decrypt", &ct)
            .unwrap(),
        b"hello"
    );
    // A damaged ciphertext is the caller's mistake: 400, no detail.
    let mut bad = wrapped.clone();
    bad[10] ^= 1;
    assert_err(
        env.op("vault-one", "rsa-key", None, "unwrapkey", &bad),
        400,
        ErrorCode::BadParameter,
        None,
    );
    // An unknown version is a 404.
    assert_err(
        env.op(
            "vault-one",
            "rsa-key",
            Some("0123456789abcdef0123456789abcdef"),
            "unwrapkey",
            &wrapped,
        ),
        404,
        ErrorCode::KeyNotFound,
        None,
    );

    // RSA signatures.
    let digest = sha256(b"message");
    let sig = sign(p, &env.admin, "vault-one", "rsa-key", "PS256", &digest).unwrap();
    assert_eq!(sig.len(), 256);
    assert!(
        verify(
            p,
            &env.admin,
            "vault-one",
            "rsa-key",
            "PS256",
            &digest,
            &sig
        )
        .unwrap()
    );
    assert!(
        !verify(
            p,
            &env.admin,
            "vault-one",
            "rsa-key",
            "PS256",
            &sha256(b"other"),
            &sig
        )
        .unwrap()
    );

    // EC P-256.
    let e = env.create("vault-one", "ec-key", ec()).await.unwrap();
    assert_eq!(e["key"]["kty"], "EC");
    assert_eq!(e["key"]["crv"], "P-256");
    assert_eq!(
        b64::decode(e["key"]["x"].as_str().unwrap()).unwrap().len(),
        32
    );
    let sig = sign(p, &env.admin, "vault-one", "ec-key", "ES256", &digest).unwrap();
    assert_eq!(sig.len(), 64, "JWS (r||s) signature");
    assert!(verify(p, &env.admin, "vault-one", "ec-key", "ES256", &digest, &sig).unwrap());
    let mut bad_sig = sig.clone();
    bad_sig[5] ^= 1;
    assert!(
        !verify(
            p,
            &env.admin,
            "vault-one",
            "ec-key",
            "ES256",
            &digest,
            &bad_sig
        )
        .unwrap()
    );
    // Algorithm and key type must match; EC keys do not wrap.
    assert_err(
        sign(p, &env.admin, "vault-one", "ec-key", "ES384", &digest),
        400,
        ErrorCode::BadParameter,
        None,
    );
    assert_err(
        sign(p, &env.admin, "vault-one", "ec-key", "RS256", &digest),
        400,
        ErrorCode::BadParameter,
        None,
    );
    assert_err(
        env.op("vault-one", "ec-key", None, "wrapkey", &dek),
        400,
        ErrorCode::BadParameter,
        None,
    );

    // Unknown vault and unknown key.
    assert_err(
        env.get("no-such-vault", "rsa-key"),
        404,
        ErrorCode::VaultNotFound,
        None,
    );
    assert_err(
        env.get("vault-one", "nope"),
        404,
        ErrorCode::KeyNotFound,
        None,
    );
    // Unsupported sizes and curves.
    assert_err(
        env.create("vault-one", "k", json!({"kty": "RSA", "key_size": 1024}))
            .await,
        400,
        ErrorCode::BadParameter,
        Some("KeySizeNotSupported"),
    );
    assert_err(
        env.create("vault-one", "k", json!({"kty": "EC", "crv": "P-192"}))
            .await,
        400,
        ErrorCode::BadParameter,
        Some("CurveNotSupported"),
    );
    assert_err(
        env.create(
            "vault-one",
            "k",
            json!({"kty": "RSA-HSM", "key_size": 2048}),
        )
        .await,
        400,
        ErrorCode::BadParameter,
        Some("KeyTypeNotSupported"),
    );
}

#[tokio::test]
async fn state_survives_restart_with_the_same_root_key() {
    let env = Env::new().await;
    env.vault("persist", json!({"softDeleteRetentionInDays": 7}))
        .await;
    let k1 = env.create("persist", "cmk", rsa()).await.unwrap();
    let v1 = version_of(&k1);
    let dek1 = b"data key one, 32 bytes long!!!!!".to_vec();
    let wrapped1 = env.op("persist", "cmk", None, "wrapkey", &dek1).unwrap();
    env.clock.advance(60);
    let k2 = env
        .p
        .rotate_key(&env.admin, "persist", "cmk")
        .await
        .unwrap();
    let v2 = version_of(&k2);
    assert_ne!(v1, v2);
    let dek2 = b"data key two".to_vec();
    let wrapped2 = env.op("persist", "cmk", None, "wrapkey", &dek2).unwrap();
    env.clock.advance(60);
    env.update(
        "persist",
        "cmk",
        json!({"tags": {"team": "a"}, "attributes": {"exp": T0 + 365 * DAY}}),
    )
    .await
    .unwrap();
    env.create(
        "persist",
        "ec",
        json!({"kty": "EC", "crv": "P-256", "key_ops": ["sign", "verify"]}),
    )
    .await
    .unwrap();
    let digest = sha256(b"persisted");
    let sig = sign(&env.p, &env.admin, "persist", "ec", "ES256", &digest).unwrap();
    env.create("persist", "gone", ec()).await.unwrap();
    env.p
        .delete_key(&env.admin, "persist", "gone")
        .await
        .unwrap();

    let q = ListQuery {
        api_version: API.into(),
        ..Default::default()
    };
    let snapshot = |p: &Platform, admin: &Principal| {
        (
            p.get_key(admin, "persist", "cmk", None).unwrap(),
            p.get_key(admin, "persist", "cmk", Some(&v1)).unwrap(),
            p.get_key(admin, "persist", "ec", None).unwrap(),
            p.list_keys(admin, "persist", &q).unwrap(),
            p.list_key_versions(admin, "persist", "cmk", &q).unwrap(),
            p.list_deleted_keys(admin, "persist", &q).unwrap(),
            p.get_deleted_key(admin, "persist", "gone").unwrap(),
        )
    };
    let before = snapshot(&env.p, &env.admin);
    let vault_before = env
        .p
        .get_vault(&env.admin, &env.sub(), "rg1", "persist")
        .await
        .unwrap();
    assert_eq!(before.4["value"].as_array().unwrap().len(), 2);
    assert_eq!(before.0["tags"], json!({"team": "a"}));
    assert_eq!(before.0["attributes"]["exp"], T0 + 365 * DAY);
    let old_token = token(
        &env.p,
        &env.tenant(),
        &env.admin_creds.client_id,
        &env.admin_creds.client_secret,
    )
    .await;

    // Restart: drop everything, open the same directory with the same root key.
    let Env {
        dir,
        clock,
        p,
        admin_creds,
        ..
    } = env;
    drop(p);
    let (p, created) = open(dir.path(), &clock, &ROOT).await.unwrap();
    assert!(
        created.is_none(),
        "the administrator exists: no new credentials"
    );
    assert_eq!(p.default_tenant(), admin_creds.tenant_id);
    assert_eq!(p.default_subscription(), admin_creds.subscription_id);
    // The token signing key persisted: a token issued before the restart is still good.
    let admin = p.authenticate(&old_token).unwrap();
    assert_eq!(
        sign_in(
            &p,
            &admin_creds.tenant_id,
            &admin_creds.client_id,
            &admin_creds.client_secret
        )
        .await,
        admin
    );

    let after = snapshot(&p, &admin);
    assert_eq!(after, before);
    assert_eq!(
        p.get_vault(&admin, &admin_creds.subscription_id, "rg1", "persist")
            .await
            .unwrap(),
        vault_before
    );
    // Data protected before the restart opens after it, per version.
    assert_eq!(
        op_as(
            &p,
            &admin,
            "persist",
            "cmk",
            Some(&v1),
            "unwrapkey",
            &wrapped1
        )
        .unwrap(),
        dek1
    );
    assert_eq!(
        op_as(&p, &admin, "persist", "cmk", None, "unwrapkey", &wrapped2).unwrap(),
        dek2
    );
    assert_err(
        op_as(&p, &admin, "persist", "cmk", None, "unwrapkey", &wrapped1),
        400,
        ErrorCode::BadParameter,
        None,
    );
    assert!(verify(&p, &admin, "persist", "ec", "ES256", &digest, &sig).unwrap());
    // key_ops persisted too.
    assert_eq!(after.2["key"]["key_ops"], json!(["sign", "verify"]));
}

#[tokio::test]
async fn another_root_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let (p, created) = open(dir.path(), &clock, &ROOT).await.unwrap();
    assert!(created.is_some());
    drop(p);
    match open(dir.path(), &clock, &OTHER_ROOT).await {
        Err(StartupError::RootKey(msg)) => {
            assert!(msg.contains("sealed under root key"), "{msg}");
            assert!(
                msg.contains(&AesRootKey::from_bytes(&OTHER_ROOT).fingerprint()),
                "{msg}"
            );
        }
        Err(e) => panic!("wrong startup error: {e}"),
        Ok(_) => panic!("a store sealed under another root key was opened"),
    }
    // The refusal changed nothing: the right key still opens it.
    let (_, created) = open(dir.path(), &clock, &ROOT).await.unwrap();
    assert!(created.is_none());
}

#[tokio::test]
async fn soft_delete_recover_and_purge_after_retention() {
    let mut env = Env::new().await;
    env.vault("soft", json!({"softDeleteRetentionInDays": 7}))
        .await;
    let k = env.create("soft", "Cmk", rsa()).await.unwrap();
    let dek = b"recoverable".to_vec();
    let wrapped = env.op("soft", "cmk", None, "wrapkey", &dek).unwrap();

    let deleted = env.p.delete_key(&env.admin, "soft", "cmk").await.unwrap();
    assert_eq!(
        deleted["recoveryId"],
        "https://soft.localhost:8443/deletedkeys/Cmk"
    );
    assert_eq!(deleted["deletedDate"], T0);
    assert_eq!(deleted["scheduledPurgeDate"], T0 + 7 * DAY);
    assert_eq!(deleted["key"]["kid"], k["key"]["kid"]);
    assert_eq!(deleted["attributes"]["recoverableDays"], 7);
    assert_eq!(
        deleted["attributes"]["recoveryLevel"],
        "CustomizedRecoverable+Purgeable"
    );

    // Gone from the live views, present in the deleted ones.
    assert_err(env.get("soft", "cmk"), 404, ErrorCode::KeyNotFound, None);
    assert_err(
        env.op("soft", "cmk", None, "unwrapkey", &wrapped),
        404,
        ErrorCode::KeyNotFound,
        None,
    );
    let q = ListQuery {
        api_version: API.into(),
        ..Default::default()
    };
    assert_eq!(
        env.p.list_keys(&env.admin, "soft", &q).unwrap()["value"],
        json!([])
    );
    assert_eq!(
        env.p.get_deleted_key(&env.admin, "soft", "CMK").unwrap(),
        deleted
    );
    // The name cannot be reused (in any case) while it is recoverable; a second delete is 404.
    for name in ["cmk", "CMK"] {
        assert_err(
            env.create("soft", name, rsa()).await,
            409,
            ErrorCode::Conflict,
            Some("ObjectIsDeletedButRecoverable"),
        );
    }
    assert_err(
        env.p.delete_key(&env.admin, "soft", "cmk").await,
        404,
        ErrorCode::KeyNotFound,
        None,
    );

    // Recover: the same key, the same versions, the same data.
    env.clock.advance(DAY);
    let recovered = env
        .p
        .recover_deleted_key(&env.admin, "soft", "cmk")
        .await
        .unwrap();
    assert_eq!(recovered["key"], k["key"]);
    assert_eq!(
        env.op("soft", "cmk", None, "unwrapkey", &wrapped).unwrap(),
        dek
    );
    assert_err(
        env.p.get_deleted_key(&env.admin, "soft", "cmk"),
        404,
        ErrorCode::KeyNotFound,
        None,
    );
    assert_err(
        env.p.recover_deleted_key(&env.admin, "soft", "cmk").await,
        404,
        ErrorCode::KeyNotFound,
        None,
    );

    // Delete again; the retention counts from this deletion.
    let deleted_at = env.clock.now();
    let d = env.p.delete_key(&env.admin, "soft", "cmk").await.unwrap();
    assert_eq!(d["scheduledPurgeDate"], deleted_at + 7 * DAY);

    // One second before the end of retention nothing is purged.
    env.clock.set(deleted_at + 7 * DAY - 1);
    assert_eq!(env.p.purge_expired().await.unwrap(), 0);
    env.refresh_admin().await;
    env.p.get_deleted_key(&env.admin, "soft", "cmk").unwrap();

    // At the end of retention the sweep removes it.
    env.clock.advance(1);
    assert_eq!(env.p.purge_expired().await.unwrap(), 1);
    assert_eq!(env.p.purge_expired().await.unwrap(), 0);
    assert_err(
        env.p.get_deleted_key(&env.admin, "soft", "cmk"),
        404,
        ErrorCode::KeyNotFound,
        None,
    );
    assert_err(env.get("soft", "cmk"), 404, ErrorCode::KeyNotFound, None);

    // The name is free: a new key, not the old one.
    let again = env.create("soft", "cmk", rsa()).await.unwrap();
    assert_ne!(again["key"]["n"], k["key"]["n"]);
    assert_eq!(
        env.p
            .list_key_versions(&env.admin, "soft", "cmk", &q)
            .unwrap()["value"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(
        env.op("soft", "cmk", None, "unwrapkey", &wrapped).is_err(),
        "the purged key's data is gone with it"
    );

    // Without purge protection an explicit purge is allowed at once.
    env.p.delete_key(&env.admin, "soft", "cmk").await.unwrap();
    env.p
        .purge_deleted_key(&env.admin, "soft", "cmk")
        .await
        .unwrap();
    assert_err(
        env.p.get_deleted_key(&env.admin, "soft", "cmk"),
        404,
        ErrorCode::KeyNotFound,
        None,
    );
    assert_err(
        env.p.purge_deleted_key(&env.admin, "soft", "cmk").await,
        404,
        ErrorCode::KeyNotFound,
        None,
    );
}

#[tokio::test]
async fn purge_protection_holds_until_retention_ends() {
    let mut env = Env::new().await;
    let v = env
        .vault(
            "guarded",
            json!({"softDeleteRetentionInDays": 7, "enablePurgeProtection": true}),
        )
        .await;
    assert_eq!(v["properties"]["enablePurgeProtection"], true);
    // Purge protection cannot be turned off.
    assert_err(
        env.p
            .put_vault(
                &env.admin,
                &env.sub(),
                "rg1",
                "guarded",
                vault_input(json!({"properties": {"enablePurgeProtection": false}})),
                true,
            )
            .await,
        400,
        ErrorCode::BadRequest,
        None,
    );
    env.create("guarded", "cmk", ec()).await.unwrap();
    let d = env
        .p
        .delete_key(&env.admin, "guarded", "cmk")
        .await
        .unwrap();
    assert_eq!(d["attributes"]["recoveryLevel"], "CustomizedRecoverable");
    assert_eq!(d["scheduledPurgeDate"], T0 + 7 * DAY);

    assert_err(
        env.p.purge_deleted_key(&env.admin, "guarded", "cmk").await,
        403,
        ErrorCode::Forbidden,
        Some("PurgeProtectionEnabled"),
    );
    env.clock.set(T0 + 7 * DAY - 1);
    env.refresh_admin().await;
    assert_err(
        env.p.purge_deleted_key(&env.admin, "guarded", "cmk").await,
        403,
        ErrorCode::Forbidden,
        Some("PurgeProtectionEnabled"),
    );
    assert_eq!(env.p.purge_expired().await.unwrap(), 0);
    env.p.get_deleted_key(&env.admin, "guarded", "cmk").unwrap();

    env.clock.advance(1);
    assert_eq!(env.p.purge_expired().await.unwrap(), 1);
    assert_err(
        env.p.get_deleted_key(&env.admin, "guarded", "cmk"),
        404,
        ErrorCode::KeyNotFound,
        None,
    );
    env.create("guarded", "cmk", ec()).await.unwrap();

    // The vault itself: soft delete, purge refused until its retention ends, then swept.
    let deleted_at = env.clock.now();
    assert_eq!(
        env.p
            .delete_vault(&env.admin, &env.sub(), "rg1", "guarded")
            .await
            .unwrap(),
        200
    );
    assert_err(
        env.get("guarded", "cmk"),
        404,
        ErrorCode::VaultNotFound,
        None,
    );
    let dv = env
        .p
        .get_deleted_vault(&env.admin, &env.sub(), "westeurope", "guarded")
        .await
        .unwrap();
    assert_eq!(dv["properties"]["purgeProtectionEnabled"], true);
    assert_err(
        env.p
            .purge_deleted_vault(&env.admin, &env.sub(), "westeurope", "guarded")
            .await,
        409,
        ErrorCode::Conflict,
        Some("PurgeProtectionEnabled"),
    );
    env.clock.set(deleted_at + 7 * DAY);
    env.refresh_admin().await;
    assert_eq!(env.p.purge_expired().await.unwrap(), 1);
    assert_err(
        env.p
            .get_deleted_vault(&env.admin, &env.sub(), "westeurope", "guarded")
            .await,
        404,
        ErrorCode::ResourceNotFound,
        None,
    );
    // The vault name is free again, and the new vault is empty.
    env.vault("guarded", json!({})).await;
    assert_err(env.get("guarded", "cmk"), 404, ErrorCode::KeyNotFound, None);
}

#[tokio::test]
async fn validity_window_and_disabled_keys() {
    let env = Env::new().await;
    let p = &env.p;
    env.vault("window", json!({})).await;

    // A key created already expired refuses what protects new data.
    env.create(
        "window",
        "expired",
        json!({"kty": "RSA", "key_size": 2048, "attributes": {"exp": T0 - 1}}),
    )
    .await
    .unwrap();
    for seg in ["wrapkey", "encrypt"] {
        assert_err(
            env.op("window", "expired", None, seg, b"x"),
            403,
            ErrorCode::Forbidden,
            Some("KeyExpired"),
        );
    }
    assert_err(
        sign(p, &env.admin, "window", "expired", "RS256", &sha256(b"m")),
        403,
        ErrorCode::Forbidden,
        Some("KeyExpired"),
    );

    // A key not yet valid likewise.
    env.create(
        "window",
        "future",
        json!({"kty": "EC", "crv": "P-256", "attributes": {"nbf": T0 + 10}}),
    )
    .await
    .unwrap();
    assert_err(
        sign(p, &env.admin, "window", "future", "ES256", &sha256(b"m")),
        403,
        ErrorCode::Forbidden,
        Some("KeyNotYetValid"),
    );
    env.clock.advance(10);
    sign(p, &env.admin, "window", "future", "ES256", &sha256(b"m")).unwrap();

    // Data protected while the key was valid stays recoverable after it expires.
    env.create("window", "cmk", rsa()).await.unwrap();
    let dek = b"protected before expiry".to_vec();
    let wrapped = env.op("window", "cmk", None, "wrapkey", &dek).unwrap();
    let ct = env.op("window", "cmk", None, "encrypt", b"secret").unwrap();
    let digest = sha256(b"signed before expiry");
    let sig = sign(p, &env.admin, "window", "cmk", "RS256", &digest).unwrap();
    let exp = env.clock.now() + 100;
    let updated = env
        .update("window", "cmk", json!({"attributes": {"exp": exp}}))
        .await
        .unwrap();
    assert_eq!(updated["attributes"]["exp"], exp);
    env.clock.set(exp - 1);
    env.op("window", "cmk", None, "wrapkey", &dek).unwrap();
    env.clock.set(exp);
    for seg in ["wrapkey", "encrypt"] {
        assert_err(
            env.op("window", "cmk", None, seg, &dek),
            403,
            ErrorCode::Forbidden,
            Some("KeyExpired"),
        );
    }
    assert_err(
        sign(p, &env.admin, "window", "cmk", "RS256", &digest),
        403,
        ErrorCode::Forbidden,
        Some("KeyExpired"),
    );
    assert_eq!(
        env.op("window", "cmk", None, "unwrapkey", &wrapped)
            .unwrap(),
        dek
    );
    assert_eq!(
        env.op("window", "cmk", None, "decrypt", &ct).unwrap(),
        b"secret"
    );
    assert!(verify(p, &env.admin, "window", "cmk", "RS256", &digest, &sig).unwrap());

    // Disabled: every cryptographic operation is refused, including the recovering ones.
    env.update(
        "window",
        "cmk",
        json!({"attributes": {"enabled": false, "exp": exp + DAY}}),
    )
    .await
    .unwrap();
    for (seg, input) in [
        ("wrapkey", &dek),
        ("encrypt", &dek),
        ("unwrapkey", &wrapped),
        ("decrypt", &ct),
    ] {
        assert_err(
            env.op("window", "cmk", None, seg, input),
            403,
            ErrorCode::Forbidden,
            Some("KeyDisabled"),
        );
    }
    assert_err(
        sign(p, &env.admin, "window", "cmk", "RS256", &digest),
        403,
        ErrorCode::Forbidden,
        Some("KeyDisabled"),
    );
    assert_err(
        verify(p, &env.admin, "window", "cmk", "RS256", &digest, &sig),
        403,
        ErrorCode::Forbidden,
        Some("KeyDisabled"),
    );
    assert_eq!(
        env.get("window", "cmk").unwrap()["attributes"]["enabled"],
        false
    );
    // Enabled again (and within its window): everything works.
    env.update("window", "cmk", json!({"attributes": {"enabled": true}}))
        .await
        .unwrap();
    assert_eq!(
        env.op("window", "cmk", None, "unwrapkey", &wrapped)
            .unwrap(),
        dek
    );
    env.op("window", "cmk", None, "wrapkey", &dek).unwrap();

    // key_ops narrow what a key may do.
    env.update("window", "cmk", json!({"key_ops": ["unwrapKey"]}))
        .await
        .unwrap();
    assert_err(
        env.op("window", "cmk", None, "wrapkey", &dek),
        403,
        ErrorCode::Forbidden,
        Some("KeyOperationForbidden"),
    );
    assert_eq!(
        env.op("window", "cmk", None, "unwrapkey", &wrapped)
            .unwrap(),
        dek
    );

    // exp must follow nbf.
    assert_err(
        env.create(
            "window",
            "bad",
            json!({"kty": "EC", "attributes": {"nbf": T0, "exp": T0}}),
        )
        .await,
        400,
        ErrorCode::BadParameter,
        None,
    );
}

#[tokio::test]
async fn access_policies_and_tenants_decide_who_may_do_what() {
    let mut env = Env::new().await;
    let (tenant, other_tenant) = (env.tenant(), uuid());
    let recs = add_principals(
        &mut env,
        &[(&tenant, "app-secret"), (&other_tenant, "stranger-secret")],
    )
    .await;
    let (app_rec, stranger_rec) = (&recs[0], &recs[1]);
    let p = &env.p;
    env.vault("shared", json!({})).await;
    env.create("shared", "cmk", rsa()).await.unwrap();
    let admin_wrapped = env.op("shared", "cmk", None, "wrapkey", b"dek").unwrap();

    // A second principal of the same tenant, with no access policy.
    let app = sign_in(p, &env.tenant(), &app_rec.client_id, "app-secret").await;
    assert_eq!(app.object_id, app_rec.object_id);
    assert_eq!(app.kind, "ServicePrincipal");
    let q = ListQuery {
        api_version: API.into(),
        ..Default::default()
    };
    let denied = |r: Result<Value, KvError>| {
        let e = assert_err(r, 403, ErrorCode::Forbidden, Some("ForbiddenByPolicy"));
        assert!(e.message.contains(&app_rec.object_id), "{}", e.message);
    };
    denied(p.get_key(&app, "shared", "cmk", None));
    denied(p.list_keys(&app, "shared", &q));
    denied(
        p.create_key(&app, "shared", "mine", create_params(ec()))
            .await,
    );
    denied(p.delete_key(&app, "shared", "cmk").await);
    assert_err(
        op_as(p, &app, "shared", "cmk", None, "wrapkey", b"dek"),
        403,
        ErrorCode::Forbidden,
        Some("ForbiddenByPolicy"),
    );
    assert_err(
        op_as(p, &app, "shared", "cmk", None, "unwrapkey", &admin_wrapped),
        403,
        ErrorCode::Forbidden,
        Some("ForbiddenByPolicy"),
    );

    // Grant get, wrapKey and unwrapKey (names are case-insensitive on input).
    let (status, v) = p
        .put_vault(
            &env.admin,
            &env.sub(),
            "rg1",
            "shared",
            vault_input(json!({"properties": {"accessPolicies": [{
                "tenantId": env.tenant(),
                "objectId": app_rec.object_id,
                "permissions": {"keys": ["Get", "wrapKey", "unwrapkey"]},
            }]}})),
            false,
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        v["properties"]["accessPolicies"][0]["objectId"],
        app_rec.object_id
    );
    // The same token now passes: access is decided per request, not baked into the token.
    let bundle = p.get_key(&app, "shared", "cmk", None).unwrap();
    assert_eq!(bundle["key"]["kty"], "RSA");
    let wrapped = op_as(p, &app, "shared", "cmk", None, "wrapkey", b"app dek").unwrap();
    assert_eq!(
        op_as(p, &app, "shared", "cmk", None, "unwrapkey", &wrapped).unwrap(),
        b"app dek"
    );
    assert_eq!(
        op_as(p, &app, "shared", "cmk", None, "unwrapkey", &admin_wrapped).unwrap(),
        b"dek"
    );
    // What was not granted stays refused.
    denied(p.delete_key(&app, "shared", "cmk").await);
    denied(p.list_keys(&app, "shared", &q));
    denied(p.rotate_key(&app, "shared", "cmk").await);
    assert_err(
        op_as(p, &app, "shared", "cmk", None, "encrypt", b"x"),
        403,
        ErrorCode::Forbidden,
        Some("ForbiddenByPolicy"),
    );
    assert_err(
        p.backup_key(&app, "shared", "cmk"),
        403,
        ErrorCode::Forbidden,
        Some("ForbiddenByPolicy"),
    );
    p.get_key(&env.admin, "shared", "cmk", None).unwrap();

    // The management API accepts only the bootstrap administrator.
    let arm_denied = |r: Result<Value, KvError>| {
        assert_err(r, 403, ErrorCode::Forbidden, Some("AuthorizationFailed"));
    };
    arm_denied(p.get_vault(&app, &env.sub(), "rg1", "shared").await);
    arm_denied(p.list_vaults(&app, &env.sub(), None).await);
    arm_denied(p.get_resource_group(&app, &env.sub(), "rg1").await);
    arm_denied(
        p.put_resource_group(
            &app,
            &env.sub(),
            "rg9",
            ResourceGroupInput {
                location: "westeurope".into(),
                tags: None,
            },
        )
        .await
        .map(|(_, v)| v),
    );
    arm_denied(
        p.put_vault(
            &app,
            &env.sub(),
            "rg1",
            "shared",
            vault_input(json!({"properties": {"accessPolicies": []}})),
            true,
        )
        .await
        .map(|(_, v)| v),
    );
    assert_err(
        p.delete_vault(&app, &env.sub(), "rg1", "shared").await,
        403,
        ErrorCode::Forbidden,
        Some("AuthorizationFailed"),
    );
    p.get_key(&env.admin, "shared", "cmk", None).unwrap();

    // A principal of another tenant gets a token from its own tenant but is a stranger to the
    // vault: 401, even if an access policy names it.
    // Its credentials are not valid in the vault's tenant.
    assert_token_err(
        p.client_credentials(
            &env.tenant(),
            &token_form(
                &stranger_rec.client_id,
                "stranger-secret",
                "https://localhost:8443/.default",
            ),
        )
        .await,
        400,
        "invalid_request",
        90002,
    );
    let stranger = sign_in(p, &other_tenant, &stranger_rec.client_id, "stranger-secret").await;
    assert_eq!(stranger.tenant_id, other_tenant);
    p.put_vault(
        &env.admin,
        &env.sub(),
        "rg1",
        "shared",
        vault_input(json!({"properties": {"accessPolicies": [{
            "tenantId": other_tenant,
            "objectId": stranger_rec.object_id,
            "permissions": {"keys": ["all"]},
        }]}})),
        false,
    )
    .await
    .unwrap();
    let e = assert_err(
        p.get_key(&stranger, "shared", "cmk", None),
        401,
        ErrorCode::Unauthorized,
        None,
    );
    assert!(e.message.starts_with("AKV10032"), "{}", e.message);
    assert_err(
        op_as(
            p,
            &stranger,
            "shared",
            "cmk",
            None,
            "unwrapkey",
            &admin_wrapped,
        ),
        401,
        ErrorCode::Unauthorized,
        None,
    );
    assert_err(
        p.get_vault(&stranger, &env.sub(), "rg1", "shared").await,
        403,
        ErrorCode::Forbidden,
        Some("AuthorizationFailed"),
    );
    // Replacing the policies removed the first app's grant.
    denied(p.get_key(&app, "shared", "cmk", None));

    // RBAC vaults refuse everyone but the administrator until role assignments exist.
    p.put_vault(
        &env.admin,
        &env.sub(),
        "rg1",
        "shared",
        vault_input(json!({"properties": {
            "enableRbacAuthorization": true,
            "accessPolicies": [{
                "tenantId": env.tenant(),
                "objectId": app_rec.object_id,
                "permissions": {"keys": ["all"]},
            }],
        }})),
        false,
    )
    .await
    .unwrap();
    assert_err(
        p.get_key(&app, "shared", "cmk", None),
        403,
        ErrorCode::Forbidden,
        Some("ForbiddenByRbac"),
    );
    p.get_key(&env.admin, "shared", "cmk", None).unwrap();
}

#[tokio::test]
async fn backup_purge_restore_into_another_vault() {
    let env = Env::new().await;
    let p = &env.p;
    env.vault("source", json!({"softDeleteRetentionInDays": 7}))
        .await;
    env.vault("target", json!({})).await;
    let k1 = env.create("source", "cmk", rsa()).await.unwrap();
    let v1 = version_of(&k1);
    let wrapped1 = env
        .op("source", "cmk", None, "wrapkey", b"dek one")
        .unwrap();
    env.clock.advance(1);
    let k2 = p.rotate_key(&env.admin, "source", "cmk").await.unwrap();
    let v2 = version_of(&k2);
    let wrapped2 = env
        .op("source", "cmk", None, "wrapkey", b"dek two")
        .unwrap();

    let blob = p.backup_key(&env.admin, "source", "cmk").unwrap();
    assert!(blob.value.starts_with(b"KAGI-KEY-BACKUP\x01"));
    assert!(
        !blob
            .value
            .windows(b"\"versions\"".len())
            .any(|w| w == b"\"versions\""),
        "the backup payload is sealed, not plain JSON"
    );
    let copy = |b: &BackupBlob| BackupBlob {
        value: b.value.clone(),
    };

    // While the key exists in the source, restoring it there is a conflict; after a soft
    // delete, the name is still taken.
    assert_err(
        p.restore_key(&env.admin, "source", copy(&blob)).await,
        409,
        ErrorCode::Conflict,
        None,
    );
    p.delete_key(&env.admin, "source", "cmk").await.unwrap();
    assert_err(
        p.restore_key(&env.admin, "source", copy(&blob)).await,
        409,
        ErrorCode::Conflict,
        Some("ObjectIsDeletedButRecoverable"),
    );
    p.purge_deleted_key(&env.admin, "source", "cmk")
        .await
        .unwrap();

    // Damaged blobs: one byte flipped anywhere (magic, nonce, ciphertext, tag) → 400.
    for i in [0, 16, 17, 40, blob.value.len() / 2, blob.value.len() - 1] {
        let mut bad = blob.value.clone();
        bad[i] ^= 0x01;
        assert_err(
            p.restore_key(&env.admin, "target", BackupBlob { value: bad })
                .await,
            400,
            ErrorCode::BadParameter,
            Some("InvalidBackupBlob"),
        );
    }
    assert_err(
        p.restore_key(&env.admin, "target", BackupBlob { value: Vec::new() })
            .await,
        400,
        ErrorCode::BadParameter,
        Some("InvalidBackupBlob"),
    );
    assert_err(env.get("target", "cmk"), 404, ErrorCode::KeyNotFound, None);

    // Restore into another vault: every version, under the target's URIs.
    let restored = p
        .restore_key(&env.admin, "target", copy(&blob))
        .await
        .unwrap();
    assert_eq!(
        restored["key"]["kid"],
        format!("https://target.localhost:8443/keys/cmk/{v2}")
    );
    assert_eq!(restored["key"]["n"], k2["key"]["n"]);
    let q = ListQuery {
        api_version: API.into(),
        ..Default::default()
    };
    let versions = p
        .list_key_versions(&env.admin, "target", "cmk", &q)
        .unwrap();
    let mut kids: Vec<&str> = versions["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["kid"].as_str().unwrap())
        .collect();
    kids.sort_unstable();
    let mut want = vec![
        format!("https://target.localhost:8443/keys/cmk/{v1}"),
        format!("https://target.localhost:8443/keys/cmk/{v2}"),
    ];
    want.sort_unstable();
    assert_eq!(kids, want);
    // The current version is still the rotated one.
    assert_eq!(version_of(&env.get("target", "cmk").unwrap()), v2);
    // Data wrapped before the backup opens in the target.
    assert_eq!(
        env.op("target", "cmk", Some(&v1), "unwrapkey", &wrapped1)
            .unwrap(),
        b"dek one"
    );
    assert_eq!(
        env.op("target", "cmk", None, "unwrapkey", &wrapped2)
            .unwrap(),
        b"dek two"
    );
    // Restoring over an existing name is a conflict, and changes nothing.
    assert_err(
        p.restore_key(&env.admin, "target", copy(&blob)).await,
        409,
        ErrorCode::Conflict,
        None,
    );
    assert_eq!(version_of(&env.get("target", "cmk").unwrap()), v2);

    // The source's name is free again (it was purged) and the backup restores there too.
    p.restore_key(&env.admin, "source", copy(&blob))
        .await
        .unwrap();
    assert_eq!(
        env.op("source", "cmk", None, "unwrapkey", &wrapped2)
            .unwrap(),
        b"dek two"
    );
}

#[tokio::test]
async fn backups_open_only_under_the_same_root_key() {
    let env = Env::new().await;
    env.vault("one", json!({})).await;
    env.create("one", "k", ec()).await.unwrap();
    let blob = env.p.backup_key(&env.admin, "one", "k").unwrap();

    // Another kagi, another root key.
    let other = Env::new_with_root(&OTHER_ROOT).await;
    other.vault("two", json!({})).await;
    assert_err(
        other.p.restore_key(&other.admin, "two", blob).await,
        400,
        ErrorCode::BadParameter,
        Some("InvalidBackupBlob"),
    );
}

impl Env {
    async fn new_with_root(root: &[u8; 32]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let (p, created) = open(dir.path(), &clock, root).await.unwrap();
        let admin_creds = created.unwrap();
        let admin = sign_in(
            &p,
            &admin_creds.tenant_id,
            &admin_creds.client_id,
            &admin_creds.client_secret,
        )
        .await;
        Self {
            dir,
            clock,
            p,
            admin_creds,
            admin,
        }
    }
}

#[tokio::test]
async fn lists_page_by_25_with_a_skip_token() {
    let env = Env::new().await;
    let p = &env.p;
    env.vault("paged", json!({})).await;
    let mut names: Vec<String> = (0..30).map(|i| format!("key-{i:02}")).collect();
    for n in &names {
        env.create("paged", n, ec()).await.unwrap();
    }
    names.sort();
    let kid = |n: &str| format!("https://paged.localhost:8443/keys/{n}");

    let first = p
        .list_keys(
            &env.admin,
            "paged",
            &ListQuery {
                api_version: API.into(),
                ..Default::default()
            },
        )
        .unwrap();
    let page1: Vec<&str> = first["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["kid"].as_str().unwrap())
        .collect();
    assert_eq!(page1.len(), 25);
    let next = first["nextLink"].as_str().unwrap();
    let prefix = format!("https://paged.localhost:8443/keys?api-version={API}&$skiptoken=");
    assert!(next.starts_with(&prefix), "{next}");
    assert!(next.ends_with("&maxresults=25"), "{next}");
    let token = next
        .strip_prefix(&prefix)
        .unwrap()
        .strip_suffix("&maxresults=25")
        .unwrap();

    let second = p
        .list_keys(
            &env.admin,
            "paged",
            &ListQuery {
                api_version: API.into(),
                skiptoken: Some(token.to_string()),
                maxresults: Some("25".into()),
            },
        )
        .unwrap();
    let page2: Vec<&str> = second["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["kid"].as_str().unwrap())
        .collect();
    assert_eq!(page2.len(), 5);
    assert_eq!(second["nextLink"], Value::Null);
    let all: Vec<String> = page1.iter().chain(&page2).map(|s| s.to_string()).collect();
    assert_eq!(
        all,
        names.iter().map(|n| kid(n)).collect::<Vec<_>>(),
        "every key exactly once, in name order"
    );
    // Items carry versionless kids and attributes.
    assert_eq!(first["value"][0]["attributes"]["enabled"], true);

    // A smaller page size.
    let small = p
        .list_keys(
            &env.admin,
            "paged",
            &ListQuery {
                api_version: API.into(),
                maxresults: Some("10".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(small["value"].as_array().unwrap().len(), 10);
    assert!(
        small["nextLink"]
            .as_str()
            .unwrap()
            .ends_with("&maxresults=10")
    );

    for bad in ["0", "26", "-1", "ten"] {
        assert_err(
            p.list_keys(
                &env.admin,
                "paged",
                &ListQuery {
                    api_version: API.into(),
                    maxresults: Some(bad.into()),
                    ..Default::default()
                },
            ),
            400,
            ErrorCode::BadParameter,
            None,
        );
    }
    assert_err(
        p.list_keys(
            &env.admin,
            "paged",
            &ListQuery {
                api_version: API.into(),
                skiptoken: Some("not a token".into()),
                ..Default::default()
            },
        ),
        400,
        ErrorCode::BadParameter,
        None,
    );
}

#[tokio::test]
async fn token_requests_are_refused_as_entra_refuses_them() {
    let env = Env::new().await;
    let p = &env.p;
    let (tenant, id, secret) = (
        env.tenant(),
        env.admin_creds.client_id.clone(),
        env.admin_creds.client_secret.clone(),
    );
    let scope = "https://localhost:8443/.default";

    // Another resource's scope: kagi issues tokens only for itself.
    for other in [
        "https://vault.azure.net/.default",
        "https://management.azure.com/.default",
        "https://localhost:9999/.default",
        "https://localhost:8443",
        "",
    ] {
        assert_token_err(
            p.client_credentials(&tenant, &token_form(&id, &secret, other))
                .await,
            400,
            "invalid_scope",
            500011,
        );
    }
    // A trailing slash on the resource is accepted (the SDKs send both forms).
    let t = p
        .client_credentials(
            &tenant,
            &token_form(&id, &secret, "https://localhost:8443//.default"),
        )
        .await
        .unwrap();
    p.authenticate(&t.access_token).unwrap();

    assert_token_err(
        p.client_credentials(&tenant, &token_form(&id, "wrong-secret", scope))
            .await,
        401,
        "invalid_client",
        7000215,
    );
    assert_token_err(
        p.client_credentials(&tenant, &token_form(&id, "", scope))
            .await,
        401,
        "invalid_client",
        7000215,
    );
    assert_token_err(
        p.client_credentials(&tenant, &token_form(&uuid(), &secret, scope))
            .await,
        400,
        "unauthorized_client",
        700016,
    );
    assert_token_err(
        p.client_credentials(&uuid(), &token_form(&id, &secret, scope))
            .await,
        400,
        "invalid_request",
        90002,
    );
    // The password grant is for users: a service principal's id and secret are refused.
    let mut form = token_form(&id, &secret, scope);
    form.insert("grant_type".into(), "password".into());
    assert_token_err(
        p.client_credentials(&tenant, &form).await,
        400,
        "invalid_grant",
        50126,
    );
    let mut form = token_form(&id, &secret, scope);
    form.insert("grant_type".into(), "authorization_code".into());
    assert_token_err(
        p.client_credentials(&tenant, &form).await,
        400,
        "unsupported_grant_type",
        70003,
    );

    // The tenant in the path is compared case-insensitively.
    let good = token(p, &tenant.to_ascii_uppercase(), &id, &secret).await;
    let who = p.authenticate(&good).unwrap();
    assert_eq!(who, env.admin);

    // Tokens that are not kagi's, or tampered with, are 401.
    for bad in ["", "garbage", "a.b.c", format!("{good}x").as_str()] {
        assert_err(p.authenticate(bad), 401, ErrorCode::Unauthorized, None);
    }
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    let claims: Value = serde_json::from_slice(&b64::decode(&parts[1]).unwrap()).unwrap();
    assert_eq!(claims["aud"], "https://localhost:8443");
    assert_eq!(
        claims["iss"],
        format!("https://localhost:8443/{tenant}/v2.0")
    );
    let mut forged = claims.clone();
    forged["aud"] = json!("https://vault.azure.net");
    parts[1] = b64::encode(&serde_json::to_vec(&forged).unwrap());
    let e = assert_err(
        p.authenticate(&parts.join(".")),
        401,
        ErrorCode::Unauthorized,
        None,
    );
    assert!(e.message.starts_with("AKV10000"), "{}", e.message);

    // Expiry follows the platform clock, with 60 s of skew allowed.
    let exp = claims["exp"].as_i64().unwrap();
    assert_eq!(exp, T0 + 3600);
    env.clock.set(exp + 59);
    p.authenticate(&good).unwrap();
    env.clock.set(exp + 60);
    let e = assert_err(p.authenticate(&good), 401, ErrorCode::Unauthorized, None);
    assert!(e.message.contains("expired"), "{}", e.message);
}

/// A legacy `policy/assignments.json` that does not parse is reported and left in place; policy
/// keeps working (and so does every backup vault write, which evaluates Deny assignments).
#[tokio::test]
async fn an_unreadable_legacy_policy_file_does_not_stop_policy() {
    let env = Env::new().await;
    let legacy = env.dir.path().join("policy").join("assignments.json");
    std::fs::create_dir_all(legacy.parent().unwrap()).unwrap();
    std::fs::write(&legacy, b"{not json").unwrap();
    let scope = format!("/subscriptions/{}", env.sub());
    for _ in 0..2 {
        let listed = env
            .p
            .list_policy_assignments(&env.admin, &scope)
            .await
            .expect("listing works despite the unreadable legacy file");
        assert_eq!(listed["value"], serde_json::json!([]));
    }
    assert_eq!(std::fs::read(&legacy).unwrap(), b"{not json");
}

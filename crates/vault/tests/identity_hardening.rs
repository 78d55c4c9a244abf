//! Identity hardening (issue 11, items 9, 12 and 14, and the follow-up review) at the service
//! boundary, on a clock the tests move by hand: the password grant hashes for unknown users
//! too, guessing spread over names and sources is bounded by the server's budget, legacy
//! workload bindings keep working until their grace ends, and a rotated signing key validates
//! across a restart until its tokens have expired. (End-to-end tests:
//! tests/conformance/test_hardening_identity.py.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use kagi_core::time::Clock;
use kagi_crypto::AesRootKey;
use kagi_store::directory::BindingRecord;
use kagi_store::{SqlStore, Store};
use kagi_vault::{BootstrapAdmin, Platform, PlatformConfig, Principal, ResourceGroupInput};
use serde_json::{Value, json};

const T0: i64 = 1_767_225_600;
const SCOPE: &str = "https://localhost:8443/.default";
const PASSWORD: &str = "correct horse battery staple";

#[derive(Debug)]
struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

struct Env {
    dir: tempfile::TempDir,
    clock: Arc<TestClock>,
    store: Arc<dyn Store>,
    p: Platform,
    creds: BootstrapAdmin,
    admin: Principal,
}

async fn open(
    dir: &Path,
    clock: &Arc<TestClock>,
) -> (Arc<dyn Store>, Platform, Option<BootstrapAdmin>) {
    let store: Arc<dyn Store> =
        Arc::new(SqlStore::open_sqlite(&dir.join("kagi.db")).await.unwrap());
    let (p, created) = Platform::open_with(
        PlatformConfig {
            data_dir: dir.to_path_buf(),
            dns_suffix: "localhost".into(),
            port: 8443,
        },
        clock.clone(),
        Arc::new(AesRootKey::from_bytes(&[0x42; 32])),
        store.clone(),
    )
    .await
    .unwrap();
    (store, p, created)
}

fn form(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Env {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(T0)));
        let (store, p, created) = open(dir.path(), &clock).await;
        let creds = created.unwrap();
        let admin = admin_token(&p, &creds).await;
        let admin = p.authenticate(&admin).unwrap();
        Self {
            dir,
            clock,
            store,
            p,
            creds,
            admin,
        }
    }

    /// Stops the platform and starts it again on the same directory.
    async fn restart(&mut self) {
        let (store, p, _) = open(self.dir.path(), &self.clock).await;
        self.store = store;
        self.p = p;
    }

    async fn password(
        &self,
        tenant: &str,
        user: &str,
        password: &str,
    ) -> Result<Value, (u16, u32)> {
        grant(
            &self.p,
            tenant,
            &[
                ("grant_type", "password"),
                ("username", user),
                ("password", password),
            ],
        )
        .await
        .map(|g| json!({"access_token": g.access_token}))
        .map_err(|e| (e.status, e.error_codes[0]))
    }

    async fn workload(&self, name: &str, identity: Value) -> Value {
        let sub = self.creds.subscription_id.clone();
        self.p
            .put_resource_group(
                &self.admin,
                &sub,
                "rg1",
                ResourceGroupInput {
                    location: "westeurope".into(),
                    tags: None,
                },
            )
            .await
            .unwrap();
        self.p
            .put_identity_resource(
                &self.admin,
                &sub,
                "rg1",
                "Kagi.Compute/workloads",
                name,
                json!({"location": "westeurope", "identity": identity}),
            )
            .await
            .unwrap()
            .1
    }
}

/// A token request with `pairs` and kagi's scope.
async fn grant(
    p: &Platform,
    tenant: &str,
    pairs: &[(&str, &str)],
) -> Result<kagi_vault::TokenGrant, kagi_vault::TokenRequestError> {
    let mut form = form(pairs);
    form.insert("scope".into(), SCOPE.into());
    p.client_credentials(tenant, &form).await
}

async fn admin_token(p: &Platform, creds: &BootstrapAdmin) -> String {
    let secret = [
        ("grant_type", "client_credentials"),
        ("client_id", creds.client_id.as_str()),
        ("client_secret", creds.client_secret.as_str()),
    ];
    grant(p, &creds.tenant_id, &secret)
        .await
        .unwrap()
        .access_token
}

#[tokio::test]
async fn every_password_check_costs_one_hash_whether_the_user_exists_or_not() {
    let env = Env::new().await;
    let upn = "alice@contoso.example";
    env.p
        .create_user(&env.admin, upn, "", PASSWORD)
        .await
        .unwrap();
    let tenant = env.creds.tenant_id.clone();
    let refused = Err((400, 50126));
    let mut hashes = env.p.password_hashes_computed();
    let mut expect_one_more = |p: &Platform| {
        hashes += 1;
        assert_eq!(p.password_hashes_computed(), hashes);
    };
    assert!(env.password(&tenant, upn, PASSWORD).await.is_ok());
    expect_one_more(&env.p);
    assert_eq!(env.password(&tenant, upn, "wrong password").await, refused);
    expect_one_more(&env.p);
    // A name that does not exist: the same answer, after the same work.
    assert_eq!(
        env.password(&tenant, "nobody@contoso.example", "wrong password")
            .await,
        refused
    );
    expect_one_more(&env.p);
    // A user of another tenant is answered like a name that does not exist.
    let elsewhere = "3e7b5c1d-9f0a-4b2c-8d6e-1a2b3c4d5e6f";
    assert_eq!(env.password(elsewhere, upn, PASSWORD).await, refused);
    expect_one_more(&env.p);
    // Once a name is locked, attempts cost nothing.
    for _ in 0..5 {
        assert_eq!(
            env.password(&tenant, "bob@contoso.example", "x").await,
            refused
        );
    }
    let before = env.p.password_hashes_computed();
    assert_eq!(
        env.password(&tenant, "bob@contoso.example", "x").await,
        Err((429, 50053))
    );
    assert_eq!(env.p.password_hashes_computed(), before);
}

#[tokio::test]
async fn a_rotated_signing_key_validates_across_a_restart_until_its_tokens_expire() {
    let mut env = Env::new().await;
    let old = admin_token(&env.p, &env.creds).await;
    let kids = |p: &Platform| -> Vec<String> {
        p.jwks()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect()
    };
    let first = kids(&env.p);
    assert_eq!(first.len(), 1);

    // Not for anyone but the administrator.
    let stranger = Principal {
        object_id: "11111111-2222-4333-8444-555555555555".into(),
        ..env.admin.clone()
    };
    assert_eq!(
        env.p
            .rotate_signing_key(&stranger, false)
            .await
            .unwrap_err()
            .status(),
        403
    );

    let listed = env.p.rotate_signing_key(&env.admin, false).await.unwrap();
    assert_eq!(listed["value"][1]["kid"], first[0].as_str());
    let second = kids(&env.p);
    assert_eq!(second.len(), 2);
    assert_eq!(second[1], first[0]);
    env.p.authenticate(&old).unwrap();

    env.restart().await;
    assert_eq!(kids(&env.p), second);
    env.p.authenticate(&old).unwrap();

    // The old key's last token expires after an hour (and a minute of leeway).
    env.clock.0.fetch_add(3600 + 61, Ordering::SeqCst);
    env.restart().await;
    assert_eq!(kids(&env.p), vec![second[0].clone()]);
    assert!(env.p.authenticate(&old).is_err());
    let fresh = admin_token(&env.p, &env.creds).await;
    let admin = env.p.authenticate(&fresh).unwrap();

    // Revoking the previous key: its tokens fail at once, and after a restart too.
    env.p.rotate_signing_key(&admin, true).await.unwrap();
    assert!(env.p.authenticate(&fresh).is_err());
    env.restart().await;
    assert!(env.p.authenticate(&fresh).is_err());
    assert_eq!(kids(&env.p).len(), 1);
}

#[tokio::test]
async fn legacy_bindings_serve_any_identity_of_their_resource_until_they_expire() {
    let env = Env::new().await;
    let sub = env.creds.subscription_id.clone();
    env.workload("setup", json!({"type": "None"})).await;
    let (_, uami) = env
        .p
        .put_identity_resource(
            &env.admin,
            &sub,
            "rg1",
            "Microsoft.ManagedIdentity/userAssignedIdentities",
            "u1",
            json!({"location": "westeurope"}),
        )
        .await
        .unwrap();
    let uami_id = uami["id"].as_str().unwrap();
    let wl = env
        .workload(
            "w1",
            json!({"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {uami_id: {}}}),
        )
        .await;
    let wl_id = wl["id"].as_str().unwrap();
    // A binding as the store migration leaves one made before bindings named an identity.
    env.store
        .put_binding(
            &BindingRecord {
                id: "legacy-1".into(),
                secret_hash: kagi_identity::hash_secret("legacy secret"),
                resource_id: wl_id.to_ascii_lowercase(),
                client_id: None,
                created: T0 - 100,
                expires: T0 + 30 * 86400,
            },
            T0,
        )
        .await
        .unwrap();
    let oid_of =
        |grant: kagi_vault::TokenGrant| env.p.authenticate(&grant.access_token).unwrap().object_id;
    let resource = "https://localhost:8443";
    let system = env
        .p
        .managed_identity_token("legacy secret", resource, None)
        .await
        .unwrap();
    assert_eq!(
        oid_of(system),
        wl["identity"]["principalId"].as_str().unwrap()
    );
    let user = env
        .p
        .managed_identity_token(
            "legacy secret",
            resource,
            Some((
                "client_id",
                uami["properties"]["clientId"].as_str().unwrap(),
            )),
        )
        .await
        .unwrap();
    assert_eq!(
        oid_of(user),
        uami["properties"]["principalId"].as_str().unwrap()
    );
    let listed = env.p.list_bindings(&env.admin, wl_id).await.unwrap();
    assert_eq!(listed["value"][0]["id"], "legacy-1");
    assert_eq!(listed["value"][0]["clientId"], Value::Null);
    assert_eq!(listed["value"][0]["status"], "Active");

    env.clock.0.fetch_add(30 * 86400, Ordering::SeqCst);
    let e = env
        .p
        .managed_identity_token("legacy secret", resource, None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), 401);
}

/// Failed passwords the whole server hashes at once before it throttles (its budget's burst,
/// `GLOBAL_FAILURES` in crates/vault/src/token_guards.rs), and how many leak free per second.
const SERVER_FAILURE_BURST: usize = 50;
const SERVER_FAILURES_PER_SECOND: usize = 5;

#[tokio::test]
async fn guessing_spread_over_names_and_sources_is_bounded_by_the_servers_budget() {
    let env = Env::new().await;
    let tenant = env.creds.tenant_id.clone();
    // Every guess from a /64 of its own inside one /48, at a name of its own: no name or source
    // budget ever fills (and older sources would be pushed out of a full table).
    let mut sources = (0u16..).map(|i| format!("2001:db8:1:{i:x}::1").parse().unwrap());
    let mut guess = || {
        let form = form(&[
            ("grant_type", "password"),
            ("username", &format!("n{}@contoso.example", uuid_like())),
            ("password", "a wrong password!"),
            ("scope", SCOPE),
        ]);
        let source = sources.next();
        let p = &env.p;
        let tenant = tenant.clone();
        async move {
            p.token_request(&tenant, &form, source)
                .await
                .map(|_| 200)
                .unwrap_or_else(|e| e.status)
        }
    };
    for _ in 0..SERVER_FAILURE_BURST {
        assert_eq!(guess().await, 400);
    }
    let hashes = env.p.password_hashes_computed();
    assert_eq!(guess().await, 429);
    assert_eq!(
        env.p.password_hashes_computed(),
        hashes,
        "refused before hashing"
    );
    // A second later, that second's share leaks free, and no more.
    env.clock.0.fetch_add(1, Ordering::SeqCst);
    for _ in 0..SERVER_FAILURES_PER_SECOND {
        assert_eq!(guess().await, 400);
    }
    assert_eq!(guess().await, 429);
}

/// A name no test has used.
fn uuid_like() -> String {
    static NEXT: AtomicI64 = AtomicI64::new(0);
    format!("{:08x}", NEXT.fetch_add(1, Ordering::SeqCst))
}

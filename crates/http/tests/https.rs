//! The real HTTPS server, in-process: a platform on a temporary data directory, the local CA,
//! per-SNI certificates, and clients that trust nothing but kagi's CA and resolve every
//! `*.localhost` name to the server's loopback address themselves (no DNS involved).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ops::Deref;
use std::sync::Arc;

use kagi_core::b64;
use kagi_testkit::{Options, TestServer};
use reqwest::StatusCode;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};

const API: &str = "api-version=7.5";
const ARM_API: &str = "api-version=2023-07-01";

/// The shared harness, with this file's requests.
struct Server(TestServer);

impl Deref for Server {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.0
    }
}

/// A server without the backup service; nobody logged in.
async fn start() -> Server {
    let s = TestServer::start(Options {
        backup_service: None,
        login: false,
        ..Options::default()
    })
    .await;
    assert_eq!(s.admin.authority, format!("https://localhost:{}", s.port));
    assert_eq!(
        std::fs::read_to_string(s.dir().join("tls/ca.pem")).unwrap(),
        s.ca_pem
    );
    Server(s)
}

impl Server {
    fn challenge(&self) -> String {
        format!(
            "Bearer authorization=\"{a}/{t}\", resource=\"{a}\"",
            a = self.authority(),
            t = self.admin.tenant_id
        )
    }

    async fn token(&self, c: &reqwest::Client) -> String {
        let body = self.token_response(c, &self.admin.tenant_id).await;
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3599);
        body["access_token"].as_str().unwrap().to_string()
    }

    /// Creates resource group `rg1` and vault `myvault` through the management API.
    async fn create_vault(&self, c: &reqwest::Client, token: &str) {
        let sub = &self.admin.subscription_id;
        let r = c
            .put(self.mgmt_url(&format!(
                "/subscriptions/{sub}/resourcegroups/rg1?{ARM_API}"
            )))
            .bearer_auth(token)
            .json(&json!({"location": "westeurope"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let r = c
            .put(self.mgmt_url(&format!(
                "/subscriptions/{sub}/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/myvault?{ARM_API}"
            )))
            .bearer_auth(token)
            .json(&json!({
                "location": "westeurope",
                "properties": {
                    "tenantId": self.admin.tenant_id,
                    "sku": {"family": "A", "name": "standard"},
                    "softDeleteRetentionInDays": 7,
                },
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["properties"]["vaultUri"],
            format!("https://myvault.localhost:{}/", self.port)
        );
        assert_eq!(
            v["id"],
            format!(
                "/subscriptions/{sub}/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/myvault"
            )
        );
    }
}

/// Reads an Azure error body and checks its status, code and inner code exactly.
async fn assert_error(
    r: reqwest::Response,
    status: StatusCode,
    code: &str,
    inner: Option<&str>,
) -> Value {
    assert_eq!(r.status(), status);
    assert!(
        r.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    match inner {
        Some(i) => assert_eq!(body["error"]["innererror"]["code"], i, "{body}"),
        None => assert!(body["error"].get("innererror").is_none(), "{body}"),
    }
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    body
}

#[tokio::test]
async fn health_challenge_and_token_endpoint() {
    let s = start().await;
    let c = s.client();

    let r = c.get(s.mgmt_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "ok"}));

    // The SDK's first request carries no token (and maybe a body kagi must not look at).
    for body in ["this is not json {", ""] {
        let r = c
            .post(s.vault_url("myvault", &format!("/keys/cmk/create?{API}")))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()[reqwest::header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap(),
            s.challenge()
        );
        assert_error(r, StatusCode::UNAUTHORIZED, "Unauthorized", None).await;
    }
    // No api-version either: the challenge still comes first.
    let r = c.get(s.vault_url("myvault", "/keys")).send().await.unwrap();
    assert_eq!(
        r.headers()[reqwest::header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap(),
        s.challenge()
    );
    assert_error(r, StatusCode::UNAUTHORIZED, "Unauthorized", None).await;
    // A bad token gets the same challenge.
    let r = c
        .get(s.vault_url("myvault", &format!("/keys?{API}")))
        .bearer_auth("not.a.token")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()[reqwest::header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap(),
        s.challenge()
    );
    assert_error(r, StatusCode::UNAUTHORIZED, "Unauthorized", None).await;

    // The token endpoint: a form POST, answered as Entra answers.
    let token = s.token(c).await;
    assert_eq!(token.split('.').count(), 3);
    let r = c
        .post(s.mgmt_url(&format!("/{}/oauth2/v2.0/token", s.admin.tenant_id)))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", s.admin.client_id.as_str()),
            ("client_secret", "wrong"),
            ("scope", &format!("{}/.default", s.authority())),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"], "invalid_client");
    assert_eq!(e["error_codes"], json!([7000215]));
    let r = c
        .post(s.mgmt_url(&format!("/{}/oauth2/v2.0/token", s.admin.tenant_id)))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", s.admin.client_id.as_str()),
            ("client_secret", s.admin.client_secret.as_str()),
            ("scope", "https://vault.azure.net/.default"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_scope");

    // The management API without a token: 401 with ARM's challenge.
    let r = c
        .get(s.mgmt_url(&format!(
            "/subscriptions/{}/resourcegroups/rg1?{ARM_API}",
            s.admin.subscription_id
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()[reqwest::header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap(),
        format!(
            "Bearer authorization_uri=\"{}/{}\", error=\"invalid_token\"",
            s.authority(),
            s.admin.tenant_id
        )
    );
    assert_error(
        r,
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        Some("AuthenticationFailed"),
    )
    .await;
}

#[tokio::test]
async fn vault_key_and_wrap_unwrap_over_https() {
    let s = start().await;
    let c = s.client();
    let token = s.token(c).await;
    s.create_vault(c, &token).await;

    let r = c
        .post(s.vault_url("myvault", &format!("/keys/cmk/create?{API}")))
        .bearer_auth(&token)
        .json(&json!({"kty": "RSA", "key_size": 2048}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let key: Value = r.json().await.unwrap();
    let kid = key["key"]["kid"].as_str().unwrap().to_string();
    assert!(
        kid.starts_with(&format!("https://myvault.localhost:{}/keys/cmk/", s.port)),
        "{kid}"
    );

    let dek = b"a 32-byte data encryption key!!!";
    let r = c
        .post(s.vault_url("myvault", &format!("/keys/cmk/wrapkey?{API}")))
        .bearer_auth(&token)
        .json(&json!({"alg": "RSA-OAEP-256", "value": b64::encode(dek)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let wrapped: Value = r.json().await.unwrap();
    assert_eq!(wrapped["kid"], kid);
    let wrapped = wrapped["value"].as_str().unwrap().to_string();
    assert_eq!(b64::decode(&wrapped).unwrap().len(), 256);

    // Unwrap through the versioned URL (the kid is what SDKs call).
    let version = kid.rsplit('/').next().unwrap();
    let r = c
        .post(s.vault_url("myvault", &format!("/keys/cmk/{version}/unwrapkey?{API}")))
        .bearer_auth(&token)
        .json(&json!({"alg": "RSA-OAEP-256", "value": wrapped}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let plain: Value = r.json().await.unwrap();
    assert_eq!(b64::decode(plain["value"].as_str().unwrap()).unwrap(), dek);

    let r = c
        .get(s.vault_url("myvault", &format!("/keys/cmk?{API}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["key"]["kid"], kid);

    // Once the vault exists the challenge names its tenant (the same one here).
    let r = c
        .get(s.vault_url("myvault", &format!("/keys?{API}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers()[reqwest::header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap(),
        s.challenge()
    );
}

#[tokio::test]
async fn oversized_malformed_and_misdirected_requests() {
    let s = start().await;
    let c = s.client();
    let token = s.token(c).await;
    s.create_vault(c, &token).await;
    let r = c
        .post(s.vault_url("myvault", &format!("/keys/cmk/create?{API}")))
        .bearer_auth(&token)
        .json(&json!({"kty": "EC", "crv": "P-256"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let sign_url = s.vault_url("myvault", &format!("/keys/cmk/sign?{API}"));

    // 2 MiB: refused with 413 in Azure's shape (the client sees it, not a reset).
    let big = vec![b'a'; 2 * 1024 * 1024];
    let r = c
        .post(&sign_url)
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let e = assert_error(
        r,
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        None,
    )
    .await;
    assert_eq!(
        e["error"]["message"],
        "The request body is larger than 1048576 bytes."
    );
    // The same on the token endpoint and the management API.
    let r = c
        .post(s.mgmt_url(&format!("/{}/oauth2/v2.0/token", s.admin.tenant_id)))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        None,
    )
    .await;
    let r = c
        .put(s.mgmt_url(&format!(
            "/subscriptions/{}/resourcegroups/rg2?{ARM_API}",
            s.admin.subscription_id
        )))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        None,
    )
    .await;
    // The limit is exact: 1 MiB is read (and is not JSON: 400), 1 MiB + 1 is not.
    for (len, status, code) in [
        (kagi_http::MAX_BODY, StatusCode::BAD_REQUEST, "BadParameter"),
        (
            kagi_http::MAX_BODY + 1,
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
        ),
    ] {
        let r = c
            .post(&sign_url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(vec![b' '; len])
            .send()
            .await
            .unwrap();
        assert_error(r, status, code, None).await;
    }

    // Malformed JSON: 400 BadParameter.
    for body in ["{\"kty\": ", "[]", "{\"alg\": \"ES256\", \"value\": 7}", ""] {
        let r = c
            .post(&sign_url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_error(r, StatusCode::BAD_REQUEST, "BadParameter", None).await;
    }
    let r = c
        .put(s.mgmt_url(&format!(
            "/subscriptions/{}/resourcegroups/rg2?{ARM_API}",
            s.admin.subscription_id
        )))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::BAD_REQUEST, "BadParameter", None).await;

    // api-version is required on the data plane.
    let r = c
        .get(s.vault_url("myvault", "/keys"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        StatusCode::BAD_REQUEST,
        "BadParameter",
        Some("MissingApiVersionParameter"),
    )
    .await;

    // Another vault host gets its own certificate; the vault does not exist.
    let r = c
        .get(s.vault_url("other", &format!("/keys?{API}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "VaultNotFound", None).await;
    let r = c
        .get(s.vault_url("other", &format!("/keys?{API}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers()[reqwest::header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap(),
        s.challenge(),
        "an unknown vault's challenge names the default tenant"
    );

    // A host kagi does not serve: two labels under the suffix. Over a connection to the
    // management host (so TLS succeeds) the Host header routes it: 404 NotFound.
    let r = c
        .get(s.mgmt_url(&format!("/keys?{API}")))
        .header(reqwest::header::HOST, format!("a.b.localhost:{}", s.port))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "NotFound", None).await;
    // With that name as SNI, kagi mints no certificate at all: the handshake fails.
    let r = c
        .get(s.vault_url("a.b", &format!("/keys?{API}")))
        .bearer_auth(&token)
        .send()
        .await;
    let e = r.expect_err("no certificate for a.b.localhost");
    assert!(e.is_connect(), "{e:?}");

    // Unknown paths and methods on the data plane.
    let r = c
        .get(s.vault_url("myvault", &format!("/secrets-nope?{API}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "NotFound", None).await;
    let r = c
        .post(s.vault_url("myvault", &format!("/keys/cmk?{API}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", None).await;
}

/// Connects with rustls to the server with `sni` and returns the certificate chain presented.
async fn presented_chain(s: &Server, sni: ServerName<'static>) -> Vec<CertificateDer<'static>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(s.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(sni, tcp)
        .await
        .unwrap();
    tls.get_ref()
        .1
        .peer_certificates()
        .unwrap()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect()
}

#[tokio::test]
async fn every_host_gets_a_certificate_for_exactly_its_name() {
    let s = start().await;
    let ca = CertificateDer::from_pem_slice(s.ca_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
    let valid_for = |chain: &[CertificateDer<'static>], name: &str| {
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_ok()
    };

    let names = [
        "myvault.localhost",
        "other.localhost",
        "localhost",
        "127.0.0.1",
    ];
    for host in ["myvault.localhost", "other.localhost", "localhost"] {
        let chain = presented_chain(&s, ServerName::try_from(host.to_string()).unwrap()).await;
        // Leaf, then the kagi CA.
        assert_eq!(chain.len(), 2, "{host}");
        assert_eq!(chain[1], ca, "{host}");
        for name in names {
            assert_eq!(
                valid_for(&chain, name),
                name == host,
                "certificate presented for {host}, checked against {name}"
            );
        }
        // Minted once per name: a second connection gets the same certificate.
        let again = presented_chain(&s, ServerName::try_from(host.to_string()).unwrap()).await;
        assert_eq!(again[0], chain[0], "{host}");
    }
    // No SNI (a client connecting to an IP address): localhost and the loopback addresses.
    // Asked after SNI `localhost` on purpose: the two certificates are cached apart (they
    // once shared a cache slot, and IP clients then got a certificate naming only localhost).
    let chain = presented_chain(&s, ServerName::try_from("127.0.0.1").unwrap()).await;
    assert!(valid_for(&chain, "127.0.0.1"));
    assert!(valid_for(&chain, "::1"));
    assert!(valid_for(&chain, "localhost"));
    assert!(!valid_for(&chain, "myvault.localhost"));

    // And over reqwest, which trusts only the kagi CA: both vault hosts work (chain and name
    // verified by the client), each with its own certificate.
    let c = s.client();
    for host in ["myvault", "other"] {
        let r = c.get(s.vault_url(host, "/healthz")).send().await.unwrap();
        // No token: the vault host challenges (the TLS part is what matters here).
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{host}");
    }
    let r = c.get(s.mgmt_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

//! The token endpoint, answered as Microsoft Entra answers it: the client-credentials grant
//! (client secret or RFC 7523 client assertion, each assertion accepted once) and the
//! resource-owner password grant (throttled; see [`crate::token_guards`]); and the rotation of
//! the key that signs the tokens.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;

use kagi_core::KvError;
use kagi_core::access::PUBLIC_CLIENT_APP_ID;
use kagi_core::time::rfc3339;
use kagi_crypto::{Curve, KeyPair, SealPurpose};
use kagi_identity::{LEEWAY, Principal, RetiredKey, TokenIssuer};
use kagi_store::PrincipalRecord;
use kagi_store::directory::{RETIRED_SIGNING_KEYS, SIGNING_KEY};
use serde::Serialize;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::token_guards::{
    MAX_ASSERTION_LIFETIME, Refusal, ReplayRefusal, Throttled, lock, source_key,
};
use crate::{Directory, LoadError, internal};
use kagi_identity::kind;

/// The label under which the token signing key is sealed by the root key.
pub(crate) const SIGNING_KEY_LABEL: &[u8] = b"kagi/v1/token-signing";

/// Lifetime of an access token, in seconds (Entra's default is about an hour).
pub const TOKEN_LIFETIME: i64 = 3600;

/// A successful token response.
#[derive(Debug, Serialize)]
pub struct TokenGrant {
    /// `Bearer`.
    pub token_type: &'static str,
    /// Seconds until expiry.
    pub expires_in: i64,
    /// Same as `expires_in` (Entra sends both).
    pub ext_expires_in: i64,
    /// The JWT.
    pub access_token: String,
}

/// A refused token request, in OAuth's error shape.
#[derive(Debug, Serialize)]
pub struct TokenRequestError {
    /// HTTP status.
    #[serde(skip)]
    pub status: u16,
    /// OAuth error code.
    pub error: &'static str,
    /// Entra-style description with an AADSTS code.
    pub error_description: String,
    /// Numeric codes.
    pub error_codes: Vec<u32>,
    /// Seconds after which to try again (the `Retry-After` header of a 429).
    #[serde(skip)]
    pub retry_after: Option<i64>,
}

/// A client assertion this node accepted: what the store records so that no other node of a
/// shared store accepts it again.
struct AssertionStamp {
    client: String,
    key: Vec<u8>,
    forget_at: i64,
}

fn refuse(status: u16, error: &'static str, code: u32, text: &str) -> TokenRequestError {
    TokenRequestError {
        status,
        error,
        error_description: format!("AADSTS{code}: {text}"),
        error_codes: vec![code],
        retry_after: None,
    }
}

fn unavailable() -> TokenRequestError {
    refuse(
        500,
        "temporarily_unavailable",
        90033,
        "A transient error occurred.",
    )
}

/// 429: too many requests from here, or too many at once.
fn too_many(seconds: i64) -> TokenRequestError {
    TokenRequestError {
        retry_after: Some(seconds.max(1)),
        ..refuse(
            429,
            "temporarily_unavailable",
            90055,
            &format!(
                "There are too many incoming requests. Try again in {} seconds.",
                seconds.max(1)
            ),
        )
    }
}

/// The answer to a password attempt that a throttle refused.
fn throttled(t: Throttled) -> TokenRequestError {
    match t {
        Throttled::User(Refusal::Locked(wait)) => TokenRequestError {
            retry_after: Some(wait),
            ..refuse(
                429,
                "invalid_grant",
                50053,
                &format!(
                    "The account is locked because of too many sign-in attempts with a wrong \
                     user name or password. Try again in {wait} seconds."
                ),
            )
        },
        Throttled::User(Refusal::Busy(wait))
        | Throttled::Source(Refusal::Locked(wait) | Refusal::Busy(wait))
        | Throttled::Server(wait) => too_many(wait),
    }
}

fn form_field<'a>(form: &'a HashMap<String, String>, k: &str) -> &'a str {
    form.get(k).map(String::as_str).unwrap_or("")
}

impl Directory {
    /// Answers `POST /{tenant}/oauth2/v2.0/token` with form fields already parsed, for a
    /// caller whose address is not known (the password grant then has no per-source throttle).
    pub async fn client_credentials(
        &self,
        tenant: &str,
        form: &HashMap<String, String>,
    ) -> Result<TokenGrant, TokenRequestError> {
        self.token_request(tenant, form, None).await
    }

    /// Answers `POST /{tenant}/oauth2/v2.0/token` from the connection address `source`.
    pub async fn token_request(
        &self,
        tenant: &str,
        form: &HashMap<String, String>,
        source: Option<IpAddr>,
    ) -> Result<TokenGrant, TokenRequestError> {
        match form_field(form, "grant_type") {
            "password" => self.password_grant(tenant, form, source).await,
            "client_credentials" => self.client_credentials_grant(tenant, form).await,
            _ => Err(refuse(
                400,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type; kagi supports client_credentials \
                 and password.",
            )),
        }
    }

    async fn client_credentials_grant(
        &self,
        tenant: &str,
        form: &HashMap<String, String>,
    ) -> Result<TokenGrant, TokenRequestError> {
        let audience = self.audience_for_scope(form_field(form, "scope"))?;
        let Some(record) = self.find_client(form_field(form, "client_id")).await? else {
            return Err(refuse(
                400,
                "unauthorized_client",
                700016,
                "Application was not found in the directory.",
            ));
        };
        // The bootstrap administrator administers every tenant kagi knows (after a
        // subscription moved to another tenant it still manages it): it gets a token in any of
        // them, with that tenant as `tid`. Everyone else only in their own.
        let admin_elsewhere = record.kind == kind::BOOTSTRAP
            && kagi_core::TenantId::parse(tenant).is_ok()
            && self.state().tenant_known(tenant);
        if !tenant.eq_ignore_ascii_case(&record.tenant_id) && !admin_elsewhere {
            return Err(refuse(
                400,
                "invalid_request",
                90002,
                "Tenant not found, or the application is not in this tenant.",
            ));
        }
        let token_tenant = if admin_elsewhere {
            tenant.to_ascii_lowercase()
        } else {
            record.tenant_id.clone()
        };
        if record.kind == kind::USER {
            return Err(refuse(
                400,
                "unauthorized_client",
                700016,
                "Users sign in with the password grant, not client credentials.",
            ));
        }
        self.authenticate_client(tenant, &record, form).await?;
        self.issue(
            &Principal {
                tenant_id: token_tenant,
                object_id: record.object_id,
                client_id: record.client_id,
                kind: record.kind,
                network_address: None,
                upn: None,
            },
            &audience,
        )
    }

    /// The principal registered under a client id, if any.
    async fn find_client(
        &self,
        client_id: &str,
    ) -> Result<Option<PrincipalRecord>, TokenRequestError> {
        self.store
            .principal_by_client_id(client_id)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "token request: store failure");
                unavailable()
            })
    }

    /// Checks the credential a client presents: a client assertion when there is one, else
    /// its client secret. An assertion this node accepts is then recorded in the store, which
    /// refuses one that another node of a shared store accepted already.
    async fn authenticate_client(
        &self,
        tenant: &str,
        record: &PrincipalRecord,
        form: &HashMap<String, String>,
    ) -> Result<(), TokenRequestError> {
        if !form_field(form, "client_assertion").is_empty() {
            let stamp = self.check_client_assertion(tenant, record, form)?;
            let fresh = self
                .store
                .remember_assertion(&stamp.client, &stamp.key, stamp.forget_at, self.clock.now())
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "token request: store failure");
                    unavailable()
                })?;
            if !fresh {
                return Err(refuse(
                    401,
                    "invalid_client",
                    700027,
                    "Client assertion failed signature or claims validation: its jti was used \
                     before; a client assertion is accepted once.",
                ));
            }
            return Ok(());
        }
        if record.secret_hash.is_empty()
            || !kagi_identity::secret_matches(
                form_field(form, "client_secret"),
                &record.secret_hash,
            )
        {
            return Err(refuse(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided.",
            ));
        }
        Ok(())
    }

    /// A token for `principal` to `audience`, signed now.
    pub fn issue(
        &self,
        principal: &Principal,
        audience: &str,
    ) -> Result<TokenGrant, TokenRequestError> {
        let id = kagi_crypto::random_array::<16>()
            .ok()
            .ok_or_else(unavailable)?;
        let token = self
            .issuer
            .issue(principal, audience, self.clock.now(), TOKEN_LIFETIME, id)
            .map_err(|_| unavailable())?;
        Ok(TokenGrant {
            token_type: "Bearer",
            expires_in: TOKEN_LIFETIME - 1,
            ext_expires_in: TOKEN_LIFETIME - 1,
            access_token: token,
        })
    }

    /// The resource-owner password grant (`grant_type=password`), for user principals. MSAL
    /// asks `/common/userrealm/{user}` first; kagi answers 404 there, which MSAL takes as
    /// "not federated" and continues with this grant.
    ///
    /// The token names an application only when that application authenticated (its client
    /// secret or assertion): then a "user via application" access policy applies. Without a
    /// client credential the token's `appid` is [`PUBLIC_CLIENT_APP_ID`], which no compound
    /// policy admits; naming a registered application without its credential is refused, as
    /// Entra refuses a confidential client that does not authenticate.
    ///
    /// Every attempt that reaches the password check costs one Argon2id verification, for a
    /// user name that does not exist too (against a dummy hash), so neither the answer nor its
    /// time tells which names exist; names and sources that fail too often are locked out
    /// before any hashing (429), as is everyone while the server's budget of failures is used
    /// up; an attempt counts against these budgets from before it is hashed until it settles;
    /// and verifications at once are bounded.
    async fn password_grant(
        &self,
        tenant: &str,
        form: &HashMap<String, String>,
        source: Option<IpAddr>,
    ) -> Result<TokenGrant, TokenRequestError> {
        let field = |k: &str| form_field(form, k);
        let audience = self.audience_for_scope(field("scope"))?;
        let app = self.password_grant_client(tenant, form).await?;

        let upn = field("username").trim().to_ascii_lowercase();
        // Names longer than any user's are still counted, by a bounded key.
        let user_key: String = upn.chars().take(128).collect();
        let g = &self.guards;
        // The attempt holds its places in the budgets from here until it is settled, so
        // attempts arriving together cannot all pass a check made before any of them failed.
        let attempt = g
            .begin(&*self.clock, user_key, source.map(source_key))
            .map_err(throttled)?;
        let Some(permit) = g.hashing.enter().await else {
            attempt.cancel();
            return Err(too_many(1));
        };

        let record = match self.find_client(&format!("user:{upn}")).await {
            Ok(r) => r,
            Err(e) => {
                attempt.cancel();
                return Err(e);
            }
        };
        let record = record
            .filter(|r| r.kind == kind::USER)
            // A user of another tenant is answered like a name that does not exist.
            .filter(|r| {
                tenant.eq_ignore_ascii_case(&r.tenant_id)
                    || tenant.eq_ignore_ascii_case("organizations")
            });
        let stored = match &record {
            Some(r) => String::from_utf8_lossy(&r.secret_hash).into_owned(),
            None => kagi_crypto::password::dummy_hash(),
        };
        let password = Zeroizing::new(field("password").to_string());
        // Argon2 is deliberately slow: keep it off the async workers. The permit goes with the
        // work, so it is held until the hash is done even if this request is abandoned.
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            kagi_crypto::password::verify_password(&password, &stored)
        })
        .await
        .unwrap_or(false);
        g.hashes_run.fetch_add(1, Ordering::SeqCst);
        let record = record.filter(|_| ok);
        attempt.settle(record.is_some());
        let Some(record) = record else {
            return Err(refuse(
                400,
                "invalid_grant",
                50126,
                "Error validating credentials due to invalid username or password.",
            ));
        };
        let client_id = match app {
            Some(app) if !app.tenant_id.eq_ignore_ascii_case(&record.tenant_id) => {
                return Err(refuse(
                    400,
                    "unauthorized_client",
                    700016,
                    "Application was not found in the directory of the user.",
                ));
            }
            Some(app) => app.client_id,
            None => PUBLIC_CLIENT_APP_ID.to_string(),
        };
        self.issue(
            &Principal {
                tenant_id: record.tenant_id,
                object_id: record.object_id,
                client_id,
                kind: record.kind,
                network_address: None,
                upn: Some(upn),
            },
            &audience,
        )
    }

    /// The application a password grant goes through: a service principal that authenticated
    /// with this request, or `None` (kagi's public client) when no registered application is
    /// named and no client credential is given.
    async fn password_grant_client(
        &self,
        tenant: &str,
        form: &HashMap<String, String>,
    ) -> Result<Option<PrincipalRecord>, TokenRequestError> {
        let client_id = form_field(form, "client_id");
        let credential = !form_field(form, "client_secret").is_empty()
            || !form_field(form, "client_assertion").is_empty();
        let record = if client_id.is_empty() {
            None
        } else {
            self.find_client(client_id).await?
        };
        match record {
            None if credential => Err(refuse(
                400,
                "unauthorized_client",
                700016,
                "Application was not found in the directory.",
            )),
            None => Ok(None),
            // Applications with a credential of their own: service principals (and the
            // bootstrap administrator, which is one).
            Some(r) if r.kind != kind::SERVICE_PRINCIPAL && r.kind != kind::BOOTSTRAP => {
                Err(refuse(
                    400,
                    "unauthorized_client",
                    700016,
                    "The client is not an application that users sign in through.",
                ))
            }
            Some(_) if !credential => Err(refuse(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or \
                 'client_secret'.",
            )),
            Some(r) => {
                self.authenticate_client(tenant, &r, form).await?;
                Ok(Some(r))
            }
        }
    }

    /// How many password hashes the password grant has computed since start: one per attempt
    /// that reached the password check, whether the user exists or not.
    pub fn password_hashes_computed(&self) -> u64 {
        self.guards.hashes_run.load(Ordering::SeqCst)
    }

    /// Verifies a certificate credential (RFC 7523 client assertion, as MSAL sends it): a JWT
    /// signed PS256 or RS256 with the key of a certificate registered for this client, named
    /// by its `x5t#S256` thumbprint, addressed to this token endpoint, issued by and about the
    /// client, and not expired.
    fn check_client_assertion(
        &self,
        tenant: &str,
        record: &PrincipalRecord,
        form: &HashMap<String, String>,
    ) -> Result<AssertionStamp, TokenRequestError> {
        use kagi_core::b64;
        let invalid = |why: &str| {
            refuse(
                401,
                "invalid_client",
                700027,
                &format!("Client assertion failed signature or claims validation: {why}."),
            )
        };
        if form.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return Err(refuse(
                400,
                "invalid_request",
                50027,
                "Unsupported client_assertion_type.",
            ));
        }
        let jwt = form
            .get("client_assertion")
            .map(String::as_str)
            .unwrap_or("");
        let parts: Vec<&str> = jwt.split('.').collect();
        if parts.len() != 3 || jwt.len() > 16 * 1024 {
            return Err(invalid("not a JWT"));
        }
        let header: serde_json::Value = b64::decode(parts[0])
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| invalid("bad header"))?;
        let alg = match header["alg"].as_str() {
            Some("PS256") => kagi_crypto::SignatureAlgorithm::PS256,
            Some("RS256") => kagi_crypto::SignatureAlgorithm::RS256,
            _ => return Err(invalid("alg must be PS256 or RS256")),
        };
        let hex = |v: &serde_json::Value| {
            v.as_str()
                .and_then(b64::decode)
                .map(|t| t.iter().map(|b| format!("{b:02x}")).collect::<String>())
        };
        let (thumb, sha1) = match (hex(&header["x5t#S256"]), hex(&header["x5t"])) {
            (Some(t), _) => (t, false),
            (None, Some(t)) => (t, true),
            _ => return Err(invalid("an x5t#S256 or x5t header is required")),
        };
        let (owner, spki) = self
            .certificate_credential(&thumb, sha1)
            .filter(|(p, _)| p.object_id == record.object_id)
            .ok_or_else(|| invalid("no such certificate is registered for this client"))?;
        let key = kagi_crypto::PublicKey::rsa_from_spki_der(&spki)
            .map_err(|_| invalid("unusable key"))?;
        let digest = kagi_crypto::digest(
            kagi_crypto::DigestAlgorithm::Sha256,
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
        );
        let sig = b64::decode(parts[2]).ok_or_else(|| invalid("bad signature encoding"))?;
        if !key.verify_digest(alg, &digest, &sig).unwrap_or(false) {
            return Err(invalid("bad signature"));
        }
        let claims: serde_json::Value = b64::decode(parts[1])
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| invalid("bad claims"))?;
        let endpoint = format!("{}/{tenant}/oauth2/v2.0/token", self.authority);
        let now = self.clock.now();
        let num = |k: &str| claims[k].as_f64().map(|f| f as i64);
        if claims["aud"].as_str().map(|a| a.trim_end_matches('/')) != Some(endpoint.as_str())
            || claims["iss"].as_str() != Some(owner.client_id.as_str())
            || claims["sub"].as_str() != Some(owner.client_id.as_str())
        {
            return Err(invalid(
                "aud, iss or sub do not name this token endpoint and client",
            ));
        }
        let exp = match num("exp") {
            Some(exp) if exp > now - LEEWAY => exp,
            _ => return Err(invalid("expired, or no exp claim")),
        };
        let nbf = num("nbf");
        if nbf.is_some_and(|nbf| nbf > now + LEEWAY) {
            return Err(invalid("not yet valid"));
        }
        // The replay cache remembers an assertion until it expires: a long-lived one would
        // hold its place for that long. Valid from nbf, else iat, else now.
        let from = nbf.or_else(|| num("iat")).unwrap_or(now);
        // Saturating: the claims are the client's numbers, any of them.
        if exp.saturating_sub(from) > MAX_ASSERTION_LIFETIME
            || exp - now > MAX_ASSERTION_LIFETIME + LEEWAY
        {
            let lifetime = exp.saturating_sub(from.min(now));
            return Err(refuse(
                401,
                "invalid_client",
                700024,
                &format!(
                    "Client assertion is not within its valid time range: it is valid for {} \
                     seconds, and kagi accepts client assertions valid for at most \
                     {MAX_ASSERTION_LIFETIME} seconds (from nbf, or iat, to exp; MSAL makes them \
                     valid for 600).",
                    lifetime
                ),
            ));
        }
        // Accepted once (RFC 7523 §3): its jti is remembered, per client, until it expires.
        let jti = claims["jti"]
            .as_str()
            .filter(|j| !j.is_empty() && j.len() <= 256)
            .ok_or_else(|| invalid("a jti claim (at most 256 characters) is required"))?;
        let key = kagi_crypto::digest(
            kagi_crypto::DigestAlgorithm::Sha256,
            format!("{}\n{jti}", owner.object_id).as_bytes(),
        );
        match lock(&self.guards.assertions).remember(
            &owner.object_id,
            key.clone(),
            exp + LEEWAY,
            now,
        ) {
            Ok(()) => Ok(AssertionStamp {
                client: owner.object_id.clone(),
                key,
                forget_at: exp + LEEWAY,
            }),
            Err(ReplayRefusal::Replayed) => Err(invalid(
                "its jti was used before; a client assertion is accepted once",
            )),
            Err(ReplayRefusal::Full) => Err(too_many(60)),
        }
    }

    /// `https://localhost:8443/.default` → `https://localhost:8443`; kagi is the only resource.
    fn audience_for_scope(&self, scope: &str) -> Result<String, TokenRequestError> {
        let authority = self.authority.as_str();
        for s in scope.split(' ').filter(|s| !s.is_empty()) {
            if let Some(resource) = s.strip_suffix("/.default")
                && resource.trim_end_matches('/') == authority
            {
                return Ok(resource.to_string());
            }
        }
        Err(refuse(
            400,
            "invalid_scope",
            500011,
            &format!(
                "The resource principal was not found. kagi issues tokens for the scope {authority}/.default."
            ),
        ))
    }

    /// The OpenID configuration document for a tenant.
    pub fn openid_configuration(&self, tenant: &str) -> serde_json::Value {
        let a = &self.authority;
        serde_json::json!({
            "issuer": self.issuer.issuer(tenant),
            "token_endpoint": format!("{a}/{tenant}/oauth2/v2.0/token"),
            "authorization_endpoint": format!("{a}/{tenant}/oauth2/v2.0/authorize"),
            "device_authorization_endpoint": format!("{a}/{tenant}/oauth2/v2.0/devicecode"),
            "jwks_uri": format!("{a}/{tenant}/discovery/v2.0/keys"),
            "response_types_supported": ["token"],
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "grant_types_supported": ["client_credentials", "password"],
            "scopes_supported": ["openid"],
            "claims_supported": ["aud", "iss", "iat", "nbf", "exp", "tid", "oid", "sub", "appid", "azp"],
            "tenant_region_scope": "kagi",
            "cloud_instance_name": "localhost",
            "cloud_graph_host_name": "localhost",
            "msgraph_host": "localhost",
        })
    }

    /// The token signing keys: the one that signs, then those that still validate the tokens
    /// they signed (the bootstrap administrator only).
    pub fn signing_keys(&self, caller: &Principal) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        Ok(self.signing_keys_json())
    }

    fn signing_keys_json(&self) -> Value {
        let now = self.clock.now();
        let mut keys = vec![json!({"kid": self.issuer.kid(), "status": "Current"})];
        for r in self.issuer.retired().into_iter().filter(|r| now < r.until) {
            keys.push(json!({"kid": r.kid, "status": "Retired", "validUntil": rfc3339(r.until)}));
        }
        json!({ "value": keys })
    }

    /// Rotates the token signing key (the bootstrap administrator only). A new P-256 key signs
    /// from now on; the previous one keeps validating, and stays in the JWKS, until every token
    /// it signed has expired, unless `revoke_previous` (a leaked key): then every token signed
    /// before stops working at once. The store holds the new key and the retired ones before
    /// memory does.
    pub async fn rotate_signing_key(
        &self,
        caller: &Principal,
        revoke_previous: bool,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let _one_at_a_time = self.guards.rotation.lock().await;
        let now = self.clock.now();
        let expected = self
            .store
            .get_meta(SIGNING_KEY)
            .await
            .map_err(|e| internal("signing key", e))?
            .ok_or_else(|| internal("signing key", "missing"))?;
        let key = KeyPair::generate_ec(Curve::P256).map_err(|e| internal("signing key", e))?;
        let sealed = key
            .to_pkcs8()
            .and_then(|der| self.root.seal(SealPurpose::Token, SIGNING_KEY_LABEL, &der))
            .map_err(|e| internal("signing key", e))?;
        let retired: Vec<RetiredKey> = if revoke_previous {
            Vec::new()
        } else {
            let mut kept: Vec<RetiredKey> = self
                .issuer
                .retired()
                .into_iter()
                .filter(|r| now < r.until)
                .collect();
            kept.push(
                self.issuer
                    .retire_current(now + TOKEN_LIFETIME + LEEWAY)
                    .map_err(|e| internal("signing key", e))?,
            );
            kept
        };
        let list = serde_json::to_vec(&retired).map_err(|e| internal("signing key", e))?;
        if !self
            .store
            .replace_signing_key(&expected, &sealed, &list)
            .await
            .map_err(|e| internal("signing key", e))?
        {
            return Err(KvError::conflict(
                "The signing key changed while this rotation ran; list the keys and retry.",
            ));
        }
        self.issuer
            .install(key, retired)
            .map_err(|e| internal("signing key", e))?;
        tracing::info!(kid = %self.issuer.kid(), revoke_previous, "token signing key rotated");
        Ok(self.signing_keys_json())
    }
}

/// The signing key of a store: created (sealed under the root key) on first start, with
/// the retired keys that still validate at `now`.
pub async fn load_token_issuer(
    store: &dyn kagi_store::Store,
    root: &dyn kagi_crypto::RootKey,
    authority: &str,
    now: i64,
) -> Result<TokenIssuer, LoadError> {
    let fresh = KeyPair::generate_ec(Curve::P256)
        .and_then(|k| k.to_pkcs8())
        .and_then(|der| root.seal(SealPurpose::Token, SIGNING_KEY_LABEL, &der))
        .map_err(|e| LoadError::RootKey(e.to_string()))?;
    let sealed = store.put_meta_if_absent(SIGNING_KEY, &fresh).await?;
    let der = root
        .open(SealPurpose::Token, SIGNING_KEY_LABEL, &sealed)
        .map_err(|e| LoadError::RootKey(e.to_string()))?;
    let signing = KeyPair::from_pkcs8(&der).map_err(|e| LoadError::Corrupt(e.to_string()))?;
    let retired: Vec<RetiredKey> = match store.get_meta(RETIRED_SIGNING_KEYS).await? {
        Some(json) => serde_json::from_slice(&json)
            .map_err(|e| LoadError::Corrupt(format!("retired signing keys: {e}")))?,
        None => Vec::new(),
    };
    let issuer =
        TokenIssuer::new(signing, authority).map_err(|e| LoadError::Corrupt(e.to_string()))?;
    issuer
        .set_retired(retired.into_iter().filter(|r| now < r.until).collect())
        .map_err(|e| LoadError::Corrupt(format!("retired signing keys: {e}")))?;
    Ok(issuer)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::token_guards::HashGate;
    use crate::{Parts, State};

    /// The tenant the tests ask tokens in (no user exists in any).
    const TENANT: &str = "7d0f1c9e-2b7a-4c51-9a43-3c2d5e6f7a80";

    async fn platform(dir: &std::path::Path) -> Directory {
        let store: Arc<dyn kagi_store::Store> = Arc::new(
            kagi_store::SqlStore::open_sqlite(&dir.join("kagi.db"))
                .await
                .unwrap(),
        );
        let root: Arc<dyn kagi_crypto::RootKey> =
            Arc::new(kagi_crypto::AesRootKey::from_bytes(&[7; 32]));
        let clock: Arc<dyn kagi_core::time::Clock> = Arc::new(kagi_core::time::SystemClock);
        let authority = "https://localhost:8443".to_string();
        let issuer = load_token_issuer(store.as_ref(), root.as_ref(), &authority, clock.now())
            .await
            .unwrap();
        let state = State::load(store.as_ref()).await.unwrap();
        Directory::new(Parts {
            store,
            clock,
            root,
            issuer,
            authority,
            admin_object_id: String::new(),
            state,
        })
    }

    fn password_form(user: &str) -> HashMap<String, String> {
        [
            ("grant_type", "password"),
            ("username", user),
            ("password", "whatever it is"),
            ("scope", "https://localhost:8443/.default"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[tokio::test]
    async fn password_checks_beyond_the_bound_are_told_to_come_back_without_hashing() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = platform(dir.path()).await;
        p.guards.hashing = HashGate::new(1, 0, Duration::from_secs(3600));
        let busy = p.guards.hashing.enter().await.unwrap();
        let form = password_form("alice@contoso.example");
        let tenant = TENANT.to_string();
        let e = p.token_request(&tenant, &form, None).await.unwrap_err();
        assert_eq!(
            (e.status, e.error, e.retry_after),
            (429, "temporarily_unavailable", Some(1))
        );
        assert_eq!(p.password_hashes_computed(), 0);
        drop(busy);
        let e = p.token_request(&tenant, &form, None).await.unwrap_err();
        assert_eq!((e.status, e.error_codes[0]), (400, 50126));
        assert_eq!(p.password_hashes_computed(), 1);
    }

    /// Sends `requests` (user name, source) together while the hash gate is held, so that all
    /// of them are past any check before the first is hashed; then lets them through. The
    /// number of hashes computed, and the statuses answered.
    async fn guesses_together(requests: Vec<(String, Option<IpAddr>)>) -> (u64, Vec<u16>) {
        let dir = tempfile::tempdir().unwrap();
        let mut p = platform(dir.path()).await;
        p.guards.hashing = HashGate::new(1, 1000, Duration::from_secs(3600));
        let busy = p.guards.hashing.enter().await.unwrap();
        let p = Arc::new(p);
        let tenant = TENANT.to_string();
        let n = requests.len();
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = requests
            .into_iter()
            .map(|(user, source)| {
                let (p, tenant, answered) = (p.clone(), tenant.clone(), answered.clone());
                tokio::spawn(async move {
                    let r = p
                        .token_request(&tenant, &password_form(&user), source)
                        .await;
                    answered.fetch_add(1, Ordering::SeqCst);
                    r.map_or_else(|e| e.status, |_| 200)
                })
            })
            .collect();
        while answered.load(Ordering::SeqCst) + p.guards.hashing.waiting() < n {
            tokio::task::yield_now().await;
        }
        drop(busy);
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
        (p.password_hashes_computed(), statuses)
    }

    fn count(statuses: &[u16], status: u16) -> usize {
        statuses.iter().filter(|s| **s == status).count()
    }

    #[tokio::test]
    async fn guesses_at_one_name_all_at_once_are_hashed_no_more_than_its_threshold() {
        let threshold = crate::token_guards::USER_LOCKOUT.threshold;
        let guesses = (0..4 * threshold)
            .map(|_| ("mallory-target@contoso.example".to_string(), None))
            .collect();
        let (hashes, statuses) = guesses_together(guesses).await;
        assert_eq!(hashes, u64::from(threshold), "{statuses:?}");
        assert_eq!(count(&statuses, 400), threshold as usize, "{statuses:?}");
        assert_eq!(
            count(&statuses, 429),
            3 * threshold as usize,
            "{statuses:?}"
        );
    }

    #[tokio::test]
    async fn guesses_from_one_source_all_at_once_are_hashed_no_more_than_its_threshold() {
        let threshold = crate::token_guards::SOURCE_LOCKOUT.threshold;
        let source: IpAddr = "2001:db8:7:7::1".parse().unwrap();
        let guesses = (0..2 * threshold)
            .map(|i| (format!("spray{i}@contoso.example"), Some(source)))
            .collect();
        let (hashes, statuses) = guesses_together(guesses).await;
        assert_eq!(hashes, u64::from(threshold), "{statuses:?}");
        assert_eq!(count(&statuses, 429), threshold as usize, "{statuses:?}");
    }
}

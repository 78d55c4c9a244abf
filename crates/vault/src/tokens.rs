//! The OAuth 2.0 client-credentials grant, answered as Microsoft Entra answers it.

use kagi_identity::Principal;
use serde::Serialize;

use crate::Platform;

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
}

fn refuse(status: u16, error: &'static str, code: u32, text: &str) -> TokenRequestError {
    TokenRequestError {
        status,
        error,
        error_description: format!("AADSTS{code}: {text}"),
        error_codes: vec![code],
    }
}

impl Platform {
    /// Answers `POST /{tenant}/oauth2/v2.0/token` with form fields already parsed.
    pub async fn client_credentials(
        &self,
        tenant: &str,
        form: &std::collections::HashMap<String, String>,
    ) -> Result<TokenGrant, TokenRequestError> {
        let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        if field("grant_type") == "password" {
            return self.password_grant(tenant, form).await;
        }
        if field("grant_type") != "client_credentials" {
            return Err(refuse(
                400,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type; kagi supports client_credentials.",
            ));
        }
        let audience = self.audience_for_scope(field("scope"))?;
        let record = self
            .store
            .principal_by_client_id(field("client_id"))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "token request: store failure");
                refuse(
                    500,
                    "temporarily_unavailable",
                    90033,
                    "A transient error occurred.",
                )
            })?;
        let Some(record) = record else {
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
        let admin_elsewhere = record.kind == crate::directory::kind::BOOTSTRAP
            && kagi_core::TenantId::parse(tenant).is_ok()
            && self.tenant_known(tenant);
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
        if record.kind == crate::directory::kind::USER {
            return Err(refuse(
                400,
                "unauthorized_client",
                700016,
                "Users sign in with the password grant, not client credentials.",
            ));
        }
        if !field("client_assertion").is_empty() {
            self.check_client_assertion(tenant, &record, form)?;
        } else if record.secret_hash.is_empty()
            || !kagi_identity::secret_matches(field("client_secret"), &record.secret_hash)
        {
            return Err(refuse(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided.",
            ));
        }
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

    pub(crate) fn issue(
        &self,
        principal: &Principal,
        audience: &str,
    ) -> Result<TokenGrant, TokenRequestError> {
        let id = kagi_crypto::random_array::<16>().ok().ok_or_else(|| {
            refuse(
                500,
                "temporarily_unavailable",
                90033,
                "A transient error occurred.",
            )
        })?;
        let token = self
            .issuer
            .issue(principal, audience, self.clock.now(), TOKEN_LIFETIME, id)
            .map_err(|_| {
                refuse(
                    500,
                    "temporarily_unavailable",
                    90033,
                    "A transient error occurred.",
                )
            })?;
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
    async fn password_grant(
        &self,
        tenant: &str,
        form: &std::collections::HashMap<String, String>,
    ) -> Result<TokenGrant, TokenRequestError> {
        let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        let audience = self.audience_for_scope(field("scope"))?;
        let upn = field("username").trim().to_ascii_lowercase();
        let invalid = || {
            refuse(
                400,
                "invalid_grant",
                50126,
                "Error validating credentials due to invalid username or password.",
            )
        };
        let record = self
            .store
            .principal_by_client_id(&format!("user:{upn}"))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "token request: store failure");
                refuse(
                    500,
                    "temporarily_unavailable",
                    90033,
                    "A transient error occurred.",
                )
            })?
            .filter(|r| r.kind == crate::directory::kind::USER)
            .ok_or_else(invalid)?;
        if !tenant.eq_ignore_ascii_case(&record.tenant_id)
            && !tenant.eq_ignore_ascii_case("organizations")
        {
            return Err(refuse(
                400,
                "invalid_request",
                90002,
                "Tenant not found, or the user is not in this tenant.",
            ));
        }
        let stored = String::from_utf8_lossy(&record.secret_hash).into_owned();
        let password = field("password").to_string();
        // Argon2 is deliberately slow: keep it off the async workers.
        let ok = tokio::task::spawn_blocking(move || {
            kagi_crypto::password::verify_password(&password, &stored)
        })
        .await
        .unwrap_or(false);
        if !ok {
            return Err(invalid());
        }
        let app = kagi_core::ids::ObjectId::parse(field("client_id"))
            .map(|a| a.to_string())
            .unwrap_or_else(|_| record.object_id.clone());
        self.issue(
            &Principal {
                tenant_id: record.tenant_id,
                object_id: record.object_id,
                client_id: app,
                kind: record.kind,
                network_address: None,
                upn: Some(upn),
            },
            &audience,
        )
    }

    /// Verifies a certificate credential (RFC 7523 client assertion, as MSAL sends it): a JWT
    /// signed PS256 or RS256 with the key of a certificate registered for this client, named
    /// by its `x5t#S256` thumbprint, addressed to this token endpoint, issued by and about the
    /// client, and not expired.
    fn check_client_assertion(
        &self,
        tenant: &str,
        record: &kagi_store::PrincipalRecord,
        form: &std::collections::HashMap<String, String>,
    ) -> Result<(), TokenRequestError> {
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
        let endpoint = format!("{}/{tenant}/oauth2/v2.0/token", self.config.authority());
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
        match num("exp") {
            Some(exp) if exp > now - 60 && exp <= now + 24 * 3600 => {}
            _ => return Err(invalid("expired or too long-lived")),
        }
        if num("nbf").is_some_and(|nbf| nbf > now + 60) {
            return Err(invalid("not yet valid"));
        }
        Ok(())
    }

    /// `https://localhost:8443/.default` → `https://localhost:8443`; kagi is the only resource.
    fn audience_for_scope(&self, scope: &str) -> Result<String, TokenRequestError> {
        let authority = self.config.authority();
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
        let a = self.config.authority();
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
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": ["openid"],
            "claims_supported": ["aud", "iss", "iat", "nbf", "exp", "tid", "oid", "sub", "appid", "azp"],
            "tenant_region_scope": "kagi",
            "cloud_instance_name": "localhost",
            "cloud_graph_host_name": "localhost",
            "msgraph_host": "localhost",
        })
    }
}

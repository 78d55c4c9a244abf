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
        if !tenant.eq_ignore_ascii_case(&record.tenant_id) {
            return Err(refuse(
                400,
                "invalid_request",
                90002,
                "Tenant not found, or the application is not in this tenant.",
            ));
        }
        if !kagi_identity::secret_matches(field("client_secret"), &record.secret_hash) {
            return Err(refuse(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided.",
            ));
        }
        self.issue(
            &Principal {
                tenant_id: record.tenant_id,
                object_id: record.object_id,
                client_id: record.client_id,
                kind: record.kind,
                network_address: None,
            },
            &audience,
        )
    }

    pub(crate) fn issue(
        &self,
        principal: &Principal,
        audience: &str,
    ) -> Result<TokenGrant, TokenRequestError> {
        let id = kagi_crypto::random_bytes(16)
            .ok()
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .ok_or_else(|| {
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

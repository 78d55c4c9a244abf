//! Access tokens: kagi's token endpoint issues ES256-signed JWTs with the claims Microsoft
//! Entra puts in app tokens (`aud`, `iss`, `tid`, `oid`, `appid`, `idtyp`…), and every API
//! validates them here — signature, issuer, audience, expiry and not-before — before anything
//! else happens.
//!
//! ES256 rather than RS256: signing on every token request is cheap with P-256 and the
//! Azure SDKs never validate access tokens themselves; the JWKS publishes the keys for tools
//! that do. The signing key rotates (the vault service decides when); a retired key keeps
//! validating the tokens it signed until they have expired.

#![forbid(unsafe_code)]

use kagi_core::b64;
use kagi_crypto::{Curve, DigestAlgorithm, KeyPair, PublicKey, SignatureAlgorithm};
use serde::{Deserialize, Serialize};

/// Why a token was refused. The message goes to the client; it never echoes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT of the expected form.
    #[error("the access token is malformed")]
    Malformed,
    /// Signature does not verify under kagi's signing key.
    #[error("the access token signature is invalid")]
    BadSignature,
    /// Issued by another authority.
    #[error("the access token issuer is not trusted")]
    WrongIssuer,
    /// Meant for another resource.
    #[error("the access token audience is invalid for this resource")]
    WrongAudience,
    /// Past `exp`.
    #[error("the access token has expired")]
    Expired,
    /// Before `nbf`.
    #[error("the access token is not yet valid")]
    NotYetValid,
}

/// Kinds of principal.
pub mod kind {
    /// The administrator created on first start.
    pub const BOOTSTRAP: &str = "BootstrapAdministrator";
    /// An application with a client secret.
    pub const SERVICE_PRINCIPAL: &str = "ServicePrincipal";
    /// The identity a resource gets with `identity.type: SystemAssigned`.
    pub const SYSTEM_ASSIGNED: &str = "SystemAssignedIdentity";
    /// A person, signing in with a user principal name and a password.
    pub const USER: &str = "User";
    /// A `Microsoft.ManagedIdentity/userAssignedIdentities` resource.
    pub const USER_ASSIGNED: &str = "UserAssignedIdentity";
}

/// Who a token is for: enough to authorize and audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Tenant id.
    pub tenant_id: String,
    /// Object id.
    pub object_id: String,
    /// Client (application) id.
    pub client_id: String,
    /// Kind of identity (`ServicePrincipal`, `ManagedIdentity`, …).
    pub kind: String,
    /// The network address the request came from, filled in by the HTTP layer (the token
    /// says who; the connection says from where — the vault firewall needs both).
    pub network_address: Option<std::net::IpAddr>,
    /// User principal name, for users (`alice@contoso`).
    pub upn: Option<String>,
}

/// The claims kagi puts in (and reads from) an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Audience (the resource).
    pub aud: String,
    /// Issuer: `{authority}/{tid}/v2.0`.
    pub iss: String,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Expiry.
    pub exp: i64,
    /// Tenant.
    pub tid: String,
    /// Object id.
    pub oid: String,
    /// Subject (same as oid for apps).
    pub sub: String,
    /// Application id.
    pub appid: String,
    /// Authorized party (v2 name of appid).
    pub azp: String,
    /// Identity type: `app`.
    pub idtyp: String,
    /// kagi's kind of principal.
    #[serde(default)]
    pub kagi_kind: String,
    /// Token version.
    pub ver: String,
    /// Unique token id.
    pub uti: String,
    /// User principal name (user tokens only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upn: Option<String>,
}

impl Claims {
    /// The principal the token speaks for.
    pub fn principal(&self) -> Principal {
        Principal {
            tenant_id: self.tid.clone(),
            object_id: self.oid.clone(),
            client_id: self.appid.clone(),
            kind: self.kagi_kind.clone(),
            network_address: None,
            upn: self.upn.clone(),
        }
    }
}

/// A signing key that signs no more but still validates the tokens it signed until `until`
/// (seconds since the epoch): what a rotation leaves behind. Only the public half is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredKey {
    /// Key id (the `kid` of the tokens it signed).
    pub kid: String,
    /// P-256 public point, base64url.
    pub x: String,
    /// P-256 public point, base64url.
    pub y: String,
    /// Validates tokens until this time; published in the JWKS until then.
    pub until: i64,
}

impl RetiredKey {
    fn public_key(&self) -> Option<PublicKey> {
        let (x, y) = (b64::decode(&self.x)?, b64::decode(&self.y)?);
        PublicKey::ec_from_components(Curve::P256, &x, &y).ok()
    }
}

/// The key that signs, and those that only validate.
#[derive(Debug)]
struct KeyRing {
    key: KeyPair,
    kid: String,
    retired: Vec<(RetiredKey, PublicKey)>,
}

/// Issues and validates tokens: one P-256 key signs, and keys retired by a rotation keep
/// validating the tokens they signed until those have expired.
#[derive(Debug)]
pub struct TokenIssuer {
    keys: std::sync::RwLock<KeyRing>,
    authority: String,
}

/// Allowed clock skew between token issue and use, in seconds.
pub const LEEWAY: i64 = 60;

/// The public point and key id of a P-256 key pair.
fn p256_point(key: &KeyPair) -> Result<(&[u8], &[u8], String), TokenError> {
    let PublicKey::Ec {
        curve: Curve::P256,
        x,
        y,
    } = key.public_key()
    else {
        return Err(TokenError::Malformed);
    };
    // The key id is a digest of the public key, so it changes when the key does.
    let mut material = x.clone();
    material.extend_from_slice(y);
    let kid = b64::encode(&kagi_crypto::digest(DigestAlgorithm::Sha256, &material)[..16]);
    Ok((x, y, kid))
}

fn with_public_keys(retired: Vec<RetiredKey>) -> Result<Vec<(RetiredKey, PublicKey)>, TokenError> {
    retired
        .into_iter()
        .map(|r| r.public_key().map(|k| (r, k)).ok_or(TokenError::Malformed))
        .collect()
}

fn jwk(kid: &str, x: &str, y: &str) -> serde_json::Value {
    serde_json::json!({
        "kty": "EC", "use": "sig", "alg": "ES256", "crv": "P-256", "kid": kid, "x": x, "y": y
    })
}

impl TokenIssuer {
    /// An issuer for `authority` (e.g. `https://localhost:8443`) signing with `key` (P-256).
    pub fn new(key: KeyPair, authority: &str) -> Result<Self, TokenError> {
        let kid = p256_point(&key)?.2;
        Ok(Self {
            keys: std::sync::RwLock::new(KeyRing {
                key,
                kid,
                retired: Vec::new(),
            }),
            authority: authority.trim_end_matches('/').to_string(),
        })
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, KeyRing> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of the key that signs now.
    pub fn kid(&self) -> String {
        self.ring().kid.clone()
    }

    /// The keys that validate without signing (those whose time has passed included).
    pub fn retired(&self) -> Vec<RetiredKey> {
        self.ring().retired.iter().map(|(r, _)| r.clone()).collect()
    }

    /// What `key` becomes when it is retired: its public half, validating until `until`.
    pub fn retire(key: &KeyPair, until: i64) -> Result<RetiredKey, TokenError> {
        let (x, y, kid) = p256_point(key)?;
        Ok(RetiredKey {
            kid,
            x: b64::encode(x),
            y: b64::encode(y),
            until,
        })
    }

    /// What the key that signs now becomes when it is retired (see [`Self::retire`]).
    pub fn retire_current(&self, until: i64) -> Result<RetiredKey, TokenError> {
        Self::retire(&self.ring().key, until)
    }

    /// Installs `key` as the signing key and `retired` as the keys that only validate (the
    /// previous signing key among them, unless it is being revoked). A retired key whose
    /// public point is not a P-256 point is refused, and nothing changes.
    pub fn install(&self, key: KeyPair, retired: Vec<RetiredKey>) -> Result<(), TokenError> {
        let kid = p256_point(&key)?.2;
        let retired = with_public_keys(retired)?;
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = KeyRing { key, kid, retired };
        Ok(())
    }

    /// Sets the keys that only validate, keeping the signing key (at start, from the store).
    pub fn set_retired(&self, retired: Vec<RetiredKey>) -> Result<(), TokenError> {
        let retired = with_public_keys(retired)?;
        self.keys.write().unwrap_or_else(|p| p.into_inner()).retired = retired;
        Ok(())
    }

    /// The issuer claim for a tenant.
    pub fn issuer(&self, tenant: &str) -> String {
        format!("{}/{tenant}/v2.0", self.authority)
    }

    /// The authority URL.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Issues a token for `principal` and `audience`, valid for `lifetime` seconds from `now`.
    /// `token_id` is 16 random bytes from the caller.
    pub fn issue(
        &self,
        principal: &Principal,
        audience: &str,
        now: i64,
        lifetime: i64,
        token_id: [u8; 16],
    ) -> Result<String, kagi_crypto::CryptoError> {
        let claims = Claims {
            aud: audience.to_string(),
            iss: self.issuer(&principal.tenant_id),
            iat: now,
            nbf: now,
            exp: now + lifetime,
            tid: principal.tenant_id.clone(),
            oid: principal.object_id.clone(),
            sub: principal.object_id.clone(),
            appid: principal.client_id.clone(),
            azp: principal.client_id.clone(),
            idtyp: "app".into(),
            kagi_kind: principal.kind.clone(),
            ver: "2.0".into(),
            uti: b64::encode(&token_id),
            upn: principal.upn.clone(),
        };
        let ring = self.ring();
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "kid": ring.kid});
        let signing_input = format!(
            "{}.{}",
            b64::encode(header.to_string().as_bytes()),
            b64::encode(
                serde_json::to_string(&claims)
                    .map_err(|_| kagi_crypto::CryptoError::Internal)?
                    .as_bytes()
            )
        );
        let digest = kagi_crypto::digest(DigestAlgorithm::Sha256, signing_input.as_bytes());
        let sig = ring.key.sign_digest(SignatureAlgorithm::ES256, &digest)?;
        Ok(format!("{signing_input}.{}", b64::encode(&sig)))
    }

    /// Validates a token for one of `audiences` at `now`.
    pub fn validate(
        &self,
        token: &str,
        audiences: &[&str],
        now: i64,
    ) -> Result<Claims, TokenError> {
        if token.len() > 8192 {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: serde_json::Value = b64::decode(h)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        // Only our algorithm: never let the token choose (alg=none, HS256 confusion).
        if header.get("alg").and_then(|a| a.as_str()) != Some("ES256") {
            return Err(TokenError::BadSignature);
        }
        let sig = b64::decode(s).ok_or(TokenError::Malformed)?;
        let digest = kagi_crypto::digest(DigestAlgorithm::Sha256, format!("{h}.{p}").as_bytes());
        // The key named by `kid`: the signing key, or a retired one while it still validates.
        let kid = header.get("kid").and_then(|k| k.as_str());
        let verified = {
            let ring = self.ring();
            let key = if kid.is_none_or(|k| k == ring.kid) {
                Some(ring.key.public_key())
            } else {
                ring.retired
                    .iter()
                    .find(|(r, _)| Some(r.kid.as_str()) == kid && now < r.until)
                    .map(|(_, k)| k)
            };
            key.is_some_and(|k| {
                k.verify_digest(SignatureAlgorithm::ES256, &digest, &sig)
                    .unwrap_or(false)
            })
        };
        if !verified {
            return Err(TokenError::BadSignature);
        }
        let claims: Claims = b64::decode(p)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        if claims.iss != self.issuer(&claims.tid) {
            return Err(TokenError::WrongIssuer);
        }
        let aud = claims.aud.trim_end_matches('/');
        if !audiences.iter().any(|a| a.trim_end_matches('/') == aud) {
            return Err(TokenError::WrongAudience);
        }
        if now >= claims.exp + LEEWAY {
            return Err(TokenError::Expired);
        }
        if now + LEEWAY < claims.nbf {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }

    /// The JSON Web Key Set at `now`: the signing key, then the retired keys that still
    /// validate.
    pub fn jwks(&self, now: i64) -> serde_json::Value {
        let ring = self.ring();
        let mut keys = Vec::new();
        if let Ok((x, y, kid)) = p256_point(&ring.key) {
            keys.push(jwk(&kid, &b64::encode(x), &b64::encode(y)));
        }
        for (r, _) in ring.retired.iter().filter(|(r, _)| now < r.until) {
            keys.push(jwk(&r.kid, &r.x, &r.y));
        }
        serde_json::json!({ "keys": keys })
    }
}

/// Hashes a client secret for storage. Secrets are 256-bit random values, so a plain
/// SHA-256 is as strong as a password hash would be and costs nothing per token request.
pub fn hash_secret(secret: &str) -> Vec<u8> {
    kagi_crypto::digest(DigestAlgorithm::Sha256, secret.as_bytes())
}

/// Compares a presented secret with a stored hash in constant time.
pub fn secret_matches(secret: &str, stored_hash: &[u8]) -> bool {
    let h = hash_secret(secret);
    h.len() == stored_hash.len()
        && h.iter()
            .zip(stored_hash)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> TokenIssuer {
        TokenIssuer::new(
            KeyPair::generate_ec(Curve::P256).unwrap(),
            "https://localhost:8443/",
        )
        .unwrap()
    }

    fn principal() -> Principal {
        Principal {
            tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
            object_id: "11111111-2222-4333-8444-555555555555".into(),
            client_id: "66666666-2222-4333-8444-555555555555".into(),
            kind: "ServicePrincipal".into(),
            network_address: None,
            upn: None,
        }
    }

    const AUD: &str = "https://localhost:8443";

    #[test]
    fn issue_and_validate() {
        let i = issuer();
        let t = i.issue(&principal(), AUD, 1000, 3600, [1; 16]).unwrap();
        let c = i.validate(&t, &[AUD], 1001).unwrap();
        assert_eq!(c.principal(), principal());
        assert_eq!(
            c.iss,
            "https://localhost:8443/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"
        );
        // Trailing slash on either side is the same resource.
        assert!(i.validate(&t, &["https://localhost:8443/"], 1001).is_ok());
    }

    #[test]
    fn refusals() {
        let i = issuer();
        let t = i.issue(&principal(), AUD, 1000, 3600, [1; 16]).unwrap();
        assert_eq!(
            i.validate(&t, &["https://other"], 1001),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(
            i.validate(&t, &[AUD], 1000 + 3600 + LEEWAY),
            Err(TokenError::Expired)
        );
        assert_eq!(
            i.validate(&t, &[AUD], 1000 - LEEWAY - 1),
            Err(TokenError::NotYetValid)
        );
        // Another issuer's key: bad signature.
        let other = issuer();
        assert_eq!(
            other.validate(&t, &[AUD], 1001),
            Err(TokenError::BadSignature)
        );
        // Tampered payload.
        let parts: Vec<&str> = t.split('.').collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&b64::decode(parts[1]).unwrap()).unwrap();
        claims["oid"] = "99999999-2222-4333-8444-555555555555".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64::encode(claims.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(
            i.validate(&forged, &[AUD], 1001),
            Err(TokenError::BadSignature)
        );
        // alg=none.
        let none = format!("{}.{}.", b64::encode(br#"{"alg":"none"}"#), parts[1]);
        assert_eq!(
            i.validate(&none, &[AUD], 1001),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            i.validate("garbage", &[AUD], 1001),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn rotation_keeps_the_old_key_validating_until_its_time() {
        let i = issuer();
        let old = i.issue(&principal(), AUD, 1000, 3600, [1; 16]).unwrap();
        let old_kid = i.kid();
        let until = 1000 + 3600 + LEEWAY;
        let retired = i.retire_current(until).unwrap();
        assert_eq!(retired.kid, old_kid);
        i.install(KeyPair::generate_ec(Curve::P256).unwrap(), vec![retired])
            .unwrap();
        assert_ne!(i.kid(), old_kid);
        let new = i.issue(&principal(), AUD, 1001, 3600, [2; 16]).unwrap();
        assert!(i.validate(&old, &[AUD], 1002).is_ok());
        assert!(i.validate(&new, &[AUD], 1002).is_ok());
        let kids = |now| -> Vec<String> {
            i.jwks(now)["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["kid"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(kids(1002), vec![i.kid(), old_kid.clone()]);
        // Past its time the retired key neither validates nor is published.
        assert_eq!(
            i.validate(&old, &[AUD], until),
            Err(TokenError::BadSignature)
        );
        assert_eq!(kids(until), vec![i.kid()]);
        // Revoked at once: installed without it.
        i.install(KeyPair::generate_ec(Curve::P256).unwrap(), vec![])
            .unwrap();
        assert_eq!(
            i.validate(&new, &[AUD], 1002),
            Err(TokenError::BadSignature)
        );
        assert!(
            i.install(
                KeyPair::generate_ec(Curve::P256).unwrap(),
                vec![RetiredKey {
                    kid: "k".into(),
                    x: "AA".into(),
                    y: "AA".into(),
                    until: 1
                }]
            )
            .is_err()
        );
    }

    #[test]
    fn secrets() {
        let h = hash_secret("s3cret");
        assert!(secret_matches("s3cret", &h));
        assert!(!secret_matches("s3creT", &h));
        assert!(!secret_matches("", &h));
    }
}

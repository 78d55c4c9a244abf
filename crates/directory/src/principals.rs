//! Principals: service principals (client secret or certificate credentials), users (the
//! password grant), and their listing. Managed identities are created with the resources that
//! carry them.

use kagi_core::ids::uuid_v4;
use kagi_core::time::rfc3339;
use kagi_core::{ErrorCode, KvError};
use kagi_identity::Principal;
use kagi_store::{PrincipalRecord, StoreError};
use serde_json::{Value, json};

use crate::{Directory, bad, guid, internal, kind, new_secret, random16};

/// Certificates arrive as standard base64 (Graph's `keyCredential.key`) or base64url.
fn base64_any(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    let t: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    STANDARD
        .decode(&t)
        .ok()
        .or_else(|| kagi_core::b64::decode(&t))
}

impl Directory {
    /// The service principal `object_id` (the administrator only; 404 for any other kind).
    fn service_principal(
        &self,
        caller: &Principal,
        object_id: &str,
    ) -> Result<PrincipalRecord, KvError> {
        self.require_admin(caller)?;
        let oid = guid(object_id)?;
        self.state()
            .principals
            .get(&oid)
            .filter(|p| p.kind == kind::SERVICE_PRINCIPAL)
            .cloned()
            .ok_or_else(|| {
                KvError::new(
                    ErrorCode::NotFound,
                    format!("Service principal '{oid}' does not exist."),
                )
            })
    }

    /// Creates a service principal with a client secret (shown once).
    pub async fn create_service_principal(
        &self,
        caller: &Principal,
        name: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let name = name.trim();
        if name.is_empty() || name.len() > 120 || name.chars().any(char::is_control) {
            return Err(bad("displayName is required (at most 120 characters)."));
        }
        let secret = new_secret()?;
        let p = self
            .insert_service_principal(caller, name, kagi_identity::hash_secret(&secret))
            .await?;
        tracing::info!(object_id = %p.object_id, "service principal created");
        let mut v = principal_json(&p);
        v["clientSecret"] = json!(secret);
        Ok(v)
    }

    /// Stores a new service principal of the caller's tenant with new object and client ids
    /// and `secret_hash` (empty: no secret works), and keeps it in memory.
    pub(crate) async fn insert_service_principal(
        &self,
        caller: &Principal,
        name: &str,
        secret_hash: Vec<u8>,
    ) -> Result<PrincipalRecord, KvError> {
        let p = PrincipalRecord {
            object_id: uuid_v4(random16()?),
            tenant_id: caller.tenant_id.clone(),
            client_id: uuid_v4(random16()?),
            display_name: name.to_string(),
            secret_hash,
            kind: kind::SERVICE_PRINCIPAL.into(),
            created: self.clock.now(),
            resource_id: None,
        };
        self.store
            .put_principal(&p)
            .await
            .map_err(|e| internal("create principal", e))?;
        self.state_mut()
            .principals
            .insert(p.object_id.clone(), p.clone());
        Ok(p)
    }

    /// Creates a user who signs in with `upn` and `password` (the resource-owner password
    /// grant). The password is kept only as an Argon2id hash.
    pub async fn create_user(
        &self,
        caller: &Principal,
        upn: &str,
        display_name: &str,
        password: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let upn = upn.trim().to_ascii_lowercase();
        let valid_upn = upn.len() <= 113
            && upn.split_once('@').is_some_and(|(l, d)| {
                !l.is_empty()
                    && !d.is_empty()
                    && l.chars()
                        .chain(d.chars())
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            });
        if !valid_upn {
            return Err(bad(
                "userPrincipalName must look like alias@domain (letters, digits, '.', '_', '-').",
            ));
        }
        if password.chars().count() < 12 || password.len() > 256 {
            return Err(bad("The password must be 12 to 256 characters long.")
                .with_inner("PasswordTooWeak"));
        }
        let hash = kagi_crypto::password::hash_password(password)
            .map_err(|e| internal("hash password", e))?;
        let p = PrincipalRecord {
            object_id: uuid_v4(random16()?),
            tenant_id: caller.tenant_id.clone(),
            client_id: format!("user:{upn}"),
            display_name: if display_name.trim().is_empty() {
                upn.clone()
            } else {
                display_name.trim().chars().take(120).collect()
            },
            secret_hash: hash.into_bytes(),
            kind: kind::USER.into(),
            created: self.clock.now(),
            resource_id: None,
        };
        self.store.put_principal(&p).await.map_err(|e| match e {
            StoreError::Conflict(_) => {
                KvError::conflict(format!("A user named {upn} already exists."))
            }
            e => internal("create user", e),
        })?;
        self.state_mut()
            .principals
            .insert(p.object_id.clone(), p.clone());
        tracing::info!(object_id = %p.object_id, "user created");
        let mut v = principal_json(&p);
        v["userPrincipalName"] = json!(upn);
        v["id"] = json!(p.object_id);
        Ok(v)
    }

    /// Deletes a user; their tokens stop working on the next request.
    pub async fn delete_user(&self, caller: &Principal, object_id: &str) -> Result<(), KvError> {
        self.require_admin(caller)?;
        let oid = guid(object_id)?;
        if self
            .state()
            .principals
            .get(&oid)
            .is_none_or(|p| p.kind != kind::USER)
        {
            return Err(KvError::new(
                ErrorCode::NotFound,
                format!("User '{oid}' does not exist."),
            ));
        }
        self.store
            .delete_principal(&oid)
            .await
            .map_err(|e| internal("delete user", e))?;
        self.state_mut().principals.remove(&oid);
        Ok(())
    }

    /// Registers an X.509 certificate (PEM, or base64 of DER) as a credential of a service
    /// principal: `ClientCertificateCredential` then signs its token requests with the key.
    pub async fn add_service_principal_certificate(
        &self,
        caller: &Principal,
        object_id: &str,
        certificate: &str,
    ) -> Result<Value, KvError> {
        let p = self.service_principal(caller, object_id)?;
        let raw = if certificate.contains("-----BEGIN") {
            certificate.as_bytes().to_vec()
        } else {
            base64_any(certificate).ok_or_else(|| {
                bad("keyCredential.key must be a PEM certificate or the base64 of its DER.")
            })?
        };
        let der = kagi_crypto::x509::certificate_der(&raw).map_err(|e| bad(e.to_string()))?;
        let spki = kagi_crypto::x509::certificate_spki(&der)
            .map_err(|e| bad(e.to_string()))?
            .to_vec();
        kagi_crypto::PublicKey::rsa_from_spki_der(&spki).map_err(|e| {
            bad(format!(
                "The certificate's key is not usable: {e} (RSA 2048-4096 keys are supported)."
            ))
        })?;
        let thumb = kagi_crypto::x509::thumbprint_sha256(&der);
        let record = kagi_store::CertificateRecord {
            sha256: thumb.clone(),
            sha1: kagi_crypto::x509::thumbprint_sha1(&der),
            object_id: p.object_id.clone(),
            spki,
            created: self.clock.now(),
        };
        self.store
            .add_principal_certificate(&record)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => KvError::conflict(m),
                e => internal("add certificate", e),
            })?;
        self.state_mut().certificates.push(record);
        let mut v = principal_json(&p);
        v["keyCredentials"] = json!([{"customKeyIdentifier": thumb, "type": "AsymmetricX509Cert", "usage": "Verify"}]);
        Ok(v)
    }

    /// The principal and public key registered under a certificate thumbprint (hex; SHA-256,
    /// or SHA-1 when `sha1`).
    pub(crate) fn certificate_credential(
        &self,
        thumbprint: &str,
        sha1: bool,
    ) -> Option<(PrincipalRecord, Vec<u8>)> {
        let d = self.state();
        let c = d.certificates.iter().find(|c| {
            let t = if sha1 { &c.sha1 } else { &c.sha256 };
            t.eq_ignore_ascii_case(thumbprint)
        })?;
        d.principals
            .get(&c.object_id)
            .map(|p| (p.clone(), c.spki.clone()))
    }

    /// Deletes a service principal; its tokens stop working on the next request.
    pub async fn delete_service_principal(
        &self,
        caller: &Principal,
        object_id: &str,
    ) -> Result<(), KvError> {
        self.require_admin(caller)?;
        let oid = guid(object_id)?;
        let p = self.state().principals.get(&oid).cloned().ok_or_else(|| {
            KvError::new(
                ErrorCode::NotFound,
                format!("Principal '{oid}' does not exist."),
            )
        })?;
        if p.kind != kind::SERVICE_PRINCIPAL {
            return Err(bad(format!(
                "Principal '{oid}' is a {}; delete the resource it belongs to instead.",
                p.kind
            )));
        }
        self.store
            .delete_principal(&oid)
            .await
            .map_err(|e| internal("delete principal", e))?;
        self.state_mut().principals.remove(&oid);
        tracing::info!(object_id = %oid, "service principal deleted");
        Ok(())
    }

    /// Issues a new client secret for a service principal (the old one stops working).
    pub async fn reset_service_principal_secret(
        &self,
        caller: &Principal,
        object_id: &str,
    ) -> Result<Value, KvError> {
        let mut p = self.service_principal(caller, object_id)?;
        let oid = p.object_id.clone();
        let secret = new_secret()?;
        p.secret_hash = kagi_identity::hash_secret(&secret);
        self.store
            .set_principal_secret(&oid, &p.secret_hash)
            .await
            .map_err(|e| internal("reset secret", e))?;
        self.state_mut().principals.insert(oid, p.clone());
        let mut v = principal_json(&p);
        // Graph's passwordCredential beside kagi's own field (`az ad sp credential reset`
        // reads `secretText`).
        v["clientSecret"] = json!(secret);
        v["secretText"] = json!(secret);
        v["keyId"] = json!(crate::graph::password_key_id(&p.secret_hash));
        v["hint"] = json!(secret.chars().take(3).collect::<String>());
        v["startDateTime"] = json!(rfc3339(self.clock.now()));
        v["endDateTime"] = Value::Null;
        Ok(v)
    }
}

/// A principal as the directory API shows it (never its secret).
pub(crate) fn principal_json(p: &PrincipalRecord) -> Value {
    json!({
        "objectId": p.object_id,
        "clientId": p.client_id,
        "tenantId": p.tenant_id,
        "displayName": p.display_name,
        "principalType": p.kind,
        "resourceId": p.resource_id,
        "createdDateTime": rfc3339(p.created),
    })
}

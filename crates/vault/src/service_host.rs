//! [`Platform`] as the host of storage services ([`ServiceHost`]): each method is the
//! platform's own, under the name a service knows it by. Services' own keys are sealed under
//! their own purpose ([`SealPurpose::ServiceKey`]); what an earlier kagi sealed for them under
//! the token-signing purpose still opens, and comes back sealed again under the new one.

use async_trait::async_trait;
use kagi_core::KvError;
use kagi_crypto::{RootKey, SealPurpose};
use kagi_host::{
    HostConfig, KeyVaultFacts, MoveRequest, OpenedSecret, Principal, PutResource, ResourceRef,
    ResourceScope, ServiceHost,
};
use serde_json::Value;

use crate::{Platform, internal};

/// Results of the host: errors in the API's own format.
type Result<T, E = KvError> = std::result::Result<T, E>;

/// The additional data binding a service's secret to its label.
fn secret_aad(label: &str) -> Vec<u8> {
    format!("kagi/v1/platform/{label}").into_bytes()
}

impl Platform {
    /// The stored body of user-assigned identity `id`, or ARM's 400.
    fn user_assigned_body(&self, id: &str) -> Result<Value> {
        self.dir()
            .resources
            .get(&id.to_ascii_lowercase())
            .filter(|(r, _)| {
                r.resource_type
                    .eq_ignore_ascii_case("Microsoft.ManagedIdentity/userAssignedIdentities")
            })
            .map(|(_, body)| body.clone())
            .ok_or_else(|| {
                KvError::new(
                    kagi_core::ErrorCode::BadRequest,
                    format!(
                        "User-assigned identity '{}' does not exist.",
                        kagi_core::ids::printable(id)
                    ),
                )
                .with_inner("UserAssignedIdentityNotFound")
            })
    }
}

#[async_trait]
impl ServiceHost for Platform {
    fn now(&self) -> i64 {
        Platform::now(self)
    }

    fn config(&self) -> HostConfig {
        let c = Platform::config(self);
        HostConfig {
            data_dir: c.data_dir.clone(),
            dns_suffix: c.dns_suffix.clone(),
            port: c.port,
            blobs: self.blobs(),
        }
    }

    async fn put_resource(&self, caller: &Principal, put: PutResource<'_>) -> Result<(u16, Value)> {
        let (s, g, t, name) = put.at.parts();
        self.put_service_resource(caller, s, g, t, name, put.body, put.identity)
            .await
    }

    fn get_resource(&self, caller: &Principal, at: ResourceRef<'_>) -> Result<Value> {
        let (s, g, t, name) = at.parts();
        self.get_service_resource(caller, s, g, t, name)
    }

    async fn delete_resource(&self, caller: &Principal, at: ResourceRef<'_>) -> Result<u16> {
        let (s, g, t, name) = at.parts();
        self.delete_service_resource(caller, s, g, t, name).await
    }

    fn resource(&self, id: &str) -> Option<Value> {
        self.service_resource(id)
    }

    fn list_resources(&self, caller: &Principal, scope: ResourceScope<'_>) -> Result<Value> {
        let s = scope;
        self.list_service_resources(caller, s.subscription, s.resource_group, s.resource_type)
    }

    fn resources_of_type(&self, resource_type: &str) -> Vec<Value> {
        self.service_resources_of_type(resource_type)
    }

    async fn move_resource(&self, caller: &Principal, to: MoveRequest<'_>) -> Result<Value> {
        let m = to;
        self.move_service_resource(caller, m.id, m.subscription, m.resource_group, m.dry_run)
            .await
    }

    async fn document(&self, id: &str, kind: &str, name: &str) -> Result<Option<Value>> {
        self.service_document(id, kind, name).await
    }

    async fn put_document(&self, id: &str, kind: &str, name: &str, doc: &Value) -> Result<()> {
        self.put_service_document(id, kind, name, doc).await
    }

    async fn documents_of_kind(&self, kind: &str) -> Result<Vec<(String, String, Value)>> {
        self.service_documents_of_kind(kind).await
    }

    async fn put_document_if(
        &self,
        id: &str,
        (kind, name): (&str, &str),
        doc: &Value,
        guard: (&str, &str, &str),
        expected: Option<&Value>,
    ) -> Result<bool> {
        self.put_service_document_if(id, (kind, name), doc, guard, expected)
            .await
    }

    async fn delete_document(&self, id: &str, kind: &str, name: &str) -> Result<bool> {
        self.delete_service_document(id, kind, name).await
    }

    async fn documents(&self, id: &str, kind: &str) -> Result<Vec<(String, Value)>> {
        self.service_documents(id, kind).await
    }

    async fn clear_records(&self, id: &str) -> Result<()> {
        self.clear_service_data(id).await
    }

    async fn import_records(
        &self,
        id: &str,
        documents: &[(String, String, Value)],
        activity: &[(i64, Value)],
    ) -> Result<()> {
        self.import_service_data(id, documents, activity).await
    }

    async fn append_activity(&self, id: &str, entry: &Value) -> Result<()> {
        self.append_service_activity(id, entry).await
    }

    async fn activity(&self, id: &str) -> Result<Vec<Value>> {
        self.service_activity(id).await
    }

    fn identity_token(&self, id: &str, user_assigned: Option<&str>) -> Result<String> {
        Platform::identity_token(self, id, user_assigned)
    }

    fn user_assigned_identity(&self, id: &str) -> Result<Value> {
        self.user_assigned_body(id).map(|body| {
            serde_json::json!({
                "principalId": body["properties"]["principalId"],
                "clientId": body["properties"]["clientId"],
                "tenantId": body["properties"]["tenantId"],
            })
        })
    }

    fn user_assigned_token(&self, id: &str, for_resource: &str) -> Result<String> {
        let body = self.user_assigned_body(id)?;
        let oid = body["properties"]["principalId"]
            .as_str()
            .ok_or_else(|| internal("user-assigned identity", "no principal id"))?
            .to_string();
        self.service_identity_token(&oid, &for_resource.to_ascii_lowercase())
    }

    fn authenticate(&self, token: &str) -> Result<Principal> {
        Platform::authenticate(self, token)
    }

    fn identity_tenant_problem(&self, id: &str, user_assigned: Option<&str>) -> Option<KvError> {
        self.managed_identity_tenant_problem(id, user_assigned)
    }

    fn subscription_tenant(&self, sub: &str) -> Option<String> {
        self.subscription_tenant_now(sub)
    }

    fn key_vault_facts(&self, vault: &str) -> Option<KeyVaultFacts> {
        Platform::key_vault_facts(self, vault)
    }

    fn key_vault_soft_deleted(&self, vault: &str) -> bool {
        Platform::key_vault_soft_deleted(self, vault)
    }

    async fn policy_deny(&self, id: &str, body: &Value) -> Result<Option<KvError>> {
        Platform::policy_deny(self, id, body).await
    }

    fn seal_secret(&self, label: &str, data: &[u8]) -> Result<Vec<u8>> {
        seal_secret(self.root.as_ref(), label, data)
    }

    fn open_secret(&self, label: &str, sealed: &[u8]) -> Result<OpenedSecret> {
        open_secret(self.root.as_ref(), label, sealed)
    }

    async fn acquire_lease(&self, name: &str, ttl_ms: i64) -> Result<bool> {
        self.store
            .acquire_lease(name, crate::node_id(), ttl_ms)
            .await
            .map(|fence| fence.is_some())
            .map_err(|e| internal("take a service lease", e))
    }

    async fn release_lease(&self, name: &str) -> Result<()> {
        self.store
            .release_lease(name, crate::node_id())
            .await
            .map_err(|e| internal("give a service lease up", e))
    }

    fn node_name(&self) -> String {
        self.node_name.clone()
    }

    fn shares_store(&self) -> bool {
        Platform::shares_store(self)
    }

    async fn live_nodes(&self) -> Result<Vec<kagi_host::NodeCard>> {
        Platform::live_nodes(self).await
    }
}

/// Seals a service's secret under the `service-key` purpose.
fn seal_secret(root: &dyn RootKey, label: &str, data: &[u8]) -> Result<Vec<u8>> {
    root.seal(SealPurpose::ServiceKey, &secret_aad(label), data)
        .map_err(|e| internal("seal service secret", e))
}

/// Opens a service's secret: under the `service-key` purpose, or — sealed by an earlier kagi —
/// under the token-signing one (as the TLS CA key still is), then sealed again.
fn open_secret(root: &dyn RootKey, label: &str, sealed: &[u8]) -> Result<OpenedSecret> {
    let aad = secret_aad(label);
    if let Ok(secret) = root.open(SealPurpose::ServiceKey, &aad, sealed) {
        return Ok(OpenedSecret {
            secret,
            resealed: None,
        });
    }
    let secret = root
        .open(SealPurpose::Token, &aad, sealed)
        .map_err(|e| internal("open service secret", e))?;
    let resealed = Some(seal_secret(root, label, &secret)?);
    Ok(OpenedSecret { secret, resealed })
}

#[cfg(test)]
mod tests {
    use kagi_crypto::AesRootKey;

    use super::*;

    #[test]
    fn service_secrets_have_their_own_purpose_and_old_ones_still_open() {
        let (root, _) = AesRootKey::generate().unwrap();
        // A new secret opens as it is, and neither under another label nor as a token one.
        let sealed = seal_secret(&root, "backup-pmk/x", b"pmk").unwrap();
        let opened = open_secret(&root, "backup-pmk/x", &sealed).unwrap();
        assert_eq!((&opened.secret[..], opened.resealed), (&b"pmk"[..], None));
        assert!(open_secret(&root, "backup-pmk/y", &sealed).is_err());
        let aad = secret_aad("backup-pmk/x");
        assert!(root.open(SealPurpose::Token, &aad, &sealed).is_err());
        // What an earlier kagi sealed (token purpose) opens and comes back sealed anew.
        let old = root.seal(SealPurpose::Token, &aad, b"pmk").unwrap();
        let opened = open_secret(&root, "backup-pmk/x", &old).unwrap();
        assert_eq!(&opened.secret[..], b"pmk");
        let again = open_secret(&root, "backup-pmk/x", &opened.resealed.unwrap()).unwrap();
        assert_eq!((&again.secret[..], again.resealed), (&b"pmk"[..], None));
    }
}

//! [`Platform`] as the host of storage services ([`ServiceHost`]): each method is the
//! platform's own, under the name a service knows it by. Services' own keys are sealed under
//! their own purpose ([`SealPurpose::ServiceKey`]); what an earlier kagi sealed for them under
//! the token-signing purpose still opens, and comes back sealed again under the new one.

use async_trait::async_trait;
use kagi_core::KvError;
use kagi_crypto::SealPurpose;
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
        self.root
            .seal(SealPurpose::ServiceKey, &secret_aad(label), data)
            .map_err(|e| internal("seal service secret", e))
    }

    fn open_secret(&self, label: &str, sealed: &[u8]) -> Result<OpenedSecret> {
        let aad = secret_aad(label);
        if let Ok(secret) = self.root.open(SealPurpose::ServiceKey, &aad, sealed) {
            return Ok(OpenedSecret {
                secret,
                resealed: None,
            });
        }
        // Sealed by an earlier kagi, under the token-signing purpose (as the TLS CA key is).
        let secret = self
            .root
            .open(SealPurpose::Token, &aad, sealed)
            .map_err(|e| internal("open service secret", e))?;
        let resealed = Some(self.seal_secret(label, &secret)?);
        Ok(OpenedSecret { secret, resealed })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kagi_core::time::SystemClock;

    use super::*;
    use crate::PlatformConfig;

    #[tokio::test]
    async fn service_secrets_have_their_own_purpose_and_old_ones_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let config = PlatformConfig {
            data_dir: dir.path().to_path_buf(),
            dns_suffix: "localhost".into(),
            port: 8443,
        };
        let (p, _) = Platform::open(config, Arc::new(SystemClock)).await.unwrap();
        let host: &dyn ServiceHost = &p;
        // A new secret opens as it is and does not open as a platform (token-purpose) one.
        let sealed = host.seal_secret("backup-pmk/x", b"pmk").unwrap();
        let opened = host.open_secret("backup-pmk/x", &sealed).unwrap();
        assert_eq!(&opened.secret[..], b"pmk");
        assert!(opened.resealed.is_none());
        assert!(p.open_platform_secret("backup-pmk/x", &sealed).is_err());
        assert!(host.open_secret("backup-pmk/y", &sealed).is_err());
        // What an earlier kagi sealed (token purpose) opens and comes back sealed anew.
        let old = p.seal_platform_secret("backup-pmk/x", b"pmk").unwrap();
        let opened = host.open_secret("backup-pmk/x", &old).unwrap();
        assert_eq!(&opened.secret[..], b"pmk");
        let resealed = opened.resealed.unwrap();
        let again = host.open_secret("backup-pmk/x", &resealed).unwrap();
        assert_eq!(&again.secret[..], b"pmk");
        assert!(again.resealed.is_none());
        assert_eq!(host.config().authority(), p.config().authority());
    }
}

//! The backup service on a host that is not kagi's platform: a small in-memory
//! [`ServiceHost`]. What the service needs of its host is the trait and nothing else; a vault
//! with the platform key protects a folder, backs it up and restores it, and its records are
//! where the host keeps them.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kagi_backup_service::{ArmRequest, BackupService, ServiceConfig};
use kagi_core::{ErrorCode, KvError};
use kagi_crypto::data_key::DataKey;
use kagi_host::{
    HostConfig, KeyVaultFacts, MoveRequest, OpenedSecret, Principal, PutResource, ResourceRef,
    ResourceScope, ServiceHost,
};
use serde_json::{Value, json};

const SUB: &str = "00000000-0000-0000-0000-000000000001";

/// Resources, documents and activity in memory; secrets sealed under a key of its own.
#[derive(Debug)]
struct FakeHost {
    data_dir: std::path::PathBuf,
    seal_key: [u8; 32],
    resources: Mutex<BTreeMap<String, Value>>,
    documents: Mutex<BTreeMap<(String, String, String), Value>>,
    activity: Mutex<HashMap<String, Vec<Value>>>,
}

fn key(id: &str) -> String {
    id.trim_end_matches('/').to_ascii_lowercase()
}

fn arm_id(at: ResourceRef<'_>) -> String {
    let (s, g, t, n) = at.parts();
    format!("/subscriptions/{s}/resourceGroups/{g}/providers/{t}/{n}")
}

fn unsupported(what: &str) -> KvError {
    KvError::new(
        ErrorCode::BadRequest,
        format!("the fake host has no {what}"),
    )
}

#[async_trait]
impl ServiceHost for FakeHost {
    fn now(&self) -> i64 {
        1_900_000_000
    }

    fn config(&self) -> HostConfig {
        HostConfig {
            data_dir: self.data_dir.clone(),
            dns_suffix: "localhost".into(),
            port: 8443,
            blobs: kagi_blobs::BlobRoot::local(&self.data_dir),
        }
    }

    async fn put_resource(
        &self,
        _: &Principal,
        put: PutResource<'_>,
    ) -> Result<(u16, Value), KvError> {
        let id = arm_id(put.at);
        let body = json!({
            "id": id, "name": put.at.name, "type": put.at.resource_type,
            "location": put.body["location"], "tags": put.body.get("tags").cloned().unwrap_or(json!({})),
            "identity": put.identity.cloned().unwrap_or(Value::Null),
            "properties": put.body["properties"],
        });
        let old = self
            .resources
            .lock()
            .unwrap()
            .insert(key(&id), body.clone());
        Ok((if old.is_some() { 200 } else { 201 }, body))
    }

    fn get_resource(&self, _: &Principal, at: ResourceRef<'_>) -> Result<Value, KvError> {
        self.resource(&arm_id(at))
            .ok_or_else(|| KvError::new(ErrorCode::ResourceNotFound, "no such resource"))
    }

    async fn delete_resource(&self, _: &Principal, at: ResourceRef<'_>) -> Result<u16, KvError> {
        let id = key(&arm_id(at));
        if self.resources.lock().unwrap().remove(&id).is_none() {
            return Ok(204);
        }
        self.clear_records(&id).await?;
        Ok(200)
    }

    fn resource(&self, id: &str) -> Option<Value> {
        self.resources.lock().unwrap().get(&key(id)).cloned()
    }

    fn list_resources(&self, _: &Principal, scope: ResourceScope<'_>) -> Result<Value, KvError> {
        let value: Vec<Value> = self
            .resources_of_type(scope.resource_type)
            .into_iter()
            .filter(|r| {
                let id = key(r["id"].as_str().unwrap_or_default());
                let rg = scope
                    .resource_group
                    .map(|g| format!("/resourcegroups/{}/", key(g)));
                id.starts_with(&format!("/subscriptions/{}/", key(scope.subscription)))
                    && rg.is_none_or(|g| id.contains(&g))
            })
            .collect();
        Ok(json!({ "value": value }))
    }

    fn resources_of_type(&self, resource_type: &str) -> Vec<Value> {
        let all = self.resources.lock().unwrap();
        all.values()
            .filter(|r| {
                r["type"]
                    .as_str()
                    .is_some_and(|t| t.eq_ignore_ascii_case(resource_type))
            })
            .cloned()
            .collect()
    }

    async fn move_resource(&self, _: &Principal, _: MoveRequest<'_>) -> Result<Value, KvError> {
        Err(unsupported("moves"))
    }

    async fn document(&self, id: &str, kind: &str, name: &str) -> Result<Option<Value>, KvError> {
        let k = (key(id), kind.to_string(), name.to_string());
        Ok(self.documents.lock().unwrap().get(&k).cloned())
    }

    async fn put_document(
        &self,
        id: &str,
        kind: &str,
        name: &str,
        doc: &Value,
    ) -> Result<(), KvError> {
        let k = (key(id), kind.to_string(), name.to_string());
        self.documents.lock().unwrap().insert(k, doc.clone());
        Ok(())
    }

    async fn documents_of_kind(&self, kind: &str) -> Result<Vec<(String, String, Value)>, KvError> {
        let docs = self.documents.lock().unwrap();
        Ok(docs
            .iter()
            .filter(|((_, k, _), _)| k == kind)
            .map(|((i, _, n), v)| (i.clone(), n.clone(), v.clone()))
            .collect())
    }

    async fn put_document_if(
        &self,
        id: &str,
        (kind, name): (&str, &str),
        doc: &Value,
        (guard_id, guard_kind, guard_name): (&str, &str, &str),
        expected: Option<&Value>,
    ) -> Result<bool, KvError> {
        let mut docs = self.documents.lock().unwrap();
        let g = (
            key(guard_id),
            guard_kind.to_string(),
            guard_name.to_string(),
        );
        if docs.get(&g) != expected {
            return Ok(false);
        }
        let k = (key(id), kind.to_string(), name.to_string());
        docs.insert(k, doc.clone());
        Ok(true)
    }

    async fn delete_document(&self, id: &str, kind: &str, name: &str) -> Result<bool, KvError> {
        let k = (key(id), kind.to_string(), name.to_string());
        Ok(self.documents.lock().unwrap().remove(&k).is_some())
    }

    async fn documents(&self, id: &str, kind: &str) -> Result<Vec<(String, Value)>, KvError> {
        let docs = self.documents.lock().unwrap();
        Ok(docs
            .iter()
            .filter(|((i, k, _), _)| *i == key(id) && k == kind)
            .map(|((_, _, n), v)| (n.clone(), v.clone()))
            .collect())
    }

    async fn clear_records(&self, id: &str) -> Result<(), KvError> {
        self.documents
            .lock()
            .unwrap()
            .retain(|(i, _, _), _| *i != key(id));
        self.activity.lock().unwrap().remove(&key(id));
        Ok(())
    }

    async fn import_records(
        &self,
        _: &str,
        _: &[(String, String, Value)],
        _: &[(i64, Value)],
    ) -> Result<(), KvError> {
        Err(unsupported("earlier records"))
    }

    async fn append_activity(&self, id: &str, entry: &Value) -> Result<(), KvError> {
        let mut log = self.activity.lock().unwrap();
        log.entry(key(id)).or_default().push(entry.clone());
        Ok(())
    }

    async fn activity(&self, id: &str) -> Result<Vec<Value>, KvError> {
        Ok(self
            .activity
            .lock()
            .unwrap()
            .get(&key(id))
            .cloned()
            .unwrap_or_default())
    }

    fn identity_token(&self, _: &str, _: Option<&str>) -> Result<String, KvError> {
        Err(unsupported("identities"))
    }

    fn authenticate(&self, _: &str) -> Result<Principal, KvError> {
        Err(unsupported("tokens"))
    }

    fn identity_tenant_problem(&self, _: &str, _: Option<&str>) -> Option<KvError> {
        None
    }

    fn subscription_tenant(&self, _: &str) -> Option<String> {
        None
    }

    fn key_vault_facts(&self, _: &str) -> Option<KeyVaultFacts> {
        None
    }

    fn key_vault_soft_deleted(&self, _: &str) -> bool {
        false
    }

    async fn policy_deny(&self, _: &str, _: &Value) -> Result<Option<KvError>, KvError> {
        Ok(None)
    }

    fn seal_secret(&self, label: &str, data: &[u8]) -> Result<Vec<u8>, KvError> {
        let k = DataKey::from_bytes(&self.seal_key).map_err(|_| KvError::internal())?;
        k.seal(label.as_bytes(), data)
            .map_err(|_| KvError::internal())
    }

    fn open_secret(&self, label: &str, sealed: &[u8]) -> Result<OpenedSecret, KvError> {
        let k = DataKey::from_bytes(&self.seal_key).map_err(|_| KvError::internal())?;
        let secret = k
            .open(label.as_bytes(), sealed)
            .map_err(|_| KvError::internal())?;
        Ok(OpenedSecret {
            secret: secret.into(),
            resealed: None,
        })
    }
}

fn admin() -> Principal {
    Principal {
        tenant_id: "t1".into(),
        object_id: "admin".into(),
        client_id: "admin".into(),
        kind: "ServicePrincipal".into(),
        network_address: None,
        upn: None,
    }
}

fn segments(path: &str) -> Vec<&str> {
    path.trim_matches('/').split('/').collect()
}

/// `method path` with `body` to the service, as the HTTP layer would hand it over.
async fn call(svc: &Arc<BackupService>, method: &str, path: &str, body: Value) -> (u16, Value) {
    let lower = path.to_ascii_lowercase();
    let (segs, l) = (segments(path), segments(&lower));
    let body = match body {
        Value::Null => Vec::new(),
        b => b.to_string().into_bytes(),
    };
    let req = ArmRequest {
        method,
        segs: &segs,
        l: &l,
        body: &body,
        wait: Some(Duration::from_secs(30)),
    };
    match svc.handle(&admin(), req).await {
        Ok(r) => r,
        Err(e) => (
            e.code.status(),
            json!({"code": e.inner, "message": e.message}),
        ),
    }
}

/// Starts a job and reads it back once it has ended (the read waits for the end).
async fn run_job(svc: &Arc<BackupService>, vault: &str, path: &str, body: Value) -> Value {
    let (st, job) = call(svc, "POST", path, body).await;
    assert_eq!(st, 202, "{job}");
    let name = job["name"].as_str().unwrap();
    let (st, job) = call(
        svc,
        "GET",
        &format!("{vault}/backupJobs/{name}"),
        Value::Null,
    )
    .await;
    assert_eq!(st, 200, "{job}");
    job
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_is_protected_backed_up_and_restored_on_a_fake_host() {
    let dir = tempfile::tempdir().unwrap();
    let host = Arc::new(FakeHost {
        data_dir: dir.path().join("data"),
        seal_key: [9; 32],
        resources: Mutex::default(),
        documents: Mutex::default(),
        activity: Mutex::default(),
    });
    let svc = BackupService::new(host.clone(), svc_config());
    let vault = format!(
        "/subscriptions/{SUB}/resourceGroups/rg1/providers/Microsoft.RecoveryServices/vaults/bv1"
    );
    let (st, v) = call(&svc, "PUT", &vault, json!({"location": "westeurope"})).await;
    assert_eq!(st, 201, "{v}");

    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), "alpha").unwrap();
    std::fs::write(src.join("b.bin"), vec![7u8; 100_000]).unwrap();
    let item = format!("{vault}/backupProtectedItems/docs");
    let (st, v) = call(
        &svc,
        "PUT",
        &item,
        json!({"properties": {"sourcePath": src}}),
    )
    .await;
    assert_eq!(st, 201, "{v}");

    let job = run_job(&svc, &vault, &format!("{item}/backup"), Value::Null).await;
    assert_eq!(job["status"], "Completed", "{job}");
    let rp = job["stats"]["recoveryPointId"]
        .as_str()
        .unwrap()
        .to_string();

    // A fresh service over the same host (a restart) finds the item, its key and its data.
    let svc = BackupService::new(host.clone(), svc_config());
    let (st, rps) = call(&svc, "GET", &format!("{item}/recoveryPoints"), Value::Null).await;
    assert_eq!(st, 200, "{rps}");
    assert_eq!(rps["value"][0]["name"], rp.as_str());
    let target = dir.path().join("restored");
    let body = json!({"recoveryPointId": rp, "targetPath": target});
    let job = run_job(&svc, &vault, &format!("{item}/restore"), body).await;
    assert_eq!(job["status"], "Completed", "{job}");
    assert_eq!(files(&target), files(&src));

    // The vault's records are the host's: its state (the platform key, sealed by the host)
    // and its activity log.
    let state = host.document(&vault, "state", "").await.unwrap().unwrap();
    let sealed = kagi_core::b64::decode(state["pmkSealed"].as_str().unwrap()).unwrap();
    let label = format!("backup-pmk/{}", vault.to_ascii_lowercase());
    assert_eq!(host.open_secret(&label, &sealed).unwrap().secret.len(), 32);
    assert!(state["items"]["docs"].is_object(), "{state}");
    let log = host.activity(&vault).await.unwrap();
    let ops: Vec<&str> = log
        .iter()
        .filter_map(|e| e["operationName"].as_str())
        .collect();
    assert!(
        ops.contains(&"Microsoft.RecoveryServices/vaults/write"),
        "{ops:?}"
    );
    assert!(
        ops.contains(&"Microsoft.RecoveryServices/vaults/backupProtectedItems/write"),
        "{ops:?}"
    );
}

/// No key vault is ever called: the vault keeps the platform key.
fn svc_config() -> ServiceConfig {
    ServiceConfig {
        key_cache_lifetime: Duration::from_secs(600),
        key_poll_interval: Duration::from_secs(3600),
        connect: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9))),
    }
}

//! kagi-cmk against a real kagi server: a resource of some storage service (not a backup
//! vault) validates a key with its own managed identity, follows the key's versions, keeps
//! the record of which version wraps its data key, re-wraps it once per new version, and tells
//! a key that has become unusable from one that cannot be reached.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use kagi_cmk::{
    Dek, DekSlot, FailureKind, Kek, KekRef, KeyAccess, KeyError, KeyOwner, KeyRequest, Resolved,
    VersionInUse, WrappedKey,
};
use kagi_core::KvError;
use kagi_host::{PutResource, ResourceRef, ServiceHost};
use kagi_testkit::{Options, TestServer};

/// Disables version `path` (`/keys/cmk[/{version}]`) of key vault `kvd`.
async fn disable(s: &TestServer, path: &str) {
    let off = json!({"attributes": {"enabled": false}});
    let (st, v) = s.data("PATCH", "kvd", path, Some(off)).await;
    assert_eq!(st, 200, "{v}");
}
use serde_json::json;

const HOUR: Duration = Duration::from_secs(3600);

/// A resource's wrapped data keys, in memory.
#[derive(Default)]
struct Records(Mutex<Vec<WrappedKey>>);

#[async_trait]
impl KeyOwner for Records {
    async fn wrapped_keys(&self) -> Result<Vec<WrappedKey>, KvError> {
        Ok(self.0.lock().unwrap().clone())
    }

    async fn add_wrapped_key(&self, key: WrappedKey) -> Result<(), KvError> {
        self.0.lock().unwrap().push(key);
        Ok(())
    }

    async fn platform_key(&self) -> Result<Dek, KvError> {
        Err(KvError::internal())
    }

    async fn platform_aad(&self) -> Result<Vec<u8>, KvError> {
        Ok(b"disk".to_vec())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_wraps_its_data_key_with_its_own_identity_and_follows_key_versions() {
    let s = TestServer::start(Options::default()).await;
    let sub = s.admin.subscription_id.clone();
    let group = format!("/subscriptions/{sub}/resourceGroups/rg1");
    let (st, v) = s
        .arm("PUT", &group, Some(json!({"location": "westeurope"})))
        .await;
    assert_eq!(st, 201, "{v}");
    let kv = format!("{group}/providers/Microsoft.KeyVault/vaults/kvd");
    let vault_body = |policies: serde_json::Value| {
        json!({"location": "westeurope", "properties": {
            "tenantId": s.admin.tenant_id, "sku": {"family": "A", "name": "standard"},
            "enablePurgeProtection": true, "softDeleteRetentionInDays": 7,
            "accessPolicies": policies}})
    };
    let (st, v) = s.arm("PUT", &kv, Some(vault_body(json!([])))).await;
    assert_eq!(st, 201, "{v}");
    let rsa = json!({"kty": "RSA", "key_size": 3072});
    let (st, v) = s.data("POST", "kvd", "/keys/cmk/create", Some(rsa)).await;
    assert_eq!(st, 200, "{v}");

    // A resource of another storage service, with a system-assigned identity.
    let host: &dyn ServiceHost = s.platform.as_ref();
    let admin = s.platform.authenticate(&s.token).unwrap();
    let at = ResourceRef {
        subscription: &sub,
        resource_group: "rg1",
        resource_type: "Microsoft.Compute/diskEncryptionSets",
        name: "des1",
    };
    let identity = json!({"type": "SystemAssigned"});
    let put = PutResource {
        at,
        body: json!({"location": "westeurope"}),
        identity: Some(&identity),
    };
    let (st, des) = host.put_resource(&admin, put).await.unwrap();
    assert_eq!(st, 201, "{des}");
    let id = des["id"].as_str().unwrap().to_string();
    let oid = des["identity"]["principalId"].as_str().unwrap().to_string();

    let keys = KeyAccess::new(
        &host.config(),
        s.addr,
        "disk encryption set",
        "kagi-cmk-test",
    );
    let key_uri = s.vault_url("kvd", "/keys/cmk");
    let who = format!("system-assigned identity {oid}");
    let req = KeyRequest {
        key_uri: &key_uri,
        resource_id: &id,
        location: "westeurope",
        user_assigned: None,
        who: &who,
    };
    // Probed, not assumed: without a grant the identity cannot even read the key.
    let e = keys.validate(host, &req).await.unwrap_err();
    assert_eq!(e.inner, Some("IdentityLacksKeyPermission"), "{}", e.message);
    assert!(e.message.contains("'get'"), "{}", e.message);
    let grant = json!([{"tenantId": s.admin.tenant_id, "objectId": oid,
        "permissions": {"keys": ["get", "list", "wrapKey", "unwrapKey"]}}]);
    let (st, v) = s.arm("PUT", &kv, Some(vault_body(grant))).await;
    assert_eq!(st, 200, "{v}");
    let kid1 = keys.validate(host, &req).await.unwrap();
    assert!(kid1.starts_with(&format!("{key_uri}/")), "{kid1}");

    // The version in force: read once, then kept for the poll interval.
    let token = host.identity_token(&id, None).unwrap();
    let key = keys.parse(&key_uri).unwrap();
    let now = host.now();
    let fresh = keys
        .resolve_version(&key, &token, &VersionInUse::default(), HOUR, now)
        .await
        .unwrap();
    assert_eq!(
        fresh,
        Resolved::Fresh {
            kid: kid1.clone(),
            changed: true
        }
    );
    let in_use = VersionInUse {
        kid: Some(kid1.clone()),
        resolved_at: now,
    };
    let recent = keys.resolve_version(&key, &token, &in_use, HOUR, now).await;
    assert_eq!(recent.unwrap(), Resolved::Recent(kid1.clone()));
    let pinned = keys.parse(&kid1).unwrap();
    let r = keys
        .resolve_version(&pinned, &token, &in_use, HOUR, now)
        .await;
    assert_eq!(r.unwrap(), Resolved::Pinned(kid1.clone()));

    // The data key, wrapped under version 1 (RSA-OAEP-256 by the key vault).
    let records = Records::default();
    let customer = |kid: &str| Kek::Customer {
        kid: kid.to_string(),
        token: token.clone(),
        who: who.clone(),
    };
    let dek = Dek::new([5; 32]);
    let first = keys
        .wrap(&records, &customer(&kid1), &dek, now)
        .await
        .unwrap();
    assert_ne!(first.wrapped, dek.to_vec());
    records.add_wrapped_key(first).await.unwrap();
    let slot = DekSlot::default();
    let opened = keys
        .data_key(&records, &customer(&kid1), &slot, Duration::ZERO, now)
        .await
        .unwrap();
    assert_eq!((*opened.dek, opened.written), ([5; 32], 0));

    // A new version: resolved once the interval is over, adopted by one more record.
    let (st, rotated) = s.data("POST", "kvd", "/keys/cmk/rotate", None).await;
    assert_eq!(st, 200, "{rotated}");
    let later = keys
        .resolve_version(&key, &token, &in_use, Duration::ZERO, now)
        .await;
    let Resolved::Fresh {
        kid: kid2,
        changed: true,
    } = later.unwrap()
    else {
        panic!("the new version was not resolved");
    };
    assert_eq!(rotated["key"]["kid"], kid2.as_str());
    for written in [1, 0] {
        let opened = keys
            .data_key(&records, &customer(&kid2), &slot, Duration::ZERO, now)
            .await
            .unwrap();
        assert_eq!(
            (*opened.dek, opened.written, opened.kek_id.as_str()),
            ([5; 32], written, kid2.as_str())
        );
    }
    let held = records.wrapped_keys().await.unwrap();
    let by: Vec<String> = held.iter().map(|r| r.kek.id()).collect();
    assert_eq!(by, [kid1.clone(), kid2.clone()]);

    // Many data keys (the disks of a set) re-wrapped in one step: one copy each, whatever the
    // data; a damaged one is reported and the rest go on; a re-run asks nothing of the vault.
    let disks: Vec<Records> = (0..3).map(|_| Records::default()).collect();
    for (n, d) in disks.iter().enumerate() {
        let dek = Dek::new([n as u8; 32]);
        let r = keys.wrap(d, &customer(&kid1), &dek, now).await.unwrap();
        d.add_wrapped_key(r).await.unwrap();
    }
    let damaged = Records(Mutex::new(vec![WrappedKey {
        id: "damaged".into(),
        kek: KekRef::Customer(kid1.clone()),
        wrapped: Vec::new(),
        created: now,
    }]));
    let mut owners: Vec<&dyn KeyOwner> = disks.iter().map(|d| d as &dyn KeyOwner).collect();
    owners.push(&damaged);
    let first = keys
        .rewrap_all(&owners, &customer(&kid2), now)
        .await
        .unwrap();
    assert_eq!((first.added, first.already), (3, 0));
    let failed: Vec<usize> = first.failed.iter().map(|f| f.0).collect();
    assert_eq!(failed, [3]);
    let again = keys
        .rewrap_all(&owners[..3], &customer(&kid2), now)
        .await
        .unwrap();
    assert_eq!((again.added, again.already, again.failed.len()), (0, 3, 0));
    for (n, d) in disks.iter().enumerate() {
        let held = d.wrapped_keys().await.unwrap();
        assert_eq!(held.len(), 2);
        // The new copy alone opens the same data key.
        let only_new = Records(Mutex::new(vec![held[1].clone()]));
        let fresh = DekSlot::default();
        let opened = keys
            .data_key(&only_new, &customer(&kid2), &fresh, Duration::ZERO, now)
            .await
            .unwrap();
        assert_eq!((*opened.dek, opened.written), ([n as u8; 32], 0));
    }

    // The key disabled: a definite failure, named, and no data key.
    disable(&s, "/keys/cmk").await;
    match keys.unwrap(&records, &customer(&kid2), &held[1], now).await {
        Err(KeyError::Access(f)) => {
            assert_eq!(f.kind, FailureKind::Definite);
            assert!(f.message.contains("KeyDisabled"), "{}", f.message);
        }
        other => panic!("{other:?}"),
    }
    // The older version still opens it (its record stays until the resource drops it)...
    let uncached = async || {
        let kek = customer(&kid2);
        keys.data_key(&records, &kek, &DekSlot::default(), Duration::ZERO, now)
            .await
    };
    let opened = uncached().await.unwrap();
    assert_eq!((*opened.dek, opened.written), ([5; 32], 0));
    // ...until it is disabled too.
    let v1 = kid1.rsplit('/').next().unwrap();
    disable(&s, &format!("/keys/cmk/{v1}")).await;
    match uncached().await.unwrap_err() {
        KeyError::Unopened(Some(f)) => {
            assert_eq!(f.kind, FailureKind::Definite);
            assert!(f.message.contains("KeyDisabled"), "{}", f.message);
        }
        other => panic!("{other:?}"),
    }
}

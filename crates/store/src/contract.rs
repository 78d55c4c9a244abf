//! The store contract: what every [`Store`] backend promises, as one test per behaviour.
//!
//! Each behaviour is a `pub async fn` here that takes a fresh, empty store and panics when the
//! backend breaks the promise written in its doc comment. [`crate::store_contract!`] turns the
//! whole list into one `#[tokio::test]` per behaviour, so a backend opts in with one line in its
//! test file:
//!
//! ```ignore
//! kagi_store::store_contract!(|| async { kagi_store::contract::Backend::new(MyStore::connect().await, ()) });
//! ```
//!
//! The module is compiled only with the `contract` feature (the crate's own tests turn it on
//! through a dev-dependency on itself), so it is no part of a release build.

// Test code: a broken promise is a panic with the failing value.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod postgres;

use kagi_core::key::{KeyAttributes, KeyOperation, KeyType, KeyVersionInfo, PublicJwk};
use kagi_core::rotation::RotationPolicy;
use kagi_core::secret::{SecretAttributes, SecretVersionInfo};
use kagi_core::vault::{VaultProperties, VaultPropertiesInput};
use kagi_core::{KeyVersion, ObjectName, VaultName};

use crate::directory::BindingRecord;
use crate::events::{EventEmission, EventMark, EventSubscriptionRecord, MarkTable};
use crate::{
    AlertNotification, CertificateRecord, DocumentRef, KeyRecord, KeyVersionRecord, LockRecord,
    MonitorRecord, PrincipalRecord, ResourceGroupRecord, ResourceRecord, RoleAssignmentRecord,
    RoleDefinitionRecord, SecretRecord, SecretVersionRecord, ServiceDocument, ServiceImport, Store,
    StoreError, VaultRecord,
};

/// A fresh, empty store for one behaviour, and whatever must live as long as it (a temporary
/// directory, a scratch database to drop).
pub struct Backend {
    /// The store under test.
    pub store: Box<dyn Store>,
    /// Dropped after the store.
    pub guard: Box<dyn std::any::Any + Send>,
}

impl Backend {
    /// A store and its guard.
    pub fn new(store: impl Store, guard: impl std::any::Any + Send) -> Self {
        Self {
            store: Box::new(store),
            guard: Box::new(guard),
        }
    }
}

/// Generates one `#[tokio::test]` per behaviour of [`crate::contract`]; `$make` is a closure
/// returning a future of a fresh [`Backend`]. Invoke it inside a module named after the
/// backend (`mod sqlite { kagi_store::store_contract!(…); }`) so the tests read
/// `sqlite::keys_…` in nextest's output.
#[macro_export]
macro_rules! store_contract {
    ($make:expr) => {
        $crate::store_contract!(@each $make;
            meta_is_first_writer_wins,
            subscriptions_are_idempotent_and_listed_by_id,
            resource_groups_are_upserted_and_read_case_insensitively,
            a_resource_group_is_deleted_only_when_empty_with_its_assignments,
            principals_round_trip_and_a_duplicate_client_id_conflicts,
            vaults_are_upserted_and_listed_by_name,
            inserting_a_vault_conflicts_when_the_name_exists,
            replacing_a_vault_needs_the_record_it_replaces,
            purging_a_vault_removes_everything_in_it,
            key_versions_are_added_in_order_and_a_duplicate_conflicts,
            key_versions_are_updated_deleted_and_recovered_case_insensitively,
            inserting_a_key_conflicts_when_the_name_exists,
            purging_a_key_removes_its_versions_policy_and_marks,
            a_later_version_needs_its_object_live,
            a_vault_is_read_by_name,
            secrets_follow_the_same_contract_as_keys,
            rotation_policies_need_their_key_and_are_listed_by_folded_name,
            event_marks_are_recorded_once_and_can_be_unmarked,
            event_subscriptions_are_upserted_listed_and_deleted,
            deliveries_are_due_retried_dead_lettered_and_succeed,
            deleting_a_subscription_drops_its_deliveries_and_dead_letters,
            service_documents_are_put_listed_by_name_and_deleted,
            a_document_is_put_only_while_its_guard_holds,
            service_activity_is_numbered_per_resource,
            service_data_is_deleted_and_imported_once,
            policy_assignments_are_upserted_deleted_and_imported_once,
            principals_are_deleted_and_their_secret_replaced,
            certificates_are_registered_once,
            resources_carry_their_identities_and_go_with_their_data,
            bindings_are_listed_revoked_and_forgotten_once_expired,
            the_signing_key_is_replaced_only_from_the_expected_one,
            role_definitions_assignments_and_locks_round_trip,
            monitor_resources_are_upserted_listed_and_deleted,
            alert_notifications_are_written_with_their_activity_and_delivered,
            a_resource_moves_with_its_identities_and_data,
            a_move_onto_an_existing_resource_conflicts_and_changes_nothing,
            a_vault_moves_and_a_subscription_changes_tenant,
        );
    };
    (@each $make:expr; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let backend: $crate::contract::Backend = ($make)().await;
                $crate::contract::$name(&*backend.store).await;
            }
        )+
    };
}

/// Tenant of the fixtures.
pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// Subscription of the fixtures.
pub const SUB: &str = "00000000-1111-4222-8333-444444444444";

/// A live vault record in [`SUB`], resource group `rg`.
pub fn vault(name: &str) -> VaultRecord {
    let input: VaultPropertiesInput = serde_json::from_value(serde_json::json!({
        "tenantId": TENANT, "sku": {"family": "A", "name": "standard"}
    }))
    .unwrap();
    VaultRecord {
        name: VaultName::parse(name).unwrap(),
        subscription_id: SUB.into(),
        resource_group: "rg".into(),
        location: "westeurope".into(),
        tags: Default::default(),
        properties: VaultProperties::create(input).unwrap(),
        created: 1,
        updated: 1,
        deleted_at: None,
        purge_at: None,
    }
}

/// A key version whose id is made of `i` and `seq`.
pub fn key_version(i: u64, seq: i64) -> KeyVersionRecord {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&i.to_be_bytes());
    bytes[8..].copy_from_slice(&(seq as u64).to_be_bytes());
    KeyVersionRecord {
        version: KeyVersion::from_random(bytes),
        seq,
        info: KeyVersionInfo {
            kty: KeyType::Rsa,
            public: PublicJwk::Rsa {
                n: vec![0xc3; 256],
                e: vec![1, 0, 1],
            },
            key_ops: vec![KeyOperation::WrapKey, KeyOperation::UnwrapKey],
            attributes: KeyAttributes {
                enabled: true,
                nbf: None,
                exp: None,
                created: 10,
                updated: 10,
                exportable: false,
            },
            tags: Default::default(),
        },
        sealed_private: vec![7; 64],
    }
}

/// A secret version whose id and sealed value are made of `i`.
pub fn secret_version(i: u8, seq: i64) -> SecretVersionRecord {
    SecretVersionRecord {
        version: KeyVersion::from_random([i; 16]),
        seq,
        info: SecretVersionInfo {
            content_type: Some("text/plain".into()),
            attributes: SecretAttributes {
                enabled: true,
                nbf: None,
                exp: Some(500),
                created: 10,
                updated: 10,
            },
            tags: Default::default(),
        },
        sealed_value: vec![i; 40],
    }
}

fn name(s: &str) -> ObjectName {
    ObjectName::parse(s).unwrap()
}

fn policy(updated: i64) -> RotationPolicy {
    RotationPolicy {
        lifetime_actions: Vec::new(),
        expiry_time: None,
        created: 1,
        updated,
    }
}

/// A principal numbered `n` (client id `client-{n}`), optionally of a resource.
pub fn principal(n: u8, resource_id: Option<&str>) -> PrincipalRecord {
    PrincipalRecord {
        object_id: format!("oid-{n}"),
        tenant_id: TENANT.into(),
        client_id: format!("client-{n}"),
        display_name: format!("principal {n}"),
        secret_hash: vec![n; 32],
        kind: "ServicePrincipal".into(),
        created: i64::from(n),
        resource_id: resource_id.map(str::to_string),
    }
}

fn resource(id: &str) -> ResourceRecord {
    ResourceRecord {
        id: id.into(),
        resource_type: "microsoft.managedidentity/userassignedidentities".into(),
        subscription_id: SUB.into(),
        resource_group: "rg".into(),
        name: id.rsplit('/').next().unwrap_or(id).into(),
        location: "westeurope".into(),
        body: "{}".into(),
        created: 1,
        updated: 1,
    }
}

fn binding(id: &str, resource_id: &str, created: i64, expires: i64) -> BindingRecord {
    BindingRecord {
        id: id.into(),
        secret_hash: id.as_bytes().to_vec(),
        resource_id: resource_id.into(),
        client_id: None,
        created,
        expires,
    }
}

fn doc(kind: &str, name: &str, body: &str) -> ServiceDocument {
    ServiceDocument {
        kind: kind.into(),
        name: name.into(),
        body: body.into(),
        updated: 1,
    }
}

fn mark(table: MarkTable, name_folded: &str, m: &str) -> EventMark {
    EventMark {
        table,
        name_folded: name_folded.into(),
        mark: m.into(),
        kind: "NewVersionCreated".into(),
    }
}

fn emission(m: EventMark, event_id: &str, subs: &[&str]) -> EventEmission {
    EventEmission {
        mark: m,
        event_id: event_id.into(),
        event_type: "Microsoft.KeyVault.KeyNewVersionCreated".into(),
        body: format!("{{\"id\":\"{event_id}\"}}"),
        subscriptions: subs.iter().map(|s| s.to_string()).collect(),
    }
}

fn event_sub(n: &str) -> EventSubscriptionRecord {
    EventSubscriptionRecord {
        name: n.into(),
        endpoint_url: format!("https://hooks.example/{n}"),
        included_types: Vec::new(),
        max_attempts: Some(3),
        created: 1,
        updated: 1,
    }
}

fn is_conflict<T: std::fmt::Debug>(r: crate::Result<T>) -> bool {
    matches!(r, Err(StoreError::Conflict(_)))
}

/// A vault with one key `k` (version 1) and one secret `s` (version 1).
async fn vault_with_objects(s: &dyn Store, v: &str) -> VaultRecord {
    let v = vault(v);
    s.put_vault(&v).await.unwrap();
    s.add_key_version(&v.name, &name("k"), &key_version(1, 1))
        .await
        .unwrap();
    s.add_secret_version(&v.name, &name("s"), &secret_version(1, 1))
        .await
        .unwrap();
    v
}

// --- meta, subscriptions, resource groups, principals, vaults ---

/// `put_meta_if_absent` stores a value only when the key has none and always returns the
/// value now stored, so two racing first starts agree; `get_meta` of an unknown key is `None`.
pub async fn meta_is_first_writer_wins(s: &dyn Store) {
    assert_eq!(s.get_meta("x").await.unwrap(), None);
    assert_eq!(s.put_meta_if_absent("x", b"one").await.unwrap(), b"one");
    assert_eq!(s.put_meta_if_absent("x", b"two").await.unwrap(), b"one");
    assert_eq!(s.get_meta("x").await.unwrap(), Some(b"one".to_vec()));
}

/// `ensure_subscription` is idempotent and keeps the first tenant (a tenant change is
/// `change_subscription_tenant`'s job); `list_subscriptions` is ordered by id.
pub async fn subscriptions_are_idempotent_and_listed_by_id(s: &dyn Store) {
    assert_eq!(s.subscription_tenant("b").await.unwrap(), None);
    s.ensure_subscription("t1", "b", 1).await.unwrap();
    s.ensure_subscription("t2", "b", 2).await.unwrap();
    s.ensure_subscription("t1", "a", 3).await.unwrap();
    assert_eq!(
        s.subscription_tenant("b").await.unwrap().as_deref(),
        Some("t1")
    );
    assert_eq!(
        s.list_subscriptions().await.unwrap(),
        vec![("a".into(), "t1".into()), ("b".into(), "t1".into())]
    );
}

/// `put_resource_group` creates or updates (tags); the name is compared case-insensitively
/// and returned as first created; `list_resource_groups` lists a subscription's groups by name.
pub async fn resource_groups_are_upserted_and_read_case_insensitively(s: &dyn Store) {
    let mut rg = ResourceGroupRecord {
        subscription_id: SUB.into(),
        name: "My-RG".into(),
        location: "westeurope".into(),
        tags: Default::default(),
    };
    s.put_resource_group(&rg, 1).await.unwrap();
    assert_eq!(
        s.get_resource_group(SUB, "my-rg").await.unwrap(),
        Some(rg.clone())
    );
    let mut again = rg.clone();
    again.name = "MY-RG".into();
    again.tags.insert("env".into(), "prod".into());
    s.put_resource_group(&again, 2).await.unwrap();
    rg.tags = again.tags.clone();
    assert_eq!(
        s.get_resource_group(SUB, "My-rg").await.unwrap(),
        Some(rg.clone())
    );
    assert_eq!(s.get_resource_group("other", "my-rg").await.unwrap(), None);
    let b = ResourceGroupRecord {
        subscription_id: SUB.into(),
        name: "b-rg".into(),
        location: "northeurope".into(),
        tags: Default::default(),
    };
    s.put_resource_group(&b, 3).await.unwrap();
    assert_eq!(s.list_resource_groups(SUB).await.unwrap(), vec![b, rg]);
    assert!(s.list_resource_groups("other").await.unwrap().is_empty());
}

/// `delete_resource_group` (name compared case-insensitively) is `false` for an unknown
/// group; it refuses (`Conflict`, nothing changed) while a live vault, a resource, a monitor
/// resource or a lock at or below the group remains — a soft-deleted vault does not hold it;
/// otherwise it deletes the group with the role and policy assignments at or below its scope
/// (not those of a group whose name only starts the same, nor those above it).
pub async fn a_resource_group_is_deleted_only_when_empty_with_its_assignments(s: &dyn Store) {
    let group = |name: &str| ResourceGroupRecord {
        subscription_id: SUB.into(),
        name: name.into(),
        location: "westeurope".into(),
        tags: Default::default(),
    };
    s.put_resource_group(&group("rg"), 1).await.unwrap();
    // `r_` would match `rg` under LIKE.
    s.put_resource_group(&group("r_"), 1).await.unwrap();
    s.put_resource_group(&group("rg2"), 1).await.unwrap();
    assert!(!s.delete_resource_group(SUB, "nope").await.unwrap());
    let scope = format!("/subscriptions/{SUB}/resourcegroups/rg");
    let assignment = |id: &str, scope: &str| RoleAssignmentRecord {
        id: id.into(),
        scope: scope.into(),
        principal_id: "oid-1".into(),
        role_definition_id: "r".into(),
        created: 1,
    };
    for (id, at) in [
        ("at", scope.clone()),
        (
            "below",
            format!("{scope}/providers/microsoft.keyvault/vaults/v1"),
        ),
        ("above", format!("/subscriptions/{SUB}")),
        (
            "sibling",
            format!("/subscriptions/{SUB}/resourcegroups/rg2"),
        ),
        ("like", format!("/subscriptions/{SUB}/resourcegroups/r_")),
    ] {
        s.put_role_assignment(&assignment(id, &at)).await.unwrap();
    }
    let policy = |at: &str| format!("{at}/providers/microsoft.authorization/policyassignments/p");
    s.put_policy_assignment(&policy(&scope), "{}", 1)
        .await
        .unwrap();
    s.put_policy_assignment(
        &policy(&format!("/subscriptions/{SUB}/resourcegroups/rg2")),
        "{}",
        1,
    )
    .await
    .unwrap();

    // Each of these holds the group until it goes.
    let v = vault("held-vault");
    s.put_vault(&v).await.unwrap();
    assert!(is_conflict(s.delete_resource_group(SUB, "RG").await));
    let mut deleted = v.clone();
    deleted.deleted_at = Some(2);
    deleted.purge_at = Some(3);
    s.put_vault(&deleted).await.unwrap();
    let uami = format!("{scope}/providers/microsoft.managedidentity/userassignedidentities/u");
    s.put_resource(&resource(&uami), &[], &[]).await.unwrap();
    assert!(is_conflict(s.delete_resource_group(SUB, "rg").await));
    s.delete_resource(&uami, &[]).await.unwrap();
    let ag = format!("{scope}/providers/microsoft.insights/actiongroups/ag");
    s.put_monitor_resource(&monitor(&ag, "microsoft.insights/actiongroups", SUB))
        .await
        .unwrap();
    assert!(is_conflict(s.delete_resource_group(SUB, "rg").await));
    s.delete_monitor_resource(&ag).await.unwrap();
    let lock = LockRecord {
        id: format!("{scope}/providers/microsoft.authorization/locks/l"),
        scope: scope.clone(),
        name: "l".into(),
        level: "CanNotDelete".into(),
        notes: String::new(),
    };
    s.put_lock(&lock).await.unwrap();
    assert!(is_conflict(s.delete_resource_group(SUB, "rg").await));
    s.delete_lock(&lock.id).await.unwrap();
    // Nothing changed by the refusals.
    assert_eq!(s.list_role_assignments().await.unwrap().len(), 5);
    assert_eq!(s.list_policy_assignments().await.unwrap().len(), 2);

    assert!(s.delete_resource_group(SUB, "Rg").await.unwrap());
    assert_eq!(s.get_resource_group(SUB, "rg").await.unwrap(), None);
    let names: Vec<String> = s
        .list_resource_groups(SUB)
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, vec!["r_".to_string(), "rg2".to_string()]);
    let mut left: Vec<String> = s
        .list_role_assignments()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    left.sort();
    assert_eq!(left, vec!["above", "like", "sibling"]);
    let policies: Vec<String> = s
        .list_policy_assignments()
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        policies,
        vec![policy(&format!("/subscriptions/{SUB}/resourcegroups/rg2"))]
    );
    // The soft-deleted vault stays, recoverable.
    assert_eq!(
        s.get_vault(&v.name)
            .await
            .unwrap()
            .and_then(|v| v.deleted_at),
        Some(2)
    );
    assert!(!s.delete_resource_group(SUB, "rg").await.unwrap());
}

/// `put_principal` creates; a second principal with the same client id is `Conflict` and
/// changes nothing; `principal_by_client_id` and `list_principals` (by creation time) find
/// live principals.
pub async fn principals_round_trip_and_a_duplicate_client_id_conflicts(s: &dyn Store) {
    let p2 = principal(2, None);
    let p1 = principal(1, Some("/subscriptions/x/r"));
    s.put_principal(&p2).await.unwrap();
    s.put_principal(&p1).await.unwrap();
    let mut dup = principal(3, None);
    dup.client_id = p1.client_id.clone();
    assert!(is_conflict(s.put_principal(&dup).await));
    assert_eq!(
        s.principal_by_client_id("client-1").await.unwrap(),
        Some(p1.clone())
    );
    assert_eq!(s.principal_by_client_id("client-9").await.unwrap(), None);
    assert_eq!(s.list_principals().await.unwrap(), vec![p1, p2]);
}

/// `put_vault` creates or replaces the whole record; `list_vaults` returns live and deleted
/// vaults ordered by name.
pub async fn vaults_are_upserted_and_listed_by_name(s: &dyn Store) {
    let mut b = vault("vault-b");
    let a = vault("vault-a");
    s.put_vault(&b).await.unwrap();
    s.put_vault(&a).await.unwrap();
    b.deleted_at = Some(5);
    b.purge_at = Some(6);
    b.updated = 5;
    b.location = "northeurope".into();
    b.properties.enable_purge_protection = true;
    s.put_vault(&b).await.unwrap();
    assert_eq!(s.list_vaults().await.unwrap(), vec![a, b]);
}

/// `insert_vault` creates a record only under a new name: an existing one, live or deleted,
/// is a `Conflict` and stays as it was.
pub async fn inserting_a_vault_conflicts_when_the_name_exists(s: &dyn Store) {
    let mut a = vault("vault-a");
    s.insert_vault(&a).await.unwrap();
    let mut again = a.clone();
    again.location = "northeurope".into();
    let e = s.insert_vault(&again).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
    a.deleted_at = Some(5);
    a.purge_at = Some(6);
    s.put_vault(&a).await.unwrap();
    assert!(matches!(
        s.insert_vault(&vault("vault-a")).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.list_vaults().await.unwrap(), vec![a]);
}

/// `replace_vault` replaces a record only while the stored one is the expected one: after
/// another writer changed it, the replacement is a `Conflict` and changes nothing.
pub async fn replacing_a_vault_needs_the_record_it_replaces(s: &dyn Store) {
    let a = vault("vault-a");
    s.insert_vault(&a).await.unwrap();
    let mut b = a.clone();
    b.updated = 7;
    b.location = "northeurope".into();
    s.replace_vault(&b, &a).await.unwrap();
    // A writer that still holds `a` (read before `b` was written) is refused.
    let mut stale = a.clone();
    stale.updated = 8;
    let e = s.replace_vault(&stale, &a).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
    assert_eq!(s.list_vaults().await.unwrap(), vec![b.clone()]);
    // A vault that is gone cannot be replaced either.
    let e = s
        .replace_vault(&vault("vault-z"), &vault("vault-z"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
}

/// `purge_vault` removes the vault with its keys, secrets, rotation policies, event marks,
/// subscriptions and pending events, and leaves other vaults alone.
pub async fn purging_a_vault_removes_everything_in_it(s: &dyn Store) {
    let v = vault_with_objects(s, "vault-gone").await;
    let other = vault_with_objects(s, "vault-kept").await;
    s.put_rotation_policy(&v.name, &name("k"), &policy(1))
        .await
        .unwrap();
    s.put_event_subscription(&v.name, &event_sub("hook"))
        .await
        .unwrap();
    let m = mark(MarkTable::Key, "k", "v1");
    s.record_events(&v.name, &[emission(m, "e1", &["hook"])], &[], 1)
        .await
        .unwrap();
    s.purge_vault(&v.name).await.unwrap();
    assert_eq!(s.list_vaults().await.unwrap(), vec![other.clone()]);
    assert!(s.load_keys(&v.name).await.unwrap().is_empty());
    assert!(s.load_secrets(&v.name).await.unwrap().is_empty());
    assert!(s.list_rotation_policies(&v.name).await.unwrap().is_empty());
    assert!(s.load_event_marks(&v.name, None).await.unwrap().is_empty());
    assert!(
        s.list_event_subscriptions(&v.name)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.due_deliveries(i64::MAX, 10).await.unwrap().is_empty());
    assert_eq!(s.load_keys(&other.name).await.unwrap().len(), 1);
    assert_eq!(s.load_secrets(&other.name).await.unwrap().len(), 1);
}

// --- keys and secrets ---

/// `add_key_version` creates the key on its first version (name kept as given) and appends
/// later ones; versions load in creation order (`seq`). Adding an existing version is
/// `Conflict` and changes nothing. `load_keys` is per vault.
pub async fn key_versions_are_added_in_order_and_a_duplicate_conflicts(s: &dyn Store) {
    let v = vault("vault-one");
    s.put_vault(&v).await.unwrap();
    s.put_vault(&vault("vault-two")).await.unwrap();
    let k = name("Key-A");
    s.add_key_version(&v.name, &k, &key_version(1, 1))
        .await
        .unwrap();
    s.add_key_version(&v.name, &k, &key_version(1, 2))
        .await
        .unwrap();
    let before = s.load_keys(&v.name).await.unwrap();
    let mut dup = key_version(1, 2);
    dup.sealed_private = vec![9; 8];
    assert!(is_conflict(s.add_key_version(&v.name, &k, &dup).await));
    assert_eq!(s.load_keys(&v.name).await.unwrap(), before);
    assert_eq!(
        before,
        vec![KeyRecord {
            name: k,
            deleted_at: None,
            purge_at: None,
            versions: vec![key_version(1, 1), key_version(1, 2)],
        }]
    );
    assert!(
        s.load_keys(&vault("vault-two").name)
            .await
            .unwrap()
            .is_empty()
    );
}

/// `update_key_version` replaces only the public part of one version; `set_key_deleted` sets
/// and clears the deletion times; both find the key by its name in any case.
pub async fn key_versions_are_updated_deleted_and_recovered_case_insensitively(s: &dyn Store) {
    let v = vault("vault-one");
    s.put_vault(&v).await.unwrap();
    s.add_key_version(&v.name, &name("Key-A"), &key_version(1, 1))
        .await
        .unwrap();
    s.add_key_version(&v.name, &name("Key-A"), &key_version(1, 2))
        .await
        .unwrap();
    let mut info = key_version(1, 1).info;
    info.attributes.enabled = false;
    info.tags.insert("t".into(), "1".into());
    let lower = name("key-a");
    s.update_key_version(&v.name, &lower, &key_version(1, 1).version, &info)
        .await
        .unwrap();
    s.set_key_deleted(&v.name, &lower, Some((100, 200)))
        .await
        .unwrap();
    let k = &s.load_keys(&v.name).await.unwrap()[0];
    assert_eq!(k.name.as_str(), "Key-A");
    assert_eq!((k.deleted_at, k.purge_at), (Some(100), Some(200)));
    assert_eq!(k.versions[0].info, info);
    assert_eq!(
        k.versions[0].sealed_private,
        key_version(1, 1).sealed_private
    );
    assert_eq!(k.versions[1], key_version(1, 2));
    s.set_key_deleted(&v.name, &name("KEY-A"), None)
        .await
        .unwrap();
    let k = &s.load_keys(&v.name).await.unwrap()[0];
    assert_eq!((k.deleted_at, k.purge_at), (None, None));
}

/// `insert_key` (restore) writes a whole key with its versions and deletion state; it is
/// `Conflict` when the name exists in any case, and then changes nothing.
pub async fn inserting_a_key_conflicts_when_the_name_exists(s: &dyn Store) {
    let v = vault("vault-one");
    s.put_vault(&v).await.unwrap();
    let record = KeyRecord {
        name: name("Restored"),
        deleted_at: Some(3),
        purge_at: Some(4),
        versions: vec![key_version(2, 1), key_version(2, 2)],
    };
    s.insert_key(&v.name, &record).await.unwrap();
    assert_eq!(s.load_keys(&v.name).await.unwrap(), vec![record.clone()]);
    let mut other = record.clone();
    other.name = name("RESTORED");
    other.versions = vec![key_version(3, 1)];
    assert!(is_conflict(s.insert_key(&v.name, &other).await));
    assert_eq!(s.load_keys(&v.name).await.unwrap(), vec![record]);
}

/// `purge_key` removes the key, its versions, its rotation policy and its event marks, and
/// nothing of other keys; the name is free again afterwards.
pub async fn purging_a_key_removes_its_versions_policy_and_marks(s: &dyn Store) {
    let v = vault_with_objects(s, "vault-one").await;
    s.add_key_version(&v.name, &name("other"), &key_version(5, 1))
        .await
        .unwrap();
    s.put_rotation_policy(&v.name, &name("k"), &policy(1))
        .await
        .unwrap();
    s.record_events(
        &v.name,
        &[emission(mark(MarkTable::Key, "k", "v1"), "e1", &[])],
        &[],
        1,
    )
    .await
    .unwrap();
    s.purge_key(&v.name, &name("K")).await.unwrap();
    let keys = s.load_keys(&v.name).await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].name.as_str(), "other");
    assert_eq!(
        s.get_rotation_policy(&v.name, &name("k")).await.unwrap(),
        None
    );
    assert!(
        s.load_event_marks(&v.name, Some((MarkTable::Key, "k")))
            .await
            .unwrap()
            .is_empty()
    );
    s.add_key_version(&v.name, &name("k"), &key_version(1, 1))
        .await
        .unwrap();
    assert_eq!(s.load_keys(&v.name).await.unwrap()[0].versions.len(), 1);
}

/// `get_vault` reads one vault by name, live or deleted; `None` for a name never stored.
pub async fn a_vault_is_read_by_name(s: &dyn Store) {
    let mut v = vault("vault-one");
    s.put_vault(&v).await.unwrap();
    s.put_vault(&vault("vault-two")).await.unwrap();
    assert_eq!(s.get_vault(&v.name).await.unwrap(), Some(v.clone()));
    v.deleted_at = Some(5);
    s.put_vault(&v).await.unwrap();
    assert_eq!(s.get_vault(&v.name).await.unwrap(), Some(v));
    assert_eq!(s.get_vault(&vault("vault-nope").name).await.unwrap(), None);
}

/// A version after the first (`seq` > 1) is added only to an object that exists and is not
/// deleted: on a shared store a node whose memory still shows an object another node purged
/// or deleted gets `Conflict`, and the object does not come back with one version. A first
/// version creates the object (again, after a purge). The same for secrets.
pub async fn a_later_version_needs_its_object_live(s: &dyn Store) {
    let v = vault("vault-one");
    s.put_vault(&v).await.unwrap();
    let k = name("k");
    s.add_key_version(&v.name, &k, &key_version(1, 1))
        .await
        .unwrap();
    s.set_key_deleted(&v.name, &k, Some((10, 20)))
        .await
        .unwrap();
    let before = s.load_keys(&v.name).await.unwrap();
    assert!(is_conflict(
        s.add_key_version(&v.name, &k, &key_version(1, 2)).await
    ));
    assert_eq!(s.load_keys(&v.name).await.unwrap(), before);
    s.purge_key(&v.name, &k).await.unwrap();
    assert!(is_conflict(
        s.add_key_version(&v.name, &k, &key_version(1, 2)).await
    ));
    assert!(s.load_keys(&v.name).await.unwrap().is_empty());
    s.add_key_version(&v.name, &k, &key_version(2, 1))
        .await
        .unwrap();
    assert_eq!(s.load_keys(&v.name).await.unwrap()[0].versions.len(), 1);

    let sn = name("s");
    s.add_secret_version(&v.name, &sn, &secret_version(1, 1))
        .await
        .unwrap();
    s.purge_secret(&v.name, &sn).await.unwrap();
    assert!(is_conflict(
        s.add_secret_version(&v.name, &sn, &secret_version(1, 2))
            .await
    ));
    assert!(s.load_secrets(&v.name).await.unwrap().is_empty());
}

/// Secrets keep the keys' promises in their own namespace: versions in order, a duplicate
/// version or an existing name on restore is `Conflict` and changes nothing, updates keep the
/// sealed value, deletion is set and cleared, purge frees the name.
pub async fn secrets_follow_the_same_contract_as_keys(s: &dyn Store) {
    let v = vault("vault-one");
    s.put_vault(&v).await.unwrap();
    let n = name("Secret-A");
    s.add_secret_version(&v.name, &n, &secret_version(1, 1))
        .await
        .unwrap();
    s.add_secret_version(&v.name, &n, &secret_version(2, 2))
        .await
        .unwrap();
    let before = s.load_secrets(&v.name).await.unwrap();
    assert!(is_conflict(
        s.add_secret_version(&v.name, &n, &secret_version(2, 2))
            .await
    ));
    assert_eq!(s.load_secrets(&v.name).await.unwrap(), before);
    assert!(s.load_keys(&v.name).await.unwrap().is_empty());
    let mut info = secret_version(1, 1).info;
    info.content_type = None;
    info.attributes.enabled = false;
    let lower = name("secret-a");
    s.update_secret_version(&v.name, &lower, &secret_version(1, 1).version, &info)
        .await
        .unwrap();
    s.set_secret_deleted(&v.name, &lower, Some((100, 200)))
        .await
        .unwrap();
    let sec = &s.load_secrets(&v.name).await.unwrap()[0];
    assert_eq!(sec.name.as_str(), "Secret-A");
    assert_eq!((sec.deleted_at, sec.purge_at), (Some(100), Some(200)));
    assert_eq!(sec.versions[0].info, info);
    assert_eq!(sec.versions[0].sealed_value, vec![1; 40]);
    assert_eq!(sec.versions[1], secret_version(2, 2));
    s.set_secret_deleted(&v.name, &n, None).await.unwrap();
    assert_eq!(s.load_secrets(&v.name).await.unwrap()[0].deleted_at, None);

    let restored = SecretRecord {
        name: name("Secret-A"),
        deleted_at: None,
        purge_at: None,
        versions: vec![secret_version(3, 1)],
    };
    let now = s.load_secrets(&v.name).await.unwrap();
    assert!(is_conflict(s.insert_secret(&v.name, &restored).await));
    assert_eq!(s.load_secrets(&v.name).await.unwrap(), now);
    s.purge_secret(&v.name, &lower).await.unwrap();
    assert!(s.load_secrets(&v.name).await.unwrap().is_empty());
    s.insert_secret(&v.name, &restored).await.unwrap();
    assert_eq!(s.load_secrets(&v.name).await.unwrap(), vec![restored]);
}

// --- rotation policies and events ---

/// `put_rotation_policy` creates or replaces the policy of an existing key (by folded name);
/// for a key that does not exist it fails and stores nothing. `list_rotation_policies` is
/// ordered by lower-case key name.
pub async fn rotation_policies_need_their_key_and_are_listed_by_folded_name(s: &dyn Store) {
    let v = vault("vault-one");
    s.put_vault(&v).await.unwrap();
    assert_eq!(
        s.get_rotation_policy(&v.name, &name("B")).await.unwrap(),
        None
    );
    s.add_key_version(&v.name, &name("B"), &key_version(1, 1))
        .await
        .unwrap();
    s.add_key_version(&v.name, &name("a"), &key_version(2, 1))
        .await
        .unwrap();
    s.put_rotation_policy(&v.name, &name("b"), &policy(1))
        .await
        .unwrap();
    s.put_rotation_policy(&v.name, &name("B"), &policy(2))
        .await
        .unwrap();
    s.put_rotation_policy(&v.name, &name("A"), &policy(3))
        .await
        .unwrap();
    assert!(
        s.put_rotation_policy(&v.name, &name("none"), &policy(4))
            .await
            .is_err()
    );
    assert_eq!(
        s.get_rotation_policy(&v.name, &name("B")).await.unwrap(),
        Some(policy(2))
    );
    assert_eq!(
        s.list_rotation_policies(&v.name).await.unwrap(),
        vec![("a".into(), policy(3)), ("b".into(), policy(2))]
    );
}

/// `record_events` writes each emission's mark once: a mark seen before returns `false` and
/// writes no event. Unmarks are removed first, in the same call, so an unmarked emission is
/// new again. `load_event_marks` filters by table and name.
pub async fn event_marks_are_recorded_once_and_can_be_unmarked(s: &dyn Store) {
    let v = vault_with_objects(s, "vault-one").await;
    let km = mark(MarkTable::Key, "k", "v1");
    let sm = mark(MarkTable::Secret, "s", "v1");
    let first = s
        .record_events(
            &v.name,
            &[
                emission(km.clone(), "e1", &[]),
                emission(sm.clone(), "e2", &[]),
            ],
            &[],
            1,
        )
        .await
        .unwrap();
    assert_eq!(first, vec![true, true]);
    let again = s
        .record_events(&v.name, &[emission(km.clone(), "e3", &[])], &[], 2)
        .await
        .unwrap();
    assert_eq!(again, vec![false]);
    assert_eq!(
        s.load_event_marks(&v.name, Some((MarkTable::Key, "k")))
            .await
            .unwrap(),
        vec![km.clone()]
    );
    assert_eq!(
        s.load_event_marks(&v.name, Some((MarkTable::Secret, "s")))
            .await
            .unwrap(),
        vec![sm.clone()]
    );
    let mut all = s.load_event_marks(&v.name, None).await.unwrap();
    all.sort_by(|a, b| a.name_folded.cmp(&b.name_folded));
    assert_eq!(all, vec![km.clone(), sm]);
    let renewed = s
        .record_events(&v.name, &[emission(km.clone(), "e4", &[])], &[km], 3)
        .await
        .unwrap();
    assert_eq!(renewed, vec![true]);
}

/// `put_event_subscription` returns `true` when it created the subscription and replaces it
/// otherwise (name compared case-insensitively); `list_event_subscriptions` is ordered by
/// lower-case name; `delete_event_subscription` returns whether it existed.
pub async fn event_subscriptions_are_upserted_listed_and_deleted(s: &dyn Store) {
    let v = vault("vault-one");
    s.put_vault(&v).await.unwrap();
    assert!(
        s.put_event_subscription(&v.name, &event_sub("b"))
            .await
            .unwrap()
    );
    assert!(
        s.put_event_subscription(&v.name, &event_sub("a"))
            .await
            .unwrap()
    );
    let mut changed = event_sub("b");
    changed.endpoint_url = "https://hooks.example/new".into();
    changed.included_types = vec!["Microsoft.KeyVault.KeyExpired".into()];
    changed.max_attempts = None;
    changed.updated = 2;
    assert!(!s.put_event_subscription(&v.name, &changed).await.unwrap());
    assert_eq!(
        s.list_event_subscriptions(&v.name).await.unwrap(),
        vec![event_sub("a"), changed]
    );
    assert!(s.delete_event_subscription(&v.name, "a").await.unwrap());
    assert!(!s.delete_event_subscription(&v.name, "a").await.unwrap());
    assert_eq!(s.list_event_subscriptions(&v.name).await.unwrap().len(), 1);
}

/// A new event gets one pending delivery per named subscription that exists (due at once);
/// `due_deliveries` returns those due at `now_ms`, oldest first, at most `limit`; a failure
/// with a next attempt reschedules (and `next_delivery_ms` reports the earliest), one without
/// dead-letters it; success removes the delivery.
pub async fn deliveries_are_due_retried_dead_lettered_and_succeed(s: &dyn Store) {
    let v = vault_with_objects(s, "vault-one").await;
    assert_eq!(s.next_delivery_ms().await.unwrap(), None);
    s.put_event_subscription(&v.name, &event_sub("hook"))
        .await
        .unwrap();
    let e1 = emission(mark(MarkTable::Key, "k", "v1"), "e1", &["hook", "gone"]);
    let e2 = emission(mark(MarkTable::Key, "k", "v2"), "e2", &["hook"]);
    s.record_events(&v.name, &[e1], &[], 1).await.unwrap();
    s.record_events(&v.name, &[e2], &[], 2).await.unwrap();
    let due = s.due_deliveries(0, 10).await.unwrap();
    assert_eq!(
        due.iter().map(|d| d.event_id.as_str()).collect::<Vec<_>>(),
        vec!["e1", "e2"]
    );
    assert_eq!(due[0].subscription, "hook");
    assert_eq!(due[0].endpoint_url, "https://hooks.example/hook");
    assert_eq!((due[0].attempts, due[0].max_attempts), (0, Some(3)));
    assert_eq!(due[0].body, "{\"id\":\"e1\"}");
    assert_eq!(s.due_deliveries(0, 1).await.unwrap().len(), 1);

    s.delivery_failed("e1", v.name.as_str(), "hook", 1, Some(5_000), "503", 3)
        .await
        .unwrap();
    assert_eq!(s.next_delivery_ms().await.unwrap(), Some(0));
    let now_due = s.due_deliveries(4_999, 10).await.unwrap();
    assert_eq!(now_due.len(), 1);
    assert_eq!(now_due[0].event_id, "e2");
    let later = s.due_deliveries(5_000, 10).await.unwrap();
    assert_eq!(later.len(), 2);
    assert_eq!(
        later.iter().find(|d| d.event_id == "e1").unwrap().attempts,
        1
    );

    s.delivery_succeeded("e2", v.name.as_str(), "hook")
        .await
        .unwrap();
    assert_eq!(s.next_delivery_ms().await.unwrap(), Some(5_000));
    s.delivery_failed("e1", v.name.as_str(), "hook", 3, None, "timeout", 9)
        .await
        .unwrap();
    assert_eq!(s.next_delivery_ms().await.unwrap(), None);
    assert!(s.due_deliveries(i64::MAX, 10).await.unwrap().is_empty());
    let dead = s.dead_letters(&v.name, "hook").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].event_id.as_str(), dead[0].attempts), ("e1", 3));
    assert_eq!(dead[0].last_error.as_deref(), Some("timeout"));
    assert_eq!(dead[0].dead_lettered_at, 9);
    assert_eq!(dead[0].body, "{\"id\":\"e1\"}");
}

/// Deleting a subscription deletes its pending deliveries and dead letters with it.
pub async fn deleting_a_subscription_drops_its_deliveries_and_dead_letters(s: &dyn Store) {
    let v = vault_with_objects(s, "vault-one").await;
    s.put_event_subscription(&v.name, &event_sub("hook"))
        .await
        .unwrap();
    for (i, m) in ["v1", "v2"].iter().enumerate() {
        let e = emission(mark(MarkTable::Key, "k", m), &format!("e{i}"), &["hook"]);
        s.record_events(&v.name, &[e], &[], 1).await.unwrap();
    }
    s.delivery_failed("e0", v.name.as_str(), "hook", 3, None, "gone", 2)
        .await
        .unwrap();
    assert!(s.delete_event_subscription(&v.name, "HOOK").await.unwrap());
    assert!(s.due_deliveries(i64::MAX, 10).await.unwrap().is_empty());
    s.put_event_subscription(&v.name, &event_sub("hook"))
        .await
        .unwrap();
    assert!(s.dead_letters(&v.name, "hook").await.unwrap().is_empty());
    assert!(s.due_deliveries(i64::MAX, 10).await.unwrap().is_empty());
}

// --- service documents, activity, policy assignments ---

/// Documents are addressed by (resource key, kind, name): put creates or replaces, list
/// returns one kind of one resource ordered by name, delete returns whether it existed.
pub async fn service_documents_are_put_listed_by_name_and_deleted(s: &dyn Store) {
    let r = "/subscriptions/x/resourcegroups/rg/providers/p/vaults/a";
    assert_eq!(s.get_service_document(r, "job", "1").await.unwrap(), None);
    s.put_service_document(r, &doc("job", "2", "{\"n\":2}"))
        .await
        .unwrap();
    s.put_service_document(r, &doc("job", "1", "{}"))
        .await
        .unwrap();
    s.put_service_document(r, &doc("state", "", "{}"))
        .await
        .unwrap();
    s.put_service_document("other", &doc("job", "3", "{}"))
        .await
        .unwrap();
    let mut replaced = doc("job", "1", "{\"n\":1}");
    replaced.updated = 7;
    s.put_service_document(r, &replaced).await.unwrap();
    assert_eq!(
        s.get_service_document(r, "job", "1").await.unwrap(),
        Some(replaced.clone())
    );
    assert_eq!(
        s.list_service_documents(r, "job").await.unwrap(),
        vec![replaced, doc("job", "2", "{\"n\":2}")]
    );
    let every_job = s.list_service_documents_of_kind("job").await.unwrap();
    let keys: Vec<(&str, &str)> = every_job
        .iter()
        .map(|(k, d)| (k.as_str(), d.name.as_str()))
        .collect();
    assert_eq!(keys, vec![(r, "1"), (r, "2"), ("other", "3")]);
    assert!(s.delete_service_document(r, "job", "2").await.unwrap());
    assert!(!s.delete_service_document(r, "job", "2").await.unwrap());
    assert_eq!(s.list_service_documents(r, "job").await.unwrap().len(), 1);
    assert_eq!(
        s.list_service_documents("other", "job")
            .await
            .unwrap()
            .len(),
        1
    );
}

/// `put_service_document_if` writes only while its guard (another resource's document, or
/// the written one) holds, and changes nothing otherwise: a fenced write and a
/// compare-and-set.
pub async fn a_document_is_put_only_while_its_guard_holds(s: &dyn Store) {
    let (r, homes) = (
        "/subscriptions/x/resourcegroups/rg/providers/p/servers/a",
        "/homes",
    );
    let home = DocumentRef {
        resource_key: homes,
        kind: "home",
        name: "a",
    };
    let is = |want: &'static str| move |b: Option<&str>| b == Some(want);
    // No guard document: an absent guard is seen as absent.
    assert!(
        !s.put_service_document_if(r, &doc("record", "1", "{}"), home, &is("node-a"))
            .await
            .unwrap()
    );
    assert!(
        s.put_service_document_if(homes, &doc("home", "a", "node-a"), home, &|b| b.is_none())
            .await
            .unwrap()
    );
    assert!(
        s.put_service_document_if(r, &doc("record", "1", "{}"), home, &is("node-a"))
            .await
            .unwrap()
    );
    // Another node took the resource over (a compare-and-set of the guard itself).
    assert!(
        !s.put_service_document_if(homes, &doc("home", "a", "node-c"), home, &is("node-x"))
            .await
            .unwrap()
    );
    assert!(
        s.put_service_document_if(homes, &doc("home", "a", "node-b"), home, &is("node-a"))
            .await
            .unwrap()
    );
    assert!(
        !s.put_service_document_if(r, &doc("record", "2", "{}"), home, &is("node-a"))
            .await
            .unwrap()
    );
    assert_eq!(
        s.get_service_document(r, "record", "2").await.unwrap(),
        None
    );
    assert_eq!(
        s.get_service_document(homes, "home", "a")
            .await
            .unwrap()
            .map(|d| d.body),
        Some("node-b".to_string())
    );
}

/// `append_service_activity` numbers entries 1, 2, 3, … per resource; the log lists oldest
/// first.
pub async fn service_activity_is_numbered_per_resource(s: &dyn Store) {
    assert_eq!(
        s.append_service_activity("a", 10, "{\"i\":1}")
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.append_service_activity("b", 11, "{}").await.unwrap(), 1);
    assert_eq!(
        s.append_service_activity("a", 9, "{\"i\":2}")
            .await
            .unwrap(),
        2
    );
    let log = s.list_service_activity("a").await.unwrap();
    assert_eq!(
        log.iter()
            .map(|e| (e.seq, e.at, e.body.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, 10, "{\"i\":1}"), (2, 9, "{\"i\":2}")]
    );
    assert!(s.list_service_activity("c").await.unwrap().is_empty());
}

/// `delete_service_data` removes every document and activity entry of one resource (and
/// numbering restarts at 1); `import_service_data` adds only documents that are missing and
/// activity only to an empty log, so importing twice changes nothing.
pub async fn service_data_is_deleted_and_imported_once(s: &dyn Store) {
    s.put_service_document("a", &doc("state", "", "{\"kept\":1}"))
        .await
        .unwrap();
    s.append_service_activity("a", 1, "{}").await.unwrap();
    s.put_service_document("b", &doc("state", "", "{}"))
        .await
        .unwrap();
    s.delete_service_data("a").await.unwrap();
    assert!(
        s.list_service_documents("a", "state")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.list_service_activity("a").await.unwrap().is_empty());
    assert_eq!(
        s.list_service_documents("b", "state").await.unwrap().len(),
        1
    );

    s.put_service_document("a", &doc("state", "", "{\"kept\":1}"))
        .await
        .unwrap();
    let import = ServiceImport {
        documents: vec![doc("state", "", "{\"old\":1}"), doc("job", "j", "{}")],
        activity: vec![(5, "{\"i\":1}".into()), (6, "{\"i\":2}".into())],
    };
    s.import_service_data("a", &import).await.unwrap();
    s.import_service_data("a", &import).await.unwrap();
    assert_eq!(
        s.get_service_document("a", "state", "")
            .await
            .unwrap()
            .unwrap()
            .body,
        "{\"kept\":1}"
    );
    assert!(
        s.get_service_document("a", "job", "j")
            .await
            .unwrap()
            .is_some()
    );
    let log = s.list_service_activity("a").await.unwrap();
    assert_eq!(log.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(s.append_service_activity("a", 7, "{}").await.unwrap(), 3);
    s.import_service_data("a", &import).await.unwrap();
    assert_eq!(s.list_service_activity("a").await.unwrap().len(), 3);
}

/// `put_policy_assignment` returns `true` when it created; `list_policy_assignments` is by
/// id; `delete_policy_assignment` returns the body it had (`None` when absent);
/// `import_policy_assignments` inserts only missing ids.
pub async fn policy_assignments_are_upserted_deleted_and_imported_once(s: &dyn Store) {
    assert!(s.put_policy_assignment("b", "{\"v\":1}", 1).await.unwrap());
    assert!(!s.put_policy_assignment("b", "{\"v\":2}", 2).await.unwrap());
    assert!(s.put_policy_assignment("a", "{}", 3).await.unwrap());
    let import = vec![
        ("b".to_string(), "{\"v\":0}".to_string()),
        ("c".into(), "{}".into()),
    ];
    s.import_policy_assignments(&import, 4).await.unwrap();
    s.import_policy_assignments(&import, 5).await.unwrap();
    assert_eq!(
        s.list_policy_assignments().await.unwrap(),
        vec![
            ("a".into(), "{}".into()),
            ("b".into(), "{\"v\":2}".into()),
            ("c".into(), "{}".into())
        ]
    );
    assert_eq!(
        s.delete_policy_assignment("b").await.unwrap().as_deref(),
        Some("{\"v\":2}")
    );
    assert_eq!(s.delete_policy_assignment("b").await.unwrap(), None);
    assert_eq!(s.list_policy_assignments().await.unwrap().len(), 2);
}

// --- directory ---

/// `delete_principal` hides a principal from `list_principals` and `principal_by_client_id`
/// and keeps its object id taken; `set_principal_secret` replaces a live principal's hash.
pub async fn principals_are_deleted_and_their_secret_replaced(s: &dyn Store) {
    s.put_principal(&principal(1, None)).await.unwrap();
    s.put_principal(&principal(2, None)).await.unwrap();
    s.set_principal_secret("oid-1", &[9; 32]).await.unwrap();
    assert_eq!(
        s.principal_by_client_id("client-1")
            .await
            .unwrap()
            .unwrap()
            .secret_hash,
        vec![9; 32]
    );
    s.delete_principal("oid-2").await.unwrap();
    assert_eq!(s.principal_by_client_id("client-2").await.unwrap(), None);
    assert_eq!(s.list_principals().await.unwrap().len(), 1);
    let mut reuse = principal(3, None);
    reuse.object_id = "oid-2".into();
    assert!(s.put_principal(&reuse).await.is_err());
}

/// A certificate is registered once: the same thumbprint again is `Conflict`.
pub async fn certificates_are_registered_once(s: &dyn Store) {
    s.put_principal(&principal(1, None)).await.unwrap();
    let c = CertificateRecord {
        sha256: "ab".repeat(32),
        sha1: "cd".repeat(20),
        object_id: "oid-1".into(),
        spki: vec![1, 2, 3],
        created: 1,
    };
    s.add_principal_certificate(&c).await.unwrap();
    assert!(is_conflict(s.add_principal_certificate(&c).await));
    assert_eq!(s.list_principal_certificates().await.unwrap(), vec![c]);
}

/// `put_resource` creates or replaces a resource and creates/deletes the principals given in
/// the same call; `list_resources` is by id; `delete_resource` takes its bindings, service
/// documents, activity and the named principals with it.
pub async fn resources_carry_their_identities_and_go_with_their_data(s: &dyn Store) {
    let id = "/subscriptions/x/resourcegroups/rg/providers/p/t/b";
    let mut r = resource(id);
    s.put_resource(&r, &[principal(1, Some(id))], &[])
        .await
        .unwrap();
    s.put_resource(&resource("/subscriptions/x/a"), &[], &[])
        .await
        .unwrap();
    r.body = "{\"changed\":true}".into();
    r.updated = 2;
    s.put_resource(&r, &[principal(2, Some(id))], &["oid-1".into()])
        .await
        .unwrap();
    let all = s.list_resources().await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec!["/subscriptions/x/a", id]
    );
    assert_eq!(all[1], r);
    assert_eq!(
        s.list_principals()
            .await
            .unwrap()
            .iter()
            .map(|p| p.object_id.as_str())
            .collect::<Vec<_>>(),
        vec!["oid-2"]
    );
    s.put_binding(&binding("b1", id, 1, i64::MAX), 1)
        .await
        .unwrap();
    s.put_service_document(id, &doc("state", "", "{}"))
        .await
        .unwrap();
    s.append_service_activity(id, 1, "{}").await.unwrap();
    s.delete_resource(id, &["oid-2".into()]).await.unwrap();
    assert_eq!(s.list_resources().await.unwrap().len(), 1);
    assert!(s.list_bindings(id).await.unwrap().is_empty());
    assert_eq!(s.binding_by_secret(b"b1").await.unwrap(), None);
    assert!(
        s.list_service_documents(id, "state")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.list_service_activity(id).await.unwrap().is_empty());
    assert!(s.list_principals().await.unwrap().is_empty());
}

/// Bindings are found by secret hash (expired or not), listed per resource oldest first and
/// revoked one by one (`false` for an unknown id or another resource's); `put_binding`
/// forgets every binding that expired at or before `now`.
pub async fn bindings_are_listed_revoked_and_forgotten_once_expired(s: &dyn Store) {
    s.put_binding(&binding("b2", "r", 2, 100), 0).await.unwrap();
    s.put_binding(&binding("b1", "r", 1, 50), 0).await.unwrap();
    s.put_binding(&binding("o", "other", 1, 1_000), 0)
        .await
        .unwrap();
    assert_eq!(
        s.list_bindings("r").await.unwrap(),
        vec![binding("b1", "r", 1, 50), binding("b2", "r", 2, 100)]
    );
    assert_eq!(
        s.binding_by_secret(b"b2").await.unwrap(),
        Some(binding("b2", "r", 2, 100))
    );
    assert!(!s.delete_binding("other", "b2").await.unwrap());
    assert!(s.delete_binding("r", "b2").await.unwrap());
    assert!(!s.delete_binding("r", "b2").await.unwrap());
    s.put_binding(&binding("b3", "r", 60, 200), 60)
        .await
        .unwrap();
    assert_eq!(
        s.list_bindings("r").await.unwrap(),
        vec![binding("b3", "r", 60, 200)]
    );
    assert_eq!(s.binding_by_secret(b"b1").await.unwrap(), None);
    assert_eq!(s.list_bindings("other").await.unwrap().len(), 1);
}

/// `replace_signing_key` swaps the signing key (and writes the retired list) only when the
/// stored one is `expected`; otherwise it returns `false` and writes nothing.
pub async fn the_signing_key_is_replaced_only_from_the_expected_one(s: &dyn Store) {
    use crate::directory::{RETIRED_SIGNING_KEYS, SIGNING_KEY};
    s.put_meta_if_absent(SIGNING_KEY, b"k1").await.unwrap();
    assert!(!s.replace_signing_key(b"k0", b"k2", b"[]").await.unwrap());
    assert_eq!(s.get_meta(SIGNING_KEY).await.unwrap(), Some(b"k1".to_vec()));
    assert_eq!(s.get_meta(RETIRED_SIGNING_KEYS).await.unwrap(), None);
    assert!(s.replace_signing_key(b"k1", b"k2", b"[k1]").await.unwrap());
    assert_eq!(s.get_meta(SIGNING_KEY).await.unwrap(), Some(b"k2".to_vec()));
    assert_eq!(
        s.get_meta(RETIRED_SIGNING_KEYS).await.unwrap(),
        Some(b"[k1]".to_vec())
    );
    assert!(
        s.replace_signing_key(b"k2", b"k3", b"[k1,k2]")
            .await
            .unwrap()
    );
    assert_eq!(
        s.get_meta(RETIRED_SIGNING_KEYS).await.unwrap(),
        Some(b"[k1,k2]".to_vec())
    );
}

/// Role definitions and locks are upserted, listed by id and deleted; a role assignment is
/// created once (the same id again is `Conflict` and changes nothing) and listed by creation
/// time.
pub async fn role_definitions_assignments_and_locks_round_trip(s: &dyn Store) {
    let d = |id: &str, body: &str| RoleDefinitionRecord {
        id: id.into(),
        scope: "/".into(),
        body: body.into(),
    };
    s.put_role_definition(&d("b", "{}")).await.unwrap();
    s.put_role_definition(&d("a", "{}")).await.unwrap();
    s.put_role_definition(&d("b", "{\"v\":2}")).await.unwrap();
    assert_eq!(
        s.list_role_definitions().await.unwrap(),
        vec![d("a", "{}"), d("b", "{\"v\":2}")]
    );
    s.delete_role_definition("a").await.unwrap();
    assert_eq!(s.list_role_definitions().await.unwrap().len(), 1);

    let a = |id: &str, created: i64| RoleAssignmentRecord {
        id: id.into(),
        scope: "/subscriptions/x".into(),
        principal_id: "oid-1".into(),
        role_definition_id: "r".into(),
        created,
    };
    s.put_role_assignment(&a("z", 1)).await.unwrap();
    s.put_role_assignment(&a("y", 2)).await.unwrap();
    assert!(is_conflict(s.put_role_assignment(&a("z", 3)).await));
    assert_eq!(
        s.list_role_assignments().await.unwrap(),
        vec![a("z", 1), a("y", 2)]
    );
    s.delete_role_assignment("z").await.unwrap();
    assert_eq!(s.list_role_assignments().await.unwrap(), vec![a("y", 2)]);

    let l = |id: &str, level: &str| LockRecord {
        id: id.into(),
        scope: "/subscriptions/x".into(),
        name: id.into(),
        level: level.into(),
        notes: String::new(),
    };
    s.put_lock(&l("b", "CanNotDelete")).await.unwrap();
    s.put_lock(&l("a", "ReadOnly")).await.unwrap();
    s.put_lock(&l("b", "ReadOnly")).await.unwrap();
    assert_eq!(
        s.list_locks().await.unwrap(),
        vec![l("a", "ReadOnly"), l("b", "ReadOnly")]
    );
    s.delete_lock("a").await.unwrap();
    assert_eq!(s.list_locks().await.unwrap(), vec![l("b", "ReadOnly")]);
}

// --- alerts ---

fn monitor(id: &str, resource_type: &str, sub: &str) -> MonitorRecord {
    MonitorRecord {
        id: id.into(),
        resource_type: resource_type.into(),
        subscription_id: sub.into(),
        resource_group: "rg".into(),
        body: "{}".into(),
        created: 1,
        updated: 1,
    }
}

const ACTION_GROUPS: &str = "microsoft.insights/actiongroups";

fn notification(id: &str, group: &str) -> AlertNotification {
    AlertNotification {
        id: id.into(),
        alert: "alert-1".into(),
        action_group: group.into(),
        receiver: "hook".into(),
        endpoint_url: "https://hooks.example/alert".into(),
        body: format!("{{\"n\":\"{id}\"}}"),
    }
}

/// `put_monitor_resource` returns `true` when it created; a resource is read by id, listed
/// by type (one subscription or all) ordered by id, and deleted (`true` if it existed).
pub async fn monitor_resources_are_upserted_listed_and_deleted(s: &dyn Store) {
    assert!(
        s.put_monitor_resource(&monitor("b", ACTION_GROUPS, "s1"))
            .await
            .unwrap()
    );
    assert!(
        s.put_monitor_resource(&monitor("a", ACTION_GROUPS, "s2"))
            .await
            .unwrap()
    );
    assert!(
        s.put_monitor_resource(&monitor("c", "microsoft.insights/activitylogalerts", "s1"))
            .await
            .unwrap()
    );
    let mut b = monitor("b", ACTION_GROUPS, "s1");
    b.body = "{\"v\":2}".into();
    b.updated = 2;
    assert!(!s.put_monitor_resource(&b).await.unwrap());
    assert_eq!(s.get_monitor_resource("b").await.unwrap(), Some(b.clone()));
    assert_eq!(
        s.list_monitor_resources(ACTION_GROUPS, None).await.unwrap(),
        vec![monitor("a", ACTION_GROUPS, "s2"), b.clone()]
    );
    assert_eq!(
        s.list_monitor_resources(ACTION_GROUPS, Some("s1"))
            .await
            .unwrap(),
        vec![b]
    );
    assert!(s.delete_monitor_resource("b").await.unwrap());
    assert!(!s.delete_monitor_resource("b").await.unwrap());
    assert_eq!(s.get_monitor_resource("b").await.unwrap(), None);
}

/// `append_activity_with_alerts` appends the entry (numbered as `append_service_activity`)
/// with its notifications, leaving out those whose action group is gone; notifications are
/// due at once, retried, dead-lettered or removed on success; deleting the action group
/// removes its pending notifications and dead letters.
pub async fn alert_notifications_are_written_with_their_activity_and_delivered(s: &dyn Store) {
    s.put_monitor_resource(&monitor("g", ACTION_GROUPS, "s1"))
        .await
        .unwrap();
    assert_eq!(s.append_service_activity("r", 1, "{}").await.unwrap(), 1);
    let seq = s
        .append_activity_with_alerts(
            "r",
            2,
            "{\"fired\":1}",
            &[notification("n1", "g"), notification("n0", "deleted-group")],
        )
        .await
        .unwrap();
    assert_eq!(seq, 2);
    s.append_activity_with_alerts("r", 3, "{}", &[notification("n2", "g")])
        .await
        .unwrap();
    assert_eq!(s.list_service_activity("r").await.unwrap().len(), 3);
    let due = s.due_alert_deliveries(0, 10).await.unwrap();
    assert_eq!(
        due.iter().map(|d| d.event_id.as_str()).collect::<Vec<_>>(),
        vec!["n1", "n2"]
    );
    assert_eq!(
        due[0].origin,
        crate::events::DeliveryOrigin::ActivityLogAlert
    );
    assert_eq!(
        (due[0].vault.as_str(), due[0].subscription.as_str()),
        ("g", "hook")
    );
    assert_eq!(due[0].body, "{\"n\":\"n1\"}");
    assert_eq!(s.next_alert_delivery_ms().await.unwrap(), Some(0));

    s.alert_delivery_failed("n1", 1, Some(1_000), "503", 4)
        .await
        .unwrap();
    assert_eq!(s.due_alert_deliveries(999, 10).await.unwrap().len(), 1);
    s.alert_delivery_succeeded("n2").await.unwrap();
    assert_eq!(s.next_alert_delivery_ms().await.unwrap(), Some(1_000));
    s.alert_delivery_failed("n1", 2, None, "timeout", 5)
        .await
        .unwrap();
    assert_eq!(s.next_alert_delivery_ms().await.unwrap(), None);
    let dead = s.alert_dead_letters("g").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].id.as_str(),
            dead[0].attempts,
            dead[0].dead_lettered_at
        ),
        ("n1", 2, 5)
    );
    assert_eq!(dead[0].last_error.as_deref(), Some("timeout"));

    s.append_activity_with_alerts("r", 6, "{}", &[notification("n3", "g")])
        .await
        .unwrap();
    s.delete_monitor_resource("g").await.unwrap();
    assert!(
        s.due_alert_deliveries(i64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.alert_dead_letters("g").await.unwrap().is_empty());
}

// --- moves ---

/// `move_resource` gives a resource a new id: its bindings, its managed identities, its
/// service documents and activity follow it, and the role assignments named go.
pub async fn a_resource_moves_with_its_identities_and_data(s: &dyn Store) {
    let old = "/subscriptions/x/resourcegroups/a/providers/p/t/r";
    let new = resource("/subscriptions/x/resourcegroups/b/providers/p/t/r");
    s.put_resource(&resource(old), &[principal(1, Some(old))], &[])
        .await
        .unwrap();
    s.put_binding(&binding("b1", old, 1, i64::MAX), 1)
        .await
        .unwrap();
    s.put_service_document(old, &doc("state", "", "{}"))
        .await
        .unwrap();
    s.append_service_activity(old, 1, "{}").await.unwrap();
    let ra = RoleAssignmentRecord {
        id: "ra".into(),
        scope: old.into(),
        principal_id: "oid-1".into(),
        role_definition_id: "r".into(),
        created: 1,
    };
    s.put_role_assignment(&ra).await.unwrap();
    s.move_resource(old, &new, &["ra".into()]).await.unwrap();
    assert_eq!(s.list_resources().await.unwrap(), vec![new.clone()]);
    assert_eq!(s.list_bindings(&new.id).await.unwrap().len(), 1);
    assert!(s.list_bindings(old).await.unwrap().is_empty());
    assert_eq!(
        s.principal_by_client_id("client-1")
            .await
            .unwrap()
            .unwrap()
            .resource_id
            .as_deref(),
        Some(new.id.as_str())
    );
    assert!(
        s.get_service_document(&new.id, "state", "")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        s.get_service_document(old, "state", "").await.unwrap(),
        None
    );
    assert_eq!(s.list_service_activity(&new.id).await.unwrap().len(), 1);
    assert!(s.list_role_assignments().await.unwrap().is_empty());
}

/// A move onto an id that exists is `Conflict` and changes nothing (the resource, its
/// bindings and the role assignments stay); a move of a resource that does not exist fails.
pub async fn a_move_onto_an_existing_resource_conflicts_and_changes_nothing(s: &dyn Store) {
    let (a, b) = (
        resource("/subscriptions/x/a"),
        resource("/subscriptions/x/b"),
    );
    s.put_resource(&a, &[], &[]).await.unwrap();
    s.put_resource(&b, &[], &[]).await.unwrap();
    s.put_binding(&binding("b1", &a.id, 1, i64::MAX), 1)
        .await
        .unwrap();
    let ra = RoleAssignmentRecord {
        id: "ra".into(),
        scope: a.id.clone(),
        principal_id: "p".into(),
        role_definition_id: "r".into(),
        created: 1,
    };
    s.put_role_assignment(&ra).await.unwrap();
    assert!(is_conflict(
        s.move_resource(&a.id, &b, &["ra".into()]).await
    ));
    let missing = resource("/subscriptions/x/c");
    assert!(
        s.move_resource("/subscriptions/x/none", &missing, &[])
            .await
            .is_err()
    );
    assert_eq!(s.list_resources().await.unwrap(), vec![a.clone(), b]);
    assert_eq!(s.list_bindings(&a.id).await.unwrap().len(), 1);
    assert_eq!(s.list_role_assignments().await.unwrap(), vec![ra]);
}

/// `move_vault` stores the vault's new subscription and resource group and deletes the
/// assignments named; `change_subscription_tenant` sets the tenant of an existing
/// subscription (deleting the assignments named) and is `Conflict` for an unknown one.
pub async fn a_vault_moves_and_a_subscription_changes_tenant(s: &dyn Store) {
    let mut v = vault("vault-one");
    s.put_vault(&v).await.unwrap();
    let ra = |id: &str| RoleAssignmentRecord {
        id: id.into(),
        scope: "/subscriptions/x".into(),
        principal_id: "p".into(),
        role_definition_id: "r".into(),
        created: 1,
    };
    s.put_role_assignment(&ra("1")).await.unwrap();
    s.put_role_assignment(&ra("2")).await.unwrap();
    v.subscription_id = "other-sub".into();
    v.resource_group = "other-rg".into();
    s.move_vault(&v, &["1".into()]).await.unwrap();
    let moved = &s.list_vaults().await.unwrap()[0];
    assert_eq!(
        (
            moved.subscription_id.as_str(),
            moved.resource_group.as_str()
        ),
        ("other-sub", "other-rg")
    );
    assert_eq!(s.list_role_assignments().await.unwrap(), vec![ra("2")]);

    assert!(is_conflict(
        s.change_subscription_tenant("none", "t2", &["2".into()])
            .await
    ));
    assert_eq!(s.list_role_assignments().await.unwrap(), vec![ra("2")]);
    s.ensure_subscription(TENANT, SUB, 1).await.unwrap();
    s.change_subscription_tenant(SUB, "t2", &["2".into()])
        .await
        .unwrap();
    assert_eq!(
        s.subscription_tenant(SUB).await.unwrap().as_deref(),
        Some("t2")
    );
    assert!(s.list_role_assignments().await.unwrap().is_empty());
}

//! The lifecycle every kind of versioned object shares: get, list, versions, update, soft
//! delete, recover, purge, backup and restore, written once over a [`Kind`]. Keys and secrets
//! are kinds (`crate::keys::KeyKind`, `crate::secrets::SecretKind`); certificates or HSM keys
//! later are a third kind, not a third copy.
//!
//! A kind names its permissions, error codes, store calls and wire shapes; what it does with
//! its material (key pairs, sealed values) stays in its own module.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use kagi_core::access::DataAction;
use kagi_core::event::ObjectType;
use kagi_core::key::{BackupBlob, Tags};
use kagi_core::paging;
use kagi_core::time::DAY;
use kagi_core::{ErrorCode, KvError, ObjectName, VaultName};
use kagi_identity::Principal;
use kagi_store::{ObjectRecord, Store, StoreError, VaultRecord};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::object_backup::{self, BackupKind};
use crate::state::{Entry, ObjectMap, VaultState, Versioned, read, write};
use crate::{Platform, internal};

/// Paging parameters of a list request.
#[derive(Debug, Default, Clone)]
pub struct ListQuery {
    /// `maxresults`.
    pub maxresults: Option<String>,
    /// `$skiptoken`.
    pub skiptoken: Option<String>,
    /// The api-version to carry into `nextLink`.
    pub api_version: String,
}

/// What a store call of a kind answers.
pub(crate) type StoreFuture<'a> = Pin<Box<dyn Future<Output = kagi_store::Result<()>> + Send + 'a>>;

/// A store change of a kind `K`.
pub(crate) enum StoreOp<'a, K: Kind + ?Sized> {
    /// Adds a version, creating the object if it is new.
    Add(&'a ObjectName, &'a K::Record),
    /// Replaces the public part of a version.
    Update(&'a ObjectName, &'a K::Version),
    /// Marks deleted (deletion and purge times) or live again (`None`).
    SetDeleted(&'a ObjectName, Option<(i64, i64)>),
    /// Removes the object and its versions.
    Purge(&'a ObjectName),
    /// Inserts a whole object (restore).
    Insert(&'a ObjectRecord<K::Record>),
}

/// A step of the lifecycle, for the permission it needs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Get,
    List,
    Update,
    Delete,
    Recover,
    Purge,
    Backup,
    Restore,
}

/// What tells one kind from another on the wire, in messages and in backups.
pub(crate) struct Names {
    /// What change events call it; its name is the noun of messages (`Key`).
    object_type: ObjectType,
    /// The path segment and scope of the collection (`keys`).
    collection: &'static str,
    /// The id field of wire shapes (`kid`).
    id_field: &'static str,
    /// Its backup blobs.
    backup: &'static BackupKind,
    /// 404 for no live object (or version) of a name.
    not_found: fn(&str, Option<&str>) -> KvError,
    /// 404 for no deleted object of a name.
    deleted_not_found: fn(&str) -> KvError,
    /// The permission each step of the lifecycle needs.
    steps: fn(Op) -> DataAction,
}

impl Names {
    /// The names of a kind, with Azure's 404 messages for a key (change them with
    /// [`Self::errors`]).
    pub(crate) const fn new(
        object_type: ObjectType,
        collection: &'static str,
        id_field: &'static str,
        backup: &'static BackupKind,
        steps: fn(Op) -> DataAction,
    ) -> Self {
        Self {
            object_type,
            collection,
            id_field,
            backup,
            steps,
            not_found: KvError::key_not_found,
            deleted_not_found: KvError::deleted_key_not_found,
        }
    }

    /// With these 404s: no live object (or version), no deleted object.
    pub(crate) const fn errors(
        self,
        not_found: fn(&str, Option<&str>) -> KvError,
        deleted_not_found: fn(&str) -> KvError,
    ) -> Self {
        Self {
            not_found,
            deleted_not_found,
            ..self
        }
    }

    /// The noun of messages (`Key`).
    fn noun(&self) -> &'static str {
        self.object_type.as_str()
    }

    /// The path segment of the deleted collection (`deletedkeys`).
    fn deleted_collection(&self) -> String {
        format!("deleted{}", self.collection)
    }
}

/// One kind of versioned object.
pub(crate) trait Kind: 'static {
    /// A version as memory holds it.
    type Version: Versioned + Send + Sync + 'static;
    /// A version as the store keeps it.
    type Record: Into<Self::Version> + Send + Sync;
    /// Its names and backup blobs.
    const NAMES: Names;

    /// The vault's objects of this kind.
    fn objects(state: &VaultState) -> &RwLock<ObjectMap<Self::Version>>;
    /// The permission of a step.
    fn action(op: Op) -> DataAction {
        (Self::NAMES.steps)(op)
    }
    /// Logs a change (`what`: "soft-deleted", …); never material.
    fn log(vault: &VaultName, name: &ObjectName, what: &str) {
        let noun = Self::NAMES.noun().to_ascii_lowercase();
        tracing::info!(vault = %vault, object = %name, "{noun} {what}");
    }

    /// Runs one store change of this kind.
    fn store<'a>(s: &'a dyn Store, vault: &'a VaultName, op: StoreOp<'a, Self>) -> StoreFuture<'a>;

    /// The version's own attributes (see [`attributes`]).
    fn attributes(v: &Self::Version) -> Map<String, Value>;
    /// Adds the version's other list fields (tags, …) to an item.
    fn summary(v: &Self::Version, item: &mut Value);
    /// The bundle of a version (without secret material).
    fn bundle(view: &ObjectView<'_>, name: &str, v: &Self::Version) -> Value;
    /// The bundle of an object without versions.
    fn empty_bundle(view: &ObjectView<'_>, name: &str) -> Value;

    /// After the store has purged an object: releases what it kept outside the store (the HSM
    /// objects of a key's versions).
    fn purged(_platform: &Platform, _vault: &VaultName, _e: &Entry<Self::Version>) {}
}

/// `Kind::objects` as the named field of the vault's state, and `Kind::store` as calls of the
/// named `Store` methods: add version, update version, set deleted, purge, insert.
macro_rules! store_calls {
    ($field:ident: $add:ident, $update:ident, $set_deleted:ident, $purge:ident, $insert:ident) => {
        fn objects(
            state: &$crate::state::VaultState,
        ) -> &std::sync::RwLock<$crate::state::ObjectMap<Self::Version>> {
            &state.$field
        }

        fn store<'a>(
            s: &'a dyn kagi_store::Store,
            vault: &'a kagi_core::VaultName,
            op: $crate::versioned::StoreOp<'a, Self>,
        ) -> $crate::versioned::StoreFuture<'a> {
            use $crate::versioned::StoreOp;
            match op {
                StoreOp::Add(name, v) => s.$add(vault, name, v),
                StoreOp::Update(name, v) => s.$update(vault, name, &v.version, &v.info),
                StoreOp::SetDeleted(name, deleted) => s.$set_deleted(vault, name, deleted),
                StoreOp::Purge(name) => s.$purge(vault, name),
                StoreOp::Insert(o) => s.$insert(vault, o),
            }
        }
    };
}
pub(crate) use store_calls;

/// The public `Platform` methods of a kind that only delegate to the lifecycle. A kind names
/// them, each with its doc comment, in this order: delete, get deleted, recover, purge, list,
/// list deleted, list versions. (Inside, each is `[async] fn name(arguments after caller and
/// vault) -> Output = generic(extra);`, calling `self.generic::<Kind>(caller, vault,
/// arguments, extra)`.)
macro_rules! delegations {
    (@one $kind:ty; [$($doc:tt)*] [$($async:tt)*] [$($await:tt)*]
        $method:ident($($arg:ident: $ty:ty),*) -> $out:ty
            = $generic:ident $(($($extra:expr),*))?; $($rest:tt)*) => {
        impl $crate::Platform {
            $($doc)*
            pub $($async)* fn $method(
                &self,
                caller: &kagi_identity::Principal,
                vault: &str,
                $($arg: $ty),*
            ) -> Result<$out, kagi_core::KvError> {
                self.$generic::<$kind>(caller, vault, $($arg,)* $($($extra),*)?) $($await)*
            }
        }
        $crate::versioned::delegations!($kind; $($rest)*);
    };
    ($kind:ty,
     $(#[$d1:meta])* $delete:ident,
     $(#[$d2:meta])* $get_deleted:ident,
     $(#[$d3:meta])* $recover:ident,
     $(#[$d4:meta])* $purge:ident,
     $(#[$d5:meta])* $list:ident,
     $(#[$d6:meta])* $list_deleted:ident,
     $(#[$d7:meta])* $list_versions:ident $(,)?) => {
        $crate::versioned::delegations! {
            $kind;
            $(#[$d1])* async fn $delete(name: &str) -> serde_json::Value = delete_object;
            $(#[$d2])* fn $get_deleted(name: &str) -> serde_json::Value = get_deleted_object;
            $(#[$d3])* async fn $recover(name: &str) -> serde_json::Value = recover_object;
            $(#[$d4])* async fn $purge(name: &str) -> () = purge_object;
            $(#[$d5])* fn $list(q: &$crate::versioned::ListQuery) -> serde_json::Value
                = list_objects(false);
            $(#[$d6])* fn $list_deleted(q: &$crate::versioned::ListQuery) -> serde_json::Value
                = list_objects(true);
            $(#[$d7])* fn $list_versions(name: &str, q: &$crate::versioned::ListQuery)
                -> serde_json::Value = list_object_versions;
        }
    };
    ($kind:ty;) => {};
    ($kind:ty; $(#[$doc:meta])* async fn $($rest:tt)*) => {
        $crate::versioned::delegations!(@one $kind; [$(#[$doc])*] [async] [.await] $($rest)*);
    };
    ($kind:ty; $(#[$doc:meta])* fn $($rest:tt)*) => {
        $crate::versioned::delegations!(@one $kind; [$(#[$doc])*] [] [] $($rest)*);
    };
}
pub(crate) use delegations;

/// Azure's common attributes of a version; a kind adds its own.
pub(crate) fn attributes(
    enabled: bool,
    nbf: Option<i64>,
    exp: Option<i64>,
    created: i64,
    updated: i64,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("enabled".into(), json!(enabled));
    if let Some(nbf) = nbf {
        m.insert("nbf".into(), json!(nbf));
    }
    if let Some(exp) = exp {
        m.insert("exp".into(), json!(exp));
    }
    m.insert("created".into(), json!(created));
    m.insert("updated".into(), json!(updated));
    m
}

/// Adds `tags` to a shape, when there are any.
pub(crate) fn add_tags(tags: &Tags, v: &mut Value) {
    if !tags.is_empty() {
        v["tags"] = json!(tags);
    }
}

/// Renders the objects of one vault.
pub(crate) struct ObjectView<'a> {
    pub(crate) uri: String,
    pub(crate) record: &'a VaultRecord,
}

impl ObjectView<'_> {
    /// The id of an object, or of one of its versions.
    pub(crate) fn id<K: Kind>(&self, name: &str, version: Option<&str>) -> String {
        match version {
            Some(v) => format!("{}{}/{name}/{v}", self.uri, K::NAMES.collection),
            None => format!("{}{}/{name}", self.uri, K::NAMES.collection),
        }
    }

    /// A version's attributes, with the vault's recovery settings.
    pub(crate) fn attributes<K: Kind>(&self, v: &K::Version) -> Value {
        let mut m = K::attributes(v);
        m.insert(
            "recoveryLevel".into(),
            json!(self.record.properties.recovery_level()),
        );
        m.insert(
            "recoverableDays".into(),
            json!(self.record.properties.soft_delete_retention_in_days),
        );
        Value::Object(m)
    }

    /// `{<id>, attributes, …}` of a version under `id`.
    fn summary<K: Kind>(&self, id: String, v: &K::Version) -> Value {
        let mut out = json!({K::NAMES.id_field: id, "attributes": self.attributes::<K>(v)});
        K::summary(v, &mut out);
        out
    }

    fn deleted_fields<K: Kind>(&self, mut v: Value, e: &Entry<K::Version>) -> Value {
        let deleted = e.deleted_at.unwrap_or_default();
        v["recoveryId"] = json!(format!(
            "{}{}/{}",
            self.uri,
            K::NAMES.deleted_collection(),
            e.name
        ));
        v["deletedDate"] = json!(deleted);
        v["scheduledPurgeDate"] = json!(e.purge_at.unwrap_or(
            deleted + i64::from(self.record.properties.soft_delete_retention_in_days) * DAY
        ));
        v
    }

    /// A deleted bundle (the current version of a deleted object).
    pub(crate) fn deleted_bundle<K: Kind>(&self, e: &Entry<K::Version>) -> Value {
        let v = e
            .latest()
            .map(|v| K::bundle(self, e.name.as_str(), v))
            .unwrap_or_else(|| K::empty_bundle(self, e.name.as_str()));
        self.deleted_fields::<K>(v, e)
    }

    /// A list item (versionless id, current version's attributes).
    pub(crate) fn item<K: Kind>(&self, e: &Entry<K::Version>) -> Value {
        let id = self.id::<K>(e.name.as_str(), None);
        match e.latest() {
            Some(v) => self.summary::<K>(id, v),
            None => json!({ K::NAMES.id_field: id }),
        }
    }

    /// A list item of one version.
    pub(crate) fn version_item<K: Kind>(&self, name: &str, v: &K::Version) -> Value {
        self.summary::<K>(self.id::<K>(name, Some(v.version().as_str())), v)
    }

    /// A deleted list item.
    pub(crate) fn deleted_item<K: Kind>(&self, e: &Entry<K::Version>) -> Value {
        let v = self.item::<K>(e);
        self.deleted_fields::<K>(v, e)
    }
}

/// A store failure as the answer: a conflict is the client's to retry (on a shared store,
/// another node changed the object since this node read it — deleted or purged it, or added
/// the version this one was adding); anything else is the server's.
fn store_error(context: &str, noun: &str, e: StoreError) -> KvError {
    match e {
        StoreError::Conflict(detail) => {
            tracing::info!(context, %detail, "store conflict");
            KvError::conflict(format!(
                "The {} was changed by another request meanwhile; read it again and retry.",
                noun.to_ascii_lowercase()
            ))
        }
        StoreError::Contended(detail) => {
            tracing::warn!(context, %detail, "store contended");
            KvError::new(
                ErrorCode::ServiceUnavailable,
                "The store is busy with concurrent changes; retry shortly.",
            )
        }
        e => internal(&format!("{context} {}", noun.to_ascii_lowercase()), e),
    }
}

/// A version of a live object: its vault, its entry and the version.
pub(crate) type Found<K> = (
    VaultRecord,
    Entry<<K as Kind>::Version>,
    Arc<<K as Kind>::Version>,
);

/// A copy of one object's entry (versions shared).
fn get<K: Kind>(state: &VaultState, name: &ObjectName) -> Option<Entry<K::Version>> {
    read(K::objects(state)).get(&name.folded()).cloned()
}

impl Platform {
    /// The live vault named by the host, after checking that `caller` may do `action` on it,
    /// or on the object `name` (so that role assignments at the object's scope count).
    pub(crate) fn object_vault<K: Kind>(
        &self,
        caller: &Principal,
        vault: &str,
        action: DataAction,
        name: Option<&str>,
    ) -> Result<(Arc<VaultState>, VaultRecord), KvError> {
        let vault = VaultName::parse(vault)
            .map_err(|_| KvError::new(ErrorCode::VaultNotFound, "The vault was not found."))?;
        let state = self.usable_vault(&vault)?;
        let record = state.record();
        self.authorize_object(
            caller,
            &record,
            action,
            name.map(|n| (K::NAMES.collection, n)),
        )?;
        Ok((state, record))
    }

    /// [`Self::object_vault`] for the step `op` on the object `name`, and the name parsed.
    fn named_object<K: Kind>(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        op: Op,
    ) -> Result<(Arc<VaultState>, VaultRecord, ObjectName), KvError> {
        let (state, record) = self.object_vault::<K>(caller, vault, K::action(op), Some(name))?;
        Ok((state, record, ObjectName::parse(name)?))
    }

    /// Refuses a delete or purge under a lock on the vault or the object.
    fn check_object_unlocked<K: Kind>(
        &self,
        record: &VaultRecord,
        name: &ObjectName,
    ) -> Result<(), KvError> {
        let scope = (K::NAMES.collection, name.as_str());
        self.check_not_locked(
            &crate::directory::object_scope(record, Some(scope)),
            "delete",
        )
    }

    pub(crate) fn object_view<'a>(&self, record: &'a VaultRecord) -> ObjectView<'a> {
        ObjectView {
            uri: self.config.vault_uri(&record.name),
            record,
        }
    }

    /// The live object `name`.
    pub(crate) fn live_object<K: Kind>(
        state: &VaultState,
        name: &ObjectName,
    ) -> Result<Entry<K::Version>, KvError> {
        match get::<K>(state, name) {
            Some(e) if e.deleted_at.is_none() => Ok(e),
            _ => Err((K::NAMES.not_found)(name.as_str(), None)),
        }
    }

    fn deleted_object<K: Kind>(
        state: &VaultState,
        name: &ObjectName,
    ) -> Result<Entry<K::Version>, KvError> {
        match get::<K>(state, name) {
            Some(e) if e.deleted_at.is_some() => Ok(e),
            _ => Err((K::NAMES.deleted_not_found)(name.as_str())),
        }
    }

    /// A version of an entry (the current one without `version`).
    fn pick<K: Kind>(
        e: &Entry<K::Version>,
        version: Option<&str>,
    ) -> Result<Arc<K::Version>, KvError> {
        match version.filter(|v| !v.is_empty()) {
            None => e.latest().cloned(),
            Some(v) => {
                let v = kagi_core::KeyVersion::parse(v)?;
                e.version(&v).cloned()
            }
        }
        .ok_or_else(|| (K::NAMES.not_found)(e.name.as_str(), version))
    }

    /// A version of a live object, for a caller allowed `action` on it.
    pub(crate) fn lookup<K: Kind>(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        version: Option<&str>,
        action: DataAction,
    ) -> Result<Found<K>, KvError> {
        let (state, record) = self.object_vault::<K>(caller, vault, action, Some(name))?;
        let name = ObjectName::parse(name)?;
        let e = Self::live_object::<K>(&state, &name)?;
        let v = Self::pick::<K>(&e, version)?;
        Ok((record, e, v))
    }

    /// `GET /{collection}/{name}/{version?}`: a version of a live object.
    pub(crate) fn get_object<K: Kind>(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Found<K>, KvError> {
        self.lookup::<K>(caller, vault, name, version, K::action(Op::Get))
    }

    /// Records the next version of `name` (`make` builds it from its order), creating the
    /// object on first use. A soft-deleted name is 409 `ObjectIsDeletedButRecoverable`.
    /// Answers the object's name as first created, and the version.
    pub(crate) async fn add_object_version<K: Kind>(
        &self,
        state: &VaultState,
        record: &VaultRecord,
        name: &ObjectName,
        make: impl FnOnce(i64) -> (K::Record, K::Version),
    ) -> Result<(ObjectName, Arc<K::Version>), KvError> {
        let _w = state.write.lock().await;
        let existing = get::<K>(state, name);
        if let Some(e) = &existing
            && e.deleted_at.is_some()
        {
            return Err(KvError::deleted_but_recoverable(
                K::NAMES.noun(),
                name.as_str(),
            ));
        }
        let seq = existing
            .as_ref()
            .and_then(|e| e.latest().map(|v| v.seq()))
            .unwrap_or(0)
            + 1;
        let (rec, version) = make(seq);
        K::store(self.store.as_ref(), &record.name, StoreOp::Add(name, &rec))
            .await
            .map_err(|e| store_error("add version of", K::NAMES.noun(), e))?;
        let version = Arc::new(version);
        let shown = existing
            .as_ref()
            .map_or_else(|| name.clone(), |e| e.name.clone());
        write(K::objects(state))
            .entry(name.folded())
            .or_insert_with(|| Entry {
                name: shown.clone(),
                deleted_at: None,
                purge_at: None,
                versions: Vec::new(),
            })
            .versions
            .push(version.clone());
        K::log(
            &record.name,
            &shown,
            &format!("version {} created", version.version()),
        );
        drop(_w);
        self.after_change(state, K::NAMES.object_type, name).await;
        Ok((shown, version))
    }

    /// `PATCH /{collection}/{name}/{version?}`: `change` makes the updated version from the
    /// one in force; answers its bundle.
    pub(crate) async fn update_object<K: Kind>(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        version: Option<&str>,
        change: impl FnOnce(&K::Version) -> Result<K::Version, KvError>,
    ) -> Result<Value, KvError> {
        let (state, record, name) = self.named_object::<K>(caller, vault, name, Op::Update)?;
        let _w = state.write.lock().await;
        let e = Self::live_object::<K>(&state, &name)?;
        let v = Self::pick::<K>(&e, version)?;
        let updated = change(&v)?;
        K::store(
            self.store.as_ref(),
            &record.name,
            StoreOp::Update(&name, &updated),
        )
        .await
        .map_err(|err| store_error("update", K::NAMES.noun(), err))?;
        let updated = Arc::new(updated);
        if let Some(entry) = write(K::objects(&state)).get_mut(&name.folded())
            && let Some(slot) = entry
                .versions
                .iter_mut()
                .find(|x| x.version() == updated.version())
        {
            *slot = updated.clone();
        }
        K::log(
            &record.name,
            &e.name,
            &format!("version {} updated", updated.version()),
        );
        drop(_w);
        self.after_change(&state, K::NAMES.object_type, &name).await;
        Ok(K::bundle(
            &self.object_view(&record),
            e.name.as_str(),
            &updated,
        ))
    }

    fn next_link(
        &self,
        record: &VaultRecord,
        path: &str,
        q: &ListQuery,
        token: Option<String>,
        size: usize,
    ) -> Value {
        match token {
            Some(t) => json!(format!(
                "{}{path}?api-version={}&$skiptoken={t}&maxresults={size}",
                self.config.vault_uri(&record.name),
                q.api_version
            )),
            None => Value::Null,
        }
    }

    /// `GET /{collection}` (live objects) or `GET /{deleted collection}`: one page.
    pub(crate) fn list_objects<K: Kind>(
        &self,
        caller: &Principal,
        vault: &str,
        q: &ListQuery,
        deleted: bool,
    ) -> Result<Value, KvError> {
        let (state, record) = self.object_vault::<K>(caller, vault, K::action(Op::List), None)?;
        let size = paging::page_size(q.maxresults.as_deref())?;
        let after = q
            .skiptoken
            .as_deref()
            .map(paging::parse_skip_token)
            .transpose()?;
        let chosen: Vec<Entry<K::Version>> = read(K::objects(&state))
            .values()
            .filter(|e| e.deleted_at.is_some() == deleted)
            .cloned()
            .collect();
        let (page, token) = paging::page(chosen, |e| e.name.folded(), after.as_deref(), size);
        let view = self.object_view(&record);
        let (items, path): (Vec<Value>, String) = if deleted {
            (
                page.iter().map(|e| view.deleted_item::<K>(e)).collect(),
                K::NAMES.deleted_collection(),
            )
        } else {
            (
                page.iter().map(|e| view.item::<K>(e)).collect(),
                K::NAMES.collection.to_string(),
            )
        };
        Ok(json!({
            "value": items,
            "nextLink": self.next_link(&record, &path, q, token, size),
        }))
    }

    /// `GET /{collection}/{name}/versions`: one page of every version.
    pub(crate) fn list_object_versions<K: Kind>(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        q: &ListQuery,
    ) -> Result<Value, KvError> {
        let (state, record, name) = self.named_object::<K>(caller, vault, name, Op::List)?;
        let size = paging::page_size(q.maxresults.as_deref())?;
        // Azure answers a name with no live object with an empty list, not 404.
        let Ok(e) = Self::live_object::<K>(&state, &name) else {
            return Ok(json!({"value": [], "nextLink": null}));
        };
        let after = q
            .skiptoken
            .as_deref()
            .map(paging::parse_skip_token)
            .transpose()?;
        let (page, token) = paging::page(
            e.versions.clone(),
            |v| v.version().to_string(),
            after.as_deref(),
            size,
        );
        let view = self.object_view(&record);
        let path = format!("{}/{}/versions", K::NAMES.collection, e.name);
        Ok(json!({
            "value": page.iter().map(|v| view.version_item::<K>(e.name.as_str(), v)).collect::<Vec<_>>(),
            "nextLink": self.next_link(&record, &path, q, token, size),
        }))
    }

    /// `DELETE /{collection}/{name}`: soft delete of every version for the vault's retention.
    pub(crate) async fn delete_object<K: Kind>(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (state, record, name) = self.named_object::<K>(caller, vault, name, Op::Delete)?;
        let _w = state.write.lock().await;
        let mut e = Self::live_object::<K>(&state, &name)?;
        self.check_object_unlocked::<K>(&record, &name)?;
        let now = self.clock.now();
        let purge_at = now + i64::from(record.properties.soft_delete_retention_in_days) * DAY;
        K::store(
            self.store.as_ref(),
            &record.name,
            StoreOp::SetDeleted(&name, Some((now, purge_at))),
        )
        .await
        .map_err(|err| store_error("delete", K::NAMES.noun(), err))?;
        e.deleted_at = Some(now);
        e.purge_at = Some(purge_at);
        write(K::objects(&state)).insert(name.folded(), e.clone());
        K::log(&record.name, &e.name, "soft-deleted");
        drop(_w);
        self.after_change(&state, K::NAMES.object_type, &name).await;
        Ok(self.object_view(&record).deleted_bundle::<K>(&e))
    }

    /// `GET /{deleted collection}/{name}`.
    pub(crate) fn get_deleted_object<K: Kind>(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (state, record, name) = self.named_object::<K>(caller, vault, name, Op::Get)?;
        let e = Self::deleted_object::<K>(&state, &name)?;
        Ok(self.object_view(&record).deleted_bundle::<K>(&e))
    }

    /// `POST /{deleted collection}/{name}/recover`: live again, every version; answers the
    /// current version's bundle.
    pub(crate) async fn recover_object<K: Kind>(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (state, record, name) = self.named_object::<K>(caller, vault, name, Op::Recover)?;
        let _w = state.write.lock().await;
        let mut e = Self::deleted_object::<K>(&state, &name)?;
        K::store(
            self.store.as_ref(),
            &record.name,
            StoreOp::SetDeleted(&name, None),
        )
        .await
        .map_err(|err| store_error("recover", K::NAMES.noun(), err))?;
        e.deleted_at = None;
        e.purge_at = None;
        write(K::objects(&state)).insert(name.folded(), e.clone());
        K::log(&record.name, &e.name, "recovered");
        drop(_w);
        self.after_change(&state, K::NAMES.object_type, &name).await;
        let latest = e
            .latest()
            .ok_or_else(|| internal("recover", "object without versions"))?;
        Ok(K::bundle(
            &self.object_view(&record),
            e.name.as_str(),
            latest,
        ))
    }

    /// `DELETE /{deleted collection}/{name}`: permanent removal; refused (403) while purge
    /// protection holds the object until its retention ends, or a lock forbids deletes.
    pub(crate) async fn purge_object<K: Kind>(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<(), KvError> {
        let (state, record, name) = self.named_object::<K>(caller, vault, name, Op::Purge)?;
        let _w = state.write.lock().await;
        let e = Self::deleted_object::<K>(&state, &name)?;
        self.check_object_unlocked::<K>(&record, &name)?;
        if record.properties.enable_purge_protection
            && e.purge_at.is_some_and(|t| self.clock.now() < t)
        {
            return Err(KvError::forbidden(format!(
                "Operation \"purge\" is not allowed because purge protection is enabled for this \
                 vault. Key Vault service will automatically purge it after the retention \
                 period has passed ({}).",
                kagi_core::time::rfc3339(e.purge_at.unwrap_or_default())
            ))
            .with_inner("PurgeProtectionEnabled"));
        }
        K::store(self.store.as_ref(), &record.name, StoreOp::Purge(&name))
            .await
            .map_err(|err| store_error("purge", K::NAMES.noun(), err))?;
        write(K::objects(&state)).remove(&name.folded());
        K::purged(self, &record.name, &e);
        K::log(&record.name, &e.name, "purged");
        Ok(())
    }

    /// Releases what versions that never reached the store made outside it (their HSM
    /// objects), as a purge would.
    pub(crate) fn discard_versions<K: Kind>(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        versions: Vec<K::Version>,
    ) {
        let e = Entry {
            name: name.clone(),
            deleted_at: None,
            purge_at: None,
            versions: versions.into_iter().map(Arc::new).collect(),
        };
        K::purged(self, vault, &e);
    }

    /// Purges the vault's deleted objects whose retention has ended.
    pub(crate) async fn purge_expired_objects<K: Kind>(
        &self,
        state: &VaultState,
        now: i64,
    ) -> Result<usize, KvError> {
        let record = state.record();
        let due: Vec<ObjectName> = read(K::objects(state))
            .values()
            .filter(|e| e.purge_at.is_some_and(|t| t <= now))
            .map(|e| e.name.clone())
            .collect();
        let mut purged = 0;
        for name in &due {
            let _w = state.write.lock().await;
            // Re-check under the lock: a recover may have run since the scan.
            if !get::<K>(state, name)
                .is_some_and(|e| e.deleted_at.is_some() && e.purge_at.is_some_and(|t| t <= now))
            {
                continue;
            }
            purged += 1;
            K::store(self.store.as_ref(), &record.name, StoreOp::Purge(name))
                .await
                .map_err(|err| store_error("purge expired", K::NAMES.noun(), err))?;
            let removed = write(K::objects(state)).remove(&name.folded());
            if let Some(e) = removed {
                K::purged(self, &record.name, &e);
            }
            K::log(&record.name, name, "purged after retention");
        }
        Ok(purged)
    }

    /// `POST /{collection}/{name}/backup`: every version (`export` gives each one's material
    /// in the clear), sealed so that only a kagi holding the same root key can restore it,
    /// and only into a vault of this one's subscription, tenant and location.
    pub(crate) fn backup_object<K: Kind, B: Serialize>(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        export: impl Fn(&VaultRecord, &ObjectName, &K::Version) -> Result<B, KvError>,
    ) -> Result<BackupBlob, KvError> {
        let (state, record, name) = self.named_object::<K>(caller, vault, name, Op::Backup)?;
        let e = Self::live_object::<K>(&state, &name)?;
        let versions = e
            .versions
            .iter()
            .map(|v| export(&record, &name, v))
            .collect::<Result<Vec<B>, KvError>>()?;
        let blob = self.seal_object_backup(K::NAMES.backup, &record, e.name.as_str(), versions)?;
        K::log(&record.name, &e.name, "backed up");
        Ok(blob)
    }

    /// `POST /{collection}/restore`: a backup taken in this vault's subscription, tenant and
    /// location, into a vault where the name is free (`import` re-seals each version for this
    /// vault). Answers the current version's bundle.
    pub(crate) async fn restore_object<K: Kind, B: DeserializeOwned>(
        &self,
        caller: &Principal,
        vault: &str,
        blob: BackupBlob,
        import: impl Fn(&VaultRecord, &ObjectName, &B) -> Result<(K::Record, K::Version), KvError>,
    ) -> Result<Value, KvError> {
        let (state, record) =
            self.object_vault::<K>(caller, vault, K::action(Op::Restore), None)?;
        let (name, payload): (_, Vec<B>) =
            self.open_object_backup(K::NAMES.backup, caller, &record, &blob)?;
        let _w = state.write.lock().await;
        // The name is checked before any version is imported: importing a key version may
        // make an object in the HSM.
        match get::<K>(&state, &name) {
            Some(e) if e.deleted_at.is_some() => {
                return Err(KvError::deleted_but_recoverable(
                    K::NAMES.noun(),
                    name.as_str(),
                ));
            }
            Some(_) => {
                return Err(KvError::conflict(format!(
                    "{} {name} already exists in this vault; restore needs a name that is not \
                     in use.",
                    K::NAMES.noun()
                )));
            }
            None => {}
        }
        let mut imported = Vec::with_capacity(payload.len());
        for v in &payload {
            match import(&record, &name, v) {
                Ok(x) => imported.push(x),
                Err(e) => {
                    let made = imported.into_iter().map(|(_, v)| v).collect();
                    self.discard_versions::<K>(&record.name, &name, made);
                    return Err(e);
                }
            }
        }
        imported.sort_by_key(|(_, v)| v.seq());
        let (records, versions): (Vec<K::Record>, Vec<K::Version>) = imported.into_iter().unzip();
        let rec = ObjectRecord {
            name: name.clone(),
            deleted_at: None,
            purge_at: None,
            versions: records,
        };
        if let Err(e) = K::store(self.store.as_ref(), &record.name, StoreOp::Insert(&rec)).await {
            self.discard_versions::<K>(&record.name, &name, versions);
            return Err(match e {
                StoreError::Conflict(m) => KvError::conflict(m),
                e => store_error("restore", K::NAMES.noun(), e),
            });
        }
        let entry = Entry {
            name: name.clone(),
            deleted_at: None,
            purge_at: None,
            versions: versions.into_iter().map(Arc::new).collect(),
        };
        write(K::objects(&state)).insert(name.folded(), entry.clone());
        K::log(&record.name, &name, "restored");
        drop(_w);
        self.after_change(&state, K::NAMES.object_type, &name).await;
        let latest = entry.latest().ok_or_else(object_backup::invalid)?;
        Ok(K::bundle(&self.object_view(&record), name.as_str(), latest))
    }
}

/// A new random version id.
pub(crate) fn random_version() -> Result<kagi_core::KeyVersion, KvError> {
    kagi_crypto::random_array()
        .map(kagi_core::KeyVersion::from_random)
        .map_err(|e| internal("rng", e))
}

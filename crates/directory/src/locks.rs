//! Management locks (`CanNotDelete`, `ReadOnly`) and the checks that refuse what a lock at or
//! above (or, for a move, below) a scope forbids.

use kagi_core::rbac::Scope;
use kagi_core::{ErrorCode, KvError};
use kagi_identity::Principal;
use kagi_store::LockRecord;
use serde_json::{Value, json};

use crate::{Directory, bad, internal};

impl Directory {
    /// `PUT {scope}/providers/Microsoft.Authorization/locks/{name}`. `scope` must exist; the
    /// caller checks that (vaults are not the directory's to know).
    pub async fn put_lock(
        &self,
        caller: &Principal,
        scope: &Scope,
        name: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        self.require_admin(caller)?;
        if name.is_empty()
            || name.len() > 90
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad(
                "Lock names are 1-90 letters, digits, '-', '_' and '.'.",
            ));
        }
        let props = input.get("properties").cloned().unwrap_or(Value::Null);
        let level = match props.get("level").and_then(Value::as_str) {
            Some(l) if l.eq_ignore_ascii_case("CanNotDelete") => "CanNotDelete",
            Some(l) if l.eq_ignore_ascii_case("ReadOnly") => "ReadOnly",
            _ => return Err(bad("properties.level must be CanNotDelete or ReadOnly.")),
        };
        let notes = props
            .get("notes")
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .take(512)
            .collect::<String>();
        let id = lock_id(scope, name);
        let existed = self.state().locks.iter().any(|l| l.id == id);
        let rec = LockRecord {
            id: id.clone(),
            scope: scope.as_str().to_string(),
            name: name.to_string(),
            level: level.into(),
            notes,
        };
        self.store
            .put_lock(&rec)
            .await
            .map_err(|e| internal("put lock", e))?;
        {
            let mut d = self.state_mut();
            d.locks.retain(|l| l.id != id);
            d.locks.push(rec.clone());
        }
        tracing::info!(lock = %id, "lock set");
        Ok((if existed { 200 } else { 201 }, lock_json(&rec)))
    }

    /// Lists locks at or above a scope.
    pub fn list_locks(&self, caller: &Principal, scope: &str) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let scope = Scope::parse(scope)?;
        let value: Vec<Value> = self
            .state()
            .locks
            .iter()
            .filter(|l| {
                Scope::parse(&l.scope).is_ok_and(|s| s.contains(&scope) || scope.contains(&s))
            })
            .map(lock_json)
            .collect();
        Ok(json!({ "value": value }))
    }

    /// `GET` of a lock.
    pub fn get_lock(&self, caller: &Principal, scope: &str, name: &str) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let scope = Scope::parse(scope)?;
        let id = lock_id(&scope, name);
        self.state()
            .locks
            .iter()
            .find(|l| l.id == id)
            .map(lock_json)
            .ok_or_else(|| {
                KvError::new(ErrorCode::NotFound, "The lock does not exist.")
                    .with_inner("LockNotFound")
            })
    }

    /// `DELETE` of a lock.
    pub async fn delete_lock(
        &self,
        caller: &Principal,
        scope: &str,
        name: &str,
    ) -> Result<u16, KvError> {
        self.require_admin(caller)?;
        let scope = Scope::parse(scope)?;
        let id = lock_id(&scope, name);
        if !self.state().locks.iter().any(|l| l.id == id) {
            return Ok(204);
        }
        self.store
            .delete_lock(&id)
            .await
            .map_err(|e| internal("delete lock", e))?;
        self.state_mut().locks.retain(|l| l.id != id);
        tracing::info!(lock = %id, "lock removed");
        Ok(200)
    }

    /// Refuses `operation` on `scope` when a lock at or above it forbids it: every lock
    /// forbids deletion; a ReadOnly lock also forbids changes.
    pub fn check_not_locked(&self, scope: &str, operation: &str) -> Result<(), KvError> {
        let Ok(target) = Scope::parse(scope) else {
            return Ok(());
        };
        let d = self.state();
        let locked: Vec<&LockRecord> = d
            .locks
            .iter()
            .filter(|l| {
                (operation == "delete" || l.level == "ReadOnly")
                    && Scope::parse(&l.scope).is_ok_and(|s| s.contains(&target))
            })
            .collect();
        if locked.is_empty() {
            return Ok(());
        }
        Err(KvError::conflict(format!(
            "The scope '{}' cannot perform {operation} operation because following scope(s) are locked: '{}'. Please remove the lock and try again.",
            target.as_str(),
            locked.iter().map(|l| l.scope.as_str()).collect::<Vec<_>>().join("', '")
        ))
        .with_inner("ScopeLocked"))
    }

    /// Refuses (409 `ScopeLocked`) when any lock is at, above or below `scope`: a resource
    /// that moves is deleted at its old id, and a lock on one of its children (a key, a secret)
    /// would be orphaned by the move.
    pub fn check_not_locked_within(&self, scope: &str) -> Result<(), KvError> {
        self.check_not_locked(scope, "delete")?;
        let Ok(target) = Scope::parse(scope) else {
            return Ok(());
        };
        let d = self.state();
        let below: Vec<&str> = d
            .locks
            .iter()
            .filter(|l| Scope::parse(&l.scope).is_ok_and(|s| target.contains(&s)))
            .map(|l| l.scope.as_str())
            .collect();
        if below.is_empty() {
            return Ok(());
        }
        Err(KvError::conflict(format!(
            "The scope '{}' cannot be moved because following scope(s) below it are locked: '{}'. \
             Please remove the lock and try again.",
            target.as_str(),
            below.join("', '")
        ))
        .with_inner("ScopeLocked"))
    }
}

fn lock_json(l: &LockRecord) -> Value {
    json!({
        "id": format!("{}/providers/Microsoft.Authorization/locks/{}", l.scope, l.name),
        "name": l.name,
        "type": "Microsoft.Authorization/locks",
        "properties": {"level": l.level, "notes": l.notes},
    })
}

/// The id of the lock `name` at `scope` (lower-case).
fn lock_id(scope: &Scope, name: &str) -> String {
    format!(
        "{}/providers/microsoft.authorization/locks/{}",
        scope.as_str(),
        name.to_ascii_lowercase()
    )
}

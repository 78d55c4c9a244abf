//! Role definitions (built-in and custom) and role assignments (RBAC): their management API
//! and the decision whether an assignment grants a data action at a scope.

use kagi_core::rbac::{RoleDefinitionProperties, Scope, builtin_role, builtin_roles};
use kagi_core::time::rfc3339;
use kagi_core::{ErrorCode, KvError};
use kagi_identity::Principal;
use kagi_store::{RoleAssignmentRecord, RoleDefinitionRecord};
use serde_json::{Value, json};

use crate::{Directory, bad, guid, internal};

/// The role definition GUID at the end of a `roleDefinitionId`.
fn role_guid(role_definition_id: &str) -> Result<String, KvError> {
    guid(
        role_definition_id
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(""),
    )
}

impl Directory {
    /// A role definition by GUID: built-in, or custom.
    pub fn role_definition(&self, guid: &str) -> Option<RoleDefinitionProperties> {
        builtin_role(guid).cloned().or_else(|| {
            self.state()
                .custom_roles
                .get(&guid.to_ascii_lowercase())
                .map(|(_, r)| r.clone())
        })
    }

    /// Whether a role assignment of `oid` at a scope containing `scope` grants `action`.
    pub fn rbac_allows(&self, oid: &str, scope: &str, action: &str) -> bool {
        let target = Scope::parse(scope).ok();
        let d = self.state();
        d.assignments.iter().any(|a| {
            a.principal_id.eq_ignore_ascii_case(oid)
                && target
                    .as_ref()
                    .is_some_and(|t| Scope::parse(&a.scope).is_ok_and(|s| s.contains(t)))
                && builtin_role(&a.role_definition_id)
                    .or_else(|| d.custom_roles.get(&a.role_definition_id).map(|(_, r)| r))
                    .is_some_and(|r| r.grants_data_action(action))
        })
    }

    /// `PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{guid}`. `scope` must
    /// exist; the caller checks that (vaults are not the directory's to know).
    pub async fn put_role_assignment(
        &self,
        caller: &Principal,
        scope: &Scope,
        id: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        self.require_admin(caller)?;
        let id = guid(id)?;
        let props = input
            .get("properties")
            .ok_or_else(|| bad("The property \"properties\" is required."))?;
        let role = role_guid(
            props
                .get("roleDefinitionId")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("properties.roleDefinitionId is required."))?,
        )?;
        if self.role_definition(&role).is_none() {
            return Err(bad(format!("The role definition '{role}' does not exist."))
                .with_inner("RoleDefinitionDoesNotExist"));
        }
        let principal = guid(
            props
                .get("principalId")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("properties.principalId is required."))?,
        )?;
        if !self.state().principals.contains_key(&principal) {
            return Err(bad(format!(
                "Principal {principal} does not exist in the directory {}.",
                caller.tenant_id
            ))
            .with_inner("PrincipalNotFound"));
        }
        if let Some(existing) = self.state().assignments.iter().find(|a| a.id == id) {
            if existing.principal_id == principal
                && existing.role_definition_id == role
                && existing.scope == scope.as_str()
            {
                return Ok((200, assignment_json(existing)));
            }
            return Err(KvError::conflict(
                "A role assignment with this id already exists with other properties.",
            )
            .with_inner("RoleAssignmentUpdateNotPermitted"));
        }
        if self.state().assignments.iter().any(|a| {
            a.principal_id == principal && a.role_definition_id == role && a.scope == scope.as_str()
        }) {
            return Err(KvError::conflict("The role assignment already exists.")
                .with_inner("RoleAssignmentExists"));
        }
        let rec = RoleAssignmentRecord {
            id,
            scope: scope.as_str().to_string(),
            principal_id: principal,
            role_definition_id: role,
            created: self.clock.now(),
        };
        self.store
            .put_role_assignment(&rec)
            .await
            .map_err(|e| internal("put role assignment", e))?;
        self.state_mut().assignments.push(rec.clone());
        tracing::info!(assignment = %rec.id, scope = %rec.scope, "role assignment created");
        Ok((201, assignment_json(&rec)))
    }

    /// `GET` of one role assignment.
    pub fn get_role_assignment(&self, caller: &Principal, id: &str) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let id = guid(id)?;
        self.state()
            .assignments
            .iter()
            .find(|a| a.id == id)
            .map(assignment_json)
            .ok_or_else(|| {
                KvError::new(ErrorCode::NotFound, "The role assignment does not exist.")
                    .with_inner("RoleAssignmentNotFound")
            })
    }

    /// Lists role assignments at or below a scope (and above it: those that apply to it).
    pub fn list_role_assignments(&self, caller: &Principal, scope: &str) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let scope = Scope::parse(scope)?;
        let value: Vec<Value> = self
            .state()
            .assignments
            .iter()
            .filter(|a| {
                Scope::parse(&a.scope).is_ok_and(|s| s.contains(&scope) || scope.contains(&s))
            })
            .map(assignment_json)
            .collect();
        Ok(json!({ "value": value }))
    }

    /// `DELETE` of a role assignment: the next request of that principal is decided without it.
    pub async fn delete_role_assignment(
        &self,
        caller: &Principal,
        id: &str,
    ) -> Result<(u16, Value), KvError> {
        self.require_admin(caller)?;
        let id = guid(id)?;
        let Some(rec) = self
            .state()
            .assignments
            .iter()
            .find(|a| a.id == id)
            .cloned()
        else {
            return Ok((204, Value::Null));
        };
        self.store
            .delete_role_assignment(&id)
            .await
            .map_err(|e| internal("delete role assignment", e))?;
        self.state_mut().assignments.retain(|a| a.id != id);
        tracing::info!(assignment = %id, "role assignment deleted");
        Ok((200, assignment_json(&rec)))
    }

    /// `PUT {scope}/providers/Microsoft.Authorization/roleDefinitions/{guid}`: a custom role.
    pub async fn put_role_definition(
        &self,
        caller: &Principal,
        scope: &str,
        id: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        self.require_admin(caller)?;
        let scope = Scope::parse(scope)?;
        let id = guid(id)?;
        if builtin_roles().iter().any(|(g, _)| *g == id) {
            return Err(
                KvError::forbidden("Built-in role definitions cannot be changed.")
                    .with_inner("RoleDefinitionNotEditable"),
            );
        }
        let mut props: RoleDefinitionProperties =
            serde_json::from_value(input.get("properties").cloned().unwrap_or(Value::Null))
                .map_err(|e| {
                    bad(format!(
                        "The role definition is not valid: {}",
                        e.to_string().chars().take(200).collect::<String>()
                    ))
                })?;
        props.role_type = "CustomRole".into();
        if props.assignable_scopes.is_empty() {
            props.assignable_scopes = vec![scope.as_str().to_string()];
        }
        props.validate()?;
        let existed = self.state().custom_roles.contains_key(&id);
        let rec = RoleDefinitionRecord {
            id: id.clone(),
            scope: scope.as_str().to_string(),
            body: serde_json::to_string(&props).map_err(|e| internal("role", e))?,
        };
        self.store
            .put_role_definition(&rec)
            .await
            .map_err(|e| internal("put role definition", e))?;
        self.state_mut()
            .custom_roles
            .insert(id.clone(), (rec.scope.clone(), props.clone()));
        Ok((
            if existed { 200 } else { 201 },
            role_json(&rec.scope, &id, &props),
        ))
    }

    /// Lists role definitions (built-in and custom) visible at a scope.
    pub fn list_role_definitions(&self, caller: &Principal, scope: &str) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let scope = Scope::parse(scope)?;
        let mut value: Vec<Value> = builtin_roles()
            .iter()
            .map(|(g, r)| role_json(scope.as_str(), g, r))
            .collect();
        for (g, (_, r)) in &self.state().custom_roles {
            value.push(role_json(scope.as_str(), g, r));
        }
        Ok(json!({ "value": value }))
    }

    /// `GET` of one role definition.
    pub fn get_role_definition(
        &self,
        caller: &Principal,
        scope: &str,
        id: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let scope = Scope::parse(scope)?;
        let id = guid(id)?;
        self.role_definition(&id)
            .map(|r| role_json(scope.as_str(), &id, &r))
            .ok_or_else(|| {
                KvError::new(ErrorCode::NotFound, "The role definition does not exist.")
                    .with_inner("RoleDefinitionDoesNotExist")
            })
    }

    /// `DELETE` of a custom role definition; refused while assigned.
    pub async fn delete_role_definition(
        &self,
        caller: &Principal,
        id: &str,
    ) -> Result<u16, KvError> {
        self.require_admin(caller)?;
        let id = guid(id)?;
        if builtin_roles().iter().any(|(g, _)| *g == id) {
            return Err(
                KvError::forbidden("Built-in role definitions cannot be deleted.")
                    .with_inner("RoleDefinitionNotEditable"),
            );
        }
        if !self.state().custom_roles.contains_key(&id) {
            return Ok(204);
        }
        if self
            .state()
            .assignments
            .iter()
            .any(|a| a.role_definition_id == id)
        {
            return Err(KvError::conflict(
                "The role definition is assigned; delete its assignments first.",
            )
            .with_inner("RoleDefinitionHasAssignments"));
        }
        self.store
            .delete_role_definition(&id)
            .await
            .map_err(|e| internal("delete role definition", e))?;
        self.state_mut().custom_roles.remove(&id);
        Ok(200)
    }

    /// The role assignments whose scope is `scope` or below it (a vault and its objects), for
    /// whole-vault backups. `scope` is normalised (lower-case, no trailing slash).
    pub fn role_assignments_within(&self, scope: &str) -> Vec<RoleAssignmentRecord> {
        let below = format!("{scope}/");
        self.state()
            .assignments
            .iter()
            .filter(|a| a.scope == scope || a.scope.starts_with(&below))
            .cloned()
            .collect()
    }
}

/// `/subscriptions/{sub}` of a scope under a subscription, else `""`: ARM names role
/// definitions at their subscription (`/subscriptions/{sub}/providers/Microsoft.Authorization/
/// roleDefinitions/{id}`) wherever they are listed or assigned, and clients (the az CLI's
/// `roleDefinitionName`) match assignments to definitions by that id.
fn subscription_prefix(scope: &str) -> String {
    let mut parts = scope.trim_start_matches('/').split('/');
    match (parts.next(), parts.next()) {
        (Some(s), Some(sub)) if s.eq_ignore_ascii_case("subscriptions") && !sub.is_empty() => {
            format!("/subscriptions/{sub}")
        }
        _ => String::new(),
    }
}

fn assignment_json(a: &RoleAssignmentRecord) -> Value {
    json!({
        "id": format!("{}/providers/Microsoft.Authorization/roleAssignments/{}", a.scope, a.id),
        "name": a.id,
        "type": "Microsoft.Authorization/roleAssignments",
        "properties": {
            "roleDefinitionId": format!(
                "{}/providers/Microsoft.Authorization/roleDefinitions/{}",
                subscription_prefix(&a.scope),
                a.role_definition_id
            ),
            "principalId": a.principal_id,
            "scope": a.scope,
            "createdOn": rfc3339(a.created),
        },
    })
}

fn role_json(scope: &str, id: &str, r: &RoleDefinitionProperties) -> Value {
    let prefix = subscription_prefix(scope);
    json!({
        "id": format!("{prefix}/providers/Microsoft.Authorization/roleDefinitions/{id}"),
        "name": id,
        "type": "Microsoft.Authorization/roleDefinitions",
        "properties": r,
    })
}

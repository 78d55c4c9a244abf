//! Policy assignments: `{scope}/providers/Microsoft.Authorization/policyAssignments/{n}`
//! at a subscription or resource-group scope, stored durably as one JSON file
//! `<data>/policy/assignments.json` (written whole, atomically), and the compliance of every
//! governed resource. Evaluation is `kagi_core::policy`; services enforce Deny in their own
//! create/update paths with [`Platform::policy_deny`]. The bootstrap administrator only.
//!
//! A child module of `directory` (it shares the directory's private state).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use kagi_core::policy::{self, Assignment};
use kagi_core::{ErrorCode, KvError};
use kagi_identity::Principal;
use serde_json::{Value, json};

use super::bad;
use crate::{Platform, internal};

/// Serialises read-modify-write of the assignments file.
static WRITE: Mutex<()> = Mutex::new(());

const TYPE: &str = "Microsoft.Authorization/policyAssignments";

fn not_found(id: &str) -> KvError {
    KvError::new(
        ErrorCode::NotFound,
        format!("The policy assignment '{id}' was not found."),
    )
    .with_inner("PolicyAssignmentNotFound")
}

impl Platform {
    fn policy_file(&self) -> PathBuf {
        self.config()
            .data_dir
            .join("policy")
            .join("assignments.json")
    }

    /// Every stored assignment body, by lower-cased id.
    fn policy_bodies(&self) -> Result<BTreeMap<String, Value>, KvError> {
        match std::fs::read(self.policy_file()) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| internal("policy assignments", e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(internal("policy assignments", e)),
        }
    }

    fn save_policy_bodies(&self, m: &BTreeMap<String, Value>) -> Result<(), KvError> {
        let path = self.policy_file();
        let data = serde_json::to_vec_pretty(m).map_err(|e| internal("policy json", e))?;
        kagi_store::file::write_atomically(&path, &data, 0o600)
            .map_err(|e| internal("policy write", e))
    }

    /// The parsed assignments (for evaluation).
    pub fn policy_assignments(&self) -> Result<Vec<Assignment>, KvError> {
        Ok(self
            .policy_bodies()?
            .values()
            .filter_map(|v| Assignment::from_json(v).ok())
            .collect())
    }

    /// The error a Deny assignment answers for creating or updating `resource_id` into
    /// `body` (which carries `type`), if any.
    pub fn policy_deny(&self, resource_id: &str, body: &Value) -> Result<Option<KvError>, KvError> {
        Ok(policy::deny_error(
            &self.policy_assignments()?,
            resource_id,
            body,
        ))
    }

    /// `PUT {scope}/providers/Microsoft.Authorization/policyAssignments/{name}`.
    pub fn put_policy_assignment(
        &self,
        caller: &Principal,
        scope: &str,
        name: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        self.require_admin(caller)?;
        let scope = scope.trim_end_matches('/');
        if !policy::valid_scope(scope) {
            return Err(bad(
                "Policy assignments are made at a subscription (/subscriptions/{id}) or resource \
                 group (/subscriptions/{id}/resourceGroups/{name}) scope.",
            ));
        }
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad(
                "Policy assignment names are 1-64 letters, digits, '-', '_' and '.'.",
            ));
        }
        let id = format!("{scope}/providers/{TYPE}/{name}");
        let p = &input["properties"];
        let mut body = json!({
            "id": id,
            "name": name,
            "type": TYPE,
            "properties": {
                "scope": scope,
                "policyDefinitionId": p["policyDefinitionId"],
                "parameters": p.get("parameters").cloned().unwrap_or_else(|| json!({})),
                "displayName": p.get("displayName").cloned().unwrap_or(Value::Null),
            },
        });
        let parsed = Assignment::from_json(&body)?;
        body["properties"]["policyDefinitionId"] = json!(parsed.definition_id);
        body["properties"]["effect"] = json!(parsed.effect.as_str());
        let _g = WRITE.lock().unwrap_or_else(|p| p.into_inner());
        let mut m = self.policy_bodies()?;
        let existed = m.insert(id.to_ascii_lowercase(), body.clone()).is_some();
        self.save_policy_bodies(&m)?;
        tracing::info!(assignment = %id, effect = parsed.effect.as_str(), "policy assigned");
        Ok((if existed { 200 } else { 201 }, body))
    }

    /// `GET` of one assignment.
    pub fn get_policy_assignment(
        &self,
        caller: &Principal,
        scope: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let id = format!("{}/providers/{TYPE}/{name}", scope.trim_end_matches('/'));
        self.policy_bodies()?
            .remove(&id.to_ascii_lowercase())
            .ok_or_else(|| not_found(&id))
    }

    /// `GET {scope}/providers/Microsoft.Authorization/policyAssignments`: the assignments
    /// that apply at the scope (at it or above it) and those below it.
    pub fn list_policy_assignments(
        &self,
        caller: &Principal,
        scope: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let scope = scope.trim_end_matches('/');
        let value: Vec<Value> = self
            .policy_bodies()?
            .into_values()
            .filter(|v| {
                let s = v["properties"]["scope"].as_str().unwrap_or_default();
                policy::in_scope(s, scope) || policy::in_scope(scope, s)
            })
            .collect();
        Ok(json!({ "value": value }))
    }

    /// `DELETE` of one assignment: 200 when deleted, 204 when absent.
    pub fn delete_policy_assignment(
        &self,
        caller: &Principal,
        scope: &str,
        name: &str,
    ) -> Result<(u16, Value), KvError> {
        self.require_admin(caller)?;
        let id = format!("{}/providers/{TYPE}/{name}", scope.trim_end_matches('/'));
        let _g = WRITE.lock().unwrap_or_else(|p| p.into_inner());
        let mut m = self.policy_bodies()?;
        match m.remove(&id.to_ascii_lowercase()) {
            Some(v) => {
                self.save_policy_bodies(&m)?;
                tracing::info!(assignment = %id, "policy assignment deleted");
                Ok((200, v))
            }
            None => Ok((204, Value::Null)),
        }
    }

    /// Compliance of every resource governed by an enabled assignment at or under `scope`
    /// (`.../providers/Microsoft.PolicyInsights/policyStates/latest/queryResults`): one row
    /// per (resource, assignment).
    pub fn policy_states(&self, caller: &Principal, scope: &str) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let scope = scope.trim_end_matches('/');
        let assignments = self.policy_assignments()?;
        let mut rows = Vec::new();
        let dir = self.dir();
        let mut resources: Vec<&Value> = dir
            .resources
            .values()
            .map(|(_, b)| b)
            .filter(|b| policy::in_scope(scope, b["id"].as_str().unwrap_or_default()))
            .collect();
        resources.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        for b in resources {
            let rid = b["id"].as_str().unwrap_or_default();
            for o in policy::evaluate(&assignments, rid, b) {
                rows.push(json!({
                    "resourceId": rid,
                    "resourceType": b["type"],
                    "policyAssignmentId": o.assignment_id,
                    "policyDefinitionId": o.definition_id,
                    "policyDefinitionName": o.display_name,
                    "effect": o.effect.as_str(),
                    "complianceState": if o.compliant { "Compliant" } else { "NonCompliant" },
                    "isCompliant": o.compliant,
                }));
            }
        }
        Ok(json!({ "value": rows }))
    }
}

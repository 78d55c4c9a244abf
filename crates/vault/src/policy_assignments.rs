//! Policy assignments: `{scope}/providers/Microsoft.Authorization/policyAssignments/{n}`
//! at a subscription or resource-group scope, stored durably in the store's
//! `policy_assignments` table (one row per assignment, by lower-cased id), and the compliance of
//! every governed resource. Evaluation is `kagi_core::policy`; services enforce Deny in their
//! own create/update paths with [`Platform::policy_deny`]. The bootstrap administrator only.
//!
//! An earlier kagi kept them in `<data>/policy/assignments.json`; the first policy call of a
//! process imports that file (assignments the store already has are kept) and renames it
//! `assignments.json.imported`.
//!
//! A child module of `directory` (it shares the directory's private state).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use kagi_core::policy::{self, Assignment};
use kagi_core::{ErrorCode, KvError};
use kagi_identity::Principal;
use serde_json::{Value, json};

use crate::{Platform, internal};
use kagi_directory::bad;

/// Data directories whose legacy assignments file has been looked for in this process (one
/// look per directory, not one per call).
static LEGACY_CHECKED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Serialises the legacy imports, so two first calls do not import and rename at once.
static LEGACY_IMPORT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TYPE: &str = "Microsoft.Authorization/policyAssignments";

fn not_found(id: &str) -> KvError {
    KvError::new(
        ErrorCode::NotFound,
        format!("The policy assignment '{id}' was not found."),
    )
    .with_inner("PolicyAssignmentNotFound")
}

impl Platform {
    fn legacy_policy_file(&self) -> PathBuf {
        self.config()
            .data_dir
            .join("policy")
            .join("assignments.json")
    }

    /// Imports `<data>/policy/assignments.json` of an earlier kagi once: into the store in one
    /// transaction, then the file is renamed `*.imported`. A crash in between imports it again
    /// at the next start, which changes nothing (stored assignments win).
    async fn import_legacy_policy(&self) -> Result<(), KvError> {
        let dir = self.config().data_dir.clone();
        if LEGACY_CHECKED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&dir)
        {
            return Ok(());
        }
        let _g = LEGACY_IMPORT.lock().await;
        let file = self.legacy_policy_file();
        match std::fs::read(&file) {
            Ok(b) => 'import: {
                // A file that does not parse is left in place and reported, not retried on
                // every request: policy (and every backup vault write) must keep working.
                let m: BTreeMap<String, Value> = match serde_json::from_slice(&b) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(
                            file = %file.display(),
                            error = %e,
                            "legacy policy assignments do not parse: left in place, not imported"
                        );
                        break 'import;
                    }
                };
                let rows: Vec<(String, String)> = m
                    .into_iter()
                    .map(|(id, body)| (id.to_ascii_lowercase(), body.to_string()))
                    .collect();
                self.store
                    .import_policy_assignments(&rows, self.clock.now())
                    .await
                    .map_err(|e| internal("import policy assignments", e))?;
                let mut done = file.clone().into_os_string();
                done.push(".imported");
                std::fs::rename(&file, &done)
                    .map_err(|e| internal("legacy policy assignments", e))?;
                tracing::info!(
                    assignments = rows.len(),
                    "policy assignments imported into the store"
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal("legacy policy assignments", e)),
        }
        LEGACY_CHECKED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir);
        Ok(())
    }

    /// Every stored assignment body, by lower-cased id.
    async fn policy_bodies(&self) -> Result<BTreeMap<String, Value>, KvError> {
        self.import_legacy_policy().await?;
        self.store
            .list_policy_assignments()
            .await
            .map_err(|e| internal("policy assignments", e))?
            .into_iter()
            .map(|(id, body)| {
                serde_json::from_str(&body)
                    .map(|v| (id, v))
                    .map_err(|e| internal("policy assignments", e))
            })
            .collect()
    }

    /// The parsed assignments (for evaluation).
    pub async fn policy_assignments(&self) -> Result<Vec<Assignment>, KvError> {
        Ok(self
            .policy_bodies()
            .await?
            .values()
            .filter_map(|v| Assignment::from_json(v).ok())
            .collect())
    }

    /// The error a Deny assignment answers for creating or updating `resource_id` into
    /// `body` (which carries `type`), if any.
    pub async fn policy_deny(
        &self,
        resource_id: &str,
        body: &Value,
    ) -> Result<Option<KvError>, KvError> {
        Ok(policy::deny_error(
            &self.policy_assignments().await?,
            resource_id,
            body,
        ))
    }

    /// `PUT {scope}/providers/Microsoft.Authorization/policyAssignments/{name}`.
    pub async fn put_policy_assignment(
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
        self.import_legacy_policy().await?;
        let created = self
            .store
            .put_policy_assignment(
                &id.to_ascii_lowercase(),
                &body.to_string(),
                self.clock.now(),
            )
            .await
            .map_err(|e| internal("policy write", e))?;
        tracing::info!(assignment = %id, effect = parsed.effect.as_str(), "policy assigned");
        Ok((if created { 201 } else { 200 }, body))
    }

    /// `GET` of one assignment.
    pub async fn get_policy_assignment(
        &self,
        caller: &Principal,
        scope: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let id = format!("{}/providers/{TYPE}/{name}", scope.trim_end_matches('/'));
        self.policy_bodies()
            .await?
            .remove(&id.to_ascii_lowercase())
            .ok_or_else(|| not_found(&id))
    }

    /// `GET {scope}/providers/Microsoft.Authorization/policyAssignments`: the assignments
    /// that apply at the scope (at it or above it) and those below it.
    pub async fn list_policy_assignments(
        &self,
        caller: &Principal,
        scope: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let scope = scope.trim_end_matches('/');
        let value: Vec<Value> = self
            .policy_bodies()
            .await?
            .into_values()
            .filter(|v| {
                let s = v["properties"]["scope"].as_str().unwrap_or_default();
                policy::in_scope(s, scope) || policy::in_scope(scope, s)
            })
            .collect();
        Ok(json!({ "value": value }))
    }

    /// `DELETE` of one assignment: 200 when deleted, 204 when absent.
    pub async fn delete_policy_assignment(
        &self,
        caller: &Principal,
        scope: &str,
        name: &str,
    ) -> Result<(u16, Value), KvError> {
        self.require_admin(caller)?;
        let id = format!("{}/providers/{TYPE}/{name}", scope.trim_end_matches('/'));
        self.import_legacy_policy().await?;
        let gone = self
            .store
            .delete_policy_assignment(&id.to_ascii_lowercase())
            .await
            .map_err(|e| internal("policy delete", e))?;
        match gone {
            Some(body) => {
                tracing::info!(assignment = %id, "policy assignment deleted");
                let v = serde_json::from_str(&body).map_err(|e| internal("policy json", e))?;
                Ok((200, v))
            }
            None => Ok((204, Value::Null)),
        }
    }

    /// Compliance of every resource governed by an enabled assignment at or under `scope`
    /// (`.../providers/Microsoft.PolicyInsights/policyStates/latest/queryResults`): one row
    /// per (resource, assignment).
    pub async fn policy_states(&self, caller: &Principal, scope: &str) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let scope = scope.trim_end_matches('/');
        let assignments = self.policy_assignments().await?;
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

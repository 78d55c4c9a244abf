//! Policy (MISSION X-3, BK-10): definitions with a condition over a resource's ARM JSON body
//! and an effect, assigned at a subscription or resource-group scope. Pure evaluation: the
//! caller stores assignments and supplies the resource; any resource type can be governed by
//! adding a definition (its condition names the type).

use serde_json::Value;

use crate::{ErrorCode, KvError};

/// The built-in definition "Backup vaults must use customer-managed keys".
pub const BACKUP_VAULTS_CMK: &str =
    "/providers/Microsoft.Authorization/policyDefinitions/kagi-backup-vaults-cmk";

/// The built-in definition "SQL servers should use customer-managed keys to encrypt data at
/// rest" (MISSION TD-8): a server is compliant when its TDE protector is a key in a key vault
/// (`properties.keyId`).
pub const SQL_SERVERS_CMK: &str =
    "/providers/Microsoft.Authorization/policyDefinitions/kagi-sql-servers-cmk";

/// What an assignment does to a resource that matches its definition's condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Allowed, reported non-compliant (the default).
    Audit,
    /// Refused with `RequestDisallowedByPolicy`.
    Deny,
    /// Not evaluated.
    Disabled,
}

impl Effect {
    /// Parses an effect (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "audit" => Some(Self::Audit),
            "deny" => Some(Self::Deny),
            "disabled" => Some(Self::Disabled),
            _ => None,
        }
    }

    /// Azure's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Audit => "Audit",
            Self::Deny => "Deny",
            Self::Disabled => "Disabled",
        }
    }
}

/// A condition over a resource's JSON body. Fields are dotted paths (`type`,
/// `properties.encryption.keyVaultProperties.keyUri`), matched case-insensitively.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// Every condition holds.
    AllOf(Vec<Condition>),
    /// At least one holds.
    AnyOf(Vec<Condition>),
    /// The condition does not hold.
    Not(Box<Condition>),
    /// The field is a string equal (case-insensitive) to the value.
    Equals(String, String),
    /// The field is present and not null (`true`) or absent/null (`false`).
    Exists(String, bool),
}

/// The value at a dotted path of a body, keys compared case-insensitively.
pub fn field<'a>(body: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = body;
    for seg in path.split('.') {
        let obj = cur.as_object()?;
        cur = obj
            .get(seg)
            .or_else(|| {
                obj.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(seg))
                    .map(|(_, v)| v)
            })
            .filter(|v| !v.is_null())?;
    }
    Some(cur)
}

impl Condition {
    /// Whether the condition holds for `body`.
    pub fn matches(&self, body: &Value) -> bool {
        match self {
            Self::AllOf(c) => c.iter().all(|c| c.matches(body)),
            Self::AnyOf(c) => c.iter().any(|c| c.matches(body)),
            Self::Not(c) => !c.matches(body),
            Self::Equals(f, v) => field(body, f)
                .and_then(Value::as_str)
                .is_some_and(|s| s.eq_ignore_ascii_case(v)),
            Self::Exists(f, want) => {
                let present = field(body, f).is_some_and(|v| v.as_str() != Some(""));
                present == *want
            }
        }
    }
}

/// A policy definition: when `condition` holds, the resource is non-compliant and the
/// assignment's effect applies.
#[derive(Clone, Debug, PartialEq)]
pub struct Definition {
    /// `/providers/Microsoft.Authorization/policyDefinitions/{name}`.
    pub id: &'static str,
    /// Display name.
    pub display_name: &'static str,
    /// The resource type it governs (which resources a compliance report lists).
    pub resource_type: &'static str,
    /// When non-compliant.
    pub condition: Condition,
}

/// The built-in definitions.
pub fn builtin_definitions() -> Vec<Definition> {
    vec![
        Definition {
            id: SQL_SERVERS_CMK,
            display_name: "SQL servers should use customer-managed keys to encrypt data at rest",
            resource_type: "Microsoft.Sql/servers",
            condition: Condition::AllOf(vec![
                Condition::Equals("type".into(), "Microsoft.Sql/servers".into()),
                Condition::Exists("properties.keyId".into(), false),
            ]),
        },
        Definition {
            id: BACKUP_VAULTS_CMK,
            display_name: "Backup vaults must use customer-managed keys",
            resource_type: "Microsoft.RecoveryServices/vaults",
            condition: Condition::AllOf(vec![
                Condition::Equals("type".into(), "Microsoft.RecoveryServices/vaults".into()),
                Condition::Exists(
                    "properties.encryption.keyVaultProperties.keyUri".into(),
                    false,
                ),
            ]),
        },
    ]
}

/// A built-in definition by id (case-insensitive).
pub fn definition(id: &str) -> Option<Definition> {
    builtin_definitions()
        .into_iter()
        .find(|d| d.id.eq_ignore_ascii_case(id))
}

/// An assignment of a definition at a scope.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// `{scope}/providers/Microsoft.Authorization/policyAssignments/{name}`.
    pub id: String,
    /// `/subscriptions/{s}` or `/subscriptions/{s}/resourceGroups/{rg}`.
    pub scope: String,
    /// The definition id.
    pub definition_id: String,
    /// The effect (parameter `effect`, default Audit).
    pub effect: Effect,
}

/// Whether `scope` is `/subscriptions/{s}` or `/subscriptions/{s}/resourceGroups/{rg}`.
pub fn valid_scope(scope: &str) -> bool {
    let segs: Vec<&str> = scope.trim_end_matches('/').split('/').collect();
    match segs.as_slice() {
        ["", s, sub] => s.eq_ignore_ascii_case("subscriptions") && !sub.is_empty(),
        ["", s, sub, g, rg] => {
            s.eq_ignore_ascii_case("subscriptions")
                && g.eq_ignore_ascii_case("resourceGroups")
                && !sub.is_empty()
                && !rg.is_empty()
        }
        _ => false,
    }
}

/// Whether a resource id lies at or under a scope (segment-wise, case-insensitive).
pub fn in_scope(scope: &str, resource_id: &str) -> bool {
    let s = scope.trim_end_matches('/').to_ascii_lowercase();
    let r = resource_id.to_ascii_lowercase();
    r == s || r.starts_with(&format!("{s}/"))
}

impl Assignment {
    /// Reads an assignment from its stored ARM body.
    pub fn from_json(v: &Value) -> Result<Self, KvError> {
        let bad = |m: &str| {
            KvError::new(ErrorCode::BadRequest, m.to_string()).with_inner("InvalidPolicyAssignment")
        };
        let p = &v["properties"];
        let definition_id = p["policyDefinitionId"]
            .as_str()
            .ok_or_else(|| bad("properties.policyDefinitionId is required."))?;
        let def = definition(definition_id).ok_or_else(|| {
            KvError::new(
                ErrorCode::NotFound,
                format!("The policy definition '{definition_id}' was not found."),
            )
            .with_inner("PolicyDefinitionNotFound")
        })?;
        let effect = match field(p, "parameters.effect.value") {
            None => Effect::Audit,
            Some(e) => e.as_str().and_then(Effect::parse).ok_or_else(|| {
                bad("parameters.effect.value must be one of Audit, Deny or Disabled.")
            })?,
        };
        let scope = p["scope"].as_str().unwrap_or_default().to_string();
        Ok(Self {
            id: v["id"].as_str().unwrap_or_default().to_string(),
            scope,
            definition_id: def.id.to_string(),
            effect,
        })
    }
}

/// The result of one assignment on one resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The assignment id.
    pub assignment_id: String,
    /// The definition id.
    pub definition_id: String,
    /// Its display name.
    pub display_name: &'static str,
    /// The effect.
    pub effect: Effect,
    /// Whether the resource complies.
    pub compliant: bool,
}

/// Evaluates every applicable, enabled assignment on a resource (`body` has `type`).
/// Assignments whose definition governs another type are skipped.
pub fn evaluate(assignments: &[Assignment], resource_id: &str, body: &Value) -> Vec<Outcome> {
    let ty = body["type"].as_str().unwrap_or_default();
    assignments
        .iter()
        .filter(|a| a.effect != Effect::Disabled && in_scope(&a.scope, resource_id))
        .filter_map(|a| {
            let d = definition(&a.definition_id)?;
            if !d.resource_type.eq_ignore_ascii_case(ty) {
                return None;
            }
            Some(Outcome {
                assignment_id: a.id.clone(),
                definition_id: d.id.to_string(),
                display_name: d.display_name,
                effect: a.effect,
                compliant: !d.condition.matches(body),
            })
        })
        .collect()
}

/// The error for a request a Deny assignment refuses, if any does.
pub fn deny_error(assignments: &[Assignment], resource_id: &str, body: &Value) -> Option<KvError> {
    let o = evaluate(assignments, resource_id, body)
        .into_iter()
        .find(|o| o.effect == Effect::Deny && !o.compliant)?;
    Some(
        KvError::forbidden(format!(
            "Resource '{resource_id}' was disallowed by policy. Policy assignment '{}' of \
             definition '{}' ({}) denies it.",
            o.assignment_id, o.display_name, o.definition_id
        ))
        .with_inner("RequestDisallowedByPolicy"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn a(scope: &str, effect: Effect) -> Assignment {
        Assignment {
            id: format!("{scope}/providers/Microsoft.Authorization/policyAssignments/p"),
            scope: scope.into(),
            definition_id: BACKUP_VAULTS_CMK.into(),
            effect,
        }
    }

    const RID: &str =
        "/subscriptions/s1/resourceGroups/rg1/providers/Microsoft.RecoveryServices/vaults/v";

    #[test]
    fn cmk_definition() {
        let pmk = json!({"type": "Microsoft.RecoveryServices/vaults", "properties": {}});
        let cmk = json!({"type": "microsoft.recoveryservices/VAULTS", "properties": {"encryption": {"keyVaultProperties": {"keyUri": "https://kv/keys/k"}}}});
        let other = json!({"type": "Microsoft.KeyVault/vaults", "properties": {}});
        for scope in ["/subscriptions/s1", "/subscriptions/S1/resourcegroups/RG1"] {
            let deny = [a(scope, Effect::Deny)];
            assert!(deny_error(&deny, RID, &pmk).is_some());
            assert!(deny_error(&deny, RID, &cmk).is_none());
            assert!(deny_error(&deny, RID, &other).is_none());
            let audit = [a(scope, Effect::Audit)];
            assert!(deny_error(&audit, RID, &pmk).is_none());
            assert!(!evaluate(&audit, RID, &pmk)[0].compliant);
            assert!(evaluate(&audit, RID, &cmk)[0].compliant);
            let off = [a(scope, Effect::Disabled)];
            assert!(evaluate(&off, RID, &pmk).is_empty());
        }
        let elsewhere = [a("/subscriptions/s1/resourceGroups/rg10", Effect::Deny)];
        assert!(deny_error(&elsewhere, RID, &pmk).is_none());
        let e = deny_error(&[a("/subscriptions/s1", Effect::Deny)], RID, &pmk).unwrap();
        assert_eq!(e.inner, Some("RequestDisallowedByPolicy"));
        assert!(e.message.contains("policyAssignments/p"));
    }

    #[test]
    fn assignments_parse() {
        let v = json!({"id": "x", "properties": {"scope": "/subscriptions/s", "policyDefinitionId": BACKUP_VAULTS_CMK}});
        assert_eq!(Assignment::from_json(&v).unwrap().effect, Effect::Audit);
        let v = json!({"properties": {"policyDefinitionId": BACKUP_VAULTS_CMK, "parameters": {"effect": {"value": "deny"}}}});
        assert_eq!(Assignment::from_json(&v).unwrap().effect, Effect::Deny);
        let v = json!({"properties": {"policyDefinitionId": BACKUP_VAULTS_CMK, "parameters": {"effect": {"value": "Modify"}}}});
        assert!(Assignment::from_json(&v).is_err());
        let v = json!({"properties": {"policyDefinitionId": "/providers/Microsoft.Authorization/policyDefinitions/nope"}});
        assert!(Assignment::from_json(&v).is_err());
        assert!(valid_scope("/subscriptions/s"));
        assert!(valid_scope("/subscriptions/s/resourceGroups/g"));
        assert!(!valid_scope(
            "/subscriptions/s/resourceGroups/g/providers/x"
        ));
        assert!(!valid_scope("/"));
    }
}

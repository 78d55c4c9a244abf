//! `$filter` on the role definition and role assignment lists, as ARM reads it and the az CLI
//! sends it: `roleName eq '…'` and `type eq 'BuiltInRole'` on definitions; `atScope()`,
//! `principalId eq '…'` and `assignedTo('…')` on assignments. Anything else is refused (400
//! `InvalidFilterInQueryString`) rather than ignored, so a client never takes an unfiltered
//! list for a filtered one.

use kagi_core::odata::{FieldValue, Filter};
use kagi_core::rbac::Scope;
use kagi_core::{ErrorCode, KvError};
use kagi_identity::Principal;
use serde_json::{Value, json};

use crate::Directory;

fn invalid(filter: &str, why: &str) -> KvError {
    KvError::new(
        ErrorCode::BadRequest,
        format!(
            "Invalid $filter '{}' specified in the query string: {why}",
            kagi_core::ids::printable(filter)
        ),
    )
    .with_inner("InvalidFilterInQueryString")
}

fn parse(filter: &str, functions: &[&str], fields: &[&str]) -> Result<Filter, KvError> {
    let f = Filter::parse_with_functions(filter, functions).map_err(|e| invalid(filter, &e.0))?;
    if let Some(bad) = f.fields().into_iter().find(|n| !fields.contains(n)) {
        return Err(invalid(
            filter,
            &format!(
                "'{}' cannot be filtered on here.",
                kagi_core::ids::printable(bad)
            ),
        ));
    }
    Ok(f)
}

fn retain(list: Value, keep: impl Fn(&Value) -> bool) -> Value {
    let value: Vec<Value> = list["value"]
        .as_array()
        .map(|a| a.iter().filter(|v| keep(v)).cloned().collect())
        .unwrap_or_default();
    json!({ "value": value })
}

impl Directory {
    /// `GET {scope}/providers/Microsoft.Authorization/roleDefinitions[?$filter=…]`:
    /// `roleName eq '…'` (case-insensitive, as ARM compares role names) and
    /// `type eq 'BuiltInRole' | 'CustomRole'`.
    ///
    /// # Errors
    /// As the unfiltered list; 400 `InvalidFilterInQueryString` for another filter.
    pub fn list_role_definitions_filtered(
        &self,
        caller: &Principal,
        scope: &str,
        filter: Option<&str>,
    ) -> Result<Value, KvError> {
        let list = self.list_role_definitions(caller, scope)?;
        let Some(text) = filter else { return Ok(list) };
        let f = parse(text, &[], &["rolename", "type"])?;
        Ok(retain(list, |v| {
            f.matches(&|name| {
                let props = &v["properties"];
                Some(FieldValue::One(match name {
                    "rolename" => props["roleName"].as_str()?,
                    "type" => props["type"].as_str()?,
                    _ => return None,
                }))
            })
        }))
    }

    /// `GET {scope}/providers/Microsoft.Authorization/roleAssignments[?$filter=…]`. Without
    /// a filter: the assignments at, above and below the scope. `atScope()`: only those at
    /// the scope or above it (those that apply there); `principalId eq '…'` and
    /// `assignedTo('…')`: those of one principal.
    ///
    /// # Errors
    /// As the unfiltered list; 400 `InvalidFilterInQueryString` for another filter.
    pub fn list_role_assignments_filtered(
        &self,
        caller: &Principal,
        scope: &str,
        filter: Option<&str>,
    ) -> Result<Value, KvError> {
        let list = self.list_role_assignments(caller, scope)?;
        let Some(text) = filter else { return Ok(list) };
        let f = parse(text, &["atscope", "assignedto"], &["principalid"])?;
        let here = Scope::parse(scope)?;
        Ok(retain(list, |v| {
            let props = &v["properties"];
            let principal = props["principalId"].as_str().unwrap_or_default();
            let at = props["scope"]
                .as_str()
                .and_then(|s| Scope::parse(s).ok())
                .is_some_and(|s| s.contains(&here));
            f.matches_with(
                &|name| match name {
                    "principalid" => Some(FieldValue::One(principal)),
                    _ => None,
                },
                &|name, args| match (name, args) {
                    ("atscope", []) => at,
                    ("assignedto", [id]) => id.eq_ignore_ascii_case(principal),
                    _ => false,
                },
            )
        }))
    }
}

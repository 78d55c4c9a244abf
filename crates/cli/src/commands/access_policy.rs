//! `kagi keyvault set-policy` and `kagi keyvault delete-policy`: one principal's access policy
//! entry, changed through ARM's `PUT …/vaults/{name}/accessPolicies/{add|replace|remove}` so
//! that concurrent changes for other principals are not lost (a whole-vault PUT would resend,
//! and so undo, whatever changed since it read the vault).

use anyhow::{Context as _, bail};
use clap::Args;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Context, Output};

const ARM_API: &str = "2023-07-01";

/// `kagi keyvault set-policy`.
#[derive(Args, Debug)]
pub struct SetPolicyArgs {
    #[command(flatten)]
    vault: super::VaultRef,
    /// Object id of the user, service principal or managed identity.
    #[arg(long)]
    object_id: String,
    /// Key permissions (space-separated: get list create wrapKey … or all). Replaces the
    /// principal's key permissions; its other permissions are kept, as az does.
    #[arg(long, num_args = 1..)]
    key_permissions: Option<Vec<String>>,
    /// Secret permissions (space-separated: get list set delete recover backup restore purge
    /// or all). Replaces the principal's secret permissions; its other permissions are kept.
    #[arg(long, num_args = 1..)]
    secret_permissions: Option<Vec<String>>,
}

/// `kagi keyvault delete-policy`.
#[derive(Args, Debug)]
pub struct DeletePolicyArgs {
    #[command(flatten)]
    vault: super::VaultRef,
    /// Object id whose access policy entry is removed.
    #[arg(long)]
    object_id: String,
}

/// The principal's entry in the vault's access policies, if it has one (compound entries,
/// which name an application too, are not it).
fn entry_of<'a>(vault: &'a Value, object_id: &str) -> Option<&'a Value> {
    vault["properties"]["accessPolicies"]
        .as_array()?
        .iter()
        .find(|e| {
            e["objectId"]
                .as_str()
                .is_some_and(|o| o.eq_ignore_ascii_case(object_id))
                && e["applicationId"].is_null()
        })
}

/// The entry `set-policy` sends: the given permission kinds replace the existing entry's,
/// the others are kept (az's rule).
fn merged_entry(
    tenant: &str,
    object_id: &str,
    existing: Option<&Value>,
    keys: Option<&[String]>,
    secrets: Option<&[String]>,
) -> Value {
    let mut permissions = existing
        .map(|e| e["permissions"].clone())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    if let Some(k) = keys {
        permissions["keys"] = json!(k);
    }
    if let Some(s) = secrets {
        permissions["secrets"] = json!(s);
    }
    json!({"tenantId": tenant, "objectId": object_id, "permissions": permissions})
}

/// The vault's resource group, from its ARM id.
fn resource_group_of(vault: &Value) -> anyhow::Result<String> {
    vault["id"]
        .as_str()
        .and_then(|id| id.split('/').nth(4))
        .map(str::to_string)
        .context("the vault's answer has no resource id")
}

/// Refuses access policy changes on an RBAC vault, with az's message: the entries would be
/// stored but never consulted, which is rarely what the caller meant.
fn refuse_rbac(vault: &Value, verb: &str) -> anyhow::Result<()> {
    if vault["properties"]["enableRbacAuthorization"] == json!(true) {
        bail!(
            "Cannot {verb} policies to a vault with '--enable-rbac-authorization' specified: \
             grant access with role assignments instead"
        );
    }
    Ok(())
}

async fn change(
    ctx: &Context,
    vault: &Value,
    name: &str,
    operation: &str,
    entry: Value,
) -> anyhow::Result<Value> {
    let url = format!(
        "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.KeyVault/vaults/{name}/accessPolicies/{operation}?api-version={ARM_API}",
        ctx.base,
        ctx.subscription,
        resource_group_of(vault)?
    );
    ctx.call(
        Method::PUT,
        &url,
        Some(&json!({"properties": {"accessPolicies": [entry]}})),
    )
    .await?;
    // az answers with the updated vault.
    ctx.find_vault(name, Some(&resource_group_of(vault)?)).await
}

fn print(ctx: &Context, vault: &Value, object_id: &str) {
    match ctx.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(vault).unwrap_or_default()
        ),
        Output::Table => match entry_of(vault, object_id) {
            Some(e) => println!(
                "{}\t{object_id}\tkeys={}\tsecrets={}",
                vault["name"].as_str().unwrap_or(""),
                e["permissions"]["keys"],
                e["permissions"]["secrets"]
            ),
            None => println!(
                "{}\t{object_id}\tno access policy",
                vault["name"].as_str().unwrap_or("")
            ),
        },
    }
}

/// The vault whose access policies are changed, and its tenant (the entries' `tenantId`).
async fn policy_vault(
    ctx: &Context,
    r: &super::VaultRef,
    verb: &str,
) -> anyhow::Result<(Value, String)> {
    let vault = ctx.find_vault(&r.name, r.resource_group.as_deref()).await?;
    refuse_rbac(&vault, verb)?;
    let tenant = vault["properties"]["tenantId"]
        .as_str()
        .context("the vault's answer has no tenantId")?
        .to_string();
    Ok((vault, tenant))
}

/// Runs `kagi keyvault set-policy`.
pub async fn set_policy(ctx: &Context, a: SetPolicyArgs) -> anyhow::Result<()> {
    if a.key_permissions.is_none() && a.secret_permissions.is_none() {
        bail!("specify at least one of --key-permissions and --secret-permissions");
    }
    let (vault, tenant) = policy_vault(ctx, &a.vault, "set").await?;
    let existing = entry_of(&vault, &a.object_id);
    let entry = merged_entry(
        &tenant,
        &a.object_id,
        existing,
        a.key_permissions.as_deref(),
        a.secret_permissions.as_deref(),
    );
    let operation = if existing.is_some() { "replace" } else { "add" };
    let updated = change(ctx, &vault, &a.vault.name, operation, entry).await?;
    print(ctx, &updated, &a.object_id);
    Ok(())
}

/// Runs `kagi keyvault delete-policy`.
pub async fn delete_policy(ctx: &Context, a: DeletePolicyArgs) -> anyhow::Result<()> {
    let (vault, tenant) = policy_vault(ctx, &a.vault, "delete").await?;
    if entry_of(&vault, &a.object_id).is_none() {
        bail!(
            "vault {} has no access policy for object id {}",
            a.vault.name,
            a.object_id
        );
    }
    // An entry listing no permissions removes the principal's whole entry.
    let entry = json!({"tenantId": tenant, "objectId": a.object_id, "permissions": {}});
    let updated = change(ctx, &vault, &a.vault.name, "remove", entry).await?;
    print(ctx, &updated, &a.object_id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OID: &str = "11111111-2222-4333-8444-555555555555";

    fn vault(policies: Value) -> Value {
        json!({"id": "/subscriptions/s/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/v",
               "properties": {"tenantId": "t", "accessPolicies": policies}})
    }

    #[test]
    fn set_policy_replaces_only_the_given_kinds() {
        let v = vault(json!([{"tenantId": "t", "objectId": OID.to_uppercase(),
                              "permissions": {"keys": ["get"], "secrets": ["list"]}}]));
        let e = entry_of(&v, OID);
        assert!(e.is_some(), "object ids compare case-insensitively");
        let m = merged_entry("t", OID, e, None, Some(&["get".into(), "set".into()]));
        assert_eq!(
            m["permissions"],
            json!({"keys": ["get"], "secrets": ["get", "set"]})
        );
        let fresh = merged_entry("t", OID, None, Some(&["all".into()]), None);
        assert_eq!(fresh["permissions"], json!({"keys": ["all"]}));
    }

    #[test]
    fn compound_entries_are_not_the_principals_own() {
        let v = vault(
            json!([{"tenantId": "t", "objectId": OID, "applicationId": OID,
                              "permissions": {"keys": ["get"]}}]),
        );
        assert!(entry_of(&v, OID).is_none());
    }

    #[test]
    fn resource_group_and_rbac() {
        let mut v = vault(json!([]));
        assert_eq!(resource_group_of(&v).unwrap(), "rg1");
        assert!(refuse_rbac(&v, "set").is_ok());
        v["properties"]["enableRbacAuthorization"] = json!(true);
        assert!(refuse_rbac(&v, "set").is_err());
    }

    #[test]
    fn set_policy_needs_a_permission_flag() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct T {
            #[command(flatten)]
            a: SetPolicyArgs,
        }
        let t = T::try_parse_from([
            "t",
            "--name",
            "v",
            "--object-id",
            OID,
            "--key-permissions",
            "get",
            "wrapKey",
        ])
        .unwrap();
        assert_eq!(
            t.a.key_permissions,
            Some(vec!["get".to_string(), "wrapKey".to_string()])
        );
    }
}

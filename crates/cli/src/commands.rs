//! `kagi keyvault …`: vault management and key commands for people and scripts.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Context, Output, collect_pages};

mod access_policy;
mod secrets;

const ARM_API: &str = "2023-07-01";
const RG_API: &str = "2021-04-01";
const KV_API: &str = "7.6";

/// `kagi keyvault`.
#[derive(Args, Debug)]
pub struct KeyvaultArgs {
    #[command(subcommand)]
    command: KeyvaultCommand,
}

#[derive(Args, Debug)]
struct VaultRef {
    /// Vault name.
    #[arg(long)]
    name: String,
    /// Resource group (found by name when omitted).
    #[arg(long)]
    resource_group: Option<String>,
}

#[derive(Subcommand, Debug)]
enum KeyvaultCommand {
    /// Create a vault (and its resource group if it does not exist).
    Create {
        /// Vault name.
        #[arg(long)]
        name: String,
        /// Resource group.
        #[arg(long, default_value = "kagi")]
        resource_group: String,
        /// Region.
        #[arg(long, default_value = "westeurope")]
        location: String,
        /// SKU: standard, or premium for HSM key types.
        #[arg(long, default_value = "standard")]
        sku: String,
        /// Days a deleted vault or key stays recoverable (7–90).
        #[arg(long, default_value_t = 90)]
        retention_days: u32,
        /// Turn purge protection on (it can never be turned off).
        #[arg(long)]
        enable_purge_protection: bool,
        /// Use role-based access instead of access policies.
        #[arg(long)]
        enable_rbac_authorization: bool,
    },
    /// Show a vault.
    Show(VaultRef),
    /// List vaults.
    List {
        /// Only this resource group.
        #[arg(long)]
        resource_group: Option<String>,
    },
    /// Update a vault.
    Update {
        #[command(flatten)]
        vault: VaultRef,
        /// Turn purge protection on.
        #[arg(long)]
        enable_purge_protection: bool,
        /// Switch the access model (true: RBAC, false: access policies).
        #[arg(long)]
        enable_rbac_authorization: Option<bool>,
    },
    /// Soft-delete a vault.
    Delete(VaultRef),
    /// Recover a soft-deleted vault.
    Recover {
        /// Vault name.
        #[arg(long)]
        name: String,
        /// Resource group to recover into (the original one when omitted).
        #[arg(long)]
        resource_group: Option<String>,
        /// Region of the deleted vault (looked up when omitted).
        #[arg(long)]
        location: Option<String>,
    },
    /// Purge a soft-deleted vault (refused under purge protection).
    Purge {
        /// Vault name.
        #[arg(long)]
        name: String,
        /// Region of the deleted vault (looked up when omitted).
        #[arg(long)]
        location: Option<String>,
    },
    /// List soft-deleted vaults.
    ListDeleted,
    /// Keys of a vault.
    Key(KeyArgs),
    /// Secrets of a vault.
    Secret(secrets::SecretArgs),
    /// Grant a principal permissions through the vault's access policies.
    SetPolicy(access_policy::SetPolicyArgs),
    /// Remove a principal's access policy entry.
    DeletePolicy(access_policy::DeletePolicyArgs),
    /// Event subscriptions (webhooks) of a vault and their dead letters.
    Event(crate::events::EventArgs),
    /// Back up a whole vault (keys, secrets, every version, settings) to one encrypted file.
    Backup(crate::vault_backup::BackupArgs),
    /// Restore a whole-vault backup into an empty vault, or a new one with --location.
    Restore(crate::vault_backup::RestoreArgs),
}

/// `kagi keyvault key`.
#[derive(Args, Debug)]
struct KeyArgs {
    /// Vault name.
    #[arg(long, global = true)]
    vault_name: Option<String>,
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Create a key (or a new version of it).
    Create {
        /// Key name.
        #[arg(long)]
        name: String,
        /// RSA, RSA-HSM, EC or EC-HSM.
        #[arg(long, default_value = "RSA")]
        kty: String,
        /// RSA size: 2048, 3072 or 4096.
        #[arg(long)]
        size: Option<u32>,
        /// EC curve: P-256, P-384, P-521 or P-256K.
        #[arg(long)]
        curve: Option<String>,
        #[command(flatten)]
        flags: crate::key_import::KeyFlags,
    },
    /// Import a private key from a PEM or PKCS#12 file, or an HSM key from a BYOK blob.
    Import(crate::key_import::ImportArgs),
    /// List keys.
    List,
    /// Show a key (newest version unless --version).
    Show {
        /// Key name.
        #[arg(long)]
        name: String,
        /// Version.
        #[arg(long)]
        version: Option<String>,
    },
    /// List a key's versions.
    Versions {
        /// Key name.
        #[arg(long)]
        name: String,
    },
    /// Create a new version.
    Rotate {
        /// Key name.
        #[arg(long)]
        name: String,
    },
    /// Enable or disable a version, or change its dates.
    Update {
        /// Key name.
        #[arg(long)]
        name: String,
        /// Version (newest when omitted).
        #[arg(long)]
        version: Option<String>,
        /// Enabled flag.
        #[arg(long)]
        enabled: Option<bool>,
        /// Expiry, Unix seconds.
        #[arg(long)]
        expires: Option<i64>,
        /// Activation, Unix seconds.
        #[arg(long)]
        not_before: Option<i64>,
    },
    /// Soft-delete a key.
    Delete {
        /// Key name.
        #[arg(long)]
        name: String,
    },
    /// List soft-deleted keys.
    ListDeleted,
    /// Recover a soft-deleted key.
    Recover {
        /// Key name.
        #[arg(long)]
        name: String,
    },
    /// Purge a soft-deleted key.
    Purge {
        /// Key name.
        #[arg(long)]
        name: String,
    },
    /// Write a protected backup of a key to a file.
    Backup {
        /// Key name.
        #[arg(long)]
        name: String,
        /// Output file.
        #[arg(long)]
        file: std::path::PathBuf,
    },
    /// Restore a key from a backup file.
    Restore {
        /// Backup file.
        #[arg(long)]
        file: std::path::PathBuf,
    },
}

/// One line per element of a list answer's `value`, made by `line`.
pub(crate) fn lines_of(v: &Value, line: impl Fn(&Value) -> String) -> String {
    v["value"]
        .as_array()
        .into_iter()
        .flatten()
        .map(line)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One tab-separated line per element of `v["value"]`, with the named string fields.
pub(crate) fn value_lines(v: &Value, fields: &[&str]) -> String {
    lines_of(v, |x| {
        fields
            .iter()
            .map(|f| x[*f].as_str().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\t")
    })
}

fn print(ctx: &Context, v: &Value, summary: impl Fn(&Value) -> String) {
    match ctx.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => {
            if let Some(items) = v["value"].as_array() {
                for i in items {
                    println!("{}", summary(i));
                }
            } else if !v.is_null() {
                println!("{}", summary(v));
            }
        }
    }
}

fn vault_line(v: &Value) -> String {
    format!(
        "{}\t{}\t{}\tpurge-protection={}",
        v["name"].as_str().unwrap_or(""),
        v["location"].as_str().unwrap_or(""),
        v["properties"]["vaultUri"].as_str().unwrap_or(""),
        v["properties"]["enablePurgeProtection"]
    )
}

fn key_line(v: &Value) -> String {
    let kid = v["key"]["kid"].as_str().or(v["kid"].as_str()).unwrap_or("");
    let a = &v["attributes"];
    format!(
        "{kid}\tenabled={}\t{}",
        a["enabled"],
        v["key"]["kty"].as_str().unwrap_or("")
    )
}

impl Context {
    fn arm(&self, path: &str, api: &str) -> String {
        format!(
            "{}/subscriptions/{}{path}?api-version={api}",
            self.base, self.subscription
        )
    }

    pub(crate) async fn find_vault(&self, name: &str, rg: Option<&str>) -> anyhow::Result<Value> {
        if let Some(rg) = rg {
            return self
                .call(
                    Method::GET,
                    &self.arm(
                        &format!("/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{name}"),
                        ARM_API,
                    ),
                    None,
                )
                .await;
        }
        let all = self
            .call(
                Method::GET,
                &self.arm("/providers/Microsoft.KeyVault/vaults", ARM_API),
                None,
            )
            .await?;
        all["value"]
            .as_array()
            .and_then(|a| {
                a.iter().find(|v| {
                    v["name"]
                        .as_str()
                        .is_some_and(|n| n.eq_ignore_ascii_case(name))
                })
            })
            .cloned()
            .with_context(|| format!("vault {name} not found"))
    }

    async fn find_deleted(&self, name: &str) -> anyhow::Result<Value> {
        let all = self
            .call(
                Method::GET,
                &self.arm("/providers/Microsoft.KeyVault/deletedVaults", ARM_API),
                None,
            )
            .await?;
        all["value"]
            .as_array()
            .and_then(|a| {
                a.iter().find(|v| {
                    v["name"]
                        .as_str()
                        .is_some_and(|n| n.eq_ignore_ascii_case(name))
                })
            })
            .cloned()
            .with_context(|| format!("no soft-deleted vault named {name}"))
    }
}

fn rg_of(vault: &Value) -> String {
    // /subscriptions/{s}/resourceGroups/{rg}/providers/...
    vault["id"]
        .as_str()
        .or(vault["properties"]["vaultId"].as_str())
        .and_then(|id| id.split('/').nth(4))
        .unwrap_or("")
        .to_string()
}

/// Runs a `kagi keyvault` command.
pub async fn keyvault(ctx: &Context, args: KeyvaultArgs) -> anyhow::Result<()> {
    match args.command {
        KeyvaultCommand::Create {
            name,
            resource_group,
            location,
            sku,
            retention_days,
            enable_purge_protection,
            enable_rbac_authorization,
        } => {
            let tenant = ctx
                .call(
                    Method::GET,
                    &format!("{}/subscriptions?api-version={RG_API}", ctx.base),
                    None,
                )
                .await?["value"]
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|s| s["subscriptionId"] == ctx.subscription.as_str())
                })
                .and_then(|s| s["tenantId"].as_str().map(str::to_string))
                .context("the subscription is not visible to this identity")?;
            ctx.call(
                Method::PUT,
                &ctx.arm(&format!("/resourcegroups/{resource_group}"), RG_API),
                Some(&json!({"location": location})),
            )
            .await
            .or_else(|e| {
                if e.to_string().contains("InvalidResourceGroupLocation") {
                    Ok(Value::Null)
                } else {
                    Err(e)
                }
            })?;
            let mut props = json!({
                "tenantId": tenant,
                "sku": {"family": "A", "name": sku},
                "softDeleteRetentionInDays": retention_days,
                "enableRbacAuthorization": enable_rbac_authorization,
                "accessPolicies": [],
            });
            if enable_purge_protection {
                props["enablePurgeProtection"] = json!(true);
            }
            let v = ctx
                .call(
                    Method::PUT,
                    &ctx.arm(&format!("/resourceGroups/{resource_group}/providers/Microsoft.KeyVault/vaults/{name}"), ARM_API),
                    Some(&json!({"location": location, "properties": props})),
                )
                .await?;
            print(ctx, &v, vault_line);
        }
        KeyvaultCommand::Show(r) => print(
            ctx,
            &ctx.find_vault(&r.name, r.resource_group.as_deref()).await?,
            vault_line,
        ),
        KeyvaultCommand::List { resource_group } => {
            let path = match &resource_group {
                Some(rg) => format!("/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults"),
                None => "/providers/Microsoft.KeyVault/vaults".into(),
            };
            print(
                ctx,
                &ctx.call(Method::GET, &ctx.arm(&path, ARM_API), None)
                    .await?,
                vault_line,
            );
        }
        KeyvaultCommand::Update {
            vault,
            enable_purge_protection,
            enable_rbac_authorization,
        } => {
            let current = ctx
                .find_vault(&vault.name, vault.resource_group.as_deref())
                .await?;
            let mut props = json!({});
            if enable_purge_protection {
                props["enablePurgeProtection"] = json!(true);
            }
            if let Some(v) = enable_rbac_authorization {
                props["enableRbacAuthorization"] = json!(v);
            }
            let v = ctx
                .call(
                    Method::PATCH,
                    &ctx.arm(
                        &format!(
                            "/resourceGroups/{}/providers/Microsoft.KeyVault/vaults/{}",
                            rg_of(&current),
                            vault.name
                        ),
                        ARM_API,
                    ),
                    Some(&json!({"properties": props})),
                )
                .await?;
            print(ctx, &v, vault_line);
        }
        KeyvaultCommand::Delete(r) => {
            let current = ctx.find_vault(&r.name, r.resource_group.as_deref()).await?;
            ctx.call(
                Method::DELETE,
                &ctx.arm(
                    &format!(
                        "/resourceGroups/{}/providers/Microsoft.KeyVault/vaults/{}",
                        rg_of(&current),
                        r.name
                    ),
                    ARM_API,
                ),
                None,
            )
            .await?;
            print(ctx, &json!({"name": r.name, "deleted": true}), |_| {
                format!("{} deleted (recoverable)", r.name)
            });
        }
        KeyvaultCommand::Recover {
            name,
            resource_group,
            location,
        } => {
            let deleted = ctx.find_deleted(&name).await?;
            let location = location.unwrap_or_else(|| {
                deleted["properties"]["location"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            });
            let rg = resource_group.unwrap_or_else(|| rg_of(&deleted));
            let v = ctx
                .call(
                    Method::PUT,
                    &ctx.arm(
                        &format!("/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{name}"),
                        ARM_API,
                    ),
                    Some(&json!({"location": location, "properties": {"createMode": "recover"}})),
                )
                .await?;
            print(ctx, &v, vault_line);
        }
        KeyvaultCommand::Purge { name, location } => {
            let location = match location {
                Some(l) => l,
                None => ctx.find_deleted(&name).await?["properties"]["location"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            };
            ctx.call(Method::POST, &ctx.arm(&format!("/providers/Microsoft.KeyVault/locations/{location}/deletedVaults/{name}/purge"), ARM_API), None)
                .await?;
            print(ctx, &json!({"name": name, "purged": true}), |_| {
                format!("{name} purged")
            });
        }
        KeyvaultCommand::ListDeleted => {
            let v = ctx
                .call(
                    Method::GET,
                    &ctx.arm("/providers/Microsoft.KeyVault/deletedVaults", ARM_API),
                    None,
                )
                .await?;
            print(ctx, &v, |d| {
                format!(
                    "{}\tdeleted {}\tpurge {}",
                    d["name"].as_str().unwrap_or(""),
                    d["properties"]["deletionDate"].as_str().unwrap_or(""),
                    d["properties"]["scheduledPurgeDate"].as_str().unwrap_or("")
                )
            });
        }
        KeyvaultCommand::Key(k) => {
            let vault = k.vault_name.clone().context("--vault-name is required")?;
            keys(ctx, &vault, k.command).await?;
        }
        KeyvaultCommand::Secret(a) => secrets::run(ctx, a).await?,
        KeyvaultCommand::SetPolicy(a) => access_policy::set_policy(ctx, a).await?,
        KeyvaultCommand::DeletePolicy(a) => access_policy::delete_policy(ctx, a).await?,
        KeyvaultCommand::Event(a) => crate::events::run(ctx, a).await?,
        KeyvaultCommand::Backup(a) => crate::vault_backup::backup(ctx, a).await?,
        KeyvaultCommand::Restore(a) => crate::vault_backup::restore(ctx, a).await?,
    }
    Ok(())
}

async fn keys(ctx: &Context, vault: &str, command: KeyCommand) -> anyhow::Result<()> {
    let vault_ctx = ctx.clone_for_vault(vault)?;
    let ctx = &vault_ctx;
    let url = |path: &str| format!("{}{path}?api-version={KV_API}", ctx.vault_url(vault));
    let v = match command {
        KeyCommand::Create {
            name,
            kty,
            size,
            curve,
            flags:
                crate::key_import::KeyFlags {
                    ops,
                    expires,
                    not_before,
                    disabled,
                },
        } => {
            let mut body = json!({"kty": kty, "attributes": {"enabled": !disabled}});
            if let Some(s) = size {
                body["key_size"] = json!(s);
            }
            if let Some(c) = curve {
                body["crv"] = json!(c);
            }
            if let Some(o) = ops {
                body["key_ops"] = json!(o);
            }
            if let Some(e) = expires {
                body["attributes"]["exp"] = json!(e);
            }
            if let Some(n) = not_before {
                body["attributes"]["nbf"] = json!(n);
            }
            ctx.call(
                Method::POST,
                &url(&format!("keys/{name}/create")),
                Some(&body),
            )
            .await?
        }
        KeyCommand::Import(a) => {
            // Parsed before anything is sent: a wrong password or a bad file creates nothing.
            let body = crate::key_import::request_body(&a)
                .with_context(|| format!("cannot import key {}", a.name))?;
            ctx.call_secret(Method::PUT, &url(&format!("keys/{}", a.name)), body)
                .await?
        }
        KeyCommand::List => collect_pages(ctx, &url("keys")).await?,
        KeyCommand::Show { name, version } => {
            ctx.call(
                Method::GET,
                &url(&format!("keys/{name}/{}", version.unwrap_or_default())),
                None,
            )
            .await?
        }
        KeyCommand::Versions { name } => {
            collect_pages(ctx, &url(&format!("keys/{name}/versions"))).await?
        }
        KeyCommand::Rotate { name } => {
            ctx.call(Method::POST, &url(&format!("keys/{name}/rotate")), None)
                .await?
        }
        KeyCommand::Update {
            name,
            version,
            enabled,
            expires,
            not_before,
        } => {
            let mut attrs = json!({});
            if let Some(e) = enabled {
                attrs["enabled"] = json!(e);
            }
            if let Some(e) = expires {
                attrs["exp"] = json!(e);
            }
            if let Some(n) = not_before {
                attrs["nbf"] = json!(n);
            }
            ctx.call(
                Method::PATCH,
                &url(&format!("keys/{name}/{}", version.unwrap_or_default())),
                Some(&json!({"attributes": attrs})),
            )
            .await?
        }
        KeyCommand::Delete { name } => {
            ctx.call(Method::DELETE, &url(&format!("keys/{name}")), None)
                .await?
        }
        KeyCommand::ListDeleted => collect_pages(ctx, &url("deletedkeys")).await?,
        KeyCommand::Recover { name } => {
            ctx.call(
                Method::POST,
                &url(&format!("deletedkeys/{name}/recover")),
                None,
            )
            .await?
        }
        KeyCommand::Purge { name } => {
            ctx.call(Method::DELETE, &url(&format!("deletedkeys/{name}")), None)
                .await?;
            json!({"name": name, "purged": true})
        }
        KeyCommand::Backup { name, file } => {
            let v = ctx
                .call(Method::POST, &url(&format!("keys/{name}/backup")), None)
                .await?;
            let blob = v["value"]
                .as_str()
                .context("backup response without value")?;
            std::fs::write(&file, blob)
                .with_context(|| format!("cannot write {}", file.display()))?;
            json!({"name": name, "file": file.display().to_string(), "bytes": blob.len()})
        }
        KeyCommand::Restore { file } => {
            let blob = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            ctx.call(
                Method::POST,
                &url("keys/restore"),
                Some(&json!({"value": blob.trim()})),
            )
            .await?
        }
    };
    print(ctx, &v, |i| {
        if i.get("purged").is_some() || i.get("file").is_some() {
            i.to_string()
        } else {
            key_line(i)
        }
    });
    Ok(())
}

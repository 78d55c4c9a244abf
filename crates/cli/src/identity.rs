//! `kagi identity …`, `kagi role …` and `kagi lock …`: principals, managed identities,
//! workload bindings, role-based access and management locks.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Context;
use crate::client::Output;

const ARM_API: &str = "2023-01-31";
const AUTHZ_API: &str = "2022-04-01";

/// `kagi identity`.
#[derive(Args, Debug)]
pub struct IdentityArgs {
    #[command(subcommand)]
    command: IdentityCommand,
}

#[derive(Subcommand, Debug)]
enum IdentityCommand {
    /// Service principals (applications with a client secret).
    Sp {
        #[command(subcommand)]
        command: SpCommand,
    },
    /// Users (sign in with a user principal name and password).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Create a user-assigned managed identity.
    Create {
        /// Name.
        #[arg(long)]
        name: String,
        /// Resource group.
        #[arg(long, default_value = "kagi")]
        resource_group: String,
        /// Region.
        #[arg(long, default_value = "westeurope")]
        location: String,
    },
    /// Show a user-assigned managed identity.
    Show {
        /// Name.
        #[arg(long)]
        name: String,
        /// Resource group.
        #[arg(long, default_value = "kagi")]
        resource_group: String,
    },
    /// Delete a user-assigned managed identity.
    Delete {
        /// Name.
        #[arg(long)]
        name: String,
        /// Resource group.
        #[arg(long, default_value = "kagi")]
        resource_group: String,
    },
    /// Workloads: resources that a process acts as, carrying managed identities.
    Workload {
        #[command(subcommand)]
        command: WorkloadCommand,
    },
    /// Print the environment with which a process gets tokens as a resource's managed
    /// identity (IDENTITY_ENDPOINT, IDENTITY_HEADER, AZURE_POD_IDENTITY_AUTHORITY_HOST).
    Env {
        /// Resource id of the workload (or other resource with an identity).
        #[arg(long)]
        resource: String,
        /// Client id of a user-assigned identity of that resource (default: system-assigned).
        /// The binding serves this one identity only.
        #[arg(long)]
        client_id: Option<String>,
        /// Hours until the binding stops working (1-8760; default 2160, 90 days).
        #[arg(long)]
        expires_in_hours: Option<u32>,
    },
    /// Workload bindings (the secrets `kagi identity env` prints): list and revoke by id.
    Binding {
        #[command(subcommand)]
        command: BindingCommand,
    },
    /// The key that signs access tokens.
    SigningKey {
        #[command(subcommand)]
        command: SigningKeyCommand,
    },
}

#[derive(Subcommand, Debug)]
enum BindingCommand {
    /// List the bindings of a resource: id, client id served, expiry (never the secrets).
    List {
        /// Resource id.
        #[arg(long)]
        resource: String,
    },
    /// Revoke one binding: its secret stops working on the next request.
    Revoke {
        /// Resource id.
        #[arg(long)]
        resource: String,
        /// Binding id (from `kagi identity binding list` or `kagi identity env`).
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum SigningKeyCommand {
    /// Show the signing key and the retired keys that still validate.
    List,
    /// Rotate: a new key signs from now on; the previous one validates the tokens it signed
    /// until they expire (about an hour).
    Rotate {
        /// Stop the previous keys at once (a leaked key): every token issued before fails.
        #[arg(long)]
        revoke_previous: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SpCommand {
    /// Create a service principal; prints its client secret once.
    Create {
        /// Display name.
        #[arg(long)]
        name: String,
        /// Also register this X.509 certificate (PEM file) as a credential.
        #[arg(long)]
        certificate: Option<std::path::PathBuf>,
    },
    /// Register an X.509 certificate (PEM file) as a credential of a service principal.
    AddCert {
        /// Object id.
        #[arg(long)]
        id: String,
        /// PEM file.
        #[arg(long)]
        certificate: std::path::PathBuf,
    },
    /// List principals.
    List,
    /// Delete a service principal (its tokens stop working at once).
    Delete {
        /// Object id.
        #[arg(long)]
        id: String,
    },
    /// Replace the client secret.
    ResetSecret {
        /// Object id.
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Create a user. The password is read from a file or an environment variable, never
    /// from the command line (where `ps` would show it).
    Create {
        /// User principal name (alias@domain).
        #[arg(long)]
        upn: String,
        /// Display name.
        #[arg(long, default_value = "")]
        display_name: String,
        /// File holding the password (first line).
        #[arg(long, conflicts_with = "password_env")]
        password_file: Option<std::path::PathBuf>,
        /// Environment variable holding the password.
        #[arg(long)]
        password_env: Option<String>,
    },
    /// Delete a user.
    Delete {
        /// Object id.
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum WorkloadCommand {
    /// Create or update a workload and its identities.
    Create {
        /// Name.
        #[arg(long)]
        name: String,
        /// Resource group.
        #[arg(long, default_value = "kagi")]
        resource_group: String,
        /// Region.
        #[arg(long, default_value = "westeurope")]
        location: String,
        /// Give it a system-assigned identity.
        #[arg(long)]
        system_assigned: bool,
        /// Resource ids of user-assigned identities to assign.
        #[arg(long)]
        user_assigned: Vec<String>,
    },
    /// Show a workload.
    Show {
        /// Name.
        #[arg(long)]
        name: String,
        /// Resource group.
        #[arg(long, default_value = "kagi")]
        resource_group: String,
    },
    /// Delete a workload (its system-assigned identity goes with it).
    Delete {
        /// Name.
        #[arg(long)]
        name: String,
        /// Resource group.
        #[arg(long, default_value = "kagi")]
        resource_group: String,
    },
}

/// `kagi role`.
#[derive(Args, Debug)]
pub struct RoleArgs {
    #[command(subcommand)]
    command: RoleCommand,
}

#[derive(Subcommand, Debug)]
enum RoleCommand {
    /// Assign a role to a principal at a scope.
    Assign {
        /// Principal object id.
        #[arg(long)]
        assignee: String,
        /// Role name ("Key Vault Crypto Service Encryption User") or definition GUID.
        #[arg(long)]
        role: String,
        /// Scope: subscription, resource group, vault, or `{vault id}/keys/{name}`.
        #[arg(long)]
        scope: String,
    },
    /// List role assignments that apply at a scope.
    List {
        /// Scope.
        #[arg(long)]
        scope: String,
    },
    /// Delete a role assignment.
    Unassign {
        /// Assignment id (GUID).
        #[arg(long)]
        id: String,
        /// Scope it was made at.
        #[arg(long)]
        scope: String,
    },
    /// Create or update a custom role from a JSON file
    /// (`{"roleName", "description", "permissions": [{"dataActions": [...]}], "assignableScopes"}`).
    Define {
        /// The role's properties as JSON.
        #[arg(long)]
        file: std::path::PathBuf,
        /// Scope to create it at.
        #[arg(long)]
        scope: String,
        /// GUID (new one when omitted).
        #[arg(long)]
        id: Option<String>,
    },
    /// List role definitions.
    Definitions {
        /// Scope.
        #[arg(long)]
        scope: String,
    },
}

/// `kagi lock`.
#[derive(Args, Debug)]
pub struct LockArgs {
    #[command(subcommand)]
    command: LockCommand,
}

#[derive(Subcommand, Debug)]
enum LockCommand {
    /// Create a lock.
    Create {
        /// Name.
        #[arg(long)]
        name: String,
        /// Scope (vault id, `{vault id}/keys/{name}`, resource group, …).
        #[arg(long)]
        scope: String,
        /// CanNotDelete or ReadOnly.
        #[arg(long, default_value = "CanNotDelete")]
        level: String,
        /// Notes.
        #[arg(long, default_value = "")]
        notes: String,
    },
    /// List locks that apply at a scope.
    List {
        /// Scope.
        #[arg(long)]
        scope: String,
    },
    /// Delete a lock.
    Delete {
        /// Name.
        #[arg(long)]
        name: String,
        /// Scope.
        #[arg(long)]
        scope: String,
    },
}

fn show(ctx: &Context, v: &Value) {
    match ctx.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => {
            let items = v["value"]
                .as_array()
                .cloned()
                .unwrap_or_else(|| vec![v.clone()]);
            for i in items {
                let id = i["id"]
                    .as_str()
                    .or(i["objectId"].as_str())
                    .or(i["kid"].as_str())
                    .unwrap_or("");
                let extra = i["properties"]["principalId"]
                    .as_str()
                    .or(i["identity"]["principalId"].as_str())
                    .or(i["clientId"].as_str())
                    .or(i["status"].as_str())
                    .unwrap_or("");
                match i["expiresOn"].as_str().or(i["validUntil"].as_str()) {
                    Some(until) => println!("{id}\t{extra}\t{until}"),
                    None => println!("{id}\t{extra}"),
                }
            }
        }
    }
}

fn new_guid() -> anyhow::Result<String> {
    Ok(kagi_core::ids::uuid_v4(kagi_crypto::random_array()?))
}

impl Context {
    fn rg_url(&self, rg: &str, provider: &str, name: &str, api: &str) -> String {
        format!(
            "{}/subscriptions/{}/resourceGroups/{rg}/providers/{provider}/{name}?api-version={api}",
            self.base, self.subscription
        )
    }

    fn scope_url(&self, scope: &str, rest: &str, api: &str) -> String {
        format!(
            "{}{}/providers/Microsoft.Authorization/{rest}?api-version={api}",
            self.base,
            scope.trim_end_matches('/')
        )
    }
}

/// Runs `kagi identity`.
pub async fn identity(ctx: &Context, args: IdentityArgs) -> anyhow::Result<()> {
    const UAMI: &str = "Microsoft.ManagedIdentity/userAssignedIdentities";
    const WORKLOAD: &str = "Kagi.Compute/workloads";
    let v = match args.command {
        IdentityCommand::Sp { command } => match command {
            SpCommand::Create { name, certificate } => {
                let mut sp = ctx
                    .call(
                        Method::POST,
                        &format!("{}/v1.0/servicePrincipals", ctx.base),
                        Some(&json!({"displayName": name})),
                    )
                    .await?;
                if let Some(file) = certificate {
                    let oid = sp["objectId"].as_str().context("no objectId")?.to_string();
                    let added = add_cert(ctx, &oid, &file).await?;
                    sp["keyCredentials"] = added["keyCredentials"].clone();
                }
                sp
            }
            SpCommand::AddCert { id, certificate } => add_cert(ctx, &id, &certificate).await?,
            SpCommand::List => {
                ctx.call(
                    Method::GET,
                    &format!("{}/v1.0/servicePrincipals", ctx.base),
                    None,
                )
                .await?
            }
            SpCommand::Delete { id } => {
                ctx.call(
                    Method::DELETE,
                    &format!("{}/v1.0/servicePrincipals/{id}", ctx.base),
                    None,
                )
                .await?;
                json!({"objectId": id, "deleted": true})
            }
            SpCommand::ResetSecret { id } => {
                ctx.call(
                    Method::POST,
                    &format!("{}/v1.0/servicePrincipals/{id}/addPassword", ctx.base),
                    None,
                )
                .await?
            }
        },
        IdentityCommand::User { command } => match command {
            UserCommand::Create {
                upn,
                display_name,
                password_file,
                password_env,
            } => {
                let password = match (password_file, password_env) {
                    (Some(f), _) => std::fs::read_to_string(&f)
                        .with_context(|| format!("cannot read {}", f.display()))?
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string(),
                    (None, Some(var)) => {
                        std::env::var(&var).with_context(|| format!("{var} is not set"))?
                    }
                    (None, None) => {
                        anyhow::bail!("give the password with --password-file or --password-env")
                    }
                };
                ctx.call(
                    Method::POST,
                    &format!("{}/v1.0/users", ctx.base),
                    Some(&json!({"userPrincipalName": upn, "displayName": display_name, "passwordProfile": {"password": password}})),
                )
                .await?
            }
            UserCommand::Delete { id } => {
                ctx.call(
                    Method::DELETE,
                    &format!("{}/v1.0/users/{id}", ctx.base),
                    None,
                )
                .await?;
                json!({"objectId": id, "deleted": true})
            }
        },
        IdentityCommand::Create {
            name,
            resource_group,
            location,
        } => {
            ensure_group(ctx, &resource_group, &location).await?;
            ctx.call(
                Method::PUT,
                &ctx.rg_url(&resource_group, UAMI, &name, ARM_API),
                Some(&json!({"location": location})),
            )
            .await?
        }
        IdentityCommand::Show {
            name,
            resource_group,
        } => {
            ctx.call(
                Method::GET,
                &ctx.rg_url(&resource_group, UAMI, &name, ARM_API),
                None,
            )
            .await?
        }
        IdentityCommand::Delete {
            name,
            resource_group,
        } => {
            ctx.call(
                Method::DELETE,
                &ctx.rg_url(&resource_group, UAMI, &name, ARM_API),
                None,
            )
            .await?;
            json!({"name": name, "deleted": true})
        }
        IdentityCommand::Workload { command } => match command {
            WorkloadCommand::Create {
                name,
                resource_group,
                location,
                system_assigned,
                user_assigned,
            } => {
                ensure_group(ctx, &resource_group, &location).await?;
                let ty = match (system_assigned, !user_assigned.is_empty()) {
                    (true, true) => "SystemAssigned, UserAssigned",
                    (true, false) => "SystemAssigned",
                    (false, true) => "UserAssigned",
                    (false, false) => "None",
                };
                let mut identity = json!({"type": ty});
                if !user_assigned.is_empty() {
                    identity["userAssignedIdentities"] = Value::Object(
                        user_assigned
                            .iter()
                            .map(|id| (id.clone(), json!({})))
                            .collect(),
                    );
                }
                ctx.call(
                    Method::PUT,
                    &ctx.rg_url(&resource_group, WORKLOAD, &name, ARM_API),
                    Some(&json!({"location": location, "identity": identity})),
                )
                .await?
            }
            WorkloadCommand::Show {
                name,
                resource_group,
            } => {
                ctx.call(
                    Method::GET,
                    &ctx.rg_url(&resource_group, WORKLOAD, &name, ARM_API),
                    None,
                )
                .await?
            }
            WorkloadCommand::Delete {
                name,
                resource_group,
            } => {
                ctx.call(
                    Method::DELETE,
                    &ctx.rg_url(&resource_group, WORKLOAD, &name, ARM_API),
                    None,
                )
                .await?;
                json!({"name": name, "deleted": true})
            }
        },
        IdentityCommand::Env {
            resource,
            client_id,
            expires_in_hours,
        } => {
            let mut url = resource_url(ctx, &resource, "listIdentityEnvironment");
            if let Some(c) = &client_id {
                url.push_str(&format!("&clientId={c}"));
            }
            if let Some(h) = expires_in_hours {
                url.push_str(&format!("&expiresInHours={h}"));
            }
            let env = ctx.call(Method::POST, &url, None).await?;
            if matches!(ctx.output, Output::Json) {
                println!("{}", serde_json::to_string_pretty(&env)?);
            } else {
                // Only the variables go to stdout (it is meant for `env` files and `eval`).
                for (k, v) in env.as_object().context("bad response")? {
                    if let Some(v) = v.as_str() {
                        println!("{k}={v}");
                    }
                }
                let b = &env["binding"];
                eprintln!(
                    "binding {} for client id {}, expires {}",
                    b["id"].as_str().unwrap_or("?"),
                    b["clientId"].as_str().unwrap_or("?"),
                    b["expiresOn"].as_str().unwrap_or("?")
                );
            }
            return Ok(());
        }
        IdentityCommand::Binding { command } => match command {
            BindingCommand::List { resource } => {
                ctx.call(
                    Method::GET,
                    &resource_url(ctx, &resource, "identityBindings"),
                    None,
                )
                .await?
            }
            BindingCommand::Revoke { resource, id } => {
                ctx.call(
                    Method::DELETE,
                    &resource_url(ctx, &resource, &format!("identityBindings/{id}")),
                    None,
                )
                .await?
            }
        },
        IdentityCommand::SigningKey { command } => {
            let url = format!("{}/kagi/admin/signingKeys", ctx.base);
            match command {
                SigningKeyCommand::List => ctx.call(Method::GET, &url, None).await?,
                SigningKeyCommand::Rotate { revoke_previous } => {
                    ctx.call(
                        Method::POST,
                        &format!("{url}/rotate"),
                        Some(&json!({"revokePrevious": revoke_previous})),
                    )
                    .await?
                }
            }
        }
    };
    show(ctx, &v);
    Ok(())
}

/// `{resource}/{rest}?api-version=…` on the management endpoint.
fn resource_url(ctx: &Context, resource: &str, rest: &str) -> String {
    format!(
        "{}{}/{rest}?api-version={ARM_API}",
        ctx.base,
        resource.trim_end_matches('/')
    )
}

async fn add_cert(ctx: &Context, oid: &str, file: &std::path::Path) -> anyhow::Result<Value> {
    let pem =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    ctx.call(
        Method::POST,
        &format!("{}/v1.0/servicePrincipals/{oid}/addKey", ctx.base),
        Some(&json!({"keyCredential": {"type": "AsymmetricX509Cert", "usage": "Verify", "key": pem}})),
    )
    .await
}

async fn ensure_group(ctx: &Context, rg: &str, location: &str) -> anyhow::Result<()> {
    let url = format!(
        "{}/subscriptions/{}/resourcegroups/{rg}?api-version=2021-04-01",
        ctx.base, ctx.subscription
    );
    match ctx
        .call(Method::PUT, &url, Some(&json!({"location": location})))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("InvalidResourceGroupLocation") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Runs `kagi role`.
pub async fn role(ctx: &Context, args: RoleArgs) -> anyhow::Result<()> {
    let v = match args.command {
        RoleCommand::Assign {
            assignee,
            role,
            scope,
        } => {
            let role_id = if kagi_core::ids::ObjectId::parse(&role).is_ok() {
                role
            } else {
                let defs = ctx
                    .call(
                        Method::GET,
                        &ctx.scope_url(&scope, "roleDefinitions", AUTHZ_API),
                        None,
                    )
                    .await?;
                defs["value"]
                    .as_array()
                    .and_then(|a| {
                        a.iter().find(|d| {
                            d["properties"]["roleName"]
                                .as_str()
                                .is_some_and(|n| n.eq_ignore_ascii_case(&role))
                        })
                    })
                    .and_then(|d| d["name"].as_str().map(str::to_string))
                    .with_context(|| format!("no role named '{role}'"))?
            };
            let body = json!({"properties": {
                "roleDefinitionId": format!("/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{role_id}", ctx.subscription),
                "principalId": assignee,
            }});
            ctx.call(
                Method::PUT,
                &ctx.scope_url(
                    &scope,
                    &format!("roleAssignments/{}", new_guid()?),
                    AUTHZ_API,
                ),
                Some(&body),
            )
            .await?
        }
        RoleCommand::List { scope } => {
            ctx.call(
                Method::GET,
                &ctx.scope_url(&scope, "roleAssignments", AUTHZ_API),
                None,
            )
            .await?
        }
        RoleCommand::Unassign { id, scope } => {
            ctx.call(
                Method::DELETE,
                &ctx.scope_url(&scope, &format!("roleAssignments/{id}"), AUTHZ_API),
                None,
            )
            .await?;
            json!({"id": id, "deleted": true})
        }
        RoleCommand::Define { file, scope, id } => {
            let props: Value = serde_json::from_slice(
                &std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?,
            )
            .with_context(|| format!("{} is not JSON", file.display()))?;
            let id = match id {
                Some(i) => i,
                None => new_guid()?,
            };
            ctx.call(
                Method::PUT,
                &ctx.scope_url(&scope, &format!("roleDefinitions/{id}"), AUTHZ_API),
                Some(&json!({"properties": props})),
            )
            .await?
        }
        RoleCommand::Definitions { scope } => {
            ctx.call(
                Method::GET,
                &ctx.scope_url(&scope, "roleDefinitions", AUTHZ_API),
                None,
            )
            .await?
        }
    };
    show(ctx, &v);
    Ok(())
}

/// Runs `kagi lock`.
pub async fn lock(ctx: &Context, args: LockArgs) -> anyhow::Result<()> {
    let v = match args.command {
        LockCommand::Create {
            name,
            scope,
            level,
            notes,
        } => {
            ctx.call(
                Method::PUT,
                &ctx.scope_url(&scope, &format!("locks/{name}"), "2020-05-01"),
                Some(&json!({"properties": {"level": level, "notes": notes}})),
            )
            .await?
        }
        LockCommand::List { scope } => {
            ctx.call(
                Method::GET,
                &ctx.scope_url(&scope, "locks", "2020-05-01"),
                None,
            )
            .await?
        }
        LockCommand::Delete { name, scope } => {
            ctx.call(
                Method::DELETE,
                &ctx.scope_url(&scope, &format!("locks/{name}"), "2020-05-01"),
                None,
            )
            .await?;
            json!({"name": name, "deleted": true})
        }
    };
    show(ctx, &v);
    Ok(())
}

//! `kagi sql …`: logical SQL servers, their databases, server keys and the TDE protector
//! (Microsoft.Sql, like `az sql server|db|server key|server tde-key`).

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Context;
use crate::disk::show;

const API: &str = "api-version=2023-08-01";

/// `kagi sql`.
#[derive(Args, Debug)]
pub struct SqlArgs {
    #[command(subcommand)]
    command: SqlCommand,
}

#[derive(Subcommand, Debug)]
enum SqlCommand {
    /// Logical servers.
    Server {
        #[command(subcommand)]
        command: ServerCommand,
    },
    /// Databases of a server.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Key vault keys a server may use as its TDE protector.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// The server's TDE protector.
    TdeKey {
        #[command(subcommand)]
        command: TdeCommand,
    },
}

#[derive(Args, Debug)]
struct ServerAt {
    /// Server name (`--sql-server`: `--server` is kagi's URL).
    #[arg(long = "sql-server", short = 's')]
    sql_server: String,
    /// Resource group.
    #[arg(long, short = 'g')]
    resource_group: String,
}

#[derive(Subcommand, Debug)]
enum ServerCommand {
    /// Create a server (or update its password, identity or tags).
    Create {
        /// Server name (lower case, digits, hyphens: it becomes the host name).
        #[arg(long, short = 'n')]
        name: String,
        /// Resource group.
        #[arg(long, short = 'g')]
        resource_group: String,
        /// Region.
        #[arg(long, short = 'l', default_value = "westeurope")]
        location: String,
        /// The administrator login.
        #[arg(long, short = 'u')]
        admin_user: String,
        /// The administrator password (or `KAGI_SQL_ADMIN_PASSWORD`).
        #[arg(
            long,
            short = 'p',
            env = "KAGI_SQL_ADMIN_PASSWORD",
            hide_env_values = true
        )]
        admin_password: String,
        /// Give the server a system-assigned identity (to reach a TDE protector).
        #[arg(long)]
        assign_identity: bool,
        /// A user-assigned identity's resource id (also the primary one).
        #[arg(long)]
        user_assigned_identity: Option<String>,
        /// A versioned key id to use as TDE protector from the start (needs a user-assigned
        /// identity with access).
        #[arg(long)]
        key_id: Option<String>,
    },
    /// Show a server.
    Show {
        /// Server name.
        #[arg(long, short = 'n')]
        name: String,
        /// Resource group.
        #[arg(long, short = 'g')]
        resource_group: String,
    },
    /// List servers.
    List {
        /// Resource group (the whole subscription without it).
        #[arg(long, short = 'g')]
        resource_group: Option<String>,
    },
    /// Delete a server and its databases.
    Delete {
        /// Server name.
        #[arg(long, short = 'n')]
        name: String,
        /// Resource group.
        #[arg(long, short = 'g')]
        resource_group: String,
    },
}

#[derive(Subcommand, Debug)]
enum DbCommand {
    /// Create a database (under the server's protector, or with a key of its own).
    Create {
        #[command(flatten)]
        at: ServerAt,
        /// Database name.
        #[arg(long, short = 'n')]
        name: String,
        #[command(flatten)]
        key: DbKeyArgs,
    },
    /// A database's own key (database-level CMK), as `az sql db tde key`.
    #[command(subcommand)]
    TdeKey(DbTdeKeyCommand),
    /// Show a database (its status: Online or Inaccessible).
    Show {
        #[command(flatten)]
        at: ServerAt,
        /// Database name.
        #[arg(long, short = 'n')]
        name: String,
    },
    /// List the databases of a server.
    List {
        #[command(flatten)]
        at: ServerAt,
    },
    /// Delete a database (allowed even when it is inaccessible). Its backups stay for the
    /// retention period.
    Delete {
        #[command(flatten)]
        at: ServerAt,
        /// Database name.
        #[arg(long, short = 'n')]
        name: String,
    },
    /// Restore a database, as it was at a point in time, into a new database (a point-in-time
    /// restore; the source may have been dropped since).
    Restore {
        #[command(flatten)]
        at: ServerAt,
        /// The new database's name.
        #[arg(long, short = 'n')]
        name: String,
        /// The database to restore (its name on its server).
        #[arg(long)]
        source: String,
        /// The source database's server, when it is another (same resource group): e.g. a
        /// server whose home node was lost (docs/SEVERAL_NODES.md, "Homes").
        #[arg(long)]
        source_server: Option<String>,
        /// The point in time (RFC 3339, e.g. 2026-05-01T10:00:00Z): the database as of the last
        /// backup at or before it (log backups are minutes apart).
        #[arg(long)]
        time: String,
    },
    /// List a database's backups: time, type, the range of time each covers and the key it is
    /// under (kagi's).
    ListBackups {
        #[command(flatten)]
        at: ServerAt,
        /// Database name (a dropped one's backups while they are retained).
        #[arg(long, short = 'n')]
        name: String,
    },
    /// List dropped databases whose backups remain (restorable).
    ListDropped {
        #[command(flatten)]
        at: ServerAt,
    },
    /// Geo-replication: a readable secondary on another server (as `az sql db replica`).
    #[command(subcommand)]
    Replica(ReplicaCommand),
}

/// A database's own key and the user-assigned identity that reaches it.
#[derive(Args, Debug)]
struct DbKeyArgs {
    /// The user-assigned identity (resource id) the database reaches its key with.
    #[arg(long)]
    user_assigned_identity_id: Option<String>,
    /// The versioned key id of the database's own TDE protector.
    #[arg(long)]
    encryption_protector: Option<String>,
    /// Follow the key's newest version.
    #[arg(long)]
    encryption_protector_auto_rotation: bool,
}

impl DbKeyArgs {
    /// The request fields (`identity`, `properties.encryptionProtector`, …) into `body`.
    fn apply(&self, body: &mut Value) {
        if let Some(id) = &self.user_assigned_identity_id {
            body["identity"] =
                json!({"type": "UserAssigned", "userAssignedIdentities": {id.as_str(): {}}});
        }
        if let Some(kid) = &self.encryption_protector {
            body["properties"]["encryptionProtector"] = json!(kid);
            body["properties"]["keys"] = json!({kid.as_str(): {}});
            body["properties"]["encryptionProtectorAutoRotation"] =
                json!(self.encryption_protector_auto_rotation);
        }
    }
}

#[derive(Subcommand, Debug)]
enum DbTdeKeyCommand {
    /// Give the database a key of its own (its DEK re-wrapped under it).
    Set {
        #[command(flatten)]
        at: ServerAt,
        /// Database name.
        #[arg(long, short = 'n')]
        name: String,
        #[command(flatten)]
        key: DbKeyArgs,
    },
    /// Probe the database's key now and bring the database back if it was inaccessible.
    Revalidate {
        #[command(flatten)]
        at: ServerAt,
        /// Database name.
        #[arg(long, short = 'n')]
        name: String,
    },
    /// Put the database back under the server's protector.
    Revert {
        #[command(flatten)]
        at: ServerAt,
        /// Database name.
        #[arg(long, short = 'n')]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum ReplicaCommand {
    /// Create a geo-secondary of a database on another server (the same name).
    Create {
        /// The primary's server and resource group.
        #[command(flatten)]
        at: ServerAt,
        /// Database name.
        #[arg(long, short = 'n')]
        name: String,
        /// The secondary's server.
        #[arg(long)]
        partner_server: String,
        /// The secondary server's resource group (default: the primary's).
        #[arg(long)]
        partner_resource_group: Option<String>,
    },
    /// List a database's replication links (role, partner, state, lag).
    ListLinks {
        #[command(flatten)]
        at: ServerAt,
        /// Database name.
        #[arg(long, short = 'n')]
        name: String,
    },
    /// Make the secondary the primary (run against the secondary's server).
    SetPrimary {
        /// The secondary's server and resource group.
        #[command(flatten)]
        at: ServerAt,
        /// Database name.
        #[arg(long, short = 'n')]
        name: String,
        /// A forced failover: at once, losing what the secondary has not received.
        #[arg(long)]
        allow_data_loss: bool,
    },
    /// Remove the link: both databases stand alone.
    DeleteLink {
        #[command(flatten)]
        at: ServerAt,
        /// Database name.
        #[arg(long, short = 'n')]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Add a key version to the server (checked with the server's identity).
    Create {
        #[command(flatten)]
        at: ServerAt,
        /// The versioned key id.
        #[arg(long)]
        kid: String,
    },
    /// List the server's keys.
    List {
        #[command(flatten)]
        at: ServerAt,
    },
    /// Remove a server key (not the protector in force).
    Delete {
        #[command(flatten)]
        at: ServerAt,
        /// The versioned key id.
        #[arg(long)]
        kid: String,
    },
}

#[derive(Subcommand, Debug)]
enum TdeCommand {
    /// Set the protector: `ServiceManaged`, or `AzureKeyVault` with a key id (added as a
    /// server key first). Every database's data key is re-wrapped; nothing is re-encrypted.
    Set {
        #[command(flatten)]
        at: ServerAt,
        /// ServiceManaged or AzureKeyVault.
        #[arg(long, default_value = "AzureKeyVault")]
        server_key_type: String,
        /// The versioned key id (AzureKeyVault).
        #[arg(long)]
        kid: Option<String>,
        /// Follow the key's newest version automatically.
        #[arg(long)]
        auto_rotation: bool,
    },
    /// Show the protector.
    Show {
        #[command(flatten)]
        at: ServerAt,
    },
    /// Probe the protector now and bring back inaccessible databases.
    Revalidate {
        #[command(flatten)]
        at: ServerAt,
    },
}

fn server_url(ctx: &Context, rg: &str, server: &str) -> String {
    format!(
        "{}/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.Sql/servers/{server}",
        ctx.base, ctx.subscription
    )
}

async fn call(
    ctx: &Context,
    method: Method,
    url: String,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    ctx.call(method, &format!("{url}?{API}"), body).await
}

/// `{vault}_{key}_{version}` of a versioned key id, Azure's server key name.
fn key_name(kid: &str) -> anyhow::Result<String> {
    let u = reqwest::Url::parse(kid)?;
    let vault = u.host_str().and_then(|h| h.split('.').next()).unwrap_or("");
    let segs: Vec<&str> = u.path_segments().map(|s| s.collect()).unwrap_or_default();
    match segs.as_slice() {
        ["keys", name, version] if !vault.is_empty() && !version.is_empty() => {
            Ok(format!("{vault}_{name}_{version}"))
        }
        _ => anyhow::bail!(
            "'{kid}' is not a versioned key id (https://{{vault}}.…/keys/{{name}}/{{version}})"
        ),
    }
}

fn server_line(s: &Value) -> String {
    let p = &s["properties"];
    format!(
        "{}\t{}\t{}\t{}",
        s["name"].as_str().unwrap_or(""),
        p["fullyQualifiedDomainName"].as_str().unwrap_or(""),
        p["administratorLogin"].as_str().unwrap_or(""),
        p["state"].as_str().unwrap_or("")
    )
}

fn db_line(d: &Value) -> String {
    let p = &d["properties"];
    let key = p["encryptionProtector"]
        .as_str()
        .map(|k| format!("\tkey {k}"))
        .unwrap_or_default();
    format!(
        "{}\t{}\t{}{key}",
        d["name"].as_str().unwrap_or(""),
        p["status"].as_str().unwrap_or(""),
        p["databaseId"].as_str().unwrap_or("")
    )
}

fn backup_line(b: &Value) -> String {
    let p = &b["properties"];
    format!(
        "{}\t{}\t{}\t{}..{}\t{}\t{}",
        b["name"].as_str().unwrap_or(""),
        p["backupType"].as_str().unwrap_or(""),
        p["backupTime"].as_str().unwrap_or(""),
        p["rangeStart"].as_str().unwrap_or(""),
        p["rangeEnd"].as_str().unwrap_or(""),
        p["keyUri"].as_str().unwrap_or("ServiceManaged"),
        p["thumbprint"].as_str().unwrap_or("")
    )
}

fn dropped_line(d: &Value) -> String {
    let p = &d["properties"];
    format!(
        "{}\tdeleted {}\tearliest {}",
        p["databaseName"].as_str().unwrap_or(""),
        p["deletionDate"].as_str().unwrap_or(""),
        p["earliestRestoreDate"].as_str().unwrap_or("")
    )
}

fn key_line(k: &Value) -> String {
    let p = &k["properties"];
    format!(
        "{}\t{}\t{}",
        k["name"].as_str().unwrap_or(""),
        p["serverKeyType"].as_str().unwrap_or(""),
        p["uri"].as_str().unwrap_or("")
    )
}

fn protector_line(p: &Value) -> String {
    let q = &p["properties"];
    format!(
        "{}\t{}\t{}\tautoRotation={}",
        q["serverKeyType"].as_str().unwrap_or(""),
        q["serverKeyName"].as_str().unwrap_or(""),
        q["uri"].as_str().unwrap_or(""),
        q["autoRotationEnabled"]
    )
}

/// Runs `kagi sql …`.
pub async fn run(ctx: &Context, args: SqlArgs) -> anyhow::Result<()> {
    match args.command {
        SqlCommand::Server { command } => server(ctx, command).await,
        SqlCommand::Db { command } => db(ctx, command).await,
        SqlCommand::Key { command } => key(ctx, command).await,
        SqlCommand::TdeKey { command } => tde(ctx, command).await,
    }
}

async fn server(ctx: &Context, c: ServerCommand) -> anyhow::Result<()> {
    match c {
        ServerCommand::Create {
            name,
            resource_group,
            location,
            admin_user,
            admin_password,
            assign_identity,
            user_assigned_identity,
            key_id,
        } => {
            let mut props = json!({"administratorLogin": admin_user,
                "administratorLoginPassword": admin_password});
            let identity = match (&user_assigned_identity, assign_identity) {
                (Some(id), system) => {
                    props["primaryUserAssignedIdentityId"] = json!(id);
                    let ty = if system {
                        "SystemAssigned,UserAssigned"
                    } else {
                        "UserAssigned"
                    };
                    Some(json!({"type": ty, "userAssignedIdentities": {id: {}}}))
                }
                (None, true) => Some(json!({"type": "SystemAssigned"})),
                (None, false) => None,
            };
            if let Some(k) = key_id {
                props["keyId"] = json!(k);
            }
            let mut body = json!({"location": location, "properties": props});
            if let Some(i) = identity {
                body["identity"] = i;
            }
            let v = call(
                ctx,
                Method::PUT,
                server_url(ctx, &resource_group, &name),
                Some(&body),
            )
            .await?;
            show(ctx, &v, server_line);
        }
        ServerCommand::Show {
            name,
            resource_group,
        } => {
            let v = call(
                ctx,
                Method::GET,
                server_url(ctx, &resource_group, &name),
                None,
            )
            .await?;
            show(ctx, &v, server_line);
        }
        ServerCommand::List { resource_group } => {
            let scope = match resource_group {
                Some(rg) => format!("/resourceGroups/{rg}"),
                None => String::new(),
            };
            let url = format!(
                "{}/subscriptions/{}{scope}/providers/Microsoft.Sql/servers",
                ctx.base, ctx.subscription
            );
            show(ctx, &call(ctx, Method::GET, url, None).await?, server_line);
        }
        ServerCommand::Delete {
            name,
            resource_group,
        } => {
            call(
                ctx,
                Method::DELETE,
                server_url(ctx, &resource_group, &name),
                None,
            )
            .await?;
        }
    }
    Ok(())
}

async fn db(ctx: &Context, c: DbCommand) -> anyhow::Result<()> {
    let url = |at: &ServerAt, name: &str| {
        format!(
            "{}/databases/{name}",
            server_url(ctx, &at.resource_group, &at.sql_server)
        )
    };
    match c {
        DbCommand::Create { at, name, key } => {
            let server = call(
                ctx,
                Method::GET,
                server_url(ctx, &at.resource_group, &at.sql_server),
                None,
            )
            .await?;
            let mut body = json!({"location": server["location"], "properties": {}});
            key.apply(&mut body);
            show(
                ctx,
                &call(ctx, Method::PUT, url(&at, &name), Some(&body)).await?,
                db_line,
            );
        }
        DbCommand::Show { at, name } => {
            show(
                ctx,
                &call(ctx, Method::GET, url(&at, &name), None).await?,
                db_line,
            );
        }
        DbCommand::List { at } => {
            let u = format!(
                "{}/databases",
                server_url(ctx, &at.resource_group, &at.sql_server)
            );
            show(ctx, &call(ctx, Method::GET, u, None).await?, db_line);
        }
        DbCommand::Delete { at, name } => {
            call(ctx, Method::DELETE, url(&at, &name), None).await?;
        }
        DbCommand::Restore {
            at,
            name,
            source,
            source_server,
            time,
        } => {
            let from = ServerAt {
                sql_server: source_server.unwrap_or_else(|| at.sql_server.clone()),
                resource_group: at.resource_group.clone(),
            };
            let body = json!({"properties": {
                "createMode": "PointInTimeRestore",
                "sourceDatabaseId": url(&from, &source).trim_start_matches(&ctx.base),
                "restorePointInTime": time,
            }});
            show(
                ctx,
                &call(ctx, Method::PUT, url(&at, &name), Some(&body)).await?,
                db_line,
            );
        }
        DbCommand::ListBackups { at, name } => {
            let u = format!("{}/backups", url(&at, &name));
            show(ctx, &call(ctx, Method::GET, u, None).await?, backup_line);
        }
        DbCommand::ListDropped { at } => {
            let u = format!(
                "{}/restorableDroppedDatabases",
                server_url(ctx, &at.resource_group, &at.sql_server)
            );
            show(ctx, &call(ctx, Method::GET, u, None).await?, dropped_line);
        }
        DbCommand::Replica(r) => replica(ctx, r).await?,
        DbCommand::TdeKey(DbTdeKeyCommand::Set { at, name, key }) => {
            let mut body = json!({"properties": {}});
            key.apply(&mut body);
            show(
                ctx,
                &call(ctx, Method::PATCH, url(&at, &name), Some(&body)).await?,
                db_line,
            );
        }
        DbCommand::TdeKey(DbTdeKeyCommand::Revalidate { at, name }) => {
            let u = format!("{}/encryptionProtector/current/revalidate", url(&at, &name));
            call(ctx, Method::POST, u, None).await?;
        }
        DbCommand::TdeKey(DbTdeKeyCommand::Revert { at, name }) => {
            let u = format!("{}/encryptionProtector/current/revert", url(&at, &name));
            show(ctx, &call(ctx, Method::POST, u, None).await?, db_line);
        }
    }
    Ok(())
}

fn link_line(l: &Value) -> String {
    let p = &l["properties"];
    format!(
        "{}\t{}\tpartner {}/{}\t{}\tlag {}",
        l["name"].as_str().unwrap_or(""),
        p["role"].as_str().unwrap_or(""),
        p["partnerServer"].as_str().unwrap_or(""),
        p["partnerDatabase"].as_str().unwrap_or(""),
        p["replicationState"].as_str().unwrap_or(""),
        p["replicationLagSeconds"]
            .as_i64()
            .map(|s| format!("{s}s"))
            .unwrap_or_else(|| "unknown".into())
    )
}

async fn replica(ctx: &Context, c: ReplicaCommand) -> anyhow::Result<()> {
    let links = |at: &ServerAt, name: &str| {
        format!(
            "{}/databases/{name}/replicationLinks",
            server_url(ctx, &at.resource_group, &at.sql_server)
        )
    };
    // The database's one link (kagi keeps one per database).
    let only_link = |at: ServerAt, name: String| async move {
        let list = call(ctx, Method::GET, links(&at, &name), None).await?;
        let id = list["value"][0]["name"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("database '{name}' has no replication link"))?;
        Ok::<_, anyhow::Error>(format!("{}/{id}", links(&at, &name)))
    };
    match c {
        ReplicaCommand::Create {
            at,
            name,
            partner_server,
            partner_resource_group,
        } => {
            let source = format!(
                "{}/databases/{name}",
                server_url(ctx, &at.resource_group, &at.sql_server)
            );
            let primary = call(
                ctx,
                Method::GET,
                server_url(ctx, &at.resource_group, &at.sql_server),
                None,
            )
            .await?;
            let rg = partner_resource_group.unwrap_or(at.resource_group.clone());
            let partner = call(
                ctx,
                Method::GET,
                server_url(ctx, &rg, &partner_server),
                None,
            )
            .await?;
            let body = json!({"location": partner["location"].as_str().unwrap_or(
                primary["location"].as_str().unwrap_or_default()),
                "properties": {"createMode": "Secondary", "secondaryType": "Geo",
                "sourceDatabaseId": source.trim_start_matches(&ctx.base)}});
            let u = format!("{}/databases/{name}", server_url(ctx, &rg, &partner_server));
            show(ctx, &call(ctx, Method::PUT, u, Some(&body)).await?, db_line);
        }
        ReplicaCommand::ListLinks { at, name } => {
            show(
                ctx,
                &call(ctx, Method::GET, links(&at, &name), None).await?,
                link_line,
            );
        }
        ReplicaCommand::SetPrimary {
            at,
            name,
            allow_data_loss,
        } => {
            let link = only_link(at, name).await?;
            let action = if allow_data_loss {
                "forceFailoverAllowDataLoss"
            } else {
                "failover"
            };
            let u = format!("{link}/{action}");
            show(ctx, &call(ctx, Method::POST, u, None).await?, link_line);
        }
        ReplicaCommand::DeleteLink { at, name } => {
            let link = only_link(at, name).await?;
            call(ctx, Method::DELETE, link, None).await?;
        }
    }
    Ok(())
}

/// Adds the key `kid` to the server; returns its name.
async fn add_key(ctx: &Context, at: &ServerAt, kid: &str) -> anyhow::Result<(String, Value)> {
    let name = key_name(kid)?;
    let u = format!(
        "{}/keys/{name}",
        server_url(ctx, &at.resource_group, &at.sql_server)
    );
    let body = json!({"properties": {"serverKeyType": "AzureKeyVault", "uri": kid}});
    Ok((name, call(ctx, Method::PUT, u, Some(&body)).await?))
}

async fn key(ctx: &Context, c: KeyCommand) -> anyhow::Result<()> {
    match c {
        KeyCommand::Create { at, kid } => show(ctx, &add_key(ctx, &at, &kid).await?.1, key_line),
        KeyCommand::List { at } => {
            let u = format!(
                "{}/keys",
                server_url(ctx, &at.resource_group, &at.sql_server)
            );
            show(ctx, &call(ctx, Method::GET, u, None).await?, key_line);
        }
        KeyCommand::Delete { at, kid } => {
            let u = format!(
                "{}/keys/{}",
                server_url(ctx, &at.resource_group, &at.sql_server),
                key_name(&kid)?
            );
            call(ctx, Method::DELETE, u, None).await?;
        }
    }
    Ok(())
}

async fn tde(ctx: &Context, c: TdeCommand) -> anyhow::Result<()> {
    let url = |at: &ServerAt| {
        format!(
            "{}/encryptionProtector/current",
            server_url(ctx, &at.resource_group, &at.sql_server)
        )
    };
    match c {
        TdeCommand::Set {
            at,
            server_key_type,
            kid,
            auto_rotation,
        } => {
            let body = if server_key_type.eq_ignore_ascii_case("ServiceManaged") {
                json!({"properties": {"serverKeyType": "ServiceManaged", "serverKeyName": "ServiceManaged"}})
            } else {
                let Some(kid) = kid else {
                    anyhow::bail!("--kid is needed with --server-key-type AzureKeyVault");
                };
                let (name, _) = add_key(ctx, &at, &kid).await?;
                json!({"properties": {"serverKeyType": "AzureKeyVault", "serverKeyName": name,
                    "autoRotationEnabled": auto_rotation}})
            };
            show(
                ctx,
                &call(ctx, Method::PUT, url(&at), Some(&body)).await?,
                protector_line,
            );
        }
        TdeCommand::Show { at } => {
            show(
                ctx,
                &call(ctx, Method::GET, url(&at), None).await?,
                protector_line,
            );
        }
        TdeCommand::Revalidate { at } => {
            call(ctx, Method::POST, format!("{}/revalidate", url(&at)), None).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_key_names_are_azures() {
        assert_eq!(
            key_name("https://kv1.localhost:8443/keys/tde/abc123").unwrap(),
            "kv1_tde_abc123"
        );
        assert!(key_name("https://kv1.localhost:8443/keys/tde").is_err());
    }
}

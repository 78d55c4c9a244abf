//! `kagi disk-encryption-set …` and `kagi disk …`: disk encryption sets naming a customer's
//! key, and disks encrypted under the platform key or a set, opened for block clients with
//! `grant-access` (an NBD URI) and closed with `revoke-access`.

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Context, Output};

const API: &str = "api-version=2025-01-02";

/// `kagi disk-encryption-set`.
#[derive(Args, Debug)]
pub struct SetArgs {
    #[command(subcommand)]
    command: SetCommand,
}

/// `kagi disk`.
#[derive(Args, Debug)]
pub struct DiskArgs {
    #[command(subcommand)]
    command: DiskCommand,
}

#[derive(Args, Debug)]
struct Named {
    /// Name.
    #[arg(long, short = 'n')]
    name: String,
    /// Resource group.
    #[arg(long, short = 'g')]
    resource_group: String,
}

#[derive(Args, Debug)]
struct Group {
    /// Resource group (all of the subscription without it).
    #[arg(long, short = 'g')]
    resource_group: Option<String>,
}

/// Access for block clients, of disks and snapshots alike.
#[derive(Subcommand, Debug)]
enum AccessCommand {
    /// Open it for block clients: prints the NBD URI (qemu-img, nbdinfo, nbdcopy, nbdfuse).
    GrantAccess {
        #[command(flatten)]
        at: Named,
        /// Read or Write.
        #[arg(long, default_value = "Read")]
        access_level: String,
        /// How long the access lasts, in seconds.
        #[arg(long, default_value_t = 3600)]
        duration_in_seconds: u64,
    },
    /// End its access (its clients are disconnected).
    RevokeAccess {
        #[command(flatten)]
        at: Named,
    },
}

/// `kagi snapshot`.
#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Take a snapshot of a disk (incremental ones share its unchanged blocks).
    Create {
        #[command(flatten)]
        at: Named,
        /// Region.
        #[arg(long, short = 'l', default_value = "westeurope")]
        location: String,
        /// The disk's resource id.
        #[arg(long)]
        source: String,
        /// Incremental (uses the disk's encryption).
        #[arg(long)]
        incremental: bool,
    },
    #[command(flatten)]
    Common(Common),
    #[command(flatten)]
    Access(AccessCommand),
}

/// `kagi image`.
#[derive(Args, Debug)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Make an image of a disk or snapshot (disks are then made from it with FromImage).
    Create {
        #[command(flatten)]
        at: Named,
        /// Region.
        #[arg(long, short = 'l', default_value = "westeurope")]
        location: String,
        /// The resource id of the disk or snapshot.
        #[arg(long)]
        source: String,
        /// A disk encryption set's resource id (default: the platform key).
        #[arg(long)]
        disk_encryption_set: Option<String>,
    },
    #[command(flatten)]
    Common(Common),
}

/// What both commands do alike.
#[derive(Subcommand, Debug)]
enum Common {
    /// Show one.
    Show {
        #[command(flatten)]
        at: Named,
    },
    /// List them.
    List {
        #[command(flatten)]
        group: Group,
    },
    /// Delete one (a set that disks use, or a disk with an open access, is refused).
    Delete {
        #[command(flatten)]
        at: Named,
    },
}

/// Runs a [`Common`] command on resources of `kind`, printing each with `line`.
async fn common(
    ctx: &Context,
    kind: &str,
    c: Common,
    line: fn(&Value) -> String,
) -> anyhow::Result<()> {
    match c {
        Common::Show { at } => show(
            ctx,
            &send(ctx, Method::GET, kind, &at, "", None).await?,
            line,
        ),
        Common::List { group } => show(ctx, &list(ctx, kind, &group).await?, line),
        Common::Delete { at } => {
            send(ctx, Method::DELETE, kind, &at, "", None).await?;
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
enum SetCommand {
    /// Create a set, or change its key (a versioned key id) or rotation.
    Create {
        #[command(flatten)]
        at: Named,
        /// Region.
        #[arg(long, short = 'l', default_value = "westeurope")]
        location: String,
        /// The versioned key id (`https://{vault}.{suffix}/keys/{name}/{version}`).
        #[arg(long)]
        key_url: String,
        /// A user-assigned identity's resource id (default: a system-assigned identity).
        #[arg(long)]
        user_assigned_identity: Option<String>,
        /// Follow the key's newest version automatically.
        #[arg(long)]
        auto_rotate: bool,
        /// Double encryption (platform and customer keys).
        #[arg(long)]
        double: bool,
    },
    /// The disks that use a set.
    ListAssociatedResources {
        #[command(flatten)]
        at: Named,
    },
    #[command(flatten)]
    Common(Common),
}

#[derive(Subcommand, Debug)]
enum DiskCommand {
    /// Create an empty disk.
    Create {
        #[command(flatten)]
        at: Named,
        /// Region.
        #[arg(long, short = 'l', default_value = "westeurope")]
        location: String,
        /// Size in GiB.
        #[arg(long = "size-gb", short = 'z')]
        size_gb: u64,
        /// A disk encryption set's resource id (default: the platform key only).
        #[arg(long)]
        disk_encryption_set: Option<String>,
        /// Encryption type (default: from the set, or the platform key without one).
        #[arg(long)]
        encryption_type: Option<String>,
    },
    /// Grow a disk, or move it to another set.
    Update {
        #[command(flatten)]
        at: Named,
        /// New size in GiB (grow only).
        #[arg(long = "size-gb", short = 'z')]
        size_gb: Option<u64>,
        /// A disk encryption set's resource id.
        #[arg(long)]
        disk_encryption_set: Option<String>,
        /// Encryption type.
        #[arg(long)]
        encryption_type: Option<String>,
    },
    #[command(flatten)]
    Common(Common),
    #[command(flatten)]
    Access(AccessCommand),
}

fn url(ctx: &Context, kind: &str, at: &Named) -> String {
    format!(
        "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/{kind}/{}",
        ctx.base, ctx.subscription, at.resource_group, at.name
    )
}

/// `method {resource}{action}?api-version=…` of resource `at` of `kind`, with `body`.
async fn send(
    ctx: &Context,
    method: Method,
    kind: &str,
    at: &Named,
    action: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let u = format!("{}{action}?{API}", url(ctx, kind, at));
    ctx.call(method, &u, body).await
}

/// `kagi … list`.
async fn list(ctx: &Context, kind: &str, g: &Group) -> anyhow::Result<Value> {
    ctx.call(Method::GET, &list_url(ctx, kind, g), None).await
}

fn list_url(ctx: &Context, kind: &str, g: &Group) -> String {
    match &g.resource_group {
        Some(rg) => format!(
            "{}/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.Compute/{kind}?{API}",
            ctx.base, ctx.subscription
        ),
        None => format!(
            "{}/subscriptions/{}/providers/Microsoft.Compute/{kind}?{API}",
            ctx.base, ctx.subscription
        ),
    }
}

pub(crate) fn show(ctx: &Context, v: &Value, line: impl Fn(&Value) -> String) {
    match ctx.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        _ => match v["value"].as_array() {
            Some(items) => items.iter().for_each(|i| println!("{}", line(i))),
            None if v.is_null() => {}
            None => println!("{}", line(v)),
        },
    }
}

fn set_line(s: &Value) -> String {
    let p = &s["properties"];
    format!(
        "{}\t{}\t{}\trotation={}",
        s["name"].as_str().unwrap_or(""),
        p["encryptionType"].as_str().unwrap_or(""),
        p["activeKey"]["keyUrl"].as_str().unwrap_or(""),
        p["rotationToLatestKeyVersionEnabled"]
    )
}

fn disk_line(d: &Value) -> String {
    let p = &d["properties"];
    format!(
        "{}\t{} GiB\t{}\t{}",
        d["name"].as_str().unwrap_or(""),
        p["diskSizeGB"],
        p["diskState"].as_str().unwrap_or(""),
        p["encryption"]["type"].as_str().unwrap_or("")
    )
}

/// Runs `kagi disk-encryption-set …`.
pub async fn run_set(ctx: &Context, args: SetArgs) -> anyhow::Result<()> {
    const KIND: &str = "diskEncryptionSets";
    match args.command {
        SetCommand::Create {
            at,
            location,
            key_url,
            user_assigned_identity,
            auto_rotate,
            double,
        } => {
            let identity = match &user_assigned_identity {
                Some(id) => json!({"type": "UserAssigned", "userAssignedIdentities": {id: {}}}),
                None => json!({"type": "SystemAssigned"}),
            };
            let etype = if double {
                "EncryptionAtRestWithPlatformAndCustomerKeys"
            } else {
                "EncryptionAtRestWithCustomerKey"
            };
            let body = json!({"location": location, "identity": identity, "properties": {
                "activeKey": {"keyUrl": key_url}, "encryptionType": etype,
                "rotationToLatestKeyVersionEnabled": auto_rotate}});
            show(
                ctx,
                &send(ctx, Method::PUT, KIND, &at, "", Some(&body)).await?,
                set_line,
            );
        }
        SetCommand::ListAssociatedResources { at } => {
            let v = send(ctx, Method::GET, KIND, &at, "/associatedResources", None).await?;
            show(ctx, &v, |id| id.as_str().unwrap_or("").to_string());
        }
        SetCommand::Common(c) => common(ctx, KIND, c, set_line).await?,
    }
    Ok(())
}

fn encryption(set: Option<String>, etype: Option<String>) -> Option<Value> {
    // With a set and no type the server takes the set's type (customer key, or both layers).
    match (set, etype) {
        (None, None) => None,
        (set, etype) => {
            let mut e = json!({});
            if let Some(t) = etype {
                e["type"] = json!(t);
            } else if set.is_none() {
                e["type"] = json!("EncryptionAtRestWithPlatformKey");
            }
            if let Some(s) = set {
                e["diskEncryptionSetId"] = json!(s);
            }
            Some(e)
        }
    }
}

/// Runs `kagi disk …`.
pub async fn run_disk(ctx: &Context, args: DiskArgs) -> anyhow::Result<()> {
    const KIND: &str = "disks";
    match args.command {
        DiskCommand::Create {
            at,
            location,
            size_gb,
            disk_encryption_set,
            encryption_type,
        } => {
            let mut props =
                json!({"creationData": {"createOption": "Empty"}, "diskSizeGB": size_gb});
            if let Some(e) = encryption(disk_encryption_set, encryption_type) {
                props["encryption"] = e;
            }
            let body = json!({"location": location, "properties": props});
            show(
                ctx,
                &send(ctx, Method::PUT, KIND, &at, "", Some(&body)).await?,
                disk_line,
            );
        }
        DiskCommand::Update {
            at,
            size_gb,
            disk_encryption_set,
            encryption_type,
        } => {
            let mut props = json!({});
            if let Some(s) = size_gb {
                props["diskSizeGB"] = json!(s);
            }
            if let Some(e) = encryption(disk_encryption_set, encryption_type) {
                props["encryption"] = e;
            }
            let body = json!({ "properties": props });
            show(
                ctx,
                &send(ctx, Method::PATCH, KIND, &at, "", Some(&body)).await?,
                disk_line,
            );
        }
        DiskCommand::Common(c) => common(ctx, KIND, c, disk_line).await?,
        DiskCommand::Access(c) => access(ctx, KIND, c).await?,
    }
    Ok(())
}

/// Runs an [`AccessCommand`] on a resource of `kind`.
async fn access(ctx: &Context, kind: &str, c: AccessCommand) -> anyhow::Result<()> {
    match c {
        AccessCommand::GrantAccess {
            at,
            access_level,
            duration_in_seconds,
        } => {
            let body = json!({"access": access_level, "durationInSeconds": duration_in_seconds});
            let v = send(ctx, Method::POST, kind, &at, "/beginGetAccess", Some(&body)).await?;
            show(ctx, &v, |v| {
                v["accessSAS"].as_str().unwrap_or("").to_string()
            });
        }
        AccessCommand::RevokeAccess { at } => {
            send(ctx, Method::POST, kind, &at, "/endGetAccess", None).await?;
        }
    }
    Ok(())
}

fn snapshot_line(d: &Value) -> String {
    let p = &d["properties"];
    format!(
        "{}\t{} GiB\tincremental={}\t{}",
        d["name"].as_str().unwrap_or(""),
        p["diskSizeGB"],
        p["incremental"],
        p["encryption"]["type"].as_str().unwrap_or("")
    )
}

fn image_line(d: &Value) -> String {
    let os = &d["properties"]["storageProfile"]["osDisk"];
    format!(
        "{}\t{} GiB\t{}",
        d["name"].as_str().unwrap_or(""),
        os["diskSizeGB"],
        d["properties"]["provisioningState"].as_str().unwrap_or("")
    )
}

/// Runs `kagi snapshot …`.
pub async fn run_snapshot(ctx: &Context, args: SnapshotArgs) -> anyhow::Result<()> {
    const KIND: &str = "snapshots";
    match args.command {
        SnapshotCommand::Create {
            at,
            location,
            source,
            incremental,
        } => {
            let body = json!({"location": location, "properties": {
                "creationData": {"createOption": "Copy", "sourceResourceId": source},
                "incremental": incremental}});
            let v = send(ctx, Method::PUT, KIND, &at, "", Some(&body)).await?;
            show(ctx, &v, snapshot_line);
        }
        SnapshotCommand::Common(c) => common(ctx, KIND, c, snapshot_line).await?,
        SnapshotCommand::Access(c) => access(ctx, KIND, c).await?,
    }
    Ok(())
}

/// Runs `kagi image …`.
pub async fn run_image(ctx: &Context, args: ImageArgs) -> anyhow::Result<()> {
    const KIND: &str = "images";
    match args.command {
        ImageCommand::Create {
            at,
            location,
            source,
            disk_encryption_set,
        } => {
            let from = if source.to_ascii_lowercase().contains("/snapshots/") {
                "snapshot"
            } else {
                "managedDisk"
            };
            let mut os = json!({"osType": "Linux", "osState": "Generalized"});
            os[from] = json!({ "id": source });
            if let Some(set) = disk_encryption_set {
                os["diskEncryptionSet"] = json!({ "id": set });
            }
            let body = json!({"location": location,
                "properties": {"storageProfile": {"osDisk": os}}});
            let v = send(ctx, Method::PUT, KIND, &at, "", Some(&body)).await?;
            show(ctx, &v, image_line);
        }
        ImageCommand::Common(c) => common(ctx, KIND, c, image_line).await?,
    }
    Ok(())
}

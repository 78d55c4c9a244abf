//! `kagi subscription …` (kagi's subscription administration: create, list, show, move to
//! another tenant) and `kagi resource move` (ARM's `moveResources`, like `az resource move`).
//! The bootstrap administrator only. Commands act on the subscription of `AZURE_SUBSCRIPTION_ID`
//! (default: the bootstrap subscription) unless told otherwise.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Context;
use crate::client::Output;

/// api-version of `Microsoft.Resources` calls.
const RESOURCES_API: &str = "2021-04-01";

/// `kagi subscription`.
#[derive(Args, Debug)]
pub struct SubscriptionArgs {
    #[command(subcommand)]
    command: SubscriptionCommand,
}

#[derive(Subcommand, Debug)]
enum SubscriptionCommand {
    /// Create a subscription (in the administrator's tenant unless --tenant names another
    /// tenant kagi knows).
    Create {
        /// Subscription id (a GUID; a new one when omitted).
        #[arg(long)]
        id: Option<String>,
        /// Tenant to create it in.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List every subscription with its tenant.
    List,
    /// Show a subscription.
    Show {
        /// Subscription id.
        #[arg(long)]
        id: String,
    },
    /// Transfer a subscription to another tenant (directory), created if new. Role assignments
    /// in it are deleted; managed identities stay in the old tenant and key vaults keep their
    /// tenantId until each is configured again.
    ChangeDirectory {
        /// Subscription id.
        #[arg(long)]
        id: String,
        /// The new tenant id (a GUID).
        #[arg(long)]
        tenant: String,
    },
}

/// `kagi resource`.
#[derive(Args, Debug)]
pub struct ResourceArgs {
    #[command(subcommand)]
    command: ResourceCommand,
}

#[derive(Subcommand, Debug)]
enum ResourceCommand {
    /// Move resources (all of one resource group) to another resource group, possibly of
    /// another subscription of the same tenant; waits until done.
    Move {
        /// Resource ids to move.
        #[arg(long, num_args = 1.., required = true)]
        ids: Vec<String>,
        /// Target resource group.
        #[arg(long)]
        destination_group: String,
        /// Target subscription (default: the resources' own).
        #[arg(long)]
        destination_subscription: Option<String>,
        /// Only check that the move would succeed (validateMoveResources).
        #[arg(long)]
        validate_only: bool,
    },
}

fn show(ctx: &Context, v: &Value, line: impl Fn(&Value) -> String) {
    match ctx.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => println!("{}", line(v)),
    }
}

fn subscription_line(s: &Value) -> String {
    format!(
        "{}\ttenant {}",
        s["subscriptionId"].as_str().unwrap_or(""),
        s["tenantId"].as_str().unwrap_or("")
    )
}

fn new_guid() -> anyhow::Result<String> {
    Ok(kagi_core::ids::uuid_v4(
        kagi_crypto::random_array().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?,
    ))
}

/// Runs `kagi subscription …`.
pub async fn subscription(ctx: &Context, args: SubscriptionArgs) -> anyhow::Result<()> {
    let base = format!("{}/kagi/admin/subscriptions", ctx.base);
    match args.command {
        SubscriptionCommand::Create { id, tenant } => {
            let id = match id {
                Some(i) => i,
                None => new_guid()?,
            };
            let body = match tenant {
                Some(t) => json!({"tenantId": t}),
                None => json!({}),
            };
            let r = ctx
                .call(Method::PUT, &format!("{base}/{id}"), Some(&body))
                .await?;
            show(ctx, &r, subscription_line);
        }
        SubscriptionCommand::List => {
            let r = ctx.call(Method::GET, &base, None).await?;
            show(ctx, &r, |r| crate::commands::lines_of(r, subscription_line));
        }
        SubscriptionCommand::Show { id } => {
            let r = ctx.call(Method::GET, &format!("{base}/{id}"), None).await?;
            show(ctx, &r, subscription_line);
        }
        SubscriptionCommand::ChangeDirectory { id, tenant } => {
            let r = ctx
                .call(
                    Method::POST,
                    &format!("{base}/{id}/changeDirectory"),
                    Some(&json!({"tenantId": tenant})),
                )
                .await?;
            show(ctx, &r, |r| {
                let list = |k: &str| {
                    r[k].as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                format!(
                    "subscription {} moved from tenant {} to tenant {}{}\n\
                     role assignments removed: {}\n\
                     resources whose identities stay in tenant {} (turn the system-assigned \
                     identity off and on, or recreate user-assigned ones): {}\n\
                     key vaults still with tenantId {} (update it and their access policies): {}",
                    r["subscriptionId"].as_str().unwrap_or(""),
                    r["previousTenantId"].as_str().unwrap_or(""),
                    r["tenantId"].as_str().unwrap_or(""),
                    if r["tenantCreated"] == true {
                        " (a new tenant)"
                    } else {
                        ""
                    },
                    r["roleAssignmentsRemoved"],
                    r["previousTenantId"].as_str().unwrap_or(""),
                    list("resourcesWithIdentitiesInPreviousTenant"),
                    r["previousTenantId"].as_str().unwrap_or(""),
                    list("keyVaultsWithPreviousTenantId"),
                )
            });
        }
    }
    Ok(())
}

/// Runs `kagi resource …`.
pub async fn resource(ctx: &Context, args: ResourceArgs) -> anyhow::Result<()> {
    match args.command {
        ResourceCommand::Move {
            ids,
            destination_group,
            destination_subscription,
            validate_only,
        } => {
            let first: Vec<&str> = ids[0].trim_matches('/').split('/').collect();
            let (sub, rg) = match first.as_slice() {
                [s, sub, g, rg, ..]
                    if s.eq_ignore_ascii_case("subscriptions")
                        && g.eq_ignore_ascii_case("resourceGroups") =>
                {
                    (sub.to_string(), rg.to_string())
                }
                _ => bail!("'{}' is not a resource id", ids[0]),
            };
            let target_sub = destination_subscription.unwrap_or_else(|| sub.clone());
            move_resources(
                ctx,
                &sub,
                &rg,
                &ids,
                &target_sub,
                &destination_group,
                validate_only,
            )
            .await?;
            let out = json!({
                "status": "Succeeded",
                "operation": if validate_only { "validateMoveResources" } else { "moveResources" },
                "resources": ids,
                "targetResourceGroup": format!("/subscriptions/{target_sub}/resourceGroups/{destination_group}"),
            });
            show(ctx, &out, |o| {
                format!(
                    "{} {} resource(s) to {}",
                    if validate_only { "can move" } else { "moved" },
                    ids.len(),
                    o["targetResourceGroup"].as_str().unwrap_or("")
                )
            });
            Ok(())
        }
    }
}

/// POSTs `moveResources` (or `validateMoveResources`) and follows the long-running operation
/// to its end, as Azure's clients do: 202 with `Location`, polled until 204.
pub async fn move_resources(
    ctx: &Context,
    source_sub: &str,
    source_rg: &str,
    ids: &[String],
    target_sub: &str,
    target_rg: &str,
    validate_only: bool,
) -> anyhow::Result<()> {
    let action = if validate_only {
        "validateMoveResources"
    } else {
        "moveResources"
    };
    let url = format!(
        "{}/subscriptions/{source_sub}/resourceGroups/{source_rg}/{action}?api-version={RESOURCES_API}",
        ctx.base
    );
    let body = json!({
        "resources": ids,
        "targetResourceGroup": format!("/subscriptions/{target_sub}/resourceGroups/{target_rg}"),
    });
    let (http, token) = ctx.streaming()?;
    let r = http
        .post(&url)
        .bearer_auth(token)
        .json(&body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .with_context(|| format!("POST {url} failed"))?;
    let mut status = r.status();
    let mut location = header(&r, "location");
    let mut retry = retry_after(&r);
    let mut text = r.text().await.unwrap_or_default();
    // Poll the operation while it answers 202.
    for _ in 0..600 {
        if status.as_u16() != 202 {
            break;
        }
        let Some(loc) = location.clone() else {
            return Ok(()); // 202 without Location: accepted, nothing to follow.
        };
        tokio::time::sleep(retry).await;
        let r = http
            .get(&loc)
            .bearer_auth(token)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .with_context(|| format!("GET {loc} failed"))?;
        status = r.status();
        if let Some(l) = header(&r, "location") {
            location = Some(l);
        }
        retry = retry_after(&r);
        text = r.text().await.unwrap_or_default();
    }
    if status.is_success() {
        return Ok(());
    }
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    let code = v["error"]["code"].as_str().unwrap_or("");
    let details: Vec<String> = v["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let m = d["message"].as_str().unwrap_or("");
            format!(
                "{} ({}){}",
                d["target"].as_str().unwrap_or(""),
                d["code"].as_str().unwrap_or(""),
                // The top-level message already carries a single refusal's text.
                if msg_of(&v).contains(m) {
                    String::new()
                } else {
                    format!(": {m}")
                }
            )
        })
        .collect();
    let inner = v["error"]["innererror"]["code"]
        .as_str()
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    let msg = msg_of(&v);
    if details.is_empty() {
        bail!("{status} {code}{inner}: {msg}");
    }
    bail!("{status} {code}{inner}: {msg}\n  {}", details.join("\n  "));
}

fn msg_of(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("no detail")
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn retry_after(r: &reqwest::Response) -> Duration {
    let secs = header(r, "retry-after")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1)
        .clamp(1, 30);
    Duration::from_secs(secs)
}

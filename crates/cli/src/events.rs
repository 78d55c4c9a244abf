//! `kagi keyvault event …`: webhook subscriptions to a vault's events (Event Grid-shaped, on
//! the management API) and their dead letters.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Context;
use crate::client::Output;

const EVENTGRID_API: &str = "2022-06-15";

/// `kagi keyvault event`.
#[derive(Args, Debug)]
pub struct EventArgs {
    #[command(subcommand)]
    command: EventCommand,
}

#[derive(Subcommand, Debug)]
enum EventCommand {
    /// Webhook subscriptions of a vault.
    Subscription(SubscriptionArgs),
    /// Events whose delivery gave up (all subscriptions of the vault, or one with --name).
    Deadletters {
        /// Vault name.
        #[arg(long)]
        vault_name: String,
        /// Only this subscription.
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Args, Debug)]
struct SubscriptionArgs {
    #[command(subcommand)]
    command: SubscriptionCommand,
}

#[derive(Subcommand, Debug)]
enum SubscriptionCommand {
    /// Create or replace a webhook subscription.
    Create {
        /// Vault name.
        #[arg(long)]
        vault_name: String,
        /// Subscription name (3-64 letters, digits, hyphens).
        #[arg(long)]
        name: String,
        /// Webhook URL (http or https).
        #[arg(long)]
        endpoint: String,
        /// Event types to deliver, comma-separated (all when omitted).
        #[arg(long, value_delimiter = ',')]
        types: Option<Vec<String>>,
        /// Delivery attempts before an event is dead-lettered (1-30).
        #[arg(long)]
        max_attempts: Option<u32>,
    },
    /// List a vault's subscriptions.
    List {
        /// Vault name.
        #[arg(long)]
        vault_name: String,
    },
    /// Show one subscription.
    Show {
        /// Vault name.
        #[arg(long)]
        vault_name: String,
        /// Subscription name.
        #[arg(long)]
        name: String,
    },
    /// Delete a subscription (its pending deliveries and dead letters go with it).
    Delete {
        /// Vault name.
        #[arg(long)]
        vault_name: String,
        /// Subscription name.
        #[arg(long)]
        name: String,
    },
}

async fn subscriptions_url(ctx: &Context, vault: &str) -> anyhow::Result<String> {
    let v = ctx.find_vault(vault, None).await?;
    let id = v["id"].as_str().context("vault without id")?;
    Ok(format!(
        "{}{id}/providers/Microsoft.EventGrid/eventSubscriptions",
        ctx.base
    ))
}

fn with_api(url: &str) -> String {
    format!("{url}?api-version={EVENTGRID_API}")
}

fn sub_line(s: &Value) -> String {
    let p = &s["properties"];
    let types = p["filter"]["includedEventTypes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_else(|| "all".into());
    format!(
        "{}\t{}\ttypes={types}\tmaxAttempts={}",
        s["name"].as_str().unwrap_or(""),
        p["destination"]["properties"]["endpointBaseUrl"]
            .as_str()
            .unwrap_or(""),
        p["retryPolicy"]["maxDeliveryAttempts"]
    )
}

fn dead_line(d: &Value) -> String {
    format!(
        "{}\t{}\t{}\tattempts={}\t{}\t{}",
        d["deadLetteredAt"].as_str().unwrap_or(""),
        d["subscription"].as_str().unwrap_or(""),
        d["eventType"].as_str().unwrap_or(""),
        d["attempts"],
        d["event"]["data"]["Id"].as_str().unwrap_or(""),
        d["lastError"].as_str().unwrap_or("")
    )
}

fn print(output: Output, v: &Value, line: fn(&Value) -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => match v["value"].as_array() {
            Some(items) => items.iter().for_each(|i| println!("{}", line(i))),
            None => println!("{}", line(v)),
        },
    }
}

/// Runs a `kagi keyvault event` command.
pub async fn run(ctx: &Context, args: EventArgs) -> anyhow::Result<()> {
    match args.command {
        EventCommand::Subscription(s) => match s.command {
            SubscriptionCommand::Create {
                vault_name,
                name,
                endpoint,
                types,
                max_attempts,
            } => {
                let base = subscriptions_url(ctx, &vault_name).await?;
                let mut props = json!({
                    "destination": {"endpointType": "WebHook", "properties": {"endpointUrl": endpoint}},
                });
                if let Some(t) = types {
                    props["filter"] = json!({"includedEventTypes": t});
                }
                if let Some(m) = max_attempts {
                    props["retryPolicy"] = json!({"maxDeliveryAttempts": m});
                }
                let v = ctx
                    .call(
                        Method::PUT,
                        &with_api(&format!("{base}/{name}")),
                        Some(&json!({"properties": props})),
                    )
                    .await?;
                print(ctx.output, &v, sub_line);
            }
            SubscriptionCommand::List { vault_name } => {
                let base = subscriptions_url(ctx, &vault_name).await?;
                let v = ctx.call(Method::GET, &with_api(&base), None).await?;
                print(ctx.output, &v, sub_line);
            }
            SubscriptionCommand::Show { vault_name, name } => {
                let base = subscriptions_url(ctx, &vault_name).await?;
                let v = ctx
                    .call(Method::GET, &with_api(&format!("{base}/{name}")), None)
                    .await?;
                print(ctx.output, &v, sub_line);
            }
            SubscriptionCommand::Delete { vault_name, name } => {
                let base = subscriptions_url(ctx, &vault_name).await?;
                ctx.call(Method::DELETE, &with_api(&format!("{base}/{name}")), None)
                    .await?;
                print(ctx.output, &json!({"name": name, "deleted": true}), |v| {
                    format!("{} deleted", v["name"].as_str().unwrap_or(""))
                });
            }
        },
        EventCommand::Deadletters { vault_name, name } => {
            let base = subscriptions_url(ctx, &vault_name).await?;
            let names: Vec<String> = match name {
                Some(n) => vec![n],
                None => ctx.call(Method::GET, &with_api(&base), None).await?["value"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s["name"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            let mut all = Vec::new();
            for n in names {
                let v = ctx
                    .call(
                        Method::GET,
                        &with_api(&format!("{base}/{n}/deadLetters")),
                        None,
                    )
                    .await?;
                for mut d in v["value"].as_array().cloned().unwrap_or_default() {
                    d["subscription"] = json!(n);
                    all.push(d);
                }
            }
            print(ctx.output, &json!({"value": all}), dead_line);
        }
    }
    Ok(())
}

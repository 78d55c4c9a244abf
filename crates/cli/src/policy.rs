//! `kagi policy …`: policy assignments at a subscription or resource-group scope and the
//! compliance of the resources they govern.

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Context;
use crate::client::Output;

const API: &str = "api-version=2022-06-01";
const BACKUP_VAULTS_CMK: &str =
    "/providers/Microsoft.Authorization/policyDefinitions/kagi-backup-vaults-cmk";

/// `kagi policy`.
#[derive(Args, Debug)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Args, Debug)]
struct Scope {
    /// Resource group (the scope is the subscription without it).
    #[arg(long, short = 'g')]
    resource_group: Option<String>,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Assign a policy (default: backup vaults must use customer-managed keys).
    Assign {
        /// Assignment name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        scope: Scope,
        /// Audit (default), Deny or Disabled.
        #[arg(long, default_value = "Audit")]
        effect: String,
        /// Policy definition id.
        #[arg(long, default_value = BACKUP_VAULTS_CMK)]
        definition: String,
    },
    /// Assignments at, above or below the scope.
    List {
        #[command(flatten)]
        scope: Scope,
    },
    /// Delete an assignment.
    Delete {
        /// Assignment name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// Compliance of each governed resource under the scope.
    State {
        #[command(flatten)]
        scope: Scope,
    },
}

fn scope(ctx: &Context, s: &Scope) -> String {
    match &s.resource_group {
        Some(g) => format!("/subscriptions/{}/resourceGroups/{g}", ctx.subscription),
        None => format!("/subscriptions/{}", ctx.subscription),
    }
}

fn show(ctx: &Context, v: &Value, summary: impl Fn(&Value) -> String) {
    match ctx.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        _ => println!("{}", summary(v)),
    }
}

fn assignment_line(a: &Value) -> String {
    format!(
        "{}\t{}\t{}\t{}",
        a["name"].as_str().unwrap_or(""),
        a["properties"]["effect"].as_str().unwrap_or(""),
        a["properties"]["scope"].as_str().unwrap_or(""),
        a["properties"]["policyDefinitionId"].as_str().unwrap_or("")
    )
}

/// Runs `kagi policy …`.
pub async fn run(ctx: &Context, args: PolicyArgs) -> anyhow::Result<()> {
    let assignments = |s: &Scope| {
        format!(
            "{}{}/providers/Microsoft.Authorization/policyAssignments",
            ctx.base,
            scope(ctx, s)
        )
    };
    match args.command {
        PolicyCommand::Assign {
            name,
            scope,
            effect,
            definition,
        } => {
            let body = json!({"properties": {"policyDefinitionId": definition,
                "parameters": {"effect": {"value": effect}}}});
            let r = ctx
                .call(
                    Method::PUT,
                    &format!("{}/{name}?{API}", assignments(&scope)),
                    Some(&body),
                )
                .await?;
            show(ctx, &r, assignment_line);
        }
        PolicyCommand::List { scope } => {
            let r = ctx
                .call(Method::GET, &format!("{}?{API}", assignments(&scope)), None)
                .await?;
            show(ctx, &r, |r| crate::commands::lines_of(r, assignment_line));
        }
        PolicyCommand::Delete { name, scope } => {
            ctx.call(
                Method::DELETE,
                &format!("{}/{name}?{API}", assignments(&scope)),
                None,
            )
            .await?;
        }
        PolicyCommand::State { scope: s } => {
            let r = ctx
                .call(
                    Method::POST,
                    &format!(
                        "{}{}/providers/Microsoft.PolicyInsights/policyStates/latest/queryResults?{API}",
                        ctx.base,
                        scope(ctx, &s)
                    ),
                    None,
                )
                .await?;
            show(ctx, &r, |r| {
                crate::commands::value_lines(
                    r,
                    &[
                        "complianceState",
                        "effect",
                        "resourceId",
                        "policyAssignmentId",
                    ],
                )
            });
        }
    }
    Ok(())
}

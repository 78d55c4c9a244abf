//! `kagi keyvault secret …`: secrets of a vault, on the data plane's REST shapes
//! (`/secrets/{name}[/{version}]`, `/deletedsecrets/{name}`), printed as az prints them.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::client::{Context, Output, collect_pages};

const KV_API: &str = "7.6";

/// `kagi keyvault secret`.
#[derive(Args, Debug)]
pub struct SecretArgs {
    /// Vault name.
    #[arg(long, global = true)]
    vault_name: Option<String>,
    #[command(subcommand)]
    command: SecretCommand,
}

#[derive(Subcommand, Debug)]
enum SecretCommand {
    /// Set a secret (a new version of it when it exists).
    Set(SetArgs),
    /// Show a secret with its value (newest version unless --version), as `az keyvault secret
    /// show` does.
    Show {
        /// Secret name.
        #[arg(long)]
        name: String,
        /// Version.
        #[arg(long)]
        version: Option<String>,
    },
    /// List secrets (without values).
    List,
    /// List a secret's versions (without values).
    Versions(SecretName),
    /// Soft-delete a secret (every version); recoverable for the vault's retention period.
    Delete(SecretName),
    /// List soft-deleted secrets.
    ListDeleted,
    /// Recover a soft-deleted secret.
    Recover(SecretName),
    /// Purge a soft-deleted secret for good (refused under purge protection).
    Purge(SecretName),
}

/// The secret a command acts on.
#[derive(Args, Debug)]
struct SecretName {
    /// Secret name.
    #[arg(long)]
    name: String,
}

/// `kagi keyvault secret set`.
#[derive(Args, Debug)]
struct SetArgs {
    /// Secret name.
    #[arg(long)]
    name: String,
    /// The value. A value on the command line is visible to other users of the machine (ps,
    /// /proc) and lands in shell history: use --file for secrets that matter.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    value: Option<String>,
    /// Read the value from this file (exactly its bytes, as UTF-8; `-` reads standard input),
    /// so that it never appears on a command line.
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// Content type (e.g. text/plain).
    #[arg(long)]
    content_type: Option<String>,
    /// Expiry: RFC 3339 (2030-01-01T00:00:00Z) or Unix seconds.
    #[arg(long, value_parser = parse_time)]
    expires: Option<i64>,
    /// Activation: RFC 3339 or Unix seconds.
    #[arg(long, value_parser = parse_time)]
    not_before: Option<i64>,
    /// Create the version disabled.
    #[arg(long)]
    disabled: bool,
    /// Tags, `key=value` (repeatable, or several after one --tags).
    #[arg(long, num_args = 1.., value_parser = parse_tag)]
    tags: Vec<(String, String)>,
}

/// A time given as RFC 3339 or as Unix seconds.
fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    kagi_core::time::parse_rfc3339(s).ok_or_else(|| {
        format!("`{s}` is neither an RFC 3339 time (2030-01-01T00:00:00Z) nor Unix seconds")
    })
}

/// A `key=value` tag (the value may be empty and may hold `=`).
fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("tag `{s}` is not key=value")),
    }
}

/// The request body of a secret PUT; the value is kept in a buffer wiped on drop.
fn set_body(a: &SetArgs, value: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut attributes = serde_json::Map::new();
    attributes.insert("enabled".into(), json!(!a.disabled));
    if let Some(e) = a.expires {
        attributes.insert("exp".into(), json!(e));
    }
    if let Some(n) = a.not_before {
        attributes.insert("nbf".into(), json!(n));
    }
    let mut body = serde_json::Map::new();
    body.insert("attributes".into(), Value::Object(attributes));
    if let Some(ct) = &a.content_type {
        body.insert("contentType".into(), json!(ct));
    }
    if !a.tags.is_empty() {
        let tags: serde_json::Map<String, Value> =
            a.tags.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        body.insert("tags".into(), Value::Object(tags));
    }
    // The value is written into the buffer last, by hand: a serde_json::Value holding it would
    // leave a copy behind that nothing wipes.
    let mut out = Zeroizing::new(serde_json::to_vec(&Value::Object(body))?);
    out.pop(); // the closing brace
    out.extend_from_slice(b",\"value\":");
    serde_json::to_writer(&mut *out, value)?;
    out.push(b'}');
    Ok(out)
}

/// The value `set` stores: `--value` or the file's contents.
fn read_value(a: &SetArgs) -> anyhow::Result<Zeroizing<String>> {
    match (&a.value, &a.file) {
        (Some(v), _) => Ok(Zeroizing::new(v.clone())),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut s = Zeroizing::new(String::new());
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("cannot read the value from standard input")?;
            Ok(s)
        }
        (None, Some(f)) => {
            let bytes = Zeroizing::new(
                std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?,
            );
            let s = std::str::from_utf8(&bytes)
                .with_context(|| format!("{} is not UTF-8 text", f.display()))?;
            Ok(Zeroizing::new(s.to_string()))
        }
        (None, None) => anyhow::bail!("give --value or --file"),
    }
}

/// One table line: id, enabled, content type (and the value when the answer holds one, as
/// az's table output of `secret show` does).
fn secret_line(v: &Value) -> String {
    let id = v["id"]
        .as_str()
        .or(v["kid"].as_str())
        .or(v["recoveryId"].as_str())
        .unwrap_or("");
    let mut line = format!(
        "{id}\tenabled={}\t{}",
        v["attributes"]["enabled"],
        v["contentType"].as_str().unwrap_or("")
    );
    if let Some(d) = v["scheduledPurgeDate"].as_i64() {
        line.push_str(&format!("\tpurge {}", kagi_core::time::rfc3339(d)));
    }
    if let Some(value) = v["value"].as_str() {
        line.push('\t');
        line.push_str(value);
    }
    line
}

fn print(ctx: &Context, v: &Value) {
    match ctx.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => match v["value"].as_array() {
            // A list answer; a shown secret's `value` is a string.
            Some(items) => items.iter().for_each(|i| println!("{}", secret_line(i))),
            None if v.get("purged").is_some() => {
                println!("{} purged", v["name"].as_str().unwrap_or_default())
            }
            None => println!("{}", secret_line(v)),
        },
    }
}

/// Runs a `kagi keyvault secret` command.
pub async fn run(ctx: &Context, args: SecretArgs) -> anyhow::Result<()> {
    let vault = args.vault_name.context("--vault-name is required")?;
    let vault_ctx = ctx.clone_for_vault(&vault)?;
    let ctx = &vault_ctx;
    let url = |path: &str| format!("{}{path}?api-version={KV_API}", ctx.vault_url(&vault));
    let v = match args.command {
        SecretCommand::Set(a) => {
            let value = read_value(&a)?;
            let body = set_body(&a, &value)?;
            ctx.call_secret(Method::PUT, &url(&format!("secrets/{}", a.name)), body)
                .await?
        }
        SecretCommand::Show { name, version } => {
            ctx.call(
                Method::GET,
                &url(&format!("secrets/{name}/{}", version.unwrap_or_default())),
                None,
            )
            .await?
        }
        SecretCommand::List => collect_pages(ctx, &url("secrets")).await?,
        SecretCommand::Versions(SecretName { name }) => {
            collect_pages(ctx, &url(&format!("secrets/{name}/versions"))).await?
        }
        SecretCommand::Delete(SecretName { name }) => {
            ctx.call(Method::DELETE, &url(&format!("secrets/{name}")), None)
                .await?
        }
        SecretCommand::ListDeleted => collect_pages(ctx, &url("deletedsecrets")).await?,
        SecretCommand::Recover(SecretName { name }) => {
            ctx.call(
                Method::POST,
                &url(&format!("deletedsecrets/{name}/recover")),
                None,
            )
            .await?
        }
        SecretCommand::Purge(SecretName { name }) => {
            ctx.call(
                Method::DELETE,
                &url(&format!("deletedsecrets/{name}")),
                None,
            )
            .await?;
            json!({"name": name, "purged": true})
        }
    };
    print(ctx, &v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        a: SetArgs,
    }

    fn set(args: &[&str]) -> Result<SetArgs, clap::Error> {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|t| t.a)
    }

    #[test]
    fn times_are_rfc3339_or_unix_seconds() {
        assert_eq!(parse_time("1700000000"), Ok(1_700_000_000));
        assert_eq!(parse_time("1970-01-02T00:00:00Z"), Ok(86_400));
        assert!(parse_time("tomorrow").is_err());
    }

    #[test]
    fn tags_are_key_value() {
        assert_eq!(parse_tag("env=prod"), Ok(("env".into(), "prod".into())));
        assert_eq!(parse_tag("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_tag("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_tag("novalue").is_err());
        assert!(parse_tag("=x").is_err());
    }

    #[test]
    fn set_needs_exactly_one_of_value_and_file() {
        assert!(set(&["--name", "s"]).is_err());
        assert!(set(&["--name", "s", "--value", "v", "--file", "f"]).is_err());
        assert!(set(&["--name", "s", "--value", "v"]).is_ok());
        assert!(set(&["--name", "s", "--file", "f"]).is_ok());
    }

    #[test]
    fn set_body_has_every_field_and_escapes_the_value() {
        let a = set(&[
            "--name",
            "s",
            "--value",
            "x",
            "--content-type",
            "text/plain",
            "--expires",
            "2030-01-01T00:00:00Z",
            "--not-before",
            "5",
            "--disabled",
            "--tags",
            "a=1",
            "b=2",
        ])
        .unwrap();
        let body: Value = serde_json::from_slice(&set_body(&a, "q\"uo\nte").unwrap()).unwrap();
        assert_eq!(
            body,
            json!({
                "value": "q\"uo\nte",
                "contentType": "text/plain",
                "tags": {"a": "1", "b": "2"},
                "attributes": {"enabled": false, "exp": 1_893_456_000, "nbf": 5},
            })
        );
    }

    #[test]
    fn value_from_a_file_is_its_exact_text() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("v");
        std::fs::write(&f, "line1\nline2\n").unwrap();
        let a = set(&["--name", "s", "--file", f.to_str().unwrap()]).unwrap();
        assert_eq!(read_value(&a).unwrap().as_str(), "line1\nline2\n");
        let missing = set(&["--name", "s", "--file", "/nonexistent/x"]).unwrap();
        assert!(read_value(&missing).is_err());
    }
}

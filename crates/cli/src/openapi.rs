//! `kagi openapi`: the OpenAPI description of every route a `kagi server` serves — the
//! platform's and its storage services' — as its `GET /openapi.json` answers it, without a
//! server (docs/OPENAPI.md).

use clap::Args;

/// `kagi openapi [--dns-suffix S] [--port P]`.
#[derive(Args, Debug)]
pub struct OpenapiArgs {
    /// The DNS suffix of the server described (`https://{suffix}:{port}`, vaults at
    /// `https://{vault}.{suffix}:{port}`).
    #[arg(long, default_value = "localhost")]
    dns_suffix: String,
    /// The port of the server described.
    #[arg(long, default_value_t = 8443)]
    port: u16,
}

/// Prints the description (JSON, indented).
pub fn run(args: OpenapiArgs) -> anyhow::Result<()> {
    // The storage services `kagi server` runs, in the order it registers them.
    let services = [
        kagi_backup_service::routes::ROUTES,
        kagi_disk_service::routes::ROUTES,
        kagi_sql_service::routes::ROUTES,
    ];
    let doc = kagi_http::openapi_document(&services, &args.dns_suffix, args.port);
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

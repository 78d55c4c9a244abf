//! `kagi`: the server (`kagi server`) and the command-line client for it.

#![forbid(unsafe_code)]

mod agent;
mod audit;
mod backup;
mod bench;
mod client;
mod commands;
mod disk;
mod events;
mod hsm;
mod identity;
mod key_import;
mod observability;
mod openapi;
mod policy;
mod read_only;
mod sql;
mod subscription;
mod vault_backup;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// kagi: a self-hosted customer-managed-key platform with an Azure Key Vault-compatible API.
#[derive(Parser, Debug)]
#[command(name = "kagi", version, about)]
struct Cli {
    /// Data directory of the server (its CA and bootstrap credentials are read from here).
    #[arg(
        long,
        global = true,
        env = "KAGI_DATA_DIR",
        default_value = "./kagi-data"
    )]
    data_dir: PathBuf,
    /// Server URL for client commands.
    #[arg(
        long,
        global = true,
        env = "KAGI_SERVER",
        default_value = "https://localhost:8443"
    )]
    server: String,
    /// Output format of client commands.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: client::Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the kagi server.
    Server {
        /// Address to listen on; `localhost:PORT` listens on both 127.0.0.1 and ::1.
        #[arg(long, env = "KAGI_LISTEN", default_value = "localhost:8443")]
        listen: String,
        /// DNS suffix of vault hosts (`{vault}.{suffix}`).
        #[arg(long, env = "KAGI_DNS_SUFFIX", default_value = "localhost")]
        dns_suffix: String,
        /// Also serve disk accesses over TCP with TLS at HOST:PORT (NBD's port is 10809);
        /// access URIs are then `nbds://{dns suffix}:{port}/…`. Without it, disks are served on
        /// `<data>/nbd.sock` only.
        #[arg(long, env = "KAGI_NBD_LISTEN")]
        nbd_listen: Option<String>,
        /// Serve SQL databases over the PostgreSQL protocol (TLS; the server chosen by SNI
        /// `{server}.{dns suffix}`) at HOST:PORT; `none` to not serve them. Default
        /// `localhost:1433` (Azure SQL's port), skipped with a warning when that is taken.
        #[arg(long, env = "KAGI_SQL_LISTEN")]
        sql_listen: Option<String>,
        /// FOR TESTS ONLY: run on a clock that starts at the system time and that the bootstrap
        /// administrator can move forward with `POST /kagi/test/clock {"advanceSeconds": N}`.
        #[arg(
            long,
            env = "KAGI_TEST_CLOCK",
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        test_clock: bool,
        /// Serve reads, lists and cryptographic operations only: writes answer 503, background
        /// writers are paused, disks and SQL databases are not served (docs/READ_ONLY.md).
        #[arg(
            long,
            env = "KAGI_READ_ONLY",
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        read_only: bool,
        /// Where the store lives: `sqlite` (default: `<data-dir>/kagi.db`) or a PostgreSQL URL
        /// `postgres://user:password@host:port/database`, which several nodes may share
        /// (docs/SEVERAL_NODES.md). The data directory still holds the root key.
        #[arg(long, env = "KAGI_STORE", hide_env_values = true)]
        store: Option<String>,
        /// On a shared store: `bounded` (default) serves a change other nodes made once its
        /// notification arrives (milliseconds; at worst the re-check interval); `strict`
        /// checks the store's change numbers before every request, so every change is served
        /// by every node's next request, at one store query per request.
        #[arg(long, env = "KAGI_CONSISTENCY", value_enum, default_value = "bounded")]
        consistency: Consistency,
        /// Where backup repositories and backup agents' objects live: `local` (default: below
        /// the data directory) or `s3://bucket/prefix` on any S3-compatible server, which
        /// several nodes share (credentials, region and endpoint from the usual AWS_*
        /// variables; docs/SEVERAL_NODES.md).
        #[arg(long, env = "KAGI_BLOBS")]
        blobs: Option<String>,
        /// Serve Prometheus metrics at `http://HOST:PORT/metrics`: plain HTTP without
        /// authentication, so bind it to loopback or a monitoring network (docs/METRICS.md).
        /// Off when not given.
        #[arg(long, env = "KAGI_METRICS_LISTEN")]
        metrics_listen: Option<String>,
        /// On a shared store: HOST:PORT where the other nodes reach this node's HTTPS
        /// listener, to forward to it the requests for the disks and SQL servers whose files
        /// are in its data directory (docs/SEVERAL_NODES.md, "Homes"). Default: the
        /// `--listen` address (its host name when that is a wildcard address).
        #[arg(long, env = "KAGI_ADVERTISE")]
        advertise: Option<String>,
        /// Log format on stderr: `text`, or `json` (one object per line; a request's lines
        /// carry its audit record's request id).
        #[arg(long, env = "KAGI_LOG_FORMAT", value_enum, default_value = "text")]
        log_format: observability::LogFormat,
        #[command(flatten)]
        pkcs11: hsm::Pkcs11Args,
    },
    /// Manage key vaults and their keys.
    Keyvault(commands::KeyvaultArgs),
    /// Principals, managed identities and workload bindings.
    Identity(identity::IdentityArgs),
    /// Role definitions and assignments (vaults with RBAC).
    Role(identity::RoleArgs),
    /// Management locks.
    Lock(identity::LockArgs),
    /// Measure wrapKey/unwrapKey throughput of a running server over HTTPS.
    Bench(bench::BenchArgs),
    /// Verify, query and export the audit log (reads `<data-dir>/audit/audit.jsonl` directly).
    Audit(audit::AuditArgs),
    /// Backup vaults: encryption (PMK/CMK), protected folders, backups, restores, jobs.
    Backup(backup::BackupArgs),
    /// Policy assignments (e.g. backup vaults must use customer-managed keys) and compliance.
    Policy(policy::PolicyArgs),
    /// Subscriptions: create, list, transfer to another tenant (the administrator only).
    Subscription(subscription::SubscriptionArgs),
    /// Resources: move to another resource group or subscription.
    Resource(subscription::ResourceArgs),
    /// The backup agent of a machine: register with a backup vault, back up, restore.
    Agent(agent::AgentArgs),
    /// Disk encryption sets: a customer's key for disks, its rotation.
    DiskEncryptionSet(disk::SetArgs),
    /// Managed disks: create, grow, open for block clients over NBD (grant-access).
    Disk(disk::DiskArgs),
    /// Snapshots of disks (incremental or full), readable over NBD.
    Snapshot(disk::SnapshotArgs),
    /// Images of disks or snapshots, to make disks from.
    Image(disk::ImageArgs),
    /// SQL servers and databases with transparent data encryption (TDE protectors).
    Sql(sql::SqlArgs),
    /// Print the OpenAPI description of every route the server serves (GET /openapi.json).
    Openapi(openapi::OpenapiArgs),
}

/// `kagi … | head` must end quietly when the reader goes away, as other tools do. Rust ignores
/// SIGPIPE, so `println!` panics on the broken pipe instead: that panic exits with the status a
/// shell reports for SIGPIPE (141), printing nothing. Every other panic keeps the default hook.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.contains("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> std::process::ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Server {
                listen,
                dns_suffix,
                nbd_listen,
                sql_listen,
                test_clock,
                read_only,
                store,
                consistency,
                blobs,
                metrics_listen,
                advertise,
                log_format,
                pkcs11,
            } => {
                let listeners = Listeners {
                    nbd: nbd_listen,
                    metrics: metrics_listen,
                    advertise,
                    log_format,
                    sql: sql_listen,
                    read_only,
                    store: kagi_store::StoreLocation::parse(store.as_deref(), &cli.data_dir)
                        .map_err(anyhow::Error::msg)?,
                    strict: matches!(consistency, Consistency::Strict),
                    blobs: kagi_blobs::BlobLocation::parse(blobs.as_deref().unwrap_or(""))?,
                };
                let hsm = pkcs11.open()?;
                run_server(cli.data_dir, listen, dns_suffix, listeners, test_clock, hsm).await
            }
            Command::Keyvault(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                commands::keyvault(&ctx, args).await
            }
            Command::Identity(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                identity::identity(&ctx, args).await
            }
            Command::Role(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                identity::role(&ctx, args).await
            }
            Command::Lock(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                identity::lock(&ctx, args).await
            }
            Command::Bench(args) => bench::run(&cli.server, &cli.data_dir, cli.output, args).await,
            Command::Audit(args) => audit::run(&cli.data_dir, cli.output, args),
            Command::Backup(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                backup::run(&ctx, args).await
            }
            Command::Agent(args) => agent::run(cli.output, args).await,
            Command::Openapi(args) => openapi::run(args),
            Command::DiskEncryptionSet(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                disk::run_set(&ctx, args).await
            }
            Command::Disk(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                disk::run_disk(&ctx, args).await
            }
            Command::Snapshot(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                disk::run_snapshot(&ctx, args).await
            }
            Command::Image(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                disk::run_image(&ctx, args).await
            }
            Command::Sql(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                sql::run(&ctx, args).await
            }
            Command::Policy(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                policy::run(&ctx, args).await
            }
            Command::Subscription(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                subscription::subscription(&ctx, args).await
            }
            Command::Resource(args) => {
                let ctx = client::Context::new(&cli.server, &cli.data_dir, cli.output).await?;
                subscription::resource(&ctx, args).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Whether an advertised host (a name or an address, IPv6 in brackets) is this machine's
/// alone.
fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `--advertise` by default: `--listen` as given, unless its host is a wildcard address,
/// which other nodes cannot connect to (then this machine's host name).
fn default_advertise(listen: &str, addrs: &[std::net::SocketAddr]) -> String {
    match addrs.first() {
        Some(a) if a.ip().is_unspecified() => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into());
            format!("{host}:{}", a.port())
        }
        _ => listen.to_string(),
    }
}

/// Resolves `--listen`: `localhost:PORT` means both loopbacks (with libnss-myhostname,
/// `*.localhost` resolves to ::1 first, so IPv4 alone would cost every client a failed try).
fn listen_addrs(listen: &str) -> anyhow::Result<(Vec<std::net::SocketAddr>, u16)> {
    use std::net::ToSocketAddrs;
    let (host, port) = listen
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("--listen must be HOST:PORT, got {listen}"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid port in --listen {listen}"))?;
    if host == "localhost" {
        return Ok((
            vec![
                ([127, 0, 0, 1], port).into(),
                (std::net::Ipv6Addr::LOCALHOST, port).into(),
            ],
            port,
        ));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = (host, port).to_socket_addrs()?.collect();
    anyhow::ensure!(
        !addrs.is_empty(),
        "--listen {listen} resolves to no address"
    );
    Ok((addrs, port))
}

/// Creates the data directory owner-only (0700), or makes an existing one so: it holds the
/// root key, the store and the audit log, and an operator's `mkdir` leaves it 0755.
fn private_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making the data directory {} owner-only", dir.display()))
}

/// The server's listeners besides HTTPS.
struct Listeners {
    /// `--nbd-listen`.
    nbd: Option<String>,
    /// `--sql-listen`.
    sql: Option<String>,
    /// `--read-only`: writes are refused and nothing of the node's own writes.
    read_only: bool,
    /// `--metrics-listen`: where Prometheus metrics are served, if anywhere.
    metrics: Option<String>,
    /// `--advertise`.
    advertise: Option<String>,
    /// `--log-format`.
    log_format: observability::LogFormat,
    /// `--store`: where the store lives.
    store: kagi_store::StoreLocation,
    /// `--consistency strict`.
    strict: bool,
    /// `--blobs`: where the storage services keep their objects.
    blobs: kagi_blobs::BlobLocation,
}

/// `kagi server --consistency`: how soon a node serves what other nodes of its store changed.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Consistency {
    /// Within a notification (or the re-check interval).
    Bounded,
    /// At the next request (one store query per request).
    Strict,
}

/// Runs `sweep` at once and then every `secs` seconds, until dropped; failures are logged.
async fn every<F, Fut, E>(secs: u64, what: &'static str, mut sweep: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(secs));
    loop {
        tick.tick().await;
        if let Err(e) = sweep().await {
            tracing::error!(error = %e, "{what} failed");
        }
    }
}

/// The PostgreSQL listeners of `--sql-listen` (`None`: the default, skipped with a warning
/// when its port is taken; `none`: no listener).
async fn sql_listeners(at: Option<&str>) -> anyhow::Result<Vec<tokio::net::TcpListener>> {
    let (at, explicit) = match at {
        Some(a) if a.eq_ignore_ascii_case("none") => return Ok(Vec::new()),
        Some(a) => (a, true),
        None => ("localhost:1433", false),
    };
    let (addrs, _) = listen_addrs(at)?;
    let mut out = Vec::new();
    for addr in addrs {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => out.push(l),
            Err(e) if !explicit => {
                tracing::warn!(%addr, error = %e, "SQL databases not served on the default address");
                println!(
                    "  SQL (PostgreSQL protocol) not served on {addr}: {e} (use --sql-listen)"
                );
            }
            Err(e) => return Err(anyhow::anyhow!("--sql-listen {at}: {e}")),
        }
    }
    Ok(out)
}

async fn run_server(
    data_dir: PathBuf,
    listen: String,
    dns_suffix: String,
    listeners: Listeners,
    test_clock: bool,
    hsm: Option<std::sync::Arc<dyn kagi_crypto::KeyProvider>>,
) -> anyhow::Result<()> {
    let nbd_listen = listeners.nbd;
    let read_only = listeners.read_only;
    observability::init_logging(listeners.log_format);
    let (addrs, port) = listen_addrs(&listen)?;
    private_data_dir(&data_dir)?;
    if read_only {
        read_only::check_initialised(&data_dir, &listeners.store)?;
    }
    let config = kagi_vault::PlatformConfig {
        data_dir: data_dir.clone(),
        dns_suffix: dns_suffix.to_ascii_lowercase(),
        port,
    };
    let (platform, created_admin, sql_store) = if test_clock {
        let clock = std::sync::Arc::new(kagi_core::time::TestClock::new());
        let (p, admin, sql_store) = read_only::open_platform(
            config,
            clock.clone(),
            hsm.clone(),
            read_only,
            &listeners.store,
        )
        .await?;
        tracing::warn!("test clock enabled: POST /kagi/test/clock moves time forward");
        (p.with_test_clock(clock), admin, sql_store)
    } else {
        let clock = std::sync::Arc::new(kagi_core::time::SystemClock);
        read_only::open_platform(config, clock, hsm.clone(), read_only, &listeners.store).await?
    };
    let platform = std::sync::Arc::new(platform);
    if let kagi_store::StoreLocation::Postgres(_) = &listeners.store {
        // Other nodes (or, on a standby, the primary) change the shared store: follow them.
        let recheck = std::env::var("KAGI_CHANGE_RECHECK_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(kagi_vault::CHANGE_RECHECK, std::time::Duration::from_millis);
        tokio::spawn(platform.clone().follow_changes(recheck));
        platform.set_strict_reads(listeners.strict);
    }
    // Checked before anything is served: a bucket that does not answer, or that does not
    // refuse a second create of one object, fails the start rather than the first backup.
    // (The probe writes an object: a read-only node does not.)
    let blobs = kagi_blobs::BlobRoot::open(&listeners.blobs, &data_dir)?;
    if !listeners.read_only {
        blobs
            .probe()
            .await
            .map_err(|e| anyhow::anyhow!("--blobs {}: {e}", listeners.blobs))?;
    }
    platform.set_blobs(blobs);
    let ca = kagi_http::tls::LocalCa::load_or_create(&platform, &data_dir)?;
    let ca_path = std::fs::canonicalize(&ca.cert_path).unwrap_or(ca.cert_path.clone());
    let resolver = kagi_http::tls::SniResolver::new(ca, &dns_suffix);

    println!(
        "kagi {} — data directory {}",
        env!("CARGO_PKG_VERSION"),
        data_dir.display()
    );
    if let Some(hsm) = &hsm {
        println!(
            "  HSM: {} (root key sealed by it; RSA-HSM and EC-HSM keys inside it)",
            hsm.describe()
        );
    }
    if !listeners.blobs.is_local() {
        println!("  blobs: {}", listeners.blobs);
    }
    println!("  local CA certificate: {}", ca_path.display());
    println!("    export REQUESTS_CA_BUNDLE={}", ca_path.display());
    println!(
        "  management and token endpoint: {}",
        platform.config().authority()
    );
    println!(
        "  vaults: https://{{vault}}.{}:{port}/",
        platform.config().dns_suffix
    );
    println!(
        "  tenant {}  subscription {}",
        platform.default_tenant(),
        platform.default_subscription()
    );
    if let Some(admin) = created_admin {
        println!(
            "  bootstrap administrator created (shown once; kept 0600 in {}):",
            data_dir.join("bootstrap-admin.json").display()
        );
        println!("    AZURE_TENANT_ID={}", admin.tenant_id);
        println!("    AZURE_CLIENT_ID={}", admin.client_id);
        println!("    AZURE_CLIENT_SECRET={}", admin.client_secret);
    } else {
        println!(
            "  bootstrap administrator: {}",
            data_dir.join("bootstrap-admin.json").display()
        );
    }
    // Every request is audited; without a writable audit log kagi does not start.
    let audit_log = std::sync::Arc::new(kagi_audit::AuditLog::open(&data_dir)?);
    println!("  audit log: {}", audit_log.path().display());
    for a in &addrs {
        println!("  listening on {a}");
    }

    // Bound before anything starts that calls kagi's own HTTPS endpoint (the storage services'
    // keepers unwrap their keys through the key vault at start): their connections wait in
    // the listen queue until serving begins instead of being refused.
    let https = kagi_http::bind(&addrs).await?;
    // Key rotation by policy, and near-expiry/expired events: at start (catching up on what
    // fell due while kagi was down) and every 30 s. Event deliveries resume at start too.
    // Singleton work runs on one node at a time, under its lease (on SQLite: always this one).
    let lease = std::env::var("KAGI_LEASE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(kagi_vault::DEFAULT_LEASE, std::time::Duration::from_millis);
    if read_only {
        read_only::announce();
    } else {
        let scheduler = platform.clone();
        tokio::spawn(platform.clone().run_singleton("rotation", lease, move || {
            let p = scheduler.clone();
            every(30, "rotation scheduler sweep", move || {
                let p = p.clone();
                async move { p.run_scheduler().await.map(drop) }
            })
        }));
        let delivering = platform.clone();
        tokio::spawn(
            platform
                .clone()
                .run_singleton("event-delivery", lease, move || {
                    kagi_vault::run_event_delivery(
                        delivering.clone(),
                        kagi_vault::DeliveryConfig::from_env(),
                    )
                }),
        );
        // Soft-deleted vaults and keys are purged when their retention ends.
        let sweeper = platform.clone();
        tokio::spawn(platform.clone().run_singleton("purge", lease, move || {
            let p = sweeper.clone();
            every(60, "purge of expired objects", move || {
                let p = p.clone();
                async move { p.purge_expired().await.map(drop) }
            })
        }));
    }

    // The backup service, on this platform (it finishes interrupted vault moves first).
    // Scheduled backups of its items, then their retention: at start and every minute, on
    // the platform clock (so `--test-clock` moves it).
    let backup = kagi_backup_service::BackupService::new(
        platform.clone(),
        kagi_backup_service::ServiceConfig::default(),
    );
    if !read_only {
        // One node runs the schedules of every vault (their repositories are shared with
        // --blobs s3://…); two would each start the same scheduled backup.
        let scheduled = backup.clone();
        tokio::spawn(
            platform
                .clone()
                .run_singleton("backup-schedule", lease, move || {
                    let b = scheduled.clone();
                    every(60, "scheduled backups", move || {
                        let b = b.clone();
                        async move {
                            let n = b.run_schedules().await;
                            if n > 0 {
                                tracing::info!(backups = n, "scheduled backups run");
                            }
                            Ok::<(), std::convert::Infallible>(())
                        }
                    })
                }),
        );
    }

    // Managed disks: disk encryption sets and disks, served over NBD on `<data>/nbd.sock`;
    // their keys (rotation, revocation) checked every minute on the platform clock.
    let disks = kagi_disk_service::DiskService::new(
        platform.clone(),
        kagi_disk_service::DiskConfig::default(),
    )
    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let nbd = if read_only {
        None
    } else {
        // Before anything is served: families deleted through another node while this one
        // was not running (docs/SEVERAL_NODES.md, "Homes") are never opened again.
        disks.remove_orphan_families().await;
        Some(disks.start_nbd().await?)
    };
    let mut nbd_port = None;
    if let (Some(at), Some(nbd)) = (&nbd_listen, &nbd) {
        let (addrs, _) = listen_addrs(at)?;
        let ca = kagi_http::tls::LocalCa::load_or_create(&platform, &data_dir)?;
        let resolver = kagi_http::tls::SniResolver::new(ca, &dns_suffix);
        let tls = std::sync::Arc::new(kagi_http::tls::server_config(resolver, Vec::new())?);
        for addr in addrs {
            let bound = disks
                .listen_tcp(nbd, addr, &dns_suffix, tls.clone())
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            println!(
                "  disks over NBD with TLS: nbds://{dns_suffix}:{}/",
                bound.port()
            );
            nbd_port = Some(bound.port());
        }
    }
    if !read_only {
        kagi_disk_service::spawn_keeper(disks.clone());
    }

    // SQL servers and databases with TDE, served over the PostgreSQL protocol with TLS; their
    // protectors probed by the keeper on the platform clock.
    let sql =
        kagi_sql_service::SqlService::new(platform.clone(), kagi_sql_service::SqlConfig::default())
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let sql_shutdown = kagi_pgsql::CancellationToken::new();
    let pg = if read_only {
        Vec::new()
    } else {
        sql_listeners(listeners.sql.as_deref()).await?
    };
    let sql_port = match pg.first() {
        Some(l) => Some(l.local_addr()?.port()),
        None => None,
    };
    if !pg.is_empty() {
        let ca = kagi_http::tls::LocalCa::load_or_create(&platform, &data_dir)?;
        let resolver = kagi_http::tls::SniResolver::new(ca, &dns_suffix);
        let tls = std::sync::Arc::new(kagi_http::tls::server_config(resolver, Vec::new())?);
        for l in &pg {
            println!(
                "  SQL over the PostgreSQL protocol (TLS): {}",
                l.local_addr()?
            );
        }
        sql.serve_postgres(pg, tls, sql_shutdown.clone());
    }
    if !read_only {
        kagi_sql_service::spawn_keeper(sql.clone());
    }

    // Where the other nodes of a shared store reach this one (docs/SEVERAL_NODES.md,
    // "Homes"); a read-only node is home to nothing and announces nothing.
    if !read_only {
        let https = match &listeners.advertise {
            Some(a) => a.clone(),
            None => default_advertise(&listen, &addrs),
        };
        // The SQL and NBD endpoints on the advertised host, at their own ports.
        let host = https
            .rsplit_once(':')
            .map_or(https.as_str(), |(h, _)| h)
            .to_string();
        if platform.shares_store() && is_loopback_host(&host) {
            tracing::warn!(
                advertise = %https,
                "this node advertises a loopback address: nodes on other machines cannot \
                 forward requests to it; pass --advertise HOST:PORT"
            );
        }
        let card = kagi_vault::NodeCard {
            name: String::new(),
            sql: sql_port.map(|p| format!("{host}:{p}")),
            nbd: nbd_port.map(|p| format!("{host}:{p}")),
            https,
        };
        tokio::spawn(platform.clone().keep_presence(card));
    }

    // The storage services, each registered by its provider (adding one touches no router).
    let services = kagi_http::Services::default();
    services.register(backup);
    services.register(disks);
    services.register(sql);
    services.set_read_only(read_only);
    observability::serve_metrics(
        listeners.metrics.as_deref(),
        &platform,
        &services,
        &audit_log,
    )
    .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // A read-only node on a hot standby follows its promotion: it stops serving (the requests
    // in flight finish) and starts again writable.
    let promotion = match (read_only, sql_store) {
        (true, Some(store)) => {
            let poll = std::env::var("KAGI_PROMOTION_POLL_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(
                    std::time::Duration::from_secs(2),
                    std::time::Duration::from_millis,
                );
            Some(tokio::spawn(read_only::promoted(store, poll)))
        }
        _ => None,
    };
    let promoted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noted = promoted.clone();
    let shutdown = async move {
        let promotion = async {
            let done = match promotion {
                Some(p) => p.await.is_ok(),
                None => false,
            };
            if !done {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = promotion => {
                noted.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::warn!("the standby this node reads was promoted: restarting without --read-only");
            }
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
        }
    };
    // Returns once the requests in flight have finished (their changes and audit records).
    let releasing = platform.clone();
    kagi_http::serve_bound_until(platform, services, audit_log, https, resolver, shutdown).await?;
    sql_shutdown.cancel();
    // Another node takes the singleton work over now rather than when the leases expire.
    releasing.release_leases().await;
    // Every acknowledged write is already committed (synchronous=FULL); nothing to flush.
    if promoted.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(read_only::restart_writable());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised() {
        for host in ["localhost", "LOCALHOST", "127.0.0.2", "[::1]", "::1"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["kagi-1.example", "10.0.0.5", "[fd00::5]", "0.0.0.0"] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}

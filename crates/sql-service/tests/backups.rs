//! Automatic backups and point-in-time restore on a real platform, without a PostgreSQL client:
//! rows written through the gateway's sessions in three batches with backup passes between
//! them (the platform's test clock moved forward), restores into new databases at points
//! between the batches, the refusals of points outside the backups, and a restore from a
//! dropped database.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use kagi_pgsql::Gateway;
use kagi_sql_service::{SqlConfig, SqlGateway, SqlService};
use kagi_testkit::{Options, TestServer};
use serde_json::{Value, json};

/// The platform, the service on it (log backups every 10 s, full backups every 1000 s of the
/// test clock, backups kept `retention` seconds) and server `sql1` with database `app`.
struct Fx {
    s: TestServer,
    svc: Arc<SqlService>,
    gateway: SqlGateway,
    group: String,
    server: String,
}

impl Fx {
    async fn new(retention: u64) -> Self {
        let s = TestServer::start(Options::default()).await;
        let group = format!(
            "/subscriptions/{}/resourceGroups/rg1",
            s.admin.subscription_id
        );
        let region = json!({"location": "westeurope"});
        assert_eq!(s.arm("PUT", &group, Some(region.clone())).await.0, 201);
        let config = SqlConfig {
            log_backup_interval: Duration::from_secs(10),
            full_backup_interval: Duration::from_secs(1000),
            backup_retention: Duration::from_secs(retention),
            ..SqlConfig::default()
        };
        let svc = SqlService::new(s.platform.clone(), config).unwrap();
        let server = format!("{group}/providers/Microsoft.Sql/servers/sql1");
        let fx = Fx {
            gateway: SqlGateway(svc.clone()),
            s,
            svc,
            group,
            server,
        };
        let admin = json!({"location": "westeurope", "properties": {
            "administratorLogin": "kagiadmin", "administratorLoginPassword": "Str0ng!Passw0rd"}});
        let (st, v) = fx.call("PUT", &fx.server, admin).await;
        assert!(st == 200 || st == 201, "{v}");
        let (st, v) = fx.call("PUT", &fx.db("app"), region).await;
        assert_eq!(st, 201, "{v}");
        fx
    }

    fn db(&self, name: &str) -> String {
        format!("{}/databases/{name}", self.server)
    }

    fn now(&self) -> i64 {
        kagi_core::time::Clock::now(self.s.clock.as_ref())
    }

    /// `method path` on the service's ARM handler.
    async fn call(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        self.s
            .provider_call(self.svc.clone(), method, path, body)
            .await
    }

    /// Restores into database `name` with `properties`: the new database.
    async fn restore(&self, name: &str, properties: Value) -> Value {
        let (st, v) = self
            .call("PUT", &self.db(name), json!({ "properties": properties }))
            .await;
        assert_eq!(st, 201, "{name}: {v}");
        v
    }

    /// A restore that must fail with `inner`.
    async fn refused(&self, name: &str, properties: Value, inner: &str) {
        let (st, v) = self
            .call("PUT", &self.db(name), json!({ "properties": properties }))
            .await;
        assert!(st == 400 || st == 409 || st == 404, "{name}: {st} {v}");
        assert_eq!(v["error"]["code"], inner, "{name}: {v}");
    }

    async fn rows(&self, db: &str) -> Vec<String> {
        let open = self.gateway.open("sql1", db, "kagiadmin").await.unwrap();
        let mut st = open
            .connection
            .prepare("SELECT v FROM t ORDER BY v")
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    async fn create_table(&self) {
        let open = self.gateway.open("sql1", "app", "kagiadmin").await.unwrap();
        open.connection
            .execute_batch("CREATE TABLE t (v TEXT PRIMARY KEY)")
            .unwrap();
    }

    async fn insert(&self, batch: u32) {
        let open = self.gateway.open("sql1", "app", "kagiadmin").await.unwrap();
        for i in 0..20 {
            let row = format!("KAGI-BATCH-{batch}-ROW-{i:02}");
            open.connection
                .execute("INSERT INTO t VALUES (?1)", [row])
                .unwrap();
        }
    }

    /// A backup pass: (full, log) backups recorded.
    async fn pass(&self) -> (u64, u64) {
        let r = self.svc.backup_pass().await;
        assert_eq!(r.failed, 0, "{r:?}");
        (r.full, r.log)
    }
}

fn pitr(source: &str, point: i64) -> Value {
    json!({"createMode": "PointInTimeRestore", "sourceDatabaseId": source,
        "restorePointInTime": kagi_core::time::rfc3339(point)})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_restore_to_points_between_batches_and_after_a_drop() {
    let fx = Fx::new(7 * 86_400).await;
    let app = fx.db("app");
    // No backup yet: nothing to restore.
    fx.refused("early", pitr(&app, fx.now()), "InvalidRestorePointInTime")
        .await;

    fx.create_table().await;
    fx.insert(1).await;
    assert_eq!(fx.pass().await, (1, 0));
    let t1 = fx.now();
    fx.s.clock.advance(10);
    fx.insert(2).await;
    assert_eq!(fx.pass().await, (0, 1));
    let t2 = fx.now();
    fx.s.clock.advance(5);
    fx.insert(3).await;
    // Not due yet.
    assert_eq!(fx.pass().await, (0, 0));
    fx.s.clock.advance(5);
    assert_eq!(fx.pass().await, (0, 1));

    // The list names each backup's range and key.
    let (st, list) = fx.call("GET", &format!("{app}/backups"), json!({})).await;
    assert_eq!(st, 200, "{list}");
    let items = list["value"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{list}");
    assert_eq!(items[0]["properties"]["backupType"], "Full");
    assert_eq!(items[1]["properties"]["backupType"], "Log");
    assert_eq!(items[1]["properties"]["serverKeyType"], "ServiceManaged");
    let rfc = kagi_core::time::rfc3339;
    assert_eq!(list["earliestRestoreDate"], rfc(t1).as_str());

    // A restore to a point after batch 2: batches 1 and 2, not 3; the source untouched.
    let v = fx.restore("at2", pitr(&app, t2 + 5)).await;
    let source = fx.call("GET", &app, json!({})).await.1;
    assert_ne!(
        v["properties"]["databaseId"],
        source["properties"]["databaseId"]
    );
    let got = fx.rows("at2").await;
    assert_eq!(got.len(), 40, "{got:?}");
    assert!(got.iter().all(|r| !r.contains("BATCH-3")));
    assert_eq!(fx.rows("app").await.len(), 60);
    // The restored database takes writes, and is backed up in its own right.
    let open = fx.gateway.open("sql1", "at2", "kagiadmin").await.unwrap();
    open.connection
        .execute("INSERT INTO t VALUES ('after')", [])
        .unwrap();
    drop(open);
    assert_eq!(fx.pass().await.0, 1);
    // To the first backup: batch 1 only.
    fx.restore("at1", pitr(&app, t1)).await;
    assert_eq!(fx.rows("at1").await.len(), 20);

    // Onto another server (as after its source server's home was lost): the source's records,
    // files and platform key; the new database under the other server's key.
    let other = format!("{}/providers/Microsoft.Sql/servers/sql2", fx.group);
    let admin = json!({"location": "westeurope", "properties": {
        "administratorLogin": "kagiadmin", "administratorLoginPassword": "Str0ng!Passw0rd"}});
    let (st, v) = fx.call("PUT", &other, admin).await;
    assert!(st == 200 || st == 201, "{v}");
    let (st, v) = fx
        .call(
            "PUT",
            &format!("{other}/databases/moved"),
            json!({ "properties": pitr(&app, t2 + 5) }),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let open = fx.gateway.open("sql2", "moved", "kagiadmin").await.unwrap();
    let n: i64 = open
        .connection
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 40);
    drop(open);

    // Points outside the backups, a server that does not exist, an id that is no database's,
    // an existing name, another create mode: refused, and nothing is created.
    let elsewhere = format!(
        "{}/providers/Microsoft.Sql/servers/other/databases/app",
        fx.group
    );
    let not_a_database = format!("{}/providers/Microsoft.Sql/servers/sql1", fx.group);
    let mut bad_time = pitr(&app, t2);
    bad_time["restorePointInTime"] = json!("yesterday");
    let cases = [
        ("x1", pitr(&app, t1 - 1), "InvalidRestorePointInTime"),
        ("x2", pitr(&app, fx.now() + 60), "InvalidRestorePointInTime"),
        ("x3", bad_time, "InvalidRestorePointInTime"),
        ("x4", pitr(&elsewhere, t2), "SourceDatabaseNotFound"),
        ("x7", pitr(&not_a_database, t2), "InvalidSourceDatabaseId"),
        ("x5", pitr(&fx.db("nothing"), t2), "SourceDatabaseNotFound"),
        ("at1", pitr(&app, t2), "DatabaseAlreadyExists"),
        (
            "x6",
            json!({"createMode": "Copy", "sourceDatabaseId": app}),
            "InvalidCreateMode",
        ),
    ];
    for (name, properties, inner) in cases {
        fx.refused(name, properties, inner).await;
    }
    let (_, dbs) = fx
        .call("GET", &format!("{}/databases", fx.server), json!({}))
        .await;
    assert_eq!(dbs["value"].as_array().unwrap().len(), 3, "{dbs}");
    // No restore work left behind, and no plaintext in any backup file.
    let work: Vec<_> = std::fs::read_dir(fx.s.dir().join("sql-restore"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(work.is_empty(), "{work:?}");
    let mut files = 0;
    for dir in std::fs::read_dir(fx.s.dir().join("sql-backups"))
        .unwrap()
        .flatten()
    {
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let bytes = std::fs::read(f.path()).unwrap();
            let plain = bytes.windows(11).any(|w| w == b"KAGI-BATCH-");
            assert!(!plain, "{}", f.path().display());
            assert!(!f.path().to_string_lossy().ends_with(".partial"));
            files += 1;
        }
    }
    assert!(files >= 5, "{files}");

    // The source dropped: its backups remain, restorable under its name.
    assert_eq!(fx.call("DELETE", &app, json!({})).await.0, 200);
    let dropped = format!("{}/restorableDroppedDatabases", fx.server);
    let (st, v) = fx.call("GET", &dropped, json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["value"][0]["properties"]["databaseName"], "app", "{v}");
    let id = v["value"][0]["id"].as_str().unwrap().to_string();
    let from_drop = json!({"createMode": "Restore", "restorableDroppedDatabaseId": id});
    fx.restore("back", from_drop).await;
    assert_eq!(fx.rows("back").await.len(), 60);
    fx.restore("back2", pitr(&app, t2)).await;
    assert_eq!(fx.rows("back2").await.len(), 40);
    let (st, keys) = fx
        .call("GET", &format!("{}/backupKeys", fx.server), json!({}))
        .await;
    assert_eq!(st, 200, "{keys}");
    assert_eq!(keys["value"][0]["name"], "ServiceManaged", "{keys}");
}

/// The files in a database's backup directory.
fn backup_files(fx: &Fx, database_id: &str) -> Vec<String> {
    let dir = fx.s.dir().join("sql-backups").join(database_id);
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_a_full_backup_under_the_oldest_point_and_drops_follow() {
    let fx = Fx::new(100).await;
    let app = fx.db("app");
    let id = fx.call("GET", &app, json!({})).await.1["properties"]["databaseId"]
        .as_str()
        .unwrap()
        .to_string();
    fx.create_table().await;
    assert_eq!(fx.pass().await, (1, 0));
    let t0 = fx.now();
    fx.s.clock.advance(10);
    fx.insert(1).await;
    assert_eq!(fx.pass().await, (0, 1));
    // A second full backup; the first one stays while it is the base of the oldest point kept.
    fx.s.clock.advance(1000);
    fx.insert(2).await;
    assert_eq!(fx.pass().await, (1, 1));
    let t1 = fx.now();
    assert_eq!(
        backup_files(&fx, &id).len(),
        6,
        "{:?}",
        backup_files(&fx, &id)
    );
    fx.restore("old", pitr(&app, t0 + 10)).await;
    assert_eq!(fx.rows("old").await.len(), 20);
    // Once the second full backup is older than the retention, what came before it goes.
    fx.s.clock.advance(150);
    fx.insert(3).await;
    let r = fx.svc.backup_pass().await;
    assert_eq!((r.log, r.removed, r.failed), (1, 3, 0), "{r:?}");
    let left = backup_files(&fx, &id);
    assert!(
        left.iter()
            .all(|f| !f.starts_with("full-00000001") && !f.starts_with("log-00000002")),
        "{left:?}"
    );
    fx.refused("gone", pitr(&app, t0 + 10), "InvalidRestorePointInTime")
        .await;
    fx.restore("kept", pitr(&app, t1)).await;
    assert_eq!(fx.rows("kept").await.len(), 40);

    // A dropped database keeps its backups for the retention, then loses them all.
    assert_eq!(fx.call("DELETE", &app, json!({})).await.0, 200);
    fx.restore("afterdrop", pitr(&app, fx.now())).await;
    assert_eq!(fx.rows("afterdrop").await.len(), 60);
    fx.s.clock.advance(101);
    let r = fx.svc.backup_pass().await;
    assert_eq!(r.failed, 0, "{r:?}");
    assert!(backup_files(&fx, &id).is_empty());
    let dropped = format!("{}/restorableDroppedDatabases", fx.server);
    let (_, v) = fx.call("GET", &dropped, json!({})).await;
    assert_eq!(v["value"], json!([]), "{v}");
    fx.refused("late", pitr(&app, fx.now()), "SourceDatabaseNotFound")
        .await;
}

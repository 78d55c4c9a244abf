//! What only a store shared by several nodes has: leases with fencing and the change feed
//! (PostgreSQL; a scratch database per test, see `kagi_store::contract::postgres`).

mod common;

use std::time::Duration;

use common::{vault, version};
use kagi_core::ObjectName;
use kagi_store::lease::{Fence, fenced};
use kagi_store::{SqlStore, Store, StoreError};

async fn store() -> Option<SqlStore> {
    Some(store_at().await?.0)
}

/// A store on a scratch database, and the database's URL.
async fn store_at() -> Option<(SqlStore, String)> {
    let server = kagi_store::contract::postgres::server_url()?;
    let url = kagi_store::contract::postgres::scratch_database(&server).await;
    Some((SqlStore::open_postgres(&url).await.expect("open"), url))
}

#[tokio::test]
async fn a_lease_has_one_holder_until_it_expires_and_then_changes_hands() {
    let Some(s) = store().await else { return };
    assert_eq!(
        s.acquire_lease("rotation", "a", 300).await.unwrap(),
        Some(1)
    );
    assert_eq!(s.acquire_lease("rotation", "b", 300).await.unwrap(), None);
    // A renewal keeps the fencing number; another lease is independent.
    assert_eq!(
        s.acquire_lease("rotation", "a", 300).await.unwrap(),
        Some(1)
    );
    assert_eq!(s.acquire_lease("purge", "b", 300).await.unwrap(), Some(1));
    assert_eq!(
        s.lease_holder("rotation").await.unwrap().as_deref(),
        Some("a")
    );
    assert_eq!(s.lease_holder("nothing").await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Expired: nobody holds it, though its row is still there.
    assert_eq!(s.lease_holder("rotation").await.unwrap(), None);
    assert_eq!(
        s.acquire_lease("rotation", "b", 300).await.unwrap(),
        Some(2)
    );
    assert_eq!(s.acquire_lease("rotation", "a", 300).await.unwrap(), None);
    // Released, it is free at once.
    s.release_lease("rotation", "b").await.unwrap();
    assert_eq!(
        s.acquire_lease("rotation", "a", 300).await.unwrap(),
        Some(3)
    );
}

#[tokio::test]
async fn a_fenced_write_fails_once_the_lease_changed_hands_and_changes_nothing() {
    let Some((s, url)) = store_at().await else {
        return;
    };
    let v = vault("fenced");
    s.put_vault(&v).await.unwrap();
    let name = ObjectName::parse("k").unwrap();
    let fencing = s
        .acquire_lease("rotation", "a", 200)
        .await
        .unwrap()
        .unwrap();
    let a = Fence {
        name: "rotation".into(),
        holder: "a".into(),
        fencing,
    };
    fenced(a.clone(), s.add_key_version(&v.name, &name, &version(1, 1)))
        .await
        .expect("the holder writes");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = s
        .acquire_lease("rotation", "b", 10_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b, fencing + 1);
    // The old holder (paused past its lease) cannot write over the new one's work.
    let a_again = a.clone();
    let e = fenced(a, s.add_key_version(&v.name, &name, &version(2, 2)))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Database(m) if m.contains("no longer held")),
        "{e:?}"
    );
    let keys = s.load_keys(&v.name).await.unwrap();
    assert_eq!(
        keys[0].versions.len(),
        1,
        "the refused write changed nothing"
    );
    // Also as the first statement on a connection of its own (a node coming back).
    let fresh = SqlStore::open_postgres(&url).await.unwrap();
    let e = fenced(
        a_again,
        fresh.add_key_version(&v.name, &name, &version(5, 2)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, StoreError::Database(m) if m.contains("no longer held")),
        "{e:?}"
    );
    // The new holder, and unfenced writes, go through.
    let fence_b = Fence {
        name: "rotation".into(),
        holder: "b".into(),
        fencing: b,
    };
    fenced(fence_b, s.add_key_version(&v.name, &name, &version(3, 2)))
        .await
        .unwrap();
    s.add_key_version(&v.name, &name, &version(4, 3))
        .await
        .unwrap();
    assert_eq!(s.load_keys(&v.name).await.unwrap()[0].versions.len(), 3);
}

#[tokio::test]
async fn writes_stamp_their_scope_and_notify_it() {
    let Some(s) = store().await else { return };
    let mut watch = s
        .watch_changes()
        .await
        .unwrap()
        .expect("a primary notifies");
    let v = vault("feed");
    s.put_vault(&v).await.unwrap();
    let note = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a notification")
        .unwrap();
    assert_eq!(note.as_deref(), Some("vault:feed"));
    let before = s.change_marks().await.unwrap();
    let mark = |marks: &[(String, i64)], scope: &str| {
        marks.iter().find(|(s, _)| s == scope).map(|(_, n)| *n)
    };
    let first = mark(&before, "vault:feed").expect("stamped");
    s.add_key_version(&v.name, &ObjectName::parse("k").unwrap(), &version(1, 1))
        .await
        .unwrap();
    let after = s.change_marks().await.unwrap();
    assert!(mark(&after, "vault:feed").unwrap() > first);
    // A directory write stamps the directory.
    s.put_principal(&kagi_store::contract::principal(1, None))
        .await
        .unwrap();
    assert!(mark(&s.change_marks().await.unwrap(), "directory").is_some());
}

#[tokio::test]
async fn a_client_assertion_is_accepted_once_across_nodes_until_it_expires() {
    let Some(s) = store().await else { return };
    assert!(s.remember_assertion("c1", b"jti-1", 100, 10).await.unwrap());
    assert!(!s.remember_assertion("c1", b"jti-1", 100, 20).await.unwrap());
    // Another client's, or another jti, is its own.
    assert!(s.remember_assertion("c2", b"jti-1", 100, 20).await.unwrap());
    assert!(s.remember_assertion("c1", b"jti-2", 100, 20).await.unwrap());
    // Once expired it is forgotten (and a replay then fails its own exp check upstream).
    assert!(
        s.remember_assertion("c1", b"jti-1", 300, 150)
            .await
            .unwrap()
    );
}

/// Two nodes' read-then-write transactions on one row run SERIALIZABLE, so PostgreSQL fails
/// one of two that overlap (40001); the store runs a failed one again, and every write of a
/// burst from two nodes (ten at once on each) lands, none answered as an error.
#[tokio::test]
async fn serialisation_failures_are_retried_not_returned() {
    let Some((a, url)) = store_at().await else {
        return;
    };
    let b = SqlStore::open_postgres(&url).await.expect("open");
    let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            s.put_policy_assignment("/subscriptions/s/policy/p", &format!("{{\"n\":{i}}}"), i)
                .await
        }));
    }
    let mut created = 0;
    for t in tasks {
        if t.await.expect("task").expect("a put failed") {
            created += 1;
        }
    }
    // Exactly one of them created it; the others replaced it.
    assert_eq!(created, 1);
    assert_eq!(a.list_policy_assignments().await.unwrap().len(), 1);
}

/// A document of `kind` and `name` whose body is `body`.
fn doc(kind: &str, name: &str, body: &str) -> kagi_store::ServiceDocument {
    kagi_store::ServiceDocument {
        kind: kind.into(),
        name: name.into(),
        body: body.into(),
        updated: 1,
    }
}

/// The home record the guarded-write tests race on.
const HOME_A: kagi_store::DocumentRef<'static> = kagi_store::DocumentRef {
    resource_key: "/homes",
    kind: "home",
    name: "a",
};
/// Its row, for SQL of another connection.
const HOME_A_ROW: &str = "resource_key = '/homes' AND kind = 'home' AND name = 'a'";

/// Home record `a` says `node-a`, and another connection (as another node would) has begun a
/// transaction.
async fn home_a_and_another_transaction(s: &SqlStore, url: &str) -> sqlx::AnyConnection {
    use sqlx::Connection;
    s.put_service_document("/homes", &doc("home", "a", "node-a"))
        .await
        .expect("home record a");
    sqlx::any::install_default_drivers();
    let mut other = sqlx::AnyConnection::connect(url)
        .await
        .expect("another connection");
    run(&mut other, "BEGIN".into()).await;
    other
}

/// Runs `sql` on connection `c`.
async fn run(c: &mut sqlx::AnyConnection, sql: String) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(c)
        .await
        .expect("the other transaction's statement");
}

/// A write guarded by a document that another node is changing waits for that change, and
/// then sees it: the old home of a resource records nothing once another node marked it.
#[tokio::test]
async fn a_guarded_write_waits_for_a_change_of_its_guard_and_then_sees_it() {
    let Some((s, url)) = store_at().await else {
        return;
    };
    let mut other = home_a_and_another_transaction(&s, &url).await;
    run(
        &mut other,
        format!("UPDATE service_documents SET body = 'node-b' WHERE {HOME_A_ROW}"),
    )
    .await;
    let writer = s.clone();
    let write = tokio::spawn(async move {
        writer
            .put_service_document_if("/servers/a", &doc("record", "1", "{}"), HOME_A, &|b| {
                b == Some("node-a")
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!write.is_finished(), "the guarded write did not wait");
    run(&mut other, "COMMIT".into()).await;
    assert!(!write.await.unwrap().unwrap());
    assert_eq!(
        s.get_service_document("/servers/a", "record", "1")
            .await
            .unwrap(),
        None
    );
}

/// A compare-and-set of a document another transaction holds a shared lock on and then
/// updates waits for that transaction and sees its change (`false`), rather than deadlocking
/// with it (a shared lock of its own upgraded to write would: PostgreSQL aborts one of the
/// two).
#[tokio::test]
async fn a_compare_and_set_waits_for_a_racing_writer_of_its_row_without_deadlock() {
    let Some((s, url)) = store_at().await else {
        return;
    };
    let mut other = home_a_and_another_transaction(&s, &url).await;
    run(
        &mut other,
        format!("SELECT body FROM service_documents WHERE {HOME_A_ROW} FOR SHARE"),
    )
    .await;
    let writer = s.clone();
    let cas = tokio::spawn(async move {
        writer
            .put_service_document_if("/homes", &doc("home", "a", "node-c"), HOME_A, &|b| {
                b == Some("node-a")
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // It deadlocks here (40P01) if the compare-and-set shared the row before writing it.
    run(
        &mut other,
        format!("UPDATE service_documents SET body = 'node-b' WHERE {HOME_A_ROW}"),
    )
    .await;
    run(&mut other, "COMMIT".into()).await;
    assert!(!cas.await.unwrap().expect("the compare-and-set failed"));
    let now = s.get_service_document("/homes", "home", "a").await.unwrap();
    assert_eq!(now.map(|d| d.body).as_deref(), Some("node-b"));
}

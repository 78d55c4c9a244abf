//! Service documents, service activity and policy assignments (schema in
//! `crate::services::SCHEMA`). A resource's rows go with it when it is deleted and follow it
//! when it moves: [`delete_resource_rows`] and [`rekey_resource_rows`] run inside those
//! transactions (`sql/directory.rs`, `moves.rs`).

use sqlx::{Any, AssertSqlSafe, Row, Transaction};

use super::SqlStore;
use crate::Result;
use crate::services::{ActivityRecord, ServiceDocument, ServiceImport};

fn document(r: &sqlx::any::AnyRow) -> Result<ServiceDocument> {
    Ok(ServiceDocument {
        kind: r.try_get("kind")?,
        name: r.try_get("name")?,
        body: r.try_get("body")?,
        updated: r.try_get("updated")?,
    })
}

/// Deletes every document and activity entry of `resource_key` (inside the caller's
/// transaction).
pub(crate) async fn delete_resource_rows(
    tx: &mut Transaction<'_, Any>,
    resource_key: &str,
) -> Result<()> {
    for sql in [
        "DELETE FROM service_documents WHERE resource_key = $1",
        "DELETE FROM service_activity WHERE resource_key = $1",
    ] {
        sqlx::query(sql)
            .bind(resource_key)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Gives the documents and activity of `old_key` to `new_key` (inside the caller's
/// transaction). Rows already at `new_key` belong to no resource — the caller has just checked
/// that none has that id — and would collide, so they go first.
pub(crate) async fn rekey_resource_rows(
    tx: &mut Transaction<'_, Any>,
    old_key: &str,
    new_key: &str,
) -> Result<()> {
    delete_resource_rows(tx, new_key).await?;
    for sql in [
        "UPDATE service_documents SET resource_key = $1 WHERE resource_key = $2",
        "UPDATE service_activity SET resource_key = $1 WHERE resource_key = $2",
    ] {
        sqlx::query(sql)
            .bind(new_key)
            .bind(old_key)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Appends an entry to the activity log of `resource_key` (inside the caller's transaction);
/// returns its position. One statement: SQLite takes the write lock before it reads the highest
/// position, so two concurrent appends cannot pick the same one.
pub(crate) async fn insert_activity(
    tx: &mut Transaction<'_, Any>,
    resource_key: &str,
    at: i64,
    body: &str,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO service_activity (resource_key, seq, at, body) \
         SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3 FROM service_activity \
         WHERE resource_key = $4 RETURNING seq",
    )
    .bind(resource_key)
    .bind(at)
    .bind(body)
    .bind(resource_key)
    .fetch_one(&mut **tx)
    .await?)
}

async fn insert_document_if_absent(
    tx: &mut Transaction<'_, Any>,
    resource_key: &str,
    doc: &ServiceDocument,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO service_documents (resource_key, kind, name, body, updated) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (resource_key, kind, name) DO NOTHING",
    )
    .bind(resource_key)
    .bind(&doc.kind)
    .bind(&doc.name)
    .bind(&doc.body)
    .bind(doc.updated)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl SqlStore {
    pub(super) async fn documents_get(
        &self,
        resource_key: &str,
        kind: &str,
        name: &str,
    ) -> Result<Option<ServiceDocument>> {
        let row = sqlx::query(
            "SELECT kind, name, body, updated FROM service_documents \
             WHERE resource_key = $1 AND kind = $2 AND name = $3",
        )
        .bind(resource_key)
        .bind(kind)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(document).transpose()
    }

    pub(super) async fn documents_put(
        &self,
        resource_key: &str,
        doc: &ServiceDocument,
    ) -> Result<()> {
        upsert_document(&self.pool, resource_key, doc).await
    }

    /// See [`crate::Store::put_service_document_if`]: the guard is read with the row lock
    /// (PostgreSQL `FOR SHARE`; SQLite's transaction holds the write lock), so that a change
    /// of it waits for this transaction.
    pub(super) async fn documents_put_if(
        &self,
        resource_key: &str,
        doc: &ServiceDocument,
        guard: crate::DocumentRef<'_>,
        holds: crate::DocumentCondition<'_>,
    ) -> Result<bool> {
        let (mut tx, mut lock) = self.begin_row_lock().await?;
        // A compare-and-set (the guard is the row written) locks it for update: two writers
        // that both shared it and then both updated it would deadlock.
        let itself =
            guard.resource_key == resource_key && guard.kind == doc.kind && guard.name == doc.name;
        if itself && lock == " FOR SHARE" {
            lock = " FOR UPDATE";
        }
        let body: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT body FROM service_documents \
             WHERE resource_key = $1 AND kind = $2 AND name = $3{lock}"
        )))
        .bind(guard.resource_key)
        .bind(guard.kind)
        .bind(guard.name)
        .fetch_optional(&mut *tx)
        .await?;
        if !holds(body.as_deref()) {
            return Ok(false);
        }
        upsert_document(&mut *tx, resource_key, doc).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn documents_delete(
        &self,
        resource_key: &str,
        kind: &str,
        name: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "DELETE FROM service_documents WHERE resource_key = $1 AND kind = $2 AND name = $3",
        )
        .bind(resource_key)
        .bind(kind)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    pub(super) async fn documents_list(
        &self,
        resource_key: &str,
        kind: &str,
    ) -> Result<Vec<ServiceDocument>> {
        let rows = sqlx::query(
            "SELECT kind, name, body, updated FROM service_documents \
             WHERE resource_key = $1 AND kind = $2 ORDER BY name",
        )
        .bind(resource_key)
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(document).collect()
    }

    pub(super) async fn documents_of_kind(
        &self,
        kind: &str,
    ) -> Result<Vec<(String, ServiceDocument)>> {
        let rows = sqlx::query(
            "SELECT resource_key, kind, name, body, updated FROM service_documents \
             WHERE kind = $1 ORDER BY resource_key, name",
        )
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("resource_key")?, document(r)?)))
            .collect()
    }

    pub(super) async fn activity_append(
        &self,
        resource_key: &str,
        at: i64,
        body: &str,
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let seq = insert_activity(&mut tx, resource_key, at, body).await?;
        tx.commit().await?;
        Ok(seq)
    }

    pub(super) async fn activity_list(&self, resource_key: &str) -> Result<Vec<ActivityRecord>> {
        let rows = sqlx::query(
            "SELECT seq, at, body FROM service_activity WHERE resource_key = $1 ORDER BY seq",
        )
        .bind(resource_key)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ActivityRecord {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    body: r.try_get("body")?,
                })
            })
            .collect()
    }

    pub(super) async fn service_data_delete(&self, resource_key: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        delete_resource_rows(&mut tx, resource_key).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn service_data_import_once(
        &self,
        resource_key: &str,
        import: &ServiceImport,
    ) -> Result<()> {
        // It reads before it writes (`begin_write`).
        let mut tx = self.begin_write().await?;
        for doc in &import.documents {
            insert_document_if_absent(&mut tx, resource_key, doc).await?;
        }
        let has_activity = sqlx::query_scalar::<_, i64>(
            "SELECT 1 FROM service_activity WHERE resource_key = $1 LIMIT 1",
        )
        .bind(resource_key)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        if !has_activity {
            for (i, (at, body)) in import.activity.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO service_activity (resource_key, seq, at, body) VALUES ($1, $2, $3, $4)",
                )
                .bind(resource_key)
                .bind(i as i64 + 1)
                .bind(at)
                .bind(body)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Imports an earlier kagi's files (see `Store::import_service_data`), run again when a
    /// concurrent node's transaction failed it ([`super::retrying`]).
    pub(super) async fn service_data_import(
        &self,
        resource_key: &str,
        import: &ServiceImport,
    ) -> Result<()> {
        super::retrying(|| self.service_data_import_once(resource_key, import)).await
    }

    /// Creates or replaces a policy assignment; `true` when it is new. Run again when a
    /// concurrent node's transaction failed it ([`super::retrying`]).
    pub(super) async fn policies_put(&self, id: &str, body: &str, now: i64) -> Result<bool> {
        super::retrying(|| self.policies_put_once(id, body, now)).await
    }

    pub(super) async fn policies_list(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT id, body FROM policy_assignments ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("body")?)))
            .collect()
    }

    async fn policies_put_once(&self, id: &str, body: &str, now: i64) -> Result<bool> {
        // It reads before it writes (`begin_write`).
        let mut tx = self.begin_write().await?;
        let existed =
            sqlx::query_scalar::<_, i64>("SELECT 1 FROM policy_assignments WHERE id = $1 LIMIT 1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
        sqlx::query(
            "INSERT INTO policy_assignments (id, body, updated) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET body = excluded.body, updated = excluded.updated",
        )
        .bind(id)
        .bind(body)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(!existed)
    }

    pub(super) async fn policies_delete(&self, id: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("DELETE FROM policy_assignments WHERE id = $1 RETURNING body")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub(super) async fn policies_import(
        &self,
        assignments: &[(String, String)],
        now: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (id, body) in assignments {
            sqlx::query(
                "INSERT INTO policy_assignments (id, body, updated) VALUES ($1, $2, $3) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(id)
            .bind(body)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Creates or replaces document `doc` of `resource_key`.
async fn upsert_document<'e>(
    on: impl sqlx::Executor<'e, Database = Any>,
    resource_key: &str,
    doc: &ServiceDocument,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO service_documents (resource_key, kind, name, body, updated) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (resource_key, kind, name) \
         DO UPDATE SET body = excluded.body, updated = excluded.updated",
    )
    .bind(resource_key)
    .bind(&doc.kind)
    .bind(&doc.name)
    .bind(&doc.body)
    .bind(doc.updated)
    .execute(on)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use crate::directory::{DirectoryStore, ResourceRecord};
    use crate::moves::MoveStore;
    use crate::services::{ServiceDocument, ServiceImport};
    use crate::{SqlStore, Store, StoreError};

    const BV1: &str =
        "/subscriptions/s1/resourcegroups/a/providers/microsoft.recoveryservices/vaults/bv";
    const BV2: &str =
        "/subscriptions/s1/resourcegroups/b/providers/microsoft.recoveryservices/vaults/bv";

    async fn open(dir: &tempfile::TempDir) -> SqlStore {
        SqlStore::open_sqlite(&dir.path().join("kagi.db"))
            .await
            .unwrap()
    }

    fn doc(kind: &str, name: &str, body: &str, updated: i64) -> ServiceDocument {
        ServiceDocument {
            kind: kind.into(),
            name: name.into(),
            body: body.into(),
            updated,
        }
    }

    fn resource(id: &str, rg: &str) -> ResourceRecord {
        ResourceRecord {
            id: id.into(),
            resource_type: "Microsoft.RecoveryServices/vaults".into(),
            subscription_id: "s1".into(),
            resource_group: rg.into(),
            name: "bv".into(),
            location: "westeurope".into(),
            body: "{}".into(),
            created: 1,
            updated: 1,
        }
    }

    fn bodies(a: &[crate::ActivityRecord]) -> Vec<(i64, &str)> {
        a.iter().map(|r| (r.seq, r.body.as_str())).collect()
    }

    #[tokio::test]
    async fn documents_are_put_replaced_listed_and_deleted_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(&dir).await;
            assert_eq!(
                s.get_service_document(BV1, "state", "").await.unwrap(),
                None
            );
            s.put_service_document(BV1, &doc("state", "", r#"{"v":1}"#, 10))
                .await
                .unwrap();
            s.put_service_document(BV1, &doc("state", "", r#"{"v":2}"#, 11))
                .await
                .unwrap();
            for id in ["j2", "j1"] {
                s.put_service_document(BV1, &doc("job", id, "{}", 12))
                    .await
                    .unwrap();
            }
            // Another resource's documents are its own.
            s.put_service_document(BV2, &doc("job", "j9", "{}", 12))
                .await
                .unwrap();
            assert!(s.delete_service_document(BV1, "job", "j2").await.unwrap());
            assert!(!s.delete_service_document(BV1, "job", "j2").await.unwrap());
        }
        let s = open(&dir).await;
        assert_eq!(
            s.get_service_document(BV1, "state", "").await.unwrap(),
            Some(doc("state", "", r#"{"v":2}"#, 11))
        );
        let jobs: Vec<String> = s
            .list_service_documents(BV1, "job")
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(jobs, vec!["j1".to_string()]);
        assert!(
            s.list_service_documents(BV1, "nope")
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn activity_is_numbered_per_resource_in_commit_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        let mut tasks = Vec::new();
        for i in 0..20 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.append_service_activity(BV1, i, &format!("{{\"i\":{i}}}"))
                    .await
                    .unwrap()
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort();
        assert_eq!(seqs, (1..=20).collect::<Vec<i64>>());
        assert_eq!(s.append_service_activity(BV2, 5, "{}").await.unwrap(), 1);
        let log = s.list_service_activity(BV1).await.unwrap();
        assert_eq!(log.len(), 20);
        assert!(log.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
    }

    #[tokio::test]
    async fn rows_go_with_their_resource_and_follow_its_move() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        s.put_resource(&resource(BV1, "a"), &[], &[]).await.unwrap();
        s.put_service_document(BV1, &doc("state", "", "{}", 1))
            .await
            .unwrap();
        s.append_service_activity(BV1, 1, r#""created""#)
            .await
            .unwrap();
        // Left at the target by a vault deleted there long ago (by an earlier kagi).
        s.put_service_document(BV2, &doc("job", "old", "{}", 1))
            .await
            .unwrap();
        s.append_service_activity(BV2, 1, r#""stale""#)
            .await
            .unwrap();

        // A move that fails (the target exists) moves nothing.
        s.put_resource(&resource(BV2, "b"), &[], &[]).await.unwrap();
        assert!(matches!(
            s.move_resource(BV1, &resource(BV2, "b"), &[]).await,
            Err(StoreError::Conflict(_))
        ));
        assert!(
            s.get_service_document(BV1, "state", "")
                .await
                .unwrap()
                .is_some()
        );
        // Deleting a resource deletes its rows in the same transaction.
        s.delete_resource(BV2, &[]).await.unwrap();
        assert!(
            s.list_service_documents(BV2, "job")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(s.list_service_activity(BV2).await.unwrap().is_empty());

        s.put_service_document(BV2, &doc("job", "orphan", "{}", 1))
            .await
            .unwrap();
        s.move_resource(BV1, &resource(BV2, "b"), &[])
            .await
            .unwrap();
        assert!(
            s.get_service_document(BV1, "state", "")
                .await
                .unwrap()
                .is_none()
        );
        assert!(s.list_service_activity(BV1).await.unwrap().is_empty());
        assert!(
            s.get_service_document(BV2, "state", "")
                .await
                .unwrap()
                .is_some()
        );
        // What was at the target without a resource is gone; the log is the vault's own.
        assert!(
            s.list_service_documents(BV2, "job")
                .await
                .unwrap()
                .is_empty()
        );
        let log = s.list_service_activity(BV2).await.unwrap();
        assert_eq!(bodies(&log), vec![(1, r#""created""#)]);
        assert_eq!(
            s.append_service_activity(BV2, 2, r#""moved""#)
                .await
                .unwrap(),
            2
        );

        s.delete_service_data(BV2).await.unwrap();
        assert!(
            s.get_service_document(BV2, "state", "")
                .await
                .unwrap()
                .is_none()
        );
        assert!(s.list_service_activity(BV2).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_import_adds_only_what_is_missing_and_can_run_twice() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        s.put_service_document(BV1, &doc("state", "", r#"{"newer":true}"#, 50))
            .await
            .unwrap();
        let import = ServiceImport {
            documents: vec![
                doc("state", "", r#"{"older":true}"#, 9),
                doc("job", "j1", r#"{"id":"j1"}"#, 9),
            ],
            activity: vec![(1, r#""a""#.into()), (2, r#""b""#.into())],
        };
        s.import_service_data(BV1, &import).await.unwrap();
        s.import_service_data(BV1, &import).await.unwrap();
        assert_eq!(
            s.get_service_document(BV1, "state", "")
                .await
                .unwrap()
                .unwrap()
                .body,
            r#"{"newer":true}"#
        );
        assert_eq!(s.list_service_documents(BV1, "job").await.unwrap().len(), 1);
        let log = s.list_service_activity(BV1).await.unwrap();
        assert_eq!(bodies(&log), vec![(1, r#""a""#), (2, r#""b""#)]);
    }

    #[tokio::test]
    async fn policy_assignments_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir).await;
        assert!(
            s.put_policy_assignment("/subscriptions/s1/p/b", "{}", 1)
                .await
                .unwrap()
        );
        assert!(
            !s.put_policy_assignment("/subscriptions/s1/p/b", r#"{"v":2}"#, 2)
                .await
                .unwrap()
        );
        s.import_policy_assignments(
            &[
                ("/subscriptions/s1/p/a".into(), "{}".into()),
                ("/subscriptions/s1/p/b".into(), r#"{"old":1}"#.into()),
            ],
            3,
        )
        .await
        .unwrap();
        let all = s.list_policy_assignments().await.unwrap();
        assert_eq!(
            all,
            vec![
                ("/subscriptions/s1/p/a".to_string(), "{}".to_string()),
                (
                    "/subscriptions/s1/p/b".to_string(),
                    r#"{"v":2}"#.to_string()
                ),
            ]
        );
        assert_eq!(
            s.delete_policy_assignment("/subscriptions/s1/p/b")
                .await
                .unwrap(),
            Some(r#"{"v":2}"#.to_string())
        );
        assert_eq!(
            s.delete_policy_assignment("/subscriptions/s1/p/b")
                .await
                .unwrap(),
            None
        );
    }

    const CHILD_ENV: &str = "KAGI_STORE_SERVICES_CRASH_CHILD";

    /// The writer of the test below; runs only inside the child process it starts.
    #[tokio::test]
    async fn crash_child_service_writer() {
        let Ok(path) = std::env::var(CHILD_ENV) else {
            return;
        };
        let round = std::env::var("KAGI_STORE_SERVICES_CRASH_ROUND").unwrap();
        let s = SqlStore::open_sqlite(std::path::Path::new(&path))
            .await
            .unwrap();
        for i in 0u64.. {
            s.put_service_document(BV1, &doc("job", &format!("{round}-{i}"), "{}", 1))
                .await
                .unwrap();
            let seq = s
                .append_service_activity(BV1, 1, &format!("\"{round}-{i}\""))
                .await
                .unwrap();
            // Printed only after both commits returned: this line is the acknowledgement.
            println!("ack {i} {seq}");
        }
    }

    /// Documents and activity entries acknowledged before a SIGKILL are there after a
    /// restart, and the log keeps numbering without a gap.
    #[tokio::test]
    async fn acknowledged_documents_and_activity_survive_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crash.db");
        let mut acked_docs = Vec::new();
        let mut last_seq = 0;
        for (round, kill_after) in [(0u64, 30usize), (1, 5)] {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "sql::services::tests::crash_child_service_writer",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, &path)
                .env("KAGI_STORE_SERVICES_CRASH_ROUND", round.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let mut acked = 0;
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                let Some(rest) = line.strip_prefix("ack ") else {
                    continue;
                };
                let (i, seq) = rest.split_once(' ').unwrap();
                acked_docs.push(format!("{round}-{i}"));
                last_seq = seq.parse::<i64>().unwrap();
                acked += 1;
                if acked == kill_after {
                    child.kill().unwrap(); // SIGKILL: no destructors, no checkpoint.
                    break;
                }
            }
            child.wait().unwrap();
            assert_eq!(acked, kill_after, "child died before {kill_after} acks");

            let s = SqlStore::open_sqlite(&path).await.unwrap();
            let names: std::collections::HashSet<String> = s
                .list_service_documents(BV1, "job")
                .await
                .unwrap()
                .into_iter()
                .map(|d| d.name)
                .collect();
            for name in &acked_docs {
                assert!(
                    names.contains(name),
                    "acknowledged {name} lost after SIGKILL"
                );
            }
            let log = s.list_service_activity(BV1).await.unwrap();
            assert!(log.len() as i64 >= last_seq, "acknowledged activity lost");
            assert!(
                log.iter().enumerate().all(|(i, r)| r.seq == i as i64 + 1),
                "a gap in the activity log"
            );
        }
    }
}

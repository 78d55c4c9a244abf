//! Crash consistency: a child process writes key versions and reports each acknowledged
//! commit; the parent kills it with SIGKILL mid-stream, reopens the file and checks that every
//! acknowledged write is there and the file is sound.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use kagi_core::ObjectName;
use kagi_store::{SqlStore, Store};

const CHILD_ENV: &str = "KAGI_STORE_CRASH_CHILD";

/// The writer. Runs only inside the child process the test below starts.
#[tokio::test]
async fn crash_child_writer() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: u64 = std::env::var("KAGI_STORE_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let s = SqlStore::open_sqlite(std::path::Path::new(&path))
        .await
        .unwrap();
    let v = vault("crash-vault");
    s.put_vault(&v).await.unwrap();
    for i in 0.. {
        let name = ObjectName::parse(&format!("k-{round}-{i}")).unwrap();
        s.add_key_version(&v.name, &name, &version(i, 1))
            .await
            .unwrap();
        // Printed only after the commit returned: this line is the acknowledgement.
        println!("ack {i}");
    }
}

#[tokio::test]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let mut acked_total = Vec::new();
    for (round, kill_after) in [(0u64, 40usize), (1, 7), (2, 120)] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "crash_child_writer",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .env("KAGI_STORE_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut acked = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(i) = line.strip_prefix("ack ") {
                acked.push(i.parse::<u64>().unwrap());
                if acked.len() == kill_after {
                    child.kill().unwrap(); // SIGKILL: no destructors, no checkpoint.
                    break;
                }
            }
        }
        child.wait().unwrap();
        assert_eq!(
            acked.len(),
            kill_after,
            "child died before {kill_after} acks"
        );
        acked_total.extend(acked.into_iter().map(|i| format!("k-{round}-{i}")));

        let s = SqlStore::open_sqlite(&path).await.unwrap();
        let keys = s.load_keys(&vault("crash-vault").name).await.unwrap();
        let names: std::collections::HashSet<String> =
            keys.iter().map(|k| k.name.as_str().to_string()).collect();
        for name in &acked_total {
            assert!(
                names.contains(name),
                "acknowledged {name} lost after SIGKILL"
            );
        }
        // Key row and version row are one transaction: never one without the other.
        for k in &keys {
            assert_eq!(k.versions.len(), 1, "{} has a torn write", k.name);
        }
    }
}

//! Fixtures shared by the platform's integration tests: opening the platform on a real SQLite
//! store with the movable test clock, signing the administrator in, and a tiny local webhook
//! receiver.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kagi_core::time::TestClock;
use kagi_crypto::AesRootKey;
use kagi_store::{SqlStore, Store};
use kagi_vault::{BootstrapAdmin, Platform, PlatformConfig, Principal};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The root key of every test platform.
pub const ROOT: [u8; 32] = [0x33; 32];

/// The configuration of a platform in `dir` (`https://localhost:8443`).
pub fn config(dir: &Path) -> PlatformConfig {
    PlatformConfig {
        data_dir: dir.to_path_buf(),
        dns_suffix: "localhost".into(),
        port: 8443,
    }
}

/// Opens the platform of `dir` on `clock` (as `kagi server --test-clock` does); the bootstrap
/// administrator when it was created now.
pub async fn open(dir: &Path, clock: &Arc<TestClock>) -> (Platform, Option<BootstrapAdmin>) {
    let store: Arc<dyn Store> =
        Arc::new(SqlStore::open_sqlite(&dir.join("kagi.db")).await.unwrap());
    let (p, admin) = Platform::open_with(
        config(dir),
        clock.clone(),
        Arc::new(AesRootKey::from_bytes(&ROOT)),
        store,
    )
    .await
    .unwrap();
    (p.with_test_clock(clock.clone()), admin)
}

/// The administrator, signed in with its client credentials.
pub async fn sign_in(p: &Platform, creds: &BootstrapAdmin) -> Principal {
    p.authenticate(&token(p, creds).await).unwrap()
}

/// A token for the administrator (client credentials).
pub async fn token(p: &Platform, creds: &BootstrapAdmin) -> String {
    let scope = format!("{}/.default", p.config().authority());
    let form = HashMap::from([
        ("grant_type".to_string(), "client_credentials".to_string()),
        ("client_id".to_string(), creds.client_id.clone()),
        ("client_secret".to_string(), creds.client_secret.clone()),
        ("scope".to_string(), scope),
    ]);
    let grant = p
        .client_credentials(&creds.tenant_id, &form)
        .await
        .unwrap_or_else(|e| panic!("token refused: {}", e.error_description));
    grant.access_token
}

/// A webhook receiver on 127.0.0.1: answers 200 to every POST and keeps what it got, each
/// item of a JSON array (Event Grid's shape) or the JSON value itself (Azure Monitor's).
pub async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() < len {
                        continue;
                    }
                    match serde_json::from_str(&body[..len]) {
                        Ok(Value::Array(items)) => sink.lock().unwrap().extend(items),
                        Ok(v) => sink.lock().unwrap().push(v),
                        Err(_) => {}
                    }
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                    return;
                }
            });
        }
    });
    (url, got)
}

/// What the receiver got once it has `n` items (or after 5 s).
pub async fn wait_for(got: &Arc<Mutex<Vec<Value>>>, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        if got.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    got.lock().unwrap().clone()
}

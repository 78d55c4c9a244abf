//! The backup agent end to end, against the real HTTPS server in-process (`kagi-testkit`):
//! registration, backup and restore of a folder, a passphrase change followed by a lost state
//! directory, and a restore of a lost machine's data on another machine registered with the
//! same vault. The passphrase is checked never to reach the agent's state directory.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::ops::Deref;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kagi_agent::{
    Agent, AgentError, PassphraseSource, ProgressFn, RegisterRequest, Registration, RestoreOptions,
    VaultCredentials,
};
use kagi_testkit::{Options, TestServer};
use serde_json::{Value, json};

const MACHINE1: &str = "host1.corp.example";
const MACHINE2: &str = "host2.corp.example";
const VAULT: &str = "bv1";

/// The shared harness, with this file's resources (resource group `rg1` and its vaults).
struct Server(TestServer);

impl Deref for Server {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.0
    }
}

/// The agent connects to `https://localhost:PORT` through the system resolver, which may
/// answer 127.0.0.1 or ::1: the server listens on both.
async fn start() -> Server {
    Server(
        TestServer::start(Options {
            dual_stack: true,
            arm_api_version: "2023-04-01",
            ..Options::default()
        })
        .await,
    )
}

impl Server {
    fn rg(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/rg1",
            self.admin.subscription_id
        )
    }

    fn bv(&self, name: &str) -> String {
        format!(
            "{}/providers/Microsoft.RecoveryServices/vaults/{name}",
            self.rg()
        )
    }

    /// The resource group and a backup vault with a system-assigned identity; its credentials.
    async fn vault_with_credentials(&self, name: &str) -> VaultCredentials {
        let (st, v) = self
            .arm(
                "PUT",
                &format!(
                    "/subscriptions/{}/resourcegroups/rg1",
                    self.admin.subscription_id
                ),
                Some(json!({"location": "westeurope"})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
        let (st, v) = self
            .arm(
                "PUT",
                &self.bv(name),
                Some(json!({"location": "westeurope",
                    "identity": {"type": "SystemAssigned"}, "properties": {}})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
        let (st, creds) = self
            .arm("POST", &format!("{}/vaultCredentials", self.bv(name)), None)
            .await;
        assert_eq!(st, 200, "{creds}");
        let creds: VaultCredentials = serde_json::from_value(creds).unwrap();
        assert_eq!(creds.server_url, format!("https://localhost:{}", self.port));
        assert_eq!(creds.vault_name, name);
        creds
    }

    /// The backup vault's folder on the server.
    fn vault_dir(&self, name: &str) -> PathBuf {
        self.backup_vault_dir(&self.admin.subscription_id, "rg1", name)
    }

    /// A machine's repository objects on the server.
    fn machine_dir(&self, vault: &str, machine: &str) -> PathBuf {
        self.vault_dir(vault)
            .join("agents/machines")
            .join(machine.to_ascii_lowercase())
    }
}

fn quiet() -> ProgressFn {
    Arc::new(|_: &kagi_backup::Progress| {})
}

/// Every file and folder under `dir` (relative path → content; folders map to `None`).
fn tree(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.insert(rel, None);
                walk(root, &p, out);
            } else {
                out.insert(rel, Some(std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

fn make_source(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub/empty")).unwrap();
    std::fs::write(dir.join("a.txt"), b"hello agent\n").unwrap();
    std::fs::write(dir.join("sub/empty-file"), b"").unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("sub/big.bin"), &big).unwrap();
    std::fs::set_permissions(dir.join("a.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("a.txt", dir.join("link")).unwrap();
    std::os::unix::fs::symlink("../nowhere", dir.join("sub/dangling")).unwrap();
}

/// `a` and `b` hold the same tree: names, kinds, modes, symlink targets, bytes.
fn assert_same(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let ea = names(a);
    assert_eq!(ea, names(b), "{} vs {}", a.display(), b.display());
    for n in ea {
        let (pa, pb) = (a.join(&n), b.join(&n));
        let (ma, mb) = (
            std::fs::symlink_metadata(&pa).unwrap(),
            std::fs::symlink_metadata(&pb).unwrap(),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "{}", pa.display());
        if ma.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&pa).unwrap(),
                std::fs::read_link(&pb).unwrap()
            );
            continue;
        }
        assert_eq!(
            ma.permissions().mode(),
            mb.permissions().mode(),
            "{}",
            pa.display()
        );
        if ma.is_dir() {
            assert_same(&pa, &pb);
        } else {
            assert_eq!(
                std::fs::read(&pa).unwrap(),
                std::fs::read(&pb).unwrap(),
                "{}",
                pa.display()
            );
        }
    }
}

/// No file of the state directory holds any of `secrets` (as bytes, or base64-encoded), and
/// `agent.json` is private.
fn assert_no_passphrase(state_dir: &Path, secrets: &[&str]) {
    let files = tree(state_dir);
    assert!(!files.is_empty(), "{} is empty", state_dir.display());
    for (rel, content) in &files {
        let Some(bytes) = content else { continue };
        for s in secrets {
            for needle in [
                s.as_bytes().to_vec(),
                kagi_core::b64::encode(s.as_bytes()).into_bytes(),
            ] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                    "{} holds a passphrase",
                    rel.display()
                );
            }
        }
    }
    let mode = std::fs::metadata(state_dir.join("agent.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

fn key_entries_on_server(s: &Server, machine: &str) -> Vec<Value> {
    tree(&s.machine_dir(VAULT, machine).join("keys"))
        .into_values()
        .flatten()
        .map(|b| serde_json::from_slice(&b).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_backup_change_passphrase_and_restore_elsewhere() {
    let s = start().await;
    let creds = s.vault_with_credentials(VAULT).await;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_source(&src);
    let state1 = work.path().join("state1");
    let state2 = work.path().join("state2");
    std::fs::create_dir(&state1).unwrap();
    std::fs::create_dir(&state2).unwrap();
    let old_pass = "old passphrase: correct horse battery staple";
    let new_pass = kagi_agent::passphrase::generate().unwrap();
    let new_pass: &str = &new_pass;
    let pass2 = "machine two's own passphrase";
    let wrong = "not the passphrase of anything";
    let all = [old_pass, new_pass, pass2, wrong];

    // 1. Register without a key vault, protect a folder, back up, restore byte for byte.
    let (mut a1, out) = kagi_agent::register(
        &state1,
        RegisterRequest {
            credentials: &creds,
            machine: MACHINE1,
            passphrase: old_pass,
            key_vault_uri: None,
        },
    )
    .await
    .unwrap();
    assert!(out.repository_created, "{out:?}");
    assert!(!out.registered_again, "{out:?}");
    assert_eq!(out.secret_id, None);
    assert_eq!(a1.state.registration, Registration::Complete);
    let entries = key_entries_on_server(&s, MACHINE1);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["kek"]["kind"], "passphrase");
    assert_eq!(entries[0]["kek"]["kdf"], "argon2id");
    assert_eq!(entries[0]["kek"]["memoryKiB"], 65536);
    assert_eq!(entries[0]["kek"]["iterations"], 3);
    assert_no_passphrase(&state1, &all);

    let folder = a1.protect(&src, None, None).unwrap();
    assert_eq!(
        Path::new(&folder.path),
        std::fs::canonicalize(&src).unwrap()
    );
    let stats = a1.backup(&folder.path, quiet()).await.unwrap();
    assert!(stats.skipped.is_empty(), "{:?}", stats.skipped);
    let rp = stats.snapshot.id.clone();
    let points = a1
        .recovery_points(None, &PassphraseSource::Local)
        .await
        .unwrap();
    assert_eq!(
        points.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        [rp.as_str()]
    );
    // The server holds only ciphertext: no object contains the file's text.
    for (name, content) in tree(&s.machine_dir(VAULT, MACHINE1)) {
        if let Some(b) = content {
            assert!(
                !b.windows(11).any(|w| w == b"hello agent"),
                "{} holds plaintext",
                name.display()
            );
        }
    }
    let out1 = work.path().join("out1");
    std::fs::create_dir(&out1).unwrap();
    let r = a1
        .restore(
            None,
            &PassphraseSource::Local,
            &rp,
            None,
            &out1,
            RestoreOptions::default(),
            quiet(),
        )
        .await
        .unwrap();
    assert_eq!(r.symlinks, 2, "{r:?}");
    assert_same(&src, &out1);
    assert!(out1.join("sub/empty").is_dir());
    assert_no_passphrase(&state1, &all);

    // 2. A new passphrase; then the state directory is lost.
    let sid = a1.set_passphrase(new_pass, None).await.unwrap();
    assert_eq!(sid, None);
    let entries = key_entries_on_server(&s, MACHINE1);
    assert_eq!(entries.len(), 1, "the old entry is removed: {entries:?}");
    assert_no_passphrase(&state1, &all);
    drop(a1);
    std::fs::remove_dir_all(&state1).unwrap();
    std::fs::create_dir(&state1).unwrap();

    // Registering again with the old passphrase fails before anything is written.
    let server_before = tree(&s.vault_dir(VAULT));
    let e = kagi_agent::register(
        &state1,
        RegisterRequest {
            credentials: &creds,
            machine: MACHINE1,
            passphrase: old_pass,
            key_vault_uri: None,
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(e, AgentError::WrongPassphrase), "{e:?}");
    assert!(
        tree(&s.vault_dir(VAULT)) == server_before,
        "a registration with the wrong passphrase changed the server"
    );
    assert!(
        tree(&state1).is_empty(),
        "{:?}",
        tree(&state1).keys().collect::<Vec<_>>()
    );

    // With the new one it succeeds, opens the existing repository (leaving its config as it
    // was), and the point restores.
    let config = std::fs::read(s.machine_dir(VAULT, MACHINE1).join("config")).unwrap();
    let (a1, out) = kagi_agent::register(
        &state1,
        RegisterRequest {
            credentials: &creds,
            machine: MACHINE1,
            passphrase: new_pass,
            key_vault_uri: None,
        },
    )
    .await
    .unwrap();
    assert!(out.registered_again, "{out:?}");
    assert!(
        !out.repository_created,
        "registering again must open the existing repository: {out:?}"
    );
    assert!(
        std::fs::read(s.machine_dir(VAULT, MACHINE1).join("config")).unwrap() == config,
        "registering again rewrote the repository's config"
    );
    assert_eq!(a1.state.registration, Registration::Complete);
    assert_eq!(key_entries_on_server(&s, MACHINE1).len(), 1);
    let out2 = work.path().join("out2");
    std::fs::create_dir(&out2).unwrap();
    a1.restore(
        None,
        &PassphraseSource::Local,
        &rp,
        None,
        &out2,
        RestoreOptions::default(),
        quiet(),
    )
    .await
    .unwrap();
    assert_same(&src, &out2);
    assert_no_passphrase(&state1, &all);
    // The state survives a reopen.
    let a1 = Agent::open(&state1).unwrap();

    // 3. Another machine of the vault restores machine 1's recovery point with its passphrase.
    let (a2, out) = kagi_agent::register(
        &state2,
        RegisterRequest {
            credentials: &creds,
            machine: MACHINE2,
            passphrase: pass2,
            key_vault_uri: None,
        },
    )
    .await
    .unwrap();
    assert!(out.repository_created && !out.registered_again, "{out:?}");
    let machines = a2.machines().await.unwrap();
    let mut names: Vec<&str> = machines["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, [MACHINE1, MACHINE2], "{machines}");
    let points = a2
        .recovery_points(Some(MACHINE1), &PassphraseSource::Given(new_pass))
        .await
        .unwrap();
    assert_eq!(
        points.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        [rp.as_str()]
    );
    let out3 = work.path().join("out3");
    a2.restore(
        Some(MACHINE1),
        &PassphraseSource::Given(new_pass),
        &rp,
        None,
        &out3,
        RestoreOptions::default(),
        quiet(),
    )
    .await
    .unwrap();
    assert_same(&src, &out3);

    // A wrong passphrase (and the one replaced in step 2) writes nothing.
    let out4 = work.path().join("out4");
    let out5 = work.path().join("out5");
    std::fs::create_dir(&out5).unwrap();
    for (pass, target) in [(wrong, &out4), (old_pass, &out4), (wrong, &out5)] {
        let e = a2
            .restore(
                Some(MACHINE1),
                &PassphraseSource::Given(pass),
                &rp,
                None,
                target,
                RestoreOptions::default(),
                quiet(),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::WrongPassphrase), "{e:?}");
    }
    assert!(!out4.exists());
    assert!(tree(&out5).is_empty());
    // Its own data key does not open machine 1's backups.
    let e = a2
        .restore(
            Some(MACHINE1),
            &PassphraseSource::Local,
            &rp,
            None,
            &out4,
            RestoreOptions::default(),
            quiet(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::Invalid(_)), "{e:?}");
    assert!(!out4.exists());

    // Machine 2 may read machine 1's objects, never change them.
    let http = kagi_agent::remote::https_client(&creds.ca_certificate).unwrap();
    let auth = format!(
        "KagiAgent {MACHINE2}:{}",
        a2.state.machine_secret.as_deref().unwrap()
    );
    let objects = |m: &str| {
        format!(
            "{}/kagi/agent{}/machines/{m}/objects",
            creds.server_url, creds.vault_id
        )
    };
    let m1_before = tree(&s.machine_dir(VAULT, MACHINE1));
    let r = http
        .get(format!("{}/config", objects(MACHINE1)))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    for (method, name) in [
        ("PUT", "config"),
        ("PUT", "keys/intruder"),
        ("DELETE", "config"),
    ] {
        let r = http
            .request(
                method.parse().unwrap(),
                format!("{}/{name}", objects(MACHINE1)),
            )
            .header("authorization", &auth)
            .body(b"not machine 2's to write".to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{method} {name}");
    }
    assert!(tree(&s.machine_dir(VAULT, MACHINE1)) == m1_before);
    // The same credential writes its own machine's objects.
    let own = format!("{}/probe-object", objects(MACHINE2));
    let r = http
        .put(&own)
        .header("authorization", &auth)
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = http
        .delete(&own)
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);

    // Machine 1 still backs up (its folders went with the lost state) and restores.
    let mut a1 = a1;
    assert!(a1.state.folders.is_empty());
    a1.protect(&src, None, None).unwrap();
    std::fs::write(src.join("later.txt"), b"written after the first backup").unwrap();
    let stats = a1.backup(&folder.path, quiet()).await.unwrap();
    let out6 = work.path().join("out6");
    a1.restore(
        None,
        &PassphraseSource::Local,
        &stats.snapshot.id,
        None,
        &out6,
        RestoreOptions::default(),
        quiet(),
    )
    .await
    .unwrap();
    assert_same(&src, &out6);

    // 4. Neither state directory ever held a passphrase.
    assert_no_passphrase(&state1, &all);
    assert_no_passphrase(&state2, &all);
}

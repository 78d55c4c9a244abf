//! `kagi bench hsm-raw` against a fresh SoftHSM2 token (scripts/setup.sh installs softhsm2):
//! both operations measured at each thread count, and the key it made gone afterwards.

#![allow(clippy::unwrap_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "1234-bench";

fn token(dir: &Path) -> std::path::PathBuf {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let status = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            PIN,
            "--so-pin",
            "5678-so",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("softhsm2-util (scripts/setup.sh installs softhsm2)");
    assert!(status.success());
    let pin = dir.join("pin");
    std::fs::write(&pin, format!("{PIN}\n")).unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    conf
}

/// The token's object files (SoftHSM's file store keeps one per object, besides
/// `token.object` for the token itself).
fn objects(dir: &Path) -> usize {
    let mut n = 0;
    for slot in std::fs::read_dir(dir.join("tokens")).unwrap() {
        for f in std::fs::read_dir(slot.unwrap().path()).unwrap() {
            let name = f.unwrap().file_name();
            let name = name.to_string_lossy();
            n += usize::from(name.ends_with(".object") && name != "token.object");
        }
    }
    n
}

#[test]
fn hsm_raw_measures_the_token_and_leaves_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let conf = token(dir.path());
    let before = objects(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_kagi"))
        .env("SOFTHSM2_CONF", &conf)
        .args(["bench", "hsm-raw", "--pkcs11-module", MODULE])
        .args(["--pkcs11-token", "bench", "--pkcs11-pin-file"])
        .arg(dir.path().join("pin"))
        .args(["--seconds", "1", "--threads", "1,2", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<_> = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert!(r["ops_per_s"].as_f64().unwrap() > 0.0, "{r}");
            (
                r["source"].as_str().unwrap().to_string(),
                r["op"].as_str().unwrap().to_string(),
                r["threads"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<_> = [("unwrap", 1), ("sign", 1), ("unwrap", 2), ("sign", 2)]
        .iter()
        .map(|(op, t)| ("token".to_string(), op.to_string(), *t))
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        objects(dir.path()),
        before,
        "the benchmark key was not destroyed"
    );
}

#[test]
fn hsm_raw_without_a_token_says_what_it_needs() {
    let out = Command::new(env!("CARGO_BIN_EXE_kagi"))
        .env_remove("KAGI_PKCS11_MODULE")
        .args(["bench", "hsm-raw", "--seconds", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--pkcs11-module"), "{err}");
}

//! `kagi server --pkcs11-module … --pkcs11-token … --pkcs11-pin-file …`: the HSM that seals
//! the root key and holds RSA-HSM and EC-HSM keys.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use kagi_crypto::KeyProvider;
use kagi_hsm::{Pkcs11Config, Pkcs11Provider};
use zeroize::Zeroizing;

/// The PKCS#11 flags of `kagi server`.
#[derive(Args, Debug)]
pub(crate) struct Pkcs11Args {
    /// PKCS#11 module of an HSM (e.g. /usr/lib/softhsm/libsofthsm2.so). With it, the root key
    /// exists only sealed by the token (`<data>/root.key.sealed`; a plain `root.key` is sealed
    /// and removed on the first start) and premium vaults get RSA-HSM and EC-HSM keys.
    #[arg(long, env = "KAGI_PKCS11_MODULE", requires_all = ["pkcs11_token", "pkcs11_pin_file"])]
    pub(crate) pkcs11_module: Option<PathBuf>,
    /// Label of the token to use.
    #[arg(long, env = "KAGI_PKCS11_TOKEN", requires = "pkcs11_module")]
    pub(crate) pkcs11_token: Option<String>,
    /// File holding the token's user PIN (one line; mode 0600).
    #[arg(long, env = "KAGI_PKCS11_PIN_FILE", requires = "pkcs11_module")]
    pub(crate) pkcs11_pin_file: Option<PathBuf>,
}

impl Pkcs11Args {
    /// Opens the token, or `None` without `--pkcs11-module`.
    pub(crate) fn open(&self) -> anyhow::Result<Option<Arc<dyn KeyProvider>>> {
        let (Some(module), Some(token), Some(pin_file)) = (
            &self.pkcs11_module,
            &self.pkcs11_token,
            &self.pkcs11_pin_file,
        ) else {
            return Ok(None);
        };
        let meta = std::fs::metadata(pin_file)
            .with_context(|| format!("--pkcs11-pin-file {}", pin_file.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            anyhow::bail!(
                "--pkcs11-pin-file {} is readable by other users; run: chmod 600 {}",
                pin_file.display(),
                pin_file.display()
            );
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(pin_file)
                .with_context(|| format!("--pkcs11-pin-file {}", pin_file.display()))?,
        );
        let pin = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned());
        let provider = Pkcs11Provider::open(&Pkcs11Config {
            module: module.clone(),
            token_label: token.clone(),
            pin,
        })?;
        Ok(Some(Arc::new(provider)))
    }
}

//! Key material inside a PKCS#11 token: kagi's [`KeyProvider`] for RSA-HSM and EC-HSM keys,
//! and the protector of kagi's root key.
//!
//! Every key kagi makes here is a token object that is sensitive and not extractable; private
//! operations run inside the token. Where the token lacks a mechanism (SoftHSM2 2.6 has
//! RSA-OAEP with SHA-1 only), the token does the raw RSA operation and the padding is
//! decoded outside ([`kagi_crypto::padding`]). The formats are in docs/HSM.md.
//!
//! No `unsafe` here: the `cryptoki` crate owns the FFI.

#![forbid(unsafe_code)]

mod ops;
mod session;
mod token;

pub use token::{HsmError, Pkcs11Config, Pkcs11Provider};

// Shared fixtures for the store's integration tests: the contract suite's own.
#![allow(unused_imports, missing_docs)]

pub use kagi_store::contract::{SUB, TENANT, key_version as version, secret_version, vault};

// Shared fixtures for the store's integration tests.
#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use kagi_core::key::{KeyAttributes, KeyOperation, KeyType, KeyVersionInfo, PublicJwk};
use kagi_core::vault::{VaultProperties, VaultPropertiesInput};
use kagi_core::{KeyVersion, VaultName};
use kagi_store::{KeyVersionRecord, VaultRecord};

pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
pub const SUB: &str = "00000000-1111-4222-8333-444444444444";

pub fn vault(name: &str) -> VaultRecord {
    let input: VaultPropertiesInput = serde_json::from_value(serde_json::json!({
        "tenantId": TENANT, "sku": {"family": "A", "name": "standard"}
    }))
    .unwrap();
    VaultRecord {
        name: VaultName::parse(name).unwrap(),
        subscription_id: SUB.into(),
        resource_group: "rg".into(),
        location: "westeurope".into(),
        tags: Default::default(),
        properties: VaultProperties::create(input).unwrap(),
        created: 1,
        updated: 1,
        deleted_at: None,
        purge_at: None,
    }
}

pub fn version(i: u64, seq: i64) -> KeyVersionRecord {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&i.to_be_bytes());
    bytes[8..].copy_from_slice(&(seq as u64).to_be_bytes());
    KeyVersionRecord {
        version: KeyVersion::from_random(bytes),
        seq,
        info: KeyVersionInfo {
            kty: KeyType::Rsa,
            public: PublicJwk::Rsa {
                n: vec![0xc3; 256],
                e: vec![1, 0, 1],
            },
            key_ops: vec![KeyOperation::WrapKey, KeyOperation::UnwrapKey],
            attributes: KeyAttributes {
                enabled: true,
                nbf: None,
                exp: None,
                created: 10,
                updated: 10,
                exportable: false,
            },
            tags: Default::default(),
        },
        sealed_private: vec![7; 64],
    }
}

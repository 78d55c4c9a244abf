//! The backup agent's rules that the server and the agent share (MISSION MP-1..MP-7): machine
//! names, the name of the key vault secret that keeps a machine's passphrase, the passphrase
//! length rule, and the agent error codes with their numbers.
//!
//! Secret names: Azure Backup names the secret `AzBackup-<machine FQDN>-<vault name>`, but a
//! key vault secret name holds only ASCII letters, digits and `-` (1–127 characters). So each
//! `.` and `_` of the FQDN becomes `-` (`host1.corp.example` → `AzBackup-host1-corp-example-
//! vault1`); a machine name with any other character is refused (it cannot be an FQDN), and so
//! is a name whose secret name would exceed 127 characters. Two FQDNs that differ only in `.`
//! versus `-` map to the same secret: the vault refuses to store the second one's passphrase
//! (409 `UserErrorSecretNameInUse`).

use crate::{ErrorCode, KvError};

/// The shortest passphrase accepted (characters).
pub const MIN_PASSPHRASE_CHARS: usize = 16;

/// The longest secret name a key vault accepts.
const MAX_SECRET_NAME: usize = 127;

/// An agent error with its Azure Backup number: the code the agent prints and the message
/// that explains the fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentErrorCode {
    /// The number Azure Backup shows (e.g. 391224).
    pub number: u32,
    /// The symbolic code (the `innererror.code` on the wire).
    pub name: &'static str,
    /// The HTTP code family.
    pub code: ErrorCode,
}

impl AgentErrorCode {
    /// An error of this code with `message` (which should say how to fix it).
    pub fn error(self, message: impl Into<String>) -> KvError {
        KvError::new(
            self.code,
            format!("{} ({}): {}", self.name, self.number, message.into()),
        )
        .with_inner(self.name)
    }

    /// The code whose symbolic name is `name`, if it is one of the agent's.
    pub fn by_name(name: &str) -> Option<Self> {
        ALL.iter().copied().find(|c| c.name == name)
    }
}

/// 391224: the backup vault has no system-assigned identity (a user-assigned one does not count).
pub const SYSTEM_IDENTITY_NOT_CONFIGURED: AgentErrorCode = AgentErrorCode {
    number: 391224,
    name: "UserErrorSystemIdentityNotConfigured",
    code: ErrorCode::BadRequest,
};
/// 391225: the vault's identity may not set secrets in that key vault.
pub const KEY_VAULT_PERMISSION_NOT_CONFIGURED: AgentErrorCode = AgentErrorCode {
    number: 391225,
    name: "UserErrorKeyVaultPermissionsNotConfigured",
    code: ErrorCode::Forbidden,
};
/// 100272: the key vault URI is not a key vault URI.
pub const INVALID_KEY_VAULT_URI: AgentErrorCode = AgentErrorCode {
    number: 100272,
    name: "UserErrorInvalidKeyVaultUri",
    code: ErrorCode::BadRequest,
};
/// 391282: the machine's secret exists in the soft-deleted state.
pub const SECRET_EXISTS_SOFT_DELETED: AgentErrorCode = AgentErrorCode {
    number: 391282,
    name: "UserErrorSecretExistsSoftDeleted",
    code: ErrorCode::Conflict,
};
/// 391283: the key vault is soft-deleted.
pub const KEY_VAULT_SOFT_DELETED: AgentErrorCode = AgentErrorCode {
    number: 391283,
    name: "UserErrorKeyVaultSoftDeleted",
    code: ErrorCode::Conflict,
};
/// The backup vault uses a customer-managed key: agent data is passphrase-encrypted (BK-11).
pub const CMK_VAULT_NOT_SUPPORTED: AgentErrorCode = AgentErrorCode {
    number: 391290,
    name: "UserErrorAgentNotSupportedOnCmkVault",
    code: ErrorCode::BadRequest,
};
/// The vault credentials are expired, unknown, or for another vault.
pub const INVALID_VAULT_CREDENTIALS: AgentErrorCode = AgentErrorCode {
    number: 100110,
    name: "UserErrorInvalidVaultCredentials",
    code: ErrorCode::Unauthorized,
};

const ALL: [AgentErrorCode; 7] = [
    SYSTEM_IDENTITY_NOT_CONFIGURED,
    KEY_VAULT_PERMISSION_NOT_CONFIGURED,
    INVALID_KEY_VAULT_URI,
    SECRET_EXISTS_SOFT_DELETED,
    KEY_VAULT_SOFT_DELETED,
    CMK_VAULT_NOT_SUPPORTED,
    INVALID_VAULT_CREDENTIALS,
];

fn bad(message: String) -> KvError {
    KvError::new(ErrorCode::BadRequest, message).with_inner("InvalidMachineName")
}

/// Checks a machine's fully qualified name: 1–253 characters, dot-separated labels of ASCII
/// letters, digits, `-` and `_`, none empty.
pub fn validate_machine_name(name: &str) -> Result<(), KvError> {
    let shown = crate::ids::printable(name);
    if name.is_empty() || name.len() > 253 {
        return Err(bad(format!(
            "The machine name '{shown}' must be 1-253 characters."
        )));
    }
    for label in name.split('.') {
        if label.is_empty()
            || !label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(format!(
                "The machine name '{shown}' is not a fully qualified host name: labels of \
                 letters, digits, '-' and '_' separated by single dots."
            )));
        }
    }
    Ok(())
}

/// The key vault secret that keeps a machine's passphrase: `AzBackup-<FQDN>-<vault>`, with
/// `.` and `_` mapped to `-` (see the module docs).
pub fn passphrase_secret_name(machine: &str, vault: &str) -> Result<String, KvError> {
    validate_machine_name(machine)?;
    let mapped: String = machine
        .chars()
        .map(|c| if c == '.' || c == '_' { '-' } else { c })
        .collect();
    let name = format!("AzBackup-{mapped}-{vault}");
    if name.len() > MAX_SECRET_NAME || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(bad(format!(
            "The secret name for machine '{}' and vault '{}' would be '{}', which is not a valid \
             key vault secret name (letters, digits and '-', at most {MAX_SECRET_NAME} \
             characters).",
            crate::ids::printable(machine),
            crate::ids::printable(vault),
            crate::ids::printable(&name)
        )));
    }
    Ok(name)
}

/// Checks a passphrase: at least [`MIN_PASSPHRASE_CHARS`] characters, not all whitespace.
pub fn validate_passphrase(passphrase: &str) -> Result<(), KvError> {
    if passphrase.chars().count() < MIN_PASSPHRASE_CHARS || passphrase.trim().is_empty() {
        return Err(KvError::new(
            ErrorCode::BadRequest,
            format!("The passphrase must have at least {MIN_PASSPHRASE_CHARS} characters."),
        )
        .with_inner("PassphraseTooShort"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_map_dots_and_underscores() {
        assert_eq!(
            passphrase_secret_name("host1.corp.example", "vault1").unwrap(),
            "AzBackup-host1-corp-example-vault1"
        );
        assert_eq!(
            passphrase_secret_name("my_host", "v").unwrap(),
            "AzBackup-my-host-v"
        );
    }

    #[test]
    fn bad_machine_names_are_refused() {
        for m in [
            "",
            "a..b",
            ".a",
            "a.",
            "host name",
            "hôte",
            "a/b",
            &"a".repeat(254),
        ] {
            let e = passphrase_secret_name(m, "v").unwrap_err();
            assert_eq!(e.inner, Some("InvalidMachineName"), "{m}");
        }
        // Valid FQDN, but the secret name would be too long.
        let long = format!("{}.{}", "a".repeat(60), "b".repeat(60));
        assert!(passphrase_secret_name(&long, "vault").is_err());
    }

    #[test]
    fn passphrases_need_sixteen_characters() {
        assert!(validate_passphrase("0123456789abcdef").is_ok());
        assert!(validate_passphrase("0123456789abcde").is_err());
        assert!(validate_passphrase(&" ".repeat(20)).is_err());
        assert!(validate_passphrase("").is_err());
    }

    #[test]
    fn errors_carry_number_and_name() {
        let e = SECRET_EXISTS_SOFT_DELETED.error("Recover it first.");
        assert_eq!(e.status(), 409);
        assert_eq!(e.inner, Some("UserErrorSecretExistsSoftDeleted"));
        assert!(e.message.contains("391282"));
        assert_eq!(
            AgentErrorCode::by_name("UserErrorKeyVaultSoftDeleted").map(|c| c.number),
            Some(391283)
        );
    }
}

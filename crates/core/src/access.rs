//! Access decisions: the permissions a data-plane operation needs, who asks, and firewall
//! address ranges. A vault's access policies are evaluated by
//! [`crate::vault::VaultProperties::access_policies_allow`]. Pure functions.

use std::net::IpAddr;

use crate::{ErrorCode, KvError};

macro_rules! permissions {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $wire:literal,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $(
                #[doc = concat!("`", $wire, "`")]
                $variant,
            )*
        }

        impl $name {
            /// Parses a permission name, case-insensitively (`Get`, `get`, `all`).
            pub fn parse(text: &str) -> Result<Self, KvError> {
                let lower = text.to_ascii_lowercase();
                $(if lower == $wire.to_ascii_lowercase() { return Ok(Self::$variant); })*
                Err(KvError::new(
                    ErrorCode::BadRequest,
                    format!("Unknown permission '{}'.", crate::ids::printable(text)),
                ))
            }

            /// The wire name.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $wire,)* }
            }
        }
    };
}

permissions!(
    /// A key permission of an access policy.
    KeyPermission {
        All => "all",
        Get => "get",
        List => "list",
        Create => "create",
        Update => "update",
        Import => "import",
        Delete => "delete",
        Recover => "recover",
        Backup => "backup",
        Restore => "restore",
        Decrypt => "decrypt",
        Encrypt => "encrypt",
        UnwrapKey => "unwrapKey",
        WrapKey => "wrapKey",
        Verify => "verify",
        Sign => "sign",
        Purge => "purge",
        Rotate => "rotate",
        GetRotationPolicy => "getrotationpolicy",
        SetRotationPolicy => "setrotationpolicy",
        Release => "release",
    }
);

permissions!(
    /// A secret permission of an access policy.
    SecretPermission {
        All => "all",
        Get => "get",
        List => "list",
        Set => "set",
        Delete => "delete",
        Recover => "recover",
        Backup => "backup",
        Restore => "restore",
        Purge => "purge",
    }
);

/// What a data-plane request asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataAction {
    /// A key operation.
    Key(KeyPermission),
    /// A secret operation.
    Secret(SecretPermission),
    /// `POST /rng`: any authenticated caller of the vault's tenant may ask for random bytes.
    Random,
}

impl DataAction {
    /// The operation's name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Key(p) => p.as_str(),
            Self::Secret(p) => p.as_str(),
            Self::Random => "rng",
        }
    }
}

/// A caller as the vault sees it: tenant and object id (and the application it acts through).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Tenant id claim.
    pub tenant_id: String,
    /// Object id claim.
    pub object_id: String,
    /// Application (client) id claim.
    pub application_id: Option<String>,
}

/// The application id of a user's token when no application authenticated with the password
/// grant (kagi's public client). Anyone can claim a client id, so a token of this client acts for
/// the user alone: a compound access-policy entry ("user via application X") never admits it,
/// not even one that names this id.
pub const PUBLIC_CLIENT_APP_ID: &str = "2f0e6a3c-6b55-4c8e-9a4f-1d7b3e5c9a01";

/// An address range of a firewall rule: one address or a CIDR block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix: u8,
}

impl IpRange {
    /// Parses `a.b.c.d`, `a.b.c.d/n` or an IPv6 equivalent.
    pub fn parse(text: &str) -> Result<Self, KvError> {
        let invalid = || {
            KvError::new(
                ErrorCode::BadRequest,
                format!(
                    "'{}' is not a valid IP address or CIDR range.",
                    crate::ids::printable(text)
                ),
            )
        };
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| invalid())?)),
            None => (text, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| invalid())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(invalid());
        }
        Ok(Self { network, prefix })
    }

    /// Whether `ip` lies in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_ranges() {
        let r = IpRange::parse("10.1.0.0/16").unwrap();
        assert!(r.contains("10.1.200.3".parse().unwrap()));
        assert!(!r.contains("10.2.0.1".parse().unwrap()));
        assert!(r.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(
            IpRange::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(IpRange::parse("10.0.0.0/33").is_err());
        assert!(IpRange::parse("nope").is_err());
        let one = IpRange::parse("::1").unwrap();
        assert!(one.contains("::1".parse().unwrap()));
    }
}

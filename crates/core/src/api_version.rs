//! The `api-version` query parameter: Key Vault data-plane versions kagi answers.

use crate::KvError;

/// Checks a data-plane api-version: `7.4` … `7.6` (with `-preview.N` tails) and the dated
/// versions from `2025-01-01` up to `2026-04-01`, which today's SDKs send.
pub fn check_data_plane(version: Option<&str>) -> Result<(), KvError> {
    let Some(v) = version else {
        return Err(
            KvError::bad_parameter("The api-version query parameter is required.")
                .with_inner("MissingApiVersionParameter"),
        );
    };
    let base = v.split("-preview").next().unwrap_or(v);
    let ok = match base {
        "7.4" | "7.5" | "7.6" => true,
        dated => {
            dated.len() == 10
                && dated.chars().enumerate().all(|(i, c)| match i {
                    4 | 7 => c == '-',
                    _ => c.is_ascii_digit(),
                })
                && ("2025-01-01"..="2026-04-01").contains(&dated)
        }
    };
    if ok {
        Ok(())
    } else {
        Err(KvError::bad_parameter(format!(
            "The specified version ({}) is not recognized. Consider using the latest supported \
             version (2025-07-01).",
            crate::ids::printable(v)
        ))
        .with_inner("InvalidApiVersionParameter"))
    }
}

/// Checks an ARM api-version: any dated version is accepted (ARM clients pin many).
pub fn check_arm(version: Option<&str>) -> Result<(), KvError> {
    match version {
        Some(v) if v.len() >= 10 && v.as_bytes()[4] == b'-' => Ok(()),
        Some(v) => Err(KvError::new(
            crate::ErrorCode::BadRequest,
            format!("The api-version '{}' is invalid.", crate::ids::printable(v)),
        )),
        None => Err(KvError::new(
            crate::ErrorCode::BadRequest,
            "The api-version query parameter (?api-version=) is required for all requests.",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for ok in ["7.4", "7.5", "7.6-preview.2", "2025-07-01", "2026-04-01"] {
            assert!(check_data_plane(Some(ok)).is_ok(), "{ok}");
        }
        for bad in ["1.0", "7.3", "2024-12-31", "2026-04-02", "", "abc"] {
            assert!(check_data_plane(Some(bad)).is_err(), "{bad}");
        }
        assert!(check_data_plane(None).is_err());
        assert!(check_arm(Some("2023-07-01")).is_ok());
        assert!(check_arm(Some("x")).is_err());
    }
}

//! SQL logins of a server: the administrator login set through ARM and logins created in SQL
//! (`CREATE USER … PASSWORD`). Kept as SCRAM-SHA-256 verifiers (never passwords), sealed under
//! kagi's root key in the server's `logins` document.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kagi_core::KvError;
use kagi_host::ServiceHost;
use kagi_pgsql::ScramVerifier;
use serde_json::{Value, json};

use crate::keys::{SERVER_DOC, internal};

/// The name of the lock that serialises changes of server `server_id`'s logins.
pub(crate) fn lock_name(server_id: &str) -> String {
    format!("{server_id}/logins")
}

/// The seal label of a login's verifier (bound to server and login).
fn label(server_id: &str, login: &str) -> String {
    format!(
        "sql-login/{}/{}",
        server_id.to_ascii_lowercase(),
        login.to_ascii_lowercase()
    )
}

async fn doc(host: &dyn ServiceHost, server_id: &str) -> Result<Value, KvError> {
    Ok(host
        .document(server_id, SERVER_DOC, "logins")
        .await?
        .unwrap_or_else(|| json!({"logins": {}})))
}

/// Stores `verifier` for `login` (replacing its earlier one); `admin` marks the server
/// administrator, who may create and drop other logins.
pub(crate) async fn put(
    host: &dyn ServiceHost,
    server_id: &str,
    login: &str,
    verifier: &ScramVerifier,
    admin: bool,
) -> Result<(), KvError> {
    let sealed = host.seal_secret(&label(server_id, login), verifier.to_string().as_bytes())?;
    let mut d = doc(host, server_id).await?;
    d["logins"][login.to_ascii_lowercase()] =
        json!({"name": login, "verifier": B64.encode(sealed), "admin": admin});
    host.put_document(server_id, SERVER_DOC, "logins", &d).await
}

/// Sets the administrator's password.
pub(crate) async fn set_admin(
    host: &dyn ServiceHost,
    server_id: &str,
    login: &str,
    password: &str,
) -> Result<(), KvError> {
    let verifier =
        ScramVerifier::from_password(password).map_err(|e| internal("password verifier", e))?;
    put(host, server_id, login, &verifier, true).await
}

/// The verifier of `login`, and whether it is the administrator; `None` when no such login.
pub(crate) async fn get(
    host: &dyn ServiceHost,
    server_id: &str,
    login: &str,
) -> Result<Option<(ScramVerifier, bool)>, KvError> {
    let d = doc(host, server_id).await?;
    let entry = &d["logins"][login.to_ascii_lowercase()];
    let Some(sealed) = entry["verifier"].as_str().and_then(|s| B64.decode(s).ok()) else {
        return Ok(None);
    };
    let opened = host.open_secret(&label(server_id, login), &sealed)?;
    let text = std::str::from_utf8(&opened.secret).map_err(|e| internal("login verifier", e))?;
    let verifier = text
        .parse::<ScramVerifier>()
        .map_err(|e| internal("login verifier", e))?;
    Ok(Some((verifier, entry["admin"] == json!(true))))
}

/// Removes `login`; whether it existed. The administrator cannot be dropped.
pub(crate) async fn remove(
    host: &dyn ServiceHost,
    server_id: &str,
    login: &str,
) -> Result<bool, KvError> {
    let mut d = doc(host, server_id).await?;
    let key = login.to_ascii_lowercase();
    let Some(map) = d["logins"].as_object_mut() else {
        return Ok(false);
    };
    if map.remove(&key).is_none() {
        return Ok(false);
    }
    host.put_document(server_id, SERVER_DOC, "logins", &d)
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_bind_server_and_login() {
        assert_ne!(label("/s/a", "x"), label("/s/b", "x"));
        assert_ne!(label("/s/a", "x"), label("/s/a", "y"));
        assert_eq!(label("/S/A", "X"), label("/s/a", "x"));
    }
}

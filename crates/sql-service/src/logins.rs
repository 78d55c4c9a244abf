//! SQL logins of a server and users of its databases. The administrator login (set through
//! ARM) and logins made before databases had users of their own reach every database; users
//! made in SQL (`CREATE USER … PASSWORD`, `CREATE USER … FROM EXTERNAL PROVIDER`) are contained
//! users of the database they were made in, as in Azure SQL. Passwords are kept as
//! SCRAM-SHA-256 verifiers (never passwords), sealed under kagi's root key.

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

/// The document kind of a database's contained users (named by the database id, under the
/// server): users made in SQL in that database, who reach that database only.
pub(crate) const DB_USERS_DOC: &str = "dbusers";

/// A contained user of one database.
#[derive(Debug, Clone)]
pub(crate) enum DbUser {
    /// A SQL user: SCRAM-SHA-256 against this verifier.
    Sql(ScramVerifier),
    /// An Entra principal (`CREATE USER … FROM EXTERNAL PROVIDER`): an access token whose
    /// principal has this object id, or, without one, whose UPN, client id or object id is the
    /// user's name.
    External {
        /// The principal's object id, when the user was made `WITH OBJECT_ID`.
        object_id: Option<String>,
    },
}

/// The seal label of a contained SQL user's verifier (bound to server, database and user).
fn user_label(server_id: &str, database_id: &str, login: &str) -> String {
    format!(
        "sql-dbuser/{}/{}/{}",
        server_id.to_ascii_lowercase(),
        database_id.to_ascii_lowercase(),
        login.to_ascii_lowercase()
    )
}

async fn users_doc(
    host: &dyn ServiceHost,
    server_id: &str,
    database_id: &str,
) -> Result<Value, KvError> {
    Ok(host
        .document(server_id, DB_USERS_DOC, &database_id.to_ascii_lowercase())
        .await?
        .unwrap_or_else(|| json!({"users": {}})))
}

/// The contained user `login` of database `database_id`, if there is one.
pub(crate) async fn db_user(
    host: &dyn ServiceHost,
    server_id: &str,
    database_id: &str,
    login: &str,
) -> Result<Option<DbUser>, KvError> {
    let d = users_doc(host, server_id, database_id).await?;
    let entry = &d["users"][login.to_ascii_lowercase()];
    match entry["kind"].as_str() {
        Some("External") => Ok(Some(DbUser::External {
            object_id: entry["objectId"].as_str().map(str::to_string),
        })),
        Some("Sql") => {
            let sealed = entry["verifier"]
                .as_str()
                .and_then(|s| B64.decode(s).ok())
                .ok_or_else(|| internal("database user", "a damaged verifier"))?;
            let opened = host.open_secret(&user_label(server_id, database_id, login), &sealed)?;
            let text =
                std::str::from_utf8(&opened.secret).map_err(|e| internal("user verifier", e))?;
            let verifier = text
                .parse::<ScramVerifier>()
                .map_err(|e| internal("user verifier", e))?;
            Ok(Some(DbUser::Sql(verifier)))
        }
        _ => Ok(None),
    }
}

/// Stores the contained user `login` of database `database_id` (replacing it).
pub(crate) async fn put_db_user(
    host: &dyn ServiceHost,
    server_id: &str,
    database_id: &str,
    login: &str,
    user: &DbUser,
) -> Result<(), KvError> {
    let entry = match user {
        DbUser::Sql(v) => {
            let sealed = host.seal_secret(
                &user_label(server_id, database_id, login),
                v.to_string().as_bytes(),
            )?;
            json!({"name": login, "kind": "Sql", "verifier": B64.encode(sealed)})
        }
        DbUser::External { object_id } => {
            json!({"name": login, "kind": "External", "objectId": object_id})
        }
    };
    let mut d = users_doc(host, server_id, database_id).await?;
    d["users"][login.to_ascii_lowercase()] = entry;
    host.put_document(
        server_id,
        DB_USERS_DOC,
        &database_id.to_ascii_lowercase(),
        &d,
    )
    .await
}

/// Removes the contained user `login` of database `database_id`; whether it existed.
pub(crate) async fn remove_db_user(
    host: &dyn ServiceHost,
    server_id: &str,
    database_id: &str,
    login: &str,
) -> Result<bool, KvError> {
    let mut d = users_doc(host, server_id, database_id).await?;
    let gone = d["users"]
        .as_object_mut()
        .is_some_and(|m| m.remove(&login.to_ascii_lowercase()).is_some());
    if gone {
        host.put_document(
            server_id,
            DB_USERS_DOC,
            &database_id.to_ascii_lowercase(),
            &d,
        )
        .await?;
    }
    Ok(gone)
}

/// Removes every contained user of database `database_id` (it is dropped).
pub(crate) async fn remove_db_users(
    host: &dyn ServiceHost,
    server_id: &str,
    database_id: &str,
) -> Result<(), KvError> {
    host.delete_document(server_id, DB_USERS_DOC, &database_id.to_ascii_lowercase())
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_bind_server_and_login() {
        assert_ne!(user_label("/s/a", "d1", "x"), user_label("/s/a", "d2", "x"));
        assert_ne!(user_label("/s/a", "d1", "x"), label("/s/a", "x"));
        assert_ne!(label("/s/a", "x"), label("/s/b", "x"));
        assert_ne!(label("/s/a", "x"), label("/s/a", "y"));
        assert_eq!(label("/S/A", "X"), label("/s/a", "x"));
    }
}

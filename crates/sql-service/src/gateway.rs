//! The PostgreSQL front end's view of the service ([`kagi_pgsql::Gateway`]): which server a
//! host name addresses, how a login authenticates, and the databases a session opens.

use std::sync::Arc;

use async_trait::async_trait;
use kagi_core::{ErrorCode, KvError};
use kagi_pgsql::{Credential, Gateway, LoginChange, OpenDatabase as Session, PgError, sqlstate};
use serde_json::Value;

use crate::{SERVER_TYPE, SqlService, id_of_body, logins};

/// The gateway of a [`SqlService`].
#[derive(Clone, Debug)]
pub struct SqlGateway(pub Arc<SqlService>);

/// A failure of the service during a session's setup, as PostgreSQL reports it.
fn pg_error(e: KvError) -> PgError {
    match e.code {
        ErrorCode::ServiceUnavailable => PgError::unavailable(e.message),
        ErrorCode::InternalError => PgError::fatal(sqlstate::INTERNAL_ERROR, e.message),
        _ => PgError::fatal(sqlstate::CONNECTION_REJECTED, e.message),
    }
}

impl SqlService {
    /// The server named `name` (server names are unique on the platform).
    pub(crate) fn server_named(&self, name: &str) -> Option<Value> {
        self.host
            .resources_of_type(SERVER_TYPE)
            .into_iter()
            .find(|s| {
                s["name"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
    }
}

/// The server's Entra administrator: (login, object id).
fn entra_admin(server: &Value) -> Option<(String, String)> {
    let a = &server["properties"]["administrators"];
    Some((
        a["login"].as_str()?.to_string(),
        a["sid"].as_str()?.to_string(),
    ))
}

impl SqlGateway {
    fn server(&self, name: &str) -> Result<Value, PgError> {
        self.0.server_named(name).ok_or_else(|| {
            PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("server \"{name}\" does not exist"),
            )
        })
    }
}

#[async_trait]
impl Gateway for SqlGateway {
    fn server_for_host(&self, host: &str) -> Option<String> {
        let suffix = format!(".{}", self.0.host.config().dns_suffix);
        let name = host
            .len()
            .checked_sub(suffix.len())
            .filter(|&n| host[n..].eq_ignore_ascii_case(&suffix))
            .map(|n| &host[..n])?;
        self.0
            .server_named(name)
            .and_then(|s| s["name"].as_str().map(str::to_string))
    }

    async fn credential(&self, server: &str, login: &str) -> Result<Option<Credential>, PgError> {
        let Some(s) = self.0.server_named(server) else {
            return Ok(None);
        };
        // The server's Entra administrator signs in with an access token as the password.
        if entra_admin(&s).is_some_and(|(name, _)| name.eq_ignore_ascii_case(login)) {
            return Ok(Some(Credential::AccessToken));
        }
        if s["properties"]["administrators"]["azureADOnlyAuthentication"] == serde_json::json!(true)
        {
            return Ok(None);
        }
        let found = logins::get(self.0.host.as_ref(), &id_of_body(&s), login)
            .await
            .map_err(pg_error)?;
        Ok(found.map(|(v, _)| Credential::Scram(v)))
    }

    async fn check_token(&self, server: &str, login: &str, token: &str) -> Result<(), PgError> {
        let refused = || PgError::password_failed(login);
        let s = self.0.server_named(server).ok_or_else(refused)?;
        let (name, sid) = entra_admin(&s).ok_or_else(refused)?;
        let who = self.0.host.authenticate(token).map_err(|_| refused())?;
        if name.eq_ignore_ascii_case(login) && who.object_id.eq_ignore_ascii_case(&sid) {
            Ok(())
        } else {
            Err(refused())
        }
    }

    async fn open(&self, server: &str, database: &str, _login: &str) -> Result<Session, PgError> {
        let s = self.server(server)?;
        let open = match self.0.open_database(&s, database).await {
            Ok(o) => o,
            Err(e) if e.code == ErrorCode::ResourceNotFound => {
                return Err(PgError::fatal(
                    sqlstate::INVALID_CATALOG_NAME,
                    format!("database \"{database}\" does not exist"),
                ));
            }
            Err(e) => return Err(pg_error(e)),
        };
        let termination = open.terminator.subscribe();
        let key = open.page_key().map_err(pg_error)?;
        let connection = if open.read_only {
            crate::engine::connect_read_only(open.file.clone(), key).await
        } else {
            crate::engine::connect(open.file.clone(), key).await
        }
        .map_err(pg_error)?;
        Ok(Session {
            connection,
            termination,
        })
    }

    async fn list_databases(&self, server: &str) -> Result<Vec<String>, PgError> {
        let s = self.server(server)?;
        let dbs = self.0.databases_of(&s).await.map_err(pg_error)?;
        Ok(dbs.into_iter().map(|d| d.name).collect())
    }

    async fn change_login(
        &self,
        server: &str,
        actor: &str,
        change: LoginChange,
    ) -> Result<(), PgError> {
        let s = self.server(server)?;
        let id = id_of_body(&s);
        let host = self.0.host.as_ref();
        // One change of a server's logins at a time (they share one document).
        let _logins = self.0.lock_id(&logins::lock_name(&id)).await;
        let err = |e: KvError| PgError::error(sqlstate::INTERNAL_ERROR, e.message);
        // The SQL administrator, or the Entra administrator.
        let is_admin = entra_admin(&s).is_some_and(|(name, _)| name.eq_ignore_ascii_case(actor))
            || logins::get(host, &id, actor)
                .await
                .map_err(err)?
                .is_some_and(|(_, admin)| admin);
        if !is_admin {
            return Err(PgError::error(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                "permission denied: only the server administrator creates, alters and drops logins",
            ));
        }
        // Whether `login` exists, and whether it is the administrator.
        let exists = |login: &str| {
            let (login, id) = (login.to_string(), id.clone());
            async move {
                logins::get(host, &id, &login)
                    .await
                    .map(|f| f.map(|(_, a)| a))
            }
        };
        match change {
            LoginChange::Create { login, verifier } => {
                if exists(&login).await.map_err(err)?.is_some() {
                    return Err(PgError::error(
                        sqlstate::DUPLICATE_OBJECT,
                        format!("role \"{login}\" already exists"),
                    ));
                }
                logins::put(host, &id, &login, &verifier, false)
                    .await
                    .map_err(err)
            }
            LoginChange::SetPassword { login, verifier } => {
                let Some(admin) = exists(&login).await.map_err(err)? else {
                    return Err(PgError::error(
                        sqlstate::UNDEFINED_OBJECT,
                        format!("role \"{login}\" does not exist"),
                    ));
                };
                logins::put(host, &id, &login, &verifier, admin)
                    .await
                    .map_err(err)
            }
            LoginChange::Drop { login, if_exists } => match exists(&login).await.map_err(err)? {
                Some(true) => Err(PgError::error(
                    sqlstate::INSUFFICIENT_PRIVILEGE,
                    format!("role \"{login}\" is the server administrator and cannot be dropped"),
                )),
                Some(false) => logins::remove(host, &id, &login)
                    .await
                    .map(|_| ())
                    .map_err(err),
                None if if_exists => Ok(()),
                None => Err(PgError::error(
                    sqlstate::UNDEFINED_OBJECT,
                    format!("role \"{login}\" does not exist"),
                )),
            },
        }
    }
}

//! Backup agents (MISSION MP-1..MP-7, BK-11): machines that back up their own folders into a
//! backup vault. Encryption happens on the machine, under a passphrase only the machine's owner
//! knows; the vault stores ciphertext objects and never sees a key. The wire protocol is in
//! `docs/AGENT.md`.
//!
//! - The administrator downloads *vault credentials* (`POST {vault id}/vaultCredentials`): a
//!   256-bit secret bound to one vault, valid 48 hours by default, whose SHA-256 alone is kept.
//! - With them a machine *registers* (`/kagi/agent{vault id}/register`) and receives its own
//!   256-bit machine secret (again only its hash is kept): registering counts as "an item was
//!   registered" for BK-2, and is refused on a vault that uses a customer-managed key (BK-11).
//! - Before registering, or later when its passphrase changes, the machine may ask the vault to
//!   keep its passphrase in a key vault (`…/passphrase`): the vault's *system-assigned* identity
//!   writes the secret `AzBackup-<FQDN>-<vault>` over the key vault's data plane, so that write
//!   is authorized and audited like anyone's; each change adds a version.
//! - A registered machine stores and reads repository objects under its own prefix and may read
//!   (never write) other machines' objects of the same vault: restoring a lost machine's data
//!   on another machine.
//! - A name already registered is registered again (or its passphrase stored) only with proof:
//!   the machine's key proof (derived from its data key, which its passphrase unwraps), its
//!   current machine secret, or the administrator's one-time allowance. Nothing of this deletes
//!   a recovery point.
//! - Every request is authorized before its body is read; objects count against the vault's
//!   quota and are refused before the disk runs out (`agent_objects`).
//!
//! State: the vault's service document `agent-registry` in the store (credential hashes,
//! machines; through the host's documents), objects under
//! `{vault dir}/agents/machines/{machine}/`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kagi_core::agent as rules;
use kagi_core::time::rfc3339;
use kagi_core::{ErrorCode, KvError, VaultName};
use kagi_crypto::DigestAlgorithm;
use kagi_host::{Principal, ServiceHost};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::BackupService;
use crate::agent_objects::{get_object, head_object, list_meta};
use crate::resource::{CmkConfig, VaultCtx, activity_entry};
use crate::state::{AGENT_REGISTRY, io};

/// Vault credentials are valid this long unless asked otherwise.
const DEFAULT_CREDENTIAL_HOURS: u64 = 48;
/// The longest validity an administrator may ask for (10 days, like Azure's).
const MAX_CREDENTIAL_HOURS: u64 = 240;
/// The largest object an agent may store (packs are about 16 MiB).
pub const MAX_OBJECT_BYTES: usize = 64 * 1024 * 1024;

/// Authorization scheme of vault credentials.
pub const VAULT_CREDENTIAL_SCHEME: &str = "KagiVaultCredential";
/// Authorization scheme of a registered machine: `KagiAgent <machine>:<secret>`.
pub const MACHINE_SCHEME: &str = "KagiAgent";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Credential {
    sha256: String,
    created: i64,
    expires: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Machine {
    name: String,
    secret_sha256: String,
    registered: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_vault_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret_id: Option<String>,
    /// SHA-256 (hex) of the machine's key proof: whoever can unwrap its data key can register
    /// it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_check: Option<String>,
    /// Until when (Unix seconds) the administrator lets one registration of this name in
    /// without proof.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reregistration_allowed_until: Option<i64>,
}

/// How a registration of an existing machine name proved it is that machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proof {
    /// The key proof (the passphrase, through the data key it unwraps).
    Key,
    /// The current machine secret.
    MachineSecret,
    /// The administrator's allowance.
    Allowed,
}

impl Proof {
    fn describe(self) -> &'static str {
        match self {
            Self::Key => "with its passphrase",
            Self::MachineSecret => "with its machine credential",
            Self::Allowed => "as the administrator allowed",
        }
    }
}

/// Checks a request for proof that it comes from the registered machine `m` (item 7 of the
/// hardening review: vault credentials alone must not take a machine over).
fn proof_for(m: &Machine, req: &Value, now: i64) -> Result<Proof, KvError> {
    let hash_of = |field: &str| {
        req[field]
            .as_str()
            .and_then(kagi_core::b64::decode)
            .map(|raw| sha256_hex(&raw))
    };
    if let (Some(given), Some(check)) = (hash_of("keyProof"), &m.key_check)
        && given == *check
    {
        return Ok(Proof::Key);
    }
    if hash_of("machineSecret").is_some_and(|h| h == m.secret_sha256) {
        return Ok(Proof::MachineSecret);
    }
    if m.reregistration_allowed_until.is_some_and(|t| t > now) {
        return Ok(Proof::Allowed);
    }
    Err(KvError::forbidden(format!(
        "Machine '{}' is already registered with this backup vault. To register it again, or \
         to store its passphrase, prove it is that machine: run kagi agent register with the \
         machine's current passphrase (it opens the machine's backups), or on the machine \
         itself; or ask the vault's administrator to allow one registration (kagi backup \
         vault allow-reregistration). Its backups are kept either way.",
        m.name
    ))
    .with_inner("UserErrorMachineAlreadyRegistered"))
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Registry {
    credentials: Vec<Credential>,
    /// By lower-cased machine name.
    machines: BTreeMap<String, Machine>,
}

impl Registry {
    async fn load(p: &dyn ServiceHost, vault_id: &str) -> Result<Self, KvError> {
        match p.document(vault_id, AGENT_REGISTRY, "").await? {
            Some(v) => serde_json::from_value(v).map_err(|e| io("parse agent registry", e)),
            None => Ok(Self::default()),
        }
    }

    async fn save(&self, p: &dyn ServiceHost, vault_id: &str) -> Result<(), KvError> {
        let v = serde_json::to_value(self).map_err(|e| io("agent registry json", e))?;
        p.put_document(vault_id, AGENT_REGISTRY, "", &v).await
    }
}

/// The names of the machines registered with the vault `vault_id`.
pub(crate) async fn registered_machines(
    p: &dyn ServiceHost,
    vault_id: &str,
) -> Result<Vec<String>, KvError> {
    Ok(Registry::load(p, vault_id)
        .await?
        .machines
        .values()
        .map(|m| m.name.clone())
        .collect())
}

/// The agent request types are the platform's (any provider's agents use them).
pub use kagi_host::{AgentCall, AgentHead, AgentReply, MAX_AGENT_JSON_BYTES as MAX_JSON_BYTES};

/// An authenticated and authorized agent request (before its body is read).
pub struct AgentSession {
    v: VaultCtx,
    who: Caller,
    shown: String,
    body_limit: usize,
}

impl std::fmt::Debug for AgentSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl AgentSession {
    /// Who called, for the audit log (`vault-credentials:{vault}` or `agent:{vault}/{machine}`).
    pub fn caller(&self) -> &str {
        &self.shown
    }

    /// The largest body this request may carry: an object for a machine's PUT of its own, a
    /// small JSON document for the routes that take one, nothing for the others.
    pub fn body_limit(&self) -> usize {
        self.body_limit
    }
}

/// Who called, once authenticated.
enum Caller {
    /// Holder of valid vault credentials.
    Credential,
    /// A registered machine (lower-cased name).
    Machine(String),
}

/// The machine a request comes from (403 for the holder of vault credentials).
fn machine_of(who: &Caller) -> Result<&str, KvError> {
    match who {
        Caller::Machine(m) => Ok(m),
        Caller::Credential => Err(KvError::forbidden(
            "This operation needs a registered machine's credential.",
        )
        .with_inner("MachineNotRegistered")),
    }
}

/// Decides, from the caller, the method and the (lower-cased) route after the vault id alone,
/// whether the request may be made at all (401/403 otherwise) and how large a body it may
/// carry: checked before the body is read, so only a machine writing its own objects gets to
/// send 64 MiB.
fn authorize(who: &Caller, method: &str, route: &[&str]) -> Result<usize, KvError> {
    match (route, method) {
        (["probe"] | ["register"], _) if !matches!(who, Caller::Credential) => Err(unauthorized(
            "Registering needs the vault credentials file, not a machine's credential.",
        )),
        (["probe"] | ["register"] | ["passphrase"], "POST") => Ok(MAX_JSON_BYTES),
        (["machines", rest @ ..], _) => {
            let me = machine_of(who)?;
            match (rest, method) {
                ([m, "activity"], "POST") if *m != me => {
                    Err(KvError::forbidden("A machine reports only its own jobs."))
                }
                ([_, "activity"], "POST") => Ok(MAX_JSON_BYTES),
                ([m, "objects", _, ..], "PUT" | "DELETE") if *m != me => Err(KvError::forbidden(
                    "A machine may read other machines' backups of this vault, never change \
                         them.",
                )),
                ([_, "objects", _, ..], "PUT") => Ok(MAX_OBJECT_BYTES),
                _ => Ok(0),
            }
        }
        _ => Ok(0),
    }
}

/// `validHours` of a request (vault credentials, allowances): 1-240, default 48.
fn valid_hours(body: &Value) -> Result<u64, KvError> {
    match body.get("validHours") {
        None | Some(Value::Null) => Ok(DEFAULT_CREDENTIAL_HOURS),
        Some(h) => h
            .as_u64()
            .filter(|h| (1..=MAX_CREDENTIAL_HOURS).contains(h))
            .ok_or_else(|| {
                bad(
                    "InvalidValidity",
                    format!("validHours must be 1-{MAX_CREDENTIAL_HOURS}."),
                )
            }),
    }
}

fn machine_not_found(machine: &str) -> KvError {
    KvError::new(
        ErrorCode::NotFound,
        format!(
            "No machine named '{}' is registered with this backup vault.",
            kagi_core::ids::printable(machine)
        ),
    )
    .with_inner("MachineNotFound")
}

fn sha256_hex(secret: &[u8]) -> String {
    hex_lower(&kagi_crypto::digest(DigestAlgorithm::Sha256, secret))
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unauthorized(message: &str) -> KvError {
    rules::INVALID_VAULT_CREDENTIALS.error(message)
}

fn bad(inner: &'static str, message: impl Into<String>) -> KvError {
    KvError::new(ErrorCode::BadRequest, message).with_inner(inner)
}

/// A JSON request body whose strings (a passphrase, a key proof, a machine secret) are wiped
/// when it is dropped, whichever way the request ends.
struct WipedJson(Value);

impl std::ops::Deref for WipedJson {
    type Target = Value;

    fn deref(&self) -> &Value {
        &self.0
    }
}

impl Drop for WipedJson {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Overwrites every string in `v` with zeros (and empties it).
fn wipe(v: &mut Value) {
    use zeroize::Zeroize;
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(a) => a.iter_mut().for_each(wipe),
        Value::Object(o) => o.values_mut().for_each(wipe),
        _ => {}
    }
}

fn json_of(body: &[u8]) -> Result<WipedJson, KvError> {
    serde_json::from_slice(body).map(WipedJson).map_err(|e| {
        bad(
            "InvalidRequestContent",
            format!("The request body is not valid JSON: {e}."),
        )
    })
}

fn str_field<'a>(v: &'a Value, name: &str) -> Result<&'a str, KvError> {
    v[name].as_str().ok_or_else(|| {
        bad(
            "InvalidRequestContent",
            format!("The property \"{name}\" is required."),
        )
    })
}

/// Checks an object name: `/`-separated segments of ASCII letters, digits, `-`, `_` and `.`,
/// none of them `.` or `..`, at most 8 deep.
fn object_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 512
        && name.split('/').count() <= 8
        && name.split('/').all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        })
}

/// A parsed key vault URI (MP-7: 100272 when it does not parse).
fn parse_key_vault_uri(p: &dyn ServiceHost, uri: &str) -> Result<(VaultName, String), KvError> {
    let cfg = p.config();
    let invalid = |why: &str| {
        rules::INVALID_KEY_VAULT_URI.error(format!(
            "The key vault URI '{}' is not valid ({why}). Copy the vault URI from the key \
             vault's properties, e.g. https://myvault.{}:{}/.",
            kagi_core::ids::printable(uri),
            cfg.dns_suffix,
            cfg.port
        ))
    };
    let rest = uri
        .strip_prefix("https://")
        .ok_or_else(|| invalid("it must start with https://"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !path.is_empty() {
        return Err(invalid("it must name the vault only, with no path"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, port)) => (
            h,
            port.parse::<u16>()
                .map_err(|_| invalid("the port is not a number"))?,
        ),
        None => (authority, 443),
    };
    let suffix = format!(".{}", cfg.dns_suffix);
    let host = host.to_ascii_lowercase();
    let vault = host
        .strip_suffix(&suffix)
        .ok_or_else(|| invalid("the host is not a key vault host of this platform"))?;
    if port != cfg.port {
        return Err(invalid("the port is not this platform's"));
    }
    let name = VaultName::parse(vault).map_err(|_| invalid("the vault name is not valid"))?;
    let base = cfg
        .key_vault_uri(name.as_str())
        .trim_end_matches('/')
        .to_string();
    Ok((name, base))
}

impl BackupService {
    fn vault_of(&self, p: &dyn ServiceHost, vault_id_segs: &[&str]) -> Result<VaultCtx, KvError> {
        let id = format!("/{}", vault_id_segs.join("/"));
        let not_found = || {
            KvError::new(
                ErrorCode::ResourceNotFound,
                format!(
                    "The backup vault '{}' does not exist.",
                    kagi_core::ids::printable(&id)
                ),
            )
        };
        let body = p.resource(&id).ok_or_else(not_found)?;
        Ok(VaultCtx {
            id: body["id"].as_str().unwrap_or_default().to_string(),
            dir: crate::state::vault_dir(
                &self.data_dir,
                vault_id_segs[1],
                vault_id_segs[3],
                vault_id_segs[7],
            ),
            body,
        })
    }

    async fn authenticate_agent(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        authorization: Option<&str>,
        now: i64,
    ) -> Result<Caller, KvError> {
        let header = authorization.ok_or_else(|| {
            unauthorized("The request has no Authorization header; use the vault credentials file or register the machine.")
        })?;
        let (scheme, value) = header.split_once(' ').unwrap_or((header, ""));
        let registry = Registry::load(p, &v.id).await?;
        if scheme.eq_ignore_ascii_case(VAULT_CREDENTIAL_SCHEME) {
            let secret = kagi_core::b64::decode(value.trim())
                .ok_or_else(|| unauthorized("The vault credentials are not valid."))?;
            let hash = sha256_hex(&secret);
            return match registry.credentials.iter().find(|c| c.sha256 == hash) {
                Some(c) if c.expires > now => Ok(Caller::Credential),
                Some(c) => Err(unauthorized(&format!(
                    "The vault credentials expired at {}. Download new ones from the backup \
                     vault (kagi backup vault credentials).",
                    rfc3339(c.expires)
                ))),
                None => Err(unauthorized(
                    "The vault credentials are not valid for this backup vault. Check that the \
                     file was downloaded from this vault.",
                )),
            };
        }
        if scheme.eq_ignore_ascii_case(MACHINE_SCHEME) {
            let (machine, secret) = value.trim().split_once(':').ok_or_else(|| {
                unauthorized("The machine credential is not valid; register the machine again.")
            })?;
            let secret = kagi_core::b64::decode(secret).ok_or_else(|| {
                unauthorized("The machine credential is not valid; register the machine again.")
            })?;
            let key = machine.to_ascii_lowercase();
            return match registry.machines.get(&key) {
                Some(m) if m.secret_sha256 == sha256_hex(&secret) => Ok(Caller::Machine(key)),
                _ => Err(unauthorized(
                    "The machine is not registered with this backup vault (or was registered \
                     again elsewhere); register it again with fresh vault credentials.",
                )),
            };
        }
        Err(unauthorized(
            "Unknown authorization scheme; use the vault credentials file or register the machine.",
        ))
    }

    /// `POST {vault id}/vaultCredentials` (bootstrap administrator): new vault credentials.
    pub(crate) async fn vault_credentials(
        &self,
        p: &dyn ServiceHost,
        caller: &Principal,
        v: &VaultCtx,
        body: &Value,
    ) -> Result<(u16, Value), KvError> {
        let hours = valid_hours(body)?;
        let secret = kagi_crypto::random_array::<32>().map_err(|e| io("random", e))?;
        let now = p.now();
        let expires = now + (hours as i64) * 3600;
        let _g = self.lock_vault(&v.dir).await?;
        let mut registry = Registry::load(p, &v.id).await?;
        registry.credentials.retain(|c| c.expires > now);
        registry.credentials.push(Credential {
            sha256: sha256_hex(&secret),
            created: now,
            expires,
        });
        registry.save(p, &v.id).await?;
        self.log(
            p,
            v,
            activity_entry(
                Some(caller),
                &v.id,
                "Microsoft.RecoveryServices/vaults/vaultCredentials/action",
                "Succeeded",
                &format!(
                    "Vault credentials issued, valid until {}.",
                    rfc3339(expires)
                ),
                now,
            ),
        )
        .await;
        let ca = std::fs::read_to_string(self.data_dir.join("tls/ca.pem"))
            .map_err(|e| io("read CA", e))?;
        Ok((
            200,
            json!({
                "vaultId": v.id,
                "vaultName": v.body["name"],
                "location": v.body["location"],
                "serverUrl": p.config().authority(),
                "caCertificate": ca,
                "secret": kagi_core::b64::encode(&secret),
                "expiresOn": rfc3339(expires),
            }),
        ))
    }

    /// `GET {vault id}/registeredMachines` (administrator): the registered backup agents.
    pub(crate) async fn list_machines(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
    ) -> Result<(u16, Value), KvError> {
        let reg = Registry::load(p, &v.id).await?;
        Ok((
            200,
            json!({"value": reg.machines.values().map(|m| json!({
                "name": m.name,
                "registered": rfc3339(m.registered),
                "keyVaultUri": m.key_vault_uri,
                "secretId": m.secret_id,
                "reregistrationAllowedUntil": m.reregistration_allowed_until.map(rfc3339),
            })).collect::<Vec<_>>()}),
        ))
    }

    /// `DELETE {vault id}/registeredMachines/{machine}` (administrator): unregisters a machine
    /// and deletes its backups (as deleting a protected server does in Azure Backup). Its key
    /// vault secret stays: it belongs to the key vault's owner.
    pub(crate) async fn delete_machine(
        &self,
        p: &dyn ServiceHost,
        caller: &Principal,
        v: &VaultCtx,
        machine: &str,
    ) -> Result<(u16, Value), KvError> {
        let _g = self.lock_vault(&v.dir).await?;
        let mut registry = Registry::load(p, &v.id).await?;
        let key = machine.to_ascii_lowercase();
        if registry.machines.remove(&key).is_none() {
            return Ok((204, Value::Null));
        }
        // Unregister first: from then on no agent can write; a crash before the folder is gone
        // leaves only unreachable ciphertext, removed by the next delete of that name.
        registry.save(p, &v.id).await?;
        self.remove_blobs(&v.dir.join("agents/machines").join(&key))
            .await?;
        self.agent_storage.forget(&v.dir);
        self.log(
            p,
            v,
            activity_entry(
                Some(caller),
                &v.id,
                "Microsoft.RecoveryServices/vaults/registeredMachines/delete",
                "Succeeded",
                &format!("Machine '{machine}' unregistered; its backups were deleted."),
                p.now(),
            ),
        )
        .await;
        Ok((200, Value::Null))
    }

    /// `POST {vault id}/registeredMachines/{machine}/allowReregistration` (administrator): the
    /// next registration of that machine name through vault credentials needs no proof (once,
    /// within `validHours`, default 48). For a machine whose passphrase and state are both
    /// lost; its backups are kept.
    pub(crate) async fn allow_reregistration(
        &self,
        p: &dyn ServiceHost,
        caller: &Principal,
        v: &VaultCtx,
        machine: &str,
        body: &Value,
    ) -> Result<(u16, Value), KvError> {
        let hours = valid_hours(body)?;
        let _g = self.lock_vault(&v.dir).await?;
        let mut registry = Registry::load(p, &v.id).await?;
        let now = p.now();
        let until = now + (hours as i64) * 3600;
        let m = registry
            .machines
            .get_mut(&machine.to_ascii_lowercase())
            .ok_or_else(|| machine_not_found(machine))?;
        m.reregistration_allowed_until = Some(until);
        let name = m.name.clone();
        registry.save(p, &v.id).await?;
        self.log(
            p,
            v,
            activity_entry(
                Some(caller),
                &v.id,
                "Microsoft.RecoveryServices/vaults/registeredMachines/allowReregistration/action",
                "Succeeded",
                &format!(
                    "Machine '{name}' may be registered again with vault credentials alone until \
                     {} (once).",
                    rfc3339(until)
                ),
                now,
            ),
        )
        .await;
        Ok((
            200,
            json!({"name": name, "reregistrationAllowedUntil": rfc3339(until)}),
        ))
    }

    /// Authenticates and authorizes an agent request before its body is read; an object's
    /// announced size is checked against the vault's quota and the disk's reserve too.
    pub(crate) async fn admit_agent(
        &self,
        p: &dyn ServiceHost,
        head: AgentHead<'_>,
    ) -> Result<AgentSession, KvError> {
        let AgentHead {
            method,
            segs,
            authorization,
            content_length,
        } = head;
        // The registry it reads may still be in an earlier kagi's files.
        self.ready(p).await?;
        let l: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
        let l: Vec<&str> = l.iter().map(String::as_str).collect();
        if segs.len() < 9
            || !matches!(
                l[..8],
                [
                    "subscriptions",
                    _,
                    "resourcegroups",
                    _,
                    "providers",
                    "microsoft.recoveryservices",
                    "vaults",
                    _
                ]
            )
        {
            return Err(KvError::new(ErrorCode::NotFound, "No such agent route."));
        }
        let v = self.vault_of(p, &segs[..8])?;
        let who = self
            .authenticate_agent(p, &v, authorization, p.now())
            .await?;
        let shown = match &who {
            Caller::Credential => format!("vault-credentials:{}", v.id),
            Caller::Machine(m) => format!("agent:{}/{m}", v.id),
        };
        let body_limit = authorize(&who, method, &l[8..])?;
        if body_limit == MAX_OBJECT_BYTES
            && let Some(len) = content_length
        {
            let name = segs[11..].join("/");
            if object_name_ok(&name) {
                let dir = v.dir.join("agents/machines").join(l[9]);
                self.agent_storage.admit(&v.dir, &dir, &name, len).await?;
            }
        }
        Ok(AgentSession {
            v,
            who,
            shown,
            body_limit,
        })
    }

    /// Serves an agent request that [`Self::admit_agent`] admitted.
    pub(crate) async fn serve_agent(
        self: &Arc<Self>,
        host: &Arc<dyn ServiceHost>,
        session: &AgentSession,
        call: AgentCall<'_>,
    ) -> Result<AgentReply, KvError> {
        let AgentCall {
            method,
            segs,
            prefix,
            range,
            body,
        } = call;
        let l: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
        let l: Vec<&str> = l.iter().map(String::as_str).collect();
        if segs.len() < 9 {
            return Err(KvError::new(ErrorCode::NotFound, "No such agent route."));
        }
        // The same decision as before the body, for the route actually served.
        if body.len() > authorize(&session.who, method, &l[8..])? {
            return Err(KvError::new(
                ErrorCode::RequestEntityTooLarge,
                "The request body is too large for this route.",
            ));
        }
        self.agent_route(
            host,
            &session.v,
            &session.who,
            method,
            &segs[8..],
            &l[8..],
            prefix,
            range,
            body,
        )
        .await
    }

    /// Serves a request [`authorize`] allowed.
    #[allow(clippy::too_many_arguments)]
    async fn agent_route(
        self: &Arc<Self>,
        host: &Arc<dyn ServiceHost>,
        v: &VaultCtx,
        who: &Caller,
        method: &str,
        rest: &[&str],
        l: &[&str],
        prefix: &str,
        range: Option<(u64, u64)>,
        mut body: zeroize::Zeroizing<Vec<u8>>,
    ) -> Result<AgentReply, KvError> {
        let p = host.as_ref();
        match (l, method) {
            (["probe"], "POST") => {
                let req = json_of(&body)?;
                self.probe(v, req["machineName"].as_str())
                    .await
                    .map(|j| AgentReply::Json(200, j))
            }
            (["passphrase"], "POST") => {
                let req = json_of(&body)?;
                let machine = str_field(&req, "machineName")?;
                if let Caller::Machine(m) = who
                    && !m.eq_ignore_ascii_case(machine)
                {
                    return Err(KvError::forbidden(
                        "A machine may set only its own passphrase.",
                    ));
                }
                if matches!(who, Caller::Credential) {
                    // BK-2: the registration attempt counts from its first step.
                    self.mark_registration_attempt(p, v).await?;
                }
                self.store_passphrase(p, v, who, machine, &req)
                    .await
                    .map(|j| AgentReply::Json(200, j))
            }
            (["register"], "POST") => {
                let req = json_of(&body)?;
                self.register(p, v, &req)
                    .await
                    .map(|j| AgentReply::Json(200, j))
            }
            (["machines"], "GET") => {
                let (status, list) = self.list_machines(p, v).await?;
                Ok(AgentReply::Json(status, list))
            }
            (["machines", me, "activity"], "POST") => {
                let req = json_of(&body)?;
                let status = match req["status"].as_str() {
                    Some(s @ ("Succeeded" | "Failed" | "CompletedWithWarnings")) => s,
                    _ => {
                        return Err(bad(
                            "InvalidRequestContent",
                            "status must be Succeeded, Failed or CompletedWithWarnings.",
                        ));
                    }
                };
                let operation = match req["operation"].as_str() {
                    Some(o @ ("Backup" | "Restore" | "SetPassphrase" | "Prune")) => o,
                    _ => {
                        return Err(bad(
                            "InvalidRequestContent",
                            "operation must be Backup, Restore, SetPassphrase or Prune.",
                        ));
                    }
                };
                let message: String = req["message"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(2000)
                    .collect();
                let mut entry = activity_entry(
                    None,
                    &v.id,
                    &format!("Microsoft.RecoveryServices/vaults/agents/{operation}"),
                    status,
                    &message,
                    p.now(),
                );
                entry["caller"] = json!(format!("agent:{me}"));
                entry["machine"] = json!(me);
                // A machine's report must not grow the activity log without bound.
                entry["stats"] = if req["stats"].to_string().len() <= 16 * 1024 {
                    req["stats"].clone()
                } else {
                    json!({"omitted": "larger than 16 KiB"})
                };
                crate::state::log_activity(p, &v.id, &entry).await?;
                Ok(AgentReply::Empty(204))
            }
            (["machines", _, "objects"], "GET") => {
                let target = self.machine_dir(p, v, rest[1]).await?;
                if !prefix.is_empty() && !object_name_ok(prefix) {
                    return Err(bad("InvalidObjectName", "The prefix is not valid."));
                }
                // Sizes and times let the agent's prune spare packs a backup may still write.
                list_meta(self.agent_storage.blobs(), &target, prefix)
                    .await
                    .map(|metas| {
                        AgentReply::Json(
                            200,
                            json!({
                                "value": metas.iter().map(|(n, _, _)| n).collect::<Vec<_>>(),
                                "objects": metas.iter().map(|(n, size, modified)| {
                                    json!({"name": n, "size": size, "modified": modified})
                                }).collect::<Vec<_>>(),
                            }),
                        )
                    })
            }
            (["machines", _, "objects", ..], _) => {
                let name = rest[3..].join("/");
                if !object_name_ok(&name) {
                    return Err(bad("InvalidObjectName", "The object name is not valid."));
                }
                let target = self.machine_dir(p, v, rest[1]).await?;
                let root = &self.data_dir;
                match method {
                    "GET" => get_object(self.agent_storage.blobs(), &target, &name, range)
                        .await
                        .map(AgentReply::Bytes),
                    "HEAD" => head_object(self.agent_storage.blobs(), &target, &name)
                        .await
                        .map(|()| AgentReply::Empty(200)),
                    "PUT" => self
                        .agent_storage
                        .put(root, &v.dir, &target, &name, std::mem::take(&mut *body))
                        .await
                        .map(|()| AgentReply::Empty(201)),
                    "DELETE" => self
                        .agent_storage
                        .delete(root, &v.dir, &target, &name)
                        .await
                        .map(|()| AgentReply::Empty(204)),
                    _ => Err(KvError::new(
                        ErrorCode::MethodNotAllowed,
                        "Objects are read with GET or HEAD, written with PUT, removed with DELETE.",
                    )),
                }
            }
            _ => Err(KvError::new(ErrorCode::NotFound, "No such agent route.")),
        }
    }

    /// The folder of a registered machine's objects (404 if the machine is not registered).
    async fn machine_dir(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        machine: &str,
    ) -> Result<PathBuf, KvError> {
        let key = machine.to_ascii_lowercase();
        if !Registry::load(p, &v.id).await?.machines.contains_key(&key) {
            return Err(machine_not_found(machine));
        }
        Ok(v.dir.join("agents/machines").join(key))
    }

    /// Checks the vault accepts agents; for a machine registered before, answers its wrapped
    /// key entries, so the agent can check a passphrase against the machine's existing backups
    /// before it stores that passphrase anywhere, and derive the key proof that registering
    /// that machine again needs. (The entries are passphrase-wrapped: they help only whoever
    /// knows the passphrase.)
    async fn probe(&self, v: &VaultCtx, machine: Option<&str>) -> Result<Value, KvError> {
        refuse_cmk(v)?;
        let mut keys = Vec::new();
        if let Some(m) = machine {
            rules::validate_machine_name(m)?;
            let dir = v.dir.join("agents/machines").join(m.to_ascii_lowercase());
            let blobs = self.agent_storage.blobs();
            if !blobs.is_local() || dir.is_dir() {
                for (name, _, _) in list_meta(blobs, &dir, "keys").await? {
                    let raw = get_object(blobs, &dir, &name, None).await?;
                    keys.push(
                        serde_json::from_slice::<Value>(&raw)
                            .map_err(|e| io("parse agent key entry", e))?,
                    );
                }
            }
        }
        Ok(json!({
            "vaultId": v.id,
            "vaultName": v.body["name"],
            "encryption": "PlatformManagedKeyForVaultAndPassphraseForAgentData",
            "systemAssignedIdentity": v.body["identity"]["principalId"].is_string(),
            "existingKeyEntries": keys,
        }))
    }

    /// Sets the vault's "protection was attempted" flag (BK-2) under the vault's lock.
    async fn mark_registration_attempt(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
    ) -> Result<(), KvError> {
        let _g = self.lock_vault(&v.dir).await?;
        mark_attempt(p, v).await
    }

    async fn register(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        req: &Value,
    ) -> Result<Value, KvError> {
        let machine = str_field(req, "machineName")?;
        rules::validate_machine_name(machine)?;
        let opt = |name: &str| req[name].as_str().map(str::to_string);
        let key_vault_uri = opt("keyVaultUri");
        if let Some(u) = &key_vault_uri {
            parse_key_vault_uri(p, u)?;
        }
        let secret_id = opt("secretId");
        if secret_id
            .as_deref()
            .is_some_and(|s| s.len() > 512 || !s.starts_with("https://"))
        {
            return Err(bad("InvalidRequestContent", "secretId is not a secret id."));
        }
        let key_check = opt("keyCheck");
        if key_check
            .as_deref()
            .is_some_and(|c| c.len() != 64 || !c.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(bad(
                "InvalidRequestContent",
                "keyCheck is not a SHA-256 in hexadecimal.",
            ));
        }
        let key_check = key_check.map(|c| c.to_ascii_lowercase());
        // The same lock as every other change of the vault (configuration, items, moves).
        let _g = self.lock_vault(&v.dir).await?;
        // Checked again under the lock: a customer-managed key set meanwhile wins (BK-11).
        let current = p.resource(&v.id).ok_or_else(|| {
            KvError::new(ErrorCode::ResourceNotFound, "The backup vault is gone.")
        })?;
        refuse_cmk(&VaultCtx {
            id: v.id.clone(),
            body: current,
            dir: v.dir.clone(),
        })?;
        // BK-2: a registration attempt counts like a protection attempt.
        mark_attempt(p, v).await?;
        let secret = kagi_crypto::random_array::<32>().map_err(|e| io("random", e))?;
        let now = p.now();
        let mut registry = Registry::load(p, &v.id).await?;
        let key = machine.to_ascii_lowercase();
        let previous = registry.machines.get(&key).cloned();
        let proof = previous
            .as_ref()
            .map(|m| proof_for(m, req, now))
            .transpose()?;
        let again = previous.is_some();
        // Registering again without a key vault keeps the one the machine used (MP-5).
        let (kv_prev, id_prev, check_prev) = previous
            .map(|m| (m.key_vault_uri, m.secret_id, m.key_check))
            .unwrap_or_default();
        // The key check is set by a new machine and replaced only by the machine itself (whose
        // repository may be new after an interrupted registration); one let in by the
        // administrator's allowance may set it only where there is none, so it cannot lock the
        // passphrase's owner out.
        let key_check = match proof {
            None | Some(Proof::MachineSecret) => key_check.or(check_prev),
            Some(Proof::Key | Proof::Allowed) => check_prev.or(key_check),
        };
        registry.machines.insert(
            key.clone(),
            Machine {
                name: machine.to_string(),
                secret_sha256: sha256_hex(&secret),
                registered: now,
                key_vault_uri: key_vault_uri.or(kv_prev),
                secret_id: secret_id.or(id_prev),
                key_check,
                // An allowance is used up by the registration it let in (and ends with any).
                reregistration_allowed_until: None,
            },
        );
        registry.save(p, &v.id).await?;
        self.agent_storage
            .ensure_dir(&self.data_dir, &v.dir.join("agents/machines").join(&key))
            .await?;
        self.log(
            p,
            v,
            activity_entry(
                None,
                &v.id,
                "Microsoft.RecoveryServices/vaults/agents/register",
                "Succeeded",
                &match proof {
                    Some(how) => {
                        format!("Machine '{machine}' registered again {}.", how.describe())
                    }
                    None => format!("Machine '{machine}' registered."),
                },
                now,
            ),
        )
        .await;
        Ok(json!({
            "machineName": machine,
            "machineSecret": kagi_core::b64::encode(&secret),
            "registeredAgain": again,
        }))
    }

    /// MP-2/MP-7: writes the passphrase as the secret `AzBackup-<FQDN>-<vault>` with the vault's
    /// system-assigned identity.
    async fn store_passphrase(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        who: &Caller,
        machine: &str,
        req: &Value,
    ) -> Result<Value, KvError> {
        refuse_cmk(v)?;
        let passphrase = zeroize::Zeroizing::new(str_field(req, "passphrase")?.to_string());
        rules::validate_passphrase(&passphrase)?;
        let uri = str_field(req, "keyVaultUri")?;
        let vault_name = v.body["name"].as_str().unwrap_or_default();
        let secret_name = rules::passphrase_secret_name(machine, vault_name)?;
        let registry = Registry::load(p, &v.id).await?;
        // The holder of vault credentials replaces a registered machine's passphrase only with
        // the same proof as registering it again (the allowance is not used up here).
        if matches!(who, Caller::Credential)
            && let Some(m) = registry.machines.get(&machine.to_ascii_lowercase())
        {
            proof_for(m, req, p.now())?;
        }
        // Two FQDNs that differ only by '.' versus '-' map to one secret name: the second
        // would overwrite the first machine's passphrase.
        if let Some(other) = registry.machines.values().find(|m| {
            !m.name.eq_ignore_ascii_case(machine)
                && rules::passphrase_secret_name(&m.name, vault_name)
                    .ok()
                    .as_deref()
                    == Some(secret_name.as_str())
        }) {
            return Err(KvError::conflict(format!(
                "Machine '{}' of this vault already keeps its passphrase as '{secret_name}'; \
                 '{}' maps to the same secret name. Register this machine under another name.",
                other.name,
                kagi_core::ids::printable(machine)
            ))
            .with_inner("UserErrorSecretNameInUse"));
        }
        let now = p.now();
        let result = self
            .write_passphrase(p, v, uri, &secret_name, &passphrase)
            .await;
        let (status, message) = match &result {
            Ok((id, _)) => (
                "Succeeded",
                format!("Passphrase of machine '{machine}' stored as {id}."),
            ),
            Err(e) => ("Failed", e.message.clone()),
        };
        self.log(
            p,
            v,
            activity_entry(
                None,
                &v.id,
                "Microsoft.RecoveryServices/vaults/agents/passphrase/write",
                status,
                &message,
                now,
            ),
        )
        .await;
        let (secret_id, warnings) = result?;
        Ok(json!({"secretId": secret_id, "secretName": secret_name, "warnings": warnings}))
    }

    async fn write_passphrase(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        uri: &str,
        secret_name: &str,
        passphrase: &str,
    ) -> Result<(String, Vec<String>), KvError> {
        let (kv, base) = parse_key_vault_uri(p, uri)?;
        let Some(principal) = v.body["identity"]["principalId"].as_str() else {
            return Err(rules::SYSTEM_IDENTITY_NOT_CONFIGURED.error(format!(
                "The backup vault '{}' has no system-assigned managed identity (a user-assigned \
                 one cannot store passphrases). Turn it on (kagi backup vault identity \
                 --system-assigned) and grant it secrets/set on the key vault.",
                v.body["name"].as_str().unwrap_or_default()
            )));
        };
        let facts = match p.key_vault_facts(kv.as_str()) {
            Some(f) => f,
            None if p.key_vault_soft_deleted(kv.as_str()) => {
                return Err(rules::KEY_VAULT_SOFT_DELETED.error(format!(
                    "The key vault '{kv}' is soft-deleted. Recover it (kagi keyvault recover) \
                     or give another key vault."
                )));
            }
            None => {
                return Err(KvError::new(
                    ErrorCode::NotFound,
                    format!("There is no key vault '{kv}'; check the key vault URI."),
                )
                .with_inner("UserErrorKeyVaultNotFound"));
            }
        };
        let mut warnings = Vec::new();
        if !facts.soft_delete || !facts.purge_protection {
            warnings.push(format!(
                "The key vault '{kv}' does not have {} turned on: a deleted or purged secret \
                 would lose the passphrase. Turn on soft delete and purge protection.",
                match (facts.soft_delete, facts.purge_protection) {
                    (false, false) => "soft delete and purge protection",
                    (false, true) => "soft delete",
                    _ => "purge protection",
                }
            ));
        }
        let token = p
            .identity_token(&v.id, None)
            .map_err(|e| rules::SYSTEM_IDENTITY_NOT_CONFIGURED.error(e.message))?;
        let tags = json!({"backupVault": v.id, "purpose": "kagi backup agent passphrase"});
        match self
            .keys
            .client()
            .set_secret(&base, secret_name, passphrase, &tags, &token)
            .await
        {
            Ok(id) => Ok((id, warnings)),
            Err(f) if f.status == 403 => {
                Err(rules::KEY_VAULT_PERMISSION_NOT_CONFIGURED.error(format!(
                    "The backup vault's system-assigned identity {principal} may not set secrets \
                     in key vault '{kv}' ({}). Grant it secrets/set: an access policy with the \
                     secret permission Set, or a role such as Key Vault Secrets Officer (or a \
                     custom role with Microsoft.KeyVault/vaults/secrets/setSecret/action). Check \
                     also that the vault credentials and key vault URI are the intended ones.",
                    f.message
                )))
            }
            Err(f) if f.inner.as_deref() == Some("ObjectIsDeletedButRecoverable") => {
                Err(rules::SECRET_EXISTS_SOFT_DELETED.error(format!(
                    "The secret '{secret_name}' exists in key vault '{kv}' but is \
                     soft-deleted. Recover it (kagi keyvault secret recover, or az keyvault \
                     secret recover) and try again."
                )))
            }
            Err(f) => Err(KvError::new(
                ErrorCode::BadRequest,
                format!(
                    "The key vault '{kv}' refused to store the passphrase: {} ({}).",
                    f.message, f.code
                ),
            )
            .with_inner("UserErrorKeyVaultOperationFailed")),
        }
    }
}

/// Sets the vault's "protection was attempted" flag (BK-2); the caller holds the vault's lock.
async fn mark_attempt(p: &dyn ServiceHost, v: &VaultCtx) -> Result<(), KvError> {
    let mut state = crate::state::VaultState::load(p, &v.id)
        .await?
        .ok_or_else(|| {
            KvError::new(
                ErrorCode::ResourceNotFound,
                "The backup vault has no state.",
            )
        })?;
    if !state.protection_attempted {
        state.protection_attempted = true;
        state.save(p, &v.id).await?;
    }
    Ok(())
}

/// BK-11: agents use passphrases; a vault with a customer-managed key refuses them.
fn refuse_cmk(v: &VaultCtx) -> Result<(), KvError> {
    if CmkConfig::of(&v.body).is_some() {
        return Err(rules::CMK_VAULT_NOT_SUPPORTED.error(format!(
            "The backup vault '{}' encrypts with a customer-managed key; backup agents encrypt \
             with a passphrase and cannot use such a vault. Register the machine with a vault \
             that uses platform-managed keys.",
            v.body["name"].as_str().unwrap_or_default()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_machine_writing_its_own_objects_may_send_an_object() {
        let own = Caller::Machine("a.example".into());
        let other = Caller::Machine("b.example".into());
        let put = ["machines", "a.example", "objects", "data", "00", "x"];
        assert_eq!(authorize(&own, "PUT", &put).unwrap(), MAX_OBJECT_BYTES);
        assert_eq!(
            authorize(&Caller::Credential, "PUT", &put)
                .unwrap_err()
                .status(),
            403
        );
        assert_eq!(authorize(&other, "PUT", &put).unwrap_err().status(), 403);
        assert_eq!(authorize(&other, "DELETE", &put).unwrap_err().status(), 403);
        // Reading another machine's objects is allowed, with no body.
        assert_eq!(authorize(&other, "GET", &put).unwrap(), 0);
        assert_eq!(authorize(&own, "POST", &put).unwrap(), 0);
        assert_eq!(
            authorize(&own, "POST", &["probe"]).unwrap_err().status(),
            401
        );
        assert_eq!(
            authorize(&own, "POST", &["register"]).unwrap_err().status(),
            401
        );
        assert_eq!(
            authorize(&own, "POST", &["passphrase"]).unwrap(),
            MAX_JSON_BYTES
        );
        assert_eq!(
            authorize(&Caller::Credential, "POST", &["register"]).unwrap(),
            MAX_JSON_BYTES
        );
        let report = ["machines", "a.example", "activity"];
        assert_eq!(authorize(&own, "POST", &report).unwrap(), MAX_JSON_BYTES);
        assert_eq!(
            authorize(&other, "POST", &report).unwrap_err().status(),
            403
        );
        assert_eq!(
            authorize(&Caller::Credential, "GET", &["machines"])
                .unwrap_err()
                .status(),
            403
        );
    }

    #[test]
    fn registering_an_existing_machine_needs_proof() {
        let proof = [7u8; 32];
        let secret = [9u8; 32];
        let mut m = Machine {
            name: "m.example".into(),
            secret_sha256: sha256_hex(&secret),
            key_check: Some(sha256_hex(&proof)),
            ..Machine::default()
        };
        let b64 = |raw: &[u8]| json!(kagi_core::b64::encode(raw));
        let e = proof_for(&m, &json!({}), 100).unwrap_err();
        assert_eq!(e.inner, Some("UserErrorMachineAlreadyRegistered"));
        assert_eq!(e.status(), 403);
        let wrong = json!({"keyProof": b64(&[1; 32]), "machineSecret": b64(&[2; 32])});
        assert!(proof_for(&m, &wrong, 100).is_err());
        let by_key = json!({"keyProof": b64(&proof)});
        assert_eq!(proof_for(&m, &by_key, 100).unwrap(), Proof::Key);
        let by_secret = json!({"machineSecret": b64(&secret)});
        assert_eq!(
            proof_for(&m, &by_secret, 100).unwrap(),
            Proof::MachineSecret
        );
        // The allowance holds until it ends; no key check recorded means no key proof.
        m.reregistration_allowed_until = Some(200);
        assert_eq!(proof_for(&m, &json!({}), 199).unwrap(), Proof::Allowed);
        assert!(proof_for(&m, &json!({}), 200).is_err());
        m.key_check = None;
        assert!(proof_for(&m, &by_key, 300).is_err());
    }

    #[test]
    fn object_names() {
        for ok in ["config", "keys/abc", "data/0a/0a1b", "snapshots/x.y"] {
            assert!(object_name_ok(ok), "{ok}");
        }
        for bad in [
            "", "../x", "a/../b", "a//b", "/a", "a/", ".", "a b", "a/./b",
        ] {
            assert!(!object_name_ok(bad), "{bad}");
        }
    }

    #[test]
    fn json_bodies_are_wiped() {
        let mut req =
            json_of(br#"{"passphrase":"correct horse","nested":{"a":["s", 1]}}"#).unwrap();
        assert_eq!(str_field(&req, "passphrase").unwrap(), "correct horse");
        wipe(&mut req.0);
        assert_eq!(req.0, json!({"passphrase": "", "nested": {"a": ["", 1]}}));
    }
}

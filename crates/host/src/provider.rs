//! What a storage service offers the platform: the [`ResourceProvider`] trait, through which
//! the HTTP layer hands it the ARM requests of its namespace, the moves of its resources, asks it
//! whether it would refuse a delete (a resource group's deletion is all or nothing), the
//! requests of its agents (if it has any), and asks it for its route table (which requests it
//! serves and how the audit log names them) and whether its resources' identities are trusted
//! by vault firewalls. The server registers its providers at start; no router names a
//! service.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kagi_core::{ErrorCode, KvError};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::{MoveRequest, Principal};

/// Results of a provider: errors in the API's own format.
type Result<T, E = KvError> = std::result::Result<T, E>;

/// One ARM request under a provider's namespace, as the HTTP layer parsed it: the caller is
/// authenticated, the api-version checked and the body read (at most 1 MiB).
#[derive(Debug)]
pub struct ArmRequest<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path segments.
    pub segs: &'a [&'a str],
    /// The same, lower-cased.
    pub l: &'a [&'a str],
    /// The body.
    pub body: &'a [u8],
    /// `Prefer: wait=N` (RFC 7240, at most 60 s): a read of a long-running operation may wait
    /// up to this long for it to end.
    pub wait: Option<Duration>,
}

/// Where an ARM request under a namespace points: its subscription, its resource group (none
/// for a subscription-wide request), and the path after `providers/{namespace}`, as sent and
/// lower-cased.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArmScope<'a> {
    /// The subscription.
    pub subscription: &'a str,
    /// The resource group.
    pub resource_group: Option<&'a str>,
    /// The segments after `providers/{namespace}`.
    pub rest: &'a [&'a str],
    /// The same, lower-cased.
    pub rest_l: &'a [&'a str],
}

impl<'a> ArmRequest<'a> {
    /// The scope of the request under `namespace` (lower case, `microsoft.compute`):
    /// `/subscriptions/{s}[/resourceGroups/{g}]/providers/{namespace}/…`; Azure's 404 for any
    /// other path.
    pub fn scope(&self, namespace: &str) -> Result<ArmScope<'a>> {
        let not_found = || KvError::new(ErrorCode::NotFound, "No such route.");
        let (segs, l) = (self.segs, self.l);
        let i = l
            .windows(2)
            .position(|w| w[0] == "providers" && w[1] == namespace)
            .ok_or_else(not_found)?;
        let resource_group = match &l[..i] {
            ["subscriptions", _] => None,
            ["subscriptions", _, "resourcegroups", _] => Some(segs[3]),
            _ => return Err(not_found()),
        };
        Ok(ArmScope {
            subscription: segs[1],
            resource_group,
            rest: &segs[i + 2..],
            rest_l: &l[i + 2..],
        })
    }
}

/// A request body as JSON (an empty body is `{}`), or Azure's 400 `InvalidRequestContent`.
pub fn json_body(body: &[u8]) -> Result<Value> {
    if body.is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_slice(body).map_err(|e| {
        KvError::new(
            ErrorCode::BadRequest,
            format!("The request body is not valid JSON: {e}."),
        )
        .with_inner("InvalidRequestContent")
    })
}

/// A provider's answer to an ARM request.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmReply {
    /// HTTP status.
    pub status: u16,
    /// The body; `null` (or status 204) is answered without one.
    pub body: Value,
    /// For a long-running operation (202): the URL of its status, sent as
    /// `Azure-AsyncOperation` and `Location`, as ARM does.
    pub async_operation: Option<String>,
}

impl From<(u16, Value)> for ArmReply {
    fn from((status, body): (u16, Value)) -> Self {
        ArmReply {
            status,
            body,
            async_operation: None,
        }
    }
}

/// An answer to an agent.
#[derive(Debug)]
pub enum AgentReply {
    /// A JSON body with its status.
    Json(u16, Value),
    /// Bytes (200, `application/octet-stream`).
    Bytes(Vec<u8>),
    /// No body.
    Empty(u16),
}

/// The largest JSON body of an agent route: a body allowed at most this much is read into
/// one buffer of that size allocated up front, so that a secret in it (a passphrase, a key
/// proof, a machine secret) leaves no unwiped copy behind when the buffer grows.
pub const MAX_AGENT_JSON_BYTES: usize = 64 * 1024;

/// An agent request (`/kagi/agent/{resource id}/…`) before its body is read.
pub struct AgentHead<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path segments after `kagi/agent`, starting with the resource id's eight.
    pub segs: &'a [&'a str],
    /// The `Authorization` header.
    pub authorization: Option<&'a str>,
    /// The `Content-Length` the client announced.
    pub content_length: Option<u64>,
}

/// Shows the `Authorization` header only as present or absent: it carries credentials.
impl std::fmt::Debug for AgentHead<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHead")
            .field("method", &self.method)
            .field("segs", &self.segs)
            .field("authorization", &self.authorization.map(|_| "<redacted>"))
            .field("content_length", &self.content_length)
            .finish()
    }
}

/// One agent request, as the HTTP layer parsed it.
#[derive(Debug)]
pub struct AgentCall<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path segments after `kagi/agent`, starting with the resource id's eight.
    pub segs: &'a [&'a str],
    /// `?prefix=` of a list request.
    pub prefix: &'a str,
    /// A `Range` as a half-open byte range.
    pub range: Option<(u64, u64)>,
    /// The body, wiped when dropped (it may carry secrets).
    pub body: Zeroizing<Vec<u8>>,
}

/// An agent request that its provider authenticated and authorized before its body is read
/// ([`ResourceProvider::admit_agent`]).
#[async_trait]
pub trait AdmittedAgent: Send + Sync + std::fmt::Debug {
    /// Who called, for the audit log.
    fn caller(&self) -> &str;

    /// The largest body this request may carry.
    fn body_limit(&self) -> usize;

    /// Serves the request with its body.
    async fn serve(self: Box<Self>, call: AgentCall<'_>) -> Result<AgentReply>;
}

/// The refusal of a move of a resource whose provider does not move it (resource `id`).
pub fn move_not_supported(id: &str) -> KvError {
    KvError::new(
        ErrorCode::BadRequest,
        format!(
            "Resource move is not supported for the resource '{}'.",
            kagi_core::ids::printable(id)
        ),
    )
    .with_inner("ResourceMoveNotSupported")
}

/// A storage service as the platform's HTTP layer sees it: the ARM resource types of one
/// namespace. The server registers each provider at start (`kagi_http::Services`); the
/// management router hands a provider the requests that match its route table
/// ([`ResourceProvider::routes`]: ARM requests under its namespace, `…/providers/{namespace}/…`,
/// and agent requests, `/kagi/agent/{resource id}/…`) and the moves of its resources.
///
/// Methods that do work take `self: Arc<Self>`, so that a provider can start background jobs
/// that outlive the request.
#[async_trait]
pub trait ResourceProvider: Send + Sync + std::fmt::Debug {
    /// The ARM namespace, as ARM spells it (`Microsoft.RecoveryServices`); matched
    /// case-insensitively.
    fn namespace(&self) -> &'static str;

    /// Its resource types, namespace included (`Microsoft.RecoveryServices/vaults`).
    fn resource_types(&self) -> &'static [&'static str];

    /// Serves one ARM request under its namespace.
    async fn handle(self: Arc<Self>, caller: &Principal, req: ArmRequest<'_>) -> Result<ArmReply>;

    /// The node that must serve `req` (its [`crate::ServiceHost::node_name`]), when the
    /// resource it names lives in one node's data directory (a disk family, a SQL server's
    /// databases); the HTTP layer forwards the request there when that is another node.
    /// `None`: any node serves it. Asked before [`ResourceProvider::handle`], for an
    /// authenticated caller; it answers for resources the caller may not see too (the home
    /// node then refuses). Default: `None`.
    async fn home(&self, req: &ArmRequest<'_>) -> Result<Option<String>> {
        let _ = req;
        Ok(None)
    }

    /// Whether resources of `resource_type` (any case) can move to another resource group
    /// (`moveResources`). Default: none can.
    fn movable(&self, resource_type: &str) -> bool {
        let _ = resource_type;
        false
    }

    /// Moves resource `to.id` to `to`'s resource group, crash-safely; with `to.dry_run`
    /// (`validateMoveResources`, and every resource of a `moveResources` before any moves)
    /// only checks, changing nothing. Returns the resource as it is (or would be) stored after
    /// the move, with its new `id`. A refusal by the resource's own rules is a 400 or 409
    /// error with an inner code. Default: [`move_not_supported`].
    async fn move_resource(
        self: Arc<Self>,
        caller: &Principal,
        to: MoveRequest<'_>,
    ) -> Result<Value> {
        let _ = caller;
        Err(move_not_supported(to.id))
    }

    /// Whether it would refuse to delete resource `id` (one of its types) when a resource
    /// group's deletion deletes it together with `deleting` (the lower-case ids of every
    /// resource the group's deletion deletes, `id` among them): the refusal its own `DELETE`
    /// would answer (a 409 with an inner code), so that a group is deleted all or nothing.
    /// A reason that only another resource of `deleting` causes is no reason (a disk
    /// encryption set used only by disks deleted with it). Nothing changes. Default: no
    /// objection.
    async fn check_delete(
        self: Arc<Self>,
        caller: &Principal,
        id: &str,
        deleting: &[String],
    ) -> Result<()> {
        let _ = (caller, id, deleting);
        Ok(())
    }

    /// Every route it serves — its ARM routes under its namespace and its agents' routes
    /// (`/kagi/agent/{resource id}/…`) — with the audit log's operation names. The HTTP layer
    /// hands it only the requests that match one of them (any other is answered 404 or 405
    /// before it is asked), names them in the audit log by them, and describes them in
    /// `/openapi.json` ([`kagi_core::route_table`]).
    fn routes(&self) -> &'static [kagi_core::route_table::Route];

    /// Whether the system-assigned identities of its resources count as trusted services for
    /// a vault firewall's `bypass: AzureServices`. Default: no.
    fn trusted_for_vault_firewall(&self) -> bool {
        false
    }

    /// Its gauges for the metrics (`kagi server --metrics-listen`), computed from memory when
    /// they are scraped: the state of its customer-managed-key consumers and of its jobs, with
    /// labels from bounded sets only (never a resource's name). Default: none.
    fn gauges(&self) -> Vec<kagi_core::gauge::GaugeSample> {
        Vec::new()
    }

    /// Authenticates and authorizes an agent request (`/kagi/agent/{resource id}/…` under its
    /// namespace) before its body is read. Default: 404, the provider has no agents.
    async fn admit_agent(self: Arc<Self>, head: AgentHead<'_>) -> Result<Box<dyn AdmittedAgent>> {
        let _ = head;
        Err(KvError::new(ErrorCode::NotFound, "No such agent route."))
    }
}

//! What a request carries besides its headers and body: the connection's peer address (set by
//! the server) and the slot where a handler leaves the authenticated caller for the audit
//! record. Handlers, the audit layer and the server all use these; none of them owns them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::http::Extensions;
use kagi_vault::Principal;

/// The peer address of a connection, for audit and firewall decisions.
#[derive(Clone, Copy, Debug)]
pub struct RemoteAddr(pub SocketAddr);

/// Where a handler leaves the authenticated caller of a request for its audit record.
#[derive(Clone, Debug, Default)]
pub(crate) struct CallerSlot(pub(crate) Arc<Mutex<Option<Principal>>>);

/// Records `caller` as the authenticated principal of the request whose extensions these
/// are (a no-op when the request is not audited).
pub(crate) fn note_caller(extensions: &Extensions, caller: &Principal) {
    if let Some(slot) = extensions.get::<CallerSlot>() {
        *slot.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(caller.clone());
    }
}

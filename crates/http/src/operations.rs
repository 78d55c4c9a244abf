//! The results of ARM's long-running operations on resource groups: moves (`move_routes`) and
//! group deletions (`group_delete`).
//!
//! Azure answers them with 202 and a `Location` to poll. kagi does the work before it answers
//! (a move is one store transaction and one `rename`; a group's deletion deletes what it
//! holds one resource after another), then answers 202 with a `Location`
//! (`/subscriptions/{s}/operationresults/{id}`, `Retry-After: 1`) whose outcome is final from
//! the first poll: 204 for a move, 200 for a deletion, or the error of a deletion that failed
//! half-way (its status and ARM's error body). Azure's pollers (`LROBasePolling`, what the az
//! CLI and the SDKs use) follow it unchanged. Outcomes are kept in the memory of the node that
//! ran the operation (the last 1024), and the operation's id names that node
//! (`{32 hex digits}-{node}`): another node forwards a poll there (`crate::forward`). After a
//! restart a `Location` answers 404 `OperationNotFound`, though the operation it names had
//! ended before it was handed out.

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, Response, header};
use kagi_core::{ErrorCode, KvError};
use kagi_vault::Platform;
use serde_json::Value;

use crate::respond;

/// Operation results kept in memory.
const KEPT_RESULTS: usize = 1024;

/// How an operation ended, as its `Location` answers.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Outcome {
    /// A move: 204.
    Moved,
    /// A resource group deleted: 200.
    Deleted,
    /// Failed half-way: this status and error body.
    Failed(u16, Value),
}

/// One ended operation: its id and subscription (lower-case), and outcome.
struct Kept {
    op: String,
    sub: String,
    outcome: Outcome,
}

/// Ended operations, oldest first.
static RESULTS: Mutex<VecDeque<Kept>> = Mutex::new(VecDeque::new());

fn remember(op: &str, sub: &str, outcome: Outcome) {
    let mut r = RESULTS.lock().unwrap_or_else(|p| p.into_inner());
    if r.len() >= KEPT_RESULTS {
        r.pop_front();
    }
    r.push_back(Kept {
        op: op.to_ascii_lowercase(),
        sub: sub.to_ascii_lowercase(),
        outcome,
    });
}

fn outcome(op: &str, sub: &str) -> Option<Outcome> {
    RESULTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|k| k.op.eq_ignore_ascii_case(op) && k.sub.eq_ignore_ascii_case(sub))
        .map(|k| k.outcome.clone())
}

/// The long-running answer of an operation that has ended with `outcome`: 202 with
/// `Location` (and `Retry-After`) naming its result.
pub(crate) fn accepted(
    p: &Platform,
    sub: &str,
    api_version: &str,
    outcome: Outcome,
) -> Result<Response<Body>, KvError> {
    let random = kagi_crypto::random_array().map_err(|_| KvError::internal())?;
    let op = kagi_host::operation_id(random, p.node_name());
    remember(&op, sub, outcome);
    let location = format!(
        "{}/subscriptions/{sub}/operationresults/{op}?api-version={}",
        p.config().authority(),
        form_urlencoded::byte_serialize(api_version.as_bytes()).collect::<String>()
    );
    let mut r = respond::empty(202);
    let h = r.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).map_err(|_| KvError::internal())?,
    );
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    Ok(r)
}

/// `GET /subscriptions/{sub}/operationresults/{op}` (`parts`: the request): the outcome, from
/// the node that ran the operation.
pub(crate) async fn answer(p: &Platform, parts: &Parts, sub: &str, op: &str) -> Response<Body> {
    // On one node (SQLite) an operation is this node's, whatever node its id names.
    if parts.method == Method::GET
        && p.shares_store()
        && outcome(op, sub).is_none()
        && let Some(node) = kagi_host::operation_node(op)
        && node != p.node_name()
    {
        if crate::forward::was_forwarded(parts) {
            return crate::forward::misrouted(node);
        }
        return crate::forward::forward(p, node, parts, axum::body::Bytes::new()).await;
    }
    result(&parts.method, sub, op)
}

/// The outcome of operation `op`, as this node knows it.
fn result(method: &Method, sub: &str, op: &str) -> Response<Body> {
    if *method != Method::GET {
        return respond::error(&KvError::new(
            ErrorCode::MethodNotAllowed,
            format!("The method {method} is not allowed on this resource."),
        ));
    }
    match outcome(op, sub) {
        Some(Outcome::Moved) => respond::empty(204),
        Some(Outcome::Deleted) => respond::empty(200),
        Some(Outcome::Failed(status, body)) => respond::json(status, &body),
        None => respond::error(
            &KvError::new(
                ErrorCode::NotFound,
                "No such operation (kagi keeps the results of moves and resource group \
                 deletions in memory; an operation whose Location was handed out had already \
                 ended).",
            )
            .with_inner("OperationNotFound"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "00000000-0000-4000-8000-000000000001";

    #[test]
    fn operation_results_are_remembered_per_subscription() {
        remember("op-1", SUB, Outcome::Moved);
        remember(
            "op-3",
            SUB,
            Outcome::Failed(409, serde_json::json!({"error": {}})),
        );
        assert_eq!(outcome("OP-1", SUB), Some(Outcome::Moved));
        assert_eq!(
            outcome("op-1", "00000000-0000-4000-8000-000000000002"),
            None
        );
        assert_eq!(outcome("op-2", SUB), None);
        assert_eq!(result(&Method::GET, SUB, "op-1").status(), 204);
        assert_eq!(result(&Method::GET, SUB, "op-3").status(), 409);
        assert_eq!(result(&Method::GET, SUB, "op-2").status(), 404);
        assert_eq!(result(&Method::POST, SUB, "op-1").status(), 405);
    }
}

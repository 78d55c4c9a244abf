//! Leases for singleton work on a store several nodes share (docs/SEVERAL_NODES.md).
//!
//! The rotation scheduler, purge sweeps and event delivery must run on one node at a time. A
//! node takes the lease row of such a job ([`crate::Store::acquire_lease`]) and renews it well
//! before it expires; a node that stops renewing (killed, partitioned) loses it when it
//! expires, on the database's clock, and another node takes it with a higher fencing number.
//! The job's writes run inside [`fenced`]: the PostgreSQL store checks, in the same
//! transaction as each write, that the lease is still this holder's with this fencing number,
//! so a node that was paused past its lease cannot write over its successor's work.
//! A SQLite store has one node: its leases are always granted and fences are not checked.

use std::future::Future;

/// A held lease: what a fenced write proves it still holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The lease (the job's name).
    pub name: String,
    /// The node holding it.
    pub holder: String,
    /// Incremented each time the lease changes hands.
    pub fencing: i64,
}

impl Fence {
    /// The form the PostgreSQL store passes to the database (`name holder fencing`); names
    /// and holders are kagi's own and contain no spaces.
    pub(crate) fn setting(&self) -> String {
        format!("{} {} {}", self.name, self.holder, self.fencing)
    }
}

tokio::task_local! {
    static FENCE: Fence;
}

/// Runs `work` with its store writes fenced by `fence`.
pub async fn fenced<F: Future>(fence: Fence, work: F) -> F::Output {
    FENCE.scope(fence, work).await
}

/// The fence of the running task, if its writes are fenced.
pub fn current() -> Option<Fence> {
    FENCE.try_with(Clone::clone).ok()
}

/// `work` under the running task's fence, if any: for tasks a fenced job spawns, which do not
/// inherit task-local values by themselves.
pub fn inherit<F: Future>(work: F) -> impl Future<Output = F::Output> {
    let fence = current();
    async move {
        match fence {
            Some(f) => FENCE.scope(f, work).await,
            None => work.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fence_is_seen_inside_its_scope_and_by_inheriting_tasks_only() {
        assert_eq!(current(), None);
        let f = Fence {
            name: "rotation".into(),
            holder: "node-a".into(),
            fencing: 3,
        };
        let seen = fenced(f.clone(), async {
            let inside = current();
            let spawned = tokio::spawn(inherit(async { current() })).await.unwrap();
            let bare = tokio::spawn(async { current() }).await.unwrap();
            (inside, spawned, bare)
        })
        .await;
        assert_eq!(seen, (Some(f.clone()), Some(f), None));
        assert_eq!(current(), None);
    }
}

//! Key rotation policies (`GET/PUT /keys/{name}/rotationpolicy`) and the scheduler that
//! rotates keys when their policy says so and emits the time-driven events.
//!
//! The scheduler keeps no state of its own: whether a key is due is derived from its newest
//! version's stored `created`/`exp` (`kagi_core::rotation::rotation_due`), so the version a
//! rotation commits is itself the record that it happened. A crash after that commit cannot
//! rotate twice, and after downtime the first sweep catches up — with one new version however
//! many periods were missed (the schedule restarts from the new version's creation).

use kagi_core::access::{DataAction, KeyPermission};
use kagi_core::event::ObjectType;
use kagi_core::rotation::{
    RotationPolicy, RotationPolicyParameters, VersionTimes, new_version_expiry, rotation_due,
};
use kagi_core::{ErrorCode, KvError, ObjectName, VaultName};
use kagi_identity::Principal;
use serde_json::Value;

use crate::state::VaultState;
use crate::{Platform, internal};

/// What one scheduler sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Keys rotated.
    pub rotated: usize,
    /// Events recorded.
    pub events: usize,
}

impl Platform {
    fn policy_target(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        permission: KeyPermission,
    ) -> Result<
        (
            std::sync::Arc<VaultState>,
            kagi_store::VaultRecord,
            ObjectName,
        ),
        KvError,
    > {
        let vname = VaultName::parse(vault)
            .map_err(|_| KvError::new(ErrorCode::VaultNotFound, "The vault was not found."))?;
        let state = self.usable_vault(&vname)?;
        let record = state.record();
        self.authorize_object(
            caller,
            &record,
            DataAction::Key(permission),
            Some(("keys", name)),
        )?;
        let name = ObjectName::parse(name)?;
        match state.key(&name) {
            Some(k) if k.deleted_at.is_none() => Ok((state, record, k.name)),
            _ => Err(KvError::key_not_found(name.as_str(), None)),
        }
    }

    fn policy_id(&self, vault: &VaultName, name: &ObjectName) -> String {
        format!(
            "{}keys/{}/rotationpolicy",
            self.config.vault_uri(vault),
            name
        )
    }

    /// `GET /keys/{name}/rotationpolicy`: the key's policy, or Azure's default (a Notify 30
    /// days before expiry) when none was set.
    pub async fn get_key_rotation_policy(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (_, record, name) =
            self.policy_target(caller, vault, name, KeyPermission::GetRotationPolicy)?;
        let id = self.policy_id(&record.name, &name);
        let policy = self
            .store
            .get_rotation_policy(&record.name, &name)
            .await
            .map_err(|e| internal("get rotation policy", e))?;
        Ok(match policy {
            Some(p) => p.to_wire(&id),
            None => RotationPolicy::default_wire(&id),
        })
    }

    /// `PUT /keys/{name}/rotationpolicy`: validates (400, nothing stored) and replaces the
    /// policy. An empty `lifetimeActions` restores Azure's default actions.
    pub async fn set_key_rotation_policy(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        params: RotationPolicyParameters,
    ) -> Result<Value, KvError> {
        let (state, record, name) =
            self.policy_target(caller, vault, name, KeyPermission::SetRotationPolicy)?;
        let now = self.clock.now();
        let policy = {
            let _w = state.write.lock().await;
            // Re-check under the lock: a delete or purge may have run since.
            if state.key(&name).is_none_or(|k| k.deleted_at.is_some()) {
                return Err(KvError::key_not_found(name.as_str(), None));
            }
            let existing = self
                .store
                .get_rotation_policy(&record.name, &name)
                .await
                .map_err(|e| internal("get rotation policy", e))?;
            let policy = RotationPolicy::from_parameters(params, now, existing.map(|p| p.created))?;
            self.store
                .put_rotation_policy(&record.name, &name, &policy)
                .await
                .map_err(|e| internal("put rotation policy", e))?;
            policy
        };
        tracing::info!(vault = %record.name, key = %name, "rotation policy set");
        // The Notify timing may have changed what is near expiry.
        self.after_change(&state, ObjectType::Key, &name).await;
        Ok(policy.to_wire(&self.policy_id(&record.name, &name)))
    }

    /// The exp of a version of `name` created at `created`: `created + expiryTime` of the key's
    /// rotation policy, or none.
    pub(crate) async fn policy_expiry(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        created: i64,
    ) -> Result<Option<i64>, KvError> {
        let policy = self
            .store
            .get_rotation_policy(vault, name)
            .await
            .map_err(|e| internal("get rotation policy", e))?;
        Ok(new_version_expiry(policy.as_ref(), created))
    }

    /// One scheduler sweep at the platform's `now`: rotates every key whose policy makes it due
    /// (once), then emits every due event (near expiry, expired, and anything a crash left
    /// unemitted). Sweeps never overlap. Runs every 30 s in the server, at start-up, and after
    /// each test-clock move.
    pub async fn run_scheduler(&self) -> Result<SweepReport, KvError> {
        let _sweep = self.events.sweep.lock().await;
        let mut report = SweepReport::default();
        for state in self.all_vaults() {
            let record = state.record();
            if record.deleted_at.is_some() {
                continue;
            }
            let policies = self
                .store
                .list_rotation_policies(&record.name)
                .await
                .map_err(|e| internal("list rotation policies", e))?;
            for (folded, policy) in policies {
                let now = self.clock.now();
                let due = state.keys().get(&folded).and_then(|k| {
                    let newest = k.latest()?;
                    let times = VersionTimes {
                        created: newest.info.attributes.created,
                        exp: newest.info.attributes.exp,
                    };
                    (k.deleted_at.is_none() && rotation_due(Some(&policy), times, now))
                        .then(|| k.name.clone())
                });
                let Some(name) = due else { continue };
                match self.rotate_key_version(&state, &record, &name).await {
                    Ok(_) => {
                        report.rotated += 1;
                        tracing::info!(vault = %record.name, key = %name, "key rotated by its rotation policy");
                    }
                    Err(e) => {
                        tracing::error!(vault = %record.name, key = %name, error = %e, "scheduled rotation failed")
                    }
                }
            }
            match self.reconcile_events(&state, None).await {
                Ok(n) => report.events += n,
                Err(e) => {
                    tracing::error!(vault = %record.name, error = %e, "emitting due events failed")
                }
            }
        }
        Ok(report)
    }
}

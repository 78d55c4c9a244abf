//! The backup service's route table: every ARM request it serves under
//! `Microsoft.RecoveryServices` and every request of its agents (`/kagi/agent/{vault id}/…`,
//! docs/AGENT.md), with the audit log's names. The HTTP layer hands the service only requests
//! that match one of these routes (see [`kagi_core::route_table`]), and describes them in
//! `/openapi.json`.

use kagi_core::route_table::{Auth, Param, RequestBody, Route};

/// `Prefer: wait=N` on a job read.
const PREFER_WAIT: &[Param] = &[Param::header(
    "Prefer",
    "wait=N: wait up to N seconds (at most 60) for the job to end.",
)];

/// Every route of the backup service.
#[rustfmt::skip]
pub static ROUTES: &[Route] = &[
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.RecoveryServices/vaults", "Microsoft.RecoveryServices/vaults/read", "The backup vaults of a subscription."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults", "Microsoft.RecoveryServices/vaults/read", "The backup vaults of a resource group."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}", "Microsoft.RecoveryServices/vaults/write", "Creates or replaces a backup vault."),
    Route::arm("PATCH", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}", "Microsoft.RecoveryServices/vaults/write", "Updates a backup vault (its encryption, its identity)."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}", "Microsoft.RecoveryServices/vaults/read", "A backup vault."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}", "Microsoft.RecoveryServices/vaults/delete", "Deletes a backup vault that holds no backups."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/registeredMachines", "Microsoft.RecoveryServices/vaults/registeredMachines/read", "The backup agents (machines) registered with a vault."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/registeredMachines/{machineName}", "Microsoft.RecoveryServices/vaults/registeredMachines/delete", "Unregisters a machine and deletes its backups."),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/registeredMachines/{machineName}/allowReregistration", "Microsoft.RecoveryServices/vaults/registeredMachines/allowReregistration/action", "Lets a machine register again with vault credentials alone (once)."),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/vaultCredentials", "Microsoft.RecoveryServices/vaults/vaultCredentials/action", "Vault credentials for registering backup agents."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/activityLog", "Microsoft.RecoveryServices/vaults/activityLog/read", "What happened to a backup vault, its key and its items."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/backupJobs", "Microsoft.RecoveryServices/vaults/backupJobs/read", "The backup, restore and check jobs of a vault."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/backupJobs/{jobId}", "Microsoft.RecoveryServices/vaults/backupJobs/read", "A job.").params(PREFER_WAIT),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/backupProtectedItems", "Microsoft.RecoveryServices/vaults/backupProtectedItems/read", "The protected items of a vault."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/backupProtectedItems/{itemName}", "Microsoft.RecoveryServices/vaults/backupProtectedItems/write", "Protects a folder (its source, schedule and retention)."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/backupProtectedItems/{itemName}", "Microsoft.RecoveryServices/vaults/backupProtectedItems/read", "A protected item."),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/backupProtectedItems/{itemName}/backup", "Microsoft.RecoveryServices/vaults/backupProtectedItems/backup/action", "Starts a backup of an item now (202 and the job)."),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/backupProtectedItems/{itemName}/restore", "Microsoft.RecoveryServices/vaults/backupProtectedItems/restore/action", "Starts restoring a recovery point (202 and the job).").body(RequestBody::Json),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/backupProtectedItems/{itemName}/check", "Microsoft.RecoveryServices/vaults/backupProtectedItems/check/action", "Starts checking an item's backups (202 and the job)."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/backupProtectedItems/{itemName}/recoveryPoints", "Microsoft.RecoveryServices/vaults/backupProtectedItems/recoveryPoints/read", "The recovery points of an item."),

    // Backup agents: authenticated by the vault credentials or a machine's credential.
    Route::kagi("POST", "/kagi/agent/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/probe", "Microsoft.RecoveryServices/vaults/probe/action", "What registering a machine would need (vault credentials).").auth(Auth::Agent).body(RequestBody::Json),
    Route::kagi("POST", "/kagi/agent/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/passphrase", "Microsoft.RecoveryServices/vaults/passphrase/action", "Stores a machine's passphrase in the vault's key vault.").auth(Auth::Agent).body(RequestBody::Json),
    Route::kagi("POST", "/kagi/agent/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/register", "Microsoft.RecoveryServices/vaults/register/action", "Registers a machine (vault credentials; its machine credential back).").auth(Auth::Agent).body(RequestBody::Json),
    Route::kagi("GET", "/kagi/agent/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/machines", "Microsoft.RecoveryServices/vaults/machines/read", "The machines registered with the vault.").auth(Auth::Agent),
    Route::kagi("POST", "/kagi/agent/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/machines/{machineName}/activity", "Microsoft.RecoveryServices/vaults/machines/activity/action", "Reports a job of the machine (its status and operation).").auth(Auth::Agent).body(RequestBody::Json),
    Route::kagi("GET", "/kagi/agent/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/machines/{machineName}/objects", "Microsoft.RecoveryServices/vaults/machines/objects/read", "The objects of a machine's backups, with their sizes.").auth(Auth::Agent).params(&[Param::query("prefix", "Only names starting with this.")]),
    Route::kagi("GET", "/kagi/agent/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/machines/{machineName}/objects/{*objectName}", "Microsoft.RecoveryServices/vaults/machines/objects/read", "An object of a machine's backups.").auth(Auth::Agent).params(&[Param::header("Range", "A byte range (bytes=FIRST-LAST).")]),
    Route::kagi("HEAD", "/kagi/agent/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/machines/{machineName}/objects/{*objectName}", "Microsoft.RecoveryServices/vaults/machines/objects/read", "Whether an object exists.").auth(Auth::Agent),
    Route::kagi("PUT", "/kagi/agent/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/machines/{machineName}/objects/{*objectName}", "Microsoft.RecoveryServices/vaults/machines/objects/write", "Writes an object of the machine's own backups (up to 64 MiB).").auth(Auth::Agent).body(RequestBody::Bytes),
    Route::kagi("DELETE", "/kagi/agent/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}/machines/{machineName}/objects/{*objectName}", "Microsoft.RecoveryServices/vaults/machines/objects/delete", "Removes an object of the machine's own backups.").auth(Auth::Agent),
];

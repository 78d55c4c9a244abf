//! The disk service's route table: every ARM request it serves under `Microsoft.Compute`,
//! with the audit log's names. The HTTP layer hands the service only requests that match one
//! of these routes (see [`kagi_core::route_table`]), and describes them in `/openapi.json`.

use kagi_core::route_table::{RequestBody, Route};

/// Every route of the disk service.
#[rustfmt::skip]
pub static ROUTES: &[Route] = &[
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.Compute/locations/{location}/diskOperations/{operationId}", "Microsoft.Compute/locations/diskOperations/read", "The status of a long-running change of a disk encryption set."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.Compute/diskEncryptionSets", "Microsoft.Compute/diskEncryptionSets/read", "The disk encryption sets of a subscription."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.Compute/disks", "Microsoft.Compute/disks/read", "The disks of a subscription."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.Compute/snapshots", "Microsoft.Compute/snapshots/read", "The snapshots of a subscription."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.Compute/images", "Microsoft.Compute/images/read", "The images of a subscription."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/diskEncryptionSets", "Microsoft.Compute/diskEncryptionSets/read", "The disk encryption sets of a resource group."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/diskEncryptionSets/{diskEncryptionSetName}", "Microsoft.Compute/diskEncryptionSets/write", "Creates or replaces a disk encryption set (202 and its status)."),
    Route::arm("PATCH", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/diskEncryptionSets/{diskEncryptionSetName}", "Microsoft.Compute/diskEncryptionSets/write", "Updates a disk encryption set (its key, its identity; 202 and its status)."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/diskEncryptionSets/{diskEncryptionSetName}", "Microsoft.Compute/diskEncryptionSets/read", "A disk encryption set."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/diskEncryptionSets/{diskEncryptionSetName}", "Microsoft.Compute/diskEncryptionSets/delete", "Deletes a disk encryption set no disk uses."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/diskEncryptionSets/{diskEncryptionSetName}/activityLog", "Microsoft.Compute/diskEncryptionSets/activityLog/read", "What happened to a disk encryption set and its key."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/diskEncryptionSets/{diskEncryptionSetName}/associatedResources", "Microsoft.Compute/diskEncryptionSets/associatedResources/read", "The disks and snapshots a disk encryption set protects."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/disks", "Microsoft.Compute/disks/read", "The disks of a resource group."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/disks/{diskName}", "Microsoft.Compute/disks/write", "Creates or replaces a disk (empty, from a snapshot or image, or an upload)."),
    Route::arm("PATCH", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/disks/{diskName}", "Microsoft.Compute/disks/write", "Updates a disk (its size, its encryption)."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/disks/{diskName}", "Microsoft.Compute/disks/read", "A disk."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/disks/{diskName}", "Microsoft.Compute/disks/delete", "Deletes a disk."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/disks/{diskName}/activityLog", "Microsoft.Compute/disks/activityLog/read", "What happened to a disk and its key."),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/disks/{diskName}/beginGetAccess", "Microsoft.Compute/disks/beginGetAccess/action", "Opens an access to a disk (its NBD URI)."),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/disks/{diskName}/endGetAccess", "Microsoft.Compute/disks/endGetAccess/action", "Ends the access to a disk.").body(RequestBody::None),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/snapshots", "Microsoft.Compute/snapshots/read", "The snapshots of a resource group."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/snapshots/{snapshotName}", "Microsoft.Compute/snapshots/write", "Creates or replaces a snapshot of a disk."),
    Route::arm("PATCH", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/snapshots/{snapshotName}", "Microsoft.Compute/snapshots/write", "Updates a snapshot."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/snapshots/{snapshotName}", "Microsoft.Compute/snapshots/read", "A snapshot."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/snapshots/{snapshotName}", "Microsoft.Compute/snapshots/delete", "Deletes a snapshot."),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/snapshots/{snapshotName}/beginGetAccess", "Microsoft.Compute/snapshots/beginGetAccess/action", "Opens a read access to a snapshot."),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/snapshots/{snapshotName}/endGetAccess", "Microsoft.Compute/snapshots/endGetAccess/action", "Ends the access to a snapshot.").body(RequestBody::None),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/images", "Microsoft.Compute/images/read", "The images of a resource group."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/images/{imageName}", "Microsoft.Compute/images/write", "Creates or replaces an image (from a disk or snapshot)."),
    Route::arm("PATCH", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/images/{imageName}", "Microsoft.Compute/images/write", "Updates an image."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/images/{imageName}", "Microsoft.Compute/images/read", "An image."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/images/{imageName}", "Microsoft.Compute/images/delete", "Deletes an image."),
];

//! `DELETE /subscriptions/{s}/resourceGroups/{g}` (issue 16, `az group delete`): everything in
//! the group goes — a storage service's resources through their provider's own `DELETE`, key
//! vaults soft-deleted, identities, role assignments — then the group; a provider's refusal or
//! a lock refuses the whole deletion before anything is deleted.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kagi_core::KvError;
use kagi_core::route_table::Route;
use kagi_host::{
    ArmReply, ArmRequest, Principal, PutResource, ResourceProvider, ResourceRef, ServiceHost,
};
use kagi_testkit::{Options, TestServer};
use serde_json::{Value, json};

const THING: &str = "Contoso.Things/things";

const ROUTES: &[Route] = &[
    Route::arm(
        "GET",
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Contoso.Things/things/{thingName}",
        "Contoso.Things/things/read",
        "A thing.",
    ),
    Route::arm(
        "PUT",
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Contoso.Things/things/{thingName}",
        "Contoso.Things/things/write",
        "Creates a thing.",
    ),
    Route::arm(
        "DELETE",
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Contoso.Things/things/{thingName}",
        "Contoso.Things/things/delete",
        "Deletes a thing.",
    ),
];

/// A provider whose things are stored by the platform, which refuses their deletion while
/// `refuse` is set, and which notes the deletes it serves.
#[derive(Debug)]
struct Things {
    host: Arc<dyn ServiceHost>,
    refuse: AtomicBool,
    deleted: Mutex<Vec<String>>,
}

#[async_trait]
impl ResourceProvider for Things {
    fn namespace(&self) -> &'static str {
        "Contoso.Things"
    }

    fn resource_types(&self) -> &'static [&'static str] {
        &[THING]
    }

    fn routes(&self) -> &'static [Route] {
        ROUTES
    }

    async fn handle(
        self: Arc<Self>,
        caller: &Principal,
        req: ArmRequest<'_>,
    ) -> Result<ArmReply, KvError> {
        let at = ResourceRef {
            subscription: req.segs[1],
            resource_group: req.segs[3],
            resource_type: THING,
            name: req.segs[7],
        };
        if req.method == "GET" {
            return Ok((200, self.host.get_resource(caller, at)?).into());
        }
        if req.method == "DELETE" {
            self.deleted.lock().unwrap().push(req.segs[7].to_string());
            let st = self.host.delete_resource(caller, at).await?;
            return Ok((st, Value::Null).into());
        }
        let put = PutResource {
            at,
            body: json!({"location": "westeurope", "properties": {}}),
            identity: None,
        };
        Ok(self.host.put_resource(caller, put).await?.into())
    }

    async fn check_delete(
        self: Arc<Self>,
        _caller: &Principal,
        _id: &str,
        _deleting: &[String],
    ) -> Result<(), KvError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(KvError::conflict("The thing is busy.").with_inner("ThingIsBusy"));
        }
        Ok(())
    }
}

/// `DELETE` of a group: status, `Location`, body.
async fn delete_group(s: &TestServer, group: &str) -> (u16, Option<String>, Value) {
    let r = s
        .client()
        .delete(s.mgmt_url(&format!("{group}?api-version=2022-09-01")))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let location = r
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    (status, location, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_goes_with_everything_in_it_or_not_at_all() {
    let s = TestServer::start(Options::default()).await;
    let things = Arc::new(Things {
        host: s.platform.clone(),
        refuse: AtomicBool::new(true),
        deleted: Mutex::new(Vec::new()),
    });
    s.services.register(things.clone());
    let sub = s.admin.subscription_id.clone();
    let group = format!("/subscriptions/{sub}/resourceGroups/rg1");
    s.create_vault("rg1", "groupvault").await;
    s.create_vault("rg2", "othervault").await;
    let vault = format!("{group}/providers/Microsoft.KeyVault/vaults/groupvault");
    let uami = format!("{group}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u1");
    let thing = format!("{group}/providers/Contoso.Things/things/t1");
    for id in [&uami, &thing] {
        let (st, v) = s
            .arm("PUT", id, Some(json!({"location": "westeurope"})))
            .await;
        assert!(st == 200 || st == 201, "{id}: {st} {v}");
    }
    let admin = s.platform.authenticate(&s.token).unwrap().object_id;
    let assignment = format!(
        "{group}/providers/Microsoft.Authorization/roleAssignments/0f0e0000-0000-4000-8000-0000000000a1"
    );
    let (st, v) = s
        .arm(
            "PUT",
            &assignment,
            Some(json!({"properties": {
                "roleDefinitionId": "/providers/Microsoft.Authorization/roleDefinitions/21090545-7ca7-4776-b22c-e363652d74d2",
                "principalId": admin}})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let everything = [&group, &vault, &uami, &thing, &assignment];
    let all_there = || async {
        for id in everything {
            assert_eq!(s.arm("GET", id, None).await.0, 200, "{id}");
        }
    };

    // An unknown group.
    let (st, _, v) = delete_group(&s, &format!("/subscriptions/{sub}/resourceGroups/nope")).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("ResourceGroupNotFound")),
        "{v}"
    );

    // A provider's refusal: nothing is deleted, the refusal is in the details.
    let (st, loc, v) = delete_group(&s, &group).await;
    assert_eq!((st, loc), (409, None), "{v}");
    assert_eq!(v["error"]["code"], "ResourceGroupDeletionBlocked", "{v}");
    assert_eq!(v["error"]["details"][0]["code"], "ThingIsBusy", "{v}");
    assert_eq!(v["error"]["details"][0]["target"], thing.as_str(), "{v}");
    all_there().await;

    // A lock on a resource in the group: nothing is deleted.
    things.refuse.store(false, Ordering::SeqCst);
    let lock = format!("{uami}/providers/Microsoft.Authorization/locks/keep");
    let (st, v) = s
        .arm(
            "PUT",
            &lock,
            Some(json!({"properties": {"level": "CanNotDelete"}})),
        )
        .await;
    assert!(st == 200 || st == 201, "{v}");
    let (st, _, v) = delete_group(&s, &group).await;
    assert_eq!(
        (st, v["error"]["innererror"]["code"].as_str()),
        (409, Some("ScopeLocked")),
        "{v}"
    );
    all_there().await;
    assert!(things.deleted.lock().unwrap().is_empty());
    assert_eq!(s.arm("DELETE", &lock, None).await.0, 200);

    // The deletion: 202, and a Location that answers 200.
    let (st, loc, v) = delete_group(&s, &group).await;
    assert_eq!(st, 202, "{v}");
    let loc = loc.unwrap();
    assert!(
        loc.contains(&format!("/subscriptions/{sub}/operationresults/")),
        "{loc}"
    );
    let r = s
        .client()
        .get(&loc)
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(*things.deleted.lock().unwrap(), ["t1"]);
    for id in everything {
        assert_eq!(s.arm("GET", id, None).await.0, 404, "{id}");
    }
    // The vault is soft-deleted, recoverable; the other group's is untouched.
    let (_, deleted) = s
        .arm(
            "GET",
            &format!("/subscriptions/{sub}/providers/Microsoft.KeyVault/deletedVaults"),
            None,
        )
        .await;
    let names: Vec<&str> = deleted["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["groupvault"], "{deleted}");
    let other = format!(
        "/subscriptions/{sub}/resourceGroups/rg2/providers/Microsoft.KeyVault/vaults/othervault"
    );
    assert_eq!(s.arm("GET", &other, None).await.0, 200);

    // Audited under ARM's operation name.
    let ops: Vec<String> = kagi_audit::query(&s.audit_file, kagi_audit::Filter::default())
        .unwrap()
        .map(|e| {
            e.unwrap().record["operationName"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let n = ops
        .iter()
        .filter(|o| *o == "Microsoft.Resources/subscriptions/resourceGroups/delete")
        .count();
    assert_eq!(n, 4, "{ops:?}");
}

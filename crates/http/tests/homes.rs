//! Homes on one node (docs/SEVERAL_NODES.md, "Homes"): on SQLite no other node can share the
//! store, so a resource whose recorded home names another node (a data directory copied
//! elsewhere, or its `node-name` made anew) is served here — never forwarded to a node that
//! cannot exist, never answered 503.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kagi_core::KvError;
use kagi_core::route_table::Route;
use kagi_host::{
    ArmReply, ArmRequest, MoveRequest, Principal, PutResource, ResourceProvider, ResourceRef,
    ServiceHost,
};
use kagi_testkit::{Options, TestServer};
use serde_json::{Value, json};

const THING: &str = "Contoso.Homed/things";

/// The node every thing names as its home: not this one.
const OTHER_NODE: &str = "a-node-of-another-data-directory-0a1b2c3d";

const ROUTES: &[Route] = &[
    Route::arm(
        "GET",
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Contoso.Homed/things/{thingName}",
        "Contoso.Homed/things/read",
        "A thing.",
    ),
    Route::arm(
        "PUT",
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Contoso.Homed/things/{thingName}",
        "Contoso.Homed/things/write",
        "Creates a thing.",
    ),
    Route::arm(
        "DELETE",
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Contoso.Homed/things/{thingName}",
        "Contoso.Homed/things/delete",
        "Deletes a thing.",
    ),
];

/// A provider whose things, stored by the platform, all name [`OTHER_NODE`] as their home;
/// it notes what it serves.
#[derive(Debug)]
struct Homed {
    host: Arc<dyn ServiceHost>,
    served: Mutex<Vec<String>>,
}

#[async_trait]
impl ResourceProvider for Homed {
    fn namespace(&self) -> &'static str {
        "Contoso.Homed"
    }

    fn resource_types(&self) -> &'static [&'static str] {
        &[THING]
    }

    fn routes(&self) -> &'static [Route] {
        ROUTES
    }

    async fn home(&self, _req: &ArmRequest<'_>) -> Result<Option<String>, KvError> {
        Ok(Some(OTHER_NODE.into()))
    }

    async fn handle(
        self: Arc<Self>,
        caller: &Principal,
        req: ArmRequest<'_>,
    ) -> Result<ArmReply, KvError> {
        self.served
            .lock()
            .unwrap()
            .push(format!("{} {}", req.method, req.segs[7]));
        let at = ResourceRef {
            subscription: req.segs[1],
            resource_group: req.segs[3],
            resource_type: THING,
            name: req.segs[7],
        };
        match req.method {
            "GET" => Ok((200, self.host.get_resource(caller, at)?).into()),
            "DELETE" => Ok((self.host.delete_resource(caller, at).await?, Value::Null).into()),
            _ => {
                let put = PutResource {
                    at,
                    body: json!({"location": "westeurope", "properties": {}}),
                    identity: None,
                };
                Ok(self.host.put_resource(caller, put).await?.into())
            }
        }
    }

    fn movable(&self, resource_type: &str) -> bool {
        resource_type.eq_ignore_ascii_case(THING)
    }

    async fn move_resource(
        self: Arc<Self>,
        caller: &Principal,
        to: MoveRequest<'_>,
    ) -> Result<Value, KvError> {
        self.served
            .lock()
            .unwrap()
            .push(format!("move {} {}", to.dry_run, to.resource_group));
        self.host.move_resource(caller, to).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_node_what_names_another_home_is_served_here() {
    let s = TestServer::start(Options::default()).await;
    assert!(!s.platform.shares_store());
    let homed = Arc::new(Homed {
        host: s.platform.clone(),
        served: Mutex::new(Vec::new()),
    });
    s.services.register(homed.clone());
    let sub = s.admin.subscription_id.clone();
    let group = format!("/subscriptions/{sub}/resourceGroups/rg1");
    let (st, v) = s
        .arm("PUT", &group, Some(json!({"location": "westeurope"})))
        .await;
    assert_eq!(st, 201, "{v}");
    let thing = format!("{group}/providers/Contoso.Homed/things/t1");

    // Created and read here, not forwarded (which would answer 503 naming the other node).
    let (st, v) = s
        .arm("PUT", &thing, Some(json!({"location": "westeurope"})))
        .await;
    assert!(st == 200 || st == 201, "{st} {v}");
    let (st, v) = s.arm("GET", &thing, None).await;
    assert_eq!(st, 200, "{v}");

    // Moved here.
    let (st, v) = s
        .arm(
            "PUT",
            &format!("/subscriptions/{sub}/resourceGroups/rg2"),
            Some(json!({"location": "westeurope"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let moving = format!("{group}/providers/Contoso.Homed/things/t2");
    let (st, v) = s
        .arm("PUT", &moving, Some(json!({"location": "westeurope"})))
        .await;
    assert!(st == 200 || st == 201, "{st} {v}");
    let (st, v) = s
        .arm(
            "POST",
            &format!("{group}/moveResources"),
            Some(json!({"resources": [moving],
                "targetResourceGroup": format!("/subscriptions/{sub}/resourceGroups/rg2")})),
        )
        .await;
    assert_eq!(st, 202, "{v}");
    let (st, v) = s
        .arm(
            "GET",
            &format!("/subscriptions/{sub}/resourceGroups/rg2/providers/Contoso.Homed/things/t2"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");

    // The group's deletion deletes it here too.
    let r = s
        .client()
        .delete(s.mgmt_url(&format!("{group}?api-version=2022-09-01")))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    // Its operation's id names this node; polled here.
    let r = s
        .client()
        .get(location)
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        *homed.served.lock().unwrap(),
        [
            "PUT t1",
            "GET t1",
            "PUT t2",
            "move true rg2",
            "move false rg2",
            "GET t2",
            "DELETE t1"
        ]
    );
}

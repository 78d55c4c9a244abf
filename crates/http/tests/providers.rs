//! A storage service is wired in by registering its provider, nothing else: a provider of a
//! namespace kagi has never heard of (`Contoso.Disks`) gets the requests of its route table, the
//! moves of its resources, its agents' requests and its own audit names, with no router
//! knowing it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kagi_core::KvError;
use kagi_core::route_table::{Auth, Route};
use kagi_host::{
    AdmittedAgent, AgentCall, AgentHead, AgentReply, ArmReply, ArmRequest, MoveRequest, Principal,
    ResourceProvider,
};
use kagi_testkit::{Options, TestServer};
use serde_json::{Value, json};

/// The fake provider's route table, with its own audit names.
const DISK_ROUTES: &[Route] = &[
    Route::arm(
        "PUT",
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Contoso.Disks/disks/{diskName}",
        "DiskOperationPUT",
        "Creates a disk.",
    ),
    Route::arm(
        "DELETE",
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Contoso.Disks/disks/{diskName}",
        "DiskOperationDELETE",
        "Deletes a disk.",
    ),
    Route::kagi(
        "POST",
        "/kagi/agent/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Contoso.Disks/disks/{diskName}/status",
        "DiskOperationPOST",
        "A disk agent's status.",
    )
    .auth(Auth::Agent),
];

/// What the fake provider was asked: (what, detail).
#[derive(Debug, Default)]
struct Disks(Mutex<Vec<(String, String)>>);

impl Disks {
    fn note(&self, what: &str, detail: String) {
        self.0.lock().unwrap().push((what.into(), detail));
    }
}

#[async_trait]
impl ResourceProvider for Disks {
    fn namespace(&self) -> &'static str {
        "Contoso.Disks"
    }

    fn resource_types(&self) -> &'static [&'static str] {
        &["Contoso.Disks/disks"]
    }

    async fn handle(
        self: Arc<Self>,
        caller: &Principal,
        req: ArmRequest<'_>,
    ) -> Result<ArmReply, KvError> {
        self.note("handle", format!("{} {}", req.method, req.segs.join("/")));
        if req.method == "DELETE" {
            // A long-running operation: 202 and where its status is.
            return Ok(ArmReply {
                status: 202,
                body: Value::Null,
                async_operation: Some("https://localhost/operations/op1".into()),
            });
        }
        Ok((
            201,
            json!({"caller": caller.object_id, "wait": req.wait.is_some()}),
        )
            .into())
    }

    fn movable(&self, resource_type: &str) -> bool {
        resource_type.eq_ignore_ascii_case("Contoso.Disks/disks")
    }

    async fn move_resource(
        self: Arc<Self>,
        _caller: &Principal,
        to: MoveRequest<'_>,
    ) -> Result<Value, KvError> {
        self.note(
            "move",
            format!("{} {} {}", to.dry_run, to.id, to.resource_group),
        );
        Ok(json!({"id": to.id.replace("/resourceGroups/rg1/", "/resourceGroups/rg2/")}))
    }

    fn routes(&self) -> &'static [Route] {
        DISK_ROUTES
    }

    async fn admit_agent(
        self: Arc<Self>,
        head: AgentHead<'_>,
    ) -> Result<Box<dyn AdmittedAgent>, KvError> {
        self.note("admit", head.segs.join("/"));
        Ok(Box::new(Agent))
    }
}

#[derive(Debug)]
struct Agent;

#[async_trait]
impl AdmittedAgent for Agent {
    fn caller(&self) -> &str {
        "disk-agent"
    }

    fn body_limit(&self) -> usize {
        16
    }

    async fn serve(self: Box<Self>, call: AgentCall<'_>) -> Result<AgentReply, KvError> {
        Ok(AgentReply::Json(200, json!({"body": call.body.len()})))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_provider_serves_its_namespace() {
    let s = TestServer::start(Options::default()).await;
    let disks = Arc::new(Disks::default());
    s.services.register(disks.clone());
    let sub = s.admin.subscription_id.clone();
    for rg in ["rg1", "rg2"] {
        let (st, v) = s
            .arm(
                "PUT",
                &format!("/subscriptions/{sub}/resourceGroups/{rg}"),
                Some(json!({"location": "westeurope"})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
    }
    let disk = format!("/subscriptions/{sub}/resourceGroups/rg1/providers/Contoso.Disks/disks/d1");

    // ARM requests under the namespace.
    let (st, v) = s.arm("PUT", &disk, Some(json!({}))).await;
    assert_eq!(st, 201, "{v}");
    let admin = s.platform.authenticate(&s.token).unwrap();
    assert_eq!(v["caller"], admin.object_id.as_str());
    // A long-running operation's status URL reaches the client as ARM sends it.
    let r = s
        .client()
        .delete(s.mgmt_url(&format!("{disk}?api-version=2025-01-02")))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    for h in ["azure-asyncoperation", "location"] {
        assert_eq!(
            r.headers()[h].to_str().unwrap(),
            "https://localhost/operations/op1"
        );
    }

    // What its table does not hold never reaches it: 404 and 405 from the router.
    let (st, v) = s.arm("GET", &format!("{disk}/snapshots"), None).await;
    assert_eq!(st, 404, "{v}");
    let (st, v) = s.arm("PATCH", &disk, Some(json!({}))).await;
    assert_eq!(st, 405, "{v}");

    // Moves: every resource checked before any moves.
    let body = json!({"resources": [disk],
        "targetResourceGroup": format!("/subscriptions/{sub}/resourceGroups/rg2")});
    let (st, v) = s
        .arm(
            "POST",
            &format!("/subscriptions/{sub}/resourceGroups/rg1/moveResources"),
            Some(body),
        )
        .await;
    assert_eq!(st, 202, "{v}");

    // Agents, authenticated by the provider before the body is read.
    let agent = s.mgmt_url(&format!("/kagi/agent{disk}/status"));
    let r = s.client().post(agent).body("0123").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["body"], 4);

    let asked = disks.0.lock().unwrap().clone();
    let what: Vec<&str> = asked.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(
        what,
        ["handle", "handle", "move", "move", "admit"],
        "{asked:?}"
    );
    assert!(
        asked[2].1.starts_with("true ") && asked[3].1.starts_with("false "),
        "{asked:?}"
    );

    // The audit log names the provider's requests as its table says.
    let ops: Vec<String> = kagi_audit::query(&s.audit_file, kagi_audit::Filter::default())
        .unwrap()
        .map(|e| {
            e.unwrap().record["operationName"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(ops.contains(&"DiskOperationPUT".to_string()), "{ops:?}");
    assert!(ops.contains(&"DiskOperationPOST".to_string()), "{ops:?}");
}

//! An agent request's head never shows its `Authorization` header (vault credentials or a
//! machine secret) when debug-printed.

use kagi_backup_service::agents::AgentHead;

#[test]
fn debug_output_redacts_the_authorization_header() {
    let segs = ["subscriptions", "s"];
    let head = AgentHead {
        method: "PUT",
        segs: &segs,
        authorization: Some("KagiAgent m1:machine-secret-value"),
        content_length: Some(5),
    };
    let shown = format!("{head:?}");
    assert!(!shown.contains("machine-secret-value"), "{shown}");
    assert!(
        shown.contains("PUT") && shown.contains("redacted"),
        "{shown}"
    );
    let none = AgentHead {
        authorization: None,
        ..head
    };
    assert!(format!("{none:?}").contains("None"));
}

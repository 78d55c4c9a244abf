"""Activity log alerts through action groups (TD-5): `Microsoft.Insights/actionGroups` and
`Microsoft.Insights/activityLogAlerts` over ARM, and a real SQL database driven inaccessible (its
TDE protector's key disabled) and back, whose activity-log entries reach a real local webhook in
Azure Monitor's common alert schema — and nothing reaches the receivers of an alert scoped to
another resource group, or of a disabled alert."""

import json
import time

from conftest import DEFAULT_RG, advance_clock, assert_error_shape, create_sp, sp_token, wait_for
from test_events import receivers  # noqa: F401  (the fixture)
from test_sql import (  # noqa: F401  (sql_kagi: the fixture, a server whose SQL keeper probes every second)
    create_db, create_server, db_status, grant, key_vault_with_key, ok, set_protector, sql_kagi, sql_path)

AG_API = "2023-01-01"
ALERT_API = "2020-10-01"
OTHER_RG = "kagi-alerts-other"
OPS = ("MakeDatabaseInaccessible", "MakeDatabaseAccessible")


def rg_id(srv, rg):
    return f"/subscriptions/{srv.subscription_id}/resourceGroups/{rg}"


def insights_path(srv, rg, kind, name=None):
    p = f"{rg_id(srv, rg)}/providers/Microsoft.Insights/{kind}"
    return f"{p}/{name}" if name else p


def call(srv, method, rg, kind, name=None, body=None, token=None, path=None):
    api = AG_API if kind == "actionGroups" else ALERT_API
    url = srv.arm(path or insights_path(srv, rg, kind, name), api)
    if token:
        return srv.request(method, url, auth=False, headers={"Authorization": f"Bearer {token}"}, json=body)
    return srv.request(method, url, json=body)


def action_group(url, short="dba", common=True, enabled=True):
    return {"location": "Global", "properties": {
        "groupShortName": short, "enabled": enabled, "emailReceivers": [], "smsReceivers": [],
        "webhookReceivers": [{"name": "hook", "serviceUri": url, "useCommonAlertSchema": common}]}}


def alert(srv, scope, group, enabled=True, ops=OPS):
    return {"location": "Global", "properties": {
        "scopes": [scope],
        "condition": {"allOf": [
            {"field": "category", "equals": "Administrative"},
            {"anyOf": [{"field": "operationName", "equals": op} for op in ops]}]},
        "actions": {"actionGroups": [{"actionGroupId": insights_path(srv, DEFAULT_RG, "actionGroups", group),
                                      "webhookProperties": {"team": "dba"}}]},
        "enabled": enabled, "description": "TDE protector lost or back"}}


def test_resources_crud_and_bad_bodies(kagi):
    srv = kagi
    r = call(srv, "PUT", DEFAULT_RG, "actionGroups", "crud-ag", action_group("https://example.invalid/hook"))
    assert r.status_code == 201, r.text
    g = r.json()
    assert g["type"] == "Microsoft.Insights/ActionGroups" and g["location"] == "Global"
    assert g["id"].lower() == insights_path(srv, DEFAULT_RG, "actionGroups", "crud-ag").lower()
    assert g["properties"]["webhookReceivers"][0]["serviceUri"] == "https://example.invalid/hook"
    assert call(srv, "PUT", DEFAULT_RG, "actionGroups", "CRUD-AG", action_group("https://example.invalid/h2")).status_code == 200

    bad_groups = [
        ({"properties": {"groupShortName": "x"}}, None),  # no location
        ({"location": "westeurope", "properties": {"groupShortName": "x"}}, None),
        ({"location": "Global", "properties": {"groupShortName": "thirteen-long"}}, None),
        ({"location": "Global", "properties": {"groupShortName": ""}}, None),
        ({"location": "Global", "properties": {"groupShortName": "x", "webhookReceivers": [
            {"name": "h", "serviceUri": "ftp://example.com/"}]}}, "InvalidServiceUri"),
        ({"location": "Global", "properties": {"groupShortName": "x", "webhookReceivers": [
            {"name": "h", "serviceUri": "https://"}]}}, "InvalidServiceUri"),
        ({"location": "Global", "properties": {"groupShortName": "x", "emailReceivers": [
            {"name": "e", "emailAddress": "dba@example.com"}]}}, "ReceiverTypeNotSupported"),
        ({"location": "Global"}, None),
    ]
    for body, inner in bad_groups:
        r = call(srv, "PUT", DEFAULT_RG, "actionGroups", "bad-ag", body)
        err = assert_error_shape(r, 400, "BadRequest")
        if inner:
            assert err["innererror"]["code"] == inner, r.text
    r = srv.request("PUT", srv.arm(insights_path(srv, DEFAULT_RG, "actionGroups", "bad-ag"), AG_API),
                    data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text

    good = alert(srv, rg_id(srv, DEFAULT_RG), "crud-ag")
    r = call(srv, "PUT", DEFAULT_RG, "activityLogAlerts", "crud-alert", good)
    assert r.status_code == 201, r.text
    a = r.json()
    assert a["type"] == "Microsoft.Insights/ActivityLogAlerts"
    assert a["properties"]["scopes"] == [rg_id(srv, DEFAULT_RG)]
    assert a["properties"]["condition"]["allOf"][0] == {"field": "category", "equals": "Administrative"}

    def broken(change):
        b = json.loads(json.dumps(good))
        change(b["properties"])
        return b

    bad_alerts = [
        broken(lambda p: p.update(scopes=[])),
        broken(lambda p: p.update(scopes=["/not/a/scope"])),
        broken(lambda p: p.update(scopes=["/subscriptions/00000000-0000-4000-8000-00000000abcd"])),
        broken(lambda p: p.update(condition={"allOf": []})),
        broken(lambda p: p.update(condition={"allOf": [{"field": "operationName", "equals": "x"}]})),
        broken(lambda p: p["condition"]["allOf"].append({"field": "properties.secret", "equals": "x"})),
        broken(lambda p: p["condition"]["allOf"].append({"field": "status"})),
        broken(lambda p: p["condition"]["allOf"].append({"field": "category", "equals": "Nonsense"})),
        broken(lambda p: p.update(enabled="yes")),
        broken(lambda p: p["actions"]["actionGroups"][0].update(actionGroupId="/subscriptions/x/nope")),
    ]
    for body in bad_alerts:
        r = call(srv, "PUT", DEFAULT_RG, "activityLogAlerts", "bad-alert", body)
        err = assert_error_shape(r, 400, "BadRequest")
        assert err["innererror"]["code"] == "InvalidActivityLogAlert", r.text
    missing_group = broken(lambda p: p["actions"]["actionGroups"][0].update(
        actionGroupId=insights_path(srv, DEFAULT_RG, "actionGroups", "no-such-group")))
    r = call(srv, "PUT", DEFAULT_RG, "activityLogAlerts", "bad-alert", missing_group)
    assert assert_error_shape(r, 400)["innererror"]["code"] == "ActionGroupNotFound"
    assert call(srv, "GET", DEFAULT_RG, "activityLogAlerts", "bad-alert").status_code == 404

    # Read, list (group and subscription), patch, delete.
    assert call(srv, "GET", DEFAULT_RG, "activityLogAlerts", "CRUD-ALERT").json() == a
    listed = call(srv, "GET", DEFAULT_RG, "activityLogAlerts").json()["value"]
    assert "crud-alert" in [x["name"] for x in listed]
    sub_path = f"/subscriptions/{srv.subscription_id}/providers/Microsoft.Insights/activityLogAlerts"
    assert "crud-alert" in [x["name"] for x in call(srv, "GET", None, "activityLogAlerts", path=sub_path).json()["value"]]
    r = call(srv, "PATCH", DEFAULT_RG, "activityLogAlerts", "crud-alert", {"tags": {"env": "test"}, "properties": {"enabled": False}})
    assert r.status_code == 200 and r.json()["properties"]["enabled"] is False and r.json()["tags"] == {"env": "test"}
    assert call(srv, "GET", "no-such-rg", "activityLogAlerts").status_code == 404

    # Only the bootstrap administrator manages them (the server dials the webhooks).
    token = sp_token(srv, create_sp(srv))
    assert call(srv, "PUT", DEFAULT_RG, "actionGroups", "sneaky", action_group("http://169.254.169.254/"), token=token).status_code == 403
    assert call(srv, "GET", DEFAULT_RG, "actionGroups", "crud-ag", token=token).status_code == 403

    assert call(srv, "DELETE", DEFAULT_RG, "activityLogAlerts", "crud-alert").status_code == 200
    assert call(srv, "DELETE", DEFAULT_RG, "activityLogAlerts", "crud-alert").status_code == 204
    assert call(srv, "DELETE", DEFAULT_RG, "actionGroups", "crud-ag").status_code == 200
    assert call(srv, "GET", DEFAULT_RG, "actionGroups", "crud-ag").status_code == 404


def test_database_inaccessible_and_back_alert_the_webhook(sql_kagi, receivers):  # noqa: F811
    srv = sql_kagi
    srv.put_rg(OTHER_RG)
    main, other, disabled = receivers(), receivers(), receivers()
    for name, hook in (("dba", main), ("other", other), ("muted", disabled)):
        # The query may carry a secret: it is never in a payload.
        ok(call(srv, "PUT", DEFAULT_RG, "actionGroups", name, action_group(f"{hook.url}?code=s3cret")))
    ok(call(srv, "PUT", DEFAULT_RG, "activityLogAlerts", "tde-alert", alert(srv, rg_id(srv, DEFAULT_RG), "dba")))
    ok(call(srv, "PUT", DEFAULT_RG, "activityLogAlerts", "elsewhere", alert(srv, rg_id(srv, OTHER_RG), "other")))
    ok(call(srv, "PUT", DEFAULT_RG, "activityLogAlerts", "off",
            alert(srv, rg_id(srv, DEFAULT_RG), "muted", enabled=False)))

    server, body = create_server(srv)
    db, _ = create_db(srv, server)
    vault, keys, key = key_vault_with_key(srv)
    grant(srv, vault, body["identity"]["principalId"])
    ok(set_protector(srv, server, key.id))
    db_id = sql_path(srv, server, f"/databases/{db}")

    # The key is disabled: after the bound the database is Inaccessible, and the alert fires.
    keys.update_key_properties(key.name, key.properties.version, enabled=False)
    time.sleep(2.5)  # the keeper sees the failure; the bound counts from then
    advance_clock(srv, 601)
    wait_for("Inaccessible", lambda: db_status(srv, server, db) == "Inaccessible")
    main.wait(1)
    # Back: the key enabled again, the database Online, the alert fires again.
    keys.update_key_properties(key.name, key.properties.version, enabled=True)
    wait_for("Online again", lambda: db_status(srv, server, db) == "Online")
    main.wait(2)
    time.sleep(1.5)  # nothing more is coming
    got = list(main.events)
    assert len(got) == 2, got
    for payload, op in zip(got, OPS):
        assert payload["schemaId"] == "azureMonitorCommonAlertSchema", payload
        ess = payload["data"]["essentials"]
        assert ess["alertRule"] == "tde-alert"
        assert ess["severity"] == "Sev4"
        assert ess["signalType"] == "Activity Log"
        assert ess["monitorCondition"] == "Fired"
        assert ess["monitoringService"] == "Activity Log - Administrative"
        assert [t.lower() for t in ess["alertTargetIDs"]] == [db_id.lower()]
        assert ess["alertId"].startswith(f"/subscriptions/{srv.subscription_id}/providers/Microsoft.AlertsManagement/alerts/")
        assert ess["firedDateTime"].endswith("Z")
        ctx = payload["data"]["alertContext"]
        assert ctx["operationName"] == op
        assert ctx["status"] == "Succeeded"
        assert ctx["resourceId"].lower() == db_id.lower()
        assert db in ctx["message"]
        assert payload["data"]["customProperties"] == {"team": "dba"}
        assert "s3cret" not in json.dumps(payload)
    assert got[0]["data"]["essentials"]["alertId"] != got[1]["data"]["essentials"]["alertId"]
    assert other.events == [] and other.attempts == 0, other.events
    assert disabled.events == [] and disabled.attempts == 0, disabled.events
    # The activity log holds what fired.
    ops = [e.get("operationName") for e in ok(srv.request(
        "GET", srv.arm(sql_path(srv, server, "/activityLog"), "2023-08-01")))["value"]]
    assert ops.count("MakeDatabaseInaccessible") == 1 and ops.count("MakeDatabaseAccessible") == 1, ops

"""Secrets through the unmodified azure.keyvault.secrets.SecretClient, and the test clock."""

import re
import time
from datetime import datetime, timedelta, timezone

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

from conftest import DATA_API

VERSION_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_VALUE = 25 * 1024


def now():
    return datetime.now(timezone.utc)


def error_of(exc: HttpResponseError) -> dict:
    body = exc.response.json()
    assert isinstance(body.get("error"), dict), body
    return body["error"]


@pytest.fixture
def secrets(kagi, vault):
    return kagi.secret_client(vault.url)


def _delete(client, name):
    poller = client.begin_delete_secret(name)
    poller.wait()
    return poller.result()


# ---------------------------------------------------------------------------------------------
# set / get / update
# ---------------------------------------------------------------------------------------------


def test_set_and_get_secret(vault, secrets):
    nbf = (now() - timedelta(minutes=5)).replace(microsecond=0)
    exp = (now() + timedelta(days=30)).replace(microsecond=0)
    s = secrets.set_secret(
        "db-password",
        "p@ss w0rd ✓",
        content_type="text/plain",
        tags={"env": "test", "owner": "kagi"},
        enabled=True,
        not_before=nbf,
        expires_on=exp,
    )
    assert s.name == "db-password"
    assert s.value == "p@ss w0rd ✓"
    version = s.properties.version
    assert VERSION_RE.match(version), version
    assert s.id == f"{vault.url}secrets/db-password/{version}"
    assert s.properties.vault_url == vault.host_url
    assert s.properties.content_type == "text/plain"
    assert s.properties.tags == {"env": "test", "owner": "kagi"}
    assert s.properties.enabled is True
    assert s.properties.not_before == nbf
    assert s.properties.expires_on == exp
    assert abs(s.properties.created_on - now()) < timedelta(minutes=2)
    assert s.properties.updated_on == s.properties.created_on
    assert s.properties.recovery_level == "CustomizedRecoverable+Purgeable"
    assert s.properties.recoverable_days == 7

    got = secrets.get_secret("db-password")
    assert got.value == s.value
    assert got.id == s.id
    assert got.properties.tags == s.properties.tags
    assert got.properties.expires_on == exp

    # each set adds a version; get by version still reads the old one
    s2 = secrets.set_secret("db-password", "second")
    assert s2.properties.version != version
    assert secrets.get_secret("db-password").value == "second"
    assert secrets.get_secret("db-password", version).value == "p@ss w0rd ✓"
    assert secrets.get_secret("DB-PASSWORD").value == "second"  # names are case-insensitive


def test_secret_values_round_trip_exactly(secrets):
    for name, value in [
        ("empty-ish", " "),
        ("json", '{"a": [1, 2, {"b": null}]}'),
        ("multiline", "line1\nline2\r\n\ttabbed"),
        ("unicode", "ключ 鍵 🔑"),
        ("max", "x" * MAX_VALUE),
    ]:
        secrets.set_secret(name, value)
        assert secrets.get_secret(name).value == value, name


def test_update_secret_properties(secrets):
    first = secrets.set_secret("upd", "v1", content_type="text/plain", tags={"a": "1"})
    latest = secrets.set_secret("upd", "v2")
    exp = (now() + timedelta(days=1)).replace(microsecond=0)
    props = secrets.update_secret_properties(
        "upd", content_type="application/json", tags={"b": "2"}, expires_on=exp
    )
    assert props.version == latest.properties.version
    assert props.content_type == "application/json"
    assert props.tags == {"b": "2"}
    assert props.expires_on == exp
    assert props.updated_on >= props.created_on
    got = secrets.get_secret("upd")
    assert got.value == "v2"
    assert got.properties.content_type == "application/json"

    # a specific (older) version only
    old = secrets.update_secret_properties("upd", first.properties.version, tags={"old": "yes"})
    assert old.version == first.properties.version
    assert old.content_type == "text/plain"
    assert secrets.get_secret("upd", first.properties.version).properties.tags == {"old": "yes"}
    assert secrets.get_secret("upd").properties.tags == {"b": "2"}


def test_update_answers_without_value(vault, secrets):
    secrets.set_secret("novalue", "hidden")
    r = vault.raw("PATCH", "/secrets/novalue/", json={"contentType": "x"})
    assert r.status_code == 200, r.text
    assert "value" not in r.json()
    assert r.json()["contentType"] == "x"


def test_disabled_secret_get_is_403(secrets):
    s = secrets.set_secret("off", "v", enabled=False)
    assert s.properties.enabled is False
    with pytest.raises(HttpResponseError) as ei:
        secrets.get_secret("off")
    assert ei.value.status_code == 403
    err = error_of(ei.value)
    assert err["code"] == "Forbidden"
    assert err["innererror"]["code"] == "SecretDisabled"
    assert err["message"] == "Operation get is not allowed on a disabled secret."
    # still listed, still updatable; enabling makes it readable
    assert "off" in [p.name for p in secrets.list_properties_of_secrets()]
    secrets.update_secret_properties("off", enabled=True)
    assert secrets.get_secret("off").value == "v"


def test_secret_not_yet_valid_is_403(secrets):
    secrets.set_secret("future", "v", not_before=now() + timedelta(hours=1))
    with pytest.raises(HttpResponseError) as ei:
        secrets.get_secret("future")
    assert ei.value.status_code == 403
    assert error_of(ei.value)["innererror"]["code"] == "SecretNotYetValid"


def test_expired_secret_is_403(secrets):
    secrets.set_secret("past", "v", not_before=now() - timedelta(hours=2), expires_on=now() - timedelta(hours=1))
    with pytest.raises(HttpResponseError) as ei:
        secrets.get_secret("past")
    assert ei.value.status_code == 403
    assert error_of(ei.value)["innererror"]["code"] == "SecretExpired"


def test_missing_secret_is_404(secrets):
    with pytest.raises(ResourceNotFoundError) as ei:
        secrets.get_secret("ghost")
    err = error_of(ei.value)
    assert err["code"] == "SecretNotFound"
    assert err["message"] == "A secret with (name/id) ghost was not found in this key vault."
    secrets.set_secret("real", "v")
    with pytest.raises(ResourceNotFoundError):
        secrets.get_secret("real", "0" * 32)
    with pytest.raises(ResourceNotFoundError):
        secrets.update_secret_properties("ghost", content_type="x")
    # Versions of a missing name: an empty list, as Azure answers (test_hardening_keys.py).
    assert list(secrets.list_properties_of_secret_versions("ghost")) == []
    with pytest.raises(ResourceNotFoundError):
        secrets.backup_secret("ghost")


def test_value_over_25_kib_is_400(vault, secrets):
    with pytest.raises(HttpResponseError) as ei:
        secrets.set_secret("huge", "x" * (MAX_VALUE + 1))
    assert ei.value.status_code == 400
    assert error_of(ei.value)["code"] == "BadParameter"
    # 25 KiB counted in bytes of UTF-8, not characters
    with pytest.raises(HttpResponseError) as ei:
        secrets.set_secret("huge", "é" * (MAX_VALUE // 2 + 1))
    assert ei.value.status_code == 400
    with pytest.raises(ResourceNotFoundError):
        secrets.get_secret("huge")


def test_bad_set_requests_are_400(vault, secrets):
    r = vault.raw("PUT", "/secrets/novalue", json={"contentType": "x"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "BadParameter"
    with pytest.raises(HttpResponseError) as ei:
        secrets.set_secret("ct", "v", content_type="c" * 256)
    assert ei.value.status_code == 400
    with pytest.raises(HttpResponseError) as ei:
        secrets.set_secret("times", "v", not_before=now() + timedelta(days=2), expires_on=now() + timedelta(days=1))
    assert ei.value.status_code == 400
    with pytest.raises(HttpResponseError) as ei:
        secrets.set_secret("bad_name", "v")
    assert ei.value.status_code == 400
    assert [p.name for p in secrets.list_properties_of_secrets()] == []


# ---------------------------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------------------------


def test_list_secrets_pages_over_25(vault, secrets):
    names = [f"s{i:02d}" for i in range(30)]
    for n in names:
        secrets.set_secret(n, f"value-of-{n}", content_type="text/plain", tags={"n": n})
    listed = list(secrets.list_properties_of_secrets())
    assert sorted(p.name for p in listed) == names
    for p in listed:
        assert p.id == f"{vault.url}secrets/{p.name}"  # versionless
        assert p.version is None
        assert p.content_type == "text/plain"
        assert p.tags == {"n": p.name}
        assert p.enabled is True
    # the first page holds 25, with an absolute nextLink on the vault host; no values anywhere
    r = vault.raw("GET", "/secrets")
    page = r.json()
    assert len(page["value"]) == 25
    assert page["nextLink"].startswith(f"{vault.url}secrets?")
    assert all("value" not in item for item in page["value"])
    r2 = vault.raw("GET", "/secrets?maxresults=7")
    assert len(r2.json()["value"]) == 7


def test_list_secret_versions(vault, secrets):
    made = [secrets.set_secret("multi", f"v{i}").properties.version for i in range(3)]
    versions = list(secrets.list_properties_of_secret_versions("multi"))
    assert sorted(v.version for v in versions) == sorted(made)
    for v in versions:
        assert v.id == f"{vault.url}secrets/multi/{v.version}"
        assert v.name == "multi"
    raw = vault.raw("GET", "/secrets/multi/versions?maxresults=2").json()
    assert len(raw["value"]) == 2 and raw["nextLink"]
    assert all("value" not in item for item in raw["value"])


# ---------------------------------------------------------------------------------------------
# delete / recover / purge
# ---------------------------------------------------------------------------------------------


def test_delete_get_list_deleted(vault, secrets):
    secrets.set_secret("gone", "v1")
    latest = secrets.set_secret("gone", "v2", content_type="text/plain")
    before = now()
    deleted = _delete(secrets, "gone")
    assert deleted.name == "gone"
    assert deleted.id == latest.id
    assert deleted.recovery_id == f"{vault.url}deletedsecrets/gone"
    assert abs(deleted.deleted_date - before) < timedelta(minutes=2)
    assert abs((deleted.scheduled_purge_date - deleted.deleted_date) - timedelta(days=7)) < timedelta(minutes=1)
    assert deleted.properties.content_type == "text/plain"

    with pytest.raises(ResourceNotFoundError):
        secrets.get_secret("gone")
    assert "gone" not in [p.name for p in secrets.list_properties_of_secrets()]

    got = secrets.get_deleted_secret("gone")
    assert got.id == latest.id
    assert got.recovery_id == deleted.recovery_id
    assert got.deleted_date == deleted.deleted_date
    assert got.scheduled_purge_date == deleted.scheduled_purge_date

    listed = [d for d in secrets.list_deleted_secrets() if d.name == "gone"]
    assert len(listed) == 1
    assert listed[0].recovery_id == deleted.recovery_id
    assert listed[0].id == f"{vault.url}secrets/gone"

    raw = vault.raw("GET", "/deletedsecrets/gone").json()
    assert "value" not in raw


def test_delete_missing_secret_is_404(secrets):
    with pytest.raises(ResourceNotFoundError):
        secrets.begin_delete_secret("ghost")
    with pytest.raises(ResourceNotFoundError):
        secrets.get_deleted_secret("ghost")
    with pytest.raises(ResourceNotFoundError):
        secrets.begin_recover_deleted_secret("ghost")
    with pytest.raises(ResourceNotFoundError):
        secrets.purge_deleted_secret("ghost")


def test_set_over_deleted_name_conflicts(secrets):
    secrets.set_secret("zombie", "v")
    _delete(secrets, "zombie")
    with pytest.raises(ResourceExistsError) as ei:
        secrets.set_secret("zombie", "again")
    assert ei.value.status_code == 409
    err = error_of(ei.value)
    assert err["code"] == "Conflict"
    assert err["innererror"]["code"] == "ObjectIsDeletedButRecoverable"


def test_recover_deleted_secret(secrets):
    first = secrets.set_secret("phoenix", "one", tags={"t": "1"})
    second = secrets.set_secret("phoenix", "two")
    _delete(secrets, "phoenix")
    poller = secrets.begin_recover_deleted_secret("phoenix")
    poller.wait()
    recovered = poller.result()
    assert recovered.id == second.id
    assert recovered.name == "phoenix"
    assert secrets.get_secret("phoenix").value == "two"
    old = secrets.get_secret("phoenix", first.properties.version)
    assert old.value == "one" and old.properties.tags == {"t": "1"}
    assert len(list(secrets.list_properties_of_secret_versions("phoenix"))) == 2
    with pytest.raises(ResourceNotFoundError):
        secrets.get_deleted_secret("phoenix")


def test_purge_frees_name(secrets):
    old = secrets.set_secret("purged", "old")
    _delete(secrets, "purged")
    secrets.purge_deleted_secret("purged")
    with pytest.raises(ResourceNotFoundError):
        secrets.get_deleted_secret("purged")
    assert "purged" not in [d.name for d in secrets.list_deleted_secrets()]
    new = secrets.set_secret("purged", "new")
    assert new.properties.version != old.properties.version
    assert [p.version for p in secrets.list_properties_of_secret_versions("purged")] == [new.properties.version]


def test_purge_of_live_secret_is_404(secrets):
    secrets.set_secret("alive", "v")
    with pytest.raises(ResourceNotFoundError):
        secrets.purge_deleted_secret("alive")
    assert secrets.get_secret("alive").value == "v"


def test_purge_refused_with_purge_protection(kagi, make_vault):
    v = make_vault(purge_protection=True)
    c = kagi.secret_client(v.url)
    s = c.set_secret("protected", "v")
    assert s.properties.recovery_level == "CustomizedRecoverable"
    _delete(c, "protected")
    with pytest.raises(HttpResponseError) as ei:
        c.purge_deleted_secret("protected")
    assert ei.value.status_code == 403
    assert error_of(ei.value)["innererror"]["code"] == "PurgeProtectionEnabled"
    assert c.get_deleted_secret("protected").name == "protected"
    c.begin_recover_deleted_secret("protected").wait()
    assert c.get_secret("protected").value == "v"


# ---------------------------------------------------------------------------------------------
# backup / restore
# ---------------------------------------------------------------------------------------------


def test_backup_restore_into_other_vault(kagi, vault, make_vault, secrets):
    one, two = "first-value-7c1e55", "second-value-93ab02"
    first = secrets.set_secret("portable", one, tags={"k": "v"})
    latest = secrets.set_secret("portable", two, content_type="text/plain")
    blob = secrets.backup_secret("portable")
    assert isinstance(blob, bytes) and len(blob) > 16
    assert two.encode() not in blob and one.encode() not in blob

    # the name is taken (live, then soft-deleted) in the source vault
    with pytest.raises(ResourceExistsError):
        secrets.restore_secret_backup(blob)
    _delete(secrets, "portable")
    with pytest.raises(ResourceExistsError):
        secrets.restore_secret_backup(blob)

    other = kagi.secret_client(make_vault().url)
    props = other.restore_secret_backup(blob)
    assert props.name == "portable"
    assert props.version == latest.properties.version
    assert props.content_type == "text/plain"
    assert other.get_secret("portable").value == two
    old = other.get_secret("portable", first.properties.version)
    assert old.value == one and old.properties.tags == {"k": "v"}

    # and back into the original vault once the name is purged
    secrets.purge_deleted_secret("portable")
    secrets.restore_secret_backup(blob)
    assert secrets.get_secret("portable").value == two


def test_restore_garbage_is_400(secrets):
    with pytest.raises(HttpResponseError) as ei:
        secrets.restore_secret_backup(b"not a backup at all")
    assert ei.value.status_code == 400


def test_secret_api_versions(vault, secrets):
    secrets.set_secret("versioned", "v")
    for api in ("7.4", "7.5", "7.6", "2025-07-01", "2026-04-01"):
        r = vault.raw("GET", "/secrets/versioned/", api_version=api)
        assert r.status_code == 200, (api, r.text)
        assert r.json()["value"] == "v"


def test_sdk_default_api_version_is_sent(kagi, vault):
    from azure.keyvault.secrets import ApiVersion

    for api in (None, ApiVersion.V2025_07_01, ApiVersion.V7_6, ApiVersion.V7_4):
        kw = {} if api is None else {"api_version": api}
        c = kagi.secret_client(vault.url, **kw)
        if api is None:
            assert c.api_version == "2026-04-01"
        c.set_secret("default-api", f"v-{api}")
        assert c.get_secret("default-api").value == f"v-{api}"


# ---------------------------------------------------------------------------------------------
# the test clock
# ---------------------------------------------------------------------------------------------


def _advance(srv, seconds, token=None):
    headers = {"Authorization": f"Bearer {token or srv.token()}"}
    return srv.request("POST", f"{srv.base}/kagi/test/clock", auth=False, headers=headers, json={"advanceSeconds": seconds})


def test_clock_endpoint_absent_without_flag(kagi):
    r = _advance(kagi, 60)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "NotFound"
    # and it answers exactly like any other unknown path
    other = kagi.request("POST", f"{kagi.base}/kagi/test/nothing?api-version=2023-07-01", json={})
    assert other.status_code == 404


def test_clock_endpoint_auth_and_bad_bodies(clock_kagi):
    srv = clock_kagi
    url = f"{srv.base}/kagi/test/clock"
    r = srv.request("POST", url, auth=False, json={"advanceSeconds": 1})
    assert r.status_code == 401
    r = srv.request("POST", url, auth=False, headers={"Authorization": "Bearer garbage"}, json={"advanceSeconds": 1})
    assert r.status_code == 401
    for body in ({}, {"advanceSeconds": -1}, {"advanceSeconds": "10"}, {"advanceSeconds": 1.5},
                 {"advanceSeconds": 101 * 365 * 86400}):
        r = srv.request("POST", url, json=body)
        assert r.status_code == 400, (body, r.text)
    r = srv.request("POST", url, data=b"not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = srv.request("GET", url)
    assert r.status_code == 405
    before = time.time()
    r = _advance(srv, 0)
    assert r.status_code == 200, r.text
    assert abs(r.json()["now"] - before) < 60


def test_clock_expires_secrets_and_purges_after_retention(clock_kagi):
    srv = clock_kagi
    v = srv.create_vault(retention=7)
    c = srv.secret_client(v.url)
    start = now()
    c.set_secret("short-lived", "v", expires_on=start + timedelta(hours=1))
    assert c.get_secret("short-lived").value == "v"

    r = _advance(srv, 2 * 3600)
    assert r.status_code == 200, r.text
    assert r.json()["now"] >= int(start.timestamp()) + 2 * 3600 - 5

    # the old token is now past its expiry on the server's clock: the SDK gets a new one.
    srv._credential = None
    c = srv.secret_client(v.url)
    with pytest.raises(HttpResponseError) as ei:
        c.get_secret("short-lived")
    assert ei.value.status_code == 403
    assert error_of(ei.value)["innererror"]["code"] == "SecretExpired"

    # soft delete now; retention is 7 days on the server's clock
    c.set_secret("doomed", "v")
    deleted = _delete(c, "doomed")
    assert deleted.deleted_date.timestamp() >= start.timestamp() + 2 * 3600 - 5
    assert _advance(srv, 6 * 86400).status_code == 200
    srv._credential = None
    c = srv.secret_client(v.url)
    assert c.get_deleted_secret("doomed").name == "doomed"
    assert _advance(srv, 2 * 86400).status_code == 200
    srv._credential = None
    c = srv.secret_client(v.url)
    with pytest.raises(ResourceNotFoundError):
        c.get_deleted_secret("doomed")
    # the name is free again
    assert c.set_secret("doomed", "reborn").value == "reborn"


# ---------------------------------------------------------------------------------------------
# durability and vault lifecycle
# ---------------------------------------------------------------------------------------------


def test_secrets_survive_kill9_and_are_sealed_at_rest(private_kagi):
    srv = private_kagi
    v = srv.create_vault()
    c = srv.secret_client(v.url)
    marker = "plaintext-marker-" + "5e1f0c9a7d3b"
    first = c.set_secret("durable", marker, content_type="text/plain", tags={"a": "b"})
    c.set_secret("durable", marker + "-v2")
    c.set_secret("gone", "x")
    _delete(c, "gone")

    srv.restart(hard=True)
    srv._credential = None
    c = srv.secret_client(v.url)
    assert c.get_secret("durable").value == marker + "-v2"
    old = c.get_secret("durable", first.properties.version)
    assert old.value == marker and old.properties.tags == {"a": "b"}
    assert c.get_deleted_secret("gone").name == "gone"

    data = srv.store_bytes()
    assert b"durable" in data, "the store's contents were not read"
    assert marker.encode() not in data, "secret value stored in the clear"


def test_secrets_follow_their_vault_through_soft_delete(kagi, make_vault):
    v = make_vault()
    c = kagi.secret_client(v.url)
    c.set_secret("inside", "v")
    r = kagi.delete_vault(v.name)
    assert r.status_code == 200, r.text
    r = kagi.recover_vault(v.name)
    assert r.status_code in (200, 201), r.text
    assert kagi.secret_client(v.url).get_secret("inside").value == "v"


def test_raw_routes_and_methods(vault, secrets):
    secrets.set_secret("routed", "v")
    assert vault.raw("GET", "/secrets/routed").json()["value"] == "v"  # without the trailing slash
    assert vault.raw("POST", "/secrets/routed").status_code == 405
    assert vault.raw("GET", "/secrets/routed/versions/extra").status_code == 404
    assert vault.raw("PUT", "/deletedsecrets/routed", json={}).status_code == 405
    r = vault.raw("GET", "/secrets/routed/not-a-version")
    assert r.status_code == 400, r.text
    assert vault.raw("GET", "/secrets", api_version="2026-04-02").status_code == 400

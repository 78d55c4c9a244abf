"""ARM management plane: resource groups and vaults (create, get, list, update, delete, recover, purge)."""

from datetime import datetime, timedelta, timezone

import pytest
from azure.keyvault.keys.crypto import KeyWrapAlgorithm

from conftest import DEFAULT_RG, LOCATION, assert_error_shape, random_name


def _parse_time(s: str) -> datetime:
    # ARM uses ISO 8601, e.g. 2024-01-01T00:00:00Z or with fractional seconds / offset
    s = s.replace("Z", "+00:00")
    if "." in s:
        head, frac = s.split(".", 1)
        digits = "".join(c for c in frac if c.isdigit())
        rest = frac[len(digits):]
        s = f"{head}.{digits[:6].ljust(6, '0')}{rest}"
    dt = datetime.fromisoformat(s)
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _assert_vault_body(kagi, body, name, rg=DEFAULT_RG, sku="standard", retention=7, purge_protection=False):
    assert body["id"] == kagi.vault_path(rg, name), body["id"]
    assert body["name"] == name
    assert body["type"] == "Microsoft.KeyVault/vaults"
    assert body["location"] == LOCATION
    p = body["properties"]
    assert p["vaultUri"] == f"https://{name}.localhost:{kagi.port}/", p["vaultUri"]
    assert p["tenantId"] == kagi.tenant_id
    assert p["sku"]["name"] == sku and p["sku"]["family"] == "A", p["sku"]
    assert p["enableSoftDelete"] is True
    assert p["softDeleteRetentionInDays"] == retention
    if purge_protection:
        assert p["enablePurgeProtection"] is True
    else:
        # Azure omits the property (null) when purge protection was never enabled
        assert p.get("enablePurgeProtection") in (None, False)


def test_resource_group_put_is_idempotent(kagi):
    rg = random_name("rg", 12)
    r1 = kagi.request("PUT", kagi.arm(kagi.rg_path(rg), "2021-04-01"), json={"location": LOCATION})
    assert r1.status_code in (200, 201), r1.text
    r2 = kagi.request("PUT", kagi.arm(kagi.rg_path(rg), "2021-04-01"), json={"location": LOCATION})
    assert r2.status_code == 200, r2.text  # second PUT updates, Azure answers 200
    body = r2.json()
    assert body["name"] == rg
    assert body["location"] == LOCATION
    assert body["id"].lower() == kagi.rg_path(rg).lower()


def test_management_requires_a_token(kagi):
    r = kagi.request("GET", kagi.arm(kagi.vault_path(DEFAULT_RG, "whatever")), auth=False)
    assert r.status_code == 401, r.text[:300]


def test_create_get_list(kagi):
    name = random_name("v", 20)
    r = kagi.put_vault_raw(name)
    assert r.status_code in (200, 201), r.text
    _assert_vault_body(kagi, r.json(), name)

    g = kagi.get_vault(name)
    assert g.status_code == 200, g.text
    _assert_vault_body(kagi, g.json(), name)

    lst = kagi.request("GET", kagi.arm(kagi.vault_path(DEFAULT_RG, "").rstrip("/")))
    assert lst.status_code == 200, lst.text
    value = lst.json()["value"]
    assert isinstance(value, list)
    mine = [v for v in value if v["name"] == name]
    assert len(mine) == 1, [v["name"] for v in value]
    _assert_vault_body(kagi, mine[0], name)

    # the new vault's data plane answers (empty)
    client = kagi.key_client(r.json()["properties"]["vaultUri"])
    assert list(client.list_properties_of_keys()) == []


def test_get_unknown_vault_is_404(kagi):
    r = kagi.get_vault(random_name("nx", 16))
    assert r.status_code == 404, r.text
    assert_error_shape(r, 404)


def test_premium_sku(kagi):
    v = kagi.create_vault(sku="premium")
    _assert_vault_body(kagi, v.body, v.name, sku="premium")


@pytest.mark.parametrize(
    "bad_name",
    ["ab", "1abc", "a" * 25, "has_underscore", "has.dot", "-leading"],
)
def test_invalid_vault_names(kagi, bad_name):
    r = kagi.put_vault_raw(bad_name)
    assert r.status_code == 400, (bad_name, r.status_code, r.text[:300])
    assert_error_shape(r, 400)


def test_boundary_vault_names_accepted(kagi):
    for name in (random_name("a", 3), random_name("Z", 24)):
        r = kagi.put_vault_raw(name)
        assert r.status_code in (200, 201), (name, r.text)


def test_vault_names_are_globally_unique(kagi):
    v = kagi.create_vault()
    other_rg = random_name("rg", 12)
    kagi.put_rg(other_rg)
    r = kagi.put_vault_raw(v.name, rg=other_rg)
    assert r.status_code == 409, (r.status_code, r.text[:300])
    assert_error_shape(r, 409)


@pytest.mark.parametrize("days", [6, 91, 0])
def test_retention_out_of_range(kagi, days):
    r = kagi.put_vault_raw(random_name("v", 16), retention=days)
    assert r.status_code == 400, (days, r.status_code, r.text[:300])
    assert_error_shape(r, 400)


def test_retention_boundaries_accepted(kagi):
    for days in (7, 90):
        name = random_name("v", 16)
        r = kagi.put_vault_raw(name, retention=days)
        assert r.status_code in (200, 201), (days, r.text)
        assert r.json()["properties"]["softDeleteRetentionInDays"] == days


def test_enable_purge_protection_then_cannot_disable(kagi):
    v = kagi.create_vault()
    # update via PUT
    r = kagi.put_vault_raw(v.name, purge_protection=True)
    assert r.status_code == 200, r.text  # existing vault: update answers 200
    _assert_vault_body(kagi, r.json(), v.name, purge_protection=True)
    g = kagi.get_vault(v.name).json()
    assert g["properties"]["enablePurgeProtection"] is True
    # the vault URI does not change on update
    assert g["properties"]["vaultUri"] == v.url

    r = kagi.put_vault_raw(v.name, purge_protection=False)
    assert r.status_code == 400, r.text
    assert_error_shape(r, 400)
    assert kagi.get_vault(v.name).json()["properties"]["enablePurgeProtection"] is True


def test_update_keeps_keys(kagi):
    v = kagi.create_vault()
    k = v.client.create_ec_key("survivor")
    r = kagi.put_vault_raw(v.name, purge_protection=True)
    assert r.status_code == 200, r.text
    assert v.client.get_key("survivor").id == k.id


def _deleted_entry(kagi, name):
    lst = kagi.list_deleted_vaults()
    assert lst.status_code == 200, lst.text
    return [d for d in lst.json()["value"] if d["name"] == name]


def test_delete_recover_keeps_keys(kagi):
    v = kagi.create_vault()
    key = v.client.create_rsa_key("kept", size=2048)
    dek = b"\x42" * 32
    wrapped = kagi.crypto_client(key).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek).encrypted_key

    before = datetime.now(timezone.utc)
    d = kagi.delete_vault(v.name)
    assert d.status_code == 200, d.text

    g = kagi.get_vault(v.name)
    assert g.status_code == 404, g.text
    # data plane of a deleted vault is gone
    raw = kagi.request("GET", v.data_url("/keys"))
    assert raw.status_code == 404, raw.text[:300]

    entries = _deleted_entry(kagi, v.name)
    assert len(entries) == 1, entries
    e = entries[0]
    assert e["type"] == "Microsoft.KeyVault/deletedVaults"
    assert e["id"] == kagi.deleted_vault_path(v.name)
    p = e["properties"]
    assert p["vaultId"] == kagi.vault_path(DEFAULT_RG, v.name)
    assert p["location"] == LOCATION
    deletion = _parse_time(p["deletionDate"])
    scheduled = _parse_time(p["scheduledPurgeDate"])
    assert before - timedelta(minutes=1) <= deletion <= datetime.now(timezone.utc) + timedelta(minutes=1)
    assert abs((scheduled - deletion) - timedelta(days=7)) < timedelta(minutes=1), (deletion, scheduled)
    assert p.get("purgeProtectionEnabled") in (None, False)

    one = kagi.get_deleted_vault(v.name)
    assert one.status_code == 200, one.text
    assert one.json()["name"] == v.name
    assert one.json()["properties"]["vaultId"] == kagi.vault_path(DEFAULT_RG, v.name)

    # a soft-deleted vault's name cannot be taken by a plain create
    clash = kagi.put_vault_raw(v.name)
    assert clash.status_code == 409, (clash.status_code, clash.text[:300])

    rec = kagi.recover_vault(v.name)
    assert rec.status_code in (200, 201), rec.text
    _assert_vault_body(kagi, rec.json(), v.name)
    assert _deleted_entry(kagi, v.name) == []
    assert kagi.get_deleted_vault(v.name).status_code == 404

    got = v.client.get_key("kept")
    assert got.id == key.id
    assert kagi.crypto_client(got).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == dek


def test_recover_without_deleted_vault_fails(kagi):
    r = kagi.recover_vault(random_name("v", 16))
    assert r.status_code in (400, 404, 409), (r.status_code, r.text[:300])
    assert_error_shape(r)


def test_purge_makes_name_reusable(kagi):
    v = kagi.create_vault()
    v.client.create_ec_key("gone")
    assert kagi.delete_vault(v.name).status_code == 200

    p = kagi.purge_deleted_vault(v.name)
    assert p.status_code in (200, 202), p.text
    assert _deleted_entry(kagi, v.name) == []
    assert kagi.get_deleted_vault(v.name).status_code == 404
    # a purged vault cannot be recovered
    assert kagi.recover_vault(v.name).status_code not in (200, 201)
    # name reusable; the new vault is empty
    r = kagi.put_vault_raw(v.name)
    assert r.status_code in (200, 201), r.text
    fresh = kagi.key_client(r.json()["properties"]["vaultUri"])
    assert list(fresh.list_properties_of_keys()) == []
    assert list(fresh.list_deleted_keys()) == []


def test_purge_unknown_deleted_vault_is_404(kagi):
    r = kagi.purge_deleted_vault(random_name("v", 16))
    assert r.status_code == 404, r.text
    assert_error_shape(r, 404)


def test_deleted_purge_protected_vault_reports_it(kagi):
    v = kagi.create_vault(purge_protection=True)
    assert kagi.delete_vault(v.name).status_code == 200
    entries = _deleted_entry(kagi, v.name)
    assert len(entries) == 1
    assert entries[0]["properties"]["purgeProtectionEnabled"] is True

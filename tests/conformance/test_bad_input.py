"""Hostile and malformed requests (raw HTTP with a valid token). None may answer 500, none may create anything."""

import json

import pytest

from conftest import assert_error_shape

CREATE = "/keys/{name}/create"
JSON_HEADERS = {"Content-Type": "application/json"}


def post_raw(vault, path, data: bytes, api_version="7.4", headers=None):
    h = dict(JSON_HEADERS)
    h.update(headers or {})
    return vault.raw("POST", path, api_version=api_version, data=data, headers=h)


def assert_nothing_created(vault, allowed=()):
    assert vault.key_names() == sorted(allowed)
    assert [d.name for d in vault.client.list_deleted_keys()] == []


def assert_bad_parameter(r):
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert_error_shape(r, 400, "BadParameter")


@pytest.mark.parametrize(
    "body",
    [
        b'{"kty": "RSA", "key_size": 2048',
        b'{"kty": "RSA",}',
        b"kty=RSA",
        b"\xff\xfe\x00garbage",
        b"[" * 100000 + b"]" * 100000,  # deep nesting must not blow the stack
    ],
    ids=["truncated", "trailing-comma", "form", "binary", "deep-nesting"],
)
def test_malformed_json(vault, body):
    r = post_raw(vault, CREATE.format(name="k1"), body)
    assert_bad_parameter(r)
    assert_nothing_created(vault)


@pytest.mark.parametrize(
    "body",
    [
        {"kty": "RSA", "key_size": "abc"},
        {"kty": "RSA", "key_size": 2048.5},
        {"kty": "RSA", "key_size": -2048},
        {"kty": 5},
        {"kty": ["RSA"]},
        {"kty": "RSA", "key_ops": "sign"},
        {"kty": "RSA", "attributes": {"enabled": "yes"}},
        {"kty": "RSA", "attributes": {"exp": "tomorrow"}},
        {"kty": "RSA", "tags": {"a": 1}},
        {"kty": "RSA", "tags": ["a"]},
        {"kty": "EC", "crv": 256},
        [],
        "RSA",
        None,
    ],
    ids=lambda b: json.dumps(b)[:40],
)
def test_wrong_types(vault, body):
    r = post_raw(vault, CREATE.format(name="k1"), json.dumps(body).encode())
    assert_bad_parameter(r)
    assert_nothing_created(vault)


@pytest.mark.parametrize("body", [{"kty": "FOO"}, {"kty": "rsa-hsm-x"}, {}, {"key_size": 2048}])
def test_unknown_or_missing_kty(vault, body):
    r = post_raw(vault, CREATE.format(name="k1"), json.dumps(body).encode())
    assert_bad_parameter(r)
    assert_nothing_created(vault)


@pytest.mark.parametrize("size", [0, 512, 1024, 2047, 4097, 8192 * 4])
def test_unsupported_rsa_sizes(vault, size):
    r = post_raw(vault, CREATE.format(name="k1"), json.dumps({"kty": "RSA", "key_size": size}).encode())
    assert_bad_parameter(r)
    assert_nothing_created(vault)


@pytest.mark.parametrize("crv", ["P-192", "P-224", "Ed25519", "X25519", ""])
def test_unsupported_curves(vault, crv):
    r = post_raw(vault, CREATE.format(name="k1"), json.dumps({"kty": "EC", "crv": crv}).encode())
    assert_bad_parameter(r)
    assert_nothing_created(vault)


def test_bad_base64url(vault):
    key = vault.client.create_rsa_key("wrapper", size=2048)
    v = key.properties.version
    for op in ("wrapkey", "unwrapkey", "encrypt", "decrypt"):
        for value in ("!!!not base64!!!", "abc$def", "a", 12345, None):
            r = post_raw(
                vault, f"/keys/wrapper/{v}/{op}", json.dumps({"alg": "RSA-OAEP-256", "value": value}).encode()
            )
            assert r.status_code == 400, (op, value, r.status_code, r.text[:300])
            assert_error_shape(r, 400, "BadParameter")
    for body in ({"alg": "RS256", "value": "***"}, {"alg": "RS256"}, {"value": "AAAA"}):
        r = post_raw(vault, f"/keys/wrapper/{v}/sign", json.dumps(body).encode())
        assert_bad_parameter(r)
    r = post_raw(vault, f"/keys/wrapper/{v}/verify", json.dumps({"alg": "RS256", "digest": "%%", "value": "AA"}).encode())
    assert_bad_parameter(r)
    # standard (non-url) base64 alphabet and padding: Azure's parser is lenient about padding only
    r = post_raw(vault, f"/keys/wrapper/{v}/wrapkey", json.dumps({"alg": "RSA-OAEP-256", "value": "AAAA"}).encode())
    assert r.status_code == 200, r.text[:300]
    assert_nothing_created(vault, allowed=["wrapper"])
    assert [p.version for p in vault.client.list_properties_of_key_versions("wrapper")] == [v]


def test_bad_base64_in_import(vault):
    body = {"key": {"kty": "RSA", "n": "@@@", "e": "AQAB", "d": "###"}}
    r = vault.raw("PUT", "/keys/imported", data=json.dumps(body).encode(), headers=JSON_HEADERS)
    assert_bad_parameter(r)
    body = {"key": {"kty": "RSA", "e": "AQAB"}}  # missing n
    r = vault.raw("PUT", "/keys/imported", data=json.dumps(body).encode(), headers=JSON_HEADERS)
    assert_bad_parameter(r)
    body = {"key": {"kty": "EC", "x": "AAAA", "y": "AAAA", "d": "AAAA"}}  # no crv, bad point
    r = vault.raw("PUT", "/keys/imported", data=json.dumps(body).encode(), headers=JSON_HEADERS)
    assert_bad_parameter(r)
    assert_nothing_created(vault)


def test_bad_restore_and_rng_bodies(vault):
    for body in ({"value": "!!!"}, {"value": ""}, {}, {"value": 5}):
        r = post_raw(vault, "/keys/restore", json.dumps(body).encode())
        assert_bad_parameter(r)
    for body in ({"count": "abc"}, {"count": -1}, {"count": 0}, {}):
        r = post_raw(vault, "/rng", json.dumps(body).encode())
        assert_bad_parameter(r)
    assert_nothing_created(vault)


@pytest.mark.parametrize(
    "name",
    ["bad_name", "a" * 128, "bad.name", "bad%20name", "b%C3%A4d", "%2E%2E"],
    ids=["underscore", "128-chars", "dot", "space", "non-ascii", "dotdot"],
)
def test_invalid_key_names(vault, name):
    r = post_raw(vault, CREATE.format(name=name), json.dumps({"kty": "EC", "crv": "P-256"}).encode())
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert_error_shape(r, 400, "BadParameter")
    r = vault.raw(
        "PUT",
        f"/keys/{name}",
        data=json.dumps({"key": {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "d": "AA"}}).encode(),
        headers=JSON_HEADERS,
    )
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert_nothing_created(vault)


def test_name_boundaries_accepted(vault):
    for name in ("a" * 127, "0", "A-1-b", "-"):
        r = post_raw(vault, CREATE.format(name=name), json.dumps({"kty": "EC", "crv": "P-256"}).encode())
        assert r.status_code == 200, (name, r.status_code, r.text[:300])
        body = r.json()
        assert body["key"]["kid"].startswith(f"{vault.url}keys/{name}/")
    assert vault.key_names() == sorted(["a" * 127, "0", "A-1-b", "-"])


def test_names_are_case_insensitive(vault):
    """Azure object names are case-insensitive: a second create under another case adds a version."""
    r1 = post_raw(vault, CREATE.format(name="MixedCase"), json.dumps({"kty": "EC"}).encode())
    assert r1.status_code == 200, r1.text
    r2 = post_raw(vault, CREATE.format(name="mixedcase"), json.dumps({"kty": "EC"}).encode())
    assert r2.status_code == 200, r2.text
    assert len(vault.key_names()) == 1
    assert len(list(vault.client.list_properties_of_key_versions("MIXEDCASE"))) == 2


def test_missing_api_version(vault):
    r = vault.raw("GET", "/keys", api_version=None)
    assert_bad_parameter(r)
    r = post_raw(vault, CREATE.format(name="k1"), json.dumps({"kty": "EC"}).encode(), api_version=None)
    assert_bad_parameter(r)
    assert_nothing_created(vault)


@pytest.mark.parametrize("api_version", ["1.0", "7.3", "2016-10-01", "banana", "", "7.4;drop"])
def test_unsupported_api_version(vault, api_version):
    r = post_raw(vault, CREATE.format(name="k1"), json.dumps({"kty": "EC"}).encode(), api_version=api_version)
    assert_bad_parameter(r)
    assert_nothing_created(vault)


@pytest.mark.parametrize("api_version", ["7.4", "7.5", "7.6", "2025-07-01"])
def test_supported_api_versions_raw(vault, api_version):
    r = vault.raw("GET", "/keys", api_version=api_version)
    assert r.status_code == 200, r.text
    assert r.json()["value"] == []


def test_oversized_body(vault, kagi):
    big = json.dumps({"kty": "EC", "tags": {"x": "a" * (2 * 1024 * 1024)}}).encode()
    r = post_raw(vault, CREATE.format(name="huge"), big)
    assert r.status_code in (400, 413), (r.status_code, r.text[:300])
    # the server is still fine afterwards
    ok = post_raw(vault, CREATE.format(name="after"), json.dumps({"kty": "EC"}).encode())
    assert ok.status_code == 200, ok.text
    assert_nothing_created(vault, allowed=["after"])


def test_oversized_tags_and_values_do_not_500(vault):
    for body in (
        {"kty": "EC", "tags": {f"t{i}": "v" for i in range(1000)}},  # Azure: at most 15 tags
        {"kty": "EC", "tags": {"k" * 1000: "v"}},  # Azure: tag name <= 512 chars
        {"kty": "EC", "tags": {"k": "v" * 1000}},  # Azure: tag value <= 256 chars
    ):
        r = post_raw(vault, CREATE.format(name="tags"), json.dumps(body).encode())
        assert r.status_code == 400, (r.status_code, r.text[:300])
        assert_error_shape(r, 400)
    assert_nothing_created(vault)


def test_unknown_paths_and_methods(vault):
    for method, path in [
        ("GET", "/nosuchthing"),
        ("GET", "/keys/k1/abc/def/ghi"),
        ("DELETE", "/keys"),
        ("PUT", "/deletedkeys"),
        ("POST", "/keys/k1/teleport"),
    ]:
        r = vault.raw(method, path, data=b"{}", headers=JSON_HEADERS)
        assert r.status_code in (400, 404, 405), (method, path, r.status_code, r.text[:300])
    assert_nothing_created(vault)


def test_bad_version_in_path(vault):
    vault.client.create_ec_key("k1")
    for version in ("not-a-version", "0" * 31, "Z" * 32, "0" * 33):
        r = vault.raw("GET", f"/keys/k1/{version}")
        assert r.status_code in (400, 404), (version, r.status_code, r.text[:300])
        assert_error_shape(r)


def test_malformed_update_leaves_key_untouched(vault):
    key = vault.client.create_ec_key("k1", tags={"keep": "me"})
    for body in (b'{"tags": ', b'{"attributes": {"enabled": "no"}}', b'{"key_ops": 7}'):
        r = vault.raw("PATCH", f"/keys/k1/{key.properties.version}", data=body, headers=JSON_HEADERS)
        assert_bad_parameter(r)
    got = vault.client.get_key("k1")
    assert got.properties.enabled is True
    assert got.properties.tags == {"keep": "me"}
    assert got.properties.updated_on == key.properties.updated_on

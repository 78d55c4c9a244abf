"""Key rotation policies through the unmodified azure.keyvault.keys.KeyClient:
get/update_key_rotation_policy, rotate_key with the policy's expiryTime, and bad policies."""

from datetime import timedelta

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.keys import KeyRotationLifetimeAction, KeyRotationPolicy, KeyRotationPolicyAction


def _ec(client, name):
    return client.create_ec_key(name, curve="P-256")


def test_default_policy_of_a_new_key(vault):
    c = vault.client
    _ec(c, "fresh")
    p = c.get_key_rotation_policy("fresh")
    assert p.id == f"{vault.url}keys/fresh/rotationpolicy"
    assert len(p.lifetime_actions) == 1
    a = p.lifetime_actions[0]
    assert a.action == KeyRotationPolicyAction.notify
    assert a.time_before_expiry == "P30D"
    assert a.time_after_create is None
    assert p.expires_in is None


def test_update_get_and_rotate_with_expiry(vault):
    c = vault.client
    _ec(c, "rotating")
    actions = [
        KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_after_create="P30D"),
        KeyRotationLifetimeAction(KeyRotationPolicyAction.notify, time_before_expiry="P7D"),
    ]
    updated = c.update_key_rotation_policy("rotating", KeyRotationPolicy(), lifetime_actions=actions, expires_in="P90D")
    assert updated.expires_in == "P90D"
    assert updated.created_on is not None and updated.updated_on is not None
    fetched = c.get_key_rotation_policy("rotating")
    assert fetched.id == updated.id
    assert fetched.expires_in == "P90D"
    got = {a.action: a for a in fetched.lifetime_actions}
    assert got[KeyRotationPolicyAction.rotate].time_after_create == "P30D"
    assert got[KeyRotationPolicyAction.notify].time_before_expiry == "P7D"

    rotated = c.rotate_key("rotating")
    assert rotated.properties.expires_on is not None
    assert rotated.properties.expires_on - rotated.properties.created_on == timedelta(days=90)
    versions = list(c.list_properties_of_key_versions("rotating"))
    assert len(versions) == 2

    # Round-tripping the fetched policy with an override (as Azure's own SDK tests do).
    newest = c.update_key_rotation_policy(
        "rotating",
        fetched,
        lifetime_actions=[KeyRotationLifetimeAction(KeyRotationPolicyAction.notify, time_before_expiry="P60D")],
    )
    assert newest.expires_in == "P90D"
    assert [(a.action, a.time_before_expiry) for a in newest.lifetime_actions] == [
        (KeyRotationPolicyAction.notify, "P60D")
    ]
    # An empty policy is accepted and restores the default actions.
    c.update_key_rotation_policy("rotating", KeyRotationPolicy())
    reset = c.get_key_rotation_policy("rotating")
    assert reset.expires_in is None
    assert reset.lifetime_actions[0].action == KeyRotationPolicyAction.notify
    # Without expiryTime, rotate sets no exp.
    plain = c.rotate_key("rotating")
    assert plain.properties.expires_on is None


def test_rotate_after_months_without_expiry_is_accepted(vault):
    c = vault.client
    _ec(c, "monthly")
    actions = [KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_after_create="P2M")]
    p = c.update_key_rotation_policy("monthly", KeyRotationPolicy(), lifetime_actions=actions)
    assert p.expires_in is None
    assert p.lifetime_actions[0].time_after_create == "P2M"


@pytest.mark.parametrize(
    "actions, expires_in",
    [
        ([], "P7D"),  # expiryTime below 28 days
        ([], "90 days"),  # not ISO 8601
        ([("rotate", None, "P30D")], None),  # rotate before expiry needs expiryTime
        ([("rotate", "P1D", None)], None),  # rotate sooner than 7 days after creation
        ([("rotate", "P1.5M", None)], None),  # fractional
        ([("notify", "P30D", None)], "P90D"),  # notify takes timeBeforeExpiry only
        ([("notify", None, "P90D")], "P90D"),  # notify not before expiryTime
        ([("rotate", "P30D", None), ("rotate", "P60D", None)], None),  # two Rotate actions
        ([("Explode", "P30D", None)], None),  # unknown action
    ],
)
def test_bad_policies_are_400_and_store_nothing(vault, actions, expires_in):
    c = vault.client
    _ec(c, "guarded")
    before = c.get_key_rotation_policy("guarded")
    lifetime = [
        KeyRotationLifetimeAction(kind, time_after_create=after, time_before_expiry=before_exp)
        for kind, after, before_exp in actions
    ]
    with pytest.raises(HttpResponseError) as ei:
        c.update_key_rotation_policy("guarded", KeyRotationPolicy(), lifetime_actions=lifetime or None, expires_in=expires_in)
    assert ei.value.status_code == 400
    err = ei.value.response.json()["error"]
    assert err["code"] == "BadParameter" and err["message"]
    after = c.get_key_rotation_policy("guarded")
    assert after.lifetime_actions[0].action == before.lifetime_actions[0].action
    assert after.expires_in == before.expires_in


def test_policy_of_missing_key_is_404(vault):
    c = vault.client
    with pytest.raises(ResourceNotFoundError):
        c.get_key_rotation_policy("nokey")
    with pytest.raises(ResourceNotFoundError):
        c.update_key_rotation_policy("nokey", KeyRotationPolicy(), expires_in="P90D")

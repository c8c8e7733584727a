"""API-key encryption: round trip, key ids and rotation, binding to the provider id."""

from __future__ import annotations

import pytest

from services.common.errors import FailedPrecondition
from services.common.settings import SettingsError
from services.config.crypto import KeyRing


def test_round_trip_and_ciphertext_hides_the_key() -> None:
    ring = KeyRing.parse("k1:first-secret-0123456789")
    sealed = ring.seal("sk-canary-123", "provider-a")
    assert sealed.key_id == "k1"
    assert b"sk-canary-123" not in sealed.ciphertext
    assert ring.open(sealed, "provider-a") == "sk-canary-123"
    assert ring.seal("sk-canary-123", "provider-a").ciphertext != sealed.ciphertext  # fresh nonce


def test_rotation_new_key_first_old_key_still_opens() -> None:
    old = KeyRing.parse("k1:first-secret-0123456789")
    sealed = old.seal("sk-1", "p")
    rotated = KeyRing.parse("k2:second-secret-0123456789,k1:first-secret-0123456789")
    assert rotated.open(sealed, "p") == "sk-1"
    assert rotated.seal("sk-1", "p").key_id == "k2"
    dropped = KeyRing.parse("k2:second-secret-0123456789")
    with pytest.raises(FailedPrecondition) as err:
        dropped.open(sealed, "p")
    assert err.value.reason == "ENCRYPTION_KEY_UNKNOWN"


def test_ciphertext_is_bound_to_its_provider() -> None:
    ring = KeyRing.parse("a-bare-secret-of-enough-length")
    assert ring.primary_key_id.startswith("k")
    sealed = ring.seal("sk-1", "provider-a")
    with pytest.raises(FailedPrecondition) as err:
        ring.open(sealed, "provider-b")
    assert err.value.reason == "ENCRYPTION_KEY_MISMATCH"


@pytest.mark.parametrize("value", ["", "k1:short", "k1:dup-secret-0123456789,k1:dup-secret-0123456789"])
def test_bad_key_settings_are_refused(value: str) -> None:
    with pytest.raises(SettingsError):
        KeyRing.parse(value)

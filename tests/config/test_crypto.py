"""API-key encryption: round trip, key ids and rotation, binding to the provider id; a dedicated
encryption key is required (`agentplane up` keeps one in its data directory, for config only)."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition
from services.common.settings import Settings, SettingsError
from services.config.crypto import KeyRing
from tests.helpers import deployment_keys_dir

# The token secret of deployments from before per-service keys: provider keys stored then were
# encrypted with a key derived from it (the `from-secret` entry opens them).
TEST_SECRET = "agentplane-test-secret-0123456789abcdef"


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


def test_an_encryption_key_is_required_and_the_error_says_how_to_make_one(settings: Settings) -> None:
    assert KeyRing.from_settings(settings).primary_key_id  # the test settings carry one
    with pytest.raises(SettingsError) as err:
        KeyRing.from_settings(settings.replace(encryption_key=None))
    message = str(err.value)
    assert "AGENTPLANE_ENCRYPTION_KEY is not set" in message
    assert "secrets.token_urlsafe" in message and "agentplane up" in message


async def test_serve_config_refuses_to_start_without_an_encryption_key(database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
    env.update(
        AGENTPLANE_KEYS_DIR=deployment_keys_dir(),
        DATABASE_URL=database_url,
        AGENTPLANE_CONFIG_HOST="127.0.0.1",
        AGENTPLANE_CONFIG_PORT="0",
        AGENTPLANE_CONFIG_METRICS_PORT="-1",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "serve", "config",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("agentplane serve config started without AGENTPLANE_ENCRYPTION_KEY") from None
    assert proc.returncode != 0
    assert "AGENTPLANE_ENCRYPTION_KEY is not set" in err.decode()


def test_up_keeps_an_encryption_key_in_its_data_directory_for_config_only(tmp_path: Path) -> None:
    from services.cli.up import local_encryption_key, service_environment

    value = local_encryption_key(tmp_path)
    path = tmp_path / "encryption-key"
    assert path.read_text().strip() == value and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert local_encryption_key(tmp_path) == value  # kept across restarts
    ring = KeyRing.parse(value)
    assert ring.open(ring.seal("sk-1", "p"), "p") == "sk-1"
    assert local_encryption_key(tmp_path / "other") != value
    env = {"AGENTPLANE_ENCRYPTION_KEY": value, "AGENTPLANE_KEYS_DIR": "/keys", "PATH": "/bin"}
    assert service_environment(env, "config")["AGENTPLANE_ENCRYPTION_KEY"] == value
    for name in ("chat", "inference", "toolexec", "simulator"):
        assert "AGENTPLANE_ENCRYPTION_KEY" not in service_environment(env, name)


def test_keys_stored_before_a_key_was_required_open_with_the_listed_legacy_entry() -> None:
    # What the config service used without AGENTPLANE_ENCRYPTION_KEY until issue 11.
    legacy = KeyRing([("from-secret", "agentplane-jwt-secret:" + TEST_SECRET)])
    sealed = legacy.seal("sk-old", "p")
    with pytest.raises(FailedPrecondition) as err:
        KeyRing.parse("k1:first-secret-0123456789").open(sealed, "p")
    assert "from-secret:agentplane-jwt-secret:" in str(err.value)  # says how to list it
    ring = KeyRing.parse(f"k1:first-secret-0123456789,from-secret:agentplane-jwt-secret:{TEST_SECRET}")
    resealed = ring.reseal(sealed, "p")
    assert resealed is not None and resealed.key_id == "k1" and ring.open(resealed, "p") == "sk-old"
    assert ring.reseal(resealed, "p") is None  # already current

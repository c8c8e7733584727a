"""Tokens: each key signs only its own scope; the cache of verified tokens; lifetimes; rotation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common import auth, keys
from services.common.errors import Unauthenticated
from services.common.settings import SERVICE_NAMES


@pytest.fixture
def deployment(tmp_path: Path) -> keys.Keys:
    """A deployment's full key directory (issuer and every service)."""
    return keys.from_dir(tmp_path / "keys", SERVICE_NAMES)


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens that went through full verification (not answered from the cache)."""
    seen: list[str] = []
    real = auth._verify

    def counting(keyset: keys.KeySet, token: str, max_lifetime: float) -> tuple[auth.Identity, float, str]:
        seen.append(token)
        return real(keyset, token, max_lifetime)

    monkeypatch.setattr(auth, "_verify", counting)
    monkeypatch.setattr(auth, "_VERIFIED", type(auth._VERIFIED)())
    return seen


def _only(directory: Path, *, signs: list[str], issuer: bool = False) -> keys.Keys:
    """What one process holds: the public key set and only the named private keys."""
    return keys.Keys(
        str(directory / keys.JWKS_FILENAME),
        {s: str(directory / f"{s}.pem") for s in signs},
        str(directory / keys.ISSUER_KEY_FILENAME) if issuer else None,
    )


def test_each_key_signs_only_its_own_scope(deployment: keys.Keys, tmp_path: Path) -> None:
    toolexec = _only(tmp_path / "keys", signs=["toolexec"])
    # toolexec's process can make its own identity's tokens, and nobody else's.
    own = auth.mint_service_token(toolexec, "toolexec")
    assert auth.verify_token(deployment, own) == auth.Identity("service:toolexec", auth.Role.SERVICE)
    for subject, role in (("service:inference", auth.Role.SERVICE), ("alice", auth.Role.ADMIN)):
        with pytest.raises(keys.KeyUnavailable):
            auth.mint_token(toolexec, subject, role)
    # Even a token hand-made with toolexec's key for another identity is refused, saying why.
    signer = toolexec.signer_for("service:toolexec")
    import jwt

    now = int(__import__("time").time())
    forged_claims = {
        "sub": "service:inference",
        "role": "service",
        "iss": auth.ISSUER,
        "iat": now,
        "exp": now + 60,
        "jti": "forged",
    }
    forged = jwt.encode(forged_claims, signer.key, algorithm="EdDSA", headers={"kid": signer.kid})
    with pytest.raises(Unauthenticated) as err:
        auth.verify_token(deployment, forged)
    assert err.value.reason == "TOKEN_WRONG_SIGNER" and "service:toolexec" in str(err.value)
    as_user = jwt.encode(
        {**forged_claims, "sub": "alice", "role": "admin"},
        signer.key,
        algorithm="EdDSA",
        headers={"kid": signer.kid},
    )
    with pytest.raises(Unauthenticated) as err:
        auth.verify_token(deployment, as_user)
    assert err.value.reason == "TOKEN_WRONG_SIGNER"
    # The issuer key makes users, never services.
    issuer = _only(tmp_path / "keys", signs=[], issuer=True)
    assert auth.verify_token(deployment, auth.mint_token(issuer, "alice", auth.Role.ADMIN)).is_admin
    with pytest.raises(keys.KeyUnavailable):
        auth.mint_service_token(issuer, "inference")


def test_a_key_outside_the_deployment_is_refused(deployment: keys.Keys, tmp_path: Path) -> None:
    stranger = keys.from_dir(tmp_path / "other", SERVICE_NAMES)
    with pytest.raises(Unauthenticated) as err:
        auth.verify_token(deployment, auth.mint_token(stranger, "alice", auth.Role.USER))
    assert err.value.reason == "TOKEN_INVALID"


def test_rotation_old_key_accepted_until_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "keys"
    deployment = keys.from_dir(directory, ["chat"])
    monkeypatch.setattr(keys, "FILE_CHECK_SECONDS", 0.0)
    old = auth.mint_service_token(deployment, "chat")
    # A new chat key: its public half is added beside the old one; the old token still verifies.
    old_entry = json.loads((directory / keys.JWKS_FILENAME).read_text())["keys"]
    new_key = keys.generate()
    keys.write_private_key(directory / "chat.pem", new_key)
    jwks = {"keys": [*old_entry, keys.public_jwk(new_key.public_key(), "service:chat")]}
    (directory / keys.JWKS_FILENAME).write_text(json.dumps(jwks))
    # A restarted chat signs with the new key.
    rotated = keys.Keys(str(directory / keys.JWKS_FILENAME), {"chat": str(directory / "chat.pem")}, None)
    new = auth.mint_service_token(rotated, "chat")
    verifier = keys.Keys(str(directory / keys.JWKS_FILENAME), {}, None)
    assert (
        auth.verify_token(verifier, old).subject == auth.verify_token(verifier, new).subject == "service:chat"
    )
    # Once the old key is removed from the set, its tokens are refused (the cache does not keep them).
    (directory / keys.JWKS_FILENAME).write_text(
        json.dumps({"keys": [keys.public_jwk(new_key.public_key(), "service:chat")]})
    )
    with pytest.raises(Unauthenticated):
        auth.verify_token(verifier, old)
    assert auth.verify_token(verifier, new).subject == "service:chat"


def test_a_verified_token_is_answered_from_the_cache_until_it_expires(
    deployment: keys.Keys, verifications: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = auth.mint_token(deployment, "alice", auth.Role.USER, 60)
    first = auth.verify_token(deployment, token)
    assert auth.verify_token(deployment, token) == first == auth.Identity("alice", auth.Role.USER)
    assert verifications == [token]
    # Past the token's expiry a cached answer is not trusted: it is verified again.
    expires = next(v[1] for k, v in auth._VERIFIED.items() if k[2] == token)
    monkeypatch.setattr(auth.time, "time", lambda: expires + 1)
    auth.verify_token(deployment, token)
    assert verifications == [token, token]


def test_expired_and_tampered_tokens_are_rejected_and_not_cached(
    deployment: keys.Keys, verifications: list[str]
) -> None:
    expired = auth.mint_token(deployment, "alice", auth.Role.USER, -10)
    for _ in range(2):
        with pytest.raises(Unauthenticated) as err:
            auth.verify_token(deployment, expired)
        assert err.value.reason == "TOKEN_EXPIRED"
    assert verifications == [expired, expired]
    good = auth.mint_token(deployment, "bob", auth.Role.USER, 60)
    tampered = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    with pytest.raises(Unauthenticated):
        auth.verify_token(deployment, tampered)
    assert all(key[2] != tampered for key in auth._VERIFIED)


def test_the_cache_is_bounded(
    deployment: keys.Keys, verifications: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "VERIFIED_CACHE_SIZE", 3)
    tokens = [auth.mint_token(deployment, f"user-{i}", auth.Role.USER, 60) for i in range(5)]
    for token in tokens:
        auth.verify_token(deployment, token)
    assert [key[2] for key in auth._VERIFIED] == tokens[2:]


def test_a_token_living_longer_than_the_deployment_allows_is_refused(
    deployment: keys.Keys, verifications: list[str]
) -> None:
    # A 100-year token (what a careless `--ttl` made before) is refused, saying why.
    century = auth.mint_token(deployment, "alice", auth.Role.USER, 100 * 365 * 86400)
    with pytest.raises(Unauthenticated) as err:
        auth.verify_token(deployment, century)
    assert err.value.reason == "TOKEN_LIFETIME_TOO_LONG" and "days" in str(err.value)
    week = auth.mint_token(deployment, "alice", auth.Role.USER, 7 * 86400)
    assert auth.verify_token(deployment, week).subject == "alice"
    with pytest.raises(Unauthenticated) as strict:
        auth.verify_token(deployment, week, max_lifetime_seconds=86400)
    assert strict.value.reason == "TOKEN_LIFETIME_TOO_LONG"


async def test_a_key_set_from_a_url_is_fetched_and_refreshed_off_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import http.server
    import threading

    from tests.helpers import wait_until

    first, second = keys.generate(), keys.generate()
    served = {"keys": [keys.public_jwk(first.public_key(), "service:chat")]}
    # A gate the test opens: while it is shut, the JWKS server does not answer.
    gate = threading.Event()
    gate.set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            gate.wait(30)
            body = json.dumps(served).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
        monkeypatch.setattr(keys, "FILE_CHECK_SECONDS", 0.0)
        verifier = keys.Keys(url, {}, None)
        keys.write_private_key(tmp_path / "chat.pem", first)
        signer = keys.Keys(url, {"chat": str(tmp_path / "chat.pem")}, None)
        assert auth.verify_token(verifier, auth.mint_service_token(signer, "chat")).subject == "service:chat"
        # The set gains a second key; a token with it is refused while the re-fetch (in the
        # background, the server held shut) is pending — the caller is not blocked — then accepted.
        gate.clear()
        served["keys"].append(keys.public_jwk(second.public_key(), "service:chat"))
        keys.write_private_key(tmp_path / "chat2.pem", second)
        new = auth.mint_service_token(keys.Keys(url, {"chat": str(tmp_path / "chat2.pem")}, None), "chat")
        with pytest.raises(Unauthenticated):
            auth.verify_token(verifier, new)
        gate.set()
        await wait_until(
            lambda: verifier.keyset.get(keys.key_id(second.public_key())) is not None,
            what="the background refresh of the key set",
        )
        assert auth.verify_token(verifier, new).subject == "service:chat"
    finally:
        gate.set()
        server.shutdown()

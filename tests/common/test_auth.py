"""Token verification and its cache of verified tokens."""

from __future__ import annotations

import pytest

from services.common import auth
from services.common.errors import Unauthenticated

SECRET = "s" * 32


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens that went through full verification (not answered from the cache)."""
    seen: list[str] = []
    real = auth._verify

    def counting(secret: str, token: str, max_lifetime: float) -> tuple[auth.Identity, float, str]:
        seen.append(token)
        return real(secret, token, max_lifetime)

    monkeypatch.setattr(auth, "_verify", counting)
    monkeypatch.setattr(auth, "_VERIFIED", type(auth._VERIFIED)())
    return seen


def test_a_verified_token_is_answered_from_the_cache_until_it_expires(
    verifications: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = auth.mint_token(SECRET, "alice", auth.Role.USER, 60)
    first = auth.verify_token(SECRET, token)
    assert auth.verify_token(SECRET, token) == first == auth.Identity("alice", auth.Role.USER)
    assert verifications == [token]
    # Another secret is another key: the signature is checked against it.
    with pytest.raises(Unauthenticated) as bad:
        auth.verify_token("t" * 32, token)
    assert bad.value.reason == "TOKEN_INVALID"
    # Past the token's expiry a cached answer is not trusted: it is verified again.
    expires = auth._VERIFIED[(SECRET, token, auth.DEFAULT_MAX_TOKEN_LIFETIME_SECONDS)][1]
    monkeypatch.setattr(auth.time, "time", lambda: expires + 1)
    auth.verify_token(SECRET, token)
    assert verifications == [token, token, token]


def test_expired_and_tampered_tokens_are_rejected_and_not_cached(verifications: list[str]) -> None:
    expired = auth.mint_token(SECRET, "alice", auth.Role.USER, -10)
    for _ in range(2):
        with pytest.raises(Unauthenticated) as err:
            auth.verify_token(SECRET, expired)
        assert err.value.reason == "TOKEN_EXPIRED"
    assert verifications == [expired, expired]
    good = auth.mint_token(SECRET, "bob", auth.Role.USER, 60)
    tampered = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    with pytest.raises(Unauthenticated):
        auth.verify_token(SECRET, tampered)
    assert all(key[1] != tampered for key in auth._VERIFIED)


def test_the_cache_is_bounded(verifications: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "VERIFIED_CACHE_SIZE", 3)
    tokens = [auth.mint_token(SECRET, f"user-{i}", auth.Role.USER, 60) for i in range(5)]
    for token in tokens:
        auth.verify_token(SECRET, token)
    assert [key[1] for key in auth._VERIFIED] == tokens[2:]


def test_a_token_living_longer_than_the_deployment_allows_is_refused(verifications: list[str]) -> None:
    # A 100-year token (what a careless `--ttl` made before) is refused, saying why.
    century = auth.mint_token(SECRET, "alice", auth.Role.USER, 100 * 365 * 86400)
    with pytest.raises(Unauthenticated) as err:
        auth.verify_token(SECRET, century)
    assert err.value.reason == "TOKEN_LIFETIME_TOO_LONG" and "days" in str(err.value)
    week = auth.mint_token(SECRET, "alice", auth.Role.USER, 7 * 86400)
    assert auth.verify_token(SECRET, week).subject == "alice"
    # A deployment with a stricter bound refuses the week-long one.
    with pytest.raises(Unauthenticated) as strict:
        auth.verify_token(SECRET, week, max_lifetime_seconds=86400)
    assert strict.value.reason == "TOKEN_LIFETIME_TOO_LONG"

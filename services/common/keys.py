"""Signing and verification keys: each service signs only its own tokens, users come from the issuer key.

Every process verifies tokens against one public key set (a JWKS, from a file or a URL, re-read when
it changes). Each entry carries the scope its key may sign for: ``service:<name>`` (that service's
own tokens) or ``users`` (the deployment's user issuer). A process holds the private key of its own
scope only, so toolexec's key can make nothing but ``service:toolexec`` tokens; the operator (and
`agentplane up`, in its data directory) holds the user issuer key. Rotation: add the new public key
to the set, switch the signer to the new private key, remove the old public key when the tokens it
signed have expired (at most the maximum token lifetime).

Key files are Ed25519 private keys in PEM (PKCS8); key ids are RFC 7638 thumbprints.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

USERS_SCOPE = "users"
SERVICE_PREFIX = "service:"
JWKS_FILENAME = "jwks.json"
ISSUER_KEY_FILENAME = "users.pem"
URL_REFRESH_SECONDS = 300.0
FILE_CHECK_SECONDS = 1.0


class KeyUnavailable(Exception):
    """A key this process needs is missing or unusable; the message says which and how to make it."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    """The RFC 7638 thumbprint of an Ed25519 public key."""
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": _b64(_raw(public))}, separators=(",", ":"))
    return _b64(hashlib.sha256(canonical.encode()).digest())


def public_jwk(public: Ed25519PublicKey, scope: str) -> dict[str, str]:
    """The JWKS entry of a public key that may sign for `scope`."""
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64(_raw(public)),
        "kid": key_id(public),
        "use": "sig",
        "alg": "EdDSA",
        "agentplane_scope": scope,
    }


def generate() -> Ed25519PrivateKey:
    """A new signing key."""
    return Ed25519PrivateKey.generate()


def write_private_key(path: str | Path, key: Ed25519PrivateKey) -> None:
    """Write `key` as PEM, readable by its owner only."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyUnavailable(f"no signing key at {path}") from None
    except (ValueError, TypeError) as exc:
        raise KeyUnavailable(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyUnavailable(f"{path} is not an Ed25519 key")
    return key


@dataclass(frozen=True)
class Signer:
    """A private key and its key id."""

    key: Ed25519PrivateKey
    kid: str

    @classmethod
    def load(cls, path: str | Path) -> Signer:
        """The signer in `path`."""
        key = load_private_key(path)
        return cls(key, key_id(key.public_key()))


@dataclass(frozen=True)
class VerificationKey:
    """A public key and the one scope it may sign for."""

    key: Ed25519PublicKey
    scope: str


def parse_jwks(data: Mapping[str, Any]) -> dict[str, VerificationKey]:
    """The usable entries of a JWKS: Ed25519 keys with an agentplane scope whose kid is their own
    thumbprint. A malformed entry is skipped (and logged), never the whole set."""
    out: dict[str, VerificationKey] = {}
    for entry in data.get("keys", []):
        try:
            parsed = _parse_entry(entry)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipping a malformed public key entry: %s", exc)
            continue
        if parsed is not None:
            kid, key = parsed
            if kid in out:
                log.warning("skipping a duplicate public key id %s", kid)
                continue
            out[kid] = key
    return out


def _parse_entry(entry: Any) -> tuple[str, VerificationKey] | None:
    if not isinstance(entry, dict):
        raise TypeError("an entry is not an object")
    if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519" or "kid" not in entry:
        return None
    scope = str(entry.get("agentplane_scope", ""))
    if scope != USERS_SCOPE and not (scope.startswith(SERVICE_PREFIX) and len(scope) > len(SERVICE_PREFIX)):
        return None
    raw = base64.urlsafe_b64decode(str(entry["x"]) + "=" * (-len(str(entry["x"])) % 4))
    public = Ed25519PublicKey.from_public_bytes(raw)
    if key_id(public) != str(entry["kid"]):
        raise ValueError(f"key id {entry['kid']!r} is not the key's thumbprint")
    return str(entry["kid"]), VerificationKey(public, scope)


_KEYSET_IDS = itertools.count(1)


class KeySet:
    """The public keys every process verifies against: a JWKS file (re-read when it changes) or URL."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.version = 0
        self.instance = next(_KEYSET_IDS)  # never reused (unlike id()): caches key on it
        self._keys: dict[str, VerificationKey] = {}
        self._stamp: tuple[int, int, int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._is_url = source.startswith(("http://", "https://"))
        self._load()

    def _load(self) -> None:
        if self._is_url:
            with urllib.request.urlopen(self.source, timeout=10) as response:
                data = json.loads(response.read())
        else:
            try:
                st = os.stat(self.source)
            except FileNotFoundError:
                raise KeyUnavailable(
                    f"no public key set at {self.source}: run `agentplane keys init` (or set AGENTPLANE_JWKS)"
                ) from None
            stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            data = json.loads(Path(self.source).read_text())
            if not isinstance(data, dict):
                raise ValueError("the public key set is not a JSON object")
            self._keys = parse_jwks(data)
            self._stamp = stamp  # only once the new set is in place
            self.version += 1
            return
        self._keys = parse_jwks(data)
        self.version += 1

    def refresh_if_due(self, unknown_kid: bool = False) -> None:
        """Re-read the source when it may have changed (a file: every second; a URL: every five
        minutes, or after a second when a token names a key not in the set)."""
        now = time.monotonic()
        interval = URL_REFRESH_SECONDS if self._is_url and not unknown_kid else FILE_CHECK_SECONDS
        if now - self._checked <= interval:
            return
        self._checked = now
        if self._is_url:
            # Never an HTTP fetch on the caller's thread (the event loop): fetch in the background;
            # a token naming a key not fetched yet is refused until the new set has arrived.
            threading.Thread(target=self._reload, daemon=True, name="jwks-refresh").start()
        else:
            self._reload()

    def _reload(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # a reload is already running
        try:
            self._load()
        except (OSError, ValueError, KeyUnavailable) as exc:
            log.warning("could not re-read the public key set %s: %s", self.source, exc)
        finally:
            self._lock.release()

    def get(self, kid: str) -> VerificationKey | None:
        """The key `kid` (the set re-read first when a refresh is due)."""
        self.refresh_if_due(unknown_kid=kid not in self._keys)
        return self._keys.get(kid)


def init_dir(directory: str | Path, services: Iterable[str]) -> Path:
    """Make (or complete) a key directory: the user issuer key, one key per service, and the JWKS.

    Existing keys are kept; the JWKS is rewritten from every key in the directory. Returns its path.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    scopes = {ISSUER_KEY_FILENAME: USERS_SCOPE, **{f"{s}.pem": f"{SERVICE_PREFIX}{s}" for s in services}}
    entries = []
    for filename, scope in scopes.items():
        path = root / filename
        if not path.exists():
            write_private_key(path, generate())
        entries.append(public_jwk(load_private_key(path).public_key(), scope))
    jwks = root / JWKS_FILENAME
    tmp = root / (JWKS_FILENAME + ".tmp")
    tmp.write_text(json.dumps({"keys": entries}, indent=2) + "\n")
    os.replace(tmp, jwks)
    return jwks


class Keys:
    """What a process signs and verifies with: the public key set, and the private keys it holds."""

    def __init__(self, jwks: str, signing_key_files: Mapping[str, str], issuer_key_file: str | None) -> None:
        self.jwks_source = jwks
        self._signing_files = dict(signing_key_files)
        self._issuer_file = issuer_key_file
        self._keyset: KeySet | None = None
        self._signers: dict[str, Signer] = {}

    @property
    def keyset(self) -> KeySet:
        """The public keys (loaded on first use)."""
        if self._keyset is None:
            self._keyset = KeySet(self.jwks_source)
        return self._keyset

    def signer_for(self, subject: str) -> Signer:
        """The key that signs `subject`'s tokens: the service's own, or the user issuer's."""
        if subject.startswith(SERVICE_PREFIX):
            name = subject.removeprefix(SERVICE_PREFIX)
            path = self._signing_files.get(name)
            what = f"the {name} service's signing key (AGENTPLANE_{name.upper()}_SIGNING_KEY_FILE)"
        else:
            name, path, what = (
                USERS_SCOPE,
                self._issuer_file,
                "the user issuer key (AGENTPLANE_ISSUER_KEY_FILE)",
            )
        signer = self._signers.get(name)
        if signer is None:
            if not path:
                raise KeyUnavailable(f"this process holds no {what}")
            try:
                signer = Signer.load(path)
            except KeyUnavailable as exc:
                raise KeyUnavailable(
                    f"{exc}: this process needs {what}; `agentplane keys init` makes one"
                ) from None
            self._signers[name] = signer
        return signer

    def signing_file(self, service: str) -> str | None:
        """Where service `service`'s private key is, if this process was given it."""
        return self._signing_files.get(service)

    def only(self, service: str) -> Keys:
        """What a process serving `service` keeps: the public key set and that service's key — never
        another service's key or the user issuer key, whatever the environment offered."""
        own = self._signing_files.get(service)
        return Keys(self.jwks_source, {service: own} if own else {}, None)

    def __repr__(self) -> str:  # never the key material
        signs = sorted(self._signing_files)
        return f"Keys(jwks={self.jwks_source!r}, signs={signs}, issuer={bool(self._issuer_file)})"


def from_dir(directory: str | Path, services: Iterable[str]) -> Keys:
    """Every key of a key directory (made or completed here): for `agentplane up`, benchmarks, tests."""
    root = Path(directory)
    names = list(services)
    jwks = init_dir(root, names)
    return Keys(str(jwks), {s: str(root / f"{s}.pem") for s in names}, str(root / ISSUER_KEY_FILENAME))

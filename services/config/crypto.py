"""Encryption at rest of provider API keys: AES-256-GCM with key ids, so keys can rotate.

`AGENTPLANE_ENCRYPTION_KEY` holds one or more comma-separated keys, each ``id:secret`` or a
bare ``secret`` (its id is then derived from the secret). The first key seals new values;
every listed key can open values sealed earlier. It is required: the config service refuses
to start without it (`agentplane up` generates one and keeps it in its data directory).
Rotation: put the new key first and keep the old one listed, run
``agentplane admin rotate-encryption-key`` (RotateEncryptionKey re-seals every stored key with
the first key in one transaction, see `KeyRing.reseal`), then drop the old key.
Each secret is stretched with HKDF-SHA256; the provider id is bound in as associated data,
so a ciphertext copied onto another provider's row does not decrypt.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.common.errors import FailedPrecondition
from services.common.logs import register_secret
from services.common.settings import Settings, SettingsError

_HKDF_INFO = b"agentplane config provider api key v1"
_NONCE_BYTES = 12

MISSING_KEY_MESSAGE = (
    "AGENTPLANE_ENCRYPTION_KEY is not set: the config service needs its own key to encrypt provider "
    "API keys at rest (it is no longer derived from AGENTPLANE_SECRET). Generate one with\n"
    "  python3 -c 'import secrets; print(\"k1:\" + secrets.token_urlsafe(32))'\n"
    "and give it to the config service only (AGENTPLANE_ENCRYPTION_KEY=k1:...). `agentplane up` "
    "generates one and keeps it in <data dir>/encryption-key. See docs/config.md."
)


@dataclass(frozen=True)
class SealedKey:
    """An encrypted value and the id of the key that sealed it."""

    key_id: str
    ciphertext: bytes


# Before AGENTPLANE_ENCRYPTION_KEY was required, keys were sealed with a key derived from the JWT
# secret under this id; listing ``from-secret:agentplane-jwt-secret:<AGENTPLANE_SECRET>`` opens them.
LEGACY_KEY_ID = "from-secret"
LEGACY_KEY_HINT = (
    " (it was stored before AGENTPLANE_ENCRYPTION_KEY was required: list "
    "'from-secret:agentplane-jwt-secret:<the AGENTPLANE_SECRET of then>' after the new key, run "
    "`agentplane admin rotate-encryption-key`, then remove it; see docs/config.md)"
)


def _derive(secret: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret.encode())


class KeyRing:
    """The encryption keys of a deployment: the first seals, all open."""

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        if not keys:
            raise SettingsError("AGENTPLANE_ENCRYPTION_KEY must hold at least one key")
        self._keys: dict[str, AESGCM] = {}
        for key_id, secret in keys:
            if key_id in self._keys:
                raise SettingsError(f"AGENTPLANE_ENCRYPTION_KEY lists key id {key_id!r} twice")
            register_secret(secret)  # each key of a list, not only the whole variable
            self._keys[key_id] = AESGCM(_derive(secret))
        self.primary_key_id = keys[0][0]

    @classmethod
    def parse(cls, value: str) -> KeyRing:
        """Parse the ``AGENTPLANE_ENCRYPTION_KEY`` format (``id:secret,secret,...``)."""
        keys: list[tuple[str, str]] = []
        for raw in value.split(","):
            item = raw.strip()
            if not item:
                continue
            key_id, sep, secret = item.partition(":")
            if not sep:
                secret, key_id = item, derived_key_id(item)
            key_id, secret = key_id.strip(), secret.strip()
            if not key_id or len(secret) < 16:
                raise SettingsError(
                    "AGENTPLANE_ENCRYPTION_KEY entries must be 'id:secret' or 'secret' with a secret "
                    "of at least 16 characters"
                )
            keys.append((key_id, secret))
        return cls(keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The deployment's key ring; SettingsError (saying how to make a key) when none is set."""
        if not settings.encryption_key:
            raise SettingsError(MISSING_KEY_MESSAGE)
        return cls.parse(settings.encryption_key)

    @property
    def key_ids(self) -> list[str]:
        """Every key id that can open values, the primary first."""
        return list(self._keys)

    def seal(self, plaintext: str, associated_data: str) -> SealedKey:
        """Encrypt `plaintext` with the primary key, bound to `associated_data` (the provider id)."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._keys[self.primary_key_id].encrypt(nonce, plaintext.encode(), associated_data.encode())
        return SealedKey(self.primary_key_id, nonce + sealed)

    def open(self, sealed: SealedKey, associated_data: str) -> str:
        """Decrypt a sealed value; FailedPrecondition when its key is gone or it was tampered with."""
        aead = self._keys.get(sealed.key_id)
        if aead is None:
            hint = LEGACY_KEY_HINT if sealed.key_id == LEGACY_KEY_ID else ""
            raise FailedPrecondition(
                f"the API key was encrypted with key id {sealed.key_id!r}, which is not in "
                f"AGENTPLANE_ENCRYPTION_KEY; add that key back or set the provider's API key again{hint}",
                reason="ENCRYPTION_KEY_UNKNOWN",
                metadata={"key_id": sealed.key_id},
            )
        nonce, body = sealed.ciphertext[:_NONCE_BYTES], sealed.ciphertext[_NONCE_BYTES:]
        try:
            return aead.decrypt(nonce, body, associated_data.encode()).decode()
        except InvalidTag:
            raise FailedPrecondition(
                f"the stored API key does not decrypt with key id {sealed.key_id!r}",
                reason="ENCRYPTION_KEY_MISMATCH",
                metadata={"key_id": sealed.key_id},
            ) from None

    def reseal(self, sealed: SealedKey, associated_data: str) -> SealedKey | None:
        """`sealed` re-encrypted with the primary key, or None when it already is.

        Every value is decrypted first, the current ones too, so a rotation finds a value that no
        longer opens (FailedPrecondition) before anything is written.
        """
        plaintext = self.open(sealed, associated_data)
        if sealed.key_id == self.primary_key_id:
            return None
        return self.seal(plaintext, associated_data)


def derived_key_id(secret: str) -> str:
    """The id of a bare secret: a short hash, so the id is stable without revealing the secret."""
    return "k" + hashlib.sha256(_derive(secret)).hexdigest()[:12]

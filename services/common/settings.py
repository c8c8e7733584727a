"""Deployment settings, parsed once from the environment into frozen dataclasses.

See docs/kit.md for the list of environment variables. Every invalid value raises
`SettingsError` naming the variable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.keys import ISSUER_KEY_FILENAME, JWKS_FILENAME, Keys
from services.common.oidc import OidcSettings, OidcSettingsError

log = logging.getLogger(__name__)

SERVICE_NAMES: tuple[str, ...] = ("config", "inference", "toolexec", "chat")
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "config": (50051, 9101),
    "inference": (50052, 9102),
    "toolexec": (50053, 9103),
    "chat": (50054, 9104),
}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """An environment variable has an invalid value."""


@dataclass(frozen=True)
class ServiceSettings:
    """Where one service listens, and where the others reach it."""

    name: str
    host: str
    port: int
    metrics_port: int | None  # None: no metrics endpoint
    address: str  # host:port other services dial

    @property
    def listen_address(self) -> str:
        """The `host:port` this service binds."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """Everything a process reads from its environment."""

    database_url: str | None
    redis_url: str | None
    # The public key set and the private keys this process holds (services.common.keys).
    keys: Keys
    encryption_key: str | None
    log_level: str
    data_dir: str
    shutdown_grace_seconds: float
    services: Mapping[str, ServiceSettings] = field(default_factory=dict)
    # Tokens whose lifetime (exp - iat) is longer are refused (AGENTPLANE_MAX_TOKEN_LIFETIME_SECONDS).
    max_token_lifetime_seconds: float = 30 * 24 * 3600
    # How often each service refreshes its copy of the revoked tokens (AGENTPLANE_REVOCATION_REFRESH_SECONDS).
    revocation_refresh_seconds: float = 5.0
    # Users from an external OpenID Connect provider (AGENTPLANE_OIDC_*), or None.
    oidc: OidcSettings | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse settings from `environ` (default `os.environ`)."""
        env = os.environ if environ is None else environ
        log_level = (_str(env, "AGENTPLANE_LOG_LEVEL") or "INFO").upper()
        if log_level not in _LOG_LEVELS:
            raise SettingsError(
                f"AGENTPLANE_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {log_level!r}"
            )
        grace = _float(env, "AGENTPLANE_SHUTDOWN_GRACE_SECONDS", 10.0)
        if grace < 0:
            raise SettingsError("AGENTPLANE_SHUTDOWN_GRACE_SECONDS must not be negative")
        data_dir = _str(env, "AGENTPLANE_DATA_DIR") or ".agentplane"
        default_host = _str(env, "AGENTPLANE_HOST") or "0.0.0.0"
        services = {}
        for name in SERVICE_NAMES:
            port_default, metrics_default = DEFAULT_PORTS[name]
            up = name.upper()
            port = _port(env, f"AGENTPLANE_{up}_PORT", port_default)
            metrics: int | None = _port(
                env, f"AGENTPLANE_{up}_METRICS_PORT", metrics_default, allow_disable=True
            )
            if metrics in (-1, 0):
                metrics = None
            host = _str(env, f"AGENTPLANE_{up}_HOST") or default_host
            address = _str(env, f"AGENTPLANE_{up}_ADDR") or f"127.0.0.1:{port}"
            if ":" not in address:
                raise SettingsError(f"AGENTPLANE_{up}_ADDR must be host:port, got {address!r}")
            services[name] = ServiceSettings(name, host, port, metrics, address)
        return cls(
            database_url=_str(env, "DATABASE_URL"),
            redis_url=_str(env, "REDIS_URL"),
            keys=_keys(env, data_dir),
            encryption_key=_str(env, "AGENTPLANE_ENCRYPTION_KEY"),
            log_level=log_level,
            data_dir=data_dir,
            shutdown_grace_seconds=grace,
            services=services,
            max_token_lifetime_seconds=_max_lifetime(env),
            oidc=_oidc(env),
            revocation_refresh_seconds=env_seconds(env, "AGENTPLANE_REVOCATION_REFRESH_SECONDS", 5.0) or 5.0,
        )

    def service(self, name: str) -> ServiceSettings:
        """The listen/reach settings of service `name` (config, inference, toolexec, chat)."""
        try:
            return self.services[name]
        except KeyError:
            raise SettingsError(f"unknown service {name!r}; known: {', '.join(SERVICE_NAMES)}") from None

    def address(self, name: str) -> str:
        """The `host:port` at which other services reach service `name`."""
        return self.service(name).address

    def require_database_url(self) -> str:
        """The database URL, or a clear error when DATABASE_URL is unset."""
        if not self.database_url:
            raise SettingsError("DATABASE_URL is not set (run `agentplane up` for an embedded database)")
        return self.database_url

    def with_service(self, name: str, **changes: object) -> Settings:
        """A copy with some fields of one service changed (e.g. ``port=0`` in tests)."""
        svc = dataclasses.replace(self.service(name), **changes)  # type: ignore[arg-type]
        return dataclasses.replace(self, services={**self.services, name: svc})

    def replace(self, **changes: object) -> Settings:
        """A copy with top-level fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _str(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _str(env, name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None


def _keys(env: Mapping[str, str], data_dir: str) -> Keys:
    """Where the public key set and this process's private keys are (default: `<data dir>/keys`)."""
    directory = _str(env, "AGENTPLANE_KEYS_DIR") or os.path.join(data_dir, "keys")
    common = _str(env, "AGENTPLANE_SIGNING_KEY_FILE")
    signing = {}
    for name in SERVICE_NAMES:
        path = _str(env, f"AGENTPLANE_{name.upper()}_SIGNING_KEY_FILE") or common
        if path is None and not _str(env, "AGENTPLANE_JWKS"):
            path = os.path.join(directory, f"{name}.pem")  # a key directory made by `agentplane keys init`
        if path is not None:
            signing[name] = path
    issuer = _str(env, "AGENTPLANE_ISSUER_KEY_FILE")
    if issuer is None and not _str(env, "AGENTPLANE_JWKS"):
        issuer = os.path.join(directory, ISSUER_KEY_FILENAME)
    jwks = _str(env, "AGENTPLANE_JWKS") or os.path.join(directory, JWKS_FILENAME)
    return Keys(jwks, signing, issuer)


def _oidc(env: Mapping[str, str]) -> OidcSettings | None:
    try:
        return OidcSettings.from_env(env)
    except OidcSettingsError as exc:
        raise SettingsError(str(exc)) from None


def _max_lifetime(env: Mapping[str, str]) -> float:
    value = env_seconds(env, "AGENTPLANE_MAX_TOKEN_LIFETIME_SECONDS", 30 * 24 * 3600)
    if value < 60:
        raise SettingsError("AGENTPLANE_MAX_TOKEN_LIFETIME_SECONDS must be at least 60")
    return value


def env_seconds(env: Mapping[str, str], name: str, default: float) -> float:
    """A non-negative number of seconds from `env[name]` (default when unset); SettingsError otherwise."""
    raw = _str(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise SettingsError(f"{name} must not be negative, got {value:g}")
    return value


def _port(env: Mapping[str, str], name: str, default: int, *, allow_disable: bool = False) -> int:
    raw = _str(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer port, got {raw!r}") from None
    if allow_disable and value == -1:
        return value
    if not 0 <= value <= 65535:
        raise SettingsError(f"{name} must be between 0 and 65535, got {value}")
    return value

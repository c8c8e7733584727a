"""Workspace lifecycle and owner checks (domain code: no grpc).

Only the owner, a service acting on the owner's behalf, or an admin may touch a workspace;
anyone else is told it does not exist (NOT_FOUND), so ids cannot be probed.

Requests that name an owner (CreateWorkspace, ListWorkspaces) follow the same rule: a user, and a
service acting for a user, is exactly that user and may name only that user (empty means them);
naming anyone else is PERMISSION_DENIED. Only admins and services acting for nobody may name
another owner.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import datetime as dt
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from services.common.auth import SERVICE_PREFIX, Identity
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.toolexec.agent_tokens import new_agent_token, token_sha256
from services.toolexec.driver import WorkspaceDriver, WorkspaceFillError
from services.toolexec.store import (
    STATE_FAILED,
    STATE_READY,
    WorkspaceRecord,
    WorkspaceStore,
)
from services.toolexec.templates import (
    PodSettings,
    TemplateFetcher,
    TemplateFill,
    fill_for,
    resolve_parameters,
)

log = logging.getLogger(__name__)

WORKSPACE_ID_RE = re.compile(r"^ws_[0-9a-f]{20}$")
MAX_NAME_LENGTH = 200
MAX_REQUEST_ID_LENGTH = 200
MAX_PARAMETER_VALUE_LENGTH = 4096
DRIVERS = ("local", "external", "kubernetes")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def new_workspace_id() -> str:
    """A fresh workspace id (also its directory name, so only [0-9a-f] after the prefix)."""
    return "ws_" + secrets.token_hex(10)


@dataclass(frozen=True)
class CreateSpec:
    """What CreateWorkspace asks for."""

    name: str
    owner_id: str = ""
    template_id: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""
    driver: str = ""


@dataclass(frozen=True)
class Created:
    """A created workspace and, for a new one, its agent token (shown once)."""

    record: WorkspaceRecord
    agent_token: str = ""


class WorkspaceManager:
    """Creates, finds, lists and deletes workspaces, enforcing ownership."""

    def __init__(
        self,
        store: WorkspaceStore,
        drivers: Mapping[str, WorkspaceDriver],
        templates: TemplateFetcher | None,
        default_driver: str = "local",
    ) -> None:
        self._store = store
        self._drivers = dict(drivers)
        self._templates = templates
        self.default_driver = default_driver
        self._terminate_agent: Callable[[str], Awaitable[bool]] | None = None
        self._revoke_agent: Callable[[str], Awaitable[bool]] | None = None
        # Ready workspaces never change owner; caching them keeps CallTool to the ledger statements.
        self._ready: dict[str, WorkspaceRecord] = {}
        # Being deleted here: no agent is started for them meanwhile.
        self.deleting: set[str] = set()

    def on_revoke(self, revoke: Callable[[str], Awaitable[bool]]) -> None:
        """What to call when a token is rotated (tell the connected agent it was revoked)."""
        self._revoke_agent = revoke

    def on_terminate(self, terminate: Callable[[str], Awaitable[bool]]) -> None:
        """What to call before a workspace is deleted (tell its agent to kill everything and exit)."""
        self._terminate_agent = terminate

    def driver_for(self, name: str) -> WorkspaceDriver:
        """The driver named `name` (workspaces record theirs)."""
        driver = self._drivers.get(name)
        if driver is None:
            raise FailedPrecondition(
                f"workspace driver {name!r} is not available on this toolexec", reason="DRIVER_UNAVAILABLE"
            )
        return driver

    async def ensure_agent(self, workspace_id: str) -> None:
        """Ask the workspace's driver to start its agent if it can and it is not running."""
        if workspace_id in self.deleting:
            return
        record = self._ready.get(workspace_id) or await self._store.get(workspace_id)
        if record is not None:
            await self.driver_for(record.driver).ensure_agent(workspace_id)

    async def issue_token(self, workspace_id: str) -> str:
        """A new agent token for the workspace (its hash replaces the old one)."""
        token = new_agent_token()
        if not await self._store.set_agent_token(workspace_id, token_sha256(token)):
            raise NotFound(f"workspace {workspace_id} not found", reason="WORKSPACE_NOT_FOUND")
        return token

    async def rotate_token(self, identity: Identity, workspace_id: str) -> tuple[WorkspaceRecord, str]:
        """Replace the agent token; the old one's connection is told it was revoked."""
        record = await self.get(identity, workspace_id)
        if record.driver != "external":
            raise FailedPrecondition(
                f"workspace {record.id} runs its agent with the {record.driver} driver, which manages the "
                "agent's token itself; only external workspaces' tokens are rotated",
                reason="TOKEN_MANAGED_BY_DRIVER",
            )
        token = await self.issue_token(record.id)
        if self._revoke_agent is not None:
            await self._revoke_agent(record.id)
        return record, token

    async def create(self, identity: Identity, spec: CreateSpec) -> Created:
        """Create a workspace (idempotent on request_id), filled from its template if one is named."""
        owner = self._owner_for_create(identity, spec.owner_id)
        driver_name = spec.driver.strip() or self.default_driver
        if driver_name not in DRIVERS:
            raise InvalidArgument("driver", f"must be one of {', '.join(DRIVERS)}, got {spec.driver[:40]!r}")
        driver = self.driver_for(driver_name)
        name = spec.name.strip()
        if not name:
            raise InvalidArgument("name", "give the workspace a name")
        if len(name) > MAX_NAME_LENGTH:
            raise InvalidArgument("name", f"must be at most {MAX_NAME_LENGTH} characters")
        if len(spec.request_id) > MAX_REQUEST_ID_LENGTH:
            raise InvalidArgument("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters")
        for key, value in spec.parameters.items():
            if len(value) > MAX_PARAMETER_VALUE_LENGTH:
                raise InvalidArgument(
                    f"parameters.{key}", f"must be at most {MAX_PARAMETER_VALUE_LENGTH} characters"
                )
        request_id = spec.request_id or None
        if request_id:
            earlier = await self._store.by_request(owner, request_id)
            if earlier is not None:
                return Created(earlier)
        fill: TemplateFill | None = None
        parameters: dict[str, str] = {}
        template_id = ""
        network = False
        pod: PodSettings | None = None
        if spec.template_id:
            if self._templates is None:
                raise FailedPrecondition(
                    "workspace templates are not available: toolexec has no config service configured",
                    reason="TEMPLATES_UNAVAILABLE",
                )
            # A network call to the config service: made before any database write.
            template = await self._templates.fetch(spec.template_id)
            if not template.enabled:
                raise FailedPrecondition(
                    f"workspace template {template.name!r} is disabled", reason="TEMPLATE_DISABLED"
                )
            parameters = resolve_parameters(template, spec.parameters)
            fill = fill_for(template, parameters)
            template_id = template.id
            network = template.network
            pod = template.pod
        elif spec.parameters:
            raise InvalidArgument("parameters", "parameters need a template_id")
        if fill is not None and driver_name == "external":
            raise InvalidArgument(
                "template_id",
                "templates fill local workspaces; an external agent serves the directory it is started in",
            )
        token = new_agent_token()
        record = await self._store.insert(
            new_workspace_id(),
            owner,
            name,
            template_id,
            parameters,
            request_id,
            driver_name,
            token_sha256(token),
        )
        if record is None:
            # A concurrent request with the same request_id won the insert.
            earlier = await self._store.by_request(owner, request_id or "")
            if earlier is None:
                raise FailedPrecondition("workspace id collision; retry", reason="WORKSPACE_ID_COLLISION")
            return Created(earlier)
        try:
            await driver.create(record.id, fill, token, network, pod=pod)
        except WorkspaceFillError as exc:
            log.warning("workspace fill failed", extra={"workspace_id": record.id, "error": str(exc)})
            failed = await self._store.set_state(record.id, STATE_FAILED, str(exc))
            return Created(failed or record, token)
        except Exception:
            log.exception("workspace creation failed", extra={"workspace_id": record.id})
            failed = await self._store.set_state(
                record.id, STATE_FAILED, "internal error creating the workspace"
            )
            return Created(failed or record, token)
        ready = await self._store.set_state(record.id, STATE_READY)
        if ready is not None:
            # The first GetWorkspace / CallTool on it (usually right after) needs no lookup.
            self._ready[ready.id] = ready
        return Created(ready or record, token)

    async def get(self, identity: Identity, workspace_id: str, *, cached: bool = False) -> WorkspaceRecord:
        """The workspace, if `identity` may touch it; NotFound otherwise.

        `cached` (the CallTool path) may answer from this replica's cache of ready workspaces; a
        workspace deleted through another replica is then caught by the ledger's foreign key.
        """
        _check_id(workspace_id)
        record = (self._ready.get(workspace_id) if cached else None) or await self._store.get(workspace_id)
        if record is None or not may_touch(identity, record.owner_id):
            raise NotFound(
                f"workspace {workspace_id} not found",
                reason="WORKSPACE_NOT_FOUND",
                metadata={"workspace_id": workspace_id},
            )
        if record.state == STATE_READY:
            self._ready[workspace_id] = record
        return record

    async def get_ready(self, identity: Identity, workspace_id: str) -> WorkspaceRecord:
        """The workspace, which must be READY for tools to run in it."""
        record = await self.get(identity, workspace_id, cached=True)
        if record.state != STATE_READY:
            detail = f": {record.failure_message}" if record.failure_message else ""
            raise FailedPrecondition(
                f"workspace {workspace_id} is {record.state}, not ready{detail}",
                reason="WORKSPACE_NOT_READY",
                metadata={"workspace_id": workspace_id, "state": record.state},
            )
        return record

    async def list(
        self, identity: Identity, owner_id: str, page_size: int, page_token: str
    ) -> tuple[list[WorkspaceRecord], str]:
        """One page of an owner's workspaces, newest first, and the next page's token."""
        owner = named_owner(identity, owner_id, "list the workspaces of")
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token, owner) if page_token else None
        records = await self._store.list(owner, size + 1, after)
        next_token = ""
        if len(records) > size:
            records = records[:size]
            last = records[-1]
            next_token = _encode_token(owner, last.create_time, last.id)
        return records, next_token

    async def delete(self, identity: Identity, workspace_id: str) -> bool:
        """Kill the workspace's processes, remove its directory and its record (with its ledger).

        Idempotent: False, and nothing touched, when `identity` has no such workspace: it is gone
        already, or someone else's (answered alike, so the answer tells nothing about ids the
        caller cannot see). A malformed id is still InvalidArgument.
        """
        try:
            record = await self.get(identity, workspace_id)
        except NotFound:
            return False
        self._ready.pop(record.id, None)
        self.deleting.add(record.id)
        if self._terminate_agent is not None:
            # The agent kills everything it started and exits (wherever it runs).
            await self._terminate_agent(record.id)
        try:
            await self.driver_for(record.driver).delete(record.id)
            await self._store.delete(record.id)
        finally:
            self.deleting.discard(record.id)
        return True

    async def sweep_creating(self, older_than_seconds: float) -> builtins.list[str]:
        """Fail workspaces a crash left CREATING (no create outlives the fill timeout)."""
        ids = await self._store.fail_stale_creating(
            older_than_seconds,
            "creating the workspace was interrupted (a toolexec replica stopped); delete it and create "
            "it again",
        )
        if ids:
            log.warning("failed workspaces left creating", extra={"workspace_ids": ids})
        return ids

    def _owner_for_create(self, identity: Identity, owner_id: str) -> str:
        owner = named_owner(identity, owner_id, "create a workspace for")
        if owner.startswith(SERVICE_PREFIX):
            raise InvalidArgument("owner_id", "a workspace must be owned by a user, not a service")
        return owner


def may_name_any_owner(identity: Identity) -> bool:
    """True for admins and for services acting for nobody; a service acting for a user is that user."""
    return identity.is_admin or (identity.is_service() and identity.acting_for is None)


def named_owner(identity: Identity, owner_id: str, action: str) -> str:
    """The owner a request names (empty: the caller's effective user), if `identity` may name it.

    InvalidArgument when it names nobody and the caller is a service acting for nobody;
    PermissionDenied (OWNER_MISMATCH) when it names another user and the caller is neither an
    admin nor a service acting for nobody. `action` completes "may only ... <user>".
    """
    user = identity.user_id
    if not owner_id:
        if user is None:
            raise InvalidArgument("owner_id", "a service not acting for a user must name the owner")
        return user
    if owner_id != user and not may_name_any_owner(identity):
        who = f"{identity.subject} acting for {user}" if identity.acting_for is not None else user
        raise PermissionDenied(
            f"{who} may only {action} {user}; only admins may name another owner",
            reason="OWNER_MISMATCH",
        )
    return owner_id


def may_touch(identity: Identity, owner_id: str) -> bool:
    """True for the owner, a service acting for the owner, and admins (never a bare service)."""
    return identity.is_admin or (identity.user_id is not None and identity.user_id == owner_id)


def _check_id(workspace_id: str) -> None:
    if not workspace_id:
        raise InvalidArgument("workspace_id", "is required")
    if not WORKSPACE_ID_RE.match(workspace_id):
        raise InvalidArgument(
            "workspace_id", f"{workspace_id[:80]!r} is not a workspace id (ws_ + 20 hex digits)"
        )


def _encode_token(owner: str, create_time: dt.datetime, workspace_id: str) -> str:
    raw = json.dumps({"o": owner, "t": create_time.isoformat(), "i": workspace_id}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, owner: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        position = (dt.datetime.fromisoformat(data["t"]), data["i"])
        token_owner = data["o"]
        # Tokens are not tamper-proof: an id of any other form would reach the query as it is.
        if not isinstance(position[1], str) or not WORKSPACE_ID_RE.match(position[1]):
            raise ValueError(position[1])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument(
            "page_token", "is not a token from a previous ListWorkspaces response"
        ) from None
    if token_owner != owner:
        raise InvalidArgument("page_token", "belongs to a listing of a different owner")
    return position

"""The kubernetes driver: a pod per workspace, through the official `kubernetes` client.

toolexec creates each workspace's objects (services/toolexec/k8s_objects.py) in the workspaces
namespace, where its Role allows it pods, secrets, persistent volume claims and network policies
and nothing else (deploy/workspaces). The pod's entrypoint is the workspace agent, which dials
toolexec's Service with the token the driver put in the workspace's Secret. A git source is
cloned by a one-shot fill pod before the workspace pod starts. A pod that is lost (evicted, its
node gone) is made again, with a fresh token, the next time a call needs the agent; the volume
keeps the files. Deleting the workspace deletes all its objects.

The client is synchronous: every call runs in a thread. The driver reads raw API JSON (no model
objects), the same JSON `kubectl get -o json` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from services.common.errors import Unavailable
from services.common.settings import SettingsError
from services.toolexec import k8s_objects as objects
from services.toolexec.driver import TokenIssuer, WorkspaceFillError
from services.toolexec.k8s_objects import KubernetesSettings, PodSpec
from services.toolexec.local_driver import FILL_TIMEOUT_SECONDS
from services.toolexec.templates import DirectoryFill, GitFill, PodSettings, TemplateFill

log = logging.getLogger(__name__)

# A clone or a pod start is watched by reading the pod, at growing intervals up to this.
MAX_POLL_SECONDS = 2.0
# ensure_agent runs on every round of a call waiting for its agent; the API is asked at most
# this often per workspace.
ENSURE_INTERVAL_SECONDS = 2.0
API_TIMEOUT_SECONDS = 30.0
LOG_TAIL_LINES = 40
# Waiting reasons that do not go away by waiting longer.
_STUCK = {
    "ImagePullBackOff": "the image cannot be pulled",
    "InvalidImageName": "the image name is invalid",
    "ErrImageNeverPull": "the image is not on the node and its pull policy is Never",
    "CreateContainerConfigError": "the container cannot be configured",
    "CreateContainerError": "the container cannot be created",
    "CrashLoopBackOff": "the container keeps exiting",
}
_REMOTE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^[^/]+@[^/]+:")


class ApiFailure(Exception):
    """The Kubernetes API failed or refused a request; the message says which and why."""


class KubernetesDriver:
    """Workspaces as pods in a namespace of a Kubernetes cluster."""

    name = "kubernetes"

    def __init__(
        self,
        settings: KubernetesSettings,
        *,
        kubeconfig: str = "",
        fill_timeout_seconds: float = FILL_TIMEOUT_SECONDS,
    ) -> None:
        if not settings.image:
            raise SettingsError(
                "the kubernetes workspace driver needs a default workspace image: set "
                "AGENTPLANE_K8S_WORKSPACE_IMAGE (deploy/ sets it to the agentplane image)"
            )
        self.settings = settings
        self._kubeconfig = kubeconfig
        self._fill_timeout = fill_timeout_seconds
        self._api: Any = None
        self._core: Any = None
        self._net: Any = None
        self._issue_token: TokenIssuer | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._checked: dict[str, float] = {}

    def set_token_issuer(self, issue: TokenIssuer) -> None:
        """How the driver gets a fresh token when it must make a lost pod again."""
        self._issue_token = issue

    def set_agent_url(self, url: str) -> None:
        """Where agents dial when AGENTPLANE_AGENT_URL is not set (this replica's address)."""
        if not self.settings.agent_url:
            self.settings = replace(self.settings, agent_url=url)

    async def start(self) -> None:
        """Load the API credentials: in-cluster (the pod's service account), else a kubeconfig."""
        try:
            from kubernetes import client, config
        except ImportError:
            raise SettingsError(
                "the kubernetes workspace driver needs the kubernetes client: "
                "pip install 'agentplane[kubernetes]'"
            ) from None
        configuration = client.Configuration()
        try:
            if self._kubeconfig:
                await asyncio.to_thread(
                    config.load_kube_config, config_file=self._kubeconfig, client_configuration=configuration
                )
            else:
                try:
                    config.load_incluster_config(client_configuration=configuration)
                except config.ConfigException:
                    await asyncio.to_thread(config.load_kube_config, client_configuration=configuration)
        except (config.ConfigException, OSError) as exc:
            raise SettingsError(
                f"the kubernetes workspace driver found no Kubernetes credentials ({exc}): run toolexec in "
                "the cluster with its service account, or set AGENTPLANE_K8S_KUBECONFIG"
            ) from None
        self._api = client.ApiClient(configuration)
        self._core = client.CoreV1Api(self._api)
        self._net = client.NetworkingV1Api(self._api)

    async def close(self) -> None:
        """Close the API client (workspace pods keep running)."""
        if self._api is not None:
            await asyncio.to_thread(self._api.close)
            self._api = None

    # --- create ------------------------------------------------------------------------------

    async def create(
        self,
        workspace_id: str,
        fill: TemplateFill | None,
        token: str,
        network: bool,
        *,
        pod: PodSettings | None = None,
    ) -> None:
        """Secret, volume and policy; the fill pod for a git source; then the workspace pod, running."""
        git = _git_fill(fill)
        s = self.settings
        spec = objects.pod_spec(s, pod)
        # The clone and the start share one budget: a create must end before the sweep of
        # workspaces left CREATING takes it for abandoned (server.CREATING_STALE_SECONDS).
        deadline = asyncio.get_running_loop().time() + self._fill_timeout
        try:
            await self._create(objects.token_secret(s, workspace_id, token, spec))
            await self._create(objects.volume_claim(s, workspace_id, pod))
            await self._create(objects.network_policy(s, workspace_id, network, pod))
            if git is not None:
                await self._fill(workspace_id, spec, git, pod, deadline)
            await self._create(objects.workspace_pod(s, workspace_id, spec))
            await self._wait_started(workspace_id, spec, deadline)
        except ApiFailure as exc:
            raise WorkspaceFillError(f"creating the workspace's pod failed: {exc}") from None

    async def _fill(
        self, workspace_id: str, spec: PodSpec, fill: GitFill, pod: PodSettings | None, deadline: float
    ) -> None:
        s = self.settings
        name = objects.fill_name(workspace_id)
        what = f"git clone of {fill.url!r}" + (f" at {fill.ref!r}" if fill.ref else "")
        await self._create(objects.fill_network_policy(s, workspace_id, pod))
        try:
            await self._create(objects.fill_pod(s, workspace_id, spec, fill))
            data = await self._wait_pod(name, _fill_outcome, _remaining(self._fill_timeout, deadline), what)
            if data["status"].get("phase") != "Succeeded":
                logs = await self._logs(name, "fill") if _exited(data) else ""
                raise WorkspaceFillError(f"{what} failed ({_describe(data)}){': ' + logs if logs else ''}")
        finally:
            # The fill's egress ends with it, whatever happened.
            await self._delete_quietly("pods", name)
            await self._delete_quietly("networkpolicies", name)

    async def _wait_started(self, workspace_id: str, spec: PodSpec, deadline: float) -> None:
        name = objects.object_name(workspace_id)
        what = f"starting the workspace pod (image {spec.image!r})"
        seconds = _remaining(self.settings.start_timeout_seconds, deadline)
        data = await self._wait_pod(name, _start_outcome, seconds, what)
        if _start_outcome(data) != "ok":
            detail = _describe(data)
            logs = (
                await self._logs(name, "prepare" if _failed_init(data) else "agent") if _exited(data) else ""
            )
            # A pod that cannot start would only retry for ever; the workspace is FAILED instead.
            await self._delete_quietly("pods", name)
            raise WorkspaceFillError(f"{what} failed ({detail}){': ' + logs if logs else ''}")

    async def _wait_pod(
        self, name: str, outcome: Callable[[Mapping[str, Any]], str], seconds: float, what: str
    ) -> dict[str, Any]:
        """Read the pod until `outcome` says anything but "wait"; WorkspaceFillError after `seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        delay = 0.1
        while True:
            data = await self._read("pods", name)
            if data is None:
                raise WorkspaceFillError(f"{what} failed: the pod {name} was deleted while it started")
            if outcome(data) != "wait":
                return data
            if loop.time() >= deadline:
                await self._delete_quietly("pods", name)
                raise WorkspaceFillError(f"{what} took longer than {seconds:g} s: {_pending_reason(data)}")
            # Polling the API server: the pod's progress is its, there is nothing local to wait on.
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, MAX_POLL_SECONDS)

    async def _logs(self, pod_name: str, container: str) -> str:
        try:
            raw = await self._call(
                self._core.read_namespaced_pod_log,
                pod_name,
                self.settings.namespace,
                container=container,
                tail_lines=LOG_TAIL_LINES,
            )
        except ApiFailure as exc:
            return f"(no log: {exc})"
        return raw.decode("utf-8", errors="replace").strip()[-2000:]

    # --- ensure_agent --------------------------------------------------------------------------

    async def ensure_agent(self, workspace_id: str) -> None:
        """Make the pod again, with a fresh token, when it is gone or finished; never raises."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked.get(workspace_id, -ENSURE_INTERVAL_SECONDS) < ENSURE_INTERVAL_SECONDS:
            return
        lock = self._locks.setdefault(workspace_id, asyncio.Lock())
        async with lock:
            self._checked[workspace_id] = loop.time()
            try:
                await self._ensure(workspace_id)
            except (ApiFailure, ValueError, KeyError) as exc:
                log.warning(
                    "could not start the workspace's pod again",
                    extra={"workspace_id": workspace_id, "error": str(exc)},
                )

    async def _ensure(self, workspace_id: str) -> None:
        name = objects.object_name(workspace_id)
        data = await self._read("pods", name)
        if data is not None:
            phase = (data.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                # Evicted or its node lost: out of the way; the next round makes a new one.
                log.info("deleting a finished workspace pod", extra={"workspace_id": workspace_id})
                await self._delete("pods", name)
            return
        secret = await self._read("secrets", objects.secret_name(workspace_id))
        if secret is None or self._issue_token is None:
            return
        spec = PodSpec.from_annotation(secret["metadata"]["annotations"][objects.POD_ANNOTATION])
        log.info("starting the workspace pod again", extra={"workspace_id": workspace_id})
        token = await self._issue_token(workspace_id)
        await self._call(
            self._core.patch_namespaced_secret,
            objects.secret_name(workspace_id),
            self.settings.namespace,
            objects.token_patch(token),
        )
        await self._create(objects.workspace_pod(self.settings, workspace_id, spec))

    # --- delete --------------------------------------------------------------------------------

    async def delete(self, workspace_id: str) -> None:
        """Delete every object of the workspace (missing ones are fine)."""
        name = objects.object_name(workspace_id)
        self._checked.pop(workspace_id, None)
        self._locks.pop(workspace_id, None)
        try:
            for kind, object_name in (
                ("pods", name),
                ("pods", objects.fill_name(workspace_id)),
                ("networkpolicies", objects.fill_name(workspace_id)),
                ("networkpolicies", name),
                ("secrets", objects.secret_name(workspace_id)),
                ("persistentvolumeclaims", name),
            ):
                await self._delete(kind, object_name)
        except ApiFailure as exc:
            raise Unavailable(
                f"deleting workspace {workspace_id}'s Kubernetes objects failed: {exc}; retry the deletion",
                reason="WORKSPACE_BACKEND_UNAVAILABLE",
                metadata={"workspace_id": workspace_id},
            ) from None

    # --- the API -------------------------------------------------------------------------------

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
        """One API call in a thread; the raw response body. ApiFailure for any error."""
        from kubernetes.client import ApiException

        def call() -> bytes:
            response = method(*args, _preload_content=False, _request_timeout=API_TIMEOUT_SECONDS, **kwargs)
            return bytes(response.data)

        if self._core is None:
            raise ApiFailure("the driver was not started")
        try:
            return await asyncio.to_thread(call)
        except ApiException as exc:
            raise _api_failure(exc) from None
        except Exception as exc:  # urllib3's connection errors, TLS errors
            raise ApiFailure(f"the Kubernetes API did not answer: {exc}") from None

    def _methods(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
        """(create, read, delete) of a kind."""
        core, net = self._core, self._net
        table = {
            "pods": (core.create_namespaced_pod, core.read_namespaced_pod, core.delete_namespaced_pod),
            "secrets": (
                core.create_namespaced_secret,
                core.read_namespaced_secret,
                core.delete_namespaced_secret,
            ),
            "persistentvolumeclaims": (
                core.create_namespaced_persistent_volume_claim,
                core.read_namespaced_persistent_volume_claim,
                core.delete_namespaced_persistent_volume_claim,
            ),
            "networkpolicies": (
                net.create_namespaced_network_policy,
                net.read_namespaced_network_policy,
                net.delete_namespaced_network_policy,
            ),
        }
        return table[kind]

    async def _create(self, body: dict[str, Any]) -> None:
        """Create an object; one that exists already (a retried create) is left as it is."""
        create = self._methods(_KINDS[body["kind"]])[0]
        try:
            await self._call(create, self.settings.namespace, body)
        except _Conflict:
            log.info("kubernetes object exists already", extra={"object": body["metadata"]["name"]})

    async def _read(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            raw = await self._call(self._methods(kind)[1], name, self.settings.namespace)
        except _NotFound:
            return None
        data: dict[str, Any] = json.loads(raw)
        return data

    async def _delete(self, kind: str, name: str) -> None:
        # Pods go at once: the agent was told to terminate, and nothing of a pod is kept.
        kwargs = {"grace_period_seconds": 0} if kind == "pods" else {}
        with contextlib.suppress(_NotFound):
            await self._call(self._methods(kind)[2], name, self.settings.namespace, **kwargs)

    async def _delete_quietly(self, kind: str, name: str) -> None:
        try:
            await self._delete(kind, name)
        except ApiFailure as exc:
            log.warning("could not delete a kubernetes object", extra={"object": name, "error": str(exc)})


_KINDS = {
    "Pod": "pods",
    "Secret": "secrets",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "NetworkPolicy": "networkpolicies",
}


class _NotFound(ApiFailure):
    pass


class _Conflict(ApiFailure):
    pass


def _api_failure(exc: Any) -> ApiFailure:
    """An ApiException as an ApiFailure carrying the API server's own message."""
    message = ""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        message = str(json.loads(exc.body).get("message", ""))
    text = f"{exc.status} {exc.reason}" + (f": {message}" if message else "")
    if exc.status == 404:
        return _NotFound(text)
    if exc.status == 409:
        return _Conflict(text)
    if exc.status in (401, 403):
        text += (
            " (toolexec's service account needs the Role of deploy/workspaces in the workspaces "
            "namespace; docs/kubernetes.md)"
        )
    return ApiFailure(text)


def _git_fill(fill: TemplateFill | None) -> GitFill | None:
    if fill is None:
        return None
    if isinstance(fill, DirectoryFill):
        raise WorkspaceFillError(
            "a directory template fills local workspaces only; a Kubernetes workspace is filled from a "
            "git source"
        )
    if not _REMOTE_URL.match(fill.url):
        raise WorkspaceFillError(
            f"{fill.url!r} is a path on the toolexec host; a Kubernetes workspace clones a git URL "
            "(https://, ssh:// or user@host:path)"
        )
    return fill


def _statuses(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return objects.container_statuses(data)


def _stuck(data: Mapping[str, Any]) -> str | None:
    for status in _statuses(data):
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _STUCK:
            return str(waiting["reason"])
    return None


def _failed_init(data: Mapping[str, Any]) -> bool:
    for status in (data.get("status") or {}).get("initContainerStatuses") or []:
        for state in (status.get("state") or {}, status.get("lastState") or {}):
            terminated = state.get("terminated")
            if terminated and terminated.get("exitCode", 0) != 0:
                return True
    return False


def _remaining(seconds: float, deadline: float) -> float:
    """`seconds`, or less when the create's budget (`deadline`, loop time) ends sooner."""
    return max(0.0, min(seconds, deadline - asyncio.get_running_loop().time()))


def _exited(data: Mapping[str, Any]) -> bool:
    """Whether some container of the pod ran and exited (so it has a log to show)."""
    return any(
        (status.get(key) or {}).get("terminated")
        for status in _statuses(data)
        for key in ("state", "lastState")
    )


def _fill_outcome(data: Mapping[str, Any]) -> str:
    phase = (data.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        return "done"
    return "stuck" if _stuck(data) else "wait"


def _start_outcome(data: Mapping[str, Any]) -> str:
    status = data.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed") or _failed_init(data) or _stuck(data):
        return "failed"
    for container in status.get("containerStatuses") or []:
        if container.get("name") == "agent" and (container.get("state") or {}).get("running") is not None:
            return "ok"
    return "wait"


def _describe(data: Mapping[str, Any]) -> str:
    """What went wrong, in the pod's own words."""
    for status in _statuses(data):
        state = status.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason") in _STUCK:
            reason = state["waiting"]["reason"]
            message = state["waiting"].get("message", "")
            return f"{status.get('name')}: {_STUCK[reason]} ({reason}{': ' + message if message else ''})"
        for key in ("state", "lastState"):
            terminated = (status.get(key) or {}).get("terminated")
            if terminated and terminated.get("exitCode", 0) != 0:
                return f"{status.get('name')} exited with code {terminated['exitCode']}"
    phase = (data.get("status") or {}).get("phase", "unknown")
    return f"pod phase {phase}"


def _pending_reason(data: Mapping[str, Any]) -> str:
    """Why a pod is still pending (not scheduled, volume not bound, ...), as far as it says."""
    for condition in (data.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "False" and condition.get("message"):
            return f"{condition.get('reason', condition.get('type'))}: {condition['message']}"
    return f"the pod is {(data.get('status') or {}).get('phase', 'pending')}"

"""A stand-in Kubernetes cluster for the kubernetes driver's tests: no API server can run here.

No kube-apiserver is installable on this machine (no Debian, PyPI or npm package ships one, and
nothing else may be downloaded), so the driver's tests talk to this instead, through the real
`kubernetes` client over real HTTP with a kubeconfig and a bearer token:

- `FakeApiServer` serves the subset of the API the driver uses (create, get, delete and patch of
  pods, secrets, persistent volume claims and network policies; pod logs) with the API server's
  status codes and Status bodies (401, 403 outside the allowed namespace, 404, 409, 422). Every
  object it receives is validated against the Kubernetes schemas in strict mode; an invalid one
  is refused with 422 and recorded in `invalid`.
- `FakeKubelet` runs each pod as the pod says, as local processes: init containers in order,
  then the containers, with the pod's command, args, working directory and environment (values
  and Secret references resolved at each container start, as the kubelet does), its volumes as
  directories (the claim's directory for a persistentVolumeClaim, a fresh one for an emptyDir),
  mount paths rewritten to those directories. Unknown images wait in ImagePullBackOff. It keeps
  the pod's status (phase, container states, exit codes) the way the kubelet reports it.

What it does not do, and a real cluster does (docs/kubernetes.md has a smoke test for that):
enforce securityContext, NetworkPolicies, resource limits, RBAC beyond the namespace, or pull
images.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime as dt
import json
import os
import re
import shutil
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from scripts.k8s_validate import schema_errors

PLURALS = {
    "pods": ("v1", "Pod"),
    "secrets": ("v1", "Secret"),
    "persistentvolumeclaims": ("v1", "PersistentVolumeClaim"),
    "networkpolicies": ("networking.k8s.io/v1", "NetworkPolicy"),
}
USER = "system:serviceaccount:agentplane:toolexec"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> web.Response:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    body.update(message=message, reason=reason, code=code)
    return web.json_response(body, status=code)


class FakeApiServer:
    """The API: objects in memory, one namespace allowed, every received object schema-checked."""

    def __init__(self, root: Path, namespace: str, images: set[str], token: str = "fake-sa-token") -> None:
        self.root = root
        self.namespace = namespace
        self.token = token
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.created: list[tuple[str, str]] = []
        self.invalid: list[str] = []
        self.requests: list[tuple[str, str]] = []
        # Test switches: answer every request with this status (e.g. 403, 503).
        self.fail_with: int | None = None
        self.kubelet = FakeKubelet(self, images)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        for prefix in ("/api/v1", "/apis/networking.k8s.io/v1"):
            app.router.add_route("POST", prefix + "/namespaces/{ns}/{plural}", self._create)
            app.router.add_route("GET", prefix + "/namespaces/{ns}/{plural}/{name}", self._get)
            app.router.add_route("DELETE", prefix + "/namespaces/{ns}/{plural}/{name}", self._delete)
            app.router.add_route("PATCH", prefix + "/namespaces/{ns}/{plural}/{name}", self._patch)
        app.router.add_route("GET", "/api/v1/namespaces/{ns}/pods/{name}/log", self._log)
        app.middlewares.append(self._gate)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.kubelet.stop_all()
        if self._runner is not None:
            await self._runner.cleanup()

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for this server with the service account's bearer token."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "toolexec", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "toolexec"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))
        return path

    def names(self, plural: str) -> set[str]:
        """Names of the stored objects of a kind."""
        return {name for (p, name) in self.objects if p == plural}

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((plural, name))

    @web.middleware
    async def _gate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        if self.fail_with is not None:
            return _status(
                self.fail_with, "ServiceUnavailable" if self.fail_with >= 500 else "Forbidden", "injected"
            )
        ns = request.match_info.get("ns")
        if ns != self.namespace:
            plural = request.match_info.get("plural", "pods")
            verb = {"POST": "create", "GET": "get", "DELETE": "delete", "PATCH": "patch"}[request.method]
            return _status(
                403,
                "Forbidden",
                f'{plural} is forbidden: User "{USER}" cannot {verb} resource "{plural}" in API group "" '
                f'in the namespace "{ns}"',
            )
        result: web.StreamResponse = await handler(request)
        return result

    async def _create(self, request: web.Request) -> web.Response:
        plural = request.match_info["plural"]
        if plural not in PLURALS:
            return _status(404, "NotFound", f"the server could not find the requested resource ({plural})")
        body = await request.json()
        api_version, kind = PLURALS[plural]
        if body.get("kind") != kind or body.get("apiVersion") != api_version:
            return _status(400, "BadRequest", f"{body.get('kind')} sent to {plural}")
        error = schema_errors(body)
        if error:
            self.invalid.append(error)
            return _status(422, "Invalid", error)
        meta = body["metadata"]
        if meta.get("namespace", self.namespace) != self.namespace:
            return _status(400, "BadRequest", "the namespace of the object does not match the request")
        key = (plural, meta["name"])
        if key in self.objects:
            return _status(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
        stored = copy.deepcopy(body)
        stored["metadata"].update(
            namespace=self.namespace, uid=str(uuid.uuid4()), resourceVersion="1", creationTimestamp=_now()
        )
        if plural == "pods":
            stored["status"] = {"phase": "Pending"}
        if plural == "persistentvolumeclaims":
            self.kubelet.claim_dir(meta["name"]).mkdir(parents=True, exist_ok=True)
        self.objects[key] = stored
        self.created.append(key)
        if plural == "pods":
            self.kubelet.run(meta["name"])
        return web.json_response(stored, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        found = self.objects.get((request.match_info["plural"], request.match_info["name"]))
        if found is None:
            return _status(
                404, "NotFound", f'{request.match_info["plural"]} "{request.match_info["name"]}" not found'
            )
        return web.json_response(found)

    async def _delete(self, request: web.Request) -> web.Response:
        plural, name = request.match_info["plural"], request.match_info["name"]
        found = self.objects.pop((plural, name), None)
        if found is None:
            return _status(404, "NotFound", f'{plural} "{name}" not found')
        if plural == "pods":
            await self.kubelet.stop(name)
        if plural == "persistentvolumeclaims":
            shutil.rmtree(self.kubelet.claim_dir(name), ignore_errors=True)
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})

    async def _patch(self, request: web.Request) -> web.Response:
        plural, name = request.match_info["plural"], request.match_info["name"]
        found = self.objects.get((plural, name))
        if found is None:
            return _status(404, "NotFound", f'{plural} "{name}" not found')
        patch = await request.json()
        merged = _merge(copy.deepcopy(found), patch)
        error = schema_errors({k: v for k, v in merged.items() if k != "status"})
        if error:
            self.invalid.append(error)
            return _status(422, "Invalid", error)
        self.objects[(plural, name)] = merged
        return web.json_response(merged)

    async def _log(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if ("pods", name) not in self.objects:
            return _status(404, "NotFound", f'pods "{name}" not found')
        path = self.kubelet.log_path(name, request.query.get("container", ""))
        text = path.read_text(errors="replace") if path.exists() else ""
        tail = int(request.query.get("tailLines", "0") or 0)
        if tail:
            text = "\n".join(text.splitlines()[-tail:])
        return web.Response(text=text)


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
    return target


class FakeKubelet:
    """Runs pods as local processes and reports their status into the API server's objects."""

    def __init__(self, api: FakeApiServer, images: set[str]) -> None:
        self.api = api
        self.images = images
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._procs: dict[str, list[asyncio.subprocess.Process]] = {}
        # The image's PATH: this virtualenv's bin (its `agentplane`), then the system's.
        self.path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"])

    def claim_dir(self, claim: str) -> Path:
        return self.api.root / "claims" / claim

    def log_path(self, pod: str, container: str) -> Path:
        return self.api.root / "pods" / pod / f"{container}.log"

    def run(self, name: str) -> None:
        self._tasks[name] = asyncio.create_task(self._run(name))

    def processes(self, pod: str) -> list[asyncio.subprocess.Process]:
        return list(self._procs.get(pod, []))

    async def stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for proc in self._procs.pop(name, []):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()

    async def stop_all(self) -> None:
        for name in list(self._tasks):
            await self.stop(name)

    def _pod(self, name: str) -> dict[str, Any]:
        pod = self.api.objects.get(("pods", name))
        if pod is None:
            raise _PodGone(name)
        return pod

    def _set(self, name: str, **status: Any) -> None:
        self._pod(name)["status"].update(status)

    def _mounts(self, name: str, spec: dict[str, Any], container: dict[str, Any]) -> dict[str, Path]:
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                path = self.claim_dir(volume["persistentVolumeClaim"]["claimName"])
            else:
                path = self.api.root / "pods" / name / "volumes" / mount["name"]
            path.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = path
        return mounts

    @staticmethod
    def _rewrite(text: str, mounts: dict[str, Path]) -> str:
        """A path (or a script's paths) inside the container as the host directory behind it; URLs
        are the container's business and stay as they are."""
        if "://" in text:
            return text
        if not mounts:
            return text
        # One pass: a host path put in must not be rewritten again by a shorter mount.
        names = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
        pattern = rf"(?<![\w.-])({names})(?=[/\s\"';]|$)"
        return re.sub(pattern, lambda match: str(mounts[match.group(1)]), text)

    def _env(self, container: dict[str, Any], mounts: dict[str, Path]) -> dict[str, str] | str:
        """The container's environment, or why it cannot be configured."""
        env = {"PATH": self.path}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = self._rewrite(item["value"], mounts)
                continue
            ref = item["valueFrom"]["secretKeyRef"]
            secret = self.api.objects.get(("secrets", ref["name"]))
            if secret is None or ref["key"] not in secret.get("data", {}):
                return f'secret "{ref["name"]}" not found or has no key {ref["key"]}'
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env

    async def _start(
        self, name: str, spec: dict[str, Any], container: dict[str, Any]
    ) -> asyncio.subprocess.Process | str:
        mounts = self._mounts(name, spec, container)
        env = self._env(container, mounts)
        if isinstance(env, str):
            return env
        argv = [self._rewrite(a, mounts) for a in [*container.get("command", []), *container.get("args", [])]]
        log = self.log_path(name, container["name"])
        log.parent.mkdir(parents=True, exist_ok=True)
        workdir = (
            self._rewrite(container["workingDir"], mounts) if "workingDir" in container else str(log.parent)
        )
        try:
            with open(log, "ab") as out:  # noqa: ASYNC230 (an append-only log file)
                proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=workdir, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    start_new_session=True,
                )  # fmt: skip
        except OSError as exc:  # the runtime's "executable file not found", a missing working dir
            return f"failed to create the container process: {exc}"
        self._procs.setdefault(name, []).append(proc)
        return proc

    async def _run(self, name: str) -> None:
        with contextlib.suppress(_PodGone):
            await self._run_pod(name)

    async def _run_pod(self, name: str) -> None:
        spec = self._pod(name)["spec"]
        images = {c["image"] for c in [*spec.get("initContainers", []), *spec["containers"]]}
        unknown = images - self.images
        if unknown:
            image = sorted(unknown)[0]
            waiting = {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}
            statuses = [
                {"name": c["name"], "state": {"waiting": waiting}, "image": c["image"]}
                for c in spec["containers"]
            ]
            self._set(name, containerStatuses=statuses)
            return
        init_statuses: list[dict[str, Any]] = []
        for container in spec.get("initContainers", []):
            proc = await self._start(name, spec, container)
            if isinstance(proc, str):
                self._set(
                    name,
                    containerStatuses=[_waiting(c, "CreateContainerError", proc) for c in spec["containers"]],
                )
                return
            code = await proc.wait()
            init_statuses.append({"name": container["name"], "state": {"terminated": {"exitCode": code}}})
            self._set(name, initContainerStatuses=init_statuses)
            if code != 0:
                if spec["restartPolicy"] == "Never":
                    self._set(name, phase="Failed")
                else:
                    init_statuses[-1] = {
                        "name": container["name"],
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        "lastState": {"terminated": {"exitCode": code}},
                    }
                    self._set(name, initContainerStatuses=init_statuses)
                return
        [container] = spec["containers"]  # the driver's pods have one container
        restarts = 0
        while True:
            proc = await self._start(name, spec, container)
            if isinstance(proc, str):
                self._set(name, containerStatuses=[_waiting(container, "CreateContainerError", proc)])
                return
            running = {
                "name": container["name"],
                "state": {"running": {"startedAt": _now()}},
                "restartCount": restarts,
            }
            self._set(name, phase="Running", containerStatuses=[running])
            code = await proc.wait()
            terminated = {"terminated": {"exitCode": code, "finishedAt": _now()}}
            if spec["restartPolicy"] == "Never":
                status = {"name": container["name"], "state": terminated, "restartCount": restarts}
                self._set(name, phase="Succeeded" if code == 0 else "Failed", containerStatuses=[status])
                return
            restarts += 1
            backoff: dict[str, Any] = {
                "name": container["name"],
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            }
            self._set(
                name, containerStatuses=[{**backoff, "lastState": terminated, "restartCount": restarts}]
            )
            # The kubelet's restart back-off (shortened): a crashing container is not started hot.
            await asyncio.sleep(0.5)


class _PodGone(Exception):
    """The pod was deleted while the kubelet was running it."""


def _waiting(container: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    return {"name": container["name"], "state": {"waiting": {"reason": reason, "message": message}}}


def workspace_objects(api: FakeApiServer, workspace_id: str) -> Iterator[tuple[str, str]]:
    """The stored objects labelled with a workspace."""
    for (plural, name), obj in api.objects.items():
        if obj["metadata"].get("labels", {}).get("agentplane.io/workspace") == workspace_id:
            yield plural, name

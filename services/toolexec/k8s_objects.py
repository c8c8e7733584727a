"""The Kubernetes objects of one workspace (the kubernetes driver), as plain JSON-ready dicts.

Pure functions: the driver sends exactly what these return, and the tests validate every one of
them against the Kubernetes schemas. Per workspace ``ws_<hex>``, in the workspaces namespace:

- Secret ``ws-<hex>-agent`` — the agent's token (key ``token``), reaching the agent as
  ``AGENTPLANE_AGENT_TOKEN``, which the agent takes out of its environment at once; an
  annotation keeps the pod's image and resources so a lost pod can be made again.
- PersistentVolumeClaim ``ws-<hex>`` — the workspace's files (``/data/workspace``), the agent's
  record of recent calls (``/data/agent-state``) and ``$HOME`` (``/data/home``).
- NetworkPolicy ``ws-<hex>`` — nothing reaches the pod; it reaches DNS, toolexec's agent port
  and, when its template allows network access, the template's egress rules (or any public
  address).
- Pod ``ws-<hex>`` — the workspace agent as entrypoint: non-root, no privilege escalation, no
  capabilities, read-only root file system, no service account token, no service links.
- Pod ``ws-<hex>-fill`` and NetworkPolicy ``ws-<hex>-fill`` — only while a git source is cloned
  into the volume, before the workspace pod starts: the clone reaches the git host, the
  workspace's commands never get that egress unless the template allows it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.toolexec.templates import EgressRule, GitFill, PodSettings

WORKSPACE_LABEL = "agentplane.io/workspace"
ROLE_LABEL = "agentplane.io/role"
POD_ANNOTATION = "agentplane.io/pod"
TOKEN_KEY = "token"
TOKEN_ENV = "AGENTPLANE_AGENT_TOKEN"
DATA_MOUNT = "/data"
WORKSPACE_ROOT = "/data/workspace"
STATE_DIR = "/data/agent-state"
HOME_DIR = "/data/home"
# The image's non-root user (deploy/Dockerfile); files on the volume belong to its group.
WORKSPACE_UID = 10001
# Addresses a workspace with network access still may not reach: private, shared (CGNAT),
# link-local (cloud metadata services) and loopback ranges, where the cluster and its
# neighbours live.
NON_PUBLIC_V4 = (
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
)
NON_PUBLIC_V6 = ("::1/128", "fc00::/7", "fe80::/10")
# What a clone of a remote git source needs when the template names no egress rules.
GIT_PORTS = (443, 22, 9418)
# Creates the directories on the volume (a kubelet-made directory would belong to root).
PREPARE_SCRIPT = f"mkdir -p {WORKSPACE_ROOT} {STATE_DIR} {HOME_DIR}"
# Clones only into an empty workspace: the fill pod never runs twice over a filled volume.
FILL_SCRIPT = f"""set -eu
mkdir -p {WORKSPACE_ROOT} {STATE_DIR} {HOME_DIR}
if [ -n "$(ls -A {WORKSPACE_ROOT})" ]; then echo "workspace already filled"; exit 0; fi
git clone --quiet -- "$AGENTPLANE_FILL_URL" {WORKSPACE_ROOT}
if [ -n "$AGENTPLANE_FILL_REF" ]; then git -C {WORKSPACE_ROOT} checkout --quiet "$AGENTPLANE_FILL_REF" --; fi
"""


@dataclass(frozen=True)
class KubernetesSettings:
    """Where and how the kubernetes driver runs workspaces (``AGENTPLANE_K8S_*``)."""

    # The namespace of the workspaces' pods (toolexec's Role allows it nothing else).
    namespace: str = "agentplane-workspaces"
    # The default workspace image: the agentplane image (deploy/ sets it to toolexec's own).
    image: str = ""
    # Where workspace agents dial toolexec (its Service), e.g. toolexec.agentplane.svc:50053.
    agent_url: str = ""
    # toolexec's namespace and agent port: the one place a workspace pod may connect to.
    toolexec_namespace: str = "agentplane"
    agent_port: int = 50053
    service_account: str = "workspace"
    cpu: str = "1"
    memory: str = "2Gi"
    storage: str = "10Gi"
    storage_class: str = ""
    # Where the cluster's DNS runs (kube-dns and CoreDNS both carry k8s-app=kube-dns).
    dns_namespace: str = "kube-system"
    dns_pod_label: str = "kube-dns"
    # How long a new workspace pod may take to start (image pull, scheduling, volume).
    start_timeout_seconds: float = 300.0


@dataclass(frozen=True)
class PodSpec:
    """What the workspace pod runs with: the template's settings over the driver's defaults."""

    image: str
    cpu: str
    memory: str

    def annotation(self) -> str:
        """Kept on the token Secret: how to make the pod again after it was lost."""
        return json.dumps({"image": self.image, "cpu": self.cpu, "memory": self.memory}, sort_keys=True)

    @classmethod
    def from_annotation(cls, raw: str) -> PodSpec:
        data = json.loads(raw)
        return cls(image=str(data["image"]), cpu=str(data["cpu"]), memory=str(data["memory"]))


def object_name(workspace_id: str) -> str:
    """``ws_<hex>`` as an object name (DNS labels have no underscore)."""
    return workspace_id.replace("_", "-")


def secret_name(workspace_id: str) -> str:
    return f"{object_name(workspace_id)}-agent"


def fill_name(workspace_id: str) -> str:
    return f"{object_name(workspace_id)}-fill"


def labels(workspace_id: str, role: str) -> dict[str, str]:
    """Every object's labels; ``agentplane.io/workspace`` finds all of a workspace's objects."""
    return {
        "app.kubernetes.io/name": "workspace",
        "app.kubernetes.io/part-of": "agentplane",
        "app.kubernetes.io/managed-by": "agentplane-toolexec",
        WORKSPACE_LABEL: workspace_id,
        ROLE_LABEL: role,
    }


def pod_spec(settings: KubernetesSettings, pod: PodSettings | None) -> PodSpec:
    """The template's image and resources, or the driver's defaults."""
    pod = pod or PodSettings()
    return PodSpec(
        image=pod.image or settings.image, cpu=pod.cpu or settings.cpu, memory=pod.memory or settings.memory
    )


def token_secret(
    settings: KubernetesSettings, workspace_id: str, token: str, spec: PodSpec
) -> dict[str, Any]:
    """The Secret that holds the agent's token."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(workspace_id),
            "namespace": settings.namespace,
            "labels": labels(workspace_id, "agent-token"),
            "annotations": {POD_ANNOTATION: spec.annotation()},
        },
        "type": "Opaque",
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def token_patch(token: str) -> dict[str, Any]:
    """A merge patch that replaces the Secret's token."""
    return {"data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()}}


def volume_claim(settings: KubernetesSettings, workspace_id: str, pod: PodSettings | None) -> dict[str, Any]:
    """The workspace's persistent volume."""
    pod = pod or PodSettings()
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": pod.storage or settings.storage}},
    }
    storage_class = pod.storage_class or settings.storage_class
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": object_name(workspace_id),
            "namespace": settings.namespace,
            "labels": labels(workspace_id, "volume"),
        },
        "spec": spec,
    }


def _dns_rule(settings: KubernetesSettings) -> dict[str, Any]:
    return {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.dns_namespace}},
                "podSelector": {"matchLabels": {"k8s-app": settings.dns_pod_label}},
            }
        ],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }


def _toolexec_rule(settings: KubernetesSettings) -> dict[str, Any]:
    return {
        "to": [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": settings.toolexec_namespace}
                },
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "toolexec"}},
            }
        ],
        "ports": [{"protocol": "TCP", "port": settings.agent_port}],
    }


def public_internet_peers() -> list[dict[str, Any]]:
    """Any public IPv4 or IPv6 address, and nothing of the cluster or its private networks."""
    return [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": list(NON_PUBLIC_V4)}},
        {"ipBlock": {"cidr": "::/0", "except": list(NON_PUBLIC_V6)}},
    ]


def _egress_rules(rules: tuple[EgressRule, ...], default_ports: tuple[int, ...]) -> list[dict[str, Any]]:
    """The template's rules; none: any public address on `default_ports` (every port when empty)."""
    if not rules:
        out: dict[str, Any] = {"to": public_internet_peers()}
        if default_ports:
            out["ports"] = [{"protocol": "TCP", "port": p} for p in default_ports]
        return [out]
    result = []
    for rule in rules:
        entry: dict[str, Any] = {"to": [{"ipBlock": {"cidr": rule.cidr}}]}
        if rule.ports:
            entry["ports"] = [{"protocol": "TCP", "port": p} for p in rule.ports]
        result.append(entry)
    return result


def network_policy(
    settings: KubernetesSettings, workspace_id: str, network: bool, pod: PodSettings | None
) -> dict[str, Any]:
    """The workspace pod's policy: no ingress; DNS, toolexec's agent port and what the template allows."""
    egress = [_dns_rule(settings), _toolexec_rule(settings)]
    if network:
        egress += _egress_rules((pod or PodSettings()).egress, ())
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": object_name(workspace_id),
            "namespace": settings.namespace,
            "labels": labels(workspace_id, "agent"),
        },
        "spec": {
            "podSelector": {"matchLabels": {WORKSPACE_LABEL: workspace_id, ROLE_LABEL: "agent"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }


def fill_network_policy(
    settings: KubernetesSettings, workspace_id: str, pod: PodSettings | None
) -> dict[str, Any]:
    """The fill pod's policy: DNS and the git host (the template's egress rules, else any public
    address on the git ports)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": fill_name(workspace_id),
            "namespace": settings.namespace,
            "labels": labels(workspace_id, "fill"),
        },
        "spec": {
            "podSelector": {"matchLabels": {WORKSPACE_LABEL: workspace_id, ROLE_LABEL: "fill"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [_dns_rule(settings), *_egress_rules((pod or PodSettings()).egress, GIT_PORTS)],
        },
    }


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": WORKSPACE_UID,
        "runAsGroup": WORKSPACE_UID,
        "fsGroup": WORKSPACE_UID,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _volumes(workspace_id: str) -> list[dict[str, Any]]:
    return [
        {"name": "data", "persistentVolumeClaim": {"claimName": object_name(workspace_id)}},
        {"name": "tmp", "emptyDir": {}},
    ]


_MOUNTS = [{"name": "data", "mountPath": DATA_MOUNT}, {"name": "tmp", "mountPath": "/tmp"}]
_ENV = [
    {"name": "HOME", "value": HOME_DIR},
    {"name": "TMPDIR", "value": "/tmp"},
    {"name": "LANG", "value": "C.UTF-8"},
]
_SMALL = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}}


def _resources(spec: PodSpec) -> dict[str, Any]:
    """Requests equal to limits: a workspace gets what it was promised and never more."""
    amounts = {"cpu": spec.cpu, "memory": spec.memory}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _base_pod_spec(settings: KubernetesSettings, workspace_id: str) -> dict[str, Any]:
    return {
        "serviceAccountName": settings.service_account,
        # Nothing in a workspace may talk to the Kubernetes API or find the cluster's Services.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(),
        "volumes": _volumes(workspace_id),
    }


def agent_args(settings: KubernetesSettings, workspace_id: str) -> list[str]:
    """The agent's flags (its token comes from the environment, never the command line)."""
    return [
        *("--url", settings.agent_url, "--workspace", workspace_id),
        *("--root", WORKSPACE_ROOT, "--state-dir", STATE_DIR),
    ]


def workspace_pod(settings: KubernetesSettings, workspace_id: str, spec: PodSpec) -> dict[str, Any]:
    """The pod that runs the workspace agent (and so every command of the workspace)."""
    agent = {
        "name": "agent",
        "image": spec.image,
        "command": ["agentplane", "workspace-agent"],
        "args": agent_args(settings, workspace_id),
        "workingDir": WORKSPACE_ROOT,
        "env": [
            *_ENV,
            {
                "name": TOKEN_ENV,
                "valueFrom": {"secretKeyRef": {"name": secret_name(workspace_id), "key": TOKEN_KEY}},
            },
        ],
        "resources": _resources(spec),
        "securityContext": _security_context(),
        "volumeMounts": _MOUNTS,
    }
    prepare = {
        "name": "prepare",
        "image": spec.image,
        "command": ["sh", "-c", PREPARE_SCRIPT],
        "resources": _SMALL,
        "securityContext": _security_context(),
        "volumeMounts": _MOUNTS,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": object_name(workspace_id),
            "namespace": settings.namespace,
            "labels": labels(workspace_id, "agent"),
        },
        "spec": {
            **_base_pod_spec(settings, workspace_id),
            # The agent exits to be started again (a replaced token, a crash); processes it
            # started die with it, files stay on the volume.
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 10,
            "initContainers": [prepare],
            "containers": [agent],
        },
    }


def fill_pod(settings: KubernetesSettings, workspace_id: str, spec: PodSpec, fill: GitFill) -> dict[str, Any]:
    """A one-shot pod that clones the template's repository into the workspace's volume."""
    container = {
        "name": "fill",
        "image": spec.image,
        "command": ["sh", "-c", FILL_SCRIPT],
        # URL and ref reach the script as variables, never as shell text.
        "env": [
            *_ENV,
            {"name": "GIT_TERMINAL_PROMPT", "value": "0"},
            {"name": "AGENTPLANE_FILL_URL", "value": fill.url},
            {"name": "AGENTPLANE_FILL_REF", "value": fill.ref},
        ],
        "resources": _resources(spec),
        "securityContext": _security_context(),
        "volumeMounts": _MOUNTS,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": fill_name(workspace_id),
            "namespace": settings.namespace,
            "labels": labels(workspace_id, "fill"),
        },
        "spec": {
            **_base_pod_spec(settings, workspace_id),
            "restartPolicy": "Never",
            "containers": [container],
        },
    }


def all_objects(
    settings: KubernetesSettings,
    workspace_id: str,
    token: str,
    network: bool,
    pod: PodSettings | None,
    fill: GitFill | None,
) -> list[dict[str, Any]]:
    """Everything the driver may create for one workspace (the tests validate each)."""
    spec = pod_spec(settings, pod)
    objects = [
        token_secret(settings, workspace_id, token, spec),
        volume_claim(settings, workspace_id, pod),
        network_policy(settings, workspace_id, network, pod),
        workspace_pod(settings, workspace_id, spec),
    ]
    if fill is not None:
        objects += [
            fill_network_policy(settings, workspace_id, pod),
            fill_pod(settings, workspace_id, spec, fill),
        ]
    return objects


def container_statuses(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A pod's init and app container statuses (raw API JSON)."""
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]

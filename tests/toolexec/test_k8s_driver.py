"""The kubernetes workspace driver: a pod per workspace.

NO REAL API SERVER: no kube-apiserver can be installed on this machine (docs/kubernetes.md,
"Testing"), so toolexec's driver talks, through the real `kubernetes` client over HTTP with a
kubeconfig, to `tests/toolexec/fake_k8s.py`: an API server for the calls the driver makes that
validates every object it receives against the Kubernetes schemas (strict), and a kubelet that
runs each pod's containers as local processes, exactly as the pod spec says (command, args,
environment with the Secret's token, volumes). The workspace agent therefore really starts from
the pod spec, dials toolexec and serves tool calls. A real cluster's smoke test is in
docs/kubernetes.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from agentplane.toolexec.v1 import toolexec_pb2, toolexec_service_pb2

from scripts.k8s_validate import schema_errors
from services.common.rpc_errors import error_info
from services.common.settings import Settings, SettingsError
from services.toolexec import k8s_objects
from services.toolexec import server as toolexec_server
from services.toolexec.driver import WorkspaceFillError
from services.toolexec.k8s_driver import KubernetesDriver
from services.toolexec.k8s_objects import KubernetesSettings
from services.toolexec.settings import ToolexecSettings
from services.toolexec.templates import DirectoryFill, EgressRule, GitFill, PodSettings, Template
from tests.helpers import wait_until
from tests.netpol import Cluster, Endpoint, pod_endpoint
from tests.toolexec.conftest import StaticTemplates, Toolexec, call_request
from tests.toolexec.fake_k8s import FakeApiServer, workspace_objects

pytestmark = pytest.mark.timeout(120)
Req = toolexec_service_pb2
IMAGE = "registry.example.com/agentplane:1.2.3"
WS_NS = "agentplane-workspaces"
WS_ID = "ws_0123456789abcdef0123"


@dataclass
class PodCluster:
    """toolexec with the kubernetes driver as default, and the fake cluster it drives."""

    tx: Toolexec
    api: FakeApiServer
    database_url: str


@pytest.fixture
async def k8s(
    settings: Settings, tmp_path: Path, make_token: Callable[..., str], database_url: str
) -> AsyncIterator[PodCluster]:
    api = FakeApiServer(tmp_path / "cluster", WS_NS, {IMAGE})
    await api.start()
    kube = KubernetesSettings(
        namespace=WS_NS, image=IMAGE, toolexec_namespace="agentplane", start_timeout_seconds=30
    )
    tx_settings = ToolexecSettings(
        workspaces_dir=str(tmp_path / "ws"),
        default_driver="kubernetes",
        kubernetes=kube,
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        # A pod made again must start before a waiting call gives up (deploy/ sets 60 s); on two
        # busy cores an agent's start alone can take several seconds.
        offline_wait_seconds=30.0,
    )
    templates = StaticTemplates()
    server = await toolexec_server.start(settings, toolexec_settings=tx_settings, templates=templates)
    channels: list[grpc.aio.Channel] = []
    try:
        yield PodCluster(
            Toolexec(server, tx_settings.workspaces_dir, make_token, templates, channels), api, database_url
        )
    finally:
        for channel in channels:
            await channel.close()
        await server.stop(0)
        await api.stop()
    assert not api.invalid, api.invalid


async def _stored_hash(database_url: str, ws: str) -> str | None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT agent_token_sha256 FROM toolexec_workspaces WHERE id = %s", (ws,))
        row = await cur.fetchone()
    return None if row is None else str(row[0])


def _secret_token(api: FakeApiServer, ws: str) -> str:
    secret = api.get("secrets", k8s_objects.secret_name(ws))
    assert secret is not None
    return base64.b64decode(secret["data"]["token"]).decode()


async def _create(c: PodCluster, **kwargs: object) -> toolexec_pb2.Workspace:
    resp = await c.tx.stub().CreateWorkspace(Req.CreateWorkspaceRequest(name="pod", **kwargs))  # type: ignore[arg-type]
    return resp.workspace


# --- the objects -----------------------------------------------------------------------------


@pytest.mark.parametrize("network", [False, True])
@pytest.mark.parametrize(
    "pod",
    [
        None,
        PodSettings(
            image="example.com/ws:2", cpu="500m", memory="1Gi", storage="20Gi", storage_class="fast-ssd"
        ),
        PodSettings(egress=(EgressRule("140.82.112.0/20", (443, 22)), EgressRule("2001:db8::/32"))),
    ],
)
@pytest.mark.parametrize("fill", [None, GitFill("https://git.example.com/team/repo.git", "v1.0")])
def test_every_object_the_driver_makes_is_valid_for_kubernetes(
    network: bool, pod: PodSettings | None, fill: GitFill | None
) -> None:
    settings = KubernetesSettings(
        image=IMAGE, agent_url="toolexec.agentplane.svc:50053", storage_class="standard"
    )
    made = k8s_objects.all_objects(settings, WS_ID, "apw_secret", network, pod, fill)
    assert [o["kind"] for o in made] == ["Secret", "PersistentVolumeClaim", "NetworkPolicy", "Pod"] + (
        ["NetworkPolicy", "Pod"] if fill else []
    )
    errors = [e for e in (schema_errors(o) for o in made) if e]
    assert not errors, errors
    for obj in made:
        assert obj["metadata"]["namespace"] == settings.namespace
        assert obj["metadata"]["labels"]["agentplane.io/workspace"] == WS_ID
    # The token is in the Secret only: never in the pod spec, its command line or a label.
    assert "apw_secret" not in json.dumps([o for o in made if o["kind"] != "Secret"])
    [agent] = made[3]["spec"]["containers"]
    assert agent["command"] == ["agentplane", "workspace-agent"]
    assert "--token-file" not in agent["args"] and "--token-stdin" not in agent["args"]
    token_env = [e for e in agent["env"] if e["name"] == "AGENTPLANE_AGENT_TOKEN"]
    assert token_env == [
        {
            "name": "AGENTPLANE_AGENT_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": f"{WS_ID.replace('_', '-')}-agent", "key": "token"}},
        }
    ]
    claim = made[1]["spec"]
    assert claim["resources"]["requests"]["storage"] == ((pod and pod.storage) or "10Gi")
    assert claim["storageClassName"] == ((pod and pod.storage_class) or "standard")
    assert agent["image"] == ((pod and pod.image) or IMAGE)
    assert agent["resources"]["limits"] == {
        "cpu": (pod and pod.cpu) or "1",
        "memory": (pod and pod.memory) or "2Gi",
    }


def _workspace_reach(network: bool, pod: PodSettings | None) -> Callable[[Endpoint, int], bool]:
    """Whether the workspace pod (its policy and the namespace's default deny) reaches an endpoint."""
    settings = KubernetesSettings(image=IMAGE, agent_url="toolexec.agentplane.svc:50053")
    made = k8s_objects.all_objects(settings, WS_ID, "t", network, pod, None)
    deny = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "default-deny", "namespace": WS_NS},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }
    cluster = Cluster([*made, deny], {WS_NS: {}, "agentplane": {}, "kube-system": {}})
    ws = pod_endpoint("ws", "10.244.1.5", WS_NS, made[3]["spec"], made[3]["metadata"]["labels"])
    return lambda dst, port: cluster.allows(ws, dst, port)


def test_a_workspace_reaches_only_dns_and_toolexecs_agent_port_unless_its_template_allows_more() -> None:
    toolexec = Endpoint(
        "toolexec",
        "10.244.0.9",
        "agentplane",
        {"app.kubernetes.io/name": "toolexec"},
        (("grpc", 50053, "TCP"),),
    )
    config = Endpoint(
        "config", "10.244.0.8", "agentplane", {"app.kubernetes.io/name": "config"}, (("grpc", 50051, "TCP"),)
    )
    dns = Endpoint("dns", "10.244.0.2", "kube-system", {"k8s-app": "kube-dns"}, (("dns", 53, "UDP"),))
    github, internet = Endpoint("github", "140.82.112.4"), Endpoint("internet", "8.8.8.8")
    metadata, private = Endpoint("metadata", "169.254.169.254"), Endpoint("private", "10.0.0.7")

    closed = _workspace_reach(False, PodSettings(egress=(EgressRule("140.82.112.0/20", (443,)),)))
    assert closed(toolexec, 50053) and closed(dns, 53)
    assert not closed(toolexec, 9103) and not closed(config, 50051)
    assert not closed(github, 443) and not closed(internet, 443)  # rules need network access

    rules = _workspace_reach(True, PodSettings(egress=(EgressRule("140.82.112.0/20", (443,)),)))
    assert rules(github, 443) and not rules(github, 80) and not rules(internet, 443)
    assert rules(toolexec, 50053) and not rules(config, 50051)

    public = _workspace_reach(True, None)
    assert public(internet, 443) and public(internet, 80) and public(github, 22)
    assert not public(metadata, 80) and not public(private, 443) and not public(config, 50051)


def test_the_driver_needs_a_workspace_image() -> None:
    with pytest.raises(SettingsError, match="AGENTPLANE_K8S_WORKSPACE_IMAGE"):
        KubernetesDriver(KubernetesSettings())


async def test_toolexec_refuses_to_start_without_kubernetes_credentials(
    settings: Settings, tmp_path: Path
) -> None:
    tx_settings = ToolexecSettings(
        workspaces_dir=str(tmp_path / "ws"),
        default_driver="kubernetes",
        kubernetes=KubernetesSettings(image=IMAGE),
        kubeconfig=str(tmp_path / "missing-kubeconfig"),
    )
    with pytest.raises(SettingsError, match="AGENTPLANE_K8S_KUBECONFIG"):
        await toolexec_server.build_server(
            settings, toolexec_settings=tx_settings, templates=StaticTemplates()
        )


# --- through toolexec ------------------------------------------------------------------------


async def test_a_workspace_runs_in_its_own_pod_and_goes_with_it(k8s: PodCluster) -> None:
    ws = await _create(k8s)
    assert ws.state == toolexec_pb2.WORKSPACE_STATE_READY, ws.failure_message
    assert ws.driver == "kubernetes"
    name = ws.id.replace("_", "-")
    assert set(workspace_objects(k8s.api, ws.id)) == {
        ("secrets", f"{name}-agent"),
        ("persistentvolumeclaims", name),
        ("networkpolicies", name),
        ("pods", name),
    }
    # The Secret holds the token whose hash toolexec keeps; the pod reads it from there.
    token = _secret_token(k8s.api, ws.id)
    assert hashlib.sha256(token.encode()).hexdigest() == await _stored_hash(k8s.database_url, ws.id)

    stub = k8s.tx.stub()
    wrote = await stub.CallTool(
        call_request(ws.id, "write_file", {"path": "notes/a.txt", "content": "in a pod\n"})
    )
    assert not wrote.is_error, wrote.content
    ran = await stub.CallTool(call_request(ws.id, "execute", {"command": "cat notes/a.txt; env"}))
    out = json.loads(ran.structured_json)["output"]
    assert out.startswith("in a pod\n"), ran.content
    # The token reached the agent and nothing it runs.
    assert token not in out and "AGENTPLANE_AGENT_TOKEN" not in out
    # The files are on the workspace's volume.
    claim = k8s.api.kubelet.claim_dir(name)
    assert (claim / "workspace" / "notes" / "a.txt").read_text() == "in a pod\n"

    # The driver manages the token: it is not rotated by hand.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RotateWorkspaceAgentToken(Req.RotateWorkspaceAgentTokenRequest(workspace_id=ws.id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(info.value) is not None and error_info(info.value)[0] == "TOKEN_MANAGED_BY_DRIVER"  # type: ignore[index]

    procs = k8s.api.kubelet.processes(name)
    await stub.DeleteWorkspace(Req.DeleteWorkspaceRequest(workspace_id=ws.id))
    assert list(workspace_objects(k8s.api, ws.id)) == []
    assert not claim.exists()
    assert all(p.returncode is not None for p in procs)


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    """A repository whose tag v1 has README.md "first" and whose main has "second"."""
    repo = tmp_path / "repo"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "README.md").write_text("first\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    subprocess.run([*git, "tag", "v1"], check=True)
    (repo / "README.md").write_text("second\n")
    subprocess.run([*git, "commit", "-qam", "two"], check=True)
    return repo


async def test_a_git_template_is_cloned_by_a_fill_pod_that_goes_away(k8s: PodCluster, git_repo: Path) -> None:
    k8s.tx.templates.templates["t"] = Template(
        id="tpl-1", name="repo", enabled=True, source=GitFill(url=f"file://{git_repo}", ref="v1")
    )
    ws = await _create(k8s, template_id="repo")
    assert ws.state == toolexec_pb2.WORKSPACE_STATE_READY, ws.failure_message
    name = ws.id.replace("_", "-")
    # The fill pod and its egress existed while it cloned, and are gone.
    assert {("pods", f"{name}-fill"), ("networkpolicies", f"{name}-fill")} <= set(k8s.api.created)
    assert set(workspace_objects(k8s.api, ws.id)) == {
        ("secrets", f"{name}-agent"),
        ("persistentvolumeclaims", name),
        ("networkpolicies", name),
        ("pods", name),
    }
    policy = k8s.api.get("networkpolicies", name)
    assert policy is not None and not any("ipBlock" in str(rule) for rule in policy["spec"]["egress"])
    read = await k8s.tx.stub().CallTool(call_request(ws.id, "read_file", {"path": "README.md"}))
    assert "first" in read.content and "second" not in read.content, read.content


async def test_a_failed_clone_fails_the_workspace_with_gits_words(k8s: PodCluster, tmp_path: Path) -> None:
    k8s.tx.templates.templates["t"] = Template(
        id="tpl-2", name="broken", enabled=True, source=GitFill(url=f"file://{tmp_path}/missing.git")
    )
    ws = await _create(k8s, template_id="broken")
    assert ws.state == toolexec_pb2.WORKSPACE_STATE_FAILED
    assert "git clone of" in ws.failure_message and "exited with code 128" in ws.failure_message
    assert "does not appear to be a git repository" in ws.failure_message, ws.failure_message
    # No pod is left: neither the fill pod nor a workspace pod.
    assert not k8s.api.names("pods") and not k8s.api.names("networkpolicies") - {ws.id.replace("_", "-")}
    await k8s.tx.stub().DeleteWorkspace(Req.DeleteWorkspaceRequest(workspace_id=ws.id))
    assert list(workspace_objects(k8s.api, ws.id)) == []


async def test_what_a_pod_cannot_do_fails_the_workspace_clearly(k8s: PodCluster) -> None:
    templates = k8s.tx.templates.templates
    templates["dir"] = Template(id="tpl-3", name="dir", enabled=True, source=DirectoryFill("/srv/template"))
    templates["path"] = Template(id="tpl-4", name="path", enabled=True, source=GitFill(url="/srv/repos/x"))
    # A template's image that no registry has: its first pod (here the fill pod) cannot start.
    templates["image"] = Template(
        id="tpl-5",
        name="image",
        enabled=True,
        source=GitFill("https://h/r"),
        pod=PodSettings(image="example.com/missing:1"),
    )

    directory = await _create(k8s, template_id="dir")
    assert directory.state == toolexec_pb2.WORKSPACE_STATE_FAILED
    assert "directory template fills local workspaces only" in directory.failure_message

    path = await _create(k8s, template_id="path")
    assert path.state == toolexec_pb2.WORKSPACE_STATE_FAILED
    assert "is a path on the toolexec host" in path.failure_message

    image = await _create(k8s, template_id="image")
    assert image.state == toolexec_pb2.WORKSPACE_STATE_FAILED
    assert "image cannot be pulled (ImagePullBackOff" in image.failure_message, image.failure_message
    assert "example.com/missing:1" in image.failure_message
    assert not k8s.api.names("pods")


async def test_a_lost_pod_comes_back_with_a_new_token(k8s: PodCluster) -> None:
    ws = await _create(k8s)
    stub = k8s.tx.stub()
    first = await stub.CallTool(
        call_request(ws.id, "write_file", {"path": "kept.txt", "content": "on the volume"})
    )
    assert not first.is_error, first.content
    old_token = _secret_token(k8s.api, ws.id)
    name = ws.id.replace("_", "-")
    old = k8s.api.kubelet.processes(name)

    # The node goes away with the pod (its processes die, the object is gone); the volume stays.
    await k8s.api.kubelet.stop(name)
    del k8s.api.objects[("pods", name)]
    await wait_until(
        lambda: k8s.tx.server.hub.get(ws.id), until=lambda link: link is None, what="the agent to be gone"
    )

    # The next call makes the pod again, with a fresh token, and finds the files.
    again = await stub.CallTool(call_request(ws.id, "read_file", {"path": "kept.txt"}))
    assert "on the volume" in again.content, again.content
    new_token = _secret_token(k8s.api, ws.id)
    assert new_token != old_token
    assert hashlib.sha256(new_token.encode()).hexdigest() == await _stored_hash(k8s.database_url, ws.id)
    assert all(p.returncode is not None for p in old)


async def test_api_failures_fail_the_workspace_or_the_deletion_with_what_to_do(k8s: PodCluster) -> None:
    k8s.api.fail_with = 403
    refused = await _create(k8s)
    assert refused.state == toolexec_pb2.WORKSPACE_STATE_FAILED
    assert "403" in refused.failure_message and "Role" in refused.failure_message, refused.failure_message

    k8s.api.fail_with = None
    ws = await _create(k8s)
    assert ws.state == toolexec_pb2.WORKSPACE_STATE_READY, ws.failure_message
    k8s.api.fail_with = 503
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await k8s.tx.stub().DeleteWorkspace(Req.DeleteWorkspaceRequest(workspace_id=ws.id))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert error_info(info.value) == ("WORKSPACE_BACKEND_UNAVAILABLE", {"workspace_id": ws.id})
    assert "retry" in (info.value.details() or "")
    # Once the API answers again the deletion goes through.
    k8s.api.fail_with = None
    await k8s.tx.stub().DeleteWorkspace(Req.DeleteWorkspaceRequest(workspace_id=ws.id))
    assert list(workspace_objects(k8s.api, ws.id)) == []
    assert await _stored_hash(k8s.database_url, ws.id) is None


async def test_external_workspaces_still_work_next_to_kubernetes(k8s: PodCluster) -> None:
    external = await _create(k8s, driver="external")
    assert external.state == toolexec_pb2.WORKSPACE_STATE_READY and external.driver == "external"
    assert list(workspace_objects(k8s.api, external.id)) == []


async def test_a_workspace_pod_that_cannot_start_is_removed_and_says_why(
    k8s: PodCluster, tmp_path: Path
) -> None:
    driver = KubernetesDriver(
        KubernetesSettings(namespace=WS_NS, image=IMAGE, agent_url="127.0.0.1:1"),
        kubeconfig=str(k8s.api.kubeconfig(tmp_path / "driver-kubeconfig")),
    )
    await driver.start()
    try:
        with pytest.raises(WorkspaceFillError) as info:
            await driver.create(WS_ID, None, "apw_t", False, pod=PodSettings(image="example.com/missing:2"))
    finally:
        await driver.close()
    message = str(info.value)
    assert "starting the workspace pod (image 'example.com/missing:2') failed" in message, message
    assert "agent: the image cannot be pulled (ImagePullBackOff" in message, message
    # The pod would only retry for ever: it is gone; the rest waits for DeleteWorkspace.
    assert ("pods", WS_ID.replace("_", "-")) not in k8s.api.objects
    assert ("secrets", f"{WS_ID.replace('_', '-')}-agent") in k8s.api.objects


async def test_the_real_cluster_smoke_script_runs_its_checks(
    k8s: PodCluster, keys_dir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """scripts/k8s_smoke.py works end to end, with the checks the stand-in kubelet can pass: not the
    user (it runs pods as this test's user) and not the network ones (they would dial addresses off
    this machine; enforcing NetworkPolicies is the real cluster's part)."""
    from scripts import k8s_smoke

    ws = await _create(k8s)
    monkeypatch.setenv("AGENTPLANE_KEYS_DIR", keys_dir)
    monkeypatch.setenv("AGENTPLANE_TOOLEXEC_ADDR", k8s.tx.server.address)
    local = [check for check in k8s_smoke.CHECKS if "reach" not in check[0] and "uid" not in check[0]]
    assert len(local) == 2
    assert await k8s_smoke.run(ws.id, local, "alice") == 0
    assert await k8s_smoke.run(ws.id, k8s_smoke.AFTER_LOSS, "alice") == 0
    # The checks really check: a file that is not there fails.
    assert await k8s_smoke.run(ws.id, [("a missing file", "cat nothing.txt", "smoke")], "alice") == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "ok   writes its volume",
        "ok   has no API token",
        "ok   kept its files after losing its pod",
        "FAIL a missing file",
    ]

"""Workspace templates carry the kubernetes driver's pod settings (WorkspacePod): stored, returned,
validated, updated with the `pod` mask path, and read by toolexec as `Template.pod`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import grpc
from agentplane.config.v1 import config_pb2
from agentplane.config.v1 import config_service_pb2 as pb
from agentplane.config.v1.config_service_pb2_grpc import ConfigServiceStub

from services.config.server import ConfigServer
from services.toolexec.templates import EgressRule, PodSettings, template_from_proto
from tests.config.rpc import expect_error, mask

SOURCE = config_pb2.TemplateSource(git=config_pb2.GitSource(url="https://git.example.com/team/app.git"))


def _template(name: str, pod: config_pb2.WorkspacePod | None = None) -> pb.CreateWorkspaceTemplateRequest:
    template = config_pb2.WorkspaceTemplate(name=name, description="an app", enabled=True, source=SOURCE)
    if pod is not None:
        template.pod.CopyFrom(pod)
    return pb.CreateWorkspaceTemplateRequest(workspace_template=template)


async def test_pod_settings_round_trip_and_reach_toolexec(
    admin: ConfigServiceStub, alice: ConfigServiceStub
) -> None:
    pod = config_pb2.WorkspacePod(
        image="registry.example.com/ws-python:3.12",
        cpu="500m",
        memory="2Gi",
        storage="20Gi",
        storage_class="fast-ssd",
        egress=[
            config_pb2.EgressRule(cidr="140.82.112.0/20", ports=[443, 22]),
            config_pb2.EgressRule(cidr="2001:db8::/32"),
        ],
    )
    created = (await admin.CreateWorkspaceTemplate(_template("app", pod))).workspace_template
    assert created.pod == pod
    plain = (await admin.CreateWorkspaceTemplate(_template("plain"))).workspace_template
    assert not plain.HasField("pod")

    got = (
        await alice.GetWorkspaceTemplate(pb.GetWorkspaceTemplateRequest(workspace_template_id="app"))
    ).workspace_template
    assert template_from_proto(got).pod == PodSettings(
        image="registry.example.com/ws-python:3.12",
        cpu="500m",
        memory="2Gi",
        storage="20Gi",
        storage_class="fast-ssd",
        egress=(EgressRule("140.82.112.0/20", (443, 22)), EgressRule("2001:db8::/32")),
    )
    assert template_from_proto(plain).pod is None

    # The `pod` path replaces the settings whole; an unset pod clears them.
    smaller = config_pb2.WorkspaceTemplate(id=created.id, pod=config_pb2.WorkspacePod(memory="1Gi"))
    updated = (
        await admin.UpdateWorkspaceTemplate(
            pb.UpdateWorkspaceTemplateRequest(workspace_template=smaller, update_mask=mask("pod"))
        )
    ).workspace_template
    assert updated.pod == config_pb2.WorkspacePod(memory="1Gi")
    cleared = (
        await admin.UpdateWorkspaceTemplate(
            pb.UpdateWorkspaceTemplateRequest(
                workspace_template=config_pb2.WorkspaceTemplate(id=created.id), update_mask=mask("pod")
            )
        )
    ).workspace_template
    assert not cleared.HasField("pod")


async def test_pod_settings_are_validated(admin: ConfigServiceStub) -> None:
    bad = {
        "image": config_pb2.WorkspacePod(image="not an image"),
        "cpu": config_pb2.WorkspacePod(cpu="lots"),
        "memory": config_pb2.WorkspacePod(memory="2GB"),
        "storage_class": config_pb2.WorkspacePod(storage_class="Fast_SSD"),
        "egress[0].cidr": config_pb2.WorkspacePod(egress=[config_pb2.EgressRule(cidr="10.0.0.1/8")]),
        "egress[0].ports": config_pb2.WorkspacePod(
            egress=[config_pb2.EgressRule(cidr="10.0.0.0/8", ports=[0])]
        ),
    }
    for field, pod in bad.items():
        message, reason, metadata = await expect_error(
            admin.CreateWorkspaceTemplate(_template(f"bad-{len(field)}", pod)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert (
            reason == "INVALID_ARGUMENT" and f"workspace_template.pod.{field}" in str(metadata) + message
        ), (
            field,
            message,
            metadata,
        )


async def test_the_admin_cli_sets_and_replaces_pod_settings(config: ConfigServer, keys_dir: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AGENTPLANE_TOKEN"}
    env.update(AGENTPLANE_KEYS_DIR=keys_dir, AGENTPLANE_CONFIG_ADDR=config.address)

    async def cli(*argv: str) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", *argv, "--output", "json",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, err.decode()
        result: dict[str, Any] = json.loads(out)
        return result

    added = await cli(
        "admin", "template", "add", "--name", "app", "--description", "an app", "--git", "https://h/app.git",
        "--image", "registry.example.com/ws:1", "--memory", "4Gi",
        "--egress", "140.82.112.0/20:443,22", "--egress", "2001:db8::/32",
    )  # fmt: skip
    assert _set(added["pod"]) == {
        "image": "registry.example.com/ws:1",
        "memory": "4Gi",
        "egress": [{"cidr": "140.82.112.0/20", "ports": [443, 22]}, {"cidr": "2001:db8::/32"}],
    }
    renamed = await cli("admin", "template", "update", added["id"], "--description", "still an app")
    assert renamed["pod"] == added["pod"]  # no pod flag: the pod settings stay
    replaced = await cli("admin", "template", "update", added["id"], "--cpu", "2")
    assert _set(replaced["pod"]) == {"cpu": "2"}  # any pod flag replaces them whole


def _set(value: Any) -> Any:
    """The fields that are set (the CLI's JSON prints empty ones too)."""
    if isinstance(value, dict):
        return {k: _set(v) for k, v in value.items() if v not in ("", [], None)}
    if isinstance(value, list):
        return [_set(v) for v in value]
    return value

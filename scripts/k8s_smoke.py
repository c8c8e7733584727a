"""Smoke test of a kubernetes workspace on a real cluster (docs/kubernetes.md, "Smoke test").

Runs commands in the workspace through toolexec's CallTool and checks what only a real cluster
enforces: the pod's user, its volume, no service account token, and the NetworkPolicies (no way
to the control plane's other services, the internet or the cloud metadata address).

    .venv/bin/python scripts/k8s_smoke.py WS_ID [--after-loss] [--user ID]

Reaches toolexec at AGENTPLANE_TOOLEXEC_ADDR (a port-forward) and mints a user token with the
issuer key of AGENTPLANE_KEYS_DIR; the workspace must belong to that user (default $USER).
Exit code 0 when every check passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import uuid

from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc

from services.common import auth
from services.common.client import create_channel
from services.common.settings import Settings

# A connection the NetworkPolicies drop times out (BLOCKED); a name that does not resolve or a
# refused connection is something else, and fails the check.
_PROBE = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4]
except OSError:
    sys.exit(print("NORESOLVE"))
try:
    socket.create_connection(address[:2], 3)
    print("OPEN")
except TimeoutError:
    print("BLOCKED")
except OSError as exc:
    print("ERROR", exc)
"""
_CONNECT = "python3 -c " + shlex.quote(_PROBE) + " {} {}"
# (what, command, what the output must contain).
CHECKS = [
    ("runs as uid 10001", "id -u", "10001"),
    ("writes its volume", "echo smoke > smoke.txt && cat smoke.txt", "smoke"),
    ("has no API token", "ls /var/run/secrets/kubernetes.io/serviceaccount 2>&1 || true", "No such file"),
    ("cannot reach config", _CONNECT.format("config.agentplane.svc", 50051), "BLOCKED"),
    ("cannot reach the internet", _CONNECT.format("1.1.1.1", 443), "BLOCKED"),
    ("cannot reach cloud metadata", _CONNECT.format("169.254.169.254", 80), "BLOCKED"),
]
AFTER_LOSS = [("kept its files after losing its pod", "cat smoke.txt", "smoke")]


async def run(workspace_id: str, checks: list[tuple[str, str, str]], user: str) -> int:
    settings = Settings.from_env(os.environ)
    token = auth.mint_token(settings.keys, user, auth.Role.USER, 600)
    channel = create_channel(settings.address("toolexec"), token=token)
    stub = toolexec_service_pb2_grpc.ToolExecServiceStub(channel)
    failed = 0
    try:
        for what, command, expected in checks:
            response = await stub.CallTool(
                toolexec_service_pb2.CallToolRequest(
                    workspace_id=workspace_id,
                    tool_call_id=f"smoke_{uuid.uuid4().hex[:12]}",
                    name="execute",
                    arguments_json=json.dumps({"command": command, "timeout_seconds": 20}),
                ),
                timeout=120,
            )
            output = json.loads(response.structured_json or "{}").get("output", response.content)
            ok = expected in output and not response.is_error
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {what}: {output.strip()[:200]!r}")
    finally:
        await channel.close()
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace_id")
    parser.add_argument(
        "--after-loss", action="store_true", help="check the file written before the pod was lost"
    )
    parser.add_argument("--user", default=os.environ.get("USER", "admin"))
    args = parser.parse_args()
    return asyncio.run(run(args.workspace_id, AFTER_LOSS if args.after_loss else CHECKS, args.user))


if __name__ == "__main__":
    sys.exit(main())

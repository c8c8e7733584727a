"""Workspace agent tokens: random, shown once, stored as a SHA-256 hash.

A token opens one thing: its workspace's agent connection (`WorkspaceAgentService.Connect`).
"""

from __future__ import annotations

import hashlib
import secrets
import shlex

TOKEN_PREFIX = "apw_"


def new_agent_token() -> str:
    """A fresh agent token (256 bits of randomness)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def agent_command(url: str, workspace_id: str, token: str) -> str:
    """The shell command that runs the agent anywhere (the token in the environment, not argv)."""
    return (
        f"AGENTPLANE_AGENT_TOKEN={shlex.quote(token)} agentplane workspace-agent "
        f"--url {shlex.quote(url)} --workspace {shlex.quote(workspace_id)} --root ."
    )

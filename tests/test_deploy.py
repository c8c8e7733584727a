"""The Kubernetes base gives each process only the secrets it needs (issue 11, least privilege)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

BASE = Path(__file__).resolve().parents[1] / "deploy" / "base"
# What each process may read from the deployment's secret, and nothing more.
NEEDS = {
    "config": {"DATABASE_URL", "REDIS_URL", "AGENTPLANE_ENCRYPTION_KEY"},
    "inference": {"REDIS_URL"},
    "toolexec": {"DATABASE_URL", "REDIS_URL"},
    "chat": {"DATABASE_URL", "REDIS_URL"},
    "migrate": {"DATABASE_URL"},
}


def _pods() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(BASE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in ("Deployment", "Job"):
                spec = doc["spec"]["template"]["spec"]
                found[spec["containers"][0]["name"]] = spec
    return found


def test_each_service_mounts_only_its_own_signing_key() -> None:
    for name, spec in _pods().items():
        mounted = [
            item["key"]
            for volume in spec.get("volumes", [])
            if volume.get("secret", {}).get("secretName") == "agentplane-keys"
            for item in volume["secret"]["items"]
        ]
        assert mounted == ([] if name == "migrate" else [f"{name}.pem"]), (name, mounted)
        env = {e["name"]: e.get("value") for e in spec["containers"][0].get("env", [])}
        if name != "migrate":
            assert env[f"AGENTPLANE_{name.upper()}_SIGNING_KEY_FILE"] == f"/keys/{name}.pem"
            assert env["AGENTPLANE_JWKS"] == "/jwks/jwks.json"
        # No process of the cluster holds the user issuer key (the operator does, or an OIDC provider).
        assert "users.pem" not in str(spec)


def _containers() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(BASE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in ("Deployment", "Job"):
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                found[container["name"]] = container
    return found


def test_each_process_gets_only_the_secrets_it_needs() -> None:
    containers = _containers()
    assert set(containers) == set(NEEDS)
    for name, container in containers.items():
        # No wholesale import of the secret: every key is named.
        assert all("secretRef" not in source for source in container.get("envFrom", [])), name
        keys = {
            e["valueFrom"]["secretKeyRef"]["key"]
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert keys == NEEDS[name], f"{name} reads {sorted(keys)}"

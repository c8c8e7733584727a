"""Render the deploy/ overlays and validate every object against the Kubernetes schemas.

`make k8s-validate` (part of `make check`). Rendering uses kubectl's built-in kustomize
(`kubectl kustomize`, v5 or newer; scripts/k8s-deps.sh installs kubectl), validation the
`kubernetes-validate` package, which bundles the schemas of every Kubernetes release (offline),
in strict mode: an unknown or misspelt field is an error, not a silently ignored line.
tests/test_deploy.py and tests/toolexec/test_k8s_driver.py use the same functions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ("dev", "prod")
# The oldest Kubernetes minor the manifests and the workspace driver's objects must be valid for.
KUBERNETES_VERSION = "1.30.0"


class RenderError(Exception):
    """kubectl is missing or too old, or kustomize refused an overlay; the message says which."""


def kustomize_version() -> str:
    """kubectl's built-in kustomize version, e.g. "v5.5.0"."""
    if shutil.which("kubectl") is None:
        raise RenderError("kubectl is not installed: run `make k8s-deps` (scripts/k8s-deps.sh)")
    out = subprocess.run(
        ["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True, check=False
    )
    try:
        return str(json.loads(out.stdout).get("kustomizeVersion", ""))
    except ValueError:
        raise RenderError(f"`kubectl version --client` failed: {out.stderr.strip()}") from None


def render(overlay: str) -> list[dict[str, Any]]:
    """Every object `kubectl apply -k deploy/overlays/<overlay>` would apply."""
    version = kustomize_version()
    if not version.startswith("v") or int(version[1:].split(".")[0]) < 5:
        raise RenderError(f"kubectl's kustomize is {version or 'unknown'}; deploy/ needs v5 (kubectl 1.27+)")
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RenderError(f"kustomize could not render deploy/overlays/{overlay}: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def schema_errors(obj: dict[str, Any], version: str = KUBERNETES_VERSION) -> str | None:
    """Why `obj` is not a valid object of its kind (strict: no unknown fields), or None."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        return f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}: {exc.message} (at {path or '/'})"
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
        return f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}: no schema: {exc}"
    return None


def main() -> int:
    failures = 0
    for overlay in OVERLAYS:
        try:
            objects = render(overlay)
        except RenderError as exc:
            print(f"k8s-validate: {exc}", file=sys.stderr)
            return 1
        errors = [e for e in (schema_errors(o) for o in objects) if e]
        for error in errors:
            print(f"k8s-validate: deploy/overlays/{overlay}: {error}", file=sys.stderr)
        failures += len(errors)
        print(f"k8s-validate: deploy/overlays/{overlay}: {len(objects)} objects, {len(errors)} invalid")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""toolexec's own settings, parsed once from the environment into a frozen dataclass.

The shared `Settings` cover ports, the database and the secret; these add where workspaces
live and the resource limits of the processes that tools start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.agent.processes import ProcessLimits
from services.common.settings import Settings, SettingsError, env_seconds
from services.toolexec.k8s_objects import KubernetesSettings


@dataclass(frozen=True)
class ToolexecSettings:
    """Where workspaces live and how their processes are bounded."""

    workspaces_dir: str
    limits: ProcessLimits = field(default_factory=ProcessLimits)
    # Finished background processes kept per workspace for process_output/process_list.
    max_finished_processes: int = 100
    instance_id: str = ""
    # Ledger commits wait for the WAL flush only when set. Off (the default), a commit is visible
    # to every session at once, so a toolexec crash loses nothing; only a crash of Postgres itself
    # can lose the last fraction of a second of ledger rows. On this hardware a flush costs ~2 ms.
    ledger_synchronous_commit: bool = False
    # Workspace agents: how they are sandboxed (local driver), which driver new workspaces use,
    # where other replicas and external agents reach this replica, and the bounded waits.
    sandbox: str = "auto"
    workspace_uid: int | None = None
    default_driver: str = "local"
    advertise_address: str = ""
    agent_url: str = ""
    heartbeat_seconds: float = 10.0
    offline_wait_seconds: float = 10.0
    reconnect_grace_seconds: float = 15.0
    # The kubernetes driver (on when it is the default driver): where and how workspace pods run.
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    kubeconfig: str = ""

    @classmethod
    def from_env(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> ToolexecSettings:
        """Read ``AGENTPLANE_WORKSPACES_DIR`` and ``AGENTPLANE_TOOLEXEC_*`` limits from `environ`."""
        env = os.environ if environ is None else environ
        workspaces_dir = (env.get("AGENTPLANE_WORKSPACES_DIR") or "").strip() or os.path.join(
            settings.data_dir, "workspaces"
        )
        limits = ProcessLimits(
            cpu_seconds=_int(env, "AGENTPLANE_TOOLEXEC_RLIMIT_CPU_SECONDS", ProcessLimits.cpu_seconds),
            file_size_bytes=_int(
                env, "AGENTPLANE_TOOLEXEC_RLIMIT_FILE_SIZE_BYTES", ProcessLimits.file_size_bytes
            ),
            open_files=_int(env, "AGENTPLANE_TOOLEXEC_RLIMIT_OPEN_FILES", ProcessLimits.open_files),
            processes=_int(env, "AGENTPLANE_TOOLEXEC_RLIMIT_PROCESSES", ProcessLimits.processes),
        )
        sync = (env.get("AGENTPLANE_TOOLEXEC_LEDGER_SYNCHRONOUS_COMMIT") or "").strip().lower()
        if sync not in ("", "0", "1", "true", "false", "on", "off"):
            raise SettingsError(
                f"AGENTPLANE_TOOLEXEC_LEDGER_SYNCHRONOUS_COMMIT must be on or off, got {sync!r}"
            )
        uid_raw = (env.get("AGENTPLANE_WORKSPACE_UID") or "").strip()
        return cls(
            workspaces_dir=os.path.abspath(workspaces_dir),
            limits=limits,
            ledger_synchronous_commit=sync in ("1", "true", "on"),
            sandbox=(env.get("AGENTPLANE_WORKSPACE_SANDBOX") or "auto").strip().lower(),
            workspace_uid=_int(env, "AGENTPLANE_WORKSPACE_UID", 0) if uid_raw else None,
            default_driver=(env.get("AGENTPLANE_WORKSPACE_DRIVER") or "local").strip(),
            advertise_address=(env.get("AGENTPLANE_TOOLEXEC_ADVERTISE_ADDR") or "").strip(),
            agent_url=(env.get("AGENTPLANE_AGENT_URL") or "").strip(),
            offline_wait_seconds=env_seconds(env, "AGENTPLANE_AGENT_OFFLINE_WAIT_SECONDS", 10.0),
            reconnect_grace_seconds=env_seconds(env, "AGENTPLANE_AGENT_RECONNECT_GRACE_SECONDS", 15.0),
            kubernetes=kubernetes_from_env(env),
            kubeconfig=(env.get("AGENTPLANE_K8S_KUBECONFIG") or "").strip(),
        )


def kubernetes_from_env(env: Mapping[str, str]) -> KubernetesSettings:
    """``AGENTPLANE_K8S_*`` (and the agent URL) over the defaults of `KubernetesSettings`."""
    d = KubernetesSettings()

    def text(name: str, default: str) -> str:
        return (env.get(name) or "").strip() or default

    return KubernetesSettings(
        namespace=text("AGENTPLANE_K8S_NAMESPACE", d.namespace),
        image=text("AGENTPLANE_K8S_WORKSPACE_IMAGE", d.image),
        agent_url=text("AGENTPLANE_AGENT_URL", d.agent_url),
        # Inside the cluster deploy/ passes the pod's own namespace (the downward API).
        toolexec_namespace=text(
            "AGENTPLANE_K8S_TOOLEXEC_NAMESPACE", text("POD_NAMESPACE", d.toolexec_namespace)
        ),
        agent_port=_int(env, "AGENTPLANE_K8S_AGENT_PORT", d.agent_port),
        service_account=text("AGENTPLANE_K8S_SERVICE_ACCOUNT", d.service_account),
        cpu=text("AGENTPLANE_K8S_WORKSPACE_CPU", d.cpu),
        memory=text("AGENTPLANE_K8S_WORKSPACE_MEMORY", d.memory),
        storage=text("AGENTPLANE_K8S_WORKSPACE_STORAGE", d.storage),
        storage_class=text("AGENTPLANE_K8S_WORKSPACE_STORAGE_CLASS", d.storage_class),
        start_timeout_seconds=env_seconds(
            env, "AGENTPLANE_K8S_START_TIMEOUT_SECONDS", d.start_timeout_seconds
        ),
    )


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise SettingsError(f"{name} must not be negative (0 keeps the inherited limit), got {value}")
    return value

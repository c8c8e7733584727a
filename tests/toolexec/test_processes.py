"""ProcessManager directly: configurable rlimits are applied to every command."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.agent.processes import ProcessManager
from services.toolexec.settings import ProcessLimits


async def test_configured_rlimits_apply(tmp_path: Path) -> None:
    limits = ProcessLimits(cpu_seconds=7, file_size_bytes=4096, open_files=64, processes=0)
    manager = ProcessManager(str(tmp_path / "records"), limits)
    try:
        proc = await manager.start(
            "ws", "ulimit -t; ulimit -n; ulimit -f; head -c 8192 /dev/zero > big", str(tmp_path), "."
        )
        await asyncio.wait_for(asyncio.gather(proc.exited.wait(), proc.eof.wait()), 10)
        lines = proc.render().text.splitlines()
        assert lines[:3] == ["7", "64", "8"]  # ulimit -f counts 512-byte blocks
        # Writing past the file-size limit fails (SIGXFSZ / EFBIG), and the file stops at 4 KiB.
        assert proc.exit_code != 0
        assert (tmp_path / "big").stat().st_size == 4096
    finally:
        await manager.close()

"""Network for a sandbox that may use it, without the host's: slirp4netns.

A sandbox always has its own network namespace. When its template asks for network access
(git fetches, package installs), slirp4netns gives that namespace a user-mode NAT to the
outside world, with the host's loopback disabled: 127.0.0.1 inside is the sandbox's own, and
nothing listening on the host's loopback (Postgres, Redis, toolexec, the other services) can
be reached. DNS goes through slirp's resolver (10.0.2.3). Debian's package is `slirp4netns`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil

SLIRP_DNS = "10.0.2.3"
READY_TIMEOUT_SECONDS = 10.0
RESOLV_CONF = f"nameserver {SLIRP_DNS}\n"
INSTALL_HINT = "install slirp4netns (Debian/Ubuntu: apt-get install slirp4netns)"


class NetworkUnavailable(Exception):
    """The sandbox may use the network, but there is no safe way to give it one here."""


def available() -> bool:
    """True when slirp4netns is installed."""
    return shutil.which("slirp4netns") is not None


def require() -> None:
    """Raise NetworkUnavailable (saying what to install) when slirp4netns is missing."""
    if not available():
        raise NetworkUnavailable(
            "this workspace's template asks for network access, which needs slirp4netns so the "
            f"sandbox gets the internet without the host's own network: {INSTALL_HINT}"
        )


async def read_child_pid(fd: int) -> int:
    """The sandbox's pid, from what bwrap writes to its --info-fd (the read end `fd` is closed)."""
    raw = b""
    try:
        # bwrap may write the JSON in pieces: read until it parses (or the pipe closes).
        while True:
            chunk = await asyncio.to_thread(os.read, fd, 4096)
            if not chunk:
                raise NetworkUnavailable("the sandbox exited before its network could be set up")
            raw += chunk
            try:
                return int(json.loads(raw)["child-pid"])
            except ValueError:
                continue
    finally:
        os.close(fd)


async def connect(child_pid: int, log_path: str) -> asyncio.subprocess.Process:
    """Start slirp4netns for the network namespace of `child_pid` (it outlives toolexec) and wait
    until the namespace's interface is configured."""
    ready_read, ready_write = os.pipe()
    argv = [
        "slirp4netns",
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        f"--ready-fd={ready_write}",
    ]
    if os.geteuid() != 0:
        argv += ["--userns-path", f"/proc/{child_pid}/ns/user"]
    argv += [str(child_pid), "tap0"]
    try:
        with open(log_path, "ab") as log:  # noqa: ASYNC230 (open for append: no wait)
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env={"PATH": os.defpath},
                pass_fds=(ready_write,),
            )
    finally:
        os.close(ready_write)
    try:
        # slirp4netns writes "1" once the interface is up, or closes the pipe when it fails.
        ready = await asyncio.wait_for(asyncio.to_thread(os.read, ready_read, 1), READY_TIMEOUT_SECONDS)
    except TimeoutError:
        ready = b""
    finally:
        os.close(ready_read)
    if ready != b"1":
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise NetworkUnavailable(f"slirp4netns could not set up the sandbox's network (see {log_path})")
    return proc

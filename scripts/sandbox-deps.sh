#!/bin/sh
# Make sure bubblewrap (`bwrap`), the local workspace sandbox, is installed.
# Installs Debian's `bubblewrap` package when it is missing and we can (root with apt-get);
# otherwise, or when the install fails, warns and exits 0: setup goes on without the sandbox.
# slirp4netns gives a workspace whose template asks for network access its own NAT (never the
# host's network).
command -v bwrap >/dev/null 2>&1 && command -v slirp4netns >/dev/null 2>&1 && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "sandbox-deps: installing bubblewrap and slirp4netns (workspace sandbox)"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { apt-get install -y -qq --no-install-recommends bubblewrap slirp4netns >/dev/null 2>&1; }
    # Try the package lists we have first; refresh them only when that fails.
    apt_install || { apt-get update -qq >/dev/null 2>&1 && apt_install; } || true
fi

if ! command -v bwrap >/dev/null 2>&1; then
    cat >&2 <<'MSG'
WARNING: bubblewrap (bwrap) is not installed: workspaces will NOT be sandboxed.
  Workspace code could see the control plane's files, processes and network.
  Install it with `sudo apt-get install bubblewrap` (Debian/Ubuntu) or your distribution's
  `bubblewrap` package, then run `make sandbox-deps` again.
MSG
fi
if ! command -v slirp4netns >/dev/null 2>&1; then
    echo "WARNING: slirp4netns is not installed: workspaces whose template asks for network access cannot be created (apt-get install slirp4netns)." >&2
fi
exit 0

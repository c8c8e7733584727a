#!/bin/sh
# Make sure kubectl is installed: `make k8s-validate` and tests/test_deploy.py render the kustomize
# overlays under deploy/ with its built-in kustomize (`kubectl kustomize`, kustomize v5: components
# and replacements). Installs the `kubectl` apt package when missing and we can (root with apt-get);
# otherwise says what to install and exits 0, so the commands that need it fail with that message.
command -v kubectl >/dev/null 2>&1 && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "k8s-deps: installing kubectl (renders the deploy/ overlays)"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { apt-get install -y -qq --no-install-recommends kubectl >/dev/null 2>&1; }
    # Try the package lists we have first; refresh them only when that fails.
    apt_install || { apt-get update -qq >/dev/null 2>&1 && apt_install; } || true
fi

if ! command -v kubectl >/dev/null 2>&1; then
    cat >&2 <<'MSG'
WARNING: kubectl is not installed: the deploy/ overlays cannot be rendered (make k8s-validate and
  tests/test_deploy.py fail). Install kubectl 1.27 or newer (it has kustomize v5 built in), e.g.
  `sudo apt-get install kubectl` from the Kubernetes package repository, then run `make k8s-deps`.
MSG
fi
exit 0

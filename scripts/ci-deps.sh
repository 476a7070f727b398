#!/usr/bin/env bash
# Tools the tests need beyond Rust: for the interop tests
# (tests/tests/interop.rs) Python grpcio as an independent gRPC client and
# Debian's Prometheus as an independent scraper of /metrics; for the chaos
# suite (tests/tests/chaos.rs) Debian's libfaketime, which steps the control
# plane's wall clock. Run as root (CI does, from .ci/run); idempotent:
# whatever is already installed is skipped silently.
set -euo pipefail

# Versions that install as wheels on CPython 3.11 x86_64.
PY_PACKAGES=(
    "grpcio==1.85.1"
    "grpcio-reflection==1.85.1"
    "grpcio-health-checking==1.85.1"
    "protobuf==7.36.2"
)
PYTHON="${PYTHON:-python3}"

# Exit 0 when every pinned distribution is installed at its pinned version.
python_deps_present() {
    "$PYTHON" - "${PY_PACKAGES[@]}" <<'EOF' 2>/dev/null
import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    if metadata.version(name) != version:
        sys.exit(1)
EOF
}

if ! python_deps_present; then
    echo "ci-deps: installing ${PY_PACKAGES[*]}"
    pip_flags=(--quiet --disable-pip-version-check --root-user-action=ignore --only-binary=:all:)
    # Debian's own python3 refuses pip installs (PEP 668) unless told to.
    if "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
        pip_flags+=(--break-system-packages)
    fi
    "$PYTHON" -m pip install "${pip_flags[@]}" "${PY_PACKAGES[@]}"
fi

DEBIAN_PACKAGES=()
[ -x /usr/bin/prometheus ] || DEBIAN_PACKAGES+=(prometheus)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || DEBIAN_PACKAGES+=(faketime)
if [ ${#DEBIAN_PACKAGES[@]} -gt 0 ]; then
    echo "ci-deps: installing Debian's ${DEBIAN_PACKAGES[*]}"
    # Keep the prometheus package's init script from starting a daemon on :9090.
    if ! [ -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${DEBIAN_PACKAGES[@]}" >/dev/null
fi

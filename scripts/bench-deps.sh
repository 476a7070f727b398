#!/usr/bin/env bash
# Peers the benchmarks measure hotswap beside (BENCHMARKS.md): Debian's
# etcd-server. Run as root; idempotent. The package's service is kept from
# starting: the benchmarks start etcd themselves, on loopback, in temp dirs.
set -euo pipefail

if ! [ -x /usr/bin/etcd ]; then
    echo "bench-deps: installing Debian's etcd-server"
    if ! [ -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
fi

#!/usr/bin/env bash
# make bench: every benchmark of BENCHMARKS.md, one after another, each result
# (one JSON object) in target/bench/<name>.json and its progress in .err.
# Needs a quiet machine (watch `vmstat 1`, column st) and, for the etcd
# comparisons, scripts/bench-deps.sh run as root. About 45 minutes.
# BENCH=<name> runs one; BENCH_AGENTS overrides the fleet size (10000).
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
out=target/bench
mkdir -p "$out"
agents=${BENCH_AGENTS:-10000}
bench=./target/release/hotswap-bench
declare -A runs=(
    [fleet]="$bench fleet --agents $agents --window-s 30"
    [ingest]="$bench fleet --agents 2000 --report-every 100ms --window-s 30 --no-restart"
    [soak]="$bench fleet --agents $agents --window-s 30 --soak-s 600 --no-restart"
    [fanout]="$bench fanout --agents $agents --size-kib 64 --runs 3"
    [etcd-leases]="$bench etcd-leases --streams 5000 --window-s 30"
    [etcd-fanout]="$bench etcd-fanout --watchers $agents --value-kib 64 --runs 3"
    [restart]="./target/release/hotswap-bench-restart --nodes 100000 --events 100000 --runs 6"
    [decision]="./target/release/hotswap-bench-decision --nodes $agents --runs 3"
    [failover]="$bench failover --agents 1000 --runs 5"
    [capacity]="$bench capacity --agents 50000 --replicas 3 --window-s 30"
    [artifact]="$bench artifact --agents 1000 --runs 3"
    [swap]="$bench swap --swaps 1000 --runtime both"
)
order=(fleet ingest restart fanout etcd-fanout etcd-leases decision failover capacity artifact swap soak)
[ -n "${BENCH:-}" ] && order=("$BENCH")
status=0
for name in "${order[@]}"; do
    cmd=${runs[$name]:-}
    [ -n "$cmd" ] || { echo "unknown benchmark $name (one of: ${order[*]})"; exit 2; }
    echo "bench $name: $cmd"
    if $cmd >"$out/$name.json" 2>"$out/$name.err"; then
        echo "bench $name: done, $out/$name.json"
    else
        echo "bench $name: FAILED, see $out/$name.err"
        status=1
    fi
done
exit $status

#!/usr/bin/env python3
"""Split a control plane's live heap into the pieces a connected agent costs.

Input: the "leaked" flame graph heaptrack writes for a control plane that was
killed while its agents were connected (so what is live is what the sessions
hold), demangled:

    heaptrack_print -f heaptrack.zst --print-peaks 0 --print-allocators 0 \
        --print-temporary 0 --print-leaks 0 \
        --flamegraph-cost-type leaked -F leaked.txt
    sed -E 's/ \\([^)]*\\)//g' leaked.txt | c++filt > leaked-demangled.txt
    scripts/heap-breakdown.py leaked-demangled.txt AGENTS

Each allocation stack goes to the first bucket whose markers all appear in it;
the buckets are ordered so that the more specific come first. The figures are
bytes allocated and still live, not resident: a buffer allocated at its full
capacity and only partly written costs less RSS than it shows here.
"""

import collections
import sys

BUCKETS = [
    ("session: report history ring", ["VecDeque", "with_capacity", "Registry::attach"]),
    ("sled: page cache and fixed tables", ["sled::"]),
    ("registry: node state", ["registry::"]),
    ("h2: connection write buffer (FramedWrite, 16 KiB fixed)", ["FramedWrite", "::new"]),
    ("h2: read buffer (tokio-util FramedRead, 8 KiB initial)", ["ReadFrame"]),
    ("h2: frame decoder and HPACK", ["FrameDecoder"]),
    ("session: outbound channel (tokio mpsc block)", ["mpsc", "SessionService"]),
    ("session: driver task (tokio task cell)", ["SessionService", "task::core::Cell$LT$T$C$S$GT$::new"]),
    ("tonic: stream decode buffer", ["Streaming$LT$T$GT$::new"]),
    ("tonic: stream encode buffer", ["tonic::codec::encode"]),
    ("rustls: deframer buffer", ["DeframerVecBuffer"]),
    ("rustls: record keys, certificates, state", ["rustls"]),
    ("h2: streams (slab)", ["slab", "h2::"]),
    ("h2: other", ["h2::"]),
    ("hyper", ["hyper::"]),
    ("tokio task cells: connection and stream tasks", ["task::core::Cell$LT$T$C$S$GT$::new"]),
    ("tonic: other", ["tonic::"]),
    ("session: other", ["session::"]),
    ("hotswap: other", ["hotswap_"]),
]


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} LEAKED_DEMANGLED.txt AGENTS")
    path = sys.argv[1]
    try:
        agents = int(sys.argv[2])
    except ValueError:
        agents = 0
    if agents <= 0:
        sys.exit(f"AGENTS must be a positive whole number, not {sys.argv[2]!r}")
    totals = collections.Counter()
    try:
        lines = open(path, encoding="utf-8", errors="replace")
    except OSError as error:
        sys.exit(f"cannot read the flame graph {path}: {error.strerror}")
    with lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            try:
                size = int(count)
            except ValueError:
                continue
            for name, markers in BUCKETS:
                if all(marker in stack for marker in markers):
                    totals[name] += size
                    break
            else:
                totals["other"] += size
    whole = sum(totals.values())
    print(f"{'MiB':>8} {'KiB/agent':>10}  bucket")
    for name, size in totals.most_common():
        print(f"{size / 2**20:8.2f} {size / 1024 / agents:10.2f}  {name}")
    print(f"{whole / 2**20:8.2f} {whole / 1024 / agents:10.2f}  all live heap")


if __name__ == "__main__":
    main()

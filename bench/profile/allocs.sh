#!/bin/bash
# Allocations per connection (or round trip) of our proxy under a tester-go
# load, by call and size: uprobes on libc's malloc, posix_memalign,
# realloc and calloc (perf probe), counted over a short run.
#
#   bench/profile/allocs.sh BIN MODE LOAD [DURATION]
#
# e.g. bench/profile/allocs.sh target/release/proxy auto churn 2s
# Needs root (uprobes). The probes are removed at the end.
set -euo pipefail
BIN=$(realpath "$1") MODE=$2 LOAD=$3 DURATION=${4:-2s}
# shellcheck source=bench/profile/setup.sh
source "$(dirname "$0")/setup.sh"
LIBC=$(ldd "$BIN" | awk '/libc.so/ {print $3}')
perf probe -q -d 'probe_libc:*' 2>/dev/null || true
perf probe -q -x "$LIBC" 'malloc bytes=%di:u64'
perf probe -q -x "$LIBC" 'posix_memalign align=%si:u64 bytes=%dx:u64'
perf probe -q -x "$LIBC" 'realloc bytes=%si:u64'
perf probe -q -x "$LIBC" 'calloc n=%di:u64 bytes=%si:u64'
trap 'perf probe -q -d "probe_libc:*" 2>/dev/null; kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
start_ours "$BIN" "$MODE" "$PPORT"
PID=$STARTED
sleep 1
perf record -q -e 'probe_libc:*' -p $PID -o "$WORK/perf.data" >/dev/null 2>&1 &
PERF=$!
sleep 0.5
"$TESTER" bench --target 127.0.0.1:$PPORT --load "$LOAD" --duration "$DURATION" --json > "$WORK/out.json"
kill -INT $PERF
wait $PERF || true
perf script -i "$WORK/perf.data" -F event,trace 2>/dev/null | python3 -c '
import collections, json, sys
d = json.load(open(sys.argv[1]))
n = d["conns"] if d["load"] in ("churn", "connrate") else int(d["verified"].split()[0])
unit = "connection" if d["load"] in ("churn", "connrate") else "round trip"
calls, sizes = collections.Counter(), collections.Counter()
for line in sys.stdin:
    parts = line.split()
    call = parts[0].rstrip(":").split(":")[-1]
    calls[call] += 1
    sizes[(call, " ".join(p for p in parts[1:] if not p.startswith("(")))] += 1
print(f"{n} {unit}s")
for call, k in calls.most_common():
    print(f"{k / n:7.2f} {call} per {unit}")
for (call, args), k in sizes.most_common(20):
    print(f"{k / n:7.2f} {call} {args}")
' "$WORK/out.json"

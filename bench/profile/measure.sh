#!/bin/bash
# Per-connection costs of one proxy binary under one tester-go load, the
# way the figures in NOTES.md §8 were taken.
#
#   bench/profile/measure.sh cpu   BIN MODE LOAD [STREAMS] [DURATION]
#       proxy CPU per connection (churn), per round trip (pingpong) or per
#       GB (bulk, bidi), and KiB per held connection (idle)
#   bench/profile/measure.sh calls BIN MODE LOAD
#       syscalls per connection: strace -c over a short load (slow, so only
#       the counts mean anything, not the rate)
#   bench/profile/measure.sh flame BIN MODE LOAD OUT.svg
#       perf record (DWARF call graphs) of the proxy, folded and drawn
#       with inferno (installed with `cargo install inferno` if missing)
#
# BIN is a proxy binary (e.g. target/release/proxy, or a copy of an older
# build to compare against); MODE is --mode; LOAD is a tester-go bench load
# (connrate, churn, pingpong, bulk, bidi, idle). Loopback only; every port is
# picked by the kernel.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TESTER=$ROOT/target/tester-go
[ -x "$TESTER" ] || { echo "build first: cargo xtask build" >&2; exit 2; }
WHAT=$1 BIN=$2 MODE=$3 LOAD=$4
shift 4
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BPORT=$(free_port) PPORT=$(free_port)
"$TESTER" backends --listen 127.0.0.1:$BPORT --kind bench --duration 120s >/dev/null 2>&1 &
echo "{\"Apps\":[{\"Name\":\"bench\",\"Ports\":[$PPORT],\"Targets\":[\"127.0.0.1:$BPORT\"]}]}" > "$WORK/config.json"
# Logs go nowhere but are still formatted: the close line is part of the
# cost. PROXY_FLAGS adds flags (the bench runs ours with --log-level warn).
# shellcheck disable=SC2086
env -u RUST_BACKTRACE "$BIN" --config "$WORK/config.json" --mode "$MODE" --listen-address 127.0.0.1 ${PROXY_FLAGS:-} 2>/dev/null &
PROXY=$!
sleep 0.7

case $WHAT in
cpu)
    STREAMS=${1:-50} DURATION=${2:-4s}
    "$TESTER" bench --target 127.0.0.1:$PPORT --load "$LOAD" --streams "$STREAMS" \
        --duration "$DURATION" --proxy-pid $PROXY --json > "$WORK/out.json"
    python3 - "$WORK/out.json" "$BIN" "$MODE" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
load, cpu = d["load"], d.get("proxy_cpu_s", 0)
if load in ("connrate", "churn"):
    per = f"{1e6 * cpu / d['conns']:.1f} µs CPU/connection, {d['conns'] / d['seconds']:.0f} conn/s"
elif load == "pingpong":
    n = int(d["verified"].split()[0])
    per = f"{1e6 * cpu / n:.1f} µs CPU/round trip, {n / d['seconds']:.0f} round trips/s"
elif load == "idle":
    per = f"{d['proxy_kib_per_conn']:.1f} KiB/connection held"
else:
    gb = d["bytes"] / 1e9
    per = f"{cpu / gb:.3f} s CPU/GB, {gb / d['seconds']:.2f} GB/s"
print(f"{sys.argv[2]} --mode {sys.argv[3]} {load}: {per}, errors {d['errors']}")
PY
    ;;
calls)
    strace -c -f -p $PROXY -o "$WORK/strace.txt" &
    STRACE=$!
    sleep 0.5
    "$TESTER" bench --target 127.0.0.1:$PPORT --load "$LOAD" --streams 8 --duration 3s --json > "$WORK/out.json"
    sleep 0.5
    kill -INT $STRACE
    wait $STRACE || true
    python3 - "$WORK/out.json" "$WORK/strace.txt" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
n = d["conns"] if d["load"] in ("connrate", "churn") else int(d["verified"].split()[0])
unit = "connection" if d["load"] in ("connrate", "churn") else "round trip"
rows = [l.split() for l in open(sys.argv[2]) if l.strip() and l.split()[0][0].isdigit()]
total = 0
for r in rows:
    calls, name = int(r[3]), r[-1]
    if name == "total":
        total = calls
        continue
    if calls / n >= 0.05:
        print(f"  {name:14} {calls / n:6.2f} per {unit}")
print(f"  {'total':14} {total / n:6.2f} per {unit} ({n} {unit}s)")
PY
    ;;
flame)
    OUT=$1
    command -v inferno-flamegraph >/dev/null || cargo install inferno --locked
    perf record -F 999 --call-graph dwarf,16384 -p $PROXY -o "$WORK/perf.data" -- sleep 6 >/dev/null 2>&1 &
    PERF=$!
    "$TESTER" bench --target 127.0.0.1:$PPORT --load "$LOAD" --streams 50 --duration 5s >/dev/null
    wait $PERF || true
    perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf > "${OUT%.svg}.folded"
    inferno-flamegraph --minwidth 0.2 --title "$(basename "$BIN") --mode $MODE, $LOAD" < "${OUT%.svg}.folded" > "$OUT"
    echo "wrote $OUT and ${OUT%.svg}.folded"
    ;;
*) echo "usage: see the head of $0" >&2; exit 2 ;;
esac

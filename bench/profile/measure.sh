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
#   bench/profile/measure.sh faults BIN MODE LOAD OUT.folded
#       page-fault profile of the proxy (perf, DWARF call graphs), folded,
#       with KiB per connection per allocation site (idle, idle-mostly)
#   bench/profile/measure.sh flame BIN MODE LOAD OUT.svg
#       perf record (DWARF call graphs) of the proxy, folded and drawn
#       with inferno (installed with `cargo install inferno` if missing)
#
# BIN is a proxy binary (e.g. target/release/proxy, or a copy of an older
# build to compare against); MODE is --mode; LOAD is a tester-go bench load
# (connrate, churn, pingpong, bulk, bidi, idle). Loopback only; every port is
# picked by the kernel.
set -euo pipefail
WHAT=$1 BIN=$2 MODE=$3 LOAD=$4
shift 4
# shellcheck source=bench/profile/setup.sh
source "$(dirname "$0")/setup.sh"
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
elif load == "rr50":
    n = int(d["verified"].split()[0])
    per = (f"{1e6 * cpu / n:.1f} µs CPU/request, {n / d['seconds']:.0f} req/s, "
           f"p99 {d['latency']['p99_us']:.0f} µs")
elif load == "pingpong":
    n = int(d["verified"].split()[0])
    per = f"{1e6 * cpu / n:.1f} µs CPU/round trip, {n / d['seconds']:.0f} round trips/s"
elif load == "idle":
    per = f"{d['proxy_kib_per_conn']:.1f} KiB/connection held"
elif load == "idle-mostly":
    per = (f"{d['proxy_kib_per_conn']:.1f} KiB/connection held, "
           f"{d.get('proxy_cpu_us_per_conn_s', 0):.1f} µs CPU/connection/s")
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
    python3 "$(dirname "$0")/syscalls.py" "$WORK/out.json" "$WORK/strace.txt"
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
faults)
    # Where the proxy's memory comes from: every page fault it takes while
    # the load runs (first touch of a heap page), with the call stack that
    # touched it, folded per stack and summed per allocation site.
    OUT=$1
    command -v inferno-collapse-perf >/dev/null || cargo install inferno --locked
    perf record -e page-faults -c 1 --call-graph dwarf,16384 -p $PROXY -o "$WORK/perf.data" >/dev/null 2>&1 &
    PERF=$!
    sleep 0.3
    "$TESTER" bench --target 127.0.0.1:$PPORT --load "$LOAD" --streams 50 --duration 12s --proxy-pid $PROXY --json > "$WORK/out.json"
    kill -INT $PERF
    wait $PERF || true
    perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf > "$OUT"
    python3 - "$OUT" "$WORK/out.json" <<'PY'
import collections, json, re, sys
d = json.load(open(sys.argv[2]))
conns = d.get("conns") or 1
sites, total = collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, n = line.rstrip().rsplit(" ", 1)
    ours = [re.sub(r"<[^<>]*>", "", f)[:70] for f in stack.split(";") if "proxy_user" in f or "tokio::" in f]
    sites[" ; ".join(ours[-3:])] += int(n)
    total += int(n)
print(f"{total} pages faulted in, {4 * total / conns:.2f} KiB per connection "
      f"(RSS: {d.get('proxy_kib_per_conn', 0):.2f} KiB per connection, {conns} connections)")
for site, n in sites.most_common(12):
    print(f"{4 * n / conns:7.2f} KiB/conn  {site}")
PY
    ;;
*) echo "usage: see the head of $0" >&2; exit 2 ;;
esac

#!/bin/bash
# Per-connection costs of our proxy next to the bench's peers, under the
# same tester-go load, configured as `cargo xtask bench` configures them
# (xtask/src/bench_peers.rs; ours with --log-level warn like the bench).
#
#   bench/profile/peers.sh cpu   ENDPOINT LOAD [DURATION]
#       conn/s (churn, connrate), MB/s (bulk, bidi, parallel) or round trips/s
#       (pingpong, rr50), or KiB per held connection (idle, idle-mostly:
#       the endpoint's first process; not nginx's workers), the
#       latency percentiles, and CPU per connection or round trip of every
#       process of the endpoint (nginx: master and workers); then the
#       machine's busy CPU per unit split into the endpoint's user and
#       system time and the rest (client, backend), and the rate the
#       endpoint would reach with no user time (NOTES.md §2, "The
#       machine's ceiling")
#   bench/profile/peers.sh samples ENDPOINT LOAD [DURATION]
#       the endpoint's CPU per connection or round trip in user and in
#       kernel mode, from perf samples at 4,999 Hz: finer than `cpu`'s
#       split, which /proc counts in 10 ms ticks (the kernel share includes
#       softirq work perf finds on the endpoint's threads)
#   bench/profile/peers.sh calls ENDPOINT LOAD
#       syscalls per connection, MB or round trip: strace -c -f over a short
#       load (strace slows it, so only the counts mean anything)
#
# ENDPOINT: haproxy, nginx, or BIN:MODE for one of ours (e.g.
# target/release/proxy:splice, /tmp/proxy-main:auto). Extra flags for ours
# go in PROXY_FLAGS. Loopback only; every port is picked by the kernel.
set -euo pipefail
WHAT=$1 ENDPOINT=$2 LOAD=$3
shift 3
# shellcheck source=bench/profile/setup.sh
source "$(dirname "$0")/setup.sh"

case $ENDPOINT in
haproxy) start_haproxy "$PPORT" ;;
nginx) start_nginx "$PPORT" ;;
*:*) start_ours "${ENDPOINT%:*}" "${ENDPOINT##*:}" "$PPORT" ;;
*) echo "ENDPOINT: haproxy, nginx or BIN:MODE" >&2; exit 2 ;;
esac
PID=$STARTED
sleep 0.8
# The pid tester-go reads, and the rest of the endpoint's processes.
MORE=$(pgrep -P $PID | paste -sd, || true)

case $WHAT in
cpu)
    DURATION=${1:-4s}
    # User and system CPU seconds of the endpoint's processes, and the
    # machine's busy and total CPU seconds (every core, from /proc/stat).
    cpu() { for p in $PID ${MORE//,/ }; do cut -d' ' -f14,15 /proc/$p/stat; done | awk '{u+=$1; s+=$2} END {print u/100, s/100}'; }
    machine() { awk '/^cpu / {print ($2+$3+$4+$7+$8+$9)/100, ($2+$3+$4+$5+$6+$7+$8+$9)/100}' /proc/stat; }
    # Context switches of every thread: wakeups cost CPU, and on a quiet
    # machine that is most of the difference between runtimes.
    csw() { for p in $PID ${MORE//,/ }; do cat /proc/$p/task/*/status; done 2>/dev/null | awk '/ctxt_switches/ {s+=$2} END {print s}'; }
    C0=$(cpu) S0=$(csw) M0=$(machine)
    # The endpoint's first process is read for memory (HAProxy and ours
    # are one process; nginx's workers are not counted that way).
    "$TESTER" bench --target 127.0.0.1:$PPORT --load "$LOAD" --duration "$DURATION" --proxy-pid $PID ${BENCH_FLAGS:-} --json > "$WORK/out.json"
    C1=$(cpu) S1=$(csw) M1=$(machine)
    python3 - "$WORK/out.json" "$ENDPOINT" "$C0" "$C1" "$S0" "$S1" "$M0" "$M1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
diff = lambda a, b: [float(y) - float(x) for x, y in zip(sys.argv[a].split(), sys.argv[b].split())]
(user, system), (busy, total) = diff(3, 4), diff(7, 8)
load, cpu = d["load"], user + system
lat = d.get("latency") or {}
p = lambda k: lat.get(k, 0)
if load in ("idle", "idle-mostly"):
    # Memory held, not a rate: the RSS of the endpoint's first process per
    # held connection (nginx's workers are not read: take nginx's figure
    # from `cargo xtask bench`, which adds them).
    print(f"{sys.argv[2]:28} {load:8} {d.get('proxy_kib_per_conn', 0):6.2f} KiB per held connection, "
          f"CPU {d.get('proxy_cpu_us_per_conn_s', 0):5.1f} us per connection per second, errors {d['errors']}")
    sys.exit(0)
if load in ("churn", "connrate"):
    n, unit = d["conns"], "conn"
elif load in ("bulk", "bidi", "parallel"):
    # Per MB: a GB is more than a short run moves, and the µs read best.
    n, unit = d["bytes"] / 1e6, "MB"
else:
    n, unit = int(d["verified"].split()[0]), "rt"
print(f"{sys.argv[2]:28} {load:8} {n / d['seconds']:8.0f} {unit}/s  "
      f"p50 {p('p50_us'):6.1f} p99 {p('p99_us'):7.1f} p99.9 {p('p99_9_us'):7.1f} us  "
      f"CPU {1e6 * cpu / n:6.1f} us/{unit}  csw {(int(sys.argv[6]) - int(sys.argv[5])) / n:5.2f}/{unit}  errors {d['errors']}")
# The ceiling the machine sets: when it is busy, every unit costs the
# client, the backend and the endpoint their CPU. An endpoint that spent
# nothing in userspace (only its own syscalls' kernel time) would reach at
# most the busy CPU divided by what is left per unit.
rest = busy - cpu
print(f"{'':28} machine {100 * busy / total:3.0f}% busy: {1e6 * busy / n:6.1f} us/{unit} in all, "
      f"the rest (client, backend) {1e6 * rest / n:6.1f}, the endpoint's user {1e6 * user / n:5.1f} "
      f"and system {1e6 * system / n:5.1f}; at zero user time: at most {n / d['seconds'] * busy / (rest + system):6.0f} {unit}/s")
PY
    ;;
samples)
    # CPU of the endpoint's processes sampled by perf at 4,999 Hz, split
    # into user and kernel mode, per connection or round trip. Finer than
    # `cpu`'s user/system split, which /proc counts in 10 ms ticks: a few
    # seconds of a proxy's user time are a few dozen ticks.
    perf record -F 4999 -p "$PID${MORE:+,$MORE}" -o "$WORK/perf.data" >/dev/null 2>&1 &
    PERF=$!
    sleep 0.3
    "$TESTER" bench --target 127.0.0.1:$PPORT --load "$LOAD" --duration "${1:-5s}" ${BENCH_FLAGS:-} --json > "$WORK/out.json"
    kill -INT $PERF
    wait $PERF || true
    python3 "$(dirname "$0")/samples.py" "$WORK/out.json" "$ENDPOINT" "$WORK/perf.data"
    ;;
calls)
    # shellcheck disable=SC2046
    strace -c -f $(for p in $PID ${MORE//,/ }; do echo -p $p; done) -o "$WORK/strace.txt" &
    STRACE=$!
    sleep 0.5
    "$TESTER" bench --target 127.0.0.1:$PPORT --load "$LOAD" --duration 3s --json > "$WORK/out.json"
    sleep 0.5
    kill -INT $STRACE
    wait $STRACE || true
    python3 "$(dirname "$0")/syscalls.py" "$WORK/out.json" "$WORK/strace.txt" "$ENDPOINT"
    ;;
*) echo "usage: see the head of $0" >&2; exit 2 ;;
esac

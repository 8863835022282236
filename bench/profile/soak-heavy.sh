#!/bin/bash
# Runs the heavy test binary (1 GiB echoes and 1,000 connections, every
# plane at once) RUNS times in a row, and keeps what a frozen run looks
# like: once a run passes STALL seconds, the kernel's view of every TCP
# socket (ss -tmeipn: queues, buffers, drops, timers, windows) and the
# TCP counters (nstat) go to OUT/stallN/. A failed or slow run's output
# is kept as OUT/failN.log. This is how the window-retraction wedge in
# NOTES.md §2 ("Socket buffers on the fastpath") was caught.
#
#   bench/profile/soak-heavy.sh [RUNS] [OUT] [STALL]    (defaults: 100 /tmp/soak 45)
set -uo pipefail
RUNS=${1:-100} OUT=${2:-/tmp/soak} STALL=${3:-45}
cd "$(dirname "$0")/../.." || exit 2
mkdir -p "$OUT"
cargo test --release -p proxy-user --test heavy --no-run >/dev/null 2>&1 || { echo "build failed" >&2; exit 2; }
for i in $(seq 1 "$RUNS"); do
    start=$(date +%s)
    PROXY_TEST_KEEP_LOGS=1 timeout 500 cargo test --release -p proxy-user --test heavy > "$OUT/run.log" 2>&1 &
    pid=$!
    dumped=0
    while kill -0 $pid 2>/dev/null; do
        sleep 2
        if [ $(( $(date +%s) - start )) -gt "$STALL" ] && [ $dumped -eq 0 ]; then
            mkdir -p "$OUT/stall$i"
            ss -tmeipn > "$OUT/stall$i/ss.txt" 2>&1
            nstat -az > "$OUT/stall$i/nstat.txt" 2>&1
            dumped=1
        fi
    done
    wait $pid
    rc=$?
    took=$(( $(date +%s) - start ))
    if [ $rc -ne 0 ] || [ $dumped -eq 1 ]; then
        cp "$OUT/run.log" "$OUT/fail$i.log"
    else
        # Passing runs keep no proxy logs.
        grep -o 'proxy log kept at [^ ]*' "$OUT/run.log" | awk '{print $5}' | xargs -r rm -f
    fi
    echo "run $i: exit $rc, ${took}s$([ $dumped -eq 1 ] && echo ", past ${STALL}s: state in $OUT/stall$i")" | tee -a "$OUT/summary"
done

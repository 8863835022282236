#!/bin/bash
# Two builds of our proxy under the same tester-go load at the same time,
# each with its own client, sharing one bench backend: whatever else the
# machine does in those seconds (this one is a VM whose neighbours move
# any one endpoint's rate by 10-15% between runs) lands on both, so their
# CPU per connection or round trip compares where two runs in turn do not.
#
#   bench/profile/pair.sh BIN_A BIN_B MODE LOAD [DURATION]
#
# Prints, for each build, its rate and its CPU per connection or round
# trip in user and in kernel mode, from perf samples at 4,999 Hz (as
# `peers.sh samples`). Each gets about half the machine, so the rates are
# not the bench's; swap A and B between runs. Loopback only; every port is
# picked by the kernel.
set -euo pipefail
A=$1 B=$2 MODE=$3 LOAD=$4 DURATION=${5:-5s}
# shellcheck source=bench/profile/setup.sh
source "$(dirname "$0")/setup.sh"
PORTS=("$PPORT" "$(free_port)")
BINS=("$A" "$B")
for i in 0 1; do
    echo "{\"Apps\":[{\"Name\":\"bench\",\"Ports\":[${PORTS[i]}],\"Targets\":[\"127.0.0.1:$BPORT\"]}]}" > "$WORK/config$i.json"
    env -u RUST_BACKTRACE "${BINS[i]}" --config "$WORK/config$i.json" --mode "$MODE" \
        --listen-address 127.0.0.1 --log-level warn 2>/dev/null &
    echo $! > "$WORK/proxy$i"
done
sleep 0.8
for i in 0 1; do
    perf record -F 4999 -p "$(cat "$WORK/proxy$i")" -o "$WORK/perf$i.data" >/dev/null 2>&1 &
    echo $! > "$WORK/perf$i"
done
sleep 0.3
for i in 0 1; do
    "$TESTER" bench --target 127.0.0.1:"${PORTS[i]}" --load "$LOAD" --duration "$DURATION" --json > "$WORK/out$i.json" &
    echo $! > "$WORK/client$i"
done
wait "$(cat "$WORK/client0")" "$(cat "$WORK/client1")"
for i in 0 1; do
    kill -INT "$(cat "$WORK/perf$i")"
    wait "$(cat "$WORK/perf$i")" || true
    python3 "$(dirname "$0")/samples.py" "$WORK/out$i.json" "${BINS[i]}:$MODE" "$WORK/perf$i.data"
done

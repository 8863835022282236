#!/bin/bash
# Does the place in the interleaved order decide a result? The bench runs
# its endpoints in a fixed order (reversed on odd rounds), so one endpoint
# always follows `direct`, the fastest and the one that leaves the most
# TIME_WAIT sockets towards the shared backend. Here each of auto, HAProxy
# and nginx takes its turn right after `direct`, in forward-only rounds of
# `tester-go compare` (three orders, twice), and every result is printed.
#
#   bench/profile/order.sh [LOAD] [BIN]     (default: churn, target/release/proxy)
set -euo pipefail
LOAD=${1:-churn}
BIN=$(realpath "${2:-target/release/proxy}")
# shellcheck source=bench/profile/setup.sh
source "$(dirname "$0")/setup.sh"
A=$(free_port) H=$(free_port) N=$(free_port)
start_ours "$BIN" auto "$A"
AP=$STARTED
start_haproxy "$H"
HP=$STARTED
start_nginx "$N"
NP=$STARTED
sleep 1
EA="auto=127.0.0.1:$A,pid=$AP" EH="haproxy=127.0.0.1:$H,pid=$HP,role=peer" EN="nginx=127.0.0.1:$N,pid=$NP,role=peer"
for _ in 1 2; do
    for order in "$EA $EH $EN" "$EH $EN $EA" "$EN $EA $EH"; do
        args=()
        for e in $order; do args+=(--endpoint "$e"); done
        "$TESTER" compare -q --loads "$LOAD" --rounds 1 --duration 3s \
            --endpoint "direct=127.0.0.1:$BPORT" "${args[@]}" --json "$WORK/o.json" >/dev/null 2>&1
        python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
rate = lambda x: round(x["runs"][0]["conns"] / x["runs"][0]["seconds"])
print("  ".join(x["endpoint"] + "=" + str(rate(x)) for x in d["results"]))
' "$WORK/o.json"
    done
done

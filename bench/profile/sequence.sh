#!/bin/bash
# Several loads in a row against one process of ours, as `cargo xtask
# bench` runs them (one proxy per round, every load in turn), where
# peers.sh starts a fresh process per load: for a number that may depend on
# what the process carried before.
#
#   bench/profile/sequence.sh BIN MODE LOAD...
#       e.g. bench/profile/sequence.sh target/release/proxy auto bidi idle-mostly bidi
#       one line per load: MB/s (bulk, bidi), KiB per held connection
#       (idle, idle-mostly), conn/s (churn, connrate) or round trips/s,
#       and the proxy's CPU seconds during it. 3 s per load (idle-mostly
#       holds its connections 8 s, or HOLD_FOR: the bench holds them 15 s,
#       long enough for auto to promote them); extra proxy flags go in
#       PROXY_FLAGS.
set -euo pipefail
BIN=$1 MODE=$2
shift 2
# shellcheck source=bench/profile/setup.sh
source "$(dirname "$0")/setup.sh"

echo "{\"Apps\":[{\"Name\":\"bench\",\"Ports\":[$PPORT],\"Targets\":[\"127.0.0.1:$BPORT\"]}]}" > "$WORK/config.json"
# shellcheck disable=SC2086
env -u RUST_BACKTRACE "$BIN" --config "$WORK/config.json" --mode "$MODE" \
    --listen-address 127.0.0.1 --log-level warn ${PROXY_FLAGS:-} 2>/dev/null &
PID=$!
sleep 0.8
for LOAD in "$@"; do
    HOLD=()
    case $LOAD in idle | idle-mostly) HOLD=(--hold "${HOLD_FOR:-8s}") ;; esac
    "$TESTER" bench --target 127.0.0.1:$PPORT --load "$LOAD" --duration 3s \
        --proxy-pid $PID "${HOLD[@]}" --json > "$WORK/out.json"
    python3 - "$WORK/out.json" "$BIN:$MODE" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
load = d["load"]
if load in ("idle", "idle-mostly"):
    value = f"{d.get('proxy_kib_per_conn', 0):8.2f} KiB per held connection"
elif load in ("bulk", "bidi", "parallel"):
    value = f"{d['bytes'] / d['seconds'] / 1e6:8.0f} MB/s"
elif load in ("churn", "connrate"):
    value = f"{d['conns'] / d['seconds']:8.0f} conn/s"
else:
    value = f"{int(d['verified'].split()[0]) / d['seconds']:8.0f} round trips/s"
print(f"{sys.argv[2]:28} {load:12} {value}  proxy CPU {d.get('proxy_cpu_s', 0):5.2f} s  errors {d['errors']}")
PY
done

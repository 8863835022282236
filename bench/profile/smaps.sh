#!/bin/bash
# Where the proxy's resident memory grows while it holds the idle-mostly
# load's 2,000 connections: the Rss of every mapping in /proc/PID/smaps
# before the load and 9 s into it, and the mappings that changed (the
# heap is "[anon]"). Unlike the page-fault profile (measure.sh faults),
# this sees every resident page, however it came.
#
#   bench/profile/smaps.sh BIN MODE
set -euo pipefail
BIN=$1 MODE=$2
# shellcheck source=bench/profile/setup.sh
source "$(dirname "$0")/setup.sh"
echo "{\"Apps\":[{\"Name\":\"bench\",\"Ports\":[$PPORT],\"Targets\":[\"127.0.0.1:$BPORT\"]}]}" > "$WORK/config.json"
"$BIN" --config "$WORK/config.json" --mode "$MODE" --listen-address 127.0.0.1 --log-level warn 2>/dev/null &
PROXY=$!
sleep 0.8
snap() {
    awk '/^[0-9a-f]+-[0-9a-f]+ / { name = $6; if (name == "") name = "[anon]" }
         /^Rss:/ { rss[name] += $2 }
         END { for (n in rss) if (rss[n] > 0) print n, rss[n] }' "/proc/$PROXY/smaps" | sort
}
snap > "$WORK/before"
"$TESTER" bench --target 127.0.0.1:$PPORT --load idle-mostly --duration 10s --proxy-pid $PROXY --json > "$WORK/out.json" &
CLIENT=$!
sleep 9
snap > "$WORK/during"
wait $CLIENT || true
join -a2 -e0 -o 0,1.2,2.2 "$WORK/before" "$WORK/during" |
    awk '$3 != $2 { printf "%-40s %8d KiB  (%+d KiB)\n", $1, $3, $3 - $2 }'

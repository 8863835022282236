#!/bin/bash
# Memory per connection before and after an upgrade moves the connections.
#
#   bench/profile/moved.sh BIN MODE [CONNS] [SETTLE]
#
# Starts BIN --mode MODE with a handoff socket, holds CONNS (2000)
# idle-mostly connections through it (tester-go, a 32-byte message every
# few seconds each), waits SETTLE seconds (10: auto promotes them by then),
# sends SIGUSR2 and reads the RSS of the process that took them over. Both
# figures are per held connection, against the first process's RSS before
# any connection (the new process is the same binary): what a user sees
# per connection before an upgrade and after it. The tester checks that
# every connection lived through the move.
set -euo pipefail
BIN=$1 MODE=$2 CONNS=${3:-2000} SETTLE=${4:-10}
# shellcheck source=bench/profile/setup.sh
source "$(dirname "$0")/setup.sh"

rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
echo "{\"Apps\":[{\"Name\":\"bench\",\"Ports\":[$PPORT],\"Targets\":[\"127.0.0.1:$BPORT\"]}]}" > "$WORK/config.json"
env -u RUST_BACKTRACE "$BIN" --config "$WORK/config.json" --mode "$MODE" \
    --listen-address 127.0.0.1 --log-level warn --handoff-socket "$WORK/handoff.sock" 2>/dev/null &
OLD=$!
sleep 0.8
START=$(rss $OLD)
HOLD=$((SETTLE + 12))
"$TESTER" bench --target 127.0.0.1:$PPORT --load idle-mostly --conns "$CONNS" --hold "${HOLD}s" --json > "$WORK/out.json" &
TESTER_PID=$!
sleep "$SETTLE"
BEFORE=$(rss $OLD)
kill -USR2 $OLD
# The old process exits once its connections moved.
for _ in $(seq 50); do kill -0 $OLD 2>/dev/null || break; sleep 0.1; done
NEW=$(pgrep -f -- "--takeover $WORK/handoff.sock" | head -1 || true)
[ -n "$NEW" ] || { echo "no process took over" >&2; exit 1; }
# Not a job of this shell (the old process started it): stopped here too.
trap 'kill $NEW $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
sleep 1
AFTER=$(rss "$NEW")
wait $TESTER_PID || echo "tester-go failed: $(head -c 300 "$WORK/out.json")" >&2
python3 - "$WORK/out.json" "$BIN:$MODE" "$CONNS" "$START" "$BEFORE" "$AFTER" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
conns, start, before, after = (int(x) for x in sys.argv[3:7])
print(f"{sys.argv[2]:28} {conns} idle-mostly connections: "
      f"{(before - start) / conns:5.2f} KiB each before the upgrade, "
      f"{(after - start) / conns:5.2f} KiB each in the process that took them over; "
      f"held {d.get('idle_ok', '?')}/{conns}, errors {d['errors']}")
PY

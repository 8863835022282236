#!/bin/bash
# Where a held connection's heap goes, by allocation site.
#
#   bench/profile/heap.sh BIN MODE [CONNS] [SETTLE]
#
# Runs BIN --mode MODE under heaptrack, opens CONNS (2000) idle-mostly
# connections through it (tester-go, a 32-byte message every few seconds
# each) and kills the proxy with SIGKILL SETTLE (3) seconds after the last
# one is open, while they are held: heaptrack's "leaked" allocations are
# then what the process held at that moment. Prints the sites holding at least 1,000
# allocations, with the bytes per allocation: with CONNS connections, a
# site with about CONNS allocations is one allocation per connection.
# The tester reports errors (its connections were cut); only the heap
# figures mean anything. Needs heaptrack (Debian's package).
set -euo pipefail
BIN=$1 MODE=$2 CONNS=${3:-2000} SETTLE=${4:-3}
command -v heaptrack >/dev/null || { echo "needs heaptrack: apt-get install heaptrack" >&2; exit 2; }
# shellcheck source=bench/profile/setup.sh
source "$(dirname "$0")/setup.sh"

echo "{\"Apps\":[{\"Name\":\"bench\",\"Ports\":[$PPORT],\"Targets\":[\"127.0.0.1:$BPORT\"]}]}" > "$WORK/config.json"
heaptrack -o "$WORK/heap" "$BIN" --config "$WORK/config.json" --mode "$MODE" \
    --listen-address 127.0.0.1 --log-level warn >"$WORK/proxy.log" 2>&1 &
HEAPTRACK=$!
sleep 3
PID=$(pgrep -f -- "^$BIN --config $WORK/config.json" | head -1)
"$TESTER" bench --target 127.0.0.1:$PPORT --load idle-mostly --conns "$CONNS" \
    --hold 120s --json > /dev/null 2>&1 &
# heaptrack slows the proxy: wait until every connection is open.
held() { ss -Htn state established "( sport = :$PPORT )" | wc -l; }
for _ in $(seq 1200); do [ "$(held)" -ge "$CONNS" ] && break; kill -0 "$PID" 2>/dev/null || { echo "the proxy died:" >&2; tail -5 "$WORK/proxy.log" >&2; exit 1; }; sleep 0.1; done
sleep "$SETTLE"
echo "held at the kill: $(held) connections" >&2
kill -KILL "$PID"
# heaptrack writes its file out once the proxy is gone.
wait "$HEAPTRACK" || true
heaptrack_print -f "$WORK"/heap.*zst --print-peaks 0 --print-allocators 0 \
    --print-temporary 0 --print-leaks 1 2>/dev/null > "$WORK/leaks.txt"
python3 - "$WORK/leaks.txt" "$CONNS" <<'PY'
import re, sys
conns = int(sys.argv[2])
units = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}
lines = open(sys.argv[1]).read().split("\n")
total = 0
for i, l in enumerate(lines):
    m = re.match(r"^(\s*)([0-9.]+)([KMG]?)B? leaked over (\d+) calls from(:?)", l)
    if not m:
        continue
    size, calls = float(m.group(2)) * units[m.group(3)], int(m.group(4))
    if not m.group(1) and not m.group(5):
        total += size  # a top-level entry: every site below it
        continue
    if calls < 1000:
        continue
    # The first frame of ours (or tokio's task or I/O code) names the site.
    frames = [f.strip() for f in lines[i + 1:i + 40] if not f.strip().startswith(("at ", "in "))]
    site = next((f for f in frames
                 if re.search(r"proxy_user::|task::core::Cell|registration_set|interval", f)), None)
    if site is None:  # inlined into a task's poll: the first frame that is not the allocator's
        site = next((f for f in frames if not re.match(r"_R|alloc::|__rust|malloc", f)), "?")
    site = re.sub(r"::h[0-9a-f]{16}$", "", site)
    for mangled, plain in (("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "), ("$u7b$", "{"),
                           ("$u7d$", "}"), ("$RF$", "&"), ("$C$", ","), ("..", "::")):
        site = site.replace(mangled, plain)
    print(f"{size / 1e3:9.1f} kB over {calls:5} allocations, {size / calls:6.0f} B each: {site[:110]}")
print(f"held in all: {total / 1e6:.2f} MB, {total / conns / 1024:.2f} KiB per connection")
PY

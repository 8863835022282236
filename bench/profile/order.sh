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
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
A=$(free) H=$(free) N=$(free)
echo "{\"Apps\":[{\"Name\":\"bench\",\"Ports\":[$A],\"Targets\":[\"127.0.0.1:$BPORT\"]}]}" > "$WORK/auto.json"
"$BIN" --config "$WORK/auto.json" --mode auto --listen-address 127.0.0.1 --log-level warn 2>/dev/null &
AP=$!
printf 'global\n    maxconn 4000\n    nbthread 2\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\nfrontend bench\n    bind 127.0.0.1:%s\n    default_backend targets\nbackend targets\n    server s1 127.0.0.1:%s\n' \
    "$H" "$BPORT" > "$WORK/haproxy.cfg"
haproxy -db -f "$WORK/haproxy.cfg" 2>/dev/null &
HP=$!
mkdir -p "$WORK/nginx/logs"
cat > "$WORK/nginx/nginx.conf" <<EOC
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 2;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 8000; }
stream { server { listen 127.0.0.1:$N; proxy_pass 127.0.0.1:$BPORT; proxy_buffer_size 64k; proxy_half_close on; } }
EOC
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
NP=$!
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

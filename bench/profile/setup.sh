# Sourced by the scripts here: the tester, a scratch directory removed on
# exit with every process started here, a bench backend on 127.0.0.1:$BPORT
# with $PPORT free for the endpoint under test (ports picked by the
# kernel), and the endpoints as `cargo xtask bench` configures them
# (xtask/src/bench_peers.rs; ours with --log-level warn like the bench):
# `start_ours BIN MODE PORT`, `start_haproxy PORT`, `start_nginx PORT`, each
# forwarding PORT to the backend and leaving its pid in $STARTED.
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TESTER=$ROOT/target/tester-go
[ -x "$TESTER" ] || { echo "build first: cargo xtask build" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BPORT=$(free_port) PPORT=$(free_port)
"$TESTER" backends --listen 127.0.0.1:"$BPORT" --kind bench --duration 300s >/dev/null 2>&1 &

# Extra flags for ours go in PROXY_FLAGS.
start_ours() {
    local bin=$1 mode=$2 port=$3
    echo "{\"Apps\":[{\"Name\":\"bench\",\"Ports\":[$port],\"Targets\":[\"127.0.0.1:$BPORT\"]}]}" > "$WORK/config-$port.json"
    # shellcheck disable=SC2086
    env -u RUST_BACKTRACE "$bin" --config "$WORK/config-$port.json" --mode "$mode" \
        --listen-address 127.0.0.1 --log-level warn ${PROXY_FLAGS:-} 2>/dev/null &
    STARTED=$!
}

start_haproxy() {
    local port=$1
    printf 'global\n    maxconn 4000\n    nbthread 2\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\nfrontend bench\n    bind 127.0.0.1:%s\n    default_backend targets\nbackend targets\n    server s1 127.0.0.1:%s\n' \
        "$port" "$BPORT" > "$WORK/haproxy-$port.cfg"
    haproxy -db -f "$WORK/haproxy-$port.cfg" 2>/dev/null &
    STARTED=$!
}

start_nginx() {
    local port=$1 dir=$WORK/nginx-$1
    mkdir -p "$dir/logs"
    cat > "$dir/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 8000; }
stream {
  server {
    listen 127.0.0.1:$port;
    proxy_pass 127.0.0.1:$BPORT;
    proxy_buffer_size 64k;
    proxy_half_close on;
  }
}
EOF
    nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' &
    STARTED=$!
}

# Sourced by measure.sh and peers.sh: the tester, a scratch directory
# removed on exit with every process started here, and a bench backend on
# 127.0.0.1:$BPORT with $PPORT free for the endpoint under test (ports
# picked by the kernel).
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TESTER=$ROOT/target/tester-go
[ -x "$TESTER" ] || { echo "build first: cargo xtask build" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BPORT=$(free_port) PPORT=$(free_port)
"$TESTER" backends --listen 127.0.0.1:"$BPORT" --kind bench --duration 300s >/dev/null 2>&1 &

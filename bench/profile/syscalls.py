# Syscalls per connection (churn, connrate), per MB (bulk, bidi, parallel)
# or per round trip from a tester-go JSON result and an `strace -c -f` summary, for measure.sh and
# peers.sh: python3 syscalls.py OUT.json STRACE.txt [LABEL]. With LABEL,
# one line (peers.sh); without, one line per syscall (measure.sh).
import json
import sys

d = json.load(open(sys.argv[1]))
if d["load"] in ("churn", "connrate"):
    n, unit = d["conns"], "connection"
elif d["load"] in ("bulk", "bidi", "parallel"):
    n, unit = d["bytes"] / 1e6, "MB"
else:
    n, unit = int(d["verified"].split()[0]), "round trip"
rows = [l.split() for l in open(sys.argv[2]) if l.strip() and l.split()[0][0].isdigit()]
total, calls = 0, []
for r in rows:
    count, name = int(r[3]), r[-1]
    if name == "total":
        total = count
    elif count / n >= 0.05:
        calls.append((name, count / n))
if len(sys.argv) > 3:
    listed = ", ".join(f"{name} {per:.2f}" for name, per in calls)
    print(f"{sys.argv[3]} {d['load']}: {total / n:.2f} syscalls per {unit} ({n:.0f}): {listed}")
else:
    for name, per in calls:
        print(f"  {name:14} {per:6.2f} per {unit}")
    print(f"  {'total':14} {total / n:6.2f} per {unit} ({n:.0f} {unit}s)")

# CPU per connection or round trip in user and in kernel mode, from a perf
# record of the endpoint at 4,999 Hz and tester-go's JSON of the same load
# (used by peers.sh samples and pair.sh):
#   python3 bench/profile/samples.py OUT.json LABEL PERF.DATA
import json, subprocess, sys

out, label, data = sys.argv[1:4]
d = json.load(open(out))
report = subprocess.run(
    ["perf", "report", "-i", data, "--no-children", "--sort", "dso", "-g", "none", "-F", "sample,dso"],
    capture_output=True, text=True, check=True).stdout
user = kernel = 0
for line in report.splitlines():
    fields = line.split()
    if line.startswith("#") or len(fields) < 2 or not fields[0].isdigit():
        continue
    if fields[1] == "[kernel.kallsyms]":
        kernel += int(fields[0])
    else:
        user += int(fields[0])
load = d["load"]
if load in ("churn", "connrate"):
    n, unit = d["conns"], "conn"
else:
    n, unit = int(d["verified"].split()[0]), "rt"
# One sample stands for 1/4999 s of CPU.
us = lambda s: 1e6 * s / 4999 / n
print(f"{label:28} {load:8} {n / d['seconds']:8.0f} {unit}/s  CPU sampled: user {us(user):6.2f} "
      f"kernel {us(kernel):6.2f} us/{unit} ({user} and {kernel} samples)  errors {d['errors']}")

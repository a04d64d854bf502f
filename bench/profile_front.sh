#!/usr/bin/env bash
# Profile the serving path under load (issue #15): one server process on the churn model (MLSERVER_PARALLEL_WORKERS=0:
# each replica of `parallelWorkers: N` is such a process), `wrk` at 32 connections on V2 with 1 row, `py-spy`
# sampling it for 15 s; prints the hottest functions. (bench/profile-front.txt is the first profile, taken when
# a front process still fed separate worker processes.)
#   bench/profile_front.sh MODEL_DIR      (a local MLflow model folder, e.g. the seeded dev model's artifacts)
# Needs Debian's `wrk` and `pip install py-spy` (into .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: bench/profile_front.sh MODEL_DIR}
work=$(mktemp -d)
trap 'kill "$(cat "$work/server.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$work"' EXIT
MLSERVER_HTTP_PORT=18080 MLSERVER_GRPC_PORT=18081 MLSERVER_METRICS_PORT=18082 MLSERVER_MODEL_NAME=churn \
  MLSERVER_PARALLEL_WORKERS=0 .venv/bin/python -m ml_serving.server "$model" >"$work/server.log" 2>&1 &
echo $! >"$work/server.pid"
for _ in $(seq 1 120); do curl -sf localhost:18080/v2/health/ready >/dev/null && break; sleep 1; done
.venv/bin/python - "$work/post.lua" <<'PY'
import json, sys
row = {"tenure_months": 3, "monthly_charges": 99.5, "support_calls": 4, "plan": "basic", "region": "north"}
types = {"tenure_months": "INT64", "monthly_charges": "FP64", "support_calls": "INT64", "plan": "BYTES", "region": "BYTES"}
body = {"inputs": [{"name": c, "datatype": t, "shape": [1, 1], "data": [row[c]]} for c, t in types.items()]}
open(sys.argv[1], "w").write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                             "wrk.body = [[" + json.dumps(body) + "]]\n")
PY
wrk -t1 -c32 -d3s -s "$work/post.lua" http://127.0.0.1:18080/v2/models/churn/infer >/dev/null  # warm up
.venv/bin/py-spy record -p "$(cat "$work/server.pid")" -d 15 -f raw -o "$work/front.raw" --nonblocking >/dev/null 2>&1 &
profiler=$!
wrk -t1 -c32 -d15s --latency -s "$work/post.lua" http://127.0.0.1:18080/v2/models/churn/infer | grep -E "Requests/sec|99%"
wait "$profiler"
.venv/bin/python - "$work/front.raw" <<'PY'
import sys
from collections import Counter

own, within, total = Counter(), Counter(), 0
for line in open(sys.argv[1]):
    stack, _, count = line.rstrip().rpartition(" ")
    frames, count = stack.split(";"), int(count)
    total += count
    own[frames[-1]] += count
    for frame in set(frames):
        within[frame] += count
print(f"{total} samples of the server process (all its threads)")
print("self time, top 15:")
for frame, count in own.most_common(15):
    print(f"  {100 * count / total:5.1f} %  {frame[:120]}")
print("inclusive time, the request path:")
for frame, count in within.most_common(80):
    if any(k in frame for k in ("ml_serving", "mlserver", "pydantic", "starlette", "multiprocessing")):
        print(f"  {100 * count / total:5.1f} %  {frame[:120]}")
PY

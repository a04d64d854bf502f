#!/usr/bin/env python3
"""A stand-in for the Pulumi CLI at the process boundary: records each call and answers like pulumi 3.272.

It keeps the faults a real CLI cannot produce on demand. A successful `up` "deploys" the stack file: the stand-in
computes the program's `traffic` output from it (the project's own code) and answers `stack output` and
`stack history` from that, so a rollout can tell a deployed stage from a written one.

Environment: STANDIN_LOG (JSON lines of calls; the state is kept beside it), STANDIN_FAIL_UP_AT (fail the Nth `up`, 1-based),
STANDIN_SLEEP_UP_AT (sleep 60 s in the Nth `up`, to be killed there), STANDIN_SLEEP_SELECT_AT (the same in the
Nth `stack select`, which the Automation API runs after the rollout wrote the file and before `up`).
"""

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

args = [a for a in sys.argv[1:] if a != "--non-interactive"]
log = os.environ.get("STANDIN_LOG")
calls = []
if log and os.path.exists(log):
    with open(log) as handle:
        calls = [json.loads(line) for line in handle if line.strip()]
if log:
    with open(log, "a") as handle:
        handle.write(json.dumps({"args": args, "cwd": os.getcwd()}) + "\n")
command = args[0] if args else ""
state_path = Path(log + ".state.json") if log else None
state = json.loads(state_path.read_text()) if state_path and state_path.exists() else None


def deploy():
    from ml_serving.stackfile import load_settings

    stack = args[args.index("--stack") + 1]
    settings = load_settings(Path.cwd(), stack)
    ended = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    traffic = {name: model.traffic_fingerprint() for name, model in settings.models.items()}
    if state_path:
        state_path.write_text(json.dumps({"traffic": traffic, "endTime": ended}))


if command == "version":
    print("v3.272.0")
elif command == "up":
    number = 1 + sum(1 for call in calls if call["args"][:1] == ["up"])
    if os.environ.get("STANDIN_SLEEP_UP_AT") == str(number):
        time.sleep(60)
    if os.environ.get("STANDIN_FAIL_UP_AT") == str(number):
        print("error: the stand-in was told to fail this update", file=sys.stderr)
        sys.exit(255)
    deploy()
    print("Updating (stand-in)... done")
elif command == "stack" and args[1:2] == ["select"]:
    number = 1 + sum(1 for call in calls if call["args"][:2] == ["stack", "select"])
    if os.environ.get("STANDIN_SLEEP_SELECT_AT") == str(number):
        time.sleep(60)
elif command == "stack" and args[1:2] == ["output"]:
    print(json.dumps({"traffic": state["traffic"]} if state else {}))
elif command == "stack" and args[1:2] == ["history"]:
    updates = []
    if state:
        updates.append(
            {
                "version": 1,
                "kind": "update",
                "startTime": state["endTime"],
                "endTime": state["endTime"],
                "result": "succeeded",
                "message": "",
                "environment": {},
                "config": {},
                "resourceChanges": {"same": 1},
            }
        )
    print(json.dumps(updates))
sys.exit(0)

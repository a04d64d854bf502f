"""How planning scales with the number of models: wall time and peak memory for 1, 10 and 50 models.

Each size runs in a fresh process (imports included, as `ml-serving plan` pays them) with prod-like models:
three pinned variants each (90/10 and a shadow), so no registry is involved. Run:

    .venv/bin/python bench/plan_scale.py [SIZES...]
"""

from __future__ import annotations

import copy
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]


def child(models: int) -> None:
    started = time.perf_counter()
    sys.path.insert(0, str(PROJECT_DIR))
    from ml_serving.plan import run_program
    from ml_serving.stackfile import read_config, stack_file

    config, secrets = read_config(stack_file(PROJECT_DIR, "prod"))
    template = config["ml-serving:models"]["churn"]
    config["ml-serving:models"] = {f"model-{i}": copy.deepcopy(template) for i in range(models)}
    imported = time.perf_counter()
    plan = run_program(PROJECT_DIR, "prod", config=config, secret_keys=secrets)
    done = time.perf_counter()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "models": models,
                "objects": len(plan.objects),
                "wall_s": done - started,
                "plan_s": done - imported,
                "peak_mib": peak_kib / 1024,
            }
        )
    )


def main(sizes: list[int]) -> None:
    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}")
    print(f"{'models':>6} {'objects':>7} {'wall s':>7} {'plan s':>7} {'peak MiB':>9}")
    rows = []
    for models in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(models)], capture_output=True, text=True, check=True
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        numbers = f"{row['wall_s']:>7.2f} {row['plan_s']:>7.2f} {row['peak_mib']:>9.1f}"
        print(f"{row['models']:>6} {row['objects']:>7} {numbers}")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        added = last["models"] - first["models"]
        print(
            f"per added model: {1000 * (last['wall_s'] - first['wall_s']) / added:.1f} ms wall, "
            f"{(last['peak_mib'] - first['peak_mib']) / added:.2f} MiB peak"
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
    else:
        main([int(a) for a in sys.argv[1:]] or [1, 10, 50])

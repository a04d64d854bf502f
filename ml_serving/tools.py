"""Where `./run tools` puts the binaries it builds from Go modules: one owner for the script and its folder."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

TOOLS_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "build.sh"


@cache
def tools_folder() -> Path | None:
    """The cache folder `tools/build.sh` builds into (its `bin/` holds the binaries), whether built yet or not."""
    if not TOOLS_SCRIPT.exists():
        return None
    answer = subprocess.run(["bash", str(TOOLS_SCRIPT), "--print-dir"], capture_output=True, text=True, check=False)
    return Path(answer.stdout.strip()) if answer.returncode == 0 and answer.stdout.strip() else None


def tool_binary(name: str) -> Path | None:
    """`name` as `tools/build.sh` built it, else one on PATH, else None."""
    folder = tools_folder()
    if folder is not None and (folder / "bin" / name).exists():
        return folder / "bin" / name
    found = shutil.which(name)
    return Path(found) if found else None

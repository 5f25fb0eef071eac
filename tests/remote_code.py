"""Run a script in a fresh interpreter that can reach g2tr-hf only through a folder's remote code.

The child is isolated (`python -I`, no PYTHON* variables), offline, uses a temporary HF_MODULES_CACHE, and an
import hook refuses `g2tr_hf` (the package is installed in the test environment), so every class it uses must
come from `trust_remote_code`. The script reports by printing one line `RESULT <json>`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


REFUSE_G2TR_HF = textwrap.dedent(
    """
    import importlib.abc, sys

    class _RefuseG2TRHF(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "g2tr_hf":
                raise ImportError("g2tr_hf must not be imported by a remote-code test")
            return None

    sys.meta_path.insert(0, _RefuseG2TRHF())
    """
)


def run_without_g2tr_hf(script: str, *args: object, workdir: Path, timeout: int = 300) -> dict:
    """Run `script` (with `args` in sys.argv[1:]) in the isolated child; return its RESULT json."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "modules"))
    command = [sys.executable, "-I", "-c", REFUSE_G2TR_HF + textwrap.dedent(script), *map(str, args)]
    completed = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-4000:]
    (line,) = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])

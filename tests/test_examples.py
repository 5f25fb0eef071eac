"""The examples stay runnable: each one, on its built-in tiny default, in a fresh interpreter."""

import subprocess
import sys
from pathlib import Path

import pytest


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    "script, args, expect",
    [
        ("understanding.py", [], "KV entries"),
        ("reduction_core.py", ["-o", "kept.png"], "4900 tokens -> 2450 kept"),
        ("edit_image.py", ["--steps", "3", "-o", "edited.png"], "wrote edited.png"),
        ("export_to_hub.py", ["exported"], "modeling_bagel.py"),
    ],
)
def test_example_runs(script, args, expect, tmp_path):
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert expect in completed.stdout

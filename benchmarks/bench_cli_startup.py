"""How long `g2tr-hf --help` takes, next to `python -c pass` and `import g2tr_hf`, in one run.

Each command runs in a fresh process (`--repeats` times, after one warm-up); the table gives the median and the
range. `--help` and usage errors never import the package (the console entry point lives outside it), while any
command that runs does: that import (torch, transformers, diffusers) is the floor of every real command.

    python benchmarks/bench_cli_startup.py --repeats 9
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def seconds(command: list[str], repeats: int) -> list[float]:
    subprocess.run(command, capture_output=True, check=True)  # warm-up: file system caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    script = shutil.which("g2tr-hf") or sys.exit("`g2tr-hf` is not on PATH: install the package first.")
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "g2tr-hf --help": [script, "--help"],
        "g2tr-hf export --help": [script, "export", "--help"],
        "python -c 'import g2tr_hf'": [sys.executable, "-c", "import g2tr_hf"],
    }
    print("| command | median (s) | min - max (s) |")
    print("|---|---|---|")
    for label, command in commands.items():
        times = seconds(command, args.repeats)
        print(f"| `{label}` | {statistics.median(times):.3f} | {min(times):.3f} - {max(times):.3f} |")


if __name__ == "__main__":
    main()

"""`g2tr-hf bench` on the mid-size random BAGEL (benchmarks/mid_size.py): prefill time, decode time and budgets of
G2TR and the text-guided baselines side by side, in one run, on one generated 512 x 512 image with a question.

Random weights: the fidelity columns (KL, top-1, exact match) mean nothing here; the timings and budgets do.

Usage: python benchmarks/bench_baselines_mid_size.py [--methods g2tr,fastv,pdrop,vscan] [--ratios 0.5,0.618]
       [--repeats 3] [-o bench_mid]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from g2tr_hf.bench import builtin_samples, run_bench, write_reports


sys.path.insert(0, str(Path(__file__).resolve().parent))
from mid_size import mid_size_bagel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="g2tr,fastv,pdrop,vscan")
    parser.add_argument("--ratios", default="0.5,0.618")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-o", "--output", default="bench_mid")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = mid_size_bagel()
    samples = builtin_samples(512)[:1]
    result = run_bench(
        model, processor, samples, args.methods.split(","), [float(r) for r in args.ratios.split(",")],
        repeats=args.repeats, warmup=1, max_new_tokens=4, progress=False, model_name="mid-size random BAGEL",
    )  # fmt: skip
    paths = write_reports(result, Path(args.output))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    main()

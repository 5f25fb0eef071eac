"""Cost of G2TR selection and merge at BAGEL scale, against a per-cell loop and against one LLM-sized matmul.

Setting (BAGEL-7B-MoT, one 1024x1024 input): N = 4900 ViT tokens on a 70x70 grid, anchors on the 32x32 pooled
latent grid, D = 3584, keep ratio 0.5 (K = 2450). Measured in one run, side by side:

- selection: cosine scores + balanced keep set (`reduce_tokens(..., merge=False)`), vs the loop restatement of
  the official code (`tests/reference_g2tr.py`: one masked argmax per latent cell, `topk`);
- merge: the extra cost of merging (`reduce_tokens(..., merge=True)` minus selection), vs the official-style
  `scatter_add` merge;
- reference: one [4900, 3584] @ [3584, 3584] matmul, i.e. a single q/o-projection of the unreduced image block
  in one of 28 layers.

Usage: python benchmarks/bench_reduction.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 10]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from g2tr_hf.reduction import reduce_tokens  # noqa: E402
from reference_g2tr import reference_merge, reference_select  # noqa: E402


GRID, ANCHOR_GRID, DIM, RATIO = (70, 70), (32, 32), 3584, 0.5


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` in seconds (synchronising the device around each call)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--loop-repeats", type=int, default=3, help="repeats of the slow loop reference")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    g = torch.Generator().manual_seed(0)
    features = torch.randn(GRID[0] * GRID[1], DIM, generator=g).to(device, dtype)
    anchors = torch.randn(ANCHOR_GRID[0] * ANCHOR_GRID[1], DIM, generator=g).to(device, dtype)
    weight = torch.randn(DIM, DIM, generator=g).to(device, dtype)

    def ours(merge: bool):
        return lambda: reduce_tokens(features, GRID, anchors, ANCHOR_GRID, ratio=RATIO, min_keep=32, merge=merge)

    # The loop reference computes in the feature dtype, as the official code does outside autocast.
    keep_ref, _ = reference_select(features, GRID, anchors, ANCHOR_GRID, RATIO, 32)
    ours_result = ours(True)()
    assert torch.equal(ours_result.keep.cpu(), keep_ref.cpu()), "vectorised and loop keep sets differ"

    with torch.inference_mode():
        select_ours = timed(ours(False), device, args.repeats)
        full_ours = timed(ours(True), device, args.repeats)
        select_loop = timed(lambda: reference_select(features, GRID, anchors, ANCHOR_GRID, RATIO, 32), device,
                            args.loop_repeats, warmup=1)
        merge_loop = timed(lambda: reference_merge(features, keep_ref.to(device)), device, args.repeats)
        matmul = timed(lambda: features @ weight, device, args.repeats)
    merge_ours = max(full_ours - select_ours, 0.0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device.type} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"dtype {args.dtype}")
    print(f"N={features.shape[0]} on {GRID}, anchors {ANCHOR_GRID}, D={DIM}, ratio {RATIO} -> K={ours_result.num_kept}")
    print("keep sets of the vectorised and loop selections: identical")
    print()
    print("| step | g2tr_hf (ms) | per-cell loop (ms) | speed-up vs loop | share of one 4900x3584x3584 matmul |")
    print("|---|---|---|---|---|")
    print(f"| selection (scores + keep set) | {select_ours * 1e3:.2f} | {select_loop * 1e3:.2f} | "
          f"{select_loop / select_ours:.1f}x | {select_ours / matmul:.3f} |")
    print(f"| merge | {merge_ours * 1e3:.2f} | {merge_loop * 1e3:.2f} | {merge_loop / max(merge_ours, 1e-9):.1f}x | "
          f"{merge_ours / matmul:.3f} |")
    print(f"| selection + merge | {full_ours * 1e3:.2f} | {(select_loop + merge_loop) * 1e3:.2f} | "
          f"{(select_loop + merge_loop) / full_ours:.1f}x | {full_ours / matmul:.3f} |")
    print(f"| reference matmul 4900x3584 @ 3584x3584 | {matmul * 1e3:.2f} | | | 1.000 |")


if __name__ == "__main__":
    main()

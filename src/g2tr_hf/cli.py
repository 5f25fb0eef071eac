"""The `g2tr-hf` command line. Not shipped to the Hub."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence


logger = logging.getLogger("g2tr_hf.cli")


def _demo(args: argparse.Namespace) -> int:
    from .demo import VIT_GRID, run_demo
    from .visualization import draw_kept_tokens

    report = run_demo(ratio=args.ratio, min_keep=args.min_keep, seed=args.seed)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    draw_kept_tokens(report.image, (VIT_GRID, VIT_GRID), report.result.keep).save(output)

    full_kv, reduced_kv = report.kv_bytes
    full_flops, reduced_flops = report.prefill_flops
    print("G2TR demo: reduction core on a synthetic 1024x1024 scene (random ViT/VAE-like features, no weights)")
    print(f"  ViT tokens in / kept:        {report.tokens_in} / {report.tokens_kept}  (ratio {args.ratio})")
    print(f"  reduction time (CPU):        {report.reduction_seconds * 1e3:.1f} ms")
    print("  At BAGEL-7B-MoT LLM shapes, image block + 30-token question:")
    print(f"    KV entries:                {report.kv_entries[0]} -> {report.kv_entries[1]}"
          f"  ({full_kv / 2**20:.1f} MiB -> {reduced_kv / 2**20:.1f} MiB, {full_kv / reduced_kv:.2f}x)")
    print(f"    prefill FLOPs:             {full_flops / 1e12:.2f} T -> {reduced_flops / 1e12:.2f} T"
          f"  ({full_flops / reduced_flops:.2f}x, {100 * report.compute_saved:.1f}% saved)")
    print(f"  kept tokens drawn to:        {output}")
    _understanding_demo(args)
    return 0


def _understanding_demo(args: argparse.Namespace) -> None:
    """A real understanding request, unreduced and reduced: the tiny built-in BAGEL unless --model is given."""
    from PIL import Image

    from .demo import run_understanding, synthetic_scene

    if args.model:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        source = args.model
    else:
        from .tiny import build_tiny

        model, processor = build_tiny("bagel")
        source = "the tiny built-in BAGEL (random weights: its answers are meaningless)"
    image = Image.open(args.image).convert("RGB") if args.image else synthetic_scene()
    report = run_understanding(model, processor, image, args.question, args.ratio, args.max_new_tokens)
    print(f"Understanding request through {source}:")
    print(f"  ViT tokens in / kept:        {report.image_tokens} / {report.kept_tokens}")
    print(f"  KV cache after prefill:      {report.cache_entries[0]} -> {report.cache_entries[1]} entries")
    print(f"  prefill time:                {report.prefill_seconds[0]:.3f} s -> {report.prefill_seconds[1]:.3f} s")
    print(f"  answer at ratio 1.0:         {report.answers[0]!r}")
    print(f"  answer at ratio {args.ratio}:         {report.answers[1]!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2tr-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run G2TR on the built-in example (no download)")
    demo.add_argument("--ratio", type=float, default=0.5, help="keep ratio in (0, 1] (default 0.5)")
    demo.add_argument("--min-keep", type=int, default=32, help="minimum kept tokens per image (default 32)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic features")
    demo.add_argument("-o", "--output", default="g2tr_demo_kept_tokens.png", help="where to write the PNG")
    demo.add_argument("--model", help="a g2tr_hf model folder or Hub repo (default: the tiny built-in BAGEL)")
    demo.add_argument("--image", help="image to ask about (default: the synthetic scene)")
    demo.add_argument("--question", default="Describe this image.", help="the question")
    demo.add_argument("--max-new-tokens", type=int, default=16, help="answer length (default 16)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"g2tr-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

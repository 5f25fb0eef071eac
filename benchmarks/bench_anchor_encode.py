"""What the single-frame 2-D encode saves on InternVL-U's G2TR anchor encode (the Qwen-Image VAE, one frame per image).

1. FLOPs at the real Qwen-Image VAE shapes (`QWEN_IMAGE_VAE_CONFIG`: base_dim 96, dim_mult 1-2-4-4, 2 res blocks)
   for one `--size` x `--size` image, counted by torch's FlopCounterMode on the meta device (no weights, no
   memory): diffusers' `vae.encode(x.unsqueeze(2)).latent_dist.mode()` (causal 3-D convolutions) against
   `g2tr_hf.vae_single_frame.encode_single_frame_mode` (2-D convolutions with each kernel's last temporal slice).
2. Measured CPU time of both on a mid-size random VAE (the real layout with base_dim `--mid-base-dim`), same image
   size, median of `--repeats` runs, the two paths interleaved in the same process, plus their largest difference.

Usage: python benchmarks/bench_anchor_encode.py [--size 448] [--repeats 5] [--mid-base-dim 32] [--threads N]
"""

from __future__ import annotations

import argparse
import inspect
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from g2tr_hf.configuration_internvlu import QWEN_IMAGE_VAE_CONFIG
from g2tr_hf.vae_single_frame import encode_single_frame_mode


def encode_3d(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The reference: diffusers' one-frame encode, posterior mode, [N, z_dim, H/8, W/8]."""
    return vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]


def encode_2d(vae, pixels: torch.Tensor) -> torch.Tensor:
    return encode_single_frame_mode(vae, pixels)


PATHS = {"3-D `vae.encode`": encode_3d, "2-D single frame": encode_2d}


def build_vae(config: dict, device: str | torch.device = "cpu"):
    from diffusers import AutoencoderKLQwenImage

    # diffusers 0.35 has no `input_channels` (its default, 3, is the real value): pass only what it takes.
    accepted = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
    with torch.device(device):
        return AutoencoderKLQwenImage(**{key: value for key, value in config.items() if key in accepted}).eval()


def flops_by_kind(fn) -> dict[str, int]:
    """FlopCounterMode counts of `fn()`, split into convolutions and the rest (the mid-block attention)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    conv = sum(flops for op, flops in counts.items() if "convolution" in op)
    return {"convolution": conv, "other (attention)": sum(counts.values()) - conv, "total": sum(counts.values())}


def print_flops(size: int) -> None:
    vae = build_vae(QWEN_IMAGE_VAE_CONFIG, "meta")
    pixels = torch.empty(1, 3, size, size, device="meta")
    counts = {name: flops_by_kind(lambda fn=fn: fn(vae, pixels)) for name, fn in PATHS.items()}
    full, single = counts.values()
    encoder = sum(p.numel() for p in vae.encoder.parameters()) + sum(p.numel() for p in vae.quant_conv.parameters())
    print(f"## FLOPs at the real Qwen-Image VAE shapes, one {size}x{size} image (meta device)")
    print()
    print(f"Encoder + quant_conv: {encoder / 1e6:.1f}M parameters; latent {QWEN_IMAGE_VAE_CONFIG['z_dim']} x "
          f"{size // 8} x {size // 8}.")
    print()
    print("| GFLOP | 3-D `vae.encode` | 2-D single frame | 2-D / 3-D |")
    print("|---|---|---|---|")
    for kind in full:
        ratio = single[kind] / full[kind] if full[kind] else float("nan")
        print(f"| {kind} | {full[kind] / 1e9:.1f} | {single[kind] / 1e9:.1f} | {ratio:.3f} |")
    print()


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def print_times(size: int, base_dim: int, repeats: int) -> None:
    config = {**QWEN_IMAGE_VAE_CONFIG, "base_dim": base_dim}
    torch.manual_seed(0)
    vae = build_vae(config)
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    flops = {name: flops_by_kind(lambda fn=fn: fn(vae, pixels))["total"] for name, fn in PATHS.items()}
    with torch.inference_mode():
        outputs = {name: fn(vae, pixels) for name, fn in PATHS.items()}  # also the warm-up
        times: dict[str, list[float]] = {name: [] for name in PATHS}
        for _ in range(repeats):  # interleaved, so that both see the same machine load
            for name, fn in PATHS.items():
                times[name].append(seconds(lambda fn=fn: fn(vae, pixels)))
    reference, single = outputs.values()
    error = ((single - reference).abs().max() / reference.abs().max()).item()
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"## Measured CPU time, mid-size random VAE (base_dim {base_dim}, otherwise the real layout), "
          f"one {size}x{size} image")
    print()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; median of {repeats} runs (interleaved, after one warm-up); max |2-D - 3-D| / max |3-D| = "
          f"{error:.1e}.")
    print()
    print("| | 3-D `vae.encode` | 2-D single frame | change |")
    print("|---|---|---|---|")
    full, fast = medians.values()
    print(f"| time (ms) | {full * 1e3:.0f} | {fast * 1e3:.0f} | {full / fast:.2f}x faster |")
    spread = {name: f"{min(v) * 1e3:.0f}-{max(v) * 1e3:.0f}" for name, v in times.items()}
    print(f"| range (ms) | {spread[next(iter(PATHS))]} | {spread[list(PATHS)[1]]} | |")
    first, second = flops.values()
    print(f"| GFLOP (total) | {first / 1e9:.1f} | {second / 1e9:.1f} | {second / first:.3f} |")
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=448, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path")
    parser.add_argument("--mid-base-dim", type=int, default=32, help="base_dim of the timed VAE (real: 96)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default if unset)")
    parser.add_argument("--skip-timing", action="store_true", help="only count FLOPs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_flops(args.size)
    if not args.skip_timing:
        print_times(args.size, args.mid_base_dim, args.repeats)


if __name__ == "__main__":
    main()

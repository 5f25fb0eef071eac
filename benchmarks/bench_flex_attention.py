"""Flex attention (a block-causal `BlockMask`) against SDPA (the dense boolean mask) for BAGEL's prefill.

Part A, one attention call at BAGEL-7B-MoT's head shapes (28 query heads, 4 KV heads, head dim 128): a left-padded
batch whose rows are `--text-tokens` of text, one image block of `--image-tokens` (+2 markers, bidirectional) and a
short question. Timed separately: building the mask (once per forward, shared by all 28 layers) and one kernel
call. With `--compile`, flex is also timed compiled (`torch.compile(flex_attention)`; the first call, which compiles,
is reported on its own). On CUDA the model's own path is the compiled one; on the CPU the model runs flex unfused
unless the whole model is compiled.

Part B, the whole prefill (`model(**inputs, use_cache=True)`) of the mid-size random BAGEL used by the other CPU
benchmarks (LLM 12 x 1024), one `--image-size` image and a question, loaded once with SDPA and once with
`attn_implementation="flex_attention"` (same weights); also prints the largest logit difference.

Every number is a median of `--repeats` runs after one warm-up, on whatever device runs the script (CUDA when there is
one, else the CPU). Usage:

    python benchmarks/bench_flex_attention.py [--device cpu] [--image-tokens 1369] [--batch 2] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.nn.attention.flex_attention import flex_attention

from g2tr_hf.modeling_bagel import block_causal_block_mask, block_causal_mask, flex_block_attention_forward
from mid_size import mid_size_bagel


HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up (and, for compiled code, compilation)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompt_layout(args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """new_mask [B, L] (row 1 and later left-padded by `--pad`) and block_ids [B, L] (one image block per row)."""
    image_block = args.image_tokens + 2
    length = args.text_tokens + image_block + args.question_tokens
    new_mask = torch.ones(args.batch, length, dtype=torch.bool, device=device)
    block_ids = torch.zeros(args.batch, length, dtype=torch.long, device=device)
    for row in range(args.batch):
        pad = min(args.pad, length - image_block) if row else 0
        new_mask[row, :pad] = False
        start = pad + args.text_tokens
        block_ids[row, start : start + image_block] = row + 1
    return new_mask, block_ids


def kernel_table(args, device: torch.device, dtype: torch.dtype) -> None:
    new_mask, block_ids = prompt_layout(args, device)
    batch, length = new_mask.shape
    generator = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(batch, HEADS, length, HEAD_DIM, device=device, dtype=dtype, generator=generator)
    key = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device=device, dtype=dtype, generator=generator)
    value = torch.randn_like(key)
    module = torch.nn.Module().eval()
    module.num_key_value_groups = HEADS // KV_HEADS  # read by transformers' SDPA wrapper for GQA
    scale = HEAD_DIM**-0.5

    dense = block_causal_mask(None, new_mask, block_ids)
    block_mask = block_causal_block_mask(None, new_mask, block_ids)
    sdpa_out, _ = flex_block_attention_forward(module, query, key, value, dense, scaling=scale)
    flex_out, _ = flex_block_attention_forward(module, query, key, value, block_mask, scaling=scale)
    difference = (sdpa_out.float() - flex_out.float()).abs().max().item()

    def timed(fn: Callable[[], object]) -> float:
        return median_seconds(fn, args.repeats, device)

    rows = [
        ("dense mask build", timed(lambda: block_causal_mask(None, new_mask, block_ids))),
        ("BlockMask build", timed(lambda: block_causal_block_mask(None, new_mask, block_ids))),
        ("SDPA, dense mask (one layer)", timed(
            lambda: flex_block_attention_forward(module, query, key, value, dense, scaling=scale)
        )),
        (f"flex, BlockMask (one layer, the model's path on {device.type})", timed(
            lambda: flex_block_attention_forward(module, query, key, value, block_mask, scaling=scale)
        )),
    ]  # fmt: skip
    if args.compile:
        compiled = torch.compile(flex_attention)

        def compiled_call():
            return compiled(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=True)

        start = time.perf_counter()
        compiled_call()
        synchronize(device)
        rows.append(("flex compiled: first call (compiles)", time.perf_counter() - start))
        rows.append(("flex compiled (one layer)", timed(compiled_call)))
    print(
        f"## A. One attention call, {HEADS}/{KV_HEADS} heads x {HEAD_DIM}, batch {batch} x {length} tokens (image "
        f"block {args.image_tokens + 2}, left padding {args.pad}), {dtype}, {device_name(device)}, median of "
        f"{args.repeats}"
    )
    print()
    skipped = 100 * (1 - block_mask.to_dense().bool().float().mean().item())
    print(f"BlockMask: {skipped:.1f}% of the 128x128 tiles skipped; max |flex - SDPA| = {difference:.2e}")
    print()
    print("| step | seconds |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} |")
    print()


def model_table(args, device: torch.device, dtype: torch.dtype) -> None:
    sdpa, processor = mid_size_bagel()
    flex, _ = mid_size_bagel()
    flex.set_attn_implementation("flex_attention")
    sdpa.to(device=device, dtype=dtype)
    flex.to(device=device, dtype=dtype)
    size = args.image_size
    image = Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8))
    question = " ".join(["what"] * args.question_tokens)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(device)

    def prefill(model) -> torch.Tensor:
        with torch.inference_mode():
            return model(**inputs, use_cache=True, g2tr_ratio=args.ratio).logits

    difference = (prefill(sdpa).float() - prefill(flex).float()).abs().max().item()
    sdpa_seconds = median_seconds(lambda: prefill(sdpa), args.repeats, device)
    flex_seconds = median_seconds(lambda: prefill(flex), args.repeats, device)
    grid = inputs["image_grid_hw"][0].tolist()
    print(
        f"## B. Whole prefill, mid-size random BAGEL (LLM 12 x 1024), one {size}x{size} image ({grid[0]}x{grid[1]} "
        f"ViT tokens, ratio {args.ratio}) + {args.question_tokens}-word question, {inputs['input_ids'].shape[1]} "
        f"tokens, {dtype}, {device_name(device)}, median of {args.repeats}"
    )
    print()
    print(f"max |logits flex - logits SDPA| = {difference:.2e}")
    print()
    print("| attention | seconds | relative to SDPA |")
    print("|---|---|---|")
    print(f"| SDPA, dense mask | {sdpa_seconds:.3f} | 1.00x |")
    print(f"| flex, BlockMask | {flex_seconds:.3f} | {flex_seconds / sdpa_seconds:.2f}x |")
    print()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads, torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--image-tokens", type=int, default=1369, help="ViT tokens of the image (part A)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text before the image (part A)")
    parser.add_argument("--question-tokens", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pad", type=int, default=128, help="left padding of every row but the first (part A)")
    parser.add_argument("--image-size", type=int, default=512, help="image side in pixels (part B)")
    parser.add_argument("--ratio", type=float, default=1.0, help="G2TR keep ratio (part B)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(flex_attention) (part A)")
    parser.add_argument("--skip-model", action="store_true", help="part A only")
    args = parser.parse_args()
    device = torch.device(args.device)
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype or default_dtype)
    kernel_table(args, device, dtype)
    if not args.skip_model:
        model_table(args, device, dtype)


if __name__ == "__main__":
    main()

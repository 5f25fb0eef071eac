"""What G2TR saves in BAGEL's understanding prefill: analytic at real BAGEL-7B-MoT shapes, measured on CPU.

Part A, analytic (`g2tr_hf.profiling`, formula in its docstring), real shapes: one image (1024x1024 input -> ViT
980x980 = 70x70 tokens; 1024x768 -> 52x70) followed by a 30-token question in upstream's layout
(`<|vision_start|> N x image <|vision_end|> <|im_start|> question <|im_end|> <|im_start|>`), keep ratio 0.5 vs 1.0
with min_keep 32. Reported: KV entries and bytes, LLM prefill FLOPs, the same ratio with the anchor VAE encode
added to the reduced side (FlopCounterMode on the FLUX AE, meta device), and an end-to-end ratio that also counts
the unreduced SigLIP + connector on both sides.

Part B, measured: a mid-size random BAGEL (LLM width 1024, 12 MoT layers; SigLIP width 384, 4 layers; a small
4-block VAE) on a 512x512 image (37x37 = 1369 ViT tokens, 16x16 anchors), `model(**inputs, use_cache=True)` at
ratio 1.0, 0.5 with exact anchors and 0.5 with half-resolution anchors (`g2tr_anchor_scale=0.5`) in one run,
interleaved, median and range of `--repeats`; the LLM decoder's and the anchor encode's own times are taken with hooks.

Usage: python benchmarks/bench_bagel_prefill.py [--repeats 3] [--skip-measured]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from g2tr_hf.compat import output_cache
from g2tr_hf.configuration_bagel import G2TRBagelConfig
from g2tr_hf.generation_g2tr import stored_length
from g2tr_hf.profiling import BAGEL_7B_LLM, account_request, anchor_scale_agreement, module_flops
from g2tr_hf.reduction import anchor_encode_size, keep_count
from mid_size import mid_size_bagel


QUESTION_TOKENS = 30
SIGLIP = dict(hidden=1152, mlp=4304, layers=26, patch_dim=3 * 14 * 14)


def bagel_prompt(num_image_tokens: int, config: G2TRBagelConfig) -> torch.Tensor:
    """Token ids of one image + a 30-token question in upstream's layout (the question ids are placeholders)."""
    return torch.tensor(
        [config.vision_start_token_id]
        + [config.image_token_id] * num_image_tokens
        + [config.vision_end_token_id, config.bos_token_id]
        + [100] * QUESTION_TOKENS
        + [config.eos_token_id, config.bos_token_id]
    )


def siglip_connector_flops(num_tokens: int, llm_hidden: int) -> int:
    """SigLIP-so400m (26 layers, bidirectional attention within the image) + the 2-layer connector."""
    d, m = SIGLIP["hidden"], SIGLIP["mlp"]
    per_layer = 2 * num_tokens * (4 * d * d + 2 * d * m) + 4 * d * num_tokens * num_tokens
    patch_embed = 2 * num_tokens * SIGLIP["patch_dim"] * d
    connector = 2 * num_tokens * (d * llm_hidden + llm_hidden * llm_hidden)
    return SIGLIP["layers"] * per_layer + patch_embed + connector


def anchor_encode_flops(config: G2TRBagelConfig, height: int, width: int) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**config.vae_config)
        pixels = torch.empty(1, 3, height, width)
    return module_flops(vae, pixels, method="encode")


def analytic_table() -> None:
    config = G2TRBagelConfig()
    print("## A. Analytic, BAGEL-7B-MoT shapes (LLM 28 layers x 3584, SigLIP 26 x 1152, FLUX AE), ratio 0.5 vs 1.0")
    print()
    print("| input | ViT tokens N -> K | KV entries (ratio) | KV bytes | LLM prefill TFLOP (ratio) "
          "| + anchor VAE encode: exact / half-res | + SigLIP/connector (end to end): exact / half-res |")
    print("|---|---|---|---|---|---|---|")
    for name, vit_grid, vae_hw in (("1024x1024", (70, 70), (1024, 1024)), ("1024x768", (52, 70), (768, 1024))):
        n = vit_grid[0] * vit_grid[1]
        k = keep_count(n, 0.5, config.g2tr_min_keep)
        accounting = account_request(
            bagel_prompt(n, config),
            BAGEL_7B_LLM,
            image_start_token_id=config.vision_start_token_id,
            image_end_token_id=config.vision_end_token_id,
            kept_image_tokens=[k],
        )
        full, reduced = accounting.prefill_flops
        anchor = anchor_encode_flops(config, *vae_hw)
        half_size, _ = anchor_encode_size(
            *vae_hw, vae_downsample=8, patch_size=2, latent_pool=config.g2tr_latent_pool, anchor_scale=0.5
        )
        half = anchor_encode_flops(config, *half_size)
        vit = siglip_connector_flops(n, BAGEL_7B_LLM.hidden_size)
        print(
            f"| {name} | {n} -> {k} | {accounting.kv_entries[0]} -> {accounting.kv_entries[1]} "
            f"({accounting.kv_ratio:.2f}x) | {accounting.kv_bytes[0] / 2**20:.0f} -> "
            f"{accounting.kv_bytes[1] / 2**20:.0f} MiB | {full / 1e12:.1f} -> {reduced / 1e12:.1f} "
            f"({accounting.flops_ratio:.2f}x) | {anchor / 1e12:.2f} / {half / 1e12:.2f} TFLOP: "
            f"{full / (reduced + anchor):.2f}x / {full / (reduced + half):.2f}x | "
            f"{(full + vit) / (reduced + anchor + vit):.2f}x / {(full + vit) / (reduced + half + vit):.2f}x |"
        )
    print()


def measured_table(repeats: int) -> None:
    model, processor = mid_size_bagel()
    image = Image.fromarray((np.random.RandomState(0).rand(512, 512, 3) * 255).astype(np.uint8))
    question = " ".join(["what"] * QUESTION_TOKENS)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )

    decoder_seconds: list[float] = []
    decoder = model.language_model
    decoder.register_forward_pre_hook(lambda *_: decoder_seconds.append(-time.perf_counter()))
    decoder.register_forward_hook(lambda *_: decoder_seconds.__setitem__(-1, decoder_seconds[-1] + time.perf_counter()))
    anchor_seconds: list[float] = []
    base, encode = model.model, model.model.encode_anchor_latents

    def timed_encode(*args, **kwargs):
        start = time.perf_counter()
        try:
            return encode(*args, **kwargs)
        finally:
            anchor_seconds.append(time.perf_counter() - start)

    base.encode_anchor_latents = timed_encode
    settings = {"ratio 1.0": (1.0, 1.0), "ratio 0.5, exact anchors": (0.5, 1.0), "ratio 0.5, half-res": (0.5, 0.5)}
    samples = {name: {"total": [], "decoder": [], "anchors": []} for name in settings}
    caches = {}
    for repeat in range(repeats + 1):  # the first round warms up; settings interleaved so noise hits all alike
        for name, (ratio, scale) in settings.items():
            model.config.g2tr_anchor_scale = scale
            anchor_seconds.clear()
            start = time.perf_counter()
            with torch.inference_mode():
                output = model(**inputs, use_cache=True, g2tr_ratio=ratio)
            if repeat:
                samples[name]["total"].append(time.perf_counter() - start)
                samples[name]["decoder"].append(decoder_seconds[-1])
                samples[name]["anchors"].append(sum(anchor_seconds))
            caches[name] = stored_length(output_cache(output))
    model.config.g2tr_anchor_scale = 1.0

    def cell(name: str, key: str) -> str:
        values = sorted(samples[name][key])
        return f"{statistics.median(values):.3f} ({values[0]:.3f}-{values[-1]:.3f})"

    median = {name: {key: statistics.median(v) for key, v in stages.items()} for name, stages in samples.items()}
    grid = inputs["image_grid_hw"][0].tolist()
    print(f"## B. Measured on CPU ({torch.get_num_threads()} threads, torch {torch.__version__}): mid-size random "
          f"BAGEL, LLM 12 x 1024, one 512x512 image ({grid[0]}x{grid[1]} = {grid[0] * grid[1]} ViT tokens) + "
          f"{QUESTION_TOKENS}-word question, median (min-max) of {repeats}, seconds")
    print()
    print("| | " + " | ".join(settings) + " |")
    print("|---|---|---|---|")
    print("| KV cache entries after prefill | " + " | ".join(str(caches[name]) for name in settings) + " |")
    for label, key in (("LLM decoder prefill", "decoder"), ("anchor VAE encode", "anchors"),
                       ("whole forward: ViT + anchors + reduction + LLM", "total")):
        print(f"| {label} | " + " | ".join(cell(name, key) for name in settings) + " |")
    full = median["ratio 1.0"]["total"]
    shares = " | ".join(f"{median[name]['anchors'] / median[name]['total']:.0%}" for name in settings)
    speedups = " | ".join(f"{full / median[name]['total']:.2f}x" for name in settings)
    print(f"| anchor share of the prefill | {shares} |")
    print(f"| whole-forward speed-up vs ratio 1.0 | {speedups} |")
    print()
    agreement = anchor_scale_agreement(model, inputs, anchor_scale=0.5, g2tr_ratio=0.5)
    print(f"Keep-set agreement, half-res vs exact anchors: {agreement.shared_tokens[0]} of {agreement.kept_tokens[0]} "
          f"kept tokens shared ({agreement.agreement[0]:.1%}). Random weights: this says nothing about quality; "
          "run `g2tr_hf.profiling.anchor_scale_agreement` on real weights and images.")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-measured", action="store_true")
    args = parser.parse_args()
    analytic_table()
    if not args.skip_measured:
        measured_table(args.repeats)


if __name__ == "__main__":
    main()

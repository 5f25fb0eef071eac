"""What G2TR saves in an InternVL-U image edit: analytic at the real shapes, measured on CPU.

An edit (`G2TRInternVLUPipeline`, see docs/internvlu-generation.md) runs the VLM ONCE over three rows (conditional,
image-only, unconditional; the first two hold the input image's 256 ViT tokens), then N solver steps of the MMDiT
over the same three rows, each holding the target's latent patches, the reference's latent patches (two rows) and
the context span (user turn .. `<img>`, with the ViT tokens in two rows). G2TR shrinks the 256 ViT tokens to K in two
rows, so it saves VLM prefill work, and in every MMDiT step the 2 x (256 - K) context tokens: a small part of a
sequence dominated by the 2 x 4096 latent tokens of a 1024 px edit.

Part A, analytic at InternVL-U's shapes (1024 x 1024 edit, 20 steps, ratio 0.5 -> K = 128):
- VLM prefill FLOPs (`g2tr_hf.profiling.prefill_flops`, causal segments; the rows run as one left-padded batch, so
  the batch costs 3 x its longest row);
- MMDiT FLOPs per step, counted by torch's FlopCounterMode on the meta device (the full 1.8 B decoder, no memory);
- the Qwen-Image VAE encode of the reference: once here (single-frame 2-D), twice in the official G2TR code
  (3-D `vae.encode` for the anchors and again for the reference frame).
Token counts of the text are estimates (the real tokenizer is not available offline): editing system turn 100
tokens (the 37-token identity turn measured for understanding plus about 60 for the editing instruction), a
10-token instruction; change them with the options.

Part B, measured on CPU: a mid-size random InternVL-U (LLM 1024 x 6 with the real 448 px / 256-token ViT geometry,
a 16-channel VAE of width 16; MMDiT 4 layers x 768) editing a 512 x 512 image (32 x 32 latent patches), ratio 0.5
against 1.0 interleaved in one run, median of `--repeats`: the VLM side (`encode_context`: prompts, ViT, VAE encode,
selection + merge, one LLM pass over the 3 rows, conditioning) and one solver step (the MMDiT over the 3 rows).

Usage: python benchmarks/bench_internvlu_edit.py [--repeats 3] [--threads N] [--skip-measured]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import PIL.Image
import torch
from torch.utils.flop_counter import FlopCounterMode

from g2tr_hf.configuration_internvlu import QWEN_IMAGE_VAE_CONFIG, G2TRInternVLUConfig
from g2tr_hf.modeling_internvlu import G2TRInternVLUForConditionalGeneration
from g2tr_hf.modeling_internvlu_gen import (
    G2TRInternVLUGenerationDecoder,
    G2TRInternVLUGenerationDecoderConfig,
)
from g2tr_hf.pipeline_internvlu import (
    DEFAULT_SCHEDULER_CONFIG,
    DPMSolverMultistepScheduler,
    G2TRInternVLUPipeline,
    _Request,
)
from g2tr_hf.processing_internvlu import G2TRInternVLUImageProcessor, G2TRInternVLUProcessor, build_tiny_tokenizer
from g2tr_hf.profiling import INTERNVLU_LLM, Segment, prefill_flops
from g2tr_hf.reduction import keep_count
from g2tr_hf.vae_single_frame import encode_single_frame_mode


RATIOS = (1.0, 0.5)
MIN_KEEP = 32
VIT_TOKENS = 256
STEPS = 20


# --- Part A: analytic ------------------------------------------------------------------------------------------------


def row_layouts(kept: int, system: int, instruction: int) -> dict[str, tuple[int, int]]:
    """(VLM row length, MMDiT context span length) of the three rows. Span = user header 3 + content + end of turn
    2 + assistant header 3 + `<img>`; the VLM row adds the system turn."""
    image = kept + 2 + 1  # <img> K </img> and its "\n"
    contents = {"conditional": image + instruction, "image-only": image + 9, "unconditional": 9}
    return {name: (system + 3 + n + 2 + 3 + 1, 3 + n + 2 + 3 + 1) for name, n in contents.items()}


def meta_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def mmdit_step_flops(spans: list[int], kept: int, size: int) -> int:
    """FLOPs of one MMDiT evaluation of the 3 rows at full size (meta device)."""
    grid = size // 8
    with torch.device("meta"):
        decoder = G2TRInternVLUGenerationDecoder(G2TRInternVLUGenerationDecoderConfig())
        contexts = [torch.empty(n, 4096) for n in spans]
        reference = torch.empty(1, 16, grid, grid)
        latents = torch.empty(3, 16, grid, grid)
    vit = []
    for row, n in enumerate(spans):
        mask = torch.zeros(n, dtype=torch.bool)
        if row < 2:
            mask[4 : 4 + kept] = True
        vit.append(mask)
    keep = torch.arange(kept)
    conditioning = decoder.prepare_conditioning(
        contexts, vit, torch.tensor([[1, grid, grid]] * 3),
        image_fhw_cond=[torch.tensor([[1, 16, 16]])] * 2 + [torch.zeros(0, 3, dtype=torch.long)],
        conditional_input=[reference, reference, None],
        image_keep_cond=[[keep], [keep], []],
    )  # fmt: skip
    return meta_flops(lambda: decoder(latents, torch.tensor([999] * 3), conditioning))


def vae_encode_flops(size: int) -> tuple[int, int]:
    """(single-frame 2-D encode, 3-D `vae.encode`) FLOPs of one size x size image with the Qwen-Image VAE."""
    with torch.device("meta"):
        model = G2TRInternVLUForConditionalGeneration(G2TRInternVLUConfig(vae_config=QWEN_IMAGE_VAE_CONFIG))
        pixels = torch.empty(1, 3, size, size)
    vae = model.model.vae
    two_d = meta_flops(lambda: encode_single_frame_mode(vae, pixels))
    three_d = meta_flops(lambda: vae.encode(pixels[:, :, None]))
    return two_d, three_d


def print_analytic(size: int, system: int, instruction: int) -> None:
    print(f"Part A: analytic, InternVL-U shapes, {size}x{size} edit, {STEPS} steps (text token counts estimated)")
    print()
    rows = {}
    for ratio in RATIOS:
        kept = keep_count(VIT_TOKENS, ratio, MIN_KEEP)
        layouts = row_layouts(kept, system, instruction)
        vlm_lengths = [v for v, _ in layouts.values()]
        spans = [s for _, s in layouts.values()]
        prefill = 3 * prefill_flops([Segment(max(vlm_lengths))], INTERNVLU_LLM)
        step = mmdit_step_flops(spans, kept, size)
        rows[ratio] = dict(kept=kept, vlm=vlm_lengths, spans=spans, prefill=prefill, step=step)
    two_d, three_d = vae_encode_flops(size)
    full, reduced = rows[1.0], rows[0.5]
    tokens = lambda r: 3 * (size // 16) ** 2 + 2 * (size // 16) ** 2 + sum(r["spans"])  # noqa: E731
    print("| | ratio 1.0 (off) | ratio 0.5 | saving |")
    print("|---|---|---|---|")
    print(f"| ViT tokens per image row | {full['kept']} | {reduced['kept']} | |")
    print(f"| VLM row lengths (cond / image-only / uncond) | {full['vlm']} | {reduced['vlm']} | |")
    print(f"| VLM prefill, 3-row padded batch (GFLOPs) | {full['prefill'] / 1e9:.0f} | {reduced['prefill'] / 1e9:.0f} "
          f"| {1 - reduced['prefill'] / full['prefill']:.1%} |")
    print(f"| MMDiT tokens per step (3 rows) | {tokens(full)} | {tokens(reduced)} | "
          f"{1 - tokens(reduced) / tokens(full):.1%} |")
    print(f"| MMDiT per step (TFLOPs) | {full['step'] / 1e12:.2f} | {reduced['step'] / 1e12:.2f} | "
          f"{1 - reduced['step'] / full['step']:.1%} |")
    total_full = full["prefill"] + STEPS * full["step"]
    total_reduced = reduced["prefill"] + STEPS * reduced["step"]
    print(f"| VLM prefill + {STEPS} MMDiT steps (TFLOPs) | {total_full / 1e12:.1f} | {total_reduced / 1e12:.1f} | "
          f"{1 - total_reduced / total_full:.1%} |")
    print(f"| reference VAE encode here (1 x single-frame, GFLOPs) | {two_d / 1e9:.0f} | {two_d / 1e9:.0f} | |")
    print(f"| official G2TR code: 2 x 3-D encode (GFLOPs) | {three_d / 1e9:.0f} (1 x) | {2 * three_d / 1e9:.0f} | "
          f"{two_d / (2 * three_d):.2f}x of it here |")
    print()


# --- Part B: measured ------------------------------------------------------------------------------------------------


def mid_size_pipeline(size: int) -> G2TRInternVLUPipeline:
    tokenizer = build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<IMG_CONTEXT>", "<img>", "</img>", "<|im_end|>")}
    from g2tr_hf.configuration_internvlu import SPECIAL_TOKENS

    config = G2TRInternVLUConfig(
        vision_config={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "image_size": 448, "patch_size": 14},
        text_config={"vocab_size": 272, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 6,
                     "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                     "tie_word_embeddings": False, "pad_token_id": tokenizer.pad_token_id},
        vae_config={**QWEN_IMAGE_VAE_CONFIG, "base_dim": 16, "num_res_blocks": 1},
        image_token_id=ids["<IMG_CONTEXT>"], image_start_token_id=ids["<img>"], image_end_token_id=ids["</img>"],
        im_end_token_id=ids["<|im_end|>"], special_token_ids=[tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS],
        g2tr_min_keep=MIN_KEEP,
    )  # fmt: skip
    torch.manual_seed(0)
    model = G2TRInternVLUForConditionalGeneration(config).eval()
    decoder_config = G2TRInternVLUGenerationDecoderConfig(
        decoder_config=dict(num_layers=4, num_attention_heads=6, joint_attention_dim=2048),
        input_hidden_size=2048, output_hidden_size=2048,
        reference_min_pixels=size * size, reference_max_pixels=size * size, reference_max_side=size,
    )  # fmt: skip
    decoder = G2TRInternVLUGenerationDecoder(decoder_config).eval()
    processor = G2TRInternVLUProcessor(image_processor=G2TRInternVLUImageProcessor(), tokenizer=tokenizer)
    scheduler = DPMSolverMultistepScheduler(**DEFAULT_SCHEDULER_CONFIG)
    return G2TRInternVLUPipeline(model, processor, generation_decoder=decoder, scheduler=scheduler, device="cpu")


def print_measured(size: int, repeats: int) -> None:
    pipe = mid_size_pipeline(size)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    request = _Request(prompt="make the sky red", images=[image])
    target = (size, size)
    scheduler = DPMSolverMultistepScheduler(**DEFAULT_SCHEDULER_CONFIG)
    scheduler.set_timesteps(STEPS)
    latents = torch.randn(3, 16, size // 8, size // 8)

    def context(ratio):
        references = [pipe.encode_reference(image)]
        return pipe.encode_context(request, references, target, ratio, "clean", "kept_2d", False, 0, False)

    with torch.inference_mode():
        contexts = {ratio: context(ratio) for ratio in RATIOS}  # warm-up
        stages = {}
        for ratio in RATIOS:
            stages[f"vlm {ratio}"] = lambda ratio=ratio: context(ratio)
            stages[f"step {ratio}"] = lambda ratio=ratio: pipe.generation_decoder(
                latents, scheduler.timesteps[:1].expand(3), contexts[ratio].conditioning
            )
        for fn in stages.values():
            fn()
        samples = {name: [] for name in stages}
        for _ in range(repeats):
            for name, fn in stages.items():  # interleaved: machine noise hits both ratios alike
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(values) for name, values in samples.items()}
    tokens = {r: sum(t.shape[0] for t in contexts[r].conditioning.text_positions) for r in RATIOS}
    print(f"Part B: measured, mid-size random model, {size}x{size} edit; {platform.machine()} CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, fp32, median of {repeats} (noisy machine)")
    print()
    print("| stage | ratio 1.0 (off) | ratio 0.5 | ratio 0.5 / 1.0 |")
    print("|---|---|---|---|")
    print(f"| MMDiT context tokens (3 rows) | {tokens[1.0]} | {tokens[0.5]} | {tokens[0.5] / tokens[1.0]:.2f} |")
    for stage, label in (("vlm", "VLM side: encode + ViT + selection + 3-row LLM pass (ms)"),
                         ("step", "one solver step: MMDiT over 3 rows (ms)")):  # fmt: skip
        print(f"| {label} | {ms[f'{stage} 1.0']:.0f} | {ms[f'{stage} 0.5']:.0f} | "
              f"{ms[f'{stage} 0.5'] / ms[f'{stage} 1.0']:.2f} |")
    edit = {r: ms[f"vlm {r}"] + STEPS * ms[f"step {r}"] for r in RATIOS}
    print(f"| VLM side + {STEPS} steps (ms, decode excluded) | {edit[1.0]:.0f} | {edit[0.5]:.0f} | "
          f"{edit[0.5] / edit[1.0]:.2f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--size", type=int, default=1024, help="edit size of the analytic part (default 1024)")
    parser.add_argument("--measured-size", type=int, default=512, help="edit size of the measured part (512)")
    parser.add_argument("--system-tokens", type=int, default=100, help="estimated editing system turn length")
    parser.add_argument("--instruction-tokens", type=int, default=10, help="instruction length")
    parser.add_argument("--skip-measured", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_analytic(args.size, args.system_tokens, args.instruction_tokens)
    if not args.skip_measured:
        print_measured(args.measured_size, args.repeats)


if __name__ == "__main__":
    main()

"""What G2TR saves and costs on InternVL-U prefill: analytic accounting at the real shapes, then measured prefill of a
mid-size random InternVL-U model, keep ratio 0.5 against 1.0 (reduction off) in one run.

Setting: one 448x448 image (one tile: 256 `<IMG_CONTEXT>` between `<img>` and `</img>`) and a 30-token English
question, in the official `qwen2_5-chat-v3` prompt with the Chinese InternVL system prompt, as
`G2TRInternVLUProcessor` emits it.

1. Accounting at InternVL-U shapes (Qwen3-1.7B-class LLM: hidden 2048, 28 layers, 16 query / 8 KV heads of 128,
   SwiGLU 6144, vocab 151936):
   - prompt tokens = KV-cache entries after prefill, and KV bytes in bf16 (`g2tr_hf.profiling.kv_cache_bytes`);
   - LLM prefill FLOPs from `g2tr_hf.profiling.prefill_flops`. InternVL-U's LLM is causal over the whole prompt
     (image tokens included), so every segment is causal. Qwen3's q/k RMSNorms are left out like the other norms;
   - the stages G2TR does not shrink or adds, counted by torch's FlopCounterMode on the meta device (no weights,
     no memory): InternViT-300M + pixel shuffle + `mlp1` (unchanged), and the Qwen-Image VAE encode of the 448 px
     image that builds the anchors (added whenever r < 1).
2. Measured prefill on CPU (random weights): real 448 px / patch-14 ViT geometry (1025 ViT tokens, 256 visual
   tokens) with a narrow ViT, an LLM of hidden 1024 x 6 layers, and a small 16-channel Qwen-Image-style VAE. One
   prefill = `model(..., use_cache=True, logits_to_keep=1)` as `generate` runs it; median of `--repeats` runs, both
   ratios interleaved in the same process. The VAE anchor stage is also timed on its own.

Prompt token counts: without `--tokenizer` the script uses counts measured with the Qwen2/Qwen3 byte-level BPE
(151643 merges) on the exact prompt text of our processor: system turn 37 tokens, user header 3, image 258, "\\n" 1,
question 30, end of turn 2, assistant header 3 = 334. That BPE is the one the InternVL-U tokenizer extends; the
real `processor/tokenizer.json` was not available offline, so this is unverified: pass
`--tokenizer <snapshot>/processor` to recount with it.

Usage: python benchmarks/bench_internvlu_prefill.py [--repeats 5] [--threads N] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from g2tr_hf.compat import output_cache
from g2tr_hf.generation_g2tr import stored_length
from g2tr_hf.configuration_internvlu import QWEN_IMAGE_VAE_CONFIG, G2TRInternVLUConfig
from g2tr_hf.modeling_internvlu import G2TRInternVLUForConditionalGeneration
from g2tr_hf.profiling import INTERNVLU_LLM, Segment, kv_cache_bytes, prefill_flops
from g2tr_hf.profiling import anchor_scale_agreement
from g2tr_hf.reduction import anchor_encode_size, keep_count, reduce_tokens
from g2tr_hf.vae_single_frame import encode_single_frame_mode


RATIOS = (1.0, 0.5)
MIN_KEEP = 32  # InternVL-U's g2tr_min_keep; it binds only below ratio 0.125
IMAGE_SIZE = 448
# 30 tokens with the Qwen BPE after the processor's normalisation (which appends the final ".").
QUESTION = (
    "What is the man in the red jacket holding in his left hand, and what does the sign behind him say about the "
    "opening hours on Sunday morning"
)


@dataclass(frozen=True)
class PromptLayout:
    """Token counts of one single-image prompt, in order (image block = `<img>` + T + `</img>`)."""

    before_image: int  # system turn + user header
    image_tokens: int  # T = 256
    after_image: int  # "\n" + question + end of turn + assistant header

    def total(self, kept: int) -> int:
        return self.before_image + kept + 2 + self.after_image

    def segments(self, kept: int) -> list[Segment]:
        # Causal throughout: InternVL-U's LLM has no bidirectional image block.
        return [Segment(self.before_image), Segment(kept + 2), Segment(self.after_image)]


# Measured with the Qwen BPE (see the module docstring): 37 + 3 | 256 | 1 + 30 + 2 + 3.
MEASURED_LAYOUT = PromptLayout(before_image=40, image_tokens=256, after_image=36)


def count_layout(tokenizer_dir: str) -> PromptLayout:
    """Recount the layout with a real tokenizer, through the processor exactly as a user's call goes."""
    import PIL.Image
    from transformers import AutoTokenizer

    from g2tr_hf.processing_internvlu import G2TRInternVLUImageProcessor, G2TRInternVLUProcessor

    processor = G2TRInternVLUProcessor(
        image_processor=G2TRInternVLUImageProcessor(image_size=IMAGE_SIZE),
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
    )
    image = PIL.Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]
    ids = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    ids = ids[0] if ids and isinstance(ids[0], list) else ids
    start = ids.index(processor.tokenizer.convert_tokens_to_ids("<img>"))
    end = ids.index(processor.tokenizer.convert_tokens_to_ids("</img>"))
    return PromptLayout(before_image=start, image_tokens=end - start - 1, after_image=len(ids) - end - 1)


# ----------------------------------------------------------------------------------------------------------------
# 1. Accounting at the real shapes
# ----------------------------------------------------------------------------------------------------------------


def meta_flops(fn) -> int:
    """FLOPs of `fn()` counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unreduced_stage_flops() -> tuple[int, int, int, int]:
    """(ViT + pixel shuffle + mlp1, VAE encode, VAE encode at half resolution (pool 2), VAE encode at quarter
    resolution (pool 4)) FLOPs of one 448 px image at InternVL-U's real shapes."""
    with torch.device("meta"):
        model = G2TRInternVLUForConditionalGeneration(G2TRInternVLUConfig(vae_config=QWEN_IMAGE_VAE_CONFIG))
        pixels = torch.empty(1, 3, IMAGE_SIZE, IMAGE_SIZE)
        vit = meta_flops(lambda: model.get_image_features(pixels).pooler_output)
        # What the model runs for the anchors: the single-frame (2-D) encode of the Qwen-Image VAE. (Called directly:
        # on the meta device the model would take every weight for an offloaded one and use the 3-D encode.)
        vae = meta_flops(lambda: encode_single_frame_mode(model.model.vae, pixels))
        half_size, _ = anchor_encode_size(
            IMAGE_SIZE, IMAGE_SIZE, vae_downsample=8, patch_size=1, latent_pool=2, anchor_scale=0.5
        )
        half = meta_flops(lambda: encode_single_frame_mode(model.model.vae, torch.empty(1, 3, *half_size)))
        quarter_size, _ = anchor_encode_size(
            IMAGE_SIZE, IMAGE_SIZE, vae_downsample=8, patch_size=1, latent_pool=4, anchor_scale=0.25
        )
        quarter = meta_flops(lambda: encode_single_frame_mode(model.model.vae, torch.empty(1, 3, *quarter_size)))
    return vit, vae, half, quarter


def print_accounting(layout: PromptLayout) -> None:
    vit_flops, vae_flops, half_vae_flops, quarter_vae_flops = unreduced_stage_flops()
    full_kept, kept = layout.image_tokens, keep_count(layout.image_tokens, 0.5, MIN_KEEP)
    columns = {  # (kept tokens, anchor encode FLOPs)
        "ratio 1.0 (off)": (full_kept, 0),
        "ratio 0.5, exact anchors": (kept, vae_flops),
        "ratio 0.5, half-res anchors": (kept, half_vae_flops),
        # A coarser anchor grid (pool 4: 14 x 14 cells for 16 x 16 tokens), encoded at a quarter of the size.
        "ratio 0.5, pool 4, quarter-res anchors": (kept, quarter_vae_flops),
    }
    rows = {}
    for name, (kept_tokens, anchors) in columns.items():
        tokens = layout.total(kept_tokens)
        llm = prefill_flops(layout.segments(kept_tokens), INTERNVLU_LLM)
        rows[name] = dict(
            kept=kept_tokens,
            tokens=tokens,
            kv=kv_cache_bytes(tokens, INTERNVLU_LLM) / 2**20,
            llm=llm / 1e9,
            vit=vit_flops / 1e9,
            anchors=anchors / 1e9,
            whole=(llm + vit_flops + anchors) / 1e9,
        )
    full = rows["ratio 1.0 (off)"]

    def line(label: str, key: str, fmt: str = "{:.0f}") -> None:
        cells = [fmt.format(row[key]) for row in rows.values()]
        changes = [change(full[key], row[key]) for name, row in rows.items() if name != "ratio 1.0 (off)"]
        print(f"| {label} | " + " | ".join(cells) + " | " + " / ".join(changes) + " |")

    print(f"Accounting at InternVL-U shapes: one {IMAGE_SIZE}x{IMAGE_SIZE} image + a 30-token question "
          f"(prompt: {layout.before_image} + {layout.image_tokens + 2} + {layout.after_image} tokens)")
    print()
    print("| | " + " | ".join(columns) + " | change vs off (exact / half-res / pool 4 quarter-res) |")
    print("|---|---|---|---|---|---|")
    line("visual tokens into the LLM", "kept")
    line("prompt tokens = KV-cache entries after prefill", "tokens")
    line("KV cache, bf16 (MiB)", "kv", "{:.1f}")
    line("LLM prefill (GFLOP, analytic)", "llm")
    line("ViT + mlp1 (GFLOP, unchanged)", "vit")
    line("VAE encode for the anchors (GFLOP)", "anchors")
    line("whole prefill stage (GFLOP)", "whole")
    print()


def change(reference: float, candidate: float) -> str:
    """'1.48x less' / '1.07x more' / 'same' / 'added' for two costs."""
    if reference == candidate:
        return "same"
    if reference == 0:
        return "added"
    return f"{reference / candidate:.2f}x less" if candidate < reference else f"{candidate / reference:.2f}x more"


# ----------------------------------------------------------------------------------------------------------------
# 2. Measured prefill of a mid-size random model
# ----------------------------------------------------------------------------------------------------------------


def mid_size_config() -> G2TRInternVLUConfig:
    """Real 448 px / patch 14 geometry and token ids; narrow ViT, 1024 x 6 LLM, 16-channel VAE of width 16."""
    return G2TRInternVLUConfig(
        vision_config={
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 14,
        },
        text_config={
            "vocab_size": INTERNVLU_LLM.vocab_size,
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "tie_word_embeddings": False,
        },
        vae_config={**QWEN_IMAGE_VAE_CONFIG, "base_dim": 16, "num_res_blocks": 1},
        g2tr_min_keep=MIN_KEEP,
    )


def prefill_inputs(config: G2TRInternVLUConfig, layout: PromptLayout, seed: int = 0) -> dict[str, torch.Tensor]:
    """A prompt with the layout's token counts (random text ids), one image and its VAE pixels."""
    generator = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, 151000, (n,), generator=generator)  # noqa: E731  (ordinary tokens only)
    image_block = torch.tensor(
        [config.image_start_token_id] + [config.image_token_id] * layout.image_tokens + [config.image_end_token_id]
    )
    input_ids = torch.cat([text(layout.before_image), image_block, text(layout.after_image)])[None]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "vae_pixel_values": torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1,
        "vae_pixel_sizes": torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]]),
    }


def speed(reference: float, candidate: float) -> str:
    """'1.48x faster' / '1.79x slower' for two durations."""
    return f"{reference / candidate:.2f}x faster" if candidate <= reference else f"{candidate / reference:.2f}x slower"


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def with_anchor_scale(model, scale: float, fn):
    """Run `fn()` with `model.config.g2tr_anchor_scale = scale`, restoring the previous value."""
    previous = model.config.g2tr_anchor_scale
    model.config.g2tr_anchor_scale = scale
    try:
        return fn()
    finally:
        model.config.g2tr_anchor_scale = previous


def print_measured(layout: PromptLayout, repeats: int) -> None:
    torch.manual_seed(0)
    config = mid_size_config()
    model = G2TRInternVLUForConditionalGeneration(config).eval()
    inputs = prefill_inputs(config, layout)
    hidden = config.text_config.hidden_size
    kept = {ratio: keep_count(layout.image_tokens, ratio, MIN_KEEP) for ratio in RATIOS}

    def prefill(ratio: float, scale: float = 1.0):
        return lambda: with_anchor_scale(
            model, scale, lambda: model(**inputs, g2tr_ratio=ratio, use_cache=True, logits_to_keep=1)
        )

    def anchors_at(scale: float):
        pixels, sizes = inputs["vae_pixel_values"], inputs["vae_pixel_sizes"]
        return lambda: with_anchor_scale(model, scale, lambda: model.model.get_latent_anchors(pixels, sizes))

    with torch.inference_mode():
        features = model.get_image_features(inputs["pixel_values"]).pooler_output
        ((anchors, anchor_grid),) = anchors_at(1.0)()
        side = config.image_grid_size
        embeds = {ratio: torch.randn(1, layout.total(kept[ratio]), hidden) for ratio in RATIOS}
        stages = {
            "prefill 1.0": prefill(1.0),
            "prefill 0.5": prefill(0.5),
            "prefill 0.5 half": prefill(0.5, 0.5),
            "vision": lambda: model.get_image_features(inputs["pixel_values"]).pooler_output,
            "anchors": anchors_at(1.0),
            "anchors half": anchors_at(0.5),
            "select+merge": lambda: reduce_tokens(
                features[0], (side, side), anchors, anchor_grid, ratio=0.5, min_keep=MIN_KEEP
            ),
            **{
                f"llm {ratio}": (
                    lambda ratio=ratio: model.language_model(
                        inputs_embeds=embeds[ratio], use_cache=True, logits_to_keep=1
                    )
                )
                for ratio in RATIOS
            },
        }
        cache_lengths = {r: stored_length(output_cache(stages[f"prefill {r}"]())) for r in RATIOS}  # warm-up
        for fn in stages.values():
            fn()
        # Interleave the stages so that noise from other processes on the machine hits all of them alike.
        samples: dict[str, list[float]] = {name: [] for name in stages}
        for _ in range(repeats):
            for name, fn in stages.items():
                samples[name].append(seconds(fn))
    agreement = anchor_scale_agreement(model, inputs, anchor_scale=0.5, g2tr_ratio=0.5)
    ms = {name: 1e3 * statistics.median(values) for name, values in samples.items()}

    def cell(name: str) -> str:
        values = sorted(1e3 * value for value in samples[name])
        return f"{ms[name]:.1f} ({values[0]:.0f}-{values[-1]:.0f})"

    parameters = sum(p.numel() for p in model.parameters())
    vae_parameters = sum(p.numel() for p in model.vae.parameters())
    print(f"Measured prefill, mid-size random model ({parameters / 1e6:.0f}M parameters, of which VAE "
          f"{vae_parameters / 1e6:.1f}M): ViT {config.vision_config.hidden_size} wide x "
          f"{config.vision_config.num_hidden_layers} layers at {IMAGE_SIZE} px (1025 tokens), LLM "
          f"{hidden} x {config.text_config.num_hidden_layers} layers, VAE base_dim {config.vae_config['base_dim']}; "
          f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32, "
          f"median (min-max) of {repeats}")
    print()
    print("| stage | ratio 1.0 (off) | ratio 0.5, exact anchors | ratio 0.5, half-res anchors | change vs off |")
    print("|---|---|---|---|---|")
    print(f"| KV-cache entries after prefill (measured) | {cache_lengths[1.0]} | {cache_lengths[0.5]} | "
          f"{cache_lengths[0.5]} | {cache_lengths[1.0] / cache_lengths[0.5]:.2f}x fewer |")
    print(f"| ViT + mlp1 (ms) | {cell('vision')} | {cell('vision')} | {cell('vision')} | unchanged |")
    print(f"| VAE anchors: encode + pool + interpolate (ms) | 0 | {cell('anchors')} | {cell('anchors half')} | "
          f"added (half-res {ms['anchors'] / ms['anchors half']:.1f}x cheaper than exact) |")
    print(f"| selection + merge (ms) | 0 | {cell('select+merge')} | {cell('select+merge')} | added |")
    print(f"| LLM prefill alone (ms) | {cell('llm 1.0')} | {cell('llm 0.5')} | {cell('llm 0.5')} | "
          f"{speed(ms['llm 1.0'], ms['llm 0.5'])} |")
    print(f"| whole prefill, end to end (ms) | {cell('prefill 1.0')} | {cell('prefill 0.5')} | "
          f"{cell('prefill 0.5 half')} | exact {speed(ms['prefill 1.0'], ms['prefill 0.5'])}, half-res "
          f"{speed(ms['prefill 1.0'], ms['prefill 0.5 half'])} |")
    print()
    print(f"Keep-set agreement, half-res vs exact anchors: {agreement.shared_tokens[0]} of {agreement.kept_tokens[0]} "
          f"kept tokens shared ({agreement.agreement[0]:.1%}). Random weights: this number says nothing about "
          "quality; run `g2tr_hf.profiling.anchor_scale_agreement` on real weights and images.")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per stage (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tokenizer", default=None, help="folder of the real InternVL-U tokenizer to recount with")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layout = count_layout(args.tokenizer) if args.tokenizer else MEASURED_LAYOUT
    print_accounting(layout)
    print_measured(layout, args.repeats)


if __name__ == "__main__":
    main()

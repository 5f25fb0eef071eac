"""What G2TR saves in a BAGEL image edit: analytic at real BAGEL-7B-MoT shapes, measured on CPU.

An edit (upstream's `InterleaveInferencer`, see docs/models.md) puts the input image into the conditional context twice: a clean VAE block
(h*w + 2 tokens, never reduced) and a ViT block that G2TR shrinks from N + 2 to K + 2 tokens; then the instruction.
The sampler then runs N_steps - 1 denoising evaluations of the h*w + 2 latent query tokens against three contexts:
conditional [VAE][ViT][text], text-free [VAE][ViT] (a prefix of the conditional cache here; upstream deep-copies
it) and image-free [text]. G2TR shrinks only the ViT block, so it saves prefill work and KV memory, and in every
denoising step only the attention of the queries to the ViT keys; the linear work of the query block is unchanged.

Part A, analytic (`g2tr_hf.profiling`: linear + attention terms per decoder layer, formula in its docstring), real
shapes: a 1024x1024 input (VAE 64x64 = 4096 latent tokens, ViT 70x70 = 4900 tokens, K = 2450 at ratio 0.5, min_keep
32), a 30-token instruction, the official edit settings (50 schedule points = 49 evaluations; cfg_interval [0, 1],
text scale 4, image scale 2, so all three branches run at every step: CFG is counted from `flow_timesteps` and the
interval). One denoising branch costs `prefill_flops([context, query block]) - prefill_flops([context])`: the
linear work of the query tokens plus their attention to the context and to their own block. `lm_head` and
`llm2vae` are left out (one logit row per prefill call, and a 3584 x 64 map). The VAE encode (once per input image
in this pipeline; the official G2TR code encodes twice in editing) and the VAE decode are the same with and without
reduction and are reported apart.

Part B, measured on CPU: a mid-size random BAGEL (LLM 12 MoT layers x 1024, SigLIP 4 x 384, a small 4-block VAE;
the model of bench_bagel_prefill.py) editing a 512x512 image (VAE 32x32 = 1024 latent tokens, ViT 37x37 = 1369
tokens), ratio 0.5 vs 1.0 in one run, median of `--repeats` after a warm-up: the context prefill
(`G2TRBagelPipeline.encode_context`: one VAE encode, VAE block, SigLIP + connector + reduction, ViT block, the
instruction into both text contexts) and one denoising step at t = 1 with all three CFG branches (`_forward`).

Part C, batching (`--batch N`): several edits in one call. Analytic at real shapes: what each extra image of a
batch adds to memory (its prompt's row of the stacked context cache, and the per-step transients of its CFG branch
rows). Measured on CPU with the mid-size model: N edits of different random images of one size as one batched call
and as N sequential calls, whole pipeline calls (`--batch-steps` schedule points, `--batch-px` images), in the same
run, alternating, median of `--repeats`; each batched image is checked against its sequential twin; and the peak
resident memory of a fresh process running the batch vs a single edit (`ru_maxrss`).

Usage: python benchmarks/bench_bagel_edit.py [--repeats 3] [--threads N] [--skip-measured]
       python benchmarks/bench_bagel_edit.py --batch 4 [--batch-steps 4] [--batch-px 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from g2tr_hf.configuration_bagel import G2TRBagelConfig
from g2tr_hf.generation_g2tr import stored_length
import g2tr_hf.pipeline_bagel as pipeline_module
from g2tr_hf.pipeline_bagel import EDIT_GUIDANCE, G2TRBagelPipeline, flow_timesteps
from g2tr_hf.profiling import BAGEL_7B_LLM, DecoderShape, Segment, kv_cache_bytes, module_flops, prefill_flops
from g2tr_hf.reduction import keep_count
from mid_size import mid_size_bagel


RATIOS = (1.0, 0.5)
INSTRUCTION_TOKENS = 30  # + <|im_start|> and <|im_end|>
NUM_INFERENCE_STEPS = 50
MIN_KEEP = 32
BATCH_RATIO = 0.5


# --- Part A: analytic ------------------------------------------------------------------------------------------------


def branch_flops(query_tokens: int, context: list[Segment], shape: DecoderShape) -> int:
    """FLOPs of one denoising branch: a bidirectional block of `query_tokens` over a read-only `context`."""
    with_query = prefill_flops([*context, Segment(query_tokens, bidirectional=True)], shape)
    return with_query - prefill_flops(context, shape)


def guided_steps(num_inference_steps: int, interval: tuple[float, float]) -> tuple[int, int]:
    """(evaluations, evaluations with CFG on) for the shifted schedule (shift 3) and `cfg_interval`."""
    times = flow_timesteps(num_inference_steps, 3.0)[:-1]
    guided = (times > interval[0]) & (times <= interval[1])
    return len(times), int(guided.sum())


def vae_flops(method: str, height: int, width: int) -> int:
    """FlopCounterMode count of the FLUX AE encode or decode at one image size (meta device: no weights)."""
    from diffusers import AutoencoderKL

    config = G2TRBagelConfig()
    with torch.device("meta"):
        vae = AutoencoderKL(**config.vae_config)
        if method == "encode":
            inputs = torch.empty(1, 3, height, width)
        else:
            inputs = torch.empty(1, config.vae_config["latent_channels"], height // 8, width // 8)
    return module_flops(vae, inputs, method=method)


def analytic_table() -> None:
    shape = BAGEL_7B_LLM
    latent_tokens, vit_tokens = 64 * 64, 70 * 70
    text = Segment(INSTRUCTION_TOKENS + 2)
    evaluations, guided = guided_steps(NUM_INFERENCE_STEPS, EDIT_GUIDANCE.interval)
    rows = {}
    for ratio in RATIOS:
        kept = keep_count(vit_tokens, ratio, MIN_KEEP)
        vae_block, vit_block = Segment(latent_tokens + 2, True), Segment(kept + 2, True)
        conditional, no_text, no_image = [vae_block, vit_block, text], [vae_block, vit_block], [text]
        prefill = prefill_flops(conditional, shape) + prefill_flops(no_image, shape)
        query = latent_tokens + 2
        unguided_step = branch_flops(query, conditional, shape)
        guided_step = unguided_step + branch_flops(query, no_text, shape) + branch_flops(query, no_image, shape)
        denoise = guided * guided_step + (evaluations - guided) * unguided_step
        context_tokens = sum(s.length for s in conditional)
        held = context_tokens + text.length  # conditional + image-free caches; the text-free one is a prefix
        upstream_held = held + sum(s.length for s in no_text)  # upstream deep-copies the text-free context
        rows[ratio] = dict(
            kept=kept, context=context_tokens, held=held, upstream_held=upstream_held,
            prefill=prefill, step=guided_step, denoise=denoise, total=prefill + denoise,
        )  # fmt: skip
    full, reduced = rows[1.0], rows[0.5]
    encode, decode = vae_flops("encode", 1024, 1024), vae_flops("decode", 1024, 1024)

    def ratio(key: str) -> str:
        return f"{full[key] / reduced[key]:.2f}x"

    print("## A. Analytic, BAGEL-7B-MoT LLM shapes (28 layers x 3584, GQA 28/4), one 1024x1024 edit, "
          f"{NUM_INFERENCE_STEPS} steps ({evaluations} evaluations, CFG on {guided}: 3 branches each)")
    print()
    print("| | ratio 1.0 | ratio 0.5 | saving |")
    print("|---|---|---|---|")
    print(f"| ViT tokens of the input image | {vit_tokens} | {reduced['kept']} | {vit_tokens / reduced['kept']:.2f}x |")
    print(f"| conditional context tokens [VAE 4098][ViT K+2][text 32] | {full['context']} | {reduced['context']} | "
          f"{ratio('context')} |")
    print(f"| KV entries held (conditional + image-free; text-free = prefix) | {full['held']} | {reduced['held']} | "
          f"{ratio('held')} |")
    print(f"| KV bytes held (bf16) | {kv_cache_bytes(full['held'], shape) / 2**20:.0f} MiB | "
          f"{kv_cache_bytes(reduced['held'], shape) / 2**20:.0f} MiB | {ratio('held')} |")
    print(f"| KV entries with upstream's deep-copied text-free context | {full['upstream_held']} | "
          f"{reduced['upstream_held']} | {ratio('upstream_held')} |")
    print(f"| context prefill (TFLOP) | {full['prefill'] / 1e12:.1f} | {reduced['prefill'] / 1e12:.1f} | "
          f"{ratio('prefill')} |")
    print(f"| one guided denoising step, 3 branches (TFLOP) | {full['step'] / 1e12:.1f} | "
          f"{reduced['step'] / 1e12:.1f} | {ratio('step')} |")
    print(f"| all {evaluations} denoising evaluations (TFLOP) | {full['denoise'] / 1e12:.0f} | "
          f"{reduced['denoise'] / 1e12:.0f} | {ratio('denoise')} |")
    print(f"| whole edit, LLM (TFLOP) | {full['total'] / 1e12:.0f} | {reduced['total'] / 1e12:.0f} | "
          f"{ratio('total')} |")
    both = encode + decode
    print(f"| whole edit + VAE encode x1 and decode ({both / 1e12:.1f} TFLOP, same on both sides) | "
          f"{(full['total'] + both) / 1e12:.0f} | {(reduced['total'] + both) / 1e12:.0f} | "
          f"{(full['total'] + both) / (reduced['total'] + both):.2f}x |")
    print()
    print(f"The anchors reuse the VAE block's latent: the official G2TR code's second encode ({encode / 1e12:.2f} "
          "TFLOP at 1024x1024) is not run. SigLIP + connector run on all N tokens on both sides (not counted).")
    print()


# --- Part B: measured ------------------------------------------------------------------------------------------------


def mid_size_pipeline() -> G2TRBagelPipeline:
    model, processor = mid_size_bagel(min_keep=MIN_KEEP)
    pipe = G2TRBagelPipeline(model=model, processor=processor, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measured_table(repeats: int) -> None:
    pipe = mid_size_pipeline()
    image = Image.fromarray((np.random.RandomState(0).rand(512, 512, 3) * 255).astype(np.uint8))
    instruction = " ".join(["red"] * INSTRUCTION_TOKENS)  # one token per word with the tiny tokenizer
    requests, _ = pipe.check_inputs(
        prompt=instruction, image=image, num_inference_steps=NUM_INFERENCE_STEPS, generator=None, g2tr_ratio=None,
        cfg_text_scale=None, cfg_img_scale=None, cfg_interval=None, cfg_renorm_type=None, cfg_renorm_min=None,
        timestep_shift=3.0, height=None, width=None, think=False, max_think_tokens=1, output_type="pil",
    )  # fmt: skip
    request = requests[0]
    model_inputs = pipe.preprocess(request)
    grid = pipe.output_latent_grid(model_inputs, None, None)
    latents = pipe.prepare_latents(grid, torch.Generator().manual_seed(0))
    vit_grid = model_inputs["images"][0]["image_grid_hw"][0].tolist()

    # The two ratios alternate inside every round, so that a slow spell of a shared machine hits both alike; the
    # first round warms up.
    seconds = {(ratio, stage): [] for ratio in RATIOS for stage in ("prefill", "step")}
    contexts = {}
    for _ in range(repeats + 1):
        for ratio in RATIOS:
            start = time.perf_counter()
            with torch.inference_mode():
                contexts[ratio] = pipe.encode_context(model_inputs, ratio, think=False)
            seconds[ratio, "prefill"].append(time.perf_counter() - start)
            stacked = pipeline_module.stack_contexts([contexts[ratio]], pipe.model.config.get_text_config())
            start = time.perf_counter()
            with torch.inference_mode():
                pipe._forward([latents], torch.tensor(1.0), [grid], stacked, [request.guidance], [0])
            seconds[ratio, "step"].append(time.perf_counter() - start)
    rows = {
        ratio: dict(
            prefill=statistics.median(seconds[ratio, "prefill"][1:]),
            step=statistics.median(seconds[ratio, "step"][1:]),
            context=stored_length(contexts[ratio].conditional[0]),
            held=stored_length(contexts[ratio].conditional[0]) + stored_length(contexts[ratio].no_image[0]),
        )
        for ratio in RATIOS
    }
    full, reduced = rows[1.0], rows[0.5]
    print(f"## B. Measured on CPU ({torch.get_num_threads()} threads, torch {torch.__version__}): mid-size random "
          f"BAGEL (LLM 12 x 1024), 512x512 edit (VAE {grid[0]}x{grid[1]} = {grid[0] * grid[1]} latent tokens, ViT "
          f"{vit_grid[0]}x{vit_grid[1]} = {vit_grid[0] * vit_grid[1]} tokens), median of {repeats}")
    print()
    print("| | ratio 1.0 | ratio 0.5 | ratio |")
    print("|---|---|---|---|")
    print(f"| conditional context tokens | {full['context']} | {reduced['context']} | "
          f"{full['context'] / reduced['context']:.2f}x |")
    print(f"| KV entries held | {full['held']} | {reduced['held']} | {full['held'] / reduced['held']:.2f}x |")
    print(f"| context prefill: VAE encode + VAE block + ViT (+ reduction) + ViT block + text (s) | "
          f"{full['prefill']:.3f} | {reduced['prefill']:.3f} | {full['prefill'] / reduced['prefill']:.2f}x |")
    print(f"| one denoising step, 3 CFG branches (s) | {full['step']:.3f} | {reduced['step']:.3f} | "
          f"{full['step'] / reduced['step']:.2f}x |")
    print()


# --- Part C: batching -----------------------------------------------------------------------------------------------


def batch_memory_per_image(shape: DecoderShape, bytes_per_value: int = 2) -> dict[str, float]:
    """MiB that one more 1024x1024 edit (ratio 0.5, edit preset: 3 CFG branches) adds to a batch, at real shapes.

    - its prompt's row of the stacked context: [conditional | image-free] entries, K and V of every layer (while the
      row is copied in, its batch-1 caches exist too: twice that, briefly);
    - per denoising step, per decoder layer (one layer's transients live at a time), for its 3 branch rows of
      4096 + 2 query tokens: the gathered context + query keys and values, the hidden states, and the MLP's gate / up
      activations (the largest transient). Attention scores are not counted (SDPA's fused kernels do not store them).
    """
    mib = 2**20
    kept = keep_count(70 * 70, 0.5, MIN_KEEP)
    query = 64 * 64 + 2
    conditional = query + (kept + 2) + INSTRUCTION_TOKENS + 2
    image_free = INSTRUCTION_TOKENS + 2
    row = conditional + image_free
    branches = 3
    kv_entry_layer = 2 * shape.num_kv_heads * shape.head_dim * bytes_per_value
    return dict(
        context_entries=row,
        context=kv_cache_bytes(row, shape, bytes_per_value) / mib,
        step_kv=branches * (row + query) * kv_entry_layer / mib,
        step_hidden=branches * query * shape.hidden_size * bytes_per_value / mib,
        step_mlp=2 * branches * query * shape.intermediate_size * bytes_per_value / mib,
    )


def batch_memory_table() -> None:
    memory = batch_memory_per_image(BAGEL_7B_LLM)
    print("## C. Batching: memory each extra 1024x1024 edit adds (analytic, BAGEL-7B-MoT, bf16, ratio 0.5)")
    print()
    print("| what | per extra image (MiB) |")
    print("|---|---|")
    print(f"| its prompt's row of the stacked context cache ({memory['context_entries']} entries x 28 layers) | "
          f"{memory['context']:.0f} (held for the whole call) |")
    print(f"| per step and layer: gathered context + query K/V of its 3 CFG branch rows | {memory['step_kv']:.0f} |")
    print(f"| per step and layer: hidden states of its 3 branch rows (one tensor) | {memory['step_hidden']:.0f} |")
    print(f"| per step and layer: MLP gate + up activations of its 3 branch rows | {memory['step_mlp']:.0f} |")
    print()
    print("With `num_images_per_prompt` the extra images of a prompt share its context row: only the per-step "
          "transients grow.")
    print()
    # One pass serves every branch, so every branch row carries the keys of its prompt's whole row; the image-free
    # branch sees only its short text part and the rest is masked. Kernels that do not skip masked keys still
    # compute those scores.
    shape = BAGEL_7B_LLM
    query, kept = 64 * 64 + 2, keep_count(70 * 70, 0.5, MIN_KEEP)
    conditional = query + kept + 2 + INSTRUCTION_TOKENS + 2
    masked = 4 * query * conditional * shape.num_heads * shape.head_dim * shape.num_layers
    vae_block, vit_block, text = Segment(query, True), Segment(kept + 2, True), Segment(INSTRUCTION_TOKENS + 2)
    contexts = ([vae_block, vit_block, text], [vae_block, vit_block], [text])
    step = sum(branch_flops(query, context, shape) for context in contexts)
    print(f"Masked work of one batched guided step: the image-free branch row's scores against the {conditional} "
          f"masked conditional entries, {masked / 1e12:.1f} TFLOP on top of {step / 1e12:.1f} TFLOP "
          f"({100 * masked / step:.1f}%), for kernels that compute masked scores.")
    print()


def batch_inputs(count: int, size: int) -> tuple[list[str], list[Image.Image]]:
    rng = np.random.RandomState(1)
    images = [Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8)) for _ in range(count)]
    prompts = [" ".join(["red"] * (INSTRUCTION_TOKENS - index)) for index in range(count)]  # different lengths
    return prompts, images


def peak_rss_child(count: int, steps: int, size: int) -> float:
    """Peak resident MiB of a fresh process that loads the mid-size model and runs `count` edits as one call."""
    command = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(count),
               "--batch-steps", str(steps), "--batch-px", str(size)]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_mib"]


def rss_child(count: int, steps: int, size: int) -> None:
    pipe = mid_size_pipeline()
    prompts, images = batch_inputs(count, size)
    with torch.inference_mode():
        pipe(prompt=prompts, image=images, num_inference_steps=steps, g2tr_ratio=BATCH_RATIO, output_type="latent",
             show_progress=False)  # fmt: skip
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def batched_throughput_table(count: int, steps: int, size: int, repeats: int) -> None:
    pipe = mid_size_pipeline()
    prompts, images = batch_inputs(count, size)
    call = dict(num_inference_steps=steps, g2tr_ratio=BATCH_RATIO, output_type="latent", show_progress=False)
    seconds = {"sequential": [], "batched": []}
    results = {}
    # Both ways alternate inside every round so that a slow spell of a shared machine hits both alike; the first
    # round warms up.
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.inference_mode():
            sequential = [
                pipe(prompt=prompt, image=image, generator=torch.Generator().manual_seed(index), **call).images[0]
                for index, (prompt, image) in enumerate(zip(prompts, images))
            ]
        seconds["sequential"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            generators = [torch.Generator().manual_seed(index) for index in range(count)]
            batched = pipe(prompt=prompts, image=images, generator=generators, **call).images
        seconds["batched"].append(time.perf_counter() - start)
        results = dict(sequential=sequential, batched=batched)
    difference = max(float((a - b).abs().max()) for a, b in zip(results["sequential"], results["batched"]))
    sequential_s, batched_s = (statistics.median(seconds[key][1:]) for key in ("sequential", "batched"))
    grid = results["batched"][0].shape[0]
    print(f"## C. Measured on CPU ({torch.get_num_threads()} threads): mid-size random BAGEL (LLM 12 x 1024), {count} "
          f"edits of different {size}x{size} images ({grid} latent tokens each, ratio {BATCH_RATIO}),"
          f" {steps} schedule points ({steps - 1} steps, 3 CFG branches each), whole calls, median of {repeats}")
    print()
    print(f"| | {count} sequential calls | one call, batch of {count} | speed-up |")
    print("|---|---|---|---|")
    print(f"| wall time (s) | {sequential_s:.2f} | {batched_s:.2f} | {sequential_s / batched_s:.2f}x |")
    print(f"| images per second | {count / sequential_s:.3f} | {count / batched_s:.3f} | |")
    print(f"| decoder rows per denoising pass | 3 | {3 * count} | |")
    print()
    print(f"Largest difference between a batched image's final latent and its sequential twin: {difference:.2e}.")
    single_peak = peak_rss_child(1, steps, size)
    batch_peak = peak_rss_child(count, steps, size)
    print(f"Peak resident memory of a fresh process (ru_maxrss, fp32): one edit {single_peak:.0f} MiB, batch of "
          f"{count} {batch_peak:.0f} MiB: {(batch_peak - single_peak) / (count - 1):.0f} MiB per extra image.")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-measured", action="store_true")
    parser.add_argument("--batch", type=int, default=None, help="also compare N edits batched vs sequential")
    parser.add_argument("--batch-steps", type=int, default=4, help="schedule points of the batch comparison (4)")
    parser.add_argument(
        "--batch-px", type=int, default=512, help="image side in the batch comparison (512, the VAE's minimum side)"
    )
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.batch_steps, args.batch_px)
        return
    if args.batch:
        if args.batch < 2:
            parser.error("--batch must be at least 2")
        batch_memory_table()
        if not args.skip_measured:
            batched_throughput_table(args.batch, args.batch_steps, args.batch_px, args.repeats)
        return
    analytic_table()
    if not args.skip_measured:
        measured_table(args.repeats)


if __name__ == "__main__":
    main()

"""What VScan's ViT-side scoring costs, against the ViT it rides on and the LLM prefill it saves.

VScan ranks tokens by the attention of two ViT layers (the last one run and layer round(5/24 * depth)). g2tr_hf
captures those layers' inputs while the ViT runs and recomputes the scores by hand (BAGEL: the attention each patch
receives, a full N x N map per head in row blocks; InternVL-U: the [CLS] query row only).

1. FLOPs at the real shapes, counted by torch's FlopCounterMode on the meta device (no weights, no memory): the two
   layers' scores and one full ViT layer, for BAGEL's SigLIP at `--bagel-side`^2 patches and InternVL-U's InternViT
   on one 448 px tile (1 + 1024 tokens); the analytic LLM prefill (Qwen2.5-7B / InternVL-U's 28-layer LLM) of one
   image with a short question, unreduced, G2TR at 0.5 and VScan at the ratio whose layer average is 50 % (0.618).
2. Measured CPU time, real-size single layers with random weights: the score computation of one layer against one
   ViT layer's forward, median of `--repeats`, interleaved in one process.

Usage: python benchmarks/bench_vscan_overhead.py [--bagel-side 70] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from g2tr_hf.baselines import vscan_vit_layers
from g2tr_hf.configuration_bagel import G2TRBagelConfig
from g2tr_hf.configuration_internvlu import G2TRInternViTConfig
from g2tr_hf.in_llm import drop_schedule, ratio_for_layer_average
from g2tr_hf.modeling_bagel import BagelSiglipEncoderLayer, G2TRBagelModel
from g2tr_hf.modeling_internvlu import G2TRInternVLUModel, InternViTLayer
from g2tr_hf.profiling import BAGEL_7B_LLM, INTERNVLU_LLM, Segment, prefill_flops
from g2tr_hf.reduction import keep_count


QUESTION_TOKENS = 24  # system/user framing and a short question around the image block


class _InternVLUScorer:
    """Just what `G2TRInternVLUModel._token_cls_attention` reads from `self`: the config's downsample ratio."""

    class config:
        downsample_ratio = 0.5


def bagel_scores(layer, hidden):
    return G2TRBagelModel._siglip_received_attention(layer, hidden, [hidden.shape[1]])


def internvlu_scores(layer, hidden):
    return G2TRInternVLUModel._token_cls_attention(_InternVLUScorer(), layer, hidden)


def count(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def llm_flops(shape, schedule_keep: list[tuple[int, int]], bidirectional: bool) -> int:
    """Prefill FLOPs, layer by layer: `schedule_keep` lists (first layer, image tokens from there on)."""
    one_layer = replace(shape, num_layers=1)
    lm_head = 2 * shape.hidden_size * shape.vocab_size
    total = lm_head
    for layer in range(shape.num_layers):
        tokens = [n for start, n in schedule_keep if start <= layer][-1]
        text = Segment(QUESTION_TOKENS // 2)
        segments = [text, Segment(tokens + 2, bidirectional, True), text]
        total += prefill_flops(segments, one_layer) - lm_head
    return total


def analytic(name, layer_factory, scores, tokens, llm_shape, image_tokens, vit_depth, bidirectional):
    with torch.device("meta"):
        layer = layer_factory()
        hidden = torch.empty(1, tokens, layer_factory.hidden)
    score_flops = 2 * count(scores, layer, hidden)  # two scanned layers
    vit_flops = vit_depth * count(layer, hidden)
    ratio = ratio_for_layer_average("vscan", llm_shape.num_layers, 0.5)
    entering = keep_count(image_tokens, ratio, 32)
    middle = drop_schedule("vscan", llm_shape.num_layers, ratio).drop_layers[0]
    unreduced = llm_flops(llm_shape, [(0, image_tokens)], bidirectional)
    g2tr = llm_flops(llm_shape, [(0, keep_count(image_tokens, 0.5, 32))], bidirectional)
    vscan = llm_flops(llm_shape, [(0, entering), (middle, keep_count(entering, ratio, 32))], bidirectional)
    print(f"\n{name}: {tokens} ViT tokens, {image_tokens} LLM image tokens, layers scanned "
          f"{vscan_vit_layers(vit_depth)} of {vit_depth}")  # fmt: skip
    print(f"  VScan scores (2 layers): {score_flops / 1e9:8.1f} GFLOP = {100 * score_flops / vit_flops:.2f} % of the "
          f"ViT ({vit_flops / 1e12:.2f} TFLOP)")  # fmt: skip
    print(f"  LLM prefill: unreduced {unreduced / 1e12:.2f} TFLOP | G2TR 0.5: {g2tr / 1e12:.2f} "
          f"({unreduced / g2tr:.2f}x) | VScan {ratio:.3f} (layer average 50 %): {vscan / 1e12:.2f} "
          f"({unreduced / vscan:.2f}x)")  # fmt: skip
    print(f"  VScan scores / LLM FLOPs VScan saves: {100 * score_flops / (unreduced - vscan):.2f} %")


def timed(name, layer_factory, scores, tokens, repeats):
    torch.manual_seed(0)
    layer = layer_factory().eval()
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    hidden = torch.randn(1, tokens, layer_factory.hidden)
    runs = {"one ViT layer forward": lambda: layer(hidden), "VScan scores of one layer": lambda: scores(layer, hidden)}
    times = {key: [] for key in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(repeats):
            for key, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(values) for key, values in times.items()}
    layer_ms, score_ms = (1e3 * medians[key] for key in runs)
    spreads = {key: 1e3 * (max(values) - min(values)) for key, values in times.items()}
    print(f"  {name}: one ViT layer {layer_ms:.1f} ms (spread {spreads['one ViT layer forward']:.1f}), scores of "
          f"one layer {score_ms:.1f} ms (spread {spreads['VScan scores of one layer']:.1f}): "
          f"{score_ms / layer_ms:.2f} of a layer")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bagel-side", type=int, default=70, help="patches per side of the BAGEL image (70: 980 px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    siglip = G2TRBagelConfig().vit_config
    siglip._attn_implementation = "sdpa"

    def bagel_layer():
        return BagelSiglipEncoderLayer(siglip)

    bagel_layer.hidden = siglip.hidden_size
    internvit = G2TRInternViTConfig()
    internvit._attn_implementation = "sdpa"

    def internvlu_layer():
        return InternViTLayer(internvit)

    internvlu_layer.hidden = internvit.hidden_size

    bagel_tokens = args.bagel_side**2
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("1. Analytic / FlopCounterMode at the real shapes")
    analytic("BAGEL (SigLIP-so400m, Qwen2.5-7B)", bagel_layer, bagel_scores, bagel_tokens, BAGEL_7B_LLM,
             bagel_tokens, siglip.num_hidden_layers, True)  # fmt: skip
    analytic("InternVL-U (InternViT-300M, one 448 px tile)", internvlu_layer, internvlu_scores, 1025, INTERNVLU_LLM,
             256, internvit.num_hidden_layers, False)  # fmt: skip
    print(f"\n2. Measured, CPU, real-size layers with random weights, median of {args.repeats}")
    timed(f"BAGEL SigLIP layer, {bagel_tokens} tokens", bagel_layer, bagel_scores, bagel_tokens, args.repeats)
    timed("InternViT layer, 1025 tokens", internvlu_layer, internvlu_scores, 1025, args.repeats)


if __name__ == "__main__":
    main()

"""Token, KV-cache and prefill-FLOPs accounting.

The FLOPs are analytic: one multiply-add counts as 2 FLOPs, and for a decoder layer

    linear(n)    = 2 * n * (d * d_q + 2 * d * d_kv + d_q * d + 3 * d * m)      q, k, v, o and a SwiGLU MLP
    attention(n) = 4 * d_q * sum over query tokens of the number of keys they see       QK^T and AV

with d the hidden size, d_q = heads * head_dim, d_kv = kv_heads * head_dim and m the MLP width. A text token sees
the keys before it and itself (causal); a token of an image block sees every earlier key and its whole block
(bidirectional), as in BAGEL. Norms, RoPE and softmax are left out (lower order). In a Mixture-of-Transformers
decoder (BAGEL) each token goes through exactly one expert and both experts have the same shapes, so the count
is the same as for one dense decoder. The LM head is counted for the last token only (prefill produces one
logit row).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch


__all__ = [
    "AnchorScaleAgreement",
    "BAGEL_7B_LLM",
    "INTERNVLU_LLM",
    "DecoderShape",
    "RequestAccounting",
    "RequestProfile",
    "Segment",
    "account_request",
    "anchor_scale_agreement",
    "decoder_shape",
    "kv_cache_bytes",
    "module_flops",
    "prefill_flops",
    "profile_request",
    "prompt_segments",
]


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder-only LLM that the FLOPs and KV formulas need."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


# Qwen2.5-7B as used by BAGEL-7B-MoT.
BAGEL_7B_LLM = DecoderShape(
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    vocab_size=152064,
)


# The LLM of InternVL-U (Qwen3-1.7B-shaped). d_q = 16 * 128 = 2048 = hidden size.
INTERNVLU_LLM = DecoderShape(
    hidden_size=2048,
    intermediate_size=6144,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=151936,
)


@dataclass(frozen=True)
class Segment:
    """A run of prefill tokens: `length` tokens, attending causally (text) or bidirectionally (a BAGEL image
    block); `image` marks an image block (its two markers included)."""

    length: int
    bidirectional: bool = False
    image: bool = False


def _keys_seen(segments: Sequence[Segment]) -> int:
    """Sum over all query tokens of the number of keys each one attends to."""
    total, prefix = 0, 0
    for segment in segments:
        n = segment.length
        total += n * (prefix + n) if segment.bidirectional else n * prefix + n * (n + 1) // 2
        prefix += n
    return total


def prefill_flops(segments: Sequence[Segment], shape: DecoderShape) -> int:
    """Analytic FLOPs of one prefill over `segments` (see the module docstring for the formula)."""
    d, m = shape.hidden_size, shape.intermediate_size
    d_q, d_kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    num_tokens = sum(s.length for s in segments)
    linear = 2 * num_tokens * (d * d_q + 2 * d * d_kv + d_q * d + 3 * d * m)
    attention = 4 * d_q * _keys_seen(segments)
    lm_head = 2 * d * shape.vocab_size
    return shape.num_layers * (linear + attention) + lm_head


def kv_cache_bytes(num_tokens: int, shape: DecoderShape, bytes_per_value: int = 2) -> int:
    """Bytes of K and V over all layers for `num_tokens` cached tokens (bf16 by default)."""
    return num_tokens * 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * bytes_per_value


def decoder_shape(text_config) -> DecoderShape:
    """The `DecoderShape` of a transformers text config (Qwen2, Qwen3, ...)."""
    heads = text_config.num_attention_heads
    return DecoderShape(
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_layers=text_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        vocab_size=text_config.vocab_size,
    )


def prompt_segments(
    input_ids: torch.Tensor,
    image_start_token_id: int,
    image_end_token_id: int,
    kept_image_tokens: Sequence[int] | None = None,
    bidirectional_images: bool = True,
) -> list[Segment]:
    """Split one prompt into text runs and image blocks (markers included), optionally shrinking each image block
    to its kept token count.

    Args:
        input_ids: [L] one row without padding.
        kept_image_tokens: for each image block in order, the number of image tokens that stay (None: all).
        bidirectional_images: image blocks attend bidirectionally (BAGEL) or causally (InternVL-U).
    Returns:
        Segments in prompt order; an image block is `K + 2` long and has `image=True`.
    """
    starts = (input_ids == image_start_token_id).nonzero().flatten().tolist()
    ends = (input_ids == image_end_token_id).nonzero().flatten().tolist()
    if len(starts) != len(ends) or any(e <= s for s, e in zip(starts, ends)):
        raise ValueError("`input_ids` must hold matching image start and end markers.")
    if kept_image_tokens is not None and len(kept_image_tokens) != len(starts):
        raise ValueError(
            f"`kept_image_tokens` needs one count per image block ({len(starts)}), got {len(kept_image_tokens)}."
        )
    segments: list[Segment] = []
    text_start = 0
    for index, (start, end) in enumerate(zip(starts, ends)):
        if start > text_start:
            segments.append(Segment(start - text_start))
        inner = end - start - 1 if kept_image_tokens is None else kept_image_tokens[index]
        segments.append(Segment(inner + 2, bidirectional=bidirectional_images, image=True))
        text_start = end + 1
    if input_ids.numel() > text_start:
        segments.append(Segment(input_ids.numel() - text_start))
    return segments


def module_flops(module: torch.nn.Module, *inputs: torch.Tensor, method: str = "forward") -> int:
    """FLOPs of one call of `module.<method>(*inputs)` counted by torch's FlopCounterMode (matmuls, convolutions
    and attention; elementwise ops are not counted). Runs on the meta device when the module lives there, so the
    count of a full-size model costs no memory and no time."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        getattr(module, method)(*inputs)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class RequestAccounting:
    """One request, without and with reduction (each pair is (unreduced, reduced))."""

    image_tokens: tuple[int, ...]  # ViT tokens per image
    kept_tokens: tuple[int, ...]  # K per image
    image_block_entries: tuple[int, int]  # KV entries of the image blocks (K + 2 each, markers included)
    kv_entries: tuple[int, int]
    kv_bytes: tuple[int, int]
    prefill_flops: tuple[int, int]

    @property
    def kv_ratio(self) -> float:
        return self.kv_entries[0] / self.kv_entries[1]

    @property
    def flops_ratio(self) -> float:
        return self.prefill_flops[0] / self.prefill_flops[1]


def account_request(
    input_ids: torch.Tensor,
    shape: DecoderShape,
    *,
    image_start_token_id: int,
    image_end_token_id: int,
    kept_image_tokens: Sequence[int],
    bidirectional_images: bool = True,
    bytes_per_value: int = 2,
) -> RequestAccounting:
    """KV entries, KV bytes and analytic prefill FLOPs of one prompt [L] with full and with reduced image blocks."""
    full = prompt_segments(input_ids, image_start_token_id, image_end_token_id, None, bidirectional_images)
    reduced = prompt_segments(
        input_ids, image_start_token_id, image_end_token_id, kept_image_tokens, bidirectional_images
    )
    image_tokens = tuple(segment.length - 2 for segment in full if segment.image)
    entries = (sum(s.length for s in full), sum(s.length for s in reduced))
    return RequestAccounting(
        image_tokens=image_tokens,
        kept_tokens=tuple(kept_image_tokens),
        image_block_entries=(
            sum(s.length for s in full if s.image),
            sum(s.length for s in reduced if s.image),
        ),
        kv_entries=entries,
        kv_bytes=(kv_cache_bytes(entries[0], shape, bytes_per_value), kv_cache_bytes(entries[1], shape, bytes_per_value)),
        prefill_flops=(prefill_flops(full, shape), prefill_flops(reduced, shape)),
    )


@dataclass(frozen=True)
class RequestProfile:
    """What one request costs without and with reduction on a g2tr_hf model (pairs are (ratio 1.0, ratio r))."""

    ratio: float
    accounting: RequestAccounting  # tokens, KV entries and bytes, analytic LLM prefill FLOPs
    anchor_encode_flops: int  # the VAE encode that builds the anchors, counted on the model (0 when not run)
    prefill_seconds: tuple[float, float]  # measured `model(**inputs, use_cache=True)`, median of the repeats


def _image_markers(config) -> tuple[int, int, bool]:
    """(start id, end id, bidirectional) of an image block: BAGEL's vision markers, InternVL-U's <img> </img>."""
    if getattr(config, "vision_start_token_id", None) is not None:
        return config.vision_start_token_id, config.vision_end_token_id, True
    return config.image_start_token_id, config.image_end_token_id, False


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-call kernel set-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Methods of the backbones whose work a reduction adds on top of the unreduced forward: the anchor encode (G2TR)
# and VScan's hand-computed ViT attention scores.
_ANCHOR_ENCODE = ("encode_vae_latents",)
_REDUCTION_OVERHEAD = ("encode_vae_latents", "_siglip_received_attention", "_token_cls_attention")


def _count_anchor_encode(model, run, names: tuple[str, ...] = _ANCHOR_ENCODE):
    """`run()` and the FLOPs of the base model's `names` methods called inside it (by default `encode_vae_latents`,
    however the encode is done: InternVL-U's single-frame path convolves functionally, outside any VAE module)."""
    from torch.utils.flop_counter import FlopCounterMode

    base = model.model
    flops = 0

    def counting(method):
        def counted(*args, **kwargs):
            nonlocal flops
            with FlopCounterMode(display=False) as counter:
                output = method(*args, **kwargs)
            flops += counter.get_total_flops()
            return output

        return counted

    wrapped = [name for name in names if hasattr(base, name)]
    for name in wrapped:
        setattr(base, name, counting(getattr(base, name)))
    try:
        return run(), flops
    finally:
        for name in wrapped:
            delattr(base, name)


def _count_reduction_overhead(model, run):
    """`run()` and the FLOPs a reduction adds inside it: anchor encodes and VScan's ViT attention scores."""
    return _count_anchor_encode(model, run, _REDUCTION_OVERHEAD)


def profile_request(model, inputs: Mapping[str, torch.Tensor], *, g2tr_ratio: float | None = None, repeats: int = 3):
    """Profile one prefill of a g2tr_hf model (BAGEL or InternVL-U) at ratio 1.0 and at `g2tr_ratio`.

    Args:
        model: a g2tr_hf model in eval mode.
        inputs: its processor's output for ONE request (batch 1).
        g2tr_ratio: the reduced ratio (the model config's when None).
        repeats: timed prefills per ratio (after one warm-up).
    Returns:
        `RequestProfile`. The kept counts come from the model's own reduction plans; the anchor encode FLOPs are
        what FlopCounterMode counts inside the backbone's `encode_vae_latents` during the reduced prefill.
    """
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"`inputs` must hold one request (batch 1), got batch {inputs['input_ids'].shape[0]}.")
    ratio = model.config.resolve_g2tr_ratio(g2tr_ratio)
    with torch.inference_mode():
        reduced, anchor_flops = _count_anchor_encode(model, lambda: model(**inputs, use_cache=True, g2tr_ratio=ratio))
        seconds = tuple(
            _median_seconds(lambda r=r: model(**inputs, use_cache=True, g2tr_ratio=r), repeats) for r in (1.0, ratio)
        )
    plans = reduced.image_reductions
    start_id, end_id, bidirectional = _image_markers(model.config)
    row = inputs["input_ids"][0].cpu()
    if "attention_mask" in inputs:
        row = row[inputs["attention_mask"][0].cpu().bool()]
    if plans:
        kept = [plan.num_kept for plan in plans]
    else:  # nothing was reduced (ratio 1.0, or min_keep covers every image)
        kept = [segment.length - 2 for segment in prompt_segments(row, start_id, end_id) if segment.image]
    accounting = account_request(
        row,
        decoder_shape(model.config.get_text_config()),
        image_start_token_id=start_id,
        image_end_token_id=end_id,
        kept_image_tokens=kept,
        bidirectional_images=bidirectional,
    )
    return RequestProfile(ratio, accounting, int(anchor_flops), (seconds[0], seconds[1]))


@dataclass(frozen=True)
class AnchorScaleAgreement:
    """How reduced-resolution anchors change one request's keep sets (pairs are (scale 1.0, `anchor_scale`)).

    `agreement[i]` is |keep_full & keep_scaled| / |keep_full| for image i: 1.0 means the same tokens are kept. On
    random weights it says nothing about quality; measure it on real weights and real images.
    """

    anchor_scale: float
    ratio: float
    kept_tokens: tuple[int, ...]
    shared_tokens: tuple[int, ...]
    anchor_encode_flops: tuple[int, int]

    @property
    def agreement(self) -> tuple[float, ...]:
        return tuple(shared / kept for shared, kept in zip(self.shared_tokens, self.kept_tokens))


def anchor_scale_agreement(
    model, inputs: Mapping[str, torch.Tensor], *, anchor_scale: float = 0.5, g2tr_ratio: float | None = None
) -> AnchorScaleAgreement:
    """Run one reduced prefill with full-resolution anchors and one with `anchor_scale`, and compare the keep sets.

    Args:
        model: a g2tr_hf model (BAGEL or InternVL-U) in eval mode; its `config.g2tr_anchor_scale` is restored after.
        inputs: its processor's output (any batch; images are compared one by one).
        anchor_scale: the reduced anchor resolution to compare against 1.0.
        g2tr_ratio: the keep ratio (the config's when None); must reduce something.
    Returns:
        `AnchorScaleAgreement` with per-image kept and shared counts and the anchor-encode FLOPs of both runs.
    """
    config = model.config
    ratio = config.resolve_g2tr_ratio(g2tr_ratio)
    original = config.g2tr_anchor_scale
    plans, flops = [], []
    try:
        for scale in (1.0, anchor_scale):
            config.g2tr_anchor_scale = scale
            config.validate_g2tr()
            with torch.inference_mode():
                output, encode_flops = _count_anchor_encode(model, lambda: model(**inputs, g2tr_ratio=ratio))
            if not output.image_reductions:
                raise ValueError(
                    f"g2tr_ratio={ratio} reduces no image of this request, so there are no keep sets to compare."
                )
            plans.append(output.image_reductions)
            flops.append(int(encode_flops))
    finally:
        config.g2tr_anchor_scale = original
    kept, shared = [], []
    for full, scaled in zip(*plans):
        kept.append(int(full.keep.numel()))
        shared.append(int(torch.isin(full.keep, scaled.keep).sum()))
    return AnchorScaleAgreement(float(anchor_scale), ratio, tuple(kept), tuple(shared), (flops[0], flops[1]))

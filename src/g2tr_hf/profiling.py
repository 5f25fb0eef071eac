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

from dataclasses import dataclass
from typing import Sequence

import torch


__all__ = [
    "BAGEL_7B_LLM",
    "DecoderShape",
    "RequestAccounting",
    "Segment",
    "account_request",
    "decoder_shape",
    "kv_cache_bytes",
    "module_flops",
    "prefill_flops",
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


# Qwen2.5-7B as used by BAGEL-7B-MoT (shared/specs/bagel.md §1.1).
BAGEL_7B_LLM = DecoderShape(
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    vocab_size=152064,
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
        kv_entries=entries,
        kv_bytes=(kv_cache_bytes(entries[0], shape, bytes_per_value), kv_cache_bytes(entries[1], shape, bytes_per_value)),
        prefill_flops=(prefill_flops(full, shape), prefill_flops(reduced, shape)),
    )

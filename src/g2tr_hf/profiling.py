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


__all__ = ["BAGEL_7B_LLM", "DecoderShape", "Segment", "kv_cache_bytes", "prefill_flops"]


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
    """A run of prefill tokens: `length` tokens, attending causally (text) or bidirectionally (an image block)."""

    length: int
    bidirectional: bool = False


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

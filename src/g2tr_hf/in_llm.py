"""In-LLM visual-token dropping (FastV, PyramidDrop, DART, IVC-Prune, VScan's LLM stage) for both g2tr_hf models,
without attention weights.

The methods are selected like every other one, `g2tr_method="fastv"` (or `"wfastv"`, `"pdrop"`, `"dart"`,
`"ivcprune"`, `"vscan"`) with `g2tr_ratio`, and act inside the decoder instead of before it. A model builds one
`InLLMDropper` per forward call (`InLLMDropper.for_call`), attaches it to its decoder layers for the duration of the
decoder call (`InLLMDropper.attached`: forward pre-hooks that return new arguments, nothing is patched or resized
in place), and reads the final layout back with `InLLMDropper.finish`. Outside an in-LLM method the dropper is a
no-op.

What happens in one prefill:

1. At the scoring layer, the scores are computed by hand from that layer's input hidden states and its own
   projections (pre-norm, q/k projections, q/k norms, RoPE; GQA keys expanded): only the query row(s) needed, so
   the attention kernel (SDPA or eager) is untouched and `output_attentions` is never used.
2. At the dropping layer, each image keeps `keep_count(N_i, keep, g2tr_min_keep)` of its ORIGINAL N_i tokens (the
   same per-image budget as the pre-LLM methods, so counts are comparable), chosen per image block and per batch
   row. The hidden states, RoPE cos/sin, position ids and the attention mask are gathered to the kept tokens; rows
   are left-padded again, so a batch behaves as its rows alone. RoPE positions stay the ORIGINAL ones (FastV, DART).
3. After the decoder, the entries of the dropped tokens are removed from the cache of the layers before the
   dropping layer too (IVC-Prune's choice; FastV's own cache variant keeps them there). So after prefill every layer
   caches exactly the kept tokens, decoding attends to the kept tokens at every layer, the compact cache layout
   (`generation_g2tr`) describes all layers, and positions continue after the caller's full prompt.

Methods (the `ratio` is `g2tr_ratio`, the fraction of each image's tokens kept):

- `fastv`: score = attention of the last prompt token to every token at layer K-1, averaged over heads; keep the
  top tokens of each image before layer K. K = 2 as published (R = 1 - ratio, the published R = 50% is ratio 0.5).
- `wfastv` (Window-FastV, Wen et al. 2025): FastV's score and layer, but spatially uniform: the image's token grid
  is cut into 4 x 4-token windows (edge windows smaller, any grid shape) and the best tokens are taken with at most
  ceil(K / #windows) per window (the best remaining tokens fill up when small windows leave the budget short).
- `pdrop`: at each stage layer, score = attention of the last prompt token with that layer's q/k, averaged over
  heads; each stage keeps `ratio` of the tokens still there (LLaVA's lambda = 0.5 is ratio 0.5). The LLaVA stage
  layers [8, 16, 24] of 32 are rescaled to the model's depth (28 layers: [7, 14, 21]). PDrop re-indexes positions;
  here they stay the original ones (documented deviation), and decoding sees the last stage's set at every layer.
- `ivcprune` (IVC-Prune): at layer k - 1 (k = half the depth: IVC-Prune's 16 of 32, so 14 of 28), "implicit visual
  coordinate" tokens = the top 5 % of each image by mean RoPE cos and the top 5 % by mean RoPE sin, kept first; the
  rest of the budget goes to "foreground" tokens: seeds = the top 1 % by value-value attention
  softmax(V_q V^T / sqrt(d)) from the question tokens (the text after the image), foreground score = the same
  attention from seeds + question, mean over heads. On BAGEL every token of an image has the SAME RoPE position, so
  the coordinate tokens are degenerate there (all tie; the lowest indices win): only the foreground part carries
  information. The budget is exact (`ratio`) instead of IVC-Prune's fixed ~30 %.
- `vscan` (VScan, two stages): before the decoder its ViT stage (`baselines`, registered as `vscan_vit` alone)
  keeps `ratio` of each image's tokens and merges the rest; then at the middle layer (half the depth: VScan's 16
  of 32, 14 of 28) the score is PDrop's (attention of the last prompt token with that layer's q/k, averaged over
  heads) and each image keeps `ratio` of the tokens that ENTERED (so ratio^2 of its original tokens). One ratio
  for both stages: the reference sets them apart (LLaVA: 96 of 576 tokens enter, 32 stay; its 50 % setting keeps
  0.6, then 0.67); `ratio_for_layer_average("vscan", L, 0.5)` = 0.618 is this scheme's 50 % point.
- `dart`: at layer K = 2, pivots = the 4 image tokens (per image) and 4 text tokens (per row) with the largest L1
  norm of their key states (after k-norm, before RoPE); then, pivot by pivot, the image tokens least cosine-similar
  to the pivot (on that layer's input hidden states) are kept, without replacement, until the image's budget is
  full (image pivots are kept first). No attention at all.

The scoring query is the last prompt token of the call. For BAGEL this needs the question in the same prefill as the
image, which is what the model's `forward` / `generate` do (the processor's chat template puts the question after
the image). The editing pipeline prefills images before the instruction, so in-LLM methods are refused there.
Layer indices are clamped to [1, num_layers - 1] (tiny test models have 2 layers).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .generation_g2tr import compaction_index
from .reduction import SelectionInputs, keep_count, register_method
from .reduction import window_cells, window_select as _window_select  # noqa: F401 (W-FastV; re-exported)


__all__ = [
    "IN_LLM_METHODS",
    "DropSchedule",
    "InLLMDropper",
    "acts_before_llm",
    "acts_in_llm",
    "drop_schedule",
    "entry_share",
    "layer_token_counts",
    "ratio_for_layer_average",
    "refuse_in_llm_methods",
]

IN_LLM_METHODS = ("fastv", "wfastv", "pdrop", "dart", "ivcprune", "vscan")
# Methods that also reduce before the LLM (their pre-LLM part is a registered selection method of the same name).
TWO_STAGE_METHODS = ("vscan",)

FASTV_LAYER = 2
WFASTV_WINDOW = 4  # window side in tokens (the G2TR reference's `window_selection(..., window_size=4)`)
DART_LAYER = 2
DART_PIVOTS = 4  # image pivots per image and text pivots per row
IVC_LAYER_SHARE = 16 / 32  # IVC-Prune prunes at layer 16 of InternVL2.5's 32-layer LLM
IVC_SEED_SHARE, IVC_COORDINATE_SHARE = 0.01, 0.05  # seeds: top 1 %; coordinate tokens: top 5 % by cos and by sin
PDROP_LLAVA_LAYERS = (8, 16, 24)
PDROP_LLAVA_DEPTH = 32
VSCAN_LAYER_SHARE = 16 / 32  # VScan's LLM stage: layer 16 of LLaVA's 32 (14 of Qwen2.5-VL's 28)


def acts_in_llm(method: str) -> bool:
    """Whether `method` (a `g2tr_method` value) drops tokens inside the decoder (`vscan`: also before it)."""
    return method in IN_LLM_METHODS


def acts_before_llm(method: str) -> bool:
    """Whether `method` reduces the image tokens before the decoder (every method but the in-LLM-only ones)."""
    return method not in IN_LLM_METHODS or method in TWO_STAGE_METHODS


def refuse_in_llm_methods(config, g2tr_ratio: float | None, where: str) -> None:
    """Raise a ValueError when the config's method drops tokens inside the decoder and `g2tr_ratio` (or the
    config's ratio) reduces: `where` (editing, text-to-image) prefills the images before the instruction, so the
    text-guided score of the last prompt token does not exist there."""
    method = config.g2tr_method
    if not acts_in_llm(method) or config.resolve_g2tr_ratio(g2tr_ratio) >= 1.0:
        return
    alternative = " (VScan's ViT stage alone is g2tr_method='vscan_vit')" if method in TWO_STAGE_METHODS else ""
    raise ValueError(
        f"g2tr_method={method!r} drops tokens inside the language model, ranked by the prompt's last token after the "
        f"image; {where} prefills the input images before the instruction, so it cannot run there. Use a method "
        f"that reduces before the LLM{alternative}, or g2tr_ratio=1.0."
    )


def entry_share(method: str, ratio: float) -> float:
    """Share of each image's tokens that enters the decoder at keep ratio `ratio` (rounding aside)."""
    return ratio if acts_before_llm(method) else 1.0


def _refuse_pre_llm(inputs: SelectionInputs) -> torch.Tensor:
    raise ValueError(
        "this method acts inside the language model; the g2tr_hf models route it there (forward / generate). It "
        "cannot reduce tokens before the LLM (reduce_tokens) or in the editing pipeline."
    )


for _name in IN_LLM_METHODS:
    if _name in TWO_STAGE_METHODS:
        continue  # its pre-LLM part is a real selection method (`baselines`)
    # Registered so that `g2tr_method="fastv"` validates like every method; the models never call the function.
    register_method(_name, needs_anchors=False)(_refuse_pre_llm)


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DropSchedule:
    """Where and how much a method drops.

    Attributes:
        score_layers: for each stage, the layer whose INPUT hidden states are scored.
        drop_layers: for each stage, the layer before which the tokens are dropped (ascending).
        keep: for each stage, the fraction of each image's ORIGINAL tokens left after it (non-increasing).
    """

    score_layers: tuple[int, ...]
    drop_layers: tuple[int, ...]
    keep: tuple[float, ...]


def drop_schedule(method: str, num_layers: int, ratio: float) -> DropSchedule:
    """The stages of an in-LLM `method` on a decoder of `num_layers` layers at keep ratio `ratio`."""
    if num_layers < 2:
        raise ValueError(f"in-LLM methods need a decoder of at least 2 layers, got {num_layers}.")

    def clamp(layer: int) -> int:
        return min(max(layer, 1), num_layers - 1)

    if method in ("fastv", "wfastv"):
        layer = clamp(FASTV_LAYER)
        return DropSchedule((layer - 1,), (layer,), (ratio,))
    if method == "dart":
        layer = clamp(DART_LAYER)
        return DropSchedule((layer,), (layer,), (ratio,))
    if method == "ivcprune":
        layer = clamp(round(num_layers * IVC_LAYER_SHARE))
        return DropSchedule((layer - 1,), (layer,), (ratio,))
    if method == "pdrop":
        layers = tuple(sorted({clamp(round(l * num_layers / PDROP_LLAVA_DEPTH)) for l in PDROP_LLAVA_LAYERS}))
        return DropSchedule(layers, layers, tuple(ratio ** (stage + 1) for stage in range(len(layers))))
    if method == "vscan":
        # Relative to the tokens that ENTER the decoder (its ViT stage already kept `ratio` of each image).
        layer = clamp(round(num_layers * VSCAN_LAYER_SHARE))
        return DropSchedule((layer,), (layer,), (ratio,))
    raise ValueError(f"`method` must be one of {list(IN_LLM_METHODS)}, got {method!r}.")


def layer_token_counts(
    schedule: DropSchedule, num_layers: int, image_tokens: Sequence[int], other_tokens: int, min_keep: int = 1
) -> list[int]:
    """Tokens each decoder layer processes in one prefill: the accounting behind "Avg. Tokens".

    Args:
        image_tokens: N_i of every image of the request. other_tokens: every other token of the prompt.
    Returns:
        [num_layers] token counts.
    """
    counts = []
    for layer in range(num_layers):
        done = [keep for drop, keep in zip(schedule.drop_layers, schedule.keep) if drop <= layer]
        kept = [keep_count(n, done[-1], min_keep) if done else n for n in image_tokens]
        counts.append(other_tokens + sum(kept))
    return counts


def _layer_average_share(schedule: DropSchedule, num_layers: int) -> float:
    """Share of the image tokens an average layer processes (no rounding)."""
    total = 0.0
    for layer in range(num_layers):
        done = [keep for drop, keep in zip(schedule.drop_layers, schedule.keep) if drop <= layer]
        total += done[-1] if done else 1.0
    return total / num_layers


def _method_average_share(method: str, num_layers: int, ratio: float) -> float:
    """Share of the ORIGINAL image tokens an average layer processes (`vscan`: of those its ViT stage let in)."""
    return entry_share(method, ratio) * _layer_average_share(drop_schedule(method, num_layers, ratio), num_layers)


def ratio_for_layer_average(method: str, num_layers: int, target: float) -> float:
    """The `g2tr_ratio` at which `method` processes `target` of the image tokens per layer on average ("Avg.
    Tokens" as a share of the image), so that in-LLM methods can be compared with pre-LLM ones at equal compute.

    The share grows monotonically with the ratio; it is found by bisection on the exact schedule (per-image rounding
    of the kept counts is ignored). A target below what the method can reach (its layers before the first drop
    always see every token) is an error naming the floor.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"`target` must be in (0, 1], got {target!r}.")
    floor = _method_average_share(method, num_layers, 1e-9)
    if target < floor:
        raise ValueError(
            f"{method!r} on {num_layers} layers processes at least {floor:.3f} of the image tokens per layer on "
            f"average (its layers before the first drop see them all); `target`={target} is below that."
        )
    low, high = 1e-9, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if _method_average_share(method, num_layers, middle) < target:
            low = middle
        else:
            high = middle
    return high


# ----------------------------------------------------------------------------------------------------------------
# Scores, computed by hand from one layer's weights
# ----------------------------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _heads(proj: torch.nn.Module, norm: torch.nn.Module | None, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, L, hidden] -> [B, heads, L, head_dim] through a projection and the per-head norm."""
    states = proj(x)
    states = states.view(*states.shape[:-1], -1, head_dim)
    if norm is not None:
        states = norm(states)
    return states.transpose(1, 2)


def _layer_parts(layer: torch.nn.Module):
    """(pre-norm, attention) of a decoder layer: BAGEL's MoT layer (understanding expert) or transformers' Qwen3."""
    attention = layer.self_attn
    head_dim = getattr(attention, "head_dim", None)
    if head_dim is None:
        raise ValueError(f"{type(attention).__name__} has no `head_dim`; in-LLM scoring needs a Qwen-style attention.")
    return layer.input_layernorm, attention, head_dim


def _keys(layer: torch.nn.Module, hidden: torch.Tensor, cos_sin=None) -> torch.Tensor:
    """Key states [B, kv_heads, L, head_dim] of `layer` for its input `hidden` (RoPE applied when `cos_sin`)."""
    norm, attention, head_dim = _layer_parts(layer)
    keys = _heads(attention.k_proj, getattr(attention, "k_norm", None), norm(hidden), head_dim)
    if cos_sin is not None:
        cos, sin = (t.unsqueeze(1).to(keys.dtype) for t in cos_sin)
        keys = keys * cos + _rotate_half(keys) * sin
    return keys


def last_token_attention(
    layer: torch.nn.Module, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor
) -> torch.Tensor:
    """Attention of the last token of every row to every token of the call, averaged over heads, [B, L] fp32.

    One query row per sequence: softmax(q_last K^T / sqrt(d)) with `layer`'s own projections, norms and RoPE, over
    the keys where `key_mask` [B, L] is True. Cached keys of earlier calls are not in the softmax (they only rescale
    each head's row; a first-turn prompt has none).
    """
    norm, attention, head_dim = _layer_parts(layer)
    normed = norm(hidden)
    cos, sin = (t.unsqueeze(1) for t in cos_sin)
    query = _heads(attention.q_proj, getattr(attention, "q_norm", None), normed[:, -1:], head_dim)
    keys = _heads(attention.k_proj, getattr(attention, "k_norm", None), normed, head_dim)
    query = query * cos[:, :, -1:].to(query.dtype) + _rotate_half(query) * sin[:, :, -1:].to(query.dtype)
    keys = keys * cos.to(keys.dtype) + _rotate_half(keys) * sin.to(keys.dtype)
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)  # GQA: one key head per query head
    logits = (query.float() @ keys.float().transpose(-1, -2))[:, :, 0] / math.sqrt(head_dim)  # [B, H, L]
    logits = logits.masked_fill(~key_mask[:, None, :], -math.inf)
    return logits.softmax(dim=-1).mean(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Per-image selection
# ----------------------------------------------------------------------------------------------------------------


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest `values`, ties to the lower index."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


def _dart_select(hidden: torch.Tensor, key_norm: torch.Tensor, image: torch.Tensor, text_pivots: torch.Tensor, k: int):
    """DART on one image: image pivots, then the tokens least similar to each pivot, until k are kept.

    Args:
        hidden: [L, D] the row's layer input; key_norm: [L]; image: [N] the image's positions in the row;
        text_pivots: [T] the row's text pivot positions; k: the budget.
    Returns:
        LongTensor [k] positions (into the row) of the kept image tokens.
    """
    num_image_pivots = min(DART_PIVOTS, k)
    image_pivots = image.index_select(0, _top(key_norm.index_select(0, image), num_image_pivots))
    pivots = torch.cat([image_pivots, text_pivots])
    taken = torch.zeros(image.numel(), dtype=torch.bool, device=image.device)
    taken |= (image[:, None] == image_pivots[None, :]).any(dim=1)
    directions = F.normalize(hidden.float(), dim=-1)
    similarity = directions.index_select(0, pivots) @ directions.index_select(0, image).T  # [pivots, N]
    remaining = k - num_image_pivots
    per_pivot = math.ceil(remaining / max(pivots.numel(), 1)) if remaining > 0 else 0
    chosen = [image_pivots]
    for row in similarity:
        if remaining <= 0:
            break
        count = min(per_pivot, remaining)
        candidates = _top(-row.masked_fill(taken, math.inf), count)
        taken[candidates] = True
        chosen.append(image.index_select(0, candidates))
        remaining -= count
    return torch.cat(chosen)


# ----------------------------------------------------------------------------------------------------------------
# The dropper
# ----------------------------------------------------------------------------------------------------------------


class _NoDrop:
    """What `for_call` returns when nothing is dropped inside the decoder in this call."""

    active = False

    @contextlib.contextmanager
    def attached(self, layers: Sequence[torch.nn.Module]) -> Iterator[None]:
        yield

    def finish(self, cache, new_mask, position_ids, kept_token_mask, origin=None):
        return new_mask, position_ids, kept_token_mask


def _causal_mask(past_mask: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, L, P+L]: every real cached entry, the real new keys up to the query, and always itself."""
    length = new_mask.shape[1]
    positions = torch.arange(length, device=new_mask.device)
    new_keys = (positions[None, :, None] >= positions[None, None, :]) & new_mask[:, None, :]
    new_keys = new_keys | torch.eye(length, dtype=torch.bool, device=new_mask.device)[None]
    if past_mask.shape[1] > 0:
        new_keys = torch.cat([past_mask.to(new_mask.device)[:, None, :].expand(-1, length, -1), new_keys], dim=-1)
    return new_keys[:, None]


class InLLMDropper:
    """Drops visual tokens inside the decoder for ONE forward call (see the module docstring).

    Build it with `for_call`; use `attached(layers)` around the decoder call and `finish(...)` after it.
    """

    active = True

    def __init__(
        self,
        method: str,
        schedule: DropSchedule,
        image_mask: torch.Tensor,
        new_mask: torch.Tensor,
        position_ids: torch.Tensor,
        block_ids: torch.Tensor | None,
        past_mask: torch.Tensor,
        mask_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
        min_keep: int,
        float_mask_dtype: torch.dtype | None,
    ) -> None:
        self.method, self.schedule = method, schedule
        self.image_mask, self.new_mask = image_mask, new_mask
        self.position_ids, self.block_ids = position_ids, block_ids
        self.past_mask, self.mask_fn, self.min_keep = past_mask, mask_fn, min_keep
        self.float_mask_dtype = float_mask_dtype  # the kind of mask to build when the layers got None
        batch, length = image_mask.shape
        device = image_mask.device
        # Image blocks numbered over the batch (0: not an image token); each block's ORIGINAL size sets its budget.
        starts = image_mask & ~F.pad(image_mask, (1, 0))[:, :-1]
        self.image_block = torch.where(image_mask, starts.flatten().cumsum(0).reshape(batch, length), 0)
        self.block_sizes = torch.bincount(self.image_block.flatten())[1:].tolist()
        # The current layout: index [B, L_cur] into the original positions, filled [B, L_cur] (False = padding).
        self.index = torch.arange(length, device=device).expand(batch, length)
        self.filled = torch.ones(batch, length, dtype=torch.bool, device=device)
        self.layouts: list[tuple[torch.Tensor, torch.Tensor]] = [(self.index, self.filled)]
        self.stage, self.scores = 0, None
        self.current: dict | None = None  # the gathered layer arguments once something was dropped
        self.grids: list[tuple[int, int]] | None = None  # (h, w) per image block (`wfastv`)

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def for_call(
        cls,
        config,
        ratio: float,
        image_mask: torch.Tensor,
        new_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        past_mask: torch.Tensor,
        cache=None,
        block_ids: torch.Tensor | None = None,
        mask_fn: Callable | None = None,
        grids: Sequence[tuple[int, int]] | None = None,
    ):
        """The dropper of one call, or a no-op when `config.g2tr_method` is not in-LLM, `ratio` is 1, the call
        holds no image token, or no image would lose a token.

        Args:
            config: the model config (`g2tr_method`, `g2tr_min_keep`, the text config's depth and kernel).
            image_mask: [B, L] bool, the image tokens of the call (markers excluded).
            new_mask, position_ids: [B, L] the call's real-token mask and RoPE positions.
            past_mask: [B, P] bool, the cached entries that are real tokens.
            block_ids: [B, L] BAGEL's image-block ids (bidirectional blocks), for `mask_fn`.
            mask_fn: builds the decoder's 4-D mask from (new_mask, block_ids) after a drop; default causal.
            grids: (h, w) of every image block in order of appearance (row by row); `wfastv` needs them.
        """
        method = config.g2tr_method
        if not acts_in_llm(method) or ratio >= 1.0 or not bool(image_mask.any()):
            return _NoDrop()
        text_config = config.get_text_config()
        implementation = getattr(text_config, "_attn_implementation", None) or "sdpa"
        if implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"g2tr_method={method!r} drops tokens inside the decoder, which needs the 'sdpa' or 'eager' attention "
                f"kernel (a 4-D mask); this model uses {implementation!r}."
            )
        if cache is not None and bool(getattr(cache, "is_compileable", False)):
            raise ValueError(f"g2tr_method={method!r} cannot shrink a static cache; use a DynamicCache.")
        schedule = drop_schedule(method, text_config.num_hidden_layers, ratio)
        dropper = cls(
            method,
            schedule,
            image_mask & new_mask,
            new_mask,
            position_ids,
            block_ids,
            past_mask,
            mask_fn or (lambda real, blocks: _causal_mask(past_mask, real)),
            config.g2tr_min_keep,
            None if implementation == "sdpa" else torch.float32,
        )
        if all(keep_count(n, schedule.keep[-1], dropper.min_keep) == n for n in dropper.block_sizes):
            return _NoDrop()
        if method == "wfastv":
            grids = [tuple(int(v) for v in grid) for grid in (grids or [])]
            if [h * w for h, w in grids] != dropper.block_sizes:
                raise ValueError(
                    f"g2tr_method='wfastv' needs the (h, w) grid of every image block; got {grids} for blocks of "
                    f"{dropper.block_sizes} tokens."
                )
            dropper.grids = grids
        return dropper

    # --- the hooks ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def attached(self, layers: Sequence[torch.nn.Module]) -> Iterator[None]:
        """Forward pre-hooks on every decoder layer for the duration of the block; removed afterwards."""
        handles = [
            layer.register_forward_pre_hook(self._hook(index), with_kwargs=True) for index, layer in enumerate(layers)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            return self.before_layer(layer_idx, module, args, kwargs)

        return hook

    def before_layer(self, layer_idx: int, layer: torch.nn.Module, args: tuple, kwargs: dict):
        """Score and drop where the schedule says; afterwards, hand every layer the gathered arguments."""
        arguments = _LayerArguments(args, kwargs)
        hidden, cos_sin = arguments.hidden, arguments.position_embeddings
        if self.current is not None:
            # The decoder loop still passes the full-length mask and RoPE tables: use the gathered ones.
            cos_sin = self.current["position_embeddings"]
            if hidden.shape[1] != cos_sin[0].shape[1]:
                hidden = self.current["hidden"]
        schedule = self.schedule
        if self.stage < len(schedule.drop_layers) and layer_idx == schedule.score_layers[self.stage]:
            self.scores = self._score(layer, hidden, cos_sin)
        if self.stage < len(schedule.drop_layers) and layer_idx == schedule.drop_layers[self.stage]:
            self._drop(hidden, cos_sin, arguments.mask)
            self.stage += 1
            self.scores = None
        if self.current is None:
            return None
        return arguments.replaced(self.current)

    def _current_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(real-token mask [B, L_cur], image-block ids [B, L_cur]) of the current layout."""
        real = self.new_mask.gather(1, self.index) & self.filled
        blocks = self.image_block.gather(1, self.index).masked_fill(~self.filled, 0)
        return real, blocks

    def _score(self, layer: torch.nn.Module, hidden: torch.Tensor, cos_sin) -> torch.Tensor | dict:
        real, _ = self._current_masks()
        if self.method == "dart":
            keys = _keys(layer, hidden)  # [B, kv_heads, L, d], before RoPE
            return {"key_norm": keys.float().abs().sum(dim=(1, 3)), "hidden": hidden}
        if self.method == "ivcprune":
            norm, attention, head_dim = _layer_parts(layer)
            values = _heads(attention.v_proj, None, norm(hidden), head_dim).float()  # [B, kv_heads, L, d]
            cos, sin = cos_sin
            return {"values": values, "cos": cos.float().mean(dim=-1), "sin": sin.float().mean(dim=-1)}
        return last_token_attention(layer, hidden, cos_sin, real)

    def _select(self, keep_fraction: float) -> torch.Tensor:
        """[B, L_cur] bool: the current tokens that stay (non-image tokens and padding always stay)."""
        real, blocks = self._current_masks()
        stay = blocks == 0
        rows, cols = blocks.nonzero(as_tuple=True)
        token_blocks = blocks[rows, cols]
        order = torch.argsort(token_blocks, stable=True)
        rows, cols, token_blocks = rows[order], cols[order], token_blocks[order]
        counts = torch.bincount(token_blocks, minlength=len(self.block_sizes) + 1)[1:].tolist()
        text_pivots = {}
        for block, (block_rows, block_cols) in enumerate(zip(rows.split(counts), cols.split(counts)), start=1):
            if block_cols.numel() == 0:
                continue
            budget = min(keep_count(self.block_sizes[block - 1], keep_fraction, self.min_keep), block_cols.numel())
            row = int(block_rows[0])
            if self.method == "dart":
                if row not in text_pivots:
                    is_text = real[row] & (blocks[row] == 0)
                    text = is_text.nonzero().flatten()
                    key_norm = self.scores["key_norm"][row]
                    text_pivots[row] = text.index_select(0, _top(key_norm.index_select(0, text), DART_PIVOTS))
                kept = _dart_select(
                    self.scores["hidden"][row], self.scores["key_norm"][row], block_cols, text_pivots[row], budget
                )
            elif self.method == "ivcprune":
                kept = self._ivc_select(row, block_cols, budget, real[row] & (blocks[row] == 0), real[row])
            elif self.method == "wfastv":
                # Single stage, so the block is still whole: its positions in order are its raster order.
                windows = window_cells(self.grids[block - 1], WFASTV_WINDOW, block_cols.device)
                block_scores = self.scores[row].index_select(0, block_cols)
                kept = block_cols.index_select(0, _window_select(block_scores, windows, budget))
            else:
                kept = block_cols.index_select(0, _top(self.scores[row].index_select(0, block_cols), budget))
            stay[row, kept] = True
        # The caller's left padding stays (as the pre-LLM compaction keeps it: logits and compacted labels must line
        # up); only the padding a previous stage added goes, `compaction_index` pads the rows again.
        return stay & self.filled

    def _ivc_select(
        self, row: int, image: torch.Tensor, budget: int, is_text: torch.Tensor, real: torch.Tensor
    ) -> torch.Tensor:
        """IVC-Prune on one image of one row: coordinate tokens first, then foreground tokens, exactly `budget`."""
        values = self.scores["values"][row]  # [H, L, d]
        positions = torch.arange(is_text.numel(), device=image.device)
        question = (is_text & (positions > image.max())).nonzero().flatten()
        if question.numel() == 0:
            question = real.nonzero().flatten()[-1:]

        def relevance(queries: torch.Tensor) -> torch.Tensor:
            logits = values.index_select(1, queries) @ values.transpose(-1, -2) / math.sqrt(values.shape[-1])
            logits = logits.masked_fill(~real[None, None, :], -math.inf)
            return logits.softmax(dim=-1).mean(dim=(0, 1)).index_select(0, image)  # [N]

        count = image.numel()
        seeds = image.index_select(0, _top(relevance(question), max(1, round(IVC_SEED_SHARE * count))))
        foreground = relevance(torch.cat([seeds, question]))
        coordinates = max(1, round(IVC_COORDINATE_SHARE * count))
        first = torch.cat([
            _top(self.scores["cos"][row].index_select(0, image), coordinates),
            _top(self.scores["sin"][row].index_select(0, image), coordinates),
        ])  # fmt: skip
        repeated = torch.triu(first[:, None] == first[None, :], diagonal=1).any(dim=0)  # an earlier copy exists
        first = first[~repeated]
        priority = foreground.clone().index_fill_(0, first[:budget], math.inf)
        return image.index_select(0, _top(priority, budget))

    def _drop(self, hidden: torch.Tensor, cos_sin, original_mask: torch.Tensor | None) -> None:
        stay = self._select(self.schedule.keep[self.stage])
        local_index, local_filled = compaction_index(stay)
        self.index = self.index.gather(1, local_index)
        self.filled = self.filled.gather(1, local_index) & local_filled
        self.layouts.append((self.index, self.filled))
        real, blocks = self._current_masks()
        if self.block_ids is not None:
            blocks = self.block_ids.gather(1, self.index).masked_fill(~self.filled, 0)
        mask = self.mask_fn(real, blocks)
        float_kind = original_mask is not None and original_mask.is_floating_point()
        if float_kind or (original_mask is None and self.float_mask_dtype is not None):
            dtype = original_mask.dtype if float_kind else hidden.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        cos, sin = cos_sin
        gather = local_index[..., None]
        self.current = {
            "hidden": hidden.gather(1, gather.expand(-1, -1, hidden.shape[-1])),
            "position_embeddings": (
                cos.gather(1, gather.expand(-1, -1, cos.shape[-1])),
                sin.gather(1, gather.expand(-1, -1, sin.shape[-1])),
            ),
            "position_ids": self.position_ids.gather(1, self.index),
            "mask": mask,
        }

    # --- after the decoder --------------------------------------------------------------------------------------

    def finish(
        self,
        cache,
        new_mask: torch.Tensor,
        position_ids: torch.Tensor,
        kept_token_mask: torch.Tensor,
        origin: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Remove the dropped tokens' entries from every layer's cache and return the final layout.

        Args:
            new_mask, position_ids: [B, L] of the decoder input this dropper was built for.
            kept_token_mask: [B, L0] over the caller's tokens.
            origin: (index [B, L], filled [B, L]) from the decoder input back to the caller's tokens, when a pre-LLM
                stage already removed some of them (`vscan`); None when the decoder input is the caller's tokens.
        Returns:
            (new_mask [B, L'], position_ids [B, L'], kept_token_mask [B, L0] over the caller's tokens).
        """
        index, filled = self.index, self.filled
        if cache is not None:
            self._shrink_cache(cache, index)
        final_mask = new_mask.gather(1, index) & filled
        final_positions = position_ids.gather(1, index).masked_fill(~filled, 0)
        image_mask = self.image_mask
        if origin is not None:
            origin_index, origin_filled = origin
            image_mask = _scatter_flags(origin_index, origin_filled & image_mask, kept_token_mask.shape[1])
            filled = filled & origin_filled.gather(1, index)
            index = origin_index.gather(1, index)
        alive = _scatter_flags(index, filled, kept_token_mask.shape[1])
        return final_mask, final_positions, kept_token_mask & (alive | ~image_mask)

    def _shrink_cache(self, cache, final_index: torch.Tensor) -> None:
        """Layers that ran before a drop cached a longer layout: gather their new entries to the final one."""
        batch, length = self.image_mask.shape
        for layer_idx, layer in enumerate(cache.layers):
            stage = sum(drop <= layer_idx for drop in self.schedule.drop_layers)
            stage_index, stage_filled = self.layouts[stage]
            if stage == len(self.layouts) - 1:
                continue
            # Position of every original token inside this layer's layout, then of every final token.
            # (a spare last column takes the writes of padding slots, which hold no original token).
            where = torch.zeros(batch, length + 1, dtype=torch.long, device=final_index.device)
            slots = torch.arange(stage_index.shape[1], device=final_index.device).expand_as(stage_index)
            where.scatter_(1, torch.where(stage_filled, stage_index, length), slots)
            gather = where.gather(1, final_index)  # [B, L']
            stored = layer.keys.shape[-2]
            past = stored - stage_index.shape[1]
            index = (gather + past)[:, None, :, None]
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                new = tensor.gather(2, index.expand(-1, tensor.shape[1], -1, tensor.shape[-1]))
                setattr(layer, name, torch.cat([tensor[:, :, :past], new], dim=2))


def _scatter_flags(index: torch.Tensor, filled: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length] bool: True at the original positions that `index` [B, L'] holds where `filled`."""
    flags = torch.zeros(index.shape[0], length + 1, dtype=torch.bool, device=index.device)
    flags.scatter_(1, torch.where(filled, index, length), filled)
    return flags[:, :length]


class _LayerArguments:
    """The arguments of one decoder-layer call, whatever the layer's calling convention.

    BAGEL's MoT layer is called as `layer(hidden, position_embeddings, attention_mask, cache, gen_token_mask)`;
    transformers' Qwen3 layer as `layer(hidden, attention_mask=..., position_embeddings=..., position_ids=...,
    cache=/past_key_values=...)`.
    """

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs = args, kwargs
        self.positional = "position_embeddings" not in kwargs and len(args) >= 3

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    @property
    def position_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.args[1] if self.positional else self.kwargs["position_embeddings"]

    @property
    def mask(self) -> torch.Tensor | None:
        return self.args[2] if self.positional else self.kwargs.get("attention_mask")

    def replaced(self, current: dict) -> tuple[tuple, dict]:
        args, kwargs = list(self.args), dict(self.kwargs)
        if self.positional:
            args[1], args[2] = current["position_embeddings"], current["mask"]
        else:
            kwargs["position_embeddings"], kwargs["attention_mask"] = current["position_embeddings"], current["mask"]
            if "position_ids" in kwargs:
                kwargs["position_ids"] = current["position_ids"]
        if self.args:
            # Only the dropping layer gets the gathered hidden states; later layers get what the previous returned.
            if args[0].shape[1] != current["position_embeddings"][0].shape[1]:
                args[0] = current["hidden"]
        else:
            if kwargs["hidden_states"].shape[1] != current["position_embeddings"][0].shape[1]:
                kwargs["hidden_states"] = current["hidden"]
        return tuple(args), kwargs

"""Pre-LLM baselines of visual-token reduction, registered next to G2TR in the `reduction` registry.

Every method here acts where G2TR acts: on the projected ViT tokens of ONE image (BAGEL: `connector` outputs,
InternVL-U: `mlp1` outputs), before the first decoder layer, with the same keep count
`keep_count(N, ratio, min_keep)`. So each one runs on both models, in understanding and (BAGEL) editing, through
the same `g2tr_method` config field (or per call with `reduction_options`), and the budget is exactly the one G2TR
gets. None of them needs the VAE anchors, so the models skip the anchor encode for them.

| `g2tr_method` | What it keeps | How dropped tokens are treated when `g2tr_merge=True` |
|---|---|---|
| `random` (in `reduction`) | a seeded uniform subset | averaged into the most cosine-similar kept token |
| `pool` (in `reduction`) | a regular sub-grid | averaged into the most cosine-similar kept token |
| `avgpool` | the same regular sub-grid | averaged into the spatially nearest kept token: average pooling |
| `divprune` | greedy max-min diversity on cosine distance | averaged into the most cosine-similar kept token |
| `visionzip` | "dominant" tokens by received attention + strided "contextual" targets | the rest into their target |
| `tome` | the destinations of repeated bipartite soft matching | into their matched token (size-weighted means) |
| `vscan_vit` | half by last-layer ViT attention, half per 6 x 6 window by a shallow layer's | averaged into the most cosine-similar kept token |

`vscan` (both VScan stages) runs `vscan_vit` before the LLM and then drops tokens once more at the middle decoder
layer (`in_llm`). The two ViT scores are the only ones here taken from the ViT itself (`needs_vit_attention`): the
models capture the inputs of the two ViT layers while the ViT runs and recompute those layers' attention by hand
(`vit_received_attention`, `vit_cls_attention`), so the ViT keeps its SDPA kernel.

The paper-faithful settings (merge on or off per method) and the G2TR ablations are named presets,
`METHOD_PRESETS`, used by `g2tr-hf bench` and resolved by `resolve_method`.

Deviations from the reference implementations (no reference is imported; all are re-implemented here):

- DivPrune: the first pick is the token whose nearest other token is farthest (as the reference), every later pick
  maximises the distance to the kept set; kept indices are returned in raster order (the reference keeps selection
  order). Per image, any layout, any batch (the reference hard-codes the system prompt length and batch index 0).
- VisionZip: BAGEL's SigLIP has no [CLS] token and InternVL-U's [CLS] attention is not exposed at this hook (the
  InternViT runs on SDPA and the pixel shuffle mixes 2x2 patches into one token). The stand-in for "[CLS] attention"
  is the attention each token *receives* on average in one parameter-free softmax attention of the projected tokens
  over themselves, softmax(X X^T / sqrt(D)) averaged over query rows. The 54 : 10 dominant : contextual split of
  the reference (64-token setting) is applied to every budget. Contextual similarity is the cosine of the projected
  tokens (the reference uses the ViT keys).
- ToMe: applied once after the projector (not inside every ViT block), on the running group means of the projected
  tokens as the matching metric (the reference uses the attention keys of each block), repeated with r <= half the
  tokens per round until exactly K remain. No proportional attention (the LLM sees plain tokens).
- VScan's ViT stage: the reference scores with the [CLS] token's attention in the penultimate CLIP layer (global)
  and in shallow layer 5 of 24 (local). Here the global scan reads the attention of the last ViT layer the model
  runs (the layer whose output the LLM receives, which is what "penultimate" is for LLaVA) and the local scan
  layer round(5/24 * depth) (BAGEL: 5 of 26, InternVL-U: 5 of 24; the reference's exact layer index for other
  depths is unverified). InternVL-U's InternViT has a [CLS] token, so its scores are the [CLS] row of the
  attention, averaged over heads, summed over the 2 x 2 ViT patches behind each LLM token (the pixel shuffle joins
  them, so the scan selects on the 16 x 16 token grid and the ViT sequence itself is never shortened). BAGEL's
  SigLIP has no [CLS] token: the score is the attention each patch receives, averaged over heads and over every
  query patch of its image. The windows are 6 x 6 LLM tokens on any grid (the reference: 6 x 6 on LLaVA's 24 x 24
  grid, 16 windows), edge windows smaller. The split is ceil(K/2) global then K - ceil(K/2) local among the rest;
  the dropped tokens are averaged into their most cosine-similar kept token AFTER the projector (the reference
  merges the ViT features before the projector; all methods here act on projected tokens).
- avgpool: for grids that the budget does not divide, the pooling windows are the Voronoi cells of a regular
  sub-grid, so window sizes differ by at most one row or column.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from .reduction import (
    SelectionInputs,
    SelectionPlan,
    _rank_descending,
    _select_pool,
    available_methods,
    register_method,
    validate_reduction_options,
    window_cells,
    window_select,
)


__all__ = [
    "METHOD_PRESETS",
    "VISIONZIP_DOMINANT_SHARE",
    "capture_layer_inputs",
    "received_attention",
    "reduction_options",
    "resolve_method",
    "vit_cls_attention",
    "vit_received_attention",
    "vscan_vit_layers",
]

# VisionZip's 64-token LLaVA setting keeps 54 dominant and 10 contextual tokens.
VISIONZIP_DOMINANT_SHARE = 54 / 64

# VScan's ViT stage: half the budget by global attention, half per window; windows of 6 x 6 tokens; the local scan
# reads shallow layer 5 of CLIP-L's 24.
VSCAN_GLOBAL_SHARE = 0.5
VSCAN_WINDOW = 6
VSCAN_LOCAL_LAYER_SHARE = 5 / 24

# Floats per block of the received-attention maps (heads x rows x N; VisionZip, VScan): small enough to stay in a
# CPU's cache, and a bound on the memory of one step.
_SCORE_BLOCK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def _directions(features: torch.Tensor) -> torch.Tensor:
    """Unit vectors of the tokens in fp32, [N, D] (a zero token stays zero)."""
    return F.normalize(features.float(), dim=-1)


def _rows_of(keep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Position of each entry of `tokens` in the ascending `keep` (every entry must be in `keep`). Shape of `tokens`."""
    return torch.searchsorted(keep, tokens)


def received_attention(features: torch.Tensor) -> torch.Tensor:
    """Mean attention each token receives in softmax(X X^T / sqrt(D)) over the tokens themselves, [N] fp32.

    The [CLS]-attention stand-in of `visionzip` (see the module docstring): one head of `vit_received_attention`
    with the tokens as their own queries and keys (computed in cache-sized row blocks).
    """
    values = features.float()[None]
    return vit_received_attention(values, values, 1.0 / math.sqrt(values.shape[-1]))


# ----------------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------------


@register_method("divprune", needs_anchors=False)
def _select_divprune(inputs: SelectionInputs) -> torch.Tensor:
    """DivPrune: greedy farthest-point selection (max-min diversity) on cosine distance.

    The selection is sequential by nature (each pick depends on the last): K steps of O(N) tensor work, no host
    synchronisation inside the loop.
    """
    directions = _directions(inputs.features)
    num_tokens, k = directions.shape[0], inputs.num_keep
    distance = 1.0 - directions @ directions.T  # [N, N]
    # First pick: the token whose nearest other token is farthest (the reference's second-smallest column value).
    nearest_other = distance.clone().fill_diagonal_(math.inf).amin(dim=1) if num_tokens > 1 else distance[0]
    chosen = torch.empty(k, dtype=torch.long, device=directions.device)
    pick = nearest_other.argmax().reshape(1)
    min_distance = distance.index_select(0, pick)[0].clone()
    for step in range(k):
        chosen[step : step + 1] = pick
        min_distance = torch.minimum(min_distance, distance.index_select(0, pick)[0]).index_fill_(0, pick, -math.inf)
        pick = min_distance.argmax().reshape(1)
    return torch.sort(chosen).values


@register_method("visionzip", needs_anchors=False)
def _select_visionzip(inputs: SelectionInputs) -> SelectionPlan:
    """VisionZip: dominant tokens by received attention, plus contextual tokens that merge the rest.

    Returns a plan whose assignment leaves the dominant tokens alone and sends every other token to its most
    cosine-similar contextual target (a uniformly strided subset of the non-dominant tokens).
    """
    features, k = inputs.features, inputs.num_keep
    num_tokens, device = features.shape[0], features.device
    scores = received_attention(features)
    num_dominant = min(k, max(1, int(round(k * VISIONZIP_DOMINANT_SHARE))))
    num_contextual = k - num_dominant
    dominant = torch.sort(_rank_descending(scores)[:num_dominant]).values
    is_dominant = torch.zeros(num_tokens, dtype=torch.bool, device=device).index_fill_(0, dominant, True)
    rest = torch.argsort(is_dominant.to(torch.uint8), stable=True)[: num_tokens - num_dominant]  # ascending
    if num_contextual == 0:
        return SelectionPlan(dominant, None, scores)
    step = max(1, rest.numel() // num_contextual)
    targets = rest[::step][:num_contextual].contiguous()
    keep = torch.sort(torch.cat([dominant, targets])).values
    directions = _directions(features)
    nearest_target = (directions.index_select(0, rest) @ directions.index_select(0, targets).T).argmax(dim=-1)
    assignment = torch.empty(num_tokens, dtype=torch.long, device=device)
    assignment[rest] = _rows_of(keep, targets.index_select(0, nearest_target))
    assignment[dominant] = _rows_of(keep, dominant)
    assignment[targets] = _rows_of(keep, targets)  # a target is its own group's kept token
    return SelectionPlan(keep, assignment, scores)


@register_method("tome", needs_anchors=False)
def _select_tome(inputs: SelectionInputs) -> SelectionPlan:
    """ToMe-style bipartite soft matching, repeated until exactly K tokens remain.

    Each round splits the current tokens (in raster order) alternately into A and B, gives every A token its most
    cosine-similar B token, and merges the r best-matched A tokens into their B tokens, r = min(#A, current - K).
    The groups are tracked on the original tokens, so the final group mean is ToMe's size-weighted mean.
    """
    features, k = inputs.features, inputs.num_keep
    num_tokens, device = features.shape[0], features.device
    values = features.float()
    sums, sizes = values.clone(), torch.ones(num_tokens, device=device)  # per representative (original index)
    owner = torch.arange(num_tokens, device=device)  # representative of every original token
    current = torch.arange(num_tokens, device=device)  # ascending representatives
    while current.numel() > k:
        side_a, side_b = current[0::2], current[1::2]
        r = min(side_a.numel(), current.numel() - k)
        a_dirs = F.normalize(sums.index_select(0, side_a), dim=-1)  # the mean's direction = the sum's
        b_dirs = F.normalize(sums.index_select(0, side_b), dim=-1)
        best_value, best_b = (a_dirs @ b_dirs.T).max(dim=-1)
        merged_a = _rank_descending(best_value)[:r]
        sources = side_a.index_select(0, merged_a)
        destinations = side_b.index_select(0, best_b.index_select(0, merged_a))
        sums.index_add_(0, destinations, sums.index_select(0, sources))
        sizes.index_add_(0, destinations, sizes.index_select(0, sources))
        redirect = torch.arange(num_tokens, device=device).index_copy_(0, sources, destinations)
        owner = redirect.index_select(0, owner)
        alive = torch.ones(num_tokens, dtype=torch.bool, device=device).index_fill_(0, sources, False)
        current = current[alive.index_select(0, current)]
    assignment = _rows_of(current, owner)
    return SelectionPlan(current, assignment, None)


@register_method("avgpool", needs_anchors=False)
def _select_avgpool(inputs: SelectionInputs) -> SelectionPlan:
    """Average pooling of the token grid to exactly K tokens: the regular sub-grid of `pool`, each token averaged
    into its spatially nearest sub-grid token (ties to the lower index)."""
    (h, w), device = inputs.grid, inputs.scores.device
    keep = torch.sort(_select_pool(inputs)).values
    rows = torch.arange(h * w, device=device) // w
    cols = torch.arange(h * w, device=device) % w
    kept_rows, kept_cols = rows.index_select(0, keep), cols.index_select(0, keep)
    distance = (rows[:, None] - kept_rows[None, :]).square() + (cols[:, None] - kept_cols[None, :]).square()
    return SelectionPlan(keep, distance.argmin(dim=-1), None)


# ----------------------------------------------------------------------------------------------------------------
# VScan's ViT stage: scores from the ViT's own attention, recomputed by hand
# ----------------------------------------------------------------------------------------------------------------


def vscan_vit_layers(num_layers: int) -> tuple[int, int]:
    """(global, local): the 0-based indices, among the `num_layers` ViT layers a model runs, of the layers whose
    attention VScan's global and local scans read (the last one; round(5/24 * depth))."""
    if num_layers < 1:
        raise ValueError(f"`num_layers` must be at least 1, got {num_layers}.")
    return num_layers - 1, min(num_layers - 1, round(num_layers * VSCAN_LOCAL_LAYER_SHARE))


@contextlib.contextmanager
def capture_layer_inputs(layers: dict[int, torch.nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the hidden states each of `layers` ({key: module}) receives as its first argument while the block
    runs (forward pre-hooks, removed afterwards). Yields {key: hidden states}, filled as the layers run."""
    captured: dict[int, torch.Tensor] = {}

    def hook_for(key: int):
        def hook(module, args):
            captured[key] = args[0]

        return hook

    handles = [module.register_forward_pre_hook(hook_for(key)) for key, module in layers.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def vit_received_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention each token receives in one bidirectional ViT layer, averaged over heads and query tokens, [N] fp32.

    Args:
        query, key: [H, N, d] one image's heads (no padding). scaling: the layer's logit scale (1/sqrt(d)).
    The maps are built a few query rows at a time (about `_SCORE_BLOCK_ELEMENTS` floats, which stays in cache),
    exponentiated in place, and their normalised column sums taken as one matrix-vector product, so no second
    N-wide tensor is allocated (on a 2-core CPU at BAGEL's 4900 patches, one layer's scores went from 1403 ms with
    1024-row blocks and `softmax` to 581 ms).
    """
    heads, num_tokens = query.shape[:2]
    keys = key.float().transpose(-1, -2)
    queries = query.float() * scaling
    total = keys.new_zeros(num_tokens)
    rows = max(1, _SCORE_BLOCK_ELEMENTS // (heads * num_tokens))
    for start in range(0, num_tokens, rows):
        weights = queries[:, start : start + rows] @ keys  # [H, rows, N] logits, made softmax numerators in place
        weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()
        inverse_sums = weights.sum(dim=-1).reciprocal_()  # [H, rows]
        total += (inverse_sums.reshape(1, -1) @ weights.reshape(-1, num_tokens))[0]
    return total / (heads * num_tokens)


def vit_cls_attention(cls_query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of the [CLS] token to every token (itself included), averaged over heads.

    Args:
        cls_query: [B, H, d]; key: [B, H, S, d]. Returns: [B, S] fp32.
    """
    logits = (cls_query.float()[:, :, None] @ key.float().transpose(-1, -2))[:, :, 0] * scaling  # [B, H, S]
    return logits.softmax(dim=-1).mean(dim=1)


@register_method("vscan_vit", needs_anchors=False, needs_vit_attention=True)
def _select_vscan_vit(inputs: SelectionInputs) -> SelectionPlan:
    """VScan's global + local scans on `vit_attention` ([2, N]: global scores, local scores).

    Global: the ceil(K/2) tokens with the highest global score. Local: among the others, the K - ceil(K/2) best by
    the local score with at most ceil(k_local / #windows) per `VSCAN_WINDOW`-token square window (filled from the
    best of the rest when small or exhausted windows leave the budget short). The dropped tokens are merged by the
    model's `merge` option (nearest kept token by cosine, a plain average: VScan's merge).
    """
    global_scores, local_scores = inputs.vit_attention[0], inputs.vit_attention[1]
    k, device = inputs.num_keep, inputs.vit_attention.device
    num_global = min(k, math.ceil(k * VSCAN_GLOBAL_SHARE))
    global_keep = _rank_descending(global_scores)[:num_global]
    taken = torch.zeros(global_scores.numel(), dtype=torch.bool, device=device).index_fill_(0, global_keep, True)
    rest = (~taken).nonzero().flatten()
    windows = window_cells(inputs.grid, VSCAN_WINDOW, device).index_select(0, rest)
    local_keep = rest.index_select(0, window_select(local_scores.index_select(0, rest), windows, k - num_global))
    return SelectionPlan(torch.sort(torch.cat([global_keep, local_keep])).values, None, global_scores)


# `vscan` = this ViT stage before the LLM + one more drop at the middle decoder layer (`in_llm.drop_schedule`).
register_method("vscan", needs_anchors=False, needs_vit_attention=True)(_select_vscan_vit)


# ----------------------------------------------------------------------------------------------------------------
# Presets: the paper-faithful baselines and the G2TR ablations as named option sets
# ----------------------------------------------------------------------------------------------------------------


METHOD_PRESETS: dict[str, dict] = {
    # G2TR and its ablations.
    "g2tr": {"g2tr_method": "g2tr", "g2tr_merge": True},
    "g2tr-no-balance": {"g2tr_method": "topk", "g2tr_merge": True},
    "g2tr-no-merge": {"g2tr_method": "g2tr", "g2tr_merge": False},
    "g2tr-center": {"g2tr_method": "g2tr", "g2tr_merge": True, "g2tr_cell_mapping": "center"},
    "g2tr-merge-scaling-2": {"g2tr_method": "g2tr", "g2tr_merge": True, "g2tr_merge_scaling": 2.0},
    # Pre-LLM baselines as published: pruning ones do not merge, merging ones use their own grouping.
    "random": {"g2tr_method": "random", "g2tr_merge": False},
    "pool": {"g2tr_method": "avgpool", "g2tr_merge": True},
    "divprune": {"g2tr_method": "divprune", "g2tr_merge": False},
    "visionzip": {"g2tr_method": "visionzip", "g2tr_merge": True},
    "tome": {"g2tr_method": "tome", "g2tr_merge": True},
    # VScan: both stages (ViT scans + merge, then the middle-layer drop), and its ViT stage alone.
    "vscan": {"g2tr_method": "vscan", "g2tr_merge": True},
    "vscan-vit": {"g2tr_method": "vscan_vit", "g2tr_merge": True},
}

_OPTION_TYPES = {
    "method": str,
    "merge": bool,
    "merge_scaling": float,
    "cell_mapping": str,
    "min_keep": int,
}


def _parse_value(key: str, text: str):
    kind = _OPTION_TYPES[key]
    if kind is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"option `{key}` must be true or false, got {text!r}.")
        return lowered in ("true", "1", "yes")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"option `{key}` must be a {kind.__name__}, got {text!r}.") from None


def resolve_method(spec: str) -> dict:
    """Config overrides (`g2tr_*` fields) of a method spec: a preset name, a registered `g2tr_method`, or either
    followed by `:key=value,...` with keys among method, merge, merge_scaling, cell_mapping, min_keep.

    Examples: `"divprune"`, `"g2tr-no-merge"`, `"random:merge=true"`, `"g2tr:merge_scaling=0.5"`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method spec must be a non-empty string, got {spec!r}.")
    name, _, options = spec.strip().partition(":")
    if name in METHOD_PRESETS:
        overrides = dict(METHOD_PRESETS[name])
    elif name in available_methods():
        overrides = {"g2tr_method": name}
    else:
        raise ValueError(
            f"unknown method {name!r}: expected a preset ({', '.join(METHOD_PRESETS)}) or a registered method "
            f"({', '.join(available_methods())})."
        )
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or key not in _OPTION_TYPES:
            raise ValueError(
                f"method option {item!r} in {spec!r} must be key=value with key one of {sorted(_OPTION_TYPES)}."
            )
        overrides[f"g2tr_{key}"] = _parse_value(key, value)
    validate_reduction_options(
        method=overrides.get("g2tr_method", "g2tr"),
        merge_scaling=overrides.get("g2tr_merge_scaling", 1.0),
        cell_mapping=overrides.get("g2tr_cell_mapping", "corner"),
        min_keep=overrides.get("g2tr_min_keep", 1),
        prefix="g2tr_",
    )
    return overrides


@contextlib.contextmanager
def reduction_options(model, method: str | None = None, **overrides) -> Iterator[dict]:
    """Use another reduction method (and options) for the calls inside the block; the config is restored after.

    Args:
        model: a g2tr_hf model (or anything with a `config` holding the `g2tr_*` fields).
        method: a method spec for `resolve_method` (preset, registered name, `name:key=value`).
        **overrides: further `g2tr_*` fields, e.g. `g2tr_merge=False`.
    Yields:
        the applied overrides.

    Example:
        >>> with reduction_options(model, "divprune"):
        ...     out = model.generate(**inputs, g2tr_ratio=0.25)

    The config is shared by every thread using the model: do not enter this from concurrent requests.
    """
    config = model.config
    applied = resolve_method(method) if method is not None else {}
    for key in overrides:
        if not key.startswith("g2tr_") or not hasattr(config, key):
            raise ValueError(f"`{key}` is not a reduction option of this model's config (expected a g2tr_* field).")
    applied.update(overrides)
    saved = {key: getattr(config, key) for key in applied}
    try:
        for key, value in applied.items():
            setattr(config, key, value)
        config.validate_g2tr()
        yield applied
    finally:
        for key, value in saved.items():
            setattr(config, key, value)

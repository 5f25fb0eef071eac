"""G2TR token reduction: latent anchors -> cosine scores -> balanced keep set -> merge.

Model-agnostic and pure torch. A model calls `reduce_tokens` once per image with the projected ViT tokens of that
image (BAGEL: `connector` outputs, InternVL-U: `mlp1` outputs) and the VAE-latent anchors of the same image
(`build_latent_anchors`). The result is a *plan* (kept indices and the assignment of every token to a kept token)
plus the merged tokens; the plan can be applied again to any other per-token tensor (`ReductionResult.merge`) or
undone for visualisation (`ReductionResult.unmerge`).

Semantics follow the official code (lijunxian111/G2TR `src/token_merge_new.py`; described in `docs/algorithm.md`)
with these implementation changes (`docs/verification.md`):

- the per-cell best token is found with one scatter-max (no Python loop over cells or tokens, no host sync);
- ties break by (higher score, lower token index) everywhere, where the official `topk` order is unspecified;
- scores, merge similarities and merge sums are computed in fp32 whatever the feature dtype; the merged tokens are
  cast back once;
- the merge is per image (the official merge runs over the whole packed batch and can mix images);
- a non-finite score is an error instead of silently winning `argmax`.

On inputs without score ties the keep set and the merged tokens equal the official ones.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F


logger = logging.getLogger(__name__)

__all__ = [
    "ReductionResult",
    "anchor_encode_size",
    "available_methods",
    "build_latent_anchors",
    "interpolate_channels",
    "keep_count",
    "reduces_anything",
    "latent_cell_index",
    "method_needs_anchors",
    "method_needs_vit_attention",
    "reduce_tokens",
    "reduce_tokens_batched",
    "register_method",
    "resize_for_anchors",
    "validate_anchor_scale",
    "validate_reduction_options",
]

CELL_MAPPINGS = ("corner", "center")


# ----------------------------------------------------------------------------------------------------------------
# Options and the keep-count rule
# ----------------------------------------------------------------------------------------------------------------


def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_reduction_options(
    *,
    ratio: object = 1.0,
    min_keep: object = 1,
    method: object = "g2tr",
    merge_scaling: object = 1.0,
    cell_mapping: object = "corner",
    latent_pool: object = 1,
    prefix: str = "",
) -> None:
    """Raise `ValueError` naming the first option that is out of range.

    `prefix` is prepended to the names in the messages (`"g2tr_"` when the values come from a model config).
    """
    if not _is_real_number(ratio) or not (0.0 < ratio <= 1.0) or math.isnan(ratio):
        raise ValueError(f"`{prefix}ratio` must be a number in (0, 1] (1.0 keeps every token), got {ratio!r}.")
    if not isinstance(min_keep, int) or isinstance(min_keep, bool) or min_keep < 1:
        raise ValueError(f"`{prefix}min_keep` must be an integer >= 1, got {min_keep!r}.")
    if method not in _METHODS:
        raise ValueError(f"`{prefix}method` must be one of {sorted(_METHODS)}, got {method!r}.")
    if not _is_real_number(merge_scaling) or not math.isfinite(merge_scaling) or merge_scaling <= 0:
        raise ValueError(f"`{prefix}merge_scaling` must be a finite number > 0, got {merge_scaling!r}.")
    if cell_mapping not in CELL_MAPPINGS:
        raise ValueError(f"`{prefix}cell_mapping` must be one of {list(CELL_MAPPINGS)}, got {cell_mapping!r}.")
    if not isinstance(latent_pool, int) or isinstance(latent_pool, bool) or latent_pool < 1:
        raise ValueError(f"`{prefix}latent_pool` must be an integer >= 1, got {latent_pool!r}.")


def keep_count(num_tokens: int, ratio: float, min_keep: int = 1) -> int:
    """Number of tokens kept out of `num_tokens`: `min(max(min_keep, round(num_tokens * ratio)), num_tokens)`.

    `round` is Python's (half to even) on the float product, exactly as the official code: 1369 * 0.5 -> 684.
    """
    return min(max(min_keep, int(round(num_tokens * ratio))), num_tokens)


def reduces_anything(num_tokens: int, ratio: float, min_keep: int = 1) -> bool:
    """Whether an image of `num_tokens` tokens loses any at this ratio. When `min_keep` alone keeps them all although
    the ratio asks for fewer, say so (once per image size): a silent no-op reads like a working reduction."""
    if keep_count(num_tokens, ratio, min_keep) < num_tokens:
        return True
    if int(round(num_tokens * ratio)) < num_tokens:
        _warn_min_keep_disables(num_tokens, float(ratio), min_keep)
    return False


@functools.lru_cache(maxsize=None)
def _warn_min_keep_disables(num_tokens: int, ratio: float, min_keep: int) -> None:
    logger.warning(
        "g2tr: an image of %d tokens is not reduced at ratio %s because `min_keep`=%d keeps them all; lower "
        "`g2tr_min_keep` to reduce small images.", num_tokens, ratio, min_keep,
    )


# ----------------------------------------------------------------------------------------------------------------
# Geometry: which latent cell each ViT token belongs to
# ----------------------------------------------------------------------------------------------------------------


def _axis_cell_map(size: int, cells: int, mapping: str, device: torch.device) -> torch.Tensor:
    """Latent cell index along one axis for each of `size` token rows (or columns). Shape [size]."""
    pos = torch.arange(size, device=device)
    if mapping == "corner":
        # The cell containing the token's top-left corner: floor(r * cells / size), as the official code.
        index = (pos * cells) // size
    else:
        # The cell containing the token's centre: floor((r + 1/2) * cells / size).
        index = ((2 * pos + 1) * cells) // (2 * size)
    return index.clamp_(max=cells - 1)


def latent_cell_index(
    grid: tuple[int, int], anchor_grid: tuple[int, int], cell_mapping: str = "corner", device=None
) -> torch.Tensor:
    """Row-major latent cell of every token of a row-major `grid` (h, w) over `anchor_grid` (h_l, w_l). Shape [h*w]."""
    (h, w), (h_l, w_l) = grid, anchor_grid
    rows = _axis_cell_map(h, h_l, cell_mapping, device)
    cols = _axis_cell_map(w, w_l, cell_mapping, device)
    return (rows[:, None] * w_l + cols[None, :]).reshape(-1)


def _occupied_cell_count(grid: tuple[int, int], anchor_grid: tuple[int, int], cell_mapping: str) -> int:
    """How many latent cells receive at least one token. Computed on the host from the geometry alone (no sync)."""
    (h, w), (h_l, w_l) = grid, anchor_grid
    rows = _axis_cell_map(h, h_l, cell_mapping, torch.device("cpu"))
    cols = _axis_cell_map(w, w_l, cell_mapping, torch.device("cpu"))
    return int(rows.unique().numel()) * int(cols.unique().numel())


# ----------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------


def latent_consistency_scores(
    features: torch.Tensor,
    anchors: torch.Tensor,
    grid: tuple[int, int],
    anchor_grid: tuple[int, int],
    cell_mapping: str = "corner",
) -> torch.Tensor:
    """Cosine similarity of each token with the anchor of its latent cell, in fp32.

    The cell map is a product of a row map and a column map, so the dots are computed one ViT row at a time
    against the anchors of its latent row (a [h, w, D] x [h, D, w_l] batched matmul, then a gather of the
    token's column) instead of gathering an anchor per token: same numbers, a fraction of the memory traffic.

    Args:
        features: [N, D] projected ViT tokens on `grid` (h, w).
        anchors: [M, D] latent anchors on `anchor_grid` (h_l, w_l).
    Returns:
        [N] float32 scores in [-1, 1]; a zero vector scores 0 (F.normalize's eps, as upstream).
    """
    (h, w), (h_l, w_l) = grid, anchor_grid
    rows = _axis_cell_map(h, h_l, cell_mapping, features.device)
    cols = _axis_cell_map(w, w_l, cell_mapping, features.device)
    tokens = features.float().reshape(h, w, -1)
    anchor_dirs = F.normalize(anchors.float(), dim=-1).reshape(h_l, w_l, -1)
    dots = torch.bmm(tokens, anchor_dirs.index_select(0, rows).transpose(1, 2))  # [h, w, w_l]
    dots = dots.gather(2, cols.reshape(1, w, 1).expand(h, w, 1)).reshape(-1)
    return dots / tokens.reshape(h * w, -1).norm(dim=-1).clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Selection methods (a registry so that baselines join without touching the models)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionInputs:
    """Everything a selection method may look at for one image.

    For a method registered with `needs_anchors=False` no anchors exist: `scores` are zeros, `cells` all 0 and
    `anchor_grid` (1, 1), and `occupied_cells` 1.
    """

    scores: torch.Tensor  # [N] float32
    cells: torch.Tensor  # [N] long, latent cell per token
    grid: tuple[int, int]
    anchor_grid: tuple[int, int]
    num_keep: int
    occupied_cells: int
    seed: int
    features: torch.Tensor | None = None  # [N, D] the tokens being reduced (in their own dtype)
    vit_attention: torch.Tensor | None = None  # [S, N] fp32 per-token ViT attention scores (`needs_vit_attention`)


@dataclass(frozen=True)
class SelectionPlan:
    """What a method that merges in its own way returns instead of plain kept indices.

    Attributes:
        keep: LongTensor [K], kept local indices, unique and ascending.
        assignment: LongTensor [N], the row of `keep` every token is averaged into (a kept token maps to its own
            row). The model's `merge` option then uses this grouping instead of nearest-cosine assignment.
        scores: optional [N] float32 scores of the method, reported in `ReductionResult.scores`.
    """

    keep: torch.Tensor
    assignment: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class SelectionMethod(Protocol):
    def __call__(self, inputs: SelectionInputs) -> "torch.Tensor | SelectionPlan":
        """Return the kept local indices, LongTensor [num_keep], unique and in ascending order (or a plan)."""


_METHODS: dict[str, SelectionMethod] = {}
_NEEDS_ANCHORS: dict[str, bool] = {}
_NEEDS_VIT_ATTENTION: dict[str, bool] = {}


def register_method(
    name: str, *, needs_anchors: bool = True, needs_vit_attention: bool = False
) -> Callable[[SelectionMethod], SelectionMethod]:
    """Decorator adding a selection method to the registry under `name` (the value of `method=`/`g2tr_method`).

    `needs_anchors=False` declares that the method never reads the latent-consistency scores or cells, so the
    models skip the VAE encode of the anchors for it (and run without a VAE at all). `needs_vit_attention=True`
    declares that it reads `SelectionInputs.vit_attention`, per-token scores taken from the ViT's own attention,
    which the models then compute while their ViT runs (`reduce_tokens(vit_attention=...)`).
    """

    def decorator(fn: SelectionMethod) -> SelectionMethod:
        _METHODS[name] = fn
        _NEEDS_ANCHORS[name] = bool(needs_anchors)
        _NEEDS_VIT_ATTENTION[name] = bool(needs_vit_attention)
        return fn

    return decorator


def method_needs_anchors(name: str) -> bool:
    """Whether the registered method `name` uses the VAE-latent anchors (unknown names: True, the safe answer)."""
    return _NEEDS_ANCHORS.get(name, True)


def method_needs_vit_attention(name: str) -> bool:
    """Whether the registered method `name` reads per-token ViT attention scores (`reduce_tokens(vit_attention=)`)."""
    return _NEEDS_VIT_ATTENTION.get(name, False)


def available_methods() -> list[str]:
    """Names accepted by `reduce_tokens(method=...)`."""
    return sorted(_METHODS)


def _rank_descending(values: torch.Tensor) -> torch.Tensor:
    """Indices that order `values` by (higher value, lower index): a stable descending sort."""
    return torch.sort(values, descending=True, stable=True).indices


@register_method("g2tr")
def _select_g2tr(inputs: SelectionInputs) -> torch.Tensor:
    """Official G2TR selection: the best token of the best cells as seeds, then a global top-k fill."""
    scores, cells, k = inputs.scores, inputs.cells, inputs.num_keep
    num_tokens = scores.numel()
    num_cells = inputs.anchor_grid[0] * inputs.anchor_grid[1]

    # Best score per cell (empty cells stay -inf), then the lowest token index reaching it: the official
    # masked argmax returns the first maximum.
    cell_best = torch.full((num_cells,), -math.inf, device=scores.device).scatter_reduce(
        0, cells, scores, reduce="amax"
    )
    token_ids = torch.arange(num_tokens, device=scores.device)
    is_cell_best = scores == cell_best.index_select(0, cells)
    cell_best_token = torch.full((num_cells,), num_tokens, device=scores.device).scatter_reduce(
        0, cells, torch.where(is_cell_best, token_ids, num_tokens), reduce="amin"
    )

    # Seeds: the `m` cells whose best token scores highest, ties to the lower token index. Ordering the cells by
    # their best token index first and then stable-sorting by score realises that order.
    num_seeds = min(k, inputs.occupied_cells)
    by_token = torch.argsort(cell_best_token)
    seed_cells = by_token.index_select(0, _rank_descending(cell_best.index_select(0, by_token))[:num_seeds])
    seeds = cell_best_token.index_select(0, seed_cells)

    # Fill: the best remaining tokens over the whole image.
    remaining = scores.index_fill(0, seeds, -math.inf)
    fill = _rank_descending(remaining)[: k - num_seeds]
    return torch.sort(torch.cat([seeds, fill])).values


@register_method("topk")
def _select_topk(inputs: SelectionInputs) -> torch.Tensor:
    """Plain top-k on the same cosine scores (no per-cell seeding)."""
    return torch.sort(_rank_descending(inputs.scores)[: inputs.num_keep]).values


@register_method("random", needs_anchors=False)
def _select_random(inputs: SelectionInputs) -> torch.Tensor:
    """A uniformly random subset, reproducible through `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(inputs.seed)
    chosen = torch.randperm(inputs.scores.numel(), generator=generator)[: inputs.num_keep]
    return torch.sort(chosen).values.to(inputs.scores.device)


@register_method("pool", needs_anchors=False)
def _select_pool(inputs: SelectionInputs) -> torch.Tensor:
    """Uniform spatial subsampling: a regular sub-grid of at least k tokens, thinned evenly to exactly k.

    The sub-grid has about the aspect ratio of the token grid; thinning takes evenly spaced entries of the sub-grid
    in raster order, so the kept tokens stay spread over the whole image.
    """
    (h, w), k = inputs.grid, inputs.num_keep
    device = inputs.scores.device
    rows_kept = min(h, max(1, round(math.sqrt(k * h / w))))
    cols_kept = min(w, math.ceil(k / rows_kept))
    rows_kept = min(h, math.ceil(k / cols_kept))
    rows = torch.linspace(0, h - 1, rows_kept, device=device).round().long()
    cols = torch.linspace(0, w - 1, cols_kept, device=device).round().long()
    candidates = (rows[:, None] * w + cols[None, :]).reshape(-1)
    pick = (torch.arange(k, device=device) * candidates.numel()) // k
    return candidates.index_select(0, pick)


# ----------------------------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------------------------


def _complement(keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Ascending indices in [0, num_tokens) that are not in `keep`, shape [num_tokens - K].

    A stable sort of the kept flags puts the dropped tokens first, in order, with a size known on the host (a
    boolean mask + `nonzero` would need a device sync).
    """
    is_kept = torch.zeros(num_tokens, dtype=torch.uint8, device=keep.device).index_fill_(0, keep, 1)
    return torch.argsort(is_kept, stable=True)[: num_tokens - keep.numel()]


def _assign_to_kept(features: torch.Tensor, keep: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """For every token, the row of `keep` it ends in: itself if kept, else its most cosine-similar kept token.

    Ties go to the first (lowest-index) kept token, as `argmax` does upstream. Shape [N].
    """
    directions = F.normalize(features.float(), dim=-1)
    similarity = directions.index_select(0, dropped) @ directions.index_select(0, keep).T  # [N-K, K]
    assignment = torch.empty(features.shape[0], dtype=torch.long, device=features.device)
    assignment[keep] = torch.arange(keep.numel(), device=features.device)
    assignment[dropped] = similarity.argmax(dim=-1)
    return assignment


def _segment_sum(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum rows of `values` [R, ...] into `num_segments` buckets given by `segment` [R], in a fixed order.

    On CPU `index_add_` already adds rows in index order. Elsewhere rows are sorted by bucket (stable) and reduced
    with `segment_reduce`, which sums each bucket sequentially, so the result does not depend on the order of
    atomics (the official `scatter_add_` does).
    """
    if values.device.type == "cpu":
        return values.new_zeros((num_segments, *values.shape[1:])).index_add_(0, segment, values)
    return _sorted_segment_sum(values, segment, num_segments)


def _sorted_segment_sum(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """`_segment_sum` without atomics on any device: a stable sort by bucket, then a sequential segment sum."""
    order = torch.argsort(segment, stable=True)
    lengths = torch.bincount(segment, minlength=num_segments)
    return torch.segment_reduce(values.index_select(0, order), "sum", lengths=lengths, axis=0, unsafe=True)


def _merge_groups(
    values: torch.Tensor, keep: torch.Tensor, dropped: torch.Tensor, assignment: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Weighted group means: (scaling * kept + sum of its dropped tokens) / (scaling + count), fp32, cast back.

    A kept token that absorbs nothing is returned bit for bit. Shape [K, ...].
    """
    kept = values.index_select(0, keep)
    if dropped.numel() == 0:
        return kept
    targets = assignment.index_select(0, dropped)
    merged = _segment_sum(values.index_select(0, dropped).float(), targets, keep.numel())
    counts = torch.bincount(targets, minlength=keep.numel()).to(torch.float32)
    counts = counts.reshape(-1, *([1] * (values.dim() - 1)))
    merged = merged.add_(kept.float(), alpha=scaling).div_(counts + scaling).to(values.dtype)
    if scaling == 1.0:
        # (1 * x + 0) / 1 is x exactly, so tokens that absorbed nothing are already bit-exact.
        return merged
    return torch.where(counts > 0, merged, kept)


# ----------------------------------------------------------------------------------------------------------------
# The plan and the public entry points
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ReductionResult:
    """The reduction of one image: a plan (which tokens stay, where every token went) and its merged tokens.

    Attributes:
        keep: LongTensor [K], kept local indices in ascending order.
        tokens: [K, D] merged tokens in the input dtype (`features[keep]` when merging is off).
        scores: [N] float32 latent-consistency scores (a method without anchors reports its own scores, or zeros).
        assignment: LongTensor [N], the row of `tokens` each input token ended in (kept tokens map to their own
            row; with merging off, dropped tokens end in no row and hold -1).
        merged: whether `tokens` were merged.
        merge_scaling: weight of a kept token in its group mean.
    """

    keep: torch.Tensor
    tokens: torch.Tensor
    scores: torch.Tensor
    assignment: torch.Tensor
    merged: bool = True
    merge_scaling: float = 1.0

    @property
    def num_kept(self) -> int:
        return int(self.keep.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.assignment.numel())

    @property
    def dropped(self) -> torch.Tensor:
        """LongTensor [N-K], dropped local indices in ascending order."""
        return _complement(self.keep, self.num_tokens)

    def merge(self, values: torch.Tensor) -> torch.Tensor:
        """Apply this plan to another per-token tensor `values` [N, ...] -> [K, ...] (group means, or a gather
        when merging was off)."""
        if values.shape[0] != self.num_tokens:
            raise ValueError(f"`values` must have {self.num_tokens} rows (one per token), got {values.shape[0]}.")
        if not self.merged or self.num_kept == self.num_tokens:
            return values.index_select(0, self.keep)
        return _merge_groups(values, self.keep, self.dropped, self.assignment, self.merge_scaling)

    def unmerge(self, values: torch.Tensor) -> torch.Tensor:
        """Spread per-kept-token `values` [K, ...] back over all N tokens: row t gets the row of its group (zeros
        for a dropped token when merging was off)."""
        if values.shape[0] != self.num_kept:
            raise ValueError(f"`values` must have {self.num_kept} rows (one per kept token), got {values.shape[0]}.")
        spread = values.index_select(0, self.assignment.clamp(min=0))
        if self.merged:
            return spread
        is_dropped = (self.assignment < 0).reshape(-1, *([1] * (values.dim() - 1)))
        return spread.masked_fill(is_dropped, 0)


def _check_grid(name: str, grid: object) -> tuple[int, int]:
    if (
        not isinstance(grid, (tuple, list, torch.Size))
        or len(grid) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)
    ):
        raise ValueError(f"`{name}` must be a pair of positive integers (height, width), got {grid!r}.")
    return int(grid[0]), int(grid[1])


def _check_features(features, grid) -> tuple[int, int]:
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(
            "`features` must be a floating-point tensor of shape [num_tokens, dim], got "
            f"{type(features).__name__} {tuple(getattr(features, 'shape', ()))}."
        )
    grid = _check_grid("grid", grid)
    if grid[0] * grid[1] != features.shape[0]:
        raise ValueError(
            f"`grid` {grid} holds {grid[0] * grid[1]} tokens but `features` has {features.shape[0]} rows."
        )
    if not torch.isfinite(features).all():
        raise ValueError("`features` contains non-finite values (NaN or inf).")
    return grid


def _check_inputs(features, grid, anchors, anchor_grid) -> tuple[tuple[int, int], tuple[int, int]]:
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(
            "`features` must be a floating-point tensor of shape [num_tokens, dim], got "
            f"{type(features).__name__} {tuple(getattr(features, 'shape', ()))}."
        )
    if not isinstance(anchors, torch.Tensor) or anchors.dim() != 2 or not anchors.is_floating_point():
        raise ValueError(
            "`anchors` must be a floating-point tensor of shape [num_cells, dim], got "
            f"{type(anchors).__name__} {tuple(getattr(anchors, 'shape', ()))}."
        )
    grid = _check_grid("grid", grid)
    anchor_grid = _check_grid("anchor_grid", anchor_grid)
    if grid[0] * grid[1] != features.shape[0]:
        raise ValueError(
            f"`grid` {grid} holds {grid[0] * grid[1]} tokens but `features` has {features.shape[0]} rows."
        )
    if anchor_grid[0] * anchor_grid[1] != anchors.shape[0]:
        raise ValueError(
            f"`anchor_grid` {anchor_grid} holds {anchor_grid[0] * anchor_grid[1]} cells but `anchors` has "
            f"{anchors.shape[0]} rows."
        )
    if features.shape[1] != anchors.shape[1]:
        raise ValueError(
            f"`features` and `anchors` must have the same feature dimension, got {features.shape[1]} and "
            f"{anchors.shape[1]} (project the anchors into the feature space first)."
        )
    if anchors.device != features.device:
        raise ValueError(f"`anchors` are on {anchors.device} but `features` are on {features.device}.")
    return grid, anchor_grid


def _check_vit_attention(vit_attention, num_tokens: int, method: str) -> torch.Tensor:
    """The `vit_attention` argument of `reduce_tokens` as fp32 [S, N], or a ValueError naming what is wrong."""
    if vit_attention is None:
        raise ValueError(
            f"method {method!r} ranks tokens by the ViT's own attention: pass `vit_attention` ([S, {num_tokens}] "
            "scores per token). The g2tr_hf models compute it while their ViT runs."
        )
    if (
        not isinstance(vit_attention, torch.Tensor)
        or vit_attention.dim() != 2
        or vit_attention.shape[1] != num_tokens
        or not vit_attention.is_floating_point()
    ):
        raise ValueError(
            f"`vit_attention` must be a floating-point tensor of shape [S, {num_tokens}] (one row per score, one "
            f"column per token), got {type(vit_attention).__name__} {tuple(getattr(vit_attention, 'shape', ()))}."
        )
    if not torch.isfinite(vit_attention).all():
        raise ValueError("`vit_attention` contains non-finite values (NaN or inf).")
    return vit_attention.float()


def _raise_non_finite(features: torch.Tensor, anchors: torch.Tensor) -> None:
    name = "features" if not torch.isfinite(features).all() else "anchors"
    raise ValueError(f"`{name}` contains non-finite values (NaN or inf); scores must be finite.")


def reduce_tokens(
    features: torch.Tensor,
    grid: tuple[int, int],
    anchors: torch.Tensor | None,
    anchor_grid: tuple[int, int] | None,
    *,
    ratio: float,
    min_keep: int = 1,
    method: str = "g2tr",
    merge: bool = True,
    merge_scaling: float = 1.0,
    cell_mapping: str = "corner",
    seed: int = 0,
    vit_attention: torch.Tensor | None = None,
) -> ReductionResult:
    """Reduce the tokens of ONE image with G2TR (or another registered method).

    Args:
        features: [N, D] projected ViT tokens, row-major on `grid`.
        grid: (h, w) with h * w == N.
        anchors: [M, D] latent anchors, row-major on `anchor_grid`; may be None for a method registered with
            `needs_anchors=False` (`method_needs_anchors`).
        anchor_grid: (h_l, w_l) with h_l * w_l == M (None with `anchors`).
        ratio: keep ratio in (0, 1]; K = keep_count(N, ratio, min_keep).
        min_keep: lower bound on K.
        method: a key of `available_methods()`.
        merge: average each dropped token into its kept token (the method's own grouping when it returns a
            `SelectionPlan` with an assignment, else the most cosine-similar kept token); else plain pruning.
        merge_scaling: weight of the kept token in the average.
        cell_mapping: "corner" (official: the cell holding the token's top-left corner) or "center".
        seed: seed of the "random" method.
        vit_attention: [S, N] per-token scores from the ViT's attention, for a method registered with
            `needs_vit_attention=True` (`vscan`: row 0 the global scan's, row 1 the local scan's); ignored otherwise.
    Returns:
        `ReductionResult` with keep [K], tokens [K, D], scores [N], assignment [N].
    """
    validate_reduction_options(
        ratio=ratio, min_keep=min_keep, method=method, merge_scaling=merge_scaling, cell_mapping=cell_mapping
    )
    uses_anchors = method_needs_anchors(method) or anchors is not None
    if uses_anchors:
        if anchors is None:
            raise ValueError(f"`anchors` are required by method {method!r} (it scores tokens against the latents).")
        grid, anchor_grid = _check_inputs(features, grid, anchors, anchor_grid)
    else:
        grid = _check_features(features, grid)
        anchor_grid = (1, 1)
    num_tokens = features.shape[0]
    if uses_anchors:
        scores = latent_consistency_scores(features, anchors, grid, anchor_grid, cell_mapping)
        if not torch.isfinite(scores).all():
            _raise_non_finite(features, anchors)
    else:
        scores = torch.zeros(num_tokens, dtype=torch.float32, device=features.device)

    num_keep = keep_count(num_tokens, ratio, min_keep)
    if not reduces_anything(num_tokens, ratio, min_keep):
        everything = torch.arange(num_tokens, device=features.device)
        return ReductionResult(everything, features, scores, everything.clone(), merge, float(merge_scaling))
    if method_needs_vit_attention(method):
        vit_attention = _check_vit_attention(vit_attention, num_tokens, method).to(features.device)

    if uses_anchors:
        cells = latent_cell_index(grid, anchor_grid, cell_mapping, device=features.device)
        occupied = _occupied_cell_count(grid, anchor_grid, cell_mapping)
    else:
        cells = torch.zeros(num_tokens, dtype=torch.long, device=features.device)
        occupied = 1
    inputs = SelectionInputs(
        scores=scores,
        cells=cells,
        grid=grid,
        anchor_grid=anchor_grid,
        num_keep=num_keep,
        occupied_cells=occupied,
        seed=seed,
        features=features,
        vit_attention=vit_attention if method_needs_vit_attention(method) else None,
    )
    selection = _METHODS[method](inputs)
    own_assignment = None
    if isinstance(selection, SelectionPlan):
        keep, own_assignment = selection.keep, selection.assignment
        if selection.scores is not None:
            scores = selection.scores.float()
    else:
        keep = selection
    if keep.numel() != num_keep:
        raise RuntimeError(f"method {method!r} kept {keep.numel()} tokens instead of the budget {num_keep}.")
    if not merge:
        # Plain pruning: no similarity matmul; dropped tokens end in no row.
        assignment = torch.full((num_tokens,), -1, dtype=torch.long, device=features.device)
        assignment[keep] = torch.arange(num_keep, device=features.device)
        return ReductionResult(keep, features.index_select(0, keep), scores, assignment, False, float(merge_scaling))
    dropped = _complement(keep, num_tokens)
    assignment = own_assignment if own_assignment is not None else _assign_to_kept(features, keep, dropped)
    tokens = _merge_groups(features, keep, dropped, assignment, float(merge_scaling))
    return ReductionResult(keep, tokens, scores, assignment, True, float(merge_scaling))


def reduce_tokens_batched(
    features: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    anchors: Sequence[torch.Tensor],
    anchor_grids: Sequence[tuple[int, int]],
    **kwargs,
) -> list[ReductionResult]:
    """`reduce_tokens` over several images of different sizes; each image is reduced on its own (no token is
    ever merged across images, tiles, batch rows or CFG branches).

    Args:
        features: one [N_i, D] tensor per image. `grids`, `anchors`, `anchor_grids`: one entry per image.
        **kwargs: the keyword options of `reduce_tokens`.
    """
    lengths = {len(features), len(grids), len(anchors), len(anchor_grids)}
    if len(lengths) != 1:
        raise ValueError(
            "`features`, `grids`, `anchors` and `anchor_grids` must have one entry per image, got lengths "
            f"{len(features)}, {len(grids)}, {len(anchors)}, {len(anchor_grids)}."
        )
    return [
        reduce_tokens(f, g, a, ag, **kwargs) for f, g, a, ag in zip(features, grids, anchors, anchor_grids)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Spatial windows (W-FastV's and VScan's local scan)
# ----------------------------------------------------------------------------------------------------------------


def window_cells(grid: tuple[int, int], window: int, device=None) -> torch.Tensor:
    """Window index of every token of a row-major (h, w) grid cut into `window` x `window` windows, [h*w]."""
    h, w = grid
    rows = torch.arange(h, device=device) // window
    cols = torch.arange(w, device=device) // window
    return (rows[:, None] * (-(-w // window)) + cols[None, :]).reshape(-1)


def window_select(scores: torch.Tensor, windows: torch.Tensor, k: int) -> torch.Tensor:
    """The k best tokens with at most ceil(k / #windows) per window, filled from the best of the rest if short.

    Args:
        scores: [N]; windows: [N] window of every token; k: the budget.
    Returns:
        LongTensor [k] local indices.
    """
    num_windows = int(windows.max()) + 1
    quota = -(-k // num_windows)
    by_score = torch.sort(scores, descending=True, stable=True).indices
    order = by_score[torch.sort(windows.index_select(0, by_score), stable=True).indices]  # window, then score
    counts = torch.bincount(windows, minlength=num_windows)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_window = torch.empty_like(order)
    rank_in_window[order] = torch.arange(order.numel(), device=order.device) - starts.index_select(0, windows[order])
    eligible = rank_in_window < quota
    # Eligible tokens first (by score), then the rest (by score): the first k are the answer.
    return by_score[torch.sort((~eligible).index_select(0, by_score).to(torch.uint8), stable=True).indices[:k]]


# ----------------------------------------------------------------------------------------------------------------
# Latent anchors
# ----------------------------------------------------------------------------------------------------------------


def _patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[C, H, W] -> [H/p, W/p, p*p*C], each patch flattened in (p_row, p_col, channel) order (BAGEL's order)."""
    channels, height, width = latents.shape
    p = patch_size
    patches = latents.reshape(channels, height // p, p, width // p, p)
    return patches.permute(1, 3, 2, 4, 0).reshape(height // p, width // p, p * p * channels)


def _ragged_mean_pool(grid_values: torch.Tensor, pool: int) -> torch.Tensor:
    """Non-overlapping pool x pool mean over a [h, w, D] grid; edge blocks cut short are averaged over their own
    size. Returns [ceil(h/pool), ceil(w/pool), D], accumulated in fp32 and cast back."""
    height, width, dim = grid_values.shape
    out_h, out_w = -(-height // pool), -(-width // pool)
    padded = grid_values.float().new_zeros(out_h * pool, out_w * pool, dim)
    padded[:height, :width] = grid_values.float()
    sums = padded.reshape(out_h, pool, out_w, pool, dim).sum(dim=(1, 3))
    rows = torch.full((out_h,), pool, dtype=torch.float32, device=grid_values.device)
    cols = torch.full((out_w,), pool, dtype=torch.float32, device=grid_values.device)
    rows[-1] = height - (out_h - 1) * pool
    cols[-1] = width - (out_w - 1) * pool
    return (sums / (rows[:, None, None] * cols[None, :, None])).to(grid_values.dtype)


def interpolate_channels(values: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Parameter-free linear interpolation along the channel axis (InternVL-U's latent -> LLM-width map).

    Output channel j reads `src = max(0, (j + 0.5) * C / out_dim - 0.5)` between channels floor(src) and the next
    (`F.interpolate(mode="linear", align_corners=False)`), computed in fp32 and cast back.

    Args:
        values: [M, C]. out_dim: the target width.
    Returns:
        [M, out_dim] in the dtype of `values` (unchanged when C == out_dim).
    """
    if values.shape[-1] == out_dim:
        return values
    resized = F.interpolate(values.float().unsqueeze(1), size=out_dim, mode="linear", align_corners=False)
    return resized.squeeze(1).to(values.dtype)


def build_latent_anchors(
    latents: torch.Tensor,
    *,
    patch_size: int = 1,
    pool: int = 1,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Anchors of one image from its VAE latent: patchify -> ragged mean pool -> optional projection.

    Args:
        latents: [C, H, W] latent of ONE image, already cropped to that image's own size (batch padding would
            shift the anchors of smaller images).
        patch_size: p; BAGEL patchifies 2 x 2 (64-d tokens), InternVL-U uses 1.
        pool: pooling factor on the patch grid (`g2tr_latent_pool`); 1 means none.
        project: maps [M, p*p*C] to the feature space, e.g. BAGEL's `vae2llm` or
            `functools.partial(interpolate_channels, out_dim=hidden)`. Pooling first and projecting second is the
            official order (and, for an affine map, equal to the reverse).
    Returns:
        (anchors [M, D], (h_l, w_l)) with M = h_l * w_l, row-major.
    """
    if not isinstance(latents, torch.Tensor) or latents.dim() != 3:
        raise ValueError(
            f"`latents` must be a tensor of shape [channels, height, width], got {tuple(getattr(latents, 'shape', ()))}."
        )
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"`patch_size` must be an integer >= 1, got {patch_size!r}.")
    if not isinstance(pool, int) or pool < 1:
        raise ValueError(f"`pool` must be an integer >= 1, got {pool!r}.")
    _, height, width = latents.shape
    if height % patch_size or width % patch_size or height == 0 or width == 0:
        raise ValueError(
            f"`latents` spatial size {height}x{width} must be a non-zero multiple of `patch_size`={patch_size}."
        )
    grid_values = _patchify(latents, patch_size)
    if pool > 1:
        grid_values = _ragged_mean_pool(grid_values, pool)
    anchor_grid = (grid_values.shape[0], grid_values.shape[1])
    anchors = grid_values.reshape(-1, grid_values.shape[-1])
    if project is not None:
        anchors = project(anchors)
    return anchors, anchor_grid


# ----------------------------------------------------------------------------------------------------------------
# Reduced-resolution anchors (opt-in `g2tr_anchor_scale`)
# ----------------------------------------------------------------------------------------------------------------


def validate_anchor_scale(anchor_scale: object, latent_pool: int, prefix: str = "") -> int:
    """Check `anchor_scale` against `latent_pool` and return the pooling factor of the downscaled latent.

    The downscaled encode must land on the same anchor grid as the full one, so `latent_pool * anchor_scale` has to
    be a whole number >= 1 (pool 2: scales 1.0 and 0.5; pool 4: 1.0, 0.75, 0.5, 0.25).
    """
    if not _is_real_number(anchor_scale) or not (0.0 < anchor_scale <= 1.0) or math.isnan(anchor_scale):
        raise ValueError(
            f"`{prefix}anchor_scale` must be a number in (0, 1] (1.0: full resolution), got {anchor_scale!r}."
        )
    effective_pool = latent_pool * anchor_scale
    if abs(effective_pool - round(effective_pool)) > 1e-6 or round(effective_pool) < 1:
        raise ValueError(
            f"`{prefix}anchor_scale` * `{prefix}latent_pool` must be a whole number >= 1 so that the downscaled latent "
            f"lands on the pooled anchor grid; got {anchor_scale!r} * {latent_pool} = {effective_pool:g}. "
            f"Allowed scales for latent_pool={latent_pool}: {[k / latent_pool for k in range(latent_pool, 0, -1)]}."
        )
    return int(round(effective_pool))


def anchor_encode_size(
    height: int, width: int, *, vae_downsample: int, patch_size: int, latent_pool: int, anchor_scale: float
) -> tuple[tuple[int, int], int]:
    """Pixel size at which to encode an image for reduced-resolution anchors, and the pooling that then follows.

    At full resolution an `height` x `width` image gives a latent of ceil(H / vae_downsample) rows, `patch_size`
    patchified and ragged-mean-pooled by `latent_pool` into ceil(rows / patch_size / latent_pool) anchor rows.
    The downscaled copy is resized so that its latent, pooled by `latent_pool * anchor_scale`, has exactly that
    many rows and columns: the anchor grid (hence the ViT-token -> cell map) is the same at every scale.

    Returns:
        ((encode_height, encode_width), pool) with pool = `latent_pool * anchor_scale`.
    """
    pool = validate_anchor_scale(anchor_scale, latent_pool)

    def side(pixels: int) -> int:
        latent = -(-pixels // vae_downsample)
        cells = -(-(latent // patch_size) // latent_pool)
        return cells * pool * patch_size * vae_downsample

    return (side(height), side(width)), pool


def resize_for_anchors(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[3, h, w] (or [N, 3, h, w]) VAE pixels in [-1, 1] -> the same images at `size`, bilinear with antialiasing
    (a plain bilinear shrink aliases fine texture into the latent). Computed in fp32, cast back."""
    batched = pixels if pixels.dim() == 4 else pixels[None]
    if tuple(batched.shape[-2:]) == tuple(size):
        return pixels
    resized = F.interpolate(batched.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    resized = resized.to(pixels.dtype)
    return resized if pixels.dim() == 4 else resized[0]

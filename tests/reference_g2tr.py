"""A literal, loop-based restatement of the official G2TR selection and merge (docs/algorithm.md).

Written from a description of the official code for tests and for `benchmarks/bench_reduction.py`: one Python
iteration per latent cell with a masked argmax over the whole image, `topk` for the seeds and the fill, and a `scatter_add`
merge. It is deliberately slow and must agree with `g2tr_hf.reduction` on inputs without score ties.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_cells(h: int, w: int, h_l: int, w_l: int) -> torch.Tensor:
    cells = []
    for t in range(h * w):
        r, c = divmod(t, w)
        cells.append(min((r * h_l) // h, h_l - 1) * w_l + min((c * w_l) // w, w_l - 1))
    return torch.tensor(cells)


def reference_select(features, grid, anchors, anchor_grid, ratio, min_keep=1):
    """Returns (keep ascending, scores) exactly as the official per-cell loop computes them."""
    (h, w), (h_l, w_l) = grid, anchor_grid
    n = h * w
    scores = (F.normalize(features, dim=-1) * F.normalize(anchors, dim=-1)[reference_cells(h, w, h_l, w_l)]).sum(-1)
    cells = reference_cells(h, w, h_l, w_l).to(features.device)
    k = min(max(min_keep, int(round(n * ratio))), n)
    masked_value = torch.finfo(features.dtype).min
    unique_cells = torch.unique(cells)
    best_token, best_score = [], []
    for u in unique_cells.tolist():
        masked = scores.masked_fill(cells != u, masked_value)
        t = int(masked.argmax().item())
        best_token.append(t)
        best_score.append(scores[t].item())
    m = min(k, len(best_token))
    seed_order = torch.topk(torch.tensor(best_score), m).indices.tolist()
    keep = {best_token[i] for i in seed_order}
    if len(keep) < k:
        rest = scores.clone()
        rest[list(keep)] = masked_value
        keep |= set(torch.topk(rest, k - len(keep)).indices.tolist())
    return torch.tensor(sorted(keep)), scores


def reference_merge(x, keep, scaling=1.0):
    """Official merge: each dropped token joins its most cosine-similar kept token; weighted mean."""
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[keep] = True
    kept, dropped = x[mask], x[~mask]
    if dropped.shape[0] == 0:
        return kept.clone()
    target = (F.normalize(dropped, dim=-1) @ F.normalize(kept, dim=-1).T).argmax(dim=-1)
    sums = torch.zeros_like(kept).scatter_add_(0, target[:, None].expand_as(dropped), dropped)
    counts = torch.zeros(kept.shape[0], dtype=torch.int32).scatter_add_(
        0, target, torch.ones_like(target, dtype=torch.int32)
    )
    return (scaling * kept + sums) / (scaling + counts[:, None].float())

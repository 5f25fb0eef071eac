"""The reduction core against the worked examples of docs/algorithm.md, the loop reference, and its own invariants."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from g2tr_hf.reduction import (
    available_methods,
    build_latent_anchors,
    interpolate_channels,
    keep_count,
    latent_cell_index,
    reduce_tokens,
    reduce_tokens_batched,
    register_method,
)
from reference_g2tr import reference_merge, reference_select


# The 4x4 example of docs/algorithm.md, scores in row-major order.
EXAMPLE_SCORES = torch.tensor(
    [0.90, 0.10, 0.20, 0.30, 0.80, 0.70, 0.25, 0.05, 0.15, 0.12, 0.60, 0.55, 0.11, 0.13, 0.50, 0.45],
    dtype=torch.float64,
)


def features_with_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D unit features whose cosine with the anchor (1, 0) is exactly `scores`, and four such anchors."""
    features = torch.stack([scores, (1 - scores**2).sqrt()], dim=1)
    anchors = torch.tensor([[1.0, 0.0]] * 4, dtype=scores.dtype)
    return features, anchors


def random_image(n_rows, n_cols, anchor_rows, anchor_cols, dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_rows * n_cols, dim, generator=g).to(dtype)
    anchors = torch.randn(anchor_rows * anchor_cols, dim, generator=g).to(dtype)
    return features, anchors


# ---------------------------------------------------------------------------------------------- worked examples


@pytest.mark.parametrize(
    "ratio, expected",
    [
        (0.5, [0, 3, 4, 5, 8, 10, 11, 14]),
        (0.25, [0, 3, 8, 10]),
        (0.125, [0, 10]),
    ],
)
def test_selection_worked_example(ratio, expected):
    features, anchors = features_with_scores(EXAMPLE_SCORES)
    result = reduce_tokens(features, (4, 4), anchors, (2, 2), ratio=ratio)
    assert result.keep.tolist() == expected
    torch.testing.assert_close(result.scores, EXAMPLE_SCORES.float())
    assert result.scores.dtype == torch.float32


def test_topk_method_on_worked_example_differs_as_the_spec_says():
    features, anchors = features_with_scores(EXAMPLE_SCORES)
    result = reduce_tokens(features, (4, 4), anchors, (2, 2), ratio=0.5, method="topk")
    assert result.keep.tolist() == [0, 3, 4, 5, 10, 11, 14, 15]


MERGE_TOKENS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [1.0, 1.0]])


@pytest.mark.parametrize(
    "scaling, expected",
    [(1.0, [[1.0, 0.36667], [0.05, 1.0]]), (2.0, [[1.0, 0.275], [0.03333, 1.0]])],
)
def test_merge_worked_example(scaling, expected):
    # Anchors that make t0 and t1 the two best seeds of a 1x5 grid with one cell each... simpler: a grid where
    # every token has its own cell and t0, t1 score highest.
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [-1.0, -1.0]])
    result = reduce_tokens(MERGE_TOKENS, (1, 5), anchors, (1, 5), ratio=0.4, merge_scaling=scaling)
    assert result.keep.tolist() == [0, 1]
    # t2 -> t0, t3 -> t1, and t4 ties exactly between both and goes to the first kept token.
    assert result.assignment.tolist() == [0, 1, 0, 1, 0]
    torch.testing.assert_close(result.tokens, torch.tensor(expected), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- keep-count rule


@pytest.mark.parametrize(
    "n, ratio, min_keep, expected",
    [
        (1369, 0.5, 1, 684),  # 684.5 rounds half to even
        (4899, 0.5, 1, 2450),
        (4901, 0.5, 1, 2450),
        (4900, 0.5, 32, 2450),
        (40, 0.5, 32, 32),  # min_keep raises k
        (20, 0.5, 32, 20),  # capped at n
        (16, 1.0, 1, 16),
        (256, 0.5, 32, 128),
    ],
)
def test_keep_count(n, ratio, min_keep, expected):
    assert keep_count(n, ratio, min_keep) == expected


def test_min_keep_at_or_above_n_drops_nothing():
    features, anchors = random_image(4, 4, 2, 2)
    result = reduce_tokens(features, (4, 4), anchors, (2, 2), ratio=0.25, min_keep=16)
    assert result.keep.tolist() == list(range(16))
    assert result.tokens is features


# ---------------------------------------------------------------------------------------------- cell mapping


def test_cell_mapping_bagel_70_to_32_rows():
    rows = latent_cell_index((70, 1), (32, 1)).tolist()
    assert rows[:15] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5, 6]
    assert rows[-1] == 31


def test_cell_mapping_internvlu_text_mode_pool2():
    rows = latent_cell_index((16, 1), (28, 1)).tolist()
    assert rows[:7] == [0, 1, 3, 5, 7, 8, 10]
    assert rows == [math.floor(1.75 * r) for r in range(16)]


def test_center_mapping_is_an_option():
    corner = latent_cell_index((70, 1), (32, 1), "corner").tolist()
    center = latent_cell_index((70, 1), (32, 1), "center").tolist()
    assert center == [min(math.floor((r + 0.5) * 32 / 70), 31) for r in range(70)]
    assert center != corner


def test_every_token_its_own_cell_equals_plain_topk():
    features, anchors = random_image(16, 16, 28, 28, seed=3)
    g2tr = reduce_tokens(features, (16, 16), anchors, (28, 28), ratio=0.5)
    topk = torch.sort(torch.topk(g2tr.scores, 128).indices).values
    assert torch.equal(g2tr.keep, topk)


@pytest.mark.parametrize(
    "vit_grid, latent_grid, n, k, cells, fill",
    [
        ((70, 70), (32, 32), 4900, 2450, 1024, 1426),
        ((52, 70), (24, 32), 3640, 1820, 768, 1052),
        ((37, 37), (16, 16), 1369, 684, 256, 428),
        ((39, 70), (18, 32), 2730, 1365, 576, 789),
    ],
)
def test_bagel_geometry_table(vit_grid, latent_grid, n, k, cells, fill):
    """docs/algorithm.md (geometry): with pool 2 every latent cell is occupied and seeds one token."""
    assert vit_grid[0] * vit_grid[1] == n
    assert keep_count(n, 0.5, 32) == k
    occupied = latent_cell_index(vit_grid, latent_grid).unique().numel()
    assert occupied == cells == latent_grid[0] * latent_grid[1]
    assert k - occupied == fill
    # One seed per cell: every cell keeps at least one token.
    features, anchors = random_image(*vit_grid, *latent_grid, dim=8, seed=1)
    result = reduce_tokens(features, vit_grid, anchors, latent_grid, ratio=0.5, min_keep=32)
    kept_cells = latent_cell_index(vit_grid, latent_grid)[result.keep].unique()
    assert kept_cells.numel() == cells


# ---------------------------------------------------------------------------------------------- against the loop


@pytest.mark.parametrize(
    "vit_grid, latent_grid, ratio",
    [((14, 14), (6, 6), 0.5), ((13, 17), (5, 8), 0.3), ((9, 9), (9, 9), 0.5), ((12, 10), (3, 2), 0.7),
     ((8, 8), (16, 16), 0.25), ((20, 15), (8, 6), 0.125)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_loop(vit_grid, latent_grid, ratio, seed):
    features, anchors = random_image(*vit_grid, *latent_grid, dim=24, seed=seed)
    expected_keep, expected_scores = reference_select(features, vit_grid, anchors, latent_grid, ratio)
    result = reduce_tokens(features, vit_grid, anchors, latent_grid, ratio=ratio)
    assert torch.equal(result.keep, expected_keep)
    torch.testing.assert_close(result.scores, expected_scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.tokens, reference_merge(features, result.keep), atol=1e-6, rtol=1e-6)


def test_ties_break_by_higher_score_then_lower_index():
    # Every score equal: the seeds are the lowest-index token of each cell, the cells ranked by that token's
    # index, and the fill takes the lowest remaining indices.
    features = torch.ones(16, 4)
    anchors = torch.ones(4, 4)
    result = reduce_tokens(features, (4, 4), anchors, (2, 2), ratio=0.5)
    # cell seeds: t0 (cell 0), t2 (cell 1), t8 (cell 2), t10 (cell 3); fill: t1, t3, t4, t5.
    assert result.keep.tolist() == [0, 1, 2, 3, 4, 5, 8, 10]
    result = reduce_tokens(features, (4, 4), anchors, (2, 2), ratio=0.125)
    assert result.keep.tolist() == [0, 2]


# ---------------------------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 12), w=st.integers(1, 12), h_l=st.integers(1, 10), w_l=st.integers(1, 10),
    ratio=st.floats(0.01, 1.0), min_keep=st.integers(1, 40), merge=st.booleans(),
    method=st.sampled_from(["g2tr", "topk", "random", "pool"]), seed=st.integers(0, 2**16),
)
def test_invariants(h, w, h_l, w_l, ratio, min_keep, merge, method, seed):
    features, anchors = random_image(h, w, h_l, w_l, dim=8, seed=seed)
    result = reduce_tokens(features, (h, w), anchors, (h_l, w_l), ratio=ratio, min_keep=min_keep,
                           merge=merge, method=method, seed=seed)
    n = h * w
    k = keep_count(n, ratio, min_keep)
    assert result.num_kept == k and result.tokens.shape == (k, 8)
    keep = result.keep.tolist()
    assert keep == sorted(set(keep)) and all(0 <= i < n for i in keep)
    assert result.assignment.shape == (n,)
    assert result.assignment[result.keep].tolist() == list(range(k))
    if not merge and k < n:
        assert (result.assignment < 0).sum() == n - k
    # each group's token is the weighted mean of its members (or the kept token itself without merging)
    if merge and k < n:
        members = torch.nn.functional.one_hot(result.assignment, k).T.float()  # [k, n]
        expected = (members @ features) / members.sum(1, keepdim=True)
    else:
        expected = features[result.keep]
    torch.testing.assert_close(result.tokens, expected, atol=1e-5, rtol=1e-5)
    # same input, same plan
    again = reduce_tokens(features, (h, w), anchors, (h_l, w_l), ratio=ratio, min_keep=min_keep,
                          merge=merge, method=method, seed=seed)
    assert torch.equal(again.keep, result.keep) and torch.equal(again.tokens, result.tokens)


def test_ratio_one_returns_features_unchanged():
    features, anchors = random_image(7, 9, 3, 4)
    result = reduce_tokens(features, (7, 9), anchors, (3, 4), ratio=1.0)
    assert result.tokens is features
    assert result.keep.tolist() == list(range(63)) == result.assignment.tolist()


def test_merge_scaling_weights_the_kept_token():
    features, anchors = random_image(6, 6, 3, 3, seed=5)
    result = reduce_tokens(features, (6, 6), anchors, (3, 3), ratio=0.5, merge_scaling=3.0)
    members = torch.nn.functional.one_hot(result.assignment, result.num_kept).T.float()
    kept_weight = torch.zeros_like(members)
    kept_weight[torch.arange(result.num_kept), result.keep] = 2.0  # 3x the kept token = 1 (member) + 2 extra
    weights = members + kept_weight
    torch.testing.assert_close(result.tokens, (weights @ features) / weights.sum(1, keepdim=True))


def test_plan_applies_to_other_tensors():
    features, anchors = random_image(6, 8, 3, 4, seed=2)
    result = reduce_tokens(features, (6, 8), anchors, (3, 4), ratio=0.5)
    torch.testing.assert_close(result.merge(features), result.tokens)
    positions = torch.arange(48)[:, None].float()
    merged_positions = result.merge(positions)
    assert merged_positions.shape == (24, 1)
    assert result.unmerge(result.tokens).shape == features.shape
    assert torch.equal(result.unmerge(result.keep), result.keep[result.assignment])
    unmerged = reduce_tokens(features, (6, 8), anchors, (3, 4), ratio=0.5, merge=False)
    assert torch.equal(unmerged.tokens, features[unmerged.keep])
    assert torch.equal(unmerged.keep, result.keep)
    spread = unmerged.unmerge(unmerged.tokens)
    assert torch.equal(spread[unmerged.keep], features[unmerged.keep])
    assert (spread[unmerged.assignment < 0] == 0).all()
    with pytest.raises(ValueError, match="values"):
        result.merge(features[:5])


@pytest.mark.parametrize("scaling", [1.0, 1.5])
def test_kept_tokens_that_absorb_nothing_are_bit_exact(scaling):
    features, anchors = random_image(10, 10, 4, 4, seed=4, dtype=torch.bfloat16)
    result = reduce_tokens(features, (10, 10), anchors, (4, 4), ratio=0.8, merge_scaling=scaling)
    absorbed = torch.bincount(result.assignment, minlength=result.num_kept) > 1
    alone = ~absorbed
    assert alone.any()
    assert torch.equal(result.tokens[alone], features[result.keep][alone])
    assert result.tokens.dtype == torch.bfloat16


def test_batched_never_mixes_images():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (4, 4), (9, 3)]
    feats = [torch.randn(h * w, 12, generator=g) for h, w in shapes]
    # Image 1's tokens are exact copies of image 0's first tokens: a packed merge would happily mix them.
    feats[1] = feats[0][:16].clone()
    anchors = [torch.randn(4, 12, generator=g) for _ in shapes]
    results = reduce_tokens_batched(feats, shapes, anchors, [(2, 2)] * 3, ratio=0.5)
    for (h, w), f, a, r in zip(shapes, feats, anchors, results):
        single = reduce_tokens(f, (h, w), a, (2, 2), ratio=0.5)
        assert torch.equal(r.keep, single.keep) and torch.equal(r.tokens, single.tokens)
        assert int(r.assignment.max()) < r.num_kept and r.assignment.numel() == h * w
    with pytest.raises(ValueError, match="one entry per image"):
        reduce_tokens_batched(feats, shapes[:2], anchors, [(2, 2)] * 3, ratio=0.5)


def test_bf16_features_give_the_fp32_keep_set_without_near_ties():
    features, anchors = random_image(20, 20, 8, 8, dim=64, seed=7)
    features = features.bfloat16().float()  # the same values in both runs
    anchors = anchors.bfloat16().float()
    fp32 = reduce_tokens(features, (20, 20), anchors, (8, 8), ratio=0.5)
    bf16 = reduce_tokens(features.bfloat16(), (20, 20), anchors.bfloat16(), (8, 8), ratio=0.5)
    gaps = torch.sort(fp32.scores).values.diff().abs().min()
    assert gaps > 1e-6  # no near-ties in this draw
    assert bf16.scores.dtype == torch.float32
    assert torch.equal(bf16.keep, fp32.keep)
    assert bf16.tokens.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.tokens.float(), fp32.tokens, atol=1e-2, rtol=1e-2)


def test_both_segment_sums_agree_and_handle_empty_groups():
    from g2tr_hf.reduction import _segment_sum, _sorted_segment_sum

    g = torch.Generator().manual_seed(0)
    values = torch.randn(50, 3, 4, generator=g)
    segment = torch.randint(0, 9, (50,), generator=g)
    segment[segment == 4] = 5  # bucket 4 stays empty
    expected = torch.stack([values[segment == b].sum(0) for b in range(10)])
    torch.testing.assert_close(_segment_sum(values, segment, 10), expected)
    torch.testing.assert_close(_sorted_segment_sum(values, segment, 10), expected)


# ---------------------------------------------------------------------------------------------- methods


def test_registry_and_baselines():
    assert {"g2tr", "topk", "random", "pool"} <= set(available_methods())
    features, anchors = random_image(12, 12, 6, 6, seed=8)
    a = reduce_tokens(features, (12, 12), anchors, (6, 6), ratio=0.5, method="random", seed=1)
    b = reduce_tokens(features, (12, 12), anchors, (6, 6), ratio=0.5, method="random", seed=1)
    c = reduce_tokens(features, (12, 12), anchors, (6, 6), ratio=0.5, method="random", seed=2)
    assert torch.equal(a.keep, b.keep) and not torch.equal(a.keep, c.keep)
    pool = reduce_tokens(features, (12, 12), anchors, (6, 6), ratio=0.25, method="pool")
    rows, cols = pool.keep // 12, pool.keep % 12
    assert pool.num_kept == 36 and rows.unique().numel() >= 6 and cols.unique().numel() >= 6
    assert rows.min() == 0 and rows.max() == 11 and cols.max() == 11


def test_register_a_new_method():
    @register_method("test_last_k")
    def last_k(inputs):
        n = inputs.scores.numel()
        return torch.arange(n - inputs.num_keep, n)

    features, anchors = random_image(4, 4, 2, 2)
    result = reduce_tokens(features, (4, 4), anchors, (2, 2), ratio=0.25, method="test_last_k")
    assert result.keep.tolist() == [12, 13, 14, 15]


# ---------------------------------------------------------------------------------------------- anchors


def test_patchify_order_and_grid():
    latents = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)  # [C, H, W]
    anchors, grid = build_latent_anchors(latents, patch_size=2)
    assert grid == (2, 3) and anchors.shape == (6, 8)
    # token (0, 1): rows 0-1, cols 2-3, feature order (p_row, p_col, channel)
    expected = [latents[c, pr, 2 + pc].item() for pr in range(2) for pc in range(2) for c in range(2)]
    assert anchors[1].tolist() == expected


def test_ragged_pool_averages_edge_blocks_over_their_size():
    latents = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    anchors, grid = build_latent_anchors(latents, pool=2)
    assert grid == (3, 4)
    tokens = latents.permute(1, 2, 0)  # [5, 7, 3]
    for i in range(3):
        for j in range(4):
            block = tokens[2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1, 3)
            torch.testing.assert_close(anchors[i * 4 + j], block.mean(0))


def test_anchor_projection_and_channel_interpolation():
    latents = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(1))
    linear = torch.nn.Linear(64, 32)
    anchors, grid = build_latent_anchors(latents, patch_size=2, pool=2, project=linear)
    pooled, _ = build_latent_anchors(latents, patch_size=2, pool=2)
    assert grid == (2, 2)
    torch.testing.assert_close(anchors, linear(pooled))

    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    out = interpolate_channels(z, 2048)
    j = torch.arange(2048, dtype=torch.float64)
    src = ((j + 0.5) * 16 / 2048 - 0.5).clamp(min=0)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp(max=15)
    lam = (src - i0).float()
    torch.testing.assert_close(out, (1 - lam) * z[:, i0] + lam * z[:, i1])
    assert interpolate_channels(z.bfloat16(), 2048).dtype == torch.bfloat16
    assert interpolate_channels(z, 16) is z


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": -0.5}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"ratio": True}, "ratio"),
        ({"ratio": 0.5, "min_keep": 0}, "min_keep"),
        ({"ratio": 0.5, "min_keep": 2.5}, "min_keep"),
        ({"ratio": 0.5, "method": "fastv-typo"}, "method"),
        ({"ratio": 0.5, "merge_scaling": 0.0}, "merge_scaling"),
        ({"ratio": 0.5, "cell_mapping": "area"}, "cell_mapping"),
    ],
)
def test_bad_options(kwargs, match):
    features, anchors = random_image(4, 4, 2, 2)
    with pytest.raises(ValueError, match=match):
        reduce_tokens(features, (4, 4), anchors, (2, 2), **kwargs)


def test_bad_shapes_and_values():
    features, anchors = random_image(4, 4, 2, 2)
    with pytest.raises(ValueError, match="`grid`"):
        reduce_tokens(features, (4, 5), anchors, (2, 2), ratio=0.5)
    with pytest.raises(ValueError, match="`grid`"):
        reduce_tokens(features, (4, 0), anchors, (2, 2), ratio=0.5)
    with pytest.raises(ValueError, match="`anchor_grid`"):
        reduce_tokens(features, (4, 4), anchors, (3, 2), ratio=0.5)
    with pytest.raises(ValueError, match="feature dimension"):
        reduce_tokens(features, (4, 4), anchors[:, :5], (2, 2), ratio=0.5)
    with pytest.raises(ValueError, match="`features`"):
        reduce_tokens(features[0], (4, 4), anchors, (2, 2), ratio=0.5)
    with pytest.raises(ValueError, match="`features`"):
        reduce_tokens(features.long(), (4, 4), anchors, (2, 2), ratio=0.5)
    bad = features.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="`features` contains non-finite"):
        reduce_tokens(bad, (4, 4), anchors, (2, 2), ratio=0.5)
    bad = anchors.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="`anchors` contains non-finite"):
        reduce_tokens(features, (4, 4), bad, (2, 2), ratio=0.5)
    with pytest.raises(ValueError, match="`latents`"):
        build_latent_anchors(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="patch_size"):
        build_latent_anchors(torch.zeros(2, 5, 4), patch_size=2)

"""Pre-LLM baselines: each method's own rule on small hand-checkable inputs, and every method on both tiny models
(exact budget, determinism, ratio 1.0 == unreduced, batch == singles, no VAE encode)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from g2tr_hf.baselines import METHOD_PRESETS, received_attention, reduction_options, resolve_method
from g2tr_hf.reduction import available_methods, keep_count, method_needs_anchors, reduce_tokens
from g2tr_hf.tiny import build_tiny


ANCHOR_FREE = ["random", "pool", "avgpool", "divprune", "visionzip", "tome"]
PRESETS = list(METHOD_PRESETS)


def random_tokens(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- the methods alone


def test_baselines_are_registered_and_anchor_free():
    for name in ANCHOR_FREE:
        assert name in available_methods()
        assert not method_needs_anchors(name)
    assert method_needs_anchors("g2tr") and method_needs_anchors("topk")


@pytest.mark.parametrize("method", ANCHOR_FREE)
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("grid, ratio", [((5, 7), 0.5), ((6, 6), 0.25), ((3, 4), 0.9), ((4, 4), 0.0625)])
def test_exact_budget_sorted_unique_and_deterministic(method, merge, grid, ratio):
    features = random_tokens(grid[0] * grid[1])
    first = reduce_tokens(features, grid, None, None, ratio=ratio, method=method, merge=merge)
    again = reduce_tokens(features, grid, None, None, ratio=ratio, method=method, merge=merge)
    k = keep_count(features.shape[0], ratio)
    assert first.num_kept == k == first.tokens.shape[0]
    assert torch.equal(first.keep, torch.sort(first.keep).values) and first.keep.unique().numel() == k
    assert torch.equal(first.keep, again.keep) and torch.equal(first.tokens, again.tokens)
    if merge:
        # every token lands in exactly one group, kept tokens in their own
        assert first.assignment.min() >= 0 and first.assignment.max() < k
        assert torch.equal(first.assignment[first.keep], torch.arange(k))
        # merged tokens are group means of the inputs
        expected = torch.zeros(k, features.shape[1]).index_add_(0, first.assignment, features)
        expected /= torch.bincount(first.assignment, minlength=k)[:, None]
        torch.testing.assert_close(first.tokens, expected)
    else:
        assert torch.equal(first.tokens, features[first.keep])


def naive_farthest_point(features: torch.Tensor, k: int) -> list[int]:
    """The DivPrune rule written as plain Python loops."""
    x = F.normalize(features, dim=-1)
    d = (1 - x @ x.T).tolist()
    n = len(d)
    first = max(range(n), key=lambda i: (min(d[i][j] for j in range(n) if j != i), -i))
    chosen = [first]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i][c] for c in chosen), -i)))
    return sorted(chosen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_divprune_is_greedy_max_min_diversity(seed):
    features = random_tokens(30, dim=5, seed=seed)
    result = reduce_tokens(features, (5, 6), None, None, ratio=0.3, method="divprune", merge=False)
    assert result.keep.tolist() == naive_farthest_point(features, 9)


def test_divprune_keeps_one_of_each_duplicate_cluster():
    directions = torch.eye(4)
    features = directions.repeat_interleave(3, dim=0) + 0.01 * random_tokens(12, dim=4)
    result = reduce_tokens(features, (3, 4), None, None, ratio=4 / 12, method="divprune", merge=False)
    assert sorted(int(i) // 3 for i in result.keep) == [0, 1, 2, 3]


def test_avgpool_on_a_divisible_grid_is_two_by_two_average_pooling():
    grid = torch.arange(16 * 3, dtype=torch.float32).reshape(4, 4, 3)
    features = grid.reshape(16, 3)
    result = reduce_tokens(features, (4, 4), None, None, ratio=0.25, method="avgpool")
    pooled = F.avg_pool2d(grid.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0).reshape(4, 3)
    torch.testing.assert_close(result.tokens, pooled)


def test_tome_means_are_size_weighted_and_groups_are_similar_tokens():
    # Two tight clusters laid out 0 0 1 1 0 0 1 1 ...: every A token (even position) has a B token (odd position) of
    # its own cluster, so one round of bipartite matching pairs tokens within clusters only.
    base = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1] * 4)
    features = base[labels] + 0.01 * random_tokens(16, dim=3)
    result = reduce_tokens(features, (4, 4), None, None, ratio=0.5, method="tome")
    for row in range(8):
        members = result.assignment == row
        assert len(set(labels[members].tolist())) == 1
        torch.testing.assert_close(result.tokens[row], features[members].mean(dim=0))
    # Two rounds down to 2 tokens: the means stay size-weighted means of the original tokens.
    deeper = reduce_tokens(features, (4, 4), None, None, ratio=2 / 16, method="tome")
    for row in range(2):
        torch.testing.assert_close(deeper.tokens[row], features[deeper.assignment == row].mean(dim=0))


def test_visionzip_keeps_dominant_tokens_unmerged_and_merges_the_rest_into_contextual_targets():
    features = random_tokens(64, dim=6)
    result = reduce_tokens(features, (8, 8), None, None, ratio=0.25, method="visionzip")
    scores = received_attention(features)
    torch.testing.assert_close(result.scores, scores)
    num_dominant = round(16 * 54 / 64)
    dominant = torch.sort(torch.sort(scores, descending=True, stable=True).indices[:num_dominant]).values
    counts = torch.bincount(result.assignment, minlength=16)
    dominant_rows = torch.searchsorted(result.keep, dominant)
    assert torch.equal(counts[dominant_rows], torch.ones(num_dominant, dtype=torch.long))
    torch.testing.assert_close(result.tokens[dominant_rows], features[dominant])
    assert int(counts.sum()) == 64 and int((counts > 1).sum()) <= 16 - num_dominant


def test_received_attention_matches_the_dense_formula():
    features = random_tokens(40, dim=7)
    dense = (features @ features.T / 7**0.5).softmax(dim=-1).mean(dim=0)
    torch.testing.assert_close(received_attention(features), dense)


def test_anchor_methods_still_require_anchors():
    with pytest.raises(ValueError, match="`anchors` are required"):
        reduce_tokens(random_tokens(16), (4, 4), None, None, ratio=0.5, method="g2tr")


def test_method_specs_resolve_and_reject_bad_input():
    assert resolve_method("divprune") == {"g2tr_method": "divprune", "g2tr_merge": False}
    assert resolve_method("random:merge=true") == {"g2tr_method": "random", "g2tr_merge": True}
    assert resolve_method("g2tr:merge_scaling=0.5")["g2tr_merge_scaling"] == 0.5
    assert resolve_method("topk") == {"g2tr_method": "topk"}
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        resolve_method("nope")
    with pytest.raises(ValueError, match="key=value"):
        resolve_method("g2tr:colour=red")
    with pytest.raises(ValueError, match="`merge` must be true or false"):
        resolve_method("g2tr:merge=maybe")
    with pytest.raises(ValueError, match="g2tr_merge_scaling"):
        resolve_method("g2tr:merge_scaling=-1")


# ------------------------------------------------------------------------------------------------ on both models


def _image(seed: int, size=(60, 50)) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8))


def _inputs(processor, conversations):
    messages = [
        [{"role": "user", "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": q}]}]
        for images, q in conversations
    ]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    if len(messages) == 1:
        return processor.apply_chat_template(messages[0], **kwargs)
    return processor.apply_chat_template(messages, padding=True, **kwargs)


@pytest.fixture(scope="module", params=["bagel", "internvlu"])
def tiny(request):
    model, processor = build_tiny(request.param)
    return request.param, model, processor


CONVERSATIONS = [([0], "what is it?"), ([1, 2], "compare these two pictures please")]


def _conversation(index):
    seeds, question = CONVERSATIONS[index]
    return [_image(seed, size=(60 - 8 * n, 50)) for n, seed in enumerate(seeds)], question


@pytest.mark.parametrize("method", ["random", "pool", "divprune", "visionzip", "tome", "g2tr-no-merge"])
def test_every_method_on_both_models(tiny, method, monkeypatch):
    name, model, processor = tiny
    ratio = 0.5
    singles = [_inputs(processor, [_conversation(i)]) for i in range(2)]
    batch = _inputs(processor, [_conversation(0), _conversation(1)])
    with torch.no_grad():
        unreduced = [model(**single).logits[:, -1] for single in singles]
    if not method_needs_anchors(resolve_method(method)["g2tr_method"]):
        def no_encode(*args, **kwargs):
            raise AssertionError("an anchor-free method encoded the VAE")

        monkeypatch.setattr(model.model, "encode_vae_latents", no_encode)
    with reduction_options(model, method), torch.no_grad():
        # ratio 1.0 is the unreduced model bit for bit
        for single, logits in zip(singles, unreduced):
            assert torch.equal(model(**single, g2tr_ratio=1.0).logits[:, -1], logits)
        batch_out = model(**batch, g2tr_ratio=ratio)
        for row, single in enumerate(singles):
            out = model(**single, g2tr_ratio=ratio)
            again = model(**single, g2tr_ratio=ratio)
            assert torch.equal(out.logits, again.logits)  # deterministic
            plans = out.image_reductions
            assert [plan.num_kept for plan in plans] == [
                keep_count(plan.num_tokens, ratio, model.config.g2tr_min_keep) for plan in plans
            ]
            dropped = sum(plan.num_tokens - plan.num_kept for plan in plans)
            assert int(out.reduced_attention_mask.sum()) == int(single["attention_mask"].sum()) - dropped
            assert int(batch_out.reduced_attention_mask[row].sum()) == int(out.reduced_attention_mask.sum())
            torch.testing.assert_close(batch_out.logits[row, -1], out.logits[0, -1], atol=1e-4, rtol=1e-4)
            assert not torch.equal(out.logits[:, -1], unreduced[row])  # something was reduced
    assert model.config.g2tr_method == "g2tr" and model.config.g2tr_merge is True  # restored


def test_config_route_and_generation(tiny):
    name, model, processor = tiny
    single = _inputs(processor, [_conversation(0)])
    with reduction_options(model, "tome"), torch.no_grad():
        via_context = model.generate(**single, g2tr_ratio=0.5, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**single, g2tr_ratio=0.5, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(via_context, uncached)
    model.config.g2tr_method = "tome"
    try:
        with torch.no_grad():
            via_config = model.generate(**single, g2tr_ratio=0.5, max_new_tokens=4, do_sample=False)
    finally:
        model.config.g2tr_method = "g2tr"
    assert torch.equal(via_context, via_config)


def test_reduction_options_rejects_unknown_fields(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError, match="colour"):
        with reduction_options(model, colour=1):
            pass


@pytest.mark.parametrize("first", ["reduction", "baselines", "in_llm", "configuration_g2tr"])
def test_registry_modules_import_in_any_order(first, tmp_path, monkeypatch):
    """A Hub folder holds these modules flat and transformers may import any of them first (a pipeline file, a
    config file): no import cycle, and once a config module is loaded every method is registered, VScan's selection
    (not the in-LLM refusal) under `vscan`."""
    import importlib
    import shutil
    from pathlib import Path

    import g2tr_hf

    package = f"flat_{first}"
    (tmp_path / package).mkdir()
    source = Path(g2tr_hf.__file__).parent
    for name in ("reduction", "baselines", "in_llm", "generation_g2tr", "compat", "configuration_g2tr"):
        shutil.copy(source / f"{name}.py", tmp_path / package)
    (tmp_path / package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module(f"{package}.{first}")
    importlib.import_module(f"{package}.configuration_g2tr")
    registry = importlib.import_module(f"{package}.reduction")
    assert {"vscan", "vscan_vit", "fastv", "divprune", "g2tr"} <= set(registry.available_methods())
    assert registry._METHODS["vscan"] is importlib.import_module(f"{package}.baselines")._select_vscan_vit

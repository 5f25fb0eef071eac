"""VScan: the ViT stage's rule against a plain-loop restatement, its ViT attention scores against dense attention
maps computed another way, the InternVL-U token grouping against the pixel shuffle, bad input, and the ViT stage in
both editing pipelines. The two-stage method on both models (budgets, cache, positions, batch, SDPA == eager,
decoding, multi-turn) is covered with the other in-LLM methods in test_in_llm.py."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from g2tr_hf.baselines import (
    METHOD_PRESETS,
    VSCAN_WINDOW,
    reduction_options,
    resolve_method,
    vit_received_attention,
    vscan_vit_layers,
)
from g2tr_hf.in_llm import acts_before_llm, acts_in_llm, window_cells
from g2tr_hf.modeling_internvlu import eager_vit_attention, pixel_shuffle
from g2tr_hf.reduction import keep_count, method_needs_anchors, method_needs_vit_attention, reduce_tokens
from g2tr_hf.tiny import build_tiny


def _image(seed: int, size=(60, 50)) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------ routing and the rule


def test_routing_and_presets():
    assert acts_before_llm("vscan") and acts_in_llm("vscan")  # both stages
    assert acts_before_llm("vscan_vit") and not acts_in_llm("vscan_vit")  # the ViT stage alone
    assert not acts_before_llm("fastv") and acts_before_llm("g2tr")
    for name in ("vscan", "vscan_vit"):
        assert method_needs_vit_attention(name) and not method_needs_anchors(name)
    assert not method_needs_vit_attention("g2tr") and not method_needs_vit_attention("visionzip")
    assert resolve_method("vscan") == METHOD_PRESETS["vscan"] == {"g2tr_method": "vscan", "g2tr_merge": True}
    assert resolve_method("vscan-vit")["g2tr_method"] == "vscan_vit"


def test_scanned_vit_layers():
    assert vscan_vit_layers(24) == (23, 5)  # CLIP-L / InternViT-300M: the last layer and shallow layer 5
    assert vscan_vit_layers(26) == (25, 5)  # BAGEL's SigLIP
    assert vscan_vit_layers(2) == (1, 0) and vscan_vit_layers(1) == (0, 0)
    with pytest.raises(ValueError, match="num_layers"):
        vscan_vit_layers(0)


def loop_vscan(global_scores, local_scores, grid, k) -> list[int]:
    """The ViT stage written as plain loops: the top ceil(k/2) by the global score; then, visiting the others by
    descending local score, accept a token while its window holds fewer than ceil(k_local / #windows) accepted ones;
    then fill up with the best of the rest."""
    h, w = grid
    num_global = math.ceil(k / 2)
    by_global = sorted(range(h * w), key=lambda i: (-global_scores[i], i))
    chosen = by_global[:num_global]
    window = lambda i: (i // w) // VSCAN_WINDOW * -(-w // VSCAN_WINDOW) + (i % w) // VSCAN_WINDOW
    num_windows = -(-h // VSCAN_WINDOW) * -(-w // VSCAN_WINDOW)
    k_local = k - num_global
    quota = -(-k_local // num_windows)
    rest = sorted((i for i in range(h * w) if i not in chosen), key=lambda i: (-local_scores[i], i))
    per_window, local = {}, []
    for i in rest:
        if len(local) == k_local:
            break
        if per_window.get(window(i), 0) < quota:
            per_window[window(i)] = per_window.get(window(i), 0) + 1
            local.append(i)
    for i in rest:
        if len(local) == k_local:
            break
        if i not in local:
            local.append(i)
    return sorted(chosen + local)


@pytest.mark.parametrize("grid, ratio", [((12, 12), 0.5), ((13, 7), 0.25), ((5, 9), 0.9), ((24, 24), 1 / 6)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vit_stage_equals_the_loop_restatement(grid, ratio, seed):
    n = grid[0] * grid[1]
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 8, generator=generator)
    # coarse values, so that ties occur and the tie rule (lower index first) is exercised
    scores = torch.randint(0, 6, (2, n), generator=generator).float()
    k = keep_count(n, ratio)
    result = reduce_tokens(features, grid, None, None, ratio=ratio, method="vscan_vit", vit_attention=scores)
    assert result.keep.tolist() == loop_vscan(scores[0].tolist(), scores[1].tolist(), grid, k)
    again = reduce_tokens(features, grid, None, None, ratio=ratio, method="vscan_vit", vit_attention=scores)
    assert torch.equal(result.keep, again.keep) and torch.equal(result.tokens, again.tokens)
    # VScan's merge: every dropped token averaged into its most cosine-similar kept token
    directions = F.normalize(features, dim=-1)
    nearest = (directions @ directions[result.keep].T).argmax(dim=-1)
    nearest[result.keep] = torch.arange(k)
    expected = torch.zeros(k, 8).index_add_(0, nearest, features) / torch.bincount(nearest, minlength=k)[:, None]
    torch.testing.assert_close(result.tokens, expected)


def test_local_scan_spreads_over_windows():
    grid = (12, 12)  # four 6 x 6 windows
    global_scores = torch.zeros(144)
    global_scores[:8] = 1.0  # the global half takes tokens 0..7 (top-left window)
    local_scores = torch.arange(144, dtype=torch.float32)  # the best local tokens all sit bottom-right
    result = reduce_tokens(
        torch.randn(144, 4), grid, None, None, ratio=16 / 144, method="vscan_vit",
        vit_attention=torch.stack([global_scores, local_scores]),
    )  # fmt: skip
    assert result.num_kept == 16
    local = result.keep[result.keep >= 8]
    windows = window_cells(grid, VSCAN_WINDOW)
    assert torch.bincount(windows[local], minlength=4).tolist() == [2, 2, 2, 2]  # quota ceil(8 / 4) per window


def test_bad_vit_attention_is_named():
    features = torch.randn(16, 4)
    with pytest.raises(ValueError, match="pass `vit_attention`"):
        reduce_tokens(features, (4, 4), None, None, ratio=0.5, method="vscan")
    with pytest.raises(ValueError, match=r"shape \[S, 16\]"):
        reduce_tokens(features, (4, 4), None, None, ratio=0.5, method="vscan", vit_attention=torch.rand(2, 15))
    with pytest.raises(ValueError, match="non-finite"):
        reduce_tokens(features, (4, 4), None, None, ratio=0.5, method="vscan",
                      vit_attention=torch.full((2, 16), float("nan")))  # fmt: skip
    # nothing to reduce: no scores needed
    assert reduce_tokens(features, (4, 4), None, None, ratio=1.0, method="vscan").num_kept == 16


# ---------------------------------------------------------------------------------- scores from the ViT itself


def _dense_received_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """The attention maps through SDPA with identity values (the output IS the map), averaged: another path."""
    n = query.shape[-2]
    maps = F.scaled_dot_product_attention(query.float(), key.float(), torch.eye(n)[None].expand(query.shape[0], -1, -1),
                                          scale=scaling)  # fmt: skip
    return maps.mean(dim=(0, 1))


def test_received_attention_in_row_blocks_equals_the_dense_maps(monkeypatch):
    import g2tr_hf.baselines as baselines

    monkeypatch.setattr(baselines, "_SCORE_BLOCK_ELEMENTS", 3 * 30 * 7)  # blocks of 7 rows, the last one short
    generator = torch.Generator().manual_seed(0)
    query, key = 3 * torch.randn(3, 30, 8, generator=generator), 3 * torch.randn(3, 30, 8, generator=generator)
    expected = _dense_received_attention(query, key, 8**-0.5)
    torch.testing.assert_close(vit_received_attention(query, key, 8**-0.5), expected)


def test_bagel_scores_are_the_siglip_layers_received_attention():
    model, processor = build_tiny("bagel")
    images = [_image(0, (60, 50)), _image(1, (36, 44))]  # two sizes: the ViT pads the smaller one
    inputs = processor(text=[processor.image_token * 2 + "hi"], images=[images], return_tensors="pt")
    vit = model.model.vit_model.vision_model
    with torch.no_grad():
        features, scores = model.model.vscan_attention_scores(
            inputs["pixel_values"], inputs["image_position_ids"], inputs["image_grid_hw"]
        )
        reference = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_position_ids"], inputs["image_grid_hw"]
        ).pooler_output
        assert torch.equal(features, reference)  # capturing changes nothing
        layers = vit.encoder.layers
        embeddings = vit.embeddings(inputs["pixel_values"], inputs["image_position_ids"])
        lengths = inputs["image_grid_hw"].prod(-1).tolist()
        for image, hidden in enumerate(embeddings.split(lengths)):
            hidden, inputs_of = hidden[None], []
            for layer in layers:  # each image alone, no padding
                inputs_of.append(hidden)
                hidden = layer(hidden)
            expected = []
            for index in vscan_vit_layers(len(layers)):
                attention, normed = layers[index].self_attn, layers[index].layer_norm1(inputs_of[index])
                shape = (-1, attention.num_heads, attention.head_dim)
                heads = lambda proj: proj(normed).view(shape).transpose(0, 1)
                expected.append(_dense_received_attention(heads(attention.q_proj), heads(attention.k_proj),
                                                          attention.scaling))  # fmt: skip
            assert scores[image].shape == (2, lengths[image])
            torch.testing.assert_close(scores[image], torch.stack(expected), atol=1e-6, rtol=1e-5)


def test_internvlu_scores_are_the_cls_attention_summed_over_each_tokens_patches():
    model, processor = build_tiny("internvlu")
    inputs = processor(text=[processor.image_token + "hi"], images=[_image(0)], return_tensors="pt")
    base = model.model
    with torch.no_grad():
        features, scores = base.vscan_attention_scores(inputs["pixel_values"])
        assert torch.equal(features, base.get_image_features(inputs["pixel_values"]).pooler_output)
        layers = base.vision_model.encoder.layers
        hidden, inputs_of = base.vision_model.embeddings(inputs["pixel_values"]), []
        for layer in layers:
            inputs_of.append(hidden)
            hidden = layer(hidden)
        grid = base.config.image_grid_size
        factor = int(round(1 / base.config.downsample_ratio))
        side = grid * factor
        # which ViT patches the pixel shuffle puts into each LLM token: shuffle a grid of patch indices
        patch_ids = torch.arange(side * side, dtype=torch.float32).reshape(1, side, side, 1)
        members = pixel_shuffle(patch_ids, base.config.downsample_ratio).reshape(grid * grid, factor * factor).long()
        for row, index in enumerate(vscan_vit_layers(len(layers))):
            attention = layers[index].attn
            normed = layers[index].norm1(inputs_of[index])
            b, s, _ = normed.shape
            q, k, v = attention.qkv(normed).reshape(b, s, 3, attention.num_heads, attention.head_dim).unbind(2)
            _, weights = eager_vit_attention(attention, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                                             attention.scale)  # fmt: skip
            cls_to_patches = weights[:, :, 0, 1:].float().mean(dim=1)[0]  # [side * side]
            expected = cls_to_patches[members].sum(dim=-1)
            torch.testing.assert_close(scores[0][row], expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------- the editing pipelines


def test_vit_stage_runs_in_both_editing_pipelines():
    from g2tr_hf.pipeline_bagel import G2TRBagelPipeline
    from g2tr_hf.pipeline_internvlu import G2TRInternVLUPipeline
    from g2tr_hf.tiny import build_tiny_internvlu_generation

    model, processor = build_tiny("bagel")
    pipe = G2TRBagelPipeline(model=model, processor=processor)
    call = dict(prompt="make it red", image=_image(3), num_inference_steps=2, show_progress=False, output_type="np")
    with reduction_options(model, "vscan-vit"):
        reduced = pipe(**call, g2tr_ratio=0.5).images[0]
    unreduced = pipe(**call, g2tr_ratio=1.0).images[0]
    assert np.isfinite(reduced).all() and not np.array_equal(reduced, unreduced)

    model, processor, decoder, scheduler = build_tiny_internvlu_generation(seed=0)
    pipe = G2TRInternVLUPipeline(model, processor, generation_decoder=decoder, scheduler=scheduler, device="cpu")
    call = dict(prompt="make it red", image=_image(3), num_inference_steps=2, show_progress=False)
    with reduction_options(pipe.model, "vscan-vit"):
        out = pipe(**call, g2tr_ratio=0.5)
    (plan,) = out.image_reductions[0]
    tokens = pipe.model.config.image_seq_length
    assert plan.num_kept == keep_count(tokens, 0.5, pipe.model.config.g2tr_min_keep)
    with reduction_options(pipe.model, "vscan"), pytest.raises(ValueError, match="vscan_vit"):
        pipe(**call, g2tr_ratio=0.5)

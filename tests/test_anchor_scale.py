"""Reduced-resolution anchors (`g2tr_anchor_scale`): geometry, exactness of the default, wiring in both models."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from g2tr_hf.configuration_bagel import G2TRBagelConfig
from g2tr_hf.profiling import anchor_scale_agreement
from g2tr_hf.reduction import (
    anchor_encode_size,
    build_latent_anchors,
    reduce_tokens,
    resize_for_anchors,
    validate_anchor_scale,
)
from g2tr_hf.tiny import build_tiny
from test_modeling_bagel import IMAGE_A, IMAGE_B, build_inputs, make_image, text, tiny_model


def full_anchor_grid(height: int, width: int, downsample: int, patch: int, pool: int) -> tuple[int, int]:
    """The anchor grid of the full-resolution path, from `build_latent_anchors` itself."""
    latent = torch.zeros(1, -(-height // downsample), -(-width // downsample))
    return build_latent_anchors(latent, patch_size=patch, pool=pool)[1]


# Sizes the processors produce: BAGEL's VAE images are multiples of 16 up to 1024 on the long side (any aspect),
# InternVL-U's anchor image is the 448 tile, plus odd sizes a custom processor could send.
BAGEL_SIZES = [(1024, 1024), (1008, 1024), (512, 1024), (1024, 496), (64, 64), (48, 96), (16, 1024), (752, 1008)]
INTERNVLU_SIZES = [(448, 448), (448, 224), (56, 56), (441, 450), (8, 8)]


@pytest.mark.parametrize("height, width", BAGEL_SIZES)
@pytest.mark.parametrize("pool, scale", [(2, 0.5), (4, 0.5), (4, 0.25), (2, 1.0)])
def test_downscaled_bagel_latent_lands_on_the_pooled_grid(height, width, pool, scale):
    size, effective_pool = anchor_encode_size(
        height, width, vae_downsample=8, patch_size=2, latent_pool=pool, anchor_scale=scale
    )
    assert effective_pool == round(pool * scale)
    assert size[0] % 16 == 0 and size[1] % 16 == 0
    expected = full_anchor_grid(height, width, 8, 2, pool)
    assert full_anchor_grid(*size, 8, 2, effective_pool) == expected
    if scale == 1.0:  # the grid-filling size is the image's own size whenever the pool divides the patch grid
        assert size == (height, width) or (height // 16) % pool or (width // 16) % pool


@pytest.mark.parametrize("height, width", INTERNVLU_SIZES)
@pytest.mark.parametrize("latent_pool, scale, tile_size", [(2, 0.5, 224), (4, 0.25, 112), (4, 0.5, 224)])
def test_downscaled_internvlu_latent_lands_on_the_pooled_grid(height, width, latent_pool, scale, tile_size):
    size, pool = anchor_encode_size(
        height, width, vae_downsample=8, patch_size=1, latent_pool=latent_pool, anchor_scale=scale
    )
    assert pool == round(latent_pool * scale)
    assert full_anchor_grid(*size, 8, 1, pool) == full_anchor_grid(height, width, 8, 1, latent_pool)
    if (height, width) == (448, 448):
        assert size == (tile_size, tile_size)  # the real tile: 4x (16x) fewer pixels at half (quarter) scale


@pytest.mark.parametrize("scale, pool", [(0.3, 2), (0.0, 2), (1.5, 2), (float("nan"), 2), ("half", 2), (0.25, 2)])
def test_bad_anchor_scale_names_the_option(scale, pool):
    with pytest.raises(ValueError, match="anchor_scale"):
        validate_anchor_scale(scale, pool)
    with pytest.raises(ValueError, match="g2tr_anchor_scale"):
        G2TRBagelConfig(g2tr_anchor_scale=scale, g2tr_latent_pool=pool)


def test_resize_keeps_constant_images_and_the_value_range():
    constant = torch.full((3, 40, 56), -0.25)
    torch.testing.assert_close(resize_for_anchors(constant, (16, 32)), torch.full((3, 16, 32), -0.25))
    noisy = torch.rand(2, 3, 64, 48) * 2 - 1
    small = resize_for_anchors(noisy, (32, 16))
    assert small.shape == (2, 3, 32, 16) and small.min() >= -1 and small.max() <= 1
    assert resize_for_anchors(noisy, (64, 48)) is noisy  # nothing to do at the same size


def spy_encodes(model, monkeypatch) -> list[torch.Tensor]:
    """Record the pixel batches that reach the backbone's VAE encode."""
    seen, encode = [], model.model.encode_vae_latents

    def recording(pixels, *args, **kwargs):
        seen.append(pixels.clone())
        return encode(pixels, *args, **kwargs)

    monkeypatch.setattr(model.model, "encode_vae_latents", recording)
    return seen


def test_bagel_scale_one_is_the_unchanged_full_encode(monkeypatch):
    model = tiny_model()
    inputs = build_inputs([[text(10), make_image(**IMAGE_A), text(11)]])
    seen = spy_encodes(model, monkeypatch)
    with torch.no_grad():
        output = model(**inputs, g2tr_ratio=0.5)
        # The same plan, recomputed by hand from the full-resolution latent: the default path did not move.
        base = model.model
        latent = base.vae.encode(inputs["vae_pixel_values"]).latent_dist.mean[0]
        vae = base.config.vae_config
        latent = (latent - (vae.get("shift_factor") or 0.0)) * vae.get("scaling_factor", 1.0)
        anchors, grid = build_latent_anchors(latent, patch_size=2, pool=2, project=base._project_latent_anchors)
        features = image_features(base, inputs)
        expected = reduce_tokens(features, (4, 6), anchors, grid, ratio=0.5, **base.config.g2tr_reduction_kwargs())
    assert len(seen) == 1 and torch.equal(seen[0], inputs["vae_pixel_values"])
    (plan,) = output.image_reductions
    assert torch.equal(plan.keep, expected.keep)


def image_features(base, inputs) -> torch.Tensor:
    return base.get_image_features(
        inputs["pixel_values"], image_position_ids=inputs["image_position_ids"], image_grid_hw=inputs["image_grid_hw"]
    ).pooler_output


def test_bagel_half_scale_encodes_half_size_images_and_keeps_the_budget(monkeypatch):
    model = tiny_model(g2tr_anchor_scale=0.5)
    inputs = build_inputs([[text(10), make_image(**IMAGE_A), text(11)], [make_image(**IMAGE_B), text(12, 13)]])
    seen = spy_encodes(model, monkeypatch)
    with torch.no_grad():
        reduced = model(**inputs, g2tr_ratio=0.5)
    # IMAGE_A: 64x96 -> latent 8x12 -> patches 4x6 -> anchor grid 2x3, so the encode runs at 32x48;
    # IMAGE_B: 48x48 -> 6x6 -> 3x3 -> 2x2 (ragged), so 32x32. One padded batch, each image encoded on its own size.
    assert len(seen) == 1 and seen[0].shape == (2, 3, 32, 48)
    assert [plan.num_kept for plan in reduced.image_reductions] == [12, 4]
    assert torch.isfinite(reduced.logits).all()


def test_bagel_half_scale_batch_equals_single_runs():
    model = tiny_model(g2tr_anchor_scale=0.5)
    rows = [[text(10), make_image(**IMAGE_A), text(11)], [make_image(**IMAGE_B), text(12, 13, 14, 15, 16, 17)]]
    with torch.no_grad():
        batch = model(**build_inputs(rows), g2tr_ratio=0.5)
        for index, row in enumerate(rows):
            single = model(**build_inputs([row]), g2tr_ratio=0.5)
            assert torch.equal(batch.image_reductions[index].keep, single.image_reductions[0].keep)
            torch.testing.assert_close(batch.logits[index, -1], single.logits[0, -1], atol=1e-5, rtol=1e-5)


def tiny_request(name: str, size: int = 56):
    model, processor = build_tiny(name)
    generator = torch.Generator().manual_seed(3)
    pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    messages = [
        {"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels)}, {"type": "text", "text": "?"}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return model, inputs


def test_internvlu_half_scale_encodes_the_anchor_grid_size(monkeypatch):
    model, inputs = tiny_request("internvlu")
    model.config.g2tr_anchor_scale = 0.5
    seen = spy_encodes(model, monkeypatch)
    with torch.no_grad():
        reduced = model(**inputs, g2tr_ratio=0.5)
    # 56 px -> latent 7x7 -> pooled 4x4 (ragged) at full resolution; the downscaled encode is 4 cells * 8 = 32 px.
    assert len(seen) == 1 and seen[0].shape[-2:] == (32, 32)
    assert [plan.num_kept for plan in reduced.image_reductions] == [8]


@pytest.mark.parametrize("name", ["bagel", "internvlu"])
def test_agreement_report(name):
    model, inputs = tiny_request(name)
    same = anchor_scale_agreement(model, inputs, anchor_scale=1.0, g2tr_ratio=0.5)
    assert same.agreement == (1.0,) and same.anchor_encode_flops[0] == same.anchor_encode_flops[1]
    half = anchor_scale_agreement(model, inputs, anchor_scale=0.5, g2tr_ratio=0.5)
    assert half.kept_tokens == (8,) and 0 <= half.shared_tokens[0] <= 8
    # The encode FLOPs follow the pixel count (BAGEL 64 -> 32 px: 4x; InternVL-U 56 -> 32 px: ~3x).
    assert half.anchor_encode_flops[1] * 2.5 < half.anchor_encode_flops[0]
    assert model.config.g2tr_anchor_scale == 1.0  # restored
    with pytest.raises(ValueError, match="reduces no image"):
        anchor_scale_agreement(model, inputs, anchor_scale=0.5, g2tr_ratio=1.0)


def test_cli_demo_rejects_a_bad_anchor_scale(tmp_path, capsys):
    from g2tr_hf.cli import main

    assert main(["demo", "--anchor-scale", "0.3", "-o", str(tmp_path / "kept.png")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "g2tr_anchor_scale" in error[0] and "[1.0, 0.5]" in error[0]
    assert not (tmp_path / "kept.png").exists()

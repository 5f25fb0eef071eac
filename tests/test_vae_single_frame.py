"""The single-frame 2-D encode of the Qwen-Image VAE (`g2tr_hf.vae_single_frame`): the same posterior mode as
diffusers' 3-D `vae.encode(x.unsqueeze(2))`, the same InternVL-U anchors and keep sets, a third of the convolution
FLOPs, and a clear refusal (then the 3-D fallback) for anything it does not know. Tiny random models, no download."""

from __future__ import annotations

import copy
import inspect
import logging

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode


pytest.importorskip("diffusers")

from diffusers import AutoencoderKLQwenImage  # noqa: E402
from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qwen  # noqa: E402

import g2tr_hf.modeling_internvlu as modeling_internvlu  # noqa: E402
import g2tr_hf.vae_single_frame as vae_single_frame  # noqa: E402
from g2tr_hf import build_tiny  # noqa: E402
from g2tr_hf.configuration_internvlu import QWEN_IMAGE_VAE_CONFIG  # noqa: E402
from g2tr_hf.vae_single_frame import UnsupportedVAEError, encode_single_frame_mode  # noqa: E402


SIZES = [(56, 56), (64, 40), (120, 88)]  # (H, W): odd multiples of 8 among them


def _reference_mode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """What `encode_vae_latents` computed before: the 3-D one-frame encode's posterior mode, [N, z_dim, h, w]."""
    return vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]


def _randomise_norms(vae) -> None:
    # RMS-norm gammas start at ones; random ones make a wrong norm broadcast or order visible.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, qwen.QwenImageRMS_norm):
                module.gamma.copy_(torch.rand(module.gamma.shape, generator=generator) + 0.5)


def _pixels(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _assert_same_latents(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-5 * scale, (got - expected).abs().max().item() / scale


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("internvlu")


@pytest.fixture(scope="module")
def tiny_vae(tiny):
    return tiny[0].model.vae


def _real_config(**overrides) -> dict:
    """`QWEN_IMAGE_VAE_CONFIG` with `overrides`, less the keys the installed diffusers does not take (0.35 has no
    `input_channels`; its default, 3, is the real value)."""
    accepted = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
    return {key: value for key, value in {**QWEN_IMAGE_VAE_CONFIG, **overrides}.items() if key in accepted}


def _qwen_shaped_vae(**overrides) -> AutoencoderKLQwenImage:
    """The real Qwen-Image VAE layout (dim_mult 1-2-4-4, 2 res blocks, z 16, temporal down-sampling in the last two
    stages) with narrow channels (base_dim 8)."""
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**_real_config(base_dim=8, **overrides)).eval()
    _randomise_norms(vae)
    return vae


@pytest.fixture(scope="module")
def qwen_shaped_vae():
    return _qwen_shaped_vae()


# ----------------------------------------------------------------------------------------------------------------
# Equality with the 3-D encode
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_tiny_vae_matches_the_3d_encode(tiny_vae, size):
    pixels = _pixels(3, *size)
    with torch.no_grad():
        _assert_same_latents(encode_single_frame_mode(tiny_vae, pixels), _reference_mode(tiny_vae, pixels))


@pytest.mark.parametrize("size", SIZES + [(60, 44)])
def test_qwen_shaped_vae_matches_the_3d_encode(qwen_shaped_vae, size):
    pixels = _pixels(2, *size, seed=size[0])
    with torch.no_grad():
        got = encode_single_frame_mode(qwen_shaped_vae, pixels)
        _assert_same_latents(got, _reference_mode(qwen_shaped_vae, pixels))
    assert got.shape == (2, 16, size[0] // 8, size[1] // 8)


def test_uses_views_of_the_weights_and_never_the_decoder(tiny_vae, monkeypatch):
    """Gradients reach the very 3-D parameters (views, not copies) and equal the 3-D encode's: the temporal taps
    that only see zero padding get zero gradient either way. The decoder is never run."""
    monkeypatch.setattr(tiny_vae.decoder, "forward", lambda *a, **k: pytest.fail("the decoder must not run"))
    pixels = _pixels(2, 56, 40)
    convs = {name: m for name, m in tiny_vae.encoder.named_modules() if isinstance(m, qwen.QwenImageCausalConv3d)}
    convs["quant_conv"] = tiny_vae.quant_conv
    weights = [conv.weight for conv in convs.values()]

    def grads(encode):
        return torch.autograd.grad(encode(tiny_vae, pixels).square().sum(), weights, allow_unused=True)

    for name, got, expected in zip(convs, grads(encode_single_frame_mode), grads(_reference_mode)):
        if "time_conv" in name:  # the temporal down-sampling conv: never run on a first frame, by either path
            assert got is None and expected is None
            continue
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_convolution_flops_at_real_shapes_are_about_a_third():
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage(**_real_config())
        pixels = torch.empty(1, 3, 448, 448)

    def conv_flops(encode):
        with FlopCounterMode(display=False) as counter:
            latents = encode(vae, pixels)
        assert latents.shape == (1, 16, 56, 56)
        return sum(f for op, f in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))

    ratio = conv_flops(encode_single_frame_mode) / conv_flops(_reference_mode)
    assert 1 / 3 < ratio < 0.36  # 3x3x3 kernels cost 3x their last slice; 1x1x1 and 2-D down-sampling convs do not


# ----------------------------------------------------------------------------------------------------------------
# InternVL-U: the same latents, anchors and keep sets
# ----------------------------------------------------------------------------------------------------------------


def _image(seed: int, size=(40, 30)) -> PIL.Image.Image:
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels)


def _inputs(processor, images_per_conversation):
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    conversations = [
        [{"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                      {"type": "text", "text": "what is in the picture?"}]}]
        for images in images_per_conversation
    ]  # fmt: skip
    return processor.apply_chat_template(conversations, padding=True, **kwargs)


def _force_3d(monkeypatch):
    def refuse(vae, pixels):
        raise UnsupportedVAEError("forced 3-D path for the test.")

    monkeypatch.setattr(modeling_internvlu, "encode_single_frame_mode", refuse)


def test_encode_vae_latents_matches_the_3d_path_in_chunks(tiny, monkeypatch):
    base = tiny[0].model
    monkeypatch.setattr(modeling_internvlu, "_VAE_ENCODE_CHUNK", 2)  # 5 images: chunks of 2, 2, 1
    pixels = _pixels(5, 56, 56)
    with torch.no_grad():
        raw = _reference_mode(base.vae, pixels)
        with monkeypatch.context() as inner:
            inner.setattr(base.vae, "encode", lambda *a, **k: pytest.fail("the 3-D encode must not run"))
            latents = base.encode_vae_latents(pixels)
    mean = torch.tensor(base.vae.config.latents_mean)[None, :, None, None]
    std = torch.tensor(base.vae.config.latents_std)[None, :, None, None]
    _assert_same_latents(latents, (raw - mean) / std)
    assert latents.dtype == base.vae.dtype and latents.shape == (5, base.vae.config.z_dim, 7, 7)


def test_keep_sets_and_logits_are_unchanged(tiny, monkeypatch):
    model, processor = tiny
    inputs = _inputs(processor, [[_image(0)], [_image(1, (56, 44)), _image(2, (30, 50))]])
    with torch.no_grad():
        fast = model(**inputs, g2tr_ratio=0.5)
        with monkeypatch.context() as patch:
            _force_3d(patch)
            slow = model(**inputs, g2tr_ratio=0.5)
    assert len(fast.image_reductions) == len(slow.image_reductions) == 3
    for got, expected in zip(fast.image_reductions, slow.image_reductions):
        assert torch.equal(got.keep, expected.keep)
        torch.testing.assert_close(got.tokens, expected.tokens)
    torch.testing.assert_close(fast.logits, slow.logits)


# ----------------------------------------------------------------------------------------------------------------
# Refusals and the 3-D fallback
# ----------------------------------------------------------------------------------------------------------------


class _UnknownBlockForTheFallbackTest(qwen.QwenImageResidualBlock):
    """A subclass could override `forward`: the single-frame path only accepts the exact diffusers classes."""


def test_unknown_module_raises_and_encode_vae_latents_falls_back_once(caplog):
    model, _ = build_tiny("internvlu")  # a fresh model: its VAE is modified below
    base = model.model
    pixels = _pixels(2, 56, 56)
    with torch.no_grad():
        expected = base.encode_vae_latents(pixels)
        block = next(b for b in base.vae.encoder.down_blocks if isinstance(b, qwen.QwenImageResidualBlock))
        block.__class__ = _UnknownBlockForTheFallbackTest  # same computation, unknown class
        with pytest.raises(UnsupportedVAEError, match="_UnknownBlockForTheFallbackTest"):
            encode_single_frame_mode(base.vae, pixels)
        with caplog.at_level(logging.WARNING, logger=modeling_internvlu.__name__):
            first = base.encode_vae_latents(pixels)
            second = base.encode_vae_latents(pixels)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)  # the 3-D encode of the same weights
    warnings = [r for r in caplog.records if "_UnknownBlockForTheFallbackTest" in r.getMessage()]
    assert len(warnings) == 1 and "3-D `vae.encode`" in warnings[0].getMessage()


def test_device_alignment_hooks_keep_the_fast_path(tiny_vae):
    """accelerate attaches non-offloading AlignDevicesHooks to every module of a model that is partly offloaded;
    they only move inputs to the execution device, where the weights and the pixels already are."""
    hooks = pytest.importorskip("accelerate.hooks")
    vae = copy.deepcopy(tiny_vae)
    for module in vae.modules():
        hooks.add_hook_to_module(module, hooks.AlignDevicesHook(execution_device="cpu"))
    pixels = _pixels(2, 56, 40)
    with torch.no_grad():
        _assert_same_latents(encode_single_frame_mode(vae, pixels), _reference_mode(tiny_vae, pixels))


def test_refuses_what_it_was_not_verified_on(tiny_vae, monkeypatch):
    pixels = _pixels(1, 56, 56)
    vae = copy.deepcopy(tiny_vae)
    # Tiled encoding blends overlapping tiles: different numbers from a whole-image encode.
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=16,
                      tile_sample_stride_width=16)  # fmt: skip
    with pytest.raises(UnsupportedVAEError, match="tiled"):
        encode_single_frame_mode(vae, pixels)
    small = pixels[..., :32, :32]
    with torch.no_grad():  # an image that fits in one tile is encoded whole by `vae.encode` too
        _assert_same_latents(encode_single_frame_mode(vae, small), _reference_mode(vae, small))
    vae = copy.deepcopy(tiny_vae)
    vae.encoder.conv_in._hf_hook = object()  # e.g. accelerate offloading, which loads weights around module calls
    with pytest.raises(UnsupportedVAEError, match="accelerate hook"):
        encode_single_frame_mode(vae, pixels)
    with torch.device("meta"):  # weights not resident where the pixels are (offloaded, or on another device)
        meta_vae = AutoencoderKLQwenImage(**tiny_vae.config)
    with pytest.raises(UnsupportedVAEError, match="offloaded or split"):
        encode_single_frame_mode(meta_vae, pixels)
    # Encoder attention outside the mid block (`attn_scales`): diffusers' own 3-D encoder fails on it, so there is
    # nothing verified to match.
    with_attention = _qwen_shaped_vae(attn_scales=[0.5], num_res_blocks=1)
    with pytest.raises(TypeError):
        _reference_mode(with_attention, pixels)
    with pytest.raises(UnsupportedVAEError, match="QwenImageAttentionBlock"):
        encode_single_frame_mode(with_attention, pixels)
    with pytest.raises(UnsupportedVAEError, match="AutoencoderKLQwenImage"):
        encode_single_frame_mode(torch.nn.Identity(), pixels)
    monkeypatch.setattr(vae_single_frame, "_qwen", None)  # a diffusers without the Qwen-Image VAE
    with pytest.raises(UnsupportedVAEError, match="diffusers"):
        encode_single_frame_mode(tiny_vae, pixels)

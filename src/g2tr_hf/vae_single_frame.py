"""Single-frame encode of the Qwen-Image VAE (diffusers' `AutoencoderKLQwenImage`) with 2-D convolutions.

InternVL-U builds its G2TR anchors by encoding every image as a one-frame video, `vae.encode(x.unsqueeze(2))`.
For one frame the 3-D machinery does no work that a 2-D encoder would not do:

* `QwenImageCausalConv3d` pads time with 2 * p_t zeros in front and none behind, so on a T = 1 input its (k_t, k, k)
  kernel produces one output frame whose first k_t - 1 temporal taps only ever see zeros: the output is the 2-D
  convolution of the frame with the last temporal slice `weight[:, :, -1]`. The 3-D convolution still multiplies
  the zeros, so it costs k_t = 3 times the 2-D one.
* `QwenImageRMS_norm` normalises over channels only (`images=False` merely adds a broadcast time axis to `gamma`).
* `QwenImageResample` ("downsample3d") runs its 2-D `resample` per frame; its temporal `time_conv` only mixes a frame
  with the cached previous one, and on the first chunk it just fills the cache and is skipped. "downsample2d" is
  the 2-D `resample` alone.
* `QwenImageAttentionBlock` already folds time into the batch and attends within each frame.
* `_encode` runs the encoder on the first frame with an empty feature cache (every `cache_x` is None), then
  `quant_conv` (1x1x1); `latent_dist.mode()` is the first `z_dim` channels of that (the mean).

So `encode_single_frame_mode` runs the encoder as 2-D convolutions on views of the existing 3-D weights (no copies,
no new modules), the decoder never. Verified against diffusers 0.35.0 and 0.42.1 (the module and attribute names
are the same); anything it does not recognise raises `UnsupportedVAEError` so that callers can fall back to the
3-D encode. The convolutions run functionally, outside any module call: hooks on the VAE's convolution modules do
not fire, and module-level profilers (FlopCounterMode's per-module counts) see the work under the caller's module,
not under `vae.encoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.import_utils import is_diffusers_available


_qwen = None
if is_diffusers_available():
    try:
        from diffusers.models.autoencoders import autoencoder_kl_qwenimage as _qwen
    except ImportError:  # a diffusers without the Qwen-Image VAE: every call raises UnsupportedVAEError
        _qwen = None

try:
    from accelerate.hooks import AlignDevicesHook
except ImportError:  # no accelerate: no accelerate hooks either
    AlignDevicesHook = None


__all__ = ["UnsupportedVAEError", "encode_single_frame_mode"]


class UnsupportedVAEError(TypeError):
    """The VAE (or one of its modules, or its set-up) is not one that the 2-D single-frame encode knows to be exact."""


def _expect(module: nn.Module, class_name: str) -> None:
    # Exact classes only: a subclass may override `forward`, and then the 2-D equivalence is unproven.
    expected = getattr(_qwen, class_name, None)
    if expected is None or type(module) is not expected:
        raise UnsupportedVAEError(
            f"single-frame VAE encode: expected diffusers' {class_name}, got {type(module).__module__}."
            f"{type(module).__qualname__}."
        )


def causal_conv_single_frame(conv: nn.Module, x: torch.Tensor, out_channels: int | None = None) -> torch.Tensor:
    """`QwenImageCausalConv3d` on a single frame, as a 2-D convolution with the last temporal kernel slice.

    Args:
        conv: the causal 3-D convolution (weight [C_out, C_in, k_t, k_h, k_w]).
        x: [N, C_in, H, W], the frame (the 3-D module would see [N, C_in, 1, H, W]).
        out_channels: compute only the first `out_channels` outputs (a slice of the weight rows); all when None.
    Returns:
        [N, C_out, H', W'], equal to `conv(x.unsqueeze(2))[:, :, 0]`.
    """
    _expect(conv, "QwenImageCausalConv3d")
    w_left, w_right, h_top, h_bottom, t_front, t_back = conv._padding
    k_t, d_t = conv.kernel_size[0], conv.dilation[0]
    # The frame meets exactly the last temporal tap only when the front padding spans the other k_t - 1 taps; any
    # other geometry (or a non-zero padding mode, or asymmetric spatial padding) is not the module we verified.
    if (
        t_back != 0
        or t_front != (k_t - 1) * d_t
        or w_left != w_right
        or h_top != h_bottom
        or tuple(conv.padding) != (0, 0, 0)
        or conv.padding_mode != "zeros"
    ):
        raise UnsupportedVAEError(
            f"single-frame VAE encode: causal conv with kernel {conv.kernel_size}, causal padding {conv._padding}, "
            f"padding {conv.padding} ({conv.padding_mode}) is not the verified geometry."
        )
    weight = conv.weight[:, :, -1]  # a view: [C_out, C_in, k_h, k_w]
    bias = conv.bias
    if out_channels is not None:
        weight = weight[:out_channels]
        bias = None if bias is None else bias[:out_channels]
    # The 3-D module pads explicitly (F.pad) and convolves unpadded; zero padding inside conv2d is the same sum.
    return F.conv2d(
        x, weight, bias, stride=conv.stride[1:], padding=(h_top, w_left), dilation=conv.dilation[1:], groups=conv.groups
    )


def rms_norm_single_frame(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`QwenImageRMS_norm` on [N, C, H, W] -> [N, C, H, W].

    It normalises over channels only, so the module itself runs on a T = 1 view at no extra cost; calling it (not a
    copy of its formula) keeps the installed diffusers' dtype handling (fp32 normalisation of half inputs in newer
    versions, none in 0.35).
    """
    _expect(norm, "QwenImageRMS_norm")
    if not norm.channel_first:
        raise UnsupportedVAEError("single-frame VAE encode: channel-last RMS norm is not used by the encoder.")
    if norm.gamma.dim() == 4:  # images=False: gamma [C, 1, 1, 1] broadcasts over [N, C, T, H, W]
        return norm(x.unsqueeze(2)).squeeze(2)
    return norm(x)


def residual_block_single_frame(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`QwenImageResidualBlock` on [N, C_in, H, W] -> [N, C_out, H, W] (norm, act, conv, norm, act, dropout, conv,
    plus the 1x1 shortcut), in the module's order."""
    _expect(block, "QwenImageResidualBlock")
    if isinstance(block.conv_shortcut, nn.Identity):
        shortcut = x
    else:
        shortcut = causal_conv_single_frame(block.conv_shortcut, x)
    x = block.nonlinearity(rms_norm_single_frame(block.norm1, x))
    x = causal_conv_single_frame(block.conv1, x)
    x = block.dropout(block.nonlinearity(rms_norm_single_frame(block.norm2, x)))
    x = causal_conv_single_frame(block.conv2, x)
    return x + shortcut


def attention_block_single_frame(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`QwenImageAttentionBlock` on [N, C, H, W] -> [N, C, H, W]. It already works frame by frame with 2-D 1x1
    convolutions, so there is nothing to save: the module runs on a T = 1 view."""
    _expect(block, "QwenImageAttentionBlock")
    return block(x.unsqueeze(2)).squeeze(2)


def resample_single_frame(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`QwenImageResample` down-sampling on [N, C, H, W] -> [N, C, H // 2, W // 2] (its own 2-D
    `resample`: zero pad right/bottom, 3x3 stride-2 conv).

    "downsample3d" adds `time_conv` (kernel 3, stride 2 in time), but `_encode` runs the first frame with an empty
    cache, and then the module only stores its output and skips `time_conv`; up-sampling belongs to the decoder.
    """
    _expect(block, "QwenImageResample")
    if block.mode not in ("downsample2d", "downsample3d"):
        raise UnsupportedVAEError(f"single-frame VAE encode: resample mode {block.mode!r} is not an encoder mode.")
    return block.resample(x)


def mid_block_single_frame(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`QwenImageMidBlock` on [N, C, H, W] -> [N, C, H, W]: resnet, then (attention, resnet) pairs."""
    _expect(block, "QwenImageMidBlock")
    x = residual_block_single_frame(block.resnets[0], x)
    for attention, resnet in zip(block.attentions, block.resnets[1:]):
        if attention is not None:
            x = attention_block_single_frame(attention, x)
        x = residual_block_single_frame(resnet, x)
    return x


# The modules `QwenImageEncoder3d.down_blocks` may hold (by class name), and how each runs on one frame. A non-empty
# `attn_scales` also puts `QwenImageAttentionBlock`s there, but diffusers' own encoder then fails (it passes the
# feature cache to every down block, and the attention block takes none): with no 3-D result to match, refuse.
_DOWN_BLOCKS = {
    "QwenImageResidualBlock": residual_block_single_frame,
    "QwenImageResample": resample_single_frame,
}


def encoder_single_frame(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`QwenImageEncoder3d` on one frame: [N, C_in, H, W] -> [N, 2 * z_dim, H/8, W/8] (mean and log-variance)."""
    _expect(encoder, "QwenImageEncoder3d")
    x = causal_conv_single_frame(encoder.conv_in, x)
    for layer in encoder.down_blocks:
        run = _DOWN_BLOCKS.get(type(layer).__name__)
        if run is None:
            raise UnsupportedVAEError(
                f"single-frame VAE encode: unknown encoder block {type(layer).__module__}.{type(layer).__qualname__}."
            )
        x = run(layer, x)  # the block checks its exact class itself
    x = mid_block_single_frame(encoder.mid_block, x)
    x = encoder.nonlinearity(rms_norm_single_frame(encoder.norm_out, x))
    return causal_conv_single_frame(encoder.conv_out, x)


def _check_vae(vae: nn.Module, pixels: torch.Tensor) -> None:
    if _qwen is None:
        raise UnsupportedVAEError("single-frame VAE encode needs diffusers with `AutoencoderKLQwenImage` (>= 0.35).")
    _expect(vae, "AutoencoderKLQwenImage")
    if pixels.dim() != 4:
        raise ValueError(f"`pixels` must be [N, C, H, W], got shape {tuple(pixels.shape)}.")
    height, width = pixels.shape[-2:]
    if getattr(vae, "use_tiling", False) and (width > vae.tile_sample_min_width or height > vae.tile_sample_min_height):
        # `vae.encode` would encode overlapping tiles and blend them: different numbers from a whole-image encode.
        raise UnsupportedVAEError("single-frame VAE encode: tiled encoding is enabled and the image exceeds a tile.")
    _check_placement(vae, pixels)


def _only_aligns_devices(hook) -> bool:
    # accelerate's AlignDevicesHook without offloading only moves a module's inputs to its execution device.
    hooks = getattr(hook, "hooks", (hook,))  # a SequentialHook holds several
    return AlignDevicesHook is not None and all(type(h) is AlignDevicesHook and not h.offload for h in hooks)


def _check_placement(vae: nn.Module, pixels: torch.Tensor) -> None:
    """This path reads the weights directly, bypassing module calls and so accelerate's hooks: it needs every weight
    resident on the pixels' device (offloaded weights sit on the meta device until a module's hook loads them for
    its call) and hooks that do nothing else than move inputs there."""
    modules = (vae.quant_conv, *vae.encoder.modules())
    for module in (vae, *modules):
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and not _only_aligns_devices(hook):
            raise UnsupportedVAEError(
                f"single-frame VAE encode: the VAE has an accelerate hook that offloads weights or is not a plain "
                f"device alignment ({type(hook).__name__})."
            )
    devices = {parameter.device for module in modules for parameter in module.parameters(recurse=False)}
    if devices != {pixels.device}:
        raise UnsupportedVAEError(
            f"single-frame VAE encode: encoder weights on {sorted(map(str, devices))}, pixels on {pixels.device} "
            "(offloaded or split across devices)."
        )


def encode_single_frame_mode(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior mode of a one-frame encode, with 2-D convolutions.

    Args:
        vae: diffusers' `AutoencoderKLQwenImage`.
        pixels: [N, 3, H, W] images (in [-1, 1], the VAE's dtype and device).
    Returns:
        [N, z_dim, H // 8, W // 8]: `vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]` (before any
        `latents_mean` / `latents_std` normalisation), up to floating-point summation order.
    Raises:
        UnsupportedVAEError: the VAE, one of its encoder modules, tiling or offload hooks are not what this was
        verified on; the caller should use the 3-D `vae.encode` instead.
    """
    _check_vae(vae, pixels)
    moments = encoder_single_frame(vae.encoder, pixels)
    # `latent_dist.mode()` is the mean, the first z_dim output channels of `quant_conv` (a 1x1x1 conv); the
    # log-variance half is never needed, so only the mean rows of its weight are used.
    return causal_conv_single_frame(vae.quant_conv, moments, out_channels=vae.config.z_dim)

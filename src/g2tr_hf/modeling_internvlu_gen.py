"""InternVL-U's image generation decoder: a dual-stream MMDiT with gated attention and unified 3-D RoPE.

The official `generation_decoder/` folder (`InternVLUGenerationDecoder`, 654 tensors, 1.81 B parameters at full
size) loads into [`G2TRInternVLUGenerationDecoder`] under its own names, without any key conversion:

    encoder_padding_token                                   [4096]   (never reaches attention at inference)
    decoder.time_text_embed.timestep_embedder.linear_{1,2}  diffusers' QwenTimestepProjEmbeddings
    decoder.txt_norm, decoder.txt_in, decoder.img_in        context RMSNorm + projection, latent-patch projection
    decoder.transformer_blocks.{i}.{img,txt}_mod.1          AdaLN parameters (shift, scale, gate) x 2
    decoder.transformer_blocks.{i}.attn.{to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,norm_q,norm_k,
        norm_added_q,norm_added_k,to_out.0,to_add_out}     to_q / add_q_proj are twice as wide: query + gate
    decoder.transformer_blocks.{i}.{img,txt}_mlp.net.{0.proj,2}
    decoder.norm_out.linear, decoder.proj_out               final AdaLN (scale first) and the 2x2 patch head

These are the parameter names of diffusers' Qwen-Image transformer except for the doubled query projections. Two
streams of weights: the *image* stream holds the VAE-latent tokens (the target being generated and the reference
images of an edit), the *text* stream holds the VLM context, text AND ViT tokens (only the positions of the ViT
tokens are 2-D). Each stream's linears run on that stream's tokens only (the official code evaluates both streams
on every token and blends them with 0/1 masks: the same numbers at twice the linear cost).

Positions ("unified MS-RoPE"): every token has (frame, height, width). Image tokens come first: the target is frame
0, reference j is frame j, each on its own centred grid. A counter then walks the context: a text token takes
(p, p, p) and advances p by one; a run of ViT tokens takes frame p and the image's centred grid stretched by
1 / `vlm_cond_position_scale_factor` (a 16x16 ViT grid spans -32..31 with the factor 0.25, like a 1024 px target),
after which p = int(max of that full grid) + 1. With G2TR the context holds only the K kept ViT tokens of an
image: they keep their own rows of the full grid and p still advances by the full grid (`position_mode="kept_2d"`),
so the positions of the reduced sequence are those of the full one with the dropped rows removed. The official
G2TR code instead hits a silent fallback that gives the K tokens 1-D positions and shifts every later text token;
`position_mode="official_fallback"` reproduces it for comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import logging


try:  # diffusers is an optional dependency of the package, required by the generation decoder
    from diffusers.models.attention import FeedForward
    from diffusers.models.normalization import FP32LayerNorm, RMSNorm
    from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings
except ImportError:  # pragma: no cover - reported when the decoder is built
    FeedForward = FP32LayerNorm = RMSNorm = QwenTimestepProjEmbeddings = None


logger = logging.get_logger(__name__)

__all__ = [
    "POSITION_MODES",
    "G2TRInternVLUGenerationDecoder",
    "G2TRInternVLUGenerationDecoderConfig",
    "InternVLUMMDiT",
    "MMDiTConditioning",
    "RowGroup",
    "build_sample_positions",
    "centred_axis",
    "grid_positions",
    "rope_frequencies",
]

POSITION_MODES = ("kept_2d", "official_fallback")

# The MMDiT of InternVL-U (vLLM-Omni validates these as the checkpoint contract).
INTERNVLU_DECODER_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 12,
    "joint_attention_dim": 4096,
    "axes_dims_rope": [16, 56, 56],
}


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


class G2TRInternVLUGenerationDecoderConfig(PreTrainedConfig):
    r"""
    Configuration of [`G2TRInternVLUGenerationDecoder`], with the keys of the official
    `generation_decoder/config.json` (`model_type` `internvlu_generation_decoder`), so that file loads as it is.
    Training-only keys of that file are kept as plain attributes.

    Args:
        decoder_config (`dict`, *optional*): the MMDiT: `patch_size`, `in_channels` (latent channels x patch^2),
            `out_channels`, `num_layers`, `attention_head_dim`, `num_attention_heads`, `joint_attention_dim` (the
            context width: two LLM layers concatenated), `axes_dims_rope` (frame, height, width head dims).
            InternVL-U's values by default.
        decoder_projector_type (`str`, defaults to `"identity"`): only the identity projector of InternVL-U exists.
        input_hidden_size (`int`, defaults to 4096): context width (the padding token's size).
        output_hidden_size (`int`, defaults to 4096): context width after the (identity) projector.
        padding_encoder_hidden_states (`bool`, defaults to `True`): whether the checkpoint has `encoder_padding_token`.
        pad_to_fix_length (`bool`, defaults to `False`), max_sequence_length (`int`, defaults to 768): how the
            official code pads the context; no effect on the result (padded slots never reach attention).
        video_position_scale_factor (`float`, defaults to 1.0): grid scale of the latent frames.
        vlm_cond_position_scale_factor (`float`, defaults to 0.25): grid scale of the ViT runs of the context.
        vlm_select_layer (`list[int]`, defaults to `[-1, -2]`): LLM hidden states concatenated into the context.
        vae_downsample_factor (`int`, defaults to 8): VAE stride.
        flow_shift (`float`, defaults to 3.0): sampler shift (the pipeline's `timestep_shift` default).
        all_cfg_scale, part_cfg_scale (`float`, defaults to 0.0): stored by the official config; the pipeline uses
            its own defaults (4.5 / 2.0) when these are 0.
        gen_image_height, gen_image_width (`int`, defaults to 512): text-to-image size when the caller gives none.
        reference_min_pixels, reference_max_pixels (`int`, defaults to 512 * 512 and 1024 * 1024), reference_max_side
            (`int`, defaults to 1024): the area range and longest side an edit's input image is resized into (in
            multiples of 16) before its VAE encode: the official generation image processor's
            `min_dynamic_patch` x 64, `max_dynamic_patch` x 64 and `max_length`.
    """

    model_type = "internvlu_generation_decoder"

    decoder_config: dict | None = None
    decoder_projector_type: str = "identity"
    input_hidden_size: int = 4096
    output_hidden_size: int = 4096
    padding_encoder_hidden_states: bool = True
    pad_to_fix_length: bool = False
    max_sequence_length: int = 768
    video_position_scale_factor: float | int = 1.0
    vlm_cond_position_scale_factor: float | int = 0.25
    vlm_select_layer: list[int] | None = None
    vae_downsample_factor: int = 8
    flow_shift: float | int = 3.0
    all_cfg_scale: float | int = 0.0
    part_cfg_scale: float | int = 0.0
    gen_image_height: int = 512
    gen_image_width: int = 512
    reference_min_pixels: int = 512 * 512
    reference_max_pixels: int = 1024 * 1024
    reference_max_side: int | None = 1024
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)
        kwargs.pop("is_composition", None)
        decoder_config = dict(INTERNVLU_DECODER_CONFIG)
        decoder_config.update({k: v for k, v in (self.decoder_config or {}).items() if not k.startswith("_")})
        # The official wrapper copies the two scale factors into the MMDiT config; the top-level values win.
        decoder_config.pop("video_position_scale_factor", None)
        decoder_config.pop("vlm_cond_position_scale_factor", None)
        self.decoder_config = decoder_config
        if self.vlm_select_layer is None:
            self.vlm_select_layer = [-1, -2]
        self.vlm_select_layer = [int(layer) for layer in self.vlm_select_layer]
        if self.decoder_projector_type != "identity":
            raise ValueError(
                f"`decoder_projector_type` {self.decoder_projector_type!r} is not supported: InternVL-U's generation "
                "decoder uses the 'identity' projector."
            )
        heads, head_dim = decoder_config["num_attention_heads"], decoder_config["attention_head_dim"]
        if sum(decoder_config["axes_dims_rope"]) != head_dim or any(d % 2 for d in decoder_config["axes_dims_rope"]):
            raise ValueError(
                f"`decoder_config['axes_dims_rope']` {decoder_config['axes_dims_rope']} must be even and sum to "
                f"`attention_head_dim` ({head_dim})."
            )
        if decoder_config["joint_attention_dim"] != self.output_hidden_size:
            raise ValueError(
                f"`decoder_config['joint_attention_dim']` ({decoder_config['joint_attention_dim']}) must equal "
                f"`output_hidden_size` ({self.output_hidden_size}) with the identity projector."
            )
        if heads <= 0 or head_dim <= 0:
            raise ValueError("`decoder_config` needs positive `num_attention_heads` and `attention_head_dim`.")
        super().__post_init__(**kwargs)

    @property
    def latent_channels(self) -> int:
        """VAE latent channels (`in_channels` / patch^2)."""
        return self.decoder_config["in_channels"] // self.decoder_config["patch_size"] ** 2

    @property
    def patch_size(self) -> int:
        return self.decoder_config["patch_size"]


# ----------------------------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------------------------


def centred_axis(size: int, scale: float = 1.0) -> torch.Tensor:
    """Centred indices of one axis of `size` cells: -ceil(n/2) .. floor(n/2) - 1 (float32).

    With `scale` != 1 they are mapped linearly onto [-int(ceil(n/2) / scale), int(floor(n/2) / scale) - 1], in the
    official operation order (float32), e.g. 16 cells at 0.25 -> -32 .. 31 in steps of 4.2.
    """
    negative, positive = size - size // 2, size // 2
    values = torch.cat(
        [torch.arange(-negative, 0, dtype=torch.float32), torch.arange(0, positive, dtype=torch.float32)]
    )
    if scale != 1.0 and size > 1:
        low, high = -negative, positive - 1
        target_low, target_high = -int(negative / scale), int(positive / scale) - 1
        values = target_low + (values - low) * (target_high - target_low) / (high - low)
    return values


def grid_positions(frame: float, height: int, width: int, scale: float = 1.0) -> torch.Tensor:
    """(frame, row, column) of a raster-ordered height x width grid: [height * width, 3] float32."""
    rows = centred_axis(height, scale)[:, None].expand(height, width)
    cols = centred_axis(width, scale)[None, :].expand(height, width)
    frames = torch.full((height, width), float(frame), dtype=torch.float32)
    return torch.stack([frames.flatten(), rows.flatten(), cols.flatten()], dim=1)


def _runs(mask: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Maximal runs of a 1-D bool mask as (start, end, value)."""
    if mask.numel() == 0:
        return []
    mask = mask.bool()
    bounds = [0, *(torch.nonzero(mask[1:] != mask[:-1]).flatten() + 1).tolist(), mask.numel()]
    values = mask[bounds[:-1]].tolist()
    return [(bounds[i], bounds[i + 1], values[i]) for i in range(len(values))]


def build_sample_positions(
    image_grids: Sequence[tuple[int, int]],
    context_vit_mask: torch.Tensor,
    vit_grids: Sequence[tuple[int, int]],
    vit_keeps: Sequence[torch.Tensor | None] | None = None,
    image_scale: float = 1.0,
    vit_scale: float = 0.25,
    position_mode: str = "kept_2d",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of one sample: its latent frames, then its context.

    Args:
        image_grids: (h, w) in patches of the target (frame 0) and of each reference (frames 1, 2, ...).
        context_vit_mask: [L] bool, True on the context's ViT tokens (text elsewhere).
        vit_grids: (h, w) of the full ViT grid of each ViT run, in order.
        vit_keeps: per ViT run, the raster indices (into the full grid, ascending) of the tokens the run holds;
            None = the full grid. Ignored by `"official_fallback"`.
        position_mode: `"kept_2d"` (a run holds its rows of the full grid; the counter advances by the full grid)
            or `"official_fallback"` (the official code: a run whose length is not the full grid's gets 1-D
            positions p .. p + K - 1 and the counter advances by K).
    Returns:
        (image positions [sum h*w, 3], context positions [L, 3]), float32.
    """
    if position_mode not in POSITION_MODES:
        raise ValueError(f"`position_mode` must be one of {list(POSITION_MODES)}, got {position_mode!r}.")
    blocks = [grid_positions(frame, h, w, image_scale) for frame, (h, w) in enumerate(image_grids)]
    image_positions = torch.cat(blocks) if blocks else torch.zeros(0, 3)
    counter = int(image_positions.max().item()) + 1 if image_positions.numel() else 0
    runs = _runs(context_vit_mask.bool().cpu())
    num_vit_runs = sum(1 for _, _, is_vit in runs if is_vit)
    if num_vit_runs != len(vit_grids):
        raise ValueError(
            f"The context holds {num_vit_runs} run(s) of ViT tokens but {len(vit_grids)} ViT grid(s) were given."
        )
    keeps = list(vit_keeps) if vit_keeps is not None else [None] * len(vit_grids)
    pieces, vit_index = [], 0
    for start, end, is_vit in runs:
        length = end - start
        if not is_vit:
            line = torch.arange(counter, counter + length, dtype=torch.float32)
            pieces.append(line[:, None].expand(length, 3))
            counter += length
            continue
        height, width = vit_grids[vit_index]
        keep = keeps[vit_index]
        vit_index += 1
        full = grid_positions(0, height, width, vit_scale)
        full[:, 0] += counter
        if position_mode == "official_fallback":
            if length == height * width:
                pieces.append(full)
                counter = int(full.max().item()) + 1
            else:
                line = torch.arange(counter, counter + length, dtype=torch.float32)
                pieces.append(line[:, None].expand(length, 3))
                counter += length
            continue
        if keep is None:
            if length != height * width:
                raise ValueError(
                    f"A ViT run of the context holds {length} tokens but its grid is {height}x{width}: pass the kept "
                    "indices of a reduced image (`vit_keeps`)."
                )
            pieces.append(full)
        else:
            keep = keep.to(device="cpu", dtype=torch.long)
            if keep.numel() != length:
                raise ValueError(
                    f"A ViT run of the context holds {length} tokens but {keep.numel()} kept indices were given."
                )
            pieces.append(full[keep])
        # The full grid decides where the text continues, whatever was kept.
        counter = int(full.max().item()) + 1
    context_positions = torch.cat(pieces) if pieces else torch.zeros(0, 3)
    return image_positions, context_positions


def rope_frequencies(positions: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """Complex rotations of (frame, row, column) positions [..., 3] -> [..., sum(axes_dims) / 2] complex64.

    Axis a with head dims d_a uses frequencies theta^(-2i / d_a), i < d_a / 2 (float32, as the official module).
    """
    pieces = []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=positions.device).to(torch.float32).div(dim))
        angles = positions[..., axis].float()[..., None] * inv_freq
        pieces.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(pieces, dim=-1)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x [B, S, H, D] by freqs [B, S, D/2] (complex), in fp32."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(-2)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------


class GatedJointAttention(nn.Module):
    """Joint attention over the image and text streams with per-stream projections and a sigmoid output gate.

    `to_q` / `add_q_proj` give, per head, a query (first `head_dim` values) and a gate (the next `head_dim`);
    the output projection of each stream is multiplied by sigmoid(gate) (heads flattened head-major).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, 2 * inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, 2 * inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)
        self.norm_added_q = RMSNorm(head_dim, eps=eps)
        self.norm_added_k = RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(inner, dim)

    def _project(self, x: torch.Tensor, q, k, v, norm_q, norm_k):
        """x [B, S, dim] -> query, key, value [B, S, H, Dh] and gate [B, S, H*Dh]."""
        batch, length = x.shape[:2]
        query_gate = q(x).unflatten(-1, (self.heads, 2 * self.head_dim))
        query, gate = query_gate.split(self.head_dim, dim=-1)
        key = k(x).unflatten(-1, (self.heads, self.head_dim))
        value = v(x).unflatten(-1, (self.heads, self.head_dim))
        return norm_q(query), norm_k(key), value, gate.reshape(batch, length, -1)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        image_freqs: torch.Tensor,
        text_freqs: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, Si, dim], text [B, St, dim], freqs [B, S*, Dh/2], key_mask [B, Si + St] bool (None = all)."""
        qi, ki, vi, gi = self._project(image, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        qt, kt, vt, gt = self._project(
            text, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
        )
        query = torch.cat([apply_rotary(qi, image_freqs), apply_rotary(qt, text_freqs)], dim=1)
        key = torch.cat([apply_rotary(ki, image_freqs), apply_rotary(kt, text_freqs)], dim=1)
        value = torch.cat([vi, vt], dim=1)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
        )
        out = out.transpose(1, 2).flatten(2).to(image.dtype)
        split = image.shape[1]
        image_out = self.to_out[1](self.to_out[0](out[:, :split])) * torch.sigmoid(gi)
        text_out = self.to_add_out(out[:, split:]) * torch.sigmoid(gt)
        return image_out, text_out


class InternVLUTransformerBlock(nn.Module):
    """Dual-stream MMDiT block (diffusers' Qwen-Image block names, gated attention, fp32 LayerNorms).

    Per stream s with its sample's `temb`: (shift1, scale1, gate1, shift2, scale2, gate2) = s_mod(temb);
    x += gate1 * attn(LN(x)(1 + scale1) + shift1); x += gate2 * MLP_s(LN(x)(1 + scale2) + shift2).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = FP32LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = GatedJointAttention(dim, heads, head_dim, eps=eps)
        self.img_norm2 = FP32LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_mlp = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_norm1 = FP32LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm2 = FP32LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_mlp = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    @staticmethod
    def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x * (1 + scale[:, None]) + shift[:, None]

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        image_freqs: torch.Tensor,
        text_freqs: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(temb).chunk(6, dim=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(temb).chunk(6, dim=-1)
        image_attn, text_attn = self.attn(
            self._modulate(self.img_norm1(image), img_shift1, img_scale1),
            self._modulate(self.txt_norm1(text), txt_shift1, txt_scale1),
            image_freqs,
            text_freqs,
            key_mask,
        )
        image = image + img_gate1[:, None] * image_attn
        text = text + txt_gate1[:, None] * text_attn
        image = image + img_gate2[:, None] * self.img_mlp(self._modulate(self.img_norm2(image), img_shift2, img_scale2))
        text = text + txt_gate2[:, None] * self.txt_mlp(self._modulate(self.txt_norm2(text), txt_shift2, txt_scale2))
        if image.dtype == torch.float16:
            image, text = image.clip(-65504, 65504), text.clip(-65504, 65504)
        return image, text


class FP32AdaLayerNormContinuous(nn.Module):
    """Final AdaLN: (scale, shift) = linear(SiLU(temb)) (scale FIRST), y = LN(x)(1 + scale) + shift, in fp32."""

    def __init__(self, dim: int, conditioning_dim: int, eps: float = 1e-6):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_dim, 2 * dim)
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False, bias=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x [B, S, dim], temb [B, conditioning_dim] -> [B, S, dim] (x's dtype)."""
        scale, shift = self.linear(self.silu(temb).to(x.dtype)).float().chunk(2, dim=-1)
        return (self.norm(x.float()) * (1 + scale[:, None]) + shift[:, None]).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The MMDiT
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RowGroup:
    """Rows of a denoising batch that share their image-stream layout (the same target grid and number of reference
    tokens), padded together; rows of different layouts run apart so that no row carries another's padding (the
    unconditional row of an edit has no reference frame: batched with the others it would attend over as many
    padding slots as the target has tokens).

    Attributes:
        rows: [G] indices of the rows in the batch.
        target_grid: (h, w) of the rows' targets in latent pixels.
        reference_tokens: [G, R, dim] projected reference patches (`img_in`); R may be 0.
        text_tokens: [G, T, dim] projected context (`txt_in(txt_norm(.))`), right-padded.
        image_freqs: [G, N + R, Dh/2] complex rotations of the image stream (target first).
        text_freqs: [G, T, Dh/2] complex rotations of the context.
        key_mask: [G, N + R + T] bool, the real tokens (None when no row is padded).
    """

    rows: torch.Tensor
    target_grid: tuple[int, int]
    reference_tokens: torch.Tensor
    text_tokens: torch.Tensor
    image_freqs: torch.Tensor
    text_freqs: torch.Tensor
    key_mask: torch.Tensor | None


@dataclass
class MMDiTConditioning:
    """Everything of a denoising call that does not change between steps (built once by `prepare_conditioning`).

    Attributes:
        groups: the rows by image-stream layout (`RowGroup`).
        image_positions: per row, [n_b + r_b, 3] positions of its target then reference tokens.
        text_positions: per row, [L_b, 3] positions of its context tokens.
    """

    groups: list[RowGroup]
    image_positions: list[torch.Tensor]
    text_positions: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return len(self.image_positions)


def patchify(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, H, W] -> [(H/p)(W/p), C p p], patches in raster order, values ordered (channel, row, column)."""
    channels, height, width = latent.shape
    grid = latent.reshape(channels, height // patch, patch, width // patch, patch)
    return grid.permute(1, 3, 0, 2, 4).reshape((height // patch) * (width // patch), channels * patch * patch)


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of `patchify`: [(H/p)(W/p), C p p] -> [C, H, W]."""
    h, w = height // patch, width // patch
    channels = tokens.shape[-1] // (patch * patch)
    grid = tokens.reshape(h, w, channels, patch, patch).permute(2, 0, 3, 1, 4)
    return grid.reshape(channels, height, width)


class InternVLUMMDiT(nn.Module):
    """The MMDiT (`decoder.*` of the checkpoint). See the module docstring for streams and positions."""

    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int = 16,
        num_layers: int = 20,
        attention_head_dim: int = 128,
        num_attention_heads: int = 12,
        joint_attention_dim: int = 4096,
        axes_dims_rope: Sequence[int] = (16, 56, 56),
        video_position_scale_factor: float = 1.0,
        vlm_cond_position_scale_factor: float = 0.25,
    ):
        super().__init__()
        if QwenTimestepProjEmbeddings is None:
            raise ImportError("The InternVL-U generation decoder needs diffusers: `pip install diffusers`.")
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.axes_dims_rope = tuple(axes_dims_rope)
        self.video_position_scale_factor = video_position_scale_factor
        self.vlm_cond_position_scale_factor = vlm_cond_position_scale_factor
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim
        self.time_text_embed = QwenTimestepProjEmbeddings(embedding_dim=dim)
        self.txt_norm = RMSNorm(joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(in_channels, dim)
        self.txt_in = nn.Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [InternVLUTransformerBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.norm_out = FP32AdaLayerNormContinuous(dim, dim, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    # -- conditioning (once per call) ----------------------------------------------------------------------------

    def prepare_conditioning(
        self,
        encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor],
        encoder_image_token_mask: torch.Tensor | Sequence[torch.Tensor],
        image_grid_thw_gen: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        image_fhw_cond: Sequence[torch.Tensor] | None = None,
        conditional_input: Sequence[torch.Tensor] | None = None,
        image_grid_thw_gen_cond: Sequence[torch.Tensor] | None = None,
        image_keep_cond: Sequence[Sequence[torch.Tensor | None]] | None = None,
        position_mode: str = "kept_2d",
    ) -> MMDiTConditioning:
        """Project the context and the references and build the positions of every row (the official argument
        names; `image_keep_cond` and `position_mode` are ours).

        Args:
            encoder_hidden_states: [B, L, joint_dim] with `encoder_attention_mask` [B, L] bool (valid prefix of
                each row), or a list of B tensors [L_b, joint_dim].
            encoder_image_token_mask: [B, L] bool or a list of [L_b]: True on ViT tokens.
            image_grid_thw_gen: [B, 3] (1, h, w) of each target in latent pixels.
            image_fhw_cond: per row a [m_b, 3] tensor of (1, gh, gw) ViT grids, one per ViT run (None: none).
            conditional_input: per row [n_b, C, h, w] normalised reference latents (None: no references).
            image_grid_thw_gen_cond: per row [n_b, 3] (1, h, w) of each reference inside its (padded) latent.
            image_keep_cond: per row, per ViT run, the kept raster indices (None = the full grid).
            position_mode: see `build_sample_positions`.
        """
        patch = self.patch_size
        if isinstance(encoder_hidden_states, torch.Tensor):
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool)
            lengths = encoder_attention_mask.bool().sum(-1).tolist()
            contexts = [states[:length] for states, length in zip(encoder_hidden_states, lengths)]
            vit_masks = [mask[:length] for mask, length in zip(encoder_image_token_mask, lengths)]
        else:
            contexts, vit_masks = list(encoder_hidden_states), list(encoder_image_token_mask)
        batch = len(contexts)
        grids = torch.as_tensor(image_grid_thw_gen).reshape(batch, 3)[:, 1:].long().cpu()
        if bool((grids % patch).any()):
            raise ValueError(f"`image_grid_thw_gen` must hold multiples of the patch size {patch}, got {grids}.")
        image_fhw_cond = image_fhw_cond if image_fhw_cond is not None else [None] * batch
        conditional_input = conditional_input if conditional_input is not None else [None] * batch
        image_grid_thw_gen_cond = image_grid_thw_gen_cond if image_grid_thw_gen_cond is not None else [None] * batch
        image_keep_cond = image_keep_cond if image_keep_cond is not None else [None] * batch

        references, image_positions, text_positions = [], [], []
        for row in range(batch):
            target = (int(grids[row, 0]) // patch, int(grids[row, 1]) // patch)
            ref_tokens, ref_grids = self._reference_tokens(
                conditional_input[row], image_grid_thw_gen_cond[row], target, row
            )
            references.append(ref_tokens)
            fhw = image_fhw_cond[row]
            vit_grids = [] if fhw is None else [(int(f[1]), int(f[2])) for f in torch.as_tensor(fhw).reshape(-1, 3)]
            img_pos, txt_pos = build_sample_positions(
                [target, *ref_grids],
                torch.as_tensor(vit_masks[row]),
                vit_grids,
                image_keep_cond[row],
                image_scale=self.video_position_scale_factor,
                vit_scale=self.vlm_cond_position_scale_factor,
                position_mode=position_mode,
            )
            image_positions.append(img_pos)
            text_positions.append(txt_pos)

        layouts: dict[tuple[int, int, int], list[int]] = {}
        for row in range(batch):
            key = (int(grids[row, 0]), int(grids[row, 1]), references[row].shape[0])
            layouts.setdefault(key, []).append(row)
        groups = [
            self._row_group(rows, (h, w), [references[r] for r in rows], [contexts[r] for r in rows],
                            [image_positions[r] for r in rows], [text_positions[r] for r in rows])
            for (h, w, _), rows in layouts.items()
        ]  # fmt: skip
        return MMDiTConditioning(groups=groups, image_positions=image_positions, text_positions=text_positions)

    def _row_group(self, rows, target_grid, references, contexts, image_positions, text_positions) -> RowGroup:
        """Pad the context of rows that share an image layout; project it and build the rotations."""
        device, dtype = self.img_in.weight.device, self.dtype
        count = len(rows)
        t_max = max(context.shape[0] for context in contexts)
        text_states = torch.zeros(count, t_max, contexts[0].shape[-1], device=device, dtype=dtype)
        text_pos = torch.zeros(count, t_max, 3)
        text_mask = torch.zeros(count, t_max, dtype=torch.bool)
        for index, (context, positions) in enumerate(zip(contexts, text_positions)):
            text_states[index, : context.shape[0]] = context.to(device=device, dtype=dtype)
            text_pos[index, : context.shape[0]] = positions
            text_mask[index, : context.shape[0]] = True
        image_pos = torch.stack(image_positions)
        key_mask = torch.cat([torch.ones(count, image_pos.shape[1], dtype=torch.bool), text_mask], dim=1)
        return RowGroup(
            rows=torch.tensor(rows, dtype=torch.long),
            target_grid=target_grid,
            reference_tokens=torch.stack(references),
            text_tokens=self.txt_in(self.txt_norm(text_states)),
            image_freqs=rope_frequencies(image_pos.to(device), self.axes_dims_rope),
            text_freqs=rope_frequencies(text_pos.to(device), self.axes_dims_rope),
            key_mask=None if bool(key_mask.all()) else key_mask.to(device),
        )

    def _reference_tokens(self, latents, grids, target: tuple[int, int], row: int):
        """Projected patches of one row's references: ([sum h*w, dim], [(h, w) in patches])."""
        if latents is None or latents.shape[0] == 0:
            return torch.zeros(0, self.inner_dim, device=self.img_in.weight.device, dtype=self.dtype), []
        patch = self.patch_size
        if grids is None:
            grids = torch.tensor([[1, latents.shape[-2], latents.shape[-1]]] * latents.shape[0])
        grids = torch.as_tensor(grids).reshape(-1, 3).long().cpu()
        if grids.shape[0] != latents.shape[0]:
            raise ValueError(
                f"Row {row}: {latents.shape[0]} reference latent(s) but {grids.shape[0]} row(s) of "
                "`image_grid_thw_gen_cond`."
            )
        limit = int(min(target) // 2 / self.video_position_scale_factor)
        if latents.shape[0] >= limit:
            raise ValueError(
                f"Row {row}: {latents.shape[0]} reference image(s) for a {target[0]}x{target[1]}-patch target; at "
                f"most {limit - 1} fit its position range (larger targets allow more)."
            )
        pieces, shapes = [], []
        for latent, (_, height, width) in zip(latents, grids.tolist()):
            if height % patch or width % patch:
                raise ValueError(f"Row {row}: reference grid {height}x{width} is not a multiple of the patch size.")
            pieces.append(patchify(latent[:, :height, :width], patch))
            shapes.append((height // patch, width // patch))
        tokens = torch.cat(pieces).to(device=self.img_in.weight.device, dtype=self.dtype)
        return self.img_in(tokens), shapes

    # -- one denoising evaluation --------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, conditioning: MMDiTConditioning):
        """Velocity of the noisy latents.

        Args:
            hidden_states: [B, C, H, W] noisy target latents (each row's target in its top-left h x w corner).
            timestep: [B] scheduler timesteps on the 0..1000 scale (cast to the model dtype, as upstream).
            conditioning: from `prepare_conditioning` for the same B rows.
        Returns:
            [B, C, H, W] flow prediction (zeros outside each row's grid), in the model dtype.
        """
        if hidden_states.shape[0] != conditioning.batch_size:
            raise ValueError(
                f"`hidden_states` has {hidden_states.shape[0]} rows but the conditioning was built for "
                f"{conditioning.batch_size}."
            )
        hidden_states = hidden_states.to(self.dtype)
        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(hidden_states.shape[0])
        velocity = hidden_states.new_zeros(hidden_states.shape[0], self.out_channels, *hidden_states.shape[2:])
        for group in conditioning.groups:
            rows = group.rows.to(hidden_states.device)
            velocity[rows] = self._group_velocity(hidden_states[rows], timestep[rows], group)
        return velocity

    def _group_velocity(self, hidden_states: torch.Tensor, timestep: torch.Tensor, group: RowGroup) -> torch.Tensor:
        """The blocks over rows of one layout: [G, C, H, W] -> [G, C, H, W]."""
        patch = self.patch_size
        batch, channels = hidden_states.shape[:2]
        height, width = group.target_grid
        count = (height // patch) * (width // patch)
        patches = (
            hidden_states[:, :, :height, :width]
            .reshape(batch, channels, height // patch, patch, width // patch, patch)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(batch, count, channels * patch * patch)
        )
        image = torch.cat([self.img_in(patches), group.reference_tokens], dim=1)
        text = group.text_tokens
        temb = self.time_text_embed(timestep.to(self.dtype), hidden_states)
        for block in self.transformer_blocks:
            image, text = block(image, text, temb, group.image_freqs, group.text_freqs, group.key_mask)
        output = self.proj_out(self.norm_out(image[:, :count], temb))
        velocity = hidden_states.new_zeros(batch, self.out_channels, *hidden_states.shape[2:])
        velocity[:, :, :height, :width] = (
            output.reshape(batch, height // patch, width // patch, self.out_channels, patch, patch)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(batch, self.out_channels, height, width)
        )
        return velocity


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint wrapper
# ----------------------------------------------------------------------------------------------------------------


class G2TRInternVLUGenerationDecoder(PreTrainedModel):
    """InternVL-U's generation decoder: the MMDiT (`decoder`) and the context padding token, under the official
    `generation_decoder/` names (see the module docstring). Load the official folder with
    `G2TRInternVLUGenerationDecoder.from_pretrained(snapshot, subfolder="generation_decoder")`."""

    config: G2TRInternVLUGenerationDecoderConfig
    config_class = G2TRInternVLUGenerationDecoderConfig
    base_model_prefix = "generation_decoder"
    main_input_name = "hidden_states"
    _no_split_modules = ["InternVLUTransformerBlock"]
    _supports_sdpa = True

    def __init__(self, config: G2TRInternVLUGenerationDecoderConfig):
        super().__init__(config)
        self.decoder = InternVLUMMDiT(
            **config.decoder_config,
            video_position_scale_factor=config.video_position_scale_factor,
            vlm_cond_position_scale_factor=config.vlm_cond_position_scale_factor,
        )
        if config.padding_encoder_hidden_states:
            self.encoder_padding_token = nn.Parameter(torch.zeros(config.input_hidden_size))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RMSNorm) and module.weight is not None:
            module.weight.fill_(1.0)
        elif module is self and hasattr(self, "encoder_padding_token"):
            self.encoder_padding_token.zero_()

    def prepare_conditioning(self, *args, **kwargs) -> MMDiTConditioning:
        """See [`InternVLUMMDiT.prepare_conditioning`]."""
        return self.decoder.prepare_conditioning(*args, **kwargs)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, conditioning: MMDiTConditioning):
        """See [`InternVLUMMDiT.forward`]."""
        return self.decoder(hidden_states, timestep, conditioning)


def build_tiny_generation_decoder_config(latent_channels: int = 4, context_dim: int = 128, **overrides):
    """A tiny random MMDiT: 2 layers, 2 heads x 32 (RoPE axes 8/12/12), patch 2, context width `context_dim`
    (two LLM layers of the tiny understanding model: 2 x 64)."""
    values = dict(
        decoder_config=dict(
            patch_size=2,
            in_channels=latent_channels * 4,
            out_channels=latent_channels,
            num_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=context_dim,
            axes_dims_rope=[8, 12, 12],
        ),
        input_hidden_size=context_dim,
        output_hidden_size=context_dim,
        gen_image_height=64,
        gen_image_width=64,
        reference_min_pixels=64 * 64,
        reference_max_pixels=96 * 96,
        reference_max_side=96,
    )
    values.update(overrides)
    return G2TRInternVLUGenerationDecoderConfig(**values)

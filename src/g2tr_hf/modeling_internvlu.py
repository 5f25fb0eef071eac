"""InternVL-U understanding (InternViT-300M -> pixel shuffle -> `mlp1` -> Qwen3) with G2TR visual token reduction.

The official `vlm/` checkpoint (`InternVLUChatModel`, 658 tensors) loads under its own names; on disk (and in every
folder this package writes) they stay as they are, while the module tree follows transformers' base-model / head
split (`model.*`, `lm_head`; `CHECKPOINT_RENAMES`, applied by transformers on load and reversed on save):

    vision_model.embeddings.{class_embedding, patch_embedding.{weight,bias}, position_embedding}
    vision_model.encoder.layers.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2, ls1, ls2}
    mlp1.{0,1,3}.{weight,bias}
    special_token_embedding.weight
    language_model.model.*            (transformers' Qwen3Model; `lm_head` is ours)
    language_model.lm_head.weight
    vae.*                             (diffusers' AutoencoderKLQwenImage; from the checkpoint's `vae/` folder)

G2TR (arXiv 2605.12309) sits after `mlp1` and before the LLM prefill: the 256 tokens of every 448x448 image are
scored against the image's own Qwen-Image VAE latent (posterior mode, `latents_mean`/`latents_std` normalised,
pooled `g2tr_latent_pool` x `g2tr_latent_pool`, widened to the LLM width by the parameter-free channel
interpolation), K of them are kept and the others merged into them. The processor always emits 256 `<IMG_CONTEXT>`
per image; the model removes the 256 - K slots of the dropped tokens from the sequence and left-pads the rows
again, so the KV cache holds K + 2 entries per image (`<img>`, K tokens, `</img>`). `generate()` keeps returning
the caller's full `input_ids` followed by the new tokens; the cache becomes a compact cache (`generation_g2tr`)
that records what it holds and answers in the caller's positions, so continuing a conversation from it is exact.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen3Model
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging
from transformers.utils.import_utils import is_diffusers_available

from .compat import (
    CACHE_KWARG,
    compute_dtype,
    drop_parallel_plans,
    execution_device,
    output_cache,
    pop_cache_argument,
    register_checkpoint_renames,
)
from .configuration_internvlu import SPECIAL_TOKENS, G2TRInternViTConfig, G2TRInternVLUConfig
from .generation_g2tr import (
    G2TRGenerationMixin,
    compaction_index,
    continuation_image_index,
    ids_from_embeddings,
    inside_blocks,
    open_compact_cache,
)
from .baselines import capture_layer_inputs, vit_cls_attention, vscan_vit_layers
from .in_llm import InLLMDropper, acts_before_llm
from .reduction import (
    ReductionResult,
    anchor_encode_size,
    build_latent_anchors,
    interpolate_channels,
    method_needs_anchors,
    method_needs_vit_attention,
    reduce_tokens,
    reduces_anything,
    resize_for_anchors,
)
from .saving_g2tr import G2TRSaveMixin
from .vae_single_frame import UnsupportedVAEError, encode_single_frame_mode


if is_diffusers_available():
    from diffusers import AutoencoderKLQwenImage
else:
    AutoencoderKLQwenImage = None


logger = logging.get_logger(__name__)

# Images per VAE encode call when building anchors (the official `umm_vae_encode_max_bs`).
_VAE_ENCODE_CHUNK = 32


# ----------------------------------------------------------------------------------------------------------------
# InternViT
# ----------------------------------------------------------------------------------------------------------------


class InternViTRMSNorm(nn.Module):
    """RMSNorm used by InternViT variants with `norm_type="rms_norm"` or `qk_normalization=True`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def _make_norm(config: G2TRInternViTConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return InternViTRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class InternViTEmbeddings(nn.Module):
    """Patchify (Conv2d), prepend the class embedding, add the learned position table.

    The position table is stored for the `image_size // patch_size` grid; other grids get a bicubic resize of it
    (in fp32, as upstream). At the trained size the table is used as is (the resize would be the identity).
    """

    def __init__(self, config: G2TRInternViTConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.trained_grid = config.image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.position_embedding = nn.Parameter(torch.empty(1, self.trained_grid**2 + 1, self.embed_dim))

    def _grid_positions(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Position embeddings of the patch grid (height, width): [1, height * width, D]."""
        table = self.position_embedding[:, 1:]
        if (height, width) == (self.trained_grid, self.trained_grid):
            return table.to(dtype)
        table = table.float().reshape(1, self.trained_grid, self.trained_grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)
        return table.flatten(2).transpose(1, 2).to(dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, H, W] -> embeddings [N, 1 + (H/p)*(W/p), D]."""
        # The ViT computes in its tables' dtype; the patch convolution takes its inputs in its own floating dtype.
        dtype = self.position_embedding.dtype
        pixels = pixel_values.to(dtype=compute_dtype(self.patch_embedding))
        patches = self.patch_embedding(pixels).to(dtype)  # [N, D, H/p, W/p]
        batch_size, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(dtype).expand(batch_size, 1, -1)
        positions = torch.cat(
            [self.position_embedding[:, :1].to(dtype), self._grid_positions(height, width, dtype)], dim=1
        )
        return torch.cat([cls, patches], dim=1) + positions


def eager_vit_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain bidirectional softmax attention. q, k, v: [B, H, S, Dh] -> ([B, S, H, Dh], weights [B, H, S, S])."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class InternViTAttention(nn.Module):
    """Multi-head self-attention with the fused `qkv` projection of the checkpoint (no mask, not causal)."""

    def __init__(self, config: G2TRInternViTConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternViTRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternViTRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.proj_drop = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(2)  # each [B, S, H, Dh]
        if self.qk_normalization:
            query = self.q_norm(query.flatten(2)).view_as(query)
            key = self.k_norm(key.flatten(2)).view_as(key)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))

        attention_interface: Callable = eager_vit_attention
        if self.config._attn_implementation not in (None, "eager"):
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        output, _ = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scale,
            is_causal=False,
        )
        output = output.reshape(batch_size, seq_len, self.embed_dim)
        return self.proj_drop(self.proj(output))


class InternViTMLP(nn.Module):
    def __init__(self, config: G2TRInternViTConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternViTLayer(nn.Module):
    """Pre-norm residual block with LayerScale: h += ls1 * attn(norm1(h)); h += ls2 * mlp(norm2(h)).

    Stochastic depth is a training-time no-op, so unlike upstream no drop-path schedule is computed here (upstream
    calls `.item()` on a `linspace` in `__init__`, which crashes under transformers 5's meta-device init).
    """

    def __init__(self, config: G2TRInternViTConfig):
        super().__init__()
        self.attn = InternViTAttention(config)
        self.mlp = InternViTMLP(config)
        self.norm1 = _make_norm(config)
        self.norm2 = _make_norm(config)
        self.ls1 = nn.Parameter(torch.empty(config.hidden_size))
        self.ls2 = nn.Parameter(torch.empty(config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states).to(hidden_states.dtype)) * self.ls1
        hidden_states = hidden_states + self.mlp(self.norm2(hidden_states).to(hidden_states.dtype)) * self.ls2
        return hidden_states


class InternViTEncoder(nn.Module):
    def __init__(self, config: G2TRInternViTConfig):
        super().__init__()
        self.layers = nn.ModuleList([InternViTLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """Run the first `num_layers` layers (all by default). [N, S, D] -> [N, S, D]."""
        for layer in self.layers[:num_layers]:
            hidden_states = layer(hidden_states)
        return hidden_states


class InternViTModel(nn.Module):
    """InternViT without a final norm. Returns the hidden states after layer `select_layer` (CLS included)."""

    def __init__(self, config: G2TRInternViTConfig):
        super().__init__()
        self.config = config
        self.embeddings = InternViTEmbeddings(config)
        self.encoder = InternViTEncoder(config)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """pixel_values [N, 3, H, W] -> [N, 1 + (H/p)*(W/p), D].

        `select_layer` indexes the sequence (embeddings, layer 1, ..., layer L) as upstream's `hidden_states`, so
        -1 is the last layer; only the layers up to the selected one are run.
        """
        num_states = len(self.encoder.layers) + 1
        if not -num_states <= select_layer < num_states:
            raise ValueError(f"`select_layer` must index one of {num_states} ViT states, got {select_layer}.")
        return self.encoder(self.embeddings(pixel_values), num_layers=select_layer % num_states)


# ----------------------------------------------------------------------------------------------------------------
# Pixel shuffle, projector, VAE
# ----------------------------------------------------------------------------------------------------------------


def pixel_shuffle(features: torch.Tensor, downsample_ratio: float = 0.5) -> torch.Tensor:
    """Space-to-depth on a token grid, InternVL's `pixel_shuffle_v2` (= transformers' `InternVLModel.pixel_shuffle`).

    Output cell (i, j) concatenates the inputs at rows r*i .. r*i + r-1 and columns r*j .. r*j + r-1 (r = 1 /
    downsample_ratio) in (row offset, column offset, channel) order; that order is what `mlp1.1` was trained on.

    Args:
        features: [N, h, w, C] row-major grid.
    Returns:
        [N, h/r, w/r, r*r*C].
    """
    factor = int(round(1.0 / downsample_ratio))
    batch, height, width, channels = features.shape
    if height % factor or width % factor:
        raise ValueError(f"The ViT grid {height}x{width} must be divisible by 1/downsample_ratio = {factor}.")
    features = features.reshape(batch, height // factor, factor, width // factor, factor, channels)
    features = features.permute(0, 1, 3, 2, 4, 5)
    return features.reshape(batch, height // factor, width // factor, factor * factor * channels)


def build_projector(config: G2TRInternVLUConfig) -> nn.Sequential:
    """`mlp1`: LayerNorm -> Linear -> GELU -> Linear, indexed 0..3 as in the checkpoint (`mlp1.2` has no weights)."""
    in_dim = config.vision_config.hidden_size * int(round(1.0 / config.downsample_ratio)) ** 2
    out_dim = config.text_config.hidden_size
    return nn.Sequential(
        nn.LayerNorm(in_dim, eps=config.projector_layer_norm_eps),
        nn.Linear(in_dim, out_dim),
        ACT2FN[config.projector_hidden_act],
        nn.Linear(out_dim, out_dim),
    )


# The statistics the official G2TR code assumes when it rebuilds VAE pixels from the ViT input (OpenAI CLIP's).
_OFFICIAL_ANCHOR_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OFFICIAL_ANCHOR_STD = (0.26862954, 0.26130258, 0.27577711)


def vae_pixels_from_vit_pixels(pixel_values: torch.Tensor) -> torch.Tensor:
    """The official G2TR code's anchor source in understanding (`g2tr_anchor_source="vit_pixels"`): the ViT input
    [N, 3, S, S] de-normalised with CLIP's mean and std (whatever normalisation it really had), clamped to [0, 1]
    and mapped to the VAE's [-1, 1]. Returns [N, 3, S, S] float32."""
    mean = torch.tensor(_OFFICIAL_ANCHOR_MEAN, device=pixel_values.device)[None, :, None, None]
    std = torch.tensor(_OFFICIAL_ANCHOR_STD, device=pixel_values.device)[None, :, None, None]
    return ((pixel_values.float() * std + mean).clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def build_qwen_image_vae(vae_config: dict) -> nn.Module:
    """The Qwen-Image VAE from its diffusers config (private `_...` keys of a saved config are ignored)."""
    if AutoencoderKLQwenImage is None:
        raise ImportError("`vae_config` is set but diffusers is not installed: `pip install diffusers`.")
    kwargs = {k: v for k, v in vae_config.items() if not k.startswith("_")}
    return AutoencoderKLQwenImage(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Sequence bookkeeping helpers
# ----------------------------------------------------------------------------------------------------------------


def positions_after(next_position: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of new tokens [B, L] that follow a cache: `next_position` [B] + 0, 1, ... over the real tokens of
    the left-padded `attention_mask` [B, L] (as `generate` counts them); padding gets 0."""
    mask = attention_mask.bool()
    positions = next_position[:, None] + mask.long().cumsum(-1) - 1
    return positions.masked_fill(~mask, 0)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class G2TRInternVLUCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    Output of [`G2TRInternVLUForConditionalGeneration`]: transformers' `CausalLMOutputWithPast` (`loss`, `logits`,
    the KV cache under the installed release's name, `hidden_states`, `attentions`) plus the reduction's bookkeeping,
    under the same names as BAGEL's outputs. With reduction on, `logits` follow the compact sequence.

    Args:
        image_hidden_states (`torch.FloatTensor` of shape `(num_images, 256, hidden_size)`, *optional*): the `mlp1`
            outputs before reduction.
        reduced_attention_mask (`torch.LongTensor` of shape `(batch_size, compact_length)`): which compact slots are
            real tokens (the caller's mask with the dropped slots removed).
        kept_token_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): which of the caller's tokens
            entered the decoder (False for the slots of dropped visual tokens).
        image_reductions (`list[ReductionResult]`, *optional*): the G2TR plan of every image (kept indices, scores,
            assignment), in image order; None when nothing was reduced. Also readable as `reduction`.
    """

    image_hidden_states: torch.FloatTensor | None = None
    reduced_attention_mask: torch.LongTensor | None = None
    kept_token_mask: torch.BoolTensor | None = None
    image_reductions: list[ReductionResult] | None = None

    @property
    def reduction(self) -> list[ReductionResult] | None:
        """Former name of `image_reductions`."""
        return self.image_reductions


@dataclass
class G2TRInternVLUModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    Output of [`G2TRInternVLUModel`]: transformers' `BaseModelOutputWithPast` (`last_hidden_state` over the compact
    sequence, the KV cache under the installed release's name, `hidden_states`, `attentions`) plus the fields of
    [`G2TRInternVLUCausalLMOutputWithPast`] that describe the images and the reduction.
    """

    image_hidden_states: torch.FloatTensor | None = None
    reduced_attention_mask: torch.LongTensor | None = None
    kept_token_mask: torch.BoolTensor | None = None
    image_reductions: list[ReductionResult] | None = None


# Module names that quantization must leave alone (`_keep_in_fp32_modules`), under both roots: the head model, where the
# backbone is `model.` (what the Auto classes load), and the backbone loaded on its own. A name matches itself and
# everything inside it.
_UNQUANTIZED_BACKBONE_MODULES = ("vae", "special_token_embedding")
NOT_QUANTIZED = ["lm_head", *_UNQUANTIZED_BACKBONE_MODULES, *(f"model.{m}" for m in _UNQUANTIZED_BACKBONE_MODULES)]


class G2TRInternVLUPreTrainedModel(G2TRSaveMixin, PreTrainedModel):
    config: G2TRInternVLUConfig
    config_class = G2TRInternVLUConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternViTLayer", "Qwen3DecoderLayer", "AutoencoderKLQwenImage"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # Never quantized (every transformers quantizer adds this list to the user's own `modules_to_not_convert` /
    # `llm_int8_skip_modules`): the VAE, whose latents are the G2TR anchors; `special_token_embedding`; `lm_head`.
    # Loaded in fp16 they stay fp32 (their outputs are cast back); bf16 and fp32 loads keep the requested dtype.
    # See docs/quantization.md.
    _keep_in_fp32_modules = NOT_QUANTIZED
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        vision_config = self.config.vision_config
        if isinstance(module, InternViTEmbeddings):
            init.normal_(module.class_embedding, mean=0.0, std=vision_config.initializer_range)
            init.normal_(module.position_embedding, mean=0.0, std=vision_config.initializer_range)
        elif isinstance(module, InternViTLayer):
            init.constant_(module.ls1, vision_config.initializer_factor)
            init.constant_(module.ls2, vision_config.initializer_factor)


class G2TRInternVLUModel(G2TRInternVLUPreTrainedModel):
    """The InternVL-U understanding backbone with G2TR, without the language-model head: InternViT (`vision_model`),
    `mlp1`, the Qwen3 decoder (`language_model`), `special_token_embedding` and the Qwen-Image VAE (`vae`, the G2TR
    anchors). Its forward returns the decoder's hidden states over the compact sequence.

    The official `vlm/` names are kept on disk: transformers renames them on load and back on save
    (`CHECKPOINT_RENAMES`).
    """

    def __init__(self, config: G2TRInternVLUConfig):
        super().__init__(config)
        config.validate_g2tr()
        if config.vision_config._attn_implementation is None:
            # transformers resolves the implementation of sub-configs that have their own PreTrainedModel; the ViT
            # is a plain module, so it follows the top-level choice (SDPA by default).
            config.vision_config._attn_implementation = config._attn_implementation
        self.vision_model = InternViTModel(config.vision_config)
        self.mlp1 = build_projector(config)
        self.language_model = Qwen3Model(config.text_config)
        self.special_token_embedding = nn.Embedding(len(SPECIAL_TOKENS), config.text_config.hidden_size)
        self.vae = build_qwen_image_vae(config.vae_config) if config.vae_config is not None else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @property
    def vae_scale_factor(self) -> int:
        """Spatial downsampling of the VAE (8 for Qwen-Image)."""
        return 2 ** len(self.vae.config.temperal_downsample)

    # -- vision --------------------------------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """ViT -> drop CLS -> pixel shuffle -> `mlp1`.

        Args:
            pixel_values: [N, 3, S, S], S = `config.vision_image_size`, normalised for the ViT.
        Returns:
            `BaseModelOutputWithPooling` as transformers' VLMs: `last_hidden_state` [N, 1 + (S/14)^2, vit_hidden]
            (the selected ViT layer, CLS first) and `pooler_output` [N, T, hidden_size], the visual tokens the LLM
            receives, row-major over the (sqrt(T), sqrt(T)) grid (T = 256 for InternVL-U).
        """
        size = self.config.vision_image_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"`pixel_values` must have shape [num_images, 3, {size}, {size}] (one tile per image, as the "
                f"processor emits), got {tuple(pixel_values.shape)}."
            )
        vit_states = self.vision_model(pixel_values, select_layer=self.config.select_layer)
        hidden = vit_states[:, 1:]
        side = int(math.isqrt(hidden.shape[1]))
        grid = hidden.reshape(hidden.shape[0], side, side, hidden.shape[-1])
        shuffled = pixel_shuffle(grid, self.config.downsample_ratio)
        return BaseModelOutputWithPooling(last_hidden_state=vit_states, pooler_output=self.mlp1(shuffled.flatten(1, 2)))

    def vscan_attention_scores(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The image features (`get_image_features(...).pooler_output`) and, from the same ViT pass, VScan's two
        scores of every visual token: the [CLS] token's attention in the last ViT layer run (global scan) and in
        layer round(5/24 * depth) (local scan), averaged over heads and summed over the 2 x 2 ViT patches that the
        pixel shuffle joins into the token. The layers' inputs are captured while the ViT runs and the [CLS] query
        row recomputed by hand (1 x (1 + patches) per head), so the ViT keeps its attention kernel.

        Returns:
            features [N, T, hidden_size], and one [2, T] fp32 tensor per image.
        """
        layers = self.vision_model.encoder.layers
        num_states = len(layers) + 1
        scanned = vscan_vit_layers(self.config.select_layer % num_states)
        with capture_layer_inputs({index: layers[index] for index in scanned}) as captured:
            features = self.get_image_features(pixel_values).pooler_output
        with torch.no_grad():
            per_layer = [self._token_cls_attention(layers[index], captured[index]) for index in scanned]
        return features, list(torch.stack(per_layer, dim=1).to(features.device))

    def _token_cls_attention(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """[CLS] attention of `layer` for its input `hidden` [N, 1 + S, D], per LLM token: [N, T] fp32."""
        attention = layer.attn
        normed = layer.norm1(hidden).to(hidden.dtype)
        batch, length, _ = hidden.shape
        qkv = attention.qkv(normed).reshape(batch, length, 3, attention.num_heads, attention.head_dim)
        query, key = qkv[:, :1, 0], qkv[:, :, 1]  # [N, 1, H, d], [N, S + 1, H, d]
        if attention.qk_normalization:
            query = attention.q_norm(query.flatten(2)).view_as(query)
            key = attention.k_norm(key.flatten(2)).view_as(key)
        scores = vit_cls_attention(query[:, 0], key.transpose(1, 2), attention.scale)[:, 1:]  # patches only
        side = math.isqrt(scores.shape[1])
        factor = int(round(1.0 / self.config.downsample_ratio))
        grouped = scores.reshape(batch, side // factor, factor, side // factor, factor).sum(dim=(2, 4))
        return grouped.flatten(1)  # the pixel shuffle's token order

    # -- G2TR ----------------------------------------------------------------------------------------------------

    def encode_vae_latents(self, vae_pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised posterior mode of the Qwen-Image VAE.

        Args:
            vae_pixel_values: [N, 3, H, W] in [-1, 1].
        Returns:
            [N, z_dim, H/8, W/8] latents, `(z - latents_mean) / latents_std`, in the VAE dtype.
        """
        vae = self.vae
        device = execution_device(vae)
        pixels = vae_pixel_values.to(device=device, dtype=vae.dtype)
        chunks = pixels.split(_VAE_ENCODE_CHUNK)
        if device is None:
            # Offloaded by accelerate: its weights reach the convolutions only through the modules' own calls.
            return self._normalize_latents(
                torch.cat([vae.encode(chunk.unsqueeze(2)).latent_dist.mode() for chunk in chunks])[:, :, 0]
            )
        try:
            # One frame per image: the causal 3-D encoder is then a 2-D one with each kernel's last temporal slice,
            # the same numbers for about a third of the convolution FLOPs (`vae_single_frame`).
            latents = torch.cat([encode_single_frame_mode(vae, chunk) for chunk in chunks])
        except UnsupportedVAEError as error:
            logger.warning_once(f"{error} Using the 3-D `vae.encode` for the G2TR anchors.")
            # The causal 3-D VAE takes a time axis: one frame per image.
            latents = torch.cat([vae.encode(chunk.unsqueeze(2)).latent_dist.mode() for chunk in chunks])[:, :, 0]
        return self._normalize_latents(latents)

    def _normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, z_dim, h, w] posterior modes -> `(z - latents_mean) / latents_std` per channel."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=latents.device, dtype=latents.dtype)
        std = torch.tensor(config.latents_std, device=latents.device, dtype=latents.dtype)
        return (latents - mean[None, :, None, None]) / std[None, :, None, None]

    def get_latent_anchors(
        self, vae_pixel_values: torch.Tensor, vae_pixel_sizes: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """G2TR anchors of every image: its latent cropped to its own size, pooled, widened to the LLM width.

        Args:
            vae_pixel_values: [N, 3, H, W] in [-1, 1], images zero-padded to a common size.
            vae_pixel_sizes: [N, 2] (height, width) of every image inside the padding; the full size when None.
        Returns:
            One (anchors [M_i, hidden_size], (h_l, w_l)) per image.
        """
        if vae_pixel_sizes is None:
            sizes = [tuple(vae_pixel_values.shape[-2:])] * vae_pixel_values.shape[0]
        else:
            sizes = [tuple(int(v) for v in size) for size in vae_pixel_sizes.tolist()]
        if self.config.g2tr_anchor_scale == 1.0:
            latents, pool = self.encode_vae_latents(vae_pixel_values), self.config.g2tr_latent_pool
        else:
            latents, sizes, pool = self._encode_downscaled_anchor_latents(vae_pixel_values, sizes)
        factor = self.vae_scale_factor
        project = functools.partial(interpolate_channels, out_dim=self.config.text_config.hidden_size)
        anchors = []
        for latent, (height, width) in zip(latents, sizes):
            own = latent[:, : -(-height // factor), : -(-width // factor)]
            anchors.append(build_latent_anchors(own, pool=pool, project=project))
        return anchors

    def _encode_downscaled_anchor_latents(
        self, vae_pixel_values: torch.Tensor, sizes: list[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]], int]:
        """`g2tr_anchor_scale` < 1: encode each image resized (bilinear, antialiased) to the size whose latent, pooled
        by `g2tr_latent_pool * g2tr_anchor_scale`, gives the full-resolution anchor grid (`anchor_encode_size`).
        Images of one encode size are encoded together.

        Returns:
            (one latent [z_dim, h, w] per image, the encoded (height, width) per image, the pooling factor).
        """
        config = self.config
        targets = [
            anchor_encode_size(
                height,
                width,
                vae_downsample=self.vae_scale_factor,
                patch_size=1,
                latent_pool=config.g2tr_latent_pool,
                anchor_scale=config.g2tr_anchor_scale,
            )[0]
            for height, width in sizes
        ]
        latents: list[torch.Tensor | None] = [None] * len(sizes)
        for target in dict.fromkeys(targets):
            members = [index for index, other in enumerate(targets) if other == target]
            pixels = torch.stack(
                [resize_for_anchors(vae_pixel_values[i, :, : sizes[i][0], : sizes[i][1]], target) for i in members]
            )
            for index, latent in zip(members, self.encode_vae_latents(pixels)):
                latents[index] = latent
        return latents, targets, config.g2tr_anchor_pool

    def reduce_image_features(
        self,
        image_features: torch.Tensor,
        vae_pixel_values: torch.Tensor,
        vae_pixel_sizes: torch.Tensor | None,
        ratio: float,
        vit_attention: list[torch.Tensor] | None = None,
    ) -> list[ReductionResult]:
        """Run G2TR on every image separately.

        Args:
            image_features: [N, T, hidden_size] `mlp1` outputs.
            vae_pixel_values, vae_pixel_sizes: see `get_latent_anchors`.
            ratio: keep ratio in (0, 1).
            vit_attention: one [2, T] tensor per image for a method that reads ViT attention
                (`vscan_attention_scores`).
        Returns:
            One `ReductionResult` per image (keep [K], tokens [K, hidden_size], ...).
        """
        side = self.config.image_grid_size
        if not method_needs_anchors(self.config.g2tr_method):
            # An anchor-free method (random, pool, ...): no VAE encode.
            anchors = [(None, None)] * image_features.shape[0]
        else:
            # The anchors only steer the selection: no gradient flows into the VAE.
            with torch.no_grad():
                anchors = self.get_latent_anchors(vae_pixel_values, vae_pixel_sizes)
        return [
            reduce_tokens(
                features,
                (side, side),
                None if image_anchors is None else image_anchors.to(device=features.device, dtype=features.dtype),
                anchor_grid,
                ratio=ratio,
                vit_attention=image_attention,
                **self.config.g2tr_reduction_kwargs(),
            )
            for features, (image_anchors, anchor_grid), image_attention in zip(
                image_features, anchors, vit_attention or [None] * image_features.shape[0]
            )
        ]

    def _check_vae_inputs(self, num_images: int, vae_pixel_values: torch.Tensor | None, ratio: float) -> None:
        if self.vae is None:
            raise ValueError(
                f"`g2tr_ratio`={ratio} < 1 needs the VAE for its anchors, but this model has none "
                "(`config.vae_config` is None). Use `g2tr_ratio=1.0` or load a checkpoint with its VAE."
            )
        if vae_pixel_values is None:
            raise ValueError(
                f"`g2tr_ratio`={ratio} < 1 needs `vae_pixel_values` (returned by the processor next to "
                "`pixel_values`) to build the G2TR anchors."
            )
        if vae_pixel_values.dim() != 4 or vae_pixel_values.shape[:2] != (num_images, 3):
            raise ValueError(
                f"`vae_pixel_values` must have shape [{num_images}, 3, H, W] (one per image of `pixel_values`), "
                f"got {tuple(vae_pixel_values.shape)}."
            )

    # -- prefill embeddings --------------------------------------------------------------------------------------

    def apply_special_token_embeddings(self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Replace the word embedding of the 10 special tokens by their row of `special_token_embedding`.

        Upstream does this for prompt tokens only (generated tokens use plain `embed_tokens`); so does `forward`.
        """
        ids = torch.tensor(self.config.special_token_ids, device=input_ids.device)
        matches = input_ids[..., None] == ids  # [B, L, 10]
        slot = matches.long().argmax(dim=-1)
        # Through the module's call, not its `.weight`: an offloaded table is only loaded by its own hook.
        rows = self.special_token_embedding(slot).to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return torch.where(matches.any(dim=-1, keepdim=True), rows, inputs_embeds)

    def image_placeholder_mask(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: the `<IMG_CONTEXT>` slots of the prompt. A placeholder counts only inside an `<img> ...
        </img>` block (as the processor writes them); elsewhere it is an ordinary token."""
        config = self.config
        in_block = inside_blocks(token_ids, config.image_start_token_id, config.image_end_token_id)
        return (token_ids == config.image_token_id) & in_block

    def insert_image_features(
        self,
        inputs_embeds: torch.Tensor,
        placeholder_mask: torch.Tensor,
        image_features: torch.Tensor,
        reduction: list[ReductionResult] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scatter the visual tokens into the `<IMG_CONTEXT>` slots, in (row, position) order.

        With a reduction, every kept slot receives its merged token and the slots of dropped tokens are flagged.

        Args:
            inputs_embeds: [B, L, D]; placeholder_mask: [B, L] bool (`image_placeholder_mask`);
            image_features: [N, T, D] `mlp1` outputs; reduction: one plan per image, or None.
        Returns:
            (inputs_embeds [B, L, D], drop [B, L] bool or None).
        """
        placeholder = placeholder_mask.to(inputs_embeds.device)
        image_features = image_features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        num_images, tokens_per_image = image_features.shape[:2]
        num_placeholders = int(placeholder.sum())
        if num_placeholders != num_images * tokens_per_image:
            raise ValueError(
                f"The prompt holds {num_placeholders} `<IMG_CONTEXT>` slots but {num_images} image(s) give "
                f"{num_images * tokens_per_image} visual tokens ({tokens_per_image} per image, whatever `g2tr_ratio`:"
                " the model removes the dropped ones itself). Build the prompt with this model's processor, one "
                "`<img>` block per image."
            )
        if reduction is None:
            return inputs_embeds.masked_scatter(placeholder[..., None], image_features), None
        slots = image_features.clone()
        kept = torch.zeros(num_images, tokens_per_image, dtype=torch.bool, device=slots.device)
        for index, result in enumerate(reduction):
            keep = result.keep.to(slots.device)
            slots[index, keep] = result.tokens.to(device=slots.device, dtype=slots.dtype)
            kept[index, keep] = True
        embeds = inputs_embeds.masked_scatter(placeholder[..., None], slots)
        drop = torch.zeros_like(placeholder)
        drop[placeholder] = ~kept.flatten()
        return embeds, drop

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        vae_pixel_values: torch.FloatTensor | None = None,
        vae_pixel_sizes: torch.LongTensor | None = None,
        g2tr_ratio: float | None = None,
        decoding_step: bool = False,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> G2TRInternVLUModelOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): left-padded prompt ids with one
                `<img>` + 256 `<IMG_CONTEXT>` + `</img>` block per image (whatever the ratio), or the new tokens
                after a cache.
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, 448, 448)`, *optional*): ViT pixels.
            attention_mask (`torch.Tensor` of shape `(batch_size, length >= sequence_length)`, *optional*): the
                caller's 2-D mask (1 on tokens); its last `sequence_length` columns describe `input_ids`, the
                cached part is read from the cache's own layout (shorter under G2TR).
            position_ids (`torch.LongTensor`, *optional*): used as given when nothing is compacted (no reduction in
                this call and none in the cache); otherwise derived from the compact layout (and refused if given).
            past_key_values (`Cache`, *optional*): the KV cache, also accepted as `cache=` (transformers >= 5.24).
                It becomes a compact cache: K + 2 entries per image, the caller's length reported.
            inputs_embeds (`torch.FloatTensor`, *optional*): instead of `input_ids`: word embeddings
                (`get_input_embeddings()`); the image blocks and special tokens are recognised by their embedding,
                so image inputs work with them too.
            use_cache (`bool`, *optional*): as in transformers' causal LMs.
            vae_pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*): the images for the
                VAE, in [-1, 1] (processor output); needed when `g2tr_ratio < 1`.
            vae_pixel_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*): (height, width) of every
                image inside `vae_pixel_values`.
            g2tr_ratio (`float`, *optional*): keep ratio of this call; `config.g2tr_ratio` when None.
            decoding_step (`bool`, *optional*, defaults to `False`): the ids are tokens the model generated itself
                (`generate` sets it after the prompt): they take the plain word embedding (upstream applies
                `special_token_embedding` to prompt tokens only) and placeholders among them are ordinary text.
        """
        past_key_values = pop_cache_argument(past_key_values, kwargs)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        implementation = self.config.text_config._attn_implementation or "sdpa"
        if output_attentions and implementation != "eager":
            raise ValueError(
                "`output_attentions=True` needs the eager attention kernel: load the model with "
                f'`attn_implementation="eager"` (its language model uses {implementation!r}).'
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        token_ids = input_ids
        if token_ids is None:
            structure = (*self.config.special_token_ids, self.config.image_token_id)
            token_ids = ids_from_embeddings(inputs_embeds, self.get_input_embeddings(), structure)
        batch_size, length = token_ids.shape
        device = token_ids.device
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[1] < length):
            raise ValueError(
                "`attention_mask` must be a 2-D mask [batch_size, length >= sequence_length], got shape "
                f"{tuple(attention_mask.shape)} for {length} new tokens."
            )
        use_cache = use_cache if use_cache is not None else getattr(self.config.text_config, "use_cache", True)
        if getattr(self.language_model, "gradient_checkpointing", False) and self.training and use_cache:
            logger.warning_once("Gradient checkpointing recomputes layers, so no KV cache is kept: `use_cache=False`.")
            use_cache = False
        past_key_values, layout, new_mask = open_compact_cache(
            past_key_values, use_cache, self.config.get_text_config(), attention_mask, batch_size, length, device
        )

        # 1. Embeddings: special rows for prompt tokens, visual tokens (reduced) in the `<IMG_CONTEXT>` slots.
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = reduction = drop = None
        if not decoding_step:
            inputs_embeds = self.apply_special_token_embeddings(inputs_embeds, token_ids)
            placeholder = self.image_placeholder_mask(token_ids)
            if pixel_values is not None:
                ratio = self.config.resolve_g2tr_ratio(g2tr_ratio)
                vit_attention = None
                # VScan's scores only when some image loses a token (every image has image_grid_size^2 tokens).
                tokens = self.config.image_grid_size**2
                if method_needs_vit_attention(self.config.g2tr_method) and reduces_anything(
                    tokens, ratio, self.config.g2tr_min_keep
                ):
                    image_features, vit_attention = self.vscan_attention_scores(pixel_values)
                else:
                    image_features = self.get_image_features(pixel_values).pooler_output
                num_images, tokens_per_image = image_features.shape[:2]
                before_llm = acts_before_llm(self.config.g2tr_method)  # in-LLM-only methods drop in the decoder
                if before_llm and reduces_anything(tokens_per_image, ratio, self.config.g2tr_min_keep):
                    if not method_needs_anchors(self.config.g2tr_method):
                        pass  # no anchors, hence no VAE and no VAE inputs needed
                    elif self.config.g2tr_anchor_source == "vit_pixels":
                        vae_pixel_values, vae_pixel_sizes = vae_pixels_from_vit_pixels(pixel_values), None
                        self._check_vae_inputs(num_images, vae_pixel_values, ratio)
                    else:
                        self._check_vae_inputs(num_images, vae_pixel_values, ratio)
                    reduction = self.reduce_image_features(
                        image_features, vae_pixel_values, vae_pixel_sizes, ratio, vit_attention=vit_attention
                    )
                inputs_embeds, drop = self.insert_image_features(inputs_embeds, placeholder, image_features, reduction)
            elif bool(placeholder.any()):
                raise ValueError(
                    "The prompt holds `<img>` blocks of `<IMG_CONTEXT>` placeholders, so `pixel_values` is required."
                )
        elif pixel_values is not None:
            raise ValueError("`pixel_values` cannot be passed with `decoding_step=True` (generated tokens only).")

        # 2. Remove the slots of dropped visual tokens and left-pad the rows again; positions follow the cache.
        image_slots = placeholder if image_features is not None else torch.zeros_like(token_ids, dtype=torch.bool)
        image_slots, compacted = image_slots.to(device), None
        if drop is not None:
            index, filled = compaction_index(~drop)
            inputs_embeds = inputs_embeds.gather(1, index[..., None].expand(-1, -1, inputs_embeds.shape[-1]))
            new_mask = new_mask.gather(1, index) & filled
            image_slots, compacted = image_slots.gather(1, index) & filled, (index, filled)
        if position_ids is not None and (drop is not None or layout.dropped):
            raise ValueError(
                "`position_ids` cannot be used once visual tokens are removed: the model derives the positions of "
                "the compact sequence itself. Leave `position_ids` unset."
            )
        if position_ids is None:
            position_ids = positions_after(layout.next_position.to(device), new_mask)

        # In-LLM methods (FastV, PDrop, DART, ...) drop image tokens between decoder layers; a no-op otherwise.
        dropper = InLLMDropper.for_call(
            self.config, self.config.resolve_g2tr_ratio(g2tr_ratio), image_slots, new_mask, position_ids,
            past_mask=layout.attention_mask.to(device), cache=past_key_values,
            grids=None if image_features is None else [(self.config.image_grid_size,) * 2] * image_features.shape[0],
        )  # fmt: skip
        with dropper.attached(self.language_model.layers):
            outputs = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=torch.cat([layout.attention_mask.to(device), new_mask], dim=-1).long(),
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE_KWARG: past_key_values},
                **kwargs,
            )
        if dropper.active:
            kept = torch.ones_like(token_ids, dtype=torch.bool) if drop is None else ~drop
            new_mask, position_ids, kept = dropper.finish(
                past_key_values, new_mask, position_ids, kept.to(device), origin=compacted
            )
            drop = ~kept
        if past_key_values is not None:
            past_key_values.layout = layout.extended(new_mask, position_ids, dropped=length - new_mask.shape[1])
        output = G2TRInternVLUModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            reduced_attention_mask=new_mask.long(),
            kept_token_mask=torch.ones_like(token_ids, dtype=torch.bool) if drop is None else ~drop,
            image_reductions=reduction,
            **{CACHE_KWARG: output_cache(outputs) if use_cache else None},
        )
        return output if return_dict else output.to_tuple()



class G2TRInternVLUForConditionalGeneration(G2TRGenerationMixin, G2TRInternVLUPreTrainedModel, GenerationMixin):
    """InternVL-U understanding with G2TR: [`G2TRInternVLUModel`] (`model`) and the language-model head (`lm_head`).
    See the module docstring for the checkpoint layout and the reduction."""

    _image_input_names = ("pixel_values", "vae_pixel_values", "vae_pixel_sizes")

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: G2TRInternVLUConfig):
        super().__init__(config)
        self.model = G2TRInternVLUModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if self.generation_config is not None:
            # Text generation stops at the end of the turn or where an image would start (as upstream).
            self.generation_config.eos_token_id = [config.im_end_token_id, config.image_start_token_id]
            if self.generation_config.pad_token_id is None:
                self.generation_config.pad_token_id = config.text_config.pad_token_id
            # Text generation never emits an image placeholder: only the processor places them, with their pixels.
            self.generation_config.suppress_tokens = [config.image_token_id]
        self.post_init()
        drop_parallel_plans(self)

    # -- submodules, embeddings ----------------------------------------------------------------------------------

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def vision_model(self) -> InternViTModel:
        return self.model.vision_model

    @property
    def vae(self) -> nn.Module | None:
        return self.model.vae

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """See [`G2TRInternVLUModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, **kwargs)

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        vae_pixel_values: torch.FloatTensor | None = None,
        vae_pixel_sizes: torch.LongTensor | None = None,
        g2tr_ratio: float | None = None,
        decoding_step: bool = False,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> G2TRInternVLUCausalLMOutputWithPast | tuple:
        r"""
        The inputs of [`G2TRInternVLUModel.forward`], plus:

        Args:
            labels (`torch.LongTensor`, *optional*): next-token targets (-100 ignored) aligned with `input_ids`;
                compacted with the sequence, as are `shift_labels` (already shifted targets, as transformers' loss
                accepts).
            logits_to_keep (`int` or `torch.Tensor`, *optional*): as in transformers' causal LMs, over the compact
                sequence.
        """
        shift_labels = kwargs.pop("shift_labels", None)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            vae_pixel_values=vae_pixel_values,
            vae_pixel_sizes=vae_pixel_sizes,
            g2tr_ratio=g2tr_ratio,
            decoding_step=decoding_step,
            return_dict=True,
            **kwargs,
        )
        vocab_size = self.config.text_config.vocab_size
        logits, loss = self._logits_and_loss(outputs, logits_to_keep, labels, shift_labels, vocab_size, **kwargs)
        output = G2TRInternVLUCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            reduced_attention_mask=outputs.reduced_attention_mask,
            kept_token_mask=outputs.kept_token_mask,
            image_reductions=outputs.image_reductions,
            **{CACHE_KWARG: output_cache(outputs)},
        )
        return output if return_dict else output.to_tuple()

    # -- generation ----------------------------------------------------------------------------------------------

    def select_continuation_images(
        self, model_inputs: dict, full_input_ids: torch.Tensor, fed_input_ids: torch.Tensor
    ) -> dict:
        """A call that continues from a cache may pass every image of the conversation (as the processor returns
        them for the whole chat): keep the inputs of the images whose `<img>` blocks are in `fed_input_ids`."""
        pixel_values = model_inputs.get("pixel_values")
        if pixel_values is None:
            return model_inputs
        start = self.config.image_start_token_id
        total, new = (full_input_ids == start).sum(-1), (fed_input_ids == start).sum(-1)
        if pixel_values.shape[0] != int(total.sum()) or int(new.sum()) == int(total.sum()):
            # Only the new images were passed (or a mismatch, which the forward reports).
            return model_inputs
        if int(new.sum()) == 0:
            # Every image is already cached: the new part is text.
            return {key: value for key, value in model_inputs.items() if key not in self._image_input_names}
        order = continuation_image_index(total, new)
        for key in self._image_input_names:
            value = model_inputs.get(key)
            if value is not None:
                model_inputs[key] = value.index_select(0, order.to(value.device))
        return model_inputs


__all__ = [
    "CHECKPOINT_RENAMES",
    "vae_pixels_from_vit_pixels",
    "G2TRInternVLUModel",
    "G2TRInternVLUModelOutputWithPast",
    "G2TRInternVLUPreTrainedModel",
    "G2TRInternVLUForConditionalGeneration",
    "G2TRInternVLUCausalLMOutputWithPast",
    "InternViTModel",
    "pixel_shuffle",
]


# The official `vlm/` names (`InternVLUChatModel`) and where they live in ours. transformers applies them on load and
# reverses them on save, so saved folders keep the official names.
CHECKPOINT_RENAMES = (
    ("language_model.model", "model.language_model"),
    ("language_model.lm_head", "lm_head"),
    *((name, f"model.{name}") for name in ("vision_model", "mlp1", "special_token_embedding", "vae")),
)
register_checkpoint_renames(G2TRInternVLUConfig.model_type, CHECKPOINT_RENAMES)

G2TRInternVLUForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

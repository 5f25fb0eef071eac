"""PyTorch BAGEL-7B-MoT (ByteDance-Seed/BAGEL-7B-MoT) with G2TR visual token reduction.

The module tree reproduces the upstream `Bagel` module (ByteDance-Seed/Bagel, `modeling/bagel/*`) so that the
official `ema.safetensors` names stay the names on disk (see `CHECKPOINT_RENAMES` for the module tree):

    language_model.model.{embed_tokens, layers.N.*, norm, norm_moe_gen}, language_model.lm_head
    vit_model.vision_model.{embeddings, encoder.layers.N.*, post_layernorm}
    connector.{fc1, fc2}, vit_pos_embed.pos_embed, latent_pos_embed.pos_embed
    time_embedder.mlp.{0, 2}, vae2llm, llm2vae, vae (diffusers AutoencoderKL, converted keys)

(The names are derived from the upstream module definitions and two third-party loaders; unverified against the
real `ema.safetensors`: check on first load of the real checkpoint.)

The file reads bottom-up: Qwen2 pieces (RMSNorm, rotary, MLP), the Mixture-of-Transformers attention and decoder
layer (an "und" expert for text and ViT tokens, a "gen" expert for VAE tokens, one shared attention and cache), the
NaViT SigLIP, BAGEL's small heads (connector, sin-cos tables, time embedder), then the full model with the G2TR hook.

Prompt layout (the processor contract): text segments are `<|im_start|> ... <|im_end|>`, every image is
`<|vision_start|> + N x <|image_pad|> + <|vision_end|>` with N = h_v * w_v ViT patches. The whole prompt is prefilled
in ONE pass with a block-causal mask (causal text, bidirectional image blocks) and BAGEL's 1-D RoPE (+1 per text
token, one position for a whole image block), which equals upstream's segment-by-segment prefill. With
`g2tr_ratio < 1` each image block shrinks to K + 2 tokens before the decoder runs, so the KV cache holds K + 2 entries
per image while the caller keeps its full-length `input_ids` (the compact layout is remembered on the cache).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_torch_flex_attn_available, logging
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
from .configuration_bagel import G2TRBagelConfig
from .generation_g2tr import (
    G2TRGenerationMixin,
    as_compact_cache,
    cached_layout,
    compaction_index,
    continuation_image_index,
    ids_from_embeddings,
    inside_blocks,
    open_compact_cache,
    stored_length,
)
from .baselines import capture_layer_inputs, vit_received_attention, vscan_vit_layers
from .in_llm import InLLMDropper, acts_before_llm
from .reduction import (
    ReductionResult,
    anchor_encode_size,
    build_latent_anchors,
    method_needs_anchors,
    method_needs_vit_attention,
    reduce_tokens,
    resize_for_anchors,
)
from .saving_g2tr import G2TRSaveMixin


if is_diffusers_available():
    from diffusers import AutoencoderKL

_FLEX_ATTENTION_AVAILABLE = is_torch_flex_attn_available()
if _FLEX_ATTENTION_AVAILABLE:
    # Importing compiles nothing: flex kernels are compiled (on accelerators) at their first call.
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


logger = logging.get_logger(__name__)

# Packed image inputs: one row per patch (`pixel_values`, `image_position_ids`) or per image (the others). They are
# only needed while the prompt is prefilled.
_PATCH_INPUTS = ("pixel_values", "image_position_ids")
_IMAGE_INPUTS = ("image_grid_hw", "vae_pixel_values", "vae_image_hw")


# ----------------------------------------------------------------------------------------------------------------
# Qwen2 building blocks
# ----------------------------------------------------------------------------------------------------------------


class BagelRMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalised in fp32, scaled by a learned weight, returned in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class BagelRotaryEmbedding(nn.Module):
    """Standard 1-D rotate-half RoPE (theta 1e6 for BAGEL). `inv_freq` is a non-persistent buffer, as upstream."""

    inv_freq: torch.Tensor

    def __init__(self, config) -> None:
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope_parameters = getattr(config, "rope_parameters", None) or {}
        self.rope_theta = float(rope_parameters.get("rope_theta", getattr(config, "rope_theta", 1_000_000.0)))
        if rope_parameters.get("rope_type", "default") != "default":
            raise ValueError(f"Only the default RoPE is supported, got `rope_parameters`={rope_parameters}.")
        # Computed here (correct right after `__init__`, also under accelerate's `init_empty_weights`) and again by
        # `_init_weights` (transformers builds models on the meta device, where this value is lost).
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        return 1.0 / (self.rope_theta**exponents)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] -> (cos, sin), each [B, L, head_dim] in the dtype of `x`."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, L, D], k [B, Hk, L, D], cos/sin [B, L, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, L, D] -> [B, H_kv * n_rep, L, D] (GQA)."""
    batch, num_key_value_heads, length, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, num_key_value_heads, n_rep, length, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, length, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. `attention_mask` is boolean (True = attend) or additive, broadcastable to
    [B, H, Lq, Lk]. Returns ([B, Lq, H, D], weights [B, H, Lq, Lk])."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    key_states, value_states = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros_like(attention_mask, dtype=attn_weights.dtype).masked_fill(
                ~attention_mask, torch.finfo(attn_weights.dtype).min
            )
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _uses_flex_attention(config) -> bool:
    return getattr(config, "_attn_implementation", None) == "flex_attention"


def _unfused_flex_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: BlockMask,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`flex_attention` without `torch.compile` (the CPU path): exact, but it materialises the scores like eager
    attention does. Inside a compiled model it is traced and fused like any other call.
    Returns ([B, Lq, H, D], None)."""
    if dropout > 0:
        raise ValueError("`flex_attention` does not support attention dropout: use the model in eval mode.")
    output = flex_attention(
        query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return output.transpose(1, 2).contiguous(), None


def flex_block_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: BlockMask | torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel behind `attn_implementation="flex_attention"`: flex attention for a `BlockMask`, SDPA otherwise.

    The model hands over a `BlockMask` only where it has blocks to skip (a multi-token query under the block-causal
    mask). A single decoding query, a full-attention call (no mask) and the ViT's key-padding mask stay dense and run
    SDPA, whose kernels are as fast there and need no per-call block mask. On accelerators (or inside
    `torch.compile`) the `BlockMask` goes to transformers' compiled flex kernel; on the CPU flex runs unfused.

    Args:
        query: [B, H, Lq, D]; key, value: [B, H_kv, Lk, D] (Lk may exceed the mask's length: a static cache's
            unwritten tail, which is cut off).
        attention_mask: a `BlockMask` of shape [B, 1, Lq, Lk'], a dense boolean mask, or None.
    Returns:
        ([B, Lq, H, D], weights or log-sum-exp or None).
    """
    if not (_FLEX_ATTENTION_AVAILABLE and isinstance(attention_mask, BlockMask)):
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    key_length = attention_mask.seq_lengths[1]
    if key.shape[-2] > key_length:
        # A static cache hands back its whole preallocated buffer, written from the start.
        key, value = key[..., :key_length, :], value[..., :key_length, :]
    if query.device.type == "cpu" and not torch.compiler.is_compiling():
        kernel = _unfused_flex_attention
    else:
        kernel = ALL_ATTENTION_FUNCTIONS["flex_attention"]
    return kernel(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _attention_function(config) -> Callable:
    """The kernel named by `config._attn_implementation` (SDPA by default), with the eager one as fallback."""
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation == "eager":
        return eager_attention_forward
    if implementation == "flex_attention":
        return flex_block_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


class BagelMLP(nn.Module):
    """Qwen2 SwiGLU MLP."""

    def __init__(self, config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def route_experts(
    hidden_states: torch.Tensor,
    gen_token_mask: torch.Tensor | None,
    und_fn: Callable[[torch.Tensor], torch.Tensor],
    gen_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Apply `und_fn` to understanding tokens and `gen_fn` to generation tokens.

    Args:
        hidden_states: [B, L, D_in].
        gen_token_mask: [B, L] bool, True for tokens of the generation expert (VAE latents); None = all "und".
    Returns:
        [B, L, D_out], each token computed by its own expert only.
    """
    if gen_token_mask is None or not gen_token_mask.any():
        return und_fn(hidden_states)
    if gen_token_mask.all():
        return gen_fn(hidden_states)
    und_out = und_fn(hidden_states[~gen_token_mask])
    gen_out = gen_fn(hidden_states[gen_token_mask])
    output = und_out.new_empty(*hidden_states.shape[:-1], und_out.shape[-1])
    output[~gen_token_mask] = und_out
    output[gen_token_mask] = gen_out.to(und_out.dtype)
    return output


# ----------------------------------------------------------------------------------------------------------------
# Mixture-of-Transformers decoder
# ----------------------------------------------------------------------------------------------------------------


class BagelMoTAttention(nn.Module):
    """Qwen2 attention duplicated per expert (`*_moe_gen`), with per-head QK-norm before RoPE. Both experts write
    into one sequence, one softmax and one KV cache."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        # The mask is always built by the model (block-causal), never implied.
        self.is_causal = False

        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=True)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=False)
        self.q_proj_moe_gen = nn.Linear(config.hidden_size, q_dim, bias=True)
        self.k_proj_moe_gen = nn.Linear(config.hidden_size, kv_dim, bias=True)
        self.v_proj_moe_gen = nn.Linear(config.hidden_size, kv_dim, bias=True)
        self.o_proj_moe_gen = nn.Linear(q_dim, config.hidden_size, bias=False)
        qk_norm = getattr(config, "qk_norm", True)
        norm = (lambda: BagelRMSNorm(self.head_dim, eps=config.rms_norm_eps)) if qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.q_norm_moe_gen, self.k_norm_moe_gen = norm(), norm()

    def _project(self, proj: nn.Linear, norm: nn.Module, upcast: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """Projection followed by the per-head norm: [..., hidden] -> [..., heads * head_dim] (fp32 if `upcast`)."""

        def fn(x: torch.Tensor) -> torch.Tensor:
            states = proj(x)
            states = states.view(*states.shape[:-1], -1, self.head_dim)
            return norm(states.float() if upcast else states).flatten(-2)

        return fn

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        gen_token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [B, L, D]; attention_mask [B, 1, L, P+L] bool, a flex `BlockMask` of that shape, or None.
        Returns ([B, L, D], weights).

        A `gen_token_mask` selects upstream's "gen" mode, whose q/k norms and RoPE run in fp32 for every token
        (as upstream); without it ("und" mode) they run in the input dtype.
        """
        batch, length, _ = hidden_states.shape
        gen_mode = gen_token_mask is not None
        query = route_experts(
            hidden_states,
            gen_token_mask,
            self._project(self.q_proj, self.q_norm, gen_mode),
            self._project(self.q_proj_moe_gen, self.q_norm_moe_gen, gen_mode),
        )
        key = route_experts(
            hidden_states,
            gen_token_mask,
            self._project(self.k_proj, self.k_norm, gen_mode),
            self._project(self.k_proj_moe_gen, self.k_norm_moe_gen, gen_mode),
        )
        value = route_experts(hidden_states, gen_token_mask, self.v_proj, self.v_proj_moe_gen)
        query = query.view(batch, length, -1, self.head_dim).transpose(1, 2)
        key = key.view(batch, length, -1, self.head_dim).transpose(1, 2)
        value = value.view(batch, length, -1, self.head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        query, key = query.to(value.dtype), key.to(value.dtype)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
            dense_mask = isinstance(attention_mask, torch.Tensor)
            if dense_mask and attention_mask.shape[-1] < key.shape[-2]:
                # A static cache hands back its whole preallocated buffer; the unwritten tail is never visible.
                attention_mask = F.pad(attention_mask, (0, key.shape[-2] - attention_mask.shape[-1]), value=False)

        attn_output, attn_weights = _attention_function(self.config)(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, length, -1).contiguous()
        attn_output = route_experts(attn_output, gen_token_mask, self.o_proj, self.o_proj_moe_gen)
        return attn_output, attn_weights


class BagelMoTDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm Qwen2 block with every weight duplicated for the generation expert (upstream
    `Qwen2MoTDecoderLayer`)."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BagelMoTAttention(config, layer_idx)
        self.mlp = BagelMLP(config)
        self.mlp_moe_gen = BagelMLP(config)
        self.input_layernorm = BagelRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_layernorm_moe_gen = BagelRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BagelRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = BagelRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        gen_token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (hidden_states [B, L, D], attention weights [B, H, L, P+L] or None (fused kernels))."""
        residual = hidden_states
        hidden_states = route_experts(
            hidden_states, gen_token_mask, self.input_layernorm, self.input_layernorm_moe_gen
        )
        hidden_states, attn_weights = self.self_attn(
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            gen_token_mask=gen_token_mask,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states

        def und_mlp(x: torch.Tensor) -> torch.Tensor:
            return self.mlp(self.post_attention_layernorm(x))

        def gen_mlp(x: torch.Tensor) -> torch.Tensor:
            return self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(x))

        hidden_states = route_experts(hidden_states, gen_token_mask, und_mlp, gen_mlp)
        return residual + hidden_states, attn_weights


class BagelTextModel(nn.Module):
    """The MoT Qwen2 decoder (`language_model.model`). It takes prepared embeddings, RoPE positions and a boolean
    4-D mask; the full model builds them."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [BagelMoTDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = BagelRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = BagelRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = BagelRotaryEmbedding(config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        gen_token_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """
        Args:
            inputs_embeds: [B, L, D].
            position_ids: [B, L] 1-D RoPE positions.
            attention_mask: [B, 1, L, P+L] boolean (True = attend), or None (every key visible).
            past_key_values: a transformers `Cache` that receives the L new entries per layer.
            gen_token_mask: [B, L] bool, True where the generation expert (`*_moe_gen`) processes the token.
            output_attentions: also return every layer's attention weights (needs the eager kernel).
        Returns:
            `BaseModelOutputWithPast` with `last_hidden_state` [B, L, D] after the expert's final norm.
        """
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for decoder_layer in self.layers:
            hidden_states, attn_weights = decoder_layer(
                hidden_states,
                position_embeddings,
                attention_mask,
                past_key_values,
                gen_token_mask,
                **kwargs,
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = route_experts(hidden_states, gen_token_mask, self.norm, self.norm_moe_gen)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


# ----------------------------------------------------------------------------------------------------------------
# NaViT SigLIP
# ----------------------------------------------------------------------------------------------------------------


class BagelSiglipVisionEmbeddings(nn.Module):
    """Linear patch embedding over pre-flattened (row, col, channel) patches plus a learned position table indexed
    by `row * side + col` (never interpolated: smaller images use its top-left sub-grid)."""

    def __init__(self, config, max_num_patch_per_side: int) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)
        self.position_embedding = nn.Embedding(max_num_patch_per_side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """pixel_values [P, 3*p*p], position_ids [P] -> [P, D]."""
        # Only the dtype is set here: an offloaded layer's hook moves the inputs to its device. The patch embedding may
        # compute in fp32 while the ViT runs in fp16 (`_keep_in_fp32_modules`), so its output joins the ViT's dtype.
        embeddings = self.patch_embedding(pixel_values.to(dtype=compute_dtype(self.patch_embedding)))
        positions = self.position_embedding(position_ids)
        return embeddings.to(positions.dtype) + positions


class BagelSiglipAttention(nn.Module):
    """Non-causal multi-head attention with biases (SigLIP)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [I, N, D]; attention_mask [I, 1, 1, N] bool key mask or None."""
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        attn_output, _ = _attention_function(self.config)(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.out_proj(attn_output.reshape(batch, length, -1).contiguous())


class BagelSiglipMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        # `fc2` is never quantized, so in a model loaded in fp16 it computes in fp32 (`_keep_in_fp32_modules`).
        return self.fc2(hidden_states.to(dtype=compute_dtype(self.fc2))).to(hidden_states.dtype)


class BagelSiglipEncoderLayer(nn.Module):
    """Pre-LN SigLIP block: x += attn(LN1(x)); x += mlp(LN2(x))."""

    def __init__(self, config) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = BagelSiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = BagelSiglipMLP(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class BagelSiglipEncoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.layers = nn.ModuleList([BagelSiglipEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states


class BagelSiglipVisionTransformer(nn.Module):
    def __init__(self, config, max_num_patch_per_side: int) -> None:
        super().__init__()
        self.embeddings = BagelSiglipVisionEmbeddings(config, max_num_patch_per_side)
        self.encoder = BagelSiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pixel_values: [P, 3*p*p] patches of all images, packed image after image.
            position_ids: [P] flattened 2-D ids `row * side + col`.
            seq_lens: [I] patches per image (sum P).
        Returns:
            [P, D]: each image attended only to itself (upstream: flash-attn varlen over `cu_seqlens`).
        """
        embeddings = self.embeddings(pixel_values, position_ids)
        padded, valid = pad_packed_sequences(embeddings, seq_lens)
        # A key-padding mask only when the images differ in size: padded keys are hidden, padded queries are
        # discarded below, so every image sees exactly its own tokens.
        attention_mask = None if bool(valid.all()) else valid[:, None, None, :]
        hidden_states = self.encoder(padded, attention_mask)
        return self.post_layernorm(hidden_states[valid])


class BagelSiglipVisionModel(nn.Module):
    """`vit_model`: SigLIP-so400m/14 NaViT (26 layers, no pooling head)."""

    def __init__(self, config, max_num_patch_per_side: int) -> None:
        super().__init__()
        self.vision_model = BagelSiglipVisionTransformer(config, max_num_patch_per_side)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values, position_ids, seq_lens)


def pad_packed_sequences(packed: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[sum(seq_lens), D] -> (padded [I, max_len, D], valid [I, max_len] bool), right padded with zeros."""
    num_sequences = seq_lens.shape[0]
    seq_lens = seq_lens.to(packed.device)
    max_len = int(seq_lens.max())
    valid = torch.arange(max_len, device=packed.device)[None, :] < seq_lens[:, None]
    padded = packed.new_zeros(num_sequences, max_len, packed.shape[-1])
    padded[valid] = packed
    return padded, valid


# ----------------------------------------------------------------------------------------------------------------
# BAGEL heads: connector, fixed 2-D sin-cos tables, timestep embedder
# ----------------------------------------------------------------------------------------------------------------


class BagelMLPConnector(nn.Module):
    """ViT width -> LLM width: fc1, activation (gelu tanh), fc2."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, hidden_act: str) -> None:
        super().__init__()
        self.activation_fn = ACT2FN[hidden_act]
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[n] float64 -> [n, dim]: sin then cos of positions * omega_k, omega_k = 1 / 10000^(k / (dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    angles = positions[:, None] * (1.0 / 10000**omega)[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_table(dim: int, side: int) -> torch.Tensor:
    """The DiT/MAE 2-D sin-cos table, [side * side, dim] float32; row `r * side + c` holds the column code of `c` in
    its first dim/2 values and the row code of `r` in the last dim/2."""
    coords = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return table.float()


class BagelPositionEmbedding(nn.Module):
    """Lookup into a fixed 2-D sin-cos table. Upstream stores the table as a frozen parameter, so it is part of the
    checkpoint (`vit_pos_embed.pos_embed`, `latent_pos_embed.pos_embed`); `_init_weights` recomputes it when
    missing."""

    def __init__(self, max_num_patch_per_side: int, hidden_size: int) -> None:
        super().__init__()
        self.max_num_patch_per_side = max_num_patch_per_side
        self.hidden_size = hidden_size
        self.pos_embed = nn.Parameter(torch.empty(max_num_patch_per_side**2, hidden_size), requires_grad=False)

    def compute_table(self) -> torch.Tensor:
        return sincos_2d_table(self.hidden_size, self.max_num_patch_per_side)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids [n] -> [n, D]."""
        return self.pos_embed[position_ids.to(self.pos_embed.device)]


class BagelTimestepEmbedder(nn.Module):
    """Flow-matching time t in [0, 1] (no x1000 scaling) -> [cos | sin] 256-d code in fp32 -> Linear, SiLU,
    Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def timestep_embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """[n] -> [n, 256] float32, cos first."""
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
        )
        angles = timesteps[:, None].float() * freqs[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        embedding = self.timestep_embedding(timesteps).to(dtype=compute_dtype(self.mlp[0]))
        return self.mlp(embedding)


def patchify_latents(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[C, H, W] -> [(H/p) * (W/p), p*p*C], row-major patches, features in (p_row, p_col, channel) order."""
    channels, height, width = latents.shape
    patches = latents.reshape(channels, height // patch_size, patch_size, width // patch_size, patch_size)
    return patches.permute(1, 3, 2, 4, 0).reshape(-1, patch_size * patch_size * channels)


def unpatchify_latents(latent_tokens: torch.Tensor, grid_hw: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Inverse of `patchify_latents`: [h * w, p*p*C] -> [C, h*p, w*p] (upstream `decode_image`'s rearrangement)."""
    height, width = grid_hw
    channels = latent_tokens.shape[-1] // (patch_size * patch_size)
    patches = latent_tokens.reshape(height, width, patch_size, patch_size, channels)
    return patches.permute(4, 0, 2, 1, 3).reshape(channels, height * patch_size, width * patch_size)


def latent_position_ids(height: int, width: int, max_latent_size: int, device=None) -> torch.Tensor:
    """[h * w] flattened 2-D ids `row * max_latent_size + col` of an h x w latent token grid (the top-left sub-grid of
    `latent_pos_embed`, never interpolated)."""
    rows = torch.arange(height, dtype=torch.long, device=device)[:, None]
    cols = torch.arange(width, dtype=torch.long, device=device)[None, :]
    return (rows * max_latent_size + cols).flatten()


# ----------------------------------------------------------------------------------------------------------------
# Sequence layout: RoPE positions, block ids, the compact cache layout
# ----------------------------------------------------------------------------------------------------------------


class BagelCachePrefix:
    """The first `length` entries of a KV cache, read-only: the context a denoising query attends to.

    Upstream runs every denoising step with `update_past_key_values=False`: the noisy latents never enter a cache.
    Passed to the decoder as its `past_key_values`, this view's `update` returns the cached prefix followed by the new
    keys and values (the concatenation a cache update makes, and what upstream's merged buffer holds) and stores
    nothing, so the cache is neither grown nor copied by a denoising step. Being a prefix, it also lets the text-free
    CFG context (upstream: a deep copy of the conditional context taken before the instruction) share the conditional
    cache instead of copying it.

    Args:
        past_key_values: a `DynamicCache` (its layers hold keys and values [N, H_kv, P, D]).
        length: how many leading entries are visible; None = all of them.
        rows: LongTensor [B], the cache row each query row reads (a batched denoising step reads several CFG
            branches of one request from the same row); None = the cache's rows as they are.
    """

    def __init__(self, past_key_values: Cache, length: int | None = None, rows: torch.Tensor | None = None) -> None:
        total = stored_length(past_key_values)
        length = total if length is None else length
        if not 0 <= length <= total:
            raise ValueError(f"`context_length` must lie in [0, {total}] (the cache length), got {length}.")
        self.past_key_values = past_key_values
        self.length = length
        self.rows = rows

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H_kv, length + L, D] of the prefix and the L new tokens; nothing is stored."""
        if self.length == 0:
            return key_states, value_states
        layer = self.past_key_values.layers[layer_idx]
        keys, values = layer.keys[..., : self.length, :], layer.values[..., : self.length, :]
        if self.rows is not None:
            rows = self.rows.to(keys.device)
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        keys = torch.cat([keys.to(key_states.device), key_states], dim=-2)
        values = torch.cat([values.to(value_states.device), value_states], dim=-2)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def image_block_structure(
    input_ids: torch.Tensor, vision_start_token_id: int, vision_end_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the image blocks are.

    Args:
        input_ids: [B, L].
    Returns:
        block_ids [B, L] long: 0 for text, and for every token of an image block (both markers included) the
            1-based index of that image in row-major order over the batch (a unique id per block);
        advances [B, L] bool: tokens that move the RoPE position forward (text tokens and `<|vision_start|>`;
            the rest of an image block shares the position of its start marker).
    """
    is_start = input_ids == vision_start_token_id
    in_block = inside_blocks(input_ids, vision_start_token_id, vision_end_token_id)
    image_index = is_start.flatten().long().cumsum(0).view_as(input_ids)
    block_ids = torch.where(in_block, image_index, torch.zeros_like(image_index))
    advances = ~in_block | is_start
    return block_ids, advances


def rope_positions(advances: torch.Tensor, valid: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """1-D RoPE positions: +1 per advancing real token, starting at `start` [B]; padding gets position 0."""
    steps = (advances & valid).long()
    positions = start[:, None] + steps.cumsum(-1) - 1
    positions = torch.maximum(positions, start[:, None])
    return positions.masked_fill(~valid, 0)


def index_to_mask(indices: torch.Tensor, size: int) -> torch.Tensor:
    """LongTensor [k] -> BoolTensor [size], True at `indices`."""
    mask = torch.zeros(size, dtype=torch.bool, device=indices.device)
    mask[indices] = True
    return mask


def block_causal_mask(
    past_mask: torch.Tensor | None, new_mask: torch.Tensor, block_ids: torch.Tensor
) -> torch.Tensor:
    """Boolean attention mask [B, 1, L, P+L] (True = attend) for L new tokens after P cached ones.

    Every real cached entry is visible (bottom-right alignment of the causal mask against a cache). Among the new
    tokens, query i sees key j when j <= i (causal text) or when both are in the same image block (bidirectional
    block, as upstream's `is_causal=False` image prefill). A token always sees itself, so padded query rows stay
    finite.
    """
    length = new_mask.shape[1]
    positions = torch.arange(length, device=new_mask.device)
    causal = positions[None, :, None] >= positions[None, None, :]
    same_block = (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] > 0)
    new_keys = (causal | same_block) & new_mask[:, None, :]
    new_keys = new_keys | torch.eye(length, dtype=torch.bool, device=new_mask.device)[None]
    if past_mask is not None and past_mask.shape[1] > 0:
        past_keys = past_mask[:, None, :].expand(-1, length, -1)
        new_keys = torch.cat([past_keys, new_keys], dim=-1)
    return new_keys[:, None]


def block_causal_block_mask(
    past_mask: torch.Tensor | None, new_mask: torch.Tensor, block_ids: torch.Tensor, block_size: int = 128
) -> BlockMask:
    """The mask of `block_causal_mask` as a flex-attention `BlockMask` [B, 1, L, P+L], for the same inputs.

    Keys are indexed over the stored layout (the P cached entries, compact under G2TR, then the L new tokens). Key
    `kv` is visible to new query `q` (its own key slot is P + q) when it is that slot, or when it is a real entry
    (`past_mask` / `new_mask`) and either precedes the slot (causal text, every cached entry) or lies in the query's
    image block (bidirectional). Tiles of `block_size` x `block_size` that are entirely hidden (the upper triangle
    outside images, left padding) are skipped by the kernel.

    Args:
        past_mask: [B, P] bool, the cache's real entries, or None (no cache).
        new_mask: [B, L] bool, the real new tokens.
        block_ids: [B, L] long, 0 for text, a unique positive id per image block.
        block_size: tile side of the block mask (the kernel's default is 128).
    """
    batch, length = new_mask.shape
    device = new_mask.device
    past_length = 0 if past_mask is None else past_mask.shape[1]
    key_visible, key_block = new_mask, block_ids
    if past_length:
        key_visible = torch.cat([past_mask.to(device), new_mask], dim=1)
        key_block = torch.cat([block_ids.new_zeros(batch, past_length), block_ids], dim=1)

    def mask_mod(batch_idx, head_idx, q_idx, kv_idx):
        query_slot = q_idx + past_length
        query_block = block_ids[batch_idx, q_idx]
        same_block = (key_block[batch_idx, kv_idx] == query_block) & (query_block > 0)
        earlier_or_same_block = (kv_idx <= query_slot) | same_block
        return (kv_idx == query_slot) | (key_visible[batch_idx, kv_idx] & earlier_or_same_block)

    return create_block_mask(
        mask_mod, batch, None, length, past_length + length, device=device, BLOCK_SIZE=block_size
    )


def decoder_attention_mask(
    config, past_mask: torch.Tensor | None, new_mask: torch.Tensor, block_ids: torch.Tensor
) -> torch.Tensor | BlockMask:
    """The decoder's block-causal mask in the form its attention kernel takes: a flex `BlockMask` under
    `attn_implementation="flex_attention"` when more than one token is queried, the dense boolean
    `block_causal_mask` [B, 1, L, P+L] otherwise (SDPA, eager, and single-token decoding under flex, where a
    per-step block mask would cost more than the key-padding mask it replaces)."""
    if _uses_flex_attention(config) and new_mask.shape[1] > 1:
        return block_causal_block_mask(past_mask, new_mask, block_ids)
    return block_causal_mask(past_mask, new_mask, block_ids)


# ----------------------------------------------------------------------------------------------------------------
# Outputs and the pretrained base
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class G2TRBagelCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    Output of [`G2TRBagelForConditionalGeneration`]: transformers' `CausalLMOutputWithPast` (`loss`, `logits`, the KV
    cache under the installed release's name, `hidden_states`, `attentions`) plus the reduction's bookkeeping, under
    the same names as InternVL-U's outputs. With G2TR the sequence the decoder ran on (and so the logits) is the
    COMPACT one: dropped image slots are removed and the rows re-left-padded.

    Args:
        reduced_attention_mask (`torch.LongTensor` of shape `(batch_size, compact_length)`): which compact slots are
            real tokens (the caller's mask with the dropped slots removed). Also readable as `attention_mask`.
        kept_token_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): which of the caller's tokens
            entered the decoder (False for the slots of dropped image tokens).
        image_reductions (`list[ReductionResult]`, *optional*): the G2TR plan of every image, in image order (None
            when nothing was reduced).
    """

    reduced_attention_mask: torch.LongTensor | None = None
    kept_token_mask: torch.BoolTensor | None = None
    image_reductions: list[ReductionResult] | None = None

    @property
    def attention_mask(self) -> torch.LongTensor | None:
        """Former name of `reduced_attention_mask`."""
        return self.reduced_attention_mask


@dataclass
class G2TRBagelModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    Output of [`G2TRBagelModel`]: transformers' `BaseModelOutputWithPast` (`last_hidden_state` over the COMPACT
    sequence, the KV cache under the installed release's name, `hidden_states`, `attentions`) plus the reduction's
    bookkeeping, as in [`G2TRBagelCausalLMOutputWithPast`].
    """

    reduced_attention_mask: torch.LongTensor | None = None
    kept_token_mask: torch.BoolTensor | None = None
    image_reductions: list[ReductionResult] | None = None


# Module names that quantization must leave alone (`_keep_in_fp32_modules`), under both roots: the head model, where the
# backbone is `model.` (what the Auto classes load), and the backbone loaded on its own. A name matches itself and
# everything inside it; `*` stands for any layer index.
_UNQUANTIZED_BACKBONE_MODULES = (
    "vae", "vae2llm", "llm2vae", "time_embedder", "vit_model.vision_model.embeddings.patch_embedding",
    "vit_model.vision_model.encoder.layers.*.mlp.fc2",
)  # fmt: skip
NOT_QUANTIZED = ["lm_head", *_UNQUANTIZED_BACKBONE_MODULES, *(f"model.{m}" for m in _UNQUANTIZED_BACKBONE_MODULES)]


class G2TRBagelPreTrainedModel(G2TRSaveMixin, PreTrainedModel):
    config: G2TRBagelConfig
    config_class = G2TRBagelConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["BagelMoTDecoderLayer", "BagelSiglipEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # Never quantized (every transformers quantizer adds this list to the user's own `modules_to_not_convert` /
    # `llm_int8_skip_modules`): the VAE, whose latents are the G2TR anchors and the generated image; the latent maps
    # `vae2llm` / `llm2vae` and the timestep embedder on either side of it; the ViT patch embedding and the ViT MLPs'
    # `fc2` (588 and 4304 inputs: no multiple of the int4 group sizes); `lm_head`. Loaded in fp16 they stay fp32
    # (their outputs are cast back); bf16 and fp32 loads keep the requested dtype. See docs/quantization.md.
    _keep_in_fp32_modules = NOT_QUANTIZED
    _supports_sdpa = True
    # Image blocks need a bidirectional span inside a causal mask, which a 2-D flash-attn padding mask cannot say.
    _supports_flash_attn = False
    # Flex attention takes the block-causal mask as a `BlockMask` (see `decoder_attention_mask`).
    _supports_flex_attn = True
    _supports_attention_backend = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, BagelRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, BagelPositionEmbedding):
            init.copy_(module.pos_embed, module.compute_table())


# ----------------------------------------------------------------------------------------------------------------
# The full model
# ----------------------------------------------------------------------------------------------------------------


class G2TRBagelModel(G2TRBagelPreTrainedModel):
    r"""
    The BAGEL-7B-MoT backbone with G2TR, without the language-model head: the Mixture-of-Transformers decoder
    (`language_model`), the NaViT SigLIP (`vit_model`) and `connector`, the sin-cos tables, and the generation-side
    modules (`vae`, `time_embedder`, `vae2llm`, `llm2vae`, `latent_pos_embed`). Its forward embeds the prompt, reduces
    the ViT tokens of every image to `K = keep_count(N, g2tr_ratio, g2tr_min_keep)` by agreement with the model's own
    VAE latent, and returns the decoder's hidden states over the compact sequence.

    The official checkpoint's names are kept on disk: transformers renames them on load and back on save
    (`CHECKPOINT_RENAMES`).
    """

    def __init__(self, config: G2TRBagelConfig) -> None:
        super().__init__(config)
        llm_config, vit_config = config.llm_config, config.vit_config
        hidden_size = llm_config.hidden_size
        self.language_model = BagelTextModel(llm_config)

        if config.visual_und:
            self.vit_model = BagelSiglipVisionModel(vit_config, config.vit_max_num_patch_per_side)
            self.connector = BagelMLPConnector(vit_config.hidden_size, hidden_size, hidden_size, config.connector_act)
            self.vit_pos_embed = BagelPositionEmbedding(config.vit_max_num_patch_per_side, hidden_size)

        if config.visual_gen:
            latent_channels = config.vae_config["latent_channels"]
            patch_latent_dim = config.latent_patch_size**2 * latent_channels
            self.time_embedder = BagelTimestepEmbedder(hidden_size)
            self.vae2llm = nn.Linear(patch_latent_dim, hidden_size)
            self.llm2vae = nn.Linear(hidden_size, patch_latent_dim)
            self.latent_pos_embed = BagelPositionEmbedding(config.max_latent_size, hidden_size)
            if is_diffusers_available():
                self.vae = AutoencoderKL(**config.vae_config)
            else:
                self.vae = None
                logger.warning(
                    "diffusers is not installed: the VAE is not built, so G2TR reduction (g2tr_ratio < 1) and image "
                    "generation are unavailable. Install it with `pip install diffusers`."
                )

        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    # --- VAE ---------------------------------------------------------------------------------------------------

    @property
    def vae_downsample(self) -> int:
        """Pixels per latent cell along a side (8 for the FLUX AE)."""
        return 2 ** (len(self.config.vae_config["block_out_channels"]) - 1)

    # Kept out of `torch.compile` graphs: traced through AOT autograd, diffusers' VAE attention block hands a strided
    # tensor to GroupNorm, which the traced kernel refuses; the encode runs once per prompt, so eager costs little.
    @torch.compiler.disable
    def encode_vae_latents(
        self, vae_pixel_values: torch.Tensor, vae_image_hw: torch.Tensor, sample: bool = False
    ) -> list[torch.Tensor]:
        """Encode images with `self.vae` and return each image's scaled latent, cropped to its own size.

        Images of the same size are encoded together; different sizes are encoded separately, on their own
        unpadded pixels, because padding would change the VAE's GroupNorm statistics (so a batched request gives
        the same latents as single ones).

        Args:
            vae_pixel_values: [I, 3, H_max, W_max] in [-1, 1], each image zero-padded at the bottom/right.
            vae_image_hw: [I, 2] each image's own (H, W).
            sample: draw from the posterior (upstream) instead of taking its mean (deterministic, the default).
        Returns:
            I tensors [C, H/8, W/8] equal to `scaling_factor * (z - shift_factor)`.
        """
        if getattr(self, "vae", None) is None:
            raise ValueError("This model has no VAE (`config.visual_gen=False` or diffusers missing).")
        self._check_vae_inputs(vae_pixel_values, vae_image_hw)
        vae_config = self.config.vae_config
        scale, shift = vae_config.get("scaling_factor", 1.0), vae_config.get("shift_factor", 0.0) or 0.0
        sizes = [tuple(hw) for hw in vae_image_hw.tolist()]
        latents: list[torch.Tensor | None] = [None] * len(sizes)
        for size in dict.fromkeys(sizes):
            members = [i for i, other in enumerate(sizes) if other == size]
            # Contiguous: the crop of a padded batch is a strided view, which compiled convolutions refuse.
            pixels = vae_pixel_values[members, :, : size[0], : size[1]].contiguous()
            posterior = self.vae.encode(pixels.to(device=execution_device(self.vae), dtype=self.vae.dtype)).latent_dist
            encoded = posterior.sample() if sample else posterior.mean
            encoded = (encoded - shift) * scale
            for slot, image_index in enumerate(members):
                latents[image_index] = encoded[slot]
        return latents

    def embed_latent_tokens(
        self, latent_tokens: torch.Tensor, timesteps: torch.Tensor, latent_position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Generation-expert input embeddings: `vae2llm(x) + time_embedder(t) + latent_pos_embed(ids)`.

        Args:
            latent_tokens: [n, p*p*C] patchified latents (see `patchify_latents`).
            timesteps: [n] (or [1], broadcast) flow time in [0, 1]; 0 for a clean context image.
            latent_position_ids: [n] flattened 2-D ids `row * max_latent_size + col`.
        Returns:
            [n, hidden_size].

        The timestep code is computed in fp32, as upstream's `TimestepEmbedder` does (checked against upstream on
        the context prefill and the denoising path, fp32 differences below 1e-5).
        """
        projected = self.vae2llm(latent_tokens.to(dtype=compute_dtype(self.vae2llm)))
        return projected + self.time_embedder(timesteps.reshape(-1)) + self.latent_pos_embed(latent_position_ids)

    # --- understanding-side features and the G2TR hook ------------------------------------------------------------

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_position_ids: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """SigLIP on all patches, then the connector, BEFORE `vit_pos_embed` (the tensor G2TR scores and merges).

        Args:
            pixel_values: [P, 3*14*14] packed patches of all images (processor output).
            image_position_ids: [P] flattened 2-D patch ids; image_grid_hw: [I, 2] (both processor outputs).
        Returns:
            `BaseModelOutputWithPooling` with `last_hidden_state` [P, vit_hidden] (SigLIP) and `pooler_output`
            [P, hidden_size] (the connector's output, the image features the LLM receives), as transformers' VLMs.
        """
        if image_position_ids is None or image_grid_hw is None:
            raise ValueError("`get_image_features` needs `image_position_ids` and `image_grid_hw` (processor outputs).")
        vit_features = self.vit_model(pixel_values, image_position_ids, image_grid_hw.prod(-1))
        return BaseModelOutputWithPooling(last_hidden_state=vit_features, pooler_output=self.connector(vit_features))

    def reduce_image_features(
        self,
        features: torch.Tensor,
        image_grid_hw: torch.Tensor,
        vae_pixel_values: torch.Tensor | None,
        vae_image_hw: torch.Tensor | None,
        ratio: float,
        latents: list[torch.Tensor] | None = None,
        vit_attention: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[ReductionResult]]:
        """G2TR on every image: anchors from the VAE posterior mean (patchify 2 x 2, pool `g2tr_latent_pool`,
        `vae2llm`; no position or time embedding), then `reduce_tokens` per image.

        Args:
            features: [P, D] connector outputs of all images, packed.
            latents: the images' scaled latents [C, H/8, W/8] when they are already encoded (editing reuses the
                latents of the VAE context block instead of encoding again); otherwise `vae_pixel_values` and
                `vae_image_hw` are encoded here.
            vit_attention: one [2, N_i] tensor per image, the ViT attention scores of a method that reads them
                (`vscan_attention_scores`).
        Returns:
            merged tokens [sum K, D], kept packed indices [sum K] (ascending within each image), and the plans.
        """
        config = self.config
        pool = config.g2tr_latent_pool
        if not method_needs_anchors(config.g2tr_method):
            latents = [None] * image_grid_hw.shape[0]  # an anchor-free method (random, pool, ...): no VAE encode
        elif latents is None:
            latents, pool = self.encode_anchor_latents(vae_pixel_values, vae_image_hw)
        if len(latents) != image_grid_hw.shape[0]:
            raise ValueError(
                f"`latents` must hold one latent per image ({image_grid_hw.shape[0]}), got {len(latents)}."
            )
        grids = [tuple(hw) for hw in image_grid_hw.tolist()]
        per_image = features.split([h * w for h, w in grids])
        vit_attention = vit_attention if vit_attention is not None else [None] * len(grids)
        results, kept, offset = [], [], 0
        for image_features, grid, latent, image_attention in zip(per_image, grids, latents, vit_attention):
            anchors, anchor_grid = None, None
            if latent is not None:
                anchors, anchor_grid = build_latent_anchors(
                    latent,
                    patch_size=config.latent_patch_size,
                    pool=pool,
                    project=self._project_latent_anchors,
                )
                anchors = anchors.to(image_features.dtype)
            result = reduce_tokens(
                image_features,
                grid,
                anchors,
                anchor_grid,
                ratio=ratio,
                vit_attention=image_attention,
                **config.g2tr_reduction_kwargs(),
            )
            results.append(result)
            kept.append(result.keep + offset)
            offset += image_features.shape[0]
        tokens = torch.cat([result.tokens for result in results])
        return tokens, torch.cat(kept), results

    def vscan_attention_scores(
        self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor, image_grid_hw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The image features (`get_image_features(...).pooler_output`) and, from the same ViT pass, VScan's two
        scores of every patch: the attention it receives in the last SigLIP layer (global scan) and in layer
        round(5/24 * depth) (local scan), averaged over heads and over the image's query patches (SigLIP has no
        [CLS] token). The layers' inputs are captured while the ViT runs and their q/k recomputed by hand, so the
        ViT keeps its attention kernel.

        Returns:
            features [P, hidden_size], and one [2, N_i] fp32 tensor per image.
        """
        layers = self.vit_model.vision_model.encoder.layers
        scanned = vscan_vit_layers(len(layers))
        with capture_layer_inputs({index: layers[index] for index in scanned}) as captured:
            features = self.get_image_features(pixel_values, image_position_ids, image_grid_hw).pooler_output
        lengths = image_grid_hw.prod(-1).tolist()
        with torch.no_grad():
            per_layer = [self._siglip_received_attention(layers[index], captured[index], lengths) for index in scanned]
        return features, [torch.stack(scores).to(features.device) for scores in zip(*per_layer)]

    @staticmethod
    def _siglip_received_attention(
        layer: nn.Module, hidden: torch.Tensor, lengths: list[int]
    ) -> list[torch.Tensor]:
        """Per image, the attention each patch receives in `layer` for its (right-padded) input `hidden` [I, L, D]."""
        attention = layer.self_attn
        normed = layer.layer_norm1(hidden)
        shape = (*hidden.shape[:2], attention.num_heads, attention.head_dim)
        query = attention.q_proj(normed).view(shape).transpose(1, 2)
        key = attention.k_proj(normed).view(shape).transpose(1, 2)
        return [
            vit_received_attention(query[image, :, :length], key[image, :, :length], attention.scaling)
            for image, length in enumerate(lengths)
        ]

    def _image_block_embeddings(
        self,
        pixel_values: torch.Tensor,
        image_position_ids: torch.Tensor,
        image_grid_hw: torch.Tensor,
        vae_pixel_values: torch.Tensor | None,
        vae_image_hw: torch.Tensor | None,
        ratio: float,
        latents: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[ReductionResult] | None]:
        """The LLM inputs of every image's ViT tokens: `connector(ViT)` (reduced when ratio < 1) +
        `vit_pos_embed` at the tokens' original 2-D ids.

        `latents` (one scaled latent per image) replaces the VAE encode of the anchors when the caller already has
        them (editing encodes each input image once, for its VAE context block, and reuses that latent here).

        Returns:
            embeddings [sum K, D], the kept packed patch indices [sum K] (None when nothing is reduced), the plans.
        """
        vit_attention = None
        if ratio < 1.0 and method_needs_vit_attention(self.config.g2tr_method):
            features, vit_attention = self.vscan_attention_scores(pixel_values, image_position_ids, image_grid_hw)
        else:
            features = self.get_image_features(pixel_values, image_position_ids, image_grid_hw).pooler_output
        if ratio >= 1.0:
            # The unreduced upstream path, untouched: no VAE encode, no plan.
            return features + self.vit_pos_embed(image_position_ids), None, None
        if not method_needs_anchors(self.config.g2tr_method):
            pass  # no anchors, hence no VAE and no VAE inputs needed
        elif getattr(self, "vae", None) is None or not self.config.visual_gen:
            raise ValueError(
                f"g2tr_ratio={ratio} < 1 needs the VAE for its latent anchors, but this model has none "
                "(`config.visual_gen=False` or diffusers is not installed). Use g2tr_ratio=1.0."
            )
        elif latents is None and (vae_pixel_values is None or vae_image_hw is None):
            raise ValueError(
                f"g2tr_ratio={ratio} < 1 needs `vae_pixel_values` and `vae_image_hw` (the VAE-sized images the "
                "processor returns) to build the latent anchors."
            )
        elif latents is None and vae_image_hw.shape[0] != image_grid_hw.shape[0]:
            raise ValueError(
                f"`vae_image_hw` has {vae_image_hw.shape[0]} images but `image_grid_hw` has {image_grid_hw.shape[0]}."
            )
        tokens, kept_patches, reductions = self.reduce_image_features(
            features, image_grid_hw, vae_pixel_values, vae_image_hw, ratio, latents=latents,
            vit_attention=vit_attention,
        )  # fmt: skip
        # Position codes of the kept tokens' ORIGINAL 2-D ids, added after merging (docs/algorithm.md).
        kept_ids = image_position_ids[kept_patches.to(image_position_ids.device)]
        return tokens + self.vit_pos_embed(kept_ids), kept_patches, reductions

    def encode_anchor_latents(
        self, vae_pixel_values: torch.Tensor, vae_image_hw: torch.Tensor
    ) -> tuple[list[torch.Tensor], int]:
        """The latents that G2TR pools into anchors, and the pooling factor that then applies.

        At `g2tr_anchor_scale=1.0` (the default) this is `encode_vae_latents` and `g2tr_latent_pool`, unchanged.
        Below 1 every image is first resized (bilinear, antialiased) to the size whose latent, pooled by
        `g2tr_latent_pool * g2tr_anchor_scale`, gives the full-resolution anchor grid (`anchor_encode_size`), so the
        encode runs on about `g2tr_anchor_scale**2` of the pixels.

        Args:
            vae_pixel_values: [I, 3, H_max, W_max]; vae_image_hw: [I, 2] (see `encode_vae_latents`).
        Returns:
            (I latents [C, h, w], pool).
        """
        config = self.config
        if config.g2tr_anchor_scale == 1.0:
            return self.encode_vae_latents(vae_pixel_values, vae_image_hw), config.g2tr_latent_pool
        self._check_vae_inputs(vae_pixel_values, vae_image_hw)
        resized, sizes = [], []
        for pixels, (height, width) in zip(vae_pixel_values, vae_image_hw.tolist()):
            size, _ = anchor_encode_size(
                height,
                width,
                vae_downsample=self.vae_downsample,
                patch_size=config.latent_patch_size,
                latent_pool=config.g2tr_latent_pool,
                anchor_scale=config.g2tr_anchor_scale,
            )
            resized.append(resize_for_anchors(pixels[:, :height, :width], size))
            sizes.append(size)
        max_h, max_w = max(h for h, _ in sizes), max(w for _, w in sizes)
        batch = vae_pixel_values.new_zeros(len(resized), 3, max_h, max_w)
        for slot, image in enumerate(resized):
            batch[slot, :, : image.shape[-2], : image.shape[-1]] = image
        latents = self.encode_vae_latents(batch, torch.tensor(sizes, device=vae_image_hw.device))
        return latents, config.g2tr_anchor_pool

    def _project_latent_anchors(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.vae2llm(pooled.to(device=execution_device(self.vae2llm), dtype=compute_dtype(self.vae2llm)))

    def _check_vae_inputs(self, vae_pixel_values, vae_image_hw) -> None:
        if not isinstance(vae_pixel_values, torch.Tensor) or vae_pixel_values.dim() != 4:
            raise ValueError(
                "`vae_pixel_values` must be a tensor [num_images, 3, H_max, W_max], got "
                f"{type(vae_pixel_values).__name__} of shape {tuple(getattr(vae_pixel_values, 'shape', ()))}."
            )
        if not isinstance(vae_image_hw, torch.Tensor) or vae_image_hw.shape != (vae_pixel_values.shape[0], 2):
            raise ValueError(
                f"`vae_image_hw` must be a tensor [{vae_pixel_values.shape[0]}, 2] of (H, W), got "
                f"{tuple(getattr(vae_image_hw, 'shape', ()))}."
            )
        stride = self.vae_downsample * self.config.latent_patch_size
        too_big = (vae_image_hw[:, 0] > vae_pixel_values.shape[2]) | (vae_image_hw[:, 1] > vae_pixel_values.shape[3])
        if bool((vae_image_hw % stride != 0).any() | (vae_image_hw <= 0).any() | too_big.any()):
            raise ValueError(
                f"`vae_image_hw` must hold positive multiples of {stride} that fit in `vae_pixel_values` "
                f"{tuple(vae_pixel_values.shape[2:])}, got {vae_image_hw.tolist()}."
            )

    def _check_image_inputs(
        self,
        input_ids: torch.Tensor,
        block_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_position_ids: torch.Tensor | None,
        image_grid_hw: torch.Tensor | None,
    ) -> None:
        """Image tokens, image blocks and packed patches must describe the same images."""
        if not self.config.visual_und:
            raise ValueError("The prompt holds image tokens but this model has no ViT (`config.visual_und=False`).")
        for name, value in (
            ("pixel_values", pixel_values),
            ("image_position_ids", image_position_ids),
            ("image_grid_hw", image_grid_hw),
        ):
            if value is None:
                raise ValueError(f"The prompt holds image tokens, so `{name}` is required.")
        patch_dim = self.config.vit_config.num_channels * self.config.vit_config.patch_size**2
        if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
            raise ValueError(
                f"`pixel_values` must have shape [total_patches, {patch_dim}], got {tuple(pixel_values.shape)}."
            )
        if image_position_ids.shape != pixel_values.shape[:1]:
            raise ValueError(
                f"`image_position_ids` must have shape [{pixel_values.shape[0]}], got "
                f"{tuple(image_position_ids.shape)}."
            )
        if image_grid_hw.dim() != 2 or image_grid_hw.shape[1] != 2:
            raise ValueError(f"`image_grid_hw` must have shape [num_images, 2], got {tuple(image_grid_hw.shape)}.")
        image_tokens = (input_ids == self.config.image_token_id) & (block_ids > 0)
        num_images = image_grid_hw.shape[0]
        # Blocks are numbered over the batch in order of appearance; only those that hold placeholders are images.
        image_blocks = torch.unique(block_ids[image_tokens])
        tokens_per_block = torch.bincount(block_ids[image_tokens])[image_blocks]
        starts = int(image_blocks.numel())
        expected = image_grid_hw.prod(-1)
        if (
            starts != num_images
            or not torch.equal(tokens_per_block.cpu(), expected.cpu())
            or int(expected.sum()) != pixel_values.shape[0]
        ):
            raise ValueError(
                "The image blocks in `input_ids` do not match the images: expected one `<|vision_start|>` + "
                f"h*w `<|image_pad|>` + `<|vision_end|>` block per row of `image_grid_hw` ({expected.tolist()} "
                f"tokens), found {starts} blocks with {tokens_per_block.tolist()} image tokens and "
                f"{pixel_values.shape[0]} patches in `pixel_values`."
            )
        max_id = self.config.vit_max_num_patch_per_side**2
        if bool((image_position_ids < 0).any() | (image_position_ids >= max_id).any()):
            raise ValueError(f"`image_position_ids` must lie in [0, {max_id}) (row * side + col).")

    # --- forward ------------------------------------------------------------------------------------------------

    def _structure_ids(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """The token ids that decide the prompt's structure (image blocks, placeholders), [B, L]. With
        `inputs_embeds` alone, image tokens and markers are recognised by their word embedding; other positions
        read as -1 (text)."""
        if input_ids is not None:
            return input_ids
        config = self.config
        special = (config.image_token_id, config.vision_start_token_id, config.vision_end_token_id)
        return ids_from_embeddings(inputs_embeds, self.get_input_embeddings(), special)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_position_ids: torch.LongTensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        vae_pixel_values: torch.FloatTensor | None = None,
        vae_image_hw: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        g2tr_ratio: float | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        decoding_step: bool = False,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> G2TRBagelModelOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Left-padded prompt ids with full-length image blocks (`<|vision_start|>`, h*w `<|image_pad|>`,
                `<|vision_end|>`), or the new tokens after a cache. A placeholder counts as an image slot only inside
                a complete block; elsewhere it is an ordinary token.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)` or longer, *optional*):
                The caller's 2-D mask; its last `sequence_length` columns describe `input_ids`. The cached part is
                read from the cache's own layout (which is shorter under G2TR).
            pixel_values (`torch.FloatTensor` of shape `(total_patches, 3 * 14 * 14)`, *optional*):
                ViT patches of all images, packed in order of appearance, each flattened (row, col, channel),
                values in [-1, 1].
            image_position_ids (`torch.LongTensor` of shape `(total_patches,)`, *optional*):
                Flattened 2-D patch ids `row * vit_max_num_patch_per_side + col`.
            image_grid_hw (`torch.LongTensor` of shape `(num_images, 2)`, *optional*): ViT grid (h_v, w_v) per image.
            vae_pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H_max, W_max)`, *optional*):
                VAE-sized images in [-1, 1], zero-padded bottom/right. Needed only when `g2tr_ratio < 1`.
            vae_image_hw (`torch.LongTensor` of shape `(num_images, 2)`, *optional*): each image's own (H, W).
            past_key_values (`Cache`, *optional*): a transformers cache, also accepted as `cache=` (transformers
                >= 5.24). A `DynamicCache` is created when `use_cache` and none is given. The cache becomes a compact
                cache (see `generation_g2tr`): it stores K + 2 entries per image and reports the caller's length.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Instead of `input_ids`: word embeddings (`get_input_embeddings()`). Image placeholders and markers
                are recognised by their embedding, so image inputs work with them too.
            g2tr_ratio (`float`, *optional*): keep ratio for this call, in (0, 1]; defaults to `config.g2tr_ratio`.
                1.0 skips the reduction entirely (no VAE encode).
            output_attentions (`bool`, *optional*): return every decoder layer's attention weights over the compact
                sequence; needs `attn_implementation="eager"`.
            decoding_step (`bool`, *optional*, defaults to `False`): the ids are tokens the model generated itself
                (`generate` sets it after the prompt): image placeholders among them are ordinary text.
            position_ids: not accepted: BAGEL's RoPE positions follow from the image blocks (one position per
                block) and the cache, so the model derives them.
        """
        past_key_values = pop_cache_argument(past_key_values, kwargs)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else getattr(self.config.llm_config, "use_cache", True)
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = bool(output_attentions if output_attentions is not None else self.config.output_attentions)
        if output_attentions and (self.config._attn_implementation or "sdpa") != "eager":
            raise ValueError(
                "`output_attentions=True` needs the eager attention kernel: load the model with "
                f"`attn_implementation=\"eager\"` (it uses {self.config._attn_implementation!r})."
            )
        if position_ids is not None:
            raise ValueError(
                "`position_ids` are not accepted: BAGEL derives its RoPE positions from the image blocks and the cache."
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        checkpointing = any(layer.gradient_checkpointing for layer in self.language_model.layers)
        if checkpointing and self.training and use_cache:
            logger.warning_once("Gradient checkpointing recomputes layers, so no KV cache is kept: `use_cache=False`.")
            use_cache = False
        structure_ids = self._structure_ids(input_ids, inputs_embeds)
        _check_text_inputs(structure_ids, attention_mask)
        ratio = self.config.resolve_g2tr_ratio(g2tr_ratio)
        batch_size, length = structure_ids.shape
        device = structure_ids.device

        past_key_values, layout, new_mask = open_compact_cache(
            past_key_values, use_cache, self.config.get_text_config(), attention_mask, batch_size, length, device
        )
        if decoding_step:
            block_ids = torch.zeros_like(structure_ids)
            advances = torch.ones_like(new_mask)
        else:
            block_ids, advances = image_block_structure(
                structure_ids, self.config.vision_start_token_id, self.config.vision_end_token_id
            )
        position_ids = rope_positions(advances, new_mask, layout.next_position.to(device))

        # 1. Embed the prompt; image slots get the (reduced) ViT tokens, dropped slots are marked in `kept`.
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_tokens = (structure_ids == self.config.image_token_id) & (block_ids > 0)
        kept_token_mask, reductions = torch.ones_like(image_tokens), None
        if bool(image_tokens.any()):
            self._check_image_inputs(structure_ids, block_ids, pixel_values, image_position_ids, image_grid_hw)
            image_embeds, kept_patches, reductions = self._image_block_embeddings(
                pixel_values, image_position_ids, image_grid_hw, vae_pixel_values, vae_image_hw,
                ratio if acts_before_llm(self.config.g2tr_method) else 1.0,  # in-LLM-only methods: in the decoder
            )
            if kept_patches is not None:
                kept_token_mask = kept_token_mask.clone()
                kept_token_mask[image_tokens] = index_to_mask(kept_patches.to(device), pixel_values.shape[0])
            slots = (image_tokens & kept_token_mask)[..., None]
            image_embeds = image_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(slots, image_embeds)
        elif pixel_values is not None:
            raise ValueError(
                "`pixel_values` were given but the prompt holds no complete image block (`<|vision_start|>`, the "
                "`<|image_pad|>` placeholders, `<|vision_end|>`): build the prompt with this model's processor."
            )

        # 2. Remove the dropped slots (each image block becomes K + 2 tokens) and re-left-pad the rows.
        image_slots, compacted = image_tokens & kept_token_mask, None
        if not bool(kept_token_mask.all()):
            index, filled = compaction_index(kept_token_mask)
            inputs_embeds = inputs_embeds.gather(1, index[..., None].expand(-1, -1, inputs_embeds.shape[-1]))
            new_mask = new_mask.gather(1, index) & filled
            position_ids = position_ids.gather(1, index).masked_fill(~filled, 0)
            block_ids = block_ids.gather(1, index).masked_fill(~filled, 0)
            image_slots, compacted = image_slots.gather(1, index) & filled, (index, filled)

        # 3. One decoder pass with the block-causal mask against the cache. A lone unpadded query against a growing
        # cache needs no mask; a static cache always does (its unwritten tail must stay hidden).
        mask_4d = None
        static_cache = bool(getattr(past_key_values, "is_compileable", False))
        all_real = bool(new_mask.all()) and bool(layout.attention_mask.all())
        if inputs_embeds.shape[1] > 1 or static_cache or not all_real:
            mask_4d = decoder_attention_mask(
                self.language_model.config, layout.attention_mask.to(device), new_mask, block_ids
            )
        # In-LLM methods (FastV, PDrop, DART, ...) drop image tokens between decoder layers; a no-op otherwise.
        dropper = InLLMDropper.for_call(
            self.config, ratio, image_slots, new_mask, position_ids, past_mask=layout.attention_mask,
            cache=past_key_values, block_ids=block_ids,
            mask_fn=lambda real, blocks: decoder_attention_mask(
                self.language_model.config, layout.attention_mask.to(device), real, blocks
            ),
            grids=None if image_grid_hw is None else image_grid_hw.tolist(),
        )  # fmt: skip
        with dropper.attached(self.language_model.layers):
            outputs = self.language_model(
                inputs_embeds=inputs_embeds,
                position_ids=position_ids,
                attention_mask=mask_4d,
                past_key_values=past_key_values,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
                **kwargs,
            )
        new_mask, position_ids, kept_token_mask = dropper.finish(
            past_key_values, new_mask, position_ids, kept_token_mask, origin=compacted
        )
        if past_key_values is not None:
            past_key_values.layout = layout.extended(new_mask, position_ids, dropped=length - new_mask.shape[1])

        output = G2TRBagelModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            reduced_attention_mask=new_mask.long(),
            kept_token_mask=kept_token_mask,
            image_reductions=reductions,
            **{CACHE_KWARG: past_key_values if use_cache else None},
        )
        return output if return_dict else output.to_tuple()



class G2TRBagelForConditionalGeneration(G2TRGenerationMixin, G2TRBagelPreTrainedModel, GenerationMixin):
    r"""
    BAGEL-7B-MoT with G2TR: [`G2TRBagelModel`] (`model`) and the untied language-model head (`lm_head`), for
    understanding (text generation from interleaved text and images, the ViT tokens of every image reduced by G2TR)
    and, through the helpers below and `G2TRBagelPipeline`, image editing and text-to-image.

    Also what `AutoModel` returns for this config.
    """

    _image_input_names = _PATCH_INPUTS + _IMAGE_INPUTS

    def __init__(self, config: G2TRBagelConfig) -> None:
        super().__init__(config)
        self.model = G2TRBagelModel(config)
        self.lm_head = nn.Linear(config.llm_config.hidden_size, config.llm_config.vocab_size, bias=False)
        if self.generation_config is not None:
            # Text generation never emits an image block: only the processor places them, with their pixels.
            self.generation_config.suppress_tokens = [
                config.image_token_id,
                config.vision_start_token_id,
                config.vision_end_token_id,
            ]
        self.post_init()
        drop_parallel_plans(self)

    # --- submodules, embeddings (GenerationMixin / resize_token_embeddings) ---------------------------------------

    @property
    def language_model(self) -> BagelTextModel:
        return self.model.language_model

    @property
    def vit_model(self) -> BagelSiglipVisionModel:
        return self.model.vit_model

    @property
    def vae(self) -> nn.Module | None:
        return getattr(self.model, "vae", None)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> BagelTextModel:
        return self.model.language_model

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """See [`G2TRBagelModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, **kwargs)

    def encode_vae_latents(self, *args, **kwargs) -> list[torch.Tensor]:
        """See [`G2TRBagelModel.encode_vae_latents`]."""
        return self.model.encode_vae_latents(*args, **kwargs)

    @property
    def vae_downsample(self) -> int:
        return self.model.vae_downsample

    # --- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_position_ids: torch.LongTensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        vae_pixel_values: torch.FloatTensor | None = None,
        vae_image_hw: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        g2tr_ratio: float | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        decoding_step: bool = False,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> G2TRBagelCausalLMOutputWithPast | tuple:
        r"""
        The inputs of [`G2TRBagelModel.forward`], plus:

        Args:
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): next-token targets
                aligned with `input_ids` (-100 = ignored); they follow the compaction. `shift_labels` (already
                shifted targets, as transformers' loss accepts) are compacted the same way.
            logits_to_keep (`int` or `torch.Tensor`, *optional*): compute logits only for the last `n` compact
                positions (0 = all), or for the given compact indices.
        """
        shift_labels = kwargs.pop("shift_labels", None)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_position_ids=image_position_ids,
            image_grid_hw=image_grid_hw,
            vae_pixel_values=vae_pixel_values,
            vae_image_hw=vae_image_hw,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            g2tr_ratio=g2tr_ratio,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            decoding_step=decoding_step,
            position_ids=position_ids,
            **kwargs,
        )
        vocab_size = self.config.llm_config.vocab_size
        logits, loss = self._logits_and_loss(outputs, logits_to_keep, labels, shift_labels, vocab_size, **kwargs)
        output = G2TRBagelCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            reduced_attention_mask=outputs.reduced_attention_mask,
            kept_token_mask=outputs.kept_token_mask,
            image_reductions=outputs.image_reductions,
            **{CACHE_KWARG: output_cache(outputs)},
        )
        return output if return_dict else output.to_tuple()

    # --- generation ---------------------------------------------------------------------------------------------

    def select_continuation_images(
        self, model_inputs: dict, full_input_ids: torch.Tensor, fed_input_ids: torch.Tensor
    ) -> dict:
        """A call that continues from a cache may pass every image of the conversation (as the processor returns
        them for the whole chat): keep the packed inputs of the images whose blocks are in `fed_input_ids`."""
        grid = model_inputs.get("image_grid_hw")
        if grid is None:
            return model_inputs
        start = self.config.vision_start_token_id
        total, new = (full_input_ids == start).sum(-1), (fed_input_ids == start).sum(-1)
        if grid.shape[0] != int(total.sum()) or int(new.sum()) == int(total.sum()):
            # Only the new images were passed (or a mismatch, which the forward reports).
            return model_inputs
        if int(new.sum()) == 0:
            # Every image is already cached: the new part is text.
            return {key: value for key, value in model_inputs.items() if key not in self._image_input_names}
        image_order = continuation_image_index(total, new).to(grid.device)
        patch_order = _gather_segments(grid.prod(-1), image_order)
        for key in self._image_input_names:
            value = model_inputs.get(key)
            if value is not None:
                order = patch_order if key in _PATCH_INPUTS else image_order
                model_inputs[key] = value.index_select(0, order.to(value.device))
        return model_inputs

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, *args, **kwargs):
        """Returns the caller's 2-D mask unchanged. `generate` builds a 4-D mask ahead of every step when the cache
        is static (under flex attention it builds a compiled `BlockMask`), but the forward derives BAGEL's
        block-causal mask over the compact cache itself, so a mask built here would be thrown away."""
        return attention_mask

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor, dict]:
        """Expansion for beams / several return sequences. The packed image tensors are not [batch, ...], so each
        row's images (and their patches) are repeated as a group instead of row-wise."""
        packed = {
            key: model_kwargs.pop(key) for key in _PATCH_INPUTS + _IMAGE_INPUTS if model_kwargs.get(key) is not None
        }
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if expand_size > 1 and packed:
            if input_ids is None or "image_grid_hw" not in packed:
                raise ValueError("Expanding image inputs for generation needs `input_ids` and `image_grid_hw`.")
            images_per_row = (input_ids == self.config.vision_start_token_id).sum(-1)
            image_order = _repeat_groups(images_per_row, expand_size)
            patches_per_image = packed["image_grid_hw"].prod(-1)
            patch_order = _gather_segments(patches_per_image, image_order.to(patches_per_image.device))
            for key, value in packed.items():
                order = patch_order if key in _PATCH_INPUTS else image_order
                model_kwargs[key] = value.index_select(0, order.to(value.device))
        else:
            model_kwargs.update(packed)
        return expanded_ids, model_kwargs

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also record this class under `AutoModel` in `auto_map`: transformers writes only the class it saves
        under its registered auto class."""
        if getattr(self, "_auto_class", None) is not None:
            target = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", target)
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    # --- image generation: context blocks, rectified-flow velocity, VAE decode -----------------------------------
    #
    # The editing / text-to-image path of upstream's `InterleaveInferencer`. Contexts are prefilled one request
    # (batch 1) at a time, on a transformers `DynamicCache` that carries its BAGEL layout like the understanding path's caches:
    #   prefill_vae_image  the clean VAE block of an input image (t = 0, gen expert, never reduced)
    #   prefill_vit_image  its ViT block, reduced by G2TR with anchors from that same latent (no second encode)
    #   prefill_text       a `<|im_start|> ... <|im_end|>` segment (through `forward`)
    #   embed_latent_query + flow_velocity   one velocity evaluation of the noisy latent block against a context
    #   embed_latent_queries + flow_velocities   the same for a batch: several latents (any grids, left-padded)
    #                      and CFG branches in one pass, each reading its window of a row of a stacked context cache
    #   decode_latent_tokens                 latent tokens -> pixels (a batch of one grid at once)
    # The sampler (schedule, CFG, Euler steps) lives in `pipeline_bagel.G2TRBagelPipeline`. Like upstream's, these
    # inference helpers run without autograd.

    @property
    def latent_downsample(self) -> int:
        """Pixels per generation token along a side (16 for BAGEL: VAE x8, then 2 x 2 latent patches)."""
        return self.vae_downsample * self.config.latent_patch_size

    def _check_generation_ready(self) -> None:
        if not self.config.visual_gen or getattr(self, "vae", None) is None:
            raise ValueError(
                "Image generation needs the generation modules and the VAE (`config.visual_gen=True` and diffusers "
                "installed)."
            )

    def _check_latent_grid(self, height: int, width: int) -> None:
        side = self.config.max_latent_size
        if not (1 <= height <= side and 1 <= width <= side):
            raise ValueError(
                f"An image of {height * self.latent_downsample} x {width * self.latent_downsample} px has a "
                f"{height} x {width} latent grid, but `latent_pos_embed` covers at most {side} x {side} "
                f"(images up to {side * self.latent_downsample} px per side)."
            )

    def _image_block(self, inner_embeds: torch.Tensor) -> torch.Tensor:
        """[n, D] -> [1, n + 2, D]: `<|vision_start|>`, the n tokens, `<|vision_end|>` (markers are text embeddings)."""
        embed_tokens = self.get_input_embeddings()
        markers = torch.tensor(
            [self.config.vision_start_token_id, self.config.vision_end_token_id], device=inner_embeds.device
        )
        start, end = embed_tokens(markers).split(1)
        return torch.cat([start, inner_embeds.to(device=start.device, dtype=start.dtype), end])[None]

    @staticmethod
    def _latent_token_mask(block_length: int, device) -> torch.Tensor:
        """[1, L] bool: True for the latent tokens of an image block (gen expert), False for its two markers."""
        mask = torch.ones(1, block_length, dtype=torch.bool, device=device)
        mask[:, 0] = mask[:, -1] = False
        return mask

    def _append_image_block(
        self, inputs_embeds: torch.Tensor, past_key_values: Cache, gen_token_mask: torch.Tensor | None
    ) -> None:
        """Prefill one image block [1, L, D] into the cache (upstream `forward_cache_update_vae` / `_vit`): every token
        at the next RoPE position, bidirectional inside the block, seeing the whole cache; the layout grows with it."""
        device = inputs_embeds.device
        length = inputs_embeds.shape[1]
        layout = cached_layout(as_compact_cache(past_key_values), 1, device)
        position_ids = layout.next_position.to(device)[:, None].expand(1, length)
        new_mask = torch.ones(1, length, dtype=torch.bool, device=device)
        attention_mask = None
        if not bool(layout.attention_mask.all()):
            block_ids = torch.ones(1, length, dtype=torch.long, device=device)
            attention_mask = decoder_attention_mask(
                self.language_model.config, layout.attention_mask.to(device), new_mask, block_ids
            )
        self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            gen_token_mask=gen_token_mask,
        )
        past_key_values.layout = layout.extended(new_mask, position_ids)

    @torch.no_grad()
    def prefill_vae_image(self, latents: torch.Tensor, past_key_values: Cache) -> None:
        """Append the VAE context block of one input image: `[<|vision_start|>, h*w latent tokens, <|vision_end|>]` at
        one RoPE position, the latents embedded as clean (t = 0) and run by the generation expert, the markers by the
        understanding expert ("gen" mode numerics), bidirectional, never reduced: the cache grows by h*w + 2.

        Args:
            latents: [C, H/8, W/8] the image's scaled latent (`encode_vae_latents`; upstream samples the posterior,
                the pipeline takes its mean).
            past_key_values: the `DynamicCache` of the context (batch 1); updated in place.
        """
        self._check_generation_ready()
        patch_size = self.config.latent_patch_size
        height, width = latents.shape[-2] // patch_size, latents.shape[-1] // patch_size
        self._check_latent_grid(height, width)
        device = latents.device
        tokens = patchify_latents(latents, patch_size)
        position_ids = latent_position_ids(height, width, self.config.max_latent_size, device)
        clean = torch.zeros(1, device=device)
        block = self._image_block(self.model.embed_latent_tokens(tokens, clean, position_ids))
        self._append_image_block(block, past_key_values, self._latent_token_mask(block.shape[1], block.device))

    @torch.no_grad()
    def prefill_vit_image(
        self,
        pixel_values: torch.Tensor,
        image_position_ids: torch.Tensor,
        image_grid_hw: torch.Tensor,
        past_key_values: Cache,
        *,
        latents: torch.Tensor | None = None,
        g2tr_ratio: float | None = None,
    ) -> ReductionResult | None:
        """Append the ViT block of one input image, reduced by G2TR: `[<|vision_start|>, K tokens, <|vision_end|>]` at
        one RoPE position, understanding expert, bidirectional; the cache grows by K + 2 (K = N at ratio 1).

        Args:
            pixel_values: [N, 3*14*14] the image's ViT patches; image_position_ids [N]; image_grid_hw [1, 2].
            past_key_values: the `DynamicCache` of the context (batch 1); updated in place.
            latents: [C, H/8, W/8] the same image's scaled latent, whose patchified, pooled, `vae2llm`-projected cells
                are the anchors. Editing passes the latent of the image's VAE context block, so each input image is
                encoded once (the official G2TR code encodes it a second time for the anchors). Needed when the ratio
                is below 1.
            g2tr_ratio: keep ratio for this image; defaults to `config.g2tr_ratio`.
        Returns:
            The reduction plan, or None at ratio 1 (the unreduced upstream block, no anchors used).
        """
        ratio = self.config.resolve_g2tr_ratio(g2tr_ratio)
        if not isinstance(image_grid_hw, torch.Tensor) or tuple(image_grid_hw.shape) != (1, 2):
            shape = tuple(getattr(image_grid_hw, "shape", ()))
            raise ValueError(f"`image_grid_hw` must be a tensor [1, 2] (one image), got shape {shape}.")
        num_patches = int(image_grid_hw.prod())
        patches_match = pixel_values.dim() == 2 and pixel_values.shape[0] == num_patches
        if not patches_match or image_position_ids.shape != (num_patches,):
            raise ValueError(
                f"`pixel_values` [{num_patches}, patch_dim] and `image_position_ids` [{num_patches}] must describe the "
                f"{tuple(image_grid_hw[0].tolist())} grid, got {tuple(pixel_values.shape)} and "
                f"{tuple(image_position_ids.shape)}."
            )
        if ratio < 1.0 and latents is None:
            raise ValueError(f"g2tr_ratio={ratio} < 1 needs `latents` (the image's VAE latent) for the anchors.")
        embeds, _, reductions = self.model._image_block_embeddings(
            pixel_values,
            image_position_ids,
            image_grid_hw,
            None,
            None,
            ratio,
            latents=None if latents is None else [latents],
        )
        self._append_image_block(self._image_block(embeds), past_key_values, None)
        return reductions[0] if reductions else None

    @torch.no_grad()
    def prefill_text(self, input_ids: torch.LongTensor, past_key_values: Cache) -> torch.Tensor:
        """Append text tokens [1, L] (causal, understanding expert, +1 RoPE position each) and return the logits
        [1, vocab] of the last one. A segment is `<|im_start|> ids <|im_end|>`; a single token decodes one step."""
        outputs = self(input_ids=input_ids, past_key_values=past_key_values, use_cache=True, logits_to_keep=1)
        return outputs.logits[:, -1]

    @torch.no_grad()
    def embed_latent_query(
        self, latent_tokens: torch.Tensor, timestep: torch.Tensor | float, latent_grid: tuple[int, int]
    ) -> torch.Tensor:
        """The query block of one denoising step: `[<|vision_start|>, vae2llm(x_t) + time_embedder(t) +
        latent_pos_embed(ids), <|vision_end|>]`.

        Args:
            latent_tokens: [h*w, p*p*C] the noisy latent x_t.
            timestep: flow time t in [0, 1] (the same for every token).
            latent_grid: (h, w).
        Returns:
            [1, h*w + 2, hidden_size], shared by every CFG branch of the step.
        """
        self._check_generation_ready()
        height, width = latent_grid
        self._check_latent_grid(height, width)
        device = latent_tokens.device
        position_ids = latent_position_ids(height, width, self.config.max_latent_size, device)
        timesteps = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(1)
        return self._image_block(self.model.embed_latent_tokens(latent_tokens, timesteps, position_ids))

    @torch.no_grad()
    def embed_latent_queries(
        self,
        latent_tokens: list[torch.Tensor],
        timestep: torch.Tensor | float,
        latent_grids: list[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`embed_latent_query` for several latents, possibly of different grids, left-padded into one batch.

        Args:
            latent_tokens: B tensors [h_i*w_i, p*p*C].
            timestep: flow time t, shared by all of them.
            latent_grids: B grids (h_i, w_i).
        Returns:
            embeddings [B, L, hidden_size] with L = max(h_i*w_i) + 2, each block right-aligned, and its mask
            [B, L] bool (False for the left padding, whose embeddings are zeros).
        """
        if len(latent_tokens) != len(latent_grids) or not latent_tokens:
            raise ValueError(
                f"`latent_tokens` ({len(latent_tokens)}) and `latent_grids` ({len(latent_grids)}) must be non-empty "
                "lists of the same length."
            )
        blocks = [
            self.embed_latent_query(tokens, timestep, grid)[0] for tokens, grid in zip(latent_tokens, latent_grids)
        ]
        length = max(block.shape[0] for block in blocks)
        embeds = torch.stack([F.pad(block, (0, 0, length - block.shape[0], 0)) for block in blocks])
        lengths = torch.tensor([block.shape[0] for block in blocks], device=embeds.device)
        query_mask = torch.arange(length, device=embeds.device)[None, :] >= (length - lengths)[:, None]
        return embeds, query_mask

    @torch.no_grad()
    def flow_velocity(
        self, query_embeds: torch.Tensor, past_key_values: Cache, context_length: int | None = None
    ) -> torch.Tensor:
        """One rectified-flow velocity evaluation (upstream `_forward_flow`, one CFG branch): the latent query block
        attends to the first `context_length` cache entries and to itself, at the RoPE position that follows them,
        through the generation expert ("gen" mode), and `llm2vae` maps its latent tokens to the velocity
        (noise - x0). The cache is read, never written (`BagelCachePrefix`).

        Args:
            query_embeds: [1, h*w + 2, D] from `embed_latent_query`.
            past_key_values: the context's `DynamicCache` (batch 1).
            context_length: visible leading entries (a CFG context that is a prefix of this cache); None = all.
        Returns:
            [h*w, p*p*C] velocity, in the model's dtype.
        """
        length = stored_length(past_key_values) if context_length is None else context_length
        query_mask = torch.ones(1, query_embeds.shape[1], dtype=torch.bool, device=query_embeds.device)
        context_mask = torch.ones(1, length, dtype=torch.bool, device=query_embeds.device)
        return self.flow_velocities(query_embeds, query_mask, past_key_values, context_mask)[0, 1:-1]

    @torch.no_grad()
    def flow_velocities(
        self,
        query_embeds: torch.Tensor,
        query_mask: torch.Tensor,
        past_key_values: Cache,
        context_mask: torch.Tensor,
        context_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Several velocity evaluations in one decoder pass: B query blocks (e.g. every CFG branch of every image of
        a batch), each against its own part of a stacked context cache. Query row b reads cache row
        `context_rows[b]`, sees the entries of that row where `context_mask[b]` is True and the cache layout marks a
        real token, and sits at the RoPE position after the last entry it sees. The cache is never written.

        Args:
            query_embeds: [B, L, D] left-padded query blocks (`embed_latent_queries`).
            query_mask: [B, L] bool, False for the left padding.
            past_key_values: the context cache, N rows, with its layout (stored length P).
            context_mask: [B, P'] bool, P' <= P: the leading entries of its row each query may see (a CFG context
                is a window of its request's row: the whole conditional context, its text-free prefix, or the
                image-free context stored after it).
            context_rows: LongTensor [B], defaults to `arange(B)` (then N must equal B).
        Returns:
            [B, L, p*p*C] velocities in the model's dtype; only the latent tokens of each block are meaningful
            (`query_mask` minus the two markers of each block).
        """
        self._check_generation_ready()
        batch, length = query_mask.shape
        device = query_embeds.device
        visible = context_mask.shape[1]
        num_rows = past_key_values.layers[0].keys.shape[0] if stored_length(past_key_values) > 0 else batch
        layout = cached_layout(past_key_values, num_rows, device).cropped(visible)
        if context_rows is not None:
            layout = layout.select_rows(context_rows)
        elif layout.attention_mask.shape[0] != batch:
            raise ValueError(
                f"The context cache holds {layout.attention_mask.shape[0]} rows but {batch} queries were given "
                "without `context_rows`."
            )
        key_mask = layout.attention_mask.to(device) & context_mask.to(device)
        if visible:
            start = layout.position_ids.to(device).masked_fill(~key_mask, -1).amax(-1) + 1
        else:
            start = torch.zeros(batch, dtype=torch.long, device=device)
        position_ids = start[:, None].expand(batch, length).masked_fill(~query_mask, 0)
        attention_mask = None
        if not (bool(key_mask.all()) and bool(query_mask.all())):
            # One bidirectional block per row (block id 1); padded queries see only themselves. Under
            # flex_attention the same mask as a BlockMask.
            attention_mask = decoder_attention_mask(
                self.language_model.config, key_mask, query_mask, query_mask.long()
            )
        # The markers of each block (its first and last real token) run through the understanding expert.
        first = length - query_mask.sum(-1)
        columns = torch.arange(length, device=device)[None, :]
        gen_token_mask = query_mask & (columns != first[:, None]) & (columns != length - 1)
        hidden_states = self.language_model(
            inputs_embeds=query_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=BagelCachePrefix(past_key_values, visible, rows=context_rows),
            gen_token_mask=gen_token_mask,
        ).last_hidden_state
        return self.model.llm2vae(hidden_states.to(dtype=compute_dtype(self.model.llm2vae)))

    @torch.no_grad()
    def decode_latent_tokens(self, latent_tokens: torch.Tensor, latent_grid: tuple[int, int]) -> torch.Tensor:
        """Latent tokens [h*w, p*p*C] (or a batch [B, h*w, p*p*C] of one grid) -> pixels [1 or B, 3, 16h, 16w] in
        about [-1, 1]: unpatchify, undo the VAE scaling (`z / scaling_factor + shift_factor`) and run `vae.decode`."""
        self._check_generation_ready()
        vae_config = self.config.vae_config
        scale, shift = vae_config.get("scaling_factor", 1.0), vae_config.get("shift_factor", 0.0) or 0.0
        rows = latent_tokens[None] if latent_tokens.dim() == 2 else latent_tokens
        patch_size = self.config.latent_patch_size
        latents = torch.stack([unpatchify_latents(row, latent_grid, patch_size) for row in rows])
        latents = latents / scale + shift
        return self.vae.decode(latents.to(device=execution_device(self.vae), dtype=self.vae.dtype)).sample


def _check_text_inputs(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"`input_ids` must be a LongTensor [batch_size, sequence_length], got {type(input_ids).__name__}"
            f" of shape {tuple(getattr(input_ids, 'shape', ()))}."
        )
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[1] < input_ids.shape[1]):
        raise ValueError(
            "`attention_mask` must be a 2-D mask [batch_size, length >= sequence_length], got shape "
            f"{tuple(attention_mask.shape)} for `input_ids` {tuple(input_ids.shape)}."
        )
    if attention_mask is not None and attention_mask.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"`attention_mask` has {attention_mask.shape[0]} rows but `input_ids` has {input_ids.shape[0]}."
        )


def _segment_starts(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


def _gather_segments(counts: torch.Tensor, segment_order: torch.Tensor) -> torch.Tensor:
    """Element indices of the segments `segment_order` (segment i has `counts[i]` consecutive elements)."""
    starts = _segment_starts(counts)[segment_order]
    lengths = counts[segment_order]
    offsets = torch.arange(int(lengths.sum()), device=counts.device) - _segment_starts(lengths).repeat_interleave(
        lengths
    )
    return starts.repeat_interleave(lengths) + offsets


def _repeat_groups(group_sizes: torch.Tensor, repeats: int) -> torch.Tensor:
    """Indices that repeat each row's group of items `repeats` times: [A, B | C] -> [A, B, A, B | C, C]."""
    rows = torch.arange(group_sizes.shape[0], device=group_sizes.device).repeat_interleave(repeats)
    return _gather_segments(group_sizes, rows)


# The official `ema.safetensors` names (upstream's `Bagel` module tree) and where they live in ours. transformers
# applies them on load and reverses them on save, so saved folders keep the official names.
CHECKPOINT_RENAMES = (
    ("language_model.model", "model.language_model"),
    ("language_model.lm_head", "lm_head"),
    *(
        (name, f"model.{name}")
        for name in (
            "vit_model", "connector", "vit_pos_embed", "latent_pos_embed", "time_embedder", "vae2llm", "llm2vae", "vae"
        )
    ),
)
register_checkpoint_renames(G2TRBagelConfig.model_type, CHECKPOINT_RENAMES)

G2TRBagelForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "CHECKPOINT_RENAMES",
    "BagelCachePrefix",
    "G2TRBagelModel",
    "G2TRBagelModelOutputWithPast",
    "G2TRBagelCausalLMOutputWithPast",
    "G2TRBagelForConditionalGeneration",
    "G2TRBagelPreTrainedModel",
    "latent_position_ids",
    "patchify_latents",
    "sincos_2d_table",
    "unpatchify_latents",
]

"""`G2TRBagelConfig`: configuration of BAGEL-7B-MoT (ByteDance-Seed/BAGEL-7B-MoT) with G2TR token reduction.

The defaults are the real checkpoint's values (its `llm_config.json`, `vit_config.json` and FLUX AE): a Qwen2.5-7B
Mixture-of-Transformers decoder with QK-norm, a 26-layer NaViT SigLIP-so400m/14 and the FLUX.1 autoencoder. Tiny
test models are built by passing small sub-configs.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig, Qwen2Config, SiglipVisionConfig

from .configuration_g2tr import G2TRConfig


# Qwen2.5-7B-Instruct plus BAGEL's additions: QK-norm and the MoT layer.
_DEFAULT_LLM_CONFIG: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "qk_norm": True,
    "layer_module": "Qwen2MoTDecoderLayer",
}

# SigLIP-so400m/14 NaViT: 27 layers in vit_config.json, the last one dropped (vit_select_layer=-2), no head.
_DEFAULT_VIT_CONFIG: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 980,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "vision_use_head": False,
}

# FLUX.1 AE as a diffusers `AutoencoderKL` config. Only constructor arguments.
_DEFAULT_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}


def _build_llm_config(value: dict | PreTrainedConfig | None) -> Qwen2Config:
    if isinstance(value, PreTrainedConfig):
        for key in ("qk_norm", "layer_module"):
            if not hasattr(value, key):
                setattr(value, key, _DEFAULT_LLM_CONFIG[key])
        return value
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"`llm_config` must be a dict, a Qwen2Config or None, got {type(value).__name__}.")
    fields = dict(_DEFAULT_LLM_CONFIG) if value is None else {**_DEFAULT_LLM_CONFIG, **value}
    fields.pop("model_type", None)
    if "rope_parameters" not in fields and "rope_theta" not in fields:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0}
    return Qwen2Config(**fields)


def _build_vit_config(value: dict | PreTrainedConfig | None) -> SiglipVisionConfig:
    if isinstance(value, PreTrainedConfig):
        return value
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"`vit_config` must be a dict, a SiglipVisionConfig or None, got {type(value).__name__}.")
    fields = dict(_DEFAULT_VIT_CONFIG) if value is None else {**_DEFAULT_VIT_CONFIG, **value}
    fields.pop("model_type", None)
    return SiglipVisionConfig(**fields)


def _build_vae_config(value: dict | None) -> dict[str, Any]:
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"`vae_config` must be a dict of diffusers `AutoencoderKL` arguments, got {type(value)}.")
    fields = {**_DEFAULT_VAE_CONFIG, **(value or {})}
    # diffusers bookkeeping keys are not constructor arguments.
    fields = {key: val for key, val in fields.items() if not key.startswith("_")}
    # A custom `block_out_channels` (e.g. a tiny test VAE) gets matching block type lists unless they are given.
    num_blocks = len(fields["block_out_channels"])
    user_fields = value or {}
    if "down_block_types" not in user_fields:
        fields["down_block_types"] = ["DownEncoderBlock2D"] * num_blocks
    if "up_block_types" not in user_fields:
        fields["up_block_types"] = ["UpDecoderBlock2D"] * num_blocks
    # JSON round trips give lists; keep lists everywhere so that a saved config compares equal to a loaded one.
    return {key: list(val) if isinstance(val, tuple) else val for key, val in fields.items()}


class G2TRBagelConfig(G2TRConfig):
    r"""
    Configuration of [`G2TRBagelForConditionalGeneration`]: BAGEL-7B-MoT plus the G2TR reduction options inherited
    from [`G2TRConfig`] (`g2tr_ratio`, `g2tr_min_keep`, ...).

    Args:
        llm_config (`dict` or `Qwen2Config`, *optional*):
            The Mixture-of-Transformers decoder: Qwen2 fields plus `qk_norm` (per-head RMSNorm on q and k) and
            `layer_module`. Defaults to Qwen2.5-7B (28 layers, width 3584, GQA 28/4, RoPE theta 1e6).
        vit_config (`dict` or `SiglipVisionConfig`, *optional*):
            The NaViT SigLIP understanding encoder. Defaults to so400m/14 with 26 layers and no head.
        vae_config (`dict`, *optional*):
            Constructor arguments of a diffusers `AutoencoderKL`. Defaults to the FLUX.1 AE (16 latent channels,
            scaling 0.3611, shift 0.1159, 4 blocks, no quant convs).
        visual_und (`bool`, *optional*, defaults to `True`):
            Build the understanding path (`vit_model`, `connector`, `vit_pos_embed`).
        visual_gen (`bool`, *optional*, defaults to `True`):
            Build the generation path (`vae`, `time_embedder`, `vae2llm`, `llm2vae`, `latent_pos_embed`). G2TR needs
            it: its anchors are VAE latents mapped by `vae2llm`.
        latent_patch_size (`int`, *optional*, defaults to 2):
            Side of the latent patches that become one generation token (2 x 2 x 16 = 64 values).
        max_latent_size (`int`, *optional*, defaults to 64):
            Side of the latent token grid covered by `latent_pos_embed` (64 x 64 rows; 1024 px images).
        vit_max_num_patch_per_side (`int`, *optional*, defaults to 70):
            Side of the ViT patch grid covered by the position tables (70 x 70 rows; 980 px images).
        connector_act (`str`, *optional*, defaults to `"gelu_pytorch_tanh"`):
            Activation between the two layers of the ViT -> LLM connector.
        interpolate_pos (`bool`, *optional*, defaults to `False`):
            Upstream flag; only `False` ("extrapolate": smaller images use the top-left sub-grid) is implemented.
        timestep_shift (`float`, *optional*, defaults to 1.0):
            Upstream training field, kept for config compatibility.
        image_token_id, vision_start_token_id, vision_end_token_id (`int`):
            `<|image_pad|>`, `<|vision_start|>`, `<|vision_end|>` of the Qwen2.5 tokenizer.
        bos_token_id, eos_token_id, pad_token_id (`int`):
            `<|im_start|>`, `<|im_end|>` and `<|endoftext|>`.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            BAGEL's `lm_head` is untied.
    """

    model_type = "g2tr_bagel"
    sub_configs = {"llm_config": Qwen2Config, "vit_config": SiglipVisionConfig}

    llm_config: dict | PreTrainedConfig | None = None
    vit_config: dict | PreTrainedConfig | None = None
    vae_config: dict | None = None
    visual_und: bool = True
    visual_gen: bool = True
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    timestep_shift: float | int = 1.0
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151644
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = 151643
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.llm_config = _build_llm_config(self.llm_config)
        self.vit_config = _build_vit_config(self.vit_config)
        self.vae_config = _build_vae_config(self.vae_config) if self.visual_gen or self.vae_config else None
        if self.interpolate_pos:
            raise ValueError("`interpolate_pos=True` is not supported: BAGEL-7B-MoT uses extrapolated position ids.")
        for name in ("latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if self.llm_config.hidden_size % 4:
            raise ValueError(
                "`llm_config.hidden_size` must be a multiple of 4 (2-D sin-cos tables), got "
                f"{self.llm_config.hidden_size}."
            )
        super().__post_init__(**kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The decoder config (`llm_config`): generation, caches and embedding resizing read it."""
        return self.llm_config


G2TRBagelConfig.register_for_auto_class()

__all__ = ["G2TRBagelConfig"]

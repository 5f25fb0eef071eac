"""Configuration of InternVL-U understanding (InternViT-300M + pixel shuffle + `mlp1` + Qwen3) with G2TR.

Field names follow the official `vlm/config.json` (`InternVLUChatConfig`, model_type `internvlu_chat`) where they
exist, so that the official dictionary can be passed in as is: `llm_config` is accepted as an alias of
`text_config`, and the unused official keys (`ps_version`, `dynamic_image_size`, ...) are simply stored.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig, Qwen3Config
from transformers.utils import logging

from .configuration_g2tr import G2TRConfig


logger = logging.get_logger(__name__)


# The Chinese InternVL identity prompt of the `qwen2_5-chat-v3` template, byte for byte.
DEFAULT_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

# Order of the rows of `special_token_embedding`; part of the checkpoint contract.
SPECIAL_TOKENS = (
    "</box>",
    "<box>",
    "<IMG_CONTEXT>",
    "</img>",
    "<img>",
    "</quad>",
    "<quad>",
    "</ref>",
    "<ref>",
    "<img_uncond>",
)

# Token ids of the official tokenizer. `<|im_start|>`, `<|im_end|>`, `<img>`, `</img>` and `<IMG_CONTEXT>` are
# confirmed by a third-party implementation (vLLM-Omni); the other special-token ids follow the InternVL3.5
# added-token order and are UNVERIFIED: check them against `processor/tokenizer.json` on first load of the real checkpoint.
_OFFICIAL_TOKEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<img>": 151669,
    "</img>": 151670,
    "<IMG_CONTEXT>": 151671,
    "<quad>": 151672,  # unverified
    "</quad>": 151673,  # unverified
    "<ref>": 151674,  # unverified
    "</ref>": 151675,  # unverified
    "<box>": 151676,  # unverified
    "</box>": 151677,  # unverified
    "<img_uncond>": 151678,  # unverified
}

# What the anchor VAE may encode in understanding (see `g2tr_anchor_source`).
ANCHOR_SOURCES = ("image", "vit_pixels")

# The Qwen-Image VAE (diffusers `AutoencoderKLQwenImage`), as in the `vae/config.json` of InternVL-U (the class
# defaults of diffusers 0.42, which are the Qwen-Image values). The converter fills `vae_config` from the checkpoint.
QWEN_IMAGE_VAE_CONFIG = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "input_channels": 3,
    "latents_mean": [
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ],
    "latents_std": [
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ],
}  # fmt: skip

# The Qwen3-1.7B-shaped LLM of InternVL-U (vocab size and rope theta unverified: check on first load).
_DEFAULT_TEXT_CONFIG = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": False,
    "pad_token_id": _OFFICIAL_TOKEN_IDS["<|endoftext|>"],
    "eos_token_id": _OFFICIAL_TOKEN_IDS["<|im_end|>"],
}


class G2TRInternViTConfig(PreTrainedConfig):
    r"""
    Configuration of InternViT (the InternVL-U vision encoder), with the field names of the official
    `InternVisionConfig` (`model_type` `intern_vit_6b` in the checkpoint). Defaults are InternViT-300M-448px.

    Args:
        hidden_size (`int`, defaults to 1024): width of the encoder.
        intermediate_size (`int`, defaults to 4096): width of the MLP.
        num_hidden_layers (`int`, defaults to 24): number of encoder layers.
        num_attention_heads (`int`, defaults to 16): attention heads (head dim 64).
        num_channels (`int`, defaults to 3): input channels.
        image_size (`int`, defaults to 448): side of the square input the position table was trained for.
        patch_size (`int`, defaults to 14): side of a patch.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact erf GELU).
        norm_type (`str`, defaults to `"layer_norm"`): `"layer_norm"` or `"rms_norm"`.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of the norms.
        qkv_bias (`bool`, defaults to `True`): bias of the fused qkv projection.
        qk_normalization (`bool`, defaults to `False`): RMS-normalise queries and keys (InternViT-6B only).
        initializer_factor (`float`, defaults to 0.1): initial value of the LayerScale vectors `ls1`/`ls2`.
        initializer_range (`float`, defaults to 0.02): std of the random initialisation.
        attention_dropout (`float`, defaults to 0.0): attention dropout.
        dropout (`float`, defaults to 0.0): dropout after the attention projection.
        drop_path_rate (`float`, defaults to 0.0): stored for compatibility; inference only, so unused.
    """

    model_type = "g2tr_intern_vit"
    base_config_key = "vision_config"

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    initializer_factor: float | int = 0.1
    initializer_range: float = 0.02
    attention_dropout: float | int = 0.0
    dropout: float | int = 0.0
    drop_path_rate: float | int = 0.0

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`vision_config.hidden_size` ({self.hidden_size}) must be divisible by "
                f"`vision_config.num_attention_heads` ({self.num_attention_heads})."
            )
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"`vision_config.norm_type` must be 'layer_norm' or 'rms_norm', got {self.norm_type!r}.")
        super().__post_init__(**kwargs)


class G2TRInternVLUConfig(G2TRConfig):
    r"""
    Configuration of [`G2TRInternVLUForConditionalGeneration`]: InternVL-U understanding (InternVL3.5-2B layout)
    plus the Qwen-Image VAE that provides the G2TR anchors.

    Args:
        vision_config (`dict` or `G2TRInternViTConfig`, *optional*): InternViT; InternViT-300M-448px by default.
        text_config (`dict` or `Qwen3Config`, *optional*): the LLM; Qwen3-1.7B-shaped by default. The official key
            `llm_config` is accepted as an alias.
        vae_config (`dict`, *optional*): keyword arguments of diffusers' `AutoencoderKLQwenImage` (e.g.
            `QWEN_IMAGE_VAE_CONFIG`). `None` builds no VAE: the model then only runs with `g2tr_ratio=1.0`.
        downsample_ratio (`float`, defaults to 0.5): pixel-shuffle factor (32x32 ViT grid -> 16x16 tokens).
        force_image_size (`int`, *optional*, defaults to 448): input side; overrides `vision_config.image_size`.
        select_layer (`int`, defaults to -1): ViT layer whose output feeds `mlp1`.
        projector_hidden_act (`str`, defaults to `"gelu"`): activation between the two `mlp1` linears.
        projector_layer_norm_eps (`float`, defaults to 1e-5): epsilon of `mlp1.0` (torch's LayerNorm default).
        image_token_id (`int`, defaults to 151671): `<IMG_CONTEXT>`.
        image_start_token_id (`int`, defaults to 151669): `<img>` (also a stop token of text generation).
        image_end_token_id (`int`, defaults to 151670): `</img>`.
        im_end_token_id (`int`, defaults to 151645): `<|im_end|>` (end of turn, the eos).
        special_token_ids (`list[int]`, *optional*): ids of the 10 tokens whose embedding `special_token_embedding`
            replaces at prefill, in the order of `SPECIAL_TOKENS`. Ids of `<quad>`..`<img_uncond>` are unverified
            defaults: the converter should fill them from the tokenizer.
        template (`str`, defaults to `"qwen2_5-chat-v3"`): the official conversation template name.
        system_message (`str`): the default system prompt (the Chinese InternVL identity prompt).
        tie_word_embeddings (`bool`, *optional*): whether `lm_head` shares the input embeddings. Taken from the text
            config when not given (`False` for InternVL-U: its checkpoint stores `lm_head` separately). Set on the
            top-level config on purpose: the base-class default `True` would silently tie an untied checkpoint.

    G2TR options (see [`G2TRConfig`]); InternVL-U defaults:
        g2tr_ratio: 1.0 (off; the paper's setting is 0.5), g2tr_min_keep: 32 (the official demo's value; with 256
        tokens per image it changes nothing for ratios >= 0.125), g2tr_latent_pool: 2 (the official demo's value; the
        official config default is 1; with pool 1 or 2 every token of the 16x16 grid has its own latent cell of the
        56x56 latent, so the selection is a global top-k), g2tr_merge: True, g2tr_merge_scaling: 1.0,
        g2tr_cell_mapping: "corner" (official).
        g2tr_anchor_source (`str`, defaults to `"image"`): what the anchor VAE encodes in understanding. `"image"`:
            the original image, resized by the processor for the VAE (`vae_pixel_values`). `"vit_pixels"`: the
            official code's source, rebuilt from the 448x448 ViT input by undoing a CLIP normalisation (mean
            (0.4815, 0.4578, 0.4082), std (0.2686, 0.2613, 0.2758)) whatever normalisation the ViT pixels had; for
            parity studies against the official G2TR code.
    """

    model_type = "g2tr_internvl_u"
    sub_configs = {"vision_config": G2TRInternViTConfig, "text_config": Qwen3Config}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    vae_config: dict | None = None
    downsample_ratio: float | int = 0.5
    force_image_size: int | None = 448
    select_layer: int = -1
    projector_hidden_act: str = "gelu"
    projector_layer_norm_eps: float = 1e-5
    image_token_id: int = _OFFICIAL_TOKEN_IDS["<IMG_CONTEXT>"]
    image_start_token_id: int = _OFFICIAL_TOKEN_IDS["<img>"]
    image_end_token_id: int = _OFFICIAL_TOKEN_IDS["</img>"]
    im_end_token_id: int = _OFFICIAL_TOKEN_IDS["<|im_end|>"]
    special_token_ids: list[int] | None = None
    template: str = "qwen2_5-chat-v3"
    system_message: str = DEFAULT_SYSTEM_MESSAGE
    tie_word_embeddings: bool | None = None

    # InternVL-U G2TR defaults (the official demo's), restated so that they are visible here.
    g2tr_ratio: float | int = 1.0
    g2tr_min_keep: int = 32
    g2tr_latent_pool: int = 2
    g2tr_merge: bool = True
    g2tr_merge_scaling: float | int = 1.0
    g2tr_cell_mapping: str = "corner"
    g2tr_anchor_source: str = "image"

    def __post_init__(self, **kwargs):
        # The official config.json says `internvlu_chat`; the class attribute must win over a stored value.
        kwargs.pop("model_type", None)
        llm_config = kwargs.pop("llm_config", None)
        if self.text_config is None and llm_config is not None:
            self.text_config = llm_config
        self.vision_config = self._build_vision_config(self.vision_config)
        self.text_config = self._build_text_config(self.text_config)
        if self.special_token_ids is None:
            self.special_token_ids = [_OFFICIAL_TOKEN_IDS[token] for token in SPECIAL_TOKENS]
        self.special_token_ids = [int(i) for i in self.special_token_ids]
        if len(self.special_token_ids) != len(SPECIAL_TOKENS):
            raise ValueError(
                f"`special_token_ids` must hold {len(SPECIAL_TOKENS)} ids (one per token of {list(SPECIAL_TOKENS)}), "
                f"got {len(self.special_token_ids)}."
            )
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        # The inner Qwen3ForCausalLM reads its own config when ties are resolved: keep both in agreement.
        self.text_config.tie_word_embeddings = self.tie_word_embeddings
        if self.vae_config is not None and not isinstance(self.vae_config, dict):
            raise ValueError(
                "`vae_config` must be a dict of AutoencoderKLQwenImage arguments or None, "
                f"got {type(self.vae_config)}."
            )
        self._check_geometry()
        if self.g2tr_anchor_source not in ANCHOR_SOURCES:
            raise ValueError(
                f"`g2tr_anchor_source` must be one of {list(ANCHOR_SOURCES)}, got {self.g2tr_anchor_source!r}."
            )
        super().__post_init__(**kwargs)

    @staticmethod
    def _build_vision_config(vision_config) -> G2TRInternViTConfig:
        if vision_config is None:
            return G2TRInternViTConfig()
        if isinstance(vision_config, dict):
            vision_config = {k: v for k, v in vision_config.items() if k != "model_type"}
            return G2TRInternViTConfig(**vision_config)
        if isinstance(vision_config, PreTrainedConfig):
            return vision_config
        raise ValueError(f"`vision_config` must be a dict or a config, got {type(vision_config)}.")

    @staticmethod
    def _build_text_config(text_config) -> PreTrainedConfig:
        if text_config is None:
            return Qwen3Config(**_DEFAULT_TEXT_CONFIG)
        if isinstance(text_config, dict):
            model_type = text_config.get("model_type", "qwen3")
            if model_type != "qwen3":
                raise ValueError(f"`text_config` must describe a Qwen3 model (model_type 'qwen3'), got {model_type!r}")
            return Qwen3Config(**{k: v for k, v in text_config.items() if k != "model_type"})
        if isinstance(text_config, PreTrainedConfig):
            if getattr(text_config, "model_type", None) != "qwen3":
                raise ValueError(
                    "`text_config` must be a Qwen3 config, got model_type "
                    f"{getattr(text_config, 'model_type', None)!r}."
                )
            return text_config
        raise ValueError(f"`text_config` must be a dict or a Qwen3Config, got {type(text_config)}.")

    def _check_geometry(self) -> None:
        factor = 1.0 / self.downsample_ratio if self.downsample_ratio > 0 else 0.0
        if not float(factor).is_integer() or factor < 1:
            raise ValueError(f"`downsample_ratio` must be 1/n for an integer n >= 1, got {self.downsample_ratio!r}.")
        side = self.vision_image_size // self.vision_config.patch_size
        if self.vision_image_size % self.vision_config.patch_size or side % int(factor):
            raise ValueError(
                f"The image size {self.vision_image_size} must be a multiple of patch_size "
                f"({self.vision_config.patch_size}) times 1/downsample_ratio ({int(factor)})."
            )

    @property
    def vision_image_size(self) -> int:
        """Side of the square ViT input (`force_image_size` when set, else `vision_config.image_size`)."""
        return int(self.force_image_size or self.vision_config.image_size)

    @property
    def image_grid_size(self) -> int:
        """Side of the token grid of one image after the pixel shuffle (16 for InternVL-U)."""
        return int(self.vision_image_size // self.vision_config.patch_size * self.downsample_ratio)

    @property
    def image_seq_length(self) -> int:
        """`<IMG_CONTEXT>` positions per image before reduction (256 for InternVL-U)."""
        return self.image_grid_size**2


# A tiny byte-level vocabulary for tests and examples (no download): the 256 byte tokens take ids 0..255, then
# these special tokens in this order (see `processing_internvlu.build_tiny_tokenizer`).
TINY_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<img_uncond>",
)
TINY_TOKEN_IDS = {token: 256 + index for index, token in enumerate(TINY_SPECIAL_TOKENS)}
TINY_IMAGE_SIZE = 56


def build_tiny_internvlu_config(**overrides: Any) -> G2TRInternVLUConfig:
    """A tiny random-weights configuration matching `processing_internvlu.build_tiny_processor()`.

    56 px images, patch 7: an 8x8 ViT grid, 4x4 = 16 visual tokens per image; ViT width 32 (1 layer), LLM width 64
    (2 layers), a 4-channel Qwen-Image-style VAE (7x7 latent, 4x4 anchors after pool 2: every token has its own
    cell, as at full size). `g2tr_min_keep` is 1 because 32 would keep all 16 tokens.
    """
    ids = TINY_TOKEN_IDS
    z_dim = 4
    values: dict[str, Any] = {
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 7,
        },
        "text_config": {
            "vocab_size": 272,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "tie_word_embeddings": False,
            "pad_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        "vae_config": {
            "base_dim": 8,
            "z_dim": z_dim,
            "dim_mult": [1, 1, 1, 1],
            "num_res_blocks": 1,
            "attn_scales": [],
            "temperal_downsample": [False, True, True],
            "latents_mean": [0.1 * i for i in range(z_dim)],
            "latents_std": [1.0 + 0.5 * i for i in range(z_dim)],
        },
        "force_image_size": TINY_IMAGE_SIZE,
        "image_token_id": ids["<IMG_CONTEXT>"],
        "image_start_token_id": ids["<img>"],
        "image_end_token_id": ids["</img>"],
        "im_end_token_id": ids["<|im_end|>"],
        "special_token_ids": [ids[token] for token in SPECIAL_TOKENS],
        "g2tr_min_keep": 1,
    }
    values.update(overrides)
    return G2TRInternVLUConfig(**values)


__all__ = [
    "DEFAULT_SYSTEM_MESSAGE",
    "TINY_IMAGE_SIZE",
    "TINY_SPECIAL_TOKENS",
    "TINY_TOKEN_IDS",
    "build_tiny_internvlu_config",
    "QWEN_IMAGE_VAE_CONFIG",
    "SPECIAL_TOKENS",
    "G2TRInternViTConfig",
    "G2TRInternVLUConfig",
]


G2TRInternVLUConfig.register_for_auto_class()

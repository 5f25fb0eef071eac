"""Tiny random-weight models built in code (no download): the demo's default and the tests' fixtures."""

from __future__ import annotations

import torch


__all__ = ["TINY_MODELS", "build_tiny", "build_tiny_internvlu_generation"]

TINY_MODELS = ("bagel", "internvlu")


def _tiny_bagel():
    """Hidden 64, 2 MoT layers, 2 ViT layers (width 32), a 4-block VAE (x8, 8-16 channels); images up to 64 px for
    the VAE and 56 px (4x4 patches) for the ViT. `g2tr_min_keep` is 1: the default 32 would keep all 16 tokens."""
    from .configuration_bagel import G2TRBagelConfig
    from .modeling_bagel import G2TRBagelForConditionalGeneration
    from .processing_bagel import build_tiny_bagel_processor, build_tiny_bagel_tokenizer

    _, ids = build_tiny_bagel_tokenizer()
    config = G2TRBagelConfig(
        llm_config=dict(
            vocab_size=ids["vocab_size"],
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        ),
        vit_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vae_config=dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4),
        vit_max_num_patch_per_side=8,
        max_latent_size=8,
        g2tr_min_keep=1,
        **{key: value for key, value in ids.items() if key != "vocab_size"},
    )
    processor = build_tiny_bagel_processor(vit_max_num_patch_per_side=config.vit_max_num_patch_per_side)
    return G2TRBagelForConditionalGeneration(config), processor


def _tiny_internvlu():
    from .configuration_internvlu import build_tiny_internvlu_config
    from .modeling_internvlu import G2TRInternVLUForConditionalGeneration
    from .processing_internvlu import build_tiny_processor

    return G2TRInternVLUForConditionalGeneration(build_tiny_internvlu_config()), build_tiny_processor()


_BUILDERS = {"bagel": _tiny_bagel, "internvlu": _tiny_internvlu}


def build_tiny(name: str, seed: int = 0):
    """A tiny random model and its processor: `(model, processor)`, model in eval mode on the CPU.

    Args:
        name: one of `TINY_MODELS`.
        seed: seeds the random weights (the same seed gives the same model).
    """
    if name not in _BUILDERS:
        raise ValueError(f"`name` must be one of {list(TINY_MODELS)}, got {name!r}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _BUILDERS[name]()
    return model.eval(), processor


def build_tiny_internvlu_generation(seed: int = 0):
    """The tiny InternVL-U (`build_tiny("internvlu", seed)`) with a tiny random generation decoder (2 MMDiT layers,
    context width 2 x 64) and InternVL-U's scheduler: `(model, processor, generation_decoder, scheduler)`, for
    `G2TRInternVLUPipeline`. Images up to 64 px (8x8 latents)."""
    from .modeling_internvlu_gen import G2TRInternVLUGenerationDecoder, build_tiny_generation_decoder_config
    from .pipeline_internvlu import DEFAULT_SCHEDULER_CONFIG, DPMSolverMultistepScheduler

    model, processor = build_tiny("internvlu", seed)
    config = build_tiny_generation_decoder_config(
        latent_channels=model.config.vae_config["z_dim"], context_dim=2 * model.config.text_config.hidden_size
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        decoder = G2TRInternVLUGenerationDecoder(config)
    return model, processor, decoder.eval(), DPMSolverMultistepScheduler(**DEFAULT_SCHEDULER_CONFIG)

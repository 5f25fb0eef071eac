"""The mid-size random BAGEL the CPU benchmarks time: large enough for the LLM to dominate, small enough for CPU.

LLM 12 MoT layers x 1024 (GQA 16/4, MLP 2816); SigLIP 4 layers x 384; a 4-block VAE with 32-64 channels; the
real processor geometry (VAE 1024/512/16, ViT 980/224/14) and the tiny byte-level tokenizer.
"""

from __future__ import annotations

import torch

from g2tr_hf.configuration_bagel import G2TRBagelConfig
from g2tr_hf.modeling_bagel import G2TRBagelForConditionalGeneration
from g2tr_hf.processing_bagel import G2TRBagelImageProcessor, G2TRBagelProcessor, build_tiny_bagel_tokenizer


def mid_size_bagel(min_keep: int = 32, seed: int = 0) -> tuple[G2TRBagelForConditionalGeneration, G2TRBagelProcessor]:
    tokenizer, ids = build_tiny_bagel_tokenizer()
    config = G2TRBagelConfig(
        llm_config=dict(
            vocab_size=ids["vocab_size"], hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
            num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192,
        ),
        vit_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6),
        vae_config=dict(block_out_channels=[32, 64, 64, 64], layers_per_block=1, norm_num_groups=16),
        g2tr_min_keep=min_keep,
        **{key: value for key, value in ids.items() if key != "vocab_size"},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = G2TRBagelForConditionalGeneration(config).eval()
    processor = G2TRBagelProcessor(image_processor=G2TRBagelImageProcessor(), tokenizer=tokenizer)
    return model, processor

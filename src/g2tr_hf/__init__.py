"""g2tr-hf: G2TR generation-guided visual token reduction for unified multimodal models, on transformers."""

from .configuration_g2tr import G2TRConfig
from .reduction import (
    ReductionResult,
    available_methods,
    build_latent_anchors,
    interpolate_channels,
    keep_count,
    latent_cell_index,
    reduce_tokens,
    reduce_tokens_batched,
    register_method,
)


__version__ = "0.1.0.dev0"

__all__ = [
    "G2TRConfig",
    "ReductionResult",
    "available_methods",
    "build_latent_anchors",
    "interpolate_channels",
    "keep_count",
    "latent_cell_index",
    "reduce_tokens",
    "reduce_tokens_batched",
    "register_method",
]

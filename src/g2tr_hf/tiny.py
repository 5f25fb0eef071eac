"""Tiny random-weight models built in code (no download): the demo's default and the tests' fixtures."""

from __future__ import annotations

import torch


__all__ = ["TINY_MODELS", "build_tiny"]

TINY_MODELS = ("internvlu",)


def _tiny_internvlu():
    from .configuration_internvlu import build_tiny_internvlu_config
    from .modeling_internvlu import G2TRInternVLUForConditionalGeneration
    from .processing_internvlu import build_tiny_processor

    return G2TRInternVLUForConditionalGeneration(build_tiny_internvlu_config()), build_tiny_processor()


_BUILDERS = {"internvlu": _tiny_internvlu}


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

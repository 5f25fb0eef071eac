"""The few names that differ between the transformers releases this package supports (5.17 to the newest), and
the small helpers both model files need to stay portable (across releases and across accelerate's offloading).

This module travels to the Hub with the model files, so exported repositories keep working whatever transformers
their users have installed: every version-dependent name is looked up here, once, by inspecting the installed
library rather than by comparing version strings (a feature check survives backports and release candidates).

- transformers 5.24 renamed the cache argument of model `forward`s, of `prepare_inputs_for_generation` and the
  cache field of model outputs from `past_key_values` to `cache` (the old keyword is still accepted by the library,
  with a deprecation message, and a dataclass output that still DECLARES `past_key_values` fails to build).
  `CACHE_KWARG` is the name the installed release uses.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast


__all__ = [
    "CACHE_KWARG",
    "LEGACY_CACHE_KWARG",
    "checkpoint_key",
    "compute_dtype",
    "drop_parallel_plans",
    "execution_device",
    "output_cache",
    "pop_cache_argument",
    "register_checkpoint_renames",
]

# Both names a caller may use for the KV cache; the first is the installed release's own.
LEGACY_CACHE_KWARG = "past_key_values"
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else LEGACY_CACHE_KWARG


def pop_cache_argument(past_key_values: Any, kwargs: dict[str, Any]) -> Any:
    """The cache a caller passed under either name (`past_key_values=` or transformers 5.24's `cache=`).

    `kwargs` loses its `cache` entry. Passing two different objects under the two names is an error.
    """
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the KV cache once, as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


def output_cache(outputs: Any) -> Any:
    """The KV cache held by a model output or generate output, whatever the field is called."""
    if isinstance(outputs, dict):
        for name in (CACHE_KWARG, LEGACY_CACHE_KWARG):
            if outputs.get(name) is not None:
                return outputs[name]
        return None
    return getattr(outputs, CACHE_KWARG, None)


def drop_parallel_plans(model: nn.Module) -> None:
    """Remove the tensor- and pipeline-parallel plans that `model` inherited from the stock decoders it contains.

    Qwen2/Qwen3 configs and heads carry plans for their own module trees; our models wrap those decoders with image
    blocks, compaction and a compact cache that the plans know nothing about, and tensor parallelism has not been
    tested on them. So the models advertise no plan (`tp_plan="auto"` then refuses to load them) rather than one that
    might split them wrongly. Call after `post_init` (which collects the plans).
    """
    for module in model.modules():
        for name in ("_tp_plan", "_pp_plan"):
            if getattr(module, name, None):
                setattr(module, name, {})
        config = getattr(module, "config", None)
        for sub in (config, *(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})):
            for name in ("base_model_tp_plan", "base_model_pp_plan"):
                if sub is not None and getattr(sub, name, None):
                    setattr(sub, name, None)


def register_checkpoint_renames(model_type: str, renames: tuple[tuple[str, str], ...]) -> None:
    """Have transformers rename checkpoint keys on load, and back on save, for models of `model_type`.

    Args:
        renames: (checkpoint prefix, module prefix) pairs of dotted names without a trailing dot, e.g.
            `("language_model.lm_head", "lm_head")`: the official checkpoints keep their own names on disk while the
            module tree follows transformers' base-model / head split. A prefix matches whole names only
            (`vae` does not match `vae2llm`). `register_checkpoint_conversion_mapping` has this signature from 5.17 on.
    """
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    # transformers ends a pattern that ends in a letter or digit on a name boundary, and reverses a renaming on save
    # by using the module prefix as the pattern.
    mapping = [WeightRenaming("^" + re.escape(stored), module) for stored, module in renames]
    register_checkpoint_conversion_mapping(model_type, mapping, overwrite=True)


def checkpoint_key(module_key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """The name under which the checkpoint stores the state-dict entry `module_key` (inverse of the renames)."""
    for stored, module in renames:
        if module_key.startswith(module + "."):
            return stored + module_key[len(module) :]
    return module_key


def execution_device(module: nn.Module) -> Any:
    """Where `module` computes, or None when accelerate has offloaded its weights (they sit on the meta device until
    its hook loads them, and that hook also moves the module's inputs). Inputs are moved to this device only when it
    is known; reading `.weight.device` of an offloaded module would move them to the meta device instead.

    Under model CPU offload (accelerate's `cpu_offload_with_hook`, a hook with a `prev_module_hook`) the weights wait
    on the CPU and the hook moves the module, but not the inputs of methods other than `forward` (diffusers' VAE
    `encode` / `decode`): the hook's execution device is where they must go."""
    hook = getattr(module, "_hf_hook", None)
    if hasattr(hook, "prev_module_hook") and getattr(hook, "execution_device", None) is not None:
        return hook.execution_device
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return None


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The floating-point dtype `module` computes in, for casting its inputs: that of its first floating-point
    parameter, or None (cast nothing) when it has none.

    A quantized weight must never decide an input's dtype: bitsandbytes stores its weights as int8 (8-bit) or uint8
    (4-bit) tensors, and an input cast to them is destroyed (to integers, silently, or with an error much later).
    Those weights are skipped here, so a quantized linear layer answers with its bias's dtype (or None without a
    bias, and the layer casts for itself); torchao's quantized tensors report the original floating dtype. An
    offloaded parameter (on the meta device) still carries its dtype.
    """
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return None

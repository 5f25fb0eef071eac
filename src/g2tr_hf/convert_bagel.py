"""Turn an official BAGEL-7B-MoT snapshot into a folder that `from_pretrained` loads.

The official snapshot (ByteDance-Seed/BAGEL-7B-MoT) holds `llm_config.json`, `vit_config.json`, `ema.safetensors`
(every weight but the VAE, with our module names), `ae.safetensors` (the FLUX AE in the original BFL/LDM key
format) and the Qwen2.5 tokenizer files. The converted folder holds:

- `config.json` (`G2TRBagelConfig` with `auto_map`) and `generation_config.json`;
- `ema.safetensors` as a hard link (or a symbolic link, or a copy: no 29 GB copy where a link serves) and
  `model.safetensors.index.json` pointing every checkpoint key at it;
- `vae.safetensors`: the AE converted to diffusers `AutoencoderKL` keys under `vae.` (the only renaming);
- the tokenizer and processor files, the flat remote code and a model card.

The folder is written atomically: a failed conversion leaves no destination folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig
from transformers.utils import logging

from .configuration_bagel import G2TRBagelConfig
from .hub import atomic_directory, model_auto_map, remote_code_files, render_model_card
from .modeling_bagel import G2TRBagelForConditionalGeneration
from .processing_bagel import G2TRBagelImageProcessor, G2TRBagelProcessor


logger = logging.get_logger(__name__)

__all__ = ["convert_bagel"]

REQUIRED_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors")
VIT_LAYER_PREFIX = "vit_model.vision_model.encoder.layers."
# Upstream BAGEL drops the last SigLIP layer after reading vit_config.json (shared/specs/bagel.md §1.1).
VIT_LAYERS_DROPPED = 1


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _checkpoint_keys(path: Path) -> tuple[list[str], torch.dtype | None]:
    with safe_open(path, framework="pt") as handle:
        keys = list(handle.keys())
        dtype = handle.get_slice(keys[0]).get_dtype() if keys else None
    return keys, {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtype)


def _vit_layers_in(keys: list[str]) -> int:
    layers = {int(k[len(VIT_LAYER_PREFIX):].split(".", 1)[0]) for k in keys if k.startswith(VIT_LAYER_PREFIX)}
    return len(layers)


def _build_config(source: Path, ema_keys: list[str], tokenizer, ratio: float) -> G2TRBagelConfig:
    llm = _read_json(source / "llm_config.json")
    vit = _read_json(source / "vit_config.json")
    vit["num_hidden_layers"] = vit["num_hidden_layers"] - VIT_LAYERS_DROPPED
    vit.pop("rope", None)
    found = _vit_layers_in(ema_keys)
    if found != vit["num_hidden_layers"]:
        raise ValueError(
            f"vit_config.json lists {vit['num_hidden_layers'] + VIT_LAYERS_DROPPED} SigLIP layers, so ema.safetensors "
            f"should hold {vit['num_hidden_layers']} (upstream drops the last), but it holds {found}."
        )
    token_ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in {
            "bos_token_id": "<|im_start|>",
            "eos_token_id": "<|im_end|>",
            "pad_token_id": "<|endoftext|>",
            "image_token_id": "<|image_pad|>",
            "vision_start_token_id": "<|vision_start|>",
            "vision_end_token_id": "<|vision_end|>",
        }.items()
    }
    if any(value is None or value == tokenizer.unk_token_id for value in token_ids.values()):
        raise ValueError(f"the tokenizer in the source folder lacks BAGEL's special tokens: {token_ids}.")
    return G2TRBagelConfig(llm_config=llm, vit_config=vit, g2tr_ratio=ratio, **token_ids)


def _convert_vae(source: Path, vae_config: dict) -> dict[str, torch.Tensor]:
    """The FLUX AE from BFL/LDM keys to diffusers `AutoencoderKL` keys, under the `vae.` prefix."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with safe_open(source / "ae.safetensors", framework="pt") as handle:
        ldm = {key: handle.get_tensor(key) for key in handle.keys()}
    converted = convert_ldm_vae_checkpoint(ldm, vae_config)
    return {f"vae.{key}": value.contiguous() for key, value in converted.items()}


def _expected_keys(config: G2TRBagelConfig) -> set[str]:
    """State-dict keys of the model built from `config`, on the meta device (no memory, any size)."""
    with torch.device("meta"):
        model = G2TRBagelForConditionalGeneration(config)
    return set(model.state_dict().keys())


def _place_weights(source: Path, target: Path, link: str) -> None:
    if link == "copy":
        shutil.copy2(source, target)
        return
    if link == "hardlink":
        try:
            os.link(source, target)
            return
        except OSError as error:  # another file system: fall back to a symbolic link
            logger.info("hard link of %s failed (%s); using a symbolic link", source, error)
    os.symlink(source.resolve(), target)


def convert_bagel(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    ratio: float = 0.5,
    link: Literal["hardlink", "symlink", "copy"] = "hardlink",
    model_card: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an official BAGEL-7B-MoT snapshot folder `source` into a loadable folder `destination`.

    Args:
        source: folder with llm_config.json, vit_config.json, ema.safetensors, ae.safetensors and tokenizer files.
        destination: the folder to write (atomically).
        ratio: `g2tr_ratio` stored in config.json (the paper's 0.5; 1.0 stores the reduction off). Any load can
            override it with `from_pretrained(..., g2tr_ratio=r)`.
        link: how `ema.safetensors` reaches the destination: a hard link (symbolic link if that fails), a
            symbolic link, or a copy.
        model_card: a model card template (`$name` placeholders, see `model_cards/bagel.md`).
        overwrite: replace an existing destination.
    Returns:
        The destination folder.
    """
    source = Path(source)
    if link not in ("hardlink", "symlink", "copy"):
        raise ValueError(f"`link` must be 'hardlink', 'symlink' or 'copy', got {link!r}.")
    if not source.is_dir():
        raise ValueError(f"`source` {str(source)!r} is not a folder.")
    missing = [name for name in REQUIRED_FILES if not (source / name).is_file()]
    has_tokenizer = (source / "tokenizer.json").is_file() or all(
        (source / name).is_file() for name in ("vocab.json", "merges.txt")
    )
    if not has_tokenizer:
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise ValueError(f"`source` {str(source)!r} is not a BAGEL-7B-MoT snapshot: missing {', '.join(missing)}.")

    tokenizer = AutoTokenizer.from_pretrained(source)
    ema_keys, dtype = _checkpoint_keys(source / "ema.safetensors")
    config = _build_config(source, ema_keys, tokenizer, ratio)
    if dtype is not None:
        config.dtype = dtype
    vae_state = _convert_vae(source, config.vae_config)

    weight_map = {key: "ema.safetensors" for key in ema_keys}
    weight_map.update({key: "vae.safetensors" for key in vae_state})
    expected = _expected_keys(config)
    absent = sorted(expected - set(weight_map))
    if absent:
        raise ValueError(f"the snapshot lacks {len(absent)} weights the model needs, e.g. {absent[:5]}.")
    unused = sorted(set(weight_map) - expected)
    if unused:
        logger.warning("%d checkpoint keys are not used by the model, e.g. %s", len(unused), unused[:5])

    processor = G2TRBagelProcessor(image_processor=G2TRBagelImageProcessor(), tokenizer=tokenizer)
    config.auto_map = model_auto_map(type(config), G2TRBagelForConditionalGeneration, type(processor))

    with atomic_directory(destination, overwrite=overwrite) as staging:
        _place_weights(source / "ema.safetensors", staging / "ema.safetensors", link)
        save_file(vae_state, staging / "vae.safetensors", metadata={"format": "pt"})
        total = (source / "ema.safetensors").stat().st_size + (staging / "vae.safetensors").stat().st_size
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        config.save_pretrained(staging)
        GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        ).save_pretrained(staging)
        processor.save_pretrained(staging)
        for code in remote_code_files([type(config), G2TRBagelForConditionalGeneration, type(processor)]):
            shutil.copy2(code, staging / code.name)
        if model_card is not None:
            card = render_model_card(Path(model_card), ratio=ratio, source=source.name)
            (staging / "README.md").write_text(card, encoding="utf-8")
    logger.info("Converted %s to %s", source, destination)
    return Path(destination)

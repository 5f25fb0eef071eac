"""Turn an official BAGEL-7B-MoT snapshot into a folder that `from_pretrained` loads.

The official snapshot (ByteDance-Seed/BAGEL-7B-MoT) holds `llm_config.json`,
`vit_config.json`, `ema.safetensors` (every weight but the VAE, with our module names), `ae.safetensors` (the FLUX AE
in the original BFL/LDM key format) and the Qwen2.5 tokenizer files; its `config.json` is either a name-only file that
is not valid JSON or a `BagelConfig` dump without `auto_map`, depending on the revision, so it is never read. The
converted folder holds:

- `config.json` (`G2TRBagelConfig` with `auto_map`) and `generation_config.json`;
- `ema.safetensors` as a hard link (or a symbolic link, or a copy: no 29 GB copy where a link serves) and
  `model.safetensors.index.json` pointing every checkpoint key at it;
- `vae.safetensors`: the AE converted to diffusers `AutoencoderKL` keys under `vae.` (the only renaming);
- the tokenizer and processor files, the flat remote code and a model card.

With `max_shard_size` the weights are instead re-written as `model-0000i-of-0000n.safetensors` shards (every tensor
copied bit for bit, one shard in memory at a time): the layout to upload, since the Hub recommends files of at most
5 GB and `ema.safetensors` is about 29 GB. The linked layout is exact too, and costs no disk space.

Every shape is checked against the model the config describes before anything is written, and the folder is written
atomically: a failed conversion leaves no destination folder behind.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config
from transformers.utils import logging

from .compat import checkpoint_key
from .configuration_bagel import G2TRBagelConfig
from .hub import (
    atomic_directory,
    model_auto_map,
    model_card_template,
    model_pipelines,
    place_file,
    render_model_card,
    shard_size_bytes,
    write_remote_code,
    write_safetensors_shards,
)
from .modeling_bagel import CHECKPOINT_RENAMES, G2TRBagelForConditionalGeneration
from .processing_bagel import G2TRBagelImageProcessor, G2TRBagelProcessor


logger = logging.get_logger(__name__)

__all__ = ["convert_bagel"]

REQUIRED_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors")
VIT_LAYER_PREFIX = "vit_model.vision_model.encoder.layers."
# Upstream BAGEL drops the last SigLIP layer after reading vit_config.json.
VIT_LAYERS_DROPPED = 1
# Config sides that the checkpoint fixes through the row count (side * side) of a stored position table. Reading them
# from the weights matters: upstream's BagelConfig defaults `max_latent_size` to 32, inference sets 64.
TABLE_SIDES = {"vit_max_num_patch_per_side": "vit_pos_embed.pos_embed", "max_latent_size": "latent_pos_embed.pos_embed"}
# Config fields the snapshot itself provides; `config_overrides` may not replace them.
DERIVED_FIELDS = ("llm_config", "vit_config", "g2tr_ratio")
# The official resize rules: the maxima are exactly what the position tables cover (70 x 14 px for the ViT,
# 64 latent tokens x 16 px for the VAE), so smaller tables (tiny test models) get proportionally smaller maxima.
OFFICIAL_RESIZE = {"vae_max_size": 1024, "vae_min_size": 512, "vit_max_size": 980, "vit_min_size": 224}
SPECIAL_TOKENS = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "pad_token_id": "<|endoftext|>",
    "image_token_id": "<|image_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"`source`: cannot read {path.name}: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"`source`: {path.name} must hold a JSON object, got {type(value).__name__}.")
    return value


def _tensor_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], torch.dtype | None]:
    """Shape of every tensor in a safetensors file (header only, nothing is loaded) and its floating dtype."""
    try:
        with safe_open(path, framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            shapes = {key: tuple(piece.get_shape()) for key, piece in slices.items()}
            dtypes = {piece.get_dtype() for piece in slices.values()}
    except Exception as error:  # safetensors raises its own error type for a corrupt or truncated header
        raise ValueError(f"`source`: {path.name} is not a readable safetensors file: {error}") from error
    if not shapes:
        raise ValueError(f"`source`: {path.name} holds no tensors.")
    floating = [_SAFETENSORS_DTYPES[name] for name in sorted(dtypes) if name in _SAFETENSORS_DTYPES]
    return shapes, floating[0] if len(floating) == 1 else None


def _check_source(source: Path) -> None:
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


def _check_destination(source: Path, destination: Path) -> None:
    source, destination = source.resolve(), destination.resolve()
    if destination == source or source in destination.parents or destination in source.parents:
        raise ValueError(f"`destination` {str(destination)!r} must not be, contain or lie inside `source`.")


def _load_tokenizer(source: Path, llm: dict):
    # AutoTokenizer reads config.json, which early snapshots ship as invalid JSON: hand it the LLM config instead.
    llm_config = Qwen2Config(**{key: value for key, value in llm.items() if key != "model_type"})
    tokenizer = AutoTokenizer.from_pretrained(source, config=llm_config)
    token_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in SPECIAL_TOKENS.items()}
    absent = [SPECIAL_TOKENS[name] for name, value in token_ids.items() if value in (None, tokenizer.unk_token_id)]
    if absent:
        raise ValueError(f"`source`: the tokenizer lacks BAGEL's special tokens {absent} (BAGEL uses Qwen2.5's).")
    return tokenizer, token_ids


def _vit_layers_in(shapes: Mapping[str, tuple[int, ...]]) -> int:
    layers = {int(key[len(VIT_LAYER_PREFIX):].split(".", 1)[0]) for key in shapes if key.startswith(VIT_LAYER_PREFIX)}
    return len(layers)


def _table_sides(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    sides = {}
    for name, key in TABLE_SIDES.items():
        if key not in shapes:
            continue  # visual_und / visual_gen off: the coverage check reports it if the model needs the table
        rows = shapes[key][0]
        side = math.isqrt(rows)
        if side * side != rows:
            raise ValueError(f"`source`: ema.safetensors {key} has {rows} rows, not a square grid.")
        sides[name] = side
    return sides


def _build_config(
    llm: dict,
    vit: dict,
    ema_shapes: Mapping[str, tuple[int, ...]],
    token_ids: dict[str, int],
    ratio: float,
    overrides: Mapping[str, Any],
) -> G2TRBagelConfig:
    vit = {key: value for key, value in vit.items() if key != "rope"}  # upstream sets rope=False itself
    listed = vit.get("num_hidden_layers")
    if not isinstance(listed, int) or listed <= VIT_LAYERS_DROPPED:
        raise ValueError(f"`source`: vit_config.json needs an integer num_hidden_layers > 1, got {listed!r}.")
    vit["num_hidden_layers"] = listed - VIT_LAYERS_DROPPED
    found = _vit_layers_in(ema_shapes)
    if found != vit["num_hidden_layers"]:
        raise ValueError(
            f"`source`: vit_config.json lists {listed} SigLIP layers, so ema.safetensors should hold "
            f"{vit['num_hidden_layers']} (upstream drops the last one), but it holds {found}."
        )
    fields = {**_table_sides(ema_shapes), **token_ids, **overrides}
    return G2TRBagelConfig(llm_config=dict(llm), vit_config=vit, g2tr_ratio=ratio, **fields)


def _check_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"`config_overrides` must be a mapping of G2TRBagelConfig fields, got {type(overrides)}.")
    fields = G2TRBagelConfig.__dataclass_fields__
    unknown = sorted(key for key in overrides if key not in fields)
    derived = sorted(key for key in overrides if key in DERIVED_FIELDS)
    if unknown:
        raise ValueError(f"`config_overrides`: {unknown} are not G2TRBagelConfig fields.")
    if derived:
        raise ValueError(f"`config_overrides`: {derived} come from the snapshot and `ratio`, not from overrides.")
    return dict(overrides)


def _convert_vae(path: Path, vae_config: dict) -> dict[str, torch.Tensor]:
    """The FLUX AE from BFL/LDM keys to diffusers `AutoencoderKL` keys, under the `vae.` prefix.

    diffusers' single-file converter silently skips keys it has no rule for, so every source tensor must show up in
    its output (matched by data pointer: the attention weights come back as views of 1x1 conv weights).
    """
    try:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    except ImportError as error:
        raise ImportError("convert_bagel needs diffusers to convert the FLUX VAE: pip install diffusers") from error

    with safe_open(path, framework="pt") as handle:
        ldm = {key: handle.get_tensor(key) for key in handle.keys()}
    converted = convert_ldm_vae_checkpoint(ldm, vae_config)
    used = {tensor.data_ptr() for tensor in converted.values()}
    unused = sorted(key for key, tensor in ldm.items() if tensor.data_ptr() not in used)
    if unused:
        raise ValueError(
            f"`source`: ae.safetensors holds {len(unused)} tensors that are not FLUX AE (BFL/LDM) weights, e.g. "
            f"{unused[:5]}."
        )
    return {f"vae.{key}": value.contiguous() for key, value in converted.items()}


def _check_weights(config: G2TRBagelConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every weight of the model `config` describes is present with the right shape (meta device: any size, no
    memory). Extra checkpoint keys are only logged."""
    with torch.device("meta"):
        model = G2TRBagelForConditionalGeneration(config)
    expected = {
        checkpoint_key(key, CHECKPOINT_RENAMES): tuple(value.shape) for key, value in model.state_dict().items()
    }
    absent = sorted(set(expected) - set(shapes))
    if absent:
        raise ValueError(f"`source`: the snapshot lacks {len(absent)} weights the model needs, e.g. {absent[:5]}.")
    wrong = [f"{key}: {shapes[key]} (expected {shape})" for key, shape in expected.items() if shapes[key] != shape]
    if wrong:
        raise ValueError(f"`source`: {len(wrong)} weights do not fit the configuration, e.g. {wrong[:3]}.")
    unused = sorted(set(shapes) - set(expected))
    if unused:
        logger.warning("%d checkpoint keys are not used by the model, e.g. %s", len(unused), unused[:5])


def _build_processor(config: G2TRBagelConfig, tokenizer) -> G2TRBagelProcessor:
    """The official image transforms, with position ids and maximum sizes following the config's tables."""
    patch = config.vit_config.patch_size
    vae_stride = 2 ** (len(config.vae_config["block_out_channels"]) - 1) * config.latent_patch_size
    vit_max = min(OFFICIAL_RESIZE["vit_max_size"], config.vit_max_num_patch_per_side * patch)
    vae_max = min(OFFICIAL_RESIZE["vae_max_size"], config.max_latent_size * vae_stride)
    image_processor = G2TRBagelImageProcessor(
        vit_patch_size=patch,
        vit_max_num_patch_per_side=config.vit_max_num_patch_per_side,
        vit_max_size=vit_max,
        vit_min_size=min(OFFICIAL_RESIZE["vit_min_size"], vit_max),
        vae_stride=vae_stride,
        vae_max_size=vae_max,
        vae_min_size=min(OFFICIAL_RESIZE["vae_min_size"], vae_max),
    )
    return G2TRBagelProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _link_weights(
    source: Path, staging: Path, ema_shapes: Mapping[str, tuple[int, ...]], vae_state: dict, link: str
) -> None:
    """`ema.safetensors` placed by `link`, the converted VAE as `vae.safetensors`, and the index over both."""
    place_file(source / "ema.safetensors", staging / "ema.safetensors", link)
    save_file(vae_state, staging / "vae.safetensors", metadata={"format": "pt"})
    weight_map = {key: "ema.safetensors" for key in ema_shapes}
    weight_map.update({key: "vae.safetensors" for key in vae_state})
    total = (source / "ema.safetensors").stat().st_size + (staging / "vae.safetensors").stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def convert_bagel(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    ratio: float = 0.5,
    link: Literal["hardlink", "symlink", "copy"] = "hardlink",
    model_card: str | os.PathLike | None = None,
    overwrite: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Convert an official BAGEL-7B-MoT snapshot folder `source` into a loadable folder `destination`.

    Args:
        source: folder with llm_config.json, vit_config.json, ema.safetensors, ae.safetensors and tokenizer files.
        destination: the folder to write (atomically); it must not be `source` or lie inside it.
        ratio: `g2tr_ratio` stored in config.json (the paper's 0.5; 1.0 stores the reduction off). Any load can
            override it with `from_pretrained(..., g2tr_ratio=r)`.
        link: how `ema.safetensors` reaches the destination: a hard link (a symbolic link where the file systems
            differ), a symbolic link (the destination then needs `source` to stay in place), or a copy.
        model_card: a model card template file (`$repo_id`, `$ratio`, `$min_keep` and `$source` placeholders)
            written as README.md; None uses the template shipped with the package (`g2tr_hf/model_cards/bagel.md`;
            `model_cards/bagel.md` in the repository shows it filled in).
        overwrite: replace an existing non-empty destination.
        config_overrides: `G2TRBagelConfig` fields the official files do not carry, e.g. `g2tr_min_keep`, or
            `vae_config` for an autoencoder that is not the FLUX AE (the default). The LLM and ViT configs always
            come from the snapshot and the ratio from `ratio`; the position-table sides (read from the stored
            tables) and the special token ids (read from the tokenizer) can be overridden.
        max_shard_size: None (default) links `ema.safetensors` as described by `link`; a size in bytes or like
            "5GB" re-writes all weights as shards of at most that size instead (`link` is then not used).
    Returns:
        The destination folder.
    """
    source, destination = Path(source), Path(destination)
    if link not in ("hardlink", "symlink", "copy"):
        raise ValueError(f"`link` must be 'hardlink', 'symlink' or 'copy', got {link!r}.")
    _check_source(source)
    _check_destination(source, destination)
    overrides = _check_overrides(config_overrides)
    if max_shard_size is not None:
        shard_size_bytes(max_shard_size)

    llm, vit = _read_json(source / "llm_config.json"), _read_json(source / "vit_config.json")
    tokenizer, token_ids = _load_tokenizer(source, llm)
    ema_shapes, dtype = _tensor_shapes(source / "ema.safetensors")
    _tensor_shapes(source / "ae.safetensors")  # a clear error for a corrupt file before diffusers reads it
    config = _build_config(llm, vit, ema_shapes, token_ids, ratio, overrides)
    if dtype is not None:
        config.dtype = dtype
    vae_state = _convert_vae(source / "ae.safetensors", config.vae_config)
    _check_weights(config, {**ema_shapes, **{key: tuple(value.shape) for key, value in vae_state.items()}})

    processor = _build_processor(config, tokenizer)
    config.auto_map = model_auto_map(type(config), G2TRBagelForConditionalGeneration, type(processor))
    custom_pipelines, pipeline_classes = model_pipelines(config)
    if custom_pipelines:
        config.custom_pipelines = custom_pipelines
    template = Path(model_card) if model_card is not None else model_card_template("bagel")
    card = render_model_card(
        template, repo_id=destination.name, ratio=ratio, min_keep=config.g2tr_min_keep, source=source.name
    )

    with atomic_directory(destination, overwrite=overwrite) as staging:
        if max_shard_size is None:
            _link_weights(source, staging, ema_shapes, vae_state, link)
        else:
            tensors = {key: (source / "ema.safetensors", key) for key in ema_shapes}
            write_safetensors_shards({**tensors, **vae_state}, staging, max_shard_size)
        config.save_pretrained(staging)
        GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        ).save_pretrained(staging)
        processor.save_pretrained(staging)
        write_remote_code(staging, [type(config), G2TRBagelForConditionalGeneration, type(processor), *pipeline_classes])
        (staging / "README.md").write_text(card, encoding="utf-8")
    logger.info("Converted %s to %s", source, destination)
    return destination

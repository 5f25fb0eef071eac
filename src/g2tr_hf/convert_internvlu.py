"""Turn an official InternVL-U snapshot (InternVL-U/InternVL-U) into one folder that `from_pretrained` loads.

The official repository is a diffusers-style multi-folder pipeline:

    model_index.json
    vlm/config.json                   InternVLUChatConfig (model_type internvlu_chat): vision_config, llm_config, ...
    vlm/model.safetensors             658 tensors with our module names (or an index + shards)
    vae/config.json                   diffusers AutoencoderKLQwenImage
    vae/diffusion_pytorch_model.safetensors   194 tensors, diffusers names (or an index + shards)
    processor/                        tokenizer files + processor_config.json
    generation_decoder/, scheduler/   the image-generation head (MMDiT + DPM-Solver++ settings)

The converted folder holds:

- `config.json` (`G2TRInternVLUConfig` with `auto_map`): the vision and LLM sub-configs of `vlm/config.json`, the
  special-token ids read from the snapshot's own tokenizer, and `vae/config.json` as `vae_config`;
- the `vlm/` safetensors as hard links (or symbolic links, or copies) named `vlm-<file>`: no 4.7 GB copy where a
  link serves;
- `vae.safetensors`: the VAE tensors under the `vae.` prefix of our module tree. This is the one file that is
  rewritten (about 250 MB): safetensors keys cannot be renamed in place, and an index can only point a key at a
  file holding that exact key;
- `model.safetensors.index.json` mapping every key to one of those files;
- the tokenizer and processor files, `generation_config.json` (stops at `<|im_end|>` and `<img>`), the flat remote
  code and a model card;
- when the snapshot has them (or `generation=True`): `generation_decoder/` (its safetensors linked as they are,
  the official names load unchanged, and our config with the snapshot's values plus the generation image
  processor's resize limits) and `scheduler/scheduler_config.json`, and `config.json` lists `G2TRInternVLUPipeline`
  under `custom_pipelines` (editing and text-to-image from the same folder). Without them the folder is the
  understanding model alone.

With `max_shard_size` the weights (`vlm/` and VAE) are instead re-written as `model-0000i-of-0000n.safetensors`
shards, every tensor copied bit for bit, one shard in memory at a time.

The folder is written atomically: a failed conversion leaves no destination folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig
from transformers.utils import logging

from .compat import checkpoint_key
from .configuration_internvlu import SPECIAL_TOKENS, G2TRInternVLUConfig
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
from .modeling_internvlu import CHECKPOINT_RENAMES, G2TRInternVLUForConditionalGeneration
from .processing_internvlu import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VAE_MEAN,
    VAE_STD,
    G2TRInternVLUImageProcessor,
    G2TRInternVLUProcessor,
)


logger = logging.get_logger(__name__)

__all__ = ["convert_internvlu"]

VLM_FOLDER = "vlm"
VAE_FOLDER = "vae"
DECODER_FOLDER = "generation_decoder"
SCHEDULER_FOLDER = "scheduler"
# Where the tokenizer may live, in the order searched: the official snapshot keeps it in `processor/` (vLLM-Omni
# loads it with tokenizer_subdir="processor"); the others accept hand-assembled snapshots.
TOKENIZER_FOLDERS = ("processor", "tokenizer", "vlm", ".")
VAE_CLASS = "AutoencoderKLQwenImage"
OFFICIAL_TEMPLATE = "qwen2_5-chat-v3"
# Keys of vlm/config.json that describe the upstream code rather than the model; ours replace them.
_UPSTREAM_ONLY_KEYS = (
    "architectures", "auto_map", "model_type", "_name_or_path", "_commit_hash", "transformers_version"
)
# Attention-kernel choices stored by upstream (flash-attn); ours default to SDPA at load time.
_ATTENTION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_autoset", "use_flash_attn")
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------------------------


def _weight_files(folder: Path, default_name: str) -> list[Path]:
    """The safetensors files of one component: those its `<default_name>.index.json` names, else the single file.

    Raises `ValueError` naming what is missing (a shard of the index, or any weights at all).
    """
    index = folder / f"{default_name}.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not names:
            raise ValueError(f"{index} has an empty `weight_map`.")
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are missing from {folder}: {', '.join(missing)}.")
        return [folder / name for name in names]
    if (folder / default_name).is_file():
        return [folder / default_name]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if not found:
        raise ValueError(f"{folder} holds no safetensors weights (expected {default_name} or its index).")
    raise ValueError(
        f"{folder} holds {len(found)} safetensors files but no {default_name}.index.json to say which to use."
    )


def _file_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, safetensors dtype) of one file, from its header only (no tensor is read)."""
    try:
        with safe_open(path, framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            return {key: (tuple(piece.get_shape()), piece.get_dtype()) for key, piece in slices.items()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def _tensor_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """key -> (file, shape, safetensors dtype) over all `files`; a key stored twice is an error."""
    headers: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for path in files:
        for key, (shape, dtype) in _file_header(path).items():
            if key in headers:
                raise ValueError(f"the tensor {key!r} is stored twice: in {headers[key][0]} and {path}.")
            headers[key] = (path, shape, dtype)
    return headers


def _majority_dtype(headers: dict[str, tuple[Path, tuple[int, ...], str]]) -> torch.dtype | None:
    counts: dict[str, int] = {}
    for _, _, dtype in headers.values():
        counts[dtype] = counts.get(dtype, 0) + 1
    return _SAFETENSORS_DTYPES.get(max(counts, key=counts.get)) if counts else None


def _linked_name(path: Path) -> str:
    """Name of a `vlm/` file in the destination. Never `model.safetensors`: transformers would load that file alone
    and ignore the index that also points at the VAE."""
    return f"{VLM_FOLDER}-{path.name}"


def _write_vae(files: list[Path], target: Path) -> int:
    """Copy the VAE tensors into `target` under the `vae.` prefix (diffusers names kept). Returns the file size."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            state.update({f"{VAE_FOLDER}.{key}": handle.get_tensor(key).contiguous() for key in handle.keys()})
    save_file(state, target, metadata={"format": "pt"})
    return target.stat().st_size


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer, config, processor
# ----------------------------------------------------------------------------------------------------------------


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))


def _tokenizer_folder(source: Path) -> Path | None:
    for name in TOKENIZER_FOLDERS:
        if _has_tokenizer(source / name):
            return source / name
    return None


def _token_id(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.unk_token_id else int(token_id)


def _special_token_config(tokenizer, vocab_size: int) -> dict[str, Any]:
    """The token-id fields of `G2TRInternVLUConfig`, read from the snapshot's tokenizer."""
    needed = ("<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>") + SPECIAL_TOKENS
    ids = {token: _token_id(tokenizer, token) for token in dict.fromkeys(needed)}
    missing = [token for token, token_id in ids.items() if token_id is None]
    if missing:
        raise ValueError(f"the snapshot's tokenizer lacks the InternVL-U special tokens {missing}.")
    outside = {token: token_id for token, token_id in ids.items() if token_id >= vocab_size}
    if outside:
        raise ValueError(f"token ids {outside} do not fit the LLM's vocab_size {vocab_size} (llm_config).")
    return {
        "image_token_id": ids["<IMG_CONTEXT>"],
        "image_start_token_id": ids["<img>"],
        "image_end_token_id": ids["</img>"],
        "im_end_token_id": ids["<|im_end|>"],
        "special_token_ids": [ids[token] for token in SPECIAL_TOKENS],
    }


def _clean_sub_config(values: dict) -> dict:
    return {key: value for key, value in values.items() if key not in _ATTENTION_KEYS}


def _vae_config(path: Path) -> dict:
    """The `AutoencoderKLQwenImage` arguments of `vae/config.json` (diffusers bookkeeping keys dropped)."""
    raw = _read_json(path)
    class_name = raw.get("_class_name", VAE_CLASS)
    if class_name != VAE_CLASS:
        raise ValueError(f"{path} describes a {class_name!r}; InternVL-U's VAE is diffusers' {VAE_CLASS!r}.")
    return {key: value for key, value in raw.items() if not key.startswith("_")}


def _build_config(vlm: dict, vae_config: dict, tokenizer, ratio: float, dtype: torch.dtype | None):
    if "vision_config" not in vlm or ("llm_config" not in vlm and "text_config" not in vlm):
        raise ValueError("vlm/config.json must hold `vision_config` and `llm_config` (InternVLUChatConfig).")
    values = {key: value for key, value in vlm.items() if key not in _UPSTREAM_ONLY_KEYS}
    values.pop("torch_dtype", None)
    values.pop("dtype", None)
    text_key = "llm_config" if "llm_config" in values else "text_config"
    text_config = _clean_sub_config(values.pop(text_key))
    values["text_config"] = text_config
    values["vision_config"] = _clean_sub_config(values["vision_config"])
    if values.get("template", OFFICIAL_TEMPLATE) != OFFICIAL_TEMPLATE:
        logger.warning(
            "vlm/config.json names the template %r; the converted processor uses %r (the official one).",
            values["template"],
            OFFICIAL_TEMPLATE,
        )
    vocab_size = int(text_config.get("vocab_size", 151936))
    values.update(_special_token_config(tokenizer, vocab_size))
    if text_config.get("pad_token_id") is None:
        pad = tokenizer.pad_token_id
        text_config["pad_token_id"] = pad if pad is not None else _token_id(tokenizer, "<|endoftext|>")
    config = G2TRInternVLUConfig(vae_config=vae_config, g2tr_ratio=ratio, **values)
    config.architectures = [G2TRInternVLUForConditionalGeneration.__name__]
    if dtype is not None:
        config.dtype = dtype
    return config


def _square_size(size: Any, where: str) -> int | None:
    """An image size from a processor config: an int, or a dict with height/width (square) or shortest_edge."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if isinstance(size, dict):
        if "height" in size or "width" in size:
            if size.get("height") != size.get("width"):
                raise ValueError(f"{where}: InternVL-U tiles are square, got size {size}.")
            return int(size["height"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
    raise ValueError(f"{where}: cannot read an image size from {size!r}.")


def _build_processor(tokenizer, processor_config: Path, config: G2TRInternVLUConfig) -> G2TRInternVLUProcessor:
    """Our processor with the statistics of the official `processor_config.json` where it states them.

    The official file holds `image_processor_kwargs` (a GotOcr2 image processor: size, mean/std, resample) and
    `image_gen_processor_kwargs` (the VAE side, mean/std 0.5) [unverified key contents: check on first load]; absent
    keys keep our defaults (448 px, bicubic, ImageNet statistics; [-1, 1] for the VAE).
    """
    official = _read_json(processor_config) if processor_config.is_file() else {}
    vit = official.get("image_processor_kwargs") or {}
    vae = official.get("image_gen_processor_kwargs") or {}
    image_size = _square_size(vit.get("size"), str(processor_config)) or config.vision_image_size
    if image_size != config.vision_image_size:
        raise ValueError(
            f"{processor_config} resizes images to {image_size} px but vlm/config.json expects "
            f"{config.vision_image_size} px (force_image_size)."
        )
    image_seq_length = int(official.get("image_seq_length", config.image_seq_length))
    if image_seq_length != config.image_seq_length:
        raise ValueError(
            f"{processor_config} sets image_seq_length={image_seq_length}, but the ViT geometry of vlm/config.json "
            f"gives {config.image_seq_length} tokens per image."
        )
    image_processor = G2TRInternVLUImageProcessor(
        image_size=image_size,
        resample=int(vit.get("resample", 3)),
        image_mean=vit.get("image_mean", IMAGENET_MEAN),
        image_std=vit.get("image_std", IMAGENET_STD),
        vae_image_mean=vae.get("image_mean", VAE_MEAN),
        vae_image_std=vae.get("image_std", VAE_STD),
    )
    return G2TRInternVLUProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=config.image_seq_length
    )


# ----------------------------------------------------------------------------------------------------------------
# Weight coverage
# ----------------------------------------------------------------------------------------------------------------


def _expected_shapes(config: G2TRInternVLUConfig) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of the model built from `config`, on the meta device (no memory, any size)."""
    with torch.device("meta"):
        model = G2TRInternVLUForConditionalGeneration(config)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if config.tie_word_embeddings:
        for tied in model._tied_weights_keys:
            shapes.pop(tied, None)
    return {checkpoint_key(key, CHECKPOINT_RENAMES): shape for key, shape in shapes.items()}


def _check_weights(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]]) -> None:
    absent = sorted(set(expected) - set(stored))
    if absent:
        raise ValueError(f"the snapshot lacks {len(absent)} weights the model needs, e.g. {absent[:5]}.")
    wrong = {key: (stored[key], shape) for key, shape in expected.items() if stored[key] != shape}
    if wrong:
        examples = ", ".join(f"{k}: stored {s}, config gives {e}" for k, (s, e) in list(wrong.items())[:3])
        raise ValueError(f"{len(wrong)} weights do not have the shapes vlm/config.json implies ({examples}).")
    unused = sorted(set(stored) - set(expected))
    if unused:
        logger.warning("%d checkpoint tensors are not used by the model, e.g. %s", len(unused), unused[:5])


# ----------------------------------------------------------------------------------------------------------------
# The generation head
# ----------------------------------------------------------------------------------------------------------------


def _decoder_config(source: Path, processor_config: Path):
    """Our decoder config from `generation_decoder/config.json`, with the reference resize limits of the official
    generation image processor (`min_dynamic_patch` / `max_dynamic_patch` x stride^2, `max_length`) where stated."""
    from .modeling_internvlu_gen import G2TRInternVLUGenerationDecoderConfig

    values = _read_json(source / DECODER_FOLDER / "config.json")
    values = {k: v for k, v in values.items() if k not in _UPSTREAM_ONLY_KEYS and k != "is_composition"}
    official = _read_json(processor_config) if processor_config.is_file() else {}
    gen = official.get("image_gen_processor_kwargs") or {}
    stride = int(gen.get("vae_downsample_factor", values.get("vae_downsample_factor", 8)))
    if "min_dynamic_patch" in gen:
        values["reference_min_pixels"] = int(gen["min_dynamic_patch"]) * stride**2
    if "max_dynamic_patch" in gen:
        values["reference_max_pixels"] = int(gen["max_dynamic_patch"]) * stride**2
    if "max_length" in gen:
        values["reference_max_side"] = gen["max_length"]
    try:
        return G2TRInternVLUGenerationDecoderConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source / DECODER_FOLDER / 'config.json'}: {error}") from None


def _check_decoder_weights(decoder_config, headers: dict) -> None:
    from .modeling_internvlu_gen import G2TRInternVLUGenerationDecoder

    with torch.device("meta"):
        decoder = G2TRInternVLUGenerationDecoder(decoder_config)
    expected = {key: tuple(value.shape) for key, value in decoder.state_dict().items()}
    stored = {key: shape for key, (_, shape, _) in headers.items()}
    absent = sorted(set(expected) - set(stored))
    wrong = sorted(key for key in set(expected) & set(stored) if expected[key] != stored[key])
    if absent or wrong:
        problems = [f"lacks {len(absent)} weights, e.g. {absent[:3]}"] if absent else []
        problems += [f"{key}: stored {stored[key]}, config gives {expected[key]}" for key in wrong[:3]]
        raise ValueError(f"{DECODER_FOLDER}/ does not match its config.json: {'; '.join(problems)}.")


def _write_generation_head(source: Path, staging: Path, decoder_config, files: list[Path], link: str) -> None:
    """Link the decoder weights (and their index) under their own names, write our decoder config and the
    scheduler config (InternVL-U's DPM-Solver++ settings when the snapshot has none)."""
    from .pipeline_internvlu import DEFAULT_SCHEDULER_CONFIG

    target = staging / DECODER_FOLDER
    target.mkdir()
    for path in files:
        place_file(path, target / path.name, link)
    index = source / DECODER_FOLDER / "model.safetensors.index.json"
    if index.is_file():
        shutil.copyfile(index, target / index.name)
    decoder_config.save_pretrained(target)
    scheduler = staging / SCHEDULER_FOLDER
    scheduler.mkdir()
    official = source / SCHEDULER_FOLDER / "scheduler_config.json"
    if official.is_file():
        shutil.copyfile(official, scheduler / official.name)
    else:
        config = {"_class_name": "DPMSolverMultistepScheduler", **DEFAULT_SCHEDULER_CONFIG}
        (scheduler / "scheduler_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def _check_source(source: Path) -> Path:
    """Raise `ValueError` naming every missing part of the snapshot; return the tokenizer folder."""
    if not source.is_dir():
        raise ValueError(f"`source` {str(source)!r} is not a folder.")
    missing = [
        f"{folder}/config.json"
        for folder in (VLM_FOLDER, VAE_FOLDER)
        if not (source / folder / "config.json").is_file()
    ]
    tokenizer_folder = _tokenizer_folder(source)
    if tokenizer_folder is None:
        missing.append("tokenizer files (tokenizer.json or vocab.json + merges.txt, in processor/)")
    if missing:
        raise ValueError(
            f"`source` {str(source)!r} is not an InternVL-U snapshot (vlm/, vae/, processor/): missing "
            f"{', '.join(missing)}."
        )
    return tokenizer_folder


def convert_internvlu(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    ratio: float = 0.5,
    link: Literal["hardlink", "symlink", "copy"] = "hardlink",
    model_card: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    generation: bool | None = None,
) -> Path:
    """Convert an official InternVL-U snapshot folder `source` into a loadable folder `destination`.

    Args:
        source: the snapshot folder with `vlm/`, `vae/` and `processor/` (other folders are ignored).
        destination: the folder to write (atomically).
        ratio: `g2tr_ratio` stored in config.json (the paper's 0.5; 1.0 stores the reduction off). Any load can
            override it with `from_pretrained(..., g2tr_ratio=r)`.
        link: how the `vlm/` safetensors reach the destination: a hard link (a symbolic link if that fails), a
            symbolic link, or a copy. The VAE file is always rewritten (its keys gain the `vae.` prefix).
        model_card: a model card template file (`$repo_id`, `$ratio`, `$min_keep` and `$source` placeholders);
            None uses the template shipped with the package (`g2tr_hf/model_cards/internvlu.md`;
            `model_cards/internvlu.md` in the repository shows it filled in).
        overwrite: replace an existing destination.
        max_shard_size: None (default) links the `vlm/` files as described by `link`; a size in bytes or like
            "5GB" re-writes all weights as shards of at most that size instead (`link` is then not used).
        generation: bring the generation head (`generation_decoder/`, `scheduler/`) along, so that
            `G2TRInternVLUPipeline` loads from the folder: None = when the snapshot has `generation_decoder/`,
            True = required, False = understanding only.
    Returns:
        The destination folder.
    """
    source = Path(source)
    if link not in ("hardlink", "symlink", "copy"):
        raise ValueError(f"`link` must be 'hardlink', 'symlink' or 'copy', got {link!r}.")
    if max_shard_size is not None:
        shard_size_bytes(max_shard_size)
    tokenizer_folder = _check_source(source)

    vlm_files = _weight_files(source / VLM_FOLDER, "model.safetensors")
    vae_files = _weight_files(source / VAE_FOLDER, "diffusion_pytorch_model.safetensors")
    vlm_headers = _tensor_headers(vlm_files)
    vae_headers = _tensor_headers(vae_files)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    vae_config = _vae_config(source / VAE_FOLDER / "config.json")
    config = _build_config(
        _read_json(source / VLM_FOLDER / "config.json"), vae_config, tokenizer, ratio, _majority_dtype(vlm_headers)
    )
    processor = _build_processor(tokenizer, tokenizer_folder / "processor_config.json", config)

    has_decoder = (source / DECODER_FOLDER / "config.json").is_file()
    if generation and not has_decoder:
        raise ValueError(f"`generation=True` but `source` {str(source)!r} has no {DECODER_FOLDER}/config.json.")
    decoder_config = decoder_files = None
    if has_decoder and generation is not False:
        decoder_config = _decoder_config(source, tokenizer_folder / "processor_config.json")
        decoder_files = _weight_files(source / DECODER_FOLDER, "model.safetensors")
        _check_decoder_weights(decoder_config, _tensor_headers(decoder_files))

    stored = {key: shape for key, (_, shape, _) in vlm_headers.items()}
    stored.update({f"{VAE_FOLDER}.{key}": shape for key, (_, shape, _) in vae_headers.items()})
    _check_weights(_expected_shapes(config), stored)

    weight_map = {key: _linked_name(path) for key, (path, _, _) in vlm_headers.items()}
    weight_map.update({f"{VAE_FOLDER}.{key}": "vae.safetensors" for key in vae_headers})
    config.auto_map = model_auto_map(type(config), G2TRInternVLUForConditionalGeneration, type(processor))
    custom_pipelines, pipeline_classes = model_pipelines(config, has_generation_decoder=decoder_config is not None)
    if custom_pipelines:
        config.custom_pipelines = custom_pipelines
    template = Path(model_card) if model_card is not None else model_card_template("internvlu")
    card = render_model_card(
        template, repo_id=Path(destination).name, ratio=ratio, min_keep=config.g2tr_min_keep, source=source.name
    )

    with atomic_directory(destination, overwrite=overwrite) as staging:
        if max_shard_size is None:
            for path in vlm_files:
                place_file(path, staging / _linked_name(path), link)
            total_size = sum(path.stat().st_size for path in vlm_files)
            total_size += _write_vae(vae_files, staging / "vae.safetensors")
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        else:
            tensors = {key: (path, key) for key, (path, _, _) in vlm_headers.items()}
            tensors.update({f"{VAE_FOLDER}.{key}": (path, key) for key, (path, _, _) in vae_headers.items()})
            write_safetensors_shards(tensors, staging, max_shard_size)
        config.save_pretrained(staging)
        GenerationConfig(
            eos_token_id=[config.im_end_token_id, config.image_start_token_id],
            pad_token_id=config.text_config.pad_token_id,
        ).save_pretrained(staging)
        processor.save_pretrained(staging)
        if decoder_config is not None:
            _write_generation_head(source, staging, decoder_config, decoder_files, link)
        classes = [type(config), G2TRInternVLUForConditionalGeneration, type(processor), *pipeline_classes]
        write_remote_code(staging, classes)
        (staging / "README.md").write_text(card, encoding="utf-8")
    logger.info("Converted %s to %s", source, destination)
    return Path(destination)

"""Hub-ready folders: remote code + `auto_map` + sharded weights + processor + model card, written atomically; and
their upload.

A folder written by `export` loads with `trust_remote_code=True` on a machine where g2tr_hf is NOT installed:
the flat module files are copied next to the weights and `auto_map` points AutoConfig, AutoModel,
AutoModelForImageTextToText and AutoProcessor at them (transformers only records the class of the object being
saved, so the other entries are filled in here). Weights are written in safetensors shards of at most
`max_shard_size` (5 GB by default, the size the Hub recommends per file) with a `model.safetensors.index.json`.

`push_folder` uploads such a folder in one commit (optionally to a branch or as a pull request) and deletes, in that
same commit, the weight files of an earlier upload that the new folder no longer has; folders above
`LARGE_FOLDER_BYTES` go through huggingface_hub's resumable large-folder upload.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "LARGE_FOLDER_BYTES",
    "atomic_directory",
    "default_model_card",
    "export",
    "model_auto_map",
    "model_card_template",
    "model_pipelines",
    "place_file",
    "push_folder",
    "push_to_hub",
    "remote_code_files",
    "render_model_card",
    "shard_size_bytes",
    "stale_weight_files",
    "write_remote_code",
    "write_safetensors_shards",
]

# The Auto classes a g2tr_hf model folder maps; AutoModel deliberately returns the full generation-capable model.
MODEL_AUTO_CLASSES = ("AutoModel", "AutoModelForImageTextToText")

# The largest safetensors file `export` writes by default: the size the Hub recommends per file (transformers' own
# default, 50 GB, would put BAGEL-7B-MoT's ~29 GB into one file).
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Above this many bytes `push_folder` uses huggingface_hub's resumable large-folder upload (where the installed
# huggingface_hub has one): a BAGEL-7B-MoT folder (~29 GB) is above it, an InternVL-U folder (~5 GB) below.
LARGE_FOLDER_BYTES = 10 * 10**9
# Decimal units, as huggingface_hub and transformers read `max_shard_size`.
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
# Weight files of a model repository's top level: what an upload of a new export replaces.
_WEIGHT_FILE = re.compile(r"^[^/]+\.(safetensors|bin)(\.index\.json)?$")
# The model card template (package data, `g2tr_hf/model_cards/`) of each model type.
MODEL_CARD_TEMPLATES = {"g2tr_bagel": "bagel.md", "g2tr_internvl_u": "internvlu.md"}


def _new_sibling(target: Path, tag: str) -> Path:
    """Create an empty, uniquely named hidden sibling of `target` with a plain `os.mkdir`, so that it gets the mode
    of any folder the user makes (0o777 less the umask). `tempfile.mkdtemp` makes it 0o700, and renaming the staging
    folder into place would publish that private mode."""
    for _ in range(100):
        candidate = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a {tag} folder next to {str(target)!r}")


def _ordinary_file_mode(folder: Path) -> int:
    """The permission bits of a file newly written in `folder` (0o666 less the umask, or what a default ACL says),
    found by writing one: reading the umask with `os.umask` would change it for every thread for a moment."""
    probe = folder / f".mode-probe-{secrets.token_hex(4)}"
    descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(descriptor).st_mode)
    finally:
        os.close(descriptor)
        probe.unlink()


def _ordinary_modes(folder: Path) -> None:
    """Give everything written under `folder` the mode of an ordinary write under the user's umask.

    Some writers create private files: safetensors' `save_file` writes 0o600 weights, `mkdtemp` 0o700 folders.
    Execute bits a file has are kept where the umask allows them. A hard link (more than one name for its inode)
    keeps its mode: it IS the source file (a converted checkpoint's weights), whose mode is not ours to change.
    Symbolic links have no mode of their own.
    """
    file_mode = _ordinary_file_mode(folder)
    folder_mode = stat.S_IMODE(folder.stat().st_mode)
    for root, folders, files in os.walk(folder):
        for name in folders:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode)
        for name in files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                os.chmod(path, file_mode | (stat.S_IMODE(info.st_mode) & 0o111 & folder_mode))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; it becomes `path` only if the block finishes without error.

    A failure (or an interrupt) removes the temporary folder, so `path` is never left half-written. With
    `overwrite=True` an existing `path` is replaced; otherwise an existing non-empty `path` is an error. The folder
    and what was written into it get the modes of an ordinary `mkdir` and file write under the user's umask
    (hard-linked files keep their source's mode).
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"`path` {str(target)!r} exists and is not a directory.")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"`path` {str(target)!r} exists and is not empty; pass overwrite=True to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_sibling(target, "partial")
    try:
        yield staging
        _ordinary_modes(staging)
        if target.exists():
            # Move the old folder aside first so that `target` is always either the old or the new content.
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def place_file(source: str | os.PathLike, target: str | os.PathLike, link: str = "hardlink") -> None:
    """Put `source` at `target` without copying where possible: "hardlink" (a symbolic link when the hard link
    fails, e.g. across file systems), "symlink" or "copy".

    A Hub cache snapshot holds relative symbolic links into its blobs folder, so the file they point at is linked,
    never the link itself (a hard link of a relative link would dangle in the destination). A copy is a new file
    with the mode of an ordinary write (the source's mode, e.g. a private 0o600, is not carried over); a hard link
    is the source file itself and so shares its mode.
    """
    if link not in ("hardlink", "symlink", "copy"):
        raise ValueError(f"`link` must be 'hardlink', 'symlink' or 'copy', got {link!r}.")
    source, target = Path(source).resolve(), Path(target)
    if link == "copy":
        shutil.copyfile(source, target)
        return
    if link == "hardlink":
        try:
            os.link(source, target)
            return
        except OSError as error:  # another file system: fall back to a symbolic link
            logger.warning("hard link of %s failed (%s); using a symbolic link", source, error)
    os.symlink(source, target)


def _module_file(cls: type) -> Path:
    module = sys.modules[cls.__module__]
    if module.__name__ == "__main__" or not getattr(module, "__file__", None):
        raise ValueError(f"{cls.__name__} must be defined in an importable module file to be shipped as remote code.")
    return Path(module.__file__)


def remote_code_files(classes: Iterable[type]) -> list[Path]:
    """The module files of `classes` and every sibling they import (recursively), without duplicates."""
    files: dict[Path, None] = {}
    for cls in classes:
        main_file = _module_file(cls)
        files[main_file] = None
        for extra in get_relative_import_files(main_file):
            files[Path(extra)] = None
    return list(files)


def write_remote_code(folder: str | os.PathLike, classes: Iterable[type]) -> list[Path]:
    """Copy the flat module files of `classes` (and their siblings) into `folder`. Returns the written paths.

    The copies are ordinary new files (mode from the umask), not copies of the installed files' modes, which may be
    read-only or private in a system or user site-packages.
    """
    written = []
    for source in remote_code_files(classes):
        written.append(Path(shutil.copyfile(source, Path(folder) / source.name)))
    return written


def _class_ref(cls: type) -> str:
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def model_pipelines(config, has_generation_decoder: bool = False) -> tuple[dict, list[type]]:
    """The custom pipelines a model folder ships: (`config.custom_pipelines` entry, pipeline classes).

    BAGEL with its generation path ships `G2TRBagelPipeline` (editing / text-to-image), so that
    `pipeline(model=folder, trust_remote_code=True)` builds it from the same folder and weights. InternVL-U ships
    `G2TRInternVLUPipeline` when the folder also holds its generation decoder (`generation_decoder/`).
    """
    if getattr(config, "model_type", None) == "g2tr_bagel" and getattr(config, "visual_gen", False):
        from .pipeline_bagel import G2TRBagelPipeline, custom_pipelines_config

        return custom_pipelines_config(), [G2TRBagelPipeline]
    if getattr(config, "model_type", None) == "g2tr_internvl_u" and has_generation_decoder:
        from .pipeline_internvlu import G2TRInternVLUPipeline
        from .pipeline_internvlu import custom_pipelines_config as internvlu_pipelines

        return internvlu_pipelines(), [G2TRInternVLUPipeline]
    return {}, []


def model_auto_map(config_class: type, model_class: type, processor_class: type | None = None) -> dict[str, str]:
    """`auto_map` entries for config.json (module.Class references resolved inside the folder)."""
    auto_map = {"AutoConfig": _class_ref(config_class)}
    auto_map.update({name: _class_ref(model_class) for name in MODEL_AUTO_CLASSES})
    if processor_class is not None:
        auto_map["AutoProcessor"] = _class_ref(processor_class)
    return auto_map


def shard_size_bytes(max_shard_size: int | str, argument: str = "max_shard_size") -> int:
    """`max_shard_size` in bytes: a positive int, or a string like "5GB", "500MB" (decimal units KB, MB, GB, TB)."""
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        if max_shard_size > 0:
            return max_shard_size
    elif isinstance(max_shard_size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*", max_shard_size.upper())
        if match and float(match.group(1)) > 0:
            return max(1, int(float(match.group(1)) * _SIZE_UNITS[match.group(2)]))
    raise ValueError(
        f"`{argument}` must be a positive number of bytes or a size such as '5GB' or '500MB', got {max_shard_size!r}."
    )


# ----------------------------------------------------------------------------------------------------------------
# Streamed safetensors shards (the converters: no model is built, each tensor is read once)
# ----------------------------------------------------------------------------------------------------------------

# Bytes per element of the safetensors dtypes a checkpoint may hold.
_SAFETENSORS_ITEM_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def _tensor_sizes(tensors: Mapping[str, Any]) -> dict[str, int]:
    """Bytes of every tensor source, in order: a tensor, or `(path, key)` in a safetensors file (read from the
    file's header, each file opened once)."""
    from safetensors import safe_open

    file_keys: dict[Path, list[str]] = {}
    for key, source in tensors.items():
        if isinstance(source, tuple):
            file_keys.setdefault(Path(source[0]), []).append(key)
    sizes = {}
    for path, keys in file_keys.items():
        with safe_open(path, framework="pt") as handle:
            for key in keys:
                piece = handle.get_slice(tensors[key][1])
                sizes[key] = math.prod(piece.get_shape()) * _SAFETENSORS_ITEM_BYTES[piece.get_dtype()]
    return {
        key: sizes[key] if isinstance(source, tuple) else source.numel() * source.element_size()
        for key, source in tensors.items()
    }


def _plan_shards(sizes: Mapping[str, int], limit: int) -> list[list[str]]:
    """Keys in order, cut into consecutive shards of at most `limit` bytes (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = []
    current: list[str] = []
    filled = 0
    for key, size in sizes.items():
        if current and filled + size > limit:
            shards.append(current)
            current, filled = [], 0
        current.append(key)
        filled += size
    if current:
        shards.append(current)
    return shards


def _load_shard(keys: list[str], tensors: Mapping[str, Any]) -> dict:
    """The tensors of one shard, each file opened once; file tensors are read now (memory: one shard)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    state = {}
    for key in keys:
        source = tensors[key]
        if isinstance(source, tuple):
            by_file.setdefault(Path(source[0]), []).append(key)
        else:
            state[key] = source.contiguous()
    for path, file_keys in by_file.items():
        with safe_open(path, framework="pt") as handle:
            for key in file_keys:
                state[key] = handle.get_tensor(tensors[key][1])
    return {key: state[key] for key in keys}


def write_safetensors_shards(
    tensors: Mapping[str, Any], folder: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> dict[str, str]:
    """Write `tensors` as `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` in `folder`.

    Args:
        tensors: checkpoint key -> a `torch.Tensor`, or `(path, key)` of a tensor in a safetensors file (read when
            its shard is written, so at most one shard is in memory). Keys are written in the mapping's order.
        folder: an existing folder (normally the staging folder of `atomic_directory`).
        max_shard_size: the largest shard, in bytes or as "5GB"; a tensor larger than that gets a shard of its own.
    Returns:
        The index's `weight_map` (key -> shard file name). Values are copied bit for bit (same dtype and bytes).
    """
    from safetensors.torch import save_file

    limit = shard_size_bytes(max_shard_size)
    if not tensors:
        raise ValueError("`tensors` is empty: there are no weights to write.")
    sizes = _tensor_sizes(tensors)
    shards = _plan_shards(sizes, limit)
    weight_map = {}
    for number, keys in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(_load_shard(keys, tensors), Path(folder) / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return weight_map


# ----------------------------------------------------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------------------------------------------------


def model_card_template(name: str) -> str:
    """The text of a model card template shipped with the package (`g2tr_hf/model_cards/<name>.md`, read through
    importlib.resources so that it is found in a wheel or zip install as well as in a source checkout).

    Args:
        name: "bagel" or "internvlu" (with or without ".md").
    """
    file_name = name if name.endswith(".md") else f"{name}.md"
    template = resources.files(__package__).joinpath("model_cards", file_name)
    if not template.is_file():
        known = sorted(Path(entry).stem for entry in MODEL_CARD_TEMPLATES.values())
        raise ValueError(f"`name`: no model card template {name!r}; the package ships {known}.")
    return template.read_text(encoding="utf-8")


def render_model_card(template: str | Path, **fields: object) -> str:
    """Fill a model card template (`$name` placeholders, `string.Template`): a `Path` to read, or the text itself.

    A placeholder without a value is an error so that no card ships with a hole in it.
    """
    text = template.read_text(encoding="utf-8") if isinstance(template, Path) else template
    try:
        return Template(text).substitute({k: str(v) for k, v in fields.items()})
    except KeyError as missing:
        raise ValueError(f"model card template needs a value for {missing.args[0]!r}.") from None


def _source_label(name_or_path: str | None) -> str:
    """How a card names where a model came from: a Hub id as is, a local folder by its name only (a card must not
    publish the user's file system)."""
    if not name_or_path:
        return "a model built in code"
    return Path(name_or_path).name if os.path.isdir(name_or_path) or os.path.isabs(name_or_path) else name_or_path


def default_model_card(config, repo_id: str, source: str | None = None) -> str:
    """The README.md of a g2tr_hf folder: the packaged template of `config.model_type` filled in.

    Args:
        config: the model's config (`g2tr_ratio`, `g2tr_min_keep` and `model_type` are read).
        repo_id: what the card's code snippets load (the Hub repo id, or the folder's path).
        source: where the weights came from (default: the config's `_name_or_path`; a local folder by its name).
    """
    template_name = MODEL_CARD_TEMPLATES.get(getattr(config, "model_type", None))
    if template_name is None:
        return _generic_model_card(repo_id)
    return render_model_card(
        model_card_template(template_name),
        repo_id=repo_id,
        ratio=config.g2tr_ratio,
        min_keep=config.g2tr_min_keep,
        source=source if source is not None else _source_label(getattr(config, "_name_or_path", None)),
    )


def _generic_model_card(repo_id: str) -> str:
    return (
        "---\n"
        "library_name: transformers\n"
        "pipeline_tag: image-text-to-text\n"
        "tags: [custom_code, g2tr, token-reduction, multimodal]\n"
        "---\n\n"
        "# A model with G2TR visual token reduction\n\n"
        "```python\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
        f"repo = {repo_id!r}\n"
        "model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, g2tr_ratio=0.5)\n"
        "processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)\n"
        "```\n"
    )


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


def export(
    model,
    processor,
    path: str | os.PathLike,
    *,
    model_card: str | None = None,
    repo_id: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    safe_serialization: bool = True,
    generation_decoder=None,
    scheduler=None,
) -> Path:
    """Write a folder that loads with `trust_remote_code=True` where g2tr_hf is not installed.

    Args:
        model: a g2tr_hf model (its config class, model class and their sibling modules become remote code).
        processor: the model's processor (saved with its own `auto_map`).
        path: the folder to write; written atomically (a failure leaves no half-written folder).
        model_card: the README.md text (see `render_model_card`); by default the packaged card of the model type.
        repo_id: the Hub repo the folder is meant for, used by the default card's snippets (default: the folder's
            name).
        max_shard_size: the largest safetensors file, in bytes or as "5GB" (default); larger models are split into
            `model-0000i-of-0000n.safetensors` with a `model.safetensors.index.json`.
        overwrite: replace an existing folder.
        generation_decoder, scheduler: InternVL-U's generation decoder and its scheduler, written to
            `generation_decoder/` and `scheduler/` (the folder then also ships `G2TRInternVLUPipeline`).
    Returns:
        The folder path.
    """
    shard_bytes = shard_size_bytes(max_shard_size)
    config = model.config
    config.auto_map = model_auto_map(type(config), type(model), type(processor) if processor is not None else None)
    custom_pipelines, pipeline_classes = model_pipelines(config, has_generation_decoder=generation_decoder is not None)
    if custom_pipelines:
        config.custom_pipelines = custom_pipelines
    card = model_card if model_card is not None else default_model_card(config, repo_id or Path(path).name)
    if not custom_pipelines and getattr(config, "model_type", None) == "g2tr_internvl_u" and getattr(
        config, "custom_pipelines", None
    ):
        # Without its generation decoder the folder cannot serve the editing pipeline an earlier export listed.
        from .pipeline_internvlu import PIPELINE_TASK as INTERNVLU_TASK

        config.custom_pipelines = {k: v for k, v in config.custom_pipelines.items() if k != INTERNVLU_TASK} or None
    with atomic_directory(path, overwrite=overwrite) as staging:
        model.save_pretrained(staging, safe_serialization=safe_serialization, max_shard_size=shard_bytes)
        if generation_decoder is not None:
            generation_decoder.save_pretrained(
                staging / "generation_decoder", safe_serialization=safe_serialization, max_shard_size=shard_bytes
            )
        if scheduler is not None:
            scheduler.save_pretrained(staging / "scheduler")
        if processor is not None:
            processor.save_pretrained(staging)
        classes = [type(config), type(model)] + ([type(processor)] if processor is not None else [])
        write_remote_code(staging, classes + pipeline_classes)
        (staging / "README.md").write_text(card, encoding="utf-8")
    logger.info("Exported %s to %s", type(model).__name__, path)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------------------------------


def stale_weight_files(remote_files: Iterable[str], local_files: Iterable[str]) -> list[str]:
    """The top-level weight files of a repository (`*.safetensors`, `*.bin` and their `.index.json`) that a new
    upload does not bring: shards of an earlier export. Left in place, a stale `model.safetensors` would even be
    loaded INSTEAD of a new sharded index. Files in sub-folders and every other file are kept."""
    local = set(local_files)
    return sorted(name for name in remote_files if _WEIGHT_FILE.match(name) and name not in local)


def _literal_pattern(name: str) -> str:
    """An fnmatch pattern (what `delete_patterns` takes) that matches exactly `name`."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _check_pull_request(revision: str | None, create_pr: bool) -> None:
    if create_pr and revision not in (None, "main"):
        raise ValueError(
            f"`create_pr=True` opens a pull request against the default branch; it cannot be combined with "
            f"`revision={revision!r}` (to add commits to an open pull request, pass revision='refs/pr/N' without "
            "create_pr)."
        )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    create_pr: bool = False,
    private: bool | None = None,
    commit_message: str = "Upload G2TR model (g2tr-hf export)",
    large: bool | None = None,
    token: str | None = None,
    api=None,
):
    """Upload an exported folder as `repo_id` (created if needed).

    One commit adds every file of `folder` and deletes the top-level weight files of the repository that `folder`
    does not have (`stale_weight_files`: e.g. the single `model.safetensors` of an unsharded earlier upload).

    Args:
        folder: a folder written by `export` (or a converter).
        repo_id: `owner/name`.
        revision: the branch to commit to (created from the default branch if missing), or "refs/pr/N" to add to an
            open pull request. Default: the default branch.
        create_pr: open a pull request against the default branch instead of committing to it.
        private: visibility of a repository that does not exist yet (None: the Hub's default).
        commit_message: the commit title.
        large: use huggingface_hub's `upload_large_folder` (resumable: re-running after an interruption continues;
            several commits; the stale weight files are then deleted in one more commit afterwards). None chooses by
            size (`LARGE_FOLDER_BYTES`). Releases of huggingface_hub without it (2.x, whose `upload_folder` itself
            resumes and splits large folders) use `upload_folder`. It cannot open a pull request: open one first and
            pass `revision="refs/pr/N"`.
        token: a Hub token (default: the logged-in one).
        api: an `huggingface_hub.HfApi`-like object (tests pass a fake); default `HfApi(token=token)`.
    Returns:
        What the upload returns (a `CommitInfo` from `upload_folder`; None from `upload_large_folder`).
    """
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ValueError(f"`folder` {str(folder)!r} is not a model folder (no config.json); write one with export().")
    _check_pull_request(revision, create_pr)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    if large is None:
        large = _folder_bytes(folder) > LARGE_FOLDER_BYTES
    use_large_upload = large and hasattr(api, "upload_large_folder")
    if use_large_upload and create_pr:
        raise ValueError(
            "`create_pr=True` is not possible with a large-folder upload (huggingface_hub's upload_large_folder "
            "commits to a branch only): open a pull request first and pass revision='refs/pr/N', or pass large=False."
        )

    api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
    if revision not in (None, "main") and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
    remote = api.list_repo_files(repo_id=repo_id, revision=None if create_pr else revision)
    local = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    stale = stale_weight_files(remote, local)
    if stale:
        logger.info("Deleting %d stale weight files from %s: %s", len(stale), repo_id, stale)

    if use_large_upload:
        result = api.upload_large_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision)
        if stale:
            api.delete_files(
                repo_id=repo_id,
                delete_patterns=[_literal_pattern(name) for name in stale],
                revision=revision,
                commit_message=f"{commit_message}: remove stale weight files",
            )
        return result
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        delete_patterns=[_literal_pattern(name) for name in stale] or None,
    )


def push_to_hub(
    model,
    processor,
    repo_id: str,
    *,
    model_card: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload G2TR model (g2tr-hf export)",
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    large: bool | None = None,
    api=None,
):
    """Export to a temporary folder and upload it as `repo_id` with `push_folder`. Returns the upload's result.

    The default model card's snippets load `repo_id`. For a large model, `export` to a lasting folder and call
    `push_folder` on it instead: a large-folder upload interrupted here cannot resume (its folder is temporary).
    The remaining arguments are those of `export` and `push_folder`; `api` defaults to
    `huggingface_hub.HfApi(token=token)` (tests pass a fake).
    """
    # Argument errors before the export's work.
    shard_size_bytes(max_shard_size)
    _check_pull_request(revision, create_pr)
    with tempfile.TemporaryDirectory() as scratch:
        folder = export(
            model, processor, Path(scratch) / "export", model_card=model_card, repo_id=repo_id,
            max_shard_size=max_shard_size,
        )  # fmt: skip
        return push_folder(
            folder, repo_id, revision=revision, create_pr=create_pr, private=private, commit_message=commit_message,
            large=large, token=token, api=api,
        )  # fmt: skip

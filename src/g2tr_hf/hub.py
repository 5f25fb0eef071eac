"""Hub-ready folders: remote code + `auto_map` + weights + processor + model card, written atomically.

A folder written by `export` loads with `trust_remote_code=True` on a machine where g2tr_hf is NOT installed:
the flat module files are copied next to the weights and `auto_map` points AutoConfig, AutoModel,
AutoModelForImageTextToText and AutoProcessor at them (transformers only records the class of the object being
saved, so the other entries are filled in here).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from string import Template
from typing import Iterable, Iterator

from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "atomic_directory",
    "export",
    "model_auto_map",
    "model_pipelines",
    "place_file",
    "push_to_hub",
    "remote_code_files",
    "render_model_card",
    "write_remote_code",
]

# The Auto classes a g2tr_hf model folder maps; AutoModel deliberately returns the full generation-capable model.
MODEL_AUTO_CLASSES = ("AutoModel", "AutoModelForImageTextToText")


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


def render_model_card(template: str | Path, **fields: object) -> str:
    """Fill a model card template (`$name` placeholders, `string.Template`): a `Path` to read, or the text itself.

    A placeholder without a value is an error so that no card ships with a hole in it.
    """
    text = template.read_text(encoding="utf-8") if isinstance(template, Path) else template
    try:
        return Template(text).substitute({k: str(v) for k, v in fields.items()})
    except KeyError as missing:
        raise ValueError(f"model card template needs a value for {missing.args[0]!r}.") from None


def _default_model_card(model) -> str:
    return (
        "---\n"
        "library_name: transformers\n"
        "pipeline_tag: image-text-to-text\n"
        "tags: [custom_code, g2tr, token-reduction, multimodal]\n"
        "---\n\n"
        f"# {type(model).__name__} with G2TR token reduction\n\n"
        "```python\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
        'model = AutoModelForImageTextToText.from_pretrained(REPO, trust_remote_code=True, g2tr_ratio=0.5)\n'
        "processor = AutoProcessor.from_pretrained(REPO, trust_remote_code=True)\n"
        "```\n"
    )


def export(
    model,
    processor,
    path: str | os.PathLike,
    *,
    model_card: str | None = None,
    overwrite: bool = False,
    safe_serialization: bool = True,
    generation_decoder=None,
    scheduler=None,
) -> Path:
    """Write a folder that loads with `trust_remote_code=True` where g2tr_hf is not installed.

    Args:
        model: a g2tr_hf model (its config class, model class and their sibling modules become remote code).
        processor: the model's processor (saved with its own `auto_map`).
        path: the folder to write; written atomically.
        model_card: the README.md text (see `render_model_card`); a short generic card when None.
        overwrite: replace an existing folder.
        generation_decoder, scheduler: InternVL-U's generation decoder and its scheduler, written to
            `generation_decoder/` and `scheduler/` (the folder then also ships `G2TRInternVLUPipeline`).
    Returns:
        The folder path.
    """
    config = model.config
    config.auto_map = model_auto_map(type(config), type(model), type(processor) if processor is not None else None)
    custom_pipelines, pipeline_classes = model_pipelines(config, has_generation_decoder=generation_decoder is not None)
    if custom_pipelines:
        config.custom_pipelines = custom_pipelines
    elif getattr(config, "model_type", None) == "g2tr_internvl_u" and getattr(config, "custom_pipelines", None):
        # Without its generation decoder the folder cannot serve the editing pipeline an earlier export listed.
        from .pipeline_internvlu import PIPELINE_TASK as INTERNVLU_TASK

        config.custom_pipelines = {k: v for k, v in config.custom_pipelines.items() if k != INTERNVLU_TASK} or None
    with atomic_directory(path, overwrite=overwrite) as staging:
        model.save_pretrained(staging, safe_serialization=safe_serialization)
        if generation_decoder is not None:
            generation_decoder.save_pretrained(staging / "generation_decoder", safe_serialization=safe_serialization)
        if scheduler is not None:
            scheduler.save_pretrained(staging / "scheduler")
        if processor is not None:
            processor.save_pretrained(staging)
        classes = [type(config), type(model)] + ([type(processor)] if processor is not None else [])
        write_remote_code(staging, classes + pipeline_classes)
        (staging / "README.md").write_text(model_card or _default_model_card(model), encoding="utf-8")
    logger.info("Exported %s to %s", type(model).__name__, path)
    return Path(path)


def push_to_hub(
    model,
    processor,
    repo_id: str,
    *,
    model_card: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload G2TR model (g2tr-hf export)",
    api=None,
):
    """Export to a temporary folder and upload it as `repo_id` (created if needed). Returns the commit info.

    `api` defaults to `huggingface_hub.HfApi(token=token)`; tests pass a fake.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as scratch:
        folder = export(model, processor, Path(scratch) / "export", model_card=model_card)
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)

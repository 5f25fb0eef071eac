"""`save_pretrained` that keeps the custom pipelines of a model folder loadable.

transformers' `save_pretrained` copies the module file of the saved model and every sibling module it imports into
the folder, but not the modules that `config.custom_pipelines` names. Re-saving an exported BAGEL
(`AutoModel.from_pretrained(folder, trust_remote_code=True).save_pretrained(new)`) therefore kept the
`custom_pipelines` entry in config.json while dropping `pipeline_bagel.py`, and `pipeline(model=new,
trust_remote_code=True)` failed. `G2TRSaveMixin` copies those modules (and what they import) as well.

This file ships with the models' remote code (the modeling files import it), so the same happens on a machine where
g2tr_hf is not installed.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = ["G2TRSaveMixin", "custom_pipeline_module_files", "save_custom_pipeline_files"]

# `save_pretrained` keywords that belong to its upload (transformers hands the rest to `create_repo`).
_HUB_KEYWORDS = ("repo_id", "commit_message", "commit_description", "private", "token", "create_pr", "revision", "tags")


def custom_pipeline_module_files(config) -> list[str]:
    """The module file names (e.g. `pipeline_bagel.py`) of the `impl` entries of `config.custom_pipelines` that live
    in the model's own folder (an `owner/repo--module.Class` entry loads from another repository and is skipped)."""
    names: dict[str, None] = {}
    for entry in (getattr(config, "custom_pipelines", None) or {}).values():
        implementation = entry.get("impl") if isinstance(entry, dict) else None
        if isinstance(implementation, str) and "--" not in implementation and "." in implementation:
            names[implementation.rsplit(".", 1)[0] + ".py"] = None
    return list(names)


def _module_source(model, module_file: str) -> Path | None:
    """Where `module_file` is: next to the model's own module (the installed package, or the modules cache when the
    pipeline was already loaded), else fetched from the folder or repo the model was loaded from."""
    own_module = getattr(sys.modules.get(type(model).__module__), "__file__", None)
    if own_module and (Path(own_module).parent / module_file).is_file():
        return Path(own_module).parent / module_file
    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        return None
    from transformers.dynamic_module_utils import HF_MODULES_CACHE, get_cached_module_file

    try:
        cached = get_cached_module_file(source, module_file, _commit_hash=getattr(model.config, "_commit_hash", None))
    except (OSError, ValueError, ImportError) as error:
        logger.warning("could not fetch %s from %s: %s", module_file, source, error)
        return None
    return Path(HF_MODULES_CACHE) / cached


def save_custom_pipeline_files(model, save_directory: str | os.PathLike) -> list[Path]:
    """Copy the modules of `model.config.custom_pipelines` (and the sibling modules they import) into
    `save_directory`. Returns the written paths; a module that cannot be found is logged, not raised, because the
    model itself was saved and loads without it."""
    written = []
    for module_file in custom_pipeline_module_files(model.config):
        source = _module_source(model, module_file)
        if source is None:
            logger.warning(
                "config.custom_pipelines names %s, which was not found: the pipeline of %s will not load.",
                module_file,
                save_directory,
            )
            continue
        for path in [source, *map(Path, get_relative_import_files(str(source)))]:
            written.append(Path(shutil.copyfile(path, Path(save_directory) / path.name)))
    return written


class G2TRSaveMixin:
    """Adds the custom pipeline modules to what `PreTrainedModel.save_pretrained` writes (see the module docstring).
    Put it before `PreTrainedModel` in the bases."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args, push_to_hub: bool = False, **kwargs):
        if push_to_hub:
            # transformers uploads from inside its own save_pretrained, before the modules could be added: save
            # here, then upload through push_to_hub, which saves a fresh copy with this method.
            hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KEYWORDS if key in kwargs}
            repo_id = hub_kwargs.pop("repo_id", Path(save_directory).name)
            self.save_pretrained(save_directory, *args, **kwargs)
            if "max_shard_size" in kwargs:
                hub_kwargs["max_shard_size"] = kwargs["max_shard_size"]
            return self.push_to_hub(repo_id, **hub_kwargs)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", args[0] if args else True):
            save_custom_pipeline_files(self, save_directory)
        return result

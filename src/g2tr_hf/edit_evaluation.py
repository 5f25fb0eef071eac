"""Editing evaluation: run an edit set (image, instruction) through an editing pipeline and write the outputs where
the GEdit-Bench or ImgEdit scorers look for them. Scoring (VIEScore / GPT-4-class judges) is the user's: this module
only produces the images.

Layouts:

- `gedit`: `OUT/<model_name>/fullset/<task_type>/<instruction_language>/<key>.png` (the layout GEdit-Bench's
  scorer reads), with the input image beside it as `<key>_SRCIMG.png`;
- `imgedit`: `OUT/<key>.png` (ImgEdit's basic-benchmark scorer reads `<result_img_folder>/<key>.png`).

Edit sets are JSON Lines (`{"key", "image", "instruction", "task_type", "instruction_language"}` per line; the last
two optional, `image` relative to the set's folder or `--image-root`) or ImgEdit's JSON (`{key: {"id": image path,
"prompt": instruction, "edit_type": type}}`). Every run also writes `manifest_rank<r>.jsonl`: one record per output
with the settings and the wall time of the edit.

`PipelineEditor` adapts any pipeline with the call shape of `G2TRBagelPipeline`:
`pipe(prompt, image=..., num_inference_steps=..., generator=..., g2tr_ratio=..., **guidance)` returning `.images`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = ["LAYOUTS", "EditSample", "PipelineEditor", "output_path", "read_edit_set", "run_edit_set"]

LAYOUTS = ("gedit", "imgedit")


@dataclass(frozen=True)
class EditSample:
    """One edit: a unique key, the input image's path, the instruction, and GEdit-Bench's grouping fields."""

    key: str
    image: Path
    instruction: str
    task_type: str = "edit"
    language: str = "en"


def _require(record: dict, name: str, where: str) -> Any:
    if name not in record or record[name] in (None, ""):
        raise ValueError(f"{where}: missing field {name!r}")
    return record[name]


def read_edit_set(path: str | Path, image_root: str | Path | None = None) -> list[EditSample]:
    """The samples of an edit set file (see the module docstring for the two formats), in file order.

    Raises:
        ValueError: a record without its key, image or instruction, or a key used twice.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    samples = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record, where = json.loads(line), f"{path}:{number}"
            samples.append(
                EditSample(
                    key=str(_require(record, "key", where)),
                    image=root / _require(record, "image", where),
                    instruction=_require(record, "instruction", where),
                    task_type=record.get("task_type") or "edit",
                    language=record.get("instruction_language") or "en",
                )
            )
    elif path.suffix == ".json":
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content, dict):
            raise ValueError(f"{path}: expected ImgEdit's JSON object {{key: {{id, prompt, edit_type}}}}")
        for key, record in content.items():
            where = f"{path}: key {key!r}"
            samples.append(
                EditSample(
                    key=str(key),
                    image=root / _require(record, "id", where),
                    instruction=_require(record, "prompt", where),
                    task_type=record.get("edit_type") or "edit",
                )
            )
    else:
        raise ValueError(f"`edit_set` must be a .jsonl or an ImgEdit .json file, got {str(path)!r}")
    keys = [sample.key for sample in samples]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"{path}: keys used more than once: {duplicates[:5]}")
    return samples


def output_path(sample: EditSample, output_dir: str | Path, layout: str, model_name: str = "g2tr") -> Path:
    """Where `layout` puts the edited image of `sample`."""
    if layout == "gedit":
        return Path(output_dir) / model_name / "fullset" / sample.task_type / sample.language / f"{sample.key}.png"
    if layout == "imgedit":
        return Path(output_dir) / f"{sample.key}.png"
    raise ValueError(f"`layout` must be one of {list(LAYOUTS)}, got {layout!r}")


class PipelineEditor:
    """Edits one image with any pipeline of `G2TRBagelPipeline`'s call shape, at a fixed ratio and settings.

    Args:
        pipe: the pipeline (`pipe(prompt, image=..., num_inference_steps=..., generator=..., g2tr_ratio=...,
            **pipeline_kwargs).images[0]`).
        g2tr_ratio: keep ratio of the input image's ViT tokens (1.0: unreduced; None: the model's).
        num_inference_steps: sampler steps.
        pipeline_kwargs: further arguments (guidance scales, ...), passed unchanged.
    """

    def __init__(
        self, pipe, g2tr_ratio: float | None = None, num_inference_steps: int = 50, pipeline_kwargs: dict | None = None
    ):
        self.pipe, self.g2tr_ratio = pipe, g2tr_ratio
        self.num_inference_steps, self.pipeline_kwargs = num_inference_steps, dict(pipeline_kwargs or {})

    def edit(self, image: Image.Image, instruction: str, seed: int) -> Image.Image:
        """The edited image; `seed` seeds the initial noise (the same seed and input give the same image)."""
        generator = torch.Generator().manual_seed(seed)
        output = self.pipe(
            instruction,
            image=image,
            num_inference_steps=self.num_inference_steps,
            generator=generator,
            g2tr_ratio=self.g2tr_ratio,
            **self.pipeline_kwargs,
        )
        return output.images[0]


def _load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise ValueError(f"cannot read the input image {str(path)!r} ({error})") from None


def run_edit_set(
    editor: PipelineEditor,
    samples: Sequence[EditSample],
    output_dir: str | Path,
    layout: str = "gedit",
    model_name: str = "g2tr",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    overwrite: bool = False,
) -> list[dict]:
    """Edit this rank's share of `samples` (`samples[rank::world_size]`) and write them in `layout`.

    Outputs that already exist are kept (a stopped run resumes) unless `overwrite`. Returns the manifest records
    written to `output_dir/manifest_rank<rank>.jsonl`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {list(LAYOUTS)}, got {layout!r}")
    if not (0 <= rank < world_size):
        raise ValueError(f"`rank` must lie in [0, world_size={world_size}), got {rank}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for sample in samples[rank::world_size]:
        target = output_path(sample, output_dir, layout, model_name)
        if target.exists() and not overwrite:
            logger.info(f"{target} exists: kept (pass overwrite to redo it)")
            continue
        source = _load_image(sample.image)
        start = time.perf_counter()
        edited = editor.edit(source, sample.instruction, seed)
        seconds = time.perf_counter() - start
        target.parent.mkdir(parents=True, exist_ok=True)
        edited.save(target)
        if layout == "gedit":
            source.save(target.with_name(f"{sample.key}_SRCIMG.png"))
        records.append(
            {
                "key": sample.key,
                "output": str(target.relative_to(output_dir)),
                "instruction": sample.instruction,
                "task_type": sample.task_type,
                "instruction_language": sample.language,
                "g2tr_ratio": editor.g2tr_ratio,
                "num_inference_steps": editor.num_inference_steps,
                "seed": seed,
                "seconds": seconds,
                "rank": rank,
            }
        )
    with (output_dir / f"manifest_rank{rank}.jsonl").open("a", encoding="utf-8") as manifest:
        for record in records:
            manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records

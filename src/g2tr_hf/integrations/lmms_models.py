"""The lmms-eval model class of g2tr_hf: `--model g2tr`.

lmms-eval finds it through the `lmms_eval.models` entry point that g2tr_hf declares (`lmms_plugin.manifests`); this
module imports lmms-eval and is only imported by lmms-eval's registry (or by code that uses lmms-eval directly).

```bash
lmms-eval --model g2tr \
    --model_args pretrained=DIR,g2tr_ratio=0.5,g2tr_method=g2tr \
    --tasks mme,mmbench_en_dev_static,mmvp,realworldqa --batch_size 8 --log_samples --output_path runs/r050
```

`pretrained` is a folder written by `g2tr-hf convert` / `g2tr-hf export` (BAGEL or InternVL-U: the folder's
config decides), a Hub repo id, or `tiny-bagel` / `tiny-internvlu` (random weights, for smoke tests). Every other
model argument is listed in `G2TRLMMs.__init__`; an unknown one is an error, not silently ignored. Each sample's
`token_counts` in the `--log_samples` output carry, next to lmms-eval's `input_tokens` / `output_tokens`, the
reduction's budget: `image_tokens`, `kept_tokens`, `kv_entries`, `kv_entries_unreduced`, `prefill_flops`,
`prefill_flops_unreduced`, `batch_prefill_seconds`, `batch_size`, `g2tr_ratio`, `g2tr_method` and the `rank`
of the process that answered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from transformers.utils import logging

from .batch_generation import BatchedUnderstanding, UnderstandingRequest


logger = logging.get_logger(__name__)

__all__ = ["G2TRLMMs", "G2TRTokenCounts"]

_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The reduction options a run may set, as `--model_args` keys (the config fields of the same names).
REDUCTION_ARGS = (
    "g2tr_ratio",
    "g2tr_method",
    "g2tr_min_keep",
    "g2tr_latent_pool",
    "g2tr_merge",
    "g2tr_merge_scaling",
    "g2tr_cell_mapping",
)


@dataclass
class G2TRTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus the reduction's budget; `to_dict` is what `--log_samples` writes."""

    budget: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), **self.budget}


def _batch_size(value: Any) -> int:
    # lmms-eval passes the CLI's `--batch_size` as a string ("8"); "auto" is not implemented by lmms-eval's models.
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ValueError(f"`batch_size` must be a positive integer (lmms-eval's `auto` is not supported), got {value!r}.")
    return size


class G2TRLMMs(lmms):
    """BAGEL or InternVL-U with G2TR (or a baseline selection method) behind lmms-eval's model API.

    A "simple" lmms-eval model: tasks hand over the prompt text and the document's images. Requests are answered in
    batches of `batch_size` left-padded rows, grouped by generation settings.

    Args:
        pretrained: a g2tr_hf model folder, a Hub repo id, or `tiny-bagel` / `tiny-internvlu`.
        g2tr_ratio, g2tr_method, g2tr_min_keep, g2tr_latent_pool, g2tr_merge, g2tr_merge_scaling, g2tr_cell_mapping:
            the reduction options (config fields); unset ones keep the folder's values. `g2tr_ratio=1.0` is the
            unreduced model.
        dtype: "auto" (the folder's), "float32", "bfloat16" or "float16".
        attn_implementation: e.g. "sdpa" (default of the models) or "eager".
        device: where to run in a single process (default: "cuda" when available, else "cpu"). Under `accelerate
            launch` each process takes its own device instead.
        device_map: e.g. "auto" to split one model over the visible GPUs (model parallel; one process only).
        batch_size: rows per `generate` call (lmms-eval's `--batch_size`).
        max_new_tokens: answer length for tasks whose settings give none (32).
        trust_remote_code: allow a folder of another model type to run the code it ships.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        g2tr_ratio: float | None = None,
        g2tr_method: str | None = None,
        g2tr_min_keep: int | None = None,
        g2tr_latent_pool: int | None = None,
        g2tr_merge: bool | None = None,
        g2tr_merge_scaling: float | None = None,
        g2tr_cell_mapping: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        device: str | None = None,
        device_map: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_new_tokens: int = 32,
        trust_remote_code: bool = False,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"Unknown g2tr model arguments {sorted(unknown)}; expected some of pretrained, {', '.join(REDUCTION_ARGS)}, "
                "dtype, attn_implementation, device, device_map, batch_size, max_new_tokens, trust_remote_code."
            )
        if dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of {list(_DTYPES)}, got {dtype!r}.")
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.accelerator, device = self._placement(device, device_map)
        self._model, self.processor = self._load(pretrained, dtype, attn_implementation, device_map, trust_remote_code)
        if device_map is None:
            self._model.to(device)
        self._device = self._model.device
        self._set_reduction(
            dict(
                g2tr_ratio=g2tr_ratio,
                g2tr_method=g2tr_method,
                g2tr_min_keep=g2tr_min_keep,
                g2tr_latent_pool=g2tr_latent_pool,
                g2tr_merge=g2tr_merge,
                g2tr_merge_scaling=g2tr_merge_scaling,
                g2tr_cell_mapping=g2tr_cell_mapping,
            )
        )
        self.pretrained = pretrained
        self.answerer = BatchedUnderstanding(
            self._model, self.processor, batch_size=self.batch_size_per_gpu, max_new_tokens=max_new_tokens
        )

    # --- placement and loading ------------------------------------------------------------------------------------

    def _placement(self, device: str | None, device_map: str | None):
        """`(accelerator or None, device)`. Under `accelerate launch` / `torchrun` with several processes each rank
        runs a whole model on its own device (data parallel); `device_map` splits one model (model parallel) and
        cannot be combined with several processes."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1:
            if device_map is not None:
                raise ValueError(
                    "`device_map` splits one model over several GPUs in ONE process; it cannot be combined with a "
                    f"{world_size}-process launch (data parallel). Drop `device_map` or launch one process."
                )
            from accelerate import Accelerator

            accelerator = Accelerator()
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
            return accelerator, accelerator.device
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return None, torch.device(device)

    @staticmethod
    def _load(pretrained: str, dtype: str, attn_implementation: str | None, device_map: str | None, trusted: bool):
        from ..cli import CLIError, load_model, resolve_model

        try:
            source = resolve_model(str(pretrained))
        except CLIError as error:
            raise ValueError(str(error).replace("`--model`", "`pretrained`")) from None
        kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype]}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if device_map is not None:
            kwargs["device_map"] = device_map
        if source.kind == "tiny":
            model, processor = load_model(source)
            if dtype != "auto":
                model.to(_DTYPES[dtype])
            return model, processor
        try:
            return load_model(source, trusted, **kwargs)
        except CLIError as error:
            raise ValueError(str(error).replace("`--model`", "`pretrained`")) from None

    def _set_reduction(self, options: dict[str, Any]) -> None:
        config = self._model.config
        for name, value in options.items():
            if value is not None:
                setattr(config, name, value)
        config.validate_g2tr()  # names the bad field, e.g. "`g2tr_ratio` must be in (0, 1]"
        logger.info(
            f"g2tr: {type(self._model).__name__}, g2tr_ratio={config.g2tr_ratio}, g2tr_method={config.g2tr_method}, "
            f"batch size {self.batch_size_per_gpu}, rank {self._rank}/{self._world_size}"
        )

    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # --- the lmms-eval API ----------------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[GenerationResult]:
        """One `GenerationResult` per request, in request order (each carries the sample's budget)."""
        work = []
        for request in requests:
            context, generation, doc_to_visual, doc_id, task, split = request.args[:6]
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            visuals = [visual for visual in (visuals or []) if visual is not None]
            if not all(isinstance(visual, PIL.Image.Image) for visual in visuals):
                kinds = sorted({type(visual).__name__ for visual in visuals})
                raise ValueError(f"Task {task!r} gives visuals of types {kinds}; g2tr models take images only.")
            images = tuple(visual.convert("RGB") for visual in visuals)
            work.append(UnderstandingRequest(context, images, dict(generation or {})))
        progress = self._progress_bar(len(work))
        answers = self.answerer(work, progress=progress.update if progress is not None else None)
        if progress is not None:
            progress.close()
        config = self._model.config
        results = []
        for answer in answers:
            budget = {
                **answer.budget.to_dict(),
                "g2tr_ratio": config.g2tr_ratio,
                "g2tr_method": config.g2tr_method,
                "rank": self._rank,
            }
            counts = G2TRTokenCounts(
                input_tokens=answer.budget.kv_entries, output_tokens=answer.output_tokens, budget=budget
            )
            results.append(GenerationResult(text=answer.text, token_counts=counts))
        return results

    def _progress_bar(self, total: int):
        if self._rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc="g2tr: answering")

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "g2tr models answer generation tasks (generate_until) only; loglikelihood tasks are not supported."
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("g2tr models do not implement lmms-eval's multi-round generation.")

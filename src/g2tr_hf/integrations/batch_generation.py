"""Batched understanding requests on a g2tr_hf model, with what each sample cost.

This is the harness-independent core of the lmms-eval plugin (`lmms_models.G2TRLMMs`): it turns (prompt, images,
generation settings) requests into greedy or sampled answers, in batches of left-padded rows grouped by generation
settings, and records for every sample

- `image_tokens` / `kept_tokens`: ViT tokens of each of its images before and after the reduction,
- `kv_entries` / `kv_entries_unreduced`: entries its rows leave in the KV cache after the prefill (text, image blocks
  with their markers), with and without the reduction,
- `prefill_flops` / `prefill_flops_unreduced`: the analytic LLM prefill FLOPs of `g2tr_hf.profiling`,
- `batch_prefill_seconds`: the measured wall time of the prefill forward of the batch the sample ran in (the anchor
  VAE encode and the selection included; CUDA-synchronised), with `batch_size`.

Kept counts come from the reduction plans the model itself returns from its prefill forward, read by a forward hook,
so the numbers are those of the run that produced the answer, not of a second pass.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
import torch
from transformers.utils import logging

from ..profiling import _image_markers, account_request, decoder_shape, prompt_segments


logger = logging.get_logger(__name__)

__all__ = [
    "Answer",
    "BatchedUnderstanding",
    "PrefillRecorder",
    "SampleBudget",
    "UnderstandingRequest",
    "generation_settings",
    "plan_batches",
]

# Keys of a harness's generation settings that map onto `generate` (lmms-eval task YAMLs carry these; `until` is
# applied by us, as stop strings cut after decoding).
_GENERATE_KEYS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample",
                  "repetition_penalty")
_IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class UnderstandingRequest:
    """One question: the text prompt, its images (PIL, in order; they precede the text) and the harness's generation
    settings (`max_new_tokens`, `temperature`, `until`, ...)."""

    prompt: str
    images: tuple = ()
    generation: dict = field(default_factory=dict)


@dataclass
class SampleBudget:
    """What one sample cost (see the module docstring)."""

    image_tokens: list[int]
    kept_tokens: list[int]
    prompt_tokens: int
    kv_entries: int
    kv_entries_unreduced: int
    prefill_flops: int
    prefill_flops_unreduced: int
    batch_prefill_seconds: float
    batch_size: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Answer:
    """The decoded answer (cut at the first stop string), the number of generated tokens and the sample's budget."""

    text: str
    output_tokens: int
    budget: SampleBudget


def generation_settings(settings: dict | None, default_max_new_tokens: int) -> tuple[dict, list[str]]:
    """`(generate kwargs, stop strings)` from a harness's settings.

    `temperature` 0 (or absent) means greedy decoding, as in lmms-eval's task YAMLs; sampling needs a positive
    temperature. `until` (a string or a list) becomes stop strings. Other keys are ignored with a warning: task YAMLs
    carry model-specific hints that do not apply here.

    Raises:
        ValueError: `max_new_tokens` that is not a positive integer, a negative temperature, or `until` that is not a
            string or a list of strings.
    """
    settings = dict(settings or {})
    until = settings.pop("until", None)
    if until is None:
        stops = []
    elif isinstance(until, str):
        stops = [until]
    elif isinstance(until, (list, tuple)) and all(isinstance(stop, str) for stop in until):
        stops = list(until)
    else:
        raise ValueError(f"`until` must be a string or a list of strings, got {until!r}.")
    ignored = sorted(key for key in settings if key not in _GENERATE_KEYS)
    if ignored:
        logger.warning_once(f"Ignoring generation settings that do not apply to g2tr_hf models: {ignored}.")
    kwargs = {key: settings[key] for key in _GENERATE_KEYS if settings.get(key) is not None}
    kwargs.setdefault("max_new_tokens", default_max_new_tokens)
    if not isinstance(kwargs["max_new_tokens"], int) or kwargs["max_new_tokens"] < 1:
        raise ValueError(f"`max_new_tokens` must be a positive integer, got {kwargs['max_new_tokens']!r}.")
    temperature = float(kwargs.get("temperature", 0.0))
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}.")
    if temperature == 0 or kwargs.get("do_sample") is False:
        for key in ("temperature", "top_p", "top_k"):
            kwargs.pop(key, None)
        kwargs["do_sample"] = False
    else:
        kwargs["do_sample"] = True
    return kwargs, stops


def _group_key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def plan_batches(keys: Sequence[str], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the requests, grouped by equal `keys` (generation settings never mix in a batch), longest prompt
    first within a group (an out-of-memory error shows up on the first batch), cut into batches of `batch_size`."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    batches = []
    for members in groups.values():
        members = sorted(members, key=lambda index: -lengths[index])
        batches += [members[start : start + batch_size] for start in range(0, len(members), batch_size)]
    return batches


def _synchronize(model: torch.nn.Module) -> None:
    """Wait for every CUDA device the model lives on (a `device_map` model may span several)."""
    if not torch.cuda.is_available():
        return
    devices = {parameter.device for parameter in model.parameters() if parameter.device.type == "cuda"}
    for device in devices:
        torch.cuda.synchronize(device)


class PrefillRecorder:
    """Context manager that records the first forward of a g2tr_hf model inside it (the prefill of a `generate`):
    its wall time (CUDA-synchronised) and the reduction plans it returned (`image_reductions`)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.seconds: float | None = None
        self.plans = None
        self._start: float | None = None
        self._handles = []

    def _before(self, module, args, kwargs):
        if self._start is None:
            _synchronize(self.model)
            self._start = time.perf_counter()

    def _after(self, module, args, kwargs, output):
        if self.seconds is None:
            _synchronize(self.model)
            self.seconds = time.perf_counter() - self._start
            self.plans = getattr(output, "image_reductions", None)

    def __enter__(self) -> PrefillRecorder:
        self._handles = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return text[: min(positions)] if positions else text


class BatchedUnderstanding:
    """Answers `UnderstandingRequest`s with a g2tr_hf model (BAGEL or InternVL-U) in batches.

    The reduction settings are the model config's (`g2tr_ratio`, `g2tr_method`, ...): set them before calling.

    Args:
        model: a g2tr_hf `...ForConditionalGeneration` in eval mode.
        processor: its processor (left-pads batches).
        batch_size: rows per `generate` call.
        max_new_tokens: answer length when the request's settings give none (lmms-eval's `textvqa_val` gives none).
    """

    def __init__(self, model, processor, batch_size: int = 1, max_new_tokens: int = 32):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}.")
        plan_batches([], [], batch_size)  # validates batch_size
        self.model, self.processor = model, processor
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self._shape = decoder_shape(model.config.get_text_config())
        self._markers = _image_markers(model.config)
        eos = model.generation_config.eos_token_id
        self._eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long)

    def __call__(
        self, requests: Sequence[UnderstandingRequest], progress: Callable[[int], None] | None = None
    ) -> list[Answer]:
        """Answers in the order of `requests`; `progress(n)` is called after each batch with its size."""
        settings = [generation_settings(request.generation, self.max_new_tokens) for request in requests]
        keys = [_group_key({"generate": kwargs, "until": stops}) for kwargs, stops in settings]
        lengths = [len(request.prompt) for request in requests]
        answers: list[Answer | None] = [None] * len(requests)
        for batch in plan_batches(keys, lengths, self.batch_size):
            kwargs, stops = settings[batch[0]]
            for index, answer in zip(batch, self._run_batch([requests[i] for i in batch], kwargs, stops)):
                answers[index] = answer
            if progress is not None:
                progress(len(batch))
        return answers

    def _conversation(self, request: UnderstandingRequest) -> list[dict]:
        # Harness prompts written for LLaVA-style models may carry literal <image> markers: the images are placed
        # before the text by the chat template instead.
        text = request.prompt.replace(_IMAGE_PLACEHOLDER, "").strip()
        content = [{"type": "image", "image": image} for image in request.images]
        return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]

    def _run_batch(self, requests: list[UnderstandingRequest], kwargs: dict, stops: list[str]) -> list[Answer]:
        # The chat template writes the prompts; the processor then tokenizes the batch with left padding (calling it
        # directly keeps `padding` a plain argument on every transformers release).
        prompts = [
            self.processor.apply_chat_template(self._conversation(request), add_generation_prompt=True, tokenize=False)
            for request in requests
        ]
        images = [image for request in requests for image in request.images]
        inputs = self.processor(
            text=prompts, images=images or None, padding=True, return_tensors="pt"
        ).to(self.model.device)
        prompt_length = inputs["input_ids"].shape[1]
        with PrefillRecorder(self.model) as recorder, torch.inference_mode():
            generated = self.model.generate(**inputs, **kwargs, pad_token_id=self.processor.tokenizer.pad_token_id)
        new_tokens = generated[:, prompt_length:].cpu()
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        budgets = self._budgets(inputs, recorder, [len(request.images) for request in requests])
        return [
            Answer(_cut_at_stops(text, stops).strip(), self._answer_length(row), budget)
            for text, row, budget in zip(texts, new_tokens, budgets)
        ]

    def _answer_length(self, tokens: torch.Tensor) -> int:
        """Generated tokens up to and including the first end-of-sequence token (the rest is padding)."""
        ends = torch.isin(tokens, self._eos_ids).nonzero()
        return int(ends[0, 0]) + 1 if len(ends) else int(tokens.numel())

    def _budgets(self, inputs, recorder: PrefillRecorder, images_per_row: list[int]) -> list[SampleBudget]:
        start_id, end_id, bidirectional = self._markers
        ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu().bool()
        rows = [ids[row][mask[row]] for row in range(ids.shape[0])]
        full_counts = [
            [segment.length - 2 for segment in prompt_segments(row, start_id, end_id) if segment.image] for row in rows
        ]
        if [len(counts) for counts in full_counts] != images_per_row:
            raise RuntimeError(
                f"The prompts hold {[len(c) for c in full_counts]} image blocks per row, but the requests carry "
                f"{images_per_row} images: the processor's chat template did not place every image."
            )
        plans = recorder.plans
        if plans is None:  # nothing reduced (ratio 1.0, or every image at or below min_keep)
            kept_counts = full_counts
        else:
            if len(plans) != sum(images_per_row):
                raise RuntimeError(f"The model returned {len(plans)} reduction plans for {sum(images_per_row)} images.")
            kept_iter = iter(plan.num_kept for plan in plans)  # image order = row order, then order within a row
            kept_counts = [[next(kept_iter) for _ in range(count)] for count in images_per_row]
        budgets = []
        for row, full, kept in zip(rows, full_counts, kept_counts):
            accounting = account_request(
                row,
                self._shape,
                image_start_token_id=start_id,
                image_end_token_id=end_id,
                kept_image_tokens=kept,
                bidirectional_images=bidirectional,
            )
            budgets.append(
                SampleBudget(
                    image_tokens=list(full),
                    kept_tokens=[int(k) for k in kept],
                    prompt_tokens=int(row.numel()),
                    kv_entries=accounting.kv_entries[1],
                    kv_entries_unreduced=accounting.kv_entries[0],
                    prefill_flops=accounting.prefill_flops[1],
                    prefill_flops_unreduced=accounting.prefill_flops[0],
                    batch_prefill_seconds=float(recorder.seconds or 0.0),
                    batch_size=len(rows),
                )
            )
        return budgets


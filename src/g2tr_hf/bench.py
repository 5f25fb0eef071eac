"""`g2tr-hf bench`: speed, budget and fidelity of every reduction method side by side, on one model in one run.

For each image + question of a sample set, the unreduced model is the reference. Every (method, ratio) pair then
runs the same prompt and is scored on:

- budget: tokens entering the LLM, layer-averaged tokens ("Avg. Tokens"), KV entries and bytes, analytic LLM prefill
  FLOPs (`profiling`), plus the FLOPs of work a method adds outside the LLM (G2TR's anchor VAE encode);
- speed: measured prefill time and per-token decode time, medians over repeats after warm-up rounds, with their
  spread (max - min); all pairs are timed round-robin inside each repeat, so slow drifts of the machine hit every
  method alike; CUDA is synchronised around every timer;
- fidelity to the unreduced model: KL(p_full || p_reduced) of the next-token distribution at the answer position,
  top-1 agreement of that token, and exact match of the greedy answers;
- editing (BAGEL, `edit=True`): relative error of the first flow-velocity prediction (same noise, same timestep),
  and PSNR / SSIM of the final edited image against the unreduced edit with the same seed (not for in-LLM methods,
  which the editing pipeline refuses: it prefills the image before the instruction).

Results go to a CSV, a markdown table and a Pareto PNG (matplotlib when installed, the `plot` extra; otherwise a
plain PIL drawing of the same points).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers import StoppingCriteria, StoppingCriteriaList

from .baselines import reduction_options, resolve_method
from .in_llm import acts_in_llm, drop_schedule, layer_token_counts
from .profiling import _count_reduction_overhead, _image_markers, account_request, decoder_shape, kv_cache_bytes
from .profiling import prefill_flops, prompt_segments
from .reduction import keep_count


__all__ = [
    "BenchResult",
    "BenchRow",
    "BenchSample",
    "builtin_samples",
    "load_samples",
    "psnr",
    "run_bench",
    "ssim",
    "write_reports",
]

DEFAULT_METHODS = (
    "g2tr", "random", "pool", "divprune", "visionzip", "tome", "fastv", "wfastv", "pdrop", "dart", "ivcprune", "vscan",
)  # fmt: skip
DEFAULT_RATIOS = (0.25, 0.5)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DEFAULT_QUESTION = "Describe this image."


# ----------------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BenchSample:
    """One request: its images (in prompt order), the question, and a name for the tables."""

    images: list[Image.Image]
    question: str
    name: str


def _blobs(seed: int, size: int) -> Image.Image:
    """Random coloured ellipses and rectangles on a gradient: structure for selection methods to react to."""
    rng = np.random.RandomState(seed)
    gradient = np.linspace(0, 1, size)[None, :, None] * rng.randint(0, 255, 3) + rng.randint(0, 80, 3)
    image = Image.fromarray(np.broadcast_to(gradient, (size, size, 3)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randint(0, size, 2)
        x1, y1 = x0 + rng.randint(size // 8, size // 2), y0 + rng.randint(size // 8, size // 2)
        colour = tuple(int(c) for c in rng.randint(0, 255, 3))
        (draw.ellipse if rng.rand() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return image


def builtin_samples(size: int = 256) -> list[BenchSample]:
    """The small generated set that ships: four synthetic images with questions (no download, no files)."""
    from .demo import synthetic_scene

    scene = synthetic_scene(size)
    return [
        BenchSample([scene], "What is in this picture?", "scene"),
        BenchSample([scene.transpose(Image.FLIP_LEFT_RIGHT)], "Where is the sun?", "scene-flipped"),
        BenchSample([_blobs(1, size)], "How many shapes are there?", "blobs-1"),
        BenchSample([_blobs(2, size).resize((size, size * 3 // 4))], "What colour is the largest shape?", "blobs-2"),
    ]


def _open_image(path: Path, source: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"{source}: cannot read image {str(path)!r}: {error}") from None


def _records_from_file(path: Path) -> list[dict]:
    if path.suffix.lower() == ".json":
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"`data`: {str(path)!r} is not valid JSON: {error}") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"`data`: {str(path)!r} must hold a JSON list of objects with `image` and `question`.")
        return records
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    raise ValueError(f"`data`: {str(path)!r} must be a .json or .csv file, or a folder of images.")


def load_samples(data: str | Path | None) -> list[BenchSample]:
    """The bench's requests.

    Args:
        data: None for `builtin_samples()`; a .json file (a list of `{"image": path or [paths], "question": str}`),
            a .csv file (columns `image`, `question`; several images separated by `;`), or a folder holding either
            `questions.json` / `questions.csv` or just images (each asked `DEFAULT_QUESTION`). Image paths are
            relative to the file's folder.
    """
    if data is None:
        return builtin_samples()
    path = Path(data).expanduser()
    if path.is_dir():
        for name in ("questions.json", "questions.csv"):
            if (path / name).is_file():
                return load_samples(path / name)
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"`data`: folder {str(path)!r} holds no images and no questions.json / questions.csv.")
        return [BenchSample([_open_image(p, "`data`")], DEFAULT_QUESTION, p.stem) for p in files]
    if not path.is_file():
        raise ValueError(f"`data`: no file or folder {str(path)!r}.")
    samples = []
    for index, record in enumerate(_records_from_file(path)):
        image = record.get("image")
        question = record.get("question") or DEFAULT_QUESTION
        if not image:
            raise ValueError(f"`data`: entry {index} of {str(path)!r} has no `image`.")
        names = image if isinstance(image, list) else str(image).split(";")
        images = [_open_image(path.parent / name.strip(), f"`data` entry {index}") for name in names]
        samples.append(BenchSample(images, str(question), record.get("name") or Path(names[0].strip()).stem))
    if not samples:
        raise ValueError(f"`data`: {str(path)!r} holds no entries.")
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def next_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(p_ref || p) in nats of two next-token logit rows [V]."""
    log_ref = F.log_softmax(reference_logits.float(), dim=-1)
    log_p = F.log_softmax(logits.float(), dim=-1)
    return float((log_ref.exp() * (log_ref - log_p)).sum())


def psnr(reference: torch.Tensor, image: torch.Tensor) -> float:
    """PSNR in dB of two [3, H, W] images in [0, 1] (inf when identical)."""
    mse = float(F.mse_loss(image.float(), reference.float()))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(reference: torch.Tensor, image: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two [C, H, W] images in [0, 1] with a Gaussian window (Wang et al. 2004 constants), per channel
    and averaged."""
    x, y = reference.float()[:, None], image.float()[:, None]
    window = min(window, x.shape[-1], x.shape[-2]) // 2 * 2 + 1 if min(x.shape[-2:]) < window else window
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(values: torch.Tensor) -> torch.Tensor:
        return F.conv2d(values, kernel)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


def _spread(values: Sequence[float]) -> float:
    return max(values) - min(values) if values else math.nan


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


# ----------------------------------------------------------------------------------------------------------------
# One configuration on one sample
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Config:
    """One (method, ratio) pair; `method=None` is the unreduced reference."""

    method: str | None
    ratio: float

    @property
    def label(self) -> str:
        return "unreduced" if self.method is None else self.method

    def context(self, model):
        if self.method is None:
            return reduction_options(model)
        return reduction_options(model, self.method)

    @property
    def call_ratio(self) -> float:
        return 1.0 if self.method is None else self.ratio


@dataclass
class _Measure:
    """What one configuration gave on one sample."""

    tokens_in_llm: int
    avg_tokens: float
    kv_entries: int
    kv_bytes: int
    prefill_flops: int
    extra_flops: int
    logits: torch.Tensor
    answer: list[int]
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)  # one entry per decode step of every timed round
    velocity: torch.Tensor | None = None
    edited: torch.Tensor | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


def _model_inputs(model, processor, sample: BenchSample) -> dict:
    content = [{"type": "image", "image": image} for image in sample.images]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": sample.question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return inputs.to(model.device)


def _budget(model, inputs: dict, output, ratio: float) -> tuple[int, float, int, int, int]:
    """(tokens entering the LLM, layer-averaged tokens, KV entries per layer, KV bytes, analytic prefill FLOPs).

    Pre-LLM methods: every layer sees the tokens that entered. In-LLM methods: all prompt tokens enter (`vscan`: what
    its ViT stage kept), each layer sees what the schedule left by then (`in_llm.layer_token_counts`), and after
    prefill every layer caches the final kept set; the FLOPs are summed layer by layer over those counts.
    """
    config = model.config
    shape = decoder_shape(config.get_text_config())
    start_id, end_id, bidirectional = _image_markers(config)
    row = inputs["input_ids"][0].cpu()
    if "attention_mask" in inputs:
        row = row[inputs["attention_mask"][0].cpu().bool()]
    full_blocks = [segment.length - 2 for segment in prompt_segments(row, start_id, end_id) if segment.image]
    plans = output.image_reductions
    kept = [plan.num_kept for plan in plans] if plans else full_blocks
    bytes_per_value = torch.finfo(model.dtype).bits // 8
    stored = int(output.reduced_attention_mask[0].sum())
    if not acts_in_llm(config.g2tr_method) or stored == row.numel():
        accounting = account_request(
            row,
            shape,
            image_start_token_id=start_id,
            image_end_token_id=end_id,
            kept_image_tokens=kept,
            bidirectional_images=bidirectional,
            bytes_per_value=bytes_per_value,
        )
        # Every layer sees the tokens that entered, so the layer average equals the entry count.
        return stored, float(stored), accounting.kv_entries[1], accounting.kv_bytes[1], accounting.prefill_flops[1]
    schedule = drop_schedule(config.g2tr_method, shape.num_layers, ratio)
    entering = row.numel() - sum(full_blocks) + sum(kept)
    counts = layer_token_counts(schedule, shape.num_layers, kept, row.numel() - sum(full_blocks),
                                config.g2tr_min_keep)  # fmt: skip
    one_layer = replace(shape, num_layers=1)
    lm_head = 2 * shape.hidden_size * shape.vocab_size
    flops = lm_head
    for layer in range(shape.num_layers):
        done = [keep for drop, keep in zip(schedule.drop_layers, schedule.keep) if drop <= layer]
        layer_kept = [keep_count(n, done[-1], config.g2tr_min_keep) if done else n for n in kept]
        segments = prompt_segments(row, start_id, end_id, layer_kept, bidirectional)
        flops += prefill_flops(segments, one_layer) - lm_head
    return entering, sum(counts) / len(counts), stored, kv_cache_bytes(stored, shape, bytes_per_value), flops


def _measure_once(model, inputs: dict, config: _Config, max_new_tokens: int) -> _Measure:
    """Untimed run: budget, next-token logits, greedy answer (and the FLOPs the method adds outside the decoder:
    anchor encodes, VScan's ViT attention scores)."""
    with config.context(model), torch.inference_mode():
        output, extra = _count_reduction_overhead(
            model, lambda: model(**inputs, use_cache=True, g2tr_ratio=config.call_ratio)
        )
        generated = model.generate(
            **inputs,
            g2tr_ratio=config.call_ratio,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
        )
        entering, avg, kv_entries, kv_bytes, flops = _budget(model, inputs, output, config.call_ratio)
    answer = generated[0, inputs["input_ids"].shape[1] :].tolist()
    return _Measure(entering, avg, kv_entries, kv_bytes, flops, int(extra), output.logits[0, -1].float().cpu(), answer)


class _StepClock(StoppingCriteria):
    """Never stops generation; records the time after every generated token (CUDA synchronised), so the gaps
    between consecutive stamps are the per-token decode times of that `generate` call."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _time_round(model, inputs: dict, config: _Config, measure: _Measure, max_new_tokens: int, keep: bool) -> None:
    """One timed prefill (`model(...)` with a cache) and one `generate` whose per-token decode steps are stamped."""
    device = model.device
    clock = _StepClock(device)
    with config.context(model), torch.inference_mode():
        prefill = _timed(lambda: model(**inputs, use_cache=True, g2tr_ratio=config.call_ratio), device)
        model.generate(
            **inputs,
            g2tr_ratio=config.call_ratio,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    if keep:
        measure.prefill_s.append(prefill)
        measure.decode_s.extend(later - earlier for earlier, later in zip(clock.stamps, clock.stamps[1:]))


def _edit_once(pipe, sample: BenchSample, config: _Config, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first guided velocity [h*w, p*p*C], edited image [3, H, W] in [0, 1]) of one edit at a fixed seed."""
    velocities = []
    forward = pipe._forward

    def recording(*args, **kwargs):
        velocity = forward(*args, **kwargs)
        # The pipeline returns one velocity per image of the batch; a bench edit is a batch of one.
        first = velocity[0] if isinstance(velocity, (list, tuple)) else velocity
        velocities.append(first.detach().float().cpu())
        return velocity

    pipe._forward = recording
    try:
        with config.context(pipe.model):
            output = pipe(
                prompt=sample.question,
                image=sample.images[0],
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed),
                g2tr_ratio=config.call_ratio,
                show_progress=False,
                output_type="pt",
            )
    finally:
        del pipe._forward
    return velocities[0], output.images[0].float().cpu()


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BenchRow:
    """One (method, ratio) pair, averaged over the samples (timings: medians over repeats, then mean over samples)."""

    method: str
    ratio: float
    tokens_in_llm: float
    avg_tokens: float
    kv_entries: float
    kv_mib: float
    prefill_gflops: float
    extra_gflops: float
    prefill_ms: float
    prefill_spread_ms: float
    decode_ms_per_token: float
    decode_spread_ms: float
    prefill_speedup: float
    next_token_kl: float
    top1_agreement: float
    greedy_exact_match: float
    velocity_rel_error: float = math.nan
    edit_psnr_db: float = math.nan
    edit_ssim: float = math.nan


@dataclass
class BenchResult:
    """Everything `run_bench` measured."""

    model: str
    device: str
    samples: int
    repeats: int
    warmup: int
    max_new_tokens: int
    rows: list[BenchRow]


class _Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled and total > 0

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 28
        filled = int(width * self.done / self.total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label[:40]:<40}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _check_options(methods, ratios, repeats, warmup, max_new_tokens, edit_steps) -> None:
    if not methods:
        raise ValueError("`methods` must name at least one method.")
    for method in methods:
        resolve_method(method)
    if not ratios or any(not isinstance(r, (int, float)) or not 0 < r <= 1 for r in ratios):
        raise ValueError(f"`ratios` must be numbers in (0, 1], got {list(ratios)!r}.")
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0), ("max_new_tokens", max_new_tokens, 1),
                             ("edit_steps", edit_steps, 2)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")


def run_bench(
    model,
    processor,
    samples: Sequence[BenchSample],
    methods: Iterable[str] = DEFAULT_METHODS,
    ratios: Iterable[float] = DEFAULT_RATIOS,
    *,
    repeats: int = 3,
    warmup: int = 1,
    max_new_tokens: int = 8,
    edit: bool = False,
    edit_steps: int = 4,
    seed: int = 0,
    progress: bool = True,
    model_name: str = "",
) -> BenchResult:
    """Measure every (method, ratio) pair against the unreduced model on `samples` (batch 1 each).

    Args:
        model, processor: a g2tr_hf model in eval mode and its processor.
        samples: `load_samples(...)`.
        methods: method specs (`baselines.resolve_method`): presets, registered names, `name:key=value`.
        ratios: keep ratios in (0, 1].
        repeats: timed rounds; warmup: untimed rounds before them.
        max_new_tokens: greedy answer length (forced, so decode timings cover the same number of steps).
        edit: also edit each sample's first image with its question (BAGEL only) and compare with the unreduced edit.
        edit_steps: sampler points of each edit (`num_inference_steps`).
    """
    methods, ratios, samples = list(methods), [float(r) for r in ratios], list(samples)
    _check_options(methods, ratios, repeats, warmup, max_new_tokens, edit_steps)
    if not samples:
        raise ValueError("`samples` is empty.")
    pipe = None
    if edit:
        if model.config.model_type != "g2tr_bagel":
            raise ValueError(f"`edit=True` needs a BAGEL model; this one is {model.config.model_type!r}.")
        from .pipeline_bagel import G2TRBagelPipeline

        pipe = G2TRBagelPipeline(model=model, processor=processor, device=model.device)
    configs = [_Config(None, 1.0)] + [_Config(m, r) for m in methods for r in ratios]
    rounds = warmup + repeats
    bar = _Progress(len(samples) * (len(configs) * (1 + rounds + (1 if edit else 0))), progress)
    per_sample: list[list[_Measure]] = []
    for sample in samples:
        inputs = _model_inputs(model, processor, sample)
        measures = []
        for config in configs:
            measures.append(_measure_once(model, inputs, config, max_new_tokens))
            bar.step(f"{sample.name} {config.label} {config.ratio}")
        for round_index in range(rounds):
            for config, measure in zip(configs, measures):
                _time_round(model, inputs, config, measure, max_new_tokens, keep=round_index >= warmup)
                bar.step(f"{sample.name} timing {round_index + 1}/{rounds}")
        if pipe is not None:
            for config, measure in zip(configs, measures):
                # In-LLM methods need the question in the image's prefill, which editing does not have: no edit.
                if config.method is None or not acts_in_llm(resolve_method(config.method)["g2tr_method"]):
                    measure.velocity, measure.edited = _edit_once(pipe, sample, config, edit_steps, seed)
                bar.step(f"{sample.name} edit {config.label} {config.ratio}")
        per_sample.append(measures)
    references = [measures[0] for measures in per_sample]
    rows = [_aggregate(config, [m[i] for m in per_sample], references) for i, config in enumerate(configs)]
    return BenchResult(model_name, str(model.device), len(samples), repeats, warmup, max_new_tokens, rows)


def _aggregate(config: _Config, measures: list[_Measure], references: list[_Measure]) -> BenchRow:
    def mean(values: Iterable[float]) -> float:
        values = list(values)
        return float(sum(values) / len(values)) if values else math.nan

    prefill = [_median(m.prefill_s) for m in measures]
    reference_prefill = [_median(m.prefill_s) for m in references]
    decode = [_median(m.decode_s) for m in measures]
    row = BenchRow(
        method=config.label,
        ratio=config.call_ratio,
        tokens_in_llm=mean(m.tokens_in_llm for m in measures),
        avg_tokens=mean(m.avg_tokens for m in measures),
        kv_entries=mean(m.kv_entries for m in measures),
        kv_mib=mean(m.kv_bytes / 2**20 for m in measures),
        prefill_gflops=mean(m.prefill_flops / 1e9 for m in measures),
        extra_gflops=mean(m.extra_flops / 1e9 for m in measures),
        prefill_ms=1e3 * mean(prefill),
        prefill_spread_ms=1e3 * mean(_spread(m.prefill_s) for m in measures),
        decode_ms_per_token=1e3 * mean(decode),
        decode_spread_ms=1e3 * mean(_spread(m.decode_s) for m in measures),
        prefill_speedup=mean(r / p for r, p in zip(reference_prefill, prefill)),
        next_token_kl=mean(next_token_kl(r.logits, m.logits) for r, m in zip(references, measures)),
        top1_agreement=mean(float(r.logits.argmax() == m.logits.argmax()) for r, m in zip(references, measures)),
        greedy_exact_match=mean(float(r.answer == m.answer) for r, m in zip(references, measures)),
    )
    if measures[0].velocity is not None:
        row.velocity_rel_error = mean(
            float((m.velocity - r.velocity).norm() / r.velocity.norm().clamp_min(1e-12))
            for r, m in zip(references, measures)
        )
        row.edit_psnr_db = mean(psnr(r.edited, m.edited) for r, m in zip(references, measures))
        row.edit_ssim = mean(ssim(r.edited, m.edited) for r, m in zip(references, measures))
    return row


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


_COLUMNS = {
    "method": ("Method", "{}"),
    "ratio": ("Ratio", "{:.3g}"),
    "tokens_in_llm": ("Tokens in LLM", "{:.1f}"),
    "avg_tokens": ("Avg. Tokens", "{:.1f}"),
    "kv_entries": ("KV entries", "{:.1f}"),
    "kv_mib": ("KV MiB", "{:.3g}"),
    "prefill_gflops": ("Prefill GFLOPs", "{:.4g}"),
    "extra_gflops": ("Extra GFLOPs", "{:.3g}"),
    "prefill_ms": ("Prefill ms", "{:.2f}"),
    "prefill_spread_ms": ("± ms", "{:.2f}"),
    "decode_ms_per_token": ("Decode ms/token", "{:.2f}"),
    "decode_spread_ms": ("± ms", "{:.2f}"),
    "prefill_speedup": ("Prefill speed-up", "{:.2f}x"),
    "next_token_kl": ("KL", "{:.4f}"),
    "top1_agreement": ("Top-1", "{:.2f}"),
    "greedy_exact_match": ("Exact", "{:.2f}"),
    "velocity_rel_error": ("Velocity err", "{:.4f}"),
    "edit_psnr_db": ("PSNR dB", "{:.2f}"),
    "edit_ssim": ("SSIM", "{:.4f}"),
}


def _format(key: str, value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return _COLUMNS[key][1].format(value)


def markdown_table(result: BenchResult) -> str:
    """The results as a markdown table (editing columns only when measured)."""
    keys = [f.name for f in fields(BenchRow)]
    if all(math.isnan(row.edit_psnr_db) for row in result.rows):
        keys = [k for k in keys if k not in ("velocity_rel_error", "edit_psnr_db", "edit_ssim")]
    lines = [
        f"Model: {result.model or 'unnamed'} on {result.device}; {result.samples} sample(s); prefill and decode "
        f"medians of {result.repeats} timed round(s) after {result.warmup} warm-up round(s); answers of "
        f"{result.max_new_tokens} greedy tokens. Fidelity is measured against the unreduced model.",
        "",
        "| " + " | ".join(_COLUMNS[k][0] for k in keys) + " |",
        "|" + "|".join("---" for _ in keys) + "|",
    ]
    for row in result.rows:
        lines.append("| " + " | ".join(_format(k, getattr(row, k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better on both), sorted by x."""
    front = [
        i for i, (x, y) in enumerate(points)
        if not any((ox >= x and oy >= y) and (ox > x or oy > y) for ox, oy in points)
    ]  # fmt: skip
    return sorted(front, key=lambda i: points[i][0])


def pareto_png(result: BenchResult, path: Path) -> Path:
    """Prefill speed-up (x) against top-1 agreement and against -KL (y), one point per (method, ratio), the Pareto
    front joined. matplotlib when installed, else a PIL drawing."""
    rows = result.rows
    panels = [("top-1 agreement", [r.top1_agreement for r in rows]), ("-KL (nats)", [-r.next_token_kl for r in rows])]
    xs = [r.prefill_speedup for r in rows]
    labels = [r.method if r.method == "unreduced" else f"{r.method} {r.ratio:g}" for r in rows]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _pareto_png_pil(xs, panels, labels, path)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, (name, ys) in zip(axes, panels):
        axis.scatter(xs, ys)
        for x, y, label in zip(xs, ys, labels):
            axis.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = _pareto_front(list(zip(xs, ys)))
        axis.plot([xs[i] for i in front], [ys[i] for i in front], linestyle="--", linewidth=1)
        axis.set_xlabel("prefill speed-up vs unreduced (measured)")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{result.model or 'model'}: speed / fidelity ({result.samples} samples)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _pareto_png_pil(xs, panels, labels, path: Path) -> Path:
    width, height, margin = 1000, 420, 50
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    panel_width = width // len(panels)
    for index, (name, ys) in enumerate(panels):
        left, right = index * panel_width + margin, (index + 1) * panel_width - 10
        top, bottom = 20, height - margin
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, bottom + 20), "prefill speed-up", fill="black")
        draw.text((left + 5, top + 5), name, fill="black")
        finite = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
        if not finite:
            continue
        x0, x1 = min(p[0] for p in finite), max(p[0] for p in finite)
        y0, y1 = min(p[1] for p in finite), max(p[1] for p in finite)

        def place(x, y):
            u = (x - x0) / (x1 - x0) if x1 > x0 else 0.5
            v = (y - y0) / (y1 - y0) if y1 > y0 else 0.5
            return left + 10 + u * (right - left - 20), bottom - 10 - v * (bottom - top - 20)

        # The axis ranges, since there are no ticks.
        draw.text((left, bottom + 5), f"{x0:.3g}", fill="gray")
        draw.text((right - 40, bottom + 5), f"{x1:.3g}", fill="gray")
        draw.text((right - 60, top + 5), f"max {y1:.3g}", fill="gray")
        draw.text((right - 60, bottom - 15), f"min {y0:.3g}", fill="gray")
        front = _pareto_front(list(zip(xs, ys)))
        draw.line([place(xs[i], ys[i]) for i in front], fill="gray", width=1)
        for x, y, label in zip(xs, ys, labels):
            if math.isfinite(x) and math.isfinite(y):
                px, py = place(x, y)
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill="blue")
                draw.text((px + 4, py - 10), label, fill="black")
    canvas.save(path)
    return path


def write_reports(result: BenchResult, output_dir: str | Path) -> dict[str, Path]:
    """Write `bench.csv`, `bench.md` and `bench_pareto.png` into `output_dir` (created). Returns their paths."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = folder / "bench.csv", folder / "bench.md", folder / "bench_pareto.png"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(BenchRow)])
        writer.writeheader()
        for row in result.rows:
            writer.writerow(asdict(row))
    md_path.write_text(markdown_table(result))
    pareto_png(result, png_path)
    return {"csv": csv_path, "markdown": md_path, "png": png_path}

"""Paired understanding evaluations (vanilla vs reduced) through lmms-eval, and the paper-style table.

`g2tr-hf eval run` plans one lmms-eval run per (method, ratio) of a model, plus the unreduced run (ratio 1.0), writes
them as ONE lmms-eval `--config` file and launches lmms-eval once on it (optionally under `accelerate launch` for
data parallelism); `g2tr-hf eval table` reads the output folders back and writes the table the G2TR paper prints
(Table 2: a score per benchmark and the relative average, i.e. the mean over benchmarks of score / vanilla score, in
percent), with budget columns taken from the per-sample logs of the g2tr lmms-eval plugin: kept image tokens, KV
entries, analytic prefill FLOPs and measured prefill time.

This module never imports lmms-eval: it writes lmms-eval's inputs and reads its outputs (`<output_path>/<model>/
<date>_results.json` and `<date>_samples_<task>.jsonl`).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


__all__ = [
    "BENCHMARKS",
    "EXTRA_UNDERSTANDING",
    "PAPER_UNDERSTANDING",
    "Benchmark",
    "BudgetSummary",
    "RunSpec",
    "RunSummary",
    "format_table",
    "lmms_eval_command",
    "lmms_eval_configs",
    "plan_runs",
    "read_run",
    "relative_average",
    "resolve_benchmark",
]


@dataclass(frozen=True)
class Benchmark:
    """A table column: where its score comes from in lmms-eval's results.

    Attributes:
        name: the column header.
        tasks: lmms-eval task names that produce it, in order of preference.
        metrics: metrics of that task, summed (MME's total is perception + cognition).
        scale: factor applied to the sum (100 turns an accuracy in [0, 1] into percent).
    """

    name: str
    tasks: tuple[str, ...]
    metrics: tuple[str, ...]
    scale: float = 1.0

    def score(self, results: dict[str, dict]) -> float | None:
        """The score from a results file's `results` mapping (None when none of `tasks` ran)."""
        for task in self.tasks:
            if task in results:
                values = [_metric(results[task], metric) for metric in self.metrics]
                if any(value is None for value in values):
                    return None
                return self.scale * sum(values)
        return None


def _metric(task_results: dict, metric: str) -> float | None:
    # lmms-eval stores "<metric>,<filter>" keys; every task used here has the single filter "none".
    for key in (f"{metric},none", metric):
        value = task_results.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (
        # MME total = perception (max 2000) + cognition (max 800), as the G2TR paper reports it.
        Benchmark("MME", ("mme",), ("mme_perception_score", "mme_cognition_score")),
        # The static variant parses every answer by rules (no GPT judge); the other may call one.
        Benchmark("MMBench", ("mmbench_en_dev_static", "mmbench_en_dev"), ("gpt_eval_score",)),
        Benchmark("MMVP", ("mmvp",), ("mmvp_accuracy",), 100.0),
        Benchmark("RWQA", ("realworldqa",), ("exact_match",), 100.0),
        Benchmark("POPE", ("pope",), ("pope_f1_score",), 100.0),
        Benchmark("GQA", ("gqa",), ("exact_match",), 100.0),
        Benchmark("TextVQA", ("textvqa_val",), ("exact_match",), 100.0),
    )
}
# The understanding set of the G2TR paper (Table 2), and the extras token-reduction papers usually add.
PAPER_UNDERSTANDING = ("MME", "MMBench", "MMVP", "RWQA")
EXTRA_UNDERSTANDING = ("POPE", "GQA", "TextVQA")


def resolve_benchmark(name: str) -> Benchmark:
    """A known column (`BENCHMARKS`), or any task's metric written `task:metric` (scaled x100: an accuracy)."""
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    task, _, metric = name.partition(":")
    if not task or not metric:
        raise ValueError(f"`benchmarks` must be among {list(BENCHMARKS)} or written task:metric, got {name!r}.")
    return Benchmark(name, (task,), (metric,), 100.0)


# ------------------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class RunSpec:
    """One lmms-eval run of a model: a keep ratio and a selection method (`vanilla` when the ratio is 1.0)."""

    ratio: float
    method: str

    @property
    def name(self) -> str:
        if self.is_vanilla:
            return "vanilla"
        return f"{self.method}_r{self.ratio:g}".replace(".", "p")

    @property
    def is_vanilla(self) -> bool:
        return self.ratio == 1.0


def plan_runs(ratios: Sequence[float], methods: Sequence[str]) -> list[RunSpec]:
    """Every (method, ratio) pair, with ratio 1.0 run once (the reduction is off, so the method is irrelevant)."""
    from .reduction import available_methods

    if not ratios or not methods:
        raise ValueError("`ratios` and `methods` must each name at least one value.")
    for ratio in ratios:
        if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise ValueError(f"`ratios` must lie in (0, 1], got {ratio!r}.")
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise ValueError(f"`methods` must be among {available_methods()}, got {unknown}.")
    specs = [RunSpec(1.0, methods[0])] if 1.0 in ratios else []
    specs += [RunSpec(float(ratio), method) for method in methods for ratio in ratios if ratio != 1.0]
    return specs


def lmms_eval_configs(
    pretrained: str,
    specs: Sequence[RunSpec],
    tasks: Sequence[str],
    output_dir: str | Path,
    *,
    batch_size: int = 1,
    include_path: str | None = None,
    limit: int | float | None = None,
    model_args: str = "",
) -> list[dict]:
    """lmms-eval `--config` entries, one per run: `--model g2tr`, the run's ratio and method in `--model_args`,
    samples logged, each run in its own `output_dir/<run name>` folder."""
    configs = []
    for spec in specs:
        arguments = f"pretrained={pretrained},g2tr_ratio={spec.ratio},g2tr_method={spec.method}"
        if model_args:
            arguments += f",{model_args}"
        config = {
            "model": "g2tr",
            "model_args": arguments,
            "tasks": ",".join(tasks),
            "batch_size": str(batch_size),
            "log_samples": True,
            "output_path": str(Path(output_dir) / spec.name),
        }
        if include_path:
            config["include_path"] = str(include_path)
        if limit is not None:
            config["limit"] = limit
        configs.append(config)
    return configs


def lmms_eval_command(config_file: str | Path, launcher: str | None = None) -> list[str]:
    """The command that runs an lmms-eval config file: `python -m lmms_eval --config FILE`, or
    `<launcher> -m lmms_eval --config FILE` (e.g. launcher `accelerate launch --num_processes 8`)."""
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    return [*prefix, "-m", "lmms_eval", "--config", str(config_file)]


# -------------------------------------------------------------------------------------------------------- reading


@dataclass
class BudgetSummary:
    """Budget of a run, over all its logged samples (see `g2tr_hf.integrations.batch_generation`)."""

    samples: int
    kept_fraction: float  # kept image tokens / image tokens
    kv_entries: float  # mean per sample
    kv_fraction: float  # KV entries / unreduced KV entries
    flops_fraction: float  # prefill FLOPs / unreduced prefill FLOPs (analytic, LLM only)
    prefill_ms: float  # measured prefill time per sample (each batch's time shared by its rows)

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> BudgetSummary | None:
        """From the plugin's per-sample `token_counts` records (None when no record carries a budget)."""
        records = [record for record in records if record and "kept_tokens" in record]
        if not records:
            return None

        def total(key: str) -> float:
            return float(sum(sum(r[key]) if isinstance(r[key], list) else r[key] for r in records))

        image_tokens = total("image_tokens")
        return cls(
            samples=len(records),
            kept_fraction=total("kept_tokens") / image_tokens if image_tokens else 1.0,
            kv_entries=total("kv_entries") / len(records),
            kv_fraction=total("kv_entries") / total("kv_entries_unreduced"),
            flops_fraction=total("prefill_flops") / total("prefill_flops_unreduced"),
            prefill_ms=1e3 * sum(r["batch_prefill_seconds"] / r["batch_size"] for r in records) / len(records),
        )


@dataclass
class RunSummary:
    """One row of the table: a model, a method label, its scores per benchmark and (optionally) its budget.

    `vanilla` marks the unreduced reference of its model; `None` means "when the ratio is 1.0".
    """

    model: str
    method: str
    scores: dict[str, float]
    ratio: float | None = None
    budget: BudgetSummary | None = None
    vanilla: bool | None = None
    source: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_vanilla(self) -> bool:
        return self.vanilla if self.vanilla is not None else self.ratio == 1.0


def _model_args(text: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {key.strip(): value.strip() for key, value in pairs}


def read_run(
    folder: str | Path, model: str | None = None, method: str | None = None, benchmarks: Sequence[str] | None = None
) -> RunSummary:
    """Read one lmms-eval output folder (`--output_path`, searched recursively): the scores of every results file
    in it (a later file wins for a task run twice), the ratio / method from the g2tr `model_args`, and the budget
    from the samples files.

    Raises:
        FileNotFoundError: no `*_results.json` under `folder`.
    """
    folder = Path(folder)
    results_files = sorted(folder.rglob("*_results.json"))
    if not results_files:
        raise FileNotFoundError(f"No lmms-eval results (*_results.json) under {str(folder)!r}.")
    results: dict[str, dict] = {}
    arguments: dict[str, str] = {}
    for path in results_files:
        content = json.loads(path.read_text(encoding="utf-8"))
        results.update(content.get("results", {}))
        arguments = _model_args(str(content.get("config", {}).get("model_args", ""))) or arguments
    records = []
    for path in sorted(folder.rglob("*_samples_*.jsonl")):
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    records += [record for record in json.loads(line).get("token_counts") or [] if record]
    columns = [resolve_benchmark(name) for name in benchmarks] if benchmarks else list(BENCHMARKS.values())
    scores = {b.name: value for b in columns if (value := b.score(results)) is not None}
    ratio = float(arguments["g2tr_ratio"]) if "g2tr_ratio" in arguments else None
    run_method = arguments.get("g2tr_method", "g2tr")
    if method is None:
        method = "Vanilla" if ratio == 1.0 else run_method
    if model is None:
        model = Path(arguments.get("pretrained", folder.name)).name or folder.name
    return RunSummary(
        model=model,
        method=method,
        scores=scores,
        ratio=ratio,
        budget=BudgetSummary.from_records(records),
        source=str(folder),
        extra={"tasks": sorted(results)},
    )


# --------------------------------------------------------------------------------------------------------- table


def relative_average(scores: dict[str, float], vanilla: dict[str, float], benchmarks: Sequence[str]) -> float | None:
    """Mean over `benchmarks` of score / vanilla score, in percent (the paper's "Rel. Avg."); None when a benchmark
    is missing on either side or the vanilla score is 0."""
    ratios = []
    for name in benchmarks:
        if name not in scores or name not in vanilla or vanilla[name] == 0:
            return None
        ratios.append(scores[name] / vanilla[name])
    return 100.0 * sum(ratios) / len(ratios) if ratios else None


def _format_score(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.1f}"


def format_table(runs: Sequence[RunSummary], benchmarks: Sequence[str] | None = None, budget: bool = True) -> str:
    """The paper-style Markdown table: per model, its vanilla row first, then the reduced runs, each with its scores,
    the relative average against that model's vanilla run and (with `budget`) the budget columns.

    Args:
        runs: the rows; each model needs one vanilla run for the relative averages (else they read "–").
        benchmarks: the columns (default: those of `PAPER_UNDERSTANDING` and `EXTRA_UNDERSTANDING` that any run has).
    """
    if benchmarks is None:
        present = {name for run in runs for name in run.scores}
        benchmarks = [name for name in (*PAPER_UNDERSTANDING, *EXTRA_UNDERSTANDING) if name in present]
    for name in benchmarks:
        resolve_benchmark(name)  # a clear error for an unknown column
    header = ["Model", "Method", "Ratio", *benchmarks, "Rel. Avg."]
    if budget:
        header += ["Kept img tok", "KV entries", "KV", "Prefill FLOPs", "Prefill ms/sample"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    models = list(dict.fromkeys(run.model for run in runs))
    for model in models:
        rows = [run for run in runs if run.model == model]
        references = [run for run in rows if run.is_vanilla]
        reference = references[0].scores if references else None
        for run in sorted(rows, key=lambda r: (not r.is_vanilla, -(r.ratio or 0), r.method)):
            relative = relative_average(run.scores, reference, benchmarks) if reference is not None else None
            cells = [model, run.method, "–" if run.ratio is None else f"{run.ratio:g}"]
            cells += [_format_score(run.scores.get(name)) for name in benchmarks]
            cells.append("–" if relative is None else f"{relative:.1f}%")
            if budget:
                b = run.budget
                cells += (
                    ["–"] * 5
                    if b is None
                    else [
                        f"{100 * b.kept_fraction:.0f}%",
                        f"{b.kv_entries:.0f}",
                        f"{100 * b.kv_fraction:.0f}%",
                        f"{100 * b.flops_fraction:.0f}%",
                        f"{b.prefill_ms:.1f}",
                    ]
                )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_records(runs: Sequence[RunSummary], benchmarks: Sequence[str]) -> list[dict]:
    """The table as JSON-ready records (one per run), with the unrounded relative average."""
    records = []
    for run in runs:
        reference = next((r.scores for r in runs if r.model == run.model and r.is_vanilla), None)
        records.append(
            {
                "model": run.model,
                "method": run.method,
                "ratio": run.ratio,
                "scores": run.scores,
                "relative_average": relative_average(run.scores, reference, benchmarks) if reference else None,
                "budget": None if run.budget is None else vars(run.budget),
                "source": run.source,
            }
        )
    return records


_RUN_LABEL = re.compile(r"^([^=]+)=(.+)$")


def parse_labelled_folder(value: str) -> tuple[str | None, str]:
    """`LABEL=FOLDER` or `FOLDER` (a `--run` argument of `g2tr-hf eval table`)."""
    match = _RUN_LABEL.match(value)
    if match and not Path(value).exists():
        return match.group(1), match.group(2)
    return None, value

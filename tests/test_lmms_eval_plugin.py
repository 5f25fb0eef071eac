"""The lmms-eval plugin (`--model g2tr`) on the tiny models, offline: a generated 5-question local task, run through
lmms-eval's own evaluator (the model found through the `lmms_eval.models` entry point), two ratios x two methods
plus the unreduced run; per-sample budgets; a two-process data-parallel run equals one process.

Needs lmms-eval (`pip install -e ".[eval]"`); the whole module is skipped when it is not installed.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch


lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[eval]')")

from g2tr_hf import build_tiny  # noqa: E402
from g2tr_hf.integrations.lmms_tasks import LocalQuestion, write_local_task  # noqa: E402
from g2tr_hf.reduction import keep_count  # noqa: E402


TASK = "g2tr_smoke"
# (ratio, method): the unreduced run, then two ratios and two methods (each model runs all three).
RUNS = [(1.0, "g2tr"), (0.5, "g2tr"), (0.25, "random")]
BUDGET_FIELDS = {
    "input_tokens", "output_tokens", "image_tokens", "kept_tokens", "prompt_tokens", "kv_entries",
    "kv_entries_unreduced", "prefill_flops", "prefill_flops_unreduced", "batch_prefill_seconds", "batch_size",
    "g2tr_ratio", "g2tr_method", "rank",
}  # fmt: skip


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    colours = ["red", "green", "blue", "yellow", "white"]
    rng = np.random.default_rng(0)
    questions = [
        LocalQuestion(f"What colour is shape {i}?", colour, PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3),
                      dtype=np.uint8)))  # fmt: skip
        for i, colour in enumerate(colours)
    ]
    return write_local_task(tmp_path_factory.mktemp("task"), questions, task=TASK, max_new_tokens=2)


@pytest.fixture(scope="module", autouse=True)
def offline_datasets(tmp_path_factory):
    """lmms-eval loads the local task through `datasets`: keep its cache in a temporary folder, offline."""
    saved = {key: os.environ.get(key) for key in ("HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE")}
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("datasets_cache"))
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@functools.cache
def task_manager(task_dir: Path):
    """One lmms-eval task index for the module (building it reads every task YAML lmms-eval ships)."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir))


def answer(sample: dict) -> str:
    """The answer of a logged sample (in-process results keep lmms-eval's one-element list, the CLI's file does not)."""
    response = sample["filtered_resps"]
    return response[0] if isinstance(response, list) else response


def evaluate(task_dir: Path, model_args: str, batch_size: int = 3) -> list[dict]:
    """One in-process lmms-eval evaluation (the CLI's code path below argument parsing); the logged samples."""
    from lmms_eval.evaluator import simple_evaluate

    results = simple_evaluate(
        model="g2tr",
        model_args=model_args,
        tasks=[TASK],
        batch_size=batch_size,
        log_samples=True,
        task_manager=task_manager(task_dir),
    )
    assert "exact_match,none" in results["results"][TASK]
    return sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny models saved as model folders (what `g2tr-hf convert` / `export` write), one per model."""
    saved = {}
    for model in ("bagel", "internvlu"):
        folder = tmp_path_factory.mktemp(f"tiny_{model}")
        network, processor = build_tiny(model)
        network.save_pretrained(folder)
        processor.save_pretrained(folder)
        saved[model] = folder
    return saved


@pytest.fixture(scope="module")
def samples(task_dir, folders):
    """Logged samples of every (model, ratio, method) run, each model loaded from its folder."""
    return {
        (model, ratio, method): evaluate(
            task_dir, f"pretrained={folders[model]},g2tr_ratio={ratio},g2tr_method={method},dtype=float32"
        )
        for model in ("bagel", "internvlu")
        for ratio, method in RUNS
    }


@pytest.mark.parametrize("model", ["bagel", "internvlu"])
def test_a_model_folder_loads_through_the_auto_classes(folders, model):
    from g2tr_hf.integrations.lmms_models import G2TRLMMs

    lm = G2TRLMMs.create_from_arg_string(
        f"pretrained={folders[model]},g2tr_ratio=0.25,g2tr_method=pool", {"batch_size": "4", "device": "cpu"}
    )
    expected = {"bagel": "G2TRBagelForConditionalGeneration", "internvlu": "G2TRInternVLUForConditionalGeneration"}
    assert type(lm.model).__name__ == expected[model]
    assert (lm.model.config.g2tr_ratio, lm.model.config.g2tr_method, lm.batch_size) == (0.25, "pool", 4)
    assert lm.device == torch.device("cpu") and (lm.rank, lm.world_size) == (0, 1)


def test_device_map_loads_one_model_and_refuses_a_multi_process_launch(folders, monkeypatch):
    from g2tr_hf.integrations.batch_generation import UnderstandingRequest
    from g2tr_hf.integrations.lmms_models import G2TRLMMs

    arguments = f"pretrained={folders['bagel']},g2tr_ratio=0.5,device_map=auto"
    split = G2TRLMMs.create_from_arg_string(arguments)
    assert split.device == split.model.device  # placed by from_pretrained (here: all on the CPU), not moved after
    whole = G2TRLMMs.create_from_arg_string(f"pretrained={folders['bagel']},g2tr_ratio=0.5,device=cpu")
    request = [UnderstandingRequest("What is it?", (PIL.Image.new("RGB", (64, 64), "red"),), {"max_new_tokens": 3})]
    assert split.answerer(request)[0].text == whole.answerer(request)[0].text
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="`device_map` splits one model"):
        G2TRLMMs.create_from_arg_string(arguments)


def test_the_entry_point_registers_the_model():
    registered = {entry.name: entry.value for entry in entry_points(group="lmms_eval.models")}
    assert registered.get("g2tr") == "g2tr_hf.integrations.lmms_plugin:manifests", (
        "g2tr-hf's lmms_eval.models entry point is missing: reinstall the package (pip install -e .)"
    )
    from lmms_eval.models import get_model

    from g2tr_hf.integrations.lmms_models import G2TRLMMs

    assert get_model("g2tr") is G2TRLMMs


@pytest.mark.parametrize("model", ["bagel", "internvlu"])
def test_every_ratio_and_method_answers_with_its_budget(samples, model):
    min_keep = build_tiny(model)[0].config.g2tr_min_keep
    vanilla = samples[model, 1.0, "g2tr"]
    for ratio, method in RUNS:
        logged = samples[model, ratio, method]
        assert [sample["doc_id"] for sample in logged] == list(range(5))
        for sample, unreduced in zip(logged, vanilla):
            assert isinstance(answer(sample), str)
            (counts,) = sample["token_counts"]
            assert BUDGET_FIELDS <= set(counts)
            assert (counts["g2tr_ratio"], counts["g2tr_method"], counts["rank"]) == (ratio, method, 0)
            assert counts["image_tokens"] == [16]
            assert counts["kept_tokens"] == [keep_count(16, ratio, min_keep)]
            removed = sum(counts["image_tokens"]) - sum(counts["kept_tokens"])
            assert counts["kv_entries"] == counts["kv_entries_unreduced"] - removed == counts["input_tokens"]
            assert counts["kv_entries_unreduced"] == unreduced["token_counts"][0]["kv_entries"]
            assert (counts["prefill_flops"] < counts["prefill_flops_unreduced"]) == (ratio < 1.0)
            assert counts["batch_prefill_seconds"] > 0 and counts["batch_size"] in (2, 3)
            assert 1 <= counts["output_tokens"] <= 2


def test_unknown_model_arguments_are_refused(task_dir):
    from g2tr_hf.integrations.lmms_models import G2TRLMMs

    with pytest.raises(ValueError, match=r"Unknown g2tr model arguments \['g2tr_ration'\]"):
        G2TRLMMs.create_from_arg_string("pretrained=tiny-bagel,g2tr_ration=0.5")
    with pytest.raises(ValueError, match="g2tr_ratio"):
        G2TRLMMs.create_from_arg_string("pretrained=tiny-bagel,g2tr_ratio=1.5")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        G2TRLMMs.create_from_arg_string("pretrained=tiny-bagel", {"batch_size": "auto"})
    with pytest.raises(ValueError, match="`pretrained`"):
        G2TRLMMs.create_from_arg_string("pretrained=no/such/folder")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_data_parallel_run_equals_one_process(samples, folders, task_dir, tmp_path):
    """`g2tr-hf eval run` under `accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo): every document
    answered once, by both ranks between them, with the answers and budgets of the single-process run."""
    output = tmp_path / "runs"
    # On a machine without GPUs, accelerate's multi-process launcher with ACCELERATE_USE_CPU gives gloo processes
    # (its `--cpu` flag would start ONE process).
    port = _free_port()
    launcher = f"{sys.executable} -m accelerate.commands.launch --multi_gpu --num_processes 2 --main_process_port {port}"
    command = [
        sys.executable, "-m", "g2tr_hf.cli", "eval", "run", "--model", str(folders["bagel"]), "--tasks", TASK,
        "--include-path", str(task_dir), "--ratios", "0.25", "--methods", "random", "--batch-size", "3",
        "--output-dir", str(output), "--launcher", launcher, "--benchmarks", f"{TASK}:exact_match",
        "--output", str(tmp_path / "table.md"), "--model-args", "dtype=float32",
    ]  # fmt: skip
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    log = (output / "lmms_eval.log").read_text() if (output / "lmms_eval.log").exists() else ""
    assert completed.returncode == 0, completed.stderr[-3000:] + log[-3000:]
    (samples_file,) = (output / "random_r0p25").rglob(f"*_samples_{TASK}.jsonl")
    parallel = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    single = samples["bagel", 0.25, "random"]
    assert [s["doc_id"] for s in parallel] == list(range(5))
    assert [answer(s) for s in parallel] == [answer(s) for s in single]
    assert {s["token_counts"][0]["rank"] for s in parallel} == {0, 1}
    for key in ("kept_tokens", "kv_entries", "prefill_flops"):
        assert [s["token_counts"][0][key] for s in parallel] == [s["token_counts"][0][key] for s in single]
    table = (tmp_path / "table.md").read_text()
    assert table.splitlines()[0].startswith(f"| Model | Method | Ratio | {TASK}:exact_match | Rel. Avg. |")
    assert f"| {folders['bagel'].name} | random | 0.25 |" in table

"""The editing-evaluation runner (`g2tr-hf eval-edit`, `g2tr_hf.edit_evaluation`) on the tiny BAGEL: the GEdit-Bench
and ImgEdit layouts, both edit-set formats, resuming, and the adapter's equality with a direct pipeline call."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from g2tr_hf import build_tiny
from g2tr_hf.cli import main
from g2tr_hf.edit_evaluation import PipelineEditor, read_edit_set, run_edit_set
from g2tr_hf.pipeline_bagel import G2TRBagelPipeline


STEPS = 3


@pytest.fixture(scope="module")
def edit_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit_set")
    (folder / "images").mkdir()
    records = []
    for index, (task_type, language) in enumerate([("style_change", "en"), ("subject-add", "cn"), ("style_change", "en")]):
        image = np.random.default_rng(index).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        PIL.Image.fromarray(image).save(folder / "images" / f"{index}.png")
        records.append({"key": f"k{index}", "image": f"images/{index}.png", "instruction": "Make it snowy.",
                        "task_type": task_type, "instruction_language": language})  # fmt: skip
    (folder / "set.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n")
    imgedit = {f"{100 + i}": {"id": f"{i}.png", "prompt": "Add a hat.", "edit_type": "add"} for i in range(2)}
    (folder / "basic_edit.json").write_text(json.dumps(imgedit))
    return folder


@pytest.fixture(scope="module")
def pipe():
    model, processor = build_tiny("bagel")
    return G2TRBagelPipeline(model=model, processor=processor, device="cpu")


def test_gedit_layout_through_the_cli(edit_set, tmp_path, capsys):
    output = tmp_path / "gedit"
    arguments = ["eval-edit", "--edit-set", str(edit_set / "set.jsonl"), "--output-dir", str(output),
                 "--steps", str(STEPS), "--model-name", "bagel_g2tr", "--ratio", "0.5"]  # fmt: skip
    assert main(arguments) == 0
    written = sorted(str(path.relative_to(output)) for path in output.rglob("*.png"))
    assert written == [
        "bagel_g2tr/fullset/style_change/en/k0.png",
        "bagel_g2tr/fullset/style_change/en/k0_SRCIMG.png",
        "bagel_g2tr/fullset/style_change/en/k2.png",
        "bagel_g2tr/fullset/style_change/en/k2_SRCIMG.png",
        "bagel_g2tr/fullset/subject-add/cn/k1.png",
        "bagel_g2tr/fullset/subject-add/cn/k1_SRCIMG.png",
    ]
    manifest = [json.loads(line) for line in (output / "manifest_rank0.jsonl").read_text().splitlines()]
    assert [record["key"] for record in manifest] == ["k0", "k1", "k2"]
    assert all(record["g2tr_ratio"] == 0.5 and record["num_inference_steps"] == STEPS for record in manifest)
    # A second run keeps what exists (a stopped run resumes).
    assert main(arguments) == 0
    assert "0 edits" in capsys.readouterr().out.splitlines()[-1]


def test_imgedit_layout_and_the_adapter_equal_a_direct_pipeline_call(edit_set, pipe, tmp_path):
    samples = read_edit_set(edit_set / "basic_edit.json", image_root=edit_set / "images")
    assert [(s.key, s.task_type, s.image.name) for s in samples] == [("100", "add", "0.png"), ("101", "add", "1.png")]
    editor = PipelineEditor(pipe, g2tr_ratio=0.5, num_inference_steps=STEPS)
    records = run_edit_set(editor, samples, tmp_path, layout="imgedit", seed=7)
    assert sorted(path.name for path in tmp_path.glob("*.png")) == ["100.png", "101.png"]
    assert [record["output"] for record in records] == ["100.png", "101.png"]
    source = PIL.Image.open(samples[0].image).convert("RGB")
    direct = pipe("Add a hat.", image=source, num_inference_steps=STEPS, g2tr_ratio=0.5,
                  generator=torch.Generator().manual_seed(7)).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "100.png")), np.asarray(direct))


def test_data_parallel_ranks_split_the_set(edit_set, pipe, tmp_path):
    samples = read_edit_set(edit_set / "set.jsonl")
    editor = PipelineEditor(pipe, g2tr_ratio=0.5, num_inference_steps=2)
    first = run_edit_set(editor, samples, tmp_path, layout="imgedit", rank=0, world_size=2)
    second = run_edit_set(editor, samples, tmp_path, layout="imgedit", rank=1, world_size=2)
    assert [r["key"] for r in first] == ["k0", "k2"] and [r["key"] for r in second] == ["k1"]
    with pytest.raises(ValueError, match="`rank` must lie in"):
        run_edit_set(editor, samples, tmp_path, rank=2, world_size=2)


def test_bad_edit_sets_are_clear_errors(tmp_path, capsys):
    (tmp_path / "set.jsonl").write_text(json.dumps({"key": "a", "instruction": "x"}) + "\n")
    with pytest.raises(ValueError, match="missing field 'image'"):
        read_edit_set(tmp_path / "set.jsonl")
    (tmp_path / "dup.jsonl").write_text("\n".join(json.dumps({"key": "a", "image": "x.png", "instruction": "x"})
                                                  for _ in range(2)))  # fmt: skip
    with pytest.raises(ValueError, match="keys used more than once"):
        read_edit_set(tmp_path / "dup.jsonl")
    with pytest.raises(ValueError, match="`edit_set` must be a .jsonl or an ImgEdit .json file"):
        read_edit_set(tmp_path / "set.csv")
    assert main(["eval-edit", "--edit-set", str(tmp_path / "set.jsonl"), "--output-dir", str(tmp_path)]) == 2
    assert "`--edit-set`: " in capsys.readouterr().err


def test_internvlu_edits_through_the_cli(edit_set, tmp_path):
    output = tmp_path / "imgedit"
    arguments = ["eval-edit", "--model", "tiny-internvlu", "--edit-set", str(edit_set / "basic_edit.json"),
                 "--image-root", str(edit_set / "images"), "--layout", "imgedit", "--output-dir", str(output),
                 "--steps", "2", "--ratio", "0.5"]  # fmt: skip
    assert main(arguments) == 0
    assert sorted(path.name for path in output.rglob("*.png")) == ["100.png", "101.png"]
    manifest = [json.loads(line) for line in (output / "manifest_rank0.jsonl").read_text().splitlines()]
    assert all(record["g2tr_ratio"] == 0.5 and record["num_inference_steps"] == 2 for record in manifest)

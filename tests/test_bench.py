"""`g2tr-hf bench`: sample loading, the metrics, and a full small run on both tiny models (tables and PNG)."""

from __future__ import annotations

import csv
import json
import math

import PIL.Image
import pytest
import torch

from g2tr_hf.bench import (
    BenchSample,
    builtin_samples,
    load_samples,
    next_token_kl,
    psnr,
    run_bench,
    ssim,
    write_reports,
)
from g2tr_hf.cli import main
from g2tr_hf.tiny import build_tiny


def _save_images(folder, count=2):
    names = []
    for index in range(count):
        name = f"img{index}.png"
        PIL.Image.new("RGB", (20 + index, 16), (index * 50, 10, 200)).save(folder / name)
        names.append(name)
    return names


def test_builtin_set_and_file_formats(tmp_path):
    builtin = builtin_samples()
    assert len(builtin) == 4 and all(sample.images and sample.question for sample in builtin)
    names = _save_images(tmp_path)
    records = [{"image": names[0], "question": "q0"}, {"image": names, "question": "q1"}]
    (tmp_path / "set.json").write_text(json.dumps(records))
    from_json = load_samples(tmp_path / "set.json")
    assert [len(s.images) for s in from_json] == [1, 2] and [s.question for s in from_json] == ["q0", "q1"]
    with (tmp_path / "set.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "question"])
        writer.writerow([f"{names[0]};{names[1]}", "two?"])
    (from_csv,) = load_samples(tmp_path / "set.csv")
    assert len(from_csv.images) == 2 and from_csv.question == "two?"
    images_only = tmp_path / "only"
    images_only.mkdir()
    _save_images(images_only, 3)
    assert [s.name for s in load_samples(images_only)] == ["img0", "img1", "img2"]


def test_bad_sample_sets_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no file or folder"):
        load_samples(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_samples(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_samples(tmp_path / "bad.json")
    (tmp_path / "missing_image.json").write_text(json.dumps([{"image": "nope.png", "question": "q"}]))
    with pytest.raises(ValueError, match="cannot read image"):
        load_samples(tmp_path / "missing_image.json")


def test_metrics():
    logits = torch.randn(50)
    assert next_token_kl(logits, logits) == pytest.approx(0.0, abs=1e-6)
    assert next_token_kl(logits, torch.randn(50)) > 0
    image = torch.rand(3, 24, 20)
    assert psnr(image, image) == math.inf and ssim(image, image) == pytest.approx(1.0)
    noisy = (image + 0.1 * torch.randn_like(image)).clamp(0, 1)
    assert 10 < psnr(image, noisy) < 40 and ssim(image, noisy) < 0.99


@pytest.mark.parametrize("name", ["bagel", "internvlu"])
def test_bench_run_writes_tables_and_png(name, tmp_path):
    model, processor = build_tiny(name)
    samples = [BenchSample([builtin_samples(64)[0].images[0]], "what is it?", "one")]
    edit = name == "bagel"
    result = run_bench(
        model, processor, samples, ["random", "g2tr-no-merge", "fastv", "vscan"], [0.5], repeats=1, warmup=0,
        max_new_tokens=2, edit=edit, edit_steps=2, progress=False, model_name=f"tiny-{name}",
    )  # fmt: skip
    reference, *pre_llm, in_llm, vscan = result.rows
    assert reference.method == "unreduced" and reference.ratio == 1.0
    assert reference.next_token_kl == pytest.approx(0.0, abs=1e-6)
    assert reference.top1_agreement == reference.greedy_exact_match == 1.0 and reference.prefill_speedup == 1.0
    for row in [*pre_llm, in_llm, vscan]:
        assert row.kv_entries < reference.kv_entries and row.prefill_gflops < reference.prefill_gflops
        assert row.next_token_kl >= 0 and row.prefill_ms > 0 and row.decode_ms_per_token > 0
    for row in pre_llm:  # pre-LLM: fewer tokens enter, and every layer sees them all
        assert row.tokens_in_llm < reference.tokens_in_llm and row.avg_tokens == row.tokens_in_llm == row.kv_entries
    # in-LLM: the whole prompt enters, the layer average and the cache are smaller
    assert in_llm.tokens_in_llm == reference.tokens_in_llm and in_llm.kv_entries < in_llm.avg_tokens
    assert in_llm.avg_tokens < in_llm.tokens_in_llm and in_llm.kv_entries == pre_llm[0].kv_entries
    assert pre_llm[0].extra_gflops == 0 and pre_llm[1].extra_gflops > 0  # only G2TR encodes anchors
    # VScan: its ViT stage lets in what the pre-LLM methods let in, its LLM stage halves that at the middle layer;
    # the hand-computed ViT attention scores are its extra work
    assert vscan.tokens_in_llm == pre_llm[0].tokens_in_llm and vscan.kv_entries < pre_llm[0].kv_entries
    assert vscan.kv_entries < vscan.avg_tokens < vscan.tokens_in_llm and vscan.extra_gflops > 0
    if edit:
        assert reference.velocity_rel_error == 0 and reference.edit_psnr_db == math.inf
        assert all(row.velocity_rel_error > 0 and math.isfinite(row.edit_psnr_db) for row in pre_llm)
        assert math.isnan(in_llm.edit_psnr_db) and math.isnan(vscan.edit_psnr_db)  # editing refuses in-LLM methods
    paths = write_reports(result, tmp_path / "out")
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["method"] for r in rows] == ["unreduced", "random", "g2tr-no-merge", "fastv", "vscan"]
    table = paths["markdown"].read_text()
    assert "| Method | Ratio | Tokens in LLM | Avg. Tokens |" in table and ("PSNR dB" in table) == edit
    with PIL.Image.open(paths["png"]) as png:
        assert png.format == "PNG" and png.width > 100


def test_bench_command(tmp_path, capsys):
    status = main([
        "bench", "--model", "tiny-internvlu", "--methods", "tome", "--ratios", "0.5", "--repeats", "1",
        "--warmup", "0", "--max-new-tokens", "2", "--no-progress", "--data", str(tmp_path / "set.json"),
        "-o", str(tmp_path / "out"),
    ])  # fmt: skip
    assert status == 2 and "no file or folder" in capsys.readouterr().err
    _save_images(tmp_path, 1)
    (tmp_path / "set.json").write_text(json.dumps([{"image": "img0.png", "question": "what?"}]))
    status = main([
        "bench", "--model", "tiny-internvlu", "--methods", "tome", "--ratios", "0.5", "--repeats", "1",
        "--warmup", "0", "--max-new-tokens", "2", "--no-progress", "--data", str(tmp_path / "set.json"),
        "-o", str(tmp_path / "out"),
    ])  # fmt: skip
    assert status == 0
    assert "| tome | 0.5 |" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.csv", "bench.md", "bench_pareto.png"]
    assert main(["bench", "--methods", "nope", "--no-progress", "-o", str(tmp_path / "x")]) == 2
    assert main(["bench", "--ratios", "0.5,abc", "-o", str(tmp_path / "x")]) == 2

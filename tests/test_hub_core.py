"""Hub helpers that do not need a model: atomic folders, remote-code file sets, model cards."""

from pathlib import Path

import pytest

from g2tr_hf import G2TRConfig
from g2tr_hf.hub import atomic_directory, model_auto_map, remote_code_files, render_model_card


def test_atomic_directory_publishes_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("a")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "a"

    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as staging:
            (staging / "b.txt").write_text("b")
            raise RuntimeError("convert failed half-way")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # old content intact
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind

    with pytest.raises(ValueError, match="not empty"):
        with atomic_directory(target):
            pass
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "c.txt").write_text("c")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_remote_code_files_follow_sibling_imports():
    names = sorted(p.name for p in remote_code_files([G2TRConfig]))
    assert names == ["configuration_g2tr.py", "reduction.py"]


def test_auto_map_entries():
    auto_map = model_auto_map(G2TRConfig, G2TRConfig)
    assert auto_map["AutoConfig"] == "configuration_g2tr.G2TRConfig"
    assert auto_map["AutoModel"] == auto_map["AutoModelForImageTextToText"]


def test_render_model_card(tmp_path):
    template = tmp_path / "card.md"
    template.write_text("---\nbase_model: $base\n---\nratio $ratio\n")
    assert render_model_card(template, base="a/b", ratio=0.5) == "---\nbase_model: a/b\n---\nratio 0.5\n"
    with pytest.raises(ValueError, match="'ratio'"):
        render_model_card(Path(template), base="a/b")

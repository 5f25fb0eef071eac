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
    # reduction imports the baselines; in_llm reuses generation_g2tr's compaction, which needs compat.
    assert names == [
        "baselines.py", "compat.py", "configuration_g2tr.py", "generation_g2tr.py", "in_llm.py", "reduction.py"
    ]  # fmt: skip


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


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_directory_gives_ordinary_modes(tmp_path, umask):
    import os
    import stat
    import tempfile

    import torch
    from safetensors.torch import save_file

    from g2tr_hf.hub import place_file

    private = tmp_path / "private.bin"
    private.write_bytes(b"weights")
    private.chmod(0o600)
    previous = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "config.json").write_text("{}")
            save_file({"w": torch.zeros(2)}, staging / "model.safetensors")  # safetensors writes 0o600
            Path(tempfile.mkdtemp(dir=staging)).joinpath("nested.txt").write_text("x")  # mkdtemp: 0o700
            place_file(private, staging / "copied.bin", "copy")
            place_file(private, staging / "linked.bin", "hardlink")
    finally:
        os.umask(previous)

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    folder, file = 0o777 & ~umask, 0o666 & ~umask
    out = tmp_path / "out"
    assert mode(out) == folder
    assert all(mode(path) == folder for path in out.iterdir() if path.is_dir())
    assert mode(out / "config.json") == mode(out / "model.safetensors") == mode(out / "copied.bin") == file
    assert all(mode(path) == file for path in out.rglob("nested.txt"))
    # A hard link is the source file itself: its mode is the source's and stays untouched.
    assert mode(out / "linked.bin") == mode(private) == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "private.bin"]  # no probe or staging left

"""Hub folders at the size of real checkpoints, on tiny models: sharded exports and conversions that reload to the
same tensors; uploads (mocked `HfApi`: no network) that delete stale weight files in the same commit, go to a branch
or a pull request, and take the large-folder path; a re-saved exported BAGEL whose pipeline still loads where
g2tr_hf is not installed; the packaged model cards (metadata, links, runnable snippets, found through
importlib.resources).

Run this file as a script to re-render the example cards in `model_cards/` from the packaged templates.
"""

from __future__ import annotations

import ast
import builtins
import configparser
import fnmatch
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText

from g2tr_hf import build_tiny, hub
from g2tr_hf.cli import main as cli_main
from g2tr_hf.convert_bagel import convert_bagel
from g2tr_hf.convert_internvlu import convert_internvlu
from g2tr_hf.hub import (
    default_model_card,
    export,
    model_card_template,
    push_folder,
    push_to_hub,
    render_model_card,
    shard_size_bytes,
    stale_weight_files,
    write_safetensors_shards,
)
from remote_code import run_without_g2tr_hf
from test_convert_bagel import tiny_overrides, write_snapshot
from test_convert_internvlu import write_official_snapshot


ROOT = Path(__file__).resolve().parents[1]
SHARD = "300KB"  # the tiny BAGEL holds ~1.5 MB of float32 weights: several shards
# The values the rendered examples in model_cards/ are filled with.
EXAMPLE_CARDS = {
    "bagel": {"repo_id": "your-name/BAGEL-7B-MoT-G2TR", "ratio": 0.5, "min_keep": 32, "source": "BAGEL-7B-MoT"},
    "internvlu": {"repo_id": "your-name/InternVL-U-G2TR", "ratio": 0.5, "min_keep": 32, "source": "InternVL-U"},
}


def weight_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.suffix == ".safetensors")


def assert_same_state(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def tiny_bagel():
    return build_tiny("bagel", seed=0)


@pytest.fixture(scope="module")
def tiny_internvlu():
    return build_tiny("internvlu", seed=0)


@pytest.fixture(scope="module")
def sharded_bagel(tiny_bagel, tmp_path_factory) -> Path:
    model, processor = tiny_bagel
    return export(model, processor, tmp_path_factory.mktemp("sharded") / "bagel-g2tr", max_shard_size=SHARD)


# ----------------------------------------------------------------------------------------------------------------
# Shard sizes and the streamed shard writer
# ----------------------------------------------------------------------------------------------------------------


def test_shard_size_bytes():
    assert shard_size_bytes("5GB") == 5 * 10**9
    assert shard_size_bytes("300kb") == 300_000 and shard_size_bytes(" 1.5 MB ") == 1_500_000
    assert shard_size_bytes(4096) == 4096
    for bad in ("5", "5XB", "0GB", -1, 0, True, None, 2.5):
        with pytest.raises(ValueError, match="`max_shard_size`"):
            shard_size_bytes(bad)


def test_streamed_shards_copy_every_tensor_exactly(tmp_path):
    generator = torch.Generator().manual_seed(0)
    in_file = {
        "a.weight": torch.randn(64, 64, generator=generator).to(torch.bfloat16),  # 8 KB
        "b.weight": torch.randn(300, 100, generator=generator),  # 120 KB: larger than a shard, gets one alone
        "c.ids": torch.arange(10, dtype=torch.int64),
    }
    save_file(in_file, tmp_path / "source.safetensors")
    in_memory = {"d.weight": torch.randn(50, 50, generator=generator).to(torch.float16)}
    tensors = {key: (tmp_path / "source.safetensors", key) for key in in_file} | in_memory
    out = tmp_path / "out"
    out.mkdir()
    weight_map = write_safetensors_shards(tensors, out, max_shard_size="16KB")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and set(weight_map) == set(tensors)
    expected_total = sum(t.numel() * t.element_size() for t in (*in_file.values(), *in_memory.values()))
    assert index["metadata"]["total_size"] == expected_total
    files = weight_files(out)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert weight_map["b.weight"] != weight_map["a.weight"]
    assert [key for key, name in weight_map.items() if name == weight_map["b.weight"]] == ["b.weight"]
    for name in files:  # every shard that holds more than one tensor respects the limit
        with safe_open(out / name, framework="pt") as handle:
            keys = list(handle.keys())
            size = sum(handle.get_tensor(key).numel() * handle.get_tensor(key).element_size() for key in keys)
        assert size <= 16_000 or len(keys) == 1
    for key, value in (in_file | in_memory).items():
        with safe_open(out / weight_map[key], framework="pt") as handle:
            stored = handle.get_tensor(key)
        assert stored.dtype == value.dtype and torch.equal(stored, value), key
    with pytest.raises(ValueError, match="empty"):
        write_safetensors_shards({}, out)


# ----------------------------------------------------------------------------------------------------------------
# Sharded export and conversion
# ----------------------------------------------------------------------------------------------------------------


def test_sharded_export_reloads_the_same_weights(tiny_bagel, sharded_bagel):
    model, _ = tiny_bagel
    files = weight_files(sharded_bagel)
    assert len(files) >= 3 and "model.safetensors" not in files
    index = json.loads((sharded_bagel / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert all((sharded_bagel / name).stat().st_size < 2 * 300_000 for name in files)
    reloaded = AutoModelForImageTextToText.from_pretrained(sharded_bagel)
    assert_same_state(model.state_dict(), reloaded.state_dict())


def test_export_default_is_one_file_below_5GB_and_rejects_a_bad_size(tiny_internvlu, tmp_path):
    model, processor = tiny_internvlu
    folder = export(model, processor, tmp_path / "one")
    assert weight_files(folder) == ["model.safetensors"]  # 0.8 MB is far below the 5 GB default
    with pytest.raises(ValueError, match="`max_shard_size`"):
        export(model, processor, tmp_path / "bad", max_shard_size="lots")
    assert not (tmp_path / "bad").exists()


def test_sharded_bagel_conversion_equals_the_linked_one(tiny_bagel, tmp_path):
    model, processor = tiny_bagel
    snapshot = write_snapshot(model, processor, tmp_path / "BAGEL-7B-MoT")
    overrides = tiny_overrides(model)
    linked = convert_bagel(snapshot, tmp_path / "linked", config_overrides=overrides)
    sharded = convert_bagel(snapshot, tmp_path / "sharded", config_overrides=overrides, max_shard_size=SHARD)
    assert weight_files(linked) == ["ema.safetensors", "vae.safetensors"]
    assert len(weight_files(sharded)) >= 3 and not (sharded / "ema.safetensors").exists()
    assert_same_state(
        AutoModelForImageTextToText.from_pretrained(linked).state_dict(),
        AutoModelForImageTextToText.from_pretrained(sharded).state_dict(),
    )
    check_card(sharded / "README.md", "bagel", repo_id="sharded", source="BAGEL-7B-MoT")
    with pytest.raises(ValueError, match="`max_shard_size`"):
        convert_bagel(snapshot, tmp_path / "bad", config_overrides=overrides, max_shard_size="0MB")
    assert not (tmp_path / "bad").exists()


def test_sharded_internvlu_conversion_equals_the_linked_one(tiny_internvlu, tmp_path):
    model, processor = tiny_internvlu
    snapshot = write_official_snapshot(tmp_path / "InternVL-U", model, processor, shards=2)
    linked = convert_internvlu(snapshot, tmp_path / "linked")
    sharded = convert_internvlu(snapshot, tmp_path / "sharded", max_shard_size="200KB")
    assert (linked / "vae.safetensors").is_file() and len(weight_files(sharded)) >= 3
    assert_same_state(
        AutoModelForImageTextToText.from_pretrained(linked).state_dict(),
        AutoModelForImageTextToText.from_pretrained(sharded).state_dict(),
    )
    check_card(sharded / "README.md", "internvlu", repo_id="sharded", source="InternVL-U")


# ----------------------------------------------------------------------------------------------------------------
# Uploads (a recording fake of HfApi: no network)
# ----------------------------------------------------------------------------------------------------------------


class RecordingApi:
    """Records every call; `remote` is what `list_repo_files` answers."""

    def __init__(self, remote=(".gitattributes",), large_folder: bool = True):
        self.remote = list(remote)
        self.calls: list[tuple[str, dict]] = []
        if large_folder:
            self.upload_large_folder = self._recorder("upload_large_folder")

    def _recorder(self, name):
        def record(**kwargs):
            self.calls.append((name, kwargs))
            return f"{name}-result"

        return record

    def __getattr__(self, name):
        if name in ("create_repo", "create_branch", "upload_folder", "delete_files"):
            return self._recorder(name)
        raise AttributeError(name)

    def list_repo_files(self, **kwargs):
        self.calls.append(("list_repo_files", kwargs))
        return self.remote

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def call(self, name: str) -> dict:
        (found,) = [kwargs for called, kwargs in self.calls if called == name]
        return found


REMOTE = [
    ".gitattributes", "README.md", "config.json", "model.safetensors", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "weights[v1].safetensors",
    "original/ema.safetensors", "notes.txt",
]  # fmt: skip


STALE = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors",
         "pytorch_model.bin", "weights[v1].safetensors"]  # fmt: skip


def test_stale_weight_files():
    local = ["config.json", "README.md", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json"]  # fmt: skip
    assert stale_weight_files(REMOTE, local) == ["model.safetensors", "pytorch_model.bin", "weights[v1].safetensors"]
    assert stale_weight_files(REMOTE, REMOTE) == []


def test_push_folder_deletes_stale_weights_in_the_same_commit(sharded_bagel):
    api = RecordingApi(remote=REMOTE)
    result = push_folder(
        sharded_bagel, "someone/bagel-g2tr", revision="dev", private=True, commit_message="v2", large=False, api=api
    )
    assert result == "upload_folder-result"
    assert api.names() == ["create_repo", "create_branch", "list_repo_files", "upload_folder"]
    assert api.call("create_repo") == {"repo_id": "someone/bagel-g2tr", "private": True, "exist_ok": True}
    assert api.call("create_branch") == {"repo_id": "someone/bagel-g2tr", "branch": "dev", "exist_ok": True}
    assert api.call("list_repo_files") == {"repo_id": "someone/bagel-g2tr", "revision": "dev"}
    upload = api.call("upload_folder")
    assert upload["folder_path"] == str(sharded_bagel) and upload["revision"] == "dev"
    assert upload["commit_message"] == "v2" and upload["create_pr"] is False
    # The index is replaced by name; the old two-shard set (the new export has more shards), the unsharded file and
    # the other weight files go, matched exactly (brackets escaped); sub-folders and other files stay.
    assert len(weight_files(sharded_bagel)) > 2
    patterns = upload["delete_patterns"]
    deleted = sorted({name for name in REMOTE for pattern in patterns if fnmatch.fnmatch(name, pattern)})
    assert deleted == STALE


def test_push_folder_pull_request_and_argument_errors(sharded_bagel, tmp_path):
    api = RecordingApi()
    push_folder(sharded_bagel, "someone/bagel-g2tr", create_pr=True, large=False, api=api)
    assert api.names() == ["create_repo", "list_repo_files", "upload_folder"]  # no branch for a pull request
    assert api.call("list_repo_files")["revision"] is None  # the PR's base: the default branch
    assert api.call("upload_folder")["create_pr"] is True and api.call("upload_folder")["delete_patterns"] is None

    api = RecordingApi()
    push_folder(sharded_bagel, "someone/bagel-g2tr", revision="refs/pr/3", large=False, api=api)
    assert "create_branch" not in api.names() and api.call("upload_folder")["revision"] == "refs/pr/3"

    failing = RecordingApi()
    with pytest.raises(ValueError, match="`create_pr=True`.*revision='dev'"):
        push_folder(sharded_bagel, "someone/x", create_pr=True, revision="dev", api=failing)
    with pytest.raises(ValueError, match="large-folder"):
        push_folder(sharded_bagel, "someone/x", create_pr=True, large=True, api=failing)
    with pytest.raises(ValueError, match="`folder`"):
        push_folder(tmp_path, "someone/x", api=failing)
    assert failing.calls == []  # every argument error comes before the first Hub call


def test_large_folders_use_the_large_folder_upload(sharded_bagel, monkeypatch):
    api = RecordingApi(remote=REMOTE)
    assert push_folder(sharded_bagel, "someone/bagel-g2tr", revision="dev", large=True, api=api) == (
        "upload_large_folder-result"
    )
    assert api.names() == ["create_repo", "create_branch", "list_repo_files", "upload_large_folder", "delete_files"]
    upload = api.call("upload_large_folder")
    assert upload == {"repo_id": "someone/bagel-g2tr", "folder_path": str(sharded_bagel), "repo_type": "model",
                      "revision": "dev"}  # fmt: skip
    deletion = api.call("delete_files")
    assert deletion["revision"] == "dev" and len(deletion["delete_patterns"]) == len(STALE)

    # Chosen by size when `large` is not given.
    monkeypatch.setattr(hub, "LARGE_FOLDER_BYTES", 1000)
    api = RecordingApi()
    push_folder(sharded_bagel, "someone/bagel-g2tr", api=api)
    assert "upload_large_folder" in api.names() and "delete_files" not in api.names()
    monkeypatch.setattr(hub, "LARGE_FOLDER_BYTES", 10**12)
    api = RecordingApi()
    push_folder(sharded_bagel, "someone/bagel-g2tr", api=api)
    assert "upload_folder" in api.names()

    # huggingface_hub 2.x has no upload_large_folder: its upload_folder resumes and splits large folders itself.
    api = RecordingApi(large_folder=False)
    push_folder(sharded_bagel, "someone/bagel-g2tr", large=True, create_pr=True, api=api)
    assert api.call("upload_folder")["create_pr"] is True


def test_push_to_hub_exports_sharded_with_a_card_for_the_repo(tiny_internvlu, tmp_path):
    model, processor = tiny_internvlu
    seen = {}

    class Api(RecordingApi):
        def _recorder(self, name):
            def record(**kwargs):
                if name == "upload_folder":  # the temporary folder is gone after push_to_hub returns
                    folder = Path(kwargs["folder_path"])
                    seen["files"] = weight_files(folder)
                    seen["card"] = (folder / "README.md").read_text()
                return super(Api, self)._recorder(name)(**kwargs)

            return record

    api = Api()
    push_to_hub(model, processor, "someone/internvlu-g2tr", max_shard_size="200KB", large=False, api=api)
    assert len(seen["files"]) >= 3 and "model.safetensors" not in seen["files"]
    assert 'repo = "someone/internvlu-g2tr"' in seen["card"]
    with pytest.raises(ValueError, match="`create_pr=True`"):
        push_to_hub(model, processor, "someone/x", create_pr=True, revision="dev", api=RecordingApi())


def test_cli_export_and_push(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "tiny"
    assert cli_main(["export", "--model", "tiny-internvlu", str(folder), "--max-shard-size", "200KB"]) == 0
    assert len(weight_files(folder)) >= 3
    assert cli_main(["export", "--model", "tiny-internvlu", str(tmp_path / "x"), "--max-shard-size", "big"]) == 2
    assert "`max_shard_size`" in capsys.readouterr().err

    import huggingface_hub

    api = RecordingApi(large_folder=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    argv = ["push", str(folder), "someone/tiny", "--revision", "dev", "--private", "--message", "hello", "--no-large"]
    assert cli_main(argv) == 0
    assert api.call("create_branch")["branch"] == "dev" and api.call("create_repo")["private"] is True
    assert api.call("upload_folder")["commit_message"] == "hello"
    assert cli_main(["push", str(folder), "someone/tiny", "--create-pr", "--revision", "dev"]) == 2
    assert "create_pr" in capsys.readouterr().err
    assert cli_main(["push", str(folder), "no-owner"]) == 2
    assert "`repo_id`" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# A re-saved exported BAGEL keeps its pipeline
# ----------------------------------------------------------------------------------------------------------------


def test_local_resave_keeps_the_pipeline_module(sharded_bagel, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(sharded_bagel)
    model.save_pretrained(tmp_path / "again", max_shard_size=SHARD)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "pipeline_bagel.G2TRBagelPipeline" in json.dumps(config["custom_pipelines"])
    for name in ("pipeline_bagel.py", "generation_g2tr.py", "image_utils.py", "saving_g2tr.py", "modeling_bagel.py"):
        assert (tmp_path / "again" / name).is_file(), name


def test_save_pretrained_with_push_to_hub_uploads_the_pipeline_module(sharded_bagel, tmp_path, monkeypatch):
    model = AutoModelForImageTextToText.from_pretrained(sharded_bagel)
    pushed = {}

    def fake_push_to_hub(repo_id, **kwargs):  # PushToHubMixin saves a fresh copy through save_pretrained
        model.save_pretrained(tmp_path / "uploaded")
        pushed.update(repo_id=repo_id, files=sorted(path.name for path in (tmp_path / "uploaded").iterdir()), **kwargs)

    monkeypatch.setattr(model, "push_to_hub", fake_push_to_hub)
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/x", commit_message="m", private=True)
    assert (tmp_path / "local" / "pipeline_bagel.py").is_file()
    assert pushed["repo_id"] == "someone/x" and pushed["commit_message"] == "m" and pushed["private"] is True
    assert "pipeline_bagel.py" in pushed["files"]


# In the isolated child (remote code only): load the sharded export, re-save model and processor into a new
# folder, and build the custom pipeline from that folder; its edit must equal the pipeline of the export itself.
RESAVE_CHILD = textwrap.dedent(
    """
    import json, os, sys

    import numpy as np, PIL.Image, torch
    from transformers import AutoModel, AutoProcessor, pipeline

    exported, resaved = sys.argv[1], sys.argv[2]
    AutoModel.from_pretrained(exported, trust_remote_code=True).save_pretrained(resaved)
    AutoProcessor.from_pretrained(exported, trust_remote_code=True).save_pretrained(resaved)
    image = PIL.Image.fromarray((np.arange(48 * 64 * 3).reshape(48, 64, 3) % 251).astype(np.uint8))

    def edit(folder):
        pipe = pipeline(model=folder, trust_remote_code=True, device="cpu")
        result = pipe(prompt="make it red", image=image, num_inference_steps=3, g2tr_ratio=0.5,
                      generator=torch.Generator().manual_seed(0), show_progress=False)
        return pipe, np.asarray(result.images[0])

    pipe, from_resaved = edit(resaved)
    _, from_exported = edit(exported)
    assert "g2tr_hf" not in sys.modules
    print("RESULT " + json.dumps({
        "files": sorted(os.listdir(resaved)),
        "pipeline": type(pipe).__module__ + "." + type(pipe).__name__,
        "equal": bool((from_resaved == from_exported).all()),
    }))
    """
)


def test_resaved_export_pipeline_loads_without_g2tr_hf(sharded_bagel, tmp_path):
    child = run_without_g2tr_hf(RESAVE_CHILD, sharded_bagel, tmp_path / "resaved", workdir=tmp_path)
    assert "pipeline_bagel.py" in child["files"] and "saving_g2tr.py" in child["files"]
    assert child["pipeline"].startswith("transformers_modules.") and child["pipeline"].endswith("G2TRBagelPipeline")
    assert child["equal"]


# ----------------------------------------------------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------------------------------------------------

ARXIV_LINKS = {
    "bagel": ("https://arxiv.org/abs/2605.12309", "https://arxiv.org/abs/2505.14683"),
    "internvlu": ("https://arxiv.org/abs/2605.12309", "https://arxiv.org/abs/2603.09877"),
}
BASE_MODELS = {"bagel": "ByteDance-Seed/BAGEL-7B-MoT", "internvlu": "InternVL-U/InternVL-U"}


def undefined_names(code: str) -> set[str]:
    """Names a snippet reads but never binds (import, assignment, loop, ...) and that are not builtins."""
    tree = ast.parse(code)
    bound, read = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return read - bound


def check_card(path: Path, name: str, *, repo_id: str, source: str) -> None:
    """The card parses with huggingface_hub, names its base model without claiming a relation, links the papers,
    and its Python snippets load `repo_id` and use only names they define."""
    text = path.read_text(encoding="utf-8")
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-text-to-text"
    assert data["base_model"] == BASE_MODELS[name]
    assert "base_model_relation" not in data and "base_model_relation is left unset on purpose" in text
    assert {"custom_code", "g2tr", "token-reduction"} <= set(data["tags"])
    if name == "bagel":
        assert data["license"] == "apache-2.0"
        assert "G2TRBagelPipeline" in card.text and "not exposed" not in card.text
    else:
        assert data["license"] == "other" and data["license_link"] == "https://huggingface.co/InternVL-U/InternVL-U"
        assert "UNVERIFIED" in text and "not verified" in card.text
    assert all(f"]({link})" in card.text for link in ARXIV_LINKS[name])
    assert f"`{source}`" in card.text and "$" not in card.text
    snippets = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    assert snippets and all(f'repo = "{repo_id}"' in snippet for snippet in snippets)
    for snippet in snippets:
        assert undefined_names(snippet) == set(), snippet


def test_cards_of_exports(tiny_bagel, tiny_internvlu, sharded_bagel, tmp_path):
    check_card(sharded_bagel / "README.md", "bagel", repo_id="bagel-g2tr", source="a model built in code")
    model, processor = tiny_internvlu
    folder = export(model, processor, tmp_path / "internvlu", repo_id="someone/internvlu-g2tr")
    check_card(folder / "README.md", "internvlu", repo_id="someone/internvlu-g2tr", source="a model built in code")


def test_card_source_never_publishes_a_local_path(tiny_internvlu, tmp_path):
    config = tiny_internvlu[0].config
    config._name_or_path = str(tmp_path / "private" / "my-model")
    try:
        card = default_model_card(config, "me/x")
    finally:
        config._name_or_path = ""
    assert "`my-model`" in card and str(tmp_path) not in card
    assert "`InternVL-U/InternVL-U`" in default_model_card(config, "me/x", source="InternVL-U/InternVL-U")


def test_templates_are_package_data():
    from importlib import resources

    for name in EXAMPLE_CARDS:
        packaged = resources.files("g2tr_hf").joinpath("model_cards", f"{name}.md")
        assert packaged.is_file() and model_card_template(name) == packaged.read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="`name`"):
        model_card_template("llava")
    # What a wheel (a non-editable install) ships: setup.cfg's package_data must cover every template.
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    patterns = setup["options.package_data"]["g2tr_hf"].split()
    templates = sorted(path.relative_to(ROOT / "src" / "g2tr_hf").as_posix()
                       for path in (ROOT / "src" / "g2tr_hf" / "model_cards").glob("*.md"))  # fmt: skip
    assert templates == ["model_cards/bagel.md", "model_cards/internvlu.md"]
    assert all(any(fnmatch.fnmatch(template, pattern) for pattern in patterns) for template in templates)


def rendered_example(name: str) -> str:
    return render_model_card(model_card_template(name), **EXAMPLE_CARDS[name])


def test_example_cards_match_the_templates():
    for name in EXAMPLE_CARDS:
        example = ROOT / "model_cards" / f"{name}.md"
        assert example.read_text(encoding="utf-8") == rendered_example(name), (
            f"{example} is out of date: run `python tests/test_hub_sharding.py` to re-render it"
        )
        fields = EXAMPLE_CARDS[name]
        check_card(example, name, repo_id=fields["repo_id"], source=fields["source"])


if __name__ == "__main__":
    for card_name in EXAMPLE_CARDS:
        (ROOT / "model_cards" / f"{card_name}.md").write_text(rendered_example(card_name), encoding="utf-8")

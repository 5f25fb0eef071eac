"""Hub export of the tiny BAGEL: the folder's files, auto_map and model card; a load through `trust_remote_code` in a
fresh interpreter that cannot import g2tr_hf (offline, temporary modules cache) compared with the local classes;
push_to_hub with a fake API; refusing to export over a non-empty folder; `g2tr-hf export`."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForImageTextToText, pipeline

from g2tr_hf import G2TRBagelForConditionalGeneration, build_tiny
from g2tr_hf.cli import main as cli_main
from g2tr_hf.hub import export, model_card_template, push_to_hub, render_model_card
from remote_code import run_without_g2tr_hf


MODEL_CARD = model_card_template("bagel")
RATIO = 0.5
MAX_NEW_TOKENS = 4
QUESTION = "What color is the image?"
REMOTE_CODE_FILES = (
    "baselines.py",
    "configuration_bagel.py",
    "configuration_g2tr.py",
    "in_llm.py",
    "modeling_bagel.py",
    "pipeline_bagel.py",
    "pipeline_utils.py",
    "processing_bagel.py",
    "reduction.py",
)


def card_text() -> str:
    return render_model_card(
        MODEL_CARD, repo_id="someone/bagel-g2tr", ratio=RATIO, min_keep=1, source="a tiny random model"
    )


def chat(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("bagel", seed=0)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> Path:
    model, processor = tiny
    return export(model, processor, tmp_path_factory.mktemp("hub") / "bagel-g2tr", model_card=card_text())


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    coarse = np.random.default_rng(3).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("images") / "image.png"
    PIL.Image.fromarray(coarse).resize((64, 48), PIL.Image.BILINEAR).save(path)
    return path


def test_export_writes_weights_processor_remote_code_and_auto_map(exported):
    files = set(os.listdir(exported))
    expected = {"config.json", "generation_config.json", "model.safetensors", "processor_config.json"}
    expected |= {"chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "README.md", *REMOTE_CODE_FILES}
    assert expected <= files
    assert not {"cli.py", "hub.py", "convert_bagel.py", "tiny.py", "__init__.py"} & files  # only the Hub files
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_bagel.G2TRBagelConfig",
        "AutoModel": "modeling_bagel.G2TRBagelForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_bagel.G2TRBagelForConditionalGeneration",
        "AutoProcessor": "processing_bagel.G2TRBagelProcessor",
    }
    processor_config = json.loads((exported / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_bagel.G2TRBagelProcessor"
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "processing_bagel.G2TRBagelImageProcessor"
    )
    # The shipped files import only each other (flat remote code) and never the package.
    shipped = {path.stem for path in exported.glob("*.py")}
    for code in exported.glob("*.py"):
        for line in code.read_text().splitlines():
            if line.startswith("from ."):
                assert line.split()[1][1:] in shipped, (code.name, line)
            assert not line.lstrip().startswith(("import g2tr_hf", "from g2tr_hf")), (code.name, line)


def test_model_card_metadata(exported):
    card = ModelCard((exported / "README.md").read_text())
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["base_model"] == "ByteDance-Seed/BAGEL-7B-MoT"
    assert {"custom_code", "g2tr"} <= set(data["tags"])
    assert "g2tr_ratio=0.5" in card.text and "trust_remote_code=True" in card.text and "$" not in card.text


# Runs in the isolated child of `remote_code.run_without_g2tr_hf`.
CHILD = textwrap.dedent(
    """
    import json, sys

    import PIL.Image
    import torch
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, image_path, question = sys.argv[1], sys.argv[2], sys.argv[3]
    ratio, max_new_tokens = float(sys.argv[4]), int(sys.argv[5])
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, g2tr_ratio=ratio).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(base) is type(model), (type(base), type(model))

    messages = [{"role": "user", "content": [
        {"type": "image", "image": PIL.Image.open(image_path)}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    answer = pipe(text=messages, generate_kwargs={"max_new_tokens": max_new_tokens, "do_sample": False})
    assert "g2tr_hf" not in sys.modules
    print("RESULT " + json.dumps({
        "modules": [type(model).__module__, type(processor).__module__, type(processor.image_processor).__module__],
        "ratio": model.config.g2tr_ratio,
        "input_ids": inputs["input_ids"][0].tolist(),
        "logits": logits.tolist(),
        "new_tokens": sequences[0, inputs["input_ids"].shape[1]:].tolist(),
        "answer": answer[0]["generated_text"][-1]["content"],
    }))
    """
)


def run_child(folder: Path, image_path: Path, scratch: Path) -> dict:
    return run_without_g2tr_hf(CHILD, folder, image_path, QUESTION, RATIO, MAX_NEW_TOKENS, workdir=scratch)


def test_remote_code_load_without_g2tr_hf_matches_local_class(exported, image_path, tmp_path):
    child = run_child(exported, image_path, tmp_path)
    assert all(module.startswith("transformers_modules.") for module in child["modules"]), child["modules"]
    assert child["ratio"] == RATIO
    assert (tmp_path / "modules" / "transformers_modules").is_dir()  # the temporary modules cache was used

    # The local class (g2tr_hf is imported here, so local code wins) at the same ratio.
    local = AutoModelForImageTextToText.from_pretrained(exported, g2tr_ratio=RATIO).eval()
    assert type(local) is G2TRBagelForConditionalGeneration
    processor = build_tiny("bagel")[1]
    messages = chat(PIL.Image.open(image_path))
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert child["input_ids"] == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        logits = local(**inputs).logits[0, -1]
        sequences = local.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    torch.testing.assert_close(torch.tensor(child["logits"]), logits, rtol=0, atol=1e-5)
    assert child["new_tokens"] == sequences[0, inputs["input_ids"].shape[1] :].tolist()
    answer = pipeline("image-text-to-text", model=local, processor=processor)(
        text=messages, generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}
    )
    assert answer[0]["generated_text"][-1]["content"] == child["answer"]
    # The reduction really ran: the unreduced model answers the prefill differently.
    with torch.no_grad():
        assert not torch.allclose(local(**inputs, g2tr_ratio=1.0).logits[0, -1], logits)


class FakeHubApi:
    """Stands in for `huggingface_hub.HfApi`: records `create_repo` and copies what `upload_folder` uploads."""

    def __init__(self, store: Path):
        self.store = store
        self.created: list[dict] = []
        self.uploaded: list[str] = []

    def create_repo(self, repo_id: str, private=None, exist_ok: bool = False, **kwargs):
        self.created.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok})
        return repo_id

    def list_repo_files(self, repo_id: str, revision=None, **kwargs) -> list[str]:
        return [".gitattributes"]  # a new repository

    def upload_folder(self, repo_id: str, folder_path: str, commit_message: str = "", **kwargs):
        target = self.store / repo_id.replace("/", "--")
        shutil.copytree(folder_path, target)
        self.uploaded = sorted(path.name for path in target.iterdir())
        return f"https://hub.invalid/{repo_id}/commit/{len(self.uploaded)}"


def test_push_to_hub_with_a_fake_api(tiny, tmp_path):
    model, processor = tiny
    api = FakeHubApi(tmp_path)
    result = push_to_hub(model, processor, "someone/bagel-g2tr", model_card=card_text(), api=api)
    assert result.startswith("https://hub.invalid/someone/bagel-g2tr/commit/")
    assert api.created == [{"repo_id": "someone/bagel-g2tr", "private": None, "exist_ok": True}]
    expected = {"README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json"}
    assert expected | set(REMOTE_CODE_FILES) <= set(api.uploaded)
    assert (tmp_path / "someone--bagel-g2tr" / "README.md").read_text() == card_text()
    uploaded_config = json.loads((tmp_path / "someone--bagel-g2tr" / "config.json").read_text())
    assert uploaded_config["auto_map"]["AutoModel"] == "modeling_bagel.G2TRBagelForConditionalGeneration"


def test_export_refuses_a_non_empty_folder_and_leaves_it_alone(tiny, tmp_path):
    model, processor = tiny
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        export(model, processor, target)
    assert [path.name for path in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    assert [path.name for path in tmp_path.iterdir()] == ["busy"]  # no staging folder either
    export(model, processor, target, overwrite=True)
    assert (target / "config.json").is_file() and not (target / "notes.txt").exists()


def test_cli_export(tmp_path, capsys):
    tiny_folder = tmp_path / "tiny"
    assert cli_main(["export", "--model", "tiny-bagel", str(tiny_folder)]) == 0
    assert "Exported" in capsys.readouterr().out
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_bagel.G2TRBagelForConditionalGeneration"
    assert ModelCard((tiny_folder / "README.md").read_text()).data.to_dict()["pipeline_tag"] == "image-text-to-text"

    # Re-export a model folder with another stored ratio; the weights and the card travel unchanged.
    again = tmp_path / "again"
    assert cli_main(["export", "--model", str(tiny_folder), str(again), "--ratio", "0.25"]) == 0
    assert json.loads((again / "config.json").read_text())["g2tr_ratio"] == 0.25
    assert (again / "README.md").read_text() == (tiny_folder / "README.md").read_text()
    first = AutoModelForImageTextToText.from_pretrained(tiny_folder).state_dict()
    second = AutoModelForImageTextToText.from_pretrained(again).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)

    assert cli_main(["export", "--model", "tiny-bagel", str(again)]) == 2  # not empty, no --overwrite
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["export", "--model", "tiny-bagel", str(tmp_path / "bad"), "--ratio", "1.5"]) == 2
    assert not (tmp_path / "bad").exists()

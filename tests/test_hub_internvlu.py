"""Hub export of InternVL-U: the exported folder's files and auto_map, loading it through `trust_remote_code` in a
fresh interpreter that cannot import g2tr_hf (remote code only, offline), push_to_hub with a fake API, and the
model card's metadata."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import pipeline

from g2tr_hf.hub import export, model_card_template, push_to_hub, render_model_card
from g2tr_hf.tiny import build_tiny
from remote_code import run_without_g2tr_hf


MODEL_CARD = model_card_template("internvlu")
QUESTION = "what is in the picture?"
MAX_NEW_TOKENS = 4
RATIO = 0.5


def _card() -> str:
    return render_model_card(
        MODEL_CARD, repo_id="someone/internvlu-g2tr", ratio=RATIO, min_keep=32, source="a tiny random model"
    )


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("internvlu", seed=0)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> Path:
    model, processor = tiny
    return export(model, processor, tmp_path_factory.mktemp("hub") / "internvlu-g2tr", model_card=_card())


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "image.png"
    PIL.Image.fromarray((np.random.RandomState(2).rand(30, 40, 3) * 255).astype(np.uint8)).save(path)
    return path


def _messages(image: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def test_export_writes_remote_code_and_auto_maps(exported):
    for name in (
        "configuration_internvlu.py", "configuration_g2tr.py", "modeling_internvlu.py", "processing_internvlu.py",
        "reduction.py", "baselines.py", "in_llm.py", "config.json", "processor_config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "chat_template.jinja", "README.md",
    ):  # fmt: skip
        assert (exported / name).is_file(), name
    assert not (exported / "convert_internvlu.py").exists() and not (exported / "hub.py").exists()
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_internvlu.G2TRInternVLUConfig",
        "AutoModel": "modeling_internvlu.G2TRInternVLUForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_internvlu.G2TRInternVLUForConditionalGeneration",
        "AutoProcessor": "processing_internvlu.G2TRInternVLUProcessor",
    }
    processor_config = json.loads((exported / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_internvlu.G2TRInternVLUProcessor"
    assert (
        processor_config["image_processor"]["auto_map"]["AutoImageProcessor"]
        == "processing_internvlu.G2TRInternVLUImageProcessor"
    )
    # Remote code imports only siblings that were shipped with it.
    shipped = {p.stem for p in exported.glob("*.py")}
    for code in exported.glob("*.py"):
        for line in code.read_text().splitlines():
            if line.startswith("from ."):
                assert line.split()[1][1:] in shipped, (code.name, line)
            assert not line.lstrip().startswith(("import g2tr_hf", "from g2tr_hf")), (code.name, line)


# Runs in the isolated child of `remote_code.run_without_g2tr_hf`.
CHILD = textwrap.dedent(
    """
    import json, sys

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, image, question = sys.argv[1:4]
    ratio, max_new_tokens = float(sys.argv[4]), int(sys.argv[5])
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, g2tr_ratio=ratio).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    batch = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**batch).logits[0, -3:]
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    generated = pipe(text=messages, generate_kwargs={"max_new_tokens": max_new_tokens, "do_sample": False})
    print("RESULT " + json.dumps({
        "model_module": type(model).__module__,
        "processor_module": type(processor).__module__,
        "image_processor_module": type(processor.image_processor).__module__,
        "ratio": model.config.g2tr_ratio,
        "input_ids": batch["input_ids"][0].tolist(),
        "logits": logits.tolist(),
        "answer": generated[0]["generated_text"][-1]["content"],
        "g2tr_hf_imported": any(name.split(".")[0] == "g2tr_hf" for name in sys.modules),
    }))
    """
)


def test_remote_code_loads_offline_without_g2tr_hf(tiny, exported, image_path, tmp_path):
    child = run_without_g2tr_hf(CHILD, exported, image_path, QUESTION, RATIO, MAX_NEW_TOKENS, workdir=tmp_path)

    for key in ("model_module", "processor_module", "image_processor_module"):
        assert child[key].startswith("transformers_modules."), child[key]
    assert not child["g2tr_hf_imported"] and child["ratio"] == RATIO
    assert (tmp_path / "modules" / "transformers_modules").is_dir()  # the temporary modules cache was used

    # The same computation with the local classes in this process.
    model, processor = tiny
    messages = _messages(str(image_path))
    batch = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert child["input_ids"] == batch["input_ids"][0].tolist()
    with torch.no_grad():
        logits = model(**batch, g2tr_ratio=RATIO).logits[0, -3:]
    torch.testing.assert_close(torch.tensor(child["logits"]), logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        sequences = model.generate(**batch, g2tr_ratio=RATIO, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    expected = processor.decode(sequences[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert child["answer"] == expected

    # The stock pipeline on the local model agrees as well.
    model.config.g2tr_ratio = RATIO
    try:
        local = pipeline("image-text-to-text", model=model, processor=processor)(
            text=messages, generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}
        )
    finally:
        model.config.g2tr_ratio = 1.0
    assert local[0]["generated_text"][-1]["content"] == child["answer"]


class FakeHubApi:
    """Records create_repo / upload_folder calls and keeps a copy of the uploaded folder."""

    def __init__(self, store: Path):
        self.store = store
        self.repos: list[dict] = []
        self.uploads: list[dict] = []

    def create_repo(self, repo_id: str, private=None, exist_ok=False, **kwargs):
        self.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok})
        return repo_id

    def list_repo_files(self, repo_id: str, revision=None, **kwargs) -> list[str]:
        return [".gitattributes"]  # a new repository

    def upload_folder(self, repo_id: str, folder_path: str, commit_message: str = "", **kwargs):
        target = self.store / repo_id.replace("/", "--")
        shutil.copytree(folder_path, target)
        files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
        self.uploads.append({"repo_id": repo_id, "files": files, "commit_message": commit_message})
        return f"https://hub.invalid/{repo_id}/commit/0"


def test_push_to_hub_with_a_fake_api(tiny, tmp_path):
    model, processor = tiny
    api = FakeHubApi(tmp_path)
    result = push_to_hub(model, processor, "someone/internvlu-g2tr", model_card=_card(), private=True, api=api)
    assert result.endswith("/commit/0")
    assert api.repos == [{"repo_id": "someone/internvlu-g2tr", "private": True, "exist_ok": True}]
    (upload,) = api.uploads
    for name in ("README.md", "config.json", "model.safetensors", "modeling_internvlu.py", "processing_internvlu.py",
                 "configuration_internvlu.py", "reduction.py", "processor_config.json", "tokenizer.json"):
        assert name in upload["files"], name
    uploaded_card = (tmp_path / "someone--internvlu-g2tr" / "README.md").read_text()
    assert uploaded_card == _card()


def test_model_card_metadata(exported):
    card = ModelCard((exported / "README.md").read_text(encoding="utf-8"))
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["base_model"] == "InternVL-U/InternVL-U"
    assert data["license"] and (data["license"] != "other" or data.get("license_link"))
    assert {"custom_code", "g2tr", "token-reduction", "multimodal", "internvl"} <= set(data["tags"])
    body = card.text
    assert "trust_remote_code=True" in body and "g2tr_ratio" in body
    assert "$ratio" not in body and "$source" not in body  # every placeholder was filled
    loading = [line for line in body.splitlines() if "from_pretrained(" in line]
    assert 1 <= len(loading) <= 3

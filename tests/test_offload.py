"""accelerate's CPU / disk offload: every part of each model can sit on the disk and the outputs stay the same.

Offloaded weights live on the meta device until the module's own hook loads them, so the models must reach every
module through its call and never read an offloaded `.weight.device`.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoModelForImageTextToText

from g2tr_hf import G2TRBagelPipeline, build_tiny


pytest.importorskip("accelerate")

# The parts of each backbone that a device map can place on their own, and the head.
PARTS = {
    "bagel": [
        "model.language_model", "model.vit_model", "model.connector", "model.vit_pos_embed", "model.latent_pos_embed",
        "model.time_embedder", "model.vae2llm", "model.llm2vae", "model.vae", "lm_head",
    ],
    "internvlu": ["model.vision_model", "model.mlp1", "model.language_model", "model.special_token_embedding",
                  "model.vae", "lm_head"],
}  # fmt: skip


def make_image(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["bagel", "internvlu"])
def saved(request, tmp_path_factory):
    name = request.param
    model, processor = build_tiny(name)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    placeholder = processor.image_token if name == "bagel" else "<image>"
    prompt = f"<|im_start|>user\n{placeholder}What?<|im_end|>\n<|im_start|>assistant\n"
    inputs = dict(processor(text=[prompt], images=[make_image(0)], return_tensors="pt"))
    return name, model, processor, folder, inputs


def offloaded(folder, parts: list[str], on_disk: str, tmp_path):
    device_map = {part: "disk" if part == on_disk else "cpu" for part in parts}
    return AutoModelForImageTextToText.from_pretrained(
        folder, device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_understanding_with_each_part_on_disk(saved, ratio, tmp_path):
    name, model, _, folder, inputs = saved
    with torch.no_grad():
        want = model(**inputs, g2tr_ratio=ratio).logits
        tokens = model.generate(**inputs, g2tr_ratio=ratio, do_sample=False, max_new_tokens=3)
    for part in PARTS[name]:
        loaded = offloaded(folder, PARTS[name], part, tmp_path)
        assert loaded.hf_device_map[part] == "disk"
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs, g2tr_ratio=ratio).logits, want, msg=part)
            generated = loaded.generate(**inputs, g2tr_ratio=ratio, do_sample=False, max_new_tokens=3)
        assert torch.equal(generated, tokens), part


def test_bagel_editing_with_each_part_on_disk(saved, tmp_path):
    name, model, processor, folder, _ = saved
    if name != "bagel":
        pytest.skip("editing is BAGEL's")

    def edit(m):
        pipe = G2TRBagelPipeline(model=m, processor=processor)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        call = dict(prompt="make it red", image=make_image(1), num_inference_steps=3, g2tr_ratio=0.5)
        return pipe(**call, generator=generator, output_type="pt").images[0]

    want = edit(model)
    for part in PARTS[name]:
        torch.testing.assert_close(edit(offloaded(folder, PARTS[name], part, tmp_path)), want, msg=part)

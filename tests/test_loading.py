"""Loading paths shared by both models: device_map="auto" (accelerate) and the no-split module names."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from g2tr_hf import build_tiny


pytest.importorskip("accelerate")


def _request(processor):
    image = Image.new("RGB", (56, 56), (30, 160, 90))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what?"}]}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@pytest.mark.parametrize("name", ["bagel", "internvlu"])
def test_no_split_modules_name_real_submodules(name):
    model, _ = build_tiny(name)
    present = {type(module).__name__ for module in model.modules()}
    declared = set(type(model)._no_split_modules)  # the instance list also gathers submodules' (e.g. diffusers')
    assert declared and declared <= present


@pytest.mark.parametrize("name", ["bagel", "internvlu"])
def test_device_map_auto_loads_and_matches(name, tmp_path):
    model, processor = build_tiny(name)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto", g2tr_ratio=0.5).eval()
    assert getattr(loaded, "hf_device_map", None) is not None or loaded.device.type == "cpu"
    inputs = _request(processor)
    with torch.inference_mode():
        expected = model(**inputs, g2tr_ratio=0.5).logits
        actual = loaded(**inputs).logits
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("name", ["bagel", "internvlu"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.25), (torch.float16, 0.02)])
def test_half_precision_forward_follows_fp32(name, dtype, tolerance):
    model, processor = build_tiny(name)
    inputs = _request(processor)
    with torch.inference_mode():
        reference = model(**inputs, g2tr_ratio=0.5).logits
        logits = model.to(dtype)(**inputs, g2tr_ratio=0.5).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), reference, atol=tolerance, rtol=0)

"""InternVL-U processor: the official chat template and text normalisation to the exact token ids, one tile per
image, the VAE pixels for the G2TR anchors, multi-image and batched inputs, input types and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoProcessor

from g2tr_hf.configuration_internvlu import DEFAULT_SYSTEM_MESSAGE, TINY_TOKEN_IDS
from g2tr_hf.processing_internvlu import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    G2TRInternVLUImageProcessor,
    G2TRInternVLUProcessor,
    build_tiny_processor,
    build_tiny_tokenizer,
    normalize_question,
)
from remote_code import run_without_g2tr_hf


T = 16  # <IMG_CONTEXT> per image of the tiny processor
CHAT = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}


@pytest.fixture(scope="module")
def processor() -> G2TRInternVLUProcessor:
    return build_tiny_processor()


def _image(seed: int, size=(40, 30)) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8))


def _ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def _block() -> str:
    return "<img>" + "<IMG_CONTEXT>" * T + "</img>"


def test_tiny_tokenizer_is_byte_level_with_internvl_tokens():
    tokenizer = build_tiny_tokenizer()
    for token, token_id in TINY_TOKEN_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    text = "你好 <img>x</img> é"
    ids = tokenizer(text)["input_ids"]
    assert TINY_TOKEN_IDS["<img>"] in ids and TINY_TOKEN_IDS["</img>"] in ids
    assert len([i for i in ids if i < 256]) == len(text.replace("<img>", "").replace("</img>", "").encode())
    assert tokenizer.decode(ids) == text


def test_chat_template_gives_the_exact_official_ids(processor):
    content = [{"type": "image", "image": _image(0)}, {"type": "text", "text": "what is this?"}]
    messages = [{"role": "user", "content": content}]
    out = processor.apply_chat_template(messages, **CHAT)
    expected_text = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n"
        f"<|im_start|>user\n{_block()}\nwhat is this?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert out["input_ids"][0].tolist() == _ids(processor, expected_text)
    assert out["attention_mask"].tolist() == [[1] * out["input_ids"].shape[1]]
    ids = out["input_ids"][0].tolist()
    assert ids[:2] == [TINY_TOKEN_IDS["<|im_start|>"], ord("s")]
    assert ids.count(TINY_TOKEN_IDS["<IMG_CONTEXT>"]) == T
    assert ids.count(TINY_TOKEN_IDS["<img>"]) == 1 and ids.count(TINY_TOKEN_IDS["</img>"]) == 1
    # The official prompt builder (text mode) produces the same ids.
    prompt = processor.build_prompt("what is this?", num_images=1)
    official = processor(text=prompt, images=[_image(0)], return_tensors="pt")
    assert torch.equal(official["input_ids"], out["input_ids"])
    assert torch.equal(official["pixel_values"], out["pixel_values"])


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("  what is this  ", "What is this."),
        ("Is it red?", "Is it red?"),
        ("list: a, b;", "List: a, b;"),
        ("", ""),
        ("ok!", "Ok!"),
    ],
)
def test_question_normalisation(processor, question, expected):
    assert normalize_question(question) == expected
    rendered = processor.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    assert f"<|im_start|>user\n{expected}<|im_end|>\n" in rendered


def test_image_first_keeps_the_question_case_as_upstream(processor):
    """Upstream prepends `<image>\\n` before normalising, so the first character it upper-cases is `<`."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<|im_start|>user\n<image>\nwhat is this.<|im_end|>" in rendered
    assert processor.build_prompt("what is this", num_images=1) == rendered


def test_system_message_override(processor):
    messages = [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "again"},
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\n"
    )
    custom = build_tiny_processor()
    custom.system_message = "Custom"
    rendered = custom.apply_chat_template([{"role": "user", "content": "x"}])
    assert rendered.startswith("<|im_start|>system\nCustom<|im_end|>")


def test_multi_image_and_batched_left_padding(processor):
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": _image(1)}, {"type": "text", "text": "one"}]}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": _image(2)},
                    {"type": "image", "image": _image(3, size=(20, 50))},
                    {"type": "text", "text": "compare the two pictures"},
                ],
            }
        ],
    ]
    out = processor.apply_chat_template(conversations, padding=True, **CHAT)
    assert out["pixel_values"].shape == (3, 3, 56, 56)
    assert out["vae_pixel_values"].shape == (3, 3, 56, 56)
    assert out["vae_pixel_sizes"].tolist() == [[56, 56]] * 3
    ids, mask = out["input_ids"], out["attention_mask"]
    assert [int((row == TINY_TOKEN_IDS["<img>"]).sum()) for row in ids] == [1, 2]
    assert int((ids == TINY_TOKEN_IDS["<IMG_CONTEXT>"]).sum()) == 3 * T
    pad = int((mask[0] == 0).sum())
    assert pad > 0 and mask[0, :pad].sum() == 0 and mask[0, pad:].all() and mask[1].all()
    assert (ids[0, :pad] == TINY_TOKEN_IDS["<|endoftext|>"]).all()
    single = processor.apply_chat_template(conversations[0], **CHAT)
    assert torch.equal(ids[0, pad:], single["input_ids"][0])
    # Images are consumed in conversation order: the first row's image comes first.
    assert torch.equal(out["pixel_values"][0], single["pixel_values"][0])


def test_plain_call_requires_one_placeholder_per_image(processor):
    """The call no longer puts missing placeholders in front (it refuses, like the BAGEL processor); `build_prompt`
    still writes them where upstream's text mode does."""
    with pytest.raises(ValueError, match=r"`text` holds 0 image placeholder\(s\).*`images` holds 2 image\(s\)"):
        processor(text="Describe.", images=[_image(0), _image(1)])
    with pytest.raises(ValueError, match=r"holds 1 image placeholder\(s\).* holds 2 image\(s\)"):
        processor(text="<image>\nDescribe.", images=[_image(0), _image(1)])
    prompt = processor.build_prompt("Describe.", num_images=2)
    assert prompt.count("<image>\n") == 2
    out = processor(text=prompt, images=[_image(0), _image(1)])
    expected = _ids(processor, prompt.replace("<image>", _block()))
    assert out["input_ids"][0] == expected
    flat = processor(text=["<image> a", "b <image> <image>"], images=[_image(0), _image(1), _image(2)])
    assert [row.count(TINY_TOKEN_IDS["<img>"]) for row in flat["input_ids"]] == [1, 2]
    with pytest.raises(ValueError, match=r"`text\[1\]` holds 1 image placeholder\(s\).*`images\[1\]` holds 2"):
        processor(text=["<image> a", "<image> b"], images=[[_image(0)], [_image(1), _image(2)]])


def test_image_normalisation_statistics():
    image_processor = G2TRInternVLUImageProcessor(image_size=56)
    colour = (200, 100, 50)
    out = image_processor(PIL.Image.new("RGB", (31, 17), colour), return_tensors="pt")
    expected = (torch.tensor(colour) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out["pixel_values"][0, :, 10, 10], expected.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["vae_pixel_values"][0, :, 10, 10], (torch.tensor(colour) / 127.5 - 1).float())
    assert out["pixel_values"].shape == (1, 3, 56, 56)
    vae = G2TRInternVLUImageProcessor(image_size=56, vae_image_size=64)(_image(0), return_tensors="pt")
    assert vae["vae_pixel_values"].shape == (1, 3, 64, 64) and vae["vae_pixel_sizes"].tolist() == [[64, 64]]
    assert vae["vae_pixel_values"].min() >= -1 and vae["vae_pixel_values"].max() <= 1


def test_input_types_agree():
    image_processor = G2TRInternVLUImageProcessor(image_size=56)
    rgb = _image(7)
    array = np.asarray(rgb)
    reference = image_processor(rgb, return_tensors="pt")["pixel_values"]
    for variant in (
        array,
        array.transpose(2, 0, 1),
        array.astype(np.float32) / 255.0,
        torch.from_numpy(array.transpose(2, 0, 1).copy()),
        rgb.convert("RGBA"),
        rgb.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=256).convert("RGB"),
    ):
        out = image_processor(variant, return_tensors="pt")["pixel_values"]
        tolerance = 0.0 if not isinstance(variant, PIL.Image.Image) or variant.mode == "RGBA" else 1.0
        torch.testing.assert_close(out, reference, atol=tolerance + 1e-6, rtol=0)
    grey = image_processor(PIL.Image.new("L", (20, 20), 128), return_tensors="pt")["pixel_values"]
    assert grey.shape == (1, 3, 56, 56)
    transparent = image_processor(PIL.Image.new("RGBA", (8, 8), (0, 0, 0, 0)), return_tensors="pt")["pixel_values"]
    white = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(transparent[0, :, 0, 0], white.float())


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0, 10, 3), dtype=np.uint8),
        np.zeros((2, 2, 2, 2, 3), dtype=np.uint8),  # 5-D: neither an image nor a batch
        np.zeros((10, 10, 5), dtype=np.uint8),
        np.full((4, 4, 3), 300, dtype=np.int32),
        np.full((4, 4, 3), np.nan, dtype=np.float32),
        7,
        None,
    ],
)
def test_bad_images_raise(processor, bad):
    with pytest.raises(ValueError, match="images"):
        processor.image_processor([bad] if bad is None else bad)


def test_bad_calls_raise(processor):
    with pytest.raises(ValueError, match="text"):
        processor(images=_image(0))
    with pytest.raises(ValueError, match="placeholder"):
        processor(text="<image><image> two", images=[_image(0)])
    with pytest.raises(ValueError, match="placeholder"):
        processor(text=["<image> a", "b"], images=[_image(0), _image(1)])
    with pytest.raises(ValueError, match="prompts"):
        processor(text=["a", "b"], images=[[_image(0)]])
    with pytest.raises(ValueError, match="image_seq_length"):
        build_tiny_processor(image_seq_length=0)
    with pytest.raises(ValueError, match="image_size"):
        G2TRInternVLUImageProcessor(image_size=0)


def test_processor_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = G2TRInternVLUProcessor.from_pretrained(tmp_path)
    assert loaded.image_seq_length == T and loaded.image_processor.image_size == 56
    messages = [{"role": "user", "content": [{"type": "image", "image": _image(0)}, {"type": "text", "text": "hi"}]}]
    a, b = processor.apply_chat_template(messages, **CHAT), loaded.apply_chat_template(messages, **CHAT)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert processor.model_input_names == [
        "input_ids", "attention_mask", "pixel_values", "vae_pixel_values", "vae_pixel_sizes",
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# image_seq_length from the components, kept through save / load; options fixed at construction
# ----------------------------------------------------------------------------------------------------------------

SEQ = 9  # neither the default 256 nor the tiny 16


def _components_processor(image_seq_length: int = SEQ) -> G2TRInternVLUProcessor:
    return G2TRInternVLUProcessor(
        image_processor=G2TRInternVLUImageProcessor(image_size=56),
        tokenizer=build_tiny_tokenizer(),
        image_seq_length=image_seq_length,
    )


def _context_counts(batch) -> list[int]:
    return [int((row == TINY_TOKEN_IDS["<IMG_CONTEXT>"]).sum()) for row in torch.as_tensor(batch["input_ids"])]


def test_image_seq_length_of_a_processor_built_from_components(tmp_path):
    processor = _components_processor()
    assert processor.image_seq_length == SEQ
    messages = [{"role": "user", "content": [{"type": "image", "image": _image(0)}, {"type": "text", "text": "hi"}]}]
    assert _context_counts(processor.apply_chat_template(messages, **CHAT)) == [SEQ]
    assert _context_counts(processor(text=["<image> a", "<image><image> b"], images=[_image(0)] * 3)) == [SEQ, 2 * SEQ]
    data = processor._get_num_multimodal_tokens(image_sizes=[(30, 40), (448, 448)])
    assert data.num_image_tokens == [SEQ + 2] * 2 and data.num_image_patches == [1, 1]

    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["image_seq_length"] == SEQ
    loaded = G2TRInternVLUProcessor.from_pretrained(tmp_path)
    assert loaded.image_seq_length == SEQ
    assert _context_counts(loaded.apply_chat_template(messages, **CHAT)) == [SEQ]
    assert AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True).image_seq_length == SEQ


def test_image_seq_length_survives_a_remote_code_load(tmp_path):
    """AutoProcessor(trust_remote_code=True) in a process that never imports g2tr_hf keeps the saved value."""
    _components_processor().save_pretrained(tmp_path / "repo")
    script = """
        import json, sys
        import numpy as np, PIL.Image
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
        assert "g2tr_hf" not in sys.modules
        image = PIL.Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8))
        out = processor(text="<image>\\nWhat?", images=[image])
        context = processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        print("RESULT " + json.dumps({"seq": processor.image_seq_length, "count": out["input_ids"][0].count(context),
                                      "module": type(processor).__module__}))
        """
    report = run_without_g2tr_hf(script, tmp_path / "repo", workdir=tmp_path)
    assert report == {"seq": SEQ, "count": SEQ, "module": report["module"]}
    assert report["module"].startswith("transformers_modules")


@pytest.mark.parametrize(
    "name, value", [("image_size", 64), ("vae_image_size", 64), ("vae_image_mean", [0.1, 0.1, 0.1])]
)
def test_construction_only_image_options_are_refused_per_call(processor, name, value):
    with pytest.raises(ValueError, match=name):
        processor.image_processor(_image(0), **{name: value})
    with pytest.raises(ValueError, match=name):
        processor(text="<image>", images=[_image(0)], **{name: value})


def test_image_seq_length_is_not_a_per_call_option(processor):
    with pytest.raises(ValueError, match="image_seq_length"):
        processor(text="<image>", images=[_image(0)], image_seq_length=4)


def test_unsupported_chat_template_flags_raise(processor):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(ValueError, match="return_assistant_tokens_mask"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    with pytest.raises(ValueError, match="return_mm_token_type_ids"):
        processor(text="hi", return_mm_token_type_ids=True)


def test_text_options_reach_the_tokenizer(processor):
    out = processor(text=["a", "bcd"], padding_side="right", return_tensors="pt")
    assert out["attention_mask"][0].tolist() == [1, 0, 0]
    out = processor(text=["a", "bcd"], return_tensors="pt")  # left by default
    assert out["attention_mask"][0].tolist() == [0, 0, 1]
    out = processor(text=["abcdef"], truncation=True, max_length=2)
    assert len(out["input_ids"][0]) == 2

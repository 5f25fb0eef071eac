"""Contracts that the BAGEL and InternVL-U processors share, checked on both with the same tests.

1. Standard image options (transformers' `ImagesKwargs`) are honoured identically, whichever way they are passed
   (flat keyword, `images_kwargs`, `apply_chat_template(processor_kwargs=...)`, legacy chat-template keyword, or at
   construction), or refused by both with a `ValueError` naming the option. Rescale / normalise options change
   the ViT pixels only; the VAE pixels (the generation-side input) keep their fixed [-1, 1] mapping.
2. Chat message objects (dataclasses, pydantic models, huggingface_hub messages) and transformers' `Chat` work
   wherever dict messages do.
3. Exactly one placeholder per image, on both: more images than placeholders (or fewer) is a `ValueError` naming
   both counts.
"""

import dataclasses
import logging
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.utils.chat_template_utils import Chat

from g2tr_hf import image_utils
from g2tr_hf.processing_bagel import G2TRBagelImageProcessor, G2TRBagelProcessor, build_tiny_bagel_processor
from g2tr_hf.processing_internvlu import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    G2TRInternVLUImageProcessor,
    G2TRInternVLUProcessor,
    build_tiny_processor,
)


# ----------------------------------------------------------------------------------------------------------------
# Both processors behind one small adapter
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Tiny:
    name: str
    processor: Any
    placeholder: str  # what a raw text prompt writes for one image
    mean: tuple[float, float, float]  # default ViT statistics
    std: tuple[float, float, float]

    def prompt(self, num_placeholders: int, question: str = "What is it?") -> str:
        return f"<|im_start|>user\n{self.placeholder * num_placeholders}{question}<|im_end|>\n<|im_start|>assistant\n"

    @staticmethod
    def by_channel(pixel_values: torch.Tensor, name: str) -> torch.Tensor:
        """ViT pixel values as `[3, K]`: BAGEL's patches end in (p_row, p_col, channel); InternVL-U is NCHW."""
        if name == "bagel":
            return pixel_values.reshape(-1, 3).T
        return pixel_values.permute(1, 0, 2, 3).reshape(3, -1)


def _tiny(name: str) -> Tiny:
    if name == "bagel":
        return Tiny(name, build_tiny_bagel_processor(), "<|image_pad|>", (0.5,) * 3, (0.5,) * 3)
    return Tiny(name, build_tiny_processor(), "<image>", IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(scope="module", params=["bagel", "internvlu"])
def tiny(request) -> Tiny:
    return _tiny(request.param)


@pytest.fixture(scope="module")
def both() -> list[Tiny]:
    return [_tiny("bagel"), _tiny("internvlu")]


def make_image(seed: int = 0, width: int = 50, height: int = 70) -> PIL.Image.Image:
    """A random image that is not a fixed point of any resize (so the resampling filter matters)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def call(tiny: Tiny, image: Any = None, **kwargs) -> dict:
    image = make_image() if image is None else image
    return tiny.processor(text=tiny.prompt(1), images=[image], return_tensors="pt", **kwargs)


def chat(image: Any, question: str = "What is it?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


CHAT = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}


# ----------------------------------------------------------------------------------------------------------------
# 1. Image options: honoured identically
# ----------------------------------------------------------------------------------------------------------------


def test_rescale_and_normalise_options_follow_the_expected_arithmetic(tiny):
    raw = call(tiny, do_rescale=False, do_normalize=False)["pixel_values"]  # the resized 8-bit values
    assert raw.dtype == torch.float32 and raw.max() > 1.0 and torch.equal(raw, raw.round())
    default = call(tiny)
    expected = (tiny.by_channel(raw, tiny.name) / 255 - torch.tensor(tiny.mean)[:, None]) / torch.tensor(tiny.std)[
        :, None
    ]
    torch.testing.assert_close(tiny.by_channel(default["pixel_values"], tiny.name), expected, atol=1e-6, rtol=0)

    # do_normalize=False: the rescaled values only; rescale_factor scales them.
    torch.testing.assert_close(call(tiny, do_normalize=False)["pixel_values"], raw / 255, atol=1e-7, rtol=0)
    torch.testing.assert_close(
        call(tiny, do_normalize=False, rescale_factor=2 / 255)["pixel_values"], raw * 2 / 255, atol=1e-6, rtol=0
    )
    # image_mean / image_std, one value per channel, with the given rescale factor.
    mean, std = (0.1, 0.2, 0.3), (0.25, 0.5, 2.0)
    out = call(tiny, image_mean=list(mean), image_std=list(std), rescale_factor=1 / 127.5)
    expected = (tiny.by_channel(raw, tiny.name) / 127.5 - torch.tensor(mean)[:, None]) / torch.tensor(std)[:, None]
    torch.testing.assert_close(tiny.by_channel(out["pixel_values"], tiny.name), expected, atol=1e-5, rtol=0)
    # A single number applies to every channel; do_rescale=False normalises the 8-bit values.
    out = call(tiny, image_mean=100.0, image_std=50.0, do_rescale=False)
    torch.testing.assert_close(out["pixel_values"], (raw - 100) / 50, atol=1e-5, rtol=0)


def test_vit_options_never_touch_the_vae_pixels(tiny):
    default = call(tiny)
    options = {"do_normalize": False, "do_rescale": False, "image_mean": 0.3, "image_std": 0.1, "rescale_factor": 0.5}
    for name, value in options.items():
        out = call(tiny, **{name: value})
        assert torch.equal(out["vae_pixel_values"], default["vae_pixel_values"]), name
        assert not torch.equal(out["pixel_values"], default["pixel_values"]), name
    vae = default["vae_pixel_values"]
    assert vae.min() >= -1.0 and vae.max() <= 1.0 and vae.min() < -0.9 and vae.max() > 0.9


def test_options_reach_the_image_processor_by_every_route(tiny):
    options = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.25, 0.5, 2.0], "rescale_factor": 1 / 127.5}
    image = make_image(1)
    reference = tiny.processor.image_processor([image], return_tensors="pt", **options)["pixel_values"]
    assert not torch.equal(reference, tiny.processor.image_processor([image], return_tensors="pt")["pixel_values"])
    routes = {  # (copies: transformers writes into a `processor_kwargs` dict)
        "flat keyword": call(tiny, image, **options),
        "images_kwargs": call(tiny, image, images_kwargs=dict(options)),
        "processor_kwargs": tiny.processor.apply_chat_template(chat(image), processor_kwargs=dict(options), **CHAT),
        "legacy chat keyword": tiny.processor.apply_chat_template(chat(image), **options, **CHAT),
    }
    for route, out in routes.items():
        assert torch.equal(out["pixel_values"], reference), route


def test_options_given_at_construction_are_defaults_of_every_call(tiny, tmp_path):
    image_processor = type(tiny.processor.image_processor)(
        **{**tiny.processor.image_processor.to_dict(), "do_normalize": False, "rescale_factor": 2 / 255}
    )
    image, pt = make_image(2), {"return_tensors": "pt"}
    raw = tiny.processor.image_processor([image], do_rescale=False, do_normalize=False, **pt)["pixel_values"]
    out = image_processor([image], **pt)
    torch.testing.assert_close(out["pixel_values"], raw * 2 / 255, atol=1e-6, rtol=0)
    assert torch.equal(out["vae_pixel_values"], tiny.processor.image_processor([image], **pt)["vae_pixel_values"])
    # A call still overrides them, and they survive save_pretrained / from_pretrained.
    assert torch.equal(image_processor([image], do_normalize=True, rescale_factor=1 / 255, **pt)["pixel_values"],
                       tiny.processor.image_processor([image], **pt)["pixel_values"])  # fmt: skip
    image_processor.save_pretrained(tmp_path)
    loaded = type(image_processor).from_pretrained(tmp_path)
    assert torch.equal(loaded([image], **pt)["pixel_values"], out["pixel_values"])


def test_resample_applies_to_both_resizes(tiny):
    default, nearest = call(tiny), call(tiny, resample=PIL.Image.Resampling.NEAREST)
    assert not torch.equal(nearest["pixel_values"], default["pixel_values"])
    assert not torch.equal(nearest["vae_pixel_values"], default["vae_pixel_values"])
    assert torch.equal(call(tiny, resample=3)["pixel_values"], default["pixel_values"])  # 3 = bicubic, the default


def test_input_data_format_states_the_layout_of_arrays(tiny):
    image = make_image(3, width=3, height=40)  # (40, 3, 3) HWC; as CHW (3, 40, 3) both axes could be channels
    reference = tiny.processor.image_processor([image], return_tensors="pt")
    chw = np.asarray(image).transpose(2, 0, 1).copy()
    guessed = tiny.processor.image_processor([chw], return_tensors="pt")  # numpy: read as HWC, a 3x40 image
    stated = tiny.processor.image_processor([chw], input_data_format="channels_first", return_tensors="pt")
    assert not torch.equal(guessed["vae_pixel_values"], reference["vae_pixel_values"])
    assert all(torch.equal(stated[key], reference[key]) for key in reference)
    hwc_tensor = torch.from_numpy(np.asarray(image).copy())  # torch: CHW preferred, HWC stated
    stated = tiny.processor.image_processor([hwc_tensor], input_data_format="channels_last", return_tensors="pt")
    assert all(torch.equal(stated[key], reference[key]) for key in reference)
    through_processor = call(tiny, chw, input_data_format="channels_first")
    assert torch.equal(through_processor["pixel_values"], reference["pixel_values"])
    with pytest.raises(ValueError, match="input_data_format"):
        tiny.processor.image_processor([np.asarray(make_image(4))], input_data_format="channels_first")


@pytest.mark.parametrize(
    "name, value",
    [
        ("do_resize", True),
        ("do_convert_rgb", True),
        ("do_center_crop", False),
        ("do_pad", False),
        ("data_format", "channels_first"),
        ("disable_grouping", True),
    ],
)
def test_options_with_the_value_the_model_needs_are_accepted(tiny, name, value):
    default = call(tiny)
    out = call(tiny, **{name: value})
    assert all(torch.equal(out[key], default[key]) for key in default)


REFUSED = [
    ("do_resize", False),
    ("do_convert_rgb", False),
    ("do_center_crop", True),
    ("do_pad", True),
    ("size", {"height": 64, "width": 64}),
    ("crop_size", {"height": 32, "width": 32}),
    ("pad_size", {"height": 64, "width": 64}),
    ("default_to_square", False),
    ("image_seq_length", 4),
    ("device", "cpu"),
    ("data_format", "channels_last"),
    ("image_mean", [0.1, 0.2]),
    ("image_std", 0.0),
    ("rescale_factor", -1.0),
    ("input_data_format", "sideways"),
]


@pytest.mark.parametrize("name, value", REFUSED)
def test_options_that_cannot_be_honoured_raise_the_same_error_on_both(both, name, value):
    messages = []
    for tiny in both:
        routes = {
            "image processor": lambda: tiny.processor.image_processor([make_image()], **{name: value}),
            "flat keyword": lambda: call(tiny, **{name: value}),
            "images_kwargs": lambda: call(tiny, images_kwargs={name: value}),
            "processor_kwargs": lambda: tiny.processor.apply_chat_template(
                chat(make_image()), processor_kwargs={name: value}, **CHAT
            ),
        }
        for route, run in routes.items():
            with pytest.raises(ValueError, match=name) as error:
                run()
            assert "Accepted" in str(error.value) or "Validation error" in str(error.value), route
        messages.append(str(error.value))
    # The same option, the same sentence: only the processor's name and its geometry differ.
    first, second = (message.split(" is not supported by ")[0] for message in messages)
    assert first == second


def test_a_wrongly_typed_option_is_a_value_error_on_both(both):
    for tiny in both:
        with pytest.raises(ValueError, match="rescale_factor"):
            call(tiny, rescale_factor="half")


def test_unknown_image_processor_arguments_raise_on_both(both):
    for tiny in both:
        with pytest.raises(ValueError, match="do_normalise"):
            tiny.processor.image_processor([make_image()], do_normalise=False)


def test_invalid_options_at_construction_raise(both):
    for tiny in both:
        settings = tiny.processor.image_processor.to_dict()
        with pytest.raises(ValueError, match="do_center_crop"):
            type(tiny.processor.image_processor)(**{**settings, "do_center_crop": True})
        with pytest.raises(ValueError, match="image_std"):
            type(tiny.processor.image_processor)(**{**settings, "image_std": [1.0, 0.0, 1.0]})


def test_the_internvlu_processor_no_longer_drops_keyword_arguments(caplog):
    """It used to log "ignores the keyword arguments" and drop them; now they are honoured or refused."""
    tiny = _tiny("internvlu")
    with caplog.at_level(logging.WARNING):
        out = call(tiny, do_normalize=False)
    assert "ignores" not in caplog.text
    assert not torch.equal(out["pixel_values"], call(tiny)["pixel_values"])


def test_resolve_image_kwargs_defaults_mirror_transformers():
    options = image_utils.resolve_image_kwargs(G2TRBagelImageProcessor(), {}, geometry="fixed")
    assert (options.do_rescale, options.do_normalize, options.rescale_factor) == (True, True, 1 / 255)
    assert options.image_mean == options.image_std == (0.5, 0.5, 0.5) and options.channels_first is None
    options = image_utils.resolve_image_kwargs(G2TRInternVLUImageProcessor(), {"image_mean": 0.25}, geometry="fixed")
    assert options.image_mean == (0.25, 0.25, 0.25) and options.image_std == IMAGENET_STD


# ----------------------------------------------------------------------------------------------------------------
# 2. Message objects and Chat
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TextItem:
    text: str
    type: str = "text"


@dataclasses.dataclass
class ImageItem:
    image: Any
    type: str = "image"


@dataclasses.dataclass
class DataclassMessage:
    role: str
    content: Any
    name: str | None = None  # None keys are left out, as transformers does


try:  # pydantic is not a dependency of g2tr-hf: without it the pydantic case is left out
    from pydantic import BaseModel, ConfigDict

    class PydanticMessage(BaseModel):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        role: str
        content: Any

except ImportError:  # pragma: no cover
    PydanticMessage = None


def _dict_messages(image: PIL.Image.Image) -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]},
    ]


def _outputs_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_message_objects_and_chat_work_like_dict_messages(tiny):
    image = make_image(5)
    reference = tiny.processor.apply_chat_template(_dict_messages(image), **CHAT)
    assert "pixel_values" in reference
    dataclass_messages = [
        DataclassMessage("system", "Be brief."),
        DataclassMessage("user", [ImageItem(image), TextItem("What is it?")]),
    ]
    conversations = {
        "dataclasses": dataclass_messages,
        "Chat": Chat(_dict_messages(image)),
        "mixed": [dataclass_messages[0], _dict_messages(image)[1]],
    }
    if PydanticMessage is not None:
        conversations["pydantic"] = [PydanticMessage(**message) for message in _dict_messages(image)]
    for label, conversation in conversations.items():
        out = tiny.processor.apply_chat_template(conversation, **CHAT)
        assert _outputs_equal(out, reference), label
        rendered = tiny.processor.apply_chat_template(conversation, add_generation_prompt=True)
        assert rendered == tiny.processor.apply_chat_template(_dict_messages(image), add_generation_prompt=True)


def test_batches_of_chats_and_of_message_object_lists(tiny):
    images = [make_image(6), make_image(7, width=40, height=40)]
    reference = tiny.processor.apply_chat_template([chat(im) for im in images], padding=True, **CHAT)
    for batch in (
        [Chat(chat(im)) for im in images],
        [[DataclassMessage("user", [ImageItem(im), TextItem("What is it?")])] for im in images],
        [Chat(chat(images[0])), chat(images[1])],
    ):
        assert _outputs_equal(tiny.processor.apply_chat_template(batch, padding=True, **CHAT), reference)


def test_huggingface_hub_messages_with_openai_image_urls(tiny, tmp_path):
    from huggingface_hub import ChatCompletionInputMessage, ChatCompletionInputMessageChunk, ChatCompletionInputURL

    image = make_image(8)
    path = tmp_path / "image.png"
    image.save(path)
    messages = [
        ChatCompletionInputMessage(
            role="user",
            content=[
                ChatCompletionInputMessageChunk(type="image_url", image_url=ChatCompletionInputURL(url=str(path))),
                ChatCompletionInputMessageChunk(type="text", text="What is it?"),
            ],
        )
    ]
    out = tiny.processor.apply_chat_template(messages, **CHAT)
    assert _outputs_equal(out, tiny.processor.apply_chat_template(chat(image), **CHAT))


def test_the_callers_messages_are_not_modified(tiny):
    image = make_image(9)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    message, content = messages[0], messages[0]["content"]
    before = [dict(message), list(content), [dict(item) for item in content]]
    tiny.processor.apply_chat_template(messages, **CHAT)
    # (transformers 5.17 replaces `content` lists in place; the processors hand it copies)
    assert messages[0] is message and message["content"] is content
    assert [message, content, content] == [before[0], before[1], before[2]]
    assert content[0]["image"] is image


def test_bad_messages_and_content_items_raise_on_both(both):
    for tiny in both:
        with pytest.raises(ValueError, match="conversation"):
            tiny.processor.apply_chat_template(["not a message"], **CHAT)
        video = [DataclassMessage("user", [{"type": "video", "video": "clip.mp4"}, TextItem("Hi")])]
        with pytest.raises(ValueError, match="text and image content items"):
            tiny.processor.apply_chat_template(video, **CHAT)


def test_plain_conversation_keeps_the_batching_and_the_images():
    image = make_image(10)
    single = image_utils.plain_conversation([DataclassMessage("user", [ImageItem(image)])])
    assert single == [{"role": "user", "content": [{"image": image, "type": "image"}]}]
    assert single[0]["content"][0]["image"] is image  # never copied
    first, second = [{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]
    batch = image_utils.plain_conversation([Chat(first), second])
    assert batch == [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    assert image_utils.plain_conversation([]) == []


# ----------------------------------------------------------------------------------------------------------------
# 3. One placeholder per image, on both
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_placeholders, num_images", [(0, 1), (1, 2), (2, 1), (1, 0)])
def test_placeholder_and_image_counts_must_agree(tiny, num_placeholders, num_images):
    images = [make_image(seed) for seed in range(num_images)] or None
    pattern = rf"holds {num_placeholders} image placeholder\(s\).* holds {num_images} image\(s\)"
    with pytest.raises(ValueError, match=pattern):
        tiny.processor(text=tiny.prompt(num_placeholders), images=images)


def test_counts_agree_over_a_batch_of_prompts(tiny):
    prompts = [tiny.prompt(1), tiny.prompt(0)]
    with pytest.raises(ValueError, match=r"holds 1 image placeholder\(s\).* holds 2 image\(s\)"):
        tiny.processor(text=prompts, images=[make_image(0), make_image(1)], padding=True)
    out = tiny.processor(text=[tiny.prompt(1), tiny.prompt(1)], images=[make_image(0), make_image(1)], padding=True)
    assert len(out["input_ids"]) == 2


def test_a_chat_whose_images_outnumber_its_placeholders_raises(tiny):
    # A template that renders the text items only: the chat holds an image but the prompt has no placeholder.
    text_only = (
        "{%- for message in messages -%}{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}"
        "{{- item['text'] -}}{%- endif -%}{%- endfor -%}{%- endfor -%}"
    )
    with pytest.raises(ValueError, match=r"holds 0 image placeholder\(s\).* holds 1 image\(s\)"):
        tiny.processor.apply_chat_template(chat(make_image()), chat_template=text_only, **CHAT)


def test_a_chat_gets_exactly_one_image_block_per_image_item(tiny):
    images = [make_image(0), make_image(1), make_image(2)]
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": "Compare."}]
    out = tiny.processor.apply_chat_template([{"role": "user", "content": content}], **CHAT)
    rendered = tiny.processor.apply_chat_template([{"role": "user", "content": content}])
    assert rendered.count(tiny.placeholder) == 3
    start = tiny.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>" if tiny.name == "bagel" else "<img>")
    assert int((out["input_ids"] == start).sum()) == 3


def test_check_placeholder_count_names_both_counts():
    image_utils.check_placeholder_count(2, 2, placeholder="<image>")
    with pytest.raises(ValueError, match=r"`text` holds 1 image placeholder\(s\) \(<image>\) but `images` holds 3"):
        image_utils.check_placeholder_count(1, 3, placeholder="<image>")


def test_both_processor_classes_are_covered():
    assert isinstance(_tiny("bagel").processor, G2TRBagelProcessor)
    assert isinstance(_tiny("internvlu").processor, G2TRInternVLUProcessor)

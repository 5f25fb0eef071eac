"""Tests of the BAGEL image processor, processor and chat template (`g2tr_hf.processing_bagel`).

Expected sizes come from the geometry table of `docs/algorithm.md` and are computed by hand from the official
`MaxLongEdgeMinShortEdgeResize` rule; token layouts follow upstream's `prepare_prompts` / `prepare_vit_images`.
"""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel, pipeline
from transformers.modeling_outputs import CausalLMOutputWithPast

from g2tr_hf.processing_bagel import (
    BAGEL_CHAT_TEMPLATE,
    G2TRBagelImageProcessor,
    G2TRBagelProcessor,
    _round_to_stride,
    bagel_resize_output_size,
    build_tiny_bagel_processor,
    build_tiny_bagel_tokenizer,
    patchify,
)
from remote_code import run_without_g2tr_hf


# ----------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor() -> G2TRBagelProcessor:
    return build_tiny_bagel_processor()


@pytest.fixture(scope="module")
def full_size() -> G2TRBagelImageProcessor:
    return G2TRBagelImageProcessor()


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> PIL.Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def chat(image: PIL.Image.Image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def encode(processor: G2TRBagelProcessor, text: str) -> list[int]:
    return processor.tokenizer.encode(text, add_special_tokens=False)


def image_block(processor: G2TRBagelProcessor, num_patches: int) -> list[int]:
    pads = [processor.image_token_id] * num_patches
    return [processor.vision_start_token_id] + pads + [processor.vision_end_token_id]


def segment(processor: G2TRBagelProcessor, text: str) -> list[int]:
    return [processor.im_start_token_id] + encode(processor, text) + [processor.im_end_token_id]


def apply_template(processor, conversation, **kwargs):
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt", **kwargs}
    return processor.apply_chat_template(conversation, processor_kwargs={"padding": True}, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Resize rules
# ----------------------------------------------------------------------------------------------------------------


# (input W, H) -> VAE image (H, W), ViT grid (h_v, w_v), docs/algorithm.md (300x300 upscaled).
GEOMETRY_TABLE = [
    ((1024, 1024), (1024, 1024), (70, 70)),
    ((1024, 768), (768, 1024), (52, 70)),
    ((512, 512), (512, 512), (37, 37)),
    ((1920, 1080), (576, 1024), (39, 70)),
    ((300, 300), (512, 512), (37, 37)),
    ((2048, 2048), (1024, 1024), (70, 70)),
]


@pytest.mark.parametrize("input_wh, vae_hw, vit_grid", GEOMETRY_TABLE)
def test_official_geometry_table(full_size, input_wh, vae_hw, vit_grid):
    width, height = input_wh
    assert full_size.vae_size(height, width) == vae_hw
    assert full_size.vit_grid(height, width) == vit_grid
    latent = (vae_hw[0] // 16, vae_hw[1] // 16)
    assert latent[0] <= vit_grid[0] and latent[1] <= vit_grid[1]  # every latent cell gets a ViT token


@pytest.mark.parametrize("input_wh, vae_hw, vit_grid", [GEOMETRY_TABLE[1], GEOMETRY_TABLE[3]])
def test_geometry_on_real_pixels(full_size, input_wh, vae_hw, vit_grid):
    out = full_size(random_image(*input_wh), return_tensors="pt")
    num_patches = vit_grid[0] * vit_grid[1]
    assert out["image_grid_hw"].tolist() == [list(vit_grid)]
    assert out["vae_image_hw"].tolist() == [list(vae_hw)]
    assert out["pixel_values"].shape == (num_patches, 3 * 14 * 14)
    assert out["vae_pixel_values"].shape == (1, 3, *vae_hw)
    assert out["image_position_ids"].shape == (num_patches,)


def test_vit_rule_bankers_rounding():
    # 1024x768: the ViT side is 768 * 980 / 1024 = 735 = 52.5 * 14 -> 52 (half to even), i.e. 728 and not 742.
    assert bagel_resize_output_size(768, 1024, max_size=980, min_size=224, stride=14) == (728, 980)
    assert _round_to_stride(735, 14) == 728  # 52.5 -> 52
    assert _round_to_stride(749, 14) == 756  # 53.5 -> 54
    assert _round_to_stride(40, 16) == 32  # 2.5 -> 2
    assert _round_to_stride(24, 16) == 32  # 1.5 -> 2
    assert _round_to_stride(8, 16) == 16  # 0.5 -> 0, then never below the stride
    # The same rounding at image level: 40 px with stride 16 -> 32 (tiny VAE rule), 56 px -> 64.
    assert bagel_resize_output_size(40, 40, max_size=64, min_size=32, stride=16) == (32, 32)
    assert bagel_resize_output_size(56, 56, max_size=64, min_size=32, stride=16) == (64, 64)
    # The first rounding (to whole pixels) is half-to-even as well: 1041x2048 has scale 0.5 for the VAE, the short
    # side 520.5 -> 520 -> 32.5 * 16 -> 512 (rounding 520.5 up would give 521 -> 32.56 * 16 -> 528).
    assert bagel_resize_output_size(1041, 2048, max_size=1024, min_size=512, stride=16) == (512, 1024)
    assert bagel_resize_output_size(1043, 2048, max_size=1024, min_size=512, stride=16) == (528, 1024)  # 521.5->522


def test_tiny_images_are_upscaled(full_size):
    # Short edge below the minimum: the image is enlarged (1x1 -> 512x512 for the VAE, then 518x518 for the ViT).
    assert full_size.vae_size(1, 1) == (512, 512)
    assert full_size.vit_grid(1, 1) == (37, 37)
    out = full_size(np.zeros((1, 1, 3), dtype=np.uint8))
    assert out["image_grid_hw"].tolist() == [[37, 37]]
    assert out["vae_image_hw"].tolist() == [[512, 512]]


def test_very_elongated_images(full_size):
    # 500x4000 (HxW): the short-edge minimum asks for 512x4096, the pixel budget and then the long-edge clip
    # bring it to 128x1024 for the VAE; the ViT rule then gives 126x980, a 9x70 grid.
    assert full_size.vae_size(500, 4000) == (128, 1024)
    assert full_size.vit_grid(500, 4000) == (9, 70)
    # Here the pixel budget changes the result: the short-edge rule gives 512x21088, the budget shrinks that to
    # 80x3520 and the long-edge clip then gives 16x1024 (clipping 512x21088 directly would give 32x1024).
    assert bagel_resize_output_size(29, 1194, max_size=1024, min_size=512, stride=16) == (16, 1024)
    assert bagel_resize_output_size(36, 1679, max_size=980, min_size=224, stride=14) == (14, 980)
    # Extreme ratios end at one stride on the short side, the maximum on the long side.
    assert full_size.vae_size(10000, 1) == (1024, 16)
    assert full_size.vit_grid(10000, 1) == (70, 1)
    assert full_size.vit_grid(1, 10000) == (1, 70)


def test_vit_rule_without_vae_pre_resize(full_size):
    # Through the inferencer a 300x300 image reaches the ViT at 518x518, not 294x294.
    assert full_size.vit_grid(300, 300) == (37, 37)
    assert full_size.vit_grid(300, 300, vit_from_vae_image=False) == (21, 21)


@settings(max_examples=200, deadline=None)
@given(height=st.integers(1, 6000), width=st.integers(1, 6000))
def test_resize_rule_invariants(height, width):
    for max_size, min_size, stride in ((1024, 512, 16), (980, 224, 14)):
        new_h, new_w = bagel_resize_output_size(height, width, max_size=max_size, min_size=min_size, stride=stride)
        assert new_h % stride == 0 and new_w % stride == 0
        assert stride <= min(new_h, new_w) and max(new_h, new_w) <= max_size
        if max(height, width) <= 2 * min(height, width):  # moderate aspect ratio: both bounds hold
            assert min(new_h, new_w) >= min_size - stride // 2


# ----------------------------------------------------------------------------------------------------------------
# Pixels: patch order, position ids, value range, the two-step resize
# ----------------------------------------------------------------------------------------------------------------


def test_patch_order_and_position_ids(processor):
    # 28x42 is a fixed point of the tiny ViT rule, so the ViT image is the input itself (no VAE pre-resize here).
    image = random_image(42, 28, seed=1)
    out = processor.image_processor(image, vit_from_vae_image=False, return_tensors="pt")
    assert out["image_grid_hw"].tolist() == [[2, 3]]
    pixels = torch.from_numpy(np.array(image)).float() / 255 * 2 - 1  # [28, 42, 3]
    expected = torch.stack(
        [pixels[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14, :].reshape(-1) for r in range(2) for c in range(3)]
    )  # each patch flattened as (p_row, p_col, channel), patches row-major
    torch.testing.assert_close(out["pixel_values"], expected, atol=1e-6, rtol=0)
    # ids row * side + col with the tiny side 8
    assert out["image_position_ids"].tolist() == [0, 1, 2, 8, 9, 10]


def test_position_ids_use_the_configured_table_side(full_size):
    out = full_size(random_image(1024, 768))
    grid_h, grid_w = out["image_grid_hw"][0].tolist()
    ids = out["image_position_ids"].view(grid_h, grid_w)
    assert ids[0, :3].tolist() == [0, 1, 2]
    assert ids[1, 0].item() == 70 and ids[-1, -1].item() == (grid_h - 1) * 70 + grid_w - 1


def test_patchify_matches_the_latent_patch_layout():
    image = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)  # C=2, H=4, W=6, patch 2
    patches = patchify(image, 2)
    assert patches.shape == (6, 8)
    # second patch (row 0, col 1): pixels (0,2),(0,3),(1,2),(1,3), channels interleaved last
    expected = torch.stack([image[:, 0, 2], image[:, 0, 3], image[:, 1, 2], image[:, 1, 3]]).reshape(-1)
    assert torch.equal(patches[1], expected)


def test_value_range_and_dtypes(processor):
    black_white = np.zeros((48, 64, 3), dtype=np.uint8)
    black_white[:, 32:] = 255
    out = processor.image_processor([black_white, random_image(50, 70)], return_tensors="pt")
    for key in ("pixel_values", "vae_pixel_values"):
        assert out[key].dtype == torch.float32
        assert out[key].min() >= -1.0 and out[key].max() <= 1.0
    assert out["vae_pixel_values"][0].min() == -1.0 and out["vae_pixel_values"][0].max() == 1.0
    for key in ("image_position_ids", "image_grid_hw", "vae_image_hw"):
        assert out[key].dtype == torch.long


def test_vae_image_is_the_normalised_input_at_a_fixed_point(processor):
    image = random_image(64, 48, seed=2)  # already a tiny VAE size: the resize is an identity
    out = processor.image_processor(image, return_tensors="pt")
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    assert torch.equal(out["vae_pixel_values"][0], expected)
    assert out["vae_image_hw"].tolist() == [[48, 64]]


def test_two_step_resize_matches_pil_bicubic_reference(processor):
    image = random_image(100, 80, seed=3)  # VAE 48x64, then ViT 42x56
    out = processor.image_processor(image, return_tensors="pt")

    def to_unit_range(pil_image):
        return torch.from_numpy(np.array(pil_image)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)

    vae_image = image.resize((64, 48), PIL.Image.BICUBIC)
    two_step = patchify(to_unit_range(vae_image.resize((56, 42), PIL.Image.BICUBIC)), 14)
    one_step = patchify(to_unit_range(image.resize((56, 42), PIL.Image.BICUBIC)), 14)
    assert out["image_grid_hw"].tolist() == [[3, 4]]
    assert torch.equal(out["pixel_values"], two_step)
    assert not torch.equal(out["pixel_values"], one_step)  # the VAE pre-resize matters
    assert torch.equal(out["vae_pixel_values"][0], to_unit_range(vae_image))


def test_vae_images_are_zero_padded_bottom_right(processor):
    out = processor.image_processor([random_image(40, 40), random_image(64, 48)], return_tensors="pt")
    assert out["vae_image_hw"].tolist() == [[32, 32], [48, 64]]
    assert out["vae_pixel_values"].shape == (2, 3, 48, 64)
    padded = out["vae_pixel_values"][0]
    assert torch.count_nonzero(padded[:, 32:, :]) == 0 and torch.count_nonzero(padded[:, :, 32:]) == 0
    assert torch.count_nonzero(padded[:, :32, :32]) > 0


# ----------------------------------------------------------------------------------------------------------------
# Input types and modes
# ----------------------------------------------------------------------------------------------------------------


def _outputs_equal(a, b) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a)


def test_all_input_types_give_identical_outputs(processor):
    image = random_image(50, 70, seed=4)
    pixels = np.array(image)
    reference = processor.image_processor(image)
    variants = {
        "numpy uint8 HWC": pixels,
        "numpy float HWC": pixels.astype(np.float32) / 255,
        "numpy float64 CHW": pixels.transpose(2, 0, 1) / 255.0,
        "torch uint8 CHW": torch.from_numpy(pixels).permute(2, 0, 1),
        "torch float CHW": torch.from_numpy(pixels).permute(2, 0, 1).float() / 255,
        "torch int64 CHW": torch.from_numpy(pixels.astype(np.int64)).permute(2, 0, 1),
        "torch HWC": torch.from_numpy(pixels),
    }
    for name, variant in variants.items():
        assert _outputs_equal(processor.image_processor(variant), reference), name
    batch = processor.image_processor(np.stack([pixels, pixels]))  # a 4-D array is a batch
    assert batch["image_grid_hw"].shape == (2, 2)


def test_gray_palette_cmyk_and_bilevel_modes_convert_like_pil(processor):
    gray = random_image(50, 70, seed=5).convert("L")
    reference = processor.image_processor(gray.convert("RGB"))
    for variant in (gray, np.array(gray), torch.from_numpy(np.array(gray)), np.array(gray)[..., None]):
        assert _outputs_equal(processor.image_processor(variant), reference)
    vae = processor.image_processor(gray)["vae_pixel_values"][0]
    assert torch.equal(vae[0], vae[1]) and torch.equal(vae[1], vae[2])  # gray stays gray
    for mode in ("P", "CMYK", "1", "I;16", "F", "YCbCr"):
        converted = random_image(50, 70, seed=6).convert(mode)
        out = processor.image_processor(converted)
        assert _outputs_equal(out, processor.image_processor(converted.convert("RGB"))), mode


def test_rgba_is_composited_on_white_like_upstream(processor):
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[:, :32] = (200, 0, 0, 255)  # opaque red on the left
    rgba[:, 32:] = (0, 255, 0, 0)  # fully transparent green on the right
    out = processor.image_processor(PIL.Image.fromarray(rgba))
    vae = out["vae_pixel_values"][0]  # 64x48 is a fixed point of the tiny VAE rule
    assert torch.all(vae[:, :, 32:] == 1.0)  # transparent -> white
    assert torch.allclose(vae[:, :, :32], torch.tensor([200 / 255 * 2 - 1, -1.0, -1.0])[:, None, None])
    assert _outputs_equal(processor.image_processor(rgba), out)  # 4-channel arrays are RGBA too
    palette = PIL.Image.fromarray(rgba[..., :3]).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = palette.getpixel((40, 10))  # the palette index of the green half
    vae = processor.image_processor(palette)["vae_pixel_values"][0]
    assert vae[:, :, 32:].eq(1.0).all() and not vae[:, :, :32].eq(1.0).all()
    # Upstream composites RGBA and `transparency` images only: an LA image just drops its alpha.
    la = PIL.Image.fromarray(rgba).convert("LA")
    assert _outputs_equal(processor.image_processor(la), processor.image_processor(la.convert("RGB")))


BAD_IMAGES = {
    "empty PIL": PIL.Image.new("RGB", (0, 4)),
    "empty array": np.zeros((0, 5, 3), dtype=np.uint8),
    "empty tensor": torch.zeros(3, 4, 0),
    "None in a list": [None],
    "int": 3,
    "dict": {"image": 1},
    "float out of range": np.full((8, 8, 3), 2.0, dtype=np.float32),
    "nan": np.full((8, 8, 3), np.nan, dtype=np.float32),
    "negative ints": np.full((8, 8, 3), -1, dtype=np.int64),
    "bool": np.ones((8, 8, 3), dtype=bool),
    "5-D": np.zeros((1, 1, 8, 8, 3), dtype=np.uint8),
    "two channels": np.zeros((8, 8, 2), dtype=np.uint8),
    "bad string": "not an image",
    "empty list": [],
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_images_raise_value_error_naming_the_argument(processor, name):
    with pytest.raises(ValueError, match="images"):
        processor.image_processor(BAD_IMAGES[name])


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"vit_max_num_patch_per_side": 3}, "vit_max_num_patch_per_side"),
        ({"vae_min_size": 128}, "vae_min_size"),
        ({"vit_max_size": 50}, "vit_max_size"),
        ({"vae_stride": 0}, "vae_stride"),
        ({"vit_from_vae_image": "yes"}, "vit_from_vae_image"),
    ],
)
def test_bad_settings_raise(settings, match):
    with pytest.raises(ValueError, match=match):
        build_tiny_bagel_processor(**settings)


def test_unsupported_image_kwargs_are_rejected_not_ignored(processor):
    image = random_image(40, 40)
    with pytest.raises(ValueError, match="do_center_crop"):
        processor.image_processor(image, do_center_crop=True)
    with pytest.raises(ValueError, match="do_resize"):
        processor.image_processor(image, do_resize=False)
    assert processor.image_processor(image, do_resize=True, do_convert_rgb=True)["image_grid_hw"].tolist() == [[2, 2]]
    # The rescale / normalise switches are honoured (on the ViT pixels), no longer refused.
    unnormalised = processor.image_processor(image, do_normalize=False)["pixel_values"]
    torch.testing.assert_close(unnormalised * 2 - 1, processor.image_processor(image)["pixel_values"])


def test_vit_statistics_never_reach_the_vae_image(processor):
    """`image_mean` / `image_std` (at construction or per call) are ViT options: the VAE input stays in [-1, 1]."""
    image = random_image(64, 48, seed=2)  # a fixed point of the tiny VAE rule
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    custom = build_tiny_bagel_processor(image_mean=(0.1, 0.2, 0.3), image_std=(0.2, 0.2, 0.2)).image_processor
    for out in (custom(image), processor.image_processor(image, image_mean=0.9, image_std=0.1)):
        assert torch.equal(out["vae_pixel_values"][0], expected)
        assert not torch.equal(out["pixel_values"], processor.image_processor(image)["pixel_values"])


# ----------------------------------------------------------------------------------------------------------------
# Token layout and chat template
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer(processor):
    tokenizer, ids = build_tiny_bagel_tokenizer()
    assert ids["vocab_size"] == len(tokenizer)
    special = [ids[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")]
    special += [ids[k] for k in ("vision_start_token_id", "vision_end_token_id", "image_token_id")]
    assert len(set(special)) == 6 and max(special) < len(tokenizer)
    assert tokenizer.convert_ids_to_tokens(special) == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    ]  # fmt: skip
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("What color is the cat?")) == [
        "What", "Ġcolor", "Ġis", "Ġthe", "Ġcat", "?",
    ]  # fmt: skip
    for text in ("Zebra-crossing 42 ✓ Ünïcödé 世界", "  two  spaces\nnewline"):
        assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level: any text round-trips
    assert tokenizer.pad_token_id == ids["pad_token_id"] and tokenizer.eos_token_id == ids["eos_token_id"]
    assert build_tiny_bagel_tokenizer()[0].get_vocab() == tokenizer.get_vocab()  # deterministic
    assert processor.image_token_id == ids["image_token_id"]


def test_chat_template_exact_ids(processor):
    # the call of the issue, verbatim (transformers logs that `padding` belongs in `processor_kwargs`; it still works)
    out = processor.apply_chat_template(
        chat(random_image(64, 48), "Describe the image."),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding=True,
    )
    _, ids = build_tiny_bagel_tokenizer()
    # `Describe`, ` the`, ` image`, `.` are single tokens of the tiny vocabulary
    text_ids = processor.tokenizer.convert_tokens_to_ids(["Describe", "Ġthe", "Ġimage", "."])
    expected = (
        [ids["vision_start_token_id"]] + [ids["image_token_id"]] * 12 + [ids["vision_end_token_id"]]  # 3x4 grid
        + [ids["bos_token_id"]] + text_ids + [ids["eos_token_id"]]
        + [ids["bos_token_id"]]  # generation prompt: upstream seeds decoding with <|im_start|>
    )  # fmt: skip
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert out["image_grid_hw"].tolist() == [[3, 4]]


def test_multi_turn_roles_map_to_role_free_segments(processor):
    image = random_image(40, 40)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": image}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "What color?"},
    ]
    out = apply_template(processor, conversation)
    expected = (
        segment(processor, "Be brief.") + segment(processor, "Look:") + image_block(processor, 4)
        + segment(processor, "A cat.") + segment(processor, "What color?") + [processor.im_start_token_id]
    )  # fmt: skip
    assert out["input_ids"][0].tolist() == expected
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>Be brief.<|im_end|><|im_start|>Look:<|im_end|><|image_pad|><|im_start|>A cat.<|im_end|>"
        "<|im_start|>What color?<|im_end|><|im_start|>"
    )


def test_assistant_tokens_mask_marks_the_generated_part(processor):
    # Text only: transformers 5.17 does not shift the mask past expanded image placeholders (5.23 does).
    conversation = [
        {"role": "user", "content": "What color?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    out = apply_template(processor, conversation, return_assistant_tokens_mask=True)
    # its text and the <|im_end|> that stopped decoding, not the <|im_start|> seed that belongs to the prompt
    masked = out["input_ids"][0][out["assistant_masks"][0].bool()].tolist()
    assert masked == encode(processor, "A cat.") + [processor.im_end_token_id]


def test_continue_final_message_prefills_the_answer(processor):
    conversation = chat(random_image(40, 40), "What color?") + [{"role": "assistant", "content": "It is"}]
    out = apply_template(processor, conversation, add_generation_prompt=False, continue_final_message=True)
    assert out["input_ids"][0].tolist()[-1 - len(encode(processor, "It is")) :] == (
        [processor.im_start_token_id] + encode(processor, "It is")
    )


def test_text_only_chat_has_no_image_inputs(processor):
    out = apply_template(processor, [{"role": "user", "content": "Hello"}])
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    assert out["input_ids"][0].tolist() == segment(processor, "Hello") + [processor.im_start_token_id]


def test_unsupported_content_type_raises(processor):
    conversation = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}]
    with pytest.raises(ValueError, match="conversation"):
        processor.apply_chat_template(conversation, tokenize=True)


def test_placeholder_count_equals_sum_of_grids(processor):
    images = [random_image(64, 48), random_image(40, 40), random_image(30, 60)]
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
                                      {"type": "text", "text": "Compare."}]}],
        chat(images[2], "What is this?"),
    ]  # fmt: skip
    out = apply_template(processor, conversations)
    grids = out["image_grid_hw"]
    ids = out["input_ids"]
    assert grids.shape == (3, 2)
    assert (ids == processor.image_token_id).sum().item() == grids.prod(-1).sum().item()
    assert (ids == processor.vision_start_token_id).sum(-1).tolist() == [2, 1]
    assert (ids == processor.vision_end_token_id).sum(-1).tolist() == [2, 1]
    assert out["pixel_values"].shape[0] == out["image_position_ids"].shape[0] == grids.prod(-1).sum().item()
    # image order: row-major over the batch, then within a row
    assert grids.tolist() == [list(processor.image_processor.vit_grid(im.height, im.width)) for im in images]


def test_left_padding_batch_of_two_equals_singles(processor):
    first, second = chat(random_image(64, 48), "Describe the image."), chat(random_image(40, 40), "What color?")
    batch = apply_template(processor, [first, second])
    singles = [apply_template(processor, first), apply_template(processor, second)]
    length = batch["input_ids"].shape[1]
    for row, single in enumerate(singles):
        n = single["input_ids"].shape[1]
        assert batch["input_ids"][row, length - n :].tolist() == single["input_ids"][0].tolist()
        assert batch["attention_mask"][row].tolist() == [0] * (length - n) + [1] * n
        assert (batch["input_ids"][row, : length - n] == processor.tokenizer.pad_token_id).all()
    assert batch["attention_mask"][1, 0] == 0  # the shorter row is padded on the left
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in singles]))
    assert torch.equal(batch["image_position_ids"], torch.cat([s["image_position_ids"] for s in singles]))
    assert batch["vae_image_hw"].tolist() == [[48, 64], [32, 32]]
    assert torch.equal(batch["vae_pixel_values"][1, :, :32, :32], singles[1]["vae_pixel_values"][0])


def test_processor_call_expands_placeholders(processor):
    image = random_image(64, 48)
    prompt = "{}<|im_start|>What color?<|im_end|><|im_start|>"
    bare = processor(images=[image], text=prompt.format("<|image_pad|>"), return_tensors="pt")
    qwen_style = processor(images=image, text=prompt.format("<|vision_start|><|image_pad|><|vision_end|>"))
    assert bare["input_ids"][0].tolist() == qwen_style["input_ids"][0] == (
        image_block(processor, 12) + segment(processor, "What color?") + [processor.im_start_token_id]
    )
    assert len(encode(processor, "the cat is")) == 3
    right = processor(text=["a", "the cat is"], padding=True, padding_side="right", return_tensors="pt")
    assert right["attention_mask"][0].tolist() == [1, 0, 0]
    left = processor(text=["a", "the cat is"], padding=True, return_tensors="pt")
    assert left["attention_mask"][0].tolist() == [0, 0, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"text": "no placeholder", "images": "IMAGE"}, "placeholder"),
        ({"text": "<|image_pad|> twice <|image_pad|>", "images": "IMAGE"}, "placeholder"),
        ({"text": "<|image_pad|>"}, "placeholder"),
        ({"text": 3}, "text"),
        ({"text": "hi", "videos": ["clip"]}, "videos"),
        ({}, "text"),
    ],
)
def test_processor_bad_calls(processor, kwargs, match):
    kwargs = {k: random_image(40, 40) if v == "IMAGE" else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        processor(**kwargs)


def test_processor_requires_bagel_special_tokens():
    from transformers import Qwen2Tokenizer

    plain = Qwen2Tokenizer(vocab={"a": 0, "<|endoftext|>": 1}, merges=[])
    with pytest.raises(ValueError, match="tokenizer"):
        G2TRBagelProcessor(image_processor=G2TRBagelImageProcessor(), tokenizer=plain)


def test_num_multimodal_tokens(processor):
    data = processor._get_num_multimodal_tokens(image_sizes=[(48, 64), (40, 40)])
    assert data.num_image_patches == [12, 4] and data.num_image_tokens == [14, 6]


# ----------------------------------------------------------------------------------------------------------------
# What the image-text-to-text pipeline calls
# ----------------------------------------------------------------------------------------------------------------


def test_pipeline_preprocess_and_postprocess_calls(processor):
    conversation = chat(random_image(64, 48), "What color?")
    # ImageTextToTextPipeline.preprocess (chat): exactly these arguments, then `.to(dtype=model dtype)`
    inputs = processor.apply_chat_template(
        conversation,
        continue_final_message=False,
        return_tensors="pt",
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        processor_kwargs={},
    ).to(dtype=torch.bfloat16)
    assert inputs["pixel_values"].dtype == inputs["vae_pixel_values"].dtype == torch.bfloat16
    assert inputs["input_ids"].dtype == inputs["image_position_ids"].dtype == torch.long
    assert set(processor.model_input_names) >= set(inputs.keys())
    assert processor.chat_template is not None  # the pipeline warns about non-chat input only then

    # postprocess: decode prompt and prompt + answer the same way, strip the prompt
    answer = encode(processor, " red") + [processor.im_end_token_id]
    generated = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
    decoded_full = processor.post_process_image_text_to_text(generated, skip_special_tokens=True)
    decoded_prompt = processor.post_process_image_text_to_text(inputs["input_ids"], skip_special_tokens=True)
    assert decoded_prompt == ["What color?"]
    assert decoded_full[0].startswith(decoded_prompt[0]) and decoded_full[0][len(decoded_prompt[0]) :] == " red"


class _EchoConfig(PreTrainedConfig):
    model_type = "g2tr_test_bagel_echo"
    vocab_size: int = 8
    answer_token_id: int = 0
    num_hidden_layers: int = 1


class _EchoModel(PreTrainedModel, GenerationMixin):
    """Greedy stand-in for the real model: answers one fixed token, then `<|im_end|>`; records its inputs."""

    config_class = _EchoConfig

    def __init__(self, config):
        super().__init__(config)
        self.unused = nn.Parameter(torch.zeros(1))
        self.calls = []
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_position_ids=None,
                image_grid_hw=None, vae_pixel_values=None, vae_image_hw=None, **kwargs):  # fmt: skip
        self.calls.append({"input_ids": input_ids, "pixel_values": pixel_values, "image_grid_hw": image_grid_hw})
        batch, length = input_ids.shape
        answered = input_ids[:, -1] == self.config.answer_token_id
        next_ids = torch.where(answered, self.config.eos_token_id, self.config.answer_token_id)
        logits = torch.full((batch, length, self.config.vocab_size), -1e4)
        logits[torch.arange(batch), -1, next_ids] = 0.0
        return CausalLMOutputWithPast(logits=logits)


def test_image_text_to_text_pipeline_end_to_end(processor):
    _, ids = build_tiny_bagel_tokenizer()
    config = _EchoConfig(
        vocab_size=ids["vocab_size"],
        answer_token_id=processor.tokenizer.convert_tokens_to_ids("Ġred"),
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        bos_token_id=ids["bos_token_id"],
        use_cache=False,
    )
    model = _EchoModel(config).eval()
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    conversation = chat(random_image(64, 48), "What color is the image?")
    assert pipe(text=conversation, max_new_tokens=4, return_full_text=False) == [
        {"input_text": conversation, "generated_text": " red"}
    ]
    first = model.calls[0]
    assert first["image_grid_hw"].tolist() == [[3, 4]] and first["pixel_values"].shape == (12, 588)
    assert first["input_ids"][0, -1].item() == ids["bos_token_id"]  # generation prompt
    full = pipe(text=conversation, max_new_tokens=4)
    assert full[0]["generated_text"][-1] == {"role": "assistant", "content": " red"}


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json", "processing_bagel.py"} <= files
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_bagel.G2TRBagelProcessor"
    assert config["image_processor"]["auto_map"]["AutoImageProcessor"] == "processing_bagel.G2TRBagelImageProcessor"
    assert config["image_processor"]["vit_max_num_patch_per_side"] == 8

    loaded = G2TRBagelProcessor.from_pretrained(tmp_path)
    assert type(loaded.image_processor) is G2TRBagelImageProcessor
    assert loaded.chat_template == BAGEL_CHAT_TEMPLATE and loaded.tokenizer.padding_side == "left"
    conversations = [chat(random_image(64, 48), "Describe the image."), chat(random_image(40, 40), "What?")]
    expected, actual = apply_template(processor, conversations), apply_template(loaded, conversations)
    assert expected.keys() == actual.keys() and _outputs_equal(expected, actual)


def test_remote_code_load_without_g2tr_hf(processor, tmp_path):
    """AutoProcessor(trust_remote_code=True) from the saved folder in a process that never imports g2tr_hf."""
    processor.save_pretrained(tmp_path / "repo")
    image = np.asarray(random_image(64, 48))
    np.save(tmp_path / "image.npy", image)
    expected = apply_template(processor, chat(PIL.Image.fromarray(image), "What color?"))["input_ids"][0].tolist()
    script = """
        import json, sys
        import numpy as np, PIL.Image
        from transformers import AutoImageProcessor, AutoProcessor
        folder, image_path = sys.argv[1], sys.argv[2]
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        try:
            image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        except ImportError:  # transformers 5.17 without torchvision: AutoImageProcessor is a placeholder
            image_processor = processor.image_processor
        assert type(image_processor).__name__ == "G2TRBagelImageProcessor"
        assert image_processor.vit_max_num_patch_per_side == 8
        assert "g2tr_hf" not in sys.modules
        image = PIL.Image.fromarray(np.load(image_path))
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "What color?"}]}]
        out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        print("RESULT " + json.dumps({"module": type(processor).__module__,
                                      "image_module": type(processor.image_processor).__module__,
                                      "ids": out["input_ids"][0].tolist()}))
        """
    report = run_without_g2tr_hf(script, tmp_path / "repo", tmp_path / "image.npy", workdir=tmp_path)
    assert report["module"].startswith("transformers_modules") and report["image_module"] == report["module"]
    assert report["ids"] == expected

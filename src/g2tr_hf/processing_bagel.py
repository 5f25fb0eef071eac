"""BAGEL-7B-MoT pre-processing: the image processor (both official resize rules), the processor and its chat template.

What the official inferencer (ByteDance-Seed/Bagel `inferencer.py`, `data/transforms.py`, `data/data_utils.py`) does
to one input image, and what this file reproduces:

1. convert to RGB (RGBA, or any image carrying a `transparency` entry, is composited onto white; every other mode
   goes through PIL's `convert("RGB")`);
2. resize with the VAE rule (long edge <= 1024, short edge >= 512, both sides multiples of 16), bicubic;
3. the VAE input is that image put through the VAE transform again (a no-op resize in practice), as `[-1, 1]`;
4. the ViT input is the VAE-resized image put through the ViT rule (long edge <= 980, short edge >= 224, multiples
   of 14), bicubic, as `[-1, 1]`, cut into 14x14 patches flattened in (patch_row, patch_col, channel) order, with the
   2-D position id `row * 70 + col` of every patch.

Both resizes run on 8-bit PIL images exactly like the official code (the official transforms receive PIL images, so
torchvision hands the resize to `PIL.Image.resize(..., BICUBIC)`, which always filters with the full kernel support,
i.e. antialiases when shrinking), so the pixels match upstream bit for bit on PIL inputs.

The text layout has no chat roles (upstream has no chat template): every text is `<|im_start|> text <|im_end|>`,
every image is `<|vision_start|> N x <|image_pad|> <|vision_end|>` with N the number of ViT patches, and decoding
is seeded with `<|im_start|>`. The processor always emits the full N: the model owns the token budget and drops the
slots of the tokens that G2TR removes.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from tokenizers import models, pre_tokenizers
from transformers import Qwen2Tokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs, MultiModalData, ProcessingKwargs, ProcessorMixin

from .image_utils import (
    ImageFetchMixin,
    STANDARD_IMAGE_KWARGS,
    VAE_PIXELS,
    KwargTypeError,
    PixelOptions,
    check_content_items,
    check_placeholder_count,
    composite_on_white,
    flatten_images,
    plain_conversation,
    resolve_image_kwargs,
    to_pil_image,
    to_pixel_array,
)


__all__ = [
    "BAGEL_CHAT_TEMPLATE",
    "G2TRBagelImageProcessor",
    "G2TRBagelProcessor",
    "bagel_resize_output_size",
    "build_tiny_bagel_processor",
    "build_tiny_bagel_tokenizer",
]

# Qwen2.5 special tokens that BAGEL uses. Their ids in the real tokenizer: 151643, 151644, 151645,
# 151652, 151653 and 151655.
PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IMAGE_TOKEN = "<|image_pad|>"

# Pixel budget of the official `MaxLongEdgeMinShortEdgeResize` (transforms.py); it only bites on very elongated images.
OFFICIAL_MAX_PIXELS = 14 * 14 * 9 * 1024

# Role-free layout of the official inferencer. Every text item of every message (system, user or assistant) is one
# `<|im_start|> text <|im_end|>` segment, every image item one `<|image_pad|>` placeholder that the processor expands
# into the whole image block (markers included), in the order they appear. The template emits the bare placeholder so
# that character offsets of the rendered prompt stay valid for `return_assistant_tokens_mask`. The assistant
# text is wrapped in `{% generation %}` from after its `<|im_start|>` (upstream's decoding seed, part of the prompt)
# to its `<|im_end|>` (the token that ends decoding), so `return_assistant_tokens_mask=True` marks what the model
# generated.
BAGEL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set items = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}"
    "{%- set items = message['content'] -%}"
    "{%- endif -%}"
    "{%- for item in items -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{- '<|image_pad|>' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>' -}}{%- generation -%}{{- item['text'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + item['text'] + '<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- raise_exception('BAGEL chat messages accept only \"text\" and \"image\" content items, got \"' "
    "+ item['type'] + '\"') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>' -}}{%- endif -%}"
)


# ----------------------------------------------------------------------------------------------------------------
# The official resize rule
# ----------------------------------------------------------------------------------------------------------------


def _round_to_stride(value: int, stride: int) -> int:
    """Nearest multiple of `stride` (Python's half-to-even `round`, as upstream), never below `stride`."""
    return max(stride, int(round(value / stride) * stride))


def _scale_to_stride(height: int, width: int, scale: float, stride: int) -> tuple[int, int]:
    # Two roundings, both half-to-even: the scaled side to whole pixels, then that to the stride.
    return _round_to_stride(round(height * scale), stride), _round_to_stride(round(width * scale), stride)


def bagel_resize_output_size(
    height: int,
    width: int,
    *,
    max_size: int,
    min_size: int,
    stride: int,
    max_pixels: int = OFFICIAL_MAX_PIXELS,
) -> tuple[int, int]:
    """Output size `(height, width)` of BAGEL's `MaxLongEdgeMinShortEdgeResize`.

    1. One scale for both sides: shrink the long edge to `max_size` if it is longer (never enlarge for that), but
       enlarge so that the short edge reaches `min_size` if it is shorter (this wins: tiny images are upscaled).
    2. Each side becomes `round(side * scale)` and then the nearest multiple of `stride` (at least `stride`), both
       with Python's banker's rounding: for 1024x768 the ViT side 735 = 52.5 * 14 becomes 728, not 742.
    3. If that exceeds `max_pixels`, both sides are scaled again by `max_pixels / area` (a ratio of areas applied to
       sides, as upstream) and re-rounded; then, if the long edge still exceeds `max_size`, it is scaled down to it
       and re-rounded. Only very elongated images reach step 3: a 500x4000 image becomes 128x1024 for the VAE.

    The computation uses Python floats in the same order as upstream so the results agree exactly.
    """
    scale = max(min(max_size / max(height, width), 1.0), min_size / min(height, width))
    new_height, new_width = _scale_to_stride(height, width, scale, stride)
    if new_height * new_width > max_pixels:
        new_height, new_width = _scale_to_stride(new_height, new_width, max_pixels / (new_height * new_width), stride)
    if max(new_height, new_width) > max_size:
        new_height, new_width = _scale_to_stride(new_height, new_width, max_size / max(new_height, new_width), stride)
    return new_height, new_width


# ----------------------------------------------------------------------------------------------------------------
# Input conversion: PIL / numpy / torch -> one 8-bit RGB PIL image
# ----------------------------------------------------------------------------------------------------------------


def to_rgb_pil(image: Any, argument_name: str = "images", channels_first: bool | None = None) -> PIL.Image.Image:
    """One input image (PIL in any mode, numpy HWC/HW, torch CHW/HW, path) as an 8-bit RGB PIL image, as upstream
    sees it: RGBA (or a `transparency` entry) composited on white, other modes converted (`pil_img2rgb`).
    `channels_first` states the layout of arrays (`input_data_format`); None detects it."""
    image = to_pil_image(image, argument_name, channels_first)
    try:
        return composite_on_white(image)
    except ValueError as error:
        raise ValueError(f"`{argument_name}`: {error}") from error


# ----------------------------------------------------------------------------------------------------------------
# Tensors for the model
# ----------------------------------------------------------------------------------------------------------------


def _pil_to_normalized_tensor(image: PIL.Image.Image, options: PixelOptions = VAE_PIXELS) -> torch.Tensor:
    """`ToTensor` + `Normalize` of the official transform: uint8 HWC -> float32 [3, H, W], `(x / 255 - mean) / std`
    with the defaults (mean = std = 0.5, i.e. [-1, 1]); `options` carries a call's rescale / normalise options."""
    return torch.from_numpy(to_pixel_array(image, options))


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`[C, H, W]` -> `[(H / p) * (W / p), p * p * C]`: patches row-major, each flattened as (p_row, p_col, channel)."""
    channels, height, width = image.shape
    p = patch_size
    patches = image.reshape(channels, height // p, p, width // p, p).permute(1, 3, 2, 4, 0)
    return patches.reshape((height // p) * (width // p), p * p * channels)


def flattened_position_ids(grid_height: int, grid_width: int, max_patches_per_side: int) -> torch.Tensor:
    """`[h * w]` ids `row * max_patches_per_side + col` ("extrapolate": the top-left sub-grid of the table)."""
    rows = torch.arange(grid_height, dtype=torch.long)[:, None]
    cols = torch.arange(grid_width, dtype=torch.long)[None, :]
    return (rows * max_patches_per_side + cols).flatten()


def _pad_bottom_right(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack `[3, H_i, W_i]` images into `[n, 3, H_max, W_max]`, zero-padded at the bottom and on the right."""
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for index, image in enumerate(images):
        batch[index, :, : image.shape[1], : image.shape[2]] = image
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Image processor
# ----------------------------------------------------------------------------------------------------------------


# No `from __future__ import annotations` in this file: transformers reads these TypedDict annotations at runtime.
class G2TRBagelImagesKwargs(ImagesKwargs, total=False):
    r"""
    vae_max_size (`int`): longest edge of the VAE image (official 1024).
    vae_min_size (`int`): shortest edge of the VAE image (official 512).
    vae_stride (`int`): VAE image sides are multiples of this (official 16 = VAE downsample 8 x latent patch 2).
    vit_max_size (`int`): longest edge of the ViT image (official 980).
    vit_min_size (`int`): shortest edge of the ViT image (official 224).
    vit_patch_size (`int`): ViT patch size and stride of the ViT sides (official 14).
    vit_max_num_patch_per_side (`int`): row stride of the 2-D position ids (official 70); must equal the model
        config's `vit_max_num_patch_per_side`.
    max_pixels (`int`): pixel budget of the official resize (14 * 14 * 9 * 1024).
    vit_from_vae_image (`bool`): apply the VAE resize before the ViT resize, as the official inferencer does
        (default). `False` resizes the input directly with the ViT rule, as upstream's `Bagel.chat` shortcut does.
    """

    vae_max_size: int
    vae_min_size: int
    vae_stride: int
    vit_max_size: int
    vit_min_size: int
    vit_patch_size: int
    vit_max_num_patch_per_side: int
    max_pixels: int
    vit_from_vae_image: bool


_SETTING_NAMES = tuple(
    name for name in G2TRBagelImagesKwargs.__annotations__ if name not in ImagesKwargs.__annotations__
)
# Where the geometry is set, for the errors about `size`, `do_resize` & co.
_GEOMETRY = (
    "the official resize rules size every image (their bounds are the `vae_*` / `vit_*` settings, e.g. "
    "`vit_max_size`, `vit_min_size`, `vae_max_size`, `vae_min_size`)"
)


class G2TRBagelImageProcessor(ImageFetchMixin, PilBackend):
    r"""
    Image processor of BAGEL-7B-MoT (PIL backend, no torchvision needed) that reproduces the official inferencer's
    transforms exactly: RGB conversion, the VAE resize, then the ViT resize of the VAE-resized image (module
    docstring and `bagel_resize_output_size`).

    Accepts PIL images in any mode, numpy arrays `(H, W)` / `(H, W, C)` and torch tensors `(C, H, W)` / `(H, W)`
    (1, 3 or 4 channels; 4 = RGBA composited on white; uint8, or floats in [0, 1]), single or in (nested) lists;
    4-D arrays are batches. Returns, for the images in order of appearance (`T` = total ViT patches):

    - `pixel_values` float32 `[T, 3 * p * p]`: ViT patches, row-major per image, each in (p_row, p_col, channel)
      order, in [-1, 1];
    - `image_position_ids` int64 `[T]`: `row * vit_max_num_patch_per_side + col`;
    - `image_grid_hw` int64 `[num_images, 2]`: ViT grid `(h_v, w_v)` per image;
    - `vae_pixel_values` float32 `[num_images, 3, H_max, W_max]`: VAE images in [-1, 1], zero-padded bottom/right;
    - `vae_image_hw` int64 `[num_images, 2]`: each VAE image's own `(H, W)` (multiples of `vae_stride`).

    These are torch tensors whatever `return_tensors` says (a packed layout has no list form); `"np"` converts them.

    **Options** (per call, at construction, or through the processor): the model-specific settings of
    `G2TRBagelImagesKwargs`, and the standard ones of transformers' `ImagesKwargs` exactly as in the InternVL-U
    image processor (`image_utils.resolve_image_kwargs`): `do_rescale`, `rescale_factor`, `do_normalize`,
    `image_mean` and `image_std` change the ViT pixels only (the VAE pixels always map [0, 255] to [-1, 1], the
    generation-side input); `resample` and `input_data_format` apply to both; `do_resize=False`, `size`,
    `do_center_crop=True` and the like raise `ValueError`, since the grids follow the official rules.
    """

    valid_kwargs = G2TRBagelImagesKwargs
    model_input_names = ["pixel_values", "image_position_ids", "image_grid_hw", "vae_pixel_values", "vae_image_hw"]

    resample = PILImageResampling.BICUBIC
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    vae_max_size = 1024
    vae_min_size = 512
    vae_stride = 16
    vit_max_size = 980
    vit_min_size = 224
    vit_patch_size = 14
    vit_max_num_patch_per_side = 70
    max_pixels = OFFICIAL_MAX_PIXELS
    vit_from_vae_image = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._check_settings({name: getattr(self, name) for name in _SETTING_NAMES})
        resolve_image_kwargs(self, {}, geometry=_GEOMETRY)  # standard options given at construction, checked now

    @staticmethod
    def _check_settings(settings: dict[str, Any]) -> None:
        """Raise `ValueError` naming the setting when the resize rules cannot produce a valid grid."""
        for name, value in settings.items():
            if name == "vit_from_vae_image":
                if not isinstance(value, bool):
                    raise ValueError(f"`vit_from_vae_image` must be a bool, got {value!r}.")
            elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        for prefix, stride_name in (("vae", "vae_stride"), ("vit", "vit_patch_size")):
            max_size, min_size, stride = (
                settings[f"{prefix}_max_size"],
                settings[f"{prefix}_min_size"],
                settings[stride_name],
            )
            if min_size > max_size:
                raise ValueError(f"`{prefix}_min_size` ({min_size}) must not exceed `{prefix}_max_size` ({max_size}).")
            if max_size % stride:
                # Otherwise the final clip of the resize rule can round the long edge back above the maximum.
                raise ValueError(f"`{prefix}_max_size` ({max_size}) must be a multiple of `{stride_name}` ({stride}).")
        side = settings["vit_max_size"] // settings["vit_patch_size"]
        if side > settings["vit_max_num_patch_per_side"]:
            raise ValueError(
                f"`vit_max_num_patch_per_side` ({settings['vit_max_num_patch_per_side']}) must be at least "
                f"`vit_max_size // vit_patch_size` ({side}), or position ids would run off the table."
            )

    def _resolve_settings(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The model-specific settings of one call (`_SETTING_NAMES`), plus `"pixels"`: its standard options."""
        unknown = [key for key in kwargs if key not in _SETTING_NAMES and key not in STANDARD_IMAGE_KWARGS]
        if unknown:
            raise ValueError(
                f"Unknown image processor argument(s) {unknown}; valid ones: {sorted(_SETTING_NAMES)} and the "
                "standard options of transformers' `ImagesKwargs` (see `image_utils.resolve_image_kwargs`)."
            )
        settings = {
            name: kwargs[name] if kwargs.get(name) is not None else getattr(self, name) for name in _SETTING_NAMES
        }
        self._check_settings(settings)
        standard = {key: value for key, value in kwargs.items() if key in STANDARD_IMAGE_KWARGS}
        settings["pixels"] = resolve_image_kwargs(self, standard, geometry=_GEOMETRY)
        return settings

    def vae_size(self, height: int, width: int, **kwargs) -> tuple[int, int]:
        """`(H, W)` of the VAE image for an input of `height` x `width` (the VAE rule applied twice, as upstream)."""
        settings = self._resolve_settings(kwargs)
        size = (height, width)
        for _ in range(2):
            size = bagel_resize_output_size(*size, **self._rule(settings, "vae"))
        return size

    def vit_grid(self, height: int, width: int, **kwargs) -> tuple[int, int]:
        """ViT grid `(h_v, w_v)` for an input of `height` x `width`; the image holds `h_v * w_v` tokens."""
        settings = self._resolve_settings(kwargs)
        if settings["vit_from_vae_image"]:
            height, width = bagel_resize_output_size(height, width, **self._rule(settings, "vae"))
        vit_height, vit_width = bagel_resize_output_size(height, width, **self._rule(settings, "vit"))
        return vit_height // settings["vit_patch_size"], vit_width // settings["vit_patch_size"]

    @staticmethod
    def _rule(settings: dict[str, Any], prefix: str) -> dict[str, int]:
        stride = settings["vae_stride"] if prefix == "vae" else settings["vit_patch_size"]
        return {
            "max_size": settings[f"{prefix}_max_size"],
            "min_size": settings[f"{prefix}_min_size"],
            "stride": stride,
            "max_pixels": settings["max_pixels"],
        }

    def _resize_with_rule(self, image: PIL.Image.Image, settings: dict[str, Any], prefix: str) -> PIL.Image.Image:
        """Resize with the `prefix` ("vae" / "vit") rule; to the current size this is an identical copy, as upstream."""
        height, width = bagel_resize_output_size(image.height, image.width, **self._rule(settings, prefix))
        return image.resize((width, height), resample=settings["pixels"].resample)

    def _official_transforms(self, image: Any, settings: dict[str, Any]) -> tuple[PIL.Image.Image, PIL.Image.Image]:
        """One input image -> (VAE image, ViT image) as 8-bit RGB PIL images, in the inferencer's order."""
        rgb = to_rgb_pil(image, channels_first=settings["pixels"].channels_first)
        pre_resized = self._resize_with_rule(rgb, settings, "vae")
        # The editing path puts the pre-resized image through the whole VAE transform again (a no-op resize).
        vae_image = self._resize_with_rule(pre_resized, settings, "vae")
        vit_image = self._resize_with_rule(pre_resized if settings["vit_from_vae_image"] else rgb, settings, "vit")
        return vae_image, vit_image

    def preprocess(self, images: Any, **kwargs) -> BatchFeature:
        """Run the official VAE and ViT transforms on `images`; see the class docstring for the outputs."""
        return_tensors = kwargs.get("return_tensors")
        settings = self._resolve_settings(kwargs)
        flat_images = flatten_images(images)
        if not flat_images:
            raise ValueError("`images` is empty: pass at least one image.")

        patch_size, side = settings["vit_patch_size"], settings["vit_max_num_patch_per_side"]
        vae_images, patches, position_ids, grids = [], [], [], []
        for image in flat_images:
            vae_image, vit_image = self._official_transforms(image, settings)
            grid = (vit_image.height // patch_size, vit_image.width // patch_size)
            # The call's rescale / normalise options are for the ViT; the VAE input stays in [-1, 1].
            vae_images.append(_pil_to_normalized_tensor(vae_image))
            patches.append(patchify(_pil_to_normalized_tensor(vit_image, settings["pixels"]), patch_size))
            position_ids.append(flattened_position_ids(*grid, side))
            grids.append(grid)

        data = {
            "pixel_values": torch.cat(patches),
            "image_position_ids": torch.cat(position_ids),
            "image_grid_hw": torch.tensor(grids, dtype=torch.long),
            "vae_pixel_values": _pad_bottom_right(vae_images),
            "vae_image_hw": torch.tensor([image.shape[1:] for image in vae_images], dtype=torch.long),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------


class G2TRBagelProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: G2TRBagelImagesKwargs
    _defaults = {"text_kwargs": {"padding": False}}


class G2TRBagelProcessor(ProcessorMixin):
    r"""
    BAGEL processor: `G2TRBagelImageProcessor` + the Qwen2.5 tokenizer + a chat template with the official token
    layout. Works with `apply_chat_template(..., tokenize=True, return_dict=True)` and
    `pipeline("image-text-to-text", model=model, processor=processor)`.

    **Token layout** (upstream `prepare_prompts` / `prepare_vit_images`):

    - a text segment is `<|im_start|>` + `tokenizer.encode(text)` + `<|im_end|>`;
    - an image is `<|vision_start|>` + N x `<|image_pad|>` + `<|vision_end|>`, N = h_v * w_v of that image;
    - the generation prompt is a single `<|im_start|>` (upstream seeds decoding with it).

    **Chat roles.** Upstream has no chat template and no role tags; the inferencer takes an interleaved list of
    texts and images. A chat is mapped onto that list: the content items of all messages, in order, each text
    item one segment and each image item one image block, whatever the role. So a system prompt is a plain
    leading segment (what upstream's think mode does with its system prompt) and a user turn `[image, text]`
    becomes `[image block][<|im_start|> text <|im_end|>]`. An assistant turn is rendered the same way,
    `<|im_start|> answer <|im_end|>`: that is exactly what upstream's cache holds after it generated the answer
    from the `<|im_start|>` seed and stopped at `<|im_end|>` (and what it feeds back in think mode), so a
    multi-turn chat reads as the continuation of upstream's own decoding. A final assistant message with
    `continue_final_message=True` ends as `<|im_start|> partial answer` and decoding continues it.

    **Calling the processor directly.** `text` must contain `<|image_pad|>` (or Qwen's
    `<|vision_start|><|image_pad|><|vision_end|>`) exactly once per image, each expanded into the full image block;
    more images than placeholders (or fewer) is a `ValueError` naming both counts, as in the InternVL-U processor.
    Raw text is tokenized as given (wrap it yourself or use the chat template). Batches are LEFT padded with
    `<|endoftext|>` unless `padding_side` is given.

    **Image options** (`processor(..., do_normalize=False)`, `images_kwargs={...}`, or
    `apply_chat_template(..., processor_kwargs={...})`) reach `G2TRBagelImageProcessor`, which honours or refuses
    them exactly as the InternVL-U processor does (see `image_utils.resolve_image_kwargs`): rescale / normalise
    options change the ViT pixels only, never the [-1, 1] VAE pixels.

    The processor is ratio-agnostic: it always emits the full N; the model drops the slots of removed tokens.
    """

    valid_processor_kwargs = G2TRBagelProcessorKwargs

    image_token = IMAGE_TOKEN
    vision_start_token = VISION_START_TOKEN
    vision_end_token = VISION_END_TOKEN
    im_start_token = IM_START_TOKEN
    im_end_token = IM_END_TOKEN

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if image_processor is None:
            raise ValueError("`image_processor` is required (a G2TRBagelImageProcessor).")
        if tokenizer is None:
            raise ValueError(
                "`tokenizer` is required (the Qwen2.5 tokenizer of BAGEL, or build_tiny_bagel_tokenizer())."
            )
        if chat_template is None:
            chat_template = BAGEL_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        # Generation needs left padding; pipelines that batch read the side from the tokenizer itself.
        self.tokenizer.padding_side = "left"
        ids = {token: self._single_token_id(tokenizer, token) for token in self._special_tokens()}
        self.image_token_id = ids[self.image_token]
        self.vision_start_token_id = ids[self.vision_start_token]
        self.vision_end_token_id = ids[self.vision_end_token]
        self.im_start_token_id = ids[self.im_start_token]
        self.im_end_token_id = ids[self.im_end_token]
        # `<|vision_start|>` and `<|vision_end|>` belong to the image block for `mm_token_type_ids`.
        self.image_token_ids = [self.image_token_id, self.vision_start_token_id, self.vision_end_token_id]

    def _special_tokens(self) -> tuple[str, ...]:
        return (
            self.image_token,
            self.vision_start_token,
            self.vision_end_token,
            self.im_start_token,
            self.im_end_token,
        )

    @staticmethod
    def _single_token_id(tokenizer, token: str) -> int:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"`tokenizer` must know {token} as a single special token (BAGEL uses the Qwen2.5 ones).")
        return ids[0]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the tokenizer with `AutoTokenizer` and the image processor with this file's class.

        The base class would go through `AutoImageProcessor`, which needs a local registration or
        `trust_remote_code`; loading our own class directly makes `G2TRBagelProcessor.from_pretrained` work offline
        with neither, and under remote code it resolves to the same dynamic module as the processor.
        """
        subfolder = kwargs.pop("subfolder", "")
        path = pretrained_model_name_or_path
        tokenizer = cls._load_tokenizer_from_pretrained("tokenizer", path, subfolder=subfolder, **kwargs)
        image_processor = G2TRBagelImageProcessor.from_pretrained(path, subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """`ProcessorMixin.apply_chat_template` on `conversation` with its messages as plain dicts, after checking
        that every content item is text or an image.

        A conversation is one chat or a list of chats; a chat is a list of messages or a transformers `Chat`; a
        message is a dict, a dataclass or a pydantic model (transformers 5 message objects, e.g. huggingface_hub's
        `ChatCompletionInputMessage` or the OpenAI SDK's), on every supported transformers release.
        """
        conversation = plain_conversation(conversation)
        check_content_items(conversation, "BAGEL")
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def _merge_kwargs(self, *args, **kwargs) -> dict[str, dict]:
        """`ProcessorMixin._merge_kwargs`, with its keyword type errors (huggingface_hub's strict-dataclass errors,
        e.g. `rescale_factor=1` for a float) raised as `ValueError`, like every other refused option."""
        try:
            return super()._merge_kwargs(*args, **kwargs)
        except KwargTypeError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from error

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        r"""
        Tokenize `text` (a string or a list of strings, one per batch row) with each image placeholder expanded, and
        pre-process `images` (in order of their placeholders across the batch).

        Returns a `BatchFeature` with `input_ids` / `attention_mask` `[B, L]` (left padded when padding) and the image
        processor's outputs (`pixel_values` `[T, 588]`, `image_position_ids` `[T]`, `image_grid_hw` `[n, 2]`,
        `vae_pixel_values` `[n, 3, H_max, W_max]`, `vae_image_hw` `[n, 2]`).
        """
        if videos is not None or audio is not None:
            raise ValueError("BAGEL takes images and text only; `videos` and `audio` must be None.")
        if text is not None:
            text = self._collapse_image_blocks(text)
            self._check_placeholders(text, images)
        elif images is None:
            raise ValueError("Pass `text`, `images` or both.")
        if "padding_side" not in kwargs and "padding_side" not in kwargs.get("text_kwargs", {}):
            kwargs["padding_side"] = "left"
        return super().__call__(images=images, text=text, **kwargs)

    def _collapse_image_blocks(self, text: str | Sequence[str]) -> list[str]:
        """Accept Qwen-style `<|vision_start|><|image_pad|><|vision_end|>` as well as a bare placeholder."""
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not all(isinstance(sample, str) for sample in text):
            raise ValueError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")
        qwen_block = self.vision_start_token + self.image_token + self.vision_end_token
        return [sample.replace(qwen_block, self.image_token) for sample in text]

    def _check_placeholders(self, text: list[str], images: Any) -> None:
        num_placeholders = sum(sample.count(self.image_token) for sample in text)
        num_images = len(flatten_images(images)) if images is not None else 0
        check_placeholder_count(num_placeholders, num_images, placeholder=self.image_token)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The image block that replaces the `image_idx`-th placeholder: markers around h_v * w_v `<|image_pad|>`."""
        grid_height, grid_width = (int(v) for v in image_inputs["image_grid_hw"][image_idx])
        return self.vision_start_token + self.image_token * (grid_height * grid_width) + self.vision_end_token

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder counts for images of the given `(height, width)` sizes, without processing them.

        `num_image_patches` is h_v * w_v (the `<|image_pad|>` count); `num_image_tokens` adds the two markers.
        """
        vision_data = {}
        if image_sizes is not None:
            patches = [int(np.prod(self.image_processor.vit_grid(*size))) for size in image_sizes]
            vision_data = {"num_image_patches": patches, "num_image_tokens": [n + 2 for n in patches]}
        return MultiModalData(**vision_data)


# ----------------------------------------------------------------------------------------------------------------
# Tiny tokenizer and processor for tests and demos (built in code, no download)
# ----------------------------------------------------------------------------------------------------------------

_TINY_WORDS = (
    "a an the this that these there it is are was be of in on at to and or with for from by as "
    "what which who where how many much color colour image picture photo describe show tell me you i we "
    "yes no not one two three red green blue white black cat dog man woman person car tree sky "
    "question answer please look see What Describe Is How The"
).split()

_TINY_SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_TOKEN)


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE: the 256 byte symbols (so every text encodes), then merges that make each word of
    `_TINY_WORDS` a single token, bare and with its leading space (`Ġword`), then the special tokens.

    Each word is first encoded with the merges so far and its pieces are then joined left to right by new merges.
    New merges rank after all earlier ones, so they never change how an earlier word encodes.
    """
    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        for piece in (word, "Ġ" + word):
            tokens = [token.value for token in models.BPE(vocab, merges).tokenize(piece)]
            while len(tokens) > 1:
                merges.append((tokens[0], tokens[1]))
                vocab.setdefault(tokens[0] + tokens[1], len(vocab))
                tokens = [tokens[0] + tokens[1], *tokens[2:]]
    for token in _TINY_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab, merges


def build_tiny_bagel_tokenizer() -> tuple[Qwen2Tokenizer, dict[str, int]]:
    """A small Qwen2-style byte-level BPE tokenizer with BAGEL's special tokens, built in code (no download).

    Returns `(tokenizer, ids)` with `ids` holding the values a tiny model config needs: `vocab_size` (= len of the
    tokenizer), `pad_token_id` (`<|endoftext|>`), `bos_token_id` (`<|im_start|>`), `eos_token_id` (`<|im_end|>`),
    `vision_start_token_id`, `vision_end_token_id` and `image_token_id` (`<|image_pad|>`). Padding side is left.
    """
    vocab, merges = _tiny_vocab_and_merges()
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=IM_END_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(_TINY_SPECIAL_TOKENS[1:]),
        padding_side="left",
        model_max_length=32768,
    )
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        "bos_token_id": tokenizer.convert_tokens_to_ids(IM_START_TOKEN),
        "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END_TOKEN),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids(VISION_START_TOKEN),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids(VISION_END_TOKEN),
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    }
    return tokenizer, ids


def build_tiny_bagel_processor(vit_max_num_patch_per_side: int = 8, **image_processor_kwargs) -> G2TRBagelProcessor:
    """A processor with the tiny tokenizer and small image settings for tests (grids of at most 4x4 ViT patches).

    VAE rule 64 / 32 / stride 16 (VAE images 32..64 px, latent grids of 2..4 tokens per side, so a tiny config
    needs `max_latent_size >= 4`), ViT rule 56 / 28 / patch 14 (ViT grids of 2..4 per side).
    `vit_max_num_patch_per_side` (at least 4) must equal the tiny model config's value, since position ids are
    `row * side + col`: pass the config's value when the two are built together (the default 8 is the one of the
    tiny BAGEL config in the tests).
    """
    settings = {
        "vae_max_size": 64,
        "vae_min_size": 32,
        "vae_stride": 16,
        "vit_max_size": 56,
        "vit_min_size": 28,
        "vit_patch_size": 14,
        "vit_max_num_patch_per_side": vit_max_num_patch_per_side,
        **image_processor_kwargs,
    }
    tokenizer, _ = build_tiny_bagel_tokenizer()
    return G2TRBagelProcessor(image_processor=G2TRBagelImageProcessor(**settings), tokenizer=tokenizer)


G2TRBagelImageProcessor.register_for_auto_class("AutoImageProcessor")
G2TRBagelProcessor.register_for_auto_class("AutoProcessor")

"""Inputs shared by the processors: images, the standard image-processor options, chat messages.

Images. Accepted: PIL images in any mode; numpy arrays (H, W) or (H, W, C); torch tensors (C, H, W) or (H, W); C in
1, 3, 4; uint8, integers in [0, 255] or floats in [0, 1]; paths, URLs, `data:image/...` URIs and base64 strings
(`load_image_source`: URLs with a timeout, errors that name the input and the cause); nested lists of those, and
4-D arrays or tensors as batches.

Options. Both G2TR processors take the keyword arguments of transformers' `ImagesKwargs` through the same
`resolve_image_kwargs`, so they honour the same ones and refuse the same ones with the same errors (see there).

Chats. `plain_conversation` turns message objects (dataclasses, pydantic models, `Chat`) into plain dicts on every
transformers release, and `check_placeholder_count` is the one rule for images versus placeholders.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_utils import ChannelDimension
from transformers.processing_utils import ImagesKwargs


try:  # the error of transformers' keyword type checks (huggingface_hub's strict dataclasses)
    from huggingface_hub.errors import StrictDataclassError as KwargTypeError
except ImportError:  # pragma: no cover - older huggingface_hub
    KwargTypeError = TypeError


__all__ = [
    "DEFAULT_IMAGE_TIMEOUT",
    "DEFAULT_RESCALE_FACTOR",
    "ImageFetchMixin",
    "STANDARD_IMAGE_KWARGS",
    "VAE_PIXELS",
    "KwargTypeError",
    "PixelOptions",
    "check_content_items",
    "check_placeholder_count",
    "composite_on_white",
    "flatten_images",
    "load_image_source",
    "plain_conversation",
    "resolve_image_kwargs",
    "to_pil_image",
    "to_pixel_array",
]

_LEAF_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor, str)


def flatten_images(images: Any, argument_name: str = "images") -> list[Any]:
    """Flatten one image, (nested) lists of images and 4-D batches into a flat list, in order (None -> [])."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item, argument_name)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, _LEAF_TYPES):
        return [images]
    raise ValueError(
        f"`{argument_name}` must hold PIL images, numpy arrays (H, W[, C]), torch tensors (C, H, W) or image "
        f"paths/URLs, possibly in (nested) lists; got an object of type {type(images).__name__}."
    )


def _to_uint8(array: np.ndarray, argument_name: str) -> np.ndarray:
    """uint8 as is; integers in [0, 255]; floats in [0, 1] rounded to the nearest of 256 levels."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"`{argument_name}`: a floating-point image must hold finite values, got NaN or inf.")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(
                f"`{argument_name}`: a floating-point image must hold values in [0, 1]; got the range "
                f"[{array.min()}, {array.max()}]."
            )
        return np.rint(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"`{argument_name}`: an integer image must hold values in [0, 255]; got the range "
                f"[{array.min()}, {array.max()}]."
            )
        return array.astype(np.uint8)
    raise ValueError(f"`{argument_name}`: unsupported image dtype {array.dtype}; use uint8 or floats in [0, 1].")


def _array_to_pil(
    array: np.ndarray, channels_first: bool, argument_name: str, strict: bool = False
) -> PIL.Image.Image:
    """A 2-D or 3-D array with 1, 3 or 4 channels as a PIL image of mode L, RGB or RGBA.

    `channels_first` is the preferred layout (torch: CHW, numpy: HWC); the other is accepted when the preferred one
    does not fit, unless `strict` (the caller stated the layout with `input_data_format`).
    """
    if array.ndim == 3:
        first_fits, last_fits = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if strict and not (first_fits if channels_first else last_fits):
            layout = "(C, H, W)" if channels_first else "(H, W, C)"
            raise ValueError(
                f"`{argument_name}`: `input_data_format` says {layout} with 1, 3 or 4 channels, but an image has "
                f"the shape {tuple(array.shape)}."
            )
        if first_fits and (channels_first or not last_fits):
            array = np.moveaxis(array, 0, -1)
        elif not last_fits:
            raise ValueError(
                f"`{argument_name}`: cannot find the channel axis of an image of shape {tuple(array.shape)}; "
                "expected 1, 3 or 4 channels, (H, W, C) for numpy arrays and (C, H, W) for torch tensors."
            )
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(
            f"`{argument_name}`: an image array must have 2 or 3 dimensions (or 4 for a batch); got shape "
            f"{tuple(array.shape)}."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"`{argument_name}`: got an empty image of shape {tuple(array.shape)}.")
    return PIL.Image.fromarray(np.ascontiguousarray(_to_uint8(array, argument_name)))


# Seconds a URL may take to answer; `G2TR_HF_IMAGE_TIMEOUT` overrides it (a server that accepts the connection and
# never answers would otherwise hang a chat template forever).
DEFAULT_IMAGE_TIMEOUT = 30.0
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


def _image_timeout(timeout: float | None) -> float:
    if timeout is not None:
        return float(timeout)
    value = os.environ.get("G2TR_HF_IMAGE_TIMEOUT")
    try:
        return float(value) if value else DEFAULT_IMAGE_TIMEOUT
    except ValueError:
        raise ValueError(f"`G2TR_HF_IMAGE_TIMEOUT` must be a number of seconds, got {value!r}.") from None


def _fetch_url(url: str, argument_name: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http/https checked by caller)
            return response.read()
    except (TimeoutError, socket.timeout):
        raise ValueError(
            f"`{argument_name}`: {url} did not answer within {timeout:g} s (set `G2TR_HF_IMAGE_TIMEOUT` to wait "
            "longer)."
        ) from None
    except urllib.error.HTTPError as error:
        raise ValueError(f"`{argument_name}`: {url} answered HTTP {error.code} ({error.reason}).") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ValueError(f"`{argument_name}`: cannot reach {url}: {reason}.") from None


def load_image_source(source: str, argument_name: str = "images", timeout: float | None = None) -> PIL.Image.Image:
    """Read an image given as a string: an http(s) URL (fetched with a timeout: `timeout`, else the
    `G2TR_HF_IMAGE_TIMEOUT` environment variable, else 30 s), a `data:image/...;base64,` URI, a path, or a bare base64
    string. Every failure is a `ValueError` naming the input and the cause (no answer, unreachable host, missing file,
    not an image)."""
    shown = source if len(source) <= 120 else source[:117] + "..."
    if source.startswith(("http://", "https://")):
        data = _fetch_url(source, argument_name, _image_timeout(timeout))
        what = shown
    elif source.startswith("data:image/"):
        data, what = _decode_base64(source.split(",", 1)[-1], argument_name, "the data URI"), "the data URI"
    elif os.path.isfile(source):
        with open(source, "rb") as handle:
            data = handle.read()
        what = f"the file {shown}"
    elif len(source) >= 64 and _BASE64.fullmatch(source):
        data, what = _decode_base64(source, argument_name, "the base64 string"), "the base64 string"
    else:
        raise ValueError(f"`{argument_name}`: no such file: {shown!r} (expected a path, an http(s) URL or base64).")
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"`{argument_name}`: {what} is not a readable image ({error}).") from None
    return image


def _decode_base64(text: str, argument_name: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"`{argument_name}`: {what} is not valid base64 ({error}).") from None


class ImageFetchMixin:
    """For image processors: `fetch_images`, what transformers' `apply_chat_template` calls for images given as URLs
    or paths, goes through `load_image_source` (a timeout, clear errors) instead of transformers' `load_image`."""

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, str):
            return load_image_source(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)


def to_pil_image(image: Any, argument_name: str = "images", channels_first: bool | None = None) -> PIL.Image.Image:
    """One input image as a PIL image in its own mode (arrays give L, RGB or RGBA).

    `channels_first` is the layout of 3-D arrays and tensors when the caller states it (`input_data_format`);
    None detects it (numpy prefers (H, W, C), torch (C, H, W)). PIL images and paths have no layout to state.
    """
    if isinstance(image, str):
        image = load_image_source(image, argument_name)
    strict = channels_first is not None
    if isinstance(image, torch.Tensor):
        if image.is_complex():
            raise ValueError(f"`{argument_name}`: unsupported tensor dtype {image.dtype}.")
        image = image.detach().cpu()
        array = (image.float() if image.is_floating_point() else image).numpy()
        image = _array_to_pil(array, True if channels_first is None else channels_first, argument_name, strict)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, bool(channels_first), argument_name, strict)
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(
            f"`{argument_name}` must hold PIL images, numpy arrays, torch tensors or image paths/URLs; got "
            f"{type(image).__name__}."
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"`{argument_name}`: got an empty PIL image of size {image.size}.")
    return image


def composite_on_white(image: PIL.Image.Image, every_alpha_mode: bool = False) -> PIL.Image.Image:
    """An 8-bit RGB image with transparency flattened onto white.

    By default only RGBA images and images with a `transparency` entry are composited, the rest converted (BAGEL's
    upstream `pil_img2rgb`; LA/PA drop their alpha). `every_alpha_mode=True` composites any mode with alpha
    (transformers' `convert_to_rgb`).
    """
    if image.mode == "RGB":
        return image
    if image.mode == "RGBA" or image.info.get("transparency") is not None or (every_alpha_mode and "A" in image.mode):
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"cannot convert a PIL image of mode {image.mode} to RGB.") from error


# ----------------------------------------------------------------------------------------------------------------
# Standard image-processor options (transformers' `ImagesKwargs`), resolved the same way for both processors
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_RESCALE_FACTOR = 1 / 255
STANDARD_IMAGE_KWARGS = frozenset(ImagesKwargs.__annotations__)

# Steps both processors always run: only the value that keeps them on is accepted.
_ALWAYS_ON_STEPS = {
    "do_convert_rgb": "converts every image to RGB (transparency composited on white), since the ViT and the VAE "
    "take 3 channels",
    "do_resize": "resizes every image: {geometry}",
}
# Steps neither processor has: only the value that keeps them off is accepted.
_ABSENT_STEPS = {
    "do_center_crop": "never crops images: {geometry}",
    "do_pad": "never pads images (BAGEL pads its VAE batch itself and returns the sizes): {geometry}",
}
# Options that have no meaning for these processors: refused whenever they carry a value.
_REFUSED_OPTIONS = {
    "size": "{geometry}",
    "crop_size": "it never crops images",
    "pad_size": "it never pads images",
    "default_to_square": "it takes no `size` for this to apply to; {geometry}",
    "image_seq_length": "the number of image tokens is not an image option (BAGEL's follows each image's ViT grid; "
    "InternVL-U's is the processor's `image_seq_length`, set at construction to the model's value)",
    "device": "it computes on the CPU with PIL; move the outputs with `BatchFeature.to(device)`",
}


@dataclasses.dataclass(frozen=True)
class PixelOptions:
    """The options of one call, resolved: how ViT pixels are computed from an 8-bit RGB image (`do_rescale`,
    `rescale_factor`, `do_normalize`, `image_mean`, `image_std`), the filter of every resize (`resample`) and the
    stated layout of array inputs (`channels_first`, from `input_data_format`; None = detect)."""

    do_rescale: bool = True
    rescale_factor: float = DEFAULT_RESCALE_FACTOR
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = int(PIL.Image.Resampling.BICUBIC)
    channels_first: bool | None = None


# What the VAE side always uses: [0, 255] -> [0, 1] -> [-1, 1], whatever the call asks of the ViT pixels.
VAE_PIXELS = PixelOptions()


def _refuse(owner: str, name: str, value: Any, reason: str, accepted: str) -> ValueError:
    return ValueError(f"`{name}={value!r}` is not supported by {owner}: {reason}. Accepted: {accepted}.")


def _channel_triple(owner: str, name: str, value: Any, positive: bool) -> tuple[float, float, float]:
    """A number or a sequence of 1 or 3 finite numbers (> 0 for `image_std`) as 3 floats, one per RGB channel."""
    values = list(value) if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) else [value]
    numbers_ok = all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values)
    if not numbers_ok or len(values) not in (1, 3) or not all(math.isfinite(float(v)) for v in values):
        raise _refuse(owner, name, value, "it must give one value per RGB channel", "a finite number or 3 of them")
    if positive and not all(float(v) > 0 for v in values):
        raise _refuse(owner, name, value, "a standard deviation divides the pixels", "numbers > 0")
    floats = [float(v) for v in values]
    return tuple(floats * 3 if len(floats) == 1 else floats)


def _switch(owner: str, name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise _refuse(owner, name, value, "it is a switch", "True, False or None")
    return None if value is None else bool(value)


def _layout(owner: str, name: str, value: Any) -> str | None:
    if value is None:
        return None
    try:
        return ChannelDimension(value).value
    except ValueError:
        raise _refuse(owner, name, value, "unknown layout", '"channels_first", "channels_last" or None') from None


def resolve_image_kwargs(image_processor: Any, kwargs: Mapping[str, Any], *, geometry: str) -> PixelOptions:
    r"""Check one call's standard image-processor options (transformers' `ImagesKwargs`) and resolve them against
    the image processor's own attributes (the values it was built or loaded with). Both G2TR image processors call
    this, so they honour and refuse exactly the same options, with the same errors:

    - honoured, on the **ViT pixels only**: `do_rescale`, `rescale_factor` (`x * rescale_factor`; the default 1/255
      divides by 255, bit-exact with upstream), `do_normalize`, `image_mean`, `image_std` (`(x - mean) / std`; a
      number or one per RGB channel). The VAE pixels are the model's generation-side input and always map
      [0, 255] to [-1, 1];
    - honoured on **both** sides: `resample` (the PIL filter of every resize) and `input_data_format` (the layout of
      array and tensor inputs, `"channels_first"` or `"channels_last"`; detected when None), plus `return_tensors`,
      which the caller applies;
    - accepted only with the value the models need (anything else raises): `do_convert_rgb` and `do_resize` True
      (always done), `do_center_crop` and `do_pad` False (never done), `data_format` `"channels_first"` (the only
      output layout); `disable_grouping` has no effect on the output of any image processor and is accepted;
    - refused whenever given a value: `size`, `crop_size`, `pad_size`, `default_to_square` (the geometry is fixed by
      the model; `geometry` says where it is set), `image_seq_length`, `device`.

    Raises `ValueError` naming the option and what is accepted. Keys that are not standard options are the
    caller's business (its model-specific settings) and must not be passed here.
    """
    owner = type(image_processor).__name__
    unknown = sorted(set(kwargs) - STANDARD_IMAGE_KWARGS)
    if unknown:
        raise ValueError(f"{unknown} are not standard image-processor options (transformers' `ImagesKwargs`).")

    def given(name: str) -> Any:
        value = kwargs.get(name)
        return getattr(image_processor, name, None) if value is None else value

    for name, reason in _ALWAYS_ON_STEPS.items():
        if _switch(owner, name, given(name)) is False:
            raise _refuse(owner, name, False, reason.format(geometry=geometry), "True or None")
    for name, reason in _ABSENT_STEPS.items():
        if _switch(owner, name, given(name)):
            raise _refuse(owner, name, True, reason.format(geometry=geometry), "False or None")
    for name, reason in _REFUSED_OPTIONS.items():
        # `default_to_square` has a class default (True) in transformers: only a value passed per call counts.
        value = kwargs.get(name) if name == "default_to_square" else given(name)
        if value is not None:
            raise _refuse(owner, name, value, reason.format(geometry=geometry), "None (leave it out)")
    _switch(owner, "disable_grouping", kwargs.get("disable_grouping"))
    if _layout(owner, "data_format", given("data_format")) not in (None, ChannelDimension.FIRST.value):
        raise _refuse(
            owner,
            "data_format",
            given("data_format"),
            "the pixel values are channels-first (BAGEL's ViT patches are flattened as (row, column, channel))",
            '"channels_first" or None',
        )
    input_layout = _layout(owner, "input_data_format", given("input_data_format"))

    rescale_factor = given("rescale_factor")
    rescale_factor = DEFAULT_RESCALE_FACTOR if rescale_factor is None else rescale_factor
    if (
        not isinstance(rescale_factor, (int, float, np.number))
        or isinstance(rescale_factor, bool)
        or not math.isfinite(float(rescale_factor))
        or float(rescale_factor) <= 0
    ):
        raise _refuse(owner, "rescale_factor", rescale_factor, "it multiplies the pixels", "a finite number > 0")
    resample = given("resample")
    try:
        resample = int(PIL.Image.Resampling(int(resample)))
    except (TypeError, ValueError):
        filters = ", ".join(f"{int(f)} ({f.name.lower()})" for f in PIL.Image.Resampling)
        raise _refuse(owner, "resample", resample, "it is the PIL filter of the resizes", filters) from None
    do_rescale, do_normalize = _switch(owner, "do_rescale", given("do_rescale")), given("do_normalize")
    return PixelOptions(
        do_rescale=True if do_rescale is None else do_rescale,
        rescale_factor=float(rescale_factor),
        do_normalize=_switch(owner, "do_normalize", do_normalize) is not False,
        image_mean=_channel_triple(owner, "image_mean", given("image_mean"), positive=False),
        image_std=_channel_triple(owner, "image_std", given("image_std"), positive=True),
        resample=resample,
        channels_first=None if input_layout is None else input_layout == ChannelDimension.FIRST.value,
    )


def to_pixel_array(image: PIL.Image.Image, options: PixelOptions) -> np.ndarray:
    """An 8-bit RGB image as float32 `[3, H, W]`: `x * rescale_factor` if `do_rescale`, then `(x - mean) / std` per
    channel if `do_normalize` (transformers' order)."""
    pixels = np.asarray(image, dtype=np.float32)
    if options.do_rescale:
        if options.rescale_factor == DEFAULT_RESCALE_FACTOR:
            # Upstream's ToTensor divides by 255; `x * (1 / 255)` differs from that in the last bit for some
            # values, so the default factor divides and the pixels stay bit-identical to upstream.
            pixels = pixels / np.float32(255.0)
        else:
            pixels = (pixels.astype(np.float64) * options.rescale_factor).astype(np.float32)
    if options.do_normalize:
        mean = np.asarray(options.image_mean, dtype=np.float32)
        std = np.asarray(options.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


# ----------------------------------------------------------------------------------------------------------------
# Chats: message objects -> plain dicts, content items, placeholders versus images
# ----------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Mappings, dataclasses and pydantic models (recursively, through lists and tuples) as plain dicts; images,
    arrays, tensors and scalars are returned as they are (never copied)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Field by field rather than `dataclasses.asdict`, which deep-copies the images inside.
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models (e.g. the OpenAI SDK's messages)
        return _plain(value.model_dump())
    return value


def _is_chat(value: Any) -> bool:
    """transformers' `Chat` (what pipelines wrap a conversation in) or any object holding `.messages`."""
    return hasattr(value, "messages") and not isinstance(value, (Mapping, list, tuple))


def _plain_messages(chat: Any) -> list[dict]:
    messages = chat.messages if _is_chat(chat) else chat
    if not isinstance(messages, (list, tuple)):
        raise ValueError(
            "`conversation` must be a list of messages (dicts, dataclasses or pydantic models), a `Chat`, or a "
            f"list of those for a batch; got {type(messages).__name__}."
        )
    plain = []
    for message in messages:
        message = _plain(message)
        if not isinstance(message, dict):
            raise ValueError(
                f"`conversation`: chat messages must be dicts, dataclasses or pydantic models; got {message!r}."
            )
        # As transformers does since 5.2x: keys set to None (OpenAI-style `content=None`, `name=None`) are left
        # out, since templates test whether a key is defined, not whether it is None.
        plain.append({key: item for key, item in message.items() if item is not None})
    return plain


def plain_conversation(conversation: Any) -> list[dict] | list[list[dict]]:
    """`conversation` with every message as a plain dict, batched as given (one chat, or a list of chats).

    A chat is a list of messages or a transformers `Chat`; a message is a dict, a dataclass (e.g.
    huggingface_hub's `ChatCompletionInputMessage`) or a pydantic model (e.g. the OpenAI SDK's messages), with
    content items of the same kinds. transformers >= 5.2x converts these itself, 5.17 only takes dicts; converting
    them here gives both releases the same input. The caller's objects are not modified; images inside are not
    copied.
    """
    batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0
    batched = batched and (isinstance(conversation[0], (list, tuple)) or _is_chat(conversation[0]))
    if batched:
        return [_plain_messages(chat) for chat in conversation]
    return _plain_messages(conversation)


def check_content_items(conversation: list[dict] | list[list[dict]], model: str) -> None:
    """Raise `ValueError` unless every content item of a plain conversation is text or an image (`image` or the
    OpenAI `image_url`): the chat templates render nothing else, so anything else would silently vanish."""
    chats = conversation if conversation and isinstance(conversation[0], list) else [conversation]
    for chat in chats:
        for message in chat:
            content = message.get("content")
            for item in content if isinstance(content, (list, tuple)) else ():
                item_type = item.get("type") if isinstance(item, dict) else None
                if item_type not in ("text", "image", "image_url"):
                    raise ValueError(
                        f"`conversation`: {model} chat messages accept only text and image content items, got "
                        f"{item!r}."
                    )


def check_placeholder_count(
    num_placeholders: int, num_images: int, *, placeholder: str, text_name: str = "`text`",
    images_name: str = "`images`", hint: str = "",
) -> None:  # fmt: skip
    """The one rule of both processors: exactly one placeholder per image, neither more nor fewer (no processor
    invents placeholders for images that have none, since where an image goes changes what the model reads)."""
    if num_placeholders != num_images:
        raise ValueError(
            f"{text_name} holds {num_placeholders} image placeholder(s) ({placeholder}) but {images_name} holds "
            f"{num_images} image(s); put one placeholder where each image goes, or use chat messages (the chat "
            f"template writes one per image item){hint}."
        )

"""Image inputs shared by the processors: any supported input -> a PIL image, with clear errors.

Accepted: PIL images in any mode; numpy arrays (H, W) or (H, W, C); torch tensors (C, H, W) or (H, W); C in
1, 3, 4; uint8, integers in [0, 255] or floats in [0, 1]; paths or URLs (read with transformers' `load_image`);
nested lists of those, and 4-D arrays or tensors as batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_utils import load_image


__all__ = ["composite_on_white", "flatten_images", "to_pil_image"]

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


def _array_to_pil(array: np.ndarray, channels_first: bool, argument_name: str) -> PIL.Image.Image:
    """A 2-D or 3-D array with 1, 3 or 4 channels as a PIL image of mode L, RGB or RGBA.

    `channels_first` is the preferred layout (torch: CHW, numpy: HWC); the other is accepted when the preferred one
    does not fit.
    """
    if array.ndim == 3:
        first_fits, last_fits = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
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


def to_pil_image(image: Any, argument_name: str = "images") -> PIL.Image.Image:
    """One input image as a PIL image in its own mode (arrays give L, RGB or RGBA)."""
    if isinstance(image, str):
        try:
            image = load_image(image)
        except (OSError, ValueError) as error:
            raise ValueError(f"`{argument_name}`: cannot load the image {image!r}: {error}") from error
    if isinstance(image, torch.Tensor):
        if image.is_complex():
            raise ValueError(f"`{argument_name}`: unsupported tensor dtype {image.dtype}.")
        image = image.detach().cpu()
        image = _array_to_pil((image.float() if image.is_floating_point() else image).numpy(), True, argument_name)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, False, argument_name)
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

"""Processor of InternVL-U understanding with G2TR: one 448x448 tile per image, the InternVL chat template.

What it reproduces from the official `InternVLUProcessor` in text mode:

- every image becomes ONE tile, squashed (no aspect preservation) to 448x448 with bicubic resampling, rescaled by
  1/255 and normalised with the ImageNet statistics (the InternVL convention and what the checkpoint's
  `processor_config.json` is expected to hold; unverified, so both are processor arguments);
- every image occupies `<img>` + `image_seq_length` x `<IMG_CONTEXT>` + `</img>` (256 for InternVL-U; a processor
  argument, saved with it), whatever `g2tr_ratio` is: the model removes the slots of the tokens it drops, so the
  processor never needs to know the ratio;
- the `qwen2_5-chat-v3` template with the Chinese InternVL system prompt; the user text is stripped, its first
  character upper-cased and a "." appended unless it ends in one of `. ! ? , : ;`; upstream puts images without a
  placeholder in front of the text as `<image>\\n` each, which `build_prompt` does (the chat template writes one
  placeholder per image item); calling the processor on a text with fewer (or more) placeholders than images is a
  `ValueError`, the rule of the BAGEL processor too;
- left padding; generation stops at `<|im_end|>` or `<img>` (set in the model's generation config).

In addition it returns the images for the G2TR anchors: `vae_pixel_values` (the original image resized to the VAE
input size, default the ViT size, mapped to [-1, 1]) and their sizes. These come from the original image, not
from de-normalised ViT pixels as in the official text mode (which assumes CLIP statistics).
"""

# No `from __future__ import annotations` in this file: transformers reads the TypedDict annotations at runtime.
from typing import Any, Sequence

import numpy as np
import PIL.Image
from transformers import PreTrainedTokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs, MultiModalData, ProcessingKwargs, ProcessorMixin
from transformers.utils import logging

from .configuration_internvlu import DEFAULT_SYSTEM_MESSAGE, TINY_IMAGE_SIZE, TINY_SPECIAL_TOKENS
from .image_utils import (
    ImageFetchMixin,
    STANDARD_IMAGE_KWARGS,
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


logger = logging.get_logger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The VAE side maps [0, 1] to [-1, 1], as the official generation image processor (mean = std = 0.5).
VAE_MEAN = (0.5, 0.5, 0.5)
VAE_STD = (0.5, 0.5, 0.5)

IMAGE_PLACEHOLDER = "<image>"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"

# The InternVL `qwen2_5-chat-v3` conversation (MPT separator style) as a Jinja template:
#   <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n
# An image item renders as "<image>\n" (the processor expands it); user turns get the official normalisation.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + DEFAULT_SYSTEM_MESSAGE + "', start=0) -%}"
    "{%- if system_message is defined and system_message is not none -%}"
    "{%- set ns.system = system_message -%}"
    "{%- endif -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}"
    "{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') -%}"
    "{%- endif -%}"
    "{%- set ns.start = 1 -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' -}}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- set buf = namespace(text='') -%}"
    "{%- if message['content'] is string -%}"
    "{%- set buf.text = message['content'] -%}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{%- set buf.text = buf.text + '<image>\\n' -%}"
    "{%- elif item['type'] == 'text' -%}"
    "{%- set buf.text = buf.text + item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set buf.text = buf.text | trim -%}"
    "{%- if buf.text -%}"
    "{%- set buf.text = buf.text[0] | upper + buf.text[1:] -%}"
    "{%- if buf.text[-1] not in ['.', '!', '?', ',', ':', ';'] -%}"
    "{%- set buf.text = buf.text + '.' -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>user\\n' + buf.text + '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + buf.text + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def normalize_question(text: str) -> str:
    """The official user-text normalisation: strip, upper-case the first character, end with punctuation."""
    text = text.strip()
    if text:
        text = text[0].upper() + text[1:]
        if text[-1] not in ".!?,:;":
            text = text + "."
    return text


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def to_rgb_image(image: Any, channels_first: bool | None = None) -> PIL.Image.Image:
    """Any supported image (PIL in any mode, numpy, torch, URL / path) -> RGB PIL image, transparency composited
    on white (as transformers' `convert_to_rgb`). `channels_first` states the layout of arrays
    (`input_data_format`); None detects it."""
    image = to_pil_image(image, "images", channels_first)
    try:
        return composite_on_white(image, every_alpha_mode=True)
    except ValueError as error:
        raise ValueError(f"`images`: {error}") from error


def _resize_to_pixels(image: PIL.Image.Image, size: int, resample: int, options: PixelOptions) -> np.ndarray:
    """Squash to size x size, then rescale / normalise as `options` say. Returns [3, size, size] float32."""
    return to_pixel_array(image.resize((size, size), resample=PIL.Image.Resampling(resample)), options)


class G2TRInternVLUImagesKwargs(ImagesKwargs, total=False):
    r"""
    image_size (`int`): side of the square ViT tile. Construction only: the number of image tokens depends on it.
    vae_image_size (`int`): side of the square VAE input. Construction only.
    vae_image_mean (`list[float]`): VAE normalisation (0.5). Construction only: the VAE pixels are the model's
        generation-side input, not a per-call option.
    vae_image_std (`list[float]`): VAE normalisation (0.5). Construction only.
    """

    image_size: int
    vae_image_size: int
    vae_image_mean: float | list[float] | tuple[float, ...] | None
    vae_image_std: float | list[float] | tuple[float, ...] | None


_CONSTRUCTION_ONLY = tuple(
    name for name in G2TRInternVLUImagesKwargs.__annotations__ if name not in ImagesKwargs.__annotations__
)
# Where the geometry is set, for the errors about `size`, `do_resize` & co.
_GEOMETRY = (
    "every image is squashed to one `image_size` x `image_size` tile, set when the image processor is built "
    "(the number of image tokens depends on it)"
)


class G2TRInternVLUImageProcessor(ImageFetchMixin, BaseImageProcessor):
    r"""
    One tile per image for the InternViT, plus the same image for the VAE anchors of G2TR. PIL/numpy only.

    Args:
        image_size (`int`, defaults to 448): side of the square ViT input.
        vae_image_size (`int`, *optional*): side of the square VAE input (a multiple of 8); `image_size` when None,
            which gives the 56x56 latent of the official text-mode anchors.
        resample (`int`, defaults to 3 = bicubic): PIL resampling filter.
        image_mean, image_std (`tuple[float]`): ViT normalisation, ImageNet by default (see module docstring).
        vae_image_mean, vae_image_std (`tuple[float]`): VAE normalisation, 0.5 / 0.5 ([-1, 1]).
        **kwargs: standard image-processor options (`do_normalize`, `rescale_factor`, ...) as defaults of every call.

    **Options** (per call, at construction, or through the processor): the standard ones of transformers'
    `ImagesKwargs`, exactly as in the BAGEL image processor (`image_utils.resolve_image_kwargs`): `do_rescale`,
    `rescale_factor`, `do_normalize`, `image_mean` and `image_std` change the ViT pixels only (the VAE pixels keep
    their fixed normalisation, the model's generation-side input); `resample` and `input_data_format` apply to
    both; `do_resize=False`, `size`, `do_center_crop=True` and the like raise `ValueError`, since the tile size is
    fixed. `image_size`, `vae_image_size`, `vae_image_mean` and `vae_image_std` are construction-only.
    """

    valid_kwargs = G2TRInternVLUImagesKwargs
    model_input_names = ["pixel_values", "vae_pixel_values", "vae_pixel_sizes"]

    def __init__(
        self,
        image_size: int = 448,
        vae_image_size: int | None = None,
        resample: int = 3,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        vae_image_mean: Sequence[float] = VAE_MEAN,
        vae_image_std: Sequence[float] = VAE_STD,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        for name, value in (("image_size", image_size), ("vae_image_size", vae_image_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.image_size = image_size
        self.vae_image_size = vae_image_size
        self.resample = int(resample)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.vae_image_mean = list(vae_image_mean)
        self.vae_image_std = list(vae_image_std)
        resolve_image_kwargs(self, {}, geometry=_GEOMETRY)  # standard options given at construction, checked now

    def _resolve_options(self, kwargs: dict[str, Any]) -> PixelOptions:
        """Refuse unknown and construction-only arguments, then resolve the standard options of one call."""
        unknown = [key for key in kwargs if key not in STANDARD_IMAGE_KWARGS and key not in _CONSTRUCTION_ONLY]
        if unknown:
            raise ValueError(
                f"Unknown image processor argument(s) {unknown}; valid ones: the standard options of transformers' "
                "`ImagesKwargs` (see `image_utils.resolve_image_kwargs`)."
            )
        fixed = [key for key in _CONSTRUCTION_ONLY if kwargs.get(key) is not None]
        if fixed:
            raise ValueError(
                f"{fixed} cannot be set per call on {type(self).__name__}: they are set when it is built (the tile "
                "size fixes the number of image tokens; the VAE normalisation is the model's generation-side input)."
            )
        standard = {key: value for key, value in kwargs.items() if key in STANDARD_IMAGE_KWARGS}
        return resolve_image_kwargs(self, standard, geometry=_GEOMETRY)

    def preprocess(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """Images (one, a list, or a list of lists) -> `pixel_values` [N, 3, S, S], `vae_pixel_values`
        [N, 3, S_vae, S_vae] in [-1, 1] and `vae_pixel_sizes` [N, 2] (height, width), in flattened order.

        `kwargs` are standard image-processor options (class docstring); they change `pixel_values` only, except
        `resample` and `input_data_format`, which apply to both images.
        """
        options = self._resolve_options(kwargs)
        flat = flatten_images(images)
        if not flat:
            raise ValueError("`images` must contain at least one image.")
        rgb = [to_rgb_image(image, options.channels_first) for image in flat]
        vae_size = self.vae_image_size or self.image_size
        # The VAE side keeps its own statistics whatever the call asks of the ViT pixels.
        vae_options = PixelOptions(image_mean=tuple(self.vae_image_mean), image_std=tuple(self.vae_image_std))
        pixel_values = np.stack([_resize_to_pixels(im, self.image_size, options.resample, options) for im in rgb])
        vae_pixel_values = np.stack([_resize_to_pixels(im, vae_size, options.resample, vae_options) for im in rgb])
        vae_pixel_sizes = np.full((len(rgb), 2), vae_size, dtype=np.int64)
        data = {
            "pixel_values": pixel_values,
            "vae_pixel_values": vae_pixel_values,
            "vae_pixel_sizes": vae_pixel_sizes,
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------


class G2TRInternVLUProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: G2TRInternVLUImagesKwargs
    _defaults = {"text_kwargs": {"padding": True}}


# Said by every placeholder-count error of this processor: how to get one placeholder per image.
_PLACEHOLDER_HINT = "; `build_prompt(question, num_images)` writes them in front of a question, as upstream does"
# Processor flags of transformers that this processor cannot produce (the outputs need ProcessorMixin's own
# placeholder expansion); refused rather than left out of the outputs.
_UNSUPPORTED_FLAGS = ("return_mm_token_type_ids", "return_text_replacement_offsets")


class G2TRInternVLUProcessor(ProcessorMixin):
    r"""
    InternVL-U processor: [`G2TRInternVLUImageProcessor`] + a Qwen tokenizer with the InternVL special tokens.

    Args:
        image_processor ([`G2TRInternVLUImageProcessor`]): the image processor.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer (it must know `<img>`, `</img>`, `<IMG_CONTEXT>`).
        chat_template (`str`, *optional*): Jinja chat template; `CHAT_TEMPLATE` (qwen2_5-chat-v3) by default.
        image_seq_length (`int`, defaults to 256): `<IMG_CONTEXT>` tokens per image; must equal the model's
            `config.image_seq_length`. Independent of `g2tr_ratio`. Saved in `processor_config.json` and used as
            given by every call (the default only fits the official 448 px geometry).
        system_message (`str`, *optional*): default system prompt of `apply_chat_template`; the official Chinese
            InternVL prompt when None. A leading `system` message in the conversation overrides it.

    Keyword arguments of a call are routed as by `ProcessorMixin` (and so as in the BAGEL processor): text options
    to the tokenizer, image options (flat, in `images_kwargs`, or in `apply_chat_template(...,
    processor_kwargs=...)`) to the image processor, which honours or refuses them exactly as BAGEL's does
    (rescale / normalise options change the ViT pixels only); unknown names get transformers' warning.
    """

    image_token = IMAGE_CONTEXT_TOKEN
    valid_processor_kwargs = G2TRInternVLUProcessorKwargs

    def __init__(
        self,
        image_processor: G2TRInternVLUImageProcessor | None = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        image_seq_length: int = 256,
        system_message: str | None = None,
        **kwargs: Any,
    ):
        if not isinstance(image_seq_length, int) or isinstance(image_seq_length, bool) or image_seq_length <= 0:
            raise ValueError(f"`image_seq_length` must be a positive integer, got {image_seq_length!r}.")
        self.image_seq_length = image_seq_length
        self.system_message = system_message
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)
        for token in (IMAGE_CONTEXT_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"`tokenizer` must know the InternVL token {token!r} as a single token.")
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "vae_pixel_values", "vae_pixel_sizes"]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the tokenizer with `AutoTokenizer` and the image processor with this file's class.

        The base class goes through `AutoImageProcessor`, which needs a registration (a placeholder that raises on
        transformers 5.17 without torchvision) or `trust_remote_code`; under remote code this file's class is the
        same dynamic module as the processor.
        """
        subfolder = kwargs.pop("subfolder", "")
        path = pretrained_model_name_or_path
        tokenizer = cls._load_tokenizer_from_pretrained("tokenizer", path, subfolder=subfolder, **kwargs)
        image_processor = G2TRInternVLUImageProcessor.from_pretrained(path, subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]

    # -- prompts -------------------------------------------------------------------------------------------------

    def build_prompt(self, question: str, num_images: int = 0, system_message: str | None = None) -> str:
        """The official text-mode prompt for one question (images as `<image>` placeholders, not yet expanded).

        Images without a placeholder in `question` are put in front of it, one `<image>\\n` each, before the text is
        normalised (so a leading placeholder keeps the question's first letter as written, as upstream). This is
        the one place that adds placeholders: the processor call itself requires one per image.
        """
        missing = num_images - question.count(IMAGE_PLACEHOLDER)
        if missing > 0:
            question = (IMAGE_PLACEHOLDER + "\n") * missing + question
        system = system_message if system_message is not None else (self.system_message or DEFAULT_SYSTEM_MESSAGE)
        return (
            f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{normalize_question(question)}<|im_end|>\n<|im_start|>assistant\n"
        )

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs: Any):
        """`ProcessorMixin.apply_chat_template` on `conversation` with its messages as plain dicts, with the
        processor's `system_message` as the default system prompt (a `system` message in the conversation still
        wins).

        A conversation is one chat or a list of chats; a chat is a list of messages or a transformers `Chat`; a
        message is a dict, a dataclass or a pydantic model (transformers 5 message objects), on every supported
        transformers release. Content items must be text or images, as for BAGEL.
        """
        if kwargs.get("return_assistant_tokens_mask"):
            raise ValueError(
                "`return_assistant_tokens_mask=True` is not supported by G2TRInternVLUProcessor: its chat template "
                "(the official qwen2_5-chat-v3 layout) marks no assistant tokens with `{% generation %}`."
            )
        conversation = plain_conversation(conversation)
        check_content_items(conversation, "InternVL-U")
        if self.system_message is not None:
            kwargs.setdefault("system_message", self.system_message)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def _merge_kwargs(self, *args, **kwargs) -> dict[str, dict]:
        """`ProcessorMixin._merge_kwargs`, with its keyword type errors (huggingface_hub's strict-dataclass errors,
        e.g. `rescale_factor=1` for a float) raised as `ValueError`, like every other refused option."""
        try:
            return super()._merge_kwargs(*args, **kwargs)
        except KwargTypeError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from error

    def _expand_placeholders(self, text: str, num_images: int, text_name: str, images_name: str) -> str:
        """Expand each placeholder (`<image>` or `<IMG_CONTEXT>`) into `<img>` + T x `<IMG_CONTEXT>` + `</img>`,
        T = `image_seq_length`, after checking that there is exactly one per image."""
        text = text.replace(IMAGE_PLACEHOLDER, IMAGE_CONTEXT_TOKEN)
        check_placeholder_count(
            text.count(IMAGE_CONTEXT_TOKEN),
            num_images,
            placeholder=f"{IMAGE_PLACEHOLDER} or {IMAGE_CONTEXT_TOKEN}",
            text_name=text_name,
            images_name=images_name,
            hint=_PLACEHOLDER_HINT,
        )
        block = IMAGE_START_TOKEN + IMAGE_CONTEXT_TOKEN * self.image_seq_length + IMAGE_END_TOKEN
        return text.replace(IMAGE_CONTEXT_TOKEN, block)

    def _images_per_sample(self, images: Any, texts: list[str]) -> tuple[list[list[Any]], bool]:
        """Assign the images to the prompts: a list of lists per prompt, a flat list by placeholder order.
        Also returns whether the images came as one list per prompt (for the error messages)."""
        if images is None:
            return [[] for _ in texts], False
        if isinstance(images, (list, tuple)) and any(isinstance(entry, (list, tuple)) for entry in images):
            if len(images) != len(texts):
                raise ValueError(
                    f"`images` has {len(images)} per-prompt lists but `text` has {len(texts)} prompts."
                )
            return [flatten_images(entry) for entry in images], True
        flat = flatten_images(images)
        if len(texts) == 1:
            return [flat], False
        counts = [t.count(IMAGE_PLACEHOLDER) + t.count(IMAGE_CONTEXT_TOKEN) for t in texts]
        check_placeholder_count(
            sum(counts), len(flat), placeholder=f"{IMAGE_PLACEHOLDER} or {IMAGE_CONTEXT_TOKEN}", hint=_PLACEHOLDER_HINT
        )
        offsets = np.cumsum([0] + counts).tolist()
        return [flat[offsets[i] : offsets[i + 1]] for i in range(len(texts))], False

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder counts for images of the given sizes, without processing them: every image is one tile of
        `image_seq_length` `<IMG_CONTEXT>` tokens (`num_image_patches` 1), plus `<img>` and `</img>`."""
        vision_data = {}
        if image_sizes is not None:
            vision_data = {
                "num_image_patches": [1] * len(image_sizes),
                "num_image_tokens": [self.image_seq_length + 2] * len(image_sizes),
            }
        return MultiModalData(**vision_data)

    # -- call ----------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenise prompts that already follow the chat template (see `apply_chat_template` / `build_prompt`), each
        with exactly one `<image>` placeholder per image (a `ValueError` names both counts otherwise).

        Returns a `BatchFeature` with `input_ids` and `attention_mask` [B, L] (left padded unless `padding_side` is
        given), and with images `pixel_values` [N, 3, S, S], `vae_pixel_values` [N, 3, S_vae, S_vae] and
        `vae_pixel_sizes` [N, 2].
        """
        if videos is not None or audio is not None:
            raise ValueError("InternVL-U understanding takes images and text only (`videos`/`audio` must be None).")
        if text is None:
            raise ValueError("`text` is required (a prompt or a list of prompts).")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("`text` must be a string or a non-empty list of strings.")

        # Same routing as ProcessorMixin.__call__ (and so as the BAGEL processor): text options to the tokenizer,
        # image options to the image processor, which refuses what it cannot honour.
        if "padding_side" not in kwargs and "padding_side" not in (kwargs.get("text_kwargs") or {}):
            kwargs["padding_side"] = "left"
        merged = self._merge_kwargs(
            G2TRInternVLUProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        for flag in _UNSUPPORTED_FLAGS:
            if text_kwargs.pop(flag, None) or merged.get(flag):
                raise ValueError(f"`{flag}=True` is not supported by {type(self).__name__}.")
        return_tensors = text_kwargs.get("return_tensors")

        per_sample, per_prompt_lists = self._images_per_sample(images, texts)
        prompts = [
            self._expand_placeholders(
                t,
                len(imgs),
                text_name=f"`text[{i}]`" if len(texts) > 1 else "`text`",
                images_name=f"`images[{i}]`" if per_prompt_lists else "`images`",
            )
            for i, (t, imgs) in enumerate(zip(texts, per_sample))
        ]
        data = dict(self.tokenizer(prompts, **text_kwargs))
        flat = [image for sample in per_sample for image in sample]
        if flat:
            data.update(self.image_processor(flat, **images_kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)


# ----------------------------------------------------------------------------------------------------------------
# Tiny components for tests and examples (no download)
# ----------------------------------------------------------------------------------------------------------------


def _byte_vocabulary() -> dict[str, int]:
    """GPT-2's byte -> printable character table, as a vocabulary with the byte value as id."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + extra)
            extra += 1
    return {characters[byte]: byte for byte in range(256)}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (any text encodes, one token per UTF-8 byte) with the InternVL special tokens at the
    ids of `configuration_internvlu.TINY_TOKEN_IDS` (256, 257, ...). Built in code, no download."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.BPE(vocab=_byte_vocabulary(), merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in TINY_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=4096,
    )


def build_tiny_processor(image_seq_length: int = 16) -> G2TRInternVLUProcessor:
    """Processor matching `configuration_internvlu.build_tiny_internvlu_config()`: 56 px tiles (4x4 = 16 visual
    tokens with patch 7), 56 px VAE input, the tiny byte-level tokenizer."""
    image_processor = G2TRInternVLUImageProcessor(image_size=TINY_IMAGE_SIZE)
    return G2TRInternVLUProcessor(
        image_processor=image_processor, tokenizer=build_tiny_tokenizer(), image_seq_length=image_seq_length
    )


__all__ = [
    "CHAT_TEMPLATE",
    "G2TRInternVLUImageProcessor",
    "G2TRInternVLUProcessor",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "normalize_question",
    "to_rgb_image",
]


G2TRInternVLUImageProcessor.register_for_auto_class("AutoImageProcessor")
G2TRInternVLUProcessor.register_for_auto_class()

"""Processor of InternVL-U understanding with G2TR: one 448x448 tile per image, the InternVL chat template.

What it reproduces from the official `InternVLUProcessor` in text mode (internvlu.md §2.5):

- every image becomes ONE tile, squashed (no aspect preservation) to 448x448 with bicubic resampling, rescaled by
  1/255 and normalised with the ImageNet statistics (the InternVL convention and what the checkpoint's
  `processor_config.json` is expected to hold; unverified, so both are processor arguments);
- every image occupies `<img>` + 256 x `<IMG_CONTEXT>` + `</img>`, whatever `g2tr_ratio` is: the model removes
  the slots of the tokens it drops, so the processor never needs to know the ratio;
- the `qwen2_5-chat-v3` template with the Chinese InternVL system prompt; the user text is stripped, its first
  character upper-cased and a "." appended unless it ends in one of `. ! ? , : ;`; images without a placeholder are
  put in front of the text as `<image>\\n` each;
- left padding; generation stops at `<|im_end|>` or `<img>` (set in the model's generation config).

In addition it returns the images for the G2TR anchors: `vae_pixel_values` (the original image resized to the VAE
input size, default the ViT size, mapped to [-1, 1]) and their sizes. These come from the original image, not
from de-normalised ViT pixels as in the official text mode (which assumes CLIP statistics).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import PIL.Image
from transformers import PreTrainedTokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .configuration_internvlu import DEFAULT_SYSTEM_MESSAGE, TINY_IMAGE_SIZE, TINY_SPECIAL_TOKENS
from .image_utils import composite_on_white, flatten_images, to_pil_image


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


def to_rgb_image(image: Any) -> PIL.Image.Image:
    """Any supported image (PIL in any mode, numpy, torch, URL / path) -> RGB PIL image, transparency composited
    on white (as transformers' `convert_to_rgb`)."""
    image = to_pil_image(image, "images")
    try:
        return composite_on_white(image, every_alpha_mode=True)
    except ValueError as error:
        raise ValueError(f"`images`: {error}") from error


def _resize_normalize(image: PIL.Image.Image, size: int, resample: int, mean, std) -> np.ndarray:
    """Squash to size x size, rescale to [0, 1], normalise per channel. Returns [3, size, size] float32."""
    resized = image.resize((size, size), resample=PIL.Image.Resampling(resample))
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return pixels.transpose(2, 0, 1)


class G2TRInternVLUImageProcessor(BaseImageProcessor):
    r"""
    One tile per image for the InternViT, plus the same image for the VAE anchors of G2TR. PIL/numpy only.

    Args:
        image_size (`int`, defaults to 448): side of the square ViT input.
        vae_image_size (`int`, *optional*): side of the square VAE input (a multiple of 8); `image_size` when None,
            which gives the 56x56 latent of the official text-mode anchors.
        resample (`int`, defaults to 3 = bicubic): PIL resampling filter.
        image_mean, image_std (`tuple[float]`): ViT normalisation, ImageNet by default (see module docstring).
        vae_image_mean, vae_image_std (`tuple[float]`): VAE normalisation, 0.5 / 0.5 ([-1, 1]).
    """

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

    def preprocess(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """Images (one, a list, or a list of lists) -> `pixel_values` [N, 3, S, S], `vae_pixel_values`
        [N, 3, S_vae, S_vae] in [-1, 1] and `vae_pixel_sizes` [N, 2] (height, width), in flattened order."""
        flat = flatten_images(images)
        if not flat:
            raise ValueError("`images` must contain at least one image.")
        rgb = [to_rgb_image(image) for image in flat]
        vae_size = self.vae_image_size or self.image_size
        pixel_values = np.stack(
            [_resize_normalize(im, self.image_size, self.resample, self.image_mean, self.image_std) for im in rgb]
        )
        vae_pixel_values = np.stack(
            [_resize_normalize(im, vae_size, self.resample, self.vae_image_mean, self.vae_image_std) for im in rgb]
        )
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

_TOKENIZER_KWARGS = (
    "padding",
    "padding_side",
    "truncation",
    "max_length",
    "pad_to_multiple_of",
    "add_special_tokens",
    "return_attention_mask",
)


class G2TRInternVLUProcessor(ProcessorMixin):
    r"""
    InternVL-U processor: [`G2TRInternVLUImageProcessor`] + a Qwen tokenizer with the InternVL special tokens.

    Args:
        image_processor ([`G2TRInternVLUImageProcessor`]): the image processor.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer (it must know `<img>`, `</img>`, `<IMG_CONTEXT>`).
        chat_template (`str`, *optional*): Jinja chat template; `CHAT_TEMPLATE` (qwen2_5-chat-v3) by default.
        image_seq_length (`int`, defaults to 256): `<IMG_CONTEXT>` tokens per image; must equal the model's
            `config.image_seq_length`. Independent of `g2tr_ratio`.
        system_message (`str`, *optional*): default system prompt of `apply_chat_template`; the official Chinese
            InternVL prompt when None. A leading `system` message in the conversation overrides it.
    """

    image_token = IMAGE_CONTEXT_TOKEN

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
        normalised (so a leading placeholder keeps the question's first letter as written, as upstream).
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
        """`ProcessorMixin.apply_chat_template`, with the processor's `system_message` as the default system
        prompt (a `system` message in the conversation still wins)."""
        if self.system_message is not None:
            kwargs.setdefault("system_message", self.system_message)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def _expand_placeholders(self, text: str, num_images: int) -> str:
        """Put missing placeholders in front, then expand each into `<img>` + T x `<IMG_CONTEXT>` + `</img>`."""
        text = text.replace(IMAGE_PLACEHOLDER, IMAGE_CONTEXT_TOKEN)
        slots = text.count(IMAGE_CONTEXT_TOKEN)
        if slots > num_images:
            raise ValueError(
                f"`text` holds {slots} image placeholders but {num_images} image(s) were given for it."
            )
        text = (IMAGE_CONTEXT_TOKEN + "\n") * (num_images - slots) + text
        block = IMAGE_START_TOKEN + IMAGE_CONTEXT_TOKEN * self.image_seq_length + IMAGE_END_TOKEN
        return text.replace(IMAGE_CONTEXT_TOKEN, block)

    def _images_per_sample(self, images: Any, texts: list[str]) -> list[list[Any]]:
        """Assign the images to the prompts: a list of lists per prompt, a flat list by placeholder order."""
        if images is None:
            return [[] for _ in texts]
        if isinstance(images, (list, tuple)) and any(isinstance(entry, (list, tuple)) for entry in images):
            if len(images) != len(texts):
                raise ValueError(
                    f"`images` has {len(images)} per-prompt lists but `text` has {len(texts)} prompts."
                )
            return [flatten_images(entry) for entry in images]
        flat = flatten_images(images)
        if len(texts) == 1:
            return [flat]
        counts = [t.count(IMAGE_PLACEHOLDER) + t.count(IMAGE_CONTEXT_TOKEN) for t in texts]
        if sum(counts) != len(flat):
            raise ValueError(
                f"`text` holds {sum(counts)} image placeholders for {len(flat)} images; with several prompts pass "
                "one list of images per prompt or one placeholder per image."
            )
        offsets = np.cumsum([0] + counts).tolist()
        return [flat[offsets[i] : offsets[i + 1]] for i in range(len(texts))]

    # -- call ----------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenise prompts that already follow the chat template (see `apply_chat_template` / `build_prompt`).

        Returns a `BatchFeature` with `input_ids` and `attention_mask` [B, L] (left padded), and with images
        `pixel_values` [N, 3, S, S], `vae_pixel_values` [N, 3, S_vae, S_vae] and `vae_pixel_sizes` [N, 2].
        """
        if videos is not None or audio is not None:
            raise ValueError("InternVL-U understanding takes images and text only (`videos`/`audio` must be None).")
        if text is None:
            raise ValueError("`text` is required (a prompt or a list of prompts).")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("`text` must be a string or a non-empty list of strings.")

        return_tensors = kwargs.pop("return_tensors", None)
        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        images_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        for key in _TOKENIZER_KWARGS:
            if key in kwargs:
                text_kwargs[key] = kwargs.pop(key)
        unused = sorted(k for k in kwargs if k not in ("sanitize_control_tokens",))
        if unused:
            logger.warning_once(f"G2TRInternVLUProcessor ignores the keyword arguments {unused}.")
        text_kwargs.setdefault("padding", True)
        text_kwargs.setdefault("padding_side", "left")

        per_sample = self._images_per_sample(images, texts)
        prompts = [self._expand_placeholders(t, len(imgs)) for t, imgs in zip(texts, per_sample)]
        encoding = self.tokenizer(prompts, return_tensors=return_tensors, **text_kwargs)
        data = dict(encoding)
        flat = [image for sample in per_sample for image in sample]
        if flat:
            data.update(self.image_processor(flat, return_tensors=return_tensors, **images_kwargs))
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

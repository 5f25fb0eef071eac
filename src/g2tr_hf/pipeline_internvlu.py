"""`G2TRInternVLUPipeline`: image editing and text-to-image with InternVL-U and G2TR token reduction.

The algorithm is the official InternVL-U pipeline's (`InternVLUPipeline`, generation modes "image" and
"text_image"); each prompt's VLM side runs on its own, then every image's denoising steps in lock-step:

1. Three prompts per request (the CFG rows): *conditional* (the instruction, with the input images), *image-only*
   (the input images and "Generate an image based on reference images.", or the blank message for text-to-image) and
   *unconditional* (the blank message "Here is a random image <img_uncond>:"), each in the `qwen2_5-chat-v3`
   layout with the task's system message, ending in `<img>`.
2. Every input image is resized for the VAE (multiples of 16, area and longest side bounded as the official
   generation image processor does) and encoded ONCE (posterior mode, `latents_mean`/`latents_std` normalised).
   That one latent serves as the G2TR anchors of the image's ViT tokens and as the MMDiT's reference frame. The
   official G2TR code encodes it twice.
3. One VLM pass over the three rows. With G2TR the image's 256 ViT tokens are reduced to K once per image: the
   conditional and the image-only rows hold the same K merged tokens. The context of each row is the last two LLM
   layers concatenated over the span from the user turn to the final `<img>`.
4. The MMDiT: 20 DPM-Solver++ steps on flow sigmas (shift 3), three-branch guidance
   v = v_u + s_img (v_img - v_u) + s_text (v_c - v_img), the two differences renormalised per latent pixel while
   t > 930. The kept ViT tokens keep their own 2-D positions of the full grid (see `modeling_internvlu_gen`).
5. VAE decode, uint8 as upstream, LANCZOS resize to the requested size when it was floored to 16.

The diffusers options (`num_images_per_prompt`, `latents`, `callback_on_step_end`, `output_type`, `return_dict`,
`enable_model_cpu_offload`) follow `pipeline_utils`, with `G2TRBagelPipeline`'s semantics.

`g2tr_mode="official"` reproduces the official G2TR editing code for comparisons: the reduced ViT run gets the
1-D fallback positions (shifting every later text token) and the conditional row's kept tokens absorb the dropped
tokens of both rows (the image-only row keeps its K tokens unmerged).

Loading from a converted or exported folder (its `config.json` lists this class under `custom_pipelines`; the
decoder lives in `generation_decoder/`, the scheduler in `scheduler/`):

    from transformers import pipeline

    pipe = pipeline(model="FOLDER", trust_remote_code=True)
    image = pipe(prompt="make the sky pink", image=Image.open("in.png"), g2tr_ratio=0.5).images[0]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import DynamicCache, Pipeline
from transformers.utils import logging

from .compat import CACHE_KWARG
from .generation_g2tr import compaction_index
from .in_llm import refuse_in_llm_methods
from .modeling_internvlu_gen import G2TRInternVLUGenerationDecoder, MMDiTConditioning
from .pipeline_utils import (
    ModelCpuOffloadMixin,
    PerCallPipelineMixin,
    check_callback,
    check_input_images,
    check_latents,
    check_num_images_per_prompt,
    check_output_type,
    check_return_dict,
    convert_images,
    expand_generators,
)
from .processing_internvlu import IMAGE_PLACEHOLDER, normalize_question, to_rgb_image
from .reduction import (
    ReductionResult,
    build_latent_anchors,
    interpolate_channels,
    method_needs_vit_attention,
    reduce_tokens,
    reduces_anything,
)


try:
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.utils.torch_utils import randn_tensor
except ImportError:  # pragma: no cover - reported when the pipeline is built
    DPMSolverMultistepScheduler = randn_tensor = None


logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_SCHEDULER_CONFIG",
    "G2TRInternVLUPipeline",
    "G2TRInternVLUPipelineOutput",
    "G2TR_MODES",
    "PIPELINE_TASK",
    "custom_pipelines_config",
    "editing_token_accounting",
    "generation_prompts",
    "guided_velocity",
    "smart_resize",
]

PIPELINE_TASK = "g2tr-internvlu-image-generation"
G2TR_MODES = ("clean", "official")

# The sampler of InternVL-U's `scheduler/scheduler_config.json` (used when a folder has none).
DEFAULT_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
    "timestep_spacing": "linspace",
}

# Model input, reproduced character for character: the task instructions the official templates
# `qwen2_5-chat-v3-imgen` / `-editing` append to the identity system message, and the blank messages.
IMGEN_INSTRUCTION = (
    "请通过详细描述图像中物体和背景的颜色、形状、大小、纹理、数量、文字内容以及空间位置关系等来对图像进行全面描述："
)
EDIT_INSTRUCTION = (
    "请描述输入图像的关键特征（颜色、形状、大小、纹理、物体、背景等），然后解释用户的文本指令应该如何改变或修改图像，"
    "从而生成一个满足用户要求的新图像，并适当保持与原始输入的一致性。："
)
IMAGE_ONLY_MESSAGE = "Generate an image based on reference images."
BLANK_MESSAGE = "Here is a random image <img_uncond>:"

# (text guidance, image guidance) of the official pipeline: image mode and CoT ("text_image") mode.
IMAGE_GUIDANCE = (4.5, 2.0)
COT_GUIDANCE = (3.5, 1.5)


def custom_pipelines_config() -> dict[str, dict[str, Any]]:
    """The `config.custom_pipelines` entry that makes `pipeline(model=folder, trust_remote_code=True)` build this
    pipeline from a folder that ships this file next to the model's remote code."""
    return {
        PIPELINE_TASK: {
            "impl": f"{__name__.rsplit('.', 1)[-1]}.G2TRInternVLUPipeline",
            "pt": ["AutoModelForImageTextToText"],
            "type": "multimodal",
        }
    }


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------------


def smart_resize(
    height: int, width: int, factor: int = 16, min_pixels: int = 512 * 512, max_pixels: int = 1024 * 1024,
    max_length: int | None = 1024,
) -> tuple[int, int]:  # fmt: skip
    """The official generation-side resize: sides multiples of `factor`, area in [min_pixels, max_pixels], longest
    side <= `max_length`, aspect ratio kept as closely as possible. Returns (height, width)."""
    if height < factor or width < factor:
        raise ValueError(f"`image`: an input image must be at least {factor}x{factor} pixels, got {width}x{height}.")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"`image`: aspect ratio must be below 200, got {width}x{height}.")
    if max_length is not None and max(height, width) > max_length:
        scale = max_length / max(height, width)
        height, width = int(height * scale), int(width * scale)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    if max_length is not None and max(h_bar, w_bar) > max_length:
        scale = max_length / max(h_bar, w_bar)
        h_bar, w_bar = math.floor(h_bar * scale / factor) * factor, math.floor(w_bar * scale / factor) * factor
    return h_bar, w_bar


def generation_prompts(
    prompt: str, num_images: int, identity_message: str, image_block: str, cot: bool = False
) -> list[str]:
    """The three CFG prompts of one request (conditional, image-only, unconditional), placeholders expanded.

    Missing `<image>` placeholders are put in front of the prompt (one per image) before the user text is normalised
    (strip, first character upper-cased, "." unless it ends in . ! ? , : ;), so an edit keeps the prompt's own case.
    Image mode ends every row with `<img>`; CoT mode (`cot=True`) leaves it out (the model writes text first).
    """
    missing = num_images - prompt.count(IMAGE_PLACEHOLDER)
    if missing > 0:
        prompt = (IMAGE_PLACEHOLDER + "\n") * missing + prompt
    conditional = normalize_question(prompt)
    images = conditional.count(IMAGE_PLACEHOLDER)
    image_only = (IMAGE_PLACEHOLDER + "\n") * images + IMAGE_ONLY_MESSAGE if images else BLANK_MESSAGE
    system = identity_message + (EDIT_INSTRUCTION if num_images else IMGEN_INSTRUCTION)
    rows = []
    for content in (conditional, image_only, BLANK_MESSAGE):
        text = (
            f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        rows.append(text.replace(IMAGE_PLACEHOLDER, image_block) + ("" if cot else "<img>"))
    return rows


def _renorm(difference: torch.Tensor, exponent: float = 0.4) -> torch.Tensor:
    """difference / max(1, ||difference||^0.4), the norm over channels at each latent pixel ([N, C, H, W])."""
    norm = difference.norm(dim=1, keepdim=True)
    return difference / torch.where(norm > 1.0, norm.pow(exponent), torch.ones_like(norm))


def guided_velocity(
    conditional: torch.Tensor,
    image_only: torch.Tensor,
    unconditional: torch.Tensor,
    text_scale: float,
    image_scale: float,
    renormalize: bool,
) -> torch.Tensor:
    """InternVL-U's three-branch guidance: v_u + s_img (v_img - v_u) + s_text (v_c - v_img), each difference
    divided by max(1, ||.||^0.4) per latent pixel when `renormalize` (the first steps, t > `timestep_trunc`)."""
    image_difference, text_difference = image_only - unconditional, conditional - image_only
    if renormalize:
        image_difference, text_difference = _renorm(image_difference), _renorm(text_difference)
    return unconditional + image_scale * image_difference + text_scale * text_difference


def editing_token_accounting(
    height: int = 1024, width: int = 1024, ratio: float = 0.5, num_images: int = 1, prompt_text_tokens: int = 120,
    span_text_tokens: int = 40, vit_tokens: int = 256, steps: int = 20, min_keep: int = 32, patch_pixels: int = 16,
) -> dict[str, float]:  # fmt: skip
    """Analytic token counts of one edit with `num_images` references of the target's size.

    The VLM prefill runs once over 3 rows, each with `prompt_text_tokens` text tokens (system message, turns,
    instruction); the conditional and image-only rows add `num_images` x (`vit_tokens` + 2). The MMDiT runs every
    step over 3 rows: the target's patches, the references' patches (2 rows), the context span (`span_text_tokens`
    text tokens from the user turn to `<img>`, plus the image blocks in 2 rows). G2TR removes `vit_tokens - K` tokens
    per image from the 2 image rows of both. The text counts are assumptions of the caller (defaults: a short
    instruction); the result says where the saving lies, not a measured speed.
    """
    keep = vit_tokens if ratio >= 1.0 else max(min(vit_tokens, min_keep), math.ceil(vit_tokens * ratio))
    removed_per_row = num_images * (vit_tokens - keep)
    image_block = num_images * (vit_tokens + 2)
    prefill_full = 3 * prompt_text_tokens + 2 * image_block
    patches = (height // patch_pixels) * (width // patch_pixels)
    image_row = patches * (1 + num_images) + span_text_tokens + image_block
    mmdit_full = 2 * image_row + patches + span_text_tokens
    return {
        "kept_per_image": keep,
        "prefill_tokens_full": prefill_full,
        "prefill_tokens_reduced": prefill_full - 2 * removed_per_row,
        "prefill_saving": 2 * removed_per_row / prefill_full,
        "mmdit_tokens_per_step_full": mmdit_full,
        "mmdit_tokens_per_step_reduced": mmdit_full - 2 * removed_per_row,
        "mmdit_saving": 2 * removed_per_row / mmdit_full,
        "mmdit_saving_per_image_row": removed_per_row / image_row,
        "mmdit_tokens_removed_per_call": 2 * removed_per_row * steps,
    }


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class G2TRInternVLUPipelineOutput:
    """Output of [`G2TRInternVLUPipeline`].

    Attributes:
        images: one per generated image, prompt by prompt (`num_images_per_prompt` each): PIL images
            (`output_type="pil"`), float arrays [H, W, 3] in [0, 1] (`"np"`), float tensors [3, H, W] in [0, 1]
            (`"pt"`), or the final latents [C, h, w] (`"latent"`, not decoded: the format `latents=` takes).
        thoughts: per image, the text its prompt wrote in CoT mode (`think=True`), else None.
        image_reductions: per image, its prompt's G2TR plan of each input image (None when nothing was reduced).
    """

    images: list[Any]
    thoughts: list[str | None]
    image_reductions: list[list[ReductionResult] | None] = dataclasses.field(default_factory=list)

    def to_tuple(self) -> tuple[list[Any], list[str | None]]:
        """`(images, thoughts)`, what `return_dict=False` returns (as `G2TRBagelPipeline`)."""
        return self.images, self.thoughts


@dataclass
class _Request:
    prompt: str
    images: list[PIL.Image.Image]


@dataclass
class _VLMContext:
    """The VLM side of one request, ready for the MMDiT."""

    conditioning: MMDiTConditioning
    reductions: list[ReductionResult] | None
    thought: str | None


class G2TRInternVLUPipeline(PerCallPipelineMixin, ModelCpuOffloadMixin, Pipeline):
    r"""
    Image editing and text-to-image with InternVL-U (`G2TRInternVLUForConditionalGeneration` + its generation decoder),
    the input images' ViT tokens reduced by G2TR (see the module docstring for the algorithm).

    Build it from a model, its processor, the generation decoder and the scheduler, or from a converted / exported
    folder with `transformers.pipeline(model=folder, trust_remote_code=True)` (the decoder and scheduler are then read
    from the folder's `generation_decoder/` and `scheduler/`).

    Example:

    ```python
    >>> from g2tr_hf.tiny import build_tiny_internvlu_generation
    >>> from g2tr_hf.pipeline_internvlu import G2TRInternVLUPipeline
    >>> model, processor, decoder, scheduler = build_tiny_internvlu_generation()
    >>> pipe = G2TRInternVLUPipeline(model, processor, generation_decoder=decoder, scheduler=scheduler, device="cpu")
    >>> pipe(prompt="a red car", num_inference_steps=2, height=64, width=64, show_progress=False).images[0].size
    (64, 64)
    ```
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    # Model CPU offload (`pipeline_utils.ModelCpuOffloadMixin`): the ViT, the LLM, the MMDiT (a pipeline component,
    # not part of `self.model`) and the VAE are chained in the order they run; the word embeddings (called on their
    # own) and the LM head (CoT mode) load when used. `mlp1` and the special-token table stay on the device.
    model_cpu_offload_seq = "model.vision_model->model.language_model->generation_decoder->model.vae"
    _offload_on_use = ("model.language_model.embed_tokens", "lm_head")
    _offload_pipeline_components = ("generation_decoder",)
    _callback_tensor_inputs = ["latents"]

    def __init__(self, model, processor=None, generation_decoder=None, scheduler=None, **kwargs) -> None:
        if processor is None:
            raise ValueError(
                "`processor` is required: the model's G2TRInternVLUProcessor (tokenizer + image processor)."
            )
        if DPMSolverMultistepScheduler is None:
            raise ImportError("G2TRInternVLUPipeline needs diffusers: `pip install diffusers`.")
        if getattr(model, "vae", None) is None:
            raise ValueError(
                "The model has no VAE (`config.vae_config` is None): image generation needs it to encode and decode."
            )
        self._progress_bar_config: dict[str, Any] = {}
        self._interrupt = False
        super().__init__(model=model, processor=processor, **kwargs)
        source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        if generation_decoder is None:
            if not source:
                raise ValueError(
                    "`generation_decoder` is required when the model was not loaded from a folder with a "
                    "`generation_decoder/` subfolder."
                )
            generation_decoder = G2TRInternVLUGenerationDecoder.from_pretrained(
                source, subfolder="generation_decoder", dtype=model.dtype
            )
        if scheduler is None:
            scheduler = self._load_scheduler(source)
        self.generation_decoder = generation_decoder.to(self.device).eval()
        self.scheduler = scheduler

    @staticmethod
    def _load_scheduler(source: str | None):
        if source:
            try:
                return DPMSolverMultistepScheduler.from_pretrained(source, subfolder="scheduler")
            except (OSError, ValueError, EnvironmentError):
                logger.warning("No `scheduler/` in %s: using InternVL-U's DPM-Solver++ settings.", source)
        return DPMSolverMultistepScheduler(**DEFAULT_SCHEDULER_CONFIG)

    # --- the algorithm --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: Any = None,
        num_inference_steps: int = 20,
        generator: torch.Generator | list[torch.Generator] | None = None,
        g2tr_ratio: float | None = None,
        cfg_text_scale: float | None = None,
        cfg_img_scale: float | None = None,
        timestep_shift: float = 3.0,
        timestep_trunc: float = 930,
        height: int | None = None,
        width: int | None = None,
        think: bool = False,
        max_think_tokens: int = 200,
        g2tr_mode: str = "clean",
        show_progress: bool = True,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | list[torch.Tensor] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        return_dict: bool = True,
    ) -> G2TRInternVLUPipelineOutput | tuple:
        r"""
        Edit images or generate them from text.

        Args:
            prompt (`str` or `list[str]`): the instruction; a list runs several requests (their VLM passes one after
                another, then every image's denoising steps in lock-step, one MMDiT call per image and step).
            image (PIL image, numpy array, tensor, path/URL, or a list, *optional*): the input image(s) of an edit;
                None for text-to-image. With one prompt, a list holds that request's images; with a list of prompts,
                one entry per prompt (None, an image or a list of images).
            num_inference_steps (`int`, defaults to 20): DPM-Solver++ steps (one MMDiT evaluation of the 3 rows each).
            generator (`torch.Generator` or a list, *optional*): seeds the initial noise: one generator for all
                images (drawn from in turn, prompt by prompt), or a list with one per image or one per prompt.
            g2tr_ratio (`float`, *optional*): keep ratio of the input images' ViT tokens in (0, 1]; defaults to
                `model.config.g2tr_ratio`. 1.0 leaves them unreduced.
            cfg_text_scale (`float`, *optional*): guidance of the instruction (official `all_cfg_scale`): 4.5, or 3.5
                with `think`.
            cfg_img_scale (`float`, *optional*): guidance of the input images (official `part_cfg_scale`): 2.0, or
                1.5 with `think`. No effect on text-to-image (the image-only row is the unconditional one).
            timestep_shift (`float`, defaults to 3.0): the flow-sigma shift.
            timestep_trunc (`float`, defaults to 930): guidance differences are renormalised while t > this.
            height, width (`int`, *optional*): output size, floored to multiples of 16 internally and resized back
                (LANCZOS). Defaults: the VAE size of the (last) input image for an edit, else
                `generation_decoder.config.gen_image_height/width`.
            think (`bool`, defaults to False): the official CoT ("text_image") mode: the conditional row first writes
                a description (greedy), which joins its prompt before `<img>`.
            max_think_tokens (`int`, defaults to 200): length cap of that description.
            g2tr_mode (`str`, defaults to "clean"): "clean" (kept ViT tokens keep their 2-D positions, one merge per
                image shared by the conditional and image-only rows) or "official" (the official G2TR code's 1-D
                fallback positions and cross-row merge), see the module docstring.
            show_progress (`bool`, defaults to True): a progress bar over the denoising steps.
            output_type (`str`, defaults to "pil"): "pil", "np" (float [H, W, 3] in [0, 1]), "pt" (float tensors
                [3, H, W] in [0, 1]) or "latent" (the final latents [C, h, w] on the generated grid, not decoded).
            num_images_per_prompt (`int`, defaults to 1): images per prompt; they share the prompt's VLM pass and
                MMDiT conditioning.
            latents (`torch.Tensor` or a list, *optional*): the initial noise instead of drawing it: one tensor
                [C, h, w] per image (C = `generation_decoder.config.latent_channels`, h, w = the generated size / 8),
                as a list, stacked [num_images, C, h, w] when all share a size, or alone for a single image.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, step, timestep, callback_kwargs) -> dict`, called
                after each denoising step (every image has taken it) with the tensors named in
                `callback_on_step_end_tensor_inputs`; a "latents" entry in the returned dict replaces the latents (the
                forms of `latents=`). Setting `pipe._interrupt = True` stops the loop.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to ["latents"]): names from
                `_callback_tensor_inputs`.
            return_dict (`bool`, defaults to True): False returns the tuple `(images, thoughts)`.
        Returns:
            [`G2TRInternVLUPipelineOutput`] with `.images` (one per image, prompt by prompt), `.thoughts` and
            `.image_reductions`, or a tuple.
        """
        requests, generators = self.check_inputs(
            prompt, image, num_inference_steps, generator, g2tr_ratio, cfg_text_scale, cfg_img_scale,
            timestep_shift, timestep_trunc, height, width, think, max_think_tokens, g2tr_mode, output_type,
            num_images_per_prompt=num_images_per_prompt, return_dict=return_dict,
        )  # fmt: skip
        if any(request.images for request in requests):
            refuse_in_llm_methods(self.model.config, g2tr_ratio, "editing")
        callback, callback_inputs = check_callback(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        self._interrupt = False
        default_text, default_image = COT_GUIDANCE if think else IMAGE_GUIDANCE
        text_scale = float(default_text if cfg_text_scale is None else cfg_text_scale)
        image_scale = float(default_image if cfg_img_scale is None else cfg_img_scale)
        ratio = self.model.config.resolve_g2tr_ratio(g2tr_ratio)
        position_mode = "kept_2d" if g2tr_mode == "clean" else "official_fallback"
        prompt_of_image = [index for index in range(len(requests)) for _ in range(num_images_per_prompt)]

        # 1. The requested and generated sizes of every prompt; user latents must match each image's generated grid.
        sizes = []
        for request in requests:
            reference_sizes = [self.reference_size(item) for item in request.images]
            sizes.append(self.output_size(reference_sizes, height, width))
            self._check_reference_count(len(reference_sizes), sizes[-1][1])
        shapes = [self.latent_shape(sizes[index][1]) for index in prompt_of_image]
        user_latents = check_latents(latents, shapes)

        try:
            contexts = []
            for request, (_, target) in zip(requests, sizes):
                # 2. Input images for the VAE (official resize) and ONE encode each: anchors and reference frames.
                references = [self.encode_reference(item) for item in request.images]
                # 3. The VLM pass over the three rows (G2TR-reduced ViT tokens), then the MMDiT conditioning, shared
                #    by the prompt's `num_images_per_prompt` images.
                contexts.append(
                    self.encode_context(
                        request, references, target, ratio, g2tr_mode, position_mode, think, max_think_tokens,
                        show_progress,
                    )  # fmt: skip
                )
            # 4. The initial noise of every image, then the sampler: every image takes each step before the next (one
            #    MMDiT call over its 3 rows), so that a callback sees, and may replace, all images' latents at once.
            if user_latents is None:
                noise = [self.prepare_latents(shape, gen) for shape, gen in zip(shapes, generators)]
            else:
                noise = [tensor.to(device=self.device, dtype=torch.float32) for tensor in user_latents]
            final = self.denoise(
                [contexts[index].conditioning for index in prompt_of_image], noise, num_inference_steps,
                timestep_shift, timestep_trunc, text_scale, image_scale, show_progress, callback, callback_inputs,
            )  # fmt: skip
            # 5. Decode.
            if output_type == "latent":
                images = final
            else:
                images = [
                    self.postprocess(latent[None], sizes[index][0], output_type)
                    for latent, index in zip(final, prompt_of_image)
                ]
        finally:
            self.maybe_free_model_hooks()
        output = G2TRInternVLUPipelineOutput(
            images=images,
            thoughts=[contexts[index].thought for index in prompt_of_image],
            image_reductions=[contexts[index].reductions for index in prompt_of_image],
        )
        return output if return_dict else output.to_tuple()

    # --- steps ----------------------------------------------------------------------------------------------------

    @property
    def _base(self):
        return self.model.model

    def reference_size(self, image: PIL.Image.Image) -> tuple[int, int]:
        """The (H, W) an input image is resized to for the VAE (the official generation-side `smart_resize`)."""
        config = self.generation_decoder.config
        factor = config.vae_downsample_factor * config.patch_size
        return smart_resize(
            image.height, image.width, factor, config.reference_min_pixels, config.reference_max_pixels,
            config.reference_max_side,
        )  # fmt: skip

    def encode_reference(self, image: PIL.Image.Image) -> dict[str, Any]:
        """One input image -> its ViT pixels [1, 3, S, S], its VAE-side size and its normalised latent [C, h, w]
        (fp32), from ONE `encode_vae_latents` call."""
        height, width = self.reference_size(image)
        resized = image.resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1) / 255.0
        pixels = ((pixels - 0.5) / 0.5)[None].to(self.device)
        latent = self._base.encode_vae_latents(pixels)[0].float()
        vit_pixels = self.processor.image_processor([image], return_tensors="pt")["pixel_values"]
        return {"size": (height, width), "latent": latent, "vit_pixels": vit_pixels.to(self.device)}

    def output_size(
        self, reference_sizes: list[tuple[int, int]], height: int | None, width: int | None
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """(requested (H, W), generated (H, W) = requested floored to 16), from the input images' VAE-side sizes."""
        config = self.generation_decoder.config
        if reference_sizes:
            default_height, default_width = reference_sizes[-1]
        else:
            default_height, default_width = config.gen_image_height, config.gen_image_width
        requested = (height or default_height, width or default_width)
        stride = config.vae_downsample_factor * config.patch_size
        return requested, (requested[0] // stride * stride, requested[1] // stride * stride)

    def _check_reference_count(self, num_references: int, target: tuple[int, int]) -> None:
        """The MMDiT's frames must stay inside the target's position range: fewer references than half the
        target's shorter side in patches."""
        decoder = self.generation_decoder.config
        stride = decoder.vae_downsample_factor * decoder.patch_size
        limit = int(min(target) // stride // 2 / decoder.video_position_scale_factor)
        if num_references and num_references >= limit:
            raise ValueError(
                f"`height`/`width`: a {target[1]}x{target[0]} output takes at most {max(limit - 1, 0)} input "
                f"image(s) (fewer than half its shorter side in {stride}-pixel patches); got {num_references}. "
                "Ask for a larger output."
            )

    def reduce_images(
        self,
        features: torch.Tensor,
        references: list[dict[str, Any]],
        ratio: float,
        vit_attention: list[torch.Tensor] | None = None,
    ) -> list[ReductionResult] | None:
        """G2TR plan of every input image from its reference latent (the anchors); None when nothing is reduced.
        `vit_attention` (one [2, T] per image) feeds a method that ranks by the ViT's attention (`vscan_vit`)."""
        config = self.model.config
        tokens_per_image = features.shape[1]
        if not references or not reduces_anything(tokens_per_image, ratio, config.g2tr_min_keep):
            return None
        side = config.image_grid_size
        plans = []
        vit_attention = vit_attention or [None] * len(references)
        for image_features, reference, image_attention in zip(features, references, vit_attention):
            anchors, anchor_grid = build_latent_anchors(
                reference["latent"],
                pool=config.g2tr_latent_pool,
                project=lambda x: interpolate_channels(x, out_dim=config.text_config.hidden_size),
            )
            plans.append(
                reduce_tokens(
                    image_features, (side, side), anchors.to(image_features), anchor_grid, ratio=ratio,
                    vit_attention=image_attention, **config.g2tr_reduction_kwargs(),
                )  # fmt: skip
            )
        return plans

    @staticmethod
    def _official_conditional_plan(plan: ReductionResult, features: torch.Tensor) -> ReductionResult:
        """The official code merges over the packed batch: the conditional row's kept tokens win every tie against
        their twins in the image-only row, so they absorb the dropped tokens of BOTH rows:
        (s x_k + 2 sum x_d) / (s + 2 m) = a group mean with kept weight s / 2."""
        if not plan.merged:
            return plan
        doubled = dataclasses.replace(plan, merge_scaling=plan.merge_scaling / 2)
        return dataclasses.replace(plan, tokens=doubled.merge(features).to(plan.tokens.dtype))

    def _row_ids(
        self, rows: list[str], suffixes: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of the rows, each followed by its `suffixes` ids (generated tokens are kept as ids, not
        re-tokenised), left-padded: (input_ids [B, L], attention_mask [B, L] bool) on the pipeline's device."""
        encoded = [self.tokenizer.encode(row, add_special_tokens=False) for row in rows]
        if suffixes is not None:
            encoded = [ids + list(suffix) for ids, suffix in zip(encoded, suffixes)]
        length = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
        attention_mask = torch.zeros(len(encoded), length, dtype=torch.bool)
        for row, ids in enumerate(encoded):
            input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids) :] = True
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _embed_rows(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: torch.Tensor | None,
        plans: list[ReductionResult] | None,
        g2tr_mode: str,
        image_rows: int,
    ):
        """Prompt embeddings with the (reduced) visual tokens of the image rows, dropped slots removed.

        Returns (embeds [B, L', D], mask [B, L'], ids [B, L'], per-image-slot plans in sequence order)."""
        base = self._base
        embeds = base.apply_special_token_embeddings(base.get_input_embeddings()(input_ids), input_ids)
        slot_plans = None
        if features is not None:
            placeholder = base.image_placeholder_mask(input_ids)
            row_features = features.repeat(image_rows, 1, 1)  # the same images in the conditional / image-only rows
            if plans is not None:
                first = plans
                if g2tr_mode == "official":
                    first = [self._official_conditional_plan(p, f) for p, f in zip(plans, features)]
                    # The image-only row's kept tokens are not merged at all.
                    plans = [dataclasses.replace(p, tokens=f.index_select(0, p.keep)) for p, f in zip(plans, features)]
                slot_plans = list(first) + list(plans) * (image_rows - 1)
            embeds, drop = base.insert_image_features(embeds, placeholder, row_features, slot_plans)
            if drop is not None:
                index, filled = compaction_index(~drop)
                embeds = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
                attention_mask = attention_mask.gather(1, index) & filled
                input_ids = input_ids.gather(1, index)
        return embeds, attention_mask, input_ids, slot_plans

    def _run_language_model(self, embeds: torch.Tensor, attention_mask: torch.Tensor, cache=None, offset=None):
        """The LLM over left-padded rows; returns (the last layer's input, the final-norm output, cache)."""
        language_model = self._base.language_model
        captured = {}

        def before_last(module, args, kwargs):
            captured["penultimate"] = args[0] if args else kwargs["hidden_states"]

        def after_norm(module, args, output):
            captured["last"] = output

        positions = attention_mask.long().cumsum(-1) - 1
        if offset is not None:
            positions = positions + offset[:, None]
        positions = positions.clamp(min=0)
        handles = [
            language_model.layers[-1].register_forward_pre_hook(before_last, with_kwargs=True),
            language_model.norm.register_forward_hook(after_norm),
        ]
        try:
            full_mask = attention_mask if cache is None else torch.cat([cache[1], attention_mask], dim=-1)
            outputs = language_model(
                inputs_embeds=embeds,
                attention_mask=full_mask.long(),
                position_ids=positions,
                use_cache=cache is not None,
                **({} if cache is None else {CACHE_KWARG: cache[0]}),
            )
        finally:
            for handle in handles:
                handle.remove()
        return captured["penultimate"], captured["last"], outputs

    def encode_context(
        self,
        request: _Request,
        references: list[dict[str, Any]],
        target: tuple[int, int],
        ratio: float,
        g2tr_mode: str,
        position_mode: str,
        think: bool,
        max_think_tokens: int,
        show_progress: bool = True,
    ) -> _VLMContext:
        """Prompts -> one VLM pass over the 3 rows -> the MMDiT conditioning."""
        config = self.model.config
        block = "<img>" + "<IMG_CONTEXT>" * config.image_seq_length + "</img>"
        rows = generation_prompts(
            request.prompt, len(request.images), config.system_message, block, cot=think
        )
        features = plans = None
        if references:
            vit_pixels = torch.cat([reference["vit_pixels"] for reference in references])
            vit_attention = None
            if ratio < 1.0 and method_needs_vit_attention(config.g2tr_method):
                features, vit_attention = self._base.vscan_attention_scores(vit_pixels)
            else:
                features = self._base.get_image_features(vit_pixels).pooler_output
            # (passed only when there are scores, so an override of `reduce_images` without the argument still works)
            extra = {} if vit_attention is None else {"vit_attention": vit_attention}
            plans = self.reduce_images(features, references, ratio, **extra)
        thought, suffixes = None, None
        if think:
            thought, suffixes = self.think(rows, features, plans, g2tr_mode, max_think_tokens, show_progress)
        input_ids, attention_mask = self._row_ids(rows, suffixes)
        embeds, attention_mask, input_ids, slot_plans = self._embed_rows(
            input_ids, attention_mask, features, plans, g2tr_mode, image_rows=2 if references else 0
        )
        penultimate, last, _ = self._run_language_model(embeds, attention_mask)
        states = torch.cat(
            [(last, penultimate)[0 if layer == -1 else 1] for layer in self.generation_decoder.config.vlm_select_layer],
            dim=-1,
        )
        conditioning = self._conditioning(
            input_ids, attention_mask, states, references, slot_plans, target, position_mode
        )
        return _VLMContext(conditioning=conditioning, reductions=plans, thought=thought)

    def _conditioning(self, input_ids, attention_mask, states, references, slot_plans, target, position_mode):
        """Per row: the context span (second `<|im_start|>` .. final `<img>`), its ViT mask, the ViT grids and
        kept indices of its images, and the reference latents (conditional and image-only rows)."""
        config = self.model.config
        im_start = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        side = config.image_grid_size
        contexts, vit_masks, fhw, keeps, conditional, grids = [], [], [], [], [], []
        slot = 0
        latent_channels = self.generation_decoder.config.latent_channels
        for row in range(input_ids.shape[0]):
            ids, valid = input_ids[row], attention_mask[row]
            starts = ((ids == im_start) & valid).nonzero().flatten()
            image_starts = ((ids == config.image_start_token_id) & valid).nonzero().flatten()
            if starts.numel() < 2 or image_starts.numel() == 0:
                raise ValueError("Internal error: a generation prompt lost its user turn or its final `<img>`.")
            span = slice(int(starts[1]), int(image_starts[-1]) + 1)
            contexts.append(states[row, span][valid[span]])
            vit_masks.append((ids[span] == config.image_token_id)[valid[span]])
            num_images = image_starts.numel() - 1
            fhw.append(torch.tensor([[1, side, side]] * num_images, dtype=torch.long).reshape(-1, 3))
            row_keeps = []
            for _ in range(num_images):
                plan = slot_plans[slot] if slot_plans is not None else None
                row_keeps.append(None if plan is None else plan.keep)
                slot += 1
            keeps.append(row_keeps)
            if num_images:
                latents = [reference["latent"] for reference in references]
                height = max(latent.shape[-2] for latent in latents)
                width = max(latent.shape[-1] for latent in latents)
                padded = latents[0].new_zeros(len(latents), latent_channels, height, width)
                for index, latent in enumerate(latents):
                    padded[index, :, : latent.shape[-2], : latent.shape[-1]] = latent
                conditional.append(padded)
                grids.append(torch.tensor([[1, *latent.shape[-2:]] for latent in latents], dtype=torch.long))
            else:
                conditional.append(None)
                grids.append(None)
        factor = self.generation_decoder.config.vae_downsample_factor
        target_grid = torch.tensor([[1, target[0] // factor, target[1] // factor]] * len(contexts))
        return self.generation_decoder.prepare_conditioning(
            contexts, vit_masks, target_grid, image_fhw_cond=fhw, conditional_input=conditional,
            image_grid_thw_gen_cond=grids, image_keep_cond=keeps, position_mode=position_mode,
        )  # fmt: skip

    @torch.no_grad()
    def think(
        self, rows, features, plans, g2tr_mode, max_think_tokens, show_progress=True
    ) -> tuple[str, list[list[int]]]:
        """CoT mode: the conditional row (without `<img>`) writes up to `max_think_tokens` tokens greedily, stopping
        at `<|im_end|>` or `<img>`. Returns the text and the ids each row gets before its `<img>`: the written
        tokens (kept as ids) for the conditional row, nothing for the others.

        `g2tr_mode="official"` also reproduces the official cut, which drops the token before the stop token (two
        tokens when no stop token came)."""
        config = self.model.config
        input_ids, attention_mask = self._row_ids(rows[:1])
        embeds, attention_mask, _, _ = self._embed_rows(
            input_ids, attention_mask, features, plans, g2tr_mode, image_rows=1 if features is not None else 0
        )
        cache = DynamicCache(config=config.get_text_config())
        _, last, _ = self._run_language_model(embeds, attention_mask, cache=(cache, attention_mask[:, :0]))
        stops = {config.im_end_token_id, config.image_start_token_id}
        embed_tokens = self._base.get_input_embeddings()
        offset = attention_mask.long().sum(-1)
        seen = attention_mask
        tokens, stopped = [], False
        with self.progress_bar(total=max_think_tokens, disable=not show_progress) as progress:
            progress.set_description("thinking")
            for step in range(max_think_tokens):
                token = int(self.model.lm_head(last[:, -1]).argmax(-1)[0])
                progress.update()
                if token in stops:
                    stopped = True
                    break
                tokens.append(token)
                if step == max_think_tokens - 1:
                    break  # the cap: no need to run the last token
                step_mask = torch.ones(1, 1, dtype=torch.bool, device=self.device)
                _, last, _ = self._run_language_model(
                    embed_tokens(torch.tensor([[token]], device=self.device)), step_mask, cache=(cache, seen),
                    offset=offset,
                )  # fmt: skip
                seen = torch.cat([seen, step_mask], dim=-1)
                offset = offset + 1
        if g2tr_mode == "official":
            tokens = tokens[: max(0, len(tokens) - (1 if stopped else 2))]
        start = self.tokenizer.convert_tokens_to_ids("<img>")
        return self.tokenizer.decode(tokens), [tokens + [start], [start], [start]]

    def latent_shape(self, target: tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w): one image's latent on the generated grid `target` (H, W) (`latents=`, `output_type="latent"`)."""
        config = self.generation_decoder.config
        factor = config.vae_downsample_factor
        return config.latent_channels, target[0] // factor, target[1] // factor

    def prepare_latents(self, shape: tuple[int, int, int], generator: torch.Generator | None) -> torch.Tensor:
        """Initial noise [C, h, w] (fp32) drawn as the official pipeline draws its [1, C, h, w] (`randn_tensor`)."""
        return randn_tensor((1, *shape), generator=generator, device=self.device, dtype=torch.float32)[0]

    def denoise(
        self,
        conditionings: list[MMDiTConditioning],
        latents: list[torch.Tensor],
        num_inference_steps: int,
        timestep_shift: float,
        timestep_trunc: float,
        text_scale: float,
        image_scale: float,
        show_progress: bool,
        callback: Callable | None = None,
        callback_inputs: list[str] = (),
    ) -> list[torch.Tensor]:
        """DPM-Solver++ (a fresh scheduler per image with `flow_shift=timestep_shift`) from each image's noise
        [C, h, w] (fp32), the images in lock-step: returns their final latents [C, h, w]."""
        schedulers = []
        for _ in latents:
            scheduler = DPMSolverMultistepScheduler.from_config(self.scheduler.config, flow_shift=timestep_shift)
            scheduler.set_timesteps(num_inference_steps, device=self.device)
            schedulers.append(scheduler)
        timesteps = schedulers[0].timesteps
        shapes = [tuple(latent.shape) for latent in latents]
        latents = [latent[None] for latent in latents]
        with self.progress_bar(total=len(timesteps), disable=not show_progress) as progress:
            for step, timestep in enumerate(timesteps):
                renormalize = timestep_trunc > 0 and bool(timestep > timestep_trunc)
                for index, (conditioning, scheduler) in enumerate(zip(conditionings, schedulers)):
                    velocity = self.generation_decoder(
                        latents[index].repeat(3, 1, 1, 1), timestep.expand(3), conditioning
                    ).float()
                    conditional, image_only, unconditional = velocity.chunk(3)
                    guided = guided_velocity(
                        conditional, image_only, unconditional, text_scale, image_scale, renormalize=renormalize
                    )
                    latents[index] = scheduler.step(guided, timestep, latents[index], return_dict=False)[0]
                if callback is not None:
                    available = {"latents": [latent[0] for latent in latents]}
                    returned = callback(self, step, timestep, {name: available[name] for name in callback_inputs})
                    if returned is not None and "latents" in returned:
                        replaced = check_latents(returned["latents"], shapes, name="callback_on_step_end")
                        latents = [latent.to(device=self.device, dtype=torch.float32)[None] for latent in replaced]
                progress.update()
                if self.interrupt:
                    break
        return [latent[0] for latent in latents]

    def postprocess(self, latents: torch.Tensor, requested: tuple[int, int], output_type: str):
        """One image's latents [1, C, h, w]: VAE decode, then the official uint8 mapping
        clamp((127.5 x + 128) / 255, 0, 1) * 255 (truncated) and a LANCZOS resize to the requested (H, W) when it
        differs; or the [0, 1] float tensor [3, H, W] for `"pt"` (bicubic resize), or its array [H, W, 3] for
        `"np"`."""
        vae = self.model.vae
        z = latents.to(device=self.device, dtype=vae.dtype)[:, :, None]
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        pixels = vae.decode(z / inverse_std + mean, return_dict=False)[0][:, :, 0]
        pixels = ((127.5 * pixels[0].float() + 128.0) / 255).clamp(0, 1).cpu()
        if output_type in ("pt", "np"):
            if tuple(pixels.shape[-2:]) != requested:
                pixels = torch.nn.functional.interpolate(pixels[None], size=requested, mode="bicubic")[0].clamp(0, 1)
            return convert_images([pixels], output_type)[0]
        image = PIL.Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        if image.size != (requested[1], requested[0]):
            image = image.resize((requested[1], requested[0]), PIL.Image.Resampling.LANCZOS)
        return image

    # --- inputs ---------------------------------------------------------------------------------------------------

    def check_inputs(
        self, prompt, image, num_inference_steps, generator, g2tr_ratio, cfg_text_scale, cfg_img_scale,
        timestep_shift, timestep_trunc, height, width, think, max_think_tokens, g2tr_mode, output_type,
        num_images_per_prompt: int = 1, return_dict: bool = True,
    ) -> tuple[list[_Request], list[torch.Generator | None]]:  # fmt: skip
        """Validate every argument (a `ValueError` names the one at fault) and split the call into requests.
        Returns the requests and one generator (or None) per generated image, prompt by prompt."""
        if isinstance(prompt, str):
            prompts, row_images = [prompt], [image]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
            if image is None:
                row_images = [None] * len(prompts)
            elif isinstance(image, (list, tuple)) and len(image) == len(prompts):
                row_images = list(image)
            else:
                raise ValueError(
                    f"`image`: with {len(prompts)} prompts, pass None or a list with one entry per prompt (None, an "
                    f"image or a list of images), got {type(image).__name__}."
                )
        else:
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
        images_per_row = [self._check_images(entry) for entry in row_images]
        for text, images in zip(prompts, images_per_row):
            if text.count(IMAGE_PLACEHOLDER) > len(images):
                raise ValueError(
                    f"`prompt` {text!r} has {text.count(IMAGE_PLACEHOLDER)} `<image>` placeholders but {len(images)} "
                    "input image(s) were given."
                )
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        num_images_per_prompt = check_num_images_per_prompt(num_images_per_prompt)
        generators = expand_generators(generator, len(prompts), num_images_per_prompt)
        if g2tr_ratio is not None and not (_is_number(g2tr_ratio) and 0.0 < g2tr_ratio <= 1.0):
            raise ValueError(f"`g2tr_ratio` must be a number in (0, 1] (1.0 = no reduction), got {g2tr_ratio!r}.")
        for name, value in (("cfg_text_scale", cfg_text_scale), ("cfg_img_scale", cfg_img_scale)):
            if value is not None and not (_is_number(value) and value >= 0.0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if not (_is_number(timestep_shift) and timestep_shift > 0.0):
            raise ValueError(f"`timestep_shift` must be a finite number > 0, got {timestep_shift!r}.")
        if not _is_number(timestep_trunc):
            raise ValueError(f"`timestep_trunc` must be a finite number (<= 0 turns the renormalisation off), got "
                             f"{timestep_trunc!r}.")  # fmt: skip
        stride = self.generation_decoder.config.vae_downsample_factor * self.generation_decoder.config.patch_size
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < stride):
                raise ValueError(f"`{name}` must be an integer >= {stride} (floored to a multiple of {stride}), got "
                                 f"{value!r}.")  # fmt: skip
        if not isinstance(think, bool):
            raise ValueError(f"`think` must be a bool, got {think!r}.")
        if not isinstance(max_think_tokens, int) or isinstance(max_think_tokens, bool) or max_think_tokens < 1:
            raise ValueError(f"`max_think_tokens` must be an integer >= 1, got {max_think_tokens!r}.")
        if g2tr_mode not in G2TR_MODES:
            raise ValueError(f"`g2tr_mode` must be one of {list(G2TR_MODES)}, got {g2tr_mode!r}.")
        check_output_type(output_type)
        check_return_dict(return_dict)
        return [_Request(p, i) for p, i in zip(prompts, images_per_row)], generators

    @staticmethod
    def _check_images(entry: Any) -> list[PIL.Image.Image]:
        images = check_input_images(entry)
        try:
            return [to_rgb_image(item) for item in images]
        except ValueError as error:
            raise ValueError(str(error).replace("`images`", "`image`")) from error

    # --- transformers.Pipeline plumbing ---------------------------------------------------------------------------

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """The model, processor, generation decoder (`generation_decoder/`) and scheduler (`scheduler/`). For a folder
        that also loads with `pipeline(..., trust_remote_code=True)` where g2tr_hf is not installed, use
        `g2tr_hf.hub.export(model, processor, folder, generation_decoder=..., scheduler=...)`."""
        super().save_pretrained(save_directory, **kwargs)
        self.generation_decoder.save_pretrained(f"{save_directory}/generation_decoder")
        self.scheduler.save_pretrained(f"{save_directory}/scheduler")

    def preprocess(self, *args, **kwargs):  # transformers.Pipeline's abstract steps: __call__ does the work
        raise NotImplementedError("G2TRInternVLUPipeline runs through __call__.")

    def _forward(self, *args, **kwargs):
        raise NotImplementedError("G2TRInternVLUPipeline runs through __call__.")

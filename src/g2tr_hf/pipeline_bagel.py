"""`G2TRBagelPipeline`: image editing and text-to-image with BAGEL-7B-MoT and G2TR token reduction.

The algorithm is the official inferencer's (ByteDance-Seed/Bagel `inferencer.py` and `Bagel.generate_image`; with
G2TR as in the official G2TR code's editing mode, see `docs/models.md`), for each request (batches: below):

1. Context. Every input image enters the conditional context twice: first as a clean VAE block (t = 0, generation
   expert, never reduced, h*w + 2 tokens at one RoPE position), then as its ViT block, which G2TR reduces to K + 2
   tokens with anchors built from the SAME latent. Each input image is therefore encoded exactly once by
   `model.vae.encode` (the official G2TR code encodes it a second time for the anchors), and with the posterior MEAN,
   so that a seed fully determines the result (upstream samples the posterior of the context image). Then the
   instruction `<|im_start|> prompt <|im_end|>`. Think mode puts the planning system prompt first and appends the
   plan the model writes after the instruction.
2. The two CFG contexts. "No text": the conditional context as it was before the instruction (upstream deep-copies
   it; here it is a prefix of the conditional cache, so nothing is copied). "No image": the text inputs alone
   (system prompt and instruction) in a small cache of their own.
3. Rectified flow. N points of the shifted schedule t' = s t / (1 + (s - 1) t) over t = linspace(1, 0, N), and
   N - 1 Euler steps x <- x - v (t_i - t_{i+1}) from noise (t = 1) to data (t = 0), v = noise - x0 read by `llm2vae`
   from the generation expert. While cfg_interval[0] < t <= cfg_interval[1], text and image guidance with
   CFG-renorm (`classifier_free_guidance`). Denoising queries read the caches and never write them.
4. VAE decode.

Loading from a Hub folder (its `config.json` lists this class under `custom_pipelines`):

    from transformers import pipeline

    pipe = pipeline(model="REPO", trust_remote_code=True)
    image = pipe(prompt="make the sky pink", image=Image.open("in.png"), g2tr_ratio=0.5).images[0]

Batches (upstream is batch 1). Several prompts, each with its own input images (any number and size, or none), and
`num_images_per_prompt` images per prompt run through ONE denoising loop: every step is one decoder pass over all
images and all their CFG branches. The contexts are prefilled prompt by prompt (their layouts differ in the number,
size and order of blocks, and the prefill is about 1% of an edit's work), then stacked into one cache with a row per
prompt: [conditional context | image-free context], each part right-padded, and every branch of every image reads
its window of its prompt's row (the text-free context is the conditional one's prefix). Images of different output
sizes are padded: the query blocks are left-padded to the longest and the padding is masked out (a padded query sees
only itself, no query sees padding), so one pass serves every size; the VAE decodes images of one size together.
Each image equals its single run up to floating-point reordering (tested at fp32 to 1e-5).

Deviations from upstream, all deliberate: the posterior mean for context images (above); the image-CFG branch is not
evaluated at steps where text CFG is off (upstream computes it and throws it away); the guidance arithmetic and the
Euler update run in fp32 (upstream: bf16 under autocast).

The diffusers options (`num_images_per_prompt`, `latents`, `callback_on_step_end`, `output_type`, `return_dict`,
`enable_model_cpu_offload`) follow `pipeline_utils`, shared with the other G2TR pipelines.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any

import PIL.Image
import torch
from transformers import DynamicCache, Pipeline
from transformers.utils import logging

from .generation_g2tr import CacheLayout, as_compact_cache, stored_length
from .in_llm import refuse_in_llm_methods
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


logger = logging.get_logger(__name__)

__all__ = [
    "CFG_RENORM_TYPES",
    "EDIT_GUIDANCE",
    "G2TRBagelPipeline",
    "G2TRBagelPipelineOutput",
    "GuidanceSettings",
    "PIPELINE_TASK",
    "TEXT_TO_IMAGE_GUIDANCE",
    "classifier_free_guidance",
    "custom_pipelines_config",
    "flow_timesteps",
]

# The task name under which an exported folder's `config.custom_pipelines` lists this class.
PIPELINE_TASK = "g2tr-bagel-image-generation"

# The planning system prompt of upstream's think mode for image generation (`GEN_THINK_SYSTEM_PROMPT`,
# inferencer.py). It is model input, so it is reproduced character for character (note the space before the newline).
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> "
    "image here"
)

CFG_RENORM_TYPES = ("global", "channel", "text_channel")


@dataclass(frozen=True)
class GuidanceSettings:
    """Classifier-free guidance of one request.

    Attributes:
        text_scale: `cfg_text_scale` (guidance away from the context without the instruction); <= 1 turns CFG off.
        image_scale: `cfg_img_scale` (guidance away from the context without the images); <= 1 skips that branch.
        interval: `cfg_interval` (lo, hi): guidance is on at the steps with lo < t <= hi.
        renorm_type: `cfg_renorm_type`, one of `CFG_RENORM_TYPES`.
        renorm_min: `cfg_renorm_min`, the lower clamp of the renorm factor.
    """

    text_scale: float
    image_scale: float
    interval: tuple[float, float]
    renorm_type: str
    renorm_min: float


# The official recommended settings (upstream's notebook and README).
EDIT_GUIDANCE = GuidanceSettings(
    text_scale=4.0, image_scale=2.0, interval=(0.0, 1.0), renorm_type="text_channel", renorm_min=0.0
)
TEXT_TO_IMAGE_GUIDANCE = GuidanceSettings(
    text_scale=4.0, image_scale=1.0, interval=(0.4, 1.0), renorm_type="global", renorm_min=0.0
)


def custom_pipelines_config() -> dict[str, dict[str, Any]]:
    """The `config.custom_pipelines` entry that makes `pipeline(model=folder, trust_remote_code=True)` build this
    pipeline from a folder that ships this file next to the model's remote code."""
    return {
        PIPELINE_TASK: {
            "impl": f"{__name__.rsplit('.', 1)[-1]}.G2TRBagelPipeline",
            "pt": ["AutoModelForImageTextToText"],
            "type": "multimodal",
        }
    }


def flow_timesteps(num_inference_steps: int, timestep_shift: float) -> torch.Tensor:
    """The shifted rectified-flow schedule of upstream `generate_image`: [N] float32, from 1 to 0,

        t = linspace(1, 0, N),   t' = s * t / (1 + (s - 1) * t).

    Euler step i goes from t'[i] to t'[i + 1], so N points give N - 1 model evaluations (50 -> 49)."""
    timesteps = torch.linspace(1, 0, num_inference_steps)
    return timestep_shift * timesteps / (1 + (timestep_shift - 1) * timesteps)


def _renorm_factor(reference: torch.Tensor, guided: torch.Tensor, per_token: bool, renorm_min: float) -> torch.Tensor:
    """clamp(||reference|| / (||guided|| + 1e-8), renorm_min, 1): the norm over the whole tensor, or over each
    token's channels (last dim) when `per_token`."""
    if per_token:
        reference_norm = reference.norm(dim=-1, keepdim=True)
        guided_norm = guided.norm(dim=-1, keepdim=True)
    else:
        reference_norm, guided_norm = reference.norm(), guided.norm()
    return (reference_norm / (guided_norm + 1e-8)).clamp(min=renorm_min, max=1.0)


def classifier_free_guidance(
    velocity: torch.Tensor,
    velocity_no_text: torch.Tensor | None,
    velocity_no_image: torch.Tensor | None,
    *,
    text_scale: float,
    image_scale: float,
    renorm_type: str,
    renorm_min: float,
) -> torch.Tensor:
    """BAGEL's two-signal classifier-free guidance with CFG-renorm (upstream `_forward_flow`).

    With `st = text_scale`, `si = image_scale`, `m = renorm_min`:

        text_channel:     vt = v_nt + st (v - v_nt);  vt *= clamp(|v|_tok / |vt|_tok, m, 1);
                          result = v_ni + si (vt - v_ni) if si > 1 else vt
        global / channel: vt = v_nt + st (v - v_nt);  g = v_ni + si (vt - v_ni) if si > 1 else vt;
                          result = g * clamp(|v| / |g|, m, 1)   (norm over everything / per token)

    Args:
        velocity: [n, c] conditional velocity.
        velocity_no_text: [n, c] from the context without the instruction (None only when `text_scale <= 1`).
        velocity_no_image: [n, c] from the context without the images (None when `image_scale <= 1`).
    Returns:
        [n, c]; `velocity` itself when `text_scale <= 1` (upstream then ignores the image branch as well).
    """
    if text_scale <= 1.0:
        return velocity
    if renorm_type not in CFG_RENORM_TYPES:
        raise ValueError(f"`cfg_renorm_type` must be one of {list(CFG_RENORM_TYPES)}, got {renorm_type!r}.")
    use_image = image_scale > 1.0 and velocity_no_image is not None
    guided = velocity_no_text + text_scale * (velocity - velocity_no_text)
    if renorm_type == "text_channel":
        guided = guided * _renorm_factor(velocity, guided, per_token=True, renorm_min=renorm_min)
        if use_image:
            guided = velocity_no_image + image_scale * (guided - velocity_no_image)
        return guided
    if use_image:
        guided = velocity_no_image + image_scale * (guided - velocity_no_image)
    return guided * _renorm_factor(velocity, guided, per_token=renorm_type == "channel", renorm_min=renorm_min)


@dataclass
class G2TRBagelPipelineOutput:
    """Output of [`G2TRBagelPipeline`].

    Attributes:
        images: one per generated image, prompt by prompt (`num_images_per_prompt` each): PIL images
            (`output_type="pil"`), float arrays [H, W, 3] in [0, 1] (`"np"`), float tensors [3, H, W] in [0, 1]
            (`"pt"`), or the final latent tokens [h*w, p*p*C] (`"latent"`, the format `latents=` takes).
        thoughts: per image, the plan its prompt wrote in think mode (None without think mode).
    """

    images: list[Any]
    thoughts: list[str | None]

    def to_tuple(self) -> tuple[list[Any], list[str | None]]:
        return self.images, self.thoughts


@dataclass
class _Request:
    """One prompt with its input images (none for text-to-image) and its guidance settings."""

    prompt: str
    images: list[Any]
    guidance: GuidanceSettings


@dataclass
class _Contexts:
    """One prompt's three KV contexts, each `(cache, visible length)` (None = the whole cache)."""

    conditional: tuple[DynamicCache, int | None]
    no_text: tuple[DynamicCache, int]
    no_image: tuple[DynamicCache, int | None]


@dataclass
class _StackedContexts:
    """The contexts of every prompt in one cache, a row per prompt: [conditional | image-free], each part
    right-padded; the padding is marked in the cache layout. Each CFG branch is a window of its prompt's row.

    Attributes:
        cache: the stacked `DynamicCache` [N, H_kv, P_cond + P_free, D] per layer, compact, with its layout.
        conditional, no_text, no_image: [N, P_cond + P_free] bool, the entries each branch of prompt n may see.
    """

    cache: DynamicCache
    conditional: torch.Tensor
    no_text: torch.Tensor
    no_image: torch.Tensor


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def stack_contexts(contexts: list[_Contexts], text_config) -> _StackedContexts:
    """Copy every prompt's conditional and image-free caches (batch 1 each) into one cache with a row per prompt.

    Row n holds [conditional_n, padding | image-free_n, padding]: the conditional parts are right-padded to the
    longest one, P_cond, and the image-free parts start at column P_cond. Positions and real-entry marks come from the
    caches' layouts, so each window keeps its own RoPE positions."""
    conditional = [context.conditional[0] for context in contexts]
    image_free = [context.no_image[0] for context in contexts]
    cond_lengths = [stored_length(cache) for cache in conditional]
    free_lengths = [stored_length(cache) for cache in image_free]
    cond_width, free_width = max(cond_lengths), max(free_lengths)
    width = cond_width + free_width
    stacked = DynamicCache(config=text_config)
    for layer_idx, layer in enumerate(conditional[0].layers):
        keys = layer.keys.new_zeros(len(contexts), layer.keys.shape[1], width, layer.keys.shape[3])
        values = layer.values.new_zeros(len(contexts), layer.values.shape[1], width, layer.values.shape[3])
        for row, (cond, free) in enumerate(zip(conditional, image_free)):
            for part, offset in ((cond, 0), (free, cond_width)):
                stored = part.layers[layer_idx]
                keys[row, :, offset : offset + stored.keys.shape[2]] = stored.keys[0].to(keys.device)
                values[row, :, offset : offset + stored.values.shape[2]] = stored.values[0].to(values.device)
        stacked.update(keys, values, layer_idx)
    device = conditional[0].layout.attention_mask.device
    real = torch.zeros(len(contexts), width, dtype=torch.bool, device=device)
    positions = torch.zeros(len(contexts), width, dtype=torch.long, device=device)
    for row, (cond, free) in enumerate(zip(conditional, image_free)):
        for part, offset, length in ((cond, 0, cond_lengths[row]), (free, cond_width, free_lengths[row])):
            layout = part.layout.cropped(length)
            real[row, offset : offset + length] = layout.attention_mask[0].to(device)
            positions[row, offset : offset + length] = layout.position_ids[0].to(device)
    as_compact_cache(stacked)
    stacked.layout = CacheLayout(real, positions)
    columns = torch.arange(width, device=device)[None, :]

    def window(starts: list[int], stops: list[int]) -> torch.Tensor:
        starts_t, stops_t = torch.tensor(starts, device=device), torch.tensor(stops, device=device)
        return (columns >= starts_t[:, None]) & (columns < stops_t[:, None])

    no_text_lengths = [context.no_text[1] for context in contexts]
    return _StackedContexts(
        cache=stacked,
        conditional=window([0] * len(contexts), cond_lengths),
        no_text=window([0] * len(contexts), no_text_lengths),
        no_image=window([cond_width] * len(contexts), [cond_width + length for length in free_lengths]),
    )


class G2TRBagelPipeline(PerCallPipelineMixin, ModelCpuOffloadMixin, Pipeline):
    r"""
    Image editing and text-to-image with BAGEL-7B-MoT (`G2TRBagelForConditionalGeneration`), the input images' ViT
    tokens reduced by G2TR (see the module docstring for the algorithm).

    Build it from a model and its processor, `G2TRBagelPipeline(model=model, processor=processor)`, or from an
    exported Hub folder with `transformers.pipeline(model=folder, trust_remote_code=True)`. Like every transformers
    pipeline it places the model on `device` (default: the first GPU when there is one);
    `enable_model_cpu_offload()` keeps it on the CPU instead and moves the ViT, the language model and the VAE to
    the accelerator only while each is needed.

    Example:

    ```python
    >>> from g2tr_hf import G2TRBagelPipeline, build_tiny
    >>> model, processor = build_tiny("bagel")
    >>> pipe = G2TRBagelPipeline(model=model, processor=processor, device="cpu")
    >>> pipe(prompt="a red car", num_inference_steps=4, height=32, width=32).images[0].size
    (32, 32)
    ```
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    # Model CPU offload (`pipeline_utils.ModelCpuOffloadMixin`): the three large parts are chained as in diffusers;
    # the word embeddings (called on their own, for image markers and text) and the LM head load when used.
    model_cpu_offload_seq = "model.vit_model->model.language_model->model.vae"
    _offload_on_use = ("model.language_model.embed_tokens", "lm_head")
    _callback_tensor_inputs = ["latents"]

    def __init__(self, model, processor=None, **kwargs) -> None:
        if processor is None:
            raise ValueError("`processor` is required: the model's G2TRBagelProcessor (tokenizer + image processor).")
        self._progress_bar_config: dict[str, Any] = {}
        self._interrupt = False
        device_map = getattr(model, "hf_device_map", None)
        if device_map and next(iter(device_map.values())) == "disk":
            # transformers' Pipeline takes the first device of an accelerate map as its own, and cannot work on
            # "disk"; list a computing device first (the order of the map means nothing else once hooks are set).
            computing = [key for key, device in device_map.items() if device != "disk"]
            model.hf_device_map = {key: device_map[key] for key in [*computing, *device_map]}
        super().__init__(model=model, processor=processor, **kwargs)

    # --- the algorithm --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: Any = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        g2tr_ratio: float | None = None,
        cfg_text_scale: float | None = None,
        cfg_img_scale: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        cfg_renorm_type: str | None = None,
        cfg_renorm_min: float | None = None,
        timestep_shift: float = 3.0,
        height: int | None = None,
        width: int | None = None,
        think: bool = False,
        max_think_tokens: int = 1000,
        show_progress: bool = True,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | list[torch.Tensor] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        return_dict: bool = True,
    ) -> G2TRBagelPipelineOutput | tuple:
        r"""
        Edit images or generate them from text.

        Args:
            prompt (`str` or `list[str]`): the instruction; a list runs several requests in one batch.
            image (PIL image, numpy array, tensor, path, or a list, *optional*): the input image(s) of an edit; None
                for text-to-image. With one prompt, a list holds that request's input images (they enter the context
                in order). With a list of prompts, a list with one entry per prompt (None, an image or a list of
                images); prompts may mix editing and text-to-image, and input images may differ in size.
            num_inference_steps (`int`, defaults to 50): points on the flow schedule (upstream `num_timesteps`); the
                sampler runs `num_inference_steps - 1` model evaluations. At least 2.
            generator (`torch.Generator` or a list, *optional*): seeds the initial noise: one generator for all
                images (drawn from in turn), or a list with one per image or one per prompt.
            g2tr_ratio (`float`, *optional*): keep ratio of the input images' ViT tokens in (0, 1]; defaults to
                `model.config.g2tr_ratio`. 1.0 leaves them unreduced.
            cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min (*optional*): guidance;
                each defaults to the official recommendation for the request's task: edit 4.0 / 2.0 / (0.0, 1.0) /
                "text_channel" / 0.0, text-to-image 4.0 / 1.0 / (0.4, 1.0) / "global" / 0.0. A scale <= 1 skips its
                branch.
            timestep_shift (`float`, defaults to 3.0): the schedule's shift s.
            height, width (`int`, *optional*): output size of the text-to-image prompts, multiples of 16; defaults
                to the largest square `latent_pos_embed` covers (1024 x 1024 for BAGEL-7B-MoT). An edit keeps the
                VAE-resized size of its (last) input image.
            think (`bool`, defaults to False): upstream's think mode: a planning system prompt, then a plan the model
                writes (greedy decoding) before the image.
            max_think_tokens (`int`, defaults to 1000): length cap of the plan, counted as upstream (the
                `<|im_start|>` seed included).
            show_progress (`bool`, defaults to True): progress bars over the denoising steps (and the planning tokens
                in think mode).
            output_type (`str`, defaults to "pil"): "pil", "np" (float [H, W, 3] in [0, 1]), "pt" (float tensors
                [3, H, W] in [0, 1]) or "latent" (the final latent tokens [h*w, p*p*C], not decoded).
            num_images_per_prompt (`int`, defaults to 1): images per prompt; they share the prompt's contexts.
            latents (`torch.Tensor` or a list, *optional*): the initial noise instead of drawing it: one tensor
                [h*w, p*p*C] per image (h, w: the output's latent grid, 1/16 of its pixels; p*p*C = 64 for BAGEL),
                as a list, stacked [num_images, h*w, p*p*C] when all share a size, or alone for a single image.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, step, timestep, callback_kwargs) -> dict`, called
                after each denoising step with the tensors named in `callback_on_step_end_tensor_inputs`; a "latents"
                entry in the returned dict replaces the latents (a list as in `latents=`). Setting
                `pipe._interrupt = True` stops the loop.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to ["latents"]): names from
                `_callback_tensor_inputs`.
            return_dict (`bool`, defaults to True): False returns the tuple `(images, thoughts)`.
        Returns:
            [`G2TRBagelPipelineOutput`] with `.images` (one per image, prompt by prompt) and `.thoughts`, or a tuple.
        """
        # 1. Check the inputs; every request gets its task's recommended guidance unless it is overridden.
        requests, generators = self.check_inputs(
            prompt, image, num_inference_steps, generator, g2tr_ratio, cfg_text_scale, cfg_img_scale, cfg_interval,
            cfg_renorm_type, cfg_renorm_min, timestep_shift, height, width, think, max_think_tokens, output_type,
            num_images_per_prompt=num_images_per_prompt, return_dict=return_dict,
        )  # fmt: skip
        if any(request.images for request in requests):
            refuse_in_llm_methods(self.model.config, g2tr_ratio, "editing")
        callback, callback_inputs = check_callback(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        self._interrupt = False
        # 2. The shifted schedule: N points from t = 1 (noise) to t = 0 (data), N - 1 Euler steps.
        timesteps = flow_timesteps(num_inference_steps, timestep_shift)
        step_sizes = timesteps[:-1] - timesteps[1:]
        # 3. Model inputs, and the output's latent grid of every image (prompt by prompt, `num_images_per_prompt`
        #    each); user latents must match those grids.
        model_inputs = [self.preprocess(request) for request in requests]
        prompt_of_image = [index for index in range(len(requests)) for _ in range(num_images_per_prompt)]
        latent_grids = [self.output_latent_grid(model_inputs[index], height, width) for index in prompt_of_image]
        user_latents = check_latents(latents, [self.latent_shape(grid) for grid in latent_grids])

        try:
            # 4. The contexts of each prompt: each input image as a clean VAE block, then its G2TR-reduced ViT block
            #    built from the same latent; then the instruction; the two CFG contexts (without the text, without
            #    the images). Think mode: the model writes a plan, which joins the conditional context only. Then
            #    all prompts' contexts go into one stacked cache.
            contexts, thoughts = [], []
            for inputs in model_inputs:
                contexts.append(self.encode_context(inputs, g2tr_ratio, think))
                thoughts.append(self.think(contexts[-1], max_think_tokens, show_progress) if think else None)
            stacked = stack_contexts(contexts, self.model.config.get_text_config())
            del contexts
            # 5. The initial noise on every image's latent grid.
            if user_latents is None:
                latents = [self.prepare_latents(grid, gen) for grid, gen in zip(latent_grids, generators)]
            else:
                latents = [tensor.to(device=self.device, dtype=torch.float32) for tensor in user_latents]
            guidance = [requests[index].guidance for index in prompt_of_image]
            # 6. The denoising loop: one pass for every image and CFG branch per step, Euler update x <- x - v dt.
            with self.progress_bar(total=len(step_sizes), disable=not show_progress) as progress:
                for step, (t, dt) in enumerate(zip(timesteps[:-1], step_sizes)):
                    velocities = self._forward(latents, t, latent_grids, stacked, guidance, prompt_of_image)
                    latents = [x - v * dt for x, v in zip(latents, velocities)]
                    if callback is not None:
                        latents = self._run_callback(callback, callback_inputs, step, t, latents, latent_grids)
                    progress.update()
                    if self.interrupt:
                        break
            # 7. Decode the latents to pixels.
            images = latents if output_type == "latent" else self.postprocess(latents, latent_grids, output_type)
        finally:
            self.maybe_free_model_hooks()
        output = G2TRBagelPipelineOutput(images=images, thoughts=[thoughts[index] for index in prompt_of_image])
        return output if return_dict else output.to_tuple()

    # --- steps ----------------------------------------------------------------------------------------------------

    def preprocess(self, request: _Request) -> dict[str, Any]:
        """One request -> model inputs: per input image the processor's tensors (VAE image, ViT patches, ids, grid;
        the official VAE-then-ViT resizes) on the pipeline's device, and the instruction's ids
        `<|im_start|> prompt <|im_end|>` [1, L]."""
        images = []
        for index, image in enumerate(request.images):
            features = self.processor.image_processor(images=[image], return_tensors="pt")
            if features["image_grid_hw"].shape[0] != 1:
                raise ValueError(f"`image`: entry {index} holds several images; pass one image per entry.")
            images.append({key: value.to(self.device) for key, value in features.items()})
        return {"images": images, "input_ids": self._text_segment(request.prompt)}

    @torch.no_grad()
    def encode_context(self, model_inputs: dict[str, Any], g2tr_ratio: float | None, think: bool) -> _Contexts:
        """Prefill the conditional context and the image-free CFG context; the text-free one is a prefix.

        Per input image: ONE `model.vae.encode` (posterior mean), whose latent is both the VAE block and the G2TR
        anchors of the ViT block."""
        text_config = self.model.config.get_text_config()
        conditional, no_image = DynamicCache(config=text_config), DynamicCache(config=text_config)
        if think:
            system_prompt = self._text_segment(GEN_THINK_SYSTEM_PROMPT)
            self.model.prefill_text(system_prompt, conditional)
            self.model.prefill_text(system_prompt, no_image)
        for image in model_inputs["images"]:
            latents = self.model.encode_vae_latents(image["vae_pixel_values"], image["vae_image_hw"])[0]
            self.model.prefill_vae_image(latents, conditional)
            self.model.prefill_vit_image(
                image["pixel_values"],
                image["image_position_ids"],
                image["image_grid_hw"],
                conditional,
                latents=latents,
                g2tr_ratio=g2tr_ratio,
            )
        # Upstream deep-copies the conditional context here, before the instruction; a prefix of it is the same.
        no_text_length = stored_length(conditional)
        self.model.prefill_text(model_inputs["input_ids"], conditional)
        self.model.prefill_text(model_inputs["input_ids"], no_image)
        return _Contexts(
            conditional=(conditional, None), no_text=(conditional, no_text_length), no_image=(no_image, None)
        )

    @torch.no_grad()
    def think(self, contexts: _Contexts, max_think_tokens: int, show_progress: bool = True) -> str:
        """Upstream think mode: greedy decoding from `<|im_start|>` on a copy of the conditional context until
        `<|im_end|>`; the decoded plan then enters the conditional context as a text segment. A progress bar counts
        the planning tokens (up to `max_think_tokens`; it can take minutes at full size)."""
        conditional, _ = contexts.conditional
        scratch = copy.deepcopy(conditional)
        im_start, im_end = self.processor.im_start_token_id, self.processor.im_end_token_id
        tokens = [im_start]
        with self.progress_bar(total=max_think_tokens - 1, disable=not show_progress) as progress:
            progress.set_description("thinking")
            for _ in range(max_think_tokens - 1):
                logits = self.model.prefill_text(torch.tensor([[tokens[-1]]], device=self.device), scratch)
                next_token = int(logits.argmax(-1)[0])
                progress.update()
                if next_token == im_end:
                    break
                tokens.append(next_token)
        # Upstream's extraction: the text between the seed and the first `<|im_end|>`.
        text = self.tokenizer.decode(tokens)
        thought = text.split(self.processor.im_end_token)[0].split(self.processor.im_start_token)[1]
        self.model.prefill_text(self._text_segment(thought), conditional)
        return thought

    def output_latent_grid(
        self, model_inputs: dict[str, Any], height: int | None, width: int | None
    ) -> tuple[int, int]:
        """(h, w) latent tokens of the output: the VAE-resized size of the last input image for an edit (upstream
        `image_shapes`), else `height` x `width` (default: the largest square the latent position table covers)."""
        stride = self.model.latent_downsample
        if model_inputs["images"]:
            vae_height, vae_width = model_inputs["images"][-1]["vae_image_hw"][0].tolist()
            return vae_height // stride, vae_width // stride
        default = min(1024, self.model.config.max_latent_size * stride)
        return (height or default) // stride, (width or default) // stride

    def latent_shape(self, latent_grid: tuple[int, int]) -> tuple[int, int]:
        """(h*w, p*p*C): the shape of one image's latent tokens (`latents=`, `output_type="latent"`)."""
        config = self.model.config
        return latent_grid[0] * latent_grid[1], config.latent_patch_size**2 * config.vae_config["latent_channels"]

    def prepare_latents(self, latent_grid: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
        """Initial noise x_1 ~ N(0, 1): [h*w, p*p*C] float32, drawn on the generator's device (CPU by default, as
        upstream's `torch.randn`) and moved to the model."""
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(self.latent_shape(latent_grid), generator=generator, device=device, dtype=torch.float32)
        return noise.to(self.device)

    def _forward(
        self,
        latents: list[torch.Tensor],
        timestep: torch.Tensor,
        latent_grids: list[tuple[int, int]],
        contexts: _StackedContexts,
        guidance: list[GuidanceSettings],
        prompt_of_image: list[int],
    ) -> list[torch.Tensor]:
        """The model work of one denoising step for every image: the guided velocities [h*w, p*p*C] (fp32).

        Image i always runs its conditional branch, its text-free branch while its guidance is on (lo < t <= hi) and
        its `cfg_text_scale` > 1, and its image-free one when its `cfg_img_scale` > 1 as well. All those branches go
        through the decoder as one batch: each is image i's query block (shared by its branches) against its window
        of its prompt's row of the stacked cache."""
        branch_images, branch_windows, scales = [], [], []
        for image_index, settings in enumerate(guidance):
            low, high = settings.interval
            guidance_on = bool(timestep > low) and bool(timestep <= high)
            text_scale = settings.text_scale if guidance_on else 1.0
            image_scale = settings.image_scale if guidance_on else 1.0
            windows = [contexts.conditional]
            if text_scale > 1.0:
                windows.append(contexts.no_text)
                if image_scale > 1.0:
                    windows.append(contexts.no_image)
            prompt_index = prompt_of_image[image_index]
            branch_images += [image_index] * len(windows)
            branch_windows += [window[prompt_index] for window in windows]
            scales.append((text_scale, image_scale))
        queries, query_mask = self.model.embed_latent_queries(latents, timestep, latent_grids)
        branch_rows = torch.tensor(branch_images, device=queries.device)
        context_rows = torch.tensor([prompt_of_image[index] for index in branch_images], device=queries.device)
        output = self.model.flow_velocities(
            queries.index_select(0, branch_rows),
            query_mask.index_select(0, branch_rows),
            contexts.cache,
            torch.stack(branch_windows),
            context_rows=context_rows,
        )
        length = output.shape[1]
        velocities, row = [], 0
        for image_index, settings in enumerate(guidance):
            text_scale, image_scale = scales[image_index]
            num_branches = 1 + (text_scale > 1.0) + (text_scale > 1.0 and image_scale > 1.0)
            # The latent tokens of a left-padded block are its last h*w + 1 entries but the end marker.
            tokens = latents[image_index].shape[0]
            branches = [output[row + b, length - 1 - tokens : length - 1].float() for b in range(num_branches)]
            branches += [None] * (3 - num_branches)
            row += num_branches
            velocities.append(
                classifier_free_guidance(
                    *branches,
                    text_scale=text_scale,
                    image_scale=image_scale,
                    renorm_type=settings.renorm_type,
                    renorm_min=settings.renorm_min,
                )
            )
        return velocities

    def _run_callback(self, callback, names, step, timestep, latents, latent_grids) -> list[torch.Tensor]:
        """diffusers' `callback_on_step_end`: the named tensors go in; returned "latents" replace the latents."""
        available = {"latents": latents}
        returned = callback(self, step, timestep, {name: available[name] for name in names})
        if returned is None or "latents" not in returned:
            return latents
        replaced = check_latents(
            returned["latents"], [self.latent_shape(grid) for grid in latent_grids], name="callback_on_step_end"
        )
        return [tensor.to(device=self.device, dtype=torch.float32) for tensor in replaced]

    def postprocess(self, latents: list[torch.Tensor], latent_grids: list[tuple[int, int]], output_type: str):
        """VAE decode (images of one size together), then upstream's `(x * 0.5 + 0.5).clamp(0, 1)`, converted to
        `output_type` (PIL: `* 255` truncated to uint8, as upstream)."""
        pixels: list[torch.Tensor | None] = [None] * len(latents)
        for grid in dict.fromkeys(latent_grids):
            members = [index for index, other in enumerate(latent_grids) if other == grid]
            decoded = self.model.decode_latent_tokens(torch.stack([latents[index] for index in members]), grid)
            for index, image in zip(members, decoded.float()):
                pixels[index] = (image * 0.5 + 0.5).clamp(0, 1).cpu()
        return convert_images(pixels, output_type)

    # --- inputs ---------------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        image,
        num_inference_steps,
        generator,
        g2tr_ratio,
        cfg_text_scale,
        cfg_img_scale,
        cfg_interval,
        cfg_renorm_type,
        cfg_renorm_min,
        timestep_shift,
        height,
        width,
        think,
        max_think_tokens,
        output_type,
        num_images_per_prompt: int = 1,
        return_dict: bool = True,
    ) -> tuple[list[_Request], list[torch.Generator | None]]:
        """Validate every argument (a `ValueError` names the one at fault) and split the call into requests.

        Returns:
            the requests (one per prompt) and one generator (or None) per image, prompt by prompt.
        """
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
                    f"image or a list of images), got {type(image).__name__}"
                    + (f" of length {len(image)}." if isinstance(image, (list, tuple)) else ".")
                )
        else:
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
        images_per_row = [check_input_images(entry) for entry in row_images]

        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 2:
            raise ValueError(
                "`num_inference_steps` must be an integer >= 2 (points on the flow schedule, upstream's num_timesteps; "
                f"N points give N - 1 denoising steps), got {num_inference_steps!r}."
            )
        num_images_per_prompt = check_num_images_per_prompt(num_images_per_prompt)
        generators = expand_generators(generator, len(prompts), num_images_per_prompt)
        if g2tr_ratio is not None and not (_is_number(g2tr_ratio) and 0.0 < g2tr_ratio <= 1.0):
            raise ValueError(f"`g2tr_ratio` must be a number in (0, 1] (1.0 = no reduction), got {g2tr_ratio!r}.")
        for name, value in (("cfg_text_scale", cfg_text_scale), ("cfg_img_scale", cfg_img_scale)):
            if value is not None and not (_is_number(value) and value >= 0.0):
                raise ValueError(f"`{name}` must be a finite number >= 0 (<= 1 skips its branch), got {value!r}.")
        if cfg_interval is not None:
            pair = tuple(cfg_interval) if isinstance(cfg_interval, (list, tuple)) else ()
            if len(pair) != 2 or not all(_is_number(v) for v in pair) or not 0.0 <= pair[0] <= pair[1] <= 1.0:
                raise ValueError(
                    f"`cfg_interval` must be a pair (lo, hi) with 0 <= lo <= hi <= 1, got {cfg_interval!r}."
                )
        if cfg_renorm_type is not None and cfg_renorm_type not in CFG_RENORM_TYPES:
            raise ValueError(f"`cfg_renorm_type` must be one of {list(CFG_RENORM_TYPES)}, got {cfg_renorm_type!r}.")
        if cfg_renorm_min is not None and not (_is_number(cfg_renorm_min) and 0.0 <= cfg_renorm_min <= 1.0):
            raise ValueError(f"`cfg_renorm_min` must be a number in [0, 1], got {cfg_renorm_min!r}.")
        if not (_is_number(timestep_shift) and timestep_shift > 0.0):
            raise ValueError(f"`timestep_shift` must be a finite number > 0, got {timestep_shift!r}.")
        if not isinstance(think, bool):
            raise ValueError(f"`think` must be a bool, got {think!r}.")
        if not isinstance(max_think_tokens, int) or isinstance(max_think_tokens, bool) or max_think_tokens < 1:
            raise ValueError(f"`max_think_tokens` must be an integer >= 1, got {max_think_tokens!r}.")
        check_output_type(output_type)
        check_return_dict(return_dict)
        self._check_size(height, width, all(images_per_row))

        requests = []
        for text, images in zip(prompts, images_per_row):
            preset = EDIT_GUIDANCE if images else TEXT_TO_IMAGE_GUIDANCE
            guidance = GuidanceSettings(
                text_scale=float(preset.text_scale if cfg_text_scale is None else cfg_text_scale),
                image_scale=float(preset.image_scale if cfg_img_scale is None else cfg_img_scale),
                interval=tuple(float(v) for v in (preset.interval if cfg_interval is None else cfg_interval)),
                renorm_type=preset.renorm_type if cfg_renorm_type is None else cfg_renorm_type,
                renorm_min=float(preset.renorm_min if cfg_renorm_min is None else cfg_renorm_min),
            )
            requests.append(_Request(prompt=text, images=images, guidance=guidance))
        return requests, generators

    def _check_size(self, height: Any, width: Any, only_edits: bool) -> None:
        """`height` / `width` size the text-to-image prompts of a call (edits keep their input's size), so they are
        refused when every prompt is an edit."""
        stride = self.model.latent_downsample
        largest = self.model.config.max_latent_size * stride
        for name, value in (("height", height), ("width", width)):
            if value is None:
                continue
            if only_edits:
                raise ValueError(
                    f"`{name}` applies to text-to-image only: an edit keeps the VAE-resized size of its input image."
                )
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if not is_int or value % stride or not stride <= value <= largest:
                raise ValueError(
                    f"`{name}` must be a multiple of {stride} in [{stride}, {largest}] (the latent position table "
                    f"covers {self.model.config.max_latent_size} tokens per side), got {value!r}."
                )

    def _text_segment(self, text: str) -> torch.LongTensor:
        """`<|im_start|> text <|im_end|>` as ids [1, L] on the model's device (upstream `prepare_prompts`)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        ids = [self.processor.im_start_token_id, *ids, self.processor.im_end_token_id]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    # --- transformers.Pipeline plumbing ---------------------------------------------------------------------------


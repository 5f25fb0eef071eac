"""The `g2tr-hf demo` job on the embedded default: no download, no weights.

It draws a synthetic scene, builds small ViT-like token features and a VAE-like latent from it, runs the G2TR
reduction exactly as the models call it (BAGEL geometry: a 70x70 ViT grid and a 2x2-patchified, 2x2-pooled 32x32
latent grid), and reports tokens in and kept, and the KV entries and prefill FLOPs of one request at real
BAGEL-7B-MoT shapes. The features are synthetic: the picture shows the mechanics of the selection (one seed per
latent cell, global fill), not what a trained model would keep.

The request is laid out as the processor builds it for `apply_chat_template(..., add_generation_prompt=True)` and as
`benchmarks/bench_bagel_prefill.py` counts it: `<|vision_start|> N image tokens <|vision_end|>`, the question
`<|im_start|> 30 tokens <|im_end|>`, and the `<|im_start|>` that seeds the answer, which is part of the prefill and
so holds a KV entry too: 4900 + 2 + 32 + 1 = 4935 entries unreduced at 1024x1024, 2485 at ratio 0.5.
"""

from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from .profiling import (
    BAGEL_7B_LLM,
    RequestProfile,
    Segment,
    kv_cache_bytes,
    module_flops,
    prefill_flops,
    profile_request,
)
from .reduction import ReductionResult, build_latent_anchors, reduce_tokens


VIT_GRID = 70  # BAGEL: 980 px / 14 px patches
LATENT_SIDE = 128  # BAGEL: 1024 px / 8 (FLUX VAE)
LATENT_CHANNELS = 16
QUESTION_TOKENS = 30


def synthetic_scene(size: int = 1024) -> Image.Image:
    """A sky gradient, a sun, hills and a house: enough structure to make a keep set visible."""
    y = np.linspace(0.0, 1.0, size)[:, None, None]
    sky = (1 - y) * np.array([90, 150, 230]) + y * np.array([200, 225, 250])
    image = Image.fromarray(np.broadcast_to(sky, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    s = size / 1024
    draw.ellipse([760 * s, 90 * s, 900 * s, 230 * s], fill=(250, 210, 60))
    draw.ellipse([-300 * s, 600 * s, 700 * s, 1400 * s], fill=(70, 140, 60))
    draw.ellipse([400 * s, 650 * s, 1400 * s, 1500 * s], fill=(90, 160, 70))
    draw.rectangle([300 * s, 480 * s, 620 * s, 760 * s], fill=(180, 80, 60))
    draw.polygon([(270 * s, 490 * s), (460 * s, 330 * s), (650 * s, 490 * s)], fill=(120, 50, 40))
    draw.rectangle([420 * s, 600 * s, 500 * s, 760 * s], fill=(70, 40, 30))
    return image


def _box_resize(image: Image.Image, side: int) -> torch.Tensor:
    """Area-averaged [side, side, 3] colours in [0, 1]."""
    return torch.from_numpy(np.asarray(image.resize((side, side), Image.BOX), dtype=np.float32) / 255.0)


@dataclass
class SyntheticInputs:
    """Token features on the ViT grid and the latent anchors on the pooled latent grid of one image."""

    features: torch.Tensor  # [70*70, dim]
    anchors: torch.Tensor  # [32*32, dim]
    anchor_grid: tuple[int, int]


def synthetic_inputs(image: Image.Image, dim: int = 256, noise: float = 0.3, seed: int = 0) -> SyntheticInputs:
    """Build ViT-like tokens and VAE-like anchors that live in one feature space.

    A fixed random colour -> 16-channel map plays the VAE encoder and a random Linear(64 -> dim) plays `vae2llm`.
    Each ViT token is `vae2llm` applied to its own 2x2 sub-colours (encoded the same way), plus noise, so its
    cosine with the anchor of its latent cell is high where the cell is uniform and low on detail.
    """
    generator = torch.Generator().manual_seed(seed)
    to_latent = torch.randn(3, LATENT_CHANNELS, generator=generator)
    vae2llm = torch.nn.Linear(4 * LATENT_CHANNELS, dim)
    with torch.no_grad():
        vae2llm.weight.copy_(torch.randn(dim, 4 * LATENT_CHANNELS, generator=generator) / 8.0)
        vae2llm.bias.zero_()

        latent = torch.tanh(_box_resize(image, LATENT_SIDE) @ to_latent).permute(2, 0, 1)  # [16, 128, 128]
        anchors, anchor_grid = build_latent_anchors(latent, patch_size=2, pool=2, project=vae2llm)

        sub = torch.tanh(_box_resize(image, 2 * VIT_GRID) @ to_latent)  # [140, 140, 16]
        sub = sub.reshape(VIT_GRID, 2, VIT_GRID, 2, LATENT_CHANNELS).permute(0, 2, 1, 3, 4)
        features = vae2llm(sub.reshape(VIT_GRID * VIT_GRID, -1))
        features = features + noise * features.std() * torch.randn(features.shape, generator=generator)
    return SyntheticInputs(features, anchors, anchor_grid)


@dataclass
class DemoReport:
    """What `run_demo` measured."""

    result: ReductionResult
    image: Image.Image
    tokens_in: int
    tokens_kept: int
    reduction_seconds: float
    kv_entries: tuple[int, int]  # image block + question + answer seed, without / with reduction
    kv_bytes: tuple[int, int]
    prefill_flops: tuple[int, int]  # the LLM's, analytic
    anchor_encode_flops: int  # the VAE encode of the 1024x1024 image that the reduced side adds (FLUX AE)

    @property
    def compute_saved(self) -> float:
        """Share of the LLM prefill FLOPs saved, in [0, 1)."""
        return 1.0 - self.prefill_flops[1] / self.prefill_flops[0]


def bagel_anchor_encode_flops(height: int = 1024, width: int = 1024) -> int:
    """FLOPs of BAGEL-7B-MoT's VAE (FLUX AE) encoding one image, counted on the meta device (no memory, no time)."""
    from diffusers import AutoencoderKL

    from .configuration_bagel import G2TRBagelConfig

    with torch.device("meta"):
        vae = AutoencoderKL(**G2TRBagelConfig().vae_config)
        pixels = torch.empty(1, 3, height, width)
    return module_flops(vae, pixels, method="encode")


def run_demo(ratio: float = 0.5, min_keep: int = 32, seed: int = 0) -> DemoReport:
    """Reduce the synthetic scene's tokens at `ratio` and account for what that saves at BAGEL-7B-MoT shapes."""
    image = synthetic_scene()
    inputs = synthetic_inputs(image, seed=seed)
    def reduce() -> ReductionResult:
        return reduce_tokens(
            inputs.features, (VIT_GRID, VIT_GRID), inputs.anchors, inputs.anchor_grid, ratio=ratio, min_keep=min_keep
        )

    reduce()  # warm-up: the first call pays torch's one-time kernel set-up
    start = time.perf_counter()
    result = reduce()
    seconds = time.perf_counter() - start

    def context(num_image_tokens: int) -> list[Segment]:
        # The processor's layout (see the module docstring): the image block (markers included), the question in
        # <|im_start|> ... <|im_end|>, and the <|im_start|> answer seed, which the prefill caches like any token.
        return [Segment(num_image_tokens + 2, bidirectional=True), Segment(QUESTION_TOKENS + 2), Segment(1)]

    full, reduced = context(result.num_tokens), context(result.num_kept)
    entries = (sum(s.length for s in full), sum(s.length for s in reduced))
    return DemoReport(
        result=result,
        image=image,
        tokens_in=result.num_tokens,
        tokens_kept=result.num_kept,
        reduction_seconds=seconds,
        kv_entries=entries,
        kv_bytes=(kv_cache_bytes(entries[0], BAGEL_7B_LLM), kv_cache_bytes(entries[1], BAGEL_7B_LLM)),
        prefill_flops=(prefill_flops(full, BAGEL_7B_LLM), prefill_flops(reduced, BAGEL_7B_LLM)),
        anchor_encode_flops=bagel_anchor_encode_flops(),
    )


@dataclass
class UnderstandingReport:
    """One understanding request run unreduced and reduced: its profile and the greedy answers (ratio 1.0, r)."""

    profile: RequestProfile
    answers: tuple[str, str]


def run_understanding(
    model, processor, image: Image.Image, question: str, ratio: float, max_new_tokens: int = 16
) -> UnderstandingReport:
    """Ask `question` about `image` with the reduction off and at `ratio`: profile the prefill, answer greedily."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    profile = profile_request(model, inputs, g2tr_ratio=ratio)
    prompt_length = inputs["input_ids"].shape[1]
    answers = []
    for keep_ratio in (1.0, ratio):
        with torch.inference_mode():
            generated = model.generate(**inputs, g2tr_ratio=keep_ratio, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.decode(generated[0, prompt_length:], skip_special_tokens=True).strip())
    return UnderstandingReport(profile, (answers[0], answers[1]))


def readable_answer(text: str) -> str:
    """`text` quoted on one line, fit to print: U+FFFD (what the tokenizer's decode leaves for bytes that are not
    valid UTF-8, as a random-weight model's byte-level tokens often are) is dropped, and control, format and
    unassigned characters are shown as escapes (`\\x0f`, `\\u03a2`)."""
    shown = [
        char.encode("unicode_escape").decode("ascii") if unicodedata.category(char)[0] in "CZ" and char != " " else char
        for char in text.replace("\ufffd", "")
    ]
    return "'" + "".join(shown) + "'"


def prefill_time_note(profile: RequestProfile, real_shapes: DemoReport | None = None) -> list[str]:
    """Plain-words lines that explain a reduced prefill that costs as much as or more than the unreduced one
    (empty when the reduced prefill is cheaper, as it is at real sizes).

    The reduced prefill adds one VAE encode of the image (the anchors). On a tiny model that encode costs more than
    the whole LLM, so reducing the LLM's tokens cannot pay for it; at real sizes the LLM dominates by far.
    """
    full, reduced = profile.accounting.prefill_flops
    anchor, seconds = profile.anchor_encode_flops, profile.prefill_seconds
    if anchor > full - reduced:
        lines = [
            "Why the reduced prefill is not faster here: it also runs the VAE encode that builds the anchors "
            f"({anchor / 1e9:.3g} G),",
            f"{anchor / max(full, 1):.1f}x this model's whole LLM prefill ({full / 1e9:.3g} G), while dropping image "
            f"tokens saves only {(full - reduced) / 1e9:.3g} G.",
        ]
    elif seconds[1] >= seconds[0]:
        lines = [
            "The reduced prefill does less work but measured no faster: at this size fixed costs (the anchor encode,",
            "the selection itself, timing noise) outweigh what dropping image tokens saves.",
        ]
    else:
        return []
    if real_shapes is not None:
        saved = real_shapes.prefill_flops[0] - real_shapes.prefill_flops[1]
        lines += [
            f"At BAGEL-7B-MoT shapes the encode is {real_shapes.anchor_encode_flops / 1e12:.2f} T against "
            f"{saved / 1e12:.1f} T saved:",
            "the real-shape figures above are the ones that matter.",
        ]
    return lines

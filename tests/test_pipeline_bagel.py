"""BAGEL image editing and text-to-image (`G2TRBagelPipeline`) on the tiny random model, CPU, few steps, tiny images.

What is checked: determinism for a seed; one VAE encode per input image; the reused latent gives the same ViT block
as a fresh encode and the context helpers agree with the model's one-pass prefill; ratio 1.0 equals the unreduced
model; the schedule against upstream's formula (and its 41-of-49 CFG count); every renorm type against a
hand-computed example; scales <= 1 skip their branches; denoising never writes a cache; output sizes; bad inputs;
batches of prompts; think mode; the CLI; and a load of an exported Hub folder in an interpreter without g2tr_hf.
"""

from __future__ import annotations

import copy
import json
import math
import textwrap
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import DynamicCache

import g2tr_hf.pipeline_bagel as pipeline_module
from g2tr_hf import build_tiny
from g2tr_hf.cli import main as cli_main
from g2tr_hf.generation_g2tr import stored_length
from g2tr_hf.hub import export
from g2tr_hf.modeling_bagel import patchify_latents, unpatchify_latents
from g2tr_hf.pipeline_bagel import (
    G2TRBagelPipeline,
    classifier_free_guidance,
    flow_timesteps,
)
from g2tr_hf.reduction import keep_count
from remote_code import run_without_g2tr_hf


STEPS = 3  # 2 denoising steps
RATIO = 0.5


def make_image(seed: int, size: tuple[int, int] = (56, 40)) -> PIL.Image.Image:
    """A smooth random RGB image of `size` = (width, height)."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return PIL.Image.fromarray(coarse).resize(size, PIL.Image.BILINEAR)


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("bagel", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny):
    model, processor = tiny
    pipe = G2TRBagelPipeline(model=model, processor=processor, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image():
    return make_image(1)


def edit(pipe, image, **kwargs):
    kwargs = {"prompt": "make the sky red", "image": image, "num_inference_steps": STEPS, "generator": seeded(),
              **kwargs}  # fmt: skip
    return pipe(**kwargs)


def text_to_image(pipe, **kwargs):
    kwargs = {"prompt": "a red car", "num_inference_steps": STEPS, "generator": seeded(), "height": 32, "width": 48,
              **kwargs}  # fmt: skip
    return pipe(**kwargs)


def edit_request(pipe, image, ratio: float):
    """The model inputs and contexts of one edit, built by the pipeline's own steps."""
    requests, _ = pipe.check_inputs(
        prompt="make the sky red", image=image, num_inference_steps=STEPS, generator=None, g2tr_ratio=ratio,
        cfg_text_scale=None, cfg_img_scale=None, cfg_interval=None, cfg_renorm_type=None, cfg_renorm_min=None,
        timestep_shift=3.0, height=None, width=None, think=False, max_think_tokens=8, output_type="pil",
    )  # fmt: skip
    model_inputs = pipe.preprocess(requests[0])
    return model_inputs, pipe.encode_context(model_inputs, ratio, think=False)


class Recorder:
    """Wraps a bound method and records its calls (positional arguments and keyword arguments)."""

    def __init__(self, method):
        self.method, self.calls = method, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.method(*args, **kwargs)


# --- determinism, encodes, reduction -------------------------------------------------------------------------------


def test_same_seed_gives_the_same_image_and_another_seed_does_not(pipe, image):
    first = edit(pipe, image, g2tr_ratio=RATIO).images[0]
    again = edit(pipe, image, g2tr_ratio=RATIO).images[0]
    other = edit(pipe, image, g2tr_ratio=RATIO, generator=seeded(1)).images[0]
    np.testing.assert_array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).max() > 0
    t2i = [pipe(prompt="a red car", num_inference_steps=STEPS, generator=seeded(), height=32, width=32) for _ in "ab"]
    np.testing.assert_array_equal(pixels(t2i[0].images[0]), pixels(t2i[1].images[0]))


def test_exactly_one_vae_encode_per_input_image(pipe, image, monkeypatch):
    encode = Recorder(pipe.model.vae.encode)
    monkeypatch.setattr(pipe.model.vae, "encode", encode)
    reduce = Recorder(pipe.model.model.reduce_image_features)
    monkeypatch.setattr(pipe.model.model, "reduce_image_features", reduce)

    edit(pipe, image, g2tr_ratio=RATIO)
    assert len(encode.calls) == 1 and len(reduce.calls) == 1
    assert reduce.calls[0][1]["latents"] is not None  # the anchors came from the VAE block's latent

    edit(pipe, [image, make_image(2, (48, 48))], g2tr_ratio=RATIO)
    assert len(encode.calls) == 3 and len(reduce.calls) == 3

    pipe(prompt="a red car", num_inference_steps=STEPS, height=32, width=32)
    assert len(encode.calls) == 3  # text-to-image encodes nothing


@pytest.mark.parametrize("ratio", [RATIO, 1.0])
def test_context_equals_the_models_one_pass_prefill_with_a_fresh_encode(pipe, image, ratio):
    """The conditional context built by the helpers (VAE block, ViT block reusing the latent, text) holds the same
    entries as the VAE block followed by ONE `forward` over [ViT block + text] that encodes the image again."""
    model, processor = pipe.model, pipe.processor
    model_inputs, contexts = edit_request(pipe, image, ratio)
    built = contexts.conditional[0]

    features = model_inputs["images"][0]
    reference = DynamicCache(config=model.config.get_text_config())
    latents = model.encode_vae_latents(features["vae_pixel_values"], features["vae_image_hw"])[0]
    model.prefill_vae_image(latents, reference)
    num_patches = int(features["image_grid_hw"].prod())
    block = [processor.vision_start_token_id] + [processor.image_token_id] * num_patches
    ids = torch.tensor([block + [processor.vision_end_token_id]]).long()
    ids = torch.cat([ids, model_inputs["input_ids"]], dim=1)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=reference, use_cache=True, g2tr_ratio=ratio, **features)

    assert stored_length(built) == stored_length(reference)
    for ours, theirs in zip(built.layers, reference.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, rtol=1e-5, atol=1e-5)


def test_context_lengths_and_cfg_contexts(pipe, image):
    model = pipe.model
    model_inputs, contexts = edit_request(pipe, image, RATIO)
    features = model_inputs["images"][0]
    vae_h, vae_w = (features["vae_image_hw"][0] // model.latent_downsample).tolist()
    num_patches = int(features["image_grid_hw"].prod())
    kept = keep_count(num_patches, RATIO, model.config.g2tr_min_keep)
    assert kept < num_patches
    text = model_inputs["input_ids"].shape[1]
    conditional, no_text, no_image = contexts.conditional, contexts.no_text, contexts.no_image
    assert stored_length(conditional[0]) == (vae_h * vae_w + 2) + (kept + 2) + text
    assert no_text[0] is conditional[0] and no_text[1] == (vae_h * vae_w + 2) + (kept + 2)  # a prefix, no copy
    assert stored_length(no_image[0]) == text and no_image[1] is None


def test_ratio_one_equals_the_unreduced_model(tiny, image, monkeypatch):
    """g2tr_ratio=1.0 on a model configured for 0.5 gives bit for bit the image of a model whose reduction code
    cannot run at all; 0.5 gives another image."""
    model, processor = build_tiny("bagel", seed=0)
    model.config.g2tr_ratio = RATIO
    reducing = G2TRBagelPipeline(model=model, processor=processor, device="cpu")
    at_one = edit(reducing, image, g2tr_ratio=1.0, show_progress=False).images[0]
    at_half = edit(reducing, image, show_progress=False).images[0]

    unreduced_model, _ = build_tiny("bagel", seed=0)

    def no_reduction(*args, **kwargs):
        raise AssertionError("the reduction must not run at ratio 1.0")

    monkeypatch.setattr(unreduced_model.model, "reduce_image_features", no_reduction)
    unreduced = G2TRBagelPipeline(model=unreduced_model, processor=processor, device="cpu")
    reference = edit(unreduced, image, show_progress=False).images[0]
    np.testing.assert_array_equal(pixels(at_one), pixels(reference))
    assert np.abs(pixels(at_half) - pixels(reference)).max() > 0


# --- sampler -------------------------------------------------------------------------------------------------------


def test_schedule_matches_the_spec_formula():
    for steps, shift in ((50, 3.0), (7, 1.0), (12, 2.5)):
        schedule = flow_timesteps(steps, shift)
        t = np.linspace(1.0, 0.0, steps)
        expected = shift * t / (1 + (shift - 1) * t)
        assert schedule.dtype == torch.float32 and schedule.shape == (steps,)
        np.testing.assert_allclose(schedule.numpy(), expected, rtol=0, atol=1e-6)
        assert schedule[0] == 1.0 and schedule[-1] == 0.0 and bool((schedule[1:] < schedule[:-1]).all())
    # Shift 3 holds t' above 0.4 while t > 0.18: 41 of the 49 evaluations of a 50-point schedule.
    schedule = flow_timesteps(50, 3.0)[:-1]
    assert int(((schedule > 0.4) & (schedule <= 1.0)).sum()) == 41


def test_denoising_loop_is_euler_on_the_schedule(pipe, monkeypatch):
    forward = Recorder(pipe._forward)
    monkeypatch.setattr(pipe, "_forward", forward)
    noise_draws = []
    prepare = pipe.prepare_latents

    def record_noise(*args, **kwargs):
        noise_draws.append(prepare(*args, **kwargs))
        return noise_draws[-1]

    monkeypatch.setattr(pipe, "prepare_latents", record_noise)
    decode = Recorder(pipe.model.decode_latent_tokens)
    monkeypatch.setattr(pipe.model, "decode_latent_tokens", decode)
    text_to_image(pipe, num_inference_steps=5)

    schedule = flow_timesteps(5, 3.0)
    assert [float(args[1]) for args, _ in forward.calls] == schedule[:-1].tolist()
    latents = noise_draws[0]
    for (args, _), t, t_next in zip(forward.calls, schedule[:-1], schedule[1:]):
        torch.testing.assert_close(args[0][0], latents)  # the step started from the previous Euler update
        latents = latents - forward.method(*args)[0] * (t - t_next)
    torch.testing.assert_close(decode.calls[0][0][0][0], latents)


def branch_rows(recorder: Recorder) -> list[int]:
    """Per recorded `flow_velocities` call (one per denoising step), how many branch rows it ran."""
    return [args[0].shape[0] for args, _ in recorder.calls]


def test_forty_one_of_forty_nine_steps_are_guided_in_text_to_image(pipe, monkeypatch):
    velocity = Recorder(pipe.model.flow_velocities)
    monkeypatch.setattr(pipe.model, "flow_velocities", velocity)
    pipe(prompt="a red car", num_inference_steps=50, height=16, width=16)
    rows = branch_rows(velocity)
    assert len(rows) == 49 and sum(rows) == 49 + 41  # conditional every step, the text-free branch on 41 steps


V = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # |v| = 5; per token 3 and 4
V_NO_TEXT = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
V_NO_IMAGE = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
# text guidance, scale 2: V_NO_TEXT + 2 (V - V_NO_TEXT) = [[5, 0], [0, 8]]


@pytest.mark.parametrize(
    "renorm_type, image_scale, renorm_min, expected",
    [
        # global: |v| / |vt| = 5 / sqrt(89)
        ("global", 1.0, 0.0, [[5.0 * 5 / math.sqrt(89), 0.0], [0.0, 8.0 * 5 / math.sqrt(89)]]),
        # global with image guidance: g = V_NO_IMAGE + 2 (vt - V_NO_IMAGE) = [[10, 0], [0, 14]], factor 5 / sqrt(296)
        ("global", 2.0, 0.0, [[10.0 * 5 / math.sqrt(296), 0.0], [0.0, 14.0 * 5 / math.sqrt(296)]]),
        # the clamp from below: factor max(5 / sqrt(296), 0.5) = 0.5
        ("global", 2.0, 0.5, [[5.0, 0.0], [0.0, 7.0]]),
        # channel: per token 3 / 5 and 4 / 8
        ("channel", 1.0, 0.0, [[3.0, 0.0], [0.0, 4.0]]),
        # channel with image guidance: per token 3 / 10 and 4 / 14
        ("channel", 2.0, 0.0, [[3.0, 0.0], [0.0, 4.0]]),
        # text_channel: renorm of the text-guided velocity per token -> [[3, 0], [0, 4]], then image guidance
        # V_NO_IMAGE + 2 ([[3, 0], [0, 4]] - V_NO_IMAGE) = [[6, 0], [0, 6]], not renormalised
        ("text_channel", 2.0, 0.0, [[6.0, 0.0], [0.0, 6.0]]),
        ("text_channel", 1.0, 0.0, [[3.0, 0.0], [0.0, 4.0]]),
        # text_channel with a clamp: per-token factors max(3/5, 0.75) and max(4/8, 0.75)
        ("text_channel", 1.0, 0.75, [[3.75, 0.0], [0.0, 6.0]]),
    ],
)
def test_cfg_renorm_against_hand_computed_examples(renorm_type, image_scale, renorm_min, expected):
    result = classifier_free_guidance(
        V,
        V_NO_TEXT,
        V_NO_IMAGE if image_scale > 1 else None,
        text_scale=2.0,
        image_scale=image_scale,
        renorm_type=renorm_type,
        renorm_min=renorm_min,
    )
    torch.testing.assert_close(result, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_guidance_off_returns_the_conditional_velocity():
    for renorm_type in ("global", "channel", "text_channel"):
        result = classifier_free_guidance(
            V, V_NO_TEXT, V_NO_IMAGE, text_scale=1.0, image_scale=2.0, renorm_type=renorm_type, renorm_min=0.0
        )
        assert result is V


@pytest.mark.parametrize(
    "text_scale, image_scale, branches",
    [(4.0, 2.0, 3), (4.0, 1.0, 2), (1.0, 2.0, 1), (0.5, 0.0, 1), (1.5, 1.5, 3)],
)
def test_scales_at_most_one_skip_their_branches(pipe, image, monkeypatch, text_scale, image_scale, branches):
    velocity = Recorder(pipe.model.flow_velocities)
    monkeypatch.setattr(pipe.model, "flow_velocities", velocity)
    edit(pipe, image, cfg_text_scale=text_scale, cfg_img_scale=image_scale, g2tr_ratio=RATIO)
    assert branch_rows(velocity) == [branches] * (STEPS - 1)  # all branches of a step in one pass
    windows = velocity.calls[0][0][3]  # [branches, P] the entries each branch sees
    assert bool(windows[0].any()) and all(bool((windows[0] >= window).all()) for window in windows[1:2])
    if branches == 3:  # the image-free context is stored after the conditional one, disjoint from it
        assert not bool((windows[2] & windows[0]).any())


def test_cfg_interval_gates_the_guidance(pipe, image, monkeypatch):
    velocity = Recorder(pipe.model.flow_velocities)
    monkeypatch.setattr(pipe.model, "flow_velocities", velocity)
    edit(pipe, image, num_inference_steps=5, cfg_interval=(0.9, 1.0))  # shifted times 1, 0.9, 0.75, 0.5
    assert branch_rows(velocity) == [3, 1, 1, 1]  # only the t = 1 step is guided (3 branches)


def test_denoising_never_writes_a_cache(pipe, image, monkeypatch):
    lengths = {}
    encode_context = pipe.encode_context

    def record_contexts(*args, **kwargs):
        contexts = encode_context(*args, **kwargs)
        lengths["contexts"] = contexts
        lengths["before"] = [stored_length(contexts.conditional[0]), stored_length(contexts.no_image[0])]
        lengths["keys"] = [layer.keys.clone() for layer in contexts.conditional[0].layers]
        return contexts

    monkeypatch.setattr(pipe, "encode_context", record_contexts)
    edit(pipe, image, g2tr_ratio=RATIO, num_inference_steps=4)
    contexts = lengths["contexts"]
    assert [stored_length(contexts.conditional[0]), stored_length(contexts.no_image[0])] == lengths["before"]
    for layer, keys in zip(contexts.conditional[0].layers, lengths["keys"]):
        torch.testing.assert_close(layer.keys, keys, rtol=0, atol=0)


def test_velocity_against_a_prefix_equals_a_cache_that_holds_only_that_prefix(pipe, image):
    """The text-free context (a prefix of the conditional cache) gives the velocity of a cache that never saw the
    instruction, and reading a cache equals upstream's merged buffer (a real cache update on a copy)."""
    model = pipe.model
    model_inputs, contexts = edit_request(pipe, image, RATIO)
    features = model_inputs["images"][0]
    images_only = DynamicCache(config=model.config.get_text_config())
    latent = model.encode_vae_latents(features["vae_pixel_values"], features["vae_image_hw"])[0]
    model.prefill_vae_image(latent, images_only)
    model.prefill_vit_image(
        features["pixel_values"], features["image_position_ids"], features["image_grid_hw"], images_only,
        latents=latent, g2tr_ratio=RATIO,
    )  # fmt: skip
    grid = tuple((model_inputs["images"][0]["vae_image_hw"][0] // model.latent_downsample).tolist())
    latents = torch.randn(grid[0] * grid[1], 64, generator=seeded(3))
    with torch.no_grad():
        query = model.embed_latent_query(latents, torch.tensor(0.6), grid)
        from_prefix = model.flow_velocity(query, *contexts.no_text)
        from_own_cache = model.flow_velocity(query, images_only)
        copy_of_cache = copy.deepcopy(contexts.conditional[0])
        length = query.shape[1]
        position = int(copy_of_cache.layout.next_position)
        hidden = model.language_model(
            inputs_embeds=query,
            position_ids=torch.full((1, length), position),
            past_key_values=copy_of_cache,
            gen_token_mask=model._latent_token_mask(length, query.device),
        ).last_hidden_state
        updated = model.model.llm2vae(hidden[0, 1:-1])
        read_only = model.flow_velocity(query, *contexts.conditional)
    torch.testing.assert_close(from_prefix, from_own_cache, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(read_only, updated, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(from_prefix, read_only)  # the instruction matters


def test_latent_unpatchify_inverts_patchify():
    latents = torch.randn(16, 6, 10)
    tokens = patchify_latents(latents, 2)
    torch.testing.assert_close(unpatchify_latents(tokens, (3, 5), 2), latents, rtol=0, atol=0)


# --- sizes, inputs, batches, think mode -----------------------------------------------------------------------------


def test_output_sizes(pipe, image):
    vae_height, vae_width = pipe.processor.image_processor.vae_size(image.height, image.width)
    assert edit(pipe, image).images[0].size == (vae_width, vae_height) == (64, 32)
    assert text_to_image(pipe).images[0].size == (48, 32)
    default = pipe(prompt="a red car", num_inference_steps=2, generator=seeded()).images[0]
    assert default.size == (128, 128)  # max_latent_size 8 x 16 px; BAGEL-7B-MoT's 64 gives 1024 x 1024
    real_size = SimpleNamespace(model=SimpleNamespace(latent_downsample=16, config=SimpleNamespace(max_latent_size=64)))
    assert G2TRBagelPipeline.output_latent_grid(real_size, {"images": []}, None, None) == (64, 64)
    tensor = text_to_image(pipe, output_type="pt").images[0]
    assert tensor.shape == (3, 32, 48) and 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"image": []}, "image"),
        ({"image": "photo.png"}, "image"),
        ({"image": [np.zeros((2, 8, 8, 3), dtype=np.uint8)]}, "image"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": ["a", "b"], "image": [None]}, "image"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 1}, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({"cfg_text_scale": -1.0}, "cfg_text_scale"),
        ({"cfg_img_scale": -0.5}, "cfg_img_scale"),
        ({"cfg_img_scale": float("nan")}, "cfg_img_scale"),
        ({"cfg_renorm_type": "local"}, "cfg_renorm_type"),
        ({"cfg_interval": (0.8, 0.2)}, "cfg_interval"),
        ({"cfg_renorm_min": 2.0}, "cfg_renorm_min"),
        ({"timestep_shift": 0.0}, "timestep_shift"),
        ({"g2tr_ratio": 0.0}, "g2tr_ratio"),
        ({"generator": [seeded(), seeded()]}, "generator"),
        ({"height": 64}, "height"),  # an edit keeps its input's size
        ({"output_type": "jpeg"}, "output_type"),
        ({"think": "yes"}, "think"),
    ],
)
def test_bad_inputs_are_value_errors_naming_the_argument(pipe, image, kwargs, argument):
    call = {"prompt": "make the sky red", "image": image, "num_inference_steps": STEPS, **kwargs}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        pipe(**call)


@pytest.mark.parametrize("size", [{"height": 30}, {"width": 256}, {"height": 0}])
def test_bad_text_to_image_sizes(pipe, size):
    with pytest.raises(ValueError, match=f"`{next(iter(size))}`"):
        pipe(prompt="a red car", num_inference_steps=STEPS, **size)


def test_constructor_needs_a_processor_and_takes_no_settings(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="`processor`"):
        G2TRBagelPipeline(model=model, device="cpu")
    with pytest.raises(ValueError, match="per call"):
        G2TRBagelPipeline(model=model, processor=processor, device="cpu", num_inference_steps=10)


def test_a_batch_of_prompts_equals_single_runs(pipe, image):
    other = make_image(2, (48, 48))
    batch = pipe(
        prompt=["make the sky red", "a red car", "swap them"],
        image=[image, None, [other, image]],
        num_inference_steps=STEPS,
        generator=[seeded(0), seeded(1), seeded(2)],
        g2tr_ratio=RATIO,
    ).images
    singles = [
        edit(pipe, image, g2tr_ratio=RATIO).images[0],
        pipe(prompt="a red car", num_inference_steps=STEPS, generator=seeded(1)).images[0],
        edit(pipe, [other, image], prompt="swap them", generator=seeded(2), g2tr_ratio=RATIO).images[0],
    ]
    assert len(batch) == 3
    for ours, single in zip(batch, singles):
        np.testing.assert_array_equal(pixels(ours), pixels(single))


def test_think_mode_adds_a_plan_to_the_conditional_context_only(pipe, image, monkeypatch):
    lengths, think = {}, pipe.think

    def record_think(contexts, max_think_tokens, show_progress=True):
        lengths["contexts"] = contexts
        lengths["before"] = stored_length(contexts.conditional[0])
        return think(contexts, max_think_tokens, show_progress)

    monkeypatch.setattr(pipe, "think", record_think)
    first = edit(pipe, image, think=True, max_think_tokens=5, g2tr_ratio=RATIO)
    second = edit(pipe, image, think=True, max_think_tokens=5, g2tr_ratio=RATIO)
    assert isinstance(first.thoughts[0], str) and first.thoughts == second.thoughts
    np.testing.assert_array_equal(pixels(first.images[0]), pixels(second.images[0]))

    contexts = lengths["contexts"]
    plan = pipe._text_segment(second.thoughts[0]).shape[1]
    system = pipe._text_segment(pipeline_module.GEN_THINK_SYSTEM_PROMPT).shape[1]
    instruction = pipe._text_segment("make the sky red").shape[1]
    assert stored_length(contexts.conditional[0]) == lengths["before"] + plan
    assert stored_length(contexts.no_image[0]) == system + instruction
    assert contexts.no_text[1] == lengths["before"] - instruction  # system prompt + images, no text
    assert edit(pipe, image).thoughts == [None]


def test_think_mode_shows_its_progress(tiny, image, capsys):
    pipe = G2TRBagelPipeline(model=tiny[0], processor=tiny[1], device="cpu")  # progress bars on
    edit(pipe, image, think=True, max_think_tokens=4, g2tr_ratio=RATIO, show_progress=True)
    assert "thinking" in capsys.readouterr().err
    edit(pipe, image, think=True, max_think_tokens=4, g2tr_ratio=RATIO, show_progress=False)
    assert "thinking" not in capsys.readouterr().err


def test_bf16_model_edits_and_generates(image):
    model, processor = build_tiny("bagel", seed=0)
    pipe = G2TRBagelPipeline(model=model.to(torch.bfloat16), processor=processor, device="cpu")
    edited = edit(pipe, image, g2tr_ratio=RATIO, output_type="pt", show_progress=False).images[0]
    generated = text_to_image(pipe, output_type="pt", show_progress=False).images[0]
    assert edited.dtype == generated.dtype == torch.float32  # returned in fp32 whatever the model's dtype
    assert edited.shape == (3, 32, 64) and generated.shape == (3, 32, 48)
    assert bool(torch.isfinite(edited).all()) and bool(torch.isfinite(generated).all())


# --- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_edit_and_generate_on_the_tiny_model(tmp_path, image, capsys):
    source = tmp_path / "in.png"
    image.save(source)
    edited, generated = tmp_path / "edit.png", tmp_path / "gen.png"
    assert cli_main(["edit", "--image", str(source), "--prompt", "make it red", "--steps", "3", "-o", str(edited)]) == 0
    assert cli_main(["generate", "--prompt", "a cat", "--steps", "3", "--height", "32", "--width", "16",
                     "-o", str(generated)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "tiny built-in BAGEL" in out
    assert PIL.Image.open(edited).size == (64, 32) and PIL.Image.open(generated).size == (16, 32)
    assert cli_main(["generate", "--prompt", "a cat", "--height", "30", "-o", str(generated)]) == 2
    assert "`height`" in capsys.readouterr().err


# --- the Hub folder -------------------------------------------------------------------------------------------------

# Runs in the isolated child of `remote_code.run_without_g2tr_hf`: the pipeline can only come from remote code.
CHILD = textwrap.dedent(
    """
    import json, sys

    import numpy as np, PIL.Image, torch
    from transformers import pipeline

    folder, image_path, output = sys.argv[1], sys.argv[2], sys.argv[3]
    pipe = pipeline(model=folder, trust_remote_code=True, device="cpu")
    result = pipe(prompt="make the sky red", image=PIL.Image.open(image_path), num_inference_steps=3,
                  generator=torch.Generator().manual_seed(0), g2tr_ratio=0.5, show_progress=False)
    np.save(output, np.asarray(result.images[0]))
    # The batched path and the diffusers options come with the remote code too (pipeline_utils ships beside it).
    images, thoughts = pipe(prompt=["a", "b"], num_images_per_prompt=2, num_inference_steps=2, height=16, width=32,
                            output_type="np", return_dict=False, show_progress=False)
    assert "g2tr_hf" not in sys.modules
    print("RESULT " + json.dumps({"pipeline": type(pipe).__module__ + "." + type(pipe).__name__,
                                  "model": type(pipe.model).__module__, "task": pipe.task,
                                  "batched": [list(image.shape) for image in images]}))
    """
)


def test_pipeline_loads_from_an_exported_folder_without_g2tr_hf(tiny, pipe, image, tmp_path):
    model, processor = tiny
    folder = export(model, processor, tmp_path / "bagel-g2tr")
    weights = sorted(path.name for path in folder.iterdir() if path.suffix in (".safetensors", ".bin"))
    assert weights == ["model.safetensors"]  # one set of weights serves understanding and generation
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"][pipeline_module.PIPELINE_TASK]["impl"] == "pipeline_bagel.G2TRBagelPipeline"

    source = tmp_path / "in.png"
    image.save(source)
    child = run_without_g2tr_hf(CHILD, folder, source, tmp_path / "out.npy", workdir=tmp_path)
    assert child["pipeline"].startswith("transformers_modules.") and child["pipeline"].endswith("G2TRBagelPipeline")
    assert child["model"].startswith("transformers_modules.") and child["task"] == pipeline_module.PIPELINE_TASK
    assert child["batched"] == [[16, 32, 3]] * 4
    assert (folder / "pipeline_utils.py").is_file()

    local = edit(pipe, PIL.Image.open(source), g2tr_ratio=RATIO).images[0]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.asarray(local))


def test_the_pipeline_takes_image_paths_like_understanding(pipe, image, tmp_path):
    path = tmp_path / "input.png"
    image.save(path)
    from_path = pixels(edit(pipe, str(path), g2tr_ratio=RATIO).images[0])
    from_image = pixels(edit(pipe, image, g2tr_ratio=RATIO).images[0])
    np.testing.assert_array_equal(from_path, from_image)
    with pytest.raises(ValueError, match=r"`image`: no such file"):
        edit(pipe, str(tmp_path / "missing.png"))

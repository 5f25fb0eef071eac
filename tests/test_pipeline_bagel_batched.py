"""Batched editing / text-to-image and the diffusers options of `G2TRBagelPipeline`, on the tiny random BAGEL (CPU,
fp32, 3 schedule points = 2 denoising steps).

What is checked: every image of a batch (prompts mixing edits with input images of different sizes and
text-to-image, so that output sizes differ too) equals its single run to 1e-5 on the latents and the decoded
images; one decoder pass per step runs all CFG branches of all images, which equals the batch-1 velocity path;
`num_images_per_prompt` shares its prompt's context; `latents=` replaces the noise (with a shape check);
`callback_on_step_end` sees every step, can replace the latents and can stop the loop; every `output_type`;
`return_dict=False`; `enable_model_cpu_offload` installs its hooks and changes nothing in the output; bad inputs
fail with errors naming the argument.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import g2tr_hf.pipeline_bagel as pipeline_module
from g2tr_hf import build_tiny
from g2tr_hf.pipeline_bagel import G2TRBagelPipeline, classifier_free_guidance, flow_timesteps


STEPS = 3
RATIO = 0.5
TOLERANCE = dict(rtol=0.0, atol=1e-5)


def make_image(seed: int, size: tuple[int, int]) -> PIL.Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return PIL.Image.fromarray(coarse).resize(size, PIL.Image.BILINEAR)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    model, processor = build_tiny("bagel", seed=0)
    pipe = G2TRBagelPipeline(model=model, processor=processor, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def wide():
    return make_image(1, (56, 40))  # VAE 64 x 32 -> latent grid 2 x 4


@pytest.fixture(scope="module")
def square():
    return make_image(2, (48, 48))  # VAE 48 x 48 -> latent grid 3 x 3


def run(pipe, prompt, image=None, **kwargs):
    call = {"num_inference_steps": STEPS, "g2tr_ratio": RATIO, "show_progress": False, **kwargs}
    return pipe(prompt=prompt, image=image, **call)


# --- a batch equals its single runs ---------------------------------------------------------------------------------


def test_mixed_batch_rows_equal_their_single_runs(pipe, wide, square):
    """Edits with inputs of different sizes (so different output grids), a two-image edit and a text-to-image
    prompt in one call: every image equals its own call, latents and pixels."""
    prompts = ["make the sky red", "a red car", "swap them", "make it blue"]
    images = [wide, None, [square, wide], square]
    generators = [seeded(index) for index in range(len(prompts))]
    size = dict(height=16, width=32)  # sizes the text-to-image prompt only
    batch_latents = run(pipe, prompts, images, generator=generators, **size, output_type="latent").images
    grids = [(2, 4), (1, 2), (2, 4), (3, 3)]
    assert [tuple(latent.shape) for latent in batch_latents] == [(h * w, 64) for h, w in grids]
    batch_pixels = pipe.postprocess(batch_latents, grids, "pt")  # the two 2 x 4 images decode together
    for index, (prompt, image) in enumerate(zip(prompts, images)):
        single_size = size if image is None else {}
        single = run(pipe, prompt, image, generator=seeded(index), **single_size, output_type="latent").images[0]
        torch.testing.assert_close(batch_latents[index], single, **TOLERANCE)
        pixels = pipe.postprocess([single], [grids[index]], "pt")[0]
        torch.testing.assert_close(batch_pixels[index], pixels, **TOLERANCE)


def test_text_to_image_batch_equals_single_runs(pipe):
    prompts = ["a red car", "a green tree with a very long description of its leaves", "sky"]
    batch = run(pipe, prompts, generator=[seeded(7 + i) for i in range(3)], height=32, width=48, output_type="pt")
    for index, prompt in enumerate(prompts):
        single = run(pipe, prompt, generator=seeded(7 + index), height=32, width=48, output_type="pt").images[0]
        torch.testing.assert_close(batch.images[index], single, **TOLERANCE)


def test_one_pass_per_step_runs_every_branch_of_every_image(pipe, wide, monkeypatch):
    calls = []
    flow_velocities = pipe.model.flow_velocities

    def record(*args, **kwargs):
        calls.append(args[0].shape[0])
        return flow_velocities(*args, **kwargs)

    monkeypatch.setattr(pipe.model, "flow_velocities", record)
    run(pipe, ["make the sky red", "a red car"], [wide, None], num_images_per_prompt=2)
    # Step t = 1: edit images 3 branches each, text-to-image images 2 (image scale 1); step t = 0.6 (shifted 0.75):
    # both presets guide.
    assert calls == [2 * 3 + 2 * 2, 2 * 3 + 2 * 2]


def test_batched_step_equals_the_batch_one_velocity_path(pipe, wide, square):
    """One denoising step of two images of different sizes against two prompts, computed in one pass, equals the
    three separate batch-1 `flow_velocity` calls per image (the path checked against upstream) plus CFG."""
    requests, _ = pipe.check_inputs(
        ["make the sky red", "make it blue"], [wide, square], STEPS, None, RATIO, None, None, None, None, None, 3.0,
        None, None, False, 8, "pil",
    )  # fmt: skip
    inputs = [pipe.preprocess(request) for request in requests]
    contexts = [pipe.encode_context(model_inputs, RATIO, think=False) for model_inputs in inputs]
    grids = [pipe.output_latent_grid(model_inputs, None, None) for model_inputs in inputs]
    latents = [pipe.prepare_latents(grid, seeded(index)) for index, grid in enumerate(grids)]
    stacked = pipeline_module.stack_contexts(contexts, pipe.model.config.get_text_config())
    t = torch.tensor(1.0)
    batched = pipe._forward(latents, t, grids, stacked, [r.guidance for r in requests], [0, 1])
    model = pipe.model
    for index, (context, request) in enumerate(zip(contexts, requests)):
        query = model.embed_latent_query(latents[index], t, grids[index])
        branches = [model.flow_velocity(query, *getattr(context, name)).float()
                    for name in ("conditional", "no_text", "no_image")]  # fmt: skip
        settings = request.guidance
        expected = classifier_free_guidance(
            *branches, text_scale=settings.text_scale, image_scale=settings.image_scale,
            renorm_type=settings.renorm_type, renorm_min=settings.renorm_min,
        )  # fmt: skip
        torch.testing.assert_close(batched[index], expected, **TOLERANCE)


def test_the_stacked_cache_holds_one_row_per_prompt_not_per_image(pipe, wide, monkeypatch):
    stacked = []
    stack = pipeline_module.stack_contexts

    def record(contexts, text_config):
        stacked.append(stack(contexts, text_config))
        return stacked[-1]

    monkeypatch.setattr(pipeline_module, "stack_contexts", record)
    run(pipe, ["make the sky red", "a red car"], [wide, None], num_images_per_prompt=3)
    cache = stacked[0].cache
    assert cache.layers[0].keys.shape[0] == 2
    # The windows of each prompt: conditional, its text-free prefix, the image-free part after the conditional part.
    conditional, no_text, no_image = stacked[0].conditional, stacked[0].no_text, stacked[0].no_image
    assert bool((conditional >= no_text).all()) and not bool((conditional & no_image).any())
    assert bool((cache.layout.attention_mask | ~(conditional | no_image)).all())  # windows cover real entries only


# --- num_images_per_prompt, latents, generators --------------------------------------------------------------------


def test_num_images_per_prompt_draws_from_the_prompts_generator_in_turn(pipe, wide):
    output = run(pipe, "make the sky red", wide, generator=seeded(3), num_images_per_prompt=2, output_type="latent")
    assert len(output.images) == 2 and len(output.thoughts) == 2
    generator = seeded(3)
    noise = [torch.randn(8, 64, generator=generator) for _ in range(2)]
    for index in range(2):
        single = run(pipe, "make the sky red", wide, latents=noise[index], output_type="latent").images[0]
        torch.testing.assert_close(output.images[index], single, **TOLERANCE)
    assert not torch.allclose(output.images[0], output.images[1])


def test_user_latents_replace_the_noise_in_every_accepted_form(pipe):
    generator = seeded(5)
    noise = [torch.randn(6, 64, generator=generator) for _ in range(2)]  # 32 x 48 px: a 2 x 3 grid
    from_generator = run(pipe, ["a", "b"], generator=seeded(5), height=32, width=48, output_type="latent").images
    for latents in (noise, torch.stack(noise)):
        given = run(pipe, ["a", "b"], latents=latents, height=32, width=48, output_type="latent").images
        for ours, theirs in zip(given, from_generator):
            torch.testing.assert_close(ours, theirs, **TOLERANCE)


@pytest.mark.parametrize(
    "latents, message",
    [
        (torch.zeros(6, 16), r"\[6, 64\]"),
        (torch.zeros(3, 6, 64), r"one latent per generated image \(2\)"),
        ([torch.zeros(6, 64)], r"shapes \[\[6, 64\], \[6, 64\]\]"),
        ("noise", "tensor or a list"),
    ],
)
def test_bad_latents_are_refused_with_the_expected_shape(pipe, latents, message):
    with pytest.raises(ValueError, match=f"`latents`.*{message}"):
        run(pipe, ["a", "b"], latents=latents, height=32, width=48)


def test_latents_of_images_of_different_sizes_must_be_a_list(pipe, wide, square):
    with pytest.raises(ValueError, match=r"`latents`.*pass a list"):
        run(pipe, ["x", "y"], [wide, square], latents=torch.zeros(2, 8, 64))


# --- callback_on_step_end -------------------------------------------------------------------------------------------


def test_callback_sees_every_step_and_can_replace_the_latents(pipe, wide):
    seen = []

    def record(pipeline, step, timestep, callback_kwargs):
        assert pipeline is pipe and set(callback_kwargs) == {"latents"}
        seen.append((step, float(timestep), [latent.clone() for latent in callback_kwargs["latents"]]))
        return {}

    final = run(pipe, "make the sky red", wide, generator=seeded(), callback_on_step_end=record, output_type="latent")
    schedule = flow_timesteps(STEPS, 3.0)
    assert [(step, t) for step, t, _ in seen] == [(0, float(schedule[0])), (1, float(schedule[1]))]
    torch.testing.assert_close(seen[-1][2][0], final.images[0], rtol=0, atol=0)

    def replace(pipeline, step, timestep, callback_kwargs):
        return {"latents": [latent + 1.0 for latent in callback_kwargs["latents"]]} if step == 0 else {}

    edit = dict(prompt="make the sky red", image=wide, output_type="latent")
    shifted = run(pipe, **edit, generator=seeded(), callback_on_step_end=replace)
    assert not torch.allclose(shifted.images[0], final.images[0])  # step 1 continued from the replaced latents

    def zero_last(pipeline, step, timestep, callback_kwargs):
        return {"latents": torch.zeros(1, 8, 64)} if step == 1 else {}

    zeros = run(pipe, **edit, generator=seeded(), callback_on_step_end=zero_last)
    torch.testing.assert_close(zeros.images[0], torch.zeros(8, 64), rtol=0, atol=0)


def test_callback_can_stop_the_loop(pipe, wide):
    steps, first = [], []

    def stop(pipeline, step, timestep, callback_kwargs):
        steps.append(step)
        first.append(callback_kwargs["latents"][0].clone())
        pipeline._interrupt = True
        return {}

    stopped = run(pipe, "make the sky red", wide, generator=seeded(), num_inference_steps=5,
                  callback_on_step_end=stop, output_type="latent")  # fmt: skip
    assert steps == [0]
    torch.testing.assert_close(stopped.images[0], first[0], rtol=0, atol=0)
    again = run(pipe, "make the sky red", wide, generator=seeded(), num_inference_steps=5, output_type="latent")
    assert not pipe.interrupt and not torch.allclose(again.images[0], stopped.images[0])  # reset by the next call


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"callback_on_step_end": "print"}, "callback_on_step_end"),
        ({"callback_on_step_end": lambda *a: {}, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]},
         "callback_on_step_end_tensor_inputs"),
        ({"callback_on_step_end": lambda p, s, t, k: {"latents": [torch.zeros(3, 64)]}}, "callback_on_step_end"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"num_images_per_prompt": 2, "generator": [seeded(), seeded(), seeded()]}, "generator"),
        ({"return_dict": "no"}, "return_dict"),
        ({"output_type": "jpeg"}, "output_type"),
    ],
)  # fmt: skip
def test_bad_options_name_the_argument(pipe, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        run(pipe, "a red car", height=32, width=32, **kwargs)


# --- output types, return_dict -------------------------------------------------------------------------------------


def test_output_types_and_return_dict(pipe, wide, square):
    def call(**kwargs):
        return run(pipe, ["x", "y"], [wide, square], generator=[seeded(0), seeded(1)], **kwargs)

    tensors = call(output_type="pt").images
    arrays = call(output_type="np").images
    images = call(output_type="pil").images
    latents = call(output_type="latent").images
    assert [tuple(t.shape) for t in tensors] == [(3, 32, 64), (3, 48, 48)]
    assert [tuple(latent.shape) for latent in latents] == [(8, 64), (9, 64)]
    for tensor, array, image in zip(tensors, arrays, images):
        assert array.dtype == np.float32 and array.shape == tuple(tensor.permute(1, 2, 0).shape)
        np.testing.assert_array_equal(array, tensor.permute(1, 2, 0).numpy())
        np.testing.assert_array_equal(np.asarray(image), (tensor * 255).to(torch.uint8).permute(1, 2, 0).numpy())
    decoded = pipe.postprocess(latents, [(2, 4), (3, 3)], "pt")
    for ours, theirs in zip(decoded, tensors):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    as_tuple = call(output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2 and as_tuple[1] == [None, None]
    for ours, theirs in zip(as_tuple[0], tensors):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# --- model CPU offload ----------------------------------------------------------------------------------------------


def test_model_cpu_offload_installs_hooks_and_keeps_the_output(wide):
    pytest.importorskip("accelerate")
    model, processor = build_tiny("bagel", seed=0)
    reference_pipe = G2TRBagelPipeline(model=model, processor=processor, device="cpu")
    want = run(reference_pipe, ["make the sky red", "a car"], [wide, None], generator=seeded(), output_type="pt")

    model, processor = build_tiny("bagel", seed=0)
    pipe = G2TRBagelPipeline(model=model, processor=processor, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`device=`"):
            pipe.enable_model_cpu_offload()
    pipe.enable_model_cpu_offload(device="cpu")
    hooked = {name: getattr(module, "_hf_hook", None) for name, module in model.named_modules()}
    offloaded = ["model.vit_model", "model.language_model", "model.vae", "model.language_model.embed_tokens", "lm_head"]
    assert [name for name, hook in hooked.items() if hook is not None] == sorted(offloaded, key=list(hooked).index)
    # The chain: the language model offloads the ViT, the VAE offloads the language model; the others only load.
    assert hooked["model.language_model"].prev_module_hook.model is model.model.vit_model
    assert hooked["model.vae"].prev_module_hook.model is model.model.language_model
    assert hooked["lm_head"].prev_module_hook is None and pipe.device == torch.device("cpu")

    calls = []
    pre_forward = hooked["model.vae"].pre_forward
    hooked["model.vae"].pre_forward = lambda module, *a, **k: calls.append(1) or pre_forward(module, *a, **k)
    got = run(pipe, ["make the sky red", "a car"], [wide, None], generator=seeded(), output_type="pt")
    # The VAE's hook ran for its encode and its two decodes (two output sizes), through diffusers' forward hooks.
    assert len(calls) == 3
    for ours, theirs in zip(got.images, want.images):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    pipe.remove_all_hooks()
    assert all(getattr(module, "_hf_hook", None) is None for module in model.modules())


# --- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_runs_several_prompts_and_images_per_prompt(tmp_path, wide, capsys):
    from g2tr_hf.cli import main as cli_main

    source = tmp_path / "in.png"
    wide.save(source)
    command = ["generate", "--prompt", "a cat", "a dog", "--num-images-per-prompt", "2", "--steps", "2",
               "--height", "16", "--width", "32", "-o", str(tmp_path / "gen.png")]  # fmt: skip
    assert cli_main(command) == 0
    written = sorted(path.name for path in tmp_path.glob("gen-*.png"))
    assert written == ["gen-0.png", "gen-1.png", "gen-2.png", "gen-3.png"]
    assert PIL.Image.open(tmp_path / "gen-3.png").size == (32, 16)
    assert "4 image(s)" in capsys.readouterr().out

    command = ["edit", "--image", str(source), "--prompt", "red", "blue", "--steps", "2", "-o", str(tmp_path / "e.png")]
    assert cli_main(command) == 0
    assert sorted(path.name for path in tmp_path.glob("e-*.png")) == ["e-0.png", "e-1.png"]
    command = ["edit", "--image", str(source), str(source), "--prompt", "a", "b", "c", "-o", str(tmp_path / "x.png")]
    assert cli_main(command) == 2
    assert "`--image`" in capsys.readouterr().err

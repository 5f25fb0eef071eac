"""The diffusers options of `G2TRInternVLUPipeline`, with `G2TRBagelPipeline`'s semantics (`pipeline_utils`), on the
tiny random InternVL-U (CPU, fp32, 2 DPM-Solver++ steps).

What is checked: the same seed gives the same image; `num_images_per_prompt` images differ, and each equals the single
run with the matching generator (or the matching noise); several prompts with several images each equal their single
runs; `latents=` replaces the noise in every accepted form (with a shape check); `callback_on_step_end` sees every
step, can replace the latents and can stop the loop; every `output_type`; `return_dict=False`;
`enable_model_cpu_offload` installs its hooks (the generation decoder included) and changes nothing in the output;
the CLI's `--num-images-per-prompt`; bad inputs fail with errors naming the argument.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from g2tr_hf.pipeline_internvlu import G2TRInternVLUPipeline
from g2tr_hf.tiny import build_tiny_internvlu_generation


STEPS = 2
RATIO = 0.5
EXACT = dict(rtol=0.0, atol=0.0)
EDIT_SHAPE = (4, 8, 10)  # the 56x40 input is generated at 64x80: latents [C = 4, 64 / 8, 80 / 8]
T2I_SHAPE = (4, 8, 8)  # text-to-image defaults to 64x64 on the tiny decoder


def make_image(seed: int, size: tuple[int, int] = (56, 40)) -> PIL.Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return PIL.Image.fromarray(coarse).resize(size, PIL.Image.BILINEAR)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build_pipe() -> G2TRInternVLUPipeline:
    model, processor, decoder, scheduler = build_tiny_internvlu_generation(seed=0)
    return G2TRInternVLUPipeline(model, processor, generation_decoder=decoder, scheduler=scheduler, device="cpu")


@pytest.fixture(scope="module")
def pipe():
    return build_pipe()


@pytest.fixture(scope="module")
def image():
    return make_image(0)


def run(pipe, prompt="make the sky red", image=None, **kwargs):
    call = {"num_inference_steps": STEPS, "g2tr_ratio": RATIO, "show_progress": False, **kwargs}
    return pipe(prompt=prompt, image=image, **call)


def noise(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """The pipeline's draw: one image's [1, C, h, w] noise, as the official pipeline's `randn_tensor`."""
    return randn_tensor((1, *shape), generator=generator, dtype=torch.float32)[0]


# --- seeds, num_images_per_prompt, several prompts ----------------------------------------------------------------


def test_same_seed_same_image(pipe, image):
    first = run(pipe, image=image, generator=seeded(0), output_type="pt").images
    again = run(pipe, image=image, generator=seeded(0), output_type="pt").images
    other = run(pipe, image=image, generator=seeded(1), output_type="pt").images
    assert len(first) == 1 and first[0].shape == (3, 64, 80)
    assert pipe.latent_shape((64, 80)) == EDIT_SHAPE and pipe.latent_shape((64, 64)) == T2I_SHAPE
    torch.testing.assert_close(first[0], again[0], **EXACT)
    assert not torch.allclose(first[0], other[0])


def test_num_images_per_prompt_images_differ_and_equal_their_single_runs(pipe, image):
    shared = run(pipe, image=image, generator=seeded(3), num_images_per_prompt=2, output_type="pt")
    assert len(shared.images) == 2 and shared.thoughts == [None, None] and len(shared.image_reductions) == 2
    assert not torch.allclose(shared.images[0], shared.images[1])
    # One generator: the images draw their noise from it in turn.
    generator = seeded(3)
    draws = [noise(generator, EDIT_SHAPE) for _ in range(2)]
    for index in range(2):
        single = run(pipe, image=image, latents=draws[index], output_type="pt").images[0]
        torch.testing.assert_close(shared.images[index], single, **EXACT)
    # One generator per image: each image equals the single run with its generator.
    per_image = run(pipe, image=image, generator=[seeded(5), seeded(6)], num_images_per_prompt=2, output_type="pt")
    for index, seed in enumerate((5, 6)):
        single = run(pipe, image=image, generator=seeded(seed), output_type="pt").images[0]
        torch.testing.assert_close(per_image.images[index], single, **EXACT)


def test_several_prompts_with_several_images_equal_their_single_runs(pipe, image):
    prompts, images = ["make the sky red", "a red car"], [image, None]
    batch = run(pipe, prompts, images, generator=[seeded(1), seeded(2)], num_images_per_prompt=2, output_type="latent")
    assert [tuple(latent.shape) for latent in batch.images] == [EDIT_SHAPE] * 2 + [T2I_SHAPE] * 2
    assert batch.image_reductions[0] is batch.image_reductions[1] and batch.image_reductions[2] is None
    for prompt_index, (prompt, source) in enumerate(zip(prompts, images)):
        single = run(pipe, prompt, source, generator=seeded(1 + prompt_index), num_images_per_prompt=2,
                     output_type="latent").images  # fmt: skip
        for image_index in range(2):
            torch.testing.assert_close(batch.images[2 * prompt_index + image_index], single[image_index], **EXACT)


def test_cot_mode_writes_once_per_prompt_for_all_its_images(pipe, image, monkeypatch):
    thinks = []
    original = pipe.think
    monkeypatch.setattr(pipe, "think", lambda *a, **k: thinks.append(1) or original(*a, **k))
    out = run(pipe, image=image, generator=seeded(), think=True, max_think_tokens=3, num_images_per_prompt=2,
              output_type="latent")  # fmt: skip
    assert len(thinks) == 1 and len(out.thoughts) == 2 and out.thoughts[0] is not None
    assert out.thoughts[0] == out.thoughts[1] and not torch.allclose(out.images[0], out.images[1])


# --- latents= -----------------------------------------------------------------------------------------------------


def test_user_latents_replace_the_noise_in_every_accepted_form(pipe):
    generator = seeded(5)
    draws = [noise(generator, T2I_SHAPE) for _ in range(2)]
    from_generator = run(pipe, ["a", "b"], generator=seeded(5), output_type="latent").images
    for latents in (draws, torch.stack(draws)):
        given = run(pipe, ["a", "b"], latents=latents, output_type="latent").images
        for ours, theirs in zip(given, from_generator):
            torch.testing.assert_close(ours, theirs, **EXACT)
    alone = run(pipe, "a", latents=draws[0][None], output_type="latent").images[0]  # [1, C, h, w] for one image
    torch.testing.assert_close(alone, from_generator[0], **EXACT)


@pytest.mark.parametrize(
    "latents, message",
    [
        (torch.zeros(4, 8, 4), r"\[4, 8, 8\]"),
        (torch.zeros(3, 4, 8, 8), r"one latent per generated image \(2\)"),
        ([torch.zeros(4, 8, 8)], r"shapes \[\[4, 8, 8\], \[4, 8, 8\]\]"),
        ("noise", "tensor or a list"),
    ],
)
def test_bad_latents_are_refused_with_the_expected_shape(pipe, latents, message):
    with pytest.raises(ValueError, match=f"`latents`.*{message}"):
        run(pipe, ["a", "b"], latents=latents)


def test_latents_of_images_of_different_sizes_must_be_a_list(pipe, image):
    with pytest.raises(ValueError, match=r"`latents`.*pass a list"):
        run(pipe, ["x", "y"], [image, None], latents=torch.zeros(2, *T2I_SHAPE))
    both = [noise(seeded(0), EDIT_SHAPE), noise(seeded(1), T2I_SHAPE)]
    out = run(pipe, ["x", "y"], [image, None], latents=both, output_type="pt").images
    assert [tuple(tensor.shape) for tensor in out] == [(3, 64, 80), (3, 64, 64)]


# --- callback_on_step_end -----------------------------------------------------------------------------------------


def test_callback_sees_every_step_and_can_replace_the_latents(pipe, image):
    seen = []

    def record(pipeline, step, timestep, callback_kwargs):
        assert pipeline is pipe and set(callback_kwargs) == {"latents"}
        seen.append((step, float(timestep), [latent.clone() for latent in callback_kwargs["latents"]]))
        return {}

    final = run(pipe, ["x", "y"], [image, None], generator=seeded(), callback_on_step_end=record, output_type="latent")
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=3.0)
    scheduler.set_timesteps(STEPS)
    assert [(step, t) for step, t, _ in seen] == [(index, float(t)) for index, t in enumerate(scheduler.timesteps)]
    assert len(seen) == STEPS
    assert [tuple(latent.shape) for latent in seen[0][2]] == [EDIT_SHAPE, T2I_SHAPE]  # every image at each step
    for ours, theirs in zip(seen[-1][2], final.images):
        torch.testing.assert_close(ours, theirs, **EXACT)

    def replace(pipeline, step, timestep, callback_kwargs):
        return {"latents": [latent + 1.0 for latent in callback_kwargs["latents"]]} if step == 0 else {}

    shifted = run(pipe, ["x", "y"], [image, None], generator=seeded(), callback_on_step_end=replace,
                  output_type="latent")  # fmt: skip
    assert not torch.allclose(shifted.images[0], final.images[0])  # step 1 continued from the replaced latents

    def zero_last(pipeline, step, timestep, callback_kwargs):
        return {"latents": torch.zeros(1, *EDIT_SHAPE)} if step == 1 else {}

    zeros = run(pipe, image=image, generator=seeded(), callback_on_step_end=zero_last, output_type="latent")
    torch.testing.assert_close(zeros.images[0], torch.zeros(EDIT_SHAPE), **EXACT)


def test_callback_can_stop_the_loop(pipe, image):
    steps, first = [], []

    def stop(pipeline, step, timestep, callback_kwargs):
        steps.append(step)
        first.append(callback_kwargs["latents"][0].clone())
        pipeline._interrupt = True
        return {}

    stopped = run(pipe, image=image, generator=seeded(), num_inference_steps=4, callback_on_step_end=stop,
                  output_type="latent")  # fmt: skip
    assert steps == [0]
    torch.testing.assert_close(stopped.images[0], first[0], **EXACT)
    again = run(pipe, image=image, generator=seeded(), num_inference_steps=4, output_type="latent")
    assert not pipe.interrupt and not torch.allclose(again.images[0], stopped.images[0])  # reset by the next call


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"callback_on_step_end": "print"}, "callback_on_step_end"),
        ({"callback_on_step_end": lambda *a: {}, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]},
         "callback_on_step_end_tensor_inputs"),
        ({"callback_on_step_end": lambda p, s, t, k: {"latents": [torch.zeros(4, 4, 4)]}}, "callback_on_step_end"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"num_images_per_prompt": True}, "num_images_per_prompt"),
        ({"num_images_per_prompt": 2, "generator": [seeded(), seeded(), seeded()]}, "generator"),
        ({"return_dict": "no"}, "return_dict"),
        ({"output_type": "jpeg"}, "output_type"),
    ],
)  # fmt: skip
def test_bad_options_name_the_argument(pipe, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        run(pipe, "a red car", **kwargs)


# --- output types, return_dict -----------------------------------------------------------------------------------


def test_output_types_and_return_dict(pipe, image):
    def call(**kwargs):
        return run(pipe, ["x", "y"], [image, None], generator=[seeded(0), seeded(1)], **kwargs)

    tensors, arrays = call(output_type="pt").images, call(output_type="np").images
    images, latents = call(output_type="pil").images, call(output_type="latent").images
    assert [tuple(t.shape) for t in tensors] == [(3, 64, 80), (3, 64, 64)]
    assert [tuple(latent.shape) for latent in latents] == [EDIT_SHAPE, T2I_SHAPE]
    for tensor, array, picture, latent in zip(tensors, arrays, images, latents):
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, tensor.permute(1, 2, 0).numpy())
        assert isinstance(picture, PIL.Image.Image) and picture.size == (tensor.shape[2], tensor.shape[1])
        np.testing.assert_array_equal(np.asarray(picture), (tensor * 255).to(torch.uint8).permute(1, 2, 0).numpy())
        torch.testing.assert_close(pipe.postprocess(latent[None], tuple(tensor.shape[1:]), "pt"), tensor, **EXACT)

    as_tuple = call(output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2 and as_tuple[1] == [None, None]
    for ours, theirs in zip(as_tuple[0], tensors):
        torch.testing.assert_close(ours, theirs, **EXACT)
    resized = run(pipe, "a cat", generator=seeded(), height=70, width=90, output_type="np").images[0]
    assert resized.shape == (70, 90, 3)  # generated at 64x80, resized back like "pt"


# --- model CPU offload --------------------------------------------------------------------------------------------


def test_model_cpu_offload_installs_hooks_and_keeps_the_output(pipe, image):
    pytest.importorskip("accelerate")
    want = run(pipe, ["make the sky red", "a car"], [image, None], generator=seeded(), output_type="pt").images

    offloaded_pipe = build_pipe()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`device=`"):
            offloaded_pipe.enable_model_cpu_offload()
    offloaded_pipe.enable_model_cpu_offload(device="cpu")
    model, decoder = offloaded_pipe.model, offloaded_pipe.generation_decoder
    hooked = [name for name, module in model.named_modules() if getattr(module, "_hf_hook", None) is not None]
    assert sorted(hooked) == sorted(
        ["model.vision_model", "model.language_model", "model.vae", "model.language_model.embed_tokens", "lm_head"]
    )
    # The chain ViT -> LLM -> generation decoder (a pipeline component) -> VAE; the others only load.
    assert model.model.language_model._hf_hook.prev_module_hook.model is model.model.vision_model
    assert decoder._hf_hook.prev_module_hook.model is model.model.language_model
    assert model.model.vae._hf_hook.prev_module_hook.model is decoder
    assert model.lm_head._hf_hook.prev_module_hook is None and offloaded_pipe.device == torch.device("cpu")

    calls = []
    pre_forward = decoder._hf_hook.pre_forward
    decoder._hf_hook.pre_forward = lambda module, *a, **k: calls.append(1) or pre_forward(module, *a, **k)
    got = run(offloaded_pipe, ["make the sky red", "a car"], [image, None], generator=seeded(), output_type="pt").images
    assert len(calls) == 2 * STEPS  # one MMDiT call per image and step, each through the hook
    for ours, theirs in zip(got, want):
        torch.testing.assert_close(ours, theirs, **EXACT)
    offloaded_pipe.remove_all_hooks()
    modules = [*model.modules(), *decoder.modules()]
    assert all(getattr(module, "_hf_hook", None) is None for module in modules)


# --- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_makes_several_images_per_prompt(tmp_path, capsys):
    from g2tr_hf.cli import main as cli_main

    command = ["generate", "--model", "tiny-internvlu", "--prompt", "a cat", "--num-images-per-prompt", "2",
               "--steps", "2", "--height", "32", "--width", "48", "-o", str(tmp_path / "gen.png")]  # fmt: skip
    assert cli_main(command) == 0
    assert sorted(path.name for path in tmp_path.glob("gen-*.png")) == ["gen-0.png", "gen-1.png"]
    first, second = (np.asarray(PIL.Image.open(tmp_path / f"gen-{i}.png")) for i in range(2))
    assert first.shape == (32, 48, 3) and not np.array_equal(first, second)
    assert "2 image(s)" in capsys.readouterr().out

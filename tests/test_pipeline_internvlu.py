"""InternVL-U image editing and text-to-image (`G2TRInternVLUPipeline`) on the tiny random model, CPU, few steps.

What is checked: determinism for a seed; one VAE encode per input image, whose latent is both the G2TR anchors and
the reference frame; one VLM pass over the three rows; ratio 1.0 equals the reduced path with every token kept;
kept ViT tokens keep their rows of the full position grid and the same keep set in the conditional and image-only
rows; the official mode's 1-D fallback and cross-row merge; prompts, resize, schedule and guidance against hand
values; CoT mode; bad inputs; and a load of an exported folder in an interpreter without g2tr_hf.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch

import g2tr_hf.pipeline_internvlu as pipeline_module
from g2tr_hf.hub import export
from g2tr_hf.pipeline_internvlu import (
    BLANK_MESSAGE,
    DEFAULT_SCHEDULER_CONFIG,
    G2TRInternVLUPipeline,
    editing_token_accounting,
    generation_prompts,
    guided_velocity,
    smart_resize,
)
from g2tr_hf.tiny import build_tiny_internvlu_generation
from remote_code import run_without_g2tr_hf


STEPS = 2
RATIO = 0.5


def make_image(seed: int, size: tuple[int, int] = (56, 40)) -> PIL.Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return PIL.Image.fromarray(coarse).resize(size, PIL.Image.BILINEAR)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def parts():
    return build_tiny_internvlu_generation(seed=0)


@pytest.fixture(scope="module")
def pipe(parts):
    model, processor, decoder, scheduler = parts
    return G2TRInternVLUPipeline(model, processor, generation_decoder=decoder, scheduler=scheduler, device="cpu")


@pytest.fixture(scope="module")
def image():
    return make_image(0)


def edit(pipe, image, **kwargs):
    settings = dict(num_inference_steps=STEPS, generator=seeded(0), show_progress=False)
    settings.update(kwargs)
    return pipe(prompt="make the sky red", image=image, **settings)


class Recorder:
    """Wraps a bound method, recording its arguments and results."""

    def __init__(self, monkeypatch, owner, name):
        self.calls, self.results = [], []
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            self.calls.append((args, kwargs))
            self.results.append(result)
            return result

        monkeypatch.setattr(owner, name, wrapper)


# --- pure pieces ----------------------------------------------------------------------------------------------------


def test_prompts_follow_the_official_rows():
    block = "<img><IMG_CONTEXT></img>"
    cond, part, uncond = generation_prompts("  make it red ", 1, "SYS", block)
    # As upstream: the placeholder is put in front BEFORE the text is stripped, so inner spaces stay.
    assert cond.endswith("<|im_start|>user\n" + block + "\n  make it red.<|im_end|>\n<|im_start|>assistant\n<img>")
    assert part.endswith("user\n" + block + "\nGenerate an image based on reference images.<|im_end|>\n"
                         "<|im_start|>assistant\n<img>")  # fmt: skip
    assert f"user\n{BLANK_MESSAGE}<|im_end|>" in uncond and "<img><IMG_CONTEXT>" not in uncond
    assert cond.startswith("<|im_start|>system\nSYS请描述输入图像的关键特征") and cond.count("<|im_start|>") == 3
    t2i = generation_prompts("a cat", 0, "SYS", block)
    assert "user\nA cat.<|im_end|>" in t2i[0] and t2i[1] == t2i[2]  # text-to-image: image-only row = blank row
    assert t2i[0].startswith("<|im_start|>system\nSYS请通过详细描述")
    assert not generation_prompts("a cat", 0, "SYS", block, cot=True)[0].endswith("<img>")


def test_smart_resize_by_hand():
    assert smart_resize(480, 640) == (480, 640)
    assert smart_resize(300, 500) == (400, 672)  # area below 512^2: scaled by 1.32, sides ceil'd to 16
    assert smart_resize(1000, 1000) == (992, 992)
    assert smart_resize(2048, 1024) == (1024, 512)  # longest side <= 1024
    assert smart_resize(768, 768) == (768, 768)
    with pytest.raises(ValueError, match="at least 16x16"):
        smart_resize(10, 100)


def test_schedule_is_the_official_one():
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(**DEFAULT_SCHEDULER_CONFIG)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == [999, 982, 963, 944, 922, 899, 874, 847, 817, 785, 749, 710, 666, 617,
                                            562, 499, 428, 345, 249, 136]  # fmt: skip
    assert scheduler.sigmas[-1] == 0


def test_guidance_by_hand():
    zeros = torch.zeros(1, 2, 1, 1)
    conditional = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # |c - img| = 5
    image_only = zeros.clone()
    plain = guided_velocity(conditional, image_only, zeros, 4.5, 2.0, renormalize=False)
    torch.testing.assert_close(plain, 4.5 * conditional)
    renormed = guided_velocity(conditional, image_only, zeros, 4.5, 2.0, renormalize=True)
    torch.testing.assert_close(renormed, 4.5 * conditional / 5**0.4)
    small = conditional / 10  # norm 0.5 < 1: left as it is
    torch.testing.assert_close(guided_velocity(small, image_only, zeros, 4.5, 2.0, renormalize=True), 4.5 * small)


def test_accounting_at_1024():
    numbers = editing_token_accounting(1024, 1024, ratio=0.5, prompt_text_tokens=120, span_text_tokens=40)
    assert numbers["kept_per_image"] == 128
    assert numbers["prefill_tokens_full"] == 3 * 120 + 2 * 258 and numbers["prefill_tokens_reduced"] == 876 - 256
    image_row = 4096 * 2 + 40 + 258
    assert numbers["mmdit_tokens_per_step_full"] == 2 * image_row + 4096 + 40
    assert numbers["mmdit_saving_per_image_row"] == 128 / image_row  # about 1.5 % of a row that holds the image
    assert numbers["mmdit_tokens_removed_per_call"] == 256 * 20
    assert editing_token_accounting(ratio=1.0)["mmdit_saving"] == 0
    assert editing_token_accounting(ratio=0.05)["kept_per_image"] == 32  # min_keep


# --- the sampler ----------------------------------------------------------------------------------------------------


def test_same_seed_same_image_and_sizes(pipe, image):
    first = np.asarray(edit(pipe, image, g2tr_ratio=RATIO).images[0])
    again = np.asarray(edit(pipe, image, g2tr_ratio=RATIO).images[0])
    other = np.asarray(edit(pipe, image, g2tr_ratio=RATIO, generator=seeded(1)).images[0])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.shape == (64, 80, 3)  # the VAE-side size of the 56x40 input (area >= 64^2, multiples of 16)
    resized = edit(pipe, image, g2tr_ratio=RATIO, height=100, width=90).images[0]
    assert resized.size == (90, 100)  # generated at 96x80, resized back
    with pytest.raises(ValueError, match="`height`/`width`: a 48x64 output takes at most 0 input"):
        edit(pipe, image, height=70, width=50)
    t2i = pipe(prompt="a cat", num_inference_steps=STEPS, show_progress=False, output_type="pt").images[0]
    assert t2i.shape == (3, 64, 64) and 0 <= float(t2i.min()) and float(t2i.max()) <= 1


def test_one_vae_encode_per_reference_and_one_vlm_pass(pipe, monkeypatch):
    encodes = Recorder(monkeypatch, pipe.model.model, "encode_vae_latents")
    passes = Recorder(monkeypatch, pipe, "_run_language_model")
    conditioning = Recorder(monkeypatch, pipe.generation_decoder, "prepare_conditioning")
    images = [make_image(1, (64, 64)), make_image(2, (96, 96))]
    result = pipe(prompt="<image> and <image>: swap them", image=images, num_inference_steps=STEPS,
                  g2tr_ratio=RATIO, generator=seeded(), show_progress=False, width=96, height=96)  # fmt: skip
    assert len(encodes.calls) == 2 and len(passes.calls) == 1
    latents = [output[0] for output in encodes.results]
    kwargs = conditioning.calls[0][1]
    for row in (0, 1):  # conditional and image-only rows hold both references, the very latents encoded
        for index, latent in enumerate(latents):
            height, width = latent.shape[-2:]
            assert torch.equal(kwargs["conditional_input"][row][index, :, :height, :width], latent.float())
    assert kwargs["conditional_input"][2] is None
    # The same latents were the anchors: the plans equal a reduction computed from them.
    features = pipe.model.model.get_image_features(
        torch.cat([pipe.processor.image_processor([im], return_tensors="pt")["pixel_values"] for im in images])
    ).pooler_output
    again = pipe.reduce_images(features, [{"latent": latent.float()} for latent in latents], RATIO)
    for plan, expected in zip(result.image_reductions[0], again):
        assert torch.equal(plan.keep, expected.keep)


def test_full_keep_equals_ratio_one(pipe, image, monkeypatch):
    """The reduced path with every token kept gives the unreduced image bit for bit (positions, merge, compaction)."""
    plain = np.asarray(edit(pipe, image, g2tr_ratio=1.0).images[0])
    original = pipe.reduce_images

    def keep_all(features, references, ratio):
        plans = original(features, references, 0.5)
        return [
            dataclasses.replace(p, keep=torch.arange(p.num_tokens), tokens=f, assignment=torch.arange(p.num_tokens))
            for p, f in zip(plans, features)
        ]

    monkeypatch.setattr(pipe, "reduce_images", keep_all)
    np.testing.assert_array_equal(np.asarray(edit(pipe, image, g2tr_ratio=1.0).images[0]), plain)
    official = np.asarray(edit(pipe, image, g2tr_ratio=1.0, g2tr_mode="official").images[0])
    np.testing.assert_array_equal(official, plain)


def test_reduced_positions_are_the_full_ones_without_the_dropped_rows(pipe, image, monkeypatch):
    conditioning = Recorder(monkeypatch, pipe.generation_decoder.decoder, "prepare_conditioning")
    full = edit(pipe, image, g2tr_ratio=1.0)
    reduced = edit(pipe, image, g2tr_ratio=RATIO)
    official = edit(pipe, image, g2tr_ratio=RATIO, g2tr_mode="official")
    assert full.image_reductions[0] is None
    (plan,) = reduced.image_reductions[0]
    kept = plan.keep
    tokens = pipe.model.config.image_seq_length
    full_c, reduced_c, official_c = conditioning.results
    for row in (0, 1):
        vit = conditioning.calls[0][0][1][row]  # the full run's ViT mask of this row
        start = int(vit.nonzero()[0])
        length = full_c.text_positions[row].shape[0]
        rows = torch.cat([torch.arange(start), start + kept, torch.arange(start + tokens, length)])
        expected = full_c.text_positions[row][rows]
        assert torch.equal(reduced_c.text_positions[row], expected)
        # Same keep set in the conditional and image-only rows.
        assert torch.equal(conditioning.calls[1][1]["image_keep_cond"][row][0], kept)
        # Official: the K tokens get 1-D positions and the text after them is shifted.
        run = official_c.text_positions[row][start : start + kept.numel()]
        assert (run == run[:, :1]).all() and run[:, 0].tolist() == list(
            range(int(run[0, 0]), int(run[0, 0]) + kept.numel())
        )
        after = official_c.text_positions[row][start + kept.numel(), 0]
        assert after == run[0, 0] + kept.numel() and after != expected[start + kept.numel(), 0]
    # Two layouts: the conditional and image-only rows (target + reference) and the unconditional row (target).
    assert [group.rows.tolist() for group in reduced_c.groups] == [[0, 1], [2]]
    assert reduced_c.groups[1].reference_tokens.shape[1] == 0
    assert all(torch.equal(a, b) for a, b in zip(reduced_c.image_positions, full_c.image_positions))
    # Different positions and merges give a different image; the clean reduced image differs from the full one.
    assert not np.array_equal(np.asarray(reduced.images[0]), np.asarray(official.images[0]))
    assert not np.array_equal(np.asarray(reduced.images[0]), np.asarray(full.images[0]))


def test_official_merge_absorbs_both_rows_and_clean_merge_is_shared(pipe, image):
    reference = pipe.encode_reference(image)
    features = pipe.model.model.get_image_features(reference["vit_pixels"]).pooler_output
    (plan,) = pipe.reduce_images(features, [reference], RATIO)
    rows = generation_prompts("edit", 1, "S", "<img>" + "<IMG_CONTEXT>" * features.shape[1] + "</img>")
    ids, mask = pipe._row_ids(rows)
    vit = ids == pipe.model.config.image_token_id
    clean = pipe._embed_rows(ids, mask, features, [plan], "clean", image_rows=2)
    official = pipe._embed_rows(ids, mask, features, [plan], "official", image_rows=2)
    for embeds, attention, compact_ids, _ in (clean, official):
        assert int((compact_ids == pipe.model.config.image_token_id).sum()) == 2 * plan.num_kept
    clean_vit = [clean[0][row][clean[2][row] == pipe.model.config.image_token_id] for row in (0, 1)]
    official_vit = [official[0][row][official[2][row] == pipe.model.config.image_token_id] for row in (0, 1)]
    assert torch.equal(clean_vit[0], clean_vit[1]) and torch.allclose(clean_vit[0], plan.tokens)
    assert torch.equal(official_vit[1], features[0, plan.keep])  # the image-only row: unmerged
    # The conditional row: (x_k + 2 sum x_d) / (1 + 2 m) per group.
    dropped = plan.dropped
    group = plan.assignment[dropped]
    kept_features = features[0, plan.keep]
    sums = torch.zeros_like(kept_features).index_add_(0, group, features[0, dropped])
    counts = torch.zeros(plan.num_kept).index_add_(0, group, torch.ones(dropped.numel()))
    expected = (kept_features + 2 * sums) / (1 + 2 * counts)[:, None]
    torch.testing.assert_close(official_vit[0], expected, rtol=1e-5, atol=1e-6)
    assert vit.sum() == 2 * features.shape[1]


def test_cot_mode_writes_text_into_the_conditional_row(pipe, image, monkeypatch):
    rows = Recorder(monkeypatch, pipe, "_row_ids")
    start = pipe.tokenizer.convert_tokens_to_ids("<img>")
    result = edit(pipe, image, think=True, max_think_tokens=4, g2tr_ratio=1.0)
    assert isinstance(result.thoughts[0], str)
    texts, suffixes = rows.calls[-1][0]
    assert not any(text.endswith("<img>") for text in texts)  # CoT rows: `<img>` comes after the written ids
    written = suffixes[0][:-1]
    assert 1 <= len(written) <= 4 and suffixes[0][-1] == start and suffixes[1] == suffixes[2] == [start]
    assert pipe.tokenizer.decode(written) == result.thoughts[0]
    # The conditional row is the prompt followed by the written ids as generated (not re-tokenised text).
    ids, mask = rows.results[-1]
    assert ids[0, mask[0]][-len(written) - 1 :].tolist() == [*written, start]
    # The official cut drops the token before the stop token (two without one); same tokens at ratio 1.0.
    edit(pipe, image, think=True, max_think_tokens=4, g2tr_ratio=1.0, g2tr_mode="official")
    official = rows.calls[-1][0][1][0][:-1]
    assert official == written[: len(official)] and len(written) - len(official) in (1, 2)


def test_bad_inputs_are_clear(pipe, image):
    with pytest.raises(ValueError, match="`prompt` must be"):
        pipe(prompt=3)
    with pytest.raises(ValueError, match="`image` must hold"):
        pipe(prompt="x", image=[object()])
    with pytest.raises(ValueError, match="at least one input image"):
        pipe(prompt="x", image=[])
    with pytest.raises(ValueError, match="`g2tr_ratio`"):
        pipe(prompt="x", image=image, g2tr_ratio=0.0)
    with pytest.raises(ValueError, match="`g2tr_mode`"):
        pipe(prompt="x", image=image, g2tr_mode="fast")
    with pytest.raises(ValueError, match="`height` must be an integer >= 16"):
        pipe(prompt="x", height=8)
    with pytest.raises(ValueError, match="`num_inference_steps`"):
        pipe(prompt="x", num_inference_steps=0)
    with pytest.raises(ValueError, match="`generator`"):
        pipe(prompt=["x", "y"], generator=[seeded()])
    with pytest.raises(ValueError, match="2 `<image>` placeholders but 1"):
        pipe(prompt="<image> <image>", image=image)
    with pytest.raises(ValueError, match="`output_type`"):
        pipe(prompt="x", output_type="jpeg")
    with pytest.raises(ValueError, match="settings per call"):
        G2TRInternVLUPipeline(pipe.model, pipe.processor, generation_decoder=pipe.generation_decoder,
                              scheduler=pipe.scheduler, device="cpu", steps=3)  # fmt: skip


# --- the Hub folder -------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys

    import numpy as np, PIL.Image, torch
    from transformers import pipeline

    folder, image_path, output = sys.argv[1], sys.argv[2], sys.argv[3]
    pipe = pipeline(model=folder, trust_remote_code=True, device="cpu")
    result = pipe(prompt="make the sky red", image=PIL.Image.open(image_path), num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), g2tr_ratio=0.5, show_progress=False)
    np.save(output, np.asarray(result.images[0]))
    assert "g2tr_hf" not in sys.modules
    print("RESULT " + json.dumps({"pipeline": type(pipe).__module__ + "." + type(pipe).__name__,
                                  "decoder": type(pipe.generation_decoder).__module__, "task": pipe.task}))
    """
)


def test_pipeline_loads_from_an_exported_folder_without_g2tr_hf(parts, pipe, image, tmp_path):
    model, processor, decoder, scheduler = parts
    folder = export(model, processor, tmp_path / "internvlu-g2tr", generation_decoder=decoder, scheduler=scheduler)
    config = json.loads((folder / "config.json").read_text())
    entry = config["custom_pipelines"][pipeline_module.PIPELINE_TASK]
    assert entry["impl"] == "pipeline_internvlu.G2TRInternVLUPipeline"
    assert (folder / "generation_decoder" / "config.json").is_file()
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    source = tmp_path / "in.png"
    image.save(source)
    child = run_without_g2tr_hf(CHILD, folder, source, tmp_path / "out.npy", workdir=tmp_path)
    assert child["pipeline"].startswith("transformers_modules.") and child["pipeline"].endswith("G2TRInternVLUPipeline")
    assert child["decoder"].startswith("transformers_modules.") and child["task"] == pipeline_module.PIPELINE_TASK
    local = edit(pipe, PIL.Image.open(source), g2tr_ratio=RATIO).images[0]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.asarray(local))
    # A folder without the decoder still gives the understanding model, without the pipeline entry.
    plain = export(model, processor, tmp_path / "understanding")
    assert not json.loads((plain / "config.json").read_text()).get("custom_pipelines")
    assert not (plain / "generation_decoder").exists() and not (plain / "pipeline_internvlu.py").exists()

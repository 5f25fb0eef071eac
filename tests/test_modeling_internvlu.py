"""InternVL-U understanding with G2TR: checkpoint layout, parity with transformers' native InternVL, the reduction
hook, the cache, generation bookkeeping, batching, save/load and bad inputs. Tiny random models, no download."""

from __future__ import annotations

import functools
import re

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    InternVLConfig,
    InternVLForConditionalGeneration,
    pipeline,
)
from transformers.models.internvl.modeling_internvl import InternVLModel

from checkpoint_names import official_state_dict
from g2tr_hf.compat import output_cache
from g2tr_hf.generation_g2tr import compaction_index, stored_length
from g2tr_hf.configuration_internvlu import (
    QWEN_IMAGE_VAE_CONFIG,
    SPECIAL_TOKENS,
    G2TRInternVLUConfig,
    build_tiny_internvlu_config,
)
from g2tr_hf.modeling_internvlu import (
    vae_pixels_from_vit_pixels,
    G2TRInternVLUForConditionalGeneration,
    pixel_shuffle,
)
from g2tr_hf.processing_internvlu import G2TRInternVLUProcessor, build_tiny_processor
from g2tr_hf.reduction import build_latent_anchors, interpolate_channels, keep_count, latent_cell_index, reduce_tokens


TOKENS_PER_IMAGE = 16  # tiny geometry: 56 px, patch 7 -> 8x8 ViT grid -> 4x4 after the pixel shuffle


def _image(seed: int, size=(40, 30)) -> PIL.Image.Image:
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels)


def _messages(question: str, images: list) -> list[dict]:
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def processor() -> G2TRInternVLUProcessor:
    return build_tiny_processor()


@pytest.fixture(scope="module")
def model() -> G2TRInternVLUForConditionalGeneration:
    torch.manual_seed(0)
    return G2TRInternVLUForConditionalGeneration(build_tiny_internvlu_config()).eval()


@pytest.fixture(scope="module")
def inputs(processor):
    return processor.apply_chat_template(
        _messages("what is in the picture?", [_image(0)]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


def _run(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Configuration and checkpoint layout
# ----------------------------------------------------------------------------------------------------------------


def test_config_defaults_are_internvlu():
    config = G2TRInternVLUConfig()
    assert config.model_type == "g2tr_internvl_u"
    assert config.image_seq_length == 256 and config.image_grid_size == 16
    assert config.tie_word_embeddings is False and config.text_config.tie_word_embeddings is False
    assert config.text_config.hidden_size == 2048 and config.text_config.num_hidden_layers == 28
    assert config.vision_config.hidden_size == 1024 and config.vision_config.num_hidden_layers == 24
    assert (config.g2tr_ratio, config.g2tr_latent_pool, config.g2tr_min_keep) == (1.0, 2, 32)
    assert config.image_token_id == 151671 and config.special_token_ids[2] == 151671
    # The official config.json spells the LLM config `llm_config` and carries its own model_type.
    official = G2TRInternVLUConfig(
        llm_config={"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16},
        model_type="internvlu_chat",
        ps_version="v2",
    )
    assert official.text_config.hidden_size == 64 and official.model_type == "g2tr_internvl_u"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="g2tr_ratio"):
        build_tiny_internvlu_config(g2tr_ratio=1.5)
    with pytest.raises(ValueError, match="text_config"):
        G2TRInternVLUConfig(text_config={"model_type": "llama"})
    with pytest.raises(ValueError, match="special_token_ids"):
        G2TRInternVLUConfig(special_token_ids=[1, 2, 3])


def test_official_checkpoint_key_names():
    """The module tree has exactly the 658 `vlm/` tensors (and the 194 `vae/` tensors) of the official checkpoint."""
    with torch.device("meta"):
        full = G2TRInternVLUForConditionalGeneration(G2TRInternVLUConfig(vae_config=QWEN_IMAGE_VAE_CONFIG))
    keys = list(official_state_dict(full))
    vlm = [k for k in keys if not k.startswith("vae.")]
    assert len(vlm) == 658
    assert len(keys) - len(vlm) == 194
    expected_layer = {
        f"vision_model.encoder.layers.3.{name}"
        for name in [
            "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight",
            "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "norm1.weight", "norm1.bias", "norm2.weight",
            "norm2.bias", "ls1", "ls2",
        ]
    }  # fmt: skip
    assert {k for k in vlm if k.startswith("vision_model.encoder.layers.3.")} == expected_layer
    others = {k for k in vlm if not re.match(r"(vision_model\.encoder|language_model\.model)\.layers\.", k)}
    assert others == {
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.patch_embedding.bias",
        "vision_model.embeddings.position_embedding",
        "mlp1.0.weight", "mlp1.0.bias", "mlp1.1.weight", "mlp1.1.bias", "mlp1.3.weight", "mlp1.3.bias",
        "special_token_embedding.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    }  # fmt: skip
    shapes = official_state_dict(full)
    assert tuple(shapes["vision_model.encoder.layers.0.attn.qkv.weight"].shape) == (3072, 1024)
    assert tuple(shapes["mlp1.1.weight"].shape) == (2048, 4096)
    assert tuple(shapes["special_token_embedding.weight"].shape) == (10, 2048)
    assert tuple(shapes["vision_model.embeddings.position_embedding"].shape) == (1, 1025, 1024)


# ----------------------------------------------------------------------------------------------------------------
# Parity with transformers' native InternVL
# ----------------------------------------------------------------------------------------------------------------


def _native_config(config: G2TRInternVLUConfig) -> InternVLConfig:
    vision = config.vision_config
    return InternVLConfig(
        vision_config={
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "image_size": config.vision_image_size,
            "patch_size": vision.patch_size,
            "attention_bias": vision.qkv_bias,
            "use_qk_norm": vision.qk_normalization,
            "use_absolute_position_embeddings": True,
            "use_mean_pooling": True,  # no final norm, as InternViT
            "norm_type": vision.norm_type,
            "layer_norm_eps": vision.layer_norm_eps,
            "hidden_act": vision.hidden_act,
        },
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        image_seq_length=config.image_seq_length,
        downsample_ratio=config.downsample_ratio,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


# Original (InternVL-U) name -> native transformers name.
_NATIVE_RENAMES = [
    (r"^vision_model\.", "model.vision_tower."),
    (r"\.encoder\.layers\.", ".encoder.layer."),
    (r"\.embeddings\.class_embedding$", ".embeddings.cls_token"),
    (r"\.embeddings\.position_embedding$", ".embeddings.position_embeddings"),
    (r"\.embeddings\.patch_embedding\.", ".embeddings.patch_embeddings.projection."),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.ls1$", ".lambda_1"),
    (r"\.ls2$", ".lambda_2"),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]


def _to_native_state_dict(state_dict: dict, config: G2TRInternVLUConfig) -> dict:
    native = {}
    for name, tensor in state_dict.items():
        if name.startswith("vae.") or name == "special_token_embedding.weight":
            continue
        new_name = name
        for pattern, replacement in _NATIVE_RENAMES:
            new_name = re.sub(pattern, replacement, new_name)
        if ".attn.qkv." in new_name:  # the fused projection is split into q, k, v (weight AND bias)
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                native[new_name.replace(".attn.qkv.", f".attention.{part}_proj.")] = chunk.clone()
        else:
            native[new_name] = tensor.clone()
    # No native slot for `special_token_embedding`: fold its rows into the (untied) word embeddings.
    embeddings = native["model.language_model.embed_tokens.weight"]
    embeddings[torch.tensor(config.special_token_ids)] = state_dict["special_token_embedding.weight"]
    return native


def test_parity_with_native_internvl(model, inputs):
    native = InternVLForConditionalGeneration(_native_config(model.config)).eval()
    converted = _to_native_state_dict(official_state_dict(model), model.config)
    assert set(converted) == set(native.state_dict())
    native.load_state_dict(converted, strict=True)
    with torch.no_grad():
        expected = native(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"]
        ).logits
    ours = _run(model, inputs, g2tr_ratio=1.0).logits
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_eager_and_sdpa_agree(model, inputs):
    config = build_tiny_internvlu_config()
    config._attn_implementation = "eager"
    eager = G2TRInternVLUForConditionalGeneration(config).eval()
    eager.load_state_dict(model.state_dict())
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert eager.config.vision_config._attn_implementation == "eager"
    for ratio in (1.0, 0.5):
        torch.testing.assert_close(
            _run(eager, inputs, g2tr_ratio=ratio).logits, _run(model, inputs, g2tr_ratio=ratio).logits,
            rtol=1e-4, atol=1e-4,
        )


def test_pixel_shuffle_matches_native():
    grid = torch.randn(2, 8, 8, 5)
    expected = InternVLModel.pixel_shuffle(None, grid, scale_factor=0.5)
    assert torch.equal(pixel_shuffle(grid, 0.5), expected)
    # Output cell (0, 0) concatenates (row offset, column offset, channel).
    assert torch.equal(pixel_shuffle(grid, 0.5)[0, 0, 0], grid[0, :2, :2].reshape(-1))


# ----------------------------------------------------------------------------------------------------------------
# The reduction hook
# ----------------------------------------------------------------------------------------------------------------


def _unreduced_logits(model, inputs) -> torch.Tensor:
    """The plain InternVL-U forward written out: embeddings, special rows, visual tokens, Qwen3."""
    input_ids = inputs["input_ids"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        embeds = model.model.apply_special_token_embeddings(embeds, input_ids)
        features = model.get_image_features(inputs["pixel_values"]).pooler_output
        embeds = embeds.masked_scatter((input_ids == model.config.image_token_id)[..., None], features)
        hidden = model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
        return model.lm_head(hidden)


def test_ratio_one_is_bit_identical_and_skips_the_vae(model, inputs, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the VAE must not run at g2tr_ratio=1.0")

    monkeypatch.setattr(model.vae, "encode", fail)
    reference = _unreduced_logits(model, inputs)
    for kwargs in ({}, {"g2tr_ratio": 1.0}):
        outputs = _run(model, inputs, **kwargs)
        assert torch.equal(outputs.logits, reference)
        assert outputs.image_reductions is None and outputs.reduction is None
        assert torch.equal(outputs.reduced_attention_mask, inputs["attention_mask"])


def test_reduction_keeps_k_tokens_and_merges(model, inputs):
    outputs = _run(model, inputs, g2tr_ratio=0.5)
    (plan,) = outputs.image_reductions
    assert plan.num_kept == keep_count(TOKENS_PER_IMAGE, 0.5, model.config.g2tr_min_keep) == 8
    assert torch.equal(plan.keep, torch.sort(plan.keep).values)
    length = inputs["input_ids"].shape[1]
    assert outputs.logits.shape[1] == length - (TOKENS_PER_IMAGE - 8)
    assert outputs.reduced_attention_mask.shape == (1, length - 8) and bool(outputs.reduced_attention_mask.all())
    # The merged tokens are the plan applied to the mlp1 features of the image.
    torch.testing.assert_close(plan.tokens, plan.merge(outputs.image_hidden_states[0]))


def test_selection_on_internvlu_geometry_is_plain_topk():
    """16x16 tokens over the 56x56 latent of a 448 px image, pool 1 or 2: every token has its own latent cell, so
    the G2TR selection reduces to a global top-k of the cosine scores (docs/algorithm.md)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(256, 64, generator=generator)
    latent = torch.randn(16, 56, 56, generator=generator)
    project = functools.partial(interpolate_channels, out_dim=64)
    for pool in (1, 2):
        anchors, anchor_grid = build_latent_anchors(latent, pool=pool, project=project)
        assert latent_cell_index((16, 16), anchor_grid).unique().numel() == 256
        for ratio in (0.5, 0.25, 0.125):
            g2tr = reduce_tokens(features, (16, 16), anchors, anchor_grid, ratio=ratio, method="g2tr")
            topk = reduce_tokens(features, (16, 16), anchors, anchor_grid, ratio=ratio, method="topk")
            assert torch.equal(g2tr.keep, topk.keep)


def test_selection_of_the_model_is_topk_on_its_own_anchors(model, inputs):
    features = _run(model, inputs).image_hidden_states
    plan = model.model.reduce_image_features(features, inputs["vae_pixel_values"], inputs["vae_pixel_sizes"], 0.5)[0]
    (anchors, anchor_grid), = model.model.get_latent_anchors(inputs["vae_pixel_values"], inputs["vae_pixel_sizes"])
    assert anchor_grid == (4, 4) and anchors.shape == (16, model.config.text_config.hidden_size)
    topk = reduce_tokens(features[0], (4, 4), anchors, anchor_grid, ratio=0.5, method="topk")
    assert torch.equal(plan.keep, topk.keep)


def test_latent_anchors_use_the_normalised_posterior_mode(model, inputs):
    pixels = inputs["vae_pixel_values"]
    with torch.no_grad():
        raw = model.vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]
        latents = model.model.encode_vae_latents(pixels)
    mean = torch.tensor(model.vae.config.latents_mean)[None, :, None, None]
    std = torch.tensor(model.vae.config.latents_std)[None, :, None, None]
    torch.testing.assert_close(latents, (raw - mean) / std)
    # A smaller image inside the padding gets the anchors of its own latent crop.
    padded = torch.zeros(1, 3, 56, 56)
    padded[:, :, :40, :32] = pixels[:, :, :40, :32]
    (anchors, grid), = model.model.get_latent_anchors(padded, torch.tensor([[40, 32]]))
    assert grid == (3, 2) and anchors.shape[0] == 6


def test_cache_holds_k_plus_two_per_image(model, processor):
    question = "compare these"
    for num_images in (1, 2):
        batch = processor.apply_chat_template(
            _messages(question, [_image(i) for i in range(num_images)]),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        text_tokens = batch["input_ids"].shape[1] - num_images * (TOKENS_PER_IMAGE + 2)
        for ratio, kept in ((1.0, 16), (0.5, 8), (0.25, 4)):
            outputs = _run(model, batch, g2tr_ratio=ratio, use_cache=True)
            assert stored_length(output_cache(outputs)) == text_tokens + num_images * (kept + 2)


def test_per_call_ratio_leaves_the_config_alone(model, inputs):
    assert model.config.g2tr_ratio == 1.0
    reduced = _run(model, inputs, g2tr_ratio=0.25)
    assert reduced.reduction[0].num_kept == 4 and model.config.g2tr_ratio == 1.0
    assert _run(model, inputs).reduction is None
    with torch.no_grad():
        per_call = model.generate(**inputs, g2tr_ratio=0.5, max_new_tokens=4, do_sample=False)
    model.config.g2tr_ratio = 0.5
    try:
        with torch.no_grad():
            from_config = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    finally:
        model.config.g2tr_ratio = 1.0
    assert torch.equal(per_call, from_config)


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def _greedy_without_cache(model, inputs, steps: int, **kwargs) -> torch.Tensor:
    """Reference decoding: every step re-runs the whole prompt (reduction included) without a cache. As `generate`
    with `min_new_tokens=steps` and the shipped generation config: no eos, no suppressed token."""
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    banned = [*model.generation_config.eos_token_id, *model.generation_config.suppress_tokens]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False, **extra, **kwargs).logits
            token = logits[:, -1].index_fill(-1, torch.tensor(banned), float("-inf")).argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return input_ids


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_generate_keeps_the_prompt_and_matches_uncached_decoding(model, inputs, ratio):
    steps = 6
    with torch.no_grad():
        sequences = model.generate(
            **inputs, g2tr_ratio=ratio, max_new_tokens=steps, min_new_tokens=steps, do_sample=False
        )
    prompt = inputs["input_ids"]
    assert torch.equal(sequences[:, : prompt.shape[1]], prompt)
    assert sequences.shape[1] == prompt.shape[1] + steps
    reference = _greedy_without_cache(model, inputs, steps, g2tr_ratio=ratio)
    assert torch.equal(sequences, reference)


def test_generation_config_stops_at_im_end_and_img(model):
    config = model.config
    assert model.generation_config.eos_token_id == [config.im_end_token_id, config.image_start_token_id]


def test_batch_of_two_equals_two_single_runs(model, processor):
    conversations = [
        _messages("what is this?", [_image(3)]),
        _messages("describe both images in a few words please", [_image(4), _image(5)]),
    ]
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    batch = processor.apply_chat_template(conversations, padding=True, **kwargs)
    assert batch["attention_mask"][0, 0] == 0  # left padding
    steps = 5
    generate = {"g2tr_ratio": 0.5, "max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False}
    with torch.no_grad():
        together = model.generate(**batch, **generate)
        prefill = model(**batch, g2tr_ratio=0.5).logits[:, -1]
    for row, conversation in enumerate(conversations):
        single = processor.apply_chat_template(conversation, **kwargs)
        with torch.no_grad():
            alone = model.generate(**single, **generate)
            alone_prefill = model(**single, g2tr_ratio=0.5).logits[:, -1]
        assert torch.equal(together[row, -steps:], alone[0, -steps:])
        torch.testing.assert_close(prefill[row], alone_prefill[0], rtol=1e-4, atol=1e-4)


def test_compaction_index_left_pads_again():
    keep = ~torch.tensor([[False, False, True, False, True, False], [False] * 6])
    index, filled = compaction_index(keep)
    embeds = torch.arange(12).reshape(2, 6)
    assert filled.tolist() == [[False, False, True, True, True, True], [True] * 6]
    assert embeds.gather(1, index).masked_fill(~filled, -1).tolist() == [[-1, -1, 0, 1, 3, 5], list(range(6, 12))]


# ----------------------------------------------------------------------------------------------------------------
# Loading, Auto classes, pipeline
# ----------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_with_ratio_kwarg(model, processor, inputs, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    assert '"AutoModelForImageTextToText": "modeling_internvlu.G2TRInternVLUForConditionalGeneration"' in config
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, g2tr_ratio=0.5).eval()
    assert isinstance(loaded, G2TRInternVLUForConditionalGeneration) and loaded.config.g2tr_ratio == 0.5
    original = model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.state_dict().items())
    assert len(original) == len(loaded.state_dict())
    torch.testing.assert_close(_run(loaded, inputs).logits, _run(model, inputs, g2tr_ratio=0.5).logits)
    with pytest.raises(ValueError, match="g2tr_ratio"):
        AutoModelForImageTextToText.from_pretrained(tmp_path, g2tr_ratio=2.0)
    assert type(AutoModel.from_pretrained(tmp_path)) is G2TRInternVLUForConditionalGeneration

    pipe = pipeline("image-text-to-text", model=str(tmp_path), model_kwargs={"g2tr_ratio": 0.5})
    assert pipe.model.config.g2tr_ratio == 0.5
    result = pipe(text=_messages("what is in the picture?", [_image(0)]), generate_kwargs={"max_new_tokens": 3})
    assert result[0]["generated_text"][-1]["role"] == "assistant"
    with torch.no_grad():
        expected = model.generate(**inputs, g2tr_ratio=0.5, max_new_tokens=3, do_sample=False)
    expected_text = processor.decode(expected[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result[0]["generated_text"][-1]["content"] == expected_text


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(model, inputs):
    for ratio in (0.0, 1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match="g2tr_ratio"):
            _run(model, inputs, g2tr_ratio=ratio)
    without_vae_pixels = {k: v for k, v in inputs.items() if k != "vae_pixel_values"}
    with pytest.raises(ValueError, match="vae_pixel_values"):
        _run(model, without_vae_pixels, g2tr_ratio=0.5)
    with pytest.raises(ValueError, match="vae_pixel_values"):
        _run(model, {**inputs, "vae_pixel_values": inputs["vae_pixel_values"][:, :2]}, g2tr_ratio=0.5)
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        _run(model, {**inputs, "pixel_values": inputs["pixel_values"].repeat(2, 1, 1, 1)})
    with pytest.raises(ValueError, match="pixel_values"):
        _run(model, {**inputs, "pixel_values": inputs["pixel_values"][..., :28]})
    torch.manual_seed(0)
    no_vae = G2TRInternVLUForConditionalGeneration(build_tiny_internvlu_config(vae_config=None)).eval()
    assert no_vae.vae is None
    _run(no_vae, inputs)  # ratio 1.0 works without a VAE
    with pytest.raises(ValueError, match="VAE"):
        _run(no_vae, inputs, g2tr_ratio=0.5)


def test_special_token_embedding_applies_to_the_prompt(model, inputs):
    reference = _run(model, inputs).logits
    slot = SPECIAL_TOKENS.index("<img>")
    with torch.no_grad():
        saved = model.model.special_token_embedding.weight[slot].clone()
        model.model.special_token_embedding.weight[slot] += 1.0
        try:
            changed = _run(model, inputs).logits
        finally:
            model.model.special_token_embedding.weight[slot] = saved
    first_image = int((inputs["input_ids"][0] == model.config.image_start_token_id).nonzero()[0])
    assert torch.equal(changed[:, :first_image], reference[:, :first_image])
    assert not torch.allclose(changed[:, first_image:], reference[:, first_image:])


def test_official_anchor_source_rebuilds_vae_pixels_from_the_vit_input(model, inputs):
    """`g2tr_anchor_source="vit_pixels"`: the anchors come from the ViT pixels de-normalised with CLIP statistics (the
    official code's understanding path), not from `vae_pixel_values`."""
    official = G2TRInternVLUForConditionalGeneration(
        build_tiny_internvlu_config(g2tr_anchor_source="vit_pixels")
    ).eval()
    official.load_state_dict(model.state_dict())
    pixels = inputs["pixel_values"]
    rebuilt = vae_pixels_from_vit_pixels(pixels)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[None, :, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[None, :, None, None]
    torch.testing.assert_close(rebuilt, ((pixels * std + mean).clamp(0, 1) * 2 - 1))
    garbage = {**inputs, "vae_pixel_values": torch.zeros_like(inputs["vae_pixel_values"])}
    with torch.no_grad():
        features = model.get_image_features(pixels).pooler_output
        expected = model.model.reduce_image_features(features, rebuilt, None, 0.5)
        got = official(**garbage, g2tr_ratio=0.5).image_reductions
        ours = model(**inputs, g2tr_ratio=0.5).image_reductions
    assert torch.equal(got[0].keep, expected[0].keep)
    torch.testing.assert_close(got[0].scores, expected[0].scores)
    assert not torch.equal(ours[0].scores, got[0].scores)  # the two sources really differ
    with pytest.raises(ValueError, match="g2tr_anchor_source"):
        build_tiny_internvlu_config(g2tr_anchor_source="clip")

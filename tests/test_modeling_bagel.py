"""Tests of the BAGEL-7B-MoT model with G2TR (tiny random config, CPU, no downloads).

Model inputs are built here directly in the processor contract's layout (left-padded ids with full image blocks,
packed (row, col, channel) ViT patches, 2-D ids row * side + col, VAE-sized images zero-padded bottom/right), so these
tests do not depend on the processor.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from safetensors import safe_open

from g2tr_hf.compat import checkpoint_key, output_cache
from g2tr_hf.configuration_bagel import G2TRBagelConfig
from g2tr_hf.generation_g2tr import stored_length
from g2tr_hf.modeling_bagel import (
    CHECKPOINT_RENAMES,
    G2TRBagelForConditionalGeneration,
    block_causal_mask,
    image_block_structure,
    patchify_latents,
    rope_positions,
    sincos_2d_table,
)
from g2tr_hf.reduction import keep_count


PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE = 0, 1, 2, 3, 4, 5
VOCAB = 64
VIT_SIDE = 8  # vit_max_num_patch_per_side of the tiny model
PATCH = 14


def tiny_config(**overrides) -> G2TRBagelConfig:
    """Hidden 32, 2 MoT layers, 2 ViT layers, a 4-block (x8) VAE with 8-16 channels."""
    fields = dict(
        llm_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        vit_config=dict(
            hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH
        ),
        vae_config=dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4),
        vit_max_num_patch_per_side=VIT_SIDE,
        max_latent_size=8,
        image_token_id=IMAGE,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        bos_token_id=IM_START,
        eos_token_id=IM_END,
        pad_token_id=PAD,
        g2tr_min_keep=1,
    )
    fields.update(overrides)
    return G2TRBagelConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> G2TRBagelForConditionalGeneration:
    torch.manual_seed(seed)
    return G2TRBagelForConditionalGeneration(tiny_config(**overrides)).eval()


def make_image(seed: int, vae_hw: tuple[int, int], vit_grid: tuple[int, int]) -> dict:
    """A smooth random image at VAE size, and its ViT patches from a resize of that image (as the official
    inferencer: VAE resize first, ViT transform second)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=generator) * 2 - 1
    vae_image = F.interpolate(coarse, size=vae_hw, mode="bilinear", align_corners=False)[0]
    h, w = vit_grid
    vit_image = F.interpolate(vae_image[None], size=(h * PATCH, w * PATCH), mode="bilinear", align_corners=False)[0]
    patches = vit_image.reshape(3, h, PATCH, w, PATCH).permute(1, 3, 2, 4, 0).reshape(h * w, 3 * PATCH * PATCH)
    position_ids = torch.tensor([r * VIT_SIDE + c for r in range(h) for c in range(w)])
    return {"vae": vae_image, "patches": patches, "position_ids": position_ids, "grid": vit_grid}


IMAGE_A = dict(seed=1, vae_hw=(64, 96), vit_grid=(4, 6))  # 24 ViT tokens, latent 8 x 12
IMAGE_B = dict(seed=2, vae_hw=(48, 48), vit_grid=(3, 3))  # 9 ViT tokens, latent 6 x 6


def text(*ids: int) -> list[int]:
    return [IM_START, *ids, IM_END]


def build_inputs(rows: list[list], generation_prompt: bool = True) -> dict:
    """rows: lists of segments, each a list of text ids or an image dict. A generation prompt `<|im_start|>` is
    appended to every row (unless `generation_prompt=False`); rows are left padded."""
    sequences, images = [], []
    for row in rows:
        ids = []
        for segment in row:
            if isinstance(segment, dict):
                images.append(segment)
                ids += [VISION_START] + [IMAGE] * (segment["grid"][0] * segment["grid"][1]) + [VISION_END]
            else:
                ids += segment
        sequences.append(ids + [IM_START] if generation_prompt else ids)
    length = max(len(ids) for ids in sequences)
    input_ids = torch.tensor([[PAD] * (length - len(ids)) + ids for ids in sequences])
    attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in sequences])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if images:
        h_max = max(image["vae"].shape[1] for image in images)
        w_max = max(image["vae"].shape[2] for image in images)
        vae = torch.zeros(len(images), 3, h_max, w_max)
        for i, image in enumerate(images):
            vae[i, :, : image["vae"].shape[1], : image["vae"].shape[2]] = image["vae"]
        inputs.update(
            pixel_values=torch.cat([image["patches"] for image in images]),
            image_position_ids=torch.cat([image["position_ids"] for image in images]),
            image_grid_hw=torch.tensor([image["grid"] for image in images]),
            vae_pixel_values=vae,
            vae_image_hw=torch.tensor([tuple(image["vae"].shape[1:]) for image in images]),
        )
    return inputs


def image_features(model, inputs: dict) -> torch.Tensor:
    return model.get_image_features(
        inputs["pixel_values"], image_position_ids=inputs["image_position_ids"], image_grid_hw=inputs["image_grid_hw"]
    ).pooler_output


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def images():
    return make_image(**IMAGE_A), make_image(**IMAGE_B)


# --------------------------------------------------------------------------------------------------------------
# Checkpoint layout and fixed tables
# --------------------------------------------------------------------------------------------------------------


def official_key_names(num_layers: int, num_vit_layers: int) -> set[str]:
    """The official `ema.safetensors` key names at the given depths."""
    keys = {
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "language_model.model.norm_moe_gen.weight",
        "language_model.lm_head.weight",
        "vit_model.vision_model.embeddings.patch_embedding.weight",
        "vit_model.vision_model.embeddings.patch_embedding.bias",
        "vit_model.vision_model.embeddings.position_embedding.weight",
        "vit_model.vision_model.post_layernorm.weight",
        "vit_model.vision_model.post_layernorm.bias",
        "connector.fc1.weight",
        "connector.fc1.bias",
        "connector.fc2.weight",
        "connector.fc2.bias",
        "vit_pos_embed.pos_embed",
        "time_embedder.mlp.0.weight",
        "time_embedder.mlp.0.bias",
        "time_embedder.mlp.2.weight",
        "time_embedder.mlp.2.bias",
        "vae2llm.weight",
        "vae2llm.bias",
        "llm2vae.weight",
        "llm2vae.bias",
        "latent_pos_embed.pos_embed",
    }
    for i in range(num_layers):
        prefix = f"language_model.model.layers.{i}."
        for suffix in ("", "_moe_gen"):
            keys |= {
                f"{prefix}input_layernorm{suffix}.weight",
                f"{prefix}post_attention_layernorm{suffix}.weight",
                f"{prefix}self_attn.o_proj{suffix}.weight",
                f"{prefix}self_attn.q_norm{suffix}.weight",
                f"{prefix}self_attn.k_norm{suffix}.weight",
            }
            keys |= {f"{prefix}self_attn.{p}_proj{suffix}.{t}" for p in "qkv" for t in ("weight", "bias")}
        keys |= {f"{prefix}mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        keys |= {f"{prefix}mlp_moe_gen.{p}_proj.weight" for p in ("gate", "up", "down")}
    for i in range(num_vit_layers):
        prefix = f"vit_model.vision_model.encoder.layers.{i}."
        keys |= {f"{prefix}{norm}.{t}" for norm in ("layer_norm1", "layer_norm2") for t in ("weight", "bias")}
        projections = ("q_proj", "k_proj", "v_proj", "out_proj")
        keys |= {f"{prefix}self_attn.{p}.{t}" for p in projections for t in ("weight", "bias")}
        keys |= {f"{prefix}mlp.{fc}.{t}" for fc in ("fc1", "fc2") for t in ("weight", "bias")}
    return keys


def test_state_dict_keys_equal_official_checkpoint_keys(model, tmp_path):
    # The module tree follows transformers' base-model / head split; the checkpoint keeps upstream's names.
    assert type(model.base_model).__name__ == "G2TRBagelModel" and model.base_model is model.model
    state = {checkpoint_key(key, CHECKPOINT_RENAMES): value for key, value in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == set(state)
    official = official_key_names(num_layers=2, num_vit_layers=2)
    non_vae = {key for key in state if not key.startswith("vae.")}
    assert non_vae == official
    assert any(key.startswith("vae.encoder.") for key in state)  # diffusers AutoencoderKL named `vae`
    assert "language_model.model.rotary_emb.inv_freq" not in state  # non-persistent, as upstream
    hidden, vit_hidden = 32, 24
    assert state["vit_model.vision_model.embeddings.patch_embedding.weight"].shape == (vit_hidden, 3 * PATCH * PATCH)
    assert state["vit_model.vision_model.embeddings.position_embedding.weight"].shape == (VIT_SIDE**2, vit_hidden)
    assert state["vit_pos_embed.pos_embed"].shape == (VIT_SIDE**2, hidden)
    assert state["latent_pos_embed.pos_embed"].shape == (8**2, hidden)
    assert state["vae2llm.weight"].shape == (hidden, 2 * 2 * 16)
    assert state["connector.fc1.weight"].shape == (hidden, vit_hidden)
    assert state["language_model.model.layers.0.self_attn.q_norm.weight"].shape == (hidden // 4,)


def test_default_config_is_real_size():
    config = G2TRBagelConfig()
    assert (config.llm_config.hidden_size, config.llm_config.num_hidden_layers) == (3584, 28)
    assert config.llm_config.num_key_value_heads == 4 and config.llm_config.qk_norm is True
    assert config.llm_config.rope_parameters["rope_theta"] == 1_000_000.0
    assert config.vit_config.num_hidden_layers == 26 and config.vit_config.vision_use_head is False
    assert config.vae_config["latent_channels"] == 16 and config.vae_config["scaling_factor"] == 0.3611
    assert config.vae_config["shift_factor"] == 0.1159 and len(config.vae_config["block_out_channels"]) == 4
    assert (config.latent_patch_size, config.max_latent_size, config.vit_max_num_patch_per_side) == (2, 64, 70)
    assert config.tie_word_embeddings is False
    assert (config.image_token_id, config.vision_start_token_id, config.vision_end_token_id) == (151655, 151652, 151653)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (151644, 151645, 151643)


def test_sincos_table_layout():
    dim, side = 16, 5
    table = sincos_2d_table(dim, side)
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    row, col = 3, 1
    entry = table[row * side + col].double()
    # first half: sin | cos of the COLUMN; second half: sin | cos of the ROW
    expected = torch.cat([(col * omega).sin(), (col * omega).cos(), (row * omega).sin(), (row * omega).cos()])
    torch.testing.assert_close(entry, expected, atol=1e-6, rtol=0)


def test_fixed_tables_and_time_embedding_are_initialised(model):
    torch.testing.assert_close(model.model.vit_pos_embed.pos_embed, sincos_2d_table(32, VIT_SIDE))
    torch.testing.assert_close(model.model.latent_pos_embed.pos_embed, sincos_2d_table(32, 8))
    assert not model.model.vit_pos_embed.pos_embed.requires_grad
    inv_freq = model.language_model.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq, 1.0 / 1e6 ** (torch.arange(0, 8, 2).float() / 8))
    code = model.model.time_embedder.timestep_embedding(torch.tensor([0.0, 0.5]))
    assert code.shape == (2, 256) and code.dtype == torch.float32
    assert torch.all(code[0, :128] == 1) and torch.all(code[0, 128:] == 0)  # cos first
    torch.testing.assert_close(code[1, 1], torch.tensor(math.cos(0.5 * math.exp(-math.log(1e4) / 128))))


def test_rope_positions_give_one_position_per_image_block():
    ids = torch.tensor([[PAD, IM_START, 9, IM_END, VISION_START, IMAGE, IMAGE, IMAGE, VISION_END, IM_START, 9]])
    valid = ids != PAD
    block_ids, advances = image_block_structure(ids, VISION_START, VISION_END)
    positions = rope_positions(advances, valid, torch.tensor([0]))
    assert positions.tolist() == [[0, 0, 1, 2, 3, 3, 3, 3, 3, 4, 5]]
    assert block_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0]]
    mask = block_causal_mask(None, valid, block_ids)[0, 0]
    assert mask[4, 8] and mask[8, 4]  # bidirectional inside the block (markers included)
    assert not mask[3, 4] and mask[9, 8] and not mask[2, 0]  # causal text, padding hidden


# --------------------------------------------------------------------------------------------------------------
# Prefill semantics
# --------------------------------------------------------------------------------------------------------------


def segmentwise_reference_logits(model, segments, image_embeds) -> torch.Tensor:
    """Upstream-style prefill: one call per segment into a cache (text causal, image block bidirectional over the
    block and the whole cache), position +1 per text token and one position per block. Returns the last logits."""
    decoder = model.language_model
    cache = DynamicCache(config=model.config.get_text_config())
    rope, image_index = 0, 0
    for segment in segments:
        if isinstance(segment, dict):
            tokens = image_embeds[image_index]
            image_index += 1
            markers = decoder.embed_tokens(torch.tensor([VISION_START, VISION_END]))
            embeds = torch.cat([markers[:1], tokens, markers[1:]])[None]
            positions = torch.full((1, embeds.shape[1]), rope)
            causal = False
            rope += 1
        else:
            embeds = decoder.embed_tokens(torch.tensor(segment))[None]
            positions = torch.arange(rope, rope + len(segment))[None]
            causal = True
            rope += len(segment)
        new, past = embeds.shape[1], stored_length(cache)
        mask = torch.ones(new, past + new, dtype=torch.bool)
        if causal:
            mask[:, past:] = torch.ones(new, new, dtype=torch.bool).tril()
        out = decoder(embeds, positions, attention_mask=mask[None, None], past_key_values=cache)
    return model.lm_head(out.last_hidden_state[:, -1])


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_single_pass_prefill_equals_segmentwise_prefill(model, images, ratio):
    segments = [text(10, 11), images[0], text(12), images[1], text(13, 14, 15), [IM_START]]
    inputs = build_inputs([segments[:-1]])
    with torch.no_grad():
        out = model(**inputs, g2tr_ratio=ratio, use_cache=True)
        features = image_features(model, inputs)
        if ratio == 1.0:
            embeds = features + model.model.vit_pos_embed(inputs["image_position_ids"])
            image_embeds = embeds.split([24, 9])
        else:
            tokens, kept, results = model.model.reduce_image_features(
                features, inputs["image_grid_hw"], inputs["vae_pixel_values"], inputs["vae_image_hw"], ratio
            )
            embeds = tokens + model.model.vit_pos_embed(inputs["image_position_ids"][kept])
            image_embeds = embeds.split([r.num_kept for r in results])
        reference = segmentwise_reference_logits(model, segments, image_embeds)
    torch.testing.assert_close(out.logits[:, -1], reference, atol=1e-5, rtol=1e-5)


def test_prefill_in_two_calls_equals_one_call(model, images):
    first, second = [text(10, 11), images[0]], [text(12), images[1], text(13)]
    whole = build_inputs([first + second])
    part_one = build_inputs([first], generation_prompt=False)
    part_two = build_inputs([second])
    with torch.no_grad():
        reference = model(**whole, g2tr_ratio=0.5, use_cache=True)
        step = model(**part_one, g2tr_ratio=0.5, use_cache=True)
        # the caller's mask covers everything it sent; the cache is shorter (compact)
        part_two["attention_mask"] = torch.ones(1, whole["input_ids"].shape[1], dtype=torch.long)
        out = model(**part_two, past_key_values=step.past_key_values, g2tr_ratio=0.5, use_cache=True)
    torch.testing.assert_close(out.logits[:, -1], reference.logits[:, -1], atol=1e-5, rtol=1e-5)
    assert stored_length(output_cache(out)) == stored_length(output_cache(reference))


def test_ratio_one_is_bit_identical_to_bypassed_reduction_and_never_encodes(images):
    model = tiny_model()
    inputs = build_inputs([[text(10, 11), images[0], text(12, 13)]])

    def forbidden(*args, **kwargs):
        raise AssertionError("the VAE must not run at ratio 1.0")

    original_encode = model.vae.encode
    model.vae.encode = forbidden
    with torch.no_grad():
        plain = model(**inputs, use_cache=True)
    model.vae.encode = original_encode
    assert plain.image_reductions is None
    # The full reduction path (VAE anchors, scores, plan) with a keep count equal to N drops nothing.
    model.config.g2tr_min_keep = 10_000
    with torch.no_grad():
        through_reduction = model(**inputs, use_cache=True, g2tr_ratio=0.5)
    assert through_reduction.image_reductions[0].num_kept == 24
    assert torch.equal(plain.logits, through_reduction.logits)
    for layer in range(2):
        keys = plain.past_key_values.layers[layer].keys
        assert torch.equal(keys, through_reduction.past_key_values.layers[layer].keys)


def test_cache_holds_text_plus_k_plus_two_per_image(model, images):
    segments = [text(10, 11), images[0], text(12), images[1], text(13)]
    inputs = build_inputs([segments])
    num_text = len(text(10, 11)) + len(text(12)) + len(text(13)) + 1  # + the generation prompt
    for ratio in (1.0, 0.5, 0.25):
        with torch.no_grad():
            out = model(**inputs, use_cache=True, g2tr_ratio=ratio)
        kept = [keep_count(24, ratio, 1), keep_count(9, ratio, 1)]
        assert [r.num_kept for r in out.image_reductions or []] == ([] if ratio == 1.0 else kept)
        assert stored_length(output_cache(out)) == num_text + sum(k + 2 for k in kept)
        assert out.logits.shape[1] == stored_length(output_cache(out))
        assert int(out.kept_token_mask.sum()) == out.logits.shape[1]
    # with the default min_keep of 32 both images stay whole
    model32 = tiny_model(g2tr_min_keep=32)
    with torch.no_grad():
        out = model32(**inputs, use_cache=True, g2tr_ratio=0.5)
    assert stored_length(output_cache(out)) == inputs["input_ids"].shape[1]


def test_kept_tokens_get_position_codes_of_their_original_ids(model, images):
    inputs = build_inputs([[text(10), images[0]]])
    with torch.no_grad():
        out = model(**inputs, use_cache=True, g2tr_ratio=0.5, output_hidden_states=True)
        features = image_features(model, inputs)
    plan = out.image_reductions[0]
    expected = plan.merge(features) + model.model.vit_pos_embed(inputs["image_position_ids"][plan.keep])
    decoder_inputs = out.hidden_states[0][0]
    start = len(text(10)) + 1
    torch.testing.assert_close(decoder_inputs[start : start + plan.num_kept], expected)


def test_labels_follow_the_compaction(model, images):
    inputs = build_inputs([[text(10, 11), images[0], text(12, 13)]])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, -100)
    with torch.no_grad():
        out = model(**inputs, labels=labels, g2tr_ratio=0.5)
    compact_labels = labels[out.kept_token_mask][None]
    assert compact_labels.shape[1] == out.logits.shape[1] < labels.shape[1]
    expected = F.cross_entropy(out.logits[0, :-1], compact_labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


# --------------------------------------------------------------------------------------------------------------
# Ratio sources and errors
# --------------------------------------------------------------------------------------------------------------


def test_per_call_ratio_in_forward_and_generate(images):
    model = tiny_model()
    inputs = build_inputs([[text(10, 11), images[0], text(12)]])
    with torch.no_grad():
        per_call = model.generate(**inputs, g2tr_ratio=0.5, max_new_tokens=4, do_sample=False,
                                  return_dict_in_generate=True)
        full = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    length = inputs["input_ids"].shape[1]
    k = keep_count(24, 0.5, 1)
    assert stored_length(output_cache(per_call)) == length - (24 - k) + 3  # last new token is not cached
    assert stored_length(output_cache(full)) == length + 3
    assert model.config.g2tr_ratio == 1.0  # a per-call value leaves the config alone
    configured = tiny_model(g2tr_ratio=0.5)
    with torch.no_grad():
        from_config = configured.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(per_call.sequences, from_config)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2, "half", float("nan")])
def test_invalid_ratio_is_a_clear_error(model, images, bad):
    inputs = build_inputs([[text(10), images[1]]])
    with pytest.raises(ValueError, match="g2tr_ratio"):
        model(**inputs, g2tr_ratio=bad)
    with pytest.raises(ValueError, match="g2tr_ratio"):
        model.generate(**inputs, g2tr_ratio=bad, max_new_tokens=2)


def test_ratio_below_one_without_vae_or_vae_inputs_raises(images):
    inputs = build_inputs([[text(10), images[1]]])
    no_gen = tiny_model(visual_gen=False)
    assert no_gen.vae is None and not hasattr(no_gen.model, "vae2llm")
    with pytest.raises(ValueError, match="needs the VAE"):
        no_gen(**inputs, g2tr_ratio=0.5)
    no_gen(**inputs)  # ratio 1.0 works without a VAE
    model = tiny_model()
    without_vae_inputs = {k: v for k, v in inputs.items() if k not in ("vae_pixel_values", "vae_image_hw")}
    with pytest.raises(ValueError, match="vae_pixel_values"):
        model(**without_vae_inputs, g2tr_ratio=0.5)
    text_only = build_inputs([[text(10, 11)]])
    assert model(**text_only, g2tr_ratio=0.5).logits.shape[1] == text_only["input_ids"].shape[1]


def test_bad_image_inputs_are_clear_errors(model, images):
    inputs = build_inputs([[text(10), images[0]]])
    # one `<|image_pad|>` fewer than the 4 x 6 grid of the packed patches
    first_image_token = int((inputs["input_ids"][0] == IMAGE).nonzero()[0])
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[first_image_token] = False
    short_block = dict(inputs, input_ids=inputs["input_ids"][:, keep], attention_mask=inputs["attention_mask"][:, keep])
    with pytest.raises(ValueError, match="image blocks"):
        model(**short_block)
    with pytest.raises(ValueError, match="pixel_values"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="vae_image_hw"):
        model(**dict(inputs, vae_image_hw=torch.tensor([[60, 96]])), g2tr_ratio=0.5)
    with pytest.raises(ValueError, match="attention_mask"):
        model(**dict(inputs, attention_mask=inputs["attention_mask"][:, None]))
    with pytest.raises(ValueError, match="input_ids"):
        model(input_ids=inputs["input_ids"][0])


# --------------------------------------------------------------------------------------------------------------
# Batching, generation, attention backends, save / load
# --------------------------------------------------------------------------------------------------------------


def test_generated_sequences_start_with_the_callers_prompt(model, images):
    inputs = build_inputs([[text(10, 11), images[0], text(12)], [images[1], text(13, 14, 15, 16, 17)]])
    with torch.no_grad():
        sequences = model.generate(**inputs, g2tr_ratio=0.5, max_new_tokens=3, do_sample=False)
    length = inputs["input_ids"].shape[1]
    assert sequences.shape == (2, length + 3)
    assert torch.equal(sequences[:, :length], inputs["input_ids"])


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_batch_of_two_equals_two_single_runs(model, images, ratio):
    row_a = [text(10, 11), images[0], text(12)]
    row_b = [images[1], text(13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24)]
    batch = build_inputs([row_a, row_b])
    singles = [build_inputs([row_a]), build_inputs([row_b])]
    with torch.no_grad():
        batch_out = model(**batch, g2tr_ratio=ratio, use_cache=True)
        batch_seq = model.generate(**batch, g2tr_ratio=ratio, max_new_tokens=6, do_sample=False)
        for row, single in enumerate(singles):
            single_out = model(**single, g2tr_ratio=ratio, use_cache=True)
            torch.testing.assert_close(batch_out.logits[row, -1], single_out.logits[0, -1], atol=1e-5, rtol=1e-5)
            single_seq = model.generate(**single, g2tr_ratio=ratio, max_new_tokens=6, do_sample=False)
            length = single["input_ids"].shape[1]
            assert torch.equal(batch_seq[row, -(length + 6) :], single_seq[0])
            # each row's cache holds its own compact length (the rest is left padding)
            assert int(batch_out.reduced_attention_mask[row].sum()) == stored_length(output_cache(single_out))
            assert batch_out.attention_mask is batch_out.reduced_attention_mask  # the former name


def test_multi_step_cache_decoding_matches_full_recompute(model, images):
    inputs = build_inputs([[text(10, 11), images[0], text(12)], [images[1], text(13, 14, 15, 16)]])
    with torch.no_grad():
        cached = model.generate(**inputs, g2tr_ratio=0.5, max_new_tokens=5, do_sample=False)
        uncached = model.generate(**inputs, g2tr_ratio=0.5, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_beam_search_expands_packed_image_inputs(model, images):
    row_a, row_b = [text(10, 11), images[0], text(12)], [images[1], text(13, 14)]
    inputs = build_inputs([row_a, row_b])
    options = dict(g2tr_ratio=0.5, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        beams = model.generate(**inputs, **options)
        single_b = build_inputs([row_b])
        beams_b = model.generate(**single_b, **options)
    length = inputs["input_ids"].shape[1]
    assert beams.shape == (4, length + 3)
    assert torch.equal(beams[::2, :length], inputs["input_ids"])
    assert torch.equal(beams[1::2, :length], inputs["input_ids"])
    # row b's beams see row b's image (the packed image tensors were expanded per row, not per patch)
    assert torch.equal(beams[2:, -(single_b["input_ids"].shape[1] + 3) :], beams_b)


def test_sdpa_and_eager_agree(images):
    sdpa = tiny_model()
    assert sdpa.config._attn_implementation == "sdpa"
    config = tiny_config()
    config._attn_implementation = "eager"
    eager = G2TRBagelForConditionalGeneration(config).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.config.llm_config._attn_implementation == "eager"
    inputs = build_inputs([[text(10, 11), images[0], text(12)], [images[1], text(13, 14, 15)]])
    with torch.no_grad():
        a = sdpa(**inputs, g2tr_ratio=0.5, use_cache=True)
        b = eager(**inputs, g2tr_ratio=0.5, use_cache=True)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = {"input_ids": torch.tensor([[7], [8]]), "attention_mask": mask}
        a2 = sdpa(**step, past_key_values=a.past_key_values, use_cache=True)
        b2 = eager(**step, past_key_values=b.past_key_values, use_cache=True)
    torch.testing.assert_close(a2.logits, b2.logits, atol=1e-5, rtol=1e-5)


def test_bf16_forward_runs(images):
    model = tiny_model().to(torch.bfloat16)
    inputs = build_inputs([[text(10), images[0], text(12)]])
    with torch.no_grad():
        out = model(**inputs, g2tr_ratio=0.5, use_cache=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert stored_length(output_cache(out)) == inputs["input_ids"].shape[1] - (24 - keep_count(24, 0.5, 1))


def test_save_and_load_round_trip_with_ratio_kwarg(tmp_path, images):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForImageTextToText"] == "modeling_bagel.G2TRBagelForConditionalGeneration"
    assert saved["auto_map"]["AutoModel"] == "modeling_bagel.G2TRBagelForConditionalGeneration"
    assert saved["auto_map"]["AutoConfig"] == "configuration_bagel.G2TRBagelConfig"
    for name in ("modeling_bagel.py", "configuration_bagel.py", "configuration_g2tr.py", "reduction.py"):
        assert os.path.exists(tmp_path / name), name

    loaded = G2TRBagelForConditionalGeneration.from_pretrained(tmp_path, g2tr_ratio=0.5).eval()
    assert loaded.config.g2tr_ratio == 0.5
    inv_freq = loaded.language_model.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq, model.language_model.rotary_emb.inv_freq)
    inputs = build_inputs([[text(10, 11), images[0], text(12)]])
    with torch.no_grad():
        expected = model(**inputs, g2tr_ratio=0.5, use_cache=True)
        got = loaded(**inputs, use_cache=True)
    assert torch.equal(expected.logits, got.logits)
    assert stored_length(output_cache(got)) < inputs["input_ids"].shape[1]

    with pytest.raises(TypeError):
        G2TRBagelForConditionalGeneration.from_pretrained(tmp_path, not_a_config_field=1)
    out_of_range = G2TRBagelForConditionalGeneration.from_pretrained(tmp_path, g2tr_ratio=2.0)
    with pytest.raises(ValueError, match="g2tr_ratio"):
        out_of_range(**inputs)


# --------------------------------------------------------------------------------------------------------------
# Generation-side pieces (VAE, gen expert)
# --------------------------------------------------------------------------------------------------------------


def test_vae_latents_are_scaled_posterior_means_cropped_per_image(model, images):
    inputs = build_inputs([[images[0]], [images[1]]])
    with torch.no_grad():
        latents = model.encode_vae_latents(inputs["vae_pixel_values"], inputs["vae_image_hw"])
        alone = model.vae.encode(images[1]["vae"][None]).latent_dist.mean[0]
    assert [tuple(z.shape) for z in latents] == [(16, 8, 12), (16, 6, 6)]
    # each size is encoded on its own pixels: equal to a single unpadded encode
    torch.testing.assert_close(latents[1], (alone - 0.1159) * 0.3611, atol=1e-6, rtol=1e-5)
    tokens = patchify_latents(latents[0], 2)
    assert tokens.shape == (4 * 6, 64)
    torch.testing.assert_close(tokens[7], latents[0][:, 2:4, 2:4].permute(1, 2, 0).reshape(-1))
    embeds = model.model.embed_latent_tokens(tokens, torch.zeros(1), torch.arange(24))
    assert embeds.shape == (24, 32)


def test_gen_expert_routing_uses_the_moe_gen_weights(model):
    embeds = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(6)[None]
    gen_mask = torch.tensor([[False, True, True, True, True, False]])
    swapped = tiny_model()
    state = model.state_dict()
    for key in list(state):
        if "_moe_gen" in key:
            state[key.replace("_moe_gen", "")] = state[key]
    swapped.load_state_dict(state)
    with torch.no_grad():
        all_gen = model.language_model(embeds, positions, gen_token_mask=torch.ones(1, 6, dtype=torch.bool))
        as_und = swapped.language_model(embeds, positions)
        mixed = model.language_model(embeds, positions, gen_token_mask=gen_mask)
        und = model.language_model(embeds, positions)
    torch.testing.assert_close(all_gen.last_hidden_state, as_und.last_hidden_state)
    assert not torch.allclose(mixed.last_hidden_state[0, 1:5], und.last_hidden_state[0, 1:5])
    # with a causal mask, und token 0 sees only itself, so the gen tokens after it cannot change its output
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        mixed_causal = model.language_model(embeds, positions, attention_mask=causal, gen_token_mask=gen_mask)
        und_causal = model.language_model(embeds, positions, attention_mask=causal)
    torch.testing.assert_close(mixed_causal.last_hidden_state[0, 0], und_causal.last_hidden_state[0, 0])


@pytest.mark.gpu
def test_cuda_generation_matches_cpu(images):
    model = tiny_model()
    inputs = build_inputs([[text(10, 11), images[0], text(12)], [images[1], text(13, 14, 15)]])
    with torch.no_grad():
        on_cpu = model.generate(**inputs, g2tr_ratio=0.5, max_new_tokens=4, do_sample=False)
        model.to("cuda")
        cuda_inputs = {key: value.to("cuda") for key, value in inputs.items()}
        out = model(**cuda_inputs, g2tr_ratio=0.5, use_cache=True)
        on_cuda = model.generate(**cuda_inputs, g2tr_ratio=0.5, max_new_tokens=4, do_sample=False)
    assert stored_length(output_cache(out)) < inputs["input_ids"].shape[1]
    assert torch.equal(on_cuda.cpu(), on_cpu)

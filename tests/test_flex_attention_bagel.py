"""BAGEL with `attn_implementation="flex_attention"`: the block-causal `BlockMask` equals SDPA's dense mask.

Tiny random model, fp32, CPU (flex runs unfused there, which checks the mask elementwise; the tile structure the
fused kernels rely on is checked separately). Covered: the mask itself (elementwise and per tile, with a cache,
left padding and image blocks), prefill logits at ratio 1.0 and 0.5 on a left-padded batch of two, a second prompt
with an image against the compact cache, greedy generation with a cache (prefill through flex, single-token decoding
through SDPA), and the editing velocity against a padded and an unpadded context.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import g2tr_hf.modeling_bagel as modeling_bagel
from g2tr_hf.compat import output_cache
from g2tr_hf.generation_g2tr import stored_length
from g2tr_hf.modeling_bagel import (
    G2TRBagelForConditionalGeneration,
    block_causal_block_mask,
    block_causal_mask,
    decoder_attention_mask,
)
from test_modeling_bagel import (
    IM_START,
    IMAGE_A,
    IMAGE_B,
    PAD,
    build_inputs,
    make_image,
    text,
    tiny_model,
)


ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same weights twice: the default SDPA model, and a flex-attention one loaded as a user would."""
    sdpa = tiny_model()
    folder = tmp_path_factory.mktemp("tiny_bagel")
    sdpa.save_pretrained(folder)
    flex = G2TRBagelForConditionalGeneration.from_pretrained(folder, attn_implementation="flex_attention").eval()
    return sdpa, flex


@pytest.fixture(scope="module")
def images():
    return make_image(**IMAGE_A), make_image(**IMAGE_B)


@pytest.fixture
def flex_calls(monkeypatch):
    """Counts the calls of the flex kernel (one per decoder layer and forward that used a `BlockMask`)."""
    calls = []
    kernel = modeling_bagel.flex_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(modeling_bagel, "flex_attention", counting)
    return calls


def test_loading_with_flex_selects_it_for_the_decoder(models):
    _, flex = models
    assert flex.config._attn_implementation == "flex_attention"
    assert flex.config.llm_config._attn_implementation == "flex_attention"


def random_layout(seed: int, batch: int = 2, past: int = 23, length: int = 45):
    """A cache with left padding and a reduced image's K + 2 entries, then new tokens with left padding, two image
    blocks (one per row) and a padded slot inside a compacted row."""
    generator = torch.Generator().manual_seed(seed)
    past_mask = torch.ones(batch, past, dtype=torch.bool)
    past_mask[1, :5] = False
    new_mask = torch.ones(batch, length, dtype=torch.bool)
    new_mask[0, :7] = False
    new_mask[1, 30] = False
    block_ids = torch.zeros(batch, length, dtype=torch.long)
    block_ids[0, 10:27] = 1
    block_ids[1, 3:20] = 2
    query = torch.randn(batch, 4, length, 8, generator=generator)
    key = torch.randn(batch, 2, past + length, 8, generator=generator)
    return past_mask, new_mask, block_ids, (query, key)


@pytest.mark.parametrize("past", [0, 23])
def test_block_mask_equals_the_dense_mask_elementwise_and_per_tile(past):
    past_mask, new_mask, block_ids, _ = random_layout(0, past=past)
    past_mask = past_mask if past else None
    dense = block_causal_mask(past_mask, new_mask, block_ids)[:, 0]  # [B, L, P+L]
    tile = 16
    block_mask = block_causal_block_mask(past_mask, new_mask, block_ids, block_size=tile)
    assert block_mask.seq_lengths == (new_mask.shape[1], past + new_mask.shape[1])

    batch, length, keys = dense.shape
    b, q, kv = torch.meshgrid(torch.arange(batch), torch.arange(length), torch.arange(keys), indexing="ij")
    elementwise = block_mask.mask_mod(b, torch.zeros_like(b), q, kv)
    assert torch.equal(elementwise, dense)

    # A fused kernel skips tiles the block mask leaves out and skips the mask_mod on "full" tiles: every tile with a
    # visible entry must be listed, and a full tile must be visible everywhere.
    rows, cols = -(-length // tile), -(-keys // tile)
    padded = torch.zeros(batch, rows * tile, cols * tile, dtype=torch.bool)
    padded[:, :length, :keys] = dense
    tiles = padded.view(batch, rows, tile, cols, tile)
    any_visible, all_visible = tiles.any(dim=(2, 4)), tiles.all(dim=(2, 4))
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), any_visible)
    full = torch.zeros_like(all_visible)
    for row in range(batch):
        for q_tile in range(rows):
            count = int(block_mask.full_kv_num_blocks[row, 0, q_tile])
            full[row, q_tile, block_mask.full_kv_indices[row, 0, q_tile, :count]] = True
    assert full.any() and torch.equal(full, full & all_visible)
    assert not any_visible.all()  # there are tiles to skip


def test_flex_kernel_with_a_small_tile_equals_sdpa_with_the_dense_mask():
    past_mask, new_mask, block_ids, (query, key) = random_layout(1)
    value = torch.randn_like(key)
    dense = block_causal_mask(past_mask, new_mask, block_ids)
    block_mask = block_causal_block_mask(past_mask, new_mask, block_ids, block_size=16)
    module = torch.nn.Module()
    flex, _ = modeling_bagel.flex_block_attention_forward(module, query, key, value, block_mask, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=dense, scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(flex, expected, atol=ATOL, rtol=ATOL)


def test_a_single_decoding_query_keeps_the_dense_mask():
    config = type("Config", (), {"_attn_implementation": "flex_attention"})()
    past_mask, new_mask, block_ids, _ = random_layout(2)
    assert isinstance(decoder_attention_mask(config, past_mask, new_mask[:, :1], block_ids[:, :1]), torch.Tensor)
    assert not isinstance(decoder_attention_mask(config, past_mask, new_mask, block_ids), torch.Tensor)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_prefill_logits_of_a_padded_batch_equal_sdpa(models, images, ratio, flex_calls):
    sdpa, flex = models
    rows = [[text(10, 11), images[0], text(12)], [images[1], text(13, 14, 15, 16, 17, 18, 19, 20, 21, 22)]]
    inputs = build_inputs(rows)
    assert (inputs["attention_mask"] == 0).any()  # left padding
    with torch.no_grad():
        expected = sdpa(**inputs, g2tr_ratio=ratio, use_cache=True)
        out = flex(**inputs, g2tr_ratio=ratio, use_cache=True)
    assert len(flex_calls) == flex.config.llm_config.num_hidden_layers
    assert torch.equal(out.reduced_attention_mask, expected.reduced_attention_mask)
    real = out.reduced_attention_mask.bool()
    torch.testing.assert_close(out.logits[real], expected.logits[real], atol=ATOL, rtol=ATOL)
    for ours, theirs in zip(output_cache(out).layers, output_cache(expected).layers):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=ATOL, rtol=ATOL)


def test_a_second_prompt_with_an_image_against_the_compact_cache_equals_sdpa(models, images, flex_calls):
    sdpa, flex = models
    first = build_inputs([[text(10, 11), images[0]], [text(12, 13, 14, 15, 16)]], generation_prompt=False)
    second = build_inputs([[text(17), images[1], text(18)], [text(19, 20, 21)]])
    second["attention_mask"] = torch.cat([first["attention_mask"], second["attention_mask"]], dim=1)
    outputs = []
    with torch.no_grad():
        for model in (sdpa, flex):
            step = model(**first, g2tr_ratio=0.5, use_cache=True)
            outputs.append(model(**second, past_key_values=output_cache(step), g2tr_ratio=0.5, use_cache=True))
    expected, out = outputs
    assert len(flex_calls) == 2 * flex.config.llm_config.num_hidden_layers
    assert stored_length(output_cache(out)) == stored_length(output_cache(expected))
    torch.testing.assert_close(out.logits[:, -1], expected.logits[:, -1], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_greedy_generation_with_a_cache_equals_sdpa(models, images, ratio, flex_calls):
    sdpa, flex = models
    inputs = build_inputs([[text(10, 11), images[0], text(12)], [images[1], text(13, 14, 15)]])
    options = dict(g2tr_ratio=ratio, max_new_tokens=5, do_sample=False)
    options.update(output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = sdpa.generate(**inputs, **options)
        out = flex.generate(**inputs, **options)
    assert torch.equal(out.sequences, expected.sequences)
    for ours, theirs in zip(out.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)
    # the prompt went through flex once; the padded single-token decoding steps kept the dense mask (SDPA)
    assert len(flex_calls) == flex.config.llm_config.num_hidden_layers


def test_static_cache_and_prompt_lookup_decoding_equal_sdpa(models, images, flex_calls):
    """A static cache hands back its whole buffer (the block mask covers the written part); prompt-lookup decoding
    verifies several candidate tokens per step against the cache, each such step through flex."""
    sdpa, flex = models
    single = build_inputs([[text(10, 11, 10, 11), images[1], text(10, 11, 10, 11)]])
    with torch.no_grad():
        for strategy in (dict(cache_implementation="static"), dict(prompt_lookup_num_tokens=3)):
            options = dict(g2tr_ratio=0.5, max_new_tokens=6, do_sample=False, **strategy)
            expected, out = sdpa.generate(**single, **options), flex.generate(**single, **options)
            assert torch.equal(out, expected)
    layers = flex.config.llm_config.num_hidden_layers
    assert len(flex_calls) > 2 * layers  # both prompts, and at least one multi-token verification step
    assert any(shape[2] > 1 and shape[2] < single["input_ids"].shape[1] for shape in flex_calls)


def editing_context(model, images, padded: bool) -> DynamicCache:
    """An editing context (batch 1): optionally a left-padded text turn first, then the VAE block (generation expert,
    bidirectional), the ViT block reduced to half with the same latent as anchors, and the instruction."""
    cache = DynamicCache(config=model.config.get_text_config())
    if padded:
        turn = torch.tensor([[PAD, PAD, PAD, IM_START, 30, 31]])
        model(input_ids=turn, attention_mask=(turn != PAD).long(), past_key_values=cache, use_cache=True)
    image = images[0]
    latents = model.encode_vae_latents(image["vae"][None], torch.tensor([tuple(image["vae"].shape[1:])]))[0]
    model.prefill_vae_image(latents, cache)
    model.prefill_vit_image(
        image["patches"], image["position_ids"], torch.tensor([image["grid"]]), cache, latents=latents, g2tr_ratio=0.5
    )
    model.prefill_text(torch.tensor([text(40, 41, 42)]), cache)
    return cache


@pytest.mark.parametrize("padded", [True, False])
def test_editing_velocity_equals_sdpa(models, images, padded, flex_calls):
    sdpa, flex = models
    grid = (4, 4)
    noise = torch.randn(grid[0] * grid[1], 64, generator=torch.Generator().manual_seed(5))
    velocities = []
    with torch.no_grad():
        for model in (sdpa, flex):
            cache = editing_context(model, images, padded)
            query = model.embed_latent_query(noise, torch.tensor(0.7), grid)
            velocities.append(model.flow_velocity(query, cache))
            velocities.append(model.flow_velocity(query, cache, context_length=stored_length(cache) - 5))
    for ours, theirs in zip(velocities[2:], velocities[:2]):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)
    layers = flex.config.llm_config.num_hidden_layers
    # text prompts always use the block mask; with a padded context, so do both image blocks and both velocities
    assert len(flex_calls) == layers * (6 if padded else 1)


@pytest.mark.slow
def test_a_compiled_decoder_fuses_flex_on_the_cpu_and_equals_sdpa(images, monkeypatch):
    """Compiling the decoder routes the block mask through transformers' flex kernel, traced and fused by inductor
    (the unfused CPU path is not taken). Slow: inductor compiles for about a minute on a small CPU."""
    sdpa = tiny_model()
    flex = tiny_model()
    flex.set_attn_implementation("flex_attention")
    unfused = []
    monkeypatch.setattr(modeling_bagel, "_unfused_flex_attention", lambda *args, **kwargs: unfused.append(1))
    flex.model.language_model = torch.compile(flex.model.language_model)
    inputs = build_inputs([[text(10, 11), images[0], text(12)], [images[1], text(13, 14, 15)]])
    with torch.no_grad():
        expected = sdpa(**inputs, use_cache=True).logits
        out = flex(**inputs, use_cache=True).logits
    assert not unfused
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)

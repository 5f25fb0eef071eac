"""In-LLM methods (FastV, W-FastV, PDrop, DART, IVC-Prune, VScan) on both tiny models, with 4-layer decoders so
that PDrop has three stages.

Checked: schedules, the hand-computed scores against the eager kernel's attention weights, exact per-image budgets,
ratio 1.0 == unreduced, determinism, batch == singles, SDPA == eager, the cache after dropping (every layer holds
the kept tokens; layers before the drop hold exactly the unreduced model's entries of those tokens; original RoPE
positions), and cached decoding against a one-shot continuation over the same cache.
"""

from __future__ import annotations

import copy

import numpy as np
import PIL.Image
import pytest
import torch

from g2tr_hf.baselines import reduction_options
from g2tr_hf.compat import output_cache
from g2tr_hf.generation_g2tr import stored_length
from g2tr_hf.in_llm import (
    DropSchedule,
    acts_before_llm,
    _window_select,
    drop_schedule,
    last_token_attention,
    layer_token_counts,
    ratio_for_layer_average,
    window_cells,
)
from g2tr_hf.reduction import keep_count, reduce_tokens
from g2tr_hf.tiny import build_tiny


METHODS = ["fastv", "wfastv", "pdrop", "dart", "ivcprune", "vscan"]
RATIO = 0.5


def test_schedules_follow_the_papers_and_scale_to_depth():
    assert drop_schedule("fastv", 28, 0.5) == DropSchedule((1,), (2,), (0.5,))
    assert drop_schedule("pdrop", 32, 0.5) == DropSchedule((8, 16, 24), (8, 16, 24), (0.5, 0.25, 0.125))
    assert drop_schedule("pdrop", 28, 0.5).drop_layers == (7, 14, 21)
    assert drop_schedule("dart", 28, 0.25) == DropSchedule((2,), (2,), (0.25,))
    assert drop_schedule("ivcprune", 28, 0.3) == DropSchedule((13,), (14,), (0.3,))
    assert drop_schedule("fastv", 2, 0.5).drop_layers == (1,)  # clamped to the last layer
    assert drop_schedule("pdrop", 4, 0.5).drop_layers == (1, 2, 3)
    # VScan's LLM stage: half the depth (16 of 32, 14 of 28), `ratio` of the tokens that entered
    assert drop_schedule("vscan", 32, 0.5) == DropSchedule((16,), (16,), (0.5,))
    assert drop_schedule("vscan", 28, 0.6) == DropSchedule((14,), (14,), (0.6,))
    with pytest.raises(ValueError, match="at least 2 layers"):
        drop_schedule("fastv", 1, 0.5)
    with pytest.raises(ValueError, match="`method` must be one of"):
        drop_schedule("sparsevlm", 28, 0.5)
    counts = layer_token_counts(drop_schedule("pdrop", 4, 0.5), 4, [16], other_tokens=10)
    assert counts == [26, 18, 14, 12]


def test_ratio_for_a_layer_average():
    # FastV on 28 layers: 2 full layers + 26 at r -> (2 + 26 r) / 28 = 0.5 at r = 12 / 26
    assert ratio_for_layer_average("fastv", 28, 0.5) == pytest.approx(12 / 26, abs=1e-9)
    for method in ("pdrop", "dart", "ivcprune"):
        ratio = ratio_for_layer_average(method, 28, 0.6)
        counts = layer_token_counts(drop_schedule(method, 28, ratio), 28, [10**6], other_tokens=0)
        assert sum(counts) / 28 / 10**6 == pytest.approx(0.6, abs=1e-3)
    # VScan: r enter, r * r after the middle layer -> r (1 + r) / 2 = 0.5 at the golden ratio's 0.618
    assert ratio_for_layer_average("vscan", 28, 0.5) == pytest.approx((5**0.5 - 1) / 2, abs=1e-9)
    with pytest.raises(ValueError, match="at least 0.071"):
        ratio_for_layer_average("fastv", 28, 0.05)


def test_window_selection_spreads_the_budget_over_windows():
    windows = window_cells((6, 5), 4)  # windows of 16, 4, 8 and 2 tokens
    assert windows.reshape(6, 5)[:, 4].tolist() == [1, 1, 1, 1, 3, 3]
    scores = torch.arange(30, dtype=torch.float32)  # the best tokens sit bottom-right
    kept = _window_select(scores, windows, 8)
    assert torch.bincount(windows[kept], minlength=4).tolist() == [2, 2, 2, 2]
    assert sorted(kept.tolist()) == [14, 17, 18, 19, 24, 27, 28, 29]  # the best two of each window
    kept = _window_select(scores, windows, 20)  # quota 5; small windows leave 4 to fill with the best of the rest
    assert kept.unique().numel() == 20 and torch.bincount(windows[kept], minlength=4).tolist() == [6, 4, 8, 2]


def test_in_llm_methods_cannot_run_before_the_llm():
    with pytest.raises(ValueError, match="inside the language model"):
        reduce_tokens(torch.randn(16, 4), (4, 4), None, None, ratio=0.5, method="fastv")


# ------------------------------------------------------------------------------------------------ tiny models


def _variant(name: str, layers: int, implementation: str | None = None):
    base, processor = build_tiny(name)
    config = copy.deepcopy(base.config)
    text = config.get_text_config()
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = [text.layer_types[0]] * layers
    if implementation is not None:
        config._attn_implementation = implementation
    torch.manual_seed(0)
    return type(base)(config).eval(), processor


@pytest.fixture(scope="module", params=["bagel", "internvlu"])
def models(request):
    sdpa, processor = _variant(request.param, 4)
    eager, _ = _variant(request.param, 4, "eager")
    eager.load_state_dict(sdpa.state_dict())
    return request.param, sdpa, eager, processor


def _image(seed: int, size=(60, 50)) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8))


CONVERSATIONS = [([0], "what is it?"), ([1, 2], "compare these two pictures please")]


def _inputs(processor, indices):
    messages = []
    for index in indices:
        seeds, question = CONVERSATIONS[index]
        images = [{"type": "image", "image": _image(seed, (60 - 8 * n, 50))} for n, seed in enumerate(seeds)]
        messages.append([{"role": "user", "content": [*images, {"type": "text", "text": question}]}])
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    if len(messages) == 1:
        return processor.apply_chat_template(messages[0], **kwargs)
    return processor.apply_chat_template(messages, padding=True, **kwargs)


def _image_blocks(model, row_ids: torch.Tensor) -> list[torch.Tensor]:
    """Positions of every image's tokens in one row (runs of the image placeholder id)."""
    positions = (row_ids == model.config.image_token_id).nonzero().flatten()
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
    return list(torch.tensor_split(positions, breaks.tolist()))


def _capture_layer_inputs(model, layer_idx: int):
    captured = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    return captured, model.model.language_model.layers[layer_idx].register_forward_pre_hook(hook, with_kwargs=True)


def test_manual_scores_equal_the_eager_attention_weights(models):
    name, _, eager, processor = models
    inputs = _inputs(processor, [0])
    captured, handle = _capture_layer_inputs(eager, 1)
    try:
        with torch.no_grad():
            out = eager(**inputs, output_attentions=True)
    finally:
        handle.remove()
    args, kwargs = captured["args"], captured["kwargs"]
    hidden = args[0]
    cos_sin = kwargs.get("position_embeddings") or args[1]
    layer = eager.model.language_model.layers[1]
    with torch.no_grad():
        manual = last_token_attention(layer, hidden, cos_sin, inputs["attention_mask"].bool())
    reference = out.attentions[1][:, :, -1, :].float().mean(dim=1)
    torch.testing.assert_close(manual, reference, atol=1e-5, rtol=1e-4)
    # hence the same keep set: the top half of each image by either score
    for block in _image_blocks(eager, inputs["input_ids"][0]):
        k = keep_count(block.numel(), RATIO)
        top = lambda scores: set(block[torch.sort(scores[0, block], descending=True, stable=True).indices[:k]].tolist())
        assert top(manual) == top(reference)


def _final_count(method: str, num_tokens: int, layers: int, min_keep: int) -> int:
    """Tokens of an image of `num_tokens` left after prefill (`vscan`: its ViT stage first, then its LLM stage)."""
    if acts_before_llm(method):
        num_tokens = keep_count(num_tokens, RATIO, min_keep)
    return keep_count(num_tokens, drop_schedule(method, layers, RATIO).keep[-1], min_keep)


@pytest.fixture(scope="module")
def unreduced(models):
    _, sdpa, _, processor = models
    singles = [_inputs(processor, [0]), _inputs(processor, [1])]
    with torch.no_grad():
        return singles, [sdpa(**single, use_cache=True) for single in singles]


@pytest.mark.parametrize("method", METHODS)
def test_method_on_both_models(models, unreduced, method):
    name, sdpa, eager, processor = models
    layers = sdpa.config.get_text_config().num_hidden_layers
    min_keep = sdpa.config.g2tr_min_keep
    singles, full_outputs = unreduced
    batch = _inputs(processor, [0, 1])
    with torch.no_grad():
        with reduction_options(sdpa, method), reduction_options(eager, method):
            batch_out = sdpa(**batch, g2tr_ratio=RATIO, use_cache=True)
            # the compact sequence is what the caller's kept tokens compact to (labels are moved onto it that way)
            assert batch_out.logits.shape[1] == int(batch_out.kept_token_mask.sum(-1).max())
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            assert torch.isfinite(sdpa(**batch, g2tr_ratio=RATIO, labels=labels).loss)
            for row, (single, full) in enumerate(zip(singles, full_outputs)):
                if row == 0:
                    assert torch.equal(sdpa(**single, g2tr_ratio=1.0).logits, full.logits)  # ratio 1.0: unreduced
                out = sdpa(**single, g2tr_ratio=RATIO, use_cache=True)
                if row == 0:
                    assert torch.equal(out.logits, sdpa(**single, g2tr_ratio=RATIO).logits)  # deterministic
                    # without a cache: the same prefill, the same compact layout
                    uncached = sdpa(**single, g2tr_ratio=RATIO, use_cache=False)
                    torch.testing.assert_close(uncached.logits, out.logits)
                    assert torch.equal(uncached.reduced_attention_mask, out.reduced_attention_mask)
                else:
                    torch.testing.assert_close(
                        eager(**single, g2tr_ratio=RATIO).logits, out.logits, atol=1e-5, rtol=1e-4
                    )  # SDPA == eager (two images)
                assert not torch.allclose(out.logits[0, -1], full.logits[0, -1])  # something was dropped

                # exact per-image budget on the final keep set
                ids, kept = single["input_ids"][0], out.kept_token_mask[0]
                blocks = _image_blocks(sdpa, ids)
                assert [int(kept[b].sum()) for b in blocks] == [
                    _final_count(method, b.numel(), layers, min_keep) for b in blocks
                ]
                dropped = sum(b.numel() for b in blocks) - sum(int(kept[b].sum()) for b in blocks)
                assert int(kept.sum()) == ids.numel() - dropped

                # every layer caches exactly the kept tokens, at their original RoPE positions
                cache, full_cache = output_cache(out), output_cache(full)
                stored = int(out.reduced_attention_mask[0].sum())
                assert stored == ids.numel() - dropped
                assert all(stored_length(cache, layer) == stored for layer in range(layers))
                # before the first drop the layers saw the whole prompt: their entries of the kept tokens are the
                # unreduced model's (VScan's: those of its ViT stage alone, which the decoder then received)
                before = full_cache, torch.ones_like(kept)
                if acts_before_llm(method):
                    with reduction_options(sdpa, "vscan-vit"):
                        entered = sdpa(**single, g2tr_ratio=RATIO, use_cache=True)
                    before = output_cache(entered), entered.kept_token_mask[0]
                    assert [p.num_kept for p in out.image_reductions] == [p.num_kept for p in entered.image_reductions]
                    pairs = zip(out.image_reductions, entered.image_reductions)
                    assert all(torch.equal(a.keep, b.keep) for a, b in pairs)
                stored_before = kept[before[1]]  # which of the entries cached before the drop survive it
                # the positions the decoder gave them (InternVL-U numbers a pre-LLM-reduced prompt afresh)
                assert torch.equal(cache.layout.position_ids[0], before[0].layout.position_ids[0][stored_before])
                torch.testing.assert_close(cache.layers[0].keys, before[0].layers[0].keys[:, :, stored_before])
                torch.testing.assert_close(cache.layers[0].values, before[0].layers[0].values[:, :, stored_before])

                # batch == singles
                torch.testing.assert_close(batch_out.logits[row, -1], out.logits[0, -1], atol=1e-5, rtol=1e-4)
                assert int(batch_out.reduced_attention_mask[row].sum()) == stored


# wfastv decodes exactly as fastv; ivcprune as fastv at its own layer (only the selection differs)
@pytest.mark.parametrize("method", ["fastv", "pdrop", "dart", "vscan"])
def test_cached_decoding_matches_a_one_shot_continuation(models, method):
    name, sdpa, _, processor = models
    inputs = _inputs(processor, [1])
    steps = 4
    with torch.no_grad(), reduction_options(sdpa, method):
        generated = sdpa.generate(
            **inputs, g2tr_ratio=RATIO, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        if method == "pdrop":  # three stages, the hardest cache layout: a padded batch decodes as its rows alone
            batch = _inputs(processor, [0, 1])
            together = sdpa.generate(
                **batch, g2tr_ratio=RATIO, max_new_tokens=steps, min_new_tokens=steps, do_sample=False
            )
            alone = sdpa.generate(
                **_inputs(processor, [0]), g2tr_ratio=RATIO, max_new_tokens=steps, min_new_tokens=steps, do_sample=False
            )
            assert torch.equal(together[0, -steps:], alone[0, -steps:])
            assert torch.equal(together[1, -steps:], generated.sequences[0, -steps:])
        prefill = sdpa(**inputs, g2tr_ratio=RATIO, use_cache=True)
        new_tokens = generated.sequences[:, -steps:]
        mask = torch.cat([inputs["attention_mask"], torch.ones(1, steps - 1, dtype=torch.long)], dim=1)
        continuation = sdpa(
            input_ids=new_tokens[:, :-1], attention_mask=mask, past_key_values=output_cache(prefill), use_cache=True,
            decoding_step=True,
        )  # fmt: skip
    scores = torch.stack(generated.logits, dim=1)[0]  # [steps, V], raw logits
    torch.testing.assert_close(prefill.logits[0, -1], scores[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(continuation.logits[0], scores[1:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["fastv", "vscan"])
def test_editing_pipeline_refuses_in_llm_methods(method):
    from g2tr_hf.pipeline_bagel import G2TRBagelPipeline

    model, processor = build_tiny("bagel")
    pipe = G2TRBagelPipeline(model=model, processor=processor)
    with reduction_options(model, method), pytest.raises(ValueError, match="inside the language model") as error:
        pipe(prompt="make it red", image=_image(3), num_inference_steps=2, g2tr_ratio=0.5, show_progress=False)
    assert method != "vscan" or "vscan_vit" in str(error.value)  # points to the ViT stage, which editing can use


@pytest.mark.parametrize("method", ["fastv", "pdrop", "vscan"])
def test_a_second_turn_with_a_new_image_drops_against_the_cache(models, method):
    from test_generation_multiturn import image_inputs, make_image, turn

    from g2tr_hf.compat import CACHE_KWARG

    name, sdpa, _, processor = models
    layers = sdpa.config.get_text_config().num_hidden_layers
    greedy = dict(do_sample=False, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True)
    with torch.no_grad(), reduction_options(sdpa, method):
        first = processor(text=[turn(name, processor, "What is it?", True, True)], images=[make_image(0)],
                          return_tensors="pt")  # fmt: skip
        out = sdpa.generate(**first, g2tr_ratio=RATIO, **greedy)
        cache = output_cache(out)
        stored_first = stored_length(cache)
        second = processor(text=[turn(name, processor, "Compare.", True, False)], images=[make_image(10)],
                           return_tensors="pt")  # fmt: skip
        input_ids = torch.cat([out.sequences, second["input_ids"]], dim=1)
        continued = sdpa.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), g2tr_ratio=RATIO,
            **image_inputs(processor, [make_image(10)]), **{CACHE_KWARG: cache}, **greedy,
        )  # fmt: skip
    final = output_cache(continued)
    assert final.get_seq_length() == continued.sequences.shape[1] - 1  # the caller's length
    (n_second,) = [block.numel() for block in _image_blocks(sdpa, second["input_ids"][0])]
    dropped = n_second - _final_count(method, n_second, layers, sdpa.config.g2tr_min_keep)
    # cached: the first turn (its last answer token was never fed back), that token, the second prompt less its
    # dropped image tokens, and all but the last of the second answer
    expected = stored_first + 1 + second["input_ids"].shape[1] - dropped + 2
    assert {stored_length(final, layer) for layer in range(layers)} == {expected}
    positions = final.layout.position_ids[0][final.layout.attention_mask[0]]
    assert bool((positions[1:] >= positions[:-1]).all())  # original positions, in order, across both turns


def test_ivcprune_keeps_the_coordinate_tokens(models):
    name, sdpa, _, processor = models
    inputs = _inputs(processor, [0])
    with torch.no_grad(), reduction_options(sdpa, "ivcprune"):
        kept = sdpa(**inputs, g2tr_ratio=0.25).kept_token_mask[0]
    block = _image_blocks(sdpa, inputs["input_ids"][0])[0]
    if name == "bagel":
        # One RoPE position for the whole image: the coordinate scores all tie and the first tokens win.
        assert bool(kept[block[0]])
        return
    positions = block[None]  # InternVL-U: 1-D positions, no padding, nothing dropped before the image
    cos, sin = sdpa.model.language_model.rotary_emb(torch.zeros(1, 1), positions)
    assert bool(kept[block[cos[0].mean(-1).argmax()]]) and bool(kept[block[sin[0].mean(-1).argmax()]])

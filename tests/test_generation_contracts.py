"""transformers' model and generation contracts on both models, with and without reduction.

Written in the spirit of transformers' `ModelTesterMixin` / `GenerationTesterMixin` (which do not ship with the
library): every decoding strategy that can serve a compact cache gives the tokens of plain greedy decoding; what
cannot fails before anything runs; the forward honours `return_dict`, `output_attentions`, `inputs_embeds`,
`shift_labels`, gradient checkpointing and `torch.compile`.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import init_empty_weights
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from g2tr_hf import build_tiny
from g2tr_hf.compat import output_cache


MODELS = ("bagel", "internvlu")
RATIOS = (1.0, 0.5)
GREEDY = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6)


def make_image(seed: int, size: int = 64) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((size, size))


@pytest.fixture(scope="module", params=MODELS)
def tiny(request):
    model, processor = build_tiny(request.param)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    placeholder = processor.image_token if request.param == "bagel" else "<image>"
    prompt = f"<|im_start|>user\n{placeholder}What is in the picture?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=[prompt], images=[make_image(0)], return_tensors="pt")
    return request.param, model, processor, dict(inputs)


def image_keys(inputs: dict) -> dict:
    return {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}


def greedy(model, inputs: dict, ratio: float, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, **GREEDY, g2tr_ratio=ratio, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Decoding strategies
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize(
    "strategy",
    ["static_cache", "prompt_lookup", "draft_model", "no_cache"],
)
def test_decoding_strategies_give_the_greedy_tokens(tiny, ratio, strategy):
    name, model, _, inputs = tiny
    options = {
        "static_cache": dict(cache_implementation="static"),
        "prompt_lookup": dict(prompt_lookup_num_tokens=3),
        # A different random model of the same kind as the draft: its guesses are mostly wrong, so both the
        # accepted and the rejected paths (cache crops) run.
        "draft_model": dict(assistant_model=build_tiny(name, seed=1)[0]),
        "no_cache": dict(use_cache=False),
    }[strategy]
    reference = greedy(model, inputs, ratio)
    assert torch.equal(greedy(model, inputs, ratio, **options), reference)


def test_a_left_padded_batch_with_a_static_cache_decodes_as_with_a_dynamic_one(tiny):
    # (transformers runs assisted decoding at batch size 1 only, for every model.)
    name, model, processor, _ = tiny
    placeholder = processor.image_token if name == "bagel" else "<image>"
    questions = ("Hi?", "Colours, please?")
    prompts = [f"<|im_start|>user\n{placeholder}{q}<|im_end|>\n<|im_start|>assistant\n" for q in questions]
    batch = dict(processor(text=prompts, images=[make_image(1), make_image(2)], padding=True, return_tensors="pt"))
    assert not bool(batch["attention_mask"].all())
    assert torch.equal(greedy(model, batch, 0.5, cache_implementation="static"), greedy(model, batch, 0.5))


def test_chunked_prefill_is_refused_before_anything_runs(tiny):
    _, model, _, inputs = tiny
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        model.generate(**inputs, max_new_tokens=2, prefill_chunk_size=4)


# ----------------------------------------------------------------------------------------------------------------
# Image placeholders are never generated, and never trip a check while decoding
# ----------------------------------------------------------------------------------------------------------------


class ForceTokenAt(LogitsProcessor):
    """Makes `token_id` the only choice at generation step `step`."""

    def __init__(self, token_id: int, prompt_length: int, step: int = 1):
        self.token_id, self.position = token_id, prompt_length + step

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.position:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.token_id] = 0.0
        return scores


def test_the_shipped_generation_config_suppresses_image_placeholders(tiny):
    _, model, _, _ = tiny
    assert model.config.image_token_id in model.generation_config.suppress_tokens


@pytest.mark.parametrize("ratio", RATIOS)
def test_a_placeholder_fed_while_decoding_is_text(tiny, ratio):
    _, model, _, inputs = tiny
    image_token = model.config.image_token_id
    length = inputs["input_ids"].shape[1]
    force = LogitsProcessorList([ForceTokenAt(image_token, length)])
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY, g2tr_ratio=ratio, suppress_tokens=[], logits_processor=force)
    assert out[0, length + 1] == image_token  # sampled, fed back, and decoding went on
    assert out.shape[1] == length + GREEDY["max_new_tokens"]


def test_an_image_block_without_pixels_is_a_clear_error(tiny):
    _, model, _, inputs = tiny
    with pytest.raises(ValueError, match="pixel_values"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


# ----------------------------------------------------------------------------------------------------------------
# Forward contracts
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", RATIOS)
def test_return_dict_false_returns_the_output_as_a_tuple(tiny, ratio):
    _, model, _, inputs = tiny
    with torch.no_grad():
        as_dict = model(**inputs, g2tr_ratio=ratio)
        as_tuple = model(**inputs, g2tr_ratio=ratio, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits, rtol=0, atol=0)
    assert as_tuple[1].get_seq_length() == output_cache(as_dict).get_seq_length()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    with torch.no_grad():
        with_loss = model(**inputs, g2tr_ratio=ratio, labels=labels, return_dict=False)
    assert with_loss[0].dim() == 0  # the loss comes first, as in transformers' causal LMs


@pytest.mark.parametrize("ratio", RATIOS)
def test_output_attentions_with_the_eager_kernel(tiny, ratio):
    name, _, _, inputs = tiny
    eager, _ = build_tiny(name)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(**inputs, g2tr_ratio=ratio, output_attentions=True)
    layers = eager.config.get_text_config().num_hidden_layers
    compact_length = out.logits.shape[1]
    assert len(out.attentions) == layers
    for weights in out.attentions:
        assert weights.shape[-2:] == (compact_length, compact_length)
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    sdpa, _ = build_tiny(name)
    with pytest.raises(ValueError, match="eager"):
        sdpa(**inputs, g2tr_ratio=ratio, output_attentions=True)


@pytest.mark.parametrize("ratio", RATIOS)
def test_inputs_embeds_with_images_equal_input_ids(tiny, ratio):
    _, model, _, inputs = tiny
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_ids = model(**inputs, g2tr_ratio=ratio).logits
        from_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], g2tr_ratio=ratio,
                            **image_keys(inputs)).logits  # fmt: skip
        torch.testing.assert_close(from_embeds, from_ids)
        generated = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], g2tr_ratio=ratio,
                                   **image_keys(inputs), **GREEDY)  # fmt: skip
    reference = greedy(model, inputs, ratio)
    assert torch.equal(generated, reference[:, inputs["input_ids"].shape[1] :])


def test_shift_labels_are_honoured(tiny):
    _, model, _, inputs = tiny
    ids = inputs["input_ids"]
    config = model.config
    marker_names = ("vision_start_token_id", "vision_end_token_id", "image_start_token_id", "image_end_token_id")
    markers = [config.image_token_id, *[getattr(config, key) for key in marker_names if hasattr(config, key)]]
    labels = ids.masked_fill(torch.isin(ids, torch.tensor(markers)), -100)
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    for ratio in RATIOS:
        with torch.no_grad():
            from_labels = model(**inputs, labels=labels, g2tr_ratio=ratio).loss
            from_shifted = model(**inputs, shift_labels=shift_labels, g2tr_ratio=ratio).loss
            # Other targets give another loss: the argument is read, not ignored.
            other = model(**inputs, shift_labels=shift_labels.roll(1, dims=1), g2tr_ratio=ratio).loss
        torch.testing.assert_close(from_shifted, from_labels)
        assert not torch.allclose(other, from_labels)


@pytest.mark.parametrize("ratio", RATIOS)
def test_gradient_checkpointing_gives_the_same_gradients(tiny, ratio):
    name, _, _, inputs = tiny
    model, _ = build_tiny(name)
    model.train()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)

    def gradients():
        model.zero_grad()
        model(**inputs, labels=labels, g2tr_ratio=ratio, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    # transformers 5.24 renamed it `activation_checkpointing_enable`; 5.17 has only the old name.
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name_, grad in plain.items():
        torch.testing.assert_close(checkpointed[name_], grad, msg=name_)


def test_compiled_forward_under_reduction(tiny):
    _, model, _, inputs = tiny
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        want = model(**inputs, g2tr_ratio=0.5).logits
        got = compiled(**inputs, g2tr_ratio=0.5).logits
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------------------------
# Model API
# ----------------------------------------------------------------------------------------------------------------


def test_get_image_features_follows_the_transformers_contract(tiny):
    name, model, _, inputs = tiny
    kwargs = image_keys(inputs)
    if name == "bagel":
        kwargs = {key: kwargs[key] for key in ("image_position_ids", "image_grid_hw")}
    else:
        kwargs = {}
    with torch.no_grad():
        out = model.get_image_features(inputs["pixel_values"], **kwargs)
    assert isinstance(out, BaseModelOutputWithPooling)
    hidden = model.config.get_text_config().hidden_size
    assert out.pooler_output.shape[-1] == hidden
    assert out.last_hidden_state.shape[-1] != hidden or name == "internvlu"


def test_rotary_frequencies_are_right_after_init_and_under_empty_weights(tiny):
    _, model, _, _ = tiny
    head_dim = model.config.get_text_config().hidden_size // model.config.get_text_config().num_attention_heads
    theta = model.config.get_text_config().rope_parameters["rope_theta"]
    expected = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    with init_empty_weights():
        empty = type(model)(model.config)
    for built in (type(model)(model.config), empty):
        rotary = [m for m in built.modules() if hasattr(m, "inv_freq")]
        assert rotary
        for module in rotary:
            assert module.inv_freq.device.type == "cpu"
            torch.testing.assert_close(module.inv_freq, expected)


def test_no_parallel_plan_is_advertised(tiny):
    _, model, _, _ = tiny
    assert not model.supports_tp_plan
    text_config = model.config.to_dict()["llm_config" if "llm_config" in model.config.to_dict() else "text_config"]
    assert not any("plan" in key and text_config[key] for key in text_config)


@pytest.mark.parametrize("ratio", RATIOS)
def test_both_models_report_the_reduction_under_the_same_names(tiny, ratio):
    _, model, _, inputs = tiny
    with torch.no_grad():
        out = model(**inputs, g2tr_ratio=ratio)
    ids = inputs["input_ids"]
    assert out.kept_token_mask.shape == ids.shape
    assert out.reduced_attention_mask.shape == out.logits.shape[:2]
    dropped = int((~out.kept_token_mask).sum())
    assert out.logits.shape[1] == ids.shape[1] - dropped
    if ratio == 1.0:
        assert out.image_reductions is None and dropped == 0
    else:
        (plan,) = out.image_reductions
        assert dropped == plan.num_tokens - plan.num_kept > 0

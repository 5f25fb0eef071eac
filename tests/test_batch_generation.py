"""Batched understanding with per-sample budgets (`g2tr_hf.integrations.batch_generation`), the core of the lmms-eval
plugin, on the tiny models. No lmms-eval needed."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from g2tr_hf import build_tiny
from g2tr_hf.integrations.batch_generation import (
    BatchedUnderstanding,
    UnderstandingRequest,
    generation_settings,
    plan_batches,
)


def make_image(seed: int, size: int = 64) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["bagel", "internvlu"])
def tiny(request):
    model, processor = build_tiny(request.param)
    model.config.g2tr_ratio = 0.5
    return model, processor


def requests() -> list[UnderstandingRequest]:
    greedy = {"max_new_tokens": 3, "temperature": 0}
    return [
        UnderstandingRequest("<image>What is it?", (make_image(0),), greedy),
        UnderstandingRequest("Describe the picture in a few words, please.", (make_image(1),), greedy),
        UnderstandingRequest("Colours?", (make_image(2),), {**greedy, "max_new_tokens": 2}),
        UnderstandingRequest("No image here.", (), greedy),
    ]


def test_batches_give_each_request_its_single_run_answer_and_budget(tiny):
    model, processor = tiny
    single = BatchedUnderstanding(model, processor, batch_size=1)(requests())
    batched = BatchedUnderstanding(model, processor, batch_size=3)(requests())
    for one, many in zip(single, batched):
        assert one.text == many.text and one.output_tokens == many.output_tokens
        for field in ("image_tokens", "kept_tokens", "prompt_tokens", "kv_entries", "kv_entries_unreduced",
                      "prefill_flops", "prefill_flops_unreduced"):  # fmt: skip
            assert getattr(one.budget, field) == getattr(many.budget, field), field
    # The two-token request forms its own group: never batched with the three-token ones.
    assert [answer.budget.batch_size for answer in batched] == [3, 3, 1, 3]
    assert batched[2].output_tokens <= 2


def test_the_budget_matches_the_models_own_reduction(tiny):
    model, processor = tiny
    answers = BatchedUnderstanding(model, processor, batch_size=2)(requests())
    for answer in answers[:3]:
        budget = answer.budget
        assert budget.image_tokens == [16] and budget.kept_tokens == [8]  # the tiny models' 4x4 grids at ratio 0.5
        assert budget.kv_entries == budget.kv_entries_unreduced - 8 == budget.prompt_tokens - 8
        assert budget.prefill_flops < budget.prefill_flops_unreduced and budget.batch_prefill_seconds > 0
    text_only = answers[3].budget
    assert text_only.image_tokens == [] and text_only.kv_entries == text_only.kv_entries_unreduced
    model.config.g2tr_ratio = 1.0
    try:
        unreduced = BatchedUnderstanding(model, processor, batch_size=2)(requests()[:1])[0].budget
    finally:
        model.config.g2tr_ratio = 0.5
    assert unreduced.kept_tokens == [16] and unreduced.kv_entries == unreduced.kv_entries_unreduced


def test_answers_follow_model_generate(tiny):
    model, processor = tiny
    request = requests()[1]
    (answer,) = BatchedUnderstanding(model, processor)([request])
    conversation = [{"role": "user", "content": [{"type": "image", "image": request.images[0]},
                                                 {"type": "text", "text": request.prompt}]}]  # fmt: skip
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    expected = processor.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer.text == expected


def test_generation_settings_and_batch_plans():
    kwargs, stops = generation_settings({"temperature": 0, "top_p": 1.0, "until": "\n", "image_aspect_ratio": "pad"}, 16)
    assert kwargs == {"max_new_tokens": 16, "do_sample": False} and stops == ["\n"]
    kwargs, _ = generation_settings({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 4}, 16)
    assert kwargs == {"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "do_sample": True}
    with pytest.raises(ValueError, match="`until` must be a string or a list of strings"):
        generation_settings({"until": 3}, 16)
    with pytest.raises(ValueError, match="`max_new_tokens` must be a positive integer"):
        generation_settings({"max_new_tokens": 0}, 16)
    assert plan_batches(["a", "b", "a", "a"], [1, 5, 3, 2], 2) == [[2, 3], [0], [1]]
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        plan_batches(["a"], [1], 0)


def test_stop_strings_cut_the_answer(tiny, monkeypatch):
    model, processor = tiny
    answerer = BatchedUnderstanding(model, processor)
    monkeypatch.setattr(processor, "batch_decode", lambda tokens, **kwargs: ["yes\n\nmore text"] * len(tokens))
    (answer,) = answerer([UnderstandingRequest("Q?", (make_image(0),), {"max_new_tokens": 2, "until": ["\n\n"]})])
    assert answer.text == "yes"

import pytest
import torch
from PIL import Image

from g2tr_hf import build_tiny
from g2tr_hf.cli import main
from g2tr_hf.compat import output_cache
from g2tr_hf.generation_g2tr import stored_length
from g2tr_hf.demo import run_demo, run_understanding, synthetic_scene
from g2tr_hf.profiling import (
    BAGEL_7B_LLM,
    DecoderShape,
    Segment,
    account_request,
    decoder_shape,
    kv_cache_bytes,
    module_flops,
    prefill_flops,
    prompt_segments,
)
from g2tr_hf.reduction import keep_count


def test_kv_bytes_per_token_at_bagel_shapes():
    # 2 (K, V) x 28 layers x 4 KV heads x 128 x 2 bytes = 56 KiB per token (BAGEL-7B-MoT, bf16)
    assert kv_cache_bytes(1, BAGEL_7B_LLM) == 56 * 1024


def test_prefill_flops_by_hand():
    shape = DecoderShape(hidden_size=4, intermediate_size=6, num_layers=2, num_heads=2, num_kv_heads=1,
                         head_dim=2, vocab_size=10)
    # linear per token: 2 * (4*4 + 2*4*2 + 4*4 + 3*4*6) = 2 * 120 = 240
    # keys seen: image block of 3 (bidirectional, no prefix) = 9; then text of 2 after 3 keys: 4 + 5 = 9 -> 18
    # attention: 4 * d_q(4) * 18 = 288 ; per layer = 5 * 240 + 288 = 1488 ; lm head = 2 * 4 * 10 = 80
    flops = prefill_flops([Segment(3, bidirectional=True), Segment(2)], shape)
    assert flops == 2 * 1488 + 80


def test_demo_reports_consistent_numbers():
    report = run_demo(ratio=0.5)
    assert (report.tokens_in, report.tokens_kept) == (4900, 2450)
    # image block (+ 2 markers), question (+ <|im_start|> <|im_end|>), the <|im_start|> answer seed: the README's
    # 4935 -> 2485 (benchmarks/bench_bagel_prefill.py) and what the processor builds with add_generation_prompt=True
    assert report.kv_entries == (4900 + 2 + 32 + 1, 2450 + 2 + 32 + 1) == (4935, 2485)
    assert report.prefill_flops[0] > 1.9 * report.prefill_flops[1]
    assert 0.45 < report.compute_saved < 0.6


def test_cli_demo_writes_png(tmp_path, capsys):
    output = tmp_path / "kept.png"
    assert main(["demo", "--ratio", "0.25", "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "4900 / 1225" in printed and "prefill FLOPs" in printed
    assert "Understanding request through the tiny built-in BAGEL" in printed
    assert "ViT tokens in / kept:        16 / 4" in printed  # the tiny model's 4x4 grid at ratio 0.25
    with Image.open(output) as image:
        assert image.size == (1024, 1024)


def test_cli_bad_ratio_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--ratio", "1.5", "-o", str(tmp_path / "x.png")]) == 2
    assert "`ratio` must be a number in (0, 1]" in capsys.readouterr().err


def test_prompt_segments_split_text_and_image_blocks():
    ids = torch.tensor([1, 2, 9, 5, 5, 5, 5, 8, 3, 9, 5, 5, 8])
    assert prompt_segments(ids, 9, 8) == [
        Segment(2), Segment(6, True, True), Segment(1), Segment(4, True, True)
    ]
    assert [s.length for s in prompt_segments(ids, 9, 8, [2, 1], bidirectional_images=False)] == [2, 4, 1, 3]
    with pytest.raises(ValueError, match="kept_image_tokens"):
        prompt_segments(ids, 9, 8, [2])
    with pytest.raises(ValueError, match="markers"):
        prompt_segments(ids[:-1], 9, 8)


def test_module_flops_counts_a_linear_exactly_on_meta():
    with torch.device("meta"):
        linear = torch.nn.Linear(8, 16, bias=False)
        x = torch.empty(5, 8)
    assert module_flops(linear, x) == 2 * 5 * 8 * 16


def test_accounting_matches_the_cache_of_the_tiny_bagel():
    model, processor = build_tiny("bagel")
    image = Image.new("RGB", (56, 40), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    n = int(inputs["image_grid_hw"][0].prod())
    k = keep_count(n, 0.5, model.config.g2tr_min_keep)
    accounting = account_request(
        inputs["input_ids"][0],
        decoder_shape(model.config.llm_config),
        image_start_token_id=model.config.vision_start_token_id,
        image_end_token_id=model.config.vision_end_token_id,
        kept_image_tokens=[k],
    )
    with torch.inference_mode():
        full = stored_length(output_cache(model(**inputs, use_cache=True, g2tr_ratio=1.0)))
        reduced = stored_length(output_cache(model(**inputs, use_cache=True, g2tr_ratio=0.5)))
    assert accounting.image_tokens == (n,) and accounting.kv_entries == (full, reduced)
    assert accounting.flops_ratio > 1.0


def test_run_understanding_reports_both_ratios():
    model, processor = build_tiny("bagel")
    report = run_understanding(model, processor, synthetic_scene(64), "what is it?", 0.5, max_new_tokens=3)
    accounting = report.profile.accounting
    assert (accounting.image_tokens, accounting.kept_tokens) == ((16,), (8,))
    assert accounting.kv_entries[0] - accounting.kv_entries[1] == 8
    assert all(isinstance(answer, str) for answer in report.answers)


@pytest.mark.parametrize("name", ["bagel", "internvlu"])
def test_profile_request_matches_the_model(name):
    from g2tr_hf.profiling import profile_request

    model, processor = build_tiny(name)
    image = Image.new("RGB", (56, 56), (30, 160, 90))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    profile = profile_request(model, inputs, g2tr_ratio=0.5, repeats=1)
    with torch.inference_mode():
        reduced = stored_length(output_cache(model(**inputs, use_cache=True, g2tr_ratio=0.5)))
        full = stored_length(output_cache(model(**inputs, use_cache=True, g2tr_ratio=1.0)))
    accounting = profile.accounting
    assert accounting.image_tokens == (16,) and accounting.kept_tokens == (8,)
    assert accounting.kv_entries == (full, reduced) and accounting.image_block_entries == (18, 10)
    assert profile.anchor_encode_flops > 0 and all(seconds > 0 for seconds in profile.prefill_seconds)
    unreduced = profile_request(model, inputs, g2tr_ratio=1.0, repeats=1)
    assert unreduced.anchor_encode_flops == 0 and unreduced.accounting.kv_entries == (full, full)

from PIL import Image

from g2tr_hf.cli import main
from g2tr_hf.demo import run_demo
from g2tr_hf.profiling import BAGEL_7B_LLM, DecoderShape, Segment, kv_cache_bytes, prefill_flops


def test_kv_bytes_per_token_at_bagel_shapes():
    # 2 (K, V) x 28 layers x 4 KV heads x 128 x 2 bytes = 56 KiB per token (shared/specs/bagel.md §2.5)
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
    assert report.kv_entries == (4900 + 2 + 32, 2450 + 2 + 32)
    assert report.prefill_flops[0] > 1.9 * report.prefill_flops[1]
    assert 0.45 < report.compute_saved < 0.6


def test_cli_demo_writes_png(tmp_path, capsys):
    output = tmp_path / "kept.png"
    assert main(["demo", "--ratio", "0.25", "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "4900 / 1225" in printed and "prefill FLOPs" in printed
    with Image.open(output) as image:
        assert image.size == (1024, 1024)


def test_cli_bad_ratio_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--ratio", "1.5", "-o", str(tmp_path / "x.png")]) == 2
    assert "`ratio` must be a number in (0, 1]" in capsys.readouterr().err

"""InternVL-U's generation decoder (MMDiT): position tables checked by hand, the G2TR position invariant, the official
1-D fallback, checkpoint names and sizes, loading without meta tensors, and bad inputs. Tiny random weights, CPU."""

from __future__ import annotations

import pytest
import torch

from g2tr_hf.modeling_internvlu_gen import (
    G2TRInternVLUGenerationDecoder,
    G2TRInternVLUGenerationDecoderConfig,
    build_sample_positions,
    build_tiny_generation_decoder_config,
    centred_axis,
    grid_positions,
)


def vit_context(before: int, vit: int, after: int) -> torch.Tensor:
    return torch.tensor([False] * before + [True] * vit + [False] * after)


# --- positions ------------------------------------------------------------------------------------------------------


def test_centred_axes_by_hand():
    assert centred_axis(4).tolist() == [-2, -1, 0, 1]
    assert centred_axis(5).tolist() == [-3, -2, -1, 0, 1]  # -ceil(n/2) .. floor(n/2) - 1
    scaled = centred_axis(16, 0.25)
    # -8..7 stretched onto -32..31: steps of 63 / 15 = 4.2.
    torch.testing.assert_close(scaled, -32 + 4.2 * torch.arange(16, dtype=torch.float32), rtol=0, atol=1e-5)
    assert centred_axis(1, 0.25).tolist() == [-1]  # a single cell is never stretched


def test_the_512_edit_worked_example():
    """512x512 edit: a 32x32-patch target and reference, 4 text tokens, the 16x16 ViT run, 3 text tokens."""
    image, context = build_sample_positions(
        [(32, 32), (32, 32)], vit_context(4, 256, 3), [(16, 16)], vit_scale=0.25
    )
    target, reference = image[:1024], image[1024:]
    assert target[:, 0].eq(0).all() and reference[:, 0].eq(1).all()
    assert target[0].tolist() == [0, -16, -16] and target[-1].tolist() == [0, 15, 15]
    assert torch.equal(target[:, 1:], reference[:, 1:])  # a same-size reference lies on the target grid
    assert context[:4, 0].tolist() == [16, 17, 18, 19] and (context[:4] == context[:4, :1]).all()
    vit = context[4:260]
    torch.testing.assert_close(vit[0], torch.tensor([20.0, -32.0, -32.0]))
    torch.testing.assert_close(vit[1], torch.tensor([20.0, -32.0, -27.8]))
    torch.testing.assert_close(vit[-1], torch.tensor([20.0, 31.0, 31.0]))
    # After the ViT grid the text continues at int(max(20, 31)) + 1 = 32.
    assert context[260:, 0].tolist() == [32, 33, 34]


def test_the_1024_target_continues_after_the_frame():
    _, context = build_sample_positions([(64, 64)], vit_context(40, 256, 1), [(16, 16)], vit_scale=0.25)
    assert context[0, 0] == 32  # the 64x64-patch target's max is 31
    assert context[40, 0] == 72 and context[-1, 0] == 73  # frame 72 > 31, so the text continues at 73


def test_text_to_image_positions_are_one_line_after_the_target():
    image, context = build_sample_positions([(4, 6)], torch.zeros(5, dtype=torch.bool), [], vit_scale=0.25)
    assert image.shape == (24, 3) and image[:, 1].unique().tolist() == [-2, -1, 0, 1]
    assert context[:, 0].tolist() == [3, 4, 5, 6, 7] and (context == context[:, :1]).all()


def test_kept_tokens_keep_their_rows_of_the_full_grid():
    """positions(reduced) == positions(full) with the dropped ViT rows removed, whichever tokens are kept."""
    full_image, full_context = build_sample_positions(
        [(32, 32), (32, 32)], vit_context(4, 256, 6), [(16, 16)], vit_scale=0.25
    )
    generator = torch.Generator().manual_seed(0)
    # Random keeps, and one that drops the whole last row and column (its kept max would be 26.8).
    no_edge = torch.tensor([i for i in range(256) if i // 16 < 15 and i % 16 < 15])
    for keep in (torch.randperm(256, generator=generator)[:128].sort().values, no_edge):
        image, context = build_sample_positions(
            [(32, 32), (32, 32)], vit_context(4, keep.numel(), 6), [(16, 16)], [keep], vit_scale=0.25
        )
        kept_rows = torch.cat([torch.arange(4), 4 + keep, torch.arange(260, 266)])
        assert torch.equal(image, full_image)
        assert torch.equal(context, full_context[kept_rows])
        assert context[-6, 0] == 32


def test_official_mode_reproduces_the_one_dimensional_fallback():
    keep = torch.arange(0, 256, 2)
    _, context = build_sample_positions(
        [(32, 32), (32, 32)], vit_context(4, 128, 2), [(16, 16)], [keep], vit_scale=0.25,
        position_mode="official_fallback",
    )  # fmt: skip
    assert context[4:132, 0].tolist() == list(range(20, 148)) and (context == context[:, :1]).all()
    assert context[132:, 0].tolist() == [148, 149]  # every later text token is shifted (32 without reduction)
    # With the full run the official mode is the full grid.
    full = build_sample_positions([(32, 32)], vit_context(4, 256, 2), [(16, 16)], vit_scale=0.25)
    official = build_sample_positions(
        [(32, 32)], vit_context(4, 256, 2), [(16, 16)], vit_scale=0.25, position_mode="official_fallback"
    )
    assert all(torch.equal(a, b) for a, b in zip(full, official))


def test_position_errors_are_clear():
    with pytest.raises(ValueError, match="holds 128 tokens but its grid is 16x16"):
        build_sample_positions([(32, 32)], vit_context(4, 128, 2), [(16, 16)], vit_scale=0.25)
    with pytest.raises(ValueError, match="128 tokens but 64 kept indices"):
        build_sample_positions([(32, 32)], vit_context(4, 128, 2), [(16, 16)], [torch.arange(64)])
    with pytest.raises(ValueError, match="1 run\\(s\\) of ViT tokens but 0 ViT grid"):
        build_sample_positions([(32, 32)], vit_context(4, 16, 2), [])
    with pytest.raises(ValueError, match="`position_mode`"):
        build_sample_positions([(32, 32)], vit_context(4, 16, 2), [(4, 4)], position_mode="flat")


def test_grid_positions_are_raster_ordered():
    grid = grid_positions(3, 2, 3)
    assert grid.tolist() == [[3, -1, -2], [3, -1, -1], [3, -1, 0], [3, 0, -2], [3, 0, -1], [3, 0, 0]]


# --- the module -----------------------------------------------------------------------------------------------------


def test_full_size_names_and_parameter_count():
    with torch.device("meta"):
        model = G2TRInternVLUGenerationDecoder(G2TRInternVLUGenerationDecoderConfig())
    state = model.state_dict()
    assert len(state) == 654
    assert round(sum(v.numel() for v in state.values()) / 1e9, 3) == 1.808
    block = "decoder.transformer_blocks.19."
    assert state[block + "attn.to_q.weight"].shape == (3072, 1536)  # query + gate
    assert state[block + "attn.add_k_proj.weight"].shape == (1536, 1536)
    assert state[block + "img_mod.1.weight"].shape == (9216, 1536)
    assert state[block + "txt_mlp.net.0.proj.weight"].shape == (6144, 1536)
    assert state["decoder.norm_out.linear.weight"].shape == (3072, 1536)
    assert state["decoder.proj_out.weight"].shape == (64, 1536)
    assert state["encoder_padding_token"].shape == (4096,)
    assert state["decoder.txt_norm.weight"].shape == (4096,)


def test_official_config_keys_load():
    config = G2TRInternVLUGenerationDecoderConfig(
        model_type="internvlu_generation_decoder", decoder_projector_type="identity", vlm_select_layer=[-1, -2],
        decoder_config={"_class_name": "InternVLUTransformer2DModel", "num_layers": 20,
                        "vlm_cond_position_scale_factor": 1.0},
        weighting_scheme="logit_normal", vlm_cond_position_scale_factor=0.25,
    )  # fmt: skip
    assert config.decoder_config["num_layers"] == 20 and "_class_name" not in config.decoder_config
    assert config.vlm_cond_position_scale_factor == 0.25 and config.latent_channels == 16
    with pytest.raises(ValueError, match="decoder_projector_type"):
        G2TRInternVLUGenerationDecoderConfig(decoder_projector_type="mlp2x_gelu")


def tiny_edit_inputs(batch_lengths=(24, 21, 9), vit_tokens=16):
    torch.manual_seed(0)
    lpad = max(batch_lengths) + 3
    states = torch.randn(len(batch_lengths), lpad, 128)
    mask = torch.zeros(len(batch_lengths), lpad, dtype=torch.bool)
    vit = torch.zeros_like(mask)
    fhw = []
    for row, length in enumerate(batch_lengths):
        mask[row, :length] = True
        if row < 2:
            vit[row, 2 : 2 + vit_tokens] = True
            fhw.append(torch.tensor([[1, 4, 4]]))
        else:
            fhw.append(torch.zeros(0, 3, dtype=torch.long))
    reference = torch.randn(4, 16, 16)
    return dict(
        encoder_hidden_states=states, encoder_attention_mask=mask, encoder_image_token_mask=vit,
        image_grid_thw_gen=torch.tensor([[1, 16, 16]] * 3), image_fhw_cond=fhw,
        conditional_input=[reference[None], reference[None], torch.zeros(0, 4, 16, 16)],
        image_grid_thw_gen_cond=[torch.tensor([[1, 16, 16]])] * 2 + [torch.zeros(0, 3, dtype=torch.long)],
    )  # fmt: skip


def test_save_and_load_keep_names_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = G2TRInternVLUGenerationDecoder(build_tiny_generation_decoder_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = G2TRInternVLUGenerationDecoder.from_pretrained(tmp_path).eval()
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert set(loaded.state_dict()) == set(model.state_dict())
    inputs = tiny_edit_inputs()
    latents = torch.randn(3, 4, 16, 16)
    timestep = torch.tensor([999, 999, 999])
    with torch.no_grad():
        expected = model(latents, timestep, model.prepare_conditioning(**inputs))
        again = loaded(latents, timestep, loaded.prepare_conditioning(**inputs))
    assert torch.equal(expected, again) and expected.abs().sum() > 0


def test_rows_are_independent_and_padding_is_ignored():
    """Each row attends to itself only: a row computed alone equals its row of the padded batch."""
    torch.manual_seed(0)
    model = G2TRInternVLUGenerationDecoder(build_tiny_generation_decoder_config()).eval()
    inputs = tiny_edit_inputs()
    latents = torch.randn(3, 4, 16, 16)
    timestep = torch.tensor([500, 500, 500])
    with torch.no_grad():
        batch = model(latents, timestep, model.prepare_conditioning(**inputs))
        for row in range(3):
            length = int(inputs["encoder_attention_mask"][row].sum())
            alone = dict(
                encoder_hidden_states=inputs["encoder_hidden_states"][row : row + 1, :length],
                encoder_image_token_mask=inputs["encoder_image_token_mask"][row : row + 1, :length],
                image_grid_thw_gen=inputs["image_grid_thw_gen"][row : row + 1],
                image_fhw_cond=inputs["image_fhw_cond"][row : row + 1],
                conditional_input=inputs["conditional_input"][row : row + 1],
                image_grid_thw_gen_cond=inputs["image_grid_thw_gen_cond"][row : row + 1],
            )
            single = model(latents[row : row + 1], timestep[:1], model.prepare_conditioning(**alone))
            torch.testing.assert_close(single[0], batch[row], rtol=1e-5, atol=1e-5)


def test_decoder_input_errors():
    model = G2TRInternVLUGenerationDecoder(build_tiny_generation_decoder_config()).eval()
    inputs = tiny_edit_inputs()
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model.prepare_conditioning(**{**inputs, "image_grid_thw_gen": torch.tensor([[1, 15, 16]] * 3)})
    with pytest.raises(ValueError, match="reference image\\(s\\) for a 8x8-patch target"):
        many = torch.randn(4, 4, 16, 16)
        model.prepare_conditioning(
            **{**inputs, "conditional_input": [many] * 3,
               "image_grid_thw_gen_cond": [torch.tensor([[1, 16, 16]] * 4)] * 3}
        )
    with pytest.raises(ValueError, match="holds 16 tokens but 3 kept indices"):
        model.prepare_conditioning(**inputs, image_keep_cond=[[torch.arange(3)], [None], []])

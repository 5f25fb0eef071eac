"""convert_internvlu: a tiny snapshot in the official InternVL-U layout (vlm/, vae/, processor/, plus the folders of
the generation head) written from a tiny random model, converted, loaded and compared; atomicity; bad sources."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import g2tr_hf  # noqa: F401  (registers the Auto classes for the local loads)
from checkpoint_names import official_state_dict
from g2tr_hf import convert_internvlu as convert_module
from g2tr_hf.configuration_internvlu import SPECIAL_TOKENS, TINY_TOKEN_IDS
from g2tr_hf.convert_internvlu import convert_internvlu
from g2tr_hf.modeling_internvlu import G2TRInternVLUForConditionalGeneration
from g2tr_hf.modeling_internvlu_gen import G2TRInternVLUGenerationDecoder, build_tiny_generation_decoder_config
from g2tr_hf.pipeline_internvlu import DEFAULT_SCHEDULER_CONFIG, G2TRInternVLUPipeline
from g2tr_hf.tiny import build_tiny


CHAT = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}


# ----------------------------------------------------------------------------------------------------------------
# A tiny snapshot in the official layout
# ----------------------------------------------------------------------------------------------------------------


def official_vlm_config(model: G2TRInternVLUForConditionalGeneration) -> dict:
    """`vlm/config.json` as `InternVLUChatConfig` writes it: `llm_config` (not text_config), upstream model types,
    flash-attn flags, the unused tiling keys, and NO token ids (the converter must read them from the tokenizer)."""
    config = model.config
    vision, text = config.vision_config, config.text_config
    return {
        "architectures": ["InternVLUChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvlu_chat.InternVLUChatConfig",
            "AutoModel": "modeling_internvlu_chat.InternVLUChatModel",
        },
        "model_type": "internvlu_chat",
        "torch_dtype": "float32",
        "transformers_version": "4.52.3",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "use_flash_attn": True,
            **{
                key: getattr(vision, key)
                for key in (
                    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                    "image_size", "patch_size", "hidden_act", "norm_type", "layer_norm_eps", "qkv_bias",
                    "qk_normalization", "initializer_factor", "initializer_range", "attention_dropout", "dropout",
                    "drop_path_rate",
                )
            },
        },  # fmt: skip
        "llm_config": {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "attn_implementation": "flash_attention_2",
            "rope_theta": text.rope_parameters["rope_theta"],
            "rope_scaling": None,
            "bos_token_id": TINY_TOKEN_IDS["<|endoftext|>"],
            "eos_token_id": TINY_TOKEN_IDS["<|im_end|>"],
            **{
                key: getattr(text, key)
                for key in (
                    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "hidden_act",
                    "attention_bias", "tie_word_embeddings",
                )
            },
        },  # fmt: skip
        "force_image_size": config.force_image_size,
        "downsample_ratio": config.downsample_ratio,
        "select_layer": -1,
        "ps_version": "v2",
        "template": "qwen2_5-chat-v3",
        "dynamic_image_size": False,
        "use_thumbnail": False,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 1,
        "anyres_image_size": False,
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
    }


def official_processor_config(processor) -> dict:
    """`processor/processor_config.json` with the keys `InternVLUProcessor.from_pretrained` reads."""
    image_processor = processor.image_processor
    return {
        "processor_class": "InternVLUProcessor",
        "image_processor_kwargs": {
            "size": {"height": image_processor.image_size, "width": image_processor.image_size},
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "image_mean": list(image_processor.image_mean),
            "image_std": list(image_processor.image_std),
            "crop_to_patches": False,
        },
        "image_gen_processor_class": "InternVLUDynamicResGenerationImageProcessor",
        "image_gen_processor_kwargs": {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "vae_downsample_factor": 8,
                                       "min_dynamic_patch": 64, "max_dynamic_patch": 144, "max_length": 96},
        "image_seq_length": processor.image_seq_length,
    }


def _save_vlm_weights(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return
    keys = sorted(state)
    weight_map = {}
    for index, part in enumerate(np.array_split(np.array(keys, dtype=object), shards), start=1):
        name = f"model-{index:05d}-of-{shards:05d}.safetensors"
        save_file({key: state[key] for key in part}, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in part})
    index_json = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json))


def tiny_decoder(model) -> G2TRInternVLUGenerationDecoder:
    config = build_tiny_generation_decoder_config(
        latent_channels=model.config.vae_config["z_dim"], context_dim=2 * model.config.text_config.hidden_size
    )
    torch.manual_seed(1)
    return G2TRInternVLUGenerationDecoder(config).eval()


def write_official_generation_decoder(folder: Path, model) -> None:
    """`generation_decoder/` as `InternVLUGenerationDecoder` writes it: its own config keys (training keys
    included, the MMDiT under `decoder_config` with diffusers' bookkeeping) and the official weight names."""
    decoder = tiny_decoder(model)
    folder.mkdir()
    config = {
        "architectures": ["InternVLUGenerationDecoder"], "model_type": "internvlu_generation_decoder",
        "is_composition": False, "decoder_projector_type": "identity", "vae_projector_type": "mlp2x_gelu",
        "input_hidden_size": decoder.config.input_hidden_size, "output_hidden_size": decoder.config.output_hidden_size,
        "decoder_config": {"_class_name": "InternVLUTransformer2DModel", **decoder.config.decoder_config,
                           "video_position_scale_factor": 1.0, "vlm_cond_position_scale_factor": 0.25},
        "padding_encoder_hidden_states": True, "pad_to_fix_length": False, "max_sequence_length": 768,
        "weighting_scheme": "logit_normal", "vlm_select_layer": [-1, -2], "flow_shift": 3.0,
        "video_position_scale_factor": 1.0, "vlm_cond_position_scale_factor": 0.25, "vae_downsample_factor": 8,
        "transformers_version": "4.52.3",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.detach().clone().contiguous() for k, v in decoder.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def write_official_snapshot(root: Path, model, processor, *, shards: int = 1) -> Path:
    """Write `model` + `processor` as the InternVL-U Hub repository lays them out. Returns `root`."""
    vlm = root / "vlm"
    vlm.mkdir(parents=True)
    (vlm / "config.json").write_text(json.dumps(official_vlm_config(model), indent=2))
    state = {
        k: v.detach().clone().contiguous() for k, v in official_state_dict(model).items() if not k.startswith("vae.")
    }
    _save_vlm_weights(state, vlm, shards)
    model.vae.save_pretrained(root / "vae")  # diffusers names: config.json + diffusion_pytorch_model.safetensors
    processor.tokenizer.save_pretrained(root / "processor")
    (root / "processor" / "processor_config.json").write_text(json.dumps(official_processor_config(processor)))
    # The image-generation head, as the official repository stores it (a tiny random decoder).
    write_official_generation_decoder(root / "generation_decoder", model)
    (root / "scheduler").mkdir()
    scheduler = {"_class_name": "DPMSolverMultistepScheduler", **DEFAULT_SCHEDULER_CONFIG}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    model_index = {
        "_class_name": "InternVLUPipeline",
        "vlm": ["internvlu.vlm", "InternVLUChatModel"],
        "generation_decoder": ["internvlu.diffusion", "InternVLUGenerationDecoder"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "processor": ["internvlu.processing_internvlu", "InternVLUProcessor"],
    }
    (root / "model_index.json").write_text(json.dumps(model_index))
    return root


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("internvlu", seed=0)


@pytest.fixture(scope="module")
def snapshot(tiny, tmp_path_factory) -> Path:
    return write_official_snapshot(tmp_path_factory.mktemp("hub") / "InternVL-U", *tiny)


@pytest.fixture(scope="module")
def inputs(tiny):
    _, processor = tiny
    image = PIL.Image.fromarray((np.random.RandomState(1).rand(30, 40, 3) * 255).astype(np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what?"}]}]
    return messages, processor.apply_chat_template(messages, **CHAT)


def _logits(model, batch, ratio: float) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, g2tr_ratio=ratio).logits


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------


def test_snapshot_uses_the_official_names(snapshot, tiny):
    """The fixture itself: the vlm keys are the model's own names, the vae keys are diffusers' (no `vae.`)."""
    with safe_open(snapshot / "vlm" / "model.safetensors", framework="pt") as handle:
        vlm_keys = set(handle.keys())
    with safe_open(snapshot / "vae" / "diffusion_pytorch_model.safetensors", framework="pt") as handle:
        vae_keys = set(handle.keys())
    model_keys = set(official_state_dict(tiny[0]))
    assert "language_model.lm_head.weight" in vlm_keys and "special_token_embedding.weight" in vlm_keys
    assert vlm_keys | {f"vae.{k}" for k in vae_keys} == model_keys
    assert json.loads((snapshot / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKLQwenImage"
    assert "image_token_id" not in json.loads((snapshot / "vlm" / "config.json").read_text())


def test_convert_then_load_gives_the_source_logits(snapshot, tiny, inputs, tmp_path):
    model, processor = tiny
    messages, batch = inputs
    destination = convert_internvlu(snapshot, tmp_path / "converted")

    config = json.loads((destination / "config.json").read_text())
    assert config["model_type"] == "g2tr_internvl_u" and config["g2tr_ratio"] == 0.5
    assert config["architectures"] == ["G2TRInternVLUForConditionalGeneration"]
    model_ref = "modeling_internvlu.G2TRInternVLUForConditionalGeneration"
    assert config["auto_map"]["AutoModelForImageTextToText"] == model_ref
    # Token ids come from the snapshot's tokenizer, not from the config defaults (151671, ...).
    assert config["image_token_id"] == TINY_TOKEN_IDS["<IMG_CONTEXT>"]
    assert config["special_token_ids"] == [TINY_TOKEN_IDS[token] for token in SPECIAL_TOKENS]
    assert config["vae_config"]["z_dim"] == model.config.vae_config["z_dim"]
    assert "use_flash_attn" not in config["vision_config"]
    generation = json.loads((destination / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [TINY_TOKEN_IDS["<|im_end|>"], TINY_TOKEN_IDS["<img>"]]
    assert not (destination / "model.safetensors").exists()  # it would shadow the index
    # The generation head comes along in its own folder, outside the understanding model's index.
    assert (destination / "generation_decoder" / "config.json").is_file()
    for code in ("configuration_internvlu.py", "modeling_internvlu.py", "processing_internvlu.py", "reduction.py"):
        assert (destination / code).is_file()
    readme = (destination / "README.md").read_text()
    assert "base_model: InternVL-U/InternVL-U" in readme and "Built with g2tr-hf from `InternVL-U`" in readme
    assert "default keep ratio is `g2tr_ratio=0.5`" in readme

    # The index points vlm keys at the linked vlm file and the prefixed VAE keys at vae.safetensors.
    weight_map = json.loads((destination / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == set(official_state_dict(model))
    assert {weight_map[k] for k in weight_map if k.startswith("vae.")} == {"vae.safetensors"}
    assert {weight_map[k] for k in weight_map if not k.startswith("vae.")} == {"vlm-model.safetensors"}
    linked = destination / "vlm-model.safetensors"
    assert os.stat(linked).st_ino == os.stat(snapshot / "vlm" / "model.safetensors").st_ino  # a hard link, no copy

    # g2tr_min_keep=1 as in the tiny model: the stored InternVL-U default (32) would keep all 16 tiny tokens.
    loaded = AutoModelForImageTextToText.from_pretrained(destination, g2tr_min_keep=1).eval()
    assert type(loaded) is G2TRInternVLUForConditionalGeneration and loaded.config.g2tr_ratio == 0.5
    reference = model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
    loaded_processor = AutoProcessor.from_pretrained(destination)
    converted_batch = loaded_processor.apply_chat_template(messages, **CHAT)
    assert converted_batch.keys() == batch.keys()
    assert all(torch.equal(converted_batch[k], batch[k]) for k in batch)
    for ratio in (1.0, 0.5):
        expected = _logits(model, batch, ratio)
        torch.testing.assert_close(_logits(loaded, converted_batch, ratio), expected, rtol=0, atol=0)
    with torch.no_grad():
        assert loaded(**converted_batch).reduction[0].num_kept == 8  # the stored default ratio 0.5 is in force


def test_sharded_vlm_with_symlinks(tiny, inputs, tmp_path):
    model, processor = tiny
    _, batch = inputs
    snapshot = write_official_snapshot(tmp_path / "sharded", model, processor, shards=2)
    destination = convert_internvlu(snapshot, tmp_path / "converted", ratio=1.0, link="symlink")
    shards = sorted(p.name for p in destination.glob("vlm-*.safetensors"))
    assert shards == ["vlm-model-00001-of-00002.safetensors", "vlm-model-00002-of-00002.safetensors"]
    assert all((destination / name).is_symlink() for name in shards)
    assert "base_model: InternVL-U/InternVL-U" in (destination / "README.md").read_text()  # the built-in card
    loaded = AutoModelForImageTextToText.from_pretrained(destination, g2tr_min_keep=1).eval()
    assert loaded.config.g2tr_ratio == 1.0 and loaded.config.g2tr_min_keep == 1
    torch.testing.assert_close(_logits(loaded, batch, 0.5), _logits(model, batch, 0.5), rtol=0, atol=0)


def test_copy_mode_copies(snapshot, tmp_path):
    destination = convert_internvlu(snapshot, tmp_path / "copied", link="copy")
    linked = destination / "vlm-model.safetensors"
    assert not linked.is_symlink()
    assert os.stat(linked).st_ino != os.stat(snapshot / "vlm" / "model.safetensors").st_ino
    assert linked.read_bytes() == (snapshot / "vlm" / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# Atomicity and bad sources
# ----------------------------------------------------------------------------------------------------------------


def test_truncated_weights_leave_no_destination(tiny, tmp_path):
    snapshot = write_official_snapshot(tmp_path / "snap", *tiny)
    weights = snapshot / "vlm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    destination = tmp_path / "out"
    with pytest.raises(ValueError, match="truncated"):
        convert_internvlu(snapshot, destination)
    assert not destination.exists() and _siblings(destination) == ["snap"]


def test_failure_while_writing_leaves_no_destination(snapshot, tmp_path, monkeypatch):
    def fail(files, target):
        target.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "_write_vae", fail)
    destination = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        convert_internvlu(snapshot, destination)
    assert not destination.exists() and _siblings(destination) == []
    # With overwrite, an existing destination survives a failed conversion untouched.
    destination.mkdir()
    (destination / "keep.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        convert_internvlu(snapshot, destination, overwrite=True)
    assert [p.name for p in destination.iterdir()] == ["keep.txt"] and _siblings(destination) == ["out"]


def test_missing_weights_and_shards_are_named(tiny, tmp_path):
    model, processor = tiny
    snapshot = write_official_snapshot(tmp_path / "snap", model, processor, shards=2)
    (snapshot / "vlm" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        convert_internvlu(snapshot, tmp_path / "out")

    snapshot = write_official_snapshot(tmp_path / "snap2", model, processor)
    with safe_open(snapshot / "vlm" / "model.safetensors", framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys() if k != "mlp1.1.weight"}
    save_file(state, snapshot / "vlm" / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 weights.*mlp1\.1\.weight"):
        convert_internvlu(snapshot, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_and_weights_that_disagree(tiny, tmp_path):
    snapshot = write_official_snapshot(tmp_path / "snap", *tiny)
    vlm_config = json.loads((snapshot / "vlm" / "config.json").read_text())
    vlm_config["llm_config"]["intermediate_size"] = 96
    (snapshot / "vlm" / "config.json").write_text(json.dumps(vlm_config))
    with pytest.raises(ValueError, match="shapes"):
        convert_internvlu(snapshot, tmp_path / "out")
    vlm_config["llm_config"]["intermediate_size"] = 128
    vlm_config["llm_config"]["vocab_size"] = 200  # the tiny special tokens sit at 256..268
    (snapshot / "vlm" / "config.json").write_text(json.dumps(vlm_config))
    with pytest.raises(ValueError, match="vocab_size"):
        convert_internvlu(snapshot, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("vae", "vae/config.json"),
        ("vlm/config.json", "vlm/config.json"),
        ("processor", "tokenizer"),
        ("vae/diffusion_pytorch_model.safetensors", "no safetensors"),
    ],
)
def test_incomplete_snapshot_names_what_is_missing(snapshot, tmp_path, remove, message):
    copy = tmp_path / "snap"
    shutil.copytree(snapshot, copy)
    target = copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ValueError, match=message):
        convert_internvlu(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_arguments(snapshot, tmp_path):
    with pytest.raises(ValueError, match="`source`"):
        convert_internvlu(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ValueError, match="`link`"):
        convert_internvlu(snapshot, tmp_path / "out", link="move")
    with pytest.raises(ValueError, match="g2tr_ratio"):
        convert_internvlu(snapshot, tmp_path / "out", ratio=0.0)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        convert_internvlu(snapshot, occupied)
    assert [p.name for p in occupied.iterdir()] == ["file"]
    assert not (tmp_path / "out").exists()


def test_cli_convert_internvlu(snapshot, tmp_path, capsys):
    from g2tr_hf.cli import main as cli_main

    destination = tmp_path / "converted"
    argv = ["convert", "internvlu", str(snapshot), str(destination), "--ratio", "0.25"]
    assert cli_main(argv) == 0
    assert json.loads((destination / "config.json").read_text())["g2tr_ratio"] == 0.25
    assert "Converted" in capsys.readouterr().out
    assert cli_main(argv) == 2  # exists, no --overwrite
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["convert", "internvlu", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------------
# The generation head
# ----------------------------------------------------------------------------------------------------------------


def test_the_generation_head_comes_along(snapshot, tiny, tmp_path):
    model, processor = tiny
    folder = convert_internvlu(snapshot, tmp_path / "converted")
    decoder_folder = folder / "generation_decoder"
    assert (decoder_folder / "model.safetensors").stat().st_ino == (
        snapshot / "generation_decoder" / "model.safetensors"
    ).stat().st_ino  # linked, not rewritten: the official names load as they are
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"]["g2tr-internvlu-image-generation"]["impl"] == (
        "pipeline_internvlu.G2TRInternVLUPipeline"
    )
    assert (folder / "pipeline_internvlu.py").is_file() and (folder / "modeling_internvlu_gen.py").is_file()
    loaded = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=False)
    pipe = G2TRInternVLUPipeline(loaded, AutoProcessor.from_pretrained(folder), device="cpu")
    source = tiny_decoder(model)
    for key, value in source.state_dict().items():
        assert torch.equal(pipe.generation_decoder.state_dict()[key], value), key
    assert pipe.generation_decoder.config.reference_max_side == 96
    assert pipe.generation_decoder.config.reference_min_pixels == 64 * 64
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and pipe.scheduler.config.use_flow_sigmas
    direct = G2TRInternVLUPipeline(model, processor, generation_decoder=source, scheduler=pipe.scheduler, device="cpu")
    direct.generation_decoder.config.reference_max_side = 96
    image = PIL.Image.fromarray((np.random.RandomState(2).rand(40, 56, 3) * 255).astype(np.uint8))
    settings = dict(num_inference_steps=2, g2tr_ratio=1.0, show_progress=False)  # converted: min_keep 32
    expected = direct(prompt="make it red", image=image, generator=torch.Generator().manual_seed(0), **settings)
    got = pipe(prompt="make it red", image=image, generator=torch.Generator().manual_seed(0), **settings)
    np.testing.assert_array_equal(np.asarray(got.images[0]), np.asarray(expected.images[0]))


def test_understanding_only_without_the_generation_head(snapshot, tmp_path):
    folder = convert_internvlu(snapshot, tmp_path / "plain", generation=False)
    assert not (folder / "generation_decoder").exists() and not (folder / "scheduler").exists()
    assert "custom_pipelines" not in json.loads((folder / "config.json").read_text())
    assert not (folder / "pipeline_internvlu.py").exists()
    partial = tmp_path / "snapshot-without-head"
    shutil.copytree(snapshot, partial, symlinks=True)
    shutil.rmtree(partial / "generation_decoder")
    folder = convert_internvlu(partial, tmp_path / "plain2")
    assert not (folder / "generation_decoder").exists()
    AutoModelForImageTextToText.from_pretrained(folder)  # the understanding model still loads
    with pytest.raises(ValueError, match="`generation=True` but `source`"):
        convert_internvlu(partial, tmp_path / "plain3", generation=True)


def test_a_decoder_that_disagrees_with_its_config_is_named(snapshot, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(snapshot, broken, symlinks=True)
    config_path = broken / "generation_decoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["decoder_config"]["num_layers"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="generation_decoder/ does not match its config.json: lacks 32 weights"):
        convert_internvlu(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()

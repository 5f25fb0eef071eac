"""`convert_bagel` and `g2tr-hf convert bagel` on a tiny snapshot written in the official BAGEL-7B-MoT layout.

The snapshot is made from `build_tiny("bagel")`: `llm_config.json` (a Qwen2 config dump as the real file has it),
`vit_config.json` (one SigLIP layer more than the model uses: upstream drops the last one), `ema.safetensors` (every
weight but the VAE, official key names = our module names), `ae.safetensors` (the VAE in the original BFL/LDM key
names, written by the reverse mapping below) and the tokenizer files. Converting it and loading the result must give
back the tiny model exactly, VAE included, which checks the LDM -> diffusers key conversion numerically.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

import g2tr_hf  # noqa: F401  (registers the Auto classes)
from g2tr_hf import G2TRBagelConfig, build_tiny
from g2tr_hf.cli import main as cli_main
from g2tr_hf.compat import checkpoint_key
from g2tr_hf.convert_bagel import convert_bagel
from g2tr_hf.modeling_bagel import CHECKPOINT_RENAMES


# ----------------------------------------------------------------------------------------------------------------
# diffusers AutoencoderKL keys -> original BFL/LDM keys (the layout of the official ae.safetensors)
# ----------------------------------------------------------------------------------------------------------------

# Renames inside one resnet block or the mid attention; the block paths are rewritten separately.
_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}



def official_state_dict(model) -> dict:
    """The model's tensors under the official checkpoint names (what `ema.safetensors` holds)."""
    return {checkpoint_key(key, CHECKPOINT_RENAMES): value for key, value in model.state_dict().items()}

def _ldm_key(key: str, num_up_blocks: int) -> str:
    """One diffusers VAE key (without the `vae.` prefix) in BFL/LDM naming."""
    side, rest = key.split(".", 1)  # "encoder" / "decoder"
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest[len('conv_norm_out.'):]}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", rest):
        block, res, part, kind = match.groups()
        return f"{side}.down.{block}.block.{res}.{_RESNET_PARTS.get(part, part)}.{kind}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", rest):
        return f"{side}.down.{match[1]}.downsample.conv.{match[2]}"
    # The decoder's up blocks run from the coarsest resolution in diffusers, from the finest in LDM.
    if match := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", rest):
        block, res, part, kind = match.groups()
        return f"{side}.up.{num_up_blocks - 1 - int(block)}.block.{res}.{_RESNET_PARTS.get(part, part)}.{kind}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", rest):
        return f"{side}.up.{num_up_blocks - 1 - int(match[1])}.upsample.conv.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)\.(weight|bias)", rest):
        res, part, kind = match.groups()
        return f"{side}.mid.block_{int(res) + 1}.{_RESNET_PARTS.get(part, part)}.{kind}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        return f"{side}.mid.attn_1.{_ATTENTION_PARTS[match[1]]}.{match[2]}"
    if re.fullmatch(r"conv_(in|out)\.(weight|bias)", rest):
        return key
    raise AssertionError(f"no LDM name for VAE key {key!r}")


def vae_state_to_ldm(state: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    """The model's `vae.*` tensors under their BFL/LDM names; the mid attention's Linear weights become 1x1 convs."""
    ldm = {}
    for key, value in state.items():
        name = _ldm_key(key[len("vae."):], num_up_blocks)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # [C, C] -> [C, C, 1, 1]
        ldm[name] = value.clone().contiguous()
    assert len(ldm) == len(state), "two diffusers keys mapped to one LDM key"
    return ldm


# ----------------------------------------------------------------------------------------------------------------
# The tiny snapshot
# ----------------------------------------------------------------------------------------------------------------

# What convert cannot read from the official files: the tiny AE is not FLUX-sized, and the tiny model keeps fewer than
# the official 32 tokens per image.
def tiny_overrides(model) -> dict:
    return {"vae_config": dict(model.config.vae_config), "g2tr_min_keep": model.config.g2tr_min_keep}


def write_snapshot(model, processor, folder: Path, *, extra_vit_layers: int = 1) -> Path:
    """Write `model` as an official BAGEL-7B-MoT snapshot into `folder` (file names and key names as upstream)."""
    folder.mkdir(parents=True, exist_ok=True)
    llm = model.config.llm_config
    # A 4.x-era Qwen2 config.json dump, the format of Qwen2.5-7B-Instruct's config that BAGEL ships as llm_config.json.
    llm_json = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": model.config.pad_token_id,
        "eos_token_id": model.config.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": llm.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "max_window_layers": llm.num_hidden_layers,
        "model_type": "qwen2",
        "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_key_value_heads": llm.num_key_value_heads,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.43.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": llm.vocab_size,
    }
    vit = model.config.vit_config
    vit_json = {
        "hidden_size": vit.hidden_size,
        "image_size": vit.image_size,
        "intermediate_size": vit.intermediate_size,
        "model_type": "siglip_vision_model",
        "num_attention_heads": vit.num_attention_heads,
        "num_hidden_layers": vit.num_hidden_layers + extra_vit_layers,
        "patch_size": vit.patch_size,
    }
    (folder / "llm_config.json").write_text(json.dumps(llm_json, indent=2))
    (folder / "vit_config.json").write_text(json.dumps(vit_json))
    # Early Hub revisions ship this (invalid JSON) config.json; convert must not read it.
    (folder / "config.json").write_text('{"name": ["BAGEL-7B-MoT"],}')
    state = official_state_dict(model)
    ema = {key: value.clone().contiguous() for key, value in state.items() if not key.startswith("vae.")}
    vae = {key: value for key, value in state.items() if key.startswith("vae.")}
    save_file(ema, folder / "ema.safetensors")
    num_up_blocks = len(model.config.vae_config["up_block_types"])
    save_file(vae_state_to_ldm(vae, num_up_blocks), folder / "ae.safetensors")
    processor.tokenizer.save_pretrained(folder)
    return folder


def chat(image: PIL.Image.Image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def smooth_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BILINEAR)


def request(processor) -> dict:
    return processor.apply_chat_template(
        chat(smooth_image(64, 48), "What color is the image?"),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


def folder_entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("bagel", seed=0)


@pytest.fixture(scope="module")
def snapshot(tiny, tmp_path_factory):
    return write_snapshot(*tiny, tmp_path_factory.mktemp("official") / "BAGEL-7B-MoT")


@pytest.fixture(scope="module")
def converted(tiny, snapshot, tmp_path_factory):
    destination = tmp_path_factory.mktemp("converted") / "bagel-g2tr"
    convert_bagel(snapshot, destination, ratio=0.5, config_overrides=tiny_overrides(tiny[0]))  # the packaged card
    return destination


# ----------------------------------------------------------------------------------------------------------------
# The snapshot really is in the official layout
# ----------------------------------------------------------------------------------------------------------------


def test_snapshot_uses_official_file_and_key_names(tiny, snapshot):
    model, _ = tiny
    ae = load_file(snapshot / "ae.safetensors")
    assert "encoder.down.0.block.0.conv1.weight" in ae and "encoder.norm_out.weight" in ae
    assert "decoder.up.0.block.2.conv2.weight" not in ae and "decoder.up.0.block.1.conv2.weight" in ae
    assert "decoder.up.3.upsample.conv.weight" in ae and "decoder.up.0.upsample.conv.weight" not in ae
    assert ae["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert any(".nin_shortcut." in key for key in ae) and not any(key.startswith("vae.") for key in ae)
    ema = load_file(snapshot / "ema.safetensors")
    assert set(ema) == {key for key in official_state_dict(model) if not key.startswith("vae.")}
    assert "vit_pos_embed.pos_embed" in ema and "language_model.model.layers.1.mlp_moe_gen.up_proj.weight" in ema
    vit = json.loads((snapshot / "vit_config.json").read_text())
    assert vit["num_hidden_layers"] == model.config.vit_config.num_hidden_layers + 1
    assert json.loads((snapshot / "llm_config.json").read_text())["model_type"] == "qwen2"


# ----------------------------------------------------------------------------------------------------------------
# The converted folder
# ----------------------------------------------------------------------------------------------------------------


def test_converted_folder_layout(converted, snapshot):
    files = set(os.listdir(converted))
    assert {
        "config.json",
        "generation_config.json",
        "ema.safetensors",
        "vae.safetensors",
        "model.safetensors.index.json",
        "processor_config.json",
        "chat_template.jinja",
        "tokenizer.json",
        "configuration_bagel.py",
        "configuration_g2tr.py",
        "modeling_bagel.py",
        "processing_bagel.py",
        "reduction.py",
        "README.md",
    } <= files
    config = json.loads((converted / "config.json").read_text())
    assert config["g2tr_ratio"] == 0.5 and config["model_type"] == "g2tr_bagel"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_bagel.G2TRBagelConfig",
        "AutoModel": "modeling_bagel.G2TRBagelForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_bagel.G2TRBagelForConditionalGeneration",
        "AutoProcessor": "processing_bagel.G2TRBagelProcessor",
    }
    weight_map = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == {"ema.safetensors", "vae.safetensors"}
    assert all((value == "vae.safetensors") == key.startswith("vae.") for key, value in weight_map.items())
    readme = (converted / "README.md").read_text()
    assert "g2tr_ratio=0.5" in readme and "g2tr_min_keep=1" in readme and "`BAGEL-7B-MoT`" in readme
    assert "$" not in readme


def test_converted_model_equals_source_model(tiny, converted):
    model, _ = tiny
    loaded = AutoModelForImageTextToText.from_pretrained(converted)
    assert type(loaded) is type(model) and type(AutoModel.from_pretrained(converted)) is type(model)
    assert loaded.config.g2tr_ratio == 0.5 and loaded.dtype == torch.float32
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert different == []  # VAE included: the LDM -> diffusers renaming is exact
    llm, source_llm = loaded.config.llm_config, model.config.llm_config
    assert (llm.hidden_size, llm.num_hidden_layers, llm.num_key_value_heads, llm.qk_norm) == (
        source_llm.hidden_size,
        source_llm.num_hidden_layers,
        source_llm.num_key_value_heads,
        True,
    )
    assert llm.rope_parameters["rope_theta"] == 1e6 and not llm.tie_word_embeddings
    assert loaded.config.vit_config.num_hidden_layers == model.config.vit_config.num_hidden_layers
    assert loaded.config.vit_max_num_patch_per_side == 8 and loaded.config.max_latent_size == 8  # read from tables


@torch.no_grad()
def test_logits_equal_source_model_at_both_ratios(tiny, converted):
    model, _ = tiny
    processor = AutoProcessor.from_pretrained(converted)
    assert processor.image_processor.vit_max_num_patch_per_side == model.config.vit_max_num_patch_per_side
    inputs = request(processor)
    assert inputs["image_grid_hw"].prod().item() > 8  # enough tokens for ratio 0.5 to drop some

    reduced = AutoModelForImageTextToText.from_pretrained(converted)  # the stored ratio, 0.5
    full = AutoModelForImageTextToText.from_pretrained(converted, g2tr_ratio=1.0)
    assert (reduced.config.g2tr_ratio, full.config.g2tr_ratio) == (0.5, 1.0)
    for loaded, ratio in ((full, 1.0), (reduced, 0.5)):
        expected = model(**inputs, g2tr_ratio=ratio).logits
        actual = loaded(**inputs).logits
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert not torch.allclose(full(**inputs).logits[:, -1], reduced(**inputs).logits[:, -1])


def test_processor_settings_follow_the_tables_and_are_official_at_full_size(tiny):
    from g2tr_hf.convert_bagel import _build_processor
    from g2tr_hf.processing_bagel import G2TRBagelImageProcessor

    official = G2TRBagelImageProcessor()
    settings = ("vae_max_size", "vae_min_size", "vae_stride", "vit_max_size", "vit_min_size", "vit_patch_size")
    full_size = _build_processor(G2TRBagelConfig(), tiny[1].tokenizer).image_processor
    for name in (*settings, "vit_max_num_patch_per_side", "max_pixels"):
        assert getattr(full_size, name) == getattr(official, name), name
    small = _build_processor(tiny[0].config, tiny[1].tokenizer).image_processor
    assert (small.vit_max_size, small.vit_max_num_patch_per_side, small.vae_max_size) == (8 * 14, 8, 8 * 16)


def test_flux_sized_vae_keys_round_trip_through_the_ldm_names():
    """The full FLUX AE (2 resnets per encoder block, 3 per decoder block, 128-512 channels) on the meta device:
    its LDM names convert back to exactly the diffusers keys and shapes."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae_config = G2TRBagelConfig().vae_config
    with torch.device("meta"):
        state = {f"vae.{key}": value for key, value in AutoencoderKL(**vae_config).state_dict().items()}
    ldm = vae_state_to_ldm(state, len(vae_config["up_block_types"]))
    assert "decoder.up.0.block.2.conv1.weight" in ldm and "encoder.down.3.block.1.conv2.weight" in ldm
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    converted = convert_ldm_vae_checkpoint(ldm, vae_config)
    assert {f"vae.{key}": tuple(value.shape) for key, value in converted.items()} == {
        key: tuple(value.shape) for key, value in state.items()
    }


# ----------------------------------------------------------------------------------------------------------------
# How ema.safetensors reaches the folder
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["hardlink", "symlink", "copy"])
def test_ema_weights_are_linked_not_copied(tiny, snapshot, tmp_path, link):
    destination = convert_bagel(
        snapshot, tmp_path / "out", link=link, config_overrides=tiny_overrides(tiny[0])
    )
    source, target = snapshot / "ema.safetensors", destination / "ema.safetensors"
    assert target.read_bytes() == source.read_bytes()
    if link == "hardlink":  # the same file, not a second copy of it
        assert not target.is_symlink() and os.stat(target).st_ino == os.stat(source).st_ino
        assert os.stat(source).st_nlink >= 2
    elif link == "symlink":
        assert target.is_symlink() and target.resolve() == source.resolve()
    else:
        assert not target.is_symlink() and os.stat(target).st_ino != os.stat(source).st_ino
    # Besides ema.safetensors the folder holds only the converted VAE as weight data.
    weights = [path.name for path in destination.iterdir() if path.suffix == ".safetensors"]
    assert sorted(weights) == ["ema.safetensors", "vae.safetensors"]
    assert (destination / "vae.safetensors").stat().st_size < source.stat().st_size


# ----------------------------------------------------------------------------------------------------------------
# Failures: a clear ValueError, and nothing left on disk
# ----------------------------------------------------------------------------------------------------------------


def _corrupt_ae(folder: Path) -> None:
    (folder / "ae.safetensors").write_bytes(b"\x00\x01 this is not a safetensors file")


def _drop_ema(folder: Path) -> None:
    (folder / "ema.safetensors").unlink()


def _drop_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def _no_extra_vit_layer(folder: Path) -> None:
    vit = json.loads((folder / "vit_config.json").read_text())
    vit["num_hidden_layers"] -= 1  # as if upstream did not drop a layer
    (folder / "vit_config.json").write_text(json.dumps(vit))


def _foreign_ae_key(folder: Path) -> None:
    ae = load_file(folder / "ae.safetensors")
    ae["encoder.extra_block.weight"] = torch.zeros(2)
    save_file(ae, folder / "ae.safetensors")


def _wrong_llm_width(folder: Path) -> None:
    llm = json.loads((folder / "llm_config.json").read_text())
    llm["intermediate_size"] *= 2
    (folder / "llm_config.json").write_text(json.dumps(llm))


def _missing_ema_key(folder: Path) -> None:
    ema = load_file(folder / "ema.safetensors")
    del ema["connector.fc2.weight"]
    save_file(ema, folder / "ema.safetensors")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_corrupt_ae, "ae.safetensors is not a readable safetensors file"),
        (_drop_ema, "missing ema.safetensors"),
        (_drop_tokenizer, "missing tokenizer.json"),
        (_no_extra_vit_layer, "upstream drops the last one"),
        (_foreign_ae_key, "not FLUX AE"),
        (_wrong_llm_width, "do not fit the configuration"),
        (_missing_ema_key, "lacks 1 weights"),
    ],
)
def test_failed_convert_raises_and_leaves_nothing(tiny, tmp_path, damage, message):
    source = write_snapshot(*tiny, tmp_path / "snapshot")
    damage(source)
    before = folder_entries(tmp_path)
    with pytest.raises(ValueError, match=message):
        convert_bagel(source, tmp_path / "out", config_overrides=tiny_overrides(tiny[0]))
    assert folder_entries(tmp_path) == before  # no destination, no staging folder


def test_failure_while_writing_leaves_nothing(tiny, snapshot, tmp_path, monkeypatch):
    import g2tr_hf.convert_bagel as module

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    links_before = os.stat(snapshot / "ema.safetensors").st_nlink
    monkeypatch.setattr(module, "save_file", disk_full)  # fails after the ema link was made in the staging folder
    with pytest.raises(OSError, match="No space"):
        convert_bagel(snapshot, tmp_path / "out", config_overrides=tiny_overrides(tiny[0]))
    assert folder_entries(tmp_path) == []
    assert os.stat(snapshot / "ema.safetensors").st_nlink == links_before  # the staging link went with the folder


@pytest.mark.parametrize("link", ["hardlink", "symlink"])
def test_hub_cache_snapshot_with_relative_symlinks(tiny, tmp_path, link):
    """In a Hub cache the snapshot's files are relative symbolic links into `blobs/`: the converted folder must
    reach the blob itself, not a copy of the (then dangling) relative link."""
    snapshot = write_snapshot(*tiny, tmp_path / "snapshots" / "0123abcd")
    blob = tmp_path / "blobs" / "ema-blob"
    blob.parent.mkdir()
    (snapshot / "ema.safetensors").rename(blob)
    (snapshot / "ema.safetensors").symlink_to(Path("..") / ".." / "blobs" / "ema-blob")
    destination = convert_bagel(snapshot, tmp_path / "out", link=link, config_overrides=tiny_overrides(tiny[0]))
    target = destination / "ema.safetensors"
    assert target.is_symlink() == (link == "symlink")
    assert os.stat(target).st_ino == os.stat(blob).st_ino
    assert AutoModelForImageTextToText.from_pretrained(destination).config.g2tr_ratio == 0.5


def test_hard_link_across_file_systems_falls_back_to_a_symbolic_link(tiny, snapshot, tmp_path, monkeypatch):
    def cross_device(source, target, *args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    destination = convert_bagel(snapshot, tmp_path / "out", config_overrides=tiny_overrides(tiny[0]))
    assert (destination / "ema.safetensors").is_symlink()
    assert (destination / "ema.safetensors").resolve() == (snapshot / "ema.safetensors").resolve()


def test_bad_arguments_are_clear_errors(tiny, snapshot, tmp_path):
    overrides = tiny_overrides(tiny[0])
    with pytest.raises(ValueError, match="`link`"):
        convert_bagel(snapshot, tmp_path / "out", link="move", config_overrides=overrides)
    with pytest.raises(ValueError, match="not G2TRBagelConfig fields"):
        convert_bagel(snapshot, tmp_path / "out", config_overrides={"g2tr_min_keap": 1})
    with pytest.raises(ValueError, match="come from the snapshot and `ratio`"):
        convert_bagel(snapshot, tmp_path / "out", config_overrides={**overrides, "g2tr_ratio": 0.3})
    with pytest.raises(ValueError, match="g2tr_ratio"):
        convert_bagel(snapshot, tmp_path / "out", ratio=1.5, config_overrides=overrides)
    with pytest.raises(ValueError, match="lie inside `source`"):
        convert_bagel(snapshot, snapshot / "converted", config_overrides=overrides)
    with pytest.raises(ValueError, match="not a folder"):
        convert_bagel(tmp_path / "nowhere", tmp_path / "out")
    assert folder_entries(tmp_path) == []


def test_overwrite(tiny, snapshot, tmp_path):
    overrides = tiny_overrides(tiny[0])
    destination = convert_bagel(snapshot, tmp_path / "out", ratio=0.5, config_overrides=overrides)
    with pytest.raises(ValueError, match="not empty"):
        convert_bagel(snapshot, destination, ratio=0.25, config_overrides=overrides)
    assert json.loads((destination / "config.json").read_text())["g2tr_ratio"] == 0.5  # untouched
    convert_bagel(snapshot, destination, ratio=0.25, overwrite=True, config_overrides=overrides)
    assert json.loads((destination / "config.json").read_text())["g2tr_ratio"] == 0.25
    assert folder_entries(tmp_path) == ["out"]
    assert (snapshot / "ema.safetensors").is_file()  # replacing the old link left the source alone


# ----------------------------------------------------------------------------------------------------------------
# g2tr-hf convert bagel
# ----------------------------------------------------------------------------------------------------------------


def test_cli_convert_bagel(tiny, snapshot, tmp_path, capsys):
    overrides = json.dumps(tiny_overrides(tiny[0]))
    destination = tmp_path / "cli-out"
    argv = ["convert", "bagel", str(snapshot), str(destination), "--ratio", "0.25", "--link", "symlink"]
    assert cli_main([*argv, "--config-overrides", overrides]) == 0
    assert "Converted" in capsys.readouterr().out
    assert (destination / "ema.safetensors").is_symlink()
    assert "g2tr_ratio=0.25" in (destination / "README.md").read_text()  # the source checkout's card
    loaded = AutoModelForImageTextToText.from_pretrained(destination)
    assert loaded.config.g2tr_ratio == 0.25 and loaded.config.g2tr_min_keep == tiny[0].config.g2tr_min_keep

    assert cli_main([*argv, "--config-overrides", overrides]) == 2  # exists, no --overwrite
    assert "not empty" in capsys.readouterr().err
    assert cli_main([*argv, "--config-overrides", overrides, "--overwrite", "--ratio", "1.0"]) == 0
    assert json.loads((destination / "config.json").read_text())["g2tr_ratio"] == 1.0
    assert cli_main(["convert", "bagel", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "not a folder" in capsys.readouterr().err and not (tmp_path / "x").exists()

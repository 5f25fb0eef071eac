"""Quantized loading of both models with transformers' own quantizers, on the CPU: bitsandbytes 8-bit and 4-bit
(NF4), torchao int8 and int4 weight-only.

The models declare what quantization must leave alone (`_keep_in_fp32_modules`: the VAE, BAGEL's latent maps, timestep
embedder and ViT patch embedding, InternVL-U's `special_token_embedding`, `lm_head`), and every quantizer adds that
list to the user's own skip list. So `from_pretrained(path, quantization_config=...)` alone must work, must leave
exactly those modules in floating point, and a user's skip list must add to it rather than replace it. With only the
LLM quantized, G2TR must keep the same tokens as the unquantized model (the keep set depends only on the ViT, the
projector and the VAE).

Widths are multiples of 64 here (the tiny fixtures of the other tests use 32): bitsandbytes' CPU 4-bit kernel packs
weights in blocks of 64 inputs and 32 outputs. torchao's `Int4WeightOnlyConfig` has no CPU kernel (torchao 0.18), so
int4 weight-only runs as `IntxWeightOnlyConfig(weight_dtype=torch.int4)`, the same weight format that torchao
runs on the CPU.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText
from transformers.quantizers.quantizers_utils import should_convert_module

from g2tr_hf import G2TRBagelPipeline, build_tiny
from g2tr_hf.compat import compute_dtype
from g2tr_hf.configuration_internvlu import build_tiny_internvlu_config
from g2tr_hf.modeling_bagel import G2TRBagelForConditionalGeneration
from g2tr_hf.modeling_internvlu import G2TRInternVLUForConditionalGeneration


pytest.importorskip("accelerate")

# What each model must never quantize (module prefixes of the head model), and everything except the LLM: a user's
# skip list that leaves only the decoder to quantize.
DECLARED = {
    "bagel": ["lm_head", "model.vae", "model.vae2llm", "model.llm2vae", "model.time_embedder",
              "model.vit_model.vision_model.embeddings.patch_embedding",
              *(f"model.vit_model.vision_model.encoder.layers.{i}.mlp.fc2" for i in range(2))],
    "internvlu": ["lm_head", "model.vae", "model.special_token_embedding"],
}  # fmt: skip
VISION_SIDE = {"bagel": ["model.vit_model", "model.connector"], "internvlu": ["model.vision_model", "model.mlp1"]}
VIT_ENCODER = {"bagel": "model.vit_model.vision_model.encoder", "internvlu": "model.vision_model.encoder"}
LLM = "model.language_model."

BACKENDS = ["bnb-8bit", "bnb-4bit", "torchao-int8", "torchao-int4"]


def quantization_config(backend: str, skip: list[str] | None = None):
    """The user-side config of `backend`, with `skip` as the user's own list of modules not to convert."""
    if backend.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
        from transformers import BitsAndBytesConfig

        bits = {"bnb-8bit": dict(load_in_8bit=True), "bnb-4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")}
        return BitsAndBytesConfig(**bits[backend], llm_int8_skip_modules=skip)
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup
    from transformers import TorchAoConfig

    if backend == "torchao-int8":
        quant_type = Int8WeightOnlyConfig()
    else:
        quant_type = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    return TorchAoConfig(quant_type, modules_to_not_convert=skip)


def build_model(name: str):
    """Tiny random model (ViT and LLM widths 64) and its processor."""
    _, processor = build_tiny(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "bagel":
            config = build_tiny("bagel")[0].config
            config.vit_config.hidden_size, config.vit_config.intermediate_size = 64, 128
            model = G2TRBagelForConditionalGeneration(config)
        else:
            vision = build_tiny_internvlu_config().vision_config.to_dict()
            vision.update(hidden_size=64, intermediate_size=128)
            model = G2TRInternVLUForConditionalGeneration(build_tiny_internvlu_config(vision_config=vision))
    return model.eval(), processor


def make_image(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def save(name: str, folder):
    """(name, processor, folder, inputs, unquantized outputs at ratio 0.5)."""
    model, processor = build_model(name)
    model.save_pretrained(folder)
    placeholder = processor.image_token if name == "bagel" else "<image>"
    prompt = f"<|im_start|>user\n{placeholder}What?<|im_end|>\n<|im_start|>assistant\n"
    inputs = dict(processor(text=[prompt], images=[make_image(0)], return_tensors="pt"))
    with torch.no_grad():
        reference = model(**inputs, g2tr_ratio=0.5)
    return name, processor, folder, inputs, reference


@pytest.fixture(scope="module", params=["bagel", "internvlu"])
def saved(request, tmp_path_factory):
    return save(request.param, tmp_path_factory.mktemp(f"quant-{request.param}"))


@pytest.fixture(scope="module")
def saved_bagel(tmp_path_factory):
    return save("bagel", tmp_path_factory.mktemp("quant-bagel-edit"))


def is_plain_float_linear(module: nn.Linear) -> bool:
    return type(module) is nn.Linear and type(module.weight) is nn.Parameter and module.weight.is_floating_point()


def linears(model: nn.Module, prefixes: list[str]) -> dict[str, nn.Module]:
    """Every linear layer (quantized or not: bitsandbytes' and torchao's stay `nn.Linear` subclasses) whose name starts
    with one of `prefixes`."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == p or name.startswith(p.rstrip(".") + ".") for p in prefixes)
    }


def assert_quantization_layout(model: nn.Module, name: str, unquantized: list[str]) -> None:
    kept = linears(model, unquantized)
    assert kept, "the declared modules hold linear layers"
    for module_name, module in kept.items():
        assert is_plain_float_linear(module), f"{module_name} was quantized: {type(module).__name__}"
        assert module.weight.dtype == torch.float32, module_name
    decoder = linears(model, [LLM])
    assert decoder and not any(is_plain_float_linear(m) for m in decoder.values()), "the LLM must be quantized"
    if name == "internvlu":
        # A convolution: no backend here quantizes it, and the ViT feeds it in its own dtype.
        assert model.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.float32
    for table in ("vit_pos_embed", "latent_pos_embed") if name == "bagel" else ():
        assert getattr(model.model, table).pos_embed.dtype == torch.float32


# --- without a backend: the declared names and the casting helper ------------------------------------------------


@pytest.mark.parametrize("name", ["bagel", "internvlu"])
def test_declared_names_reach_every_module_under_both_roots(name):
    """transformers matches the declared names against full module / parameter names; each must cover its whole
    subtree in the head model (where the backbone is `model.`) and in the backbone loaded alone, and nothing else."""
    model, _ = build_tiny(name)
    declared = sorted(model._keep_in_fp32_modules)
    for root, prefixes in ((model, DECLARED[name]), (model.model, [p.removeprefix("model.") for p in DECLARED[name]])):
        for full_name, _ in root.named_parameters():
            inside = any(full_name.startswith(prefix + ".") for prefix in prefixes)
            assert should_convert_module(full_name, declared) is not inside, full_name
            module_name = full_name.rsplit(".", 1)[0]
            assert should_convert_module(module_name, declared) is not inside, module_name


def test_compute_dtype_never_returns_a_quantized_weight_dtype():
    layer = nn.Linear(8, 4)
    assert compute_dtype(layer) == torch.float32
    # What bitsandbytes leaves in a layer: integer weights (int8 for 8-bit, uint8 for packed 4-bit), a float bias.
    layer.weight = nn.Parameter(torch.zeros(4, 8, dtype=torch.uint8), requires_grad=False)
    layer.bias = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    assert compute_dtype(layer) == torch.bfloat16
    layer.bias = None
    assert compute_dtype(layer) is None
    assert torch.ones(2).to(dtype=compute_dtype(layer)).dtype == torch.float32  # None casts nothing


def test_fp16_load_keeps_the_declared_modules_in_fp32(saved):
    """`_keep_in_fp32_modules` upcasts those modules when a model is loaded in fp16: the forward must still run."""
    name, processor, folder, inputs, reference = saved
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float16).eval()
    assert all(module.weight.dtype == torch.float32 for module in linears(model, DECLARED[name]).values())
    assert all(module.weight.dtype == torch.float16 for module in linears(model, [LLM]).values())
    with torch.no_grad():
        outputs = model(**inputs, g2tr_ratio=0.5)
    assert outputs.logits.dtype == torch.float32  # the fp32 head
    assert torch.isfinite(outputs.logits).all()
    assert outputs.kept_token_mask.sum() == reference.kept_token_mask.sum()
    if name == "bagel":  # editing crosses every declared module: VAE, vae2llm, time embedder, llm2vae
        assert torch.isfinite(edit(model, processor)).all()


def edit(model, processor) -> torch.Tensor:
    """A 2-step BAGEL edit of a 64 px image at ratio 0.5: [3, 64, 64]."""
    pipe = G2TRBagelPipeline(model=model, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    call = dict(prompt="make it red", image=make_image(1), num_inference_steps=2, g2tr_ratio=0.5)
    return pipe(**call, generator=generator, output_type="pt").images[0]


# --- each backend ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantization_config_alone(saved, backend):
    """`from_pretrained(path, quantization_config=...)` with nothing else: loads, quantizes the LLM and the ViT, leaves
    the declared modules in floating point, and runs the reduced forward and generate."""
    name, _, folder, inputs, reference = saved
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=quantization_config(backend)).eval()
    assert_quantization_layout(model, name, DECLARED[name])
    declared = linears(model, DECLARED[name])
    vit = [module for key, module in linears(model, [VIT_ENCODER[name]]).items() if key not in declared]
    assert vit and not any(is_plain_float_linear(module) for module in vit), "the ViT must be quantized"
    with torch.no_grad():
        outputs = model(**inputs, g2tr_ratio=0.5)
        generated = model.generate(**inputs, g2tr_ratio=0.5, do_sample=False, max_new_tokens=2)
    assert outputs.logits.shape == reference.logits.shape
    assert torch.isfinite(outputs.logits).all()
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_llm_quantized_keeps_the_same_tokens(saved, backend, record_property):
    """A user's skip list (here: the whole vision side) adds to the declared one; with only the LLM quantized the
    G2TR keep set is exactly the unquantized model's."""
    name, _, folder, inputs, reference = saved
    config = quantization_config(backend, skip=VISION_SIDE[name])
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config).eval()
    assert_quantization_layout(model, name, DECLARED[name] + VISION_SIDE[name])
    with torch.no_grad():
        outputs = model(**inputs, g2tr_ratio=0.5)
    assert torch.equal(outputs.kept_token_mask, reference.kept_token_mask)
    assert torch.isfinite(outputs.logits).all()
    agreement = (outputs.logits.argmax(-1) == reference.logits.argmax(-1)).float().mean().item()
    record_property("top1_agreement", agreement)  # random tiny weights: reported, not asserted


@pytest.mark.parametrize("backend", BACKENDS)
def test_bagel_editing_quantized(saved_bagel, backend):
    """Editing runs the generation side (VAE, `vae2llm`, timestep embedder, `llm2vae`) around a quantized decoder."""
    _, processor, folder, _, _ = saved_bagel
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=quantization_config(backend))
    image = edit(model.eval(), processor)
    assert image.shape == (3, 64, 64) and torch.isfinite(image).all()

"""Weight memory of BAGEL-7B-MoT and InternVL-U under 8-bit and 4-bit weight quantization, and what the quantized tiny
models keep and answer.

A. Analytic, at the real shapes: both models are built on the meta device (no weights), every parameter is assigned to
   a component, and each linear weight that transformers' quantizers would convert (the same `should_convert_module`
   test, against the models' `_keep_in_fp32_modules`) is counted at the backend's bytes per weight, the rest in bf16.
   Bytes per quantized weight, with the per-block constants the backends store:
     bnb 8-bit (LLM.int8)        1 byte + one fp32 scale per output row
     torchao int8 weight-only    1 byte + one bf16 scale per output row
     bnb 4-bit NF4, double quant 0.5 byte + an 8-bit absmax per 64 weights + an fp32 constant per 256 absmaxes
     torchao int4, group 128     0.5 byte + a bf16 scale and a bf16 zero point per 128 weights
   Activations, the KV cache and framework overhead come on top (section A prints the KV cache of one request).

B. Measured on the CPU (needs bitsandbytes and torchao): the tiny random models of `tests/test_quantization.py`,
   quantized with only the LLM converted (a user skip list adds the vision side) and with the defaults; G2TR keep set
   against the unquantized model and top-1 agreement of the logits at ratio 0.5. Random tiny weights: the agreement
   numbers say the pipeline works, not how a real checkpoint degrades.

    python benchmarks/bench_quantization.py [--skip-measured]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from g2tr_hf.configuration_bagel import G2TRBagelConfig
from g2tr_hf.configuration_internvlu import QWEN_IMAGE_VAE_CONFIG, G2TRInternVLUConfig
from g2tr_hf.modeling_bagel import G2TRBagelForConditionalGeneration
from g2tr_hf.modeling_internvlu import G2TRInternVLUForConditionalGeneration
from g2tr_hf.profiling import kv_cache_bytes


GIB = 1024**3

# Bytes of one quantized weight matrix [out, in] (see the module docstring).
FORMATS = {
    "bf16": lambda out, inp: 2.0 * out * inp,
    "int8 (bnb)": lambda out, inp: out * inp + 4.0 * out,
    "int8 (torchao)": lambda out, inp: out * inp + 2.0 * out,
    "nf4 (bnb, double quant)": lambda out, inp: 0.5 * out * inp + out * inp / 64 + 4.0 * out * inp / (64 * 256),
    "int4 (torchao, g128)": lambda out, inp: 0.5 * out * inp + 4.0 * out * inp / 128,
}

# Component of a parameter: the first matching prefix of its full name.
COMPONENTS = {
    "bagel": [
        ("model.language_model.layers", "LLM decoder layers (und + gen experts)"),
        ("model.language_model.embed_tokens", "token embedding"),
        ("lm_head", "lm_head"),
        ("model.vit_model", "SigLIP ViT"),
        ("model.connector", "connector"),
        ("model.vae.", "VAE (FLUX AE)"),
        ("model.", "vae2llm, llm2vae, time embedder, sin-cos tables, norms"),
    ],
    "internvlu": [
        ("model.language_model.layers", "LLM decoder layers"),
        ("model.language_model.embed_tokens", "token embedding"),
        ("lm_head", "lm_head"),
        ("model.vision_model", "InternViT"),
        ("model.mlp1", "mlp1"),
        ("model.vae.", "VAE (Qwen-Image)"),
        ("model.", "special_token_embedding, norms"),
    ],
}


def meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        if name == "bagel":
            return G2TRBagelForConditionalGeneration(G2TRBagelConfig())
        return G2TRInternVLUForConditionalGeneration(G2TRInternVLUConfig(vae_config=QWEN_IMAGE_VAE_CONFIG))


def component_of(name: str, param_name: str) -> str:
    return next(label for prefix, label in COMPONENTS[name] if param_name.startswith(prefix))


def weight_memory(name: str) -> tuple[dict[str, dict[str, float]], dict[str, tuple[int, int]]]:
    """Per component: bytes under each format, and (parameters, of which quantizable)."""
    model = meta_model(name)
    skip = sorted(model._keep_in_fp32_modules)
    modules = dict(model.named_modules())
    table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for param_name, param in model.named_parameters():
        module_name, leaf = param_name.rsplit(".", 1) if "." in param_name else ("", param_name)
        component = component_of(name, param_name)
        is_linear_weight = isinstance(modules[module_name], nn.Linear) and leaf == "weight"
        quantized = is_linear_weight and should_convert_module(module_name, skip)
        counts[component][0] += param.numel()
        counts[component][1] += param.numel() if quantized else 0
        for fmt, size in FORMATS.items():
            table[component][fmt] += size(*param.shape) if quantized else 2.0 * param.numel()
    return table, {key: tuple(value) for key, value in counts.items()}


def print_analytic(name: str, title: str) -> None:
    table, counts = weight_memory(name)
    print(f"\n## A. {title}: weight memory at the real shapes (GiB; unquantized parts in bf16)\n")
    print("| component | parameters | quantized | " + " | ".join(FORMATS) + " |")
    print("|---|---|---|" + "---|" * len(FORMATS))
    totals = defaultdict(float)
    for component, (total, quantizable) in counts.items():
        cells = []
        for fmt in FORMATS:
            totals[fmt] += table[component][fmt]
            cells.append(f"{table[component][fmt] / GIB:.2f}")
        print(f"| {component} | {total / 1e9:.3f} B | {quantizable / max(total, 1):.0%} | " + " | ".join(cells) + " |")
    params = sum(total for total, _ in counts.values())
    print(f"| **total** | {params / 1e9:.2f} B | | " + " | ".join(f"**{totals[f] / GIB:.2f}**" for f in FORMATS) + " |")


def print_kv_cache() -> None:
    from g2tr_hf.profiling import BAGEL_7B_LLM

    print("\n## A. KV cache of one BAGEL request (bf16): 1024x1024 image (4900 ViT tokens) + 35 text tokens\n")
    for ratio, entries in ((1.0, 4900 + 35), (0.5, 2450 + 35)):
        print(f"- ratio {ratio}: {entries} entries, {kv_cache_bytes(entries, BAGEL_7B_LLM) / 2**20:.0f} MiB")


def print_measured() -> None:
    import importlib.util

    missing = [name for name in ("bitsandbytes", "torchao") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"\n## B. Skipped: install {' and '.join(missing)} to measure the quantized tiny models.")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tempfile

    from test_quantization import BACKENDS, VISION_SIDE, quantization_config, save
    from transformers import AutoModelForImageTextToText

    print("\n## B. Measured, tiny random models on the CPU, ratio 0.5 (top-1: agreement with the unquantized logits)\n")
    columns = ["only the LLM: keep set equal", "only the LLM: top-1", "defaults: keep set equal", "defaults: top-1"]
    print("| model | backend | " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|")
    for name in ("bagel", "internvlu"):
        with tempfile.TemporaryDirectory() as folder:
            _, _, folder, inputs, reference = save(name, folder)
            for backend in BACKENDS:
                cells = []
                for skip in (VISION_SIDE[name], None):
                    config = quantization_config(backend, skip=skip)
                    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config).eval()
                    with torch.no_grad():
                        out = model(**inputs, g2tr_ratio=0.5)
                    same = torch.equal(out.kept_token_mask, reference.kept_token_mask)
                    top1 = (out.logits.argmax(-1) == reference.logits.argmax(-1)).float().mean().item()
                    cells += ["yes" if same else "no", f"{top1:.3f}"]
                print(f"| {name} | {backend} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-measured", action="store_true", help="print only the analytic tables")
    args = parser.parse_args()
    print_analytic("bagel", "BAGEL-7B-MoT")
    print_kv_cache()
    print_analytic("internvlu", "InternVL-U")
    if not args.skip_measured:
        print_measured()


if __name__ == "__main__":
    main()

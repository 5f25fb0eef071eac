"""The `g2tr-hf` command line. Not shipped to the Hub."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence


logger = logging.getLogger("g2tr_hf.cli")


def _demo(args: argparse.Namespace) -> int:
    from .demo import VIT_GRID, run_demo
    from .visualization import draw_kept_tokens

    report = run_demo(ratio=args.ratio, min_keep=args.min_keep, seed=args.seed)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    draw_kept_tokens(report.image, (VIT_GRID, VIT_GRID), report.result.keep).save(output)

    full_kv, reduced_kv = report.kv_bytes
    full_flops, reduced_flops = report.prefill_flops
    print("G2TR demo: reduction core on a synthetic 1024x1024 scene (random ViT/VAE-like features, no weights)")
    print(f"  ViT tokens in / kept:        {report.tokens_in} / {report.tokens_kept}  (ratio {args.ratio})")
    print(f"  reduction time (CPU):        {report.reduction_seconds * 1e3:.1f} ms")
    print("  At BAGEL-7B-MoT LLM shapes, image block + 30-token question:")
    print(f"    KV entries:                {report.kv_entries[0]} -> {report.kv_entries[1]}"
          f"  ({full_kv / 2**20:.1f} MiB -> {reduced_kv / 2**20:.1f} MiB, {full_kv / reduced_kv:.2f}x)")
    print(f"    prefill FLOPs:             {full_flops / 1e12:.2f} T -> {reduced_flops / 1e12:.2f} T"
          f"  ({full_flops / reduced_flops:.2f}x, {100 * report.compute_saved:.1f}% saved)")
    print(f"  kept tokens drawn to:        {output}")
    _understanding_demo(args)
    return 0


def _understanding_demo(args: argparse.Namespace) -> None:
    """A real understanding request, unreduced and reduced: the tiny built-in BAGEL unless --model is given."""
    from PIL import Image

    from .demo import run_understanding, synthetic_scene

    if args.model:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        source = args.model
    else:
        from .tiny import build_tiny

        model, processor = build_tiny("bagel")
        source = "the tiny built-in BAGEL (random weights: its answers are meaningless)"
    image = Image.open(args.image).convert("RGB") if args.image else synthetic_scene()
    report = run_understanding(model, processor, image, args.question, args.ratio, args.max_new_tokens)
    accounting, seconds = report.profile.accounting, report.profile.prefill_seconds
    print(f"Understanding request through {source}:")
    print(f"  ViT tokens in / kept:        {sum(accounting.image_tokens)} / {sum(accounting.kept_tokens)}")
    print(f"  KV cache after prefill:      {accounting.kv_entries[0]} -> {accounting.kv_entries[1]} entries"
          f" ({accounting.kv_ratio:.2f}x)")
    print(f"  LLM prefill FLOPs:           {accounting.prefill_flops[0] / 1e9:.3g} G -> "
          f"{accounting.prefill_flops[1] / 1e9:.3g} G, plus {report.profile.anchor_encode_flops / 1e9:.3g} G "
          "for the anchor VAE encode")
    print(f"  prefill time:                {seconds[0]:.3f} s -> {seconds[1]:.3f} s")
    print(f"  answer at ratio 1.0:         {report.answers[0]!r}")
    print(f"  answer at ratio {args.ratio}:         {report.answers[1]!r}")


def _default_model_card(name: str) -> Path | None:
    """`model_cards/<name>.md` when running from a source checkout (src/g2tr_hf/../../model_cards); None otherwise."""
    card = Path(__file__).resolve().parents[2] / "model_cards" / f"{name}.md"
    return card if card.is_file() else None


def _json_object(value: str) -> dict:
    """A JSON object given inline (`{...}`) or as the path of a .json file."""
    try:
        parsed = json.loads(value if value.lstrip().startswith("{") else Path(value).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object or a .json file, got {value!r} ({error})")
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def _convert_bagel(args: argparse.Namespace) -> int:
    from .convert_bagel import convert_bagel

    card = _default_model_card("bagel")
    if card is None:
        logger.info("model_cards/bagel.md not found (installed package): the folder gets no README.md")
    convert_bagel(
        args.source,
        args.destination,
        ratio=args.ratio,
        link=args.link,
        model_card=card,
        overwrite=args.overwrite,
        config_overrides=args.config_overrides,
    )
    print(f"Converted {args.source} -> {args.destination} (g2tr_ratio={args.ratio})")
    return 0


TINY_EXPORT_CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [custom_code, g2tr, token-reduction, multimodal, tiny-random]
---

# Tiny random BAGEL with G2TR (for tests)

Random weights, built by `g2tr_hf.build_tiny("bagel")`: it exercises the remote-code path
(`trust_remote_code=True`) and the pipeline, and its answers are meaningless.
"""


def _export(args: argparse.Namespace) -> int:
    from .hub import export

    if args.model == "tiny-bagel":
        from .tiny import build_tiny

        model, processor = build_tiny("bagel")
        card = TINY_EXPORT_CARD
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        readme = Path(args.model) / "README.md"
        card = readme.read_text(encoding="utf-8") if readme.is_file() else None
    if args.ratio is not None:
        model.config.g2tr_ratio = args.ratio
        model.config.validate_g2tr()
    export(model, processor, args.destination, model_card=card, overwrite=args.overwrite)
    print(f"Exported {args.model} -> {args.destination}")
    return 0


def _model_subcommands(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    """The per-model sub-commands of `g2tr-hf <name> <model> ...`, creating `<name>` on first use so that several
    models (convert bagel, convert internvlu, ...) can register under one command."""
    parser = commands.choices.get(name) or commands.add_parser(name, help=help_text)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="model", required=True)


def _add_convert_arguments(parser: argparse.ArgumentParser, source_help: str, weights: str) -> None:
    """The arguments every `g2tr-hf convert <model>` takes."""
    parser.add_argument("source", help=source_help)
    parser.add_argument("destination", help="folder to write (atomically)")
    parser.add_argument("--ratio", type=float, default=0.5, help="g2tr_ratio stored in config.json (default 0.5)")
    parser.add_argument(
        "--link",
        choices=("hardlink", "symlink", "copy"),
        default="hardlink",
        help=f"how {weights} reach the folder (default hardlink; symlink if that fails)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")


def _add_bagel_file_commands(commands: argparse._SubParsersAction) -> None:
    """`g2tr-hf convert bagel SRC DST` and `g2tr-hf export --model PATH_OR_tiny-bagel DST`."""
    convert = _model_subcommands(commands, "convert", "convert an official checkpoint into a loadable folder")
    bagel = convert.add_parser("bagel", help="a ByteDance-Seed/BAGEL-7B-MoT snapshot folder")
    _add_convert_arguments(
        bagel, "snapshot folder (llm_config.json, vit_config.json, ema/ae.safetensors, ...)", "ema.safetensors"
    )
    bagel.add_argument(
        "--config-overrides",
        type=_json_object,
        default=None,
        help="JSON object (or .json file) of config fields the snapshot lacks, e.g. '{\"g2tr_min_keep\": 16}'",
    )
    bagel.set_defaults(run=_convert_bagel)

    export = commands.add_parser("export", help="write a Hub-ready folder that loads with trust_remote_code=True")
    export.add_argument("destination", help="folder to write (atomically)")
    export.add_argument("--model", required=True, help="a g2tr_hf model folder, or tiny-bagel (random, for tests)")
    export.add_argument("--ratio", type=float, default=None, help="g2tr_ratio to store (default: the model's)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    export.set_defaults(run=_export)


def _convert_internvlu(args: argparse.Namespace) -> int:
    from .convert_internvlu import convert_internvlu

    card = _default_model_card("internvlu")
    if card is None:
        logger.info("model_cards/internvlu.md not found (installed package): the folder gets no README.md")
    convert_internvlu(
        args.source, args.destination, ratio=args.ratio, link=args.link, model_card=card, overwrite=args.overwrite
    )
    print(f"Converted {args.source} -> {args.destination} (g2tr_ratio={args.ratio})")
    return 0


def _add_internvlu_file_commands(commands: argparse._SubParsersAction) -> None:
    """`g2tr-hf convert internvlu SRC DST`."""
    convert = _model_subcommands(commands, "convert", "convert an official checkpoint into a loadable folder")
    internvlu = convert.add_parser("internvlu", help="an InternVL-U snapshot folder (vlm/, vae/, processor/, ...)")
    _add_convert_arguments(internvlu, "snapshot folder with the official sub-folders", "the vlm/ weights")
    internvlu.set_defaults(run=_convert_internvlu)


def _bagel_pipeline(args: argparse.Namespace):
    """The BAGEL editing / generation pipeline of `--model`, or of the tiny built-in BAGEL; and a description."""
    from .pipeline_bagel import G2TRBagelPipeline

    if args.model:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(
            args.model, trust_remote_code=True, dtype=args.dtype
        ).eval()
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        source = args.model
    else:
        from .tiny import build_tiny

        model, processor = build_tiny("bagel")
        source = "the tiny built-in BAGEL (no --model given; random weights, so the image is noise)"
    return G2TRBagelPipeline(model=model, processor=processor, device=args.device), source


def _image_generation_settings(args: argparse.Namespace) -> dict:
    """The sampler options shared by `edit` and `generate` (None = the task's recommended value)."""
    return dict(
        num_inference_steps=args.steps,
        cfg_text_scale=args.cfg_text_scale,
        cfg_img_scale=args.cfg_img_scale,
        cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
        cfg_renorm_type=args.cfg_renorm_type,
        cfg_renorm_min=args.cfg_renorm_min,
        timestep_shift=args.timestep_shift,
        think=args.think,
    )


def _save_generated(args: argparse.Namespace, output, source: str, what: str, seconds: float) -> int:
    destination = Path(args.output)
    destination.parent.mkdir(parents=True, exist_ok=True)
    image = output.images[0]
    image.save(destination)
    print(f"{what} through {source}:")
    if output.thoughts[0] is not None:
        print(f"  plan (think mode):           {output.thoughts[0]!r}")
    print(f"  {args.steps - 1} denoising steps in {seconds:.2f} s; {image.width}x{image.height} image written to "
          f"{destination}")
    return 0


def _edit(args: argparse.Namespace) -> int:
    import time

    import torch
    from PIL import Image

    pipe, source = _bagel_pipeline(args)
    try:
        image = Image.open(args.image)
        image.load()
    except OSError as error:
        raise ValueError(f"`--image`: cannot read {args.image!r}: {error}") from None
    start = time.perf_counter()
    output = pipe(
        prompt=args.prompt,
        image=image,
        g2tr_ratio=args.ratio,
        generator=torch.Generator().manual_seed(args.seed),
        **_image_generation_settings(args),
    )
    what = f"Edit of {args.image} (g2tr_ratio {args.ratio if args.ratio is not None else 'of the model'})"
    return _save_generated(args, output, source, what, time.perf_counter() - start)


def _generate(args: argparse.Namespace) -> int:
    import time

    import torch

    pipe, source = _bagel_pipeline(args)
    start = time.perf_counter()
    output = pipe(
        prompt=args.prompt,
        height=args.height,
        width=args.width,
        generator=torch.Generator().manual_seed(args.seed),
        **_image_generation_settings(args),
    )
    return _save_generated(args, output, source, "Text-to-image", time.perf_counter() - start)


def _add_image_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a g2tr_hf BAGEL folder or Hub repo (default: the tiny built-in BAGEL)")
    parser.add_argument("--prompt", required=True, help="the instruction")
    parser.add_argument("--steps", type=int, default=50, help="points on the flow schedule (default 50: 49 steps)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    parser.add_argument("--cfg-text-scale", type=float, default=None, help="text guidance (default: the preset)")
    parser.add_argument("--cfg-img-scale", type=float, default=None, help="image guidance (default: the preset)")
    parser.add_argument(
        "--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None, help="guidance on for LO < t <= HI"
    )
    parser.add_argument(
        "--cfg-renorm-type", choices=("global", "channel", "text_channel"), default=None, help="CFG-renorm variant"
    )
    parser.add_argument("--cfg-renorm-min", type=float, default=None, help="lower clamp of the renorm factor")
    parser.add_argument("--timestep-shift", type=float, default=3.0, help="schedule shift (default 3.0)")
    parser.add_argument("--think", action="store_true", help="let the model write a plan first (think mode)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: the first GPU if any)")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="weights dtype for --model"
    )


def _add_bagel_image_commands(commands: argparse._SubParsersAction) -> None:
    """`g2tr-hf edit --image IN --prompt ... -o OUT` and `g2tr-hf generate --prompt ... -o OUT` (BAGEL pipeline)."""
    edit = commands.add_parser("edit", help="edit an image with BAGEL (its ViT tokens reduced by G2TR)")
    edit.add_argument("--image", required=True, help="the input image")
    edit.add_argument("--ratio", type=float, default=0.5, help="G2TR keep ratio of the input's ViT tokens (0.5)")
    edit.add_argument("-o", "--output", default="g2tr_edit.png", help="where to write the PNG")
    _add_image_generation_options(edit)
    edit.set_defaults(run=_edit)

    generate = commands.add_parser("generate", help="text-to-image with BAGEL")
    generate.add_argument("--height", type=int, default=None, help="multiple of 16 (default 1024, or the model's max)")
    generate.add_argument("--width", type=int, default=None, help="multiple of 16 (default 1024, or the model's max)")
    generate.add_argument("-o", "--output", default="g2tr_generate.png", help="where to write the PNG")
    _add_image_generation_options(generate)
    generate.set_defaults(run=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2tr-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run G2TR on the built-in example (no download)")
    demo.add_argument("--ratio", type=float, default=0.5, help="keep ratio in (0, 1] (default 0.5)")
    demo.add_argument("--min-keep", type=int, default=32, help="minimum kept tokens per image (default 32)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic features")
    demo.add_argument("-o", "--output", default="g2tr_demo_kept_tokens.png", help="where to write the PNG")
    demo.add_argument("--model", help="a g2tr_hf model folder or Hub repo (default: the tiny built-in BAGEL)")
    demo.add_argument("--image", help="image to ask about (default: the synthetic scene)")
    demo.add_argument("--question", default="Describe this image.", help="the question")
    demo.add_argument("--max-new-tokens", type=int, default=16, help="answer length (default 16)")
    demo.set_defaults(run=_demo)
    _add_bagel_file_commands(commands)
    _add_internvlu_file_commands(commands)
    _add_bagel_image_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"g2tr-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

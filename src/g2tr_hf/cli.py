"""G2TR visual token reduction for BAGEL and InternVL-U: a demo that needs no download, checkpoint conversion,
Hub-ready export, and BAGEL image editing and text-to-image. `g2tr-hf COMMAND --help` describes each command.
"""

# This module (not shipped with exported folders) imports only the standard library at module level, so that the
# parser can be built and `--help` answered without torch, transformers, diffusers or PIL; every heavy import sits
# inside the command that needs it. Note that the console script `g2tr_hf.cli:main` still imports the package
# `g2tr_hf/__init__.py` (transformers and the models) before this module runs.

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence


logger = logging.getLogger("g2tr_hf.cli")

# `--model` names of the tiny random models (`g2tr_hf.tiny.TINY_MODELS`, which imports torch, hence the copy).
TINY_MODEL_NAMES = {"tiny-bagel": "bagel", "tiny-internvlu": "internvlu"}
TINY_MODEL_TYPES = {"bagel": "g2tr_bagel", "internvlu": "g2tr_internvl_u"}

# The `model_type`s this package implements; after `import g2tr_hf` their Auto classes are registered, so folders
# and repos of these types load with the installed classes and never run the code they ship.
OWN_MODEL_TYPES = {"g2tr_bagel": "BAGEL", "g2tr_internvl_u": "InternVL-U"}

# A Hub repo id (`owner/name`). Anything else that is not a local folder or a tiny name is refused without asking
# the Hub, so that a typo in a path fails at once instead of after the Hub's connection timeouts.
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

DEBUG_HELP = "on an error, print the full message and traceback (not just one line)"


class CLIError(Exception):
    """A failure the user can fix: printed as one line `g2tr-hf COMMAND: error: MESSAGE`, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------------------------------- model loading


@dataclass(frozen=True)
class ModelSource:
    """Where `--model` points, found without loading anything: a tiny built-in model, a local folder or a Hub repo."""

    name: str  # as given on the command line
    kind: str  # "tiny", "folder" or "hub"
    model_type: str | None  # config.json's `model_type`

    @property
    def location(self) -> str:
        """What `from_pretrained` gets: the folder's path (`~` expanded) or the repo id."""
        return str(Path(self.name).expanduser()) if self.kind == "folder" else self.name

    @property
    def label(self) -> str:
        """How the reports name the model."""
        if self.kind == "tiny":
            return f"the tiny built-in {OWN_MODEL_TYPES[self.model_type]} (random weights: its outputs are meaningless)"
        return self.name


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an error message (transformers' loading errors run to dozens of lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _config_model_type(config_file: Path, name: str) -> str | None:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CLIError(f"`--model`: cannot read the config.json of {name!r} ({_first_line(error)})") from None
    if not isinstance(config, dict):
        raise CLIError(f"`--model`: the config.json of {name!r} is not a JSON object")
    return config.get("model_type")


def _hub_config_model_type(repo_id: str) -> str | None:
    """The `model_type` of a Hub repo, from its config.json alone (no weights are fetched before the checks)."""
    try:
        from huggingface_hub import hf_hub_download

        config_file = hf_hub_download(repo_id, "config.json")
    except Exception as error:  # offline, unknown repo, gated, network down: all end the command the same way
        raise CLIError(
            f"`--model`: {repo_id!r} is not a local folder, and its config.json could not be fetched from the "
            f"Hugging Face Hub ({type(error).__name__}: {_first_line(error)})"
        ) from None
    return _config_model_type(Path(config_file), repo_id)


def resolve_model(name: str) -> ModelSource:
    """Check `--model` before anything heavy is loaded: a tiny name, a folder with a config.json, or `owner/name`."""
    if name in TINY_MODEL_NAMES:
        return ModelSource(name, "tiny", TINY_MODEL_TYPES[TINY_MODEL_NAMES[name]])
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CLIError(
                f"`--model`: folder {name!r} has no config.json; expected a model folder written by "
                "`g2tr-hf convert` or `g2tr-hf export`"
            )
        return ModelSource(name, "folder", _config_model_type(path / "config.json", name))
    expected = (
        f"expected a model folder (written by g2tr-hf convert or export), {_tiny_names()}, or a Hub repo id "
        "(owner/name)"
    )
    if path.exists():
        raise CLIError(f"`--model`: {name!r} is a file; {expected}")
    if HUB_REPO_ID.match(name):
        return ModelSource(name, "hub", _hub_config_model_type(name))
    if any(separator in name for separator in ("/", "\\")) or name.startswith((".", "~")):
        raise CLIError(f"`--model`: no folder {name!r}; {expected}")
    raise CLIError(f"`--model`: {name!r} is neither a folder nor a tiny model name; {expected}")


def _tiny_names() -> str:
    return ", ".join(TINY_MODEL_NAMES)


def _require_model_type(source: ModelSource, command: str, model_type: str) -> None:
    """Refuse a model of another kind before loading it (`edit` on InternVL-U used to end in an AttributeError)."""
    if source.model_type == model_type:
        return
    kind = f" ({OWN_MODEL_TYPES[source.model_type]})" if source.model_type in OWN_MODEL_TYPES else ""
    raise CLIError(
        f"`--model`: `g2tr-hf {command}` needs a {OWN_MODEL_TYPES[model_type]} model (model_type {model_type!r}); "
        f"{source.name!r} has model_type {source.model_type!r}{kind}"
    )


def _trust_remote_code(source: ModelSource, trusted: bool) -> bool:
    """Our own model types load with the installed classes; anything else runs the code it ships, which only an
    explicit `--trust-remote-code` allows."""
    if source.model_type in OWN_MODEL_TYPES:
        return False
    if not trusted:
        raise CLIError(
            f"`--model`: {source.name!r} has model_type {source.model_type!r}, which is not a g2tr_hf model "
            f"({', '.join(OWN_MODEL_TYPES)}); loading it would run the Python code it ships: pass "
            "--trust-remote-code if you trust that code"
        )
    return True


def load_model(source: ModelSource, trusted: bool = False, **model_kwargs):
    """`(model, processor)` of a resolved `--model`, in eval mode."""
    if source.kind == "tiny":
        from .tiny import build_tiny

        return build_tiny(TINY_MODEL_NAMES[source.name])
    trust_remote_code = _trust_remote_code(source, trusted)
    import g2tr_hf  # noqa: F401  (registers our Auto classes: what makes trust_remote_code=False load our types)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source.location, trust_remote_code=trust_remote_code, **model_kwargs
        )
        processor = AutoProcessor.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as error:
        raise CLIError(f"`--model`: cannot load {source.name!r}: {_first_line(error)}") from None
    return model.eval(), processor


def _read_image(path: str, option: str = "--image"):
    """Open and decode an image file up front, so that a bad path fails before any work or output."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError) as error:
        raise CLIError(f"`{option}`: cannot read the image {path!r} ({_first_line(error)})") from None


# ------------------------------------------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from .demo import VIT_GRID, run_demo, synthetic_scene
    from .visualization import draw_kept_tokens

    # Everything that can fail on a bad argument runs before the first line of the report is printed.
    image = _read_image(args.image).convert("RGB") if args.image else synthetic_scene()
    report = run_demo(ratio=args.ratio, min_keep=args.min_keep, seed=args.seed)  # checks --ratio / --min-keep
    source = resolve_model(args.model) if args.model else resolve_model("tiny-bagel")
    model, processor = load_model(source, args.trust_remote_code)
    if args.anchor_scale is not None:
        model.config.g2tr_anchor_scale = args.anchor_scale
        model.config.validate_g2tr()  # names --anchor-scale's config field when the value is out of range
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    draw_kept_tokens(report.image, (VIT_GRID, VIT_GRID), report.result.keep).save(output)

    _print_reduction_report(report, args.ratio, output)
    _understanding_demo(args, model, processor, source, image, report)
    return 0


def _print_reduction_report(report, ratio: float, output: Path) -> None:
    from .demo import QUESTION_TOKENS

    full_kv, reduced_kv = report.kv_bytes
    full_flops, reduced_flops = report.prefill_flops
    anchor = report.anchor_encode_flops
    print("G2TR demo: the reduction on a synthetic 1024x1024 scene (random ViT/VAE-like features, no weights)")
    print(f"  ViT tokens in / kept:        {report.tokens_in} / {report.tokens_kept}  (ratio {ratio})")
    print(f"  reduction time (CPU):        {report.reduction_seconds * 1e3:.1f} ms")
    print(f"  What this saves at BAGEL-7B-MoT shapes (analytic), one 1024x1024 image + a {QUESTION_TOKENS}-token "
          "question:")
    print(f"    KV entries after prefill:  {report.kv_entries[0]} -> {report.kv_entries[1]}"
          f"  ({full_kv / 2**20:.1f} MiB -> {reduced_kv / 2**20:.1f} MiB in bf16, {full_kv / reduced_kv:.2f}x)")
    print("                               counted: the image block (its ViT tokens + 2 markers), the question"
          f" ({QUESTION_TOKENS} tokens")
    print("                               + <|im_start|> <|im_end|>) and the <|im_start|> that opens the answer")
    print(f"    LLM prefill FLOPs:         {full_flops / 1e12:.2f} T -> {reduced_flops / 1e12:.2f} T"
          f"  ({full_flops / reduced_flops:.2f}x, {100 * report.compute_saved:.1f}% saved)")
    print(f"    + anchor VAE encode:       {full_flops / 1e12:.2f} T -> {(reduced_flops + anchor) / 1e12:.2f} T"
          f"  ({full_flops / (reduced_flops + anchor):.2f}x; the reduced side also encodes the image:"
          f" {anchor / 1e12:.2f} T)")
    print(f"  kept tokens drawn to:        {output}")


def _understanding_demo(args: argparse.Namespace, model, processor, source: ModelSource, image, report) -> None:
    """A real understanding request, unreduced and reduced, through `model` (the tiny built-in BAGEL by default)."""
    from .demo import prefill_time_note, readable_answer, run_understanding

    understanding = run_understanding(model, processor, image, args.question, args.ratio, args.max_new_tokens)
    profile = understanding.profile
    accounting, seconds = profile.accounting, profile.prefill_seconds
    print(f"Understanding request through {source.label}:")
    print(f"  ViT tokens in / kept:        {sum(accounting.image_tokens)} / {sum(accounting.kept_tokens)}")
    print(f"  KV cache after prefill:      {accounting.kv_entries[0]} -> {accounting.kv_entries[1]} entries"
          f" ({accounting.kv_ratio:.2f}x; the whole prompt, image block and text)")
    print(f"  LLM prefill FLOPs:           {accounting.prefill_flops[0] / 1e9:.3g} G -> "
          f"{accounting.prefill_flops[1] / 1e9:.3g} G, plus {profile.anchor_encode_flops / 1e9:.3g} G "
          "for the anchor VAE encode")
    print(f"  prefill time:                {seconds[0]:.3f} s -> {seconds[1]:.3f} s")
    for line in prefill_time_note(profile, report):
        print(f"    {line}")
    answers = [readable_answer(answer) for answer in understanding.answers]
    if source.kind == "tiny":
        print("  answers (random weights, so they are meaningless; bytes that are not valid UTF-8 are dropped):")
    elif any("\ufffd" in answer for answer in understanding.answers):
        print("  answers (bytes that are not valid UTF-8 are dropped):")
    for ratio, answer in zip((1.0, args.ratio), answers):
        label = f"answer at ratio {ratio}:"
        print(f"  {label:<28} {answer}")


# ------------------------------------------------------------------------------------------------ convert / export


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

    convert_bagel(
        args.source,
        args.destination,
        ratio=args.ratio,
        link=args.link,
        overwrite=args.overwrite,
        config_overrides=args.config_overrides,
        max_shard_size=args.max_shard_size,
    )
    print(f"Converted {args.source} -> {args.destination} (g2tr_ratio={args.ratio})")
    return 0


TINY_EXPORT_CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [custom_code, g2tr, token-reduction, multimodal, tiny-random]
---

# Tiny random $title with G2TR (for tests)

Random weights, built by `g2tr_hf.build_tiny("$name")`: it exercises the remote-code path
(`trust_remote_code=True`)$pipeline, and its answers are meaningless.
"""


def _tiny_export_card(name: str) -> str:
    from string import Template

    title = OWN_MODEL_TYPES[TINY_MODEL_TYPES[name]]
    pipeline = " and the pipeline" if name == "bagel" else ""
    return Template(TINY_EXPORT_CARD).substitute(title=title, name=name, pipeline=pipeline)


def _source_model_card(source: ModelSource) -> str | None:
    """The README.md that travels with a re-exported model (None: `export` writes a generic card)."""
    if source.kind == "tiny":
        return _tiny_export_card(TINY_MODEL_NAMES[source.name])
    if source.kind == "folder":
        readme = Path(source.location) / "README.md"
        return readme.read_text(encoding="utf-8") if readme.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source.name, "README.md")).read_text(encoding="utf-8")
    except Exception:  # a repo without a card (or one that cannot be fetched now) gets the generic card
        logger.info("no README.md fetched from %s: the export gets the package's model card", source.name)
        return None


def _export(args: argparse.Namespace) -> int:
    from .hub import export

    source = resolve_model(args.model)
    model, processor = load_model(source, args.trust_remote_code)
    card = _source_model_card(source)
    if args.ratio is not None:
        model.config.g2tr_ratio = args.ratio
        model.config.validate_g2tr()
    export(
        model, processor, args.destination, model_card=card, overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )  # fmt: skip
    print(f"Exported {args.model} -> {args.destination}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    if not HUB_REPO_ID.match(args.repo_id):
        raise CLIError(f"`repo_id`: expected a Hub repository id owner/name, got {args.repo_id!r}")
    result = push_folder(
        args.folder, args.repo_id, revision=args.revision, create_pr=args.create_pr, private=args.private or None,
        commit_message=args.message, large=args.large,
    )  # fmt: skip
    where = getattr(result, "pr_url", None) or getattr(result, "commit_url", None) or args.repo_id
    print(f"Pushed {args.folder} -> {where}")
    return 0


def _model_subcommands(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    """The per-model sub-commands of `g2tr-hf <name> <model> ...`, creating `<name>` on first use so that several
    models (convert bagel, convert internvlu, ...) can register under one command."""
    parser = commands.choices.get(name) or commands.add_parser(name, help=help_text, description=help_text)
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
    parser.add_argument(
        "--max-shard-size",
        default=None,
        help=f"re-write the weights as safetensors shards of at most this size, e.g. 5GB (default: link {weights}; "
        "shards are the layout to upload)",
    )


def _add_trust_remote_code(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a --model that is not a g2tr_hf model type to run the Python code it ships (g2tr_hf folders "
        "and repos never need it: they load with the installed classes)",
    )


def _add_bagel_file_commands(commands: argparse._SubParsersAction) -> None:
    """`g2tr-hf convert bagel SRC DST` and `g2tr-hf export --model MODEL DST`."""
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
    export.add_argument(
        "--model",
        required=True,
        help=f"a g2tr_hf model folder, a Hub repo id (owner/name), or {' / '.join(TINY_MODEL_NAMES)} (random, for "
        "tests)",
    )
    export.add_argument("--ratio", type=float, default=None, help="g2tr_ratio to store (default: the model's)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    export.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB (the default) or 500MB"
    )
    _add_trust_remote_code(export)
    export.set_defaults(run=_export)

    push = commands.add_parser("push", help="upload a folder written by export or convert to the Hugging Face Hub")
    push.add_argument("folder", help="the folder to upload")
    push.add_argument("repo_id", help="the Hub repository, owner/name (created if missing)")
    push.add_argument("--revision", help="branch to commit to (created if missing), or refs/pr/N")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--message", default="Upload G2TR model (g2tr-hf export)", help="the commit message")
    push.add_argument(
        "--large",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="resumable large-folder upload (default: for folders over 10 GB)",
    )
    push.set_defaults(run=_push)


def _convert_internvlu(args: argparse.Namespace) -> int:
    from .convert_internvlu import convert_internvlu

    convert_internvlu(
        args.source,
        args.destination,
        ratio=args.ratio,
        link=args.link,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )
    print(f"Converted {args.source} -> {args.destination} (g2tr_ratio={args.ratio})")
    return 0


def _add_internvlu_file_commands(commands: argparse._SubParsersAction) -> None:
    """`g2tr-hf convert internvlu SRC DST`."""
    convert = _model_subcommands(commands, "convert", "convert an official checkpoint into a loadable folder")
    internvlu = convert.add_parser("internvlu", help="an InternVL-U snapshot folder (vlm/, vae/, processor/, ...)")
    _add_convert_arguments(internvlu, "snapshot folder with the official sub-folders", "the vlm/ weights")
    internvlu.set_defaults(run=_convert_internvlu)


# ------------------------------------------------------------------------------------------------ edit / generate


def _image_pipeline(args: argparse.Namespace, command: str):
    """The editing / generation pipeline of `--model` (default: the tiny built-in BAGEL): BAGEL's, or InternVL-U's
    for a folder that holds its generation decoder; and a description."""
    source = resolve_model(args.model or "tiny-bagel")
    if source.model_type == "g2tr_internvl_u":
        return _internvlu_pipeline(args, source, command)
    _require_model_type(source, command, "g2tr_bagel")
    model_kwargs = {} if source.kind == "tiny" else {"dtype": args.dtype}
    model, processor = load_model(source, args.trust_remote_code, **model_kwargs)
    from .pipeline_bagel import G2TRBagelPipeline

    if args.model:
        label = source.label
    else:
        label = "the tiny built-in BAGEL (no --model given; random weights, so the image is noise)"
    return G2TRBagelPipeline(model=model, processor=processor, device=args.device), label


# Options of the BAGEL sampler that InternVL-U's has no counterpart for.
_BAGEL_ONLY_OPTIONS = (("cfg_interval", "--cfg-interval"), ("cfg_renorm_type", "--cfg-renorm-type"),
                       ("cfg_renorm_min", "--cfg-renorm-min"))  # fmt: skip


def _internvlu_pipeline(args: argparse.Namespace, source: ModelSource, command: str):
    given = [option for name, option in _BAGEL_ONLY_OPTIONS if getattr(args, name) is not None]
    if given:
        raise CLIError(f"{', '.join(given)}: BAGEL options; InternVL-U's sampler has no such setting")
    from .pipeline_internvlu import G2TRInternVLUPipeline

    if source.kind == "tiny":
        from .tiny import build_tiny_internvlu_generation

        model, processor, decoder, scheduler = build_tiny_internvlu_generation()
        pipe = G2TRInternVLUPipeline(
            model, processor, generation_decoder=decoder, scheduler=scheduler, device=args.device
        )
        return pipe, "the tiny built-in InternVL-U (random weights, so the image is noise)"
    if source.kind == "folder" and not (Path(source.location) / "generation_decoder" / "config.json").is_file():
        raise CLIError(
            f"`--model`: `g2tr-hf {command}` needs InternVL-U's generation decoder, but {source.name!r} has no "
            "generation_decoder/ (convert the official snapshot with its generation_decoder/ and scheduler/)"
        )
    model, processor = load_model(source, args.trust_remote_code, dtype=args.dtype)
    try:
        pipe = G2TRInternVLUPipeline(model, processor, device=args.device)
    except (OSError, ValueError) as error:
        raise CLIError(f"`--model`: cannot load the generation decoder of {source.name!r}: {_first_line(error)}")
    return pipe, source.label


def _default_steps(pipe) -> int:
    return 20 if type(pipe).__name__ == "G2TRInternVLUPipeline" else 50


def _image_generation_settings(args: argparse.Namespace, pipe) -> dict:
    """The sampler options shared by `edit` and `generate` (None = the task's recommended value)."""
    steps = args.steps if args.steps is not None else _default_steps(pipe)
    if type(pipe).__name__ == "G2TRInternVLUPipeline":
        return dict(
            num_inference_steps=steps,
            num_images_per_prompt=args.num_images_per_prompt,
            cfg_text_scale=args.cfg_text_scale,
            cfg_img_scale=args.cfg_img_scale,
            timestep_shift=args.timestep_shift,
            think=args.think,
        )
    return dict(
        num_inference_steps=steps,
        num_images_per_prompt=args.num_images_per_prompt,
        cfg_text_scale=args.cfg_text_scale,
        cfg_img_scale=args.cfg_img_scale,
        cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
        cfg_renorm_type=args.cfg_renorm_type,
        cfg_renorm_min=args.cfg_renorm_min,
        timestep_shift=args.timestep_shift,
        think=args.think,
    )


def _output_paths(output: str, count: int) -> list[Path]:
    """`-o out.png` for one image; `out-0.png`, `out-1.png`, ... for several (prompt by prompt)."""
    destination = Path(output)
    if count == 1:
        return [destination]
    return [destination.with_name(f"{destination.stem}-{index}{destination.suffix}") for index in range(count)]


def _prompt_argument(prompts: list[str]):
    """One prompt as a string (the single-request call), several as a list (one batched call)."""
    return prompts[0] if len(prompts) == 1 else prompts


def _save_generated(args: argparse.Namespace, output, source: str, what: str, seconds: float, steps: int) -> int:
    paths = _output_paths(args.output, len(output.images))
    print(f"{what} through {source}:")
    for index, (image, thought, destination) in enumerate(zip(output.images, output.thoughts, paths)):
        destination.parent.mkdir(parents=True, exist_ok=True)
        image.save(destination)
        if thought is not None and index % args.num_images_per_prompt == 0:
            print(f"  plan (think mode):           {thought!r}")
    sizes = ", ".join(dict.fromkeys(f"{image.width}x{image.height}" for image in output.images))
    written = paths[0] if len(paths) == 1 else f"{paths[0]} ... {paths[-1]}"
    print(f"  {steps} denoising steps in {seconds:.2f} s; {len(paths)} image(s) ({sizes}) written to "
          f"{written}")
    return 0


def _edit(args: argparse.Namespace) -> int:
    import time

    import torch

    if len(args.image) not in (1, len(args.prompt)):
        raise CLIError(
            f"`--image`: give one input image for all prompts or one per prompt ({len(args.prompt)}), got "
            f"{len(args.image)}."
        )
    images = [_read_image(path) for path in args.image]
    if len(args.prompt) > 1:
        images = images * len(args.prompt) if len(images) == 1 else images
    pipe, source = _image_pipeline(args, "edit")
    settings = _image_generation_settings(args, pipe)
    start = time.perf_counter()
    output = pipe(
        prompt=_prompt_argument(args.prompt),
        image=images[0] if len(args.prompt) == 1 else images,
        g2tr_ratio=args.ratio,
        generator=torch.Generator().manual_seed(args.seed),
        **settings,
    )
    inputs = ", ".join(args.image)
    what = f"Edit of {inputs} (g2tr_ratio {args.ratio if args.ratio is not None else 'of the model'})"
    return _save_generated(args, output, source, what, time.perf_counter() - start, _evaluations(pipe, settings))


def _generate(args: argparse.Namespace) -> int:
    import time

    import torch

    pipe, source = _image_pipeline(args, "generate")
    settings = _image_generation_settings(args, pipe)
    start = time.perf_counter()
    output = pipe(
        prompt=_prompt_argument(args.prompt),
        height=args.height,
        width=args.width,
        generator=torch.Generator().manual_seed(args.seed),
        **settings,
    )
    elapsed = time.perf_counter() - start
    return _save_generated(args, output, source, "Text-to-image", elapsed, _evaluations(pipe, settings))


def _evaluations(pipe, settings: dict) -> int:
    """Denoising steps actually run: BAGEL's N schedule points give N - 1 steps, InternVL-U's N steps are N."""
    steps = settings["num_inference_steps"]
    return steps if type(pipe).__name__ == "G2TRInternVLUPipeline" else steps - 1


def _add_image_generation_options(parser: argparse.ArgumentParser, prompt: bool = True) -> None:
    parser.add_argument(
        "--model",
        help="a g2tr_hf BAGEL folder or an InternVL-U folder with its generation_decoder/, a Hub repo id "
        "(owner/name), tiny-bagel (the default) or tiny-internvlu",
    )
    if prompt:
        parser.add_argument(
            "--prompt", required=True, nargs="+", help="the instruction; several run as one batch (one image file each)"
        )
    parser.add_argument(
        "--num-images-per-prompt", type=int, default=1, help="images per prompt (default 1; BAGEL); files -0, -1, ..."
    )
    parser.add_argument(
        "--steps", type=int, default=None,
        help="BAGEL: points on the flow schedule (default 50: 49 steps); InternVL-U: solver steps (default 20)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0; one generator)")
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
    _add_trust_remote_code(parser)


def _add_bagel_image_commands(commands: argparse._SubParsersAction) -> None:
    """`g2tr-hf edit --image IN --prompt ... -o OUT` and `g2tr-hf generate --prompt ... -o OUT` (BAGEL or
    InternVL-U)."""
    edit = commands.add_parser("edit", help="edit an image with BAGEL or InternVL-U (its ViT tokens reduced by G2TR)")
    edit.add_argument(
        "--image", required=True, nargs="+", help="the input image (one for all prompts, or one per prompt)"
    )
    edit.add_argument("--ratio", type=float, default=0.5, help="G2TR keep ratio of the input's ViT tokens (0.5)")
    edit.add_argument("-o", "--output", default="g2tr_edit.png", help="where to write the PNG")
    _add_image_generation_options(edit)
    edit.set_defaults(run=_edit)

    generate = commands.add_parser("generate", help="text-to-image with BAGEL or InternVL-U")
    generate.add_argument("--height", type=int, default=None, help="multiple of 16 (default 1024, or the model's max)")
    generate.add_argument("--width", type=int, default=None, help="multiple of 16 (default 1024, or the model's max)")
    generate.add_argument("-o", "--output", default="g2tr_generate.png", help="where to write the PNG")
    _add_image_generation_options(generate)
    generate.set_defaults(run=_generate)


# -------------------------------------------------------------------------------------------------- evaluation


def _float_list(value: str) -> list[float]:
    try:
        return [float(item) for item in value.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def _name_list(value: str) -> list[str]:
    names = [item.strip() for item in value.split(",") if item.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {value!r}")
    return names


def _benchmarks(args: argparse.Namespace) -> list[str] | None:
    from .evaluation import EXTRA_UNDERSTANDING, PAPER_UNDERSTANDING

    if args.benchmarks in (None, "auto"):
        return None
    if args.benchmarks == "paper":
        return list(PAPER_UNDERSTANDING)
    if args.benchmarks == "all":
        return [*PAPER_UNDERSTANDING, *EXTRA_UNDERSTANDING]
    return _name_list(args.benchmarks)


def _write_table(runs, args: argparse.Namespace) -> None:
    from .evaluation import format_table, table_records

    benchmarks = _benchmarks(args)
    table = format_table(runs, benchmarks)
    print(table, end="")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(table, encoding="utf-8")
    if args.json:
        columns = benchmarks or sorted({name for run in runs for name in run.scores})
        Path(args.json).write_text(json.dumps(table_records(runs, columns), indent=2), encoding="utf-8")


def _eval_table(args: argparse.Namespace) -> int:
    from .evaluation import parse_labelled_folder, read_run

    runs = []
    for value in args.runs:
        label, folder = parse_labelled_folder(value)
        try:
            runs.append(read_run(folder, method=label, benchmarks=_benchmarks(args)))
        except FileNotFoundError as error:
            raise CLIError(f"`RUN`: {error}") from None
    _write_table(runs, args)
    return 0


def _eval_run(args: argparse.Namespace) -> int:
    import subprocess

    from .evaluation import lmms_eval_command, lmms_eval_configs, plan_runs, read_run

    resolve_model(args.model)  # a bad --model fails here, not after lmms-eval has started
    specs = plan_runs(args.ratios, args.methods)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # lmms-eval reads a --limit below 1 as a fraction of each task, anything else as a document count.
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    configs = lmms_eval_configs(
        args.model, specs, args.tasks, output, batch_size=args.batch_size, include_path=args.include_path,
        limit=limit, model_args=args.model_args,
    )  # fmt: skip
    config_file = output / "lmms_eval_config.json"
    config_file.write_text(json.dumps(configs, indent=2), encoding="utf-8")
    command = lmms_eval_command(config_file, args.launcher)
    print(f"Running {len(specs)} lmms-eval runs ({', '.join(spec.name for spec in specs)}): {' '.join(command)}")
    log = output / "lmms_eval.log"
    with log.open("w", encoding="utf-8") as log_file:
        completed = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, check=False)
    runs, missing = [], []
    for spec in specs:
        try:
            runs.append(read_run(output / spec.name, benchmarks=_benchmarks(args)))
        except FileNotFoundError:
            missing.append(spec.name)
    # lmms-eval logs a failed run and goes on to the next one (exit status 0), so the results files decide.
    if completed.returncode != 0 or missing:
        raise CLIError(
            f"lmms-eval {'exited with status ' + str(completed.returncode) if completed.returncode else 'wrote no'}"
            f" results{' for ' + ', '.join(missing) if missing else ''}; see {log}"
        )
    _write_table(runs, args)
    return 0


def _add_table_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--benchmarks",
        default="auto",
        help="columns: paper (MME, MMBench, MMVP, RWQA), all (+ POPE, GQA, TextVQA), a comma list of those or of "
        "task:metric (e.g. my_task:exact_match, shown x100), or auto (every known benchmark the runs have; default)",
    )
    parser.add_argument("-o", "--output", default=None, help="also write the Markdown table to this file")
    parser.add_argument("--json", default=None, help="also write the rows (unrounded) as JSON to this file")


def _add_eval_commands(commands: argparse._SubParsersAction) -> None:
    """`g2tr-hf eval run ...`, `g2tr-hf eval table ...` and `g2tr-hf eval-edit ...`."""
    evaluation = _model_subcommands(
        commands, "eval", "paired understanding evaluations (vanilla vs reduced) through lmms-eval, and their table"
    )
    run = evaluation.add_parser(
        "run",
        help="run lmms-eval for every (method, ratio) and the unreduced model, then write the table",
        description="Plans one lmms-eval run per (method, ratio), ratio 1.0 once, as one lmms-eval config file; "
        "runs it (needs `pip install lmms-eval`); reads the results back and prints the paper-style table.",
    )
    run.add_argument("--model", required=True, help="a g2tr_hf model folder, a Hub repo id, or tiny-bagel / "
                     "tiny-internvlu")  # fmt: skip
    run.add_argument("--tasks", type=_name_list, required=True, help="lmms-eval tasks, e.g. "
                     "mme,mmbench_en_dev_static,mmvp,realworldqa")  # fmt: skip
    run.add_argument("--ratios", type=_float_list, default=[1.0, 0.5], help="keep ratios (default 1.0,0.5)")
    run.add_argument("--methods", type=_name_list, default=["g2tr"], help="selection methods (default g2tr)")
    run.add_argument("--output-dir", required=True, help="one sub-folder per run, plus the config and the log")
    run.add_argument("--batch-size", type=int, default=1, help="rows per generate call (default 1)")
    run.add_argument("--limit", type=float, default=None, help="lmms-eval --limit (docs per task, or a fraction)")
    run.add_argument("--include-path", default=None, help="extra lmms-eval task folder (local tasks)")
    run.add_argument("--model-args", default="", help="further g2tr model arguments, e.g. dtype=bfloat16")
    run.add_argument(
        "--launcher",
        default=None,
        help="run lmms-eval under this launcher, e.g. 'accelerate launch --num_processes 8' (data parallel)",
    )
    _add_table_options(run)
    run.set_defaults(run=_eval_run)

    table = evaluation.add_parser(
        "table",
        help="read lmms-eval output folders and write the paper-style table",
        description="Reads lmms-eval output folders (--output_path of g2tr runs) and prints the paper-style table: "
        "scores, relative average against each model's ratio-1.0 run, and budget columns.",
    )
    table.add_argument("runs", nargs="+", metavar="RUN", help="an output folder, or LABEL=FOLDER to name its row")
    _add_table_options(table)
    table.set_defaults(run=_eval_table)

    edit = commands.add_parser(
        "eval-edit",
        help="edit every sample of an edit set and write the outputs in GEdit-Bench's or ImgEdit's layout",
        description="Runs the BAGEL or InternVL-U editing pipeline over an edit set (.jsonl of key/image/instruction, "
        "or ImgEdit's JSON) and writes the images where the benchmark's scorer reads them. Scoring is yours.",
    )
    edit.add_argument("--edit-set", required=True, help=".jsonl (key, image, instruction[, task_type, "
                      "instruction_language]) or ImgEdit's .json")  # fmt: skip
    edit.add_argument("--image-root", default=None, help="folder the set's image paths are relative to "
                      "(default: the set's folder)")  # fmt: skip
    edit.add_argument("--output-dir", required=True, help="where the layout starts")
    edit.add_argument("--layout", choices=("gedit", "imgedit"), default="gedit", help="output layout (default gedit)")
    edit.add_argument("--model-name", default="g2tr", help="GEdit-Bench's <model_name> folder (default g2tr)")
    edit.add_argument("--ratio", type=float, default=0.5, help="G2TR keep ratio (0.5; 1.0 = unreduced)")
    edit.add_argument("--limit", type=int, default=None, help="only the first N samples")
    edit.add_argument("--overwrite", action="store_true", help="redo outputs that exist (default: keep them)")
    _add_image_generation_options(edit, prompt=False)
    edit.set_defaults(run=_eval_edit)


def _eval_edit(args: argparse.Namespace) -> int:
    import os

    from .edit_evaluation import PipelineEditor, read_edit_set, run_edit_set

    try:
        samples = read_edit_set(args.edit_set, args.image_root)
    except (OSError, ValueError) as error:
        raise CLIError(f"`--edit-set`: {_first_line(error)}") from None
    samples = samples[: args.limit] if args.limit is not None else samples
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and args.device is None:
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    pipe, source = _image_pipeline(args, "eval-edit")
    settings = _image_generation_settings(args, pipe)
    steps = settings.pop("num_inference_steps")
    editor = PipelineEditor(pipe, g2tr_ratio=args.ratio, num_inference_steps=steps, pipeline_kwargs=settings)
    records = run_edit_set(
        editor, samples, args.output_dir, layout=args.layout, model_name=args.model_name, seed=args.seed,
        rank=rank, world_size=world_size, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"{len(records)} edits through {source} written to {args.output_dir} ({args.layout} layout; rank {rank} of "
          f"{world_size}, {len(samples[rank::world_size]) - len(records)} already there)")
    return 0


# ------------------------------------------------------------------------------------------------------- bench


def _bench(args: argparse.Namespace) -> int:
    from .baselines import resolve_method
    from .bench import load_samples, run_bench, write_reports

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:  # bad names fail before anything is loaded
        resolve_method(method)
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise CLIError(f"`--ratios` must be comma-separated numbers in (0, 1], got {args.ratios!r}") from None
    samples = load_samples(args.data)
    source = resolve_model(args.model)
    model, processor = load_model(source, args.trust_remote_code)
    if args.device:
        model = model.to(args.device)
    result = run_bench(
        model,
        processor,
        samples,
        methods,
        ratios,
        repeats=args.repeats,
        warmup=args.warmup,
        max_new_tokens=args.max_new_tokens,
        edit=args.edit,
        edit_steps=args.edit_steps,
        progress=not args.no_progress,
        model_name=source.name,
    )
    paths = write_reports(result, args.output_dir)
    print(paths["markdown"].read_text())
    print(f"Wrote {paths['csv']}, {paths['markdown']} and {paths['png']}.")
    return 0


def _add_bench_command(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="speed, budget and fidelity of reduction methods side by side",
        description="Run every method at every ratio against the unreduced model on an image + question set: "
        "tokens, Avg. Tokens, KV, FLOPs, measured prefill and decode times, next-token KL, top-1 and greedy "
        "agreement (and, with --edit on BAGEL, velocity error and PSNR/SSIM of the edited image). Writes "
        "bench.csv, bench.md and bench_pareto.png.",
    )
    bench.add_argument("--model", default="tiny-bagel", help="a g2tr_hf model folder, a Hub repo id or "
                       f"{' / '.join(TINY_MODEL_NAMES)} (default tiny-bagel)")  # fmt: skip
    bench.add_argument("--data", help="a folder of images (optionally with questions.json / questions.csv), or a "
                       ".json / .csv file of image + question (default: a small generated set)")  # fmt: skip
    bench.add_argument("--methods",
                       default="g2tr,random,pool,divprune,visionzip,tome,fastv,wfastv,pdrop,dart,ivcprune,vscan",
                       help="comma-separated presets or registered methods, options as name:key=value")  # fmt: skip
    bench.add_argument("--ratios", default="0.25,0.5", help="comma-separated keep ratios (default 0.25,0.5)")
    bench.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    bench.add_argument("--max-new-tokens", type=int, default=8, help="greedy answer length (default 8)")
    bench.add_argument("--edit", action="store_true", help="also edit each image with its question (BAGEL)")
    bench.add_argument("--edit-steps", type=int, default=4, help="sampler points per edit (default 4)")
    bench.add_argument("--device", help="move the model there first (e.g. cuda)")
    bench.add_argument("-o", "--output-dir", default="g2tr_bench", help="where the reports go (default g2tr_bench)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_trust_remote_code(bench)
    bench.set_defaults(run=_bench)


# ------------------------------------------------------------------------------------------------------ the parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that run a command (`demo`, `convert bagel`, ...), depth first."""
    subcommands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not subcommands:
        yield parser
    for action in subcommands:
        for child in dict.fromkeys(action.choices.values()):  # aliases would list a parser twice
            yield from _leaf_parsers(child)


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    """`--debug` before or after the command name. The leaves' default is SUPPRESS so that they do not overwrite
    a `--debug` given before the command (argparse applies sub-parser defaults last)."""
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    for leaf in _leaf_parsers(parser):
        if leaf is not parser:
            leaf.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
            leaf.set_defaults(command_name=leaf.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="g2tr-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run G2TR on the built-in example (no download)",
        description="Reduce a synthetic scene's ViT tokens, account for the savings at BAGEL-7B-MoT shapes, then "
        "run one understanding request unreduced and reduced (by default through a tiny random BAGEL).",
    )
    demo.add_argument("--ratio", type=float, default=0.5, help="keep ratio in (0, 1] (default 0.5)")
    demo.add_argument("--min-keep", type=int, default=32, help="minimum kept tokens per image (default 32)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic features")
    demo.add_argument("-o", "--output", default="g2tr_demo_kept_tokens.png", help="where to write the PNG")
    demo.add_argument(
        "--model",
        help=f"a g2tr_hf model folder, a Hub repo id (owner/name) or {' / '.join(TINY_MODEL_NAMES)} "
        "(default: tiny-bagel)",
    )
    demo.add_argument("--image", help="image to ask about (default: the synthetic scene)")
    demo.add_argument("--question", default="Describe this image.", help="the question")
    demo.add_argument("--max-new-tokens", type=int, default=16, help="answer length (default 16)")
    demo.add_argument(
        "--anchor-scale",
        type=float,
        default=None,
        help="g2tr_anchor_scale: encode the anchor image at this scale (0.5: ~4x cheaper, approximate; "
        "default: the model's, 1.0 = exact)",
    )
    _add_trust_remote_code(demo)
    demo.set_defaults(run=_demo)
    _add_bagel_file_commands(commands)
    _add_internvlu_file_commands(commands)
    _add_bagel_image_commands(commands)
    _add_eval_commands(commands)
    _add_bench_command(commands)
    _add_common_options(parser)
    return parser


# --------------------------------------------------------------------------------------------------------- logging


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (a redirected or captured stream included)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always answers sys.stderr
        pass


@contextlib.contextmanager
def _package_logging(debug: bool) -> Iterator[None]:
    """Show g2tr_hf's INFO messages (DEBUG with --debug) on stderr while a command runs.

    The handler goes on the `g2tr_hf` logger, not on the root logger: transformers and huggingface_hub print their
    warnings with handlers of their own, and huggingface_hub's logger also propagates to the root, so a root handler
    (what `logging.basicConfig` adds) printed every huggingface_hub warning a second time. The logger's state is
    restored afterwards, so calling `main` in-process (tests, notebooks) leaves logging as it was.
    """
    package_logger = logging.getLogger("g2tr_hf")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)


# ------------------------------------------------------------------------------------------------------------ main


def _error_message(error: BaseException) -> str:
    """One line for any exception escaping a command. The expected kinds carry a user-facing message; anything else
    is named by its type, and a message cut to its first line points at --debug."""
    expected = isinstance(error, (CLIError, ValueError, OSError, ImportError))
    message = _first_line(error) if expected else f"{type(error).__name__}: {_first_line(error)}"
    if not expected or len(str(error).strip().splitlines()) > 1:
        message += " (run with --debug for the full message and traceback)"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run `g2tr-hf`. Returns the exit status: 0, or 2 after a one-line error on stderr (argparse's own usage
    errors exit with status 2 from `parse_args`)."""
    args = build_parser().parse_args(argv)
    command = getattr(args, "command_name", f"g2tr-hf {args.command}")
    with _package_logging(args.debug):
        try:
            return args.run(args)
        except KeyboardInterrupt:
            if args.debug:
                traceback.print_exc()
            print(f"{command}: interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # noqa: BLE001 -- every failure ends as one line (the traceback on --debug)
            if args.debug:
                traceback.print_exc()
            print(f"{command}: error: {_error_message(error)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())

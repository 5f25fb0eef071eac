"""The `g2tr-hf` command line: fast `--help`, one-line errors, model resolution and trust, logging, the demo's
report."""

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import g2tr_hf
from g2tr_hf import build_tiny, cli
from g2tr_hf.cli import build_parser, main


SRC = Path(cli.__file__).resolve().parent
HEAVY_MODULES = ("torch", "transformers", "diffusers", "PIL", "numpy", "huggingface_hub", "safetensors")


def _run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(SRC.parent))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def _leaf_commands() -> list[list[str]]:
    """Every runnable command as argv words (`["demo"]`, `["convert", "bagel"]`, ...)."""
    prefix = len("g2tr-hf")
    return [leaf.prog[prefix:].split() for leaf in cli._leaf_parsers(build_parser()) if leaf.prog != "g2tr-hf"]


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"g2tr-hf {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------------------ --help


def test_the_console_entry_point_answers_help_without_importing_the_package():
    """`g2tr-hf` runs `g2tr_hf_cli:main`, outside the package: `--help` and usage errors never import g2tr_hf (whose
    `__init__` imports torch and transformers to register the models)."""
    commands = [[]] + _leaf_commands()
    code = textwrap.dedent(
        f"""
        import sys
        import g2tr_hf_cli
        for words in {commands!r}:
            try:
                g2tr_hf_cli.main(words + ["--help"])
            except SystemExit as exit:
                assert exit.code == 0, (words, exit.code)
        try:
            g2tr_hf_cli.main(["demo", "--ratio", "abc"])
        except SystemExit as exit:
            assert exit.code == 2
        print("HEAVY", [name for name in {(*HEAVY_MODULES, "g2tr_hf")!r} if name in sys.modules])
        """
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    report = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith("HEAVY"))
    assert report["HEAVY"] == "[]"
    assert "--ratio" in result.stderr and "abc" in result.stderr


def test_help_imports_nothing_heavy_before_parsing():
    # The console script imports the package __init__ (transformers) first; this checks everything the CLI module
    # itself does up to and including `--help`, by loading it under a bare stand-in for the package.
    commands = [[]] + _leaf_commands()
    code = textwrap.dedent(
        f"""
        import sys, time, types
        start = time.perf_counter()
        package = types.ModuleType("g2tr_hf")
        package.__path__ = [{str(SRC)!r}]
        sys.modules["g2tr_hf"] = package
        from g2tr_hf import cli
        for words in {commands!r}:
            try:
                cli.main(words + ["--help"])
            except SystemExit as exit:
                assert exit.code == 0, (words, exit.code)
        print("HEAVY", [name for name in {HEAVY_MODULES!r} if name in sys.modules])
        """
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    report = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith("HEAVY"))
    assert report["HEAVY"] == "[]"
    assert len(commands) >= 6  # demo, convert bagel, convert internvlu, export, edit, generate


def test_help_text_is_for_users():
    text = build_parser().format_help()
    assert "Not shipped" not in text and "Hub" in text
    for words in _leaf_commands():
        with pytest.raises(SystemExit) as exit:
            main(words + ["--help"])
        assert exit.value.code == 0


def test_tiny_names_cover_every_tiny_model():
    from g2tr_hf.tiny import TINY_MODELS

    assert sorted(cli.TINY_MODEL_NAMES.values()) == sorted(TINY_MODELS) == sorted(cli.TINY_MODEL_TYPES)
    for name in TINY_MODELS:
        assert build_tiny(name)[0].config.model_type == cli.TINY_MODEL_TYPES[name]
    assert set(cli.OWN_MODEL_TYPES) == {g2tr_hf.G2TRBagelConfig.model_type, g2tr_hf.G2TRInternVLUConfig.model_type}


# ------------------------------------------------------------------------------------------------ one-line errors


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["export"])
    assert exit.value.code == 2
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "--model" in line and "destination" in line

    with pytest.raises(SystemExit):
        main(["demo", "--ratio", "half"])
    assert "argument --ratio: invalid float value" in _one_error_line(capsys.readouterr().err, "demo")


def test_missing_model_folder_is_one_line(tmp_path, capsys):
    assert main(["export", "--model", "/nonexistent", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "`--model`" in line and "'/nonexistent'" in line and "expected a model folder" in line
    assert not (tmp_path / "out").exists()


def test_folder_without_config_is_one_line(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "has no config.json" in _one_error_line(capsys.readouterr().err, "export")


def test_unknown_model_name_never_asks_the_hub(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    start = time.perf_counter()
    assert main(["export", "--model", "tiny-bagle", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - start < 5
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "'tiny-bagle'" in line and "tiny-bagel, tiny-internvlu" in line and "owner/name" in line


def test_unreachable_hub_repo_is_one_line(tmp_path, capsys):
    # HF_HUB_OFFLINE=1 (conftest): the config.json fetch fails at once, as it would without a network.
    start = time.perf_counter()
    assert main(["demo", "--model", "someone/no-such-g2tr-repo", "-o", str(tmp_path / "x.png")]) == 2
    assert time.perf_counter() - start < 30
    captured = capsys.readouterr()
    line = _one_error_line(captured.err, "demo")
    assert "'someone/no-such-g2tr-repo'" in line and "Hugging Face Hub" in line
    assert captured.out == ""


def test_demo_missing_image_fails_before_the_report(tmp_path, capsys):
    assert main(["demo", "--image", str(tmp_path / "missing.png"), "-o", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "`--image`" in _one_error_line(captured.err, "demo")
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def internvlu_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "tiny-internvlu"
    assert main(["export", "--model", "tiny-internvlu", str(folder)]) == 0
    return folder


def test_export_tiny_internvlu(internvlu_folder):
    assert json.loads((internvlu_folder / "config.json").read_text())["model_type"] == "g2tr_internvl_u"
    card = (internvlu_folder / "README.md").read_text()
    assert "Tiny random InternVL-U" in card and 'build_tiny("internvlu")' in card


@pytest.mark.parametrize("command", ["edit", "generate"])
def test_edit_and_generate_on_internvlu(command, internvlu_folder, tmp_path, capsys):
    from PIL import Image

    argv = [command, "--prompt", "make it red", "-o", str(tmp_path / "out.png"), "--steps", "2"]
    if command == "edit":
        Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
        argv += ["--image", str(tmp_path / "in.png")]
    # A folder without the generation decoder is refused before anything heavy is loaded.
    assert main(argv + ["--model", str(internvlu_folder)]) == 2
    line = _one_error_line(capsys.readouterr().err, command)
    assert "needs InternVL-U's generation decoder" in line and "generation_decoder/" in line
    assert main(argv + ["--model", "tiny-internvlu", "--cfg-interval", "0", "1"]) == 2
    assert "--cfg-interval: BAGEL options" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()
    assert main(argv + ["--model", "tiny-internvlu"]) == 0
    out = capsys.readouterr().out
    assert "tiny built-in InternVL-U" in out and "2 denoising steps" in out and (tmp_path / "out.png").is_file()


def test_unexpected_errors_are_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("boom\nsecond line of details")

    monkeypatch.setattr(cli, "_export", broken)
    argv = ["export", "--model", "tiny-bagel", str(tmp_path / "out")]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "RuntimeError: boom" in line and "--debug" in line and "second line" not in line

    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        assert main(debug_argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "second line of details" in err


def test_multiline_os_errors_keep_their_first_line(tmp_path, capsys, monkeypatch):
    def unreadable(args):
        raise OSError("cannot open weights.safetensors\n" + "more\n" * 38)

    monkeypatch.setattr(cli, "_export", unreadable)
    assert main(["export", "--model", "tiny-bagel", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "cannot open weights.safetensors" in line and "--debug" in line


def test_debug_flag_parses_before_and_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["export", "--model", "m", "d"]).debug is False
    assert parser.parse_args(["--debug", "export", "--model", "m", "d"]).debug is True
    assert parser.parse_args(["export", "--model", "m", "d", "--debug"]).debug is True
    assert parser.parse_args(["convert", "bagel", "s", "d", "--debug"]).debug is True


# ------------------------------------------------------------------------------------------- remote code trust


def test_own_model_types_never_run_the_code_they_ship(tmp_path, capsys, monkeypatch):
    import transformers

    exported = tmp_path / "exported"
    assert main(["export", "--model", "tiny-bagel", str(exported)]) == 0
    # Were the folder's copy of the code imported, loading would fail.
    (exported / "modeling_bagel.py").write_text("raise RuntimeError('the shipped code ran')\n")
    (exported / "processing_bagel.py").write_text("raise RuntimeError('the shipped code ran')\n")
    original, seen = transformers.AutoModelForImageTextToText.from_pretrained, {}

    def spy(name, **kwargs):
        seen.update(kwargs)
        return original(name, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", spy)
    assert main(["export", "--model", str(exported), str(tmp_path / "again")]) == 0
    assert seen["trust_remote_code"] is False
    assert "shipped code ran" not in capsys.readouterr().err


def _foreign_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "foreign"
    folder.mkdir()
    config = {"model_type": "someone_elses_vlm", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_other_model_types_need_trust_remote_code(tmp_path, capsys, monkeypatch):
    folder = _foreign_folder(tmp_path)
    assert main(["export", "--model", str(folder), str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "'someone_elses_vlm'" in line and "--trust-remote-code" in line

    import transformers

    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs)
        raise OSError(f"{name} does not appear to have a file named model.safetensors\nCheckout ...")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", fake_from_pretrained)
    argv = ["export", "--model", str(folder), str(tmp_path / "out"), "--trust-remote-code"]
    assert main(argv) == 2
    assert seen["trust_remote_code"] is True
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "cannot load" in line and "model.safetensors" in line and "Checkout" not in line


def test_hub_repos_of_our_types_load_without_trusting_their_code(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    import transformers

    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"model_type": "g2tr_bagel"}))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kwargs: str(config_file))
    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs, name=name)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", fake_from_pretrained)
    assert main(["generate", "--model", "someone/g2tr-bagel", "--prompt", "a cat", "-o", str(tmp_path / "o.png")]) == 2
    assert seen["name"] == "someone/g2tr-bagel" and seen["trust_remote_code"] is False
    assert "stop here" in _one_error_line(capsys.readouterr().err, "generate")


# ---------------------------------------------------------------------------------------------- folder modes


def test_exported_folder_gets_the_umask_modes(tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(["export", "--model", "tiny-bagel", str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    folder = tmp_path / "out"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
    assert modes["model.safetensors"] == 0o644  # safetensors itself writes 0o600
    assert set(modes.values()) == {0o644}, modes


# ------------------------------------------------------------------------------------------------------- logging


def test_library_warnings_print_once():
    code = textwrap.dedent(
        """
        import logging
        from g2tr_hf import cli

        def noisy(args):
            logging.getLogger("huggingface_hub.file_download").warning("hub warning")
            logging.getLogger("transformers.modeling_utils").warning("transformers warning")
            logging.getLogger("g2tr_hf.hub").info("package info")
            return 0

        cli._export = noisy
        raise SystemExit(cli.main(["export", "--model", "tiny-bagel", "unused"]))
        """
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    for message in ("hub warning", "transformers warning", "package info"):
        assert result.stderr.count(message) == 1, result.stderr


def test_main_leaves_logging_as_it_was(tmp_path):
    root_handlers = list(logging.getLogger().handlers)
    package = logging.getLogger("g2tr_hf")
    state = (list(package.handlers), package.level, package.propagate)
    assert main(["export", "--model", "/nonexistent", str(tmp_path / "out")]) == 2
    assert logging.getLogger().handlers == root_handlers
    assert (list(package.handlers), package.level, package.propagate) == state


# ---------------------------------------------------------------------------------------------------------- demo


def test_readable_answer_drops_undecodable_bytes():
    from g2tr_hf.demo import readable_answer

    assert readable_answer("=no\u03a2\ufffdwher\x0fqu\ufffd\ufffd") == "'=no\\u03a2wher\\x0fqu'"
    assert readable_answer("a cat, 猫") == "'a cat, 猫'"


def test_demo_layout_is_the_processors(tmp_path):
    # The demo's real-shape KV count (image block + question + answer seed) follows the prompt the processor builds.
    from PIL import Image

    from g2tr_hf.demo import QUESTION_TOKENS

    _, processor = build_tiny("bagel")
    question = " ".join(["what"] * QUESTION_TOKENS)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (56, 56))},
                                             {"type": "text", "text": question}]}]
    ids = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )["input_ids"][0]
    image_tokens = int((ids == processor.image_token_id).sum())
    question_tokens = len(processor.tokenizer.encode(question, add_special_tokens=False))
    assert image_tokens > 0 and question_tokens > 0
    assert len(ids) == (image_tokens + 2) + (question_tokens + 2) + 1


def test_demo_explains_its_numbers(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "kept.png")]) == 0
    out = capsys.readouterr().out
    assert "KV entries after prefill:  4935 -> 2485" in out  # the README's figure
    assert "the <|im_start|> that opens the answer" in out
    assert "+ anchor VAE encode:" in out and "(1.86x;" in out
    assert "Why the reduced prefill is not faster here" in out
    assert "the real-shape figures above are the ones that matter" in out
    assert "meaningless" in out
    assert "\ufffd" not in out

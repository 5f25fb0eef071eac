"""The `g2tr-hf` console entry point.

It lives outside the `g2tr_hf` package on purpose: importing the package registers its models with transformers,
which imports torch and transformers (seconds), and `--help` or a mistyped argument need neither. The arguments are
checked first with the parser of `g2tr_hf/cli.py`, read on its own (that file imports only the standard library at
module level); the package is imported only to run a command.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path


def _argument_parser():
    """`g2tr_hf.cli.build_parser()`, without executing the package's `__init__`."""
    package = importlib.util.find_spec("g2tr_hf")  # locates the package without importing it
    source = Path(next(iter(package.submodule_search_locations))) / "cli.py"
    spec = importlib.util.spec_from_file_location("_g2tr_hf_cli_arguments", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module.build_parser()


def main(argv: Sequence[str] | None = None) -> int:
    """Run `g2tr-hf`: parse (`--help` and usage errors end here), then hand over to `g2tr_hf.cli.main`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _argument_parser().parse_args(argv)
    from g2tr_hf.cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())

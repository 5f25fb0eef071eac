"""Repository-wide checks: the documentation a user receives stands on its own."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".cfg", ".toml", ".txt", ".jinja", ".json", ".yaml", ".yml"}
# A path outside the repository (the team's private notes live beside it), or a section sign pointing into documents
# a user does not have.
OUTSIDE = re.compile(r"(\.\./|\bshared/)(specs|design|hooks)\b|§\s*\d")


def tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed if Path(name).suffix in TEXT_SUFFIXES and not name.startswith(".ci/")]


def test_no_tracked_file_names_a_path_outside_the_repository():
    offenders = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def test_every_markdown_file_a_doc_names_exists():
    """Every Markdown or Python file of docs, model_cards, benchmarks, examples or tests that a tracked file names
    exists in the repository."""
    named = re.compile(r"\b((?:docs|model_cards|benchmarks|examples|tests)/[\w./-]+\.(?:md|py))\b")
    missing = set()
    for path in tracked_text_files():
        for match in named.finditer(path.read_text(encoding="utf-8", errors="replace")):
            if not (ROOT / match.group(1)).exists():
                missing.add(f"{path.relative_to(ROOT)} names {match.group(1)}")
    assert not missing, sorted(missing)

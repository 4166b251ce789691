"""Training text: the Python standard library's own sources (on every machine with Python, no
download), or the user's files and folders."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def default_corpus_files() -> list[Path]:
    """Every ``*.py`` file at the top of the standard library folder, sorted (deterministic)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def corpus_files(paths: list[str]) -> list[Path]:
    """Files named by ``paths`` (folders contribute their ``*.py`` / ``*.txt`` / ``*.md``
    files, recursively); the default corpus when ``paths`` is empty.

    Raises ``FileNotFoundError`` naming a path that does not exist, ``ValueError`` when no file
    is found.
    """
    if not paths:
        return default_corpus_files()
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"--data: {raw} does not exist")
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".py", ".txt", ".md"))
        else:
            files.append(p)
    if not files:
        raise ValueError(f"--data: no text files found in {paths}")
    return files


def read_text(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]

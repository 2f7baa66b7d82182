"""Where the files that ship with rnnc live (grammar, spec library).

Installed, `grammar/` and `specs/` sit inside the `rnnc` package; in a source checkout they
sit beside it. Both layouts are looked up so tests and tools run from either.
"""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for base in (_HERE, _HERE.parent):
        candidate = base / name
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"rnnc installation is missing its '{name}' folder (looked in {_HERE})")


def grammar_file() -> Path:
    return _find("grammar") / "rnnc.lark"


def specs_dir() -> Path:
    return _find("specs")

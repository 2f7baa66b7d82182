"""rnnc: a compiler for recurrent neural-network cells.

    import rnnc
    cell = rnnc.build("lstm", I=32, H=64)     # a torch.nn.Module
    y, final = cell(x)                         # x: [B, T, I]
"""
from pathlib import Path as _Path

# In a source checkout, backends/ (and grammar/, specs/) sit beside this directory; installed, setuptools'
# package-dir puts them inside it (pyproject.toml). Searching the checkout's root for subpackages too makes
# `rnnc.backends` import from a checkout that shadows the installed package (`python -c "import rnnc"` in
# the repository root after a non-editable install) or with no install at all.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "backends").is_dir() and (_root / "backends" / "__init__.py").is_file():
    __path__.append(str(_root))
del _Path, _root

from .api import analyze, backends_for, build, compile, graph_dot, graph_svg, library, load, parse
from .errors import (ArityError, BuildError, Diagnostic, DimError, InputError, InternalError, Note, NumberError,
                     RnncError, RnncSyntaxError, RnncWarning, ShapeError,
                     SpecNotFoundError, StateError, TypeError_, UnknownNameError, UnsupportedError)
from .program import Program

__version__ = "0.1.0"


__all__ = [
    "nn", "layers", "distributed", "SequenceParallel", "parse", "load", "library", "analyze", "build", "compile", "graph_dot", "graph_svg", "backends_for", "Program",
    "RnncError", "RnncSyntaxError", "UnknownNameError", "ShapeError", "DimError", "StateError", "ArityError",
    "TypeError_", "UnsupportedError", "SpecNotFoundError", "BuildError", "InputError", "InternalError", "NumberError",
    "RnncWarning", "Diagnostic", "Note",
]


def __getattr__(name: str):
    """`rnnc.nn` (the torch.nn drop-ins), `rnnc.layers` and `rnnc.distributed` (with `rnnc.SequenceParallel`)
    import torch: loaded on first use, so that compiling does not."""
    import importlib

    if name in ("nn", "layers", "distributed"):
        return importlib.import_module("." + name, __name__)
    if name == "SequenceParallel":
        return importlib.import_module(".distributed", __name__).SequenceParallel
    raise AttributeError(f"module 'rnnc' has no attribute {name!r}")

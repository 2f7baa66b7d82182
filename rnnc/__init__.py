"""rnnc: a compiler for recurrent neural-network cells.

    import rnnc
    cell = rnnc.build("lstm", I=32, H=64)     # a torch.nn.Module
    y, final = cell(x)                         # x: [B, T, I]
"""
from .api import analyze, backends_for, build, compile, graph_dot, graph_svg, library, load, parse
from .errors import (ArityError, BuildError, DimError, InputError, InternalError, RnncError, RnncSyntaxError, ShapeError,
                     SpecNotFoundError, StateError, TypeError_, UnknownNameError, UnsupportedError)
from .program import Program

__version__ = "0.1.0"

__all__ = [
    "parse", "load", "library", "analyze", "build", "compile", "graph_dot", "graph_svg", "backends_for", "Program",
    "RnncError", "RnncSyntaxError", "UnknownNameError", "ShapeError", "DimError", "StateError", "ArityError",
    "TypeError_", "UnsupportedError", "SpecNotFoundError", "BuildError", "InputError", "InternalError",
]

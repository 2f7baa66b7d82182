"""A bound on how deeply an expression nests, checked right after parsing, without recursion.

Elaboration (and the shape and index arithmetic) walks an expression recursively, so nesting such as
`-(-(-(... x)))` or `tanh(tanh(... x))` thousands deep would otherwise end in Python's RecursionError,
reported without a place. Here it is an RnncSyntaxError at the first operand past the limit.
Depth counts as elaboration recurses: a call, an operator or an index adds a level to its operands,
except along the left spine of a chain of binary operators (`x + x + ... + x` elaborates in constant
depth, so a long flat sum is fine); inside shapes and index items (integer arithmetic, evaluated
recursively on both sides) every operator adds a level.
"""
from __future__ import annotations

from dataclasses import fields, is_dataclass

from . import ast
from .errors import RnncSyntaxError

#: How deeply an expression may nest (parentheses alone do not count: `((x))` is `x`).
MAX_NESTING = 100

_EXPR = (ast.Number, ast.Name, ast.Call, ast.BinOp, ast.UnaryOp, ast.Slice, ast.Index, ast.Literal, ast.Tuple,
         ast.DimBin, ast.DimNum, ast.DimName)
#: Fields holding integer arithmetic (sizes, index items), evaluated recursively on both operands.
_DIM_FIELDS = {ast.Port: "shape", ast.ParamDecl: "shape", ast.StateDecl: "shape", ast.DimDecl: "default",
               ast.Index: "items"}


def check(module: ast.Module) -> None:
    """Raise RnncSyntaxError if an expression of `module` nests more than MAX_NESTING deep."""
    stack: list[tuple[object, int, bool]] = [(module, 0, False)]
    while stack:
        node, depth, dims = stack.pop()
        if isinstance(node, (list, tuple)):
            stack.extend((item, depth, dims) for item in node)
            continue
        if isinstance(node, dict):
            stack.extend((item, depth, dims) for item in node.values())
            continue
        if not is_dataclass(node):
            continue
        if isinstance(node, _EXPR):
            if depth >= MAX_NESTING:
                raise RnncSyntaxError(f"expression nested more than {MAX_NESTING} deep", node.loc,
                                      "split it into several `let` bindings (or defs)")
            inner = depth + 1
        else:
            inner = depth
        for f in fields(node):
            child = getattr(node, f.name)
            if f.name == "loc" or child is None or isinstance(child, (str, int, float)):
                continue
            if _DIM_FIELDS.get(type(node)) == f.name:
                stack.append((child, inner, True))
            elif f.name == "left" and isinstance(node, ast.BinOp) and isinstance(child, ast.BinOp) and not dims:
                stack.append((child, depth, dims))  # the left spine of a chain: no deeper
            else:
                stack.append((child, inner, dims))

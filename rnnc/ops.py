"""The typing rules of the IR's ops (per-step shapes and dtypes); the ops are rnnc/registry.py's.

Each rule takes the operand Nodes and attributes and returns the result's (shape, dtype), or
raises an RnncError naming the shapes involved. The elaborator uses these to build typed nodes;
the backends only ever see nodes that passed them.
"""
from __future__ import annotations

import sympy

from . import dims as D
from . import registry
from .errors import Loc, ShapeError, TypeError_, UnsupportedError
from .ir import Node

# Op-name sets the elaborator reads, derived from the registry (rnnc/registry.py).
UNARY = registry.builtin_names("unary")
#: Unary functions that Python's math module computes, so they stay compile-time scalars.
MATH_UNARY = registry.names("unary", scalar=True)
ARITH = registry.names("arith", arity=2)
COMPARE = registry.names("compare")
LOGIC = registry.names("logic", arity=2)
REDUCE = registry.builtin_names("reduce")

BINOP_NAMES = registry.symbols()
SYMBOL = {p.name: p.symbol for p in registry.prims() if p.symbol}  # for messages: '-' rather than 'neg'


def _need_float(n: Node, what: str, loc: Loc | None) -> None:
    if n.dtype == "bool":
        raise TypeError_(f"{what} needs numbers but got a boolean", loc,
                         "turn a condition into a number with where(cond, 1, 0)")
    if n.dtype == "tuple":
        raise TypeError_(f"{what} got several values (from split or a def)", loc,
                         "destructure them first: let a, b = ...")


def _need_bool(n: Node, what: str, loc: Loc | None) -> None:
    if n.dtype != "bool":
        raise TypeError_(f"{what} needs a boolean (a comparison) but got a number", loc,
                         "compare it, e.g. x > 0")


def broadcast_all(nodes: list[Node], what: str, loc: Loc | None) -> D.Shape:
    shape: D.Shape = ()
    for n in nodes:
        out = D.broadcast(shape, n.shape)
        if out is None:
            shapes = " and ".join(D.fmt_shape(m.shape) for m in nodes)
            raise ShapeError(f"shapes {shapes} do not broadcast in {what}", loc,
                             "broadcasting aligns shapes from the right; sizes must match or be 1")
        shape = out
    return shape


def elementwise(op: str, args: list[Node], loc: Loc | None) -> tuple[D.Shape, str]:
    what = f"'{SYMBOL.get(op, op)}'"
    prim = registry.get(op)
    if prim.kind == "logic":
        for a in args:
            _need_bool(a, what, loc)
        return broadcast_all(args, what, loc), "bool"
    if prim.kind == "select":
        _need_bool(args[0], "where's condition", loc)
        for a in args[1:]:
            _need_float(a, "where's values", loc)
        return broadcast_all(args, "where", loc), "float"
    for a in args:
        _need_float(a, what, loc)
    return broadcast_all(args, what, loc), prim.out


def matmul(a: Node, b: Node, loc: Loc | None) -> D.Shape:
    _need_float(a, "'@'", loc)
    _need_float(b, "'@'", loc)
    ra, rb = len(a.shape), len(b.shape)
    if ra == 0 or rb == 0:
        raise ShapeError(f"'@' needs vectors or matrices, got {D.fmt_shape(a.shape)} @ {D.fmt_shape(b.shape)}",
                         loc, "use '*' to scale by a scalar")
    if ra > 2 or rb > 2:
        raise UnsupportedError(
            f"'@' on rank-{max(ra, rb)} values ({D.fmt_shape(a.shape)} @ {D.fmt_shape(b.shape)}) is not supported",
            loc, "write it with broadcasting and sum(..., axis=k)")
    if not D.equal(a.shape[-1], b.shape[0]):
        raise ShapeError(
            f"'@' inner sizes differ: {D.fmt_shape(a.shape)} @ {D.fmt_shape(b.shape)} "
            f"({D.fmt(a.shape[-1])} vs {D.fmt(b.shape[0])})", loc,
            "the last axis of the left operand must match the first axis of the right one")
    return a.shape[:-1] + b.shape[1:]


def outer(a: Node, b: Node, loc: Loc | None) -> D.Shape:
    for n in (a, b):
        _need_float(n, "outer", loc)
        if len(n.shape) != 1:
            raise ShapeError(f"outer needs two vectors, got {D.fmt_shape(a.shape)} and {D.fmt_shape(b.shape)}", loc,
                             "use broadcasting (a[:, None] * b) for other ranks")
    return (a.shape[0], b.shape[0])


def norm_axis(axis: int, rank: int, what: str, loc: Loc | None) -> int:
    if not -rank <= axis < rank:
        raise ShapeError(f"{what}: axis {axis} is out of range for a rank-{rank} value", loc,
                         f"axes run from {-rank} to {rank - 1}" if rank else "a scalar has no axes")
    return axis % rank


def reduce(x: Node, axis: int | None, fn: str, loc: Loc | None) -> tuple[D.Shape, int | None]:
    _need_float(x, fn, loc)
    if axis is None:
        return (), None
    ax = norm_axis(axis, len(x.shape), fn, loc)
    return x.shape[:ax] + x.shape[ax + 1:], ax


def concat(args: list[Node], axis: int, loc: Loc | None) -> tuple[D.Shape, int]:
    for a in args:
        _need_float(a, "concat", loc)
    rank = len(args[0].shape)
    shapes = ", ".join(D.fmt_shape(a.shape) for a in args)
    if any(len(a.shape) != rank for a in args):
        raise ShapeError(f"concat needs values of one rank, got {shapes}", loc, "index or broadcast them first")
    ax = norm_axis(axis, rank, "concat", loc)
    for a in args:
        for i in range(rank):
            if i != ax and not D.equal(a.shape[i], args[0].shape[i]):
                raise ShapeError(f"concat along axis {axis}: other axes differ in {shapes}", loc,
                                 "all sizes except the concatenated axis must match")
    total = sum((a.shape[ax] for a in args), D.const(0))
    return args[0].shape[:ax] + (total,) + args[0].shape[ax + 1:], ax


def transpose(x: Node, loc: Loc | None) -> D.Shape:
    _need_float(x, "transpose", loc)
    if len(x.shape) < 2:
        raise ShapeError(f"transpose needs a matrix, got {D.fmt_shape(x.shape)}", loc,
                         "a vector needs no transpose: x @ A and A @ x both work")
    return x.shape[:-2] + (x.shape[-1], x.shape[-2])


def index(x: Node, items: tuple) -> D.Shape:
    """The shape of x[items] (items as the elaborator writes them: int, slice, new, ellipsis)."""
    shape, out, axis = x.shape, [], 0
    consumed = sum(1 for it in items if it[0] in ("int", "slice"))
    for it in items:
        if it[0] == "new":
            out.append(D.ONE)
        elif it[0] == "ellipsis":
            n = len(shape) - consumed
            out.extend(shape[axis:axis + n])
            axis += n
        elif it[0] == "slice":
            out.append(sympy.expand(it[2] - it[1]))
            axis += 1
        else:
            axis += 1
    if axis > len(shape):
        raise ShapeError(f"too many indices for a value of shape {D.fmt_shape(shape)}", None, "")
    return tuple(out) + tuple(shape[axis:])


def pad(x: Node, widths: tuple, loc: Loc | None) -> D.Shape:
    """The shape of x with (before, after) zeros added per axis (the adjoint of an index)."""
    _need_float(x, "pad", loc)
    if len(widths) != len(x.shape):
        raise ShapeError(f"pad needs one (before, after) per axis of {D.fmt_shape(x.shape)}", loc, "")
    return tuple(sympy.expand(d + lo + hi) for d, (lo, hi) in zip(x.shape, widths))

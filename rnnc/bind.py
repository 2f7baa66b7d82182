"""Checks that need the sizes given to build(): symbolic shapes that go wrong only for some dims.

`x[5]` on an `[H]` input type-checks (H might be 8) but not with H = 3; `[2 - H]` is a size
only for H = 1. With the dims bound at build time these become errors pointing at the source,
instead of an IndexError from the generated module later. Dims inferred from the inputs at
call time are not known here; the generated module checks the inputs' shapes then.
"""
from __future__ import annotations

import os

import sympy

from . import constants
from . import dims as D
from .errors import BuildError, DimError, NumberError, ShapeError
from .ir import Cell


def _value(d: D.Dim, env: dict) -> int | None:
    if not d.free_symbols <= set(env):
        return None
    v = d.subs(env)
    return int(v) if v.is_Integer else None


#: The most parameter elements build() allocates (2^32: 16 GiB in float32); $RNNC_MAX_PARAMS overrides it.
MAX_PARAMS = 2**32


def max_params() -> int:
    raw = os.environ.get("RNNC_MAX_PARAMS")
    if not raw:
        return MAX_PARAMS
    try:
        return int(float(raw))
    except ValueError:
        raise BuildError(f"RNNC_MAX_PARAMS={raw!r} is not a number", hint="e.g. RNNC_MAX_PARAMS=1e10") from None


def check_bound_dims(cell: Cell, dims: dict[str, int]) -> None:
    env = {D.symbol(k): sympy.Integer(v) for k, v in dims.items()}
    for d in cell.dims.values():  # in order: a default that reads other dims (`dim M = 2*N`) comes after them
        if d.default is not None and D.symbol(d.name) not in env:
            value = _value(d.default, env)
            if value is not None and value < 1:
                raise DimError(f"dim {d.name} = {D.fmt(d.default)} is {value}, not a positive size", d.loc,
                               "check the dims passed to build()")
            if value is not None:
                env[D.symbol(d.name)] = sympy.Integer(value)
    given = ", ".join(f"{k}={v}" for k, v in dims.items()) or "the defaults"
    _check_param_total(cell, env, given)

    def sizes(shape, loc, what):
        for d in shape:
            v = _value(d, env)
            if v is not None and v < 1:
                raise DimError(f"{what} has size {D.fmt(d)} = {v} with {given}", loc,
                               "every size must be at least 1; check the dims passed to build()")

    _check_constants(cell, env)
    for p in cell.inputs + cell.outputs:
        sizes(p.shape, p.loc, f"'{p.name}'")
    for p in cell.params:
        sizes(p.shape, p.loc, f"param '{p.name}'")
    for s in cell.states:
        sizes(s.shape, s.loc, f"state '{s.name}'")
    g = cell.graph
    for nid in cell.live():
        node = g[nid]
        sizes(node.shape, node.loc, "a value")
        if node.op != "index":
            continue
        src = g[node.args[0]].shape
        axis = 0
        consumed = sum(1 for it in node.attrs["items"] if it[0] in ("int", "slice"))
        for item in node.attrs["items"]:
            kind = item[0]
            if kind == "ellipsis":
                axis += len(src) - consumed
                continue
            if kind == "new":
                continue
            size = _value(src[axis], env)
            if kind == "int":
                i = _value(item[1], env)
                if size is not None and i is not None and not 0 <= i < size:
                    raise ShapeError(f"index {D.fmt(item[1])} = {i} is out of range for an axis of size "
                                     f"{D.fmt(src[axis])} = {size} with {given}", node.loc,
                                     f"valid indices run from 0 to {size - 1}")
            else:
                lo, hi = _value(item[1], env), _value(item[2], env)
                if size is not None and lo is not None and hi is not None and not 0 <= lo < hi <= size:
                    raise ShapeError(f"slice {D.fmt(item[1])}:{D.fmt(item[2])} = {lo}:{hi} does not fit an axis of "
                                     f"size {D.fmt(src[axis])} = {size} with {given}", node.loc,
                                     "a slice must select at least one element inside the axis")
            axis += 1


def _check_constants(cell: Cell, env: dict) -> None:
    """Evaluate the compile-time scalars that read a dim (`2.0 ** H`, `exp(H)`, `1 / (H - 4)`) with the
    dims now bound, in the step and in the params' initialisers, as constants.check does for those made
    of numbers alone when the spec is checked: a NumberError at the expression names the dims, instead
    of an OverflowError (or an inf) when the cell runs."""
    bound = {name: v for name in cell.dims if (v := _value(D.symbol(name), env)) is not None}
    if not bound:
        return
    given = ", ".join(f"{name}={v}" for name, v in bound.items())
    for graph, nodes in ((cell.graph, cell.live()), (cell.init_graph, cell.init_graph.ids())):
        values: dict[int, object] = {}
        for nid in graph.order(nodes):
            if not graph[nid].scalar:
                continue
            try:
                constants.check(graph, nid, values, bound, given)
            except NumberError as e:
                raise NumberError(e.message, e.loc, "its value depends on the dims given to build() (or their "
                                  "defaults): use other dims, or rewrite it to stay finite (e.g. in log space)") from None


def _check_param_total(cell: Cell, env: dict, given: str) -> None:
    """A BuildError, before anything is allocated, when the params would exceed max_params()
    elements; it names the largest param, its shape and the dims that size it. A dim not bound
    yet counts as 1 (a lower bound: `[4*H, H]` alone can exceed the limit)."""
    limit = max_params()
    env = {D.symbol(n): sympy.Integer(1) for n in cell.dims} | env
    total, largest = 0, None
    for p in cell.params:
        size = 1
        for d in p.shape:
            v = _value(d, env)
            size *= max(v or 0, 0)
        total += size
        if largest is None or size > largest[1]:
            largest = (p, size)
    if total <= limit:
        return
    p, size = largest
    names = sorted({n for d in p.shape for n in D.free_names(d)})
    shape = ", ".join(D.fmt(d) for d in p.shape)
    raise BuildError(f"the params would hold {total:,} elements with {given}, over the limit of {limit:,}: "
                     f"param '{p.name}': [{shape}] alone has {size:,}"
                     + (f" (dim {', '.join(names)})" if names else ""), p.loc,
                     f"use a smaller {' or '.join(names) or 'shape'}, or raise the limit with RNNC_MAX_PARAMS "
                     "(elements) if the memory is really there")

"""The loop stage of a cell as a tile program: what the fused recurrent kernel computes per step.

Triton cannot slice a tensor held in registers, so `lower` rewrites the per-step ops into tiles
in which every split, slice, integer index and concat is pushed down to the loads:
`split(W @ h + b, 4)[1]` becomes `W[H:2H, :] @ h + b[H:2H]`, and `A @ concat(u, w)` becomes
`A[:, :n] @ u + A[:, n:] @ w`; a matrix product whose left side is built from eye, sums, scalings
and outer products is distributed, so the delta rule's `(I - b k kᵀ) @ S` becomes `S - b k (kᵀ S)`
with no [K, K, V] block; per-step outer products (b k vᵀ) are formed in the kernel from their
vectors rather than loaded. Each tile is one register value with symbolic sizes; its op is an
elementwise op of elementwise.py, a contraction (mv, vm, mm, dot, outer), a reduction, an axis
change (expand, squeeze, trans, bcast), a leaf load (a view of a value computed outside the
recurrence) or a state. A concat that is an output is kept in its parts, which the kernel stores
apart. A cell that slices a state itself (nothing to push the slice into), uses a concat whole
inside the step, or uses an op with no tile form, raises NotFusable with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy

from rnnc import dims as D
from rnnc.ir import Graph

from .elementwise import BINARY, UNARY

#: The reductions the kernel computes itself (the others make a cell not fusable).
REDUCE = {"sum", "mean"}


class NotFusable(Exception):
    """The recurrent kernel cannot compute this cell (the message says which op and why)."""


View = tuple  # ((offset, size), ...) per axis, sympy expressions in the dims


@dataclass
class Tile:
    """One value in the kernel: `op` over earlier tiles, `shape` its (logical) sizes per axis."""

    op: str
    args: tuple[int, ...]
    shape: tuple
    attrs: dict = field(default_factory=dict)


@dataclass
class TileProgram:
    """The loop stage as tiles: `leaves` are the IR nodes read from memory (hoisted per step,
    or constant), `outputs`/`states` map to the tiles holding each step's results."""

    tiles: list[Tile]
    leaves: list[int]
    per_step: list[bool]
    states: list[int]  # tile of each state's new value, in cell.states order
    #: loop-stage output name -> its tiles, each with the region (view) of the output it fills:
    #: several when the output is a concat, which the kernel stores part by part
    outputs: dict[str, list[tuple[View, int]]]


def _full(shape: tuple) -> View:
    return tuple((sympy.Integer(0), s) for s in shape)


class _Lowering:
    def __init__(self, g: Graph, stages: dict[int, str], state_in: dict[int, int]) -> None:
        self.g, self.stages, self.state_in = g, stages, state_in
        self.tiles: list[Tile] = []
        self.memo: dict[tuple, int] = {}
        self.lowered: dict[tuple, int] = {}  # (node, view) -> tile: a shared node is lowered once
        self.outer: dict[int, bool] = {}  # node -> _outer_product(node), likewise
        self.leaves: list[int] = []

    def add(self, op: str, args: tuple, shape: tuple, **attrs) -> int:
        key = (op, args, tuple(D.fmt(s) for s in shape), repr(sorted(attrs.items())))
        if key not in self.memo:
            self.tiles.append(Tile(op, tuple(args), tuple(shape), attrs))
            self.memo[key] = len(self.tiles) - 1
        return self.memo[key]

    def full(self, nid: int) -> int:
        return self.lower(nid, _full(self.g[nid].shape))

    def parts(self, nid: int) -> list[tuple[View, int]]:
        """The tiles making up node `nid` whole, each with the region it fills: a concat computed in
        the step is left in its parts (Triton cannot join register tensors; they are stored apart)."""
        node = self.g[nid]
        if node.op != "concat" or self.stages.get(nid) != "loop":
            return [(_full(node.shape), self.full(nid))]
        axis, start, out = node.attrs["axis"], sympy.Integer(0), []
        for part in node.args:
            out += [(_shift(view, axis, start), t) for view, t in self.parts(part)]
            start = start + self.g[part].shape[axis]
        return out

    def lower(self, nid: int, view: View) -> int:
        """The tile of node `nid` restricted to `view` (offsets and sizes per axis); memoised, since
        walking shared subexpressions as a tree takes time exponential in their nesting."""
        key = (nid, view)
        if key not in self.lowered:
            self.lowered[key] = self._lower(nid, view)
        return self.lowered[key]

    def _lower(self, nid: int, view: View) -> int:
        node = self.g[nid]
        sizes = tuple(z for _, z in view)
        whole = all(D.equal(o, 0) and D.equal(z, s) for (o, z), s in zip(view, node.shape))
        if self.stages.get(nid, "const") != "loop" and not self._outer_product(nid):
            if node.op == "const" and not node.args and math.isfinite(float(node.attrs["value"])):
                return self.add("num", (), (), value=float(node.attrs["value"]))
            if node.dtype != "float":
                raise NotFusable(f"a {node.dtype} value computed outside the recurrence (%{nid})")
            if nid not in self.leaves:
                self.leaves.append(nid)
            return self.add("leaf", (), sizes, leaf=self.leaves.index(nid), view=view)
        op = node.op
        if op == "state":
            if not whole:
                raise NotFusable(f"a slice of state '{node.name}' (the kernel holds states whole)")
            return self.add("state", (), sizes, state=self.state_in[nid])
        if op == "item":
            (src,) = node.args
            split = self.g[src]
            axis, i = split.attrs["axis"], node.attrs["index"]
            start = sum(split.attrs["sizes"][:i], sympy.Integer(0))
            return self.lower(split.args[0], _shift(view, axis, start))
        if op == "index":
            return self._index(node, view)
        if op == "concat":
            return self._concat(node, view)
        if op == "matmul":
            return self._matmul(node, view)
        if op == "outer":
            a, b = node.args
            return self.add("outer", (self.lower(a, (view[0],)), self.lower(b, (view[1],))), sizes)
        if op == "transpose":
            (x,) = node.args
            if len(node.shape) != 2:
                raise NotFusable("transpose of a value of rank other than 2")
            return self.add("trans", (self.lower(x, (view[1], view[0])),), sizes)
        if op == "reduce":
            return self._reduce(node, view)
        if op == "broadcast":
            (x,) = node.args
            t = self.lower(x, _operand_view(self.g[x].shape, node.shape, view))
            return t if _same(self.tiles[t].shape, sizes) else self.add("bcast", (t,), sizes)
        if op in UNARY or op in BINARY or op == "where":
            args = tuple(self.lower(a, _operand_view(self.g[a].shape, node.shape, view)) for a in node.args)
            shape = _broadcast([self.tiles[a].shape for a in args])
            t = self.add(op, args, shape)
            return t if _same(shape, sizes) else self.add("bcast", (t,), sizes)
        raise NotFusable(f"op '{op}' in the recurrence")

    def _outer_product(self, nid: int) -> bool:
        """A per-step value built by an outer product (k vᵀ, b k vᵀ): computed in the kernel from its
        vectors, not loaded as a [T, N, K, V] tensor."""
        if nid not in self.outer:
            node = self.g[nid]
            self.outer[nid] = self.stages.get(nid) == "hoist" and (node.op == "outer" or (
                node.op in ("mul", "add", "sub") and any(self._outer_product(a) for a in node.args)
                and all(self.g[a].dtype == "float" for a in node.args)))
        return self.outer[nid]

    def _index(self, node, view: View) -> int:
        (x,) = node.args
        src_shape = self.g[x].shape
        src: list = []
        new_axes, int_axes = [], []
        axis = out = 0
        items = list(node.attrs["items"])
        consumed = sum(1 for it in items if it[0] in ("int", "slice"))
        for it in items:
            if it[0] == "new":
                new_axes.append(out)
                out += 1
            elif it[0] == "ellipsis":
                for _ in range(len(src_shape) - consumed):
                    src.append(view[out])
                    axis, out = axis + 1, out + 1
            elif it[0] == "slice":
                o, z = view[out]
                src.append((it[1] + o, z))
                axis, out = axis + 1, out + 1
            else:
                int_axes.append(len(src))
                src.append((it[1], sympy.Integer(1)))
                axis += 1
        while axis < len(src_shape):
            src.append(view[out])
            axis, out = axis + 1, out + 1
        t = self.lower(x, tuple(src))
        for k, ax in enumerate(int_axes):  # drop the size-1 axes of integer indices, right to left
            ax_now = ax - k
            shape = self.tiles[t].shape
            t = self.add("squeeze", (t,), shape[:ax_now] + shape[ax_now + 1:], axis=ax_now)
        for ax in new_axes:
            shape = self.tiles[t].shape
            t = self.add("expand", (t,), shape[:ax] + (sympy.Integer(1),) + shape[ax:], axis=ax)
        return t

    def _concat(self, node, view: View) -> int:
        axis = node.attrs["axis"]
        o, z = view[axis]
        start = sympy.Integer(0)
        for part in node.args:
            size = self.g[part].shape[axis]
            if nonneg(o - start) and nonneg(start + size - o - z):
                return self.lower(part, _shift(view, axis, -start))
            start = start + size
        at = f" (line {node.loc.line})" if node.loc else ""
        if all(D.equal(o, 0) and D.equal(z, s) for (o, z), s in zip(view, node.shape)):
            raise NotFusable(f"a concat{at} used whole inside the step: the kernel cannot join register tiles, so a "
                             "concat is fused only where its parts are read apart (sliced or split, times a matrix, "
                             "or as an output)")
        raise NotFusable(f"a slice across the parts of a concat{at}")

    def _matmul(self, node, view: View) -> int:
        a, b = node.args
        ra, rb = len(self.g[a].shape), len(self.g[b].shape)
        k = self.g[a].shape[-1]
        vec = b if rb == 1 else a if ra == 1 else None
        if vec is not None and self.g[vec].op == "concat" and self.stages.get(vec) == "loop":
            # A @ concat(u, w) = A[:, :n] @ u + A[:, n:] @ w: the concat never forms
            total, start = None, sympy.Integer(0)
            for part in self.g[vec].args:
                n = self.g[part].shape[0]
                piece = self._contract(a if vec == b else part, b if vec == a else part, ra, rb, view,
                                       (start, n), vec == b)
                total = piece if total is None else self.add("add", (total, piece), self.tiles[piece].shape)
                start = start + n
            return total
        if ra == 2 and rb == 2:
            t = self._apply(a, b, view)
            if t is not None:
                return t
        return self._contract(a, b, ra, rb, view, (sympy.Integer(0), k), None)

    def _apply(self, a: int, b: int, view: View) -> int | None:
        """a @ b without forming a [M, K, N] product, when a is built from eye, sums, scalings and
        outer products: (I - beta k kᵀ) S = S - beta k (kᵀ S), the delta rule's update. None when a
        is anything else (then the generic product)."""
        node = self.g[a]
        sizes = tuple(z for _, z in view)
        if node.op == "eye":
            return self.lower(b, view)
        if node.op in ("add", "sub") and all(len(self.g[x].shape) == 2 for x in node.args):
            parts = [self._apply(x, b, view) for x in node.args]
            return None if None in parts else self.add(node.op, tuple(parts), sizes)
        if node.op == "mul":
            scalars = [x for x in node.args if not self.g[x].shape]
            mats = [x for x in node.args if len(self.g[x].shape) == 2]
            if len(scalars) == 1 and len(mats) == 1:
                inner = self._apply(mats[0], b, view)
                return None if inner is None else self.add("mul", (self.full(scalars[0]), inner), sizes)
        if node.op == "outer":  # (u wᵀ) b = u (wᵀ b)
            u, w = node.args
            kv = (sympy.Integer(0), self.g[w].shape[0])
            wb = self.add("vm", (self.full(w), self.lower(b, (kv, view[1]))), (view[1][1],))
            return self.add("outer", (self.lower(u, (view[0],)), wb), sizes)
        return None

    def _contract(self, a: int, b: int, ra: int, rb: int, view: View, kv: tuple, part_is_b: bool | None) -> int:
        """One matmul a @ b over the contraction range kv (offset, size); when part_is_b is set,
        that operand is one part of a concat, read whole."""
        def operand(nid: int, v: View, is_part: bool) -> int:
            return self.full(nid) if is_part else self.lower(nid, v)

        sizes = tuple(z for _, z in view)
        if ra == 2 and rb == 1:
            return self.add("mv", (operand(a, (view[0], kv), False), operand(b, (kv,), part_is_b is True)), sizes)
        if ra == 1 and rb == 2:
            return self.add("vm", (operand(a, (kv,), part_is_b is False), operand(b, (kv, view[0]), False)), sizes)
        if ra == 2 and rb == 2:
            return self.add("mm", (self.lower(a, (view[0], kv)), self.lower(b, (kv, view[1]))), sizes)
        return self.add("dot", (operand(a, (kv,), part_is_b is False), operand(b, (kv,), part_is_b is True)), sizes)

    def _reduce(self, node, view: View) -> int:
        fn, axis = node.attrs["fn"], node.attrs["axis"]
        if fn not in REDUCE:
            raise NotFusable(f"reduction '{fn}' in the recurrence (sum and mean are fused)")
        (x,) = node.args
        shape = self.g[x].shape
        if axis is None:
            t = self.full(x)
            for _ in shape:
                t = self.add("sum", (t,), self.tiles[t].shape[1:], axis=0, size=self.tiles[t].shape[0])
            n = sympy.prod(shape) if shape else sympy.Integer(1)
        else:
            src = view[:axis] + ((sympy.Integer(0), shape[axis]),) + view[axis:]
            t = self.lower(x, src)
            shape_t = self.tiles[t].shape
            t = self.add("sum", (t,), shape_t[:axis] + shape_t[axis + 1:], axis=axis, size=shape[axis])
            n = shape[axis]
        if fn == "mean":
            t = self.add("scale", (t,), self.tiles[t].shape, by=n)
        return t


def nonneg(e) -> bool:
    """Whether a dim expression is provably >= 0 (dims are positive integers)."""
    return (sympy.expand(e) >= 0) is sympy.true


def _shift(view: View, axis: int, start) -> View:
    """`view` with its offset along `axis` moved by `start` (a part's view as the whole's, or back)."""
    out = list(view)
    o, z = view[axis]
    out[axis] = (sympy.expand(o + start), z)
    return tuple(out)


def _operand_view(shape: tuple, out_shape: tuple, view: View) -> View:
    """The part of a broadcast operand that a view of the result reads (right-aligned axes)."""
    lead = len(out_shape) - len(shape)
    return tuple((sympy.Integer(0), s) if D.equal(s, 1) and not D.equal(out_shape[lead + i], 1)
                 else view[lead + i] for i, s in enumerate(shape))


def _broadcast(shapes: list[tuple]) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        sizes = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        big = [z for z in sizes if not D.equal(z, 1)]
        out.append(big[0] if big else sympy.Integer(1))
    return tuple(out)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(D.equal(x, y) for x, y in zip(a, b))


def lower(cell, stages: dict[int, str]) -> TileProgram:
    """The tile program of the cell's loop stage; NotFusable when some op cannot be fused."""
    g = cell.graph
    if not cell.states:  # every value is hoisted: there is no step-to-step work for a kernel
        raise NotFusable("the cell has no state, so nothing runs step by step")
    lw = _Lowering(g, stages, {s.node_in: i for i, s in enumerate(cell.states)})
    states = []
    for s in cell.states:
        if g[s.node_out].dtype != "float" or not s.shape:
            raise NotFusable(f"state '{s.name}' is a scalar or not a float (the kernel holds vectors and matrices)")
        states.append(lw.full(s.node_out))
    outputs = {o.name: lw.parts(o.node) for o in cell.outputs if stages.get(o.node) == "loop"}
    per_step = [stages.get(n) == "hoist" for n in lw.leaves]
    return TileProgram(lw.tiles, lw.leaves, per_step, states, outputs)

"""Typed construction of IR nodes, for code that writes graphs rather than parses them.

Derivative rules (rnnc/derivatives.py, the registry's records) build their results through a
`Builder`: each method adds one typed Node (shape and dtype from ops.py's typing rules, so a
rule that gets a shape wrong fails where it is written), reuses an equal node the graph already
has (common subexpressions are shared, with the forward graph too: a rule asking for
`sigmoid(x)` gets the forward's node), and folds the identities rules produce all the time
(x * 1, x + 0, --x, arithmetic on two numbers, g * where(c, 1, 0) -> where(c, g, 0)), so that a
derivative graph is about as small as one written by hand. A Python float may stand for a node
anywhere (ints are node ids); it becomes a `const` node, like a number in a spec.
"""
from __future__ import annotations

from typing import Iterable, Union

import sympy

from . import dims as D
from . import ops, registry
from .ir import Graph, Node

Ref = Union[int, float]  # a node id (int), or a number (float) that becomes a `const` node
Item = tuple  # one index item: ("int", i) | ("slice", lo, hi) | ("new",) | ("ellipsis",)

#: Leaves that stand for a value bound by name: never merged with another node of the same op.
_BOUND = frozenset({"input", "param", "state"})
_FOLD = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
         "div": lambda a, b: a / b, "neg": lambda a: -a}


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def node_key(node: Node) -> tuple:
    """What makes two nodes the same value: op, operands, attributes, dtype, scalar-ness."""
    return node.op, node.args, _freeze(node.attrs), node.dtype, node.scalar


class Builder:
    """Adds typed, shared nodes to `graph` (see the module docstring)."""

    def __init__(self, graph: Graph, share: Iterable[int] | None = None) -> None:
        """`share`: the graph's nodes a new node may be merged with (all by default)."""
        self.graph = graph
        self._memo: dict[tuple, int] = {}
        for nid in graph.ids() if share is None else sorted(share):
            if graph[nid].op not in _BOUND:
                self._memo.setdefault(node_key(graph[nid]), nid)

    # ---- basics ------------------------------------------------------------------------
    def node(self, op: str, args: tuple[int, ...], shape: D.Shape, dtype: str = "float", scalar: bool = False,
             attrs: dict | None = None) -> int:
        """`op(*args)`, or the equal node the graph already holds."""
        n = Node(op, tuple(args), tuple(shape), dtype, attrs=attrs or {}, scalar=scalar)
        key = node_key(n)
        if op in _BOUND or key not in self._memo:
            nid = self.graph.add(n)
            if op not in _BOUND:
                self._memo[key] = nid
            return nid
        return self._memo[key]

    def _num(self, value: float) -> int:
        return self.node("const", (), (), scalar=True, attrs={"value": value})

    def number(self, nid: int) -> float | None:
        """The value of a `const` node (None for anything else)."""
        n = self.graph[nid]
        return n.attrs["value"] if n.op == "const" else None

    def shape(self, nid: int) -> D.Shape:
        return self.graph[nid].shape

    def rank(self, nid: int) -> int:
        return len(self.graph[nid].shape)

    # ---- elementwise ---------------------------------------------------------------------
    def apply(self, op: str, *xs: Ref) -> int:
        """An elementwise op of the registry, typed by ops.elementwise, with numpy broadcasting."""
        args = [self._operand(x) for x in xs]
        folded = self._fold(op, args)
        if folded is not None:
            return folded
        nodes = [self.graph[a] for a in args]
        shape, dtype = ops.elementwise(op, nodes, None)
        prim = registry.get(op)
        scalar = all(n.scalar for n in nodes) and prim.scalar and prim.kind in ("arith", "unary")
        return self.node(op, tuple(args), shape, dtype, scalar=scalar)

    def _operand(self, x: Ref) -> int:
        if isinstance(x, float):
            return self._num(x)
        assert isinstance(x, int) and not isinstance(x, bool), x
        return x

    def _fold(self, op: str, args: list[int]) -> int | None:
        """The identities derivative rules produce, so generated code does not carry them."""
        vals = [self.number(a) for a in args]
        if op in _FOLD and all(v is not None for v in vals):
            try:
                return self._num(_FOLD[op](*vals))
            except ZeroDivisionError:
                return None
        same = lambda i: D.shapes_equal(self.shape(args[i]), self._bshape(args))  # noqa: E731
        vals = [self._splat(a) for a in args]  # the identities below keep `same`'s shape: a splat acts as its number
        if op == "add":
            for i in (0, 1):
                if vals[1 - i] == 0 and same(i):
                    return args[i]
            for i in (0, 1):
                if self.graph[args[1 - i]].op == "neg":  # a + -b
                    return self.sub(args[i], self.graph[args[1 - i]].args[0])
        elif op == "sub":
            if vals[1] == 0 and same(0):
                return args[0]
            if vals[0] == 0 and same(1):
                return self.neg(args[1])
        elif op == "mul":
            for i in (0, 1):
                if vals[1 - i] == 1 and same(i):
                    return args[i]
                if vals[1 - i] == -1 and same(i):
                    return self.neg(args[i])
            for i in (0, 1):
                if self._masking(args[1 - i]):
                    return self._scale_where(args[i], args[1 - i])
        elif op == "div" and vals[1] == 1 and same(0):
            return args[0]
        elif op == "neg" and self.graph[args[0]].op == "neg":
            return self.graph[args[0]].args[0]
        elif op == "pow" and vals[1] == 1:
            return args[0]
        return None

    def _splat(self, nid: int) -> float | None:
        """The value of a `const` node or of a `const` broadcast to a shape (a tangent of ones)."""
        n = self.graph[nid]
        return self.number(n.args[0]) if n.op == "broadcast" else self.number(nid)

    def _bshape(self, args: list[int]) -> D.Shape:
        shape: D.Shape = ()
        for a in args:
            shape = D.broadcast(shape, self.shape(a)) or shape
        return shape

    def _masking(self, nid: int) -> bool:
        """A where with a zero branch (or such wheres nested): multiplying by it selects."""
        n = self.graph[nid]
        return n.op == "where" and any(self.number(a) == 0 or self._masking(a) for a in n.args[1:])

    def _scale_where(self, v: int, w: int) -> int:
        """v * where(c, p, q) as where(c, v * p, v * q), a zero branch staying 0: g * mask
        becomes a selection of g, as torch's own backward computes it."""
        n = self.graph[w]
        if n.op != "where" or not self._masking(w):
            return self._num(0.0) if self.number(w) == 0 else self.mul(v, w)
        c, p, q = n.args
        return self.where(c, self._scale_where(v, p), self._scale_where(v, q))

    def add(self, a: Ref, b: Ref) -> int:
        return self.apply("add", a, b)

    def sub(self, a: Ref, b: Ref) -> int:
        return self.apply("sub", a, b)

    def mul(self, a: Ref, b: Ref) -> int:
        return self.apply("mul", a, b)

    def div(self, a: Ref, b: Ref) -> int:
        return self.apply("div", a, b)

    def neg(self, a: Ref) -> int:
        return self.apply("neg", a)

    def where(self, c: int, a: Ref, b: Ref) -> int:
        return self.apply("where", c, a, b)

    def sum_all(self, terms: list[int | None]) -> int | None:
        """The sum of the terms that are not None (None when all are)."""
        out = None
        for t in terms:
            if t is not None:
                out = t if out is None else self.add(out, t)
        return out

    def apply_axis(self, op: str, x: int, axis: int) -> int:
        """softmax or normalize along `axis`."""
        return self.node(op, (x,), self.shape(x), attrs={"axis": ops.norm_axis(axis, self.rank(x), op, None)})

    # ---- linear algebra ------------------------------------------------------------------
    def matmul(self, a: int, b: int) -> int:
        return self.node("matmul", (a, b), ops.matmul(self.graph[a], self.graph[b], None))

    def outer(self, a: int, b: int) -> int:
        return self.node("outer", (a, b), ops.outer(self.graph[a], self.graph[b], None))

    def transpose(self, a: int) -> int:
        return self.node("transpose", (a,), ops.transpose(self.graph[a], None))

    # ---- reductions and axes -------------------------------------------------------------
    def reduce(self, fn: str, x: int, axis: int | None) -> int:
        shape, ax = ops.reduce(self.graph[x], axis, fn, None)
        return self.node("reduce", (x,), shape, attrs={"fn": fn, "axis": ax})

    def keep_axis(self, x: int, axis: int | None, rank: int) -> int:
        """A reduction's result with its reduced axis back as size 1, so it broadcasts against the
        operand of rank `rank` (a full reduction's scalar already does)."""
        if axis is None:
            return x
        return self.new_axes(x, (axis,), rank)

    def new_axes(self, x: int, positions: tuple[int, ...], rank: int) -> int:
        """x with size-1 axes inserted at `positions` of a result of rank `rank`."""
        if not positions:
            return x
        tail = tuple(range(rank - len(positions), rank))
        if tuple(sorted(positions)) == tail:
            return self.index(x, (("ellipsis",),) + (("new",),) * len(positions))
        shape, items, k = self.shape(x), [], 0
        for i in range(max(positions) + 1):
            if i in positions:
                items.append(("new",))
            else:
                items.append(("slice", D.const(0), shape[k]))
                k += 1
        return self.index(x, tuple(items))

    def broadcast(self, x: Ref, shape: D.Shape) -> int:
        """x broadcast (numpy rules) to `shape`."""
        x = self._operand(x)
        if D.shapes_equal(self.shape(x), shape) and not self.graph[x].scalar:
            return x
        return self.node("broadcast", (x,), shape, attrs={"shape": tuple(shape)})

    def unbroadcast(self, x: int, shape: D.Shape) -> int:
        """The transpose of broadcasting x's value from `shape`: sums over the axes broadcasting
        added (leading ones, and size-1 axes of `shape` that grew), keeping `shape`'s size-1 axes."""
        have = self.shape(x)
        if D.shapes_equal(have, shape):
            return x
        if not shape:
            return self.reduce("sum", x, None)
        lead = len(have) - len(shape)
        for _ in range(lead):
            x = self.reduce("sum", x, 0)
        grown = tuple(i for i, (d, e) in enumerate(zip(shape, have[lead:])) if d == D.ONE and e != D.ONE)
        for i in reversed(grown):
            x = self.reduce("sum", x, i)
        return self.new_axes(x, grown, len(shape))

    def size(self, d: D.Dim) -> int:
        """A dim expression (4*H, K + 1) as a compile-time number node."""
        d = sympy.sympify(d)
        if d.is_Integer:
            return self._num(int(d))
        if d.is_Rational:
            return self.div(self._num(int(d.p)), self._num(int(d.q)))
        if d.is_Symbol:
            return self.node("dim", (), (), scalar=True, attrs={"name": d.name})
        if d.is_Add or d.is_Mul:
            op = self.add if d.is_Add else self.mul
            out = self.size(d.args[0])
            for t in d.args[1:]:
                out = op(out, self.size(t))
            return out
        if d.is_Pow and d.exp.is_Integer and d.exp > 0:
            out = base = self.size(d.base)
            for _ in range(int(d.exp) - 1):
                out = self.mul(out, base)
            return out
        if isinstance(d, sympy.floor):
            num, den = sympy.fraction(sympy.together(d.args[0]))
            return self.apply("floordiv", self.size(num), self.size(den))
        raise ValueError(f"cannot build the size {d}")

    # ---- shape ops -------------------------------------------------------------------------
    def index(self, x: int, items: tuple[Item, ...]) -> int:
        if not items:
            return x
        shape = ops.index(self.graph[x], items)
        return self.node("index", (x,), shape, self.graph[x].dtype, attrs={"items": tuple(items)})

    def pad(self, x: int, widths: tuple[tuple[D.Dim, D.Dim], ...]) -> int:
        """x surrounded by zeros: `widths` gives (before, after) per axis."""
        if all(lo == 0 and hi == 0 for lo, hi in widths):
            return x
        return self.node("pad", (x,), ops.pad(self.graph[x], widths, None), attrs={"widths": tuple(widths)})

    def concat(self, xs: list[int], axis: int) -> int:
        if len(xs) == 1:
            return xs[0]
        shape, ax = ops.concat([self.graph[x] for x in xs], axis, None)
        return self.node("concat", tuple(xs), shape, attrs={"axis": ax})

    def split(self, x: int, axis: int, sizes: tuple[D.Dim, ...]) -> int:
        return self.node("split", (x,), self.shape(x), "tuple", attrs={"axis": axis, "sizes": tuple(sizes)})

    def item(self, parts: int, i: int) -> int:
        whole = self.graph[parts]
        ax, size = whole.attrs["axis"], whole.attrs["sizes"][i]
        return self.node("item", (parts,), whole.shape[:ax] + (size,) + whole.shape[ax + 1:], attrs={"index": i})

    def zeros(self, shape: D.Shape) -> int:
        return self.node("full", (), shape, attrs={"value": 0, "shape": tuple(shape)})

    def slice_axis(self, x: int, axis: int, lo: D.Dim, hi: D.Dim) -> int:
        """x[..., lo:hi, ...] along one axis."""
        shape = self.shape(x)
        if axis == len(shape) - 1:
            return self.index(x, (("ellipsis",), ("slice", lo, hi)))
        items = tuple(("slice", D.const(0), shape[i]) for i in range(axis)) + (("slice", lo, hi),)
        return self.index(x, items)

"""Canonical linear forms: every loop value that is linear in the states, as a sum of terms.

Each state S (rank 0, 1 or 2) is treated as a matrix (a vector state is a column, a scalar
state 1×1). A value linear in the states is a sum of terms

    sign · num · Π scalars · E ⊙ (L₁ L₂ … S … R₂ R₁)

where `scalars` are state-free per-step scalars, E state-free elementwise factors of the
state's full shape, and L/R products of *atoms*: a diagonal (a per-row or per-column decay),
a row vector kᵀ (from `k @ S`), a column vector a (from `outer(a, ·)`), a state-free dense
matrix, or a selection (index, split, concat). Writings that are algebraically equal give
equal terms: `(I − β k kᵀ) @ S` and `S − β · outer(k, k @ S)` both become
`{S, −β · k kᵀ S}` (state-free matrices are decomposed into identity, diagonal, low-rank
and dense parts and distributed), a 1×1 literal matrix becomes a number, and adjacent row·col
atoms become a scalar. Ops that are not linear in a state-dependent operand (a nonlinear
function, a product of two state-dependent values, a max/min/prod/logsumexp reduction) make the
value nonlinear, with the reason. Linear ops the algebra does not model (a transpose of a
matrix state, a broadcast of a state-dependent row) keep the value linear but `opaque`.

rnnc/matrix_terms.py decomposes state-free matrices and normalises terms; rnnc/transition.py
reads a state's transition off them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction

import sympy

from . import dims as D
from . import registry
from .ir import Cell, Graph

#: Ops that carry a transposed term through (the others make it opaque): sums, sign, scalar
#: scalings, a matrix-vector product (which undoes the transpose) and another transpose.
_TRANSPOSE_SAFE = frozenset({"add", "sub", "neg", "mul", "div", "matmul", "transpose"})
MAX_TERMS = 64  # more terms than this in one value: opaque (the distribution blew up)


@dataclass(frozen=True)
class Atom:
    """One factor of a term's left or right product.

    kind: "diag" (node a vector broadcast along rows or columns), "row" (1×n: node a vector, or
    None for ones), "col" (n×1), "mat" (a state-free matrix node, `trans` when transposed),
    "sel" (`attrs` = (axis-free items): rows/columns picked by an index, split or concat).
    `inv` divides instead of multiplying (diag only).
    """

    kind: str
    node: int | None
    inv: bool = False
    trans: bool = False
    attrs: tuple = ()


@dataclass(frozen=True)
class Term:
    """sign · num · Π scalars · Π elem ⊙ (left… S …right) for one state.

    `left` is outermost first; `right` innermost (next to S) first. `orient` says how the
    value's IR shape maps onto the matrix: "mat" [p, q], "row" [q] (1×q), "col" [p] (p×1),
    "scalar" [] (1×1).
    """

    state: str
    orient: str
    sign: int = 1
    num: object = 1  # a number or a sympy expression in the dims (a mean's 1/n)
    scalars: tuple[tuple[int, bool], ...] = ()  # (node, divides), sorted
    elem: tuple[tuple[int, bool], ...] = ()  # full-shape elementwise factors (node, divides)
    left: tuple[Atom, ...] = ()
    right: tuple[Atom, ...] = ()
    dots: tuple[tuple[int | None, int | None], ...] = ()  # scalar inner products bᵀc (None: ones)
    trans: bool = False  # the value is the transpose of the matrix above (orient "mat" only)

    def key(self) -> tuple:
        """Everything but the numeric coefficient: terms with equal keys add up."""
        return (self.state, self.orient, self.scalars, self.elem, self.left, self.right, self.dots, self.trans)

    @property
    def diagonal(self) -> bool:
        """Only diagonal atoms: an elementwise scaling of the state."""
        return all(a.kind == "diag" for a in self.left + self.right) and not self.dots and not self.trans


def scale(t: Term, sign: int = 1, num=1, scalars=(), elem=()) -> Term:
    return replace(t, sign=t.sign * sign, num=t.num * num, scalars=tuple(sorted(t.scalars + tuple(scalars))),
                   elem=tuple(sorted(t.elem + tuple(elem))))


@dataclass
class Form:
    """A loop value as linear terms over the states, or why it is not linear.

    `opaque` names states the value is linear in through ops the algebra does not model.
    """

    terms: list[Term] = field(default_factory=list)
    opaque: dict[str, str] = field(default_factory=dict)  # state -> the op that hid it
    nonlinear: str | None = None

    @property
    def states(self) -> set[str]:
        return {t.state for t in self.terms} | set(self.opaque)

    def of(self, state: str) -> list[Term]:
        return [t for t in self.terms if t.state == state]


def _describe(g: Graph, nid: int) -> str:
    node = g[nid]
    if node.name:
        return node.name
    if node.op == "const":
        return repr(node.attrs["value"])
    args = ", ".join(_describe(g, a) if g[a].name or g[a].op == "const" else "…" for a in node.args)
    op = node.attrs["fn"] if node.op == "reduce" else node.op
    return f"{op}({args})"


def ones(shape: D.Shape) -> bool:
    return all(D.equal(d, D.ONE) for d in shape)


def same(a: D.Shape, b: D.Shape) -> bool:
    return len(a) == len(b) and all(D.equal(x, y) for x, y in zip(a, b))


class _Builder:
    """Computes the forms of a cell's loop values in one pass (topological order)."""

    def __init__(self, cell: Cell, stages: dict[int, str], leaves: dict[int, str]) -> None:
        self.g = cell.graph
        self.stages = stages
        self.leaves = leaves  # node -> the state name it stands for
        self.rank = {name: len(self.g[n].shape) for n, name in leaves.items()}
        self.forms: dict[int, Form] = {}
        self.op = ""  # the op whose rule is running (each() checks transposed terms against it)

    def loop(self, nid: int) -> bool:
        return self.stages.get(nid) == "loop"

    def run(self) -> dict[int, Form]:
        for nid in self.g.order(self.stages):
            if self.loop(nid):
                self.forms[nid] = self.form(nid)
        return self.forms

    def reads(self, nid: int) -> str:
        states = sorted(self.forms[nid].states) if nid in self.forms else []
        return ", ".join(states) or "a state"

    def form(self, nid: int) -> Form:
        node = self.g[nid]
        if nid in self.leaves:
            name = self.leaves[nid]
            orient = {0: "scalar", 1: "col"}.get(self.rank[name], "mat")
            return Form([Term(name, orient)])
        if node.op == "state":  # a state that is not a leaf here reads nothing linear we track
            return Form(nonlinear="it reads a state")
        dep = [a for a in node.args if self.loop(a)]
        bad = next((self.forms[a] for a in dep if self.forms[a].nonlinear), None)
        if bad is not None:
            return Form(nonlinear=bad.nonlinear)
        # whether the op is linear in these operands is the registry's fact; how it maps the
        # terms is this builder's rule (an op linear there but not modelled here: opaque)
        reading = frozenset(i for i, a in enumerate(node.args) if a in dep)
        if not any(reading <= group for group in registry.linear_groups(node)):
            return Form(nonlinear=self.why_not_linear(node, dep))
        rule = getattr(self, "_" + node.op, None)
        if rule is None:
            return self.opaque(dep, node.op)
        self.op = node.op
        out = rule(nid, node, dep)
        if len(out.terms) > MAX_TERMS:
            return self.opaque(dep, f"{node.op} (more than {MAX_TERMS} terms)")
        return out

    def why_not_linear(self, node, dep: list[int]) -> str:
        g = self.g
        if node.op == "div" and node.args[1] in dep:
            return f"it divides by a value that reads state {self.reads(node.args[1])}"
        if node.op == "where" and node.args[0] in dep:
            return f"a where() condition reads state {self.reads(node.args[0])}"
        if len(dep) >= 2 and node.op in ("mul", "matmul", "outer"):
            a, b = dep[0], dep[-1]
            return (f"`{_describe(g, a)}` (reads state {self.reads(a)}) and "
                    f"`{_describe(g, b)}` (reads state {self.reads(b)}) are multiplied")
        a = dep[0]
        if node.op == "reduce":
            fn = node.attrs["fn"]
            return (f"{fn}(…) is applied to `{_describe(g, a)}`, which reads state {self.reads(a)} "
                    f"(a {fn} reduction is not linear)")
        return f"{node.op}(…) is applied to `{_describe(g, a)}`, which reads state {self.reads(a)}"

    # -- helpers --
    def opaque(self, dep: list[int], why: str) -> Form:
        out = Form()
        for a in dep:
            for s in self.forms[a].states:
                out.opaque.setdefault(s, why)
        return out

    def each(self, a: int, fn, why: str) -> Form:
        """Map every term of operand a through fn (None from fn: the whole value is opaque)."""
        src = self.forms[a]
        out = Form(opaque=dict(src.opaque))
        for t in src.terms:
            if t.trans and self.op not in _TRANSPOSE_SAFE:  # (L S R)ᵀ: only these ops are modelled
                return self.opaque([a], why)
            new = fn(t)
            if new is None or (new.elem and not new.diagonal):  # E ⊙ (A S) has no form here
                return self.opaque([a], why)
            out.terms.append(new)
        return out

    # -- sums --
    def _add(self, nid, node, dep, sign_second: int = 1) -> Form:
        out = Form()
        for i, a in enumerate(node.args):
            if a not in dep:
                continue
            if not same(self.g[a].shape, node.shape):
                return self.opaque(dep, f"a broadcast in {node.op}")
            sign = sign_second if i == 1 else 1
            src = self.forms[a]
            out.terms.extend(scale(t, sign) for t in src.terms)
            out.opaque.update(src.opaque)
        return out

    def _sub(self, nid, node, dep) -> Form:
        return self._add(nid, node, dep, -1)

    def _neg(self, nid, node, dep) -> Form:
        return self.each(dep[0], lambda t: scale(t, -1), "neg")

    # -- scalings --
    def _mul(self, nid, node, dep) -> Form:
        (a,) = dep
        f = node.args[1] if node.args[0] == a else node.args[0]
        return self.scaled(a, f, False, node)

    def _div(self, nid, node, dep) -> Form:
        return self.scaled(dep[0], node.args[1], True, node)

    def scaled(self, a: int, f: int, inv: bool, node) -> Form:
        g = self.g
        ys, fs, rs = g[a].shape, g[f].shape, node.shape

        def one(t: Term):
            if ones(fs) and same(ys, rs):
                split = factors(g, f, inv)
                return None if split is None else scale(t, *split)
            if t.trans:
                return None
            pad = (D.ONE,) * (len(rs) - len(fs)) + tuple(fs)
            if same(ys, rs):
                if t.orient == "mat":
                    rows, cols = (not D.equal(pad[-2], D.ONE)), (not D.equal(pad[-1], D.ONE))
                    if rows and cols:
                        if any(x.kind != "diag" for x in t.left + t.right) or t.dots:
                            return None
                        return scale(t, elem=[(f, inv)])
                    if rows:
                        return replace(t, left=(Atom("diag", f, inv),) + t.left)
                    return replace(t, right=t.right + (Atom("diag", f, inv),))
                if t.orient == "row":
                    return replace(t, right=t.right + (Atom("diag", f, inv),))
                if t.orient == "col":
                    return replace(t, left=(Atom("diag", f, inv),) + t.left)
                return None
            if inv:
                return None
            # the value grows: a scalar times a vector is a column; a row times [m, 1] a matrix
            if t.orient == "scalar" and len(fs) == 1 and len(ys) == 0:
                return replace(t, orient="col", left=(Atom("col", f),) + t.left)
            if t.orient == "row" and len(fs) == 2 and D.equal(fs[1], D.ONE) and len(ys) == 1:
                return replace(t, orient="mat", left=(Atom("col", f),) + t.left)
            if t.orient == "mat" and len(ys) == 2 and len(fs) == 2:  # a row as [1, n] times a column [m, 1]
                if D.equal(ys[0], D.ONE) and D.equal(fs[1], D.ONE):  # (per head: `k[:, None] * kS[None, :]`)
                    return replace(t, left=(Atom("col", f),) + t.left)
                if D.equal(ys[1], D.ONE) and D.equal(fs[0], D.ONE):
                    return replace(t, right=t.right + (Atom("row", f),))
            return None

        return self.each(a, one, "a broadcasting product")

    # -- contractions --
    def _matmul(self, nid, node, dep) -> Form:
        (a,) = dep
        g = self.g
        if node.args[1] == a:  # A @ Y
            A = node.args[0]
            vec = len(g[A].shape) == 1

            def left(t: Term):
                if t.trans:  # a @ (L S R)ᵀ = L S R a as a vector
                    return replace(t, trans=False, orient="col", right=t.right + (Atom("col", A),)) if vec else None
                if t.orient in ("mat", "col"):
                    atom = Atom("row", A) if vec else Atom("mat", A)
                    orient = {("mat", True): "row", ("mat", False): "mat", ("col", True): "scalar",
                              ("col", False): "col"}[t.orient, vec]
                    return replace(t, orient=orient, left=(atom,) + t.left)
                if t.orient == "row":  # (A yᵀ) as a vector is y Aᵀ; y · a is a scalar
                    atom = Atom("col", A) if vec else Atom("mat", A, trans=True)
                    return replace(t, orient="scalar" if vec else "row", right=t.right + (atom,))
                return None
            return self.each(a, left, "matmul")
        B = node.args[1]
        vec = len(g[B].shape) == 1

        def right(t: Term):
            if t.trans:  # (L S R)ᵀ b = bᵀ L S R as a vector
                return replace(t, trans=False, orient="row", left=(Atom("row", B),) + t.left) if vec else None
            if t.orient in ("mat", "row"):
                atom = Atom("col", B) if vec else Atom("mat", B)
                orient = {("mat", True): "col", ("mat", False): "mat", ("row", True): "scalar",
                          ("row", False): "row"}[t.orient, vec]
                return replace(t, orient=orient, right=t.right + (atom,))
            if t.orient == "col":  # yᵀ B as a vector is Bᵀ y; y · b is a scalar
                atom = Atom("row", B) if vec else Atom("mat", B, trans=True)
                return replace(t, orient="scalar" if vec else "col", left=(atom,) + t.left)
            return None
        return self.each(a, right, "matmul")

    def _outer(self, nid, node, dep) -> Form:
        (a,) = dep
        if node.args[1] == a:  # outer(u, y) = u yᵀ
            u = node.args[0]
            return self.each(a, lambda t: replace(t, orient="mat", left=(Atom("col", u),) + t.left)
                             if t.orient == "row" else None, "outer of a column")
        w = node.args[1]  # outer(y, w) = y wᵀ
        return self.each(a, lambda t: replace(t, orient="mat", right=t.right + (Atom("row", w),))
                         if t.orient == "col" else None, "outer of a row")

    # -- reductions --
    def _reduce(self, nid, node, dep) -> Form:
        (a,) = dep
        fn, ax = node.attrs["fn"], node.attrs["axis"]  # sum or mean: the registry says the others are not linear
        shape = self.g[a].shape
        count = math.prod(shape) if ax is None else shape[ax]
        factor = 1 if fn == "sum" else sympy.Integer(1) / count

        def one(t: Term):
            t = scale(t, num=factor)
            ones_row = Atom("row", None)
            if t.orient == "scalar":
                return t
            if t.orient == "row":
                return replace(t, orient="scalar", right=t.right + (Atom("col", None),))
            if t.orient == "col":
                return replace(t, orient="scalar", left=(ones_row,) + t.left)
            if ax is None:
                return replace(t, orient="scalar", left=(ones_row,) + t.left, right=t.right + (Atom("col", None),))
            if ax == 0:
                return replace(t, orient="row", left=(ones_row,) + t.left)
            return replace(t, orient="col", right=t.right + (Atom("col", None),))
        return self.each(a, one, "reduce")

    # -- selections --
    def _index(self, nid, node, dep) -> Form:
        (a,) = dep
        shape = self.g[a].shape
        items = node.attrs["items"]
        kinds = tuple(i[0] for i in items)

        def sel(item, size) -> tuple[Atom, ...]:  # a full slice selects nothing
            full = item[0] == "slice" and D.equal(item[1], 0) and D.equal(item[2], size)
            return () if full else (Atom("sel", None, attrs=(item,)),)

        def one(t: Term):
            o = t.orient
            if o == "col" and kinds == ("slice", "new"):  # y[:, None]: the same column, as a matrix
                return replace(t, orient="mat", left=sel(items[0], shape[0]) + t.left)
            if o == "row" and kinds == ("new", "slice"):
                return replace(t, orient="mat", right=t.right + sel(items[1], shape[0]))
            if o in ("col", "row") and kinds in (("slice",), ("int",)):
                atoms = sel(items[0], shape[0])
                orient = o if kinds == ("slice",) else "scalar"
                return replace(t, orient=orient, left=atoms + t.left) if o == "col" else \
                    replace(t, orient=orient, right=t.right + atoms)
            if o == "mat" and kinds in (("int",), ("slice",), ("slice", "slice"), ("slice", "int")):
                rows = sel(items[0], shape[0])
                cols = sel(items[1], shape[1]) if len(items) == 2 else ()
                orient = {("int",): "row", ("slice", "int"): "col"}.get(kinds, "mat")
                return replace(t, orient=orient, left=rows + t.left, right=t.right + cols)
            return None
        return self.each(a, one, "an index")

    def _split(self, nid, node, dep) -> Form:
        return self.forms[dep[0]]

    def _item(self, nid, node, dep) -> Form:
        split = self.g[node.args[0]]
        ax, i = split.attrs["axis"], node.attrs["index"]
        lo = sum(split.attrs["sizes"][:i], D.const(0))
        item = ("slice", lo, lo + split.attrs["sizes"][i])

        def one(t: Term):
            atom = Atom("sel", None, attrs=(item,))
            if t.orient == "col" or (t.orient == "mat" and ax == 0):
                return replace(t, left=(atom,) + t.left)
            if t.orient == "row" or (t.orient == "mat" and ax == 1):
                return replace(t, right=t.right + (atom,))
            return None
        return self.each(node.args[0], one, "split")

    def _concat(self, nid, node, dep) -> Form:
        ax, out, start = node.attrs["axis"], Form(), D.const(0)
        for a in node.args:
            size = self.g[a].shape[ax]
            if a in dep:
                place = ("embed", start, size, node.shape[ax])
                for t in self.forms[a].terms:
                    atom = Atom("sel", None, attrs=(place,))
                    if t.orient == "col" or (t.orient == "mat" and ax == 0):
                        out.terms.append(replace(t, left=(atom,) + t.left))
                    elif t.orient == "row" or (t.orient == "mat" and ax == 1):
                        out.terms.append(replace(t, right=t.right + (atom,)))
                    else:
                        return self.opaque(dep, "concat")
                out.opaque.update(self.forms[a].opaque)
            start = start + size
        return out

    def _where(self, nid, node, dep) -> Form:
        return self.opaque(dep, "where")

    def _broadcast(self, nid, node, dep) -> Form:
        if same(self.g[dep[0]].shape, node.shape):
            return self.forms[dep[0]]
        return self.opaque(dep, "broadcast")

    def _transpose(self, nid, node, dep) -> Form:
        return self.each(dep[0], lambda t: replace(t, trans=not t.trans) if t.orient == "mat" else None, "transpose")


def factors(g: Graph, f: int, inv: bool):
    """A scalar factor as (sign, number, node factors): `beta * exp(g)` -> (1, 1, [beta, exp(g)]),
    `-x / 2` -> (-1, 1/2, [x]); None for a division by zero."""
    num = number(g, f)
    if num is not None:
        if num == 0 and inv:
            return None
        return (1, 1 / num if inv else num, [])
    node = g[f]
    if node.op == "neg":
        split = factors(g, node.args[0], inv)
        return None if split is None else (-split[0], split[1], split[2])
    if node.op in ("mul", "div") and all(ones(g[a].shape) and len(g[a].shape) <= len(node.shape) for a in node.args):
        x = factors(g, node.args[0], inv)
        y = factors(g, node.args[1], inv != (node.op == "div"))
        if x is None or y is None:
            return None
        return (x[0] * y[0], x[1] * y[1], x[2] + y[2])
    return (1, 1, [(f, inv)])


def strip_newaxis(g: Graph, nid: int) -> tuple[int, bool]:
    """`x[:, None]` of a vector x -> (x, True); anything else -> (nid, False)."""
    node = g[nid]
    items = node.attrs.get("items", ()) if node.op == "index" else ()
    if len(items) == 2 and items[0][0] == "slice" and items[1][0] == "new" and len(g[node.args[0]].shape) == 1 \
            and D.equal(items[0][1], 0) and D.equal(items[0][2], g[node.args[0]].shape[0]):
        return node.args[0], True
    return nid, False


def number(g: Graph, nid: int):
    """The value of a numeric constant or one-element literal (None when it is not one)."""
    node = g[nid]
    if node.op == "const" and isinstance(node.attrs.get("value"), (int, float)) and math.isfinite(node.attrs["value"]):
        return Fraction(node.attrs["value"])
    if node.op == "literal":
        v = node.attrs["value"]
        while isinstance(v, list) and len(v) == 1:
            v = v[0]
        if isinstance(v, (int, float)) and math.isfinite(v):
            return Fraction(v)
    return None


def linear_forms(cell: Cell, stages: dict[int, str], leaves: dict[int, str] | None = None) -> dict[int, Form]:
    """The form of every loop value over `leaves` (node -> state name; default: each state's
    start-of-step value)."""
    if leaves is None:
        leaves = {s.node_in: s.name for s in cell.states}
    return _Builder(cell, stages, leaves).run()

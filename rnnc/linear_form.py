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

`Transition` reads a state's next value off these terms: the factors common to every term
(the decay), and what remains (identity, identity plus low-rank, or dense).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction

import sympy

from . import dims as D
from .ir import Cell, Graph

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

    def key(self) -> tuple:
        """Everything but the numeric coefficient: terms with equal keys add up."""
        return (self.state, self.orient, self.scalars, self.elem, self.left, self.right, self.dots)

    @property
    def diagonal(self) -> bool:
        """Only diagonal atoms: an elementwise scaling of the state."""
        return all(a.kind == "diag" for a in self.left + self.right) and not self.dots


def _scale(t: Term, sign: int = 1, num=1, scalars=(), elem=()) -> Term:
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


def _ones(shape: D.Shape) -> bool:
    return all(D.equal(d, D.ONE) for d in shape)


def _same(a: D.Shape, b: D.Shape) -> bool:
    return len(a) == len(b) and all(D.equal(x, y) for x, y in zip(a, b))


class _Builder:
    """Computes the forms of a cell's loop values in one pass (topological order)."""

    def __init__(self, cell: Cell, stages: dict[int, str], leaves: dict[int, str]) -> None:
        self.g = cell.graph
        self.stages = stages
        self.leaves = leaves  # node -> the state name it stands for
        self.rank = {name: len(self.g[n].shape) for n, name in leaves.items()}
        self.forms: dict[int, Form] = {}

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
        g, node = self.g, self.g[nid]
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
        rule = getattr(self, "_" + node.op, None)
        if node.op == "div" and node.args[1] in dep:
            return Form(nonlinear=f"it divides by a value that reads state {self.reads(node.args[1])}")
        if rule is None or (node.op in ("mul", "matmul", "outer") and len(dep) != 1):
            if node.op in ("mul", "matmul", "outer") and len(dep) == 2:
                a, b = dep
                return Form(nonlinear=f"`{_describe(g, a)}` (reads state {self.reads(a)}) and "
                                      f"`{_describe(g, b)}` (reads state {self.reads(b)}) are multiplied")
            a = dep[0]
            op = node.attrs["fn"] if node.op == "reduce" else node.op
            return Form(nonlinear=f"{op}(…) is applied to `{_describe(g, a)}`, which reads state {self.reads(a)}")
        out = rule(nid, node, dep)
        if len(out.terms) > MAX_TERMS:
            return self.opaque(dep, f"{node.op} (more than {MAX_TERMS} terms)")
        return out

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
            if not _same(self.g[a].shape, node.shape):
                return self.opaque(dep, f"a broadcast in {node.op}")
            sign = sign_second if i == 1 else 1
            src = self.forms[a]
            out.terms.extend(_scale(t, sign) for t in src.terms)
            out.opaque.update(src.opaque)
        return out

    def _sub(self, nid, node, dep) -> Form:
        return self._add(nid, node, dep, -1)

    def _neg(self, nid, node, dep) -> Form:
        return self.each(dep[0], lambda t: _scale(t, -1), "neg")

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
            if _ones(fs) and _same(ys, rs):
                split = _factors(g, f, inv)
                return None if split is None else _scale(t, *split)
            pad = (D.ONE,) * (len(rs) - len(fs)) + tuple(fs)
            if _same(ys, rs):
                if t.orient == "mat":
                    rows, cols = (not D.equal(pad[-2], D.ONE)), (not D.equal(pad[-1], D.ONE))
                    if rows and cols:
                        if any(x.kind != "diag" for x in t.left + t.right) or t.dots:
                            return None
                        return _scale(t, elem=[(f, inv)])
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
        fn, ax = node.attrs["fn"], node.attrs["axis"]
        if fn not in ("sum", "mean"):
            return Form(nonlinear=f"{fn}(…) is applied to `{_describe(self.g, a)}`, which reads state "
                                  f"{self.reads(a)} (a {fn} reduction is not linear)")
        shape = self.g[a].shape
        count = math.prod(shape) if ax is None else shape[ax]
        scale = 1 if fn == "sum" else sympy.Integer(1) / count

        def one(t: Term):
            t = _scale(t, num=scale)
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
        if node.args[0] in dep:
            return Form(nonlinear=f"a where() condition reads state {self.reads(node.args[0])}")
        return self.opaque(dep, "where")

    def _broadcast(self, nid, node, dep) -> Form:
        if _same(self.g[dep[0]].shape, node.shape):
            return self.forms[dep[0]]
        return self.opaque(dep, "broadcast")

    def _transpose(self, nid, node, dep) -> Form:
        return self.opaque(dep, "transpose")


def _factors(g: Graph, f: int, inv: bool):
    """A scalar factor as (sign, number, node factors): `beta * exp(g)` -> (1, 1, [beta, exp(g)]),
    `-x / 2` -> (-1, 1/2, [x]); None for a division by zero."""
    num = _number(g, f)
    if num is not None:
        if num == 0 and inv:
            return None
        return (1, 1 / num if inv else num, [])
    node = g[f]
    if node.op == "neg":
        split = _factors(g, node.args[0], inv)
        return None if split is None else (-split[0], split[1], split[2])
    if node.op in ("mul", "div") and all(_ones(g[a].shape) and len(g[a].shape) <= len(node.shape) for a in node.args):
        x = _factors(g, node.args[0], inv)
        y = _factors(g, node.args[1], inv != (node.op == "div"))
        if x is None or y is None:
            return None
        return (x[0] * y[0], x[1] * y[1], x[2] + y[2])
    return (1, 1, [(f, inv)])


def _number(g: Graph, nid: int):
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


# ---- state-free matrices, decomposed ---------------------------------------------------------

def decompose(g: Graph, nid: int, trans: bool = False) -> list[Term] | None:
    """A state-free matrix as a sum of terms over a placeholder (state ""): identity, diagonal,
    low-rank (col·row) and dense atoms; None when it has more than MAX_TERMS terms."""
    node = g[nid]
    shape = node.shape
    base = Term("", "mat")
    num = _number(g, nid)
    if num is not None and len(shape) == 2:
        return [_scale(base, num=num)]
    if node.op == "eye":
        return [base]
    if node.op == "literal" and _scaled_identity(node.attrs["value"]) is not None:
        return [_scale(base, num=Fraction(_scaled_identity(node.attrs["value"])))]
    out: list[Term] | None = None
    if node.op in ("add", "sub") and all(_same(g[a].shape, shape) for a in node.args):
        x, y = (decompose(g, a, trans) for a in node.args)
        if x is not None and y is not None:
            out = x + [_scale(t, -1 if node.op == "sub" else 1) for t in y]
    elif node.op == "neg":
        x = decompose(g, node.args[0], trans)
        out = None if x is None else [_scale(t, -1) for t in x]
    elif node.op in ("mul", "div"):
        m, f = node.args
        if node.op == "mul" and not _same(g[m].shape, shape):
            m, f = f, m
        if _same(g[m].shape, shape):
            x = decompose(g, m, trans)
            if x is not None:
                out = [_matrix_scaled(g, t, f, node.op == "div", trans) for t in x]
                out = None if any(t is None for t in out) else out
    elif node.op == "outer":
        a, b = node.args
        if trans:
            a, b = b, a
        out = [replace(base, left=(Atom("col", a), Atom("row", b)))]
    elif node.op == "transpose":
        out = decompose(g, node.args[0], not trans)
    elif node.op == "matmul" and all(len(g[a].shape) == 2 for a in node.args):
        a, b = node.args
        if trans:
            a, b = b, a
        x, y = decompose(g, a, trans), decompose(g, b, trans)
        if x is not None and y is not None and len(x) * len(y) <= MAX_TERMS:
            out = [_product(s, t) for s in x for t in y]
    if out is None:
        out = [replace(base, left=(Atom("mat", nid, trans=trans),))]
    return out if len(out) <= MAX_TERMS else None


def matrix_terms(g: Graph, nid: int) -> list[Term] | None:
    """A state-free matrix as collected terms whose vectors carry no scalar factors:
    `b * outer(k, v) + outer(k, (1 - b) * v)` -> [1 · k vᵀ]."""
    terms = decompose(g, nid)
    return None if terms is None else collect([_peeled(g, t) for t in terms])


def _scaled_identity(value) -> float | None:
    """c when a literal matrix is c·I."""
    if not isinstance(value, list) or not value or not all(isinstance(r, list) and len(r) == len(value) for r in value):
        return None
    c = value[0][0]
    ok = all(value[i][j] == (c if i == j else 0) for i in range(len(value)) for j in range(len(value)))
    return c if ok and isinstance(c, (int, float)) else None


def _matrix_scaled(g: Graph, t: Term, f: int, inv: bool, trans: bool) -> Term | None:
    """A decomposed matrix term times a broadcast factor f ([], [n], [m, 1] or full)."""
    fs = g[f].shape
    if _ones(fs):
        split = _factors(g, f, inv)
        return None if split is None else _scale(t, *split)
    pad = (D.ONE,) * (2 - len(fs)) + tuple(fs)
    rows, cols = not D.equal(pad[0], D.ONE), not D.equal(pad[1], D.ONE)
    if rows and cols:
        return None
    if trans:
        rows, cols = cols, rows
    atom = Atom("diag", f, inv)
    if rows:
        return replace(t, left=(atom,) + t.left)
    return replace(t, left=t.left + (atom,)) if not t.right else replace(t, right=t.right + (atom,))


def _product(s: Term, t: Term) -> Term:
    return Term("", "mat", s.sign * t.sign, s.num * t.num, tuple(sorted(s.scalars + t.scalars)),
                tuple(sorted(s.elem + t.elem)), s.left + s.right + t.left + t.right, (), s.dots + t.dots)


def expand(g: Graph, t: Term) -> list[Term] | None:
    """The term with its dense-matrix atoms decomposed and distributed, row·col pairs turned into
    scalar dots, and the right product folded onto the left where the state is a vector (so
    equal maps compare equal); None when that takes more than MAX_TERMS terms."""
    lefts = _expand_side(g, t.left)
    rights = _expand_side(g, t.right)
    if lefts is None or rights is None or len(lefts) * len(rights) > MAX_TERMS:
        return None
    out = []
    for lt in lefts:
        for rt in rights:
            new = Term(t.state, t.orient, t.sign * lt.sign * rt.sign, t.num * lt.num * rt.num,
                       tuple(sorted(t.scalars + lt.scalars + rt.scalars)), tuple(sorted(t.elem + lt.elem + rt.elem)),
                       lt.left, rt.left, t.dots + lt.dots + rt.dots)
            out.append(_dots(new))
    return out


def _expand_side(g: Graph, atoms: tuple[Atom, ...]) -> list[Term] | None:
    """A product of atoms as a sum of products of simple atoms (placeholder terms)."""
    acc = [Term("", "mat")]
    for atom in atoms:
        parts = decompose(g, atom.node, atom.trans) if atom.kind == "mat" else [Term("", "mat", left=(atom,))]
        parts = None if parts is None else [_peeled(g, p) for p in parts]
        if parts is None or len(acc) * len(parts) > MAX_TERMS:
            return None
        acc = [_product(x, y) for x in acc for y in parts]
    return acc


def _peeled(g: Graph, t: Term) -> Term:
    """A placeholder term with the scalar factors of its row and column vectors moved out."""
    out = replace(t, left=())
    for atom in t.left:
        part = _peel(g, atom) if atom.kind in ("row", "col") and atom.node is not None else Term("", "mat", left=(atom,))
        out = _product(out, part)
    return out


def _peel(g: Graph, atom: Atom) -> Term:
    """A row or column atom with its scalar factors moved to the coefficient: col(β k) = β col(k)."""
    node, sign, num, scalars = atom.node, 1, 1, []
    while True:
        n = g[node]
        if n.op == "neg":
            sign, node = -sign, n.args[0]
            continue
        if n.op in ("mul", "div") and len(n.args) == 2:
            vec, f = n.args
            if n.op == "mul" and _ones(g[vec].shape) and not _ones(g[f].shape):
                vec, f = f, vec
            split = _factors(g, f, n.op == "div") if _ones(g[f].shape) and _same(g[vec].shape, n.shape) else None
            if split is not None:
                sign, num, scalars = sign * split[0], num * split[1], scalars + split[2]
                node = vec
                continue
        break
    return Term("", "mat", sign, num, tuple(sorted(scalars)), left=(replace(atom, node=node),))


def _dots(t: Term) -> Term:
    """Adjacent row·col atoms on either side become a scalar inner product."""
    sides = []
    dots = list(t.dots)
    for atoms in (t.left, t.right):
        out: list[Atom] = []
        for atom in atoms:
            if out and out[-1].kind == "row" and atom.kind == "col":
                dots.append(tuple(sorted((out[-1].node, atom.node), key=lambda x: -1 if x is None else x)))
                out.pop()
                continue
            out.append(atom)
        sides.append(tuple(out))
    return replace(t, left=sides[0], right=sides[1], dots=tuple(sorted(dots, key=repr)))


def collect(terms: list[Term]) -> list[Term]:
    """Terms with equal keys added up (numeric coefficients summed); zero terms dropped."""
    total: dict[tuple, object] = {}
    first: dict[tuple, Term] = {}
    for t in terms:
        k = t.key()
        total[k] = total.get(k, 0) + t.sign * t.num
        first.setdefault(k, t)
    out = []
    for k, c in total.items():
        if c == 0:
            continue
        sign = -1 if (c < 0 if isinstance(c, (int, Fraction)) else sympy.sympify(c).could_extract_minus_sign()) else 1
        out.append(replace(first[k], sign=sign, num=c * sign))
    return out


# ---- a state's transition --------------------------------------------------------------------

@dataclass
class Decay:
    """The factors common to every term of a transition: S' = decay ⊙ (T S) + U."""

    num: object = 1
    scalars: tuple[tuple[int, bool], ...] = ()
    left: tuple[Atom, ...] = ()  # per-row diagonals (per key)
    right: tuple[Atom, ...] = ()  # per-column diagonals (per value)
    elem: tuple[tuple[int, bool], ...] = ()

    def kind(self, rank: int) -> str:
        if rank <= 1:
            return "none" if self.num == 1 and not (self.scalars or self.left or self.right or self.elem) \
                else "elementwise"
        rows, cols = bool(self.left) or bool(self.elem), bool(self.right) or bool(self.elem)
        if rows or cols:
            return {(True, False): "key", (False, True): "value", (True, True): "key_value"}[(rows, cols)]
        return "scalar" if self.scalars or self.num != 1 else "none"


@dataclass
class Transition:
    """How a state's next value reads its previous value (the canonical linear form).

    kind: "zero" (it does not), "diagonal" (only diagonal terms: an elementwise scaling),
    "identity" (decay ⊙ S), "identity_plus_low_rank" (decay · (I + Σ c a bᵀ) S), "dense".
    `low_rank` holds the c a bᵀ terms (left atoms col a, row b) of the remainder.
    """

    state: str
    kind: str
    decay: Decay
    terms: list[Term]
    low_rank: list[Term] = field(default_factory=list)
    coupled: list[str] = field(default_factory=list)
    opaque: str | None = None
    form: str = ""  # the transition as text (formula), for the report


def _common(seqs: list[tuple[Atom, ...]], from_end: bool) -> tuple[Atom, ...]:
    """The longest run of diagonal atoms every sequence starts (or ends) with."""
    out: list[Atom] = []
    for i in range(min(len(s) for s in seqs)):
        atoms = {s[-1 - i] if from_end else s[i] for s in seqs}
        if len(atoms) != 1 or next(iter(atoms)).kind != "diag":
            break
        out.append(next(iter(atoms)))
    return tuple(reversed(out)) if from_end else tuple(out)


def _multiset_common(lists: list[tuple]) -> tuple:
    common = list(lists[0])
    for other in lists[1:]:
        rest = list(other)
        keep = []
        for x in common:
            if x in rest:
                rest.remove(x)
                keep.append(x)
        common = keep
    return tuple(sorted(common))


def _without(items: tuple, remove: tuple) -> tuple:
    rest = list(items)
    for x in remove:
        rest.remove(x)
    return tuple(rest)


def transition(g: Graph, state: str, form: Form, rank: int) -> Transition:
    """The canonical transition of `state` from the form of its next value (assumed linear)."""
    coupled = sorted(form.states - {state})
    if state in form.opaque:
        return Transition(state, "dense", Decay(), [], coupled=coupled, opaque=form.opaque[state])
    terms: list[Term] = []
    for t in form.of(state):
        ex = expand(g, t)
        if ex is None:
            return Transition(state, "dense", Decay(), [], coupled=coupled, opaque="too many terms")
        terms.extend(ex)
    terms = collect(terms)
    if not terms:
        return Transition(state, "zero", Decay(), [], coupled=coupled)
    if all(t.diagonal for t in terms) and (len(terms) > 1 or rank <= 1):
        # S' = (Σ_i decay_i) ⊙ S: the decay's factors are those of all terms together
        decay = Decay(terms[0].sign * terms[0].num if len(terms) == 1 else 1,
                      tuple(s for t in terms for s in t.scalars), tuple(a for t in terms for a in t.left),
                      tuple(a for t in terms for a in t.right), tuple(e for t in terms for e in t.elem))
        return Transition(state, "diagonal", decay, terms, coupled=coupled)
    lead = _common([t.left for t in terms], False)
    trail = _common([t.left[len(lead):] for t in terms], True)
    rlead = _common([t.right for t in terms], False)
    rtrail = _common([t.right[len(rlead):] for t in terms], True)
    scalars = _multiset_common([t.scalars for t in terms])
    elem = _multiset_common([t.elem for t in terms])
    ident = [t for t in terms if len(t.left) == len(lead) + len(trail) and len(t.right) == len(rlead) + len(rtrail)
             and len(t.scalars) == len(scalars) and len(t.elem) == len(elem) and not t.dots]
    num = ident[0].sign * ident[0].num if len(ident) == 1 else 1
    decay = Decay(num, scalars, lead + trail, rlead + rtrail, elem)
    rest = []
    for t in terms:
        if t in ident:
            continue
        rest.append(replace(t, num=t.num / num if num != 1 else t.num, scalars=_without(t.scalars, scalars),
                            elem=_without(t.elem, elem), left=t.left[len(lead):len(t.left) - len(trail)],
                            right=t.right[len(rlead):len(t.right) - len(rtrail)]))
    if len(ident) == 1 and not rest:
        return Transition(state, "identity", decay, terms, coupled=coupled)
    if len(ident) == 1 and all(not t.right and not t.elem and [a.kind for a in t.left] == ["col", "row"]
                               and t.left[0].node is not None and t.left[1].node is not None for t in rest):
        return Transition(state, "identity_plus_low_rank", decay, terms, low_rank=rest, coupled=coupled)
    return Transition(state, "dense", decay, terms, coupled=coupled)


# ---- printing ----------------------------------------------------------------------------------

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def expr_text(g: Graph, nid: int | None, depth: int = 3) -> str:
    """A short readable rendering of a state-free value: its spec name, or its expression."""
    if nid is None:
        return "1"
    node = g[nid]
    if node.name:
        return node.name
    if node.op == "const":
        return repr(node.attrs["value"])
    if depth == 0:
        return "…"
    args = [expr_text(g, a, depth - 1) for a in node.args]
    if node.op not in _INFIX:
        args = [_bare(a) for a in args]
    if node.op in _INFIX and len(args) == 2:
        return f"({args[0]} {_INFIX[node.op]} {args[1]})"
    if node.op == "neg":
        return f"-{args[0]}"
    if node.op == "index":
        items = ", ".join("None" if it[0] == "new" else "..." if it[0] == "ellipsis" else
                          ":" if it[0] == "slice" else D.fmt(it[1]) for it in node.attrs["items"])
        return f"{args[0]}[{items}]"
    return f"{node.op}({', '.join(args)})"


def _bare(text: str) -> str:
    """`(a + b)` -> `a + b` where the parentheses enclose the whole text."""
    if not (text.startswith("(") and text.endswith(")")):
        return text
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(text) - 1:
            return text
    return text[1:-1]


def _atom_text(g: Graph, a: Atom) -> str:
    x = expr_text(g, a.node)
    if a.kind == "diag":
        x = _bare(x)
    if a.kind == "diag":
        return f"diag({'1 / ' if a.inv else ''}{x})"
    if a.kind == "row":
        return f"{x}ᵀ"
    if a.kind == "mat":
        return x + ("ᵀ" if a.trans else "")
    if a.kind == "sel":
        return "sel"
    return x


def _coef_text(g: Graph, sign: int, num, scalars, elem) -> str:
    parts = [] if num == 1 else [str(num)]
    parts += [("1 / " if inv else "") + expr_text(g, n) for n, inv in scalars]
    parts += [("1 / " if inv else "") + expr_text(g, n) + " ⊙" for n, inv in elem]
    text = " · ".join(parts)
    return ("-" if sign < 0 else "") + text


def term_text(g: Graph, t: Term, state: str) -> str:
    """One term: `-beta · k kᵀ S`."""
    core = " ".join([_atom_text(g, a) for a in t.left] + [state] + [_atom_text(g, a) for a in t.right])
    dots = "".join(f" ({expr_text(g, b)}ᵀ{expr_text(g, c)})" for b, c in t.dots)
    coef = _coef_text(g, t.sign, t.num, t.scalars, t.elem)
    return (f"{coef} · " if coef not in ("", "-") else coef) + core + dots


def formula(g: Graph, t: Transition) -> str:
    """The transition as text, decay factored out: `S' = exp(g) · (I - beta · k kᵀ) S + …`."""
    s = t.state
    if t.kind == "zero":
        return f"{s}' = …  (does not read {s})"
    if t.kind in ("dense", "diagonal") or t.opaque:
        if t.opaque or not t.terms:
            return f"{s}' = T({s}) + …  (through {t.opaque})"
        return f"{s}' = " + " + ".join(term_text(g, x, s) for x in t.terms).replace("+ -", "- ") + " + …"
    d = t.decay
    decay = _coef_text(g, 1, d.num, d.scalars, d.elem)
    left = " ".join(_atom_text(g, a) for a in d.left)
    right = " ".join(_atom_text(g, a) for a in d.right)
    inner = s if t.kind == "identity" else \
        "(I " + " ".join(("- " if x.sign < 0 else "+ ") + term_text(g, replace(x, sign=1), "").strip()
                         for x in t.low_rank) + f") {s}"
    parts = [p for p in (decay + (" ⊙" if d.elem else ""), left, inner, right) if p]
    return f"{s}' = " + " ".join(parts).replace("⊙ ⊙", "⊙") + " + …"

"""State-free matrices as sums of structured terms, and the normalisation of linear terms.

`decompose` reads a state-free matrix node as a sum of products of atoms: `eye` is the identity,
`d[:, None] * eye` a diagonal, `outer(a, b)` a column times a row (low rank), sums, scalings,
transposes and matrix products of those distribute, a c·I literal is the number c and anything
else is a dense atom. `expand` applies that to the dense atoms of a linear term, pulls scalar
factors out of its vectors (`outer(β k, k)` = β k kᵀ) and turns adjacent row·col pairs into
scalars; `collect` adds up terms that differ only in their numeric coefficient. Together they
make equal maps compare equal (rnnc/linear_form.py builds the terms).
"""
from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import sympy

from . import dims as D
from .ir import Graph
from .linear_form import MAX_TERMS, Atom, Term, factors, number, ones, same, scale, strip_newaxis


def decompose(g: Graph, nid: int, trans: bool = False) -> list[Term] | None:
    """A state-free matrix as a sum of terms over a placeholder (state ""): identity, diagonal,
    low-rank (col·row) and dense atoms; None when it has more than MAX_TERMS terms."""
    node = g[nid]
    shape = node.shape
    base = Term("", "mat")
    num = number(g, nid)
    if num is not None and len(shape) == 2:
        return [scale(base, num=num)]
    if node.op == "eye":
        return [base]
    if node.op == "literal" and _scaled_identity(node.attrs["value"]) is not None:
        return [scale(base, num=Fraction(_scaled_identity(node.attrs["value"])))]
    out: list[Term] | None = None
    if node.op in ("add", "sub") and all(same(g[a].shape, shape) for a in node.args):
        x, y = (decompose(g, a, trans) for a in node.args)
        if x is not None and y is not None:
            out = x + [scale(t, -1 if node.op == "sub" else 1) for t in y]
    elif node.op == "neg":
        x = decompose(g, node.args[0], trans)
        out = None if x is None else [scale(t, -1) for t in x]
    elif node.op == "mul" and len(shape) == 2 and (pair := _broadcast_outer(g, node)) is not None:
        a, b, fs = pair
        a, b = (b, a) if trans else (a, b)  # a[:, None] * b[None, :] = a bᵀ
        out = [replace(base, left=(Atom("col", a), Atom("row", b)))]
        for split in fs:
            out = [scale(out[0], *split)]
    elif node.op in ("mul", "div"):
        m, f = node.args
        if node.op == "mul" and not same(g[m].shape, shape):
            m, f = f, m
        if same(g[m].shape, shape):
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


def _broadcast_outer(g: Graph, node) -> tuple[int, int, tuple] | None:
    """(a, b, factors) when a [p, q] product is an outer product written by broadcasting, a[:, None]
    times b[None, :] or b (either order), the column possibly scaled by [1, 1] factors
    (`(c[:, None, None] * x[:, :, None])` per head); None otherwise."""
    x, y = node.args
    for col, row in ((x, y), (y, x)):
        found = _column(g, col)
        b = _row_vector(g, row)
        if found is not None and b is not None and D.equal(g[found[0]].shape[0], node.shape[0]) \
                and D.equal(g[b].shape[0], node.shape[1]):
            return found[0], b, found[1]
    return None


def _column(g: Graph, nid: int) -> tuple[int, tuple] | None:
    """(a, factors) for a [p, 1] value written a[:, None], times or over one-element factors."""
    a, is_col = strip_newaxis(g, nid)
    if is_col:
        return a, ()
    node = g[nid]
    if node.op in ("mul", "div") and len(node.shape) == 2 and D.equal(node.shape[1], D.ONE):
        m, f = node.args
        if node.op == "mul" and ones(g[m].shape):
            m, f = f, m
        if ones(g[f].shape) and same(g[m].shape, node.shape) and (inner := _column(g, m)) is not None:
            split = factors(g, f, node.op == "div")
            if split is not None:
                return inner[0], inner[1] + (split,)
    return None


def _row_vector(g: Graph, nid: int) -> int | None:
    """The vector b of a row written `b` or `b[None, :]`; None for anything else."""
    node = g[nid]
    if len(node.shape) == 1:
        return nid
    items = node.attrs.get("items", ()) if node.op == "index" else ()
    if len(items) == 2 and items[0][0] == "new" and items[1][0] == "slice" and len(g[node.args[0]].shape) == 1 \
            and D.equal(items[1][1], 0) and D.equal(items[1][2], g[node.args[0]].shape[0]):
        return node.args[0]
    return None


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
    if ones(fs):
        split = factors(g, f, inv)
        return None if split is None else scale(t, *split)
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
                       lt.left, rt.left, t.dots + lt.dots + rt.dots, t.trans)
            out.append(_dots(g, new))
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
    """A row or column atom with its scalar factors and unit axes moved out: col(β k[:, None]) = β col(k)."""
    node, sign, num, scalars = atom.node, 1, 1, []
    while True:
        n = g[node]
        if n.op == "neg":
            sign, node = -sign, n.args[0]
            continue
        if n.op in ("mul", "div") and len(n.args) == 2:
            vec, f = n.args
            if n.op == "mul" and ones(g[vec].shape) and not ones(g[f].shape):
                vec, f = f, vec
            split = factors(g, f, n.op == "div") if ones(g[f].shape) and same(g[vec].shape, n.shape) else None
            if split is not None:
                sign, num, scalars = sign * split[0], num * split[1], scalars + split[2]
                node = vec
                continue
        break
    if atom.kind == "col":  # k[:, None] is the column k (and b[None, :] the row b): one atom for both writings
        node = strip_newaxis(g, node)[0]
    elif (row := _row_vector(g, node)) is not None:
        node = row
    return Term("", "mat", sign, num, tuple(sorted(scalars)), left=(replace(atom, node=node),))


def _vector(g: Graph, nid: int) -> int | None:
    """The vector a diagonal atom's node holds: `q[:, None]` -> q, a vector itself; None otherwise."""
    if len(g[nid].shape) == 1:
        return nid
    base, stripped = strip_newaxis(g, nid)
    return base if stripped else None


def _dots(g: Graph, t: Term) -> Term:
    """Adjacent row·col atoms on either side become a scalar inner product, and a sum over an
    axis after a diagonal scaling a contraction: 1ᵀ diag(q) = qᵀ (`sum(q[:, None] * S, 0)` = q @ S)."""
    sides = []
    dots = list(t.dots)
    for atoms in (t.left, t.right):
        out: list[Atom] = []
        for atom in atoms:
            if out and out[-1].kind == "row" and out[-1].node is None and atom.kind == "diag" and not atom.inv \
                    and (vec := _vector(g, atom.node)) is not None:
                out[-1] = Atom("row", vec)
                continue
            if out and out[-1].kind == "diag" and not out[-1].inv and atom.kind == "col" and atom.node is None \
                    and (vec := _vector(g, out[-1].node)) is not None:
                out[-1] = Atom("col", vec)
                continue
            if out and out[-1].kind == "row" and atom.kind == "col":
                dots.append(tuple(sorted((out[-1].node, atom.node), key=lambda x: -1 if x is None else x)))
                out.pop()
                continue
            out.append(atom)
        sides.append(tuple(out))
    return replace(t, left=sides[0], right=sides[1], dots=tuple(sorted(dots, key=repr)))


def normal_terms(g: Graph, terms: list[Term]) -> list[Term] | None:
    """Terms expanded (`expand`) and collected: the normal form equal maps share; None when the
    expansion blows up."""
    out: list[Term] = []
    for t in terms:
        ex = expand(g, t)
        if ex is None:
            return None
        out.extend(ex)
    return collect(out)


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

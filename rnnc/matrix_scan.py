"""Dense and block transitions: a group of states whose next values are linear in the group, as
one state scanned with matrices, next = A ⊙ states + b.

Two shapes of A are recognised on the canonical linear forms (rnnc/linear_form.py) of the group's
next values, the other states' values taken as known (linearity.group_stages):

  block  states of one shape that scale each other elementwise (a complex diagonal written as a
         real/imaginary pair: LRU, S4D): per element, an m×m matrix over the group's m states;
         a[i][j] is the elementwise coefficient of state j in state i's next value.
  dense  vector states read through state-free matrices (LSRL's LinState `A @ s`, S4's dense A):
         one [n, n] matrix over the concatenated states; a[i][j] is the [n_i, n_j] block.

Both run as the associative scan over (A_t, b_t) pairs (rnnc/runtime/scan.py `_matrix_scan`),
O(m³) per combine: see schedule.MATRIX_SCAN_MAX for the state sizes it takes. The coefficients
are built symbolically as new IR nodes, as scanplan.scan_coefficients does for a ⊙ h + b.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import dims as D
from .ir import Cell, Graph, Node
from .linear_form import Atom, Term, linear_forms
from .scanplan import _binary, _coefficient, _const, _oriented, zero_state


@dataclass(frozen=True)
class MatrixTransition:
    """What the analysis reports for a group: its kind, states and matrix size (m or n)."""

    kind: str  # "block" | "dense"
    states: tuple[str, ...]
    size: object  # a dim: m for a block group, Σ n_i for a dense one
    per_step: bool = False  # A changes per step (reads inputs or earlier states), else constant

    def text(self) -> str:
        n = D.fmt(self.size)
        if self.kind == "block":
            return f"block-diagonal {n}×{n} per element (coupled {', '.join(self.states)}) -> matrix scan"
        over = f" over {', '.join(self.states)}" if len(self.states) > 1 else ""
        return f"dense transition ({n}×{n}{over}, {'per step' if self.per_step else 'constant'}) -> matrix scan"


def _forms(cell: Cell, stages: dict[int, str], group: list[str]):
    leaves = {s.node_in: s.name for s in cell.states if s.name in group}
    return linear_forms(cell, stages, leaves)


def _dense_atoms(t: Term) -> bool:
    """A term of a vector state's next value that is a product of matrices: L₁ … L_k s."""
    return (t.orient == "col" and not t.right and not t.dots and not t.trans
            and all(a.kind in ("diag", "mat") or (a.kind in ("col", "row") and a.node is not None) for a in t.left))


def group_transition(cell: Cell, stages: dict[int, str], group: list[str]) -> MatrixTransition | str:
    """The group's transition as a block or dense matrix, or why it is neither. `stages`: the
    other states known (linearity.group_stages)."""
    states = [s for s in cell.states if s.name in group]
    forms = _forms(cell, stages, group)
    terms: list[Term] = []
    for s in states:
        form = forms.get(s.node_out)
        if form is None:
            continue
        if form.nonlinear:
            return form.nonlinear
        if form.opaque:
            state, op = next(iter(form.opaque.items()))
            return f"{s.name}'s next value reads {state} through {op}"
        terms += form.terms
    names = tuple(s.name for s in states)
    shape = states[0].shape
    reads = {n for t in terms for n in [a.node for a in t.left + t.right] + [x for x, _ in t.scalars + t.elem]}
    per_step = any(stages.get(n) in ("hoist", "loop") for n in reads if n is not None)
    if len(states) > 1 and all(len(s.shape) == len(shape) and all(map(D.equal, s.shape, shape)) for s in states) \
            and all(t.diagonal for t in terms):
        return MatrixTransition("block", names, D.const(len(states)), per_step)
    if all(len(s.shape) == 1 for s in states) and all(_dense_atoms(t) for t in terms):
        return MatrixTransition("dense", names, sum((s.shape[0] for s in states), D.const(0)), per_step)
    if any(len(s.shape) != 1 for s in states):
        return "a non-diagonal transition of a matrix or scalar state (only vector states scan with a dense matrix)"
    return "its transition mixes the states through ops the matrix scan does not build (a selection or an inner product)"


def _matrix(g: Graph, t: Term, rows, cols) -> int:
    """The [rows, cols] matrix of one dense term, L₁ … L_k (outermost first) times its coefficients."""
    m = None
    for atom in reversed(t.left):
        if atom.kind == "diag":
            d = _oriented(g, atom, True, 2)  # [p, 1]
            if atom.inv:
                d = _binary(g, "div", _const(g, 1), d)
            m = _binary(g, "mul", d, _eye(g, cols) if m is None else m)
            continue
        if atom.kind == "mat":
            x = atom.node if not atom.trans else \
                g.add(Node("transpose", (atom.node,), tuple(reversed(g[atom.node].shape))))
        else:  # a column a as [p, 1], a row b as [1, p]
            vec = g[atom.node].shape[-1]
            items = (("slice", D.const(0), vec), ("new",)) if atom.kind == "col" else (("new",), ("slice", D.const(0), vec))
            shape = (vec, D.ONE) if atom.kind == "col" else (D.ONE, vec)
            x = g.add(Node("index", (atom.node,), shape, attrs={"items": items}))
        if m is None:
            m = x
        else:
            m = g.add(Node("matmul", (x, m), (g[x].shape[0], g[m].shape[1])))
    if m is None:
        m = _eye(g, cols)
    for e, inv in t.elem:  # elementwise factors of the [rows] result scale its rows
        col = _oriented(g, Atom("diag", e), True, 2)
        m = _binary(g, "div" if inv else "mul", m, col)
    for s, inv in t.scalars:
        m = _binary(g, "div" if inv else "mul", m, s)
    if t.num != 1:
        m = _binary(g, "mul", m, _const(g, t.num))
    if t.sign < 0:
        m = g.add(Node("neg", (m,), g[m].shape))
    return m


def _eye(g: Graph, n) -> int:
    return g.add(Node("eye", (), (n, n), attrs={"n": n}))


def coefficients(cell: Cell, stages: dict[int, str], group: list[str], kind: str
                 ) -> tuple[tuple[tuple[int | None, ...], ...], tuple[int | None, ...]]:
    """(a, b) node ids: a[i][j] the coefficient of state j in state i's next value (None: zero;
    elementwise for "block", an [n_i, n_j] matrix for "dense"), b[i] state i's next value with the
    group's states at zero (None: zero). Appends the nodes to the cell's graph."""
    g = cell.graph
    states = [s for s in cell.states if s.name in group]
    forms = _forms(cell, stages, group)
    a, b = [], []
    for si in states:
        form = forms.get(si.node_out)
        row = []
        for sj in states:
            terms = form.of(sj.name) if form is not None else []
            if not terms:
                row.append(None)
            elif kind == "block":
                row.append(_coefficient(g, terms, len(sj.shape)))
            else:
                total = None
                for t in terms:
                    m = _matrix(g, t, si.shape[0], sj.shape[0])
                    total = m if total is None else _binary(g, "add", total, m)
                row.append(total)
        a.append(tuple(row))
        b.append(zero_state(g, stages, si.node_out, {}))
    return tuple(a), tuple(b)

"""The structure of a cell's step Jacobian ∂state_t/∂state_{t-1}, found from its IR.

Newton's method over time (backend "newton") solves one linear recurrence δ_t = J_t δ_{t-1} + r_t
per iteration, whose cost depends on J's shape: elementwise for a diagonal J, small matrices for
block-diagonal J (ParaRNN's 2×2 LSTM-CIFG), full matrices when J is dense.

The structure is found by pushing an abstract tangent through the step: each value records, per
state, whether a change of that state reaches it "entry by entry" (its entry p depends only on the
state's entry p: only elementwise ops of equal shapes in between, the registry's `elementwise`
fact) or mixed across entries (any other op on the way: a matmul, a reduction, a split, a
broadcast to another shape). Values that pass no derivative (comparisons, booleans, compile-time
numbers, ops with `grad="none"`) carry no dependence. States coupled entry by entry form a block
of size m (m = 1: diagonal); any mixing makes the whole coupled group dense.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import sympy

from . import dims as D
from . import registry
from .ir import Cell, Node

DIAG, DENSE = "diag", "dense"


@dataclass(frozen=True)
class JacobianGroup:
    """States whose next values depend on each other's previous values (a connected group), and
    the shape of that block of ∂state_t/∂state_{t-1}: "diagonal" (one state, entry by entry),
    "block" (m states of one shape, coupled entry by entry: an m×m matrix per entry) or "dense"."""

    kind: str  # "diagonal" | "block" | "dense"
    states: tuple[str, ...]
    size: str  # the block's side: "1", "2", or the dense group's total entries ("2*H")
    jumps: str | None = None  # the op whose derivative jumps with the states (relu, maximum, ...), if any

    def describe(self) -> str:
        if self.kind == "diagonal":
            out = "diagonal"
        elif self.kind == "block":
            out = f"block-diagonal, {self.size}×{self.size} blocks ({', '.join(self.states)})"
        else:
            out = f"dense, {self.size}×{self.size}" + (f" ({', '.join(self.states)})" if len(self.states) > 1 else "")
        return out if self.jumps is None else f"{out}, piecewise ({self.jumps})"


def dependence(cell: Cell) -> dict[str, dict[str, str]]:
    """For each state, how its next value depends on each state's previous value (DIAG or DENSE;
    absent: not at all, or only through values that pass no derivative)."""
    g = cell.graph
    rel: dict[int, dict[str, str]] = {s.node_in: {s.name: DIAG} for s in cell.states}
    shape_of = {s.name: s.shape for s in cell.states}
    roots = [s.node_out for s in cell.states]
    for nid in g.order(g.ancestors(roots)):
        node = g[nid]
        if nid in rel:
            continue
        if node.scalar or node.dtype == "bool" or not node.args or registry.get(node).grad == "none":
            rel[nid] = {}
            continue
        out: dict[str, str] = {}
        elementwise = registry.is_elementwise(node)
        for a in node.args:
            for name, how in rel.get(a, {}).items():
                aligned = (elementwise and how == DIAG and D.shapes_equal(g[a].shape, node.shape)
                           and D.shapes_equal(node.shape, shape_of[name]))
                if not aligned or out.get(name) == DENSE:
                    out[name] = DENSE
                else:
                    out[name] = DIAG
        rel[nid] = out
    return {s.name: dict(rel[s.node_out]) for s in cell.states}


#: Linearity verdicts (rnnc/linearity.py, from the canonical linear form) whose transition is elementwise:
#: a state with one of them that reads no other state has a diagonal Jacobian, however its update is
#: written (`(exp(g)[:, None] * eye(K)) @ S` is a matmul, but a diagonal one).
ELEMENTWISE_TRANSITIONS = {("elementwise_affine", None), ("matrix_affine", "additive")}


def jacobian_groups(cell: Cell, classes: dict[str, dict] | None = None) -> tuple[JacobianGroup, ...]:
    """The groups of coupled states, in declaration order, each with its Jacobian block's structure
    (`classes`, the linearity verdicts, refine states whose canonical form has an elementwise transition)."""
    dep = dependence(cell)
    for name, info in (classes or {}).items():
        if (info["class"], info.get("transition")) in ELEMENTWISE_TRANSITIONS and set(dep[name]) <= {name}:
            dep[name] = {name: DIAG} if name in dep[name] else {}
    names = [s.name for s in cell.states]
    shapes = {s.name: s.shape for s in cell.states}
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    for n, reads in dep.items():
        for m in reads:
            parent[root(m)] = root(n)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(root(n), []).append(n)
    out = []
    for members in groups.values():
        single = all(all(D.equal(d, D.const(1)) for d in shapes[n]) for n in members)  # one entry each
        dense = not single and any(how == DENSE for n in members for how in dep[n].values())
        nonlinear = classes is None or any(classes.get(n, {}).get("class") == "nonlinear" for n in members)
        jump = jumps(cell, members) if nonlinear else None  # only Newton's choice reads it (rnnc/schedule.py)
        if dense:
            total = sum((sympy.Mul(*shapes[n]) if shapes[n] else sympy.Integer(1) for n in members), sympy.Integer(0))
            out.append(JacobianGroup("dense", tuple(members), D.fmt(sympy.simplify(total)), jump))
        elif len(members) == 1:
            out.append(JacobianGroup("diagonal", tuple(members), "1", jump))
        else:
            out.append(JacobianGroup("block", tuple(members), str(len(members)), jump))
    return tuple(out)


def jumps(cell: Cell, names: list[str]) -> str | None:
    """The op (of the step) whose derivative makes the group's Jacobian jump as its states change, or
    None when the Jacobian is smooth in them: read from the jvp graph (rnnc/autodiff.py), where such
    an op's rule selects by a comparison (relu's `x > 0`, maximum's ties), here one that reads a state.
    Newton's method then becomes an active-set iteration, which converges in many more iterations
    (benchmarks/RESULTS.md: IndRNN)."""
    from .autodiff import differentiable, jvp

    g = cell.graph
    if not all(differentiable(g[n]) for n in g.ancestors([s.node_out for s in cell.states])):
        return None
    states = [s for s in cell.states if s.name in names]
    graph = copy.deepcopy(g)
    leaves = [graph.add(Node("input", (), s.shape)) for s in states]
    out, tangents = jvp(graph, [s.node_in for s in states], leaves, [s.node_out for s in states])
    reads_state = {s.node_in for s in cell.states}
    for nid in out.order(out.ancestors([t for t in tangents if t is not None])):
        node = out[nid]
        if nid in reads_state or any(a in reads_state for a in node.args):
            reads_state.add(nid)
            if nid >= len(g) and registry.get(node).kind == "compare":
                return _source_op(g, out, nid)
    return None


def _source_op(g, out, nid: int) -> str:
    """The forward op a derivative comparison came from: the op both its operands feed (maximum's
    `x0 > x1`), else the op that computed the value compared (relu's `y > 0`)."""
    args = [a for a in out[nid].args if a < len(g) and g[a].op != "const"]
    common = set.intersection(*(set(g.users(a)) for a in args)) if len(args) > 1 else set()
    for u in sorted(common):
        if registry.get(g[u]).kind != "compare":
            return g[u].op
    return g[args[0]].op if args else out[nid].op

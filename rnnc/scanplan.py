"""Rewrite an elementwise-affine state update h' = a ⊙ h + b into explicit IR nodes for a and b.

The scan backend needs a and b as state-free values (computed for all steps at once) to run
h_t = a_t ⊙ h_{t-1} + b_t as a parallel prefix scan. Both are built symbolically: a from the
canonical linear form (rnnc/linear_form.py) as the sum over its terms of the product of their
factors; b is the next value with the state set to zero (partially evaluated). Nothing is
computed by differencing, so an extreme gate (a ≈ 0, |b| large) loses no precision.
"""
from __future__ import annotations

from . import dims as D
from .ir import Cell, Graph, Node
from .linear_form import Atom, Term
from .linearity import group_stages, state_groups, transitions


def _binary(g: Graph, op: str, x: int, y: int) -> int:
    shape = D.broadcast(g[x].shape, g[y].shape)
    return g.add(Node(op, (x, y), shape, scalar=g[x].scalar and g[y].scalar))


def _const(g: Graph, value) -> int:
    value = int(value) if value == int(value) else float(value)
    return g.add(Node("const", (), (), attrs={"value": value}, scalar=True))


def _index(g: Graph, x: int, items: tuple, shape: tuple) -> int:
    return g.add(Node("index", (x,), shape, attrs={"items": items}))


def _oriented(g: Graph, atom: Atom, rows: bool, rank: int) -> int:
    """A diagonal atom's vector shaped to broadcast against the state: [p] scales a vector
    state, [p, 1] the rows of a matrix state, [q] its columns."""
    nid, shape = atom.node, g[atom.node].shape
    vec = next((d for d in shape if not D.equal(d, D.ONE)), D.ONE)
    if rank == 2 and rows:
        if len(shape) == 2 and D.equal(shape[1], D.ONE):
            return nid
        if len(shape) == 2:  # [1, p]
            nid = _index(g, nid, (("int", D.const(0)),), (vec,))
        return _index(g, nid, (("slice", D.const(0), vec), ("new",)), (vec, D.ONE))
    if len(shape) == 2 and D.equal(shape[1], D.ONE):  # [p, 1] -> [p]
        return _index(g, nid, (("slice", D.const(0), vec), ("int", D.const(0))), (vec,))
    return nid


def _coefficient(g: Graph, terms: list[Term], rank: int) -> int:
    """a = Σ_terms ± num · Π factors, for states whose terms are all diagonal."""
    total = None
    for t in terms:
        factors = ([(_oriented(g, x, True, rank), x.inv) for x in t.left]
                   + [(_oriented(g, x, False, rank), x.inv) for x in t.right] + list(t.scalars + t.elem))
        term = None if t.num == 1 else _const(g, t.num)
        for f, inv in factors:
            if term is None:
                term = _binary(g, "div", _const(g, 1), f) if inv else f
            else:
                term = _binary(g, "div" if inv else "mul", term, f)
        if term is None:
            term = _const(g, 1)
        if total is None:
            total = g.add(Node("neg", (term,), g[term].shape, scalar=g[term].scalar)) if t.sign < 0 else term
        else:
            total = _binary(g, "sub" if t.sign < 0 else "add", total, term)
    return total


def zero_state(g: Graph, stages: dict[int, str], nid: int, memo: dict) -> int | None:
    """The node's value with every state set to 0 (None: exactly zero), by partial evaluation.

    Only called on values linear (affine) in the states: each op is linear in its
    state-dependent operands, so a zero operand gives zero, and otherwise the op is rebuilt over
    the operands' zero-state values (a concat with a zero part gets an explicit zeros block).
    """
    if stages.get(nid) != "loop":
        return nid
    if nid in memo:
        return memo[nid]
    node = g[nid]
    zeros = {a: zero_state(g, stages, a, memo) for a in node.args} if node.op != "state" else {}
    if node.op == "state":
        out = None
    elif node.op in ("add", "sub"):
        x, y = (zeros[a] for a in node.args)
        if y is None:
            out = x
        elif x is None:
            out = y if node.op == "add" else g.add(Node("neg", (y,), g[y].shape, scalar=g[y].scalar))
        else:
            out = _binary(g, node.op, x, y)
    elif node.op == "concat":
        if all(zeros[a] is None for a in node.args):
            out = None
        else:
            parts = tuple(zeros[a] if zeros[a] is not None else
                          g.add(Node("full", (), g[a].shape, attrs={"value": 0})) for a in node.args)
            out = g.add(Node("concat", parts, node.shape, attrs=dict(node.attrs)))
    elif node.op == "where" and zeros[node.args[0]] == node.args[0]:
        c, x, y = (zeros[a] for a in node.args)
        if x is None and y is None:
            out = None
        else:
            x, y = (v if v is not None else g.add(Node("const", (), (), attrs={"value": 0}, scalar=True)) for v in (x, y))
            out = g.add(Node("where", (c, x, y), node.shape, attrs=dict(node.attrs)))
    else:
        deps = [a for a in node.args if stages.get(a) == "loop"]
        if len(deps) != 1 or (node.op == "div" and deps[0] != node.args[0]):
            raise ValueError(f"cannot partially evaluate {node.op}")
        if zeros[deps[0]] is None:
            out = None
        else:
            args = tuple(zeros[a] for a in node.args)
            scalar = all(g[a].scalar for a in args)  # e.g. (h + 1) * 2: a compile-time number
            out = g.add(Node(node.op, args, () if scalar else node.shape, node.dtype, attrs=dict(node.attrs),
                             scalar=scalar))
    memo[nid] = out
    return out


def scan_coefficients(cell: Cell, stages: dict[int, str], skip: frozenset[str] = frozenset()
                      ) -> dict[str, tuple[int, int | None]]:
    """For each state not in `skip`: (a, b) node ids with next = a ⊙ state + b (b None when zero),
    in the order the states can be scanned (a state in a later layer after those it reads).

    Each group of states is read with the other states' values as known (linearity.state_groups):
    for a state in a later layer, a and b read earlier states, and are computed from their scanned
    sequences. Appends the new nodes to the cell's graph; the caller re-stages the cell afterwards.
    """
    g = cell.graph
    by_name = {s.name: s for s in cell.states}
    out = {}
    for group in state_groups(cell):
        names = [n for n in group if n not in skip]
        if not names:
            continue
        sub = group_stages(cell, stages, group)
        found = transitions(cell, sub, group)
        for name in names:
            s, t = by_name[name], found[name]
            a = _coefficient(g, t.terms, len(s.shape)) if t.terms else _const(g, 0)
            b = zero_state(g, sub, s.node_out, {})
            out[name] = (a, b)
    return out

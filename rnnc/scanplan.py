"""Rewrite an elementwise-affine state update h' = a ⊙ h + b into explicit IR nodes for a and b.

The scan backend needs a and b as state-free values (computed for all steps at once) to run
h_t = a_t ⊙ h_{t-1} + b_t as a parallel prefix scan. Both are built symbolically from the
affine form (rnnc/linearity.py): a is the sum over the state's paths of the product of their
factors; b is the next value with the state set to zero (partially evaluated). Nothing is
computed by differencing, so an extreme gate (a ≈ 0, |b| large) loses no precision.
"""
from __future__ import annotations

from . import dims as D
from .ir import Cell, Graph, Node
from .linearity import affine_forms


def _binary(g: Graph, op: str, x: int, y: int) -> int:
    shape = D.broadcast(g[x].shape, g[y].shape)
    return g.add(Node(op, (x, y), shape, scalar=g[x].scalar and g[y].scalar))


def _coefficient(g: Graph, chains: list[tuple]) -> int:
    total = None
    for chain in chains:
        term, negative = None, False
        for link in chain:
            if link[0] == "neg":
                negative = not negative
                continue
            _, factor, divides = link
            if term is None:
                term = factor if not divides else _binary(g, "div", g.add(Node("const", (), (), attrs={"value": 1},
                                                                             scalar=True)), factor)
            else:
                term = _binary(g, "div" if divides else "mul", term, factor)
        if term is None:
            term = g.add(Node("const", (), (), attrs={"value": 1}, scalar=True))
        if total is None:
            total = g.add(Node("neg", (term,), g[term].shape, scalar=g[term].scalar)) if negative else term
        else:
            total = _binary(g, "sub" if negative else "add", total, term)
    return total


def _zero_state(g: Graph, stages: dict[int, str], nid: int, memo: dict) -> int | None:
    """The node's value with every state set to 0 (None: exactly zero)."""
    if stages.get(nid) != "loop":
        return nid
    if nid in memo:
        return memo[nid]
    node = g[nid]
    if node.op == "state":
        out = None
    elif node.op in ("add", "sub"):
        x, y = (_zero_state(g, stages, a, memo) for a in node.args)
        if y is None:
            out = x
        elif x is None:
            out = y if node.op == "add" else g.add(Node("neg", (y,), g[y].shape))
        else:
            out = _binary(g, node.op, x, y)
    elif node.op == "neg":
        x = _zero_state(g, stages, node.args[0], memo)
        out = None if x is None else g.add(Node("neg", (x,), g[x].shape))
    elif node.op in ("mul", "div"):
        x, y = (_zero_state(g, stages, a, memo) for a in node.args)
        out = None if x is None or y is None else _binary(g, node.op, x, y)
    elif node.op in ("matmul", "outer", "transpose", "index", "broadcast"):
        # linear in their one state-dependent operand: zero in, zero out
        deps = [a for a in node.args if stages.get(a) == "loop"]
        if len(deps) != 1 or _zero_state(g, stages, deps[0], memo) is not None:
            raise ValueError(f"cannot partially evaluate {node.op}")
        out = None
    else:  # the affine forms of scannable states only pass through the ops above
        raise ValueError(f"cannot partially evaluate {node.op}")
    memo[nid] = out
    return out


def scan_coefficients(cell: Cell, stages: dict[int, str], skip: frozenset[str] = frozenset()
                      ) -> dict[str, tuple[int, int | None]]:
    """For each state not in `skip`: (a, b) node ids with next = a ⊙ state + b (b None when zero).

    Appends the new nodes to the cell's graph; the caller re-stages the cell afterwards.
    """
    g = cell.graph
    forms = affine_forms(cell, stages)
    out = {}
    for s in cell.states:
        if s.name in skip:
            continue
        chains = forms[s.node_out].chains.get(s.name, []) if s.node_out in forms else []
        a = _coefficient(g, chains) if chains else g.add(Node("const", (), (), attrs={"value": 0}, scalar=True))
        b = _zero_state(g, stages, s.node_out, {})
        out[s.name] = (a, b)
    return out

"""Derivatives of IR graphs as IR graphs: reverse mode (`vjp`) and forward mode (`jvp`).

Both walk the part of the graph between the variables and the results and apply each op's rule
from the registry (`Prim.vjp_ir`, `Prim.jvp_ir`, written in rnnc/derivatives.py and the
registry's records), so there is one derivative rule per op, and every back end that renders IR
renders derivatives. The result is a copy of the graph with the derivative nodes appended: the
given graph's node ids keep their meaning in it, the new nodes are shared wherever equal (the
Builder merges them with each other and with the forward nodes) and none is dead (each is needed
by a returned (co)tangent). A zero (co)tangent is None, never a node of zeros.

`jvp` is what a Newton-style solver needs (∂h_t/∂h_{t-1} · v), `vjp` what backpropagation
through time needs (the adjoint of a step).
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

from . import dims as D
from . import registry
from .ir import Graph
from .irbuild import Builder


def vjp(graph: Graph, outputs: Sequence[int], cotangents: Sequence[int | None], wrt: Sequence[int],
        share: Iterable[int] | None = None, adjoints: dict[int, int] | None = None) -> tuple[Graph, list[int | None]]:
    """The cotangent of each `wrt` node given the `cotangents` of the `outputs` (ids of nodes in
    `graph`, each shaped like its output, e.g. `input` leaves the caller added). Each wrt node is
    an independent variable: what it depends on is not differentiated through.

    `share` limits the forward nodes the derivative may reuse when it needs an equal value (a
    back end passes those it has at hand; the rules' own operands and results are always used).
    `adjoints`, when given, is filled with each differentiated node's cotangent (for naming)."""
    if len(outputs) != len(cotangents):
        raise ValueError("one cotangent per output")
    g = copy.deepcopy(graph)
    b, n0 = Builder(g, share), len(g)
    for o, c in zip(outputs, cotangents):
        if c is not None and not D.shapes_equal(g[o].shape, g[c].shape):
            raise ValueError(f"cotangent %{c} {D.fmt_shape(g[c].shape)} of output %{o} {D.fmt_shape(g[o].shape)}")
    active = _between(g, wrt, outputs)
    adj: dict[int, object] = {}  # node -> its cotangent (a node id; {item: id} for a split)
    for o, c in zip(outputs, cotangents):
        if c is not None and o in active:
            _accumulate(b, adj, o, c)
    variables = set(wrt)
    for nid in reversed(g.order(active)):
        if nid in variables or nid not in adj:
            continue
        node = g[nid]
        rule = _rule(node, "vjp_ir")
        if rule is None:
            continue
        ct = adj[nid]
        for a, c in zip(node.args, rule(b, node, node.args, nid, ct)):
            if c is not None and a in active:
                _accumulate(b, adj, a, c)
    results = [_single(adj.get(w)) for w in wrt]
    out, new_id = _compact(g, n0, results)
    if adjoints is not None:
        adjoints.update((n, new_id[c]) for n, c in adj.items() if isinstance(c, int) and c in new_id)
    return out, [None if r is None else new_id[r] for r in results]


def jvp(graph: Graph, inputs: Sequence[int], tangents: Sequence[int | None],
        outputs: Sequence[int], share: Iterable[int] | None = None) -> tuple[Graph, list[int | None]]:
    """The tangent of each of `outputs` given the `tangents` of the `inputs` (node ids in `graph`,
    each shaped like its input). `share` as for vjp."""
    if len(inputs) != len(tangents):
        raise ValueError("one tangent per input")
    g = copy.deepcopy(graph)
    b, n0 = Builder(g, share), len(g)
    tan: dict[int, int] = {}
    for x, t in zip(inputs, tangents):
        if t is not None:
            if not D.shapes_equal(g[x].shape, g[t].shape):
                raise ValueError(f"tangent %{t} {D.fmt_shape(g[t].shape)} of input %{x} {D.fmt_shape(g[x].shape)}")
            tan[x] = t
    for nid in g.order(_between(g, list(tan), outputs)):
        node = g[nid]
        if nid in tan or not any(a in tan for a in node.args):
            continue
        rule = _rule(node, "jvp_ir")
        if rule is not None:
            t = rule(b, node, node.args, nid, tuple(tan.get(a) for a in node.args))
            if t is not None:
                tan[nid] = t
    results = [tan.get(o) for o in outputs]
    out, new_id = _compact(g, n0, results)
    return out, [None if r is None else new_id[r] for r in results]


def differentiable(node) -> bool:
    """Whether vjp and jvp can pass through the node: it has IR rules, or passes no gradient."""
    prim = registry.get(node)
    return prim.grad == "none" or (prim.vjp_ir is not None and prim.jvp_ir is not None)


def _rule(node, field: str):
    """The op's rule, or None when it passes no gradient (comparisons, sign, leaves, ...)."""
    prim = registry.get(node)
    if prim.grad == "none":
        return None
    rule = getattr(prim, field)
    if rule is None:
        raise NotImplementedError(f"no IR derivative rule for {prim.name}")
    return rule


def _between(g: Graph, sources: Sequence[int], sinks: Sequence[int]) -> set[int]:
    """Float nodes on a path from a source to a sink (both included); compile-time numbers and
    booleans carry no derivative."""
    up = g.ancestors(sinks)
    down: set[int] = set(s for s in sources if s in up)
    for nid in g.order(up):
        node = g[nid]
        if nid not in down and any(a in down for a in node.args) and not node.scalar and node.dtype != "bool":
            down.add(nid)
    return down


def _accumulate(b: Builder, adj: dict[int, object], nid: int, ct: object) -> None:
    """Add a cotangent contribution; a split's arrive per item, as {item index: node}."""
    old = adj.get(nid)
    if isinstance(ct, dict):
        merged = dict(old or {})
        for i, c in ct.items():
            merged[i] = c if i not in merged else b.add(merged[i], c)
        adj[nid] = merged
    else:
        adj[nid] = ct if old is None else b.add(old, ct)


def _single(ct: object) -> int | None:
    if isinstance(ct, dict):
        raise ValueError("a split (several values) cannot be a variable: differentiate its items")
    return ct


def _compact(g: Graph, n0: int, results: list[int | None]) -> tuple[Graph, dict[int, int]]:
    """Drop appended nodes no result needs (a rule's by-products for a constant operand): the
    graph, and the new id of each node kept (nodes below n0, the original graph's, keep theirs)."""
    live = g.ancestors(r for r in results if r is not None)
    new_id = {n: n for n in range(n0)}
    if all(n in live for n in range(n0, len(g))):
        new_id.update((n, n) for n in range(n0, len(g)))
        return g, new_id
    out = g.head(n0)
    for n in range(n0, len(g)):
        if n in live:
            node = copy.copy(g[n])
            node.args = tuple(new_id[a] for a in node.args)
            new_id[n] = out.add(node)
    return out, new_id

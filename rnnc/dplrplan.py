"""The generalized delta rule's chunk plan: a matrix state's update read as micro-steps.

Each micro-step is, in the canonical linear form of its result over its input (rnnc/linear_form.py),

    S' = D S + c (P a)(Q b)ᵀ S + Σ_i c_i (P_i k_i)(Q_i v_i)ᵀ

with D a decay (exp of per-key and scalar log-gates, or a positive constant), at most one low-rank
term (P, Q products of state-free diagonals, c a state-free scalar) and a sum of outer products.
That is S' = diag(e^gk) e^g S + a' (b'ᵀ S) + Σ k' v'ᵀ with a' = c P a, b' = Q b, k' = P_i k_i,
v' = c_i Q_i v_i, which rnnc/runtime/chunk_dplr.py runs chunkwise: RWKV-7's diag(w) + a bᵀ, the
delta rule with any decay (KDA's (I − β k kᵀ) diag(e^g) is D = diag(e^g), a = −β k, b = e^g ⊙ k),
and an update written as successive such steps (DeltaProduct: `let S1 = exp(g) * S`, then one
Householder step per factor). Every equal writing of a step has the same canonical terms, so the
same plan. The steps are the [K, V] values every path from S to S' passes through (dominators),
grouped greedily into the longest runs that are one such step each.
"""
from __future__ import annotations

import math

from .ir import Cell, Graph, State
from .linear_form import Atom, Term, linear_forms, same
from .matrix_terms import _vector, matrix_terms, normal_terms
from .plans import MicroStep
from .scanplan import _binary, _const, _oriented, zero_state


class NotStep(Exception):
    """The run of the update is not one micro-step (the message says why)."""


def micro_steps(cell: Cell, stages: dict[int, str], s: State) -> tuple[MicroStep, ...]:
    """The micro-steps of state `s`'s update, in order; NotStep with the reason when there are none."""
    chain = _chain(cell.graph, stages, s)
    steps: list[MicroStep] = []
    i = 0
    while i < len(chain) - 1:
        why = None
        for j in range(len(chain) - 1, i, -1):  # the longest run first
            try:
                steps.extend(_step(cell, stages, s, chain[i], chain[j]))
            except NotStep as e:
                why = why or e
                continue
            i = j
            break
        else:
            raise why
    if not any(st.v is not None for st in steps):
        raise NotStep("its update is zero")
    for st in steps:
        for key in ("a", "b", "k", "v", "gk", "g"):
            nid = getattr(st, key)
            if nid is not None and stage_of(cell.graph, stages, nid) == "loop":
                raise NotStep(f"its {'decay' if key in ('gk', 'g') else key} reads the state")
    return tuple(steps)


def stage_of(g: Graph, stages: dict[int, str], nid: int) -> str:
    """A node's stage; one the plan added (not staged yet) takes its operands' latest."""
    if nid in stages:
        return stages[nid]
    found = {stage_of(g, stages, a) for a in g[nid].args}
    return "loop" if "loop" in found else "hoist" if "hoist" in found else "const"


def _chain(g: Graph, stages: dict[int, str], s: State) -> list[int]:
    """S, the state-shaped values every path from S to S' passes through (in order), S'."""
    ahead: set[int] = set()
    stack = [s.node_in]
    while stack:
        n = stack.pop()
        if n not in ahead:
            ahead.add(n)
            stack.extend(u for u in g.users(n) if stages.get(u) == "loop")
    between = ahead & g.ancestors([s.node_out])
    cuts = [n for n in g.order(between) if n not in (s.node_in, s.node_out) and same(g[n].shape, s.shape)
            and not _reaches(g, s.node_in, s.node_out, n, between)]
    return [s.node_in] + cuts + [s.node_out]


def _reaches(g: Graph, src: int, dst: int, avoid: int, within: set[int]) -> bool:
    seen, stack = {avoid}, [src]
    while stack:
        n = stack.pop()
        if n == dst:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(u for u in g.users(n) if u in within)
    return False


def _step(cell: Cell, stages: dict[int, str], s: State, m_in: int, m_out: int) -> list[MicroStep]:
    """The micro-step(s) taking value m_in to m_out: one with the transition and the first outer product
    of the update, one more per further outer product; NotStep when the run is not one step."""
    g = cell.graph
    K = s.shape[0]
    form = linear_forms(cell, stages, {m_in: s.name}).get(m_out)
    if form is None or form.nonlinear or form.opaque or form.states != {s.name}:
        raise NotStep(f"its update reads {s.name} other than through a linear map")
    terms = normal_terms(g, form.of(s.name))
    if terms is None:
        raise NotStep("its transition has too many terms")
    for t in terms:
        if t.trans or t.elem or t.dots or t.right or any(a.kind not in ("diag", "col", "row") for a in t.left):
            raise NotStep("its transition is not a decay plus a low-rank term a bᵀ (a dense or elementwise "
                          "factor, or a per-value decay)")
    diag = [t for t in terms if all(a.kind == "diag" for a in t.left)]
    low = [t for t in terms if t not in diag]
    if len(diag) != 1:
        raise NotStep("its transition has no single decay term (D S, with D exp of a log-gate)")
    if len(low) > 1:
        raise NotStep(f"its transition has {len(low)} low-rank terms; write several as successive updates "
                      f"(one `{s.name} + a (b @ {s.name})`-style step each)")
    gk, gs = _gates(g, diag[0], K)
    a, b = _low_rank(g, low[0]) if low else (None, None)
    try:
        update = zero_state(g, stages, m_out, {m_in: None})
    except ValueError as e:
        raise NotStep(str(e)) from None
    outers = [] if update is None else matrix_terms(g, update)
    if outers is None:
        raise NotStep("its update has too many terms")
    pairs = [_outer(g, t) for t in outers] or [(None, None)]
    return [MicroStep(a, b, *pairs[0], gk, gs)] + [MicroStep(k=k, v=v) for k, v in pairs[1:]]


def _gates(g: Graph, t: Term, K) -> tuple[int | None, int | None]:
    """The decay term's log-gates: (per key [K], scalar []), each a sum where there are several."""
    from .chunkplan import NotChunkable, _log_gate

    if t.sign < 0 or not _positive(t.num) or any(a.inv for a in t.left) or any(inv for _, inv in t.scalars):
        raise NotStep("its decay is not written as exp(log-gate) or a positive constant")
    try:
        keys = [_log_gate(g, a.node, K, "k") for a in t.left]
        scalars = [_log_gate(g, n, None, "s") for n, _ in t.scalars]
    except NotChunkable as e:
        raise NotStep(str(e)) from None
    if t.num != 1:
        scalars.append(_const(g, math.log(t.num)))
    return _sum(g, keys), _sum(g, scalars)


def _positive(num) -> bool:
    try:
        return float(num) > 0
    except TypeError:  # a symbolic coefficient (a mean's 1/K)
        return False


def _sum(g: Graph, nodes: list[int]) -> int | None:
    out = None
    for n in nodes:
        out = n if out is None else _binary(g, "add", out, n)
    return out


def _split(t: Term) -> tuple[tuple[Atom, ...], Atom, Atom, tuple[Atom, ...]]:
    """P, col, row, Q of a term whose left atoms are P col row Q (P, Q diagonals)."""
    kinds = [a.kind for a in t.left]
    if kinds.count("col") != 1 or kinds.count("row") != 1 or kinds.index("row") != kinds.index("col") + 1:
        raise NotStep("a term is not a column times a row (a bᵀ)")
    i = kinds.index("col")
    col, row = t.left[i], t.left[i + 1]
    if col.node is None or row.node is None:
        raise NotStep("a low-rank term sums over an axis (a vector of ones)")
    return t.left[:i], col, row, t.left[i + 2:]


def _scaled(g: Graph, vec: int, diags: tuple[Atom, ...], scalars=(), num=1) -> int:
    """vec ⊙ Π diags · Π scalars · num, as nodes (a diagonal or scalar that divides: a division); a
    scalar with unit axes (`beta[None, None]`, one head's β) is taken without them, so vec keeps its shape."""
    from .chunkplan import _unexpanded

    out = vec
    for atom in diags:
        factor = _vector(g, atom.node)
        out = _binary(g, "div" if atom.inv else "mul", out, _oriented(g, atom, False, 2) if factor is None else factor)
    for n, inv in scalars:
        out = _binary(g, "div" if inv else "mul", out, _unexpanded(g, n))
    if num != 1:
        value = float(num)
        out = _binary(g, "mul", _const(g, int(value) if value == int(value) else value), out)
    return out


def _low_rank(g: Graph, t: Term) -> tuple[int, int]:
    """(a', b') of the term c (P a)(Q b)ᵀ: a' = c P a, b' = Q b."""
    P, col, row, Q = _split(t)
    return _scaled(g, col.node, P, t.scalars, t.sign * t.num), _scaled(g, row.node, Q)


def _outer(g: Graph, t: Term) -> tuple[int, int]:
    """(k', v') of an update term c (P k)(Q v)ᵀ: k' = P k, v' = c Q v."""
    if t.elem or t.dots or t.right or any(a.kind not in ("diag", "col", "row") for a in t.left):
        raise NotStep("its update is not a sum of outer products k vᵀ")
    P, col, row, Q = _split(t)
    return _scaled(g, col.node, P), _scaled(g, row.node, Q, t.scalars, t.sign * t.num)

"""IR rewrites: shared subexpressions merged, work moved out of the recurrence.

`merge_common`: two nodes computing the same op on the same operands become one (a def inlined
twice, `exp(g)` written twice), so that analyses comparing values by node see equal values as
equal, and the generated code computes each once.
`hoist_sum_terms`: a sum inside the loop whose terms partly do not depend on the state is
regrouped so those terms are added once, outside the loop. For LSTM,
`W_ih x + b_ih + W_hh h + b_hh` becomes `(W_ih x + b_ih + b_hh) + W_hh h`: one add per step
instead of two, and the invariant part is one hoisted op over all time steps.
"""
from __future__ import annotations

import copy

from . import dims as D
from .analysis import stages as compute_stages
from .ir import Cell, Graph, Node

SUM_OPS = ("add", "sub")


def optimize(cell: Cell) -> Cell:
    """A rewritten copy of the cell (the original IR is left as elaborated)."""
    cell = copy.deepcopy(cell)
    merge_common(cell)
    hoist_sum_terms(cell)
    return cell


LEAVES = ("input", "param", "state")


def _pinned(cell: Cell) -> set[int]:
    """Nodes the cell's interface refers to by id: never merged away (others merge into them)."""
    out = {p.node for p in cell.inputs} | {p.node for p in cell.outputs} | {p.node for p in cell.params}
    out |= {n for s in cell.states for n in (s.node_in, s.node_out, s.init)}
    for c in cell.combines:
        out |= set(c.args_left) | set(c.args_right) | set(c.results)
    return out | set(cell.extra_roots)


def merge_common(cell: Cell) -> None:
    """Common-subexpression elimination over the step graph (pure ops only; leaves stay distinct)."""
    g = cell.graph
    pinned = _pinned(cell)
    seen: dict[tuple, int] = {}
    canon: dict[int, int] = {}
    for nid in g.order(cell.live()):
        node = g[nid]
        args = tuple(canon.get(a, a) for a in node.args)
        if args != node.args:
            g.rewire(nid, args)
        if node.op in LEAVES:
            continue
        key = (node.op, args, repr(sorted(node.attrs.items())), tuple(D.fmt(d) for d in node.shape),
               node.dtype, node.scalar)
        first = seen.setdefault(key, nid)
        if first != nid and nid not in pinned:
            canon[nid] = first
            if g[first].name is None:
                g[first].name = node.name


def _flatten(g: Graph, nid: int, sign: int, stages: dict[int, str], root: int, out: list) -> None:
    """The signed terms of the sum at `nid`, left to right, into `out` (a stack, not recursion: a sum
    written with many terms is a chain as deep as it is long)."""
    todo = [(nid, sign)]
    while todo:
        nid, sign = todo.pop()
        node = g[nid]
        inner = node.op in SUM_OPS and node.dtype == "float" and stages.get(nid) == "loop"
        if inner and (nid == root or (node.name is None and _used_once(g, nid))):
            a, b = node.args
            todo.append((b, sign if node.op == "add" else -sign))
            todo.append((a, sign))
        else:
            out.append((sign, nid))


def _used_once(g: Graph, nid: int) -> bool:
    """Whether the node is one operand of one node: `a + a` uses `a` twice, and flattening such a
    shared sum into its user would copy its terms (exponentially many for nested `f(a) + f(a)`)."""
    return sum(g[u].args.count(nid) for u in g.users(nid)) == 1


def _fold(g: Graph, terms: list[tuple[int, int]], loc) -> tuple[int, int]:
    """Sum of signed terms as new nodes; returns (sign, node) with the sign left to apply."""
    sign, acc = terms[0]
    for s, t in terms[1:]:
        shape = D.broadcast(g[acc].shape, g[t].shape)
        op = "add" if s == sign else "sub"
        acc = g.add(Node(op, (acc, t), shape, loc=loc))
    return sign, acc


def hoist_sum_terms(cell: Cell) -> None:
    g = cell.graph
    stages = compute_stages(cell)
    for nid in list(g.order(cell.live())):
        node = g[nid]
        if node.op not in SUM_OPS or stages.get(nid) != "loop" or node.dtype != "float":
            continue
        users = g.users(nid)
        if node.name is None and _used_once(g, nid) and g[users[0]].op in SUM_OPS and stages.get(users[0]) == "loop":
            continue  # part of a bigger sum: handled from its root
        terms: list[tuple[int, int]] = []
        _flatten(g, nid, 1, stages, nid, terms)
        invariant = [t for t in terms if stages[t[1]] != "loop"]
        varying = [t for t in terms if stages[t[1]] == "loop"]
        if len(invariant) < 2 or not varying:
            continue
        s_inv, inv = _fold(g, invariant, node.loc)
        s_var, var = _fold(g, varying, node.loc)
        if s_inv < 0 and s_var < 0:
            op, args, negate = "add", (inv, var), True
        elif s_inv < 0:
            op, args, negate = "sub", (var, inv), False
        else:
            op, args, negate = ("add" if s_var > 0 else "sub"), (inv, var), False
        if negate:
            args = (g.add(Node(op, args, node.shape, loc=node.loc)),)
            op = "neg"
        g.replace(nid, op, args)
        stages = compute_stages(cell)

"""States that are max-plus (tropical) linear in themselves: s' = max(s + a, b1, b2, ...).

xLSTM's max-stabiliser m_t = max(log f_t + m_{t-1}, ĩ_t) is one: not linear in the ordinary sense,
but linear over the (max, +) semiring, so its steps compose associatively, (a1, b1) then (a2, b2) is
(a1 + a2, max(b1 + a2, b2)), and all of its values come from one parallel scan
(rnnc/runtime/scan.py, `_maxplus_scan`). Once they are known, the states that read it (mLSTM's C and
n) are ordinary linear states in a stage after it, which is how the chunk backend runs the cell
(rnnc/chunkplan.py). The form is read off the IR: a `maximum` tree whose leaves are state-free values
and exactly one `s` or `s + a` (a state-free), in any order and nesting.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import dims as D
from .ir import Cell, State


@dataclass(frozen=True)
class MaxPlus:
    """s' = max(s + a, *b) with a and every b state-free node ids (a None: s' = max(s, *b))."""

    state: str
    a: int | None
    b: tuple[int, ...]


def maxplus_form(cell: Cell, stages: dict[int, str], s: State) -> MaxPlus | None:
    """The max-plus form of state `s`'s update, or None when it has none."""
    g = cell.graph
    leaves: list[int] = []
    stack = [s.node_out]
    while stack:  # the leaves of the maximum tree
        nid = stack.pop()
        if g[nid].op == "maximum" and stages.get(nid) == "loop" and g[nid].shape == g[s.node_out].shape:
            stack.extend(g[nid].args)
        else:
            leaves.append(nid)
    shifts, bs = [], []
    for nid in leaves:
        node = g[nid]
        if stages.get(nid) != "loop":
            bs.append(nid)
        elif nid == s.node_in:
            shifts.append(None)
        elif node.op == "add" and s.node_in in node.args and node.args[0] != node.args[1]:
            a = node.args[1] if node.args[0] == s.node_in else node.args[0]
            if stages.get(a) == "loop":
                return None
            shifts.append(a)
        else:
            return None
    if len(shifts) != 1 or not bs:
        return None
    shape = g[s.node_out].shape
    for nid in bs + [n for n in shifts if n is not None]:  # a scalar, or the state's own shape (no broadcasting up)
        if g[nid].shape and not (len(g[nid].shape) == len(shape) and all(map(D.equal, g[nid].shape, shape))):
            return None
    return MaxPlus(s.name, shifts[0], tuple(bs))


def classify_maxplus(cell: Cell, stages: dict[int, str], classes: dict[str, dict]) -> None:
    """Mark nonlinear states whose update is max-plus linear (`maxplus` in their verdict)."""
    for s in cell.states:
        info = classes[s.name]
        if info["class"] != "nonlinear":
            continue
        form = maxplus_form(cell, stages, s)
        if form is not None:
            info["maxplus"] = True
            info["why"] = (f"{s.name}' = max({s.name} + a, b) with a and b state-free: linear over (max, +), "
                           "a max-plus scan (the chunk backend scans it before the states that read it)")

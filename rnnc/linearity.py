"""Which states are linear in themselves, and what the linear transition looks like.

The verdicts are read off each state's canonical linear form (rnnc/linear_form.py), so every
algebraically equal writing of an update gets the same class, decay and transition:

  elementwise_affine  h' = a ⊙ h + b (a, b state-free; vector and scalar states)
  matrix_affine       S' = decay ⊙ (T S) + U for a matrix state (or T h + u for a vector state
                      with a matrix transition); decay none/scalar/key/value/key_value (vector
                      states: elementwise), T additive (identity) / identity_minus_low_rank
                      (I − β k kᵀ, the delta rule) / identity_plus_low_rank (I + Σ a bᵀ) / dense
  nonlinear           anything else (why, in one line)

These verdicts are what a parallel lowering needs: elementwise-affine states scan, matrix-affine
states with additive or identity-minus-low-rank transitions and a contraction readout chunk.
"""
from __future__ import annotations

from .ir import Cell, Graph
from .linear_form import Decay, Transition, linear_forms, transition


def transitions(cell: Cell, stages: dict[int, str]) -> dict[str, Transition | str]:
    """Per state: its canonical transition, or the reason its next value is not linear."""
    forms = linear_forms(cell, stages)
    out: dict[str, Transition | str] = {}
    for s in cell.states:
        form = forms.get(s.node_out)
        if form is None:  # a next value outside the loop reads no state
            out[s.name] = Transition(s.name, "zero", Decay(), [])
        elif form.nonlinear:
            out[s.name] = form.nonlinear
        else:
            out[s.name] = transition(cell.graph, s.name, form, len(s.shape))
    return out


_WHAT = {
    "additive": "{s}' = decay ⊙ {s} + update",
    "identity_minus_low_rank": "{s}' = decay · (I − β k kᵀ) {s} + update (delta rule)",
    "identity_plus_low_rank": "{s}' = decay · (I + Σ a bᵀ) {s} + update (identity plus low rank)",
    "dense": "{s}' = T {s} + update with a state-free matrix T",
}


def _info(t: Transition, rank: int) -> dict:
    """The report's verdict for one state's transition."""
    s = t.state
    if t.coupled:
        return {"class": "matrix_affine", "transition": "dense", "decay": "none", "coupled": t.coupled,
                "why": f"linear, but its next value also reads state {', '.join(t.coupled)} "
                       "(analysed jointly: a dense transition over the coupled states)"}
    if t.kind == "zero":
        return {"class": "elementwise_affine", "decay": "zero",
                "why": "its next value does not read its previous value"}
    if t.kind == "diagonal" and rank <= 1:
        return {"class": "elementwise_affine", "decay": t.decay.kind(rank),
                "why": f"{s}' = a ⊙ {s} + b with a and b independent of the states"}
    kind = {"diagonal": "additive", "identity": "additive"}.get(t.kind, t.kind)
    if kind == "identity_plus_low_rank" and len(t.low_rank) == 1:
        col, row = t.low_rank[0].left
        if col.node == row.node:
            kind = "identity_minus_low_rank"
    info = {"class": "matrix_affine", "transition": kind, "decay": t.decay.kind(rank)}
    why = _WHAT[kind].format(s=s)
    if t.opaque:
        why += f" (its next value reads {s} through {t.opaque})"
    info["why"] = f"{why}; decay {info['decay']}"
    return info


def classify(cell: Cell, stages: dict[int, str]) -> dict[str, dict]:
    """Per state: class, the transition's structure, and a one-line reason."""
    out: dict[str, dict] = {}
    found = transitions(cell, stages)
    for s in cell.states:
        t = found[s.name]
        out[s.name] = {"class": "nonlinear", "why": t} if isinstance(t, str) else _info(t, len(s.shape))
    _readouts(cell, stages, out)
    return out


def _readouts(cell: Cell, stages: dict[int, str], out: dict[str, dict]) -> None:
    """Mark the states the outputs read through a contraction `q @ S` (what a chunkwise form needs)."""
    g = cell.graph
    for s in cell.states:
        info = out[s.name]
        kinds = set()
        for o in cell.outputs:
            deps = g.ancestors([o.node])
            if s.node_in not in deps:
                continue
            new = s.node_out in deps and s.node_out != s.node_in
            terms = _state_terms(g, stages, o.node)
            if all(g[t].op == "matmul" and any(stages.get(a) != "loop" for a in g[t].args) for t in terms):
                kinds.add(("contraction", "new" if new else "old"))
            elif o.node in (s.node_out, s.node_in):
                kinds.add(("state", "new" if o.node == s.node_out else "old"))
            else:
                kinds.add(("other", "new" if new else "old"))
        if kinds:
            info["readout"] = sorted({k for k, _ in kinds})[0] if len(kinds) == 1 else "mixed"
            info["readout_of"] = sorted({w for _, w in kinds})[0] if len({w for _, w in kinds}) == 1 else "both"


def _state_terms(g: Graph, stages: dict[int, str], nid: int) -> list[int]:
    """The state-dependent terms of a sum (through add/sub/neg), e.g. `q @ S` in `q @ S + d * x`."""
    node = g[nid]
    if node.op in ("add", "sub", "neg"):
        return [t for a in node.args if stages.get(a) == "loop" for t in _state_terms(g, stages, a)]
    return [nid]

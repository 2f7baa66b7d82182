"""Which states are linear in themselves, and what the linear transition looks like.

The verdicts are read off each state's canonical linear form (rnnc/linear_form.py), so every
algebraically equal writing of an update gets the same class, decay and transition:

  elementwise_affine  h' = a ⊙ h + b (a, b state-free; vector and scalar states)
  matrix_affine       S' = decay ⊙ (T S) + U for a matrix state (or T h + u for a vector state
                      with a matrix transition); decay none/scalar/key/value/key_value (vector
                      states: elementwise), T additive (identity) / identity_minus_low_rank
                      (I − β k kᵀ, the delta rule) / identity_plus_low_rank (I + Σ a bᵀ) /
                      diagonal_plus_low_rank (D + Σ a bᵀ, RWKV-7) / dense
  nonlinear           anything else (why, in one line)

These verdicts are what a parallel lowering needs: elementwise-affine states scan, matrix-affine
states with additive or low-rank-corrected transitions and a contraction readout chunk.
"""
from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

from . import dims as D
from .ir import Cell
from .linear_form import linear_forms
from .matrix_terms import normal_terms
from .transition import Decay, Transition, formula, transition


def transitions(cell: Cell, stages: dict[int, str], only: list[str] | None = None) -> dict[str, Transition | str]:
    """Per state (of `only`, default all): its canonical transition, or the reason its next
    value is not linear."""
    leaves = {s.node_in: s.name for s in cell.states if only is None or s.name in only}
    forms = linear_forms(cell, stages, leaves)
    out: dict[str, Transition | str] = {}
    for s in cell.states:
        if s.name not in leaves.values():
            continue
        form = forms.get(s.node_out)
        if form is None:  # a next value outside the loop reads no state
            out[s.name] = Transition(s.name, "zero", Decay(), [])
        elif form.nonlinear:
            out[s.name] = form.nonlinear
        else:
            out[s.name] = transition(cell.graph, s.name, form, len(s.shape))
            out[s.name].form = formula(cell.graph, out[s.name])
    return out


_WHAT = {
    "additive": "{s}' = decay ⊙ {s} + update",
    "identity_minus_low_rank": "{s}' = decay · (I − β k kᵀ) {s} + update (delta rule)",
    "identity_plus_low_rank": "{s}' = decay · (I + Σ a bᵀ) {s} + update (identity plus low rank)",
    "diagonal_plus_low_rank": "{s}' = (D + Σ a bᵀ) {s} + update (diagonal plus low rank)",
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
        return {"class": "elementwise_affine", "decay": t.decay.kind(rank), "form": t.form,
                "why": f"{s}' = a ⊙ {s} + b with a and b independent of the states"}
    kind = {"diagonal": "additive", "identity": "additive"}.get(t.kind, t.kind)
    if kind == "identity_plus_low_rank" and len(t.low_rank) == 1:
        col, row = t.low_rank[0].left
        if col.node == row.node:
            kind = "identity_minus_low_rank"
    info = {"class": "matrix_affine", "transition": kind, "decay": t.decay.kind(rank), "form": t.form}
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
    _layers(cell, stages, out)
    _matrix_groups(cell, stages, out)
    _readouts(cell, stages, out)
    _per_head(cell, stages, out)
    return out


def _per_head(cell: Cell, stages: dict[int, str], out: dict[str, dict]) -> None:
    """A state whose heads are declared as a leading dim and never mix ([NH, K, V], rnnc/heads.py)
    is NH one-head states: its verdict is one head's (a scalar decay per head is "scalar", `q @ S`
    per head a contraction), with `heads` naming the dim. Read on the whole state, a per-head decay
    looks like a per-value one and the per-head readout like no contraction at all."""
    from .heads import NotPerHead, head_slice, heads_dim

    if heads_dim(cell) is None:
        return
    try:
        one, _ = head_slice(cell)
    except NotPerHead:
        return
    heads = D.fmt(cell.states[0].shape[0])
    for name, info in classify(one, stages).items():
        info["heads"] = heads
        info["why"] = f"per head ({heads} heads that never mix): {info['why']}"
        out[name] = info


# ---- states in layers ------------------------------------------------------------------------

def state_groups(cell: Cell) -> list[list[str]]:
    """The states in strongly connected groups, each after the groups its next values read (at the
    start or the end of the step): LSTM's h and c form one group; in a stack of linear layers
    every layer's state is its own group, after the layer below."""
    g = cell.graph
    by_node = {n: s.name for s in cell.states for n in (s.node_in, s.node_out)}
    reads = {s.name: {by_node[n] for n in g.ancestors([s.node_out]) if n in by_node} for s in cell.states}
    for s in cell.states:  # a next value that *is* another state's next value reads that state
        reads[s.name] |= {by_node[s.node_out]}
    return [sorted(c) for c in _components([s.name for s in cell.states], reads)]


def _components(names: list[str], reads: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components, dependencies first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(reads[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    for v in names:
        if v not in index:
            visit(v)
    return out


def group_stages(cell: Cell, stages: dict[int, str], group: list[str]) -> dict[int, str]:
    """Stages with every other state's values taken as known for all steps (hoisted)."""
    ins = {s.node_in for s in cell.states if s.name in group}
    out: dict[int, str] = {}
    for nid in cell.graph.order(stages):
        node = cell.graph[nid]
        if stages[nid] != "loop":
            out[nid] = stages[nid]
        elif nid in ins or (node.op != "state" and any(out.get(a) == "loop" for a in node.args)):
            out[nid] = "loop"
        else:
            out[nid] = "hoist"
    return out


def _layers(cell: Cell, stages: dict[int, str], out: dict[str, dict]) -> None:
    """A state labelled nonlinear only because its coefficients read states of earlier groups is
    linear in itself once those are known: it gets its class with `after` naming them."""
    shapes = {s.name: len(s.shape) for s in cell.states}
    nodes = {s.name: s for s in cell.states}
    folded = {s.name for s in cell.states for c in cell.combines if s.node_in in c.args_left}
    groups = state_groups(cell)
    for k, group in enumerate(groups):
        def pending(n: str) -> bool:  # nonlinear, or "coupled" to a state outside its group
            return out[n]["class"] == "nonlinear" or bool(set(out[n].get("coupled", ())) - set(group))
        if k == 0 or not any(pending(n) for n in group):
            continue
        found = transitions(cell, group_stages(cell, stages, group), group)
        before = {n for grp in groups[:k] for n in grp}
        for name in group:
            t = found[name]
            if not pending(name) or isinstance(t, str) or name in folded:
                continue  # (a combine's states get their verdict from the combine)
            s = nodes[name]
            reads = cell.graph.ancestors([s.node_out])
            after = sorted(m for m in before if {nodes[m].node_in, nodes[m].node_out} & reads)
            info = _info(t, shapes[name])
            info["after"] = after
            info["why"] = (f"linear in itself once {', '.join(after)} {'is' if len(after) == 1 else 'are'} "
                           f"known for every step: {info['why']}")
            out[name] = info


def _matrix_groups(cell: Cell, stages: dict[int, str], out: dict[str, dict]) -> None:
    """A group of states linear in each other (coupled), or a vector state with a dense state-free
    matrix, scans as one block state (rnnc/matrix_scan.py): its states get `matrix` (kind, size,
    states), or `matrix_why` when neither a block nor a dense matrix describes the transition."""
    from .matrix_scan import group_transition

    folded = {s.name for s in cell.states for c in cell.combines if s.node_in in c.args_left}
    for group in state_groups(cell):
        infos = [out[n] for n in group]
        if folded & set(group) or any(i["class"] != "matrix_affine" for i in infos) \
                or not any(i.get("coupled") or i.get("transition") == "dense" for i in infos):
            continue
        found = group_transition(cell, group_stages(cell, stages, group), group)
        for name, info in zip(group, infos):
            if isinstance(found, str):
                info["matrix_why"] = found
                continue
            info["matrix"] = {"kind": found.kind, "size": D.fmt(found.size), "states": list(found.states),
                              "per_step": found.per_step}
            if found.kind == "block":
                info["transition"] = "block"
            info["why"] = (f"linear in the coupled states, analysed as one: {found.text()}"
                           if info.get("coupled") else f"{info['why']}; {found.text()}")


class Readout(NamedTuple):
    """How an output reads a matrix state: ± coef · q @ S (side "left") or ± coef · S @ q ("right") of
    its value before ("old") or after ("new") the update, coef = num · Π scalars (state-free: numbers,
    dim expressions such as 1/sqrt(K), per-step scalars such as a gate; `(node, divides)`)."""

    of: str
    q: int
    sign: int
    side: str
    num: object = 1
    scalars: tuple[tuple[int, bool], ...] = ()


def single_term(cell: Cell, stages: dict[int, str], s, nid: int):
    """The value `nid` as one normal term over the state s's two values ("old", "new"; state-free terms
    aside), or None when it is not linear in s or has several such terms."""
    leaves = {s.node_in: "old"} | ({s.node_out: "new"} if s.node_out != s.node_in else {})
    form = linear_forms(cell, stages, leaves).get(nid)
    if form is None or form.nonlinear or form.opaque:
        return None
    terms = normal_terms(cell.graph, form.terms)
    return terms[0] if terms is not None and len(terms) == 1 else None


def contraction(cell: Cell, stages: dict[int, str], state: str, out: int) -> Readout | None:
    """The output `out` as ± c · q @ S or ± c · S @ q of the state before or after its update, plus
    state-free terms, in any writing (`q @ S`, `sum(q[:, None] * S, axis=0)`, `q @ S / sqrt(K)`,
    `(q * 0.5) @ S`, ...); None otherwise. Read off the value's canonical form over S's two values."""
    s = next(x for x in cell.states if x.name == state)
    t = single_term(cell, stages, s, out)
    if t is None:
        return None
    num = _rational(t.num)
    if t.elem or t.dots or num is None or any(stages.get(n) == "loop" for n, _ in t.scalars):
        return None
    side, atoms = ("left", t.left) if t.orient == "row" and not t.right else \
        ("right", t.right) if t.orient == "col" and not t.left else (None, ())
    if side is None or [a.kind for a in atoms] != ["row" if side == "left" else "col"] \
            or atoms[0].node is None or stages.get(atoms[0].node) == "loop":
        return None
    return Readout(t.state, atoms[0].node, t.sign, side, num, t.scalars)


def _rational(num) -> Fraction | None:
    """A term's numeric coefficient as a Fraction; None for one that depends on the dims (a mean's 1/K)."""
    if isinstance(num, (int, Fraction)):
        return Fraction(num)
    return Fraction(str(num)) if getattr(num, "is_Rational", False) else None


def _readouts(cell: Cell, stages: dict[int, str], out: dict[str, dict]) -> None:
    """How the outputs read each state: through a contraction `q @ S` (what a chunkwise form
    needs), as the state itself, or otherwise; of its value before or after the update."""
    g = cell.graph
    for s in cell.states:
        info = out[s.name]
        kinds = set()
        for o in cell.outputs:
            deps = g.ancestors([o.node])
            if s.node_in not in deps:
                continue
            new = s.node_out in deps and s.node_out != s.node_in
            read = contraction(cell, stages, s.name, o.node) if len(s.shape) == 2 else None
            if read is not None:
                kinds.add(("contraction", read.of))
            elif o.node in (s.node_out, s.node_in):
                kinds.add(("state", "new" if o.node == s.node_out else "old"))
            else:
                kinds.add(("other", "new" if new else "old"))
        if kinds:
            info["readout"] = sorted({k for k, _ in kinds})[0] if len(kinds) == 1 else "mixed"
            info["readout_of"] = sorted({w for _, w in kinds})[0] if len({w for _, w in kinds}) == 1 else "both"

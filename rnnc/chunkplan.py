"""Find the pieces of a chunkable matrix recurrence in the IR: q, k, v, gates, beta.

The chunk backend runs flash-linear-attention-style chunkwise algorithms (rnnc/runtime/chunk.py,
chunk_dplr.py):
    additive:   S' = diag(e^gk) S diag(e^gv) + k vᵀ          (gk/gv: key/value/scalar log-decay)
    delta rule: S' = e^g (I - β k kᵀ) S + β k vᵀ
    generalized delta rule (dplr): micro-steps S <- diag(e^gk) e^g S + a bᵀ S + Σ k vᵀ (RWKV-7, KDA,
                DeltaProduct; rnnc/dplrplan.py reads them off the update)
with the readout o = q @ S' (after the update) or o = q @ S (before it, as RWKV's), any state-free
scalar factor of it (a sign, 1/sqrt(K), a per-step gate) absorbed into q, plus any state-free terms
added to it (RWKV-6's bonus), which the hoisted code computes for all steps. This
module reads a cell's single matrix state's canonical transition (rnnc/transition.py: the decay
factored out, identity or I − β k kᵀ left) and its update's collected outer product, and returns a
ChunkPlan of IR node ids, or the reason it does not fit. Decays must be written in log space, as
exp(g): the chunk form needs log-gates to stay stable.

Cells with several states (staged_plan): max-plus states s' = max(s + a, b) (xLSTM's stabiliser,
rnnc/maxplus.py) are scanned first; with their values known, one matrix state and the vector states
sharing its decay and k (mLSTM's normaliser) run as one chunk pass, the vectors as extra value
columns, and the output is computed for all steps from the joined readout's columns.
"""
from __future__ import annotations

import math
from dataclasses import replace

from . import dims as D
from .ir import Cell, Graph, Node
from .linear_form import ones, same
from .linearity import contraction, group_stages, single_term, transitions
from .matrix_terms import matrix_terms
from .plans import ChunkPlan
from .scanplan import _binary, _const, zero_state
from .dplrplan import NotStep, micro_steps, stage_of


class NotChunkable(Exception):
    pass


def _update_of(g: Graph, stages: dict[int, str], node: int) -> int | None:
    """The state-free part of a state's next value (its value at a zero state), or NotChunkable with
    the reason zero_state gives when that cannot be formed."""
    try:
        return zero_state(g, stages, node, {})
    except ValueError as e:
        raise NotChunkable(str(e)) from None


def _constant_decay_ok(num) -> bool:
    """A numeric decay factor the chunk form takes: 1, or a positive number (its log is the gate)."""
    try:
        return num == 1 or float(num) > 0
    except TypeError:  # a symbolic one (a mean's 1/K)
        return False


def _unexpanded(g: Graph, nid: int) -> int:
    """The value under index nodes that only add unit axes or take whole axes (`x[:, None]`,
    `x[None, None]` of a scalar): the same numbers in another shape."""
    while g[nid].op == "index" and all(
            it[0] == "new" or (it[0] == "slice" and D.equal(it[1], 0) and D.equal(it[2], size))
            for it, size in zip(g[nid].attrs["items"], _sizes(g[nid].attrs["items"], g[g[nid].args[0]].shape))):
        nid = g[nid].args[0]
    return nid


def _sizes(items: tuple, shape) -> list:
    """The operand's size each index item reads (None for a new axis)."""
    out, axis = [], 0
    for it in items:
        if it[0] == "new":
            out.append(None)
        else:
            out.append(shape[axis] if axis < len(shape) else None)
            axis += 1
    return out


def _log_gate(g: Graph, factor: int, size, side: str, stages: dict[int, str] | None = None,
              positive: list[int] | None = None) -> int:
    """The log-gate of a decay factor on `side` ("k": rows, exp(g)[:, None] or exp(g[:, None]);
    "v": columns, exp(g) with g [V]; "s": a scalar exp(g)). A decay that does not change with the
    inputs (RetNet's fixed γ) need not be written as exp where `positive` is given: its log is taken,
    and the node is added to `positive` (the generated code checks it is not negative)."""
    base = _unexpanded(g, factor)
    node = g[base]
    if node.op == "exp":
        arg = _unexpanded(g, node.args[0])
    elif positive is not None and stage_of(g, stages, base) == "const":
        arg = g.add(Node("log", (base,), node.shape))
        positive.append(base)
    else:
        raise NotChunkable("its decay is not written as exp(log-gate)")
    if side == "s" and ones(g[arg].shape):  # (a [1, 1] log-gate: its one element)
        shape = g[arg].shape
        return g.add(Node("index", (arg,), (), attrs={"items": (("int", D.const(0)),) * len(shape)})) if shape else arg
    if side != "s" and len(g[arg].shape) == 1 and D.equal(g[arg].shape[0], size):
        return arg
    raise NotChunkable(f"its decay has shape {D.fmt_shape(g[factor].shape)}, not per key, per value or scalar")


def _update(g: Graph, nid: int | None) -> tuple[list[int], int, int]:
    """The update c · k vᵀ as (scalar nodes c, k, v), its outer products collected first;
    a numeric factor is folded into v."""
    if nid is None:
        raise NotChunkable("its update is zero")
    terms = matrix_terms(g, nid)
    if not terms or len(terms) != 1 or [a.kind for a in terms[0].left] != ["col", "row"] or terms[0].dots \
            or terms[0].elem or any(inv for _, inv in terms[0].scalars):
        raise NotChunkable("its update is not an outer product k vᵀ (times scalars)")
    (t,) = terms
    k, v = t.left[0].node, t.left[1].node
    if t.sign * t.num != 1:
        value = t.sign * t.num
        value = int(value) if value == int(value) else float(value)
        c = g.add(Node("const", (), (), attrs={"value": value}, scalar=True))
        v = g.add(Node("mul", (c, v), g[v].shape))
    return [n for n, _ in t.scalars], k, v


def _decay_gates(g: Graph, stages: dict[int, str], decay, K, V, positive: list[int]) -> dict[str, list[int]]:
    """The log-gates of a factored-out decay, by kind ("k" per key, "v" per value, "s" scalar)."""
    if decay.elem or any(inv for _, inv in decay.scalars) or any(a.inv for a in decay.left + decay.right) \
            or not _constant_decay_ok(decay.num):
        raise NotChunkable("its decay is not written as exp(log-gate) or a positive constant")
    gates = {"k": [_log_gate(g, a.node, K, "k", stages, positive) for a in decay.left],
             "v": [_log_gate(g, a.node, V, "v", stages, positive) for a in decay.right],
             "s": [_log_gate(g, n, None, "s", stages, positive) for n, _ in decay.scalars]}
    if decay.num != 1:  # a constant decay γ (RetNet's): the constant log-gate log γ every step
        gates["s"].append(g.add(Node("const", (), (), attrs={"value": math.log(decay.num)}, scalar=True)))
    if any(len(v) > 1 for v in gates.values()):
        raise NotChunkable("it has several decays of one kind")
    return gates


def _scaled_query(g: Graph, read) -> int:
    """The readout's query with its state-free scalar factors and sign absorbed: `q @ S / sqrt(K)`,
    `0.5 * (q @ S)`, `-(q * s) @ S` all read the state with one query, c · q."""
    q, num = read.q, read.sign * read.num
    if num != 1:
        q = _binary(g, "mul", q, _const(g, num))
    for n, inv in read.scalars:
        if len(g[n].shape) > 1:
            raise NotChunkable("its readout is scaled by a factor of shape " + D.fmt_shape(g[n].shape))
        q = _binary(g, "div" if inv else "mul", q, n)
    return q


def _linear_or_delta(cell: Cell, stages: dict[int, str], s, t, transposed: bool, positive: list[int]) -> dict | None:
    """The plan's fields for an additive update (kind "linear") or the scalar-gated delta rule
    e^g (I − β k kᵀ) S + β k vᵀ (kind "delta", which also has Triton kernels); None for a transition
    the generalized form takes instead (a per-key decay, a ≠ b, an update not β k vᵀ). A state read
    as S @ q (`transposed`) is chunked as Sᵀ: keys and values, per-row and per-column decays swap."""
    g = cell.graph
    rows, cols = s.shape
    update = _update_of(g, stages, s.node_out)
    if t.kind == "identity":
        gates = _decay_gates(g, stages, t.decay, rows, cols, positive)
        scalars, k, v = _update(g, update)
        if transposed:
            gates["k"], gates["v"], k, v = gates["v"], gates["k"], v, k
        if gates["s"] and (gates["k"] or gates["v"]):
            raise NotChunkable("it mixes a scalar decay with a per-key or per-value one")
        return {"kind": "linear", "k": k, "v": v, "gk": (gates["k"] or [None])[0], "gv": (gates["v"] or [None])[0],
                "g": (gates["s"] or [None])[0], "scale": scalars}  # scalars multiplying k vᵀ
    if transposed:
        raise NotChunkable(f"it is read as {s.name} @ q: only additive updates chunk that way")
    try:
        gates = _decay_gates(g, stages, t.decay, rows, cols, positive)
    except NotChunkable:
        return None
    terms = None if update is None else matrix_terms(g, update)
    if gates["k"] or gates["v"] or len(t.low_rank) != 1 or not terms or len(terms) != 1:
        return None
    (low,), (up,) = t.low_rank, terms
    col, row = low.left
    if low.sign > 0 or low.dots or col.node != row.node or [a.kind for a in up.left] != ["col", "row"] \
            or up.left[0].node != col.node or up.sign < 0 or up.dots or up.elem or up.num != low.num \
            or sorted(up.scalars) != sorted(low.scalars) or any(inv for _, inv in low.scalars):
        return None
    beta = None
    for n, _ in low.scalars:  # β: the shared coefficient of k kᵀ and k vᵀ
        beta = n if beta is None else _binary(g, "mul", beta, n)
    if low.num != 1:
        beta = _binary(g, "mul", _const(g, float(low.num)), beta) if beta is not None else _const(g, float(low.num))
    return {"kind": "delta", "k": col.node, "v": up.left[1].node, "beta": beta, "g": (gates["s"] or [None])[0]}


def chunk_plan(cell: Cell, stages: dict[int, str], classes: dict[str, dict]) -> ChunkPlan:
    """The chunk plan of a cell, or NotChunkable with the reason."""
    from .heads import heads_dim

    if heads_dim(cell) is not None:  # heads declared as a dim: plan one head (rnnc/heads.py)
        return _per_head(cell, stages)
    if len(cell.states) != 1:
        return staged_plan(cell, stages, classes)
    s = cell.states[0]
    info = classes[s.name]
    if info["class"] != "matrix_affine" or len(s.shape) != 2 or info.get("coupled"):
        raise NotChunkable(f"state '{s.name}' is {info['class']}")
    if info.get("readout") != "contraction" or info.get("readout_of") not in ("new", "old"):
        raise NotChunkable(f"state '{s.name}' is not read out as q @ {s.name} (before or after its update)")
    g = cell.graph
    outs = [o for o in cell.outputs if s.node_in in g.ancestors([o.node])]
    if len(outs) != 1:
        raise NotChunkable("exactly one output must read the state")
    (out,) = outs
    read = contraction(cell, stages, s.name, out.node)
    if read is None:
        raise NotChunkable(f"output '{out.name}' is not q @ {s.name} plus state-free terms")
    transposed = read.side == "right"  # o = S @ q: the chunk form runs on Sᵀ
    t = transitions(cell, stages)[s.name]
    if t.kind == "diagonal":
        raise NotChunkable(f"state '{s.name}' reaches its next value along several paths")
    positive: list[int] = []
    plan = _linear_or_delta(cell, stages, s, t, transposed, positive) \
        if t.kind in ("identity", "identity_plus_low_rank") else None
    if plan is None and transposed:
        raise NotChunkable(f"it is read as {s.name} @ q: only additive updates chunk that way")
    if plan is None:  # the generalized delta rule (rnnc/dplrplan.py)
        positive.clear()
        try:
            plan = {"kind": "dplr", "k": None, "v": None, "steps": micro_steps(cell, stages, s)}
        except NotStep as e:
            raise NotChunkable(str(e)) from None
    before = info["readout_of"] == "old"
    q = _scaled_query(g, read)
    read_node = s.node_in if before else s.node_out
    try:  # the state-free rest of the output: the output with the state read set to zero
        rest = zero_state(g, stages, out.node, {read_node: None})
    except ValueError as e:
        raise NotChunkable(str(e)) from None
    if rest is not None and (stages.get(rest) == "loop" or not same(g[rest].shape, out.shape)):
        raise NotChunkable(f"a term of output '{out.name}' besides q @ {s.name} has another shape")
    extra = [] if rest is None else [(rest, 1)]
    plan["q"] = q
    for key in ("q", "k", "v", "gk", "gv", "beta"):
        if plan.get(key) is not None and stage_of(g, stages, plan[key]) != "hoist":
            raise NotChunkable(f"its {key} does not change with the inputs")
    if plan.get("g") is not None and stage_of(g, stages, plan["g"]) not in ("hoist", "const"):
        raise NotChunkable("its decay reads the state")
    return ChunkPlan(plan["kind"], s.name, out.name, plan["q"], plan["k"], plan["v"], plan.get("gk"), plan.get("gv"),
                     plan.get("g"), plan.get("beta"), tuple(plan.get("scale", ())), steps=plan.get("steps", ()),
                     before=before,  # o_t = q_t @ S_{t-1}: the state before this step's update
                     extra=tuple(extra),  # (node, ±1): state-free terms of the output, hoisted
                     transposed=transposed, positive=tuple(positive))


def _per_head(cell: Cell, stages: dict[int, str]) -> ChunkPlan:
    """The plan of states [NH, ...] whose heads never mix: one head's plan, its values written back
    into the cell with the head axis in front (rnnc/heads.py); the runtime runs heads as batch rows."""
    from .heads import Lift, NotPerHead, head_slice
    from .linearity import classify
    from .maxplus import classify_maxplus

    try:
        one, headed = head_slice(cell)
    except NotPerHead as e:
        raise NotChunkable(f"its heads are not independent ({e})") from None
    classes = classify(one, stages)
    classify_maxplus(one, stages, classes)  # (a stabiliser per head, scanned first)
    plan = chunk_plan(one, stages, classes)
    lift = Lift(cell, one.graph, headed)
    fields = ("q", "k", "v", "gk", "gv", "g", "beta")
    try:
        return replace(plan, heads=cell.states[0].shape[0],
                       **{key: lift.full(getattr(plan, key)) for key in fields},
                       steps=tuple(replace(st, **{key: lift.full(getattr(st, key)) for key in ("a", "b", "k", "v", "gk", "g")})
                                   for st in plan.steps),
                       scale=tuple(lift.full(n) for n in plan.scale),
                       extra=tuple((lift.node(n), sign) for n, sign in plan.extra),
                       positive=tuple(lift.node(n) for n in plan.positive),
                       maxplus=tuple(replace(m, a=lift.full(m.a), b=tuple(lift.full(b) for b in m.b))
                                     for m in plan.maxplus),
                       columns=tuple((name, lift.full(c)) for name, c in plan.columns),
                       reads=tuple((lift.node(n), name, sign, None if rest is None else lift.node(rest))
                                   for n, name, sign, rest in plan.reads))
    except NotPerHead as e:
        raise NotChunkable(str(e)) from None


# ---- several states in one pass (mLSTM) ----------------------------------------------------------

def _scale(g: Graph, t) -> int | None:
    """sign · num · Π scalars of a term as one node (None: 1), each scalar without unit axes."""
    node = None
    for n, inv in t.scalars:
        n = _unexpanded(g, n)  # one head's `c[None, None]`: the scalar c
        node = (_binary(g, "div", _const(g, 1), n) if inv else n) if node is None else \
            _binary(g, "div" if inv else "mul", node, n)
    try:
        c = float(t.sign * t.num)
    except TypeError:  # a symbolic coefficient (a mean's 1/K)
        raise NotChunkable("its update has a coefficient that depends on a dim") from None
    if c != 1:
        node = _const(g, c) if node is None else _binary(g, "mul", _const(g, c), node)
    return node


def _dot_read(cell: Cell, stages: dict[int, str], s, nid: int) -> tuple[str, int, int] | None:
    """("old" | "new", q, sign) when `nid` is ± q · s of a vector state s, plus state-free terms."""
    t = single_term(cell, stages, s, nid)
    if t is None or t.orient != "scalar" or t.elem or t.dots or t.scalars or t.num != 1 or t.right or len(t.left) != 1 \
            or t.left[0].kind != "row" or t.left[0].node is None or stages.get(t.left[0].node) == "loop":
        return None
    return t.state, t.left[0].node, t.sign


def _reads(cell: Cell, stages: dict[int, str], states: list, out: int) -> list[tuple]:
    """The values nearest the output that are ± q @ S or ± S @ q (matrix S) or ± q · n (vector n) of
    one of `states`, plus state-free terms: (node, state, sign, q, "old" | "new", "left" | "right" |
    None). NotChunkable when the output reaches a state other than through such a read."""
    g = cell.graph
    touched = {n: s for s in states for n in (s.node_in, s.node_out)}
    found, seen, stack = [], set(), [out]
    while stack:
        nid = stack.pop()
        if nid in seen or stages.get(nid) != "loop":
            continue
        seen.add(nid)
        deps = g.ancestors([nid])
        hits = {touched[n].name: touched[n] for n in deps if n in touched}
        if len(hits) == 1:
            (s,) = hits.values()
            read = contraction(cell, stages, s.name, nid) if len(s.shape) == 2 else _dot_read(cell, stages, s, nid)
            if read is not None and (len(s.shape) == 1 or read.num == 1 and not read.scalars):
                found.append((nid, s.name, read[2], read[1], read[0], read[3] if len(s.shape) == 2 else None))
                continue
        if nid in touched:
            raise NotChunkable(f"an output reads state '{touched[nid].name}' other than as q @ {touched[nid].name}")
        stack.extend(g[nid].args)
    return found


def _same_decay(g: Graph, a, b) -> bool:
    """Whether two states' decays are one: equal up to unit axes on their factors (one head's `f[None]`
    of a vector state and `f[None, None]` of a matrix state are both the scalar f)."""
    def canon(d):
        flat = lambda pairs: tuple(sorted((_unexpanded(g, n), inv) for n, inv in pairs))  # noqa: E731
        atoms = lambda xs: tuple(replace(x, node=None if x.node is None else _unexpanded(g, x.node)) for x in xs)  # noqa: E731
        return d.num, flat(d.scalars), atoms(d.left), atoms(d.right), flat(d.elem)
    return canon(a) == canon(b)


def _outer_update(g: Graph, st: dict[int, str], s) -> tuple[int, int, int | None]:
    """(col, row, c) of a matrix state's update c · col rowᵀ; NotChunkable otherwise."""
    update = _update_of(g, st, s.node_out)
    terms = matrix_terms(g, update) if update is not None else None
    if not terms or len(terms) != 1 or [a.kind for a in terms[0].left] != ["col", "row"] or terms[0].dots \
            or terms[0].elem or terms[0].right:
        raise NotChunkable(f"the update of state '{s.name}' is not c k vᵀ")
    return terms[0].left[0].node, terms[0].left[1].node, _scale(g, terms[0])


def staged_plan(cell: Cell, stages: dict[int, str], classes: dict[str, dict]) -> ChunkPlan:
    """Several states in one chunk pass: max-plus states (xLSTM's stabiliser m) by a max-plus scan
    first; then, with their values known for every step, matrix states with additive updates c k vᵀ
    sharing one decay and one k (Mamba-2 with extra states), and vector states n' = decay · n + c' k
    sharing them too (mLSTM's normaliser, C's "ones column"), joined into one state [S | S2 | n] with
    values [c v | c2 v2 | c']; the output is computed for all steps from its reads q @ S (or S @ q: then
    the pass runs on the transposes, k the states' columns), q · n (the columns of the joined readout)
    and the scanned sequences. NotChunkable with the reason when the cell is not of this shape."""
    from .maxplus import maxplus_form

    g = cell.graph
    first = [maxplus_form(cell, stages, s) for s in cell.states if classes[s.name].get("maxplus")]
    early = {m.state for m in first}
    rest = [s for s in cell.states if s.name not in early]
    mats = [s for s in rest if len(s.shape) == 2]
    if not mats:
        raise NotChunkable("the chunk backend needs a matrix state (with states sharing its decay and keys, "
                           "and max-plus states scanned first)")
    S = mats[0]
    for s in rest:
        info = classes[s.name]
        if info["class"] not in ("matrix_affine", "elementwise_affine") or info.get("coupled") \
                or not set(info.get("after", ())) <= early or len(s.shape) not in (1, 2):
            raise NotChunkable(f"state '{s.name}' is {info['class']}: {info['why']}")
    for m in first:
        if any(stage_of(g, stages, n) == "loop" for n in (m.a, *m.b) if n is not None):
            raise NotChunkable(f"state '{m.state}' is max-plus, but its coefficients read other states")
    st = group_stages(cell, stages, [s.name for s in rest])  # the max-plus states known for every step
    found = transitions(cell, st, [s.name for s in rest])
    outs = [o for o in cell.outputs if g.ancestors([o.node]) & {s.node_in for s in rest}]
    if len(outs) != 1:
        raise NotChunkable("exactly one output must read the states")
    (out,) = outs
    reads = _reads(cell, st, rest, out.node)
    if len({r[3] for r in reads}) != 1 or len({r[4] for r in reads}) != 1:
        raise NotChunkable(f"output '{out.name}' reads the states with different queries, or before and after "
                           "the update")
    sides = {r[5] for r in reads if r[5] is not None}
    if len(sides) > 1:
        raise NotChunkable(f"output '{out.name}' reads some matrix states as q @ S and others as S @ q")
    transposed = sides == {"right"}  # o = S @ q: the pass runs on Sᵀ, whose rows are S's columns
    t = found[S.name]
    if isinstance(t, str) or t.kind != "identity":
        raise NotChunkable(f"state '{S.name}' shares its pass with other states only with an additive update")
    positive: list[int] = []  # constant decays taken by their log
    K, V = S.shape
    gates = _decay_gates(g, st, t.decay, K, V, positive)
    if transposed:
        gates["k"], gates["v"] = gates["v"], gates["k"]
    if gates["v"] or (gates["s"] and gates["k"]):
        raise NotChunkable(f"state '{S.name}' has a decay along its values, which the joined states cannot share")
    col, row, c = _outer_update(g, st, S)
    k, v = (row, col) if transposed else (col, row)
    columns = []
    for n in (s for s in rest if s is not S):
        tn = found[n.name]
        if isinstance(tn, str) or tn.kind not in ("identity", "diagonal") or not _same_decay(g, tn.decay, t.decay):
            raise NotChunkable(f"state '{n.name}' does not share the decay of state '{S.name}'")
        if len(n.shape) == 2:  # a matrix state with the same keys: more value columns
            ncol, nrow, cn = _outer_update(g, st, n)
            nk, nv = (nrow, ncol) if transposed else (ncol, nrow)
            if nk != k:
                raise NotChunkable(f"state '{n.name}' does not share the keys of state '{S.name}'")
            columns.append((n.name, nv if cn is None else _binary(g, "mul", cn, nv)))
            continue
        un = _update_of(g, st, n.node_out)
        tu = matrix_terms(g, un) if un is not None else None
        if not tu or len(tu) != 1 or len(tu[0].left) != 1 or tu[0].left[0].node != k or tu[0].left[0].inv \
                or tu[0].dots or tu[0].elem or tu[0].right:
            raise NotChunkable(f"the update of state '{n.name}' is not c k with the k of state '{S.name}'")
        cn = _scale(g, tu[0])
        columns.append((n.name, cn if cn is not None else _const(g, 1)))
    rests, zero = [], {n: None for s in rest for n in (s.node_in, s.node_out)}  # the states' values set to 0
    for nid, name, sign, q, *_ in reads:
        try:
            rests.append((nid, name, sign, zero_state(g, st, nid, dict(zero))))
        except ValueError as e:
            raise NotChunkable(str(e)) from None
    for key, nid in (("q", reads[0][3]), ("k", k), ("v", v)):
        if stage_of(g, stages, nid) not in ("hoist", "const"):
            raise NotChunkable(f"its {key} reads a state")
    v = v if c is None else _binary(g, "mul", c, v)
    return ChunkPlan("linear", S.name, out.name, reads[0][3], k, v, gk=(gates["k"] or [None])[0],
                     g=(gates["s"] or [None])[0], before=reads[0][4] == "old", transposed=transposed,
                     maxplus=tuple(first), columns=tuple(columns), reads=tuple(rests), positive=tuple(positive))

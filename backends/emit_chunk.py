"""The chunk lowering's fragment: the one matrix state by a chunkwise-parallel algorithm
(rnnc/runtime/chunk.py, or its Triton kernels on the triton backend), the output's state-free
terms added from the hoisted values.
"""
from __future__ import annotations

from rnnc.plans import ChunkPlan

from .emit_scan import _AllRows, _scan_coefficient
from .render import Lines, Recurrence
from .torch_expr import ATOM, shape_text

CHUNK = 64  # steps per chunk in the chunkwise form (per-channel decays: see default_chunk_size)


def default_chunk_size(plan: ChunkPlan) -> int:
    """Steps per chunk when the caller gives none. Per-key/per-value decays cost K-wide work that
    grows with the chunk: 16 measured fastest on CPU for gla (benchmarks/RESULTS.md), 64 otherwise;
    the generalized delta rule: 16 steps with a per-key decay, else 64 steps of one micro-step, 16 of
    two, 8 of three (DeltaProduct at B=2, T=2048, H=4, K=V=64, fwd+bwd on one CPU thread: 16 steps
    343 ms, 32 steps 436, 64 steps 749; rows a chunk stay a power of two times at most 16, for the
    blockwise inverse)."""
    if plan.kind == "dplr":
        return 16 if any(st.gk is not None for st in plan.steps) else {1: 64, 2: 16}.get(len(plan.steps), 8)
    return 16 if plan.kind == "linear" and (plan.gk is not None or plan.gv is not None) else CHUNK


def emit(L: Lines, rec: Recurrence, plan: ChunkPlan) -> None:
    """The one matrix state by a chunkwise-parallel algorithm (rnnc/runtime/chunk.py). Heads declared
    as a dim run as more rows of the batch ([T, N, NH, ...] -> [T, N·NH, ...]); a state read as S @ q
    runs transposed."""
    if plan.staged:
        emit_staged(L, rec, plan)
        return
    cell, r = rec.cell, rec.r
    (s,) = cell.states
    size = plan.chunk_size or default_chunk_size(plan)
    L(f"# the recurrence in chunkwise-parallel form, {size} steps a chunk (rnnc/runtime/chunk.py)")
    for n in plan.positive:  # a constant decay taken by its log
        L(f"_chunk_check_decay({r.tensor(n, 'const')}, {cell.graph[n].name or 'the decay'!r})")
    h0 = rec.initial(s)  # the chunk form's layout of it: heads as rows, transposed for S @ q
    if plan.heads is not None or plan.transposed:
        h0 = f"h0_{s.name}"
        flat = ".flatten(0, 1)" if plan.heads is not None else ""
        L(f"{h0} = {rec.initial(s)}{flat}{'.transpose(-1, -2)' if plan.transposed else ''}")

    def values(nid: int | None, scalar: bool = False) -> str:
        """A plan node's values for every step, [T, N, *shape] (None: absent); with heads [T, N·NH,
        ...]; `scalar`: one per step and row, [T, N] (a scale, a gate, β)."""
        if nid is None:
            return "None"
        shape = cell.graph[nid].shape
        if r.stages.get(nid) == "hoist":
            text = f"_time_major({r.operand(nid, 'hoist').text}, B, T)"
        elif not shape:  # a constant (a fixed decay's log-gate): the same every step
            return f"torch.full((T, N), {r.operand(nid, 'const').text}, dtype=cdt, device=dev)"
        else:  # a constant vector (a param)
            text = f"{r.tensor(nid, 'const')}.to(cdt).expand(T, N{', -1' * len(shape)})"
        if scalar and len(shape) > (plan.heads is not None):
            return f"{text}.reshape(T, -1)"
        return f"{text}.flatten(1, 2)" if plan.heads is not None else text

    def seq(key: str, scalar: bool = False) -> str:
        return values(getattr(plan, key), scalar)

    q, k, v = seq("q"), seq("k"), seq("v")
    result = f"out_{plan.output}, {r.name(s.node_in)}"
    target = f"out_{plan.output}, s_rows" if plan.heads is not None or plan.transposed else result
    before = ", before=True" if plan.before else ""  # o_t = q_t @ S_{t-1}
    if plan.kind == "linear":
        for sc in plan.scale:
            k = f"{k} * {values(sc, scalar=True)}.unsqueeze(-1)"
        gk = seq("gk") if plan.gk is not None else (f"{seq('g', True)}.unsqueeze(-1)" if plan.g is not None else "None")
        gv = seq("gv") if plan.gv is not None else "None"
        if plan.triton:
            L(f"_check_triton_device({h0})")
        fn = "_triton_chunk_linear" if plan.triton else "_chunk_linear"
        L(f"{target} = {fn}({q}, {k}, {v}, {gk}, {gv}, {h0}, {size}{before})")
    elif plan.kind == "dplr":
        def steps(key: str) -> str:
            return "[" + ", ".join(values(getattr(st, key)) for st in plan.steps) + "]"

        def gate(st) -> str:  # the per-key and the scalar log-gate of a step, added
            gk, g = values(st.gk), values(st.g)
            return gk if st.g is None else g if st.gk is None else f"{gk} + {g}.unsqueeze(-1)"

        gates = "[" + ", ".join(gate(st) for st in plan.steps) + "]"
        L(f"# {len(plan.steps)} micro-step(s) a step: S <- diag(exp(g)) S + a (b @ S) + outer(k, v) "
          f"(rnnc/runtime/{'triton_dplr' if plan.triton else 'chunk_dplr'}.py)")
        if plan.triton:
            L(f"_check_triton_device({h0})")
        fn = "_triton_chunk_dplr" if plan.triton else "_chunk_dplr"
        L(f"{target} = {fn}({q}, {steps('k')}, {steps('v')}, {steps('a')}, {steps('b')}, {gates}, "
          f"{h0}, {size}{before})")
    else:
        beta = seq("beta", True) if plan.beta is not None else "torch.ones(T, N, dtype=cdt, device=dev)"
        g = seq("g", True) if plan.g is not None else "None"
        if plan.triton:
            L(f"_check_triton_device({h0})")
        fn = "_triton_delta_chunk" if plan.triton else "_chunk_delta"
        L(f"{target} = {fn}({q}, {k}, {v}, {beta}, {g}, {h0}, {size}{before})")
    out = f"out_{plan.output}"
    if target != result:  # back to [T, N, NH, ...] and the state's own layout
        rows = "s_rows.transpose(-1, -2)" if plan.transposed else "s_rows"
        if plan.heads is not None:
            L(f"{out} = {out}.unflatten(1, (N, -1))")
            rows += ".unflatten(0, (N, -1))"
        L(f"{r.name(s.node_in)} = {rows}")
    for t, sign in plan.extra:  # the output's state-free terms, computed with the hoisted values
        term = (f"_time_major({r.operand(t, 'hoist').text}, B, T)" if r.stages.get(t) == "hoist"
                else r.tensor(t, "const"))
        L(f"{out} = {out} {'+' if sign > 0 else '-'} {term}")


def emit_staged(L: Lines, rec: Recurrence, plan: ChunkPlan) -> None:
    """Several states in one chunk pass (rnnc/chunkplan.py, staged_plan): the max-plus states by
    `_maxplus_scan`, then, from their sequences, the decay and values of every step; the states
    sharing the matrix state's decay and keys as one state [S | S2 | n] with values [c v | c2 v2 | c']
    by `_chunk_linear` (`_triton_chunk_linear` on the triton backend; the max-plus scan and the
    elementwise rows stay PyTorch), on the transposes for o = S @ q; the output for all steps from the
    columns of its readout q @ [S | S2 | n]."""
    cell, r, stages = rec.cell, rec.r, rec.stages
    by_name = {s.name: s for s in cell.states}
    size = plan.chunk_size or default_chunk_size(plan)
    for n in plan.positive:  # a constant decay taken by its log
        L(f"_chunk_check_decay({r.tensor(n, 'const')}, {cell.graph[n].name or 'the decay'!r})")
    rows = _AllRows(cell, r, stages, rec.loop)

    def seq(nid: int, rank: int) -> str:
        """A node's values for every step, [T, N, *shape] (padded on the left to `rank`)."""
        shape = cell.graph[nid].shape
        full = "" if not shape and not rank else ", " + ", ".join(["1"] * (rank - len(shape)) + ["-1"] * len(shape))
        return f"{_scan_coefficient(r, stages, nid, rank)}.expand(T, N{full})".replace("N, )", "N)")

    for m in plan.maxplus:
        s = by_name[m.state]
        L(f"# {s.name}' = max({s.name} + a, b): linear over (max, +), all steps by a max-plus scan first")
        b = seq(m.b[0], len(s.shape))
        for other in m.b[1:]:
            b = f"torch.maximum({b}, {seq(other, len(s.shape))})"
        a = "None" if m.a is None else seq(m.a, len(s.shape))
        L(f"all_{s.name} = _maxplus_scan({a}, {b}, s0_{s.name})")
        rows.scanned.add(s.name)
    needs = [n for n in (plan.g, plan.gk, plan.v, *(c for _, c in plan.columns)) if n is not None]
    if any(stages.get(n) == "loop" for n in needs):
        L("# the decay and the values of every step, from the scanned sequences")
        rows.emit(L, [n for n in needs if stages.get(n) == "loop"])
    S = by_name[plan.state]
    names = [S.name] + [n for n, _ in plan.columns]
    L(f"# {', '.join(names)} share their decay and keys: one chunk pass over [{' | '.join(names)}], "
      f"the other states as extra value columns{' (on the transposes: o = S @ q)' if plan.transposed else ''} "
      "(rnnc/runtime/chunk.py)")
    flip = ".transpose(-1, -2)" if plan.transposed else ""
    heads = plan.heads is not None  # heads declared as a dim: NH more rows of the pass ([T, N·NH, ...])

    def rows_of(nid: int, rank: int) -> str:
        """What the pass reads of a node, [T, N, *shape] (with heads [T, N·NH, *shape])."""
        return f"{seq(nid, rank + 1)}.flatten(1, 2)" if heads else seq(nid, rank)

    rank = {n: len(by_name[n].shape) - heads for n in [S.name] + [c for c, _ in plan.columns]}
    s0 = {n: f"s0_{n}.flatten(0, 1)" if heads else f"s0_{n}" for n in rank}
    vs, h0s = [rows_of(plan.v, 1)], [f"{s0[S.name]}{flip}"]
    for n, c in plan.columns:  # a matrix state: its values [V2]; a vector state: one column
        vec = rank[n] == 1
        vs.append(f"{rows_of(c, 0)}.unsqueeze(-1)" if vec else rows_of(c, 1))
        h0s.append(f"{s0[n]}.unsqueeze(-1)" if vec else f"{s0[n]}{flip}")
    L(f"v_parts = [{', '.join(vs)}]")
    L("widths = [x.shape[-1] for x in v_parts]")
    L(f"s0_all = torch.cat([{', '.join(h0s)}], -1)")
    gk = rows_of(plan.gk, 1) if plan.gk is not None else (f"{rows_of(plan.g, 0)}.unsqueeze(-1)" if plan.g is not None
                                                          else "None")
    before = ", before=True" if plan.before else ""
    if plan.triton:  # the joined pass by the Triton chunk kernels (any number of value columns)
        L("_check_triton_device(s0_all)")
    fn = "_triton_chunk_linear" if plan.triton else "_chunk_linear"
    L(f"o_all, s_all = {fn}({rows_of(plan.q, 1)}, {rows_of(plan.k, 1)}, torch.cat(v_parts, -1), {gk}, None, "
      f"s0_all, {size}{before})")
    L("o_parts, s_parts = o_all.split(widths, -1), s_all.split(widths, -1)")
    part, final = {}, []
    by_head, state_by_head = (".unflatten(1, (N, -1))", ".unflatten(0, (N, -1))") if heads else ("", "")
    for i, n in enumerate(names):
        vec = rank[n] == 1
        part[n] = f"o_parts[{i}]{'[..., 0]' if vec else ''}{by_head}"
        final.append(f"s_parts[{i}]{'[..., 0]' if vec else flip}{state_by_head}")
    L("# the output's reads of the states: columns of the joined readout")
    for nid, name, sign, rest in plan.reads:
        value = f"{'-' if sign < 0 else ''}{part[name]}.flatten(0, 1)"
        if rest is not None and stages.get(rest) == "loop":
            rows.emit(L, [rest])
            value = f"{value} + {r.operand(rest, 'loop').at(ATOM)}"
        elif rest is not None:
            value = f"{value} + {seq(rest, len(cell.graph[nid].shape))}.flatten(0, 1)"
        L(f"{r.name(nid)} = {value}")
        rows.done.add(nid)
    L("# the outputs, for all T*B*extra rows at once")
    rows.emit(L, [o.node for o in rec.loop_outs])
    for o in rec.loop_outs:
        L(f"out_{o.name} = {r.operand(o.node, 'loop').at(ATOM)}.reshape(T, N, *{shape_text(o.shape)})")
    final += [f"all_{m.state}[-1]" for m in plan.maxplus]
    L(f"{', '.join(r.name(by_name[n].node_in) for n in names + [m.state for m in plan.maxplus])} = {', '.join(final)}")

"""The chunk lowering's fragment: the one matrix state by a chunkwise-parallel algorithm
(rnnc/runtime/chunk.py, or its Triton kernels on the triton backend), the output's state-free
terms added from the hoisted values.
"""
from __future__ import annotations

from rnnc.plans import ChunkPlan

from .render import Lines, Recurrence

CHUNK = 64  # steps per chunk in the chunkwise form (per-channel decays: see default_chunk_size)


def default_chunk_size(plan: ChunkPlan) -> int:
    """Steps per chunk when the caller gives none. Per-key/per-value decays cost K-wide work that
    grows with the chunk: 16 measured fastest on CPU for gla (benchmarks/RESULTS.md), 64 otherwise;
    the generalized delta rule: 16 steps with a per-key decay, else 64 micro-step rows (a power of two
    times at most 16, for its blockwise triangular inverse)."""
    if plan.kind == "dplr":  # rows of micro-steps a chunk: 16 with a per-key decay, else 64 (32 for n_h = 3)
        return 16 if any(st.gk is not None for st in plan.steps) else {1: 64, 2: 32}.get(len(plan.steps), 16)
    return 16 if plan.kind == "linear" and (plan.gk is not None or plan.gv is not None) else CHUNK


def emit(L: Lines, rec: Recurrence, plan: ChunkPlan) -> None:
    """The one matrix state by a chunkwise-parallel algorithm (rnnc/runtime/chunk.py). Heads declared
    as a dim run as more rows of the batch ([T, N, NH, ...] -> [T, N·NH, ...]); a state read as S @ q
    runs transposed."""
    cell, r = rec.cell, rec.r
    (s,) = cell.states
    size = plan.chunk_size or default_chunk_size(plan)
    L(f"# the recurrence in chunkwise-parallel form, {size} steps a chunk (rnnc/runtime/chunk.py)")
    for n in plan.positive:  # a constant decay taken by its log
        L(f"_chunk_check_decay({r.tensor(n, 'const')}, {cell.graph[n].name or 'the decay'!r})")
    s0 = f"{rec.initial(s)}"
    if plan.heads is not None:
        s0 += ".flatten(0, 1)"
    L(f"s0_{s.name} = {s0}{'.transpose(-1, -2)' if plan.transposed else ''}")

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
            L(f"_check_triton_device(s0_{s.name})")
        fn = "_triton_chunk_linear" if plan.triton else "_chunk_linear"
        L(f"{target} = {fn}({q}, {k}, {v}, {gk}, {gv}, s0_{s.name}, {size}{before})")
    elif plan.kind == "dplr":
        def steps(key: str) -> str:
            return "[" + ", ".join(values(getattr(st, key)) for st in plan.steps) + "]"

        def gate(st) -> str:  # the per-key and the scalar log-gate of a step, added
            gk, g = values(st.gk), values(st.g)
            return gk if st.g is None else g if st.gk is None else f"{gk} + {g}.unsqueeze(-1)"

        gates = "[" + ", ".join(gate(st) for st in plan.steps) + "]"
        L(f"# {len(plan.steps)} micro-step(s) a step: S <- diag(exp(g)) S + a (b @ S) + outer(k, v) "
          "(rnnc/runtime/chunk_dplr.py)")
        L(f"{target} = _chunk_dplr({q}, {steps('k')}, {steps('v')}, {steps('a')}, {steps('b')}, {gates}, "
          f"s0_{s.name}, {size}{before})")
    else:
        beta = seq("beta", True) if plan.beta is not None else "torch.ones(T, N, dtype=cdt, device=dev)"
        g = seq("g", True) if plan.g is not None else "None"
        if plan.triton:
            L(f"_check_triton_device(s0_{s.name})")
        fn = "_triton_delta_chunk" if plan.triton else "_chunk_delta"
        L(f"{target} = {fn}({q}, {k}, {v}, {beta}, {g}, s0_{s.name}, {size}{before})")
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

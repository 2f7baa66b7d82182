"""The Newton lowering's fragment (backend "newton"): the cell's step rendered once as a function of
the previous states over many steps at once, handed to the runtime's Newton solver
(rnnc/runtime/newton.py) with the Jacobian's structure (rnnc/jacobian.py); then the loop-stage
outputs for all steps at once from the solved trajectory, as the scan lowering computes them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from rnnc import autodiff
from rnnc import dims as D
from rnnc.ir import Graph, Node
from rnnc.irbuild import Builder
from rnnc.plans import NewtonPlan

from .emit_scan import _AllRows
from .render import Lines, Recurrence
from .torch_expr import ATOM, TorchExpr, shape_text


def attributes(L: Lines) -> None:
    """The solver's settings, as class attributes an instance (or subclass) may override."""
    L("#: Newton's method over time: the iteration cap (then the rest runs step by step, with a warning),")
    L("#: the threshold on |update| / (1 + |state|) (None: sqrt(eps) of the compute dtype), and whether")
    L("#: each call prints what happened (always kept in self.newton_info); where the linear solves of")
    L("#: diagonal and 2x2-block Jacobians run in Triton (None: on CUDA tensors, when triton was installed")
    L("#: at build time; True: on CPU tensors too, under TRITON_INTERPRET=1; False: never)")
    L("NEWTON_MAX_ITERS = 32")
    L("NEWTON_TOL = None")
    L("NEWTON_DEBUG = False")
    L("NEWTON_TRITON = None")
    L()


def auto_attributes(L: Lines, plan: NewtonPlan) -> None:
    """Where a module built with backend "auto" runs Newton (rnnc/schedule.py, NEWTON_FROM)."""
    L("#: backend 'auto': Newton's method runs for sequences of NEWTON_FROM steps or more with at most")
    L("#: NEWTON_MAX_ENTRIES state entries per step (all sequences); the loop otherwise, where it measured")
    L("#: faster (rnnc's benchmarks)")
    L(f"NEWTON_FROM = {plan.auto_from}")
    L(f"NEWTON_MAX_ENTRIES = {plan.auto_max_entries}")
    L()


def dispatch(L: Lines, cell) -> None:
    """`forward` of an auto-built module: Newton where it pays (rnnc/runtime/newton.py, _newton_pays)."""
    entries = " + ".join(f"math.prod({shape_text(s.shape)})" for s in cell.states)
    rank = len(cell.inputs[0].shape) if cell.inputs else 0
    L("def forward(self, /, *args, state=None, cu_seqlens=None, **kwargs):")
    L.indent()
    L('"""Run the cell over [B, T, *extra, ...] inputs; returns (outputs, final states): by Newton\'s method')
    L("over time where it pays (see NEWTON_FROM), else step by step; the same results either way.")
    L('cu_seqlens: see _forward_loop."""')
    names = _dims(cell)
    L(f"if cu_seqlens is None and _newton_pays(self, args, kwargs, {rank}, {tuple(names)!r}, "
      f"lambda {', '.join(f'd_{n}' for n in names)}: {entries}):")
    L("    return self._forward_newton(*args, state=state, **kwargs)")
    L("return self._forward_loop(*args, state=state, cu_seqlens=cu_seqlens, **kwargs)")
    L.dedent()
    L()


def _dims(cell) -> list[str]:
    """The dims the states' shapes name, in order."""
    return sorted({n for s in cell.states for d in s.shape for n in D.free_names(d)})


def emit(L: Lines, rec: Recurrence, plan: NewtonPlan) -> None:
    """`_step` (the step over steps lo, lo + every, ... below hi: rows `at` of the time-major values),
    `_step_jac` (the step and its Jacobian's blocks over steps lo..hi-1, rendered from the step's jvp
    graph), the solve, then the outputs."""
    cell, r, stages = rec.cell, rec.r, rec.stages
    r.use_deferred = False  # a param @ state is one product over all rows here, not one per step
    if rec.into_loop:
        L("# time-major [T*B*extra, ...] rows of the hoisted values the step reads")
    for nid in rec.into_loop:
        name = f"tm_{r.name(nid)}"
        L(f"{name} = _time_major({r.operand(nid, 'hoist').text}, B, T).flatten(0, 1)")
        r.step_ref[nid] = name
    step = _step_renderer(r, "at")
    outs = [s.node_out for s in cell.states]
    needed = r.graph.ancestors(outs)
    L()
    L("def _step(prev, lo, hi, every=1):")
    L.indent()
    L('"""The states after steps lo, lo + every, ... below hi (every > 1: one step of each segment of the')
    L('initial guess), each [steps*N, ...], from those before them (prev)."""')
    L(f"{', '.join(step.name(s.node_in) for s in cell.states)}, = prev")
    if rec.into_loop:
        L("at = _step_rows(lo, hi, every, N, dev)  # those steps' rows of the time-major values")
    step.emit(L, [n for n in rec.loop if n in needed], "loop")
    rows = "len(range(lo, hi, every)) * N"
    L(f"return ({', '.join(_next(step, s.node_out, s.shape, stages, rows) for s in cell.states)},)")
    L.dedent()
    L()
    _emit_step_jac(L, rec, plan)
    L()
    index = {s.name: i for i, s in enumerate(cell.states)}
    groups = tuple((g.kind, tuple(index[n] for n in g.states)) for g in plan.groups)
    structure = "; ".join(f"{', '.join(g.states)}: {g.describe()}" for g in plan.groups)
    L(f"# Newton's method over time (Jacobian {structure})")
    lhs = ", ".join(f"all_{s.name}" for s in cell.states)
    solvers = ", (_triton_newton_diagonal, _triton_newton_block2)" if plan.triton else ""
    L(f"{lhs}, = _newton(self, _step, _step_jac, ({', '.join(f's0_{s.name}' for s in cell.states)},), T, "
      f"{groups!r}{solvers})")
    if rec.loop_outs:
        rows = _AllRows(cell, r, stages, rec.loop)
        rows.scanned.update(s.name for s in cell.states)
        L("# the outputs, for all T*B*extra rows at once: the state before and after each step")
        rows.emit(L, [o.node for o in rec.loop_outs])
        for o in rec.loop_outs:
            L(f"out_{o.name} = {r.operand(o.node, 'loop').at(ATOM)}.reshape(T, N, *{shape_text(o.shape)})")
    L(f"{', '.join(r.name(s.node_in) for s in cell.states)} = "
      f"{', '.join(f'all_{s.name}[-1]' for s in cell.states)}")


def _next(step, nid: int, shape, stages, rows: str = "(hi - lo) * N") -> str:
    """A value of the step as [rows, *shape] (a constant one expanded)."""
    if stages.get(nid, "const") == "const":
        return f"{step.tensor(nid, 'const')}.expand({rows}, *{shape_text(shape)})"
    return step.operand(nid, "loop").text


@dataclass
class _Jacobian:
    """The step's graph with its jvp nodes appended (rnnc/autodiff.py): per group, the tangents of its
    states' next values. A diagonal or block group's tangent leaves are ones (J·1 is the diagonal of a
    diagonal J; with ones on the j-th state of a block, column j of every block), so `entries[g][i][j]`
    is ∂state_i/∂state_j's diagonal (None: zero); a dense group's are `leaves` (input nodes, one per
    state) and `entries[g][i]` the tangent of state i, linear in them."""

    graph: Graph
    stages: dict[int, str]
    entries: dict[int, list]
    leaves: dict[int, list[int]]


def _jacobian(rec: Recurrence, plan: NewtonPlan) -> _Jacobian:
    cell, stages = rec.cell, rec.stages
    g = copy.deepcopy(cell.graph)
    n_cell = len(g)
    states = {s.name: s for s in cell.states}
    # forward values the derivative may reuse: those the step computes or reads
    share = set(rec.loop) | set(rec.into_loop) | {a for n in rec.loop for a in g[n].args
                                                  if stages.get(a, "const") == "const"}
    entries: dict[int, list] = {}
    leaves: dict[int, list[int]] = {}
    small = [k for k, gr in enumerate(plan.groups) if gr.kind != "dense"]
    for j in range(max((len(plan.groups[k].states) for k in small), default=0)):
        live = [k for k in small if j < len(plan.groups[k].states)]
        ones = Builder(g, share=())
        ins = [states[plan.groups[k].states[j]].node_in for k in live]
        tans = [ones.broadcast(1.0, states[plan.groups[k].states[j]].shape) for k in live]
        outs = [states[n].node_out for k in live for n in plan.groups[k].states]
        g, ts = autodiff.jvp(g, ins, tans, outs, share=share | set(tans))
        it = iter(ts)
        for k in live:
            rows = entries.setdefault(k, [[None] * len(plan.groups[k].states) for _ in plan.groups[k].states])
            for i in range(len(plan.groups[k].states)):
                rows[i][j] = next(it)
    dense = [k for k, gr in enumerate(plan.groups) if gr.kind == "dense"]
    if dense:
        for k in dense:
            leaves[k] = [g.add(Node("input", (), states[n].shape)) for n in plan.groups[k].states]
        ins = [states[n].node_in for k in dense for n in plan.groups[k].states]
        outs = [states[n].node_out for k in dense for n in plan.groups[k].states]
        g, ts = autodiff.jvp(g, ins, [t for k in dense for t in leaves[k]], outs, share=share)
        it = iter(ts)
        for k in dense:
            entries[k] = [next(it) for _ in plan.groups[k].states]
    tangent = {t for ts in leaves.values() for t in ts}
    full = dict(stages)
    for n in range(n_cell, len(g)):
        args = g[n].args
        if n in tangent or any(a in tangent for a in args):
            tangent.add(n)
            full[n] = "tangent"
        else:
            full[n] = "loop" if any(full.get(a, "const") != "const" for a in args) else "const"
    return _Jacobian(g, full, entries, leaves)


def _emit_step_jac(L: Lines, rec: Recurrence, plan: NewtonPlan) -> None:
    """`_step_jac(prev, lo, hi)`: the states after steps lo..hi-1 and each group's Jacobian blocks there,
    in one pass: a diagonal group's [(hi-lo)*N, *shape], a block group's [(hi-lo)*N, *shape, m, m]
    (row: the next value's state), a dense group's [(hi-lo)*N, n, n] over its states' entries."""
    cell, r = rec.cell, rec.r
    jac = _jacobian(rec, plan)
    g, n_cell = jac.graph, len(cell.graph)
    jr = _step_renderer(r, "lo * N:hi * N")
    jr.graph, jr.expr, jr.stages = g, TorchExpr(g), jac.stages
    jr.roots = set(r.roots)
    rows = "(hi - lo) * N"
    for k, gr in enumerate(plan.groups):  # readable names for the Jacobian's entries
        if gr.kind == "dense":
            for s, leaf in zip(gr.states, jac.leaves[k]):
                _name(jr, leaf, f"tan_{s}")
            pairs = list(zip(gr.states, jac.entries[k]))
        else:
            pairs = [(f"{si}_{sj}" if len(gr.states) > 1 else si, e)
                     for si, row in zip(gr.states, jac.entries[k]) for sj, e in zip(gr.states, row)]
        for label, e in pairs:
            if e is not None and e >= n_cell:
                _name(jr, e, f"{'tan_next' if gr.kind == 'dense' else 'jac'}_{label}")
                jr.roots.add(e)
    results = [s.node_out for s in cell.states] + [e for row in jac.entries.values() for x in row
                                                  for e in (x if isinstance(x, list) else [x]) if e is not None]
    needed = g.ancestors(results)
    order = g.order(n for n in needed if n in jac.stages and (n in rec.loop or n >= n_cell))
    consts = [n for n in order if n >= n_cell and jac.stages[n] == "const"]
    factors = Lines()
    factors.depth = L.depth
    jr.emit(factors, consts, "const")
    if factors.lines:
        L("# the Jacobian's factors that read no step")
        L.lines += factors.lines
    L("def _step_jac(prev, lo, hi):")
    L.indent()
    L('"""The states after steps lo..hi-1 (as _step) and the Jacobian of each group of states at prev, for')
    L('all those steps at once: rendered from the jvp of the step with respect to its states."""')
    L(f"{', '.join(jr.name(s.node_in) for s in cell.states)}, = prev")
    jr.emit(L, [n for n in order if jac.stages[n] == "loop"], "loop")
    blocks = []
    by_name = {s.name: s for s in cell.states}
    for k, gr in enumerate(plan.groups):
        shapes = [by_name[n].shape for n in gr.states]

        def entry(e, shape):
            if e is None:
                return f"torch.zeros({rows}, *{shape_text(shape)}, dtype=cdt, device=dev)"
            return _next(jr, e, shape, jac.stages)

        if gr.kind == "diagonal":
            blocks.append(entry(jac.entries[k][0][0], shapes[0]))
        elif gr.kind == "block":
            cols = [f"torch.stack([{', '.join(entry(e, shapes[i]) for e in row)}], -1)"
                    for i, row in enumerate(jac.entries[k])]
            blocks.append(f"torch.stack([{', '.join(cols)}], -2)")
        else:
            fn = f"_tangent_{'_'.join(gr.states)}"
            L(f"def {fn}({', '.join(jr.name(t) for t in jac.leaves[k])}):")
            L.indent()
            L(f'"""The change of {", ".join(gr.states)} after the step for a change of them before it (one column)."""')
            mine = g.ancestors([e for e in jac.entries[k] if e is not None])
            jr.emit(L, [n for n in order if jac.stages[n] == "tangent" and n in mine], "tangent")
            outs = [f"torch.zeros({rows}, *{shape_text(sh)}, dtype=cdt, device=dev)" if e is None
                    else jr.operand(e, "tangent").text for e, sh in zip(jac.entries[k], shapes)]
            L(f"return ({', '.join(outs)},)")
            L.dedent()
            prev = ", ".join(jr.name(by_name[n].node_in) for n in gr.states)
            blocks.append(f"_newton_dense_jacobian({fn}, ({prev},))")
    states = ", ".join(_next(jr, s.node_out, s.shape, jac.stages) for s in cell.states)
    L(f"return ({states},), ({', '.join(blocks)},)")
    L.dedent()
    r.used_names |= {jr.names[n] for n in consts if n in jr.names}  # bound in the forward


def _name(r, nid: int, base: str) -> None:
    """Name a node of the Jacobian's graph `base` (or base_2, ...: unused so far)."""
    name, k = base, 2
    while name in r.used_names:
        name, k = f"{base}_{k}", k + 1
    r.used_names.add(name)
    r.names[nid] = name


def _step_renderer(r, rows: str):
    """A renderer for `_step`'s body: the forward's names so far (constants, hoisted values) and its
    own for the step's values, hoisted values read as their rows `rows` (an index expression)."""
    step = copy.copy(r)
    step.names, step.inline, step.used_names = dict(r.names), dict(r.inline), set(r.used_names)
    step.step_ref = {n: f"{ref}[{rows}]" for n, ref in r.step_ref.items()}
    step.deferred, step.use_deferred, step.keep = {}, False, set()
    return step

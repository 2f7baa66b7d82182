"""The Newton lowering's fragment (backend "newton"): the cell's step rendered once as a function of
the previous states over many steps at once, handed to the runtime's Newton solver
(rnnc/runtime/newton.py) with the Jacobian's structure (rnnc/jacobian.py); then the loop-stage
outputs for all steps at once from the solved trajectory, as the scan lowering computes them.
"""
from __future__ import annotations

import copy

from rnnc.plans import NewtonPlan

from .emit_scan import _AllRows
from .render import Lines, Recurrence
from .torch_expr import ATOM, shape_text


def attributes(L: Lines) -> None:
    """The solver's settings, as class attributes an instance (or subclass) may override."""
    L("#: Newton's method over time: the iteration cap (then the rest runs step by step, with a warning),")
    L("#: the threshold on |update| / (1 + |state|) (None: sqrt(eps) of the compute dtype), and whether")
    L("#: each call prints what happened (always kept in self.newton_info)")
    L("NEWTON_MAX_ITERS = 32")
    L("NEWTON_TOL = None")
    L("NEWTON_DEBUG = False")
    L()


def emit(L: Lines, rec: Recurrence, plan: NewtonPlan) -> None:
    """`_step` (the step over rows lo*N..hi*N of the time-major values), the solve, then the outputs."""
    cell, r, stages = rec.cell, rec.r, rec.stages
    r.use_deferred = False  # a param @ state is one product over all rows here, not one per step
    if rec.into_loop:
        L("# time-major [T*B*extra, ...] rows of the hoisted values the step reads")
    for nid in rec.into_loop:
        name = f"tm_{r.name(nid)}"
        L(f"{name} = _time_major({r.operand(nid, 'hoist').text}, B, T).flatten(0, 1)")
        r.step_ref[nid] = name
    step = _step_renderer(r)
    outs = [s.node_out for s in cell.states]
    needed = r.graph.ancestors(outs)
    L()
    L("def _step(prev, lo, hi):")
    L.indent()
    L('"""The states after steps lo..hi-1, each [(hi-lo)*N, ...], from those before them (prev)."""')
    L(f"{', '.join(step.name(s.node_in) for s in cell.states)}, = prev")
    step.emit(L, [n for n in rec.loop if n in needed], "loop")
    nxt = []
    for s in cell.states:
        if stages.get(s.node_out, "const") == "const":
            nxt.append(f"{step.tensor(s.node_out, 'const')}.expand((hi - lo) * N, *{shape_text(s.shape)})")
        else:
            nxt.append(step.operand(s.node_out, "loop").text)
    L(f"return ({', '.join(nxt)},)")
    L.dedent()
    L()
    index = {s.name: i for i, s in enumerate(cell.states)}
    groups = tuple((g.kind, tuple(index[n] for n in g.states)) for g in plan.groups)
    structure = "; ".join(f"{', '.join(g.states)}: {g.describe()}" for g in plan.groups)
    L(f"# Newton's method over time (Jacobian {structure})")
    lhs = ", ".join(f"all_{s.name}" for s in cell.states)
    L(f"{lhs}, = _newton(self, _step, ({', '.join(f's0_{s.name}' for s in cell.states)},), T, {groups!r})")
    if rec.loop_outs:
        rows = _AllRows(cell, r, stages, rec.loop)
        rows.scanned.update(s.name for s in cell.states)
        L("# the outputs, for all T*B*extra rows at once: the state before and after each step")
        rows.emit(L, [o.node for o in rec.loop_outs])
        for o in rec.loop_outs:
            L(f"out_{o.name} = {r.operand(o.node, 'loop').at(ATOM)}.reshape(T, N, *{shape_text(o.shape)})")
    L(f"{', '.join(r.name(s.node_in) for s in cell.states)} = "
      f"{', '.join(f'all_{s.name}[-1]' for s in cell.states)}")


def _step_renderer(r):
    """A renderer for `_step`'s body: the forward's names so far (constants, hoisted values) and its
    own for the step's values, hoisted values read as their rows lo*N..hi*N."""
    step = copy.copy(r)
    step.names, step.inline, step.used_names = dict(r.names), dict(r.inline), set(r.used_names)
    step.step_ref = {n: f"{ref}[lo * N:hi * N]" for n, ref in r.step_ref.items()}
    step.deferred, step.use_deferred, step.keep = {}, False, set()
    return step

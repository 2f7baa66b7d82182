"""The sequential loop's fragment: the steps in a Python loop over time, with the backward through
time generated (backends/bptt.py) or, where that is unavailable or `backward="autograd"`,
autograd through the loop.

The loop defines rnnc's semantics; every other lowering must agree with it.
"""
from __future__ import annotations

from rnnc.errors import InternalError
from rnnc.plans import LoopPlan

from . import bptt, opaque
from .render import Lines, Recurrence, next_state
from .torch_expr import ATOM, Operand


def own_region(rec: Recurrence, plan: LoopPlan) -> bool:
    """Whether the loop runs as its own custom op with the generated backward (else the assembler
    wraps the autograd loop like any other fragment)."""
    return isinstance(plan, LoopPlan) and plan.generated_backward and bptt.supported(rec.cell, rec.loop)


def emit(L: Lines, rec: Recurrence, plan: LoopPlan) -> None:
    """The recurrence stepped through in Python (see Recurrence for what it leaves bound)."""
    if own_region(rec, plan):
        _generated(L, rec)
    else:
        _autograd(L, rec)


def _generated(L: Lines, rec: Recurrence) -> None:
    """One custom op whose forward and backward through time are generated (bptt.region)."""
    cell, r, stages = rec.cell, rec.r, rec.stages
    bound = set(rec.forward_locals)
    if rec.into_loop:
        L("# time-major [T, B*extra, ...] copies of the hoisted values the recurrence reads")
        for nid in rec.into_loop:
            L(f"seq_{r.name(nid)} = _time_major({r.operand(nid, 'hoist').text}, B, T)")
            bound.add(f"seq_{r.name(nid)}")
    for c in bptt.step_adjoint(cell, stages, rec.loop).consts:  # the op differentiates named arguments
        text = r.tensor(c, "const")
        if not text.isidentifier():
            r.inline.pop(c, None)
            L(f"{r.name(c)} = {text}")
            r.inline[c] = Operand(r.name(c), ATOM, False, len(cell.graph[c].shape), False)
        bound.add(r.name(c))
    L("# the recurrence: one custom op whose backward through time is generated")
    r.use_deferred = False
    saved = bptt.saved_nodes(cell, rec.loop, stages)
    r.keep = saved
    region = bptt.region(cell, r, stages, rec.loop, rec.into_loop, rec.loop_outs, saved)
    L(f"save = _needs_grad({', '.join(region.tracked)})  # keep what the backward reads only if it will run")
    bound.add("save")
    if not opaque.emit(rec.top, L, region, bound, r, cell):
        raise InternalError(f"the loop of cell '{cell.name}' reads a value a custom op cannot take")


def _autograd(L: Lines, rec: Recurrence) -> None:
    """A plain Python loop that autograd differentiates: per-step views in, one list per output out."""
    cell, r, stages, loop = rec.cell, rec.r, rec.stages, rec.loop
    if rec.into_loop:
        L("# per-step views of the hoisted values the recurrence reads")
        for nid in rec.into_loop:
            steps = f"{r.name(nid)}_steps"
            L(f"{steps} = _time_major({r.operand(nid, 'hoist').text}, B, T).unbind(0)  # one copy, then views")
            r.step_ref[nid] = f"{steps}[t]"
    for s in cell.states:
        L(f"{r.name(s.node_in)} = {rec.initial(s)}")
    for o in rec.loop_outs:
        L(f"out_{o.name} = []")
    loop_at = len(L.lines)
    L("for t in range(T):")
    L.indent()
    r.emit(L, loop, "loop")
    if r.deferred:
        pad = "    " * (L.depth - 1)
        L.lines[loop_at:loop_at] = [f"{pad}{lin} = _DeferredWeight({w})" for w, lin in r.deferred.items()]
    for o in rec.loop_outs:
        L(f"out_{o.name}.append({r.operand(o.node, 'loop').text})")
    if cell.states:
        lhs = [r.name(s.node_in) for s in cell.states]
        rhs = [next_state(r, s.node_out, s.shape, stages) for s in cell.states]
        L(f"{', '.join(lhs)} = {', '.join(rhs)}")
    if not loop and not cell.states and not rec.loop_outs:
        L("pass")
    L.dedent()

"""The loop's generated backward: backpropagation through time, rendered from the step's vjp graph.

Autograd through a Python loop pays for ~10 graph nodes per step and, for a weight used at
every step, one full-size weight-gradient matmul and accumulation per step. Instead the loop
runs as one custom op (backends/opaque.py, rnnc/runtime/opaque.py): its forward steps through time
without autograd, saving only the values the backward reads; its backward, a second op, steps back
through time.

The backward of one step is an IR graph: rnnc/autodiff.py's vjp of the step (outputs and next
states, seeded by their cotangents) with respect to the states, the hoisted values the loop
reads and the param-derived constants, built from the registry's derivative rules. This module
only renders it with the PyTorch expression renderer (torch_expr.py), in three places: nodes
that read no per-step value before the loop, the rest in the reverse loop, and the gradient of a
constant matrix that reaches it as an outer product of two per-step vectors (`W @ h`'s
`outer(g, h)`) after the loop, as one matmul over all steps (`cat(g).T @ cat(h)`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from rnnc import autodiff
from rnnc.ir import Cell, Graph, Node

from .opaque import Region, result_shape
from .render import Lines, next_state
from .torch_expr import ATOM, Operand, TorchExpr

LEAVES = ("input", "param", "state")


def supported(cell: Cell, loop: list[int]) -> bool:
    """Every op in the loop has an IR derivative rule (or passes no gradient)."""
    return all(cell.graph[n].op in LEAVES or autodiff.differentiable(cell.graph[n]) for n in loop)


@dataclass
class StepAdjoint:
    """One step's vjp: `graph` is the cell's graph, then (from `first` on) cotangent leaves
    (`seeds`: leaf -> the output or state it seeds) and the derivative nodes; `grads` maps each
    variable (state at the start of the step, hoisted value, constant) to its cotangent node."""

    graph: Graph
    first: int
    seeds: dict[int, tuple[str, str]]  # leaf -> ("out" | "state", name)
    grads: dict[int, int | None]
    adjoints: dict[int, int]  # forward node -> its cotangent node (for names)
    consts: list[int]


def _param_derived(cell: Cell, stages: dict[int, str]) -> set[int]:
    g = cell.graph
    out: set[int] = set()
    for nid in g.order(stages):
        node = g[nid]
        if node.op == "param" or any(a in out for a in node.args):
            out.add(nid)
    return out


def _loop_reads(cell: Cell, stages: dict[int, str], loop: list[int]) -> tuple[list[int], list[int]]:
    """(hoisted values the loop reads, param-derived constant tensors the loop reads), as emit_loop.py
    passes them to the recurrence."""
    g = cell.graph
    seqs = sorted({a for n in loop for a in g[n].args if stages.get(a) == "hoist"}
                  | {s.node_out for s in cell.states if stages.get(s.node_out) == "hoist"})
    derived = _param_derived(cell, stages)
    consts = sorted({a for n in loop for a in g[n].args if stages.get(a) == "const" and a in derived
                     and not g[a].scalar and g[a].dtype == "float"}
                    | {s.node_out for s in cell.states if stages.get(s.node_out) == "const"
                       and s.node_out in derived and not g[s.node_out].scalar})
    return seqs, consts


def step_adjoint(cell: Cell, stages: dict[int, str], loop: list[int]) -> StepAdjoint:
    g = copy.deepcopy(cell.graph)
    seqs, consts = _loop_reads(cell, stages, loop)
    outs, seeds, leaves, first = [], {}, [], len(g)
    for o in cell.outputs:
        if stages.get(o.node) == "loop":
            outs.append(o.node)
            leaves.append(g.add(Node("input", (), o.shape, attrs={"name": f"g_out_{o.name}"})))
            seeds[leaves[-1]] = ("out", o.name)
    for s in cell.states:
        outs.append(s.node_out)
        leaves.append(g.add(Node("input", (), s.shape, attrs={"name": f"gs_{s.name}"})))
        seeds[leaves[-1]] = ("state", s.name)
    wrt = [s.node_in for s in cell.states] + seqs + consts
    # forward values the backward may reuse: those the loop computes or reads
    share = set(loop) | set(seqs) | {a for n in loop for a in g[n].args if stages.get(a) == "const"}
    adjoints: dict[int, int] = {}
    dg, cts = autodiff.vjp(g, outs, leaves, wrt, share=share, adjoints=adjoints)
    return StepAdjoint(dg, first, seeds, dict(zip(wrt, cts)), adjoints, consts)


def _terms(g: Graph, nid: int, first: int) -> list[int]:
    """A derivative node as the terms its accumulation added."""
    node = g[nid]
    if nid >= first and node.op == "add" and all(g[a].shape == node.shape for a in node.args):
        return [t for a in node.args for t in _terms(g, a, first)]
    return [nid]


def saved_nodes(cell: Cell, loop: list[int], stages: dict[int, str]) -> set[int]:
    """Loop values the backward reads (each saved once per step by the forward)."""
    adj = step_adjoint(cell, stages, loop)
    plan = _Plan(adj, stages)
    return {a for n in plan.needed | set(plan.read) for a in ([n] if n < adj.first else adj.graph[n].args)
            if a < adj.first and stages.get(a) == "loop"}


class _Plan:
    """Which derivative nodes the backward computes, and how each constant's gradient is formed."""

    def __init__(self, adj: StepAdjoint, stages: dict[int, str]) -> None:
        g, first = adj.graph, adj.first
        self.deferred: dict[int, list[tuple[int, int]]] = {}  # const -> [(g, x)]: grad = sum_t g_t^T x_t
        self.per_step: dict[int, list[int]] = {}  # const -> terms summed over rows at every step
        batched = _Batched(g, first, stages)
        for c in adj.consts:
            ct = adj.grads.get(c)
            if ct is None:
                continue
            for t in _terms(g, ct, first):
                node = g[t]
                if (node.op == "outer" and len(g[c].shape) == 2 and t >= first
                        and all(batched(a) for a in node.args)):
                    self.deferred.setdefault(c, []).append(node.args)
                else:
                    self.per_step.setdefault(c, []).append(t)
        # the values the backward writes out: variables' cotangents, constants' terms and factors
        self.read = [ct for n, ct in adj.grads.items() if ct is not None and n not in adj.consts]
        self.read += [t for ts in self.per_step.values() for t in ts]
        self.read += [a for pairs in self.deferred.values() for pair in pairs for a in pair]
        self.needed = {n for n in g.ancestors(self.read) if n >= first}


class _Batched:
    """Whether a node of the step adjoint has a batch axis (reads a per-step value)."""

    def __init__(self, g: Graph, first: int, stages: dict[int, str]) -> None:
        self.g, self.first, self.stages, self.memo = g, first, stages, {}

    def __call__(self, n: int) -> bool:
        if n not in self.memo:
            node = self.g[n]
            if n < self.first:
                self.memo[n] = self.stages.get(n, "const") != "const"
            elif not node.args:  # a cotangent seed (batched), or a number
                self.memo[n] = node.op == "input"
            else:
                self.memo[n] = any(self(a) for a in node.args)
        return self.memo[n]


def region(cell: Cell, r, stages: dict[int, str], loop: list[int], seqs: list[int], loop_outs: list,
           saved: set[int]) -> Region:
    """The loop as a region (backends/opaque.py) with its generated backward: the body steps through
    time without autograd and returns the outputs ([T, N, ...]), the final states and the values the
    backward reads, each stacked over the steps (when the forward's `save` says a gradient is needed);
    the backward steps back through time and returns the gradients of the param-derived constants,
    the initial states and the hoisted sequences (`tracked`)."""
    adj = step_adjoint(cell, stages, loop)
    consts = adj.consts
    seq_name = {n: f"seq_{r.name(n)}" for n in seqs}
    for n in seqs:
        r.step_ref[n] = f"{seq_name[n]}[t]"
    s_in = [r.name(s.node_in) for s in cell.states]
    s0 = [f"s0_{s.name}" for s in cell.states]
    saved_list = [n for n in loop if n in saved]
    saved_var = {n: f"saved_{r.name(n)}" for n in saved_list}

    # ---- forward -----------------------------------------------------------------------
    L = Lines()
    L.indent()
    L("# steps through time without autograd, saving what the backward reads")
    if s_in:
        L(f"{', '.join(s_in)} = {', '.join(s0)}")
    for n in saved_list:
        L(f"{saved_var[n]} = []")
    for o in loop_outs:
        L(f"out_{o.name} = []")
    L("for t in range(T):")
    L.indent()
    start = len(L.lines)
    r.emit(L, loop, "loop")
    if saved_list:
        L("if save:")
        for n in saved_list:
            L(f"    {saved_var[n]}.append({r.name(n)})")
    for o in loop_outs:
        L(f"out_{o.name}.append({r.operand(o.node, 'loop').text})")
    if cell.states:
        rhs = [next_state(r, s.node_out, s.shape, stages) for s in cell.states]
        L(f"{', '.join(s_in)} = {', '.join(rhs)}")
    if len(L.lines) == start:
        L("pass")
    L.dedent()
    results = [f"out_{o.name}" for o in loop_outs] + s_in
    returned = [f"torch.stack(out_{o.name})" for o in loop_outs] + s_in
    g = cell.graph
    for n in saved_list:  # none without a gradient to compute (`save` is False)
        shape, dtype = result_shape("0, N", g[n].shape, g[n].dtype)
        returned.append(f"(torch.stack({saved_var[n]}) if save else torch.empty({shape}, dtype={dtype}, device=dev))")
    shapes = ([result_shape("T, N", o.shape, g[o.node].dtype) for o in loop_outs]
              + [result_shape("N", s.shape, "float") for s in cell.states]
              + [result_shape("T if save else 0, N", g[n].shape, g[n].dtype) for n in saved_list])

    # ---- backward ----------------------------------------------------------------------
    B = Lines()
    B.indent()
    B('"""Steps back through time, the adjoint of one step rendered from its vjp graph."""')
    if saved_list:
        B(f"{', '.join(saved_var[n] for n in saved_list)}{',' if len(saved_list) == 1 else ''} = "
          "[x.unbind(0) for x in saved]")
    gouts = [f"g_out_{o.name}" for o in loop_outs]
    gstate = [f"gs_{s.name}" for s in cell.states]
    B(f"{', '.join(gouts + gstate)}{',' if len(gouts + gstate) == 1 else ''} = grads")
    dconst = {c: f"d_{r.name(c)}" for c in consts}
    dseq = {n: f"d_{seq_name[n]}" for n in seqs}
    plan = _Plan(adj, stages)
    body = _Body(adj, r, stages, plan, seq_name)
    for c in consts:
        B(f"{dconst[c]} = None")
    lin = {c: (f"lin_g_{r.name(c)}", f"lin_x_{r.name(c)}") for c in plan.deferred}
    for gs_list, xs_list in lin.values():
        B(f"{gs_list}, {xs_list} = [], []")
    for n in seqs:
        B(f"{dseq[n]} = torch.empty_like({seq_name[n]})" if adj.grads.get(n) is not None else f"{dseq[n]} = None")
    for line in body.before:
        B(line)
    B("for t in range(T - 1, -1, -1):")
    B.indent()
    for n in saved_list:
        B(f"{r.name(n)} = {saved_var[n]}[t]")
    for line in body.lines:
        B(line)
    for n in seqs:
        if adj.grads.get(n) is not None:
            B(f"{dseq[n]}[t] = {body.text(adj.grads[n])}")
    for c, terms in plan.per_step.items():
        for t in terms:
            total = body.text(t, ATOM)
            B(f"{dconst[c]} = _acc({dconst[c]}, {total}.sum(0))" if body.batched(t) else
              f"{dconst[c]} = _acc({dconst[c]}, {total})")
    for c, pairs in plan.deferred.items():
        for u, x in pairs:
            B(f"{lin[c][0]}.append({body.text(u)})")
            B(f"{lin[c][1]}.append({body.text(x)})")
    if cell.states:
        new = [body.text(adj.grads[s.node_in]) if adj.grads.get(s.node_in) is not None
               else f"torch.zeros_like({gs})" for s, gs in zip(cell.states, gstate)]
        B(f"{', '.join(gstate)} = {', '.join(new)}")
    else:
        B("pass")
    B.dedent()
    for c, (gs_list, xs_list) in lin.items():
        B(f"{dconst[c]} = _acc({dconst[c]}, torch.cat({gs_list}).t() @ torch.cat({xs_list}))")
    tracked = [r.tensor(c, "const") for c in consts] + s0 + [seq_name[n] for n in seqs]
    grads = [dconst[c] for c in consts] + gstate + [dseq[n] for n in seqs]
    B("# a gradient no step contributed to is zero")
    B(f"return [{', '.join(f'_or_zeros({d}, {x})' for d, x in zip(grads, tracked))}]")
    return Region("loop", L, results, shapes, returned, B, tracked)


class _Body:
    """The backward's statements: derivative nodes that read no per-step value go `before` the
    loop, the others into the loop's `lines`; a node used once is inlined into its user."""

    def __init__(self, adj: StepAdjoint, r, stages: dict[int, str], plan: _Plan, seq_name: dict[int, str]) -> None:
        self.g, self.first, self.r, self.stages = adj.graph, adj.first, r, stages
        self.batched = _Batched(adj.graph, adj.first, stages)
        self.expr = TorchExpr(adj.graph)
        self.seq_name, self.seeds = seq_name, adj.seeds
        self.operands: dict[int, Operand] = {}
        self.before: list[str] = []
        self.lines: list[str] = []
        names = {}
        for f in sorted(adj.adjoints, reverse=True):  # a node names the cotangent of the latest value it is
            names.setdefault(adj.adjoints[f], f"g_{r.name(f)}" if f < adj.first else None)
        g, needed = self.g, sorted(plan.needed)
        uses = {n: 0 for n in needed}
        for n in needed:
            for a in g[n].args:
                if a in uses:
                    uses[a] += 1 if self.batched(a) == self.batched(n) else 2  # never inline across the loop
        for n in plan.read:
            if n in uses:
                uses[n] += 1
        for n in needed:
            node = g[n]
            if node.op == "input":
                continue
            args = [self.operand(a) for a in node.args]
            text, prec = self.expr.render(n, args, self.batched(n))
            rank = len(node.shape)
            if (not node.args and node.op in ("const", "dim")) or (uses[n] <= 1 and len(text) <= 160):
                self.operands[n] = Operand(text, prec, self.batched(n), rank, node.scalar)
                continue
            name = self._fresh(names.get(n) or f"g{n}")
            (self.lines if self.batched(n) else self.before).append(f"{name} = {text}")
            self.operands[n] = Operand(name, ATOM, self.batched(n), rank, node.scalar)

    def _fresh(self, base: str) -> str:
        name, k = base, 2
        while name in self.r.used_names:
            name, k = f"{base}_{k}", k + 1
        self.r.used_names.add(name)
        return name

    def operand(self, n: int) -> Operand:
        """A value of the step adjoint as the backward reads it."""
        if n in self.operands:
            return self.operands[n]
        rank = len(self.g[n].shape)
        if n in self.seeds:
            kind, name = self.seeds[n]
            return Operand(f"g_out_{name}[t]" if kind == "out" else f"gs_{name}", ATOM, True, rank, False)
        stage = self.stages.get(n)
        if stage == "hoist":
            return Operand(f"{self.seq_name[n]}[t]", ATOM, True, rank, False)
        if stage == "loop":
            return Operand(self.r.name(n), ATOM, True, rank, False)
        return self.r.operand(n, "const")

    def text(self, n: int, prec: int = 0) -> str:
        op = self.operand(n)
        return TorchExpr.tensor(op) if op.scalar else op.at(prec)

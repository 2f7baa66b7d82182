"""The loop's generated backward: backpropagation through time emitted as PyTorch source.

Autograd through a Python loop pays for ~10 graph nodes per step and, for a weight used at
every step, one full-size weight-gradient matmul and accumulation per step. Instead the loop
runs as one `_Recurrence` autograd node: its forward steps through time without autograd,
saving only the values the derivative rules read; its backward steps back through time with
the adjoint code emitted here, and computes the gradient of a recurrent weight as one matmul
over all steps. Ops without a rule (registry.has_vjp) make the loop fall back to autograd.
"""
from __future__ import annotations

from rnnc import dims as D
from rnnc import registry
from rnnc.ir import Cell

from .adjoint import AdjointRules
from .torch_expr import shape_text

LEAVES = ("input", "param", "state")


def supported(cell: Cell, loop: list[int]) -> bool:
    return all(cell.graph[n].op in LEAVES or registry.has_vjp(cell.graph[n]) for n in loop)


def _param_derived(cell: Cell, stages: dict[int, str]) -> set[int]:
    g = cell.graph
    out: set[int] = set()
    for nid in g.order(stages):
        node = g[nid]
        if node.op == "param" or any(a in out for a in node.args):
            out.add(nid)
    return out


def saved_nodes(cell: Cell, loop: list[int], stages: dict[int, str]) -> set[int]:
    """Loop values the backward reads (each saved once per step by the forward)."""
    g = cell.graph
    keep: set[int] = set()
    for nid in loop:
        node = g[nid]
        needs = registry.get(node).needs
        if "y" in needs:
            keep.add(nid)
        if "args" in needs:
            keep.update(a for a in node.args if stages.get(a) == "loop")
    return keep


def emit_recurrence(L, cell: Cell, r, stages: dict[int, str], loop: list[int], seqs: list[int],
                    loop_outs: list, saved: set[int]) -> None:
    """Emit the loop as closures + `_Recurrence.apply`; leaves `out_<name>` ([T, N, ...]) and the
    final state variables bound, like the autograd loop does."""
    g = cell.graph
    rules = AdjointRules(g)
    derived = _param_derived(cell, stages)
    # const tensors the loop reads whose gradient matters (they derive from a param)
    consts = sorted({a for n in loop for a in g[n].args if stages.get(a) == "const" and a in derived
                     and not g[a].scalar and g[a].dtype == "float"}
                    | {s.node_out for s in cell.states if stages.get(s.node_out) == "const"
                       and s.node_out in derived and not g[s.node_out].scalar})
    seq_name = {n: f"seq_{r.name(n)}" for n in seqs}
    for n in seqs:
        r.step_ref[n] = f"{seq_name[n]}[t]"
    s_in = [r.name(s.node_in) for s in cell.states]
    s0 = [f"s0_{s.name}" for s in cell.states]
    saved_list = [n for n in loop if n in saved]
    saved_var = {n: f"saved_{r.name(n)}" for n in saved_list}

    # ---- forward -----------------------------------------------------------------------
    L("def loop_forward():")
    L.indent()
    L('"""Steps through time without autograd, saving what loop_backward reads."""')
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
    for n in saved_list:
        L(f"{saved_var[n]}.append({r.name(n)})")
    for o in loop_outs:
        L(f"out_{o.name}.append({r.operand(o.node, 'loop').text})")
    if cell.states:
        from .loop import _next_state
        rhs = [_next_state(r, s.node_out, s.shape, stages) for s in cell.states]
        L(f"{', '.join(s_in)} = {', '.join(rhs)}")
    if len(L.lines) == start:
        L("pass")
    L.dedent()
    results = [f"torch.stack(out_{o.name})" for o in loop_outs] + s_in
    L(f"return ({', '.join(results)},), ({', '.join(saved_var[n] for n in saved_list)}{',' if len(saved_list) == 1 else ''})")
    L.dedent()
    L()

    # ---- backward ----------------------------------------------------------------------
    L("def loop_backward(saved, grads):")
    L.indent()
    L('"""Steps back through time, propagating adjoints with the derivative rule of each op."""')
    if saved_list:
        L(f"{', '.join(saved_var[n] for n in saved_list)}{',' if len(saved_list) == 1 else ''} = saved")
    gouts = [f"g_out_{o.name}" for o in loop_outs]
    gstate = [f"gs_{s.name}" for s in cell.states]
    L(f"{', '.join(gouts + gstate)}{',' if len(gouts + gstate) == 1 else ''} = grads")
    dconst = {c: f"d_{r.name(c)}" for c in consts}
    dseq = {n: f"d_{seq_name[n]}" for n in seqs}
    for c in consts:
        L(f"{dconst[c]} = None")
    lin: dict[int, tuple[str, str]] = {}  # const matrix -> (list of g, list of x) for its deferred gradient
    body: list[str] = []
    adj: dict[int, str] = {}
    seq_adj: dict[int, str] = {}

    def add(target: dict, nid: int, var: str, expr: str) -> None:
        if nid in target:
            body.append(f"{target[nid]} = {target[nid]} + {expr}")
        else:
            target[nid] = var
            body.append(f"{var} = {expr}")

    def contribute(node_id: int, a: int, expr: str, kind: str) -> None:
        node, arg = g[node_id], g[a]
        if arg.scalar or arg.dtype != "float":
            return
        stage = stages.get(a)
        if stage == "const":
            if a not in dconst:
                return
            body.append(f"{dconst[a]} = _acc({dconst[a]}, _sum_to({expr}, {shape_text(arg.shape)}))")
            return
        if kind == "bcast" and not D.shapes_equal(arg.shape, node.shape):
            pad = len(node.shape) - len(arg.shape)
            expr = f"_grad_to({expr}, (N,) + {shape_text(arg.shape)}, {pad})"
        if stage == "hoist":
            add(seq_adj, a, f"g_{seq_name[a]}", expr)
        else:
            add(adj, a, f"g_{r.name(a)}", expr)

    def matmul_adjoint(nid: int, gv: str, vals: list[str], bflags: list[bool]) -> list[tuple[int, str, str]]:
        a, b = g[nid].args
        if stages.get(a) == "const" and len(g[a].shape) == 2 and len(g[b].shape) == 1 and bflags[1]:
            if a in dconst:  # W's gradient: one matmul over all steps, after the loop
                gs_list, xs_list = lin.setdefault(a, (f"lin_g_{r.name(a)}", f"lin_x_{r.name(a)}"))
                body.append(f"{gs_list}.append({gv})")
                body.append(f"{xs_list}.append({vals[1]})")
            return [(1, f"{gv} @ {vals[0]}", "exact")]
        ga, gb = f"g{nid}_a", f"g{nid}_b"
        ra, rb = len(g[a].shape), len(g[b].shape)
        body.append(f"{ga}, {gb} = _matmul_grad({gv}, {vals[0]}, {vals[1]}, {ra}, {rb})")
        return [(0, ga, "exact"), (1, gb, "exact")]

    def value(a: int) -> str:
        stage = stages.get(a)
        if stage == "hoist":
            return f"{seq_name[a]}[t]"
        if stage == "const":
            return r.tensor(a, "const") if not g[a].scalar else r.operand(a, "const").text
        return r.name(a)

    # seeds: the adjoints arriving from later steps (states) and from this step's outputs
    for o, go in zip(loop_outs, gouts):
        add(adj, o.node, f"g_{r.name(o.node)}", f"{go}[t]")
    for s, gs in zip(cell.states, gstate):
        stage = stages.get(s.node_out)
        if stage == "loop":
            add(adj, s.node_out, f"g_{r.name(s.node_out)}", gs)
        elif stage == "hoist":
            add(seq_adj, s.node_out, f"g_{seq_name[s.node_out]}", gs)
        elif s.node_out in dconst:
            body.append(f"{dconst[s.node_out]} = _acc({dconst[s.node_out]}, _sum_to({gs}, {shape_text(s.shape)}))")
    for nid in reversed(loop):
        node = g[nid]
        if node.op == "split" and any(u in adj for u in g.users(nid)):
            parts = {g[u].attrs["index"]: u for u in g.users(nid)}
            pieces = []
            for i, size in enumerate(node.attrs["sizes"]):
                u = parts.get(i)
                if u is not None and u in adj:
                    pieces.append(adj[u])
                else:
                    shape = node.shape[:node.attrs["axis"]] + (size,) + node.shape[node.attrs["axis"] + 1:]
                    pieces.append(f"torch.zeros((N,) + {shape_text(shape)}, dtype=cdt, device=dev)")
            expr = f"torch.cat([{', '.join(pieces)}], dim={node.attrs['axis'] + 1})"
            contribute(nid, node.args[0], expr, "exact")
            continue
        if node.op in LEAVES or node.op in ("item", "split") or nid not in adj:
            continue
        gv = adj[nid]
        bflags = [stages.get(a) != "const" for a in node.args]
        vals = [value(a) for a in node.args]
        if registry.broadcasts(node):  # pad batched operands as the forward did, so they broadcast alike
            rank = len(node.shape)
            vals = [f"{v}[:{', None' * (rank - len(g[a].shape))}]" if b and len(g[a].shape) < rank else v
                    for v, a, b in zip(vals, node.args, bflags)]
        if node.op == "matmul":
            contributions = matmul_adjoint(nid, gv, vals, bflags)
        else:
            contributions = rules.rule(nid, gv, vals, r.name(nid), bflags)
        for i, expr, kind in contributions:
            contribute(nid, node.args[i], expr, kind)
    for gs_list, xs_list in lin.values():
        L(f"{gs_list}, {xs_list} = [], []")
    for n in seqs:
        L(f"{dseq[n]} = torch.empty_like({seq_name[n]})" if n in seq_adj else f"{dseq[n]} = None")
    L("for t in range(T - 1, -1, -1):")
    L.indent()
    start = len(L.lines)
    for n in saved_list:
        L(f"{r.name(n)} = {saved_var[n]}[t]")
    for line in body:
        L(line)
    for n in seqs:
        if n in seq_adj:
            L(f"{dseq[n]}[t] = {seq_adj[n]}")
    for s, gs in zip(cell.states, gstate):
        if s.node_in in adj:
            L(f"{gs} = {adj[s.node_in]}")
        else:
            L(f"{gs} = torch.zeros_like({gs})")
    if len(L.lines) == start:
        L("pass")
    L.dedent()
    for a, (gs_list, xs_list) in lin.items():
        L(f"{dconst[a]} = _acc({dconst[a]}, torch.cat({gs_list}).t() @ torch.cat({xs_list}))")
    ret = [dconst[c] for c in consts] + gstate + [dseq[n] for n in seqs]
    L(f"return ({', '.join(ret)}{',' if len(ret) == 1 else ''})")
    L.dedent()
    L()
    tracked = [r.tensor(c, "const") for c in consts] + s0 + [seq_name[n] for n in seqs]
    outs = [f"out_{o.name}" for o in loop_outs] + s_in
    L(f"{', '.join(outs)}{',' if len(outs) == 1 else ''} = _Recurrence.apply(loop_forward, loop_backward, "
      f"{', '.join(tracked)})")

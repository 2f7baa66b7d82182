"""The scan lowering's fragment: every state by a parallel prefix scan over time (`_linear_scan`,
a declared combine's `_fold_scan`, or the fused Triton scans and folds of backends/triton_scan.py),
then the loop-stage outputs for all steps at once from the scanned sequences.
"""
from __future__ import annotations

from rnnc import dims as D
from rnnc.ir import Cell
from rnnc.plans import MatrixScan, ScanPlan

from . import triton_scan
from .combine import combine_source
from .render import Lines, Recurrence, Renderer
from .torch_expr import ATOM, pyint, shape_text


def kernels(L: Lines, cell: Cell, stages: dict[int, str], scan: ScanPlan) -> None:
    """The fused Triton scans' and folds' kernels, at the top of the module (triton backend only)."""
    graph = cell.graph
    L(f"BLOCK = {triton_scan.BLOCK}  # channels per program of the fused scans")
    if scan.fused:
        L("SCAN_CHUNK = None  # steps per chunk of the fused scans; None: _scan_chunks chooses per call")
    for name, (a, b, leaves, body) in scan.fused.items():
        L()
        L()
        for line in triton_scan.source(name, graph, stages, a, b, leaves, body):
            L(line)
    for i, (c, leaves, body, cbody) in enumerate(scan.folds):
        L()
        L()
        for line in triton_scan.fold_source(str(i), graph, stages, c, leaves, body, cbody):
            L(line)
    L()
    L()


def emit(L: Lines, rec: Recurrence, scan: ScanPlan) -> None:
    """Every state by a parallel prefix scan over time, then the outputs for all steps at once.

    Folds come first, then the linear states in the order of `scan.linear`: a state in a later
    layer has coefficients that read earlier states, computed for all steps at once from their
    scanned sequences before its own scan."""
    cell, r, stages, loop, loop_outs = rec.cell, rec.r, rec.stages, rec.loop, rec.loop_outs
    linear, combines = scan.linear, scan.combines
    rows = _AllRows(cell, r, stages, loop)
    by_in = {s.node_in: s for s in cell.states}
    by_name = {s.name: s for s in cell.states}
    for i, (c, leaves, _, _) in enumerate(scan.folds):
        group = [by_in[a] for a in c.args_left]
        s0 = group[0]
        full = "".join(f", {pyint(d)}" for d in s0.shape)
        L(f"# {', '.join(s.name for s in group)} fold with `{c.name}` in a fused Triton kernel")
        args = [f"s0_{s.name}.reshape(-1)" for s in group] + [_leaf_arg(r, stages, n, s0.shape) for n in leaves]
        numel = " * ".join(pyint(d) for d in s0.shape) or "1"
        L(f"{_tuple([f'all_{s.name}' for s in group])[1:-1]} = "
          f"(x.reshape(T, N{full}) for x in _Fold_{i}.apply(T, {numel}, {', '.join(args)}))")
        rows.scanned.update(s.name for s in group)
    for i, c in enumerate(combines):
        group = [by_in[a] for a in c.args_left]
        fname = f"combine_{c.name}" + (f"_{i}" if i else "")
        L(f"# {', '.join(s.name for s in group)} fold with the associative combine `{c.name}`: a parallel scan")
        for line in combine_source(c, fname):
            L(line)
        leaves = _tuple([_scan_operand(r, stages, n) for n in c.args_right])
        L(f"{_tuple([f'all_{s.name}' for s in group])[1:-1]} = _fold_scan({fname}, "
          f"{_tuple([f's0_{s.name}' for s in group])}, {leaves})")
        rows.scanned.update(s.name for s in group)
    if linear:
        L("# the recurrence as parallel scans: state' = a * state + b for all steps at once")
    fused = scan.fused
    if fused:
        L("# the recurrence as fused Triton scans (a and b computed in the kernels from these leaves)")
    for name in list(fused) + list(scan.order or linear):
        s = by_name[name]
        if name in scan.matrix:
            _emit_matrix(L, rec, rows, scan.matrix[name])
            continue
        if name in fused:
            a, b, leaves, _ = fused[name]
            full = "".join(f", {pyint(d)}" for d in s.shape)
            args = [_leaf_arg(r, stages, n, s.shape) for n in leaves]
            numel = " * ".join(pyint(d) for d in s.shape) or "1"
            L(f"all_{s.name} = _Scan_{s.name}.apply(T, {numel}, s0_{s.name}.reshape(-1){''.join(', ' + x for x in args)})"
              f".reshape(T, N{full})")
        else:
            pair = [n for n in linear[name] if n is not None]
            if any(stages.get(n) == "loop" for n in pair):
                L(f"# {name}'s a and b read states scanned above: computed for all steps from their sequences")
                rows.emit(L, pair)
            coef = [_scan_coefficient(r, stages, n, len(s.shape)) if n is not None else "None"
                    for n in linear[name]]
            if _is_one(rec.cell.graph, linear[name][0]):  # a running sum (a counter, an accumulator)
                L(f"all_{s.name} = _sum_scan({coef[1]}, s0_{s.name}, T)")
                rows.scanned.add(name)
                continue
            if not any(stages.get(n) in ("hoist", "loop") for n in pair):  # constant a and b: T steps still
                coef[0] = f"{coef[0]}.expand(T, {', '.join(['-1'] * (len(s.shape) + 1))})"
            L(f"all_{s.name} = _linear_scan({coef[0]}, {coef[1]}, s0_{s.name})")
        rows.scanned.add(name)
    if loop_outs:
        L("# the outputs, for all T*B*extra rows at once: the state before and after each step")
        rows.emit(L, [o.node for o in loop_outs])
        for o in loop_outs:
            L(f"out_{o.name} = {r.operand(o.node, 'loop').at(ATOM)}.reshape(T, N, *{shape_text(o.shape)})")
    L(f"{', '.join(r.name(s.node_in) for s in cell.states)} = "
      f"{', '.join(f'all_{s.name}[-1]' for s in cell.states)}")


def _is_one(graph, nid: int | None) -> bool:
    """Whether a scan coefficient is the constant 1 (`s = s + b`): its scan is a cumulative sum."""
    node = graph[nid] if nid is not None else None
    return node is not None and node.op == "const" and node.attrs.get("value") == 1 and not node.args


def _emit_matrix(L: Lines, rec: Recurrence, rows: "_AllRows", group: MatrixScan) -> None:
    """A group of states scanned as one with matrices (runtime `_group_scan`)."""
    r, stages = rec.r, rec.stages
    states = [next(s for s in rec.cell.states if s.name == n) for n in group.states]
    nodes = group.nodes()
    what = f"a block-diagonal {len(states)}×{len(states)} transition per element" if group.kind == "block" \
        else "one dense transition matrix"
    L(f"# {', '.join(group.states)}: {what}, scanned as matrices: (A2, b2)∘(A1, b1) = (A2 A1, A2 b1 + b2)")
    if any(stages.get(n) == "loop" for n in nodes):
        L("# the coefficients read states scanned above: computed for all steps from their sequences")
        rows.emit(L, nodes)
    dense = group.kind == "dense"
    rank = 2 if dense else len(states[0].shape)  # a dense block is [n_i, n_j], its b [n_i]

    def coef(n: int | None, k: int) -> str:
        return "None" if n is None else _scan_coefficient(r, stages, n, k)
    a = _tuple([_tuple([coef(n, rank) for n in row]) for row in group.a])
    b = _tuple([coef(n, 1 if dense else rank) for n in group.b])
    h0 = _tuple([f"s0_{s.name}" for s in states])
    L(f"{_tuple([f'all_{s.name}' for s in states])[1:-1]} = _group_scan(T, {a}, {b}, {h0}, "
      f"dense={dense})")
    rows.scanned.update(group.states)


class _AllRows:
    """Emits loop values for all T*B*extra rows at once, from the scanned states' sequences (the
    state before each step, `all_s` shifted by one, and after it), each value and sequence once."""

    def __init__(self, cell: Cell, r: Renderer, stages: dict[int, str], loop: list[int]) -> None:
        self.cell, self.r, self.stages, self.loop = cell, r, stages, loop
        self.scanned: set[str] = set()
        self.done: set[int] = set()

    def emit(self, L: Lines, roots: list[int]) -> None:
        g, r, stages = self.cell.graph, self.r, self.stages
        outs_at = {s.node_out: s for s in self.cell.states if stages.get(s.node_out) == "loop"}
        ins_at = {s.node_in: s for s in self.cell.states}
        needed: set[int] = set()
        stack = list(roots)
        while stack:
            n = stack.pop()
            if n in needed or n in self.done or stages.get(n) != "loop":
                continue
            needed.add(n)
            if n not in outs_at or outs_at[n].name not in self.scanned:
                stack.extend(g[n].args)
        for n in sorted(needed):
            if n in ins_at:
                s = ins_at[n]
                L(f"{r.name(n)} = _state_before(s0_{s.name}, all_{s.name}).flatten(0, 1)")
            elif n in outs_at and outs_at[n].name in self.scanned:
                L(f"{r.name(n)} = all_{outs_at[n].name}.flatten(0, 1)")
            else:
                continue
            self.done.add(n)
        for h in sorted({a for n in needed if n not in self.done for a in g[n].args if stages.get(a) == "hoist"}):
            if h not in r.step_ref:
                L(f"tm_{r.name(h)} = _time_major({r.operand(h, 'hoist').text}, B, T).flatten(0, 1)")
                r.step_ref[h] = f"tm_{r.name(h)}"
        rest = [n for n in self.loop if n in needed and n not in self.done]
        r.emit(L, rest, "loop")
        self.done.update(needed)


def _leaf_arg(r: Renderer, stages: dict[int, str], nid: int, shape: D.Shape) -> str:
    """A fused kernel's leaf: [T, M] when it changes per step, else [C] (the state's elements)."""
    if triton_scan.is_per_step(stages, nid):
        full = "".join(f", {pyint(d)}" for d in shape)
        return f"{_scan_coefficient(r, stages, nid, len(shape))}.expand(T, N{full}).reshape(T, -1)"
    return f"{r.tensor(nid, 'const')}.expand{shape_text(shape)}.reshape(-1)"


def _tuple(items: list[str]) -> str:
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _scan_operand(r: Renderer, stages: dict[int, str], nid: int) -> str:
    """A combine's per-step operand as [T, B*extra, *shape]."""
    node = r.graph[nid]
    if stages.get(nid) == "hoist":
        return f"_time_major({r.operand(nid, 'hoist').text}, B, T)"
    shape = "".join(f", {pyint(d)}" for d in node.shape)
    return f"{r.tensor(nid, 'const')}.expand(T, N{shape})"


def _scan_coefficient(r: Renderer, stages: dict[int, str], nid: int, rank: int) -> str:
    """A scan coefficient as [T, B*extra, *shape], its shape padded on the left to the state's rank."""
    node = r.graph[nid]
    shape = tuple(pyint(d) for d in node.shape)
    pad = ("1",) * (rank - len(shape))
    if stages.get(nid) == "hoist":
        return f"_time_major({r.operand(nid, 'hoist').text}, B, T).reshape(T, N, {', '.join(pad + shape)})".replace(
            ", )", ")")
    if stages.get(nid) == "loop":  # computed for all T*N rows from earlier states' sequences (_AllRows)
        return f"{r.operand(nid, 'loop').at(ATOM)}.reshape(T, N, {', '.join(pad + shape)})".replace(", )", ")")
    value = r.tensor(nid, "const")
    return f"{value}.reshape(1, 1, {', '.join(pad + shape)})".replace(", )", ")")

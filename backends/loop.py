"""The sequential loop backend: emits the PyTorch module of one cell (importing its runtime, or
standalone with the runtime vendored: backends/link.py).

The emitted forward computes constants once, then every state-independent value for all time
steps at once (one big matmul for an input projection), then steps through time with only the
state-dependent ops inside the Python loop. Per-step inputs are taken with one `unbind` and
outputs collected with one `stack`, so autograd sees O(T) small ops, not O(T) full-size
index/scatter pairs. This backend defines rnnc's semantics; the others must agree with it.
"""
from __future__ import annotations

import keyword
from pathlib import Path

from rnnc import dims as D
from rnnc.analysis import Report
from rnnc.errors import UnsupportedError
from rnnc.ir import Cell, Graph

from rnnc.plans import ChunkPlan, ScanPlan

from . import bptt, link, triton_recurrent, triton_scan
from .combine import combine_source

CHUNK = 64  # steps per chunk in the chunkwise form (per-channel decays: see _emit_chunk)
from .torch_expr import ATOM, Operand, TorchExpr, pyint, shape_text

#: Attribute names the generated module (or nn.Module) already uses: no param may take them.
MODULE_ATTRS = frozenset({
    "DIMS", "INPUTS", "OUTPUTS", "STATES", "DEFAULTS", "REQUIRED", "SPEC", "dims", "step", "forward",
    "reset_parameters", "extra_repr", "source", "backend", "training", "parameters", "buffers", "modules",
    "children", "state_dict", "load_state_dict", "to", "cuda", "cpu", "float", "double", "half", "bfloat16",
    "train", "eval", "apply", "register_buffer", "register_parameter", "zero_grad", "type", "requires_grad_",
    "named_parameters", "named_buffers", "named_modules", "named_children", "add_module", "get_parameter",
    "get_submodule", "get_buffer", "share_memory", "dump_patches", "call_super_init", "compile",
})


def class_name(cell: Cell) -> str:
    return "".join(part.capitalize() for part in cell.name.split("_") if part) + "Cell"


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, text: str = "") -> None:
        self.lines.append(("    " * self.depth + text) if text else "")

    def indent(self, n: int = 1) -> None:
        self.depth += n

    def dedent(self, n: int = 1) -> None:
        self.depth -= n


class _Renderer:
    """Emits the statements of one group of nodes, inlining single-use temporaries."""

    def __init__(self, graph: Graph, stages: dict[int, str], roots: set[int]) -> None:
        self.graph = graph
        self.stages = stages
        self.expr = TorchExpr(graph)
        self.names: dict[int, str] = {}
        self.inline: dict[int, Operand] = {}
        self.step_ref: dict[int, str] = {}  # hoisted node -> its per-step slice expression
        self.roots = roots
        self.used_names: set[str] = set()
        self.deferred: dict[str, str] = {}  # param variable -> its _DeferredWeight (loop stage)
        self.use_deferred = True  # off when the loop has a generated backward
        self.keep: set[int] = set()  # nodes never inlined (their values are saved for the backward)

    def batched(self, nid: int) -> bool:
        return self.stages.get(nid, "const") != "const"

    def name(self, nid: int) -> str:
        if nid in self.names:
            return self.names[nid]
        node = self.graph[nid]
        prefix = {"input": "x_", "param": "p_", "state": "s_"}.get(node.op)
        base = (prefix + node.name) if prefix else (f"v_{node.name}" if node.name else f"t{nid}")
        name, k = base, 2
        while name in self.used_names:
            name, k = f"{base}_{k}", k + 1
        self.used_names.add(name)
        self.names[nid] = name
        return name

    def operand(self, nid: int, stage: str) -> Operand:
        node = self.graph[nid]
        if nid in self.inline:
            return self.inline[nid]
        batched = self.batched(nid)
        if stage == "loop" and self.stages.get(nid) == "hoist":
            return Operand(self.step_ref[nid], ATOM, True, len(node.shape), False)
        return Operand(self.name(nid), ATOM, batched, len(node.shape), node.scalar)

    def tensor(self, nid: int, stage: str) -> str:
        """The node's value as a tensor expression (compile-time scalars are wrapped)."""
        a = self.operand(nid, stage)
        return TorchExpr.tensor(a) if a.scalar else a.at(ATOM)

    def _linear(self, node, args: list[Operand], stage: str) -> tuple[str, str, str | None] | None:
        """(x, W, deferred) when the node is F.linear(x, W) of a batched x (see TorchExpr._fuse_linear).

        Inside the loop, a param W goes through a _DeferredWeight, which computes W's gradient
        as one matmul over all steps instead of one per step.
        """
        if not (node.op == "matmul" and args[0].rank == 2 and args[1].rank == 1 and not args[0].batched
                and args[1].batched and not args[0].scalar):
            return None
        w = node.args[0]
        deferred = None
        if stage == "loop" and self.use_deferred and self.graph[w].op == "param":
            deferred = self.deferred.setdefault(self.name(w), f"lin_{self.graph[w].name}")
        return args[1].text, args[0].at(ATOM), deferred

    def emit(self, out: _Lines, nids: list[int], stage: str) -> None:
        users = {n: [u for u in self.graph.users(n) if u in self.stages] for n in nids}
        for nid in nids:
            node = self.graph[nid]
            if node.op in ("input", "param", "state", "item"):
                continue
            args = [self.operand(a, stage) for a in node.args]
            text, prec = self.expr.render(nid, args, self.batched(nid))
            linear = self._linear(node, args, stage)
            if linear and linear[2]:
                text, prec = f"{linear[2]}({linear[0]})", ATOM
            if node.op == "split":
                parts = {self.graph[u].attrs["index"]: u for u in users[nid]}
                names = [self.name(parts[i]) if i in parts else "_"
                         for i in range(len(node.attrs["sizes"]))]
                out(f"{', '.join(names)}{',' if len(names) == 1 else ''} = {text}")
                continue
            simple = not node.args and node.op in ("const", "dim")
            single = (len(users[nid]) == 1 and self.stages.get(users[nid][0]) == stage
                      and self.graph[users[nid][0]].op != "split") or not users[nid]
            short = len(text) <= 160  # keeps lines readable and generated expressions shallow
            if nid not in self.roots and nid not in self.keep and (simple or (node.name is None and single and short)):
                self.inline[nid] = Operand(text, prec, self.batched(nid), len(node.shape), node.scalar, linear)
                continue
            out(f"{self.name(nid)} = {text}")


def emit_module(cell: Cell, report: Report, defaults: dict[str, int] | None = None,
                generated_backward: bool = True, scan: ScanPlan | None = None,
                chunk: ChunkPlan | None = None, loop_below: int | None = None,
                recurrent=None, standalone: bool = False) -> str:
    """The full source of a module defining the cell's nn.Module class: importing what it calls from
    rnnc.runtime, or with `standalone` a file that needs only torch (and triton), the runtime vendored
    (backends/link.py).

    `defaults` are dim sizes baked in as the constructor's defaults (on top of `dim N = ...`).
    `scan` (rnnc.plans.ScanPlan) lowers the recurrence to parallel scans; `chunk`
    (rnnc.plans.ChunkPlan) to a chunkwise-parallel form. `recurrent` (a tiles.TileProgram) runs the
    steps in one fused Triton kernel (backends/triton_recurrent.py). With `loop_below` as well, the
    module keeps the loop for sequences shorter than that many steps (where it is faster).
    """
    for p in cell.params:
        if p.name in MODULE_ATTRS or keyword.iskeyword(p.name) or p.name.startswith("_"):
            raise UnsupportedError(f"param name '{p.name}' is reserved by torch.nn.Module", p.loc,
                                   "rename the param")
    stages = report.stages
    graph = cell.graph
    roots = {o.node for o in cell.outputs} | {s.node_out for s in cell.states} | {s.init for s in cell.states}
    r = _Renderer(graph, stages, roots)
    cls = class_name(cell)
    dim_names = list(cell.dims)
    param_dims = sorted({n for p in cell.params for d in p.shape for n in D.free_names(d)})
    input_dims = {d.name for p in cell.inputs for d in p.shape if d.is_Symbol}
    needed = sorted({n for s in cell.states for d in s.shape for n in D.free_names(d)}
                    | {n for p in cell.outputs for d in p.shape for n in D.free_names(d)}
                    | {n for p in cell.inputs for d in p.shape for n in D.free_names(d)}
                    | set(param_dims) | {n for nid in stages for n in _node_dims(graph, nid)})
    defaults = {**{d.name: int(d.default) for d in cell.dims.values() if d.default is not None},
                **(defaults or {})}

    L = _Lines()
    if scan is not None and scan.triton:
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
    if recurrent is not None:
        for line in triton_recurrent.source(cell, recurrent):
            L(line)
        L()
        L()
    L(f"class {cls}(nn.Module):")
    L.indent()
    L(f'"""One step of `{cell.name}`, run over sequences shaped [B, T, *extra, *declared]."""')
    L()
    L(f"DIMS = {tuple(dim_names)!r}")
    L(f"DEFAULTS = {defaults!r}")
    L(f"REQUIRED = {tuple(param_dims)!r}")
    L(f"INPUTS = {tuple(p.name for p in cell.inputs)!r}")
    L(f"OUTPUTS = {tuple(p.name for p in cell.outputs)!r}")
    L(f"STATES = {tuple(s.name for s in cell.states)!r}")
    L()
    parallel = "chunk" if chunk is not None else "scan" if scan is not None else None
    short = "recurrent" if recurrent is not None and parallel is not None else "loop"
    dispatch = parallel is not None and loop_below is not None
    if dispatch:
        why = ("the fused recurrent kernel, as fla's layers do" if short == "recurrent"
               else "the loop is faster there; rnnc's benchmarks")
        L(f"#: sequences shorter than this run step by step ({why})")
        L(f"LOOP_BELOW = {loop_below}")
        L()
    _emit_init(L, cell)
    _emit_reset(L, cell)
    if dispatch:
        _emit_dispatch(L, parallel, short)
    _emit_forward(L, cell, r, stages, input_dims, needed, generated_backward, scan, chunk,
                  f"_forward_{parallel}" if dispatch else "forward", recurrent if parallel is None else None)
    if dispatch:
        r = _Renderer(graph, stages, roots)
        _emit_forward(L, cell, r, stages, input_dims, needed, generated_backward, None, None, f"_forward_{short}",
                      recurrent if short == "recurrent" else None)
    _emit_step(L, cell)
    L("def extra_repr(self):")
    L("    return ', '.join(f'{k}={v}' for k, v in self.dims.items())")
    L.dedent()
    L()
    L()
    L(f"Cell = {cls}")
    code = "\n".join(L.lines) + "\n"
    spec = Path(cell.file).name  # never the absolute path of the spec or of rnnc's install
    if standalone:
        header = link.vendor(code, _version())
        needs = "torch and triton" if "\nimport triton\n" in header else "torch"
        note = [f"Standalone: needs only {needs}; what it calls from the rnnc runtime is copied in below.",
                "Regenerate with `rnnc compile` rather than editing."]
    else:
        header = link.imports(code)
        note = ["Imports what it calls from rnnc.runtime (`rnnc compile` writes the standalone form)."]
    summary = [line.replace("\\", "/").replace(str(cell.file), spec).rstrip() for line in report.summary().splitlines()]
    doc = [f"{cls}: generated by rnnc from {spec} (cell {cell.name}, backend {report.backend}).", "", *note, "",
           *summary]
    if standalone:
        header += f"\n\n\n# {'-' * 20} generated for cell {cell.name} {'-' * 20}"
    return '"""' + "\n".join(doc) + '\n"""\n' + header + "\n\n\n" + code


def _version() -> str:
    import rnnc

    return rnnc.__version__


def _node_dims(graph: Graph, nid: int) -> set[str]:
    node = graph[nid]
    names = {n for d in node.shape for n in D.free_names(d)}
    if node.op == "dim":
        names.add(node.attrs["name"])
    return names


def _emit_init(L: _Lines, cell: Cell) -> None:
    L("def __init__(self, *, device=None, dtype=None, **dims):")
    L.indent()
    L("super().__init__()")
    L("for key in dims:")
    L("    if key not in self.DIMS:")
    L("        raise InputError(f\"unknown dim {key!r}; this cell's dims are {', '.join(self.DIMS) or 'none'}\")")
    L("self.dims = dict(self.DEFAULTS)")
    L("for key, value in dims.items():")
    L("    if value is None:")
    L("        continue")
    L("    if isinstance(value, bool) or not isinstance(value, int) or value < 1:")
    L("        raise InputError(f'dim {key} must be a positive integer, got {value!r}')")
    L("    self.dims[key] = value")
    L("_need_dims(self.dims, self.REQUIRED, 'the params need them')")
    for name in sorted({n for p in cell.params for d in p.shape for n in D.free_names(d)}):
        L(f"d_{name} = self.dims[{name!r}]")
    for p in cell.params:
        L(f"self.{p.name} = nn.Parameter(torch.empty({shape_text(p.shape)}, device=device, dtype=dtype))")
    L("self.reset_parameters()")
    L.dedent()
    L()


def _emit_reset(L: _Lines, cell: Cell) -> None:
    L("def reset_parameters(self):")
    L.indent()
    if not cell.params:
        L("pass")
        L.dedent()
        L()
        return
    g = cell.init_graph
    stages = {n: "const" for n in g.ids()}
    L("with torch.no_grad():")
    L.indent()
    used = sorted({n for nid in g.ids() for n in _node_dims(g, nid)})
    for name in used:
        L(f"d_{name} = self.dims[{name!r}]")
    for p in cell.params:
        kind, *args = p.init
        if kind == "value":
            L(f"cdt, dev = self.{p.name}.dtype, self.{p.name}.device")
        r = _Renderer(g, stages, set())
        r.used_names = {"cdt", "dev"}
        r.emit(L, g.order(g.ancestors(args)), "const")
        vals = [r.operand(a, "const") for a in args]
        if kind in ("uniform", "normal"):
            num = ", ".join(v.text if v.scalar else f"float({v.text})" for v in vals)
            L(f"nn.init.{kind}_(self.{p.name}, *_check_init({p.name!r}, {kind!r}, {num}))")
        else:
            L(f"self.{p.name}.copy_({vals[0].text})")
    L.dedent(2)
    L()


def _emit_dispatch(L: _Lines, parallel: str, short: str) -> None:
    L("def forward(self, *args, state=None, cu_seqlens=None, **kwargs):")
    L.indent()
    L('"""Run the cell over [B, T, *extra, ...] inputs; returns (outputs, final states).')
    L()
    L(f"Sequences of LOOP_BELOW steps or more run the {parallel} form, shorter ones the {short} form: the")
    L(f'same results either way. cu_seqlens: see _forward_{parallel}."""')
    L("if cu_seqlens is None and _seq_len(self.INPUTS, args, kwargs) < self.LOOP_BELOW:")
    if short == "recurrent":  # unless its register tiles would be too large for these dims
        L("    try:")
        L("        return self._forward_recurrent(*args, state=state, **kwargs)")
        L("    except InputError as e:")
        L("        if not getattr(e, 'tiles_too_large', False):")
        L("            raise")
    else:
        L(f"    return self._forward_{short}(*args, state=state, **kwargs)")
    L(f"return self._forward_{parallel}(*args, state=state, cu_seqlens=cu_seqlens, **kwargs)")
    L.dedent()
    L()


def _emit_forward(L: _Lines, cell: Cell, r: _Renderer, stages: dict[int, str], input_dims: set[str],
                  needed: list[str], generated_backward: bool, scan: dict | None, chunk: dict | None,
                  method: str = "forward", recurrent=None) -> None:
    names = [p.name for p in cell.inputs]
    ranks = tuple(tuple(D.fmt(d) for d in p.shape) for p in cell.inputs)
    L(f"def {method}(self, *args, state=None, cu_seqlens=None, **kwargs):")
    L.indent()
    L('"""Run the cell over [B, T, *extra, ...] inputs; returns (outputs, final states).')
    L()
    L("With cu_seqlens (sequence boundaries in a packed [1, T, ...] batch), every sequence runs")
    L('from its own initial state and ends with its own final state, as if run alone."""')
    L("if cu_seqlens is not None:")
    L("    return _varlen(self, args, kwargs, state, cu_seqlens)")
    args = [f"in_{n}" for n in names]
    if names:
        L(f"{', '.join(args)}{',' if len(args) == 1 else ''} = _gather_inputs(self.INPUTS, args, kwargs)")
        L(f"lead = _batch_shape(self.INPUTS, ({', '.join(args)},), {ranks!r}, 2)")
        L("B, T, extra = lead[0], lead[1], lead[2:]")
        L("if T == 0:")
        L("    raise InputError('empty sequence: inputs have T = 0 time steps')")
    else:
        L("raise InputError('a cell without inputs cannot be run')")
        L.dedent()
        L()
        return
    L("_check_state_keys(state, self.STATES)")
    L("dims, origin = dict(self.dims), {k: 'set when the cell was built' for k in self.dims}")
    for p, a in zip(cell.inputs, args):
        for i, d in enumerate(p.shape):
            if d.is_Symbol:
                axis = i - len(p.shape)
                L(f"_bind(dims, origin, {d.name!r}, {a}.shape[{axis}], \"input '{p.name}' axis {axis}\")")
    if needed:
        L(f"_need_dims(dims, {tuple(needed)!r}, 'they cannot be inferred from the inputs')")
        for n in needed:
            L(f"d_{n} = dims[{n!r}]")
    for p, a in zip(cell.inputs, args):
        text = ", ".join(D.fmt(d) for d in p.shape)
        L(f"_check_shape({p.name!r}, {a}, {shape_text(p.shape)}, {text!r}, 2)")
    dtypes = ", ".join([f"{a}.dtype" for a in args] + [f"self.{p.name}.dtype" for p in cell.params])
    L(f"cdt = _compute_dtype(({dtypes},))")
    L(f"odt = _output_dtype(({', '.join(a + '.dtype' for a in args)},), cdt)")
    L(f"dev = {args[0]}.device")
    L("N = B * math.prod(extra)")
    live = cell.graph.order(stages)
    for p in cell.params:
        if p.node in stages:
            L(f"{r.name(p.node)} = self.{p.name}.to(cdt)")
    for p, a in zip(cell.inputs, args):
        if p.node in stages:
            L(f"{r.name(p.node)} = {a}.reshape(-1, *{a}.shape[{a}.dim() - {len(p.shape)}:]).to(cdt)"
              if p.shape else f"{r.name(p.node)} = {a}.reshape(-1).to(cdt)")
    if scan is None and chunk is None and cell.extra_roots:  # not a parallel plan's values
        base = [o.node for o in cell.outputs] + [s.node_out for s in cell.states] + [s.init for s in cell.states]
        used = cell.graph.ancestors(base)
        live = [n for n in live if n in used]
    if recurrent is not None:  # only what the recurrent kernel loads (not e.g. the delta rule's I - b k kᵀ)
        outs = [o.node for o in cell.outputs if stages.get(o.node) != "loop"]
        used = cell.graph.ancestors(list(recurrent.leaves) + outs + [s.init for s in cell.states])
        live = [n for n in live if n in used or stages[n] == "loop"]
    if chunk is not None:  # only what the chunkwise form reads (not the per-step k vᵀ, decays, ...)
        state_free_outs = [o.node for o in cell.outputs if o.name != chunk.output]
        used = cell.graph.ancestors(chunk.nodes() + state_free_outs + [s.init for s in cell.states])
        live = [n for n in live if n in used or stages[n] == "loop"]
    const = [n for n in live if stages[n] == "const"]
    hoist = [n for n in live if stages[n] == "hoist"]
    loop = [n for n in live if stages[n] == "loop"]
    if const:
        L("# constants: params and literals only, computed once")
        r.emit(L, const, "const")
    if any(cell.graph[n].op != "input" for n in hoist):
        L("# state-independent values, for all B*T*extra rows at once")
        r.emit(L, hoist, "hoist")
    into_loop = sorted({a for n in loop for a in cell.graph[n].args if stages.get(a) == "hoist"}
                       | {s.node_out for s in cell.states if stages.get(s.node_out) == "hoist"})
    loop_outs = [o for o in cell.outputs if stages.get(o.node) == "loop"]
    if not cell.states and not loop_outs:
        pass  # nothing is carried from step to step: no loop at all
    elif recurrent is not None:
        _emit_recurrent(L, cell, r, recurrent, loop_outs)
    elif chunk is not None:
        _emit_chunk(L, cell, r, chunk)
    elif scan is not None:
        _emit_scan(L, cell, r, stages, loop, loop_outs, scan)
    elif generated_backward and bptt.supported(cell, loop):
        _emit_generated_loop(L, cell, r, stages, loop, into_loop, loop_outs)
    else:
        _emit_autograd_loop(L, cell, r, stages, loop, into_loop, loop_outs)
    results = []
    for o in cell.outputs:
        stage = stages.get(o.node)
        if stage == "loop":
            results.append(f"_unsteps(out_{o.name}, B, extra).to(odt)")
        elif stage == "hoist":
            results.append(f"{r.operand(o.node, 'hoist').text}.reshape(B, T, *extra, *{shape_text(o.shape)}).to(odt)")
        else:
            results.append(f"{r.tensor(o.node, 'const')}.expand(B, T, *extra, *{shape_text(o.shape)}).to(odt)")
    final = ", ".join(f"{s.name!r}: {r.name(s.node_in)}.reshape(B, *extra, *{shape_text(s.shape)})"
                      for s in cell.states)
    L(f"final = {{{final}}}")
    if len(results) == 1:
        L(f"return {results[0]}, final")
    else:
        L(f"return ({', '.join(results)}), final")
    L.dedent()
    L()


def _emit_generated_loop(L: _Lines, cell: Cell, r: _Renderer, stages: dict[int, str], loop: list[int],
                         into_loop: list[int], loop_outs: list) -> None:
    if into_loop:
        L("# time-major [T, B*extra, ...] copies of the hoisted values the recurrence reads")
        for nid in into_loop:
            L(f"seq_{r.name(nid)} = _time_major({r.operand(nid, 'hoist').text}, B, T)")
    for s in cell.states:
        init = r.tensor(s.init, "const")
        L(f"s0_{s.name} = _initial(state, {s.name!r}, {init}, B, extra, {shape_text(s.shape)}, cdt)")
    L("# the recurrence: one autograd node whose backward through time is generated below")
    r.use_deferred = False
    saved = bptt.saved_nodes(cell, loop, stages)
    r.keep = saved
    bptt.emit_recurrence(L, cell, r, stages, loop, into_loop, loop_outs, saved)


def _emit_scan(L: _Lines, cell: Cell, r: _Renderer, stages: dict[int, str], loop: list[int],
               loop_outs: list, scan: dict[str, tuple]) -> None:
    """Every state by a parallel prefix scan over time, then the outputs for all steps at once.

    Folds come first, then the linear states in the order of `scan.linear`: a state in a later
    layer has coefficients that read earlier states, computed for all steps at once from their
    scanned sequences before its own scan."""
    linear, combines = scan.linear, scan.combines
    for s in cell.states:
        init = r.tensor(s.init, "const")
        L(f"s0_{s.name} = _initial(state, {s.name!r}, {init}, B, extra, {shape_text(s.shape)}, cdt)")
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
    for name in list(fused) + list(linear):
        s = by_name[name]
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


class _AllRows:
    """Emits loop values for all T*B*extra rows at once, from the scanned states' sequences (the
    state before each step, `all_s` shifted by one, and after it), each value and sequence once."""

    def __init__(self, cell: Cell, r: _Renderer, stages: dict[int, str], loop: list[int]) -> None:
        self.cell, self.r, self.stages, self.loop = cell, r, stages, loop
        self.scanned: set[str] = set()
        self.done: set[int] = set()

    def emit(self, L: _Lines, roots: list[int]) -> None:
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
                L(f"{r.name(n)} = torch.cat([s0_{s.name}.unsqueeze(0), all_{s.name}[:-1]]).flatten(0, 1)")
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


def _default_chunk_size(plan: ChunkPlan) -> int:
    """Steps per chunk when the caller gives none. Per-key/per-value decays cost K-wide work that
    grows with the chunk: 16 measured fastest on CPU for gla (benchmarks/RESULTS.md), 64 otherwise."""
    return 16 if plan.kind == "linear" and (plan.gk is not None or plan.gv is not None) else CHUNK


def _emit_chunk(L: _Lines, cell: Cell, r: _Renderer, plan: dict) -> None:
    """The one matrix state by a chunkwise-parallel algorithm (rnnc/runtime/chunk.py)."""
    (s,) = cell.states
    size = plan.chunk_size or _default_chunk_size(plan)
    L(f"# the recurrence in chunkwise-parallel form, {size} steps a chunk (rnnc/runtime/chunk.py)")
    L(f"s0_{s.name} = _initial(state, {s.name!r}, {r.tensor(s.init, 'const')}, B, extra, "
      f"{shape_text(s.shape)}, cdt)")

    def seq(key: str) -> str:
        return f"_time_major({r.operand(getattr(plan, key), 'hoist').text}, B, T)"

    q, k, v = seq("q"), seq("k"), seq("v")
    target = f"out_{plan.output}, {r.name(s.node_in)}"
    before = ", before=True" if plan.before else ""  # o_t = q_t @ S_{t-1}
    if plan.kind == "linear":
        for sc in plan.scale:
            k = f"{k} * _time_major({r.operand(sc, 'hoist').text}, B, T).unsqueeze(-1)"
        gk = seq("gk") if plan.gk is not None else (f"{seq('g')}.unsqueeze(-1)" if plan.g is not None else "None")
        gv = seq("gv") if plan.gv is not None else "None"
        if plan.triton:
            L(f"_check_triton_device(s0_{s.name})")
        fn = "_triton_chunk_linear" if plan.triton else "_chunk_linear"
        L(f"{target} = {fn}({q}, {k}, {v}, {gk}, {gv}, s0_{s.name}, {size}{before})")
    else:
        beta = seq("beta") if plan.beta is not None else "torch.ones(T, N, dtype=cdt, device=dev)"
        g = seq("g") if plan.g is not None else "None"
        if plan.triton:
            L(f"_check_triton_device(s0_{s.name})")
        fn = "_triton_delta_chunk" if plan.triton else "_chunk_delta"
        L(f"{target} = {fn}({q}, {k}, {v}, {beta}, {g}, s0_{s.name}, {size}{before})")
    out = f"out_{plan.output}"
    if plan.sign < 0:
        L(f"{out} = -{out}")
    for t, sign in plan.extra:  # the output's state-free terms, computed with the hoisted values
        term = (f"_time_major({r.operand(t, 'hoist').text}, B, T)" if r.stages.get(t) == "hoist"
                else r.tensor(t, "const"))
        L(f"{out} = {out} {'+' if sign > 0 else '-'} {term}")


def _emit_recurrent(L: _Lines, cell: Cell, r: _Renderer, prog, loop_outs: list) -> None:
    """Every step in one fused Triton kernel (backends/triton_recurrent.py)."""
    for s in cell.states:
        L(f"s0_{s.name} = _initial(state, {s.name!r}, {r.tensor(s.init, 'const')}, B, extra, "
          f"{shape_text(s.shape)}, cdt)")
    L("# the recurrence in one fused Triton kernel: states in registers, hoisted values [T, N, ...] per step")
    leaves = [f"_time_major({r.operand(n, 'hoist').text}, B, T)" if per_step else f"{r.tensor(n, 'const')}.to(cdt)"
              for n, per_step in zip(prog.leaves, prog.per_step)]
    dims = triton_recurrent.kernel_dims(cell, prog)
    dims_text = f"({''.join(f'd_{n},' for n in dims)})"
    outs = [f"out_{name}" for name in prog.outputs] + [r.name(s.node_in) for s in cell.states]
    L(f"{', '.join(outs)}{',' if len(outs) == 1 else ''} = _Recurrent.apply(T, {dims_text}, "
      f"{', '.join(f's0_{s.name}' for s in cell.states)}, {', '.join(leaves)})".replace(", )", ")"))


def _leaf_arg(r: _Renderer, stages: dict[int, str], nid: int, shape: D.Shape) -> str:
    """A fused kernel's leaf: [T, M] when it changes per step, else [C] (the state's elements)."""
    if triton_scan.is_per_step(stages, nid):
        full = "".join(f", {pyint(d)}" for d in shape)
        return f"{_scan_coefficient(r, stages, nid, len(shape))}.expand(T, N{full}).reshape(T, -1)"
    return f"{r.tensor(nid, 'const')}.expand{shape_text(shape)}.reshape(-1)"


def _tuple(items: list[str]) -> str:
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _scan_operand(r: _Renderer, stages: dict[int, str], nid: int) -> str:
    """A combine's per-step operand as [T, B*extra, *shape]."""
    node = r.graph[nid]
    if stages.get(nid) == "hoist":
        return f"_time_major({r.operand(nid, 'hoist').text}, B, T)"
    shape = "".join(f", {pyint(d)}" for d in node.shape)
    return f"{r.tensor(nid, 'const')}.expand(T, N{shape})"


def _scan_coefficient(r: _Renderer, stages: dict[int, str], nid: int, rank: int) -> str:
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


def _emit_autograd_loop(L: _Lines, cell: Cell, r: _Renderer, stages: dict[int, str], loop: list[int],
                        into_loop: list[int], loop_outs: list) -> None:
    if into_loop:
        L("# per-step views of the hoisted values the recurrence reads")
        for nid in into_loop:
            steps = f"{r.name(nid)}_steps"
            L(f"{steps} = _time_major({r.operand(nid, 'hoist').text}, B, T).unbind(0)  # one copy, then views")
            r.step_ref[nid] = f"{steps}[t]"
    for s in cell.states:
        init = r.tensor(s.init, "const")
        L(f"{r.name(s.node_in)} = _initial(state, {s.name!r}, {init}, B, extra, {shape_text(s.shape)}, cdt)")
    for o in loop_outs:
        L(f"out_{o.name} = []")
    loop_at = len(L.lines)
    L("for t in range(T):")
    L.indent()
    r.emit(L, loop, "loop")
    if r.deferred:
        pad = "    " * (L.depth - 1)
        L.lines[loop_at:loop_at] = [f"{pad}{lin} = _DeferredWeight({w})" for w, lin in r.deferred.items()]
    for o in loop_outs:
        L(f"out_{o.name}.append({r.operand(o.node, 'loop').text})")
    if cell.states:
        lhs = [r.name(s.node_in) for s in cell.states]
        rhs = [_next_state(r, s.node_out, s.shape, stages) for s in cell.states]
        L(f"{', '.join(lhs)} = {', '.join(rhs)}")
    if not loop and not cell.states and not loop_outs:
        L("pass")
    L.dedent()


def _next_state(r: _Renderer, nid: int, shape: D.Shape, stages: dict[int, str]) -> str:
    stage = stages.get(nid, "const")
    if stage == "const":
        return f"{r.tensor(nid, 'const')}.expand(N, *{shape_text(shape)})"
    return r.operand(nid, "loop").text


def _emit_step(L: _Lines, cell: Cell) -> None:
    L("def step(self, *args, state=None, **kwargs):")
    L.indent()
    L('"""One time step: inputs [B, *extra, ...] -> (outputs [B, *extra, ...], new state dict)."""')
    L("inputs = _gather_inputs(self.INPUTS, args, kwargs)")
    L("_batch_shape(self.INPUTS, inputs, " + repr(tuple(tuple(D.fmt(d) for d in p.shape) for p in cell.inputs))
      + ", 1)")
    L("outputs, final = self.forward(*[x.unsqueeze(1) for x in inputs], state=state)")
    if len(cell.outputs) == 1:
        L("return outputs.squeeze(1), final")
    else:
        L("return tuple(y.squeeze(1) for y in outputs), final")
    L.dedent()
    L()

"""Assembles the generated module of one cell, for every backend: the header (backends/link.py:
importing the runtime, or standalone with it vendored), the class, `__init__`/`reset_parameters`,
`forward` and `step`.

`forward`'s common part is here: input checks, dims, dtypes, the constants once, then every
state-independent value for all time steps at once (one big matmul for an input projection), the
outputs and final states returned. The recurrence between is one lowering's fragment, each in its
own module with one interface, `emit(L, rec, plan)` (rec: render.Recurrence; plan: its typed plan):
emit_loop.py (the sequential loop, rnnc's semantics), emit_scan.py, emit_chunk.py and
emit_recurrent.py (the fused Triton kernel); those with kernels of their own also have
`kernels(L, ...)`, emitted before the class. With a parallel plan and `loop_below`, `forward`
dispatches on the sequence length between two such forwards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Union

from rnnc import dims as D
from rnnc.analysis import Report
from rnnc.errors import UnsupportedError
from rnnc.ir import Cell
from rnnc.plans import ChunkPlan, LoopPlan, NewtonPlan, ScanPlan

from . import emit_chunk, emit_loop, emit_newton, emit_recurrent, emit_scan, link, opaque
from .render import Lines, Recurrence, Renderer, docstring, node_dims
from .tiles import TileProgram
from .torch_expr import shape_text

#: A lowering's plan: the sequential loop's, a scan's, a chunk form's, or the fused recurrent kernel's tiles.
Plan = Union[LoopPlan, ScanPlan, ChunkPlan, TileProgram, NewtonPlan]

#: Each lowering's fragment by the type of its plan: `emit(L, rec, plan)` (see render.Recurrence).
FRAGMENTS: dict[type, Callable[[Lines, Recurrence, Plan], None]] = {
    LoopPlan: emit_loop.emit, ScanPlan: emit_scan.emit, ChunkPlan: emit_chunk.emit, TileProgram: emit_recurrent.emit,
    NewtonPlan: emit_newton.emit,
}

#: Attributes the generated class has besides nn.Module's (the methods and constants it defines, what
#: rnnc.build sets on an instance).
CLASS_ATTRS = frozenset({
    "DIMS", "INPUTS", "OUTPUTS", "STATES", "DEFAULTS", "REQUIRED", "LOOP_BELOW", "SHADOWED", "dims", "step",
    "forward", "reset_parameters", "extra_repr", "source", "backend", "_forward_loop", "_forward_scan",
    "_forward_chunk", "_forward_recurrent", "_forward_newton", "__setattr__", "NEWTON_MAX_ITERS", "NEWTON_TOL",
    "NEWTON_DEBUG", "NEWTON_TRITON", "newton_info",
})
#: torch.nn.Module's attributes, class and instance (torch 2.13; tests/test_hostile.py checks the installed torch
#: adds none): a fixed list, so that emitting a module neither imports torch nor depends on its version.
NN_MODULE_ATTRS = frozenset({
    'T_destination', '__annotations__', '__call__', '__class__', '__delattr__', '__dict__', '__dir__',
    '__doc__', '__eq__', '__format__', '__ge__', '__getattr__', '__getattribute__', '__getstate__', '__gt__',
    '__hash__', '__init__', '__init_subclass__', '__le__', '__lt__', '__module__', '__ne__', '__new__',
    '__reduce__', '__reduce_ex__', '__repr__', '__setattr__', '__setstate__', '__sizeof__', '__str__',
    '__subclasshook__', '__weakref__', '_apply', '_backward_hooks', '_backward_pre_hooks', '_buffers',
    '_call_impl', '_compiled_call_impl', '_forward_hooks', '_forward_hooks_always_called',
    '_forward_hooks_with_kwargs', '_forward_pre_hooks', '_forward_pre_hooks_with_kwargs', '_get_backward_hooks',
    '_get_backward_pre_hooks', '_get_name', '_is_full_backward_hook', '_load_from_state_dict',
    '_load_state_dict_post_hooks', '_load_state_dict_pre_hooks', '_maybe_warn_non_full_backward_hook',
    '_modules', '_named_members', '_non_persistent_buffers_set', '_parameters',
    '_register_load_state_dict_pre_hook', '_register_state_dict_hook', '_replicate_for_data_parallel',
    '_save_to_state_dict', '_slow_forward', '_state_dict_hooks', '_state_dict_pre_hooks', '_version',
    '_wrapped_call_impl', 'add_module', 'apply', 'bfloat16', 'buffers', 'call_super_init', 'children',
    'compile', 'cpu', 'cuda', 'double', 'dump_patches', 'eval', 'extra_repr', 'float', 'forward', 'get_buffer',
    'get_extra_state', 'get_parameter', 'get_submodule', 'half', 'ipu', 'load_state_dict', 'modules', 'mtia',
    'named_buffers', 'named_children', 'named_modules', 'named_parameters', 'parameters',
    'register_backward_hook', 'register_buffer', 'register_forward_hook', 'register_forward_pre_hook',
    'register_full_backward_hook', 'register_full_backward_pre_hook', 'register_load_state_dict_post_hook',
    'register_load_state_dict_pre_hook', 'register_module', 'register_parameter',
    'register_state_dict_post_hook', 'register_state_dict_pre_hook', 'requires_grad_', 'set_extra_state',
    'set_submodule', 'share_memory', 'state_dict', 'to', 'to_empty', 'train', 'training', 'type', 'xpu',
    'zero_grad'
})
#: Of those, the ones assigned on an instance after its params exist (by nn.Module.train, rnnc.build, a solve).
ASSIGNED_ATTRS = frozenset({"training", "source", "backend", "dims", "newton_info"})


def param_ref(name: str) -> str:
    """How generated code reads param `name`: `self.W`, or through `self._parameters` where `self.W` would
    mean something else (a param named `xpu`, `forward`, `LOOP_BELOW`, `_buffers`). Either way it is
    registered under the spec's name, so state_dict() and named_parameters() show that name."""
    if name.startswith("_") or name in CLASS_ATTRS or name in NN_MODULE_ATTRS:
        return f"self._parameters[{name!r}]"
    return f"self.{name}"


def shadowed(cell: Cell) -> tuple[str, ...]:
    """Params named like an attribute that nn.Module or rnnc assigns on the instance later (`training`):
    the class's __setattr__ lets such assignments through instead of refusing a non-Parameter value."""
    return tuple(p.name for p in cell.params
                 if p.name in ASSIGNED_ATTRS or (p.name.startswith("_") and p.name in NN_MODULE_ATTRS))


def class_name(cell: Cell) -> str:
    """The generated class's name: `gated_deltanet` -> `GatedDeltanetCell`."""
    return "".join(part.capitalize() for part in cell.name.split("_") if part) + "Cell"


def emit_module(cell: Cell, report: Report, defaults: dict[str, int] | None = None,
                generated_backward: bool = True, scan: ScanPlan | None = None,
                chunk: ChunkPlan | None = None, loop_below: int | None = None,
                recurrent: TileProgram | None = None, newton: NewtonPlan | None = None,
                standalone: bool = False) -> str:
    """The full source of a module defining the cell's nn.Module class: importing what it calls from
    rnnc.runtime, or with `standalone` a file that needs only torch (and triton), the runtime vendored
    (backends/link.py).

    `defaults` are dim sizes baked in as the constructor's defaults (on top of `dim N = ...`).
    `scan` (rnnc.plans.ScanPlan) lowers the recurrence to parallel scans; `chunk`
    (rnnc.plans.ChunkPlan) to a chunkwise-parallel form. `recurrent` (a tiles.TileProgram) runs the
    steps in one fused Triton kernel (backends/emit_recurrent.py). With `loop_below` as well, the
    module keeps the loop for sequences shorter than that many steps (where it is faster).
    """
    stages = report.stages
    graph = cell.graph
    roots = {o.node for o in cell.outputs} | {s.node_out for s in cell.states} | {s.init for s in cell.states}
    r = Renderer(graph, stages, roots)
    cls = class_name(cell)
    dim_names = list(cell.dims)
    param_dims = sorted({n for p in cell.params for d in p.shape for n in D.free_names(d)})
    needed = sorted({n for s in cell.states for d in s.shape for n in D.free_names(d)}
                    | {n for p in cell.outputs for d in p.shape for n in D.free_names(d)}
                    | {n for p in cell.inputs for d in p.shape for n in D.free_names(d)}
                    | set(param_dims) | {n for nid in stages for n in node_dims(graph, nid)})
    defaults = {**{d.name: int(d.default) for d in cell.dims.values() if d.default is not None and d.default.is_Integer},
                **(defaults or {})}

    L = Lines()
    if scan is not None and scan.triton:
        emit_scan.kernels(L, cell, stages, scan)
    if recurrent is not None:
        emit_recurrent.kernels(L, cell, recurrent)
    top = Lines()  # each forward's recurrence as a function and custom op (backends/opaque.py)
    class_at = len(L.lines)
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
    if newton is not None:
        emit_newton.attributes(L)
    if shadowed(cell):
        _emit_setattr(L, shadowed(cell))
    parallel = "chunk" if chunk is not None else "scan" if scan is not None else None
    short = "recurrent" if recurrent is not None and parallel is not None else "loop"
    dispatch = parallel is not None and loop_below is not None
    if newton is not None and newton.auto_from is not None:  # auto: Newton only where it measured faster
        parallel, dispatch = "newton", True
        emit_newton.auto_attributes(L, newton)
    elif dispatch:
        why = ("the fused recurrent kernel, as fla's layers do" if short == "recurrent"
               else "the loop is faster there; rnnc's benchmarks")
        L(f"#: sequences shorter than this run step by step ({why})")
        L(f"LOOP_BELOW = {loop_below}")
        L()
    _emit_init(L, cell)
    _emit_reset(L, cell)
    if dispatch and parallel == "newton":
        emit_newton.dispatch(L, cell)
    elif dispatch:
        _emit_dispatch(L, parallel, short)
    loop_plan = LoopPlan(generated_backward)
    plan = next(p for p in (chunk, scan, recurrent, newton, loop_plan) if p is not None)
    _emit_forward(L, top, cell, r, stages, needed, plan, f"_forward_{parallel}" if dispatch else "forward")
    if dispatch:  # the short sequences' forward, with a renderer of its own (its names start afresh)
        short_plan = recurrent if short == "recurrent" else loop_plan
        _emit_forward(L, top, cell, Renderer(graph, stages, roots), stages, needed, short_plan, f"_forward_{short}")
    _emit_step(L, cell)
    L("def extra_repr(self):")
    L("    return ', '.join(f'{k}={v}' for k, v in self.dims.items())")
    L.dedent()
    L()
    L()
    L(f"Cell = {cls}")
    L.lines[class_at:class_at] = top.lines
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
    return docstring("\n".join(doc) + "\n") + "\n" + header + "\n\n\n" + code


def _version() -> str:
    import rnnc

    return rnnc.__version__


def _emit_setattr(L: Lines, names: tuple[str, ...]) -> None:
    L("#: params named like attributes nn.Module (or rnnc) assigns: those assignments still go through")
    L(f"SHADOWED = frozenset({names!r})")
    L()
    L("def __setattr__(self, name, value):")
    L("    if name in self.SHADOWED and not isinstance(value, nn.Parameter):")
    L("        object.__setattr__(self, name, value)")
    L("    else:")
    L("        super().__setattr__(name, value)")
    L()


def _emit_derived_dims(L: Lines, cell: Cell, target: str) -> None:
    """Dims whose defaults are expressions of other dims (`dim M = 2*N`): computed, in the order the
    elaborator put them in, when not given and once the dims they read are known."""
    for d in cell.dims.values():
        if d.default is None or d.default.is_Integer:
            continue
        reads = sorted(D.free_names(d.default))
        known = " and ".join(f"{n!r} in {target}" for n in reads)
        value = D.to_python(d.default, {n: f"{target}[{n!r}]" for n in reads})
        L(f"if {d.name!r} not in {target} and {known}:  # dim {d.name} = {D.fmt(d.default)}")
        L(f"    {target}[{d.name!r}] = {value}")
        L(f"    if {target}[{d.name!r}] < 1:")
        L(f"        raise InputError(f\"dim {d.name} = {D.fmt(d.default)} is {{{target}[{d.name!r}]}}, not a positive size\")")


def _emit_init(L: Lines, cell: Cell) -> None:
    L("def __init__(self, /, *, device=None, dtype=None, **dims):")
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
    _emit_derived_dims(L, cell, "self.dims")
    L("_need_dims(self.dims, self.REQUIRED, 'the params need them')")
    for name in sorted({n for p in cell.params for d in p.shape for n in D.free_names(d)}):
        L(f"d_{name} = self.dims[{name!r}]")
    for p in cell.params:
        value = f"nn.Parameter(torch.empty({shape_text(p.shape)}, device=device, dtype=dtype))"
        L(f"{param_ref(p.name)} = {value}")
    L("self.reset_parameters()")
    L.dedent()
    L()


def _emit_reset(L: Lines, cell: Cell) -> None:
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
    used = sorted({n for nid in g.ids() for n in node_dims(g, nid)})
    for name in used:
        L(f"d_{name} = self.dims[{name!r}]")
    for p in cell.params:
        kind, *args = p.init
        if kind == "value":
            L(f"cdt, dev = {param_ref(p.name)}.dtype, {param_ref(p.name)}.device")
        r = Renderer(g, stages, set())
        r.used_names = {"cdt", "dev"}
        r.emit(L, g.order(g.ancestors(args)), "const")
        vals = [r.operand(a, "const") for a in args]
        if kind in ("uniform", "normal"):
            num = ", ".join(v.text if v.scalar else f"float({v.text})" for v in vals)
            L(f"nn.init.{kind}_({param_ref(p.name)}, *_check_init({p.name!r}, {kind!r}, {num}))")
        else:
            L(f"{param_ref(p.name)}.copy_({vals[0].text})")
    L.dedent(2)
    L()


def _emit_dispatch(L: Lines, parallel: str, short: str) -> None:
    L("def forward(self, /, *args, state=None, cu_seqlens=None, **kwargs):")
    L.indent()
    L('"""Run the cell over [B, T, *extra, ...] inputs; returns (outputs, final states).')
    L()
    L(f"Sequences of LOOP_BELOW steps or more run the {parallel} form, shorter ones the {short} form: the")
    L(f"same results either way (compiled or exported: the {parallel} form at every length, see _runs_short).")
    L(f'cu_seqlens: see _forward_{parallel}."""')
    L("if cu_seqlens is None and _runs_short(self.INPUTS, args, kwargs, self.LOOP_BELOW):")
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


def _emit_forward(L: Lines, top: Lines, cell: Cell, r: Renderer, stages: dict[int, str], needed: list[str],
                  plan: Plan, method: str = "forward") -> None:
    """One forward method: the common prologue and epilogue around the fragment of `plan`'s lowering,
    which runs as one custom op where it can (backends/opaque.py; its functions go to `top`)."""
    start = len(L.lines)
    names = [p.name for p in cell.inputs]
    ranks = tuple(tuple(D.fmt(d) for d in p.shape) for p in cell.inputs)
    L(f"def {method}(self, /, *args, state=None, cu_seqlens=None, **kwargs):")
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
    _emit_derived_dims(L, cell, "dims")
    if needed:
        L(f"_need_dims(dims, {tuple(needed)!r}, 'they cannot be inferred from the inputs')")
        for n in needed:
            L(f"d_{n} = dims[{n!r}]")
    for p, a in zip(cell.inputs, args):
        text = ", ".join(D.fmt(d) for d in p.shape)
        L(f"_check_shape({p.name!r}, {a}, {shape_text(p.shape)}, {text!r}, 2)")
    dtypes = ", ".join([f"{a}.dtype" for a in args] + [f"{param_ref(p.name)}.dtype" for p in cell.params])
    L(f"cdt = _compute_dtype(({dtypes},))")
    L(f"odt = _output_dtype(({', '.join(a + '.dtype' for a in args)},), cdt)")
    L(f"dev = {args[0]}.device")
    L("N = B * math.prod(extra)")
    live = cell.graph.order(stages)
    for p in cell.params:
        if p.node in stages:
            L(f"{r.name(p.node)} = {param_ref(p.name)}.to(cdt)")
    for p, a in zip(cell.inputs, args):
        if p.node in stages:
            L(f"{r.name(p.node)} = {a}.reshape(-1, *{a}.shape[{a}.dim() - {len(p.shape)}:]).to(cdt)"
              if p.shape else f"{r.name(p.node)} = {a}.reshape(-1).to(cdt)")
    if isinstance(plan, (LoopPlan, TileProgram)) and cell.extra_roots:  # not a parallel plan's values
        base = [o.node for o in cell.outputs] + [s.node_out for s in cell.states] + [s.init for s in cell.states]
        used = cell.graph.ancestors(base)
        live = [n for n in live if n in used]
    if isinstance(plan, TileProgram):  # only what the recurrent kernel loads (not e.g. the delta rule's I - b k kᵀ)
        outs = [o.node for o in cell.outputs if stages.get(o.node) != "loop"]
        used = cell.graph.ancestors(list(plan.leaves) + outs + [s.init for s in cell.states])
        live = [n for n in live if n in used or stages[n] == "loop"]
    if isinstance(plan, ChunkPlan):  # only what the chunkwise form reads (not the per-step k vᵀ, decays, ...)
        state_free_outs = [o.node for o in cell.outputs if o.name != plan.output]
        used = cell.graph.ancestors(plan.nodes() + state_free_outs + [s.init for s in cell.states])
        if plan.staged:  # its output is computed from the reads (the joined readout's columns) and what else it reads
            reads, stack = {n for n, *_ in plan.reads}, [o.node for o in cell.outputs]
            while stack:
                n = stack.pop()
                if n not in used and n not in reads:
                    used.add(n)
                    stack.extend(cell.graph[n].args)
        live = [n for n in live if n in used or stages[n] == "loop"]
    const = [n for n in live if stages[n] == "const"]
    hoist = [n for n in live if stages[n] == "hoist"]
    loop = [n for n in live if stages[n] == "loop"]
    if const:
        L("# constants: params and literals only, computed once")
        r.emit(L, const, "const")
    _emit_empty(L, cell, r)
    if any(cell.graph[n].op != "input" for n in hoist):
        L("# state-independent values, for all B*T*extra rows at once")
        r.emit(L, hoist, "hoist")
    into_loop = sorted({a for n in loop for a in cell.graph[n].args if stages.get(a) == "hoist"}
                       | {s.node_out for s in cell.states if stages.get(s.node_out) == "hoist"})
    loop_outs = [o for o in cell.outputs if stages.get(o.node) == "loop"]
    if cell.states or loop_outs:  # else nothing is carried from step to step: no loop at all
        for s in cell.states:
            L(f"s0_{s.name} = {Recurrence.initial_of(r, s)}")
        r.use_deferred = isinstance(plan, LoopPlan)  # a per-step weight gradient only where there are steps
        rec = Recurrence(cell, r, stages, loop, into_loop, loop_outs, top)
        if emit_loop.own_region(rec, plan):  # the loop with its generated backward: its own op
            rec.forward_locals = opaque.forward_locals(L.lines[start:])
            FRAGMENTS[type(plan)](L, rec, plan)
        else:
            _emit_region(L, top, rec, plan, opaque.forward_locals(L.lines[start:]))
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


#: The region's name by the type of the plan it runs.
KINDS: dict[type, str] = {LoopPlan: "loop", ScanPlan: "scan", ChunkPlan: "chunk", TileProgram: "recurrent",
                          NewtonPlan: "newton"}


def _emit_region(L: Lines, top: Lines, rec: Recurrence, plan: Plan, locals_: set[str]) -> None:
    """The fragment as a function and custom op differentiated by recomputing it (rnnc/runtime/opaque.py),
    called through `_run_region` (the Triton chunk kernels' region: `_run_traced_region`); inline where the
    fragment reads a local no op can take."""
    body = Lines()
    body.depth = 1
    FRAGMENTS[type(plan)](body, rec, plan)
    cell, r = rec.cell, rec.r
    results = [f"out_{o.name}" for o in rec.loop_outs] + [r.name(s.node_in) for s in cell.states]
    returned = [f"_as_tensor(out_{o.name})" for o in rec.loop_outs] + results[len(rec.loop_outs):]
    shapes = ([opaque.result_shape("T, N", o.shape, cell.graph[o.node].dtype) for o in rec.loop_outs]
              + [opaque.result_shape("N", s.shape, "float") for s in cell.states])
    region = opaque.Region(KINDS[type(plan)], body, results, shapes, returned)
    # the Triton chunk kernels are ops themselves (rnnc/runtime/triton_launch.py, _kernel_op): their region
    # is traced, so a compiled graph holds those ops (and on a GPU inductor the kernels), not one opaque node
    traced = isinstance(plan, ChunkPlan) and plan.triton and not plan.staged
    if not opaque.emit(top, L, region, locals_, r, cell, traced):
        L.lines += [("    " * (L.depth - 1)) + line if line else line for line in body.lines]


def _emit_empty(L: Lines, cell: Cell, r: Renderer) -> None:
    """B = 0 or T = 0: nothing to run; empty outputs, and the initial states as the final ones."""
    outs = [f"torch.zeros(B, T, *extra, *{shape_text(o.shape)}, dtype=odt, device=dev)" for o in cell.outputs]
    final = ", ".join(f"{s.name!r}: {Recurrence.initial_of(r, s)}.reshape(B, *extra, *{shape_text(s.shape)})"
                      for s in cell.states)
    L("if N == 0 or T == 0:  # an empty batch or sequence: empty outputs, the initial states")
    L(f"    return {outs[0] if len(outs) == 1 else '(' + ', '.join(outs) + ')'}, {{{final}}}")


def _emit_step(L: Lines, cell: Cell) -> None:
    L("def step(self, /, *args, state=None, **kwargs):")
    L.indent()
    L('"""One time step: inputs [B, *extra, ...] -> (outputs [B, *extra, ...], new state dict)."""')
    L("inputs = _gather_inputs(self.INPUTS, args, kwargs)")
    L("_step_shape(self.INPUTS, inputs, " + repr(tuple(tuple(D.fmt(d) for d in p.shape) for p in cell.inputs))
      + ", state, self.STATES)")
    L("outputs, final = self.forward(*[x.unsqueeze(1) for x in inputs], state=state)")
    if len(cell.outputs) == 1:
        L("return outputs.squeeze(1), final")
    else:
        L("return tuple(y.squeeze(1) for y in outputs), final")
    L.dedent()
    L()

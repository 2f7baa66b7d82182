"""The public API: parse, load, library, analyze, compile, build (and graph_dot, backends_for)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Union

from . import plans, schedule
from .analysis import Report, analyze_cell
from .bind import check_bound_dims
from .optimize import optimize
from .errors import BuildError, InputError, RnncWarning, SpecNotFoundError
from .program import Program, parse_program
from .resources import specs_dir

Spec = Union[Program, str, Path]

def parse(text: str, filename: str = "<string>", import_roots=()) -> Program:
    """Parse and type-check .rnn source text.

    Raises one RnncError for all the errors of the text: the first by position (its class, line and
    column), whose `diagnostics` lists every one and whose text shows them all. Names declared and
    never used are issued as `RnncWarning`s (and kept in the program's `warnings`).

    `import "x.rnn"` reads a file relative to `filename`'s folder, inside that folder, the library's,
    those in $RNNC_IMPORT_PATH or `import_roots` (docs/security.md); text without a filename imports
    by path only from `import_roots` and $RNNC_IMPORT_PATH."""
    if not isinstance(text, str):
        raise TypeError(f"parse() takes the source text as a str, got {type(text).__name__}")
    return _warn(parse_program(text, filename, import_roots))


def _warn(program: Program) -> Program:
    """Issue the program's warnings as RnncWarning, attributed to the caller's line outside rnnc."""
    if program.warnings:
        level, frame = 2, sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "rnnc":
            level, frame = level + 1, frame.f_back
        for diagnostic in program.warnings:
            warnings.warn(RnncWarning(diagnostic), stacklevel=level)
    return program


def library() -> list[str]:
    """Names of the cells in the spec library."""
    return sorted(p.stem for p in specs_dir().glob("*.rnn"))


def load(spec: Union[str, Path], import_roots=()) -> Program:
    """A library name (`"gla"`) or a path to a .rnn file (`import_roots`: see `parse`)."""
    path = Path(spec)
    if isinstance(spec, Path) or str(spec).endswith(".rnn") or "/" in str(spec) or "\\" in str(spec):
        if not path.is_file():
            raise SpecNotFoundError(f"no such spec file: {spec}", hint="check the path")
    else:
        path = specs_dir() / f"{spec}.rnn"
        if not path.is_file():
            names = ", ".join(library())
            raise SpecNotFoundError(f"no library spec named '{spec}'", hint=f"the library has: {names}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecNotFoundError(f"cannot read {path}: {e}", hint="check the file") from None
    return _warn(parse_program(text, str(path), import_roots))


def _program(spec: Spec) -> Program:
    if isinstance(spec, Program):
        return spec
    if isinstance(spec, str) and ("{" in spec or "\n" in spec):
        return parse(spec)
    if isinstance(spec, (str, Path)):
        return load(spec)
    raise TypeError(f"a spec is a Program, a library name, a path or source text, got {type(spec).__name__}")


def backends_for(spec: Spec, cell: str | None = None) -> list[str]:
    """The backends that can lower this cell."""
    report = analyze_cell(optimize(_program(spec).cell(cell)))
    return [b for b in schedule.BACKENDS if schedule.why_not(b, report) is None]


def _lower(ir, backend: str, backward: str, defaults: dict | None = None,
           chunk_size: int | None = None, device=None, standalone: bool = False) -> tuple[str, Report]:
    """Optimise, analyse and emit one cell for `device`: (module source, report). The module imports
    its runtime from rnnc.runtime, or with `standalone` carries a copy of it (backends/link.py)."""
    from rnnc.backends.assemble import emit_module

    _check_chunk_size(chunk_size)
    cell = optimize(ir)
    report = analyze_cell(cell)
    chosen = schedule.pick(backend, report, device)
    if chunk_size is not None and backend != "auto" and chosen not in ("chunk", "triton"):
        raise BuildError(f"chunk_size applies to the chunk backend, not to backend '{backend}'",
                         hint="drop chunk_size, or use backend='chunk' (or 'auto')")
    scan = chunk = recurrent = newton = None
    kind = schedule.triton_kind(report)[0] if chosen == "triton" else chosen
    lowered = cell.derived()  # what the plan derives is appended here; the analysed cell stays as it is
    if chosen == "chunk" or kind == "chunk":
        chunk = plans.chunk_plan(lowered, report, chunk_size, triton=chosen == "triton")
    elif kind == "recurrent":
        recurrent = schedule.tile_program(cell, report.stages)
    elif chosen in ("scan", "triton"):
        scan = plans.scan_plan(lowered, report, triton=chosen == "triton")
    elif chosen == "newton":
        newton = plans.newton_plan(report, auto=backend == "auto", kernels=not standalone)
    lowered.extra_roots = (scan or chunk).nodes() if scan or chunk else []
    cell = lowered
    report = analyze_cell(cell, chosen)  # the values the plan reads are hoisted like any other
    loop_below = schedule.loop_below(backend, report)
    if chosen == "triton" and recurrent is None:
        recurrent = schedule.recurrent_for_decoding(cell, report)
        if recurrent is not None:
            loop_below = schedule.RECURRENT_BELOW
    schedule.triton_note(report)
    source = emit_module(cell, report, defaults=defaults, generated_backward=_pick_backward(backward), scan=scan,
                         chunk=chunk, loop_below=loop_below, recurrent=recurrent, newton=newton,
                         standalone=standalone)
    return source, report


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise BuildError(f"chunk_size must be a positive integer, got {chunk_size!r}",
                         hint="pass e.g. chunk_size=64, or leave it out for the automatic choice")


def analyze(spec: Spec, cell: str | None = None, backend: str = "auto", device=None) -> Report:
    """What analysis finds in the cell (after rewrites), and the lowering `backend` resolves to
    (on `device`: auto takes the triton backend on CUDA where it applies)."""
    report = analyze_cell(optimize(_program(spec).cell(cell)))
    report.backend = schedule.pick(backend, report, device)
    schedule.loop_below(backend, report)
    schedule.triton_note(report)
    return report


def compile(spec: Spec, cell: str | None = None, backend: str = "auto", backward: str = "generated",
            chunk_size: int | None = None, **dims) -> str:  # noqa: A001
    """Source of a standalone Python module implementing the cell: it needs only torch (and triton for
    the triton backend), the rnnc runtime it calls copied in. `backend` as in `build` ("auto": the
    same choice, short sequences included); `build` runs the same code, importing that runtime instead.

    Dims given here become the module's defaults (the constructor can still override them).
    `backward="generated"` gives the loop a generated backward through time (the default);
    `"autograd"` differentiates the Python loop with autograd (slower; the reference for tests).
    `chunk_size` sets the steps per chunk of the chunk backend (default: chosen per cell); it is
    an error with backend "loop" or "scan", and with "auto" it applies only if chunk is chosen.
    """
    ir = _program(spec).cell(cell)
    _check_dims(ir, dims)
    return _lower(ir, backend, backward, defaults=dims, chunk_size=chunk_size, standalone=True)[0]


def _check_dims(ir, dims: dict) -> None:
    for key, value in dims.items():
        if key not in ir.dims:
            raise BuildError(f"cell '{ir.name}' has no dim '{key}'",
                             hint=f"its dims are: {', '.join(ir.dims) or 'none'}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BuildError(f"dim {key} must be a positive integer, got {value!r}", ir.dims[key].loc,
                             f"pass e.g. {key}=16")


def graph_dot(spec: Spec, cell: str | None = None) -> str:
    """Graphviz DOT text of the cell's IR."""
    from .graphviz import to_dot

    return to_dot(_program(spec).cell(cell))


def graph_svg(spec: Spec, cell: str | None = None) -> str:
    """A self-contained SVG drawing of the cell's IR (no Graphviz needed)."""
    from .graphviz import to_svg

    return to_svg(_program(spec).cell(cell))


def _pick_backward(backward: str) -> bool:
    if backward not in ("generated", "autograd"):
        raise BuildError(f"unknown backward '{backward}'", hint="choose 'generated' or 'autograd'")
    return backward == "generated"


def _check_dtype(dtype) -> None:
    """The params' dtype: None (torch's default) or a floating dtype the runtime computes in (the
    dtypes its calls accept, rnnc/runtime/calling.py)."""
    from .runtime.calling import _FLOATS

    if dtype is not None and dtype not in _FLOATS:
        names = ", ".join(str(d) for d in _FLOATS)
        raise BuildError(f"dtype must be one of {names} (or None), got {dtype!r}",
                         hint="params are trained in floating point; pass e.g. dtype=torch.float32")


def build(spec: Spec, cell: str | None = None, backend: str = "auto", device=None, dtype=None,
          backward: str = "generated", chunk_size: int | None = None, **dims):
    """A torch.nn.Module running the cell; dims (e.g. H=64) bind sizes the spec leaves symbolic.

    `backward` chooses how the recurrence is differentiated, `chunk_size` the chunk backend's
    steps per chunk (see `compile`). The module pickles (`torch.save`) as its spec text and these
    arguments, and loads in a fresh process by regenerating its code (rnnc/saving.py).
    """
    from . import saving
    from .loader import load_source

    _check_dtype(dtype)
    prog = _program(spec)
    ir = prog.cell(cell)
    _check_dims(ir, dims)
    check_bound_dims(ir, dims)
    source, report = _lower(ir, backend, backward, chunk_size=chunk_size, device=device)
    module = load_source(source, ir.name[:40])  # the file name: the hash makes it unique, the name readable
    derived = {d.name for d in ir.dims.values() if d.default is not None and not d.default.is_Integer}
    missing = [d for d in module.Cell.REQUIRED if d not in dims and d not in module.Cell.DEFAULTS and d not in derived]
    if missing:
        raise BuildError(f"dim {missing[0]} of cell '{ir.name}' is not bound", ir.dims[missing[0]].loc,
                         f"the params' shapes need it: pass {missing[0]}=... to build")
    try:
        instance = module.Cell(device=device, dtype=dtype, **dims)
    except InputError as e:  # a bad initialiser argument, found once the dims are known
        param = next((p for p in ir.params if p.name == getattr(e, "param", None)), None)
        raise BuildError(e.message, param.loc if param else None,
                         "check the initialiser's arguments for these dims") from None
    instance.source = source
    instance.backend = report.backend
    instance._rnnc_recipe = saving.recipe(prog, cell, backend, backward, chunk_size, device, dims)
    module.Cell.__reduce__ = saving.reduce_cell
    return instance

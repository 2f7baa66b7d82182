"""The `rnnc` command line.

    rnnc compile SPEC [-o OUT.py] [--backend NAME] [--chunk-size N] [-D NAME=INT ...]
    rnnc check SPEC [SPEC ...] [-W error|ignore]
    rnnc analyze SPEC [--json]
    rnnc graph SPEC [-o graph.dot|graph.svg]
    rnnc list
    rnnc bench SPEC [-D NAME=INT ...] [--batch 8] [--length 128 ...] [--repeat 10] [--json/--csv/--plot PATH]

SPEC is a library name (see `rnnc list`) or a path to a `.rnn` file; `--cell NAME` picks a cell
when the file has several.

Exit codes: 0 success, 1 an error in the user's program or arguments (printed compiler-style,
`file:line:col: error: ...`), 2 bad command-line usage, 70 an internal error in rnnc (set
RNNC_DEBUG=1 to see its traceback), 130 interrupted.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70

#: Size given to a dim that neither -D nor the spec binds (bench only).
DEFAULT_DIM = 16
#: Output formats `rnnc graph` can produce through Graphviz's `dot`.
_DOT_FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf"}


class CliError(Exception):
    """A user error found by the CLI itself (bad path, bad -D, unknown name): one line + hint."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        text = f"rnnc: error: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


# ---------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------

def _dim_binding(text: str) -> tuple[str, int]:
    """argparse type for -D NAME=INT."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name.isidentifier() or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=INT (e.g. -D H=64), got {text!r}")
    try:
        size = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"dim {name} must be a whole number, got {value!r} (e.g. -D {name}=64)") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"dim {name} must be a positive integer, got {size}")
    return name, size


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors print usage + message and exit 2 (the argparse default)."""


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("rnnc")
    except Exception:  # not installed as a distribution (plain source checkout)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rnnc",
        description="rnnc: a compiler for recurrent neural-network cells "
                    "(.rnn specs -> PyTorch modules).",
        epilog="SPEC is a library name (see `rnnc list`) or a path to a .rnn file. "
               "Set RNNC_DEBUG=1 to see tracebacks of internal errors.",
    )
    parser.add_argument("--version", action="version", version=f"rnnc {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def spec_args(p: argparse.ArgumentParser, many: bool = False) -> None:
        if many:
            p.add_argument("specs", nargs="+", metavar="SPEC",
                           help="library name or path to a .rnn file")
        else:
            p.add_argument("spec", metavar="SPEC", help="library name or path to a .rnn file")
        p.add_argument("--cell", metavar="NAME",
                       help="the cell to use when the file defines several")

    def dim_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("-D", dest="dims", action="append", type=_dim_binding, default=[],
                       metavar="NAME=INT", help="bind a dim, e.g. -D H=64 (repeatable)")

    p = sub.add_parser("compile", help="write the standalone Python module of a cell",
                       description="Write the standalone module (it needs only torch/triton) "
                                   "and print the analysis summary.")
    spec_args(p)
    p.add_argument("-o", "--output", metavar="OUT.py",
                   help="file to write (default: the source goes to stdout, the summary to stderr)")
    p.add_argument("--backend", metavar="NAME", default="auto",
                   help="lowering to emit: auto (default: what rnnc.build picks, short sequences on the loop), "
                        "loop, scan, chunk, triton or newton")
    p.add_argument("--chunk-size", metavar="N", type=int, default=None,
                   help="steps per chunk for the chunk backend (default: chosen per cell)")
    dim_args(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("check", help="parse and type-check specs",
                       description="Parse and type-check every cell; every error and warning is printed "
                                   "as file:line:col: error: ... (or warning: ...); exit 1 on an error.")
    spec_args(p, many=True)
    p.add_argument("-W", dest="warnings", choices=["error", "ignore"],
                   help="-W error: report warnings (names never used) as errors and exit 1; "
                        "-W ignore: do not print them")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("analyze", help="print what the analyses found",
                       description="Print the analysis report of a cell (per state: "
                                   "dependence, linearity, structure; chosen lowering).")
    spec_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("graph", help="write the IR graph (Graphviz DOT or SVG)",
                       description="Write the IR graph of a cell as Graphviz DOT (.dot/.gv), "
                                   "or render it with Graphviz's `dot` (.svg/.png/.pdf).")
    spec_args(p)
    p.add_argument("-o", "--output", metavar="graph.dot|graph.svg",
                   help="file to write (default: DOT text to stdout)")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("list", help="list the spec library",
                       description="List the cells of the spec library with their titles.")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("bench", help="time every backend that can run a cell",
                       description="Build the cell with each backend that applies on the device, feed random "
                                   "inputs and time forward and forward+backward at each length, in "
                                   "interleaved rounds; prints the median and spread, progress on stderr.")
    spec_args(p)
    dim_args(p)
    p.add_argument("--batch", type=_positive_int, default=8, metavar="B", help="batch size (8)")
    p.add_argument("--length", type=_positive_int, nargs="+", default=[128], metavar="T",
                   help="sequence length(s), e.g. --length 64 256 1024 (128)")
    p.add_argument("--repeat", type=_positive_int, default=10, metavar="N",
                   help="timed runs per measurement at least (10)")
    p.add_argument("--min-time", type=_positive_float, default=0.5, metavar="S",
                   help="seconds of timed runs per measurement at least (0.5)")
    p.add_argument("--backend", nargs="+", metavar="NAME", help="time only these backends")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="cpu, cuda, ... (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="input dtype (float32)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the inputs (0)")
    p.add_argument("--json", metavar="PATH", help="write the timings as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the timings as CSV")
    p.add_argument("--plot", metavar="PATH", help="plot time against T per backend (.png/.svg/.pdf; needs matplotlib)")
    p.set_defaults(func=cmd_bench)
    return parser


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def _rnnc():
    import rnnc
    return rnnc


def _looks_like_path(spec: str) -> bool:
    return (spec.endswith(".rnn") or os.sep in spec or (os.altsep or "\0") in spec
            or spec.startswith("."))


def _load(spec: str, show_warnings: bool = True):
    """rnnc.load with the CLI's own one-line errors for paths and unknown library names; the spec's
    warnings go to stderr in the compiler's format (not through Python's warnings)."""
    prog = _load_quietly(spec)
    if show_warnings:
        for d in prog.warnings:
            _err(d.render())
    return prog


def _load_quietly(spec: str):
    rnnc = _rnnc()
    if not spec:
        raise CliError("empty SPEC", "give a library name (see `rnnc list`) or a .rnn path")
    path = Path(spec)
    if _looks_like_path(spec):
        if not path.exists():
            raise CliError(f"no such file: {spec}",
                           "give a path to a .rnn file, or a library name (see `rnnc list`)")
        if path.is_dir():
            raise CliError(f"{spec} is a directory, not a .rnn file")
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise CliError(f"cannot read {spec}: {e.strerror or e}") from None
    elif not path.is_file():
        try:
            names = list(rnnc.library())
        except Exception:
            names = None
        if names is not None and spec not in names:
            close = difflib.get_close_matches(spec, names, n=3)
            hint = (f"did you mean {', '.join(close)}? " if close else "") + \
                "`rnnc list` shows the library; a file path must exist (or end in .rnn)"
            raise CliError(f"unknown spec '{spec}': not a library name and no such file", hint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rnnc.RnncWarning)
        return rnnc.load(spec)


def _dims(args: argparse.Namespace) -> dict[str, int]:
    dims: dict[str, int] = {}
    for name, size in getattr(args, "dims", []) or []:
        if name in dims and dims[name] != size:
            raise CliError(f"dim {name} given twice with different sizes ({dims[name]} and {size})")
        dims[name] = size
    return dims


def _write_text(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None


def _write_bytes(path: str, data: bytes) -> None:
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None


def _out(text: str = "", file=None) -> None:
    stream = sys.stdout if file is None else file
    stream.write(text if text.endswith("\n") or not text else text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text if text.endswith("\n") else text + "\n")


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------

def cmd_compile(args: argparse.Namespace) -> int:
    rnnc = _rnnc()
    dims = _dims(args)
    prog = _load(args.spec)
    kwargs: dict[str, Any] = {"cell": args.cell}
    kwargs["backend"] = args.backend
    if args.chunk_size is not None:
        kwargs["chunk_size"] = args.chunk_size
    source = rnnc.compile(prog, **kwargs, **dims)
    summary = rnnc.analyze(prog, cell=args.cell, backend=args.backend).summary()
    if args.output:
        _write_text(args.output, source if source.endswith("\n") else source + "\n")
        _out(summary)
        _out(f"wrote {args.output}")
    else:
        _out(source)
        sys.stdout.flush()
        _err(summary)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Every error and warning of each spec, in file order, then a count; exit 1 on any error (and on any
    warning with -W error)."""
    rnnc = _rnnc()
    status = EXIT_OK
    for spec in args.specs:
        try:
            prog = _load(spec, show_warnings=False)
        except (rnnc.RnncError, CliError) as e:
            _report_error(e, args.warnings)
            status = EXIT_ERROR
            continue
        names = [args.cell] if args.cell else list(prog.cells)
        diagnostics, failed = list(prog.warnings), False
        for name in names:
            try:
                rnnc.analyze(prog, cell=name)
            except rnnc.RnncError as e:
                if e.loc is None:
                    _report_error(e, args.warnings)
                    failed = True
                else:
                    diagnostics += e.diagnostics
        if _report(diagnostics, args.warnings) or failed:
            status = EXIT_ERROR
        else:
            _out(f"{spec}: ok (cells: {', '.join(names) if names else 'none'})")
    return status


def _report_error(e: BaseException, warning_mode: str | None) -> None:
    if getattr(e, "loc", None) is None:
        _err(_format_user_error(e))
    else:
        _report(e.diagnostics, warning_mode)


def _report(diagnostics: list, warning_mode: str | None) -> bool:
    """Print diagnostics in file order and their count to stderr; True if any is an error (a warning is
    one with -W error, and is not printed with -W ignore)."""
    shown = []
    for d in sorted(dict.fromkeys(diagnostics), key=lambda d: d.sort_key()):
        if d.severity == "warning" and warning_mode == "ignore":
            continue
        if d.severity == "warning" and warning_mode == "error":
            d = replace(d, severity="error", message=f"{d.message} [-W error]")
        shown.append(d)
    for d in shown:
        _err(d.render())
    if shown:
        from rnnc.errors import summary
        _err(summary(shown))
    return any(d.severity == "error" for d in shown)


def cmd_analyze(args: argparse.Namespace) -> int:
    rnnc = _rnnc()
    prog = _load(args.spec)
    report = rnnc.analyze(prog, cell=args.cell)
    if args.json:
        _out(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        _out(str(report))
    return EXIT_OK


def cmd_graph(args: argparse.Namespace) -> int:
    rnnc = _rnnc()
    out = args.output
    fmt = None
    if out:
        suffix = Path(out).suffix.lower()
        if suffix in _DOT_FORMATS:
            fmt = _DOT_FORMATS[suffix]
        elif suffix not in (".dot", ".gv"):
            raise CliError(f"cannot tell the graph format from '{out}'",
                           "name the output .dot or .gv (Graphviz text) or .svg/.png/.pdf")
        if fmt == "svg" and shutil.which("dot") is None:
            fmt = "builtin-svg"  # rnnc's own layered layout; Graphviz lays out better when present
        elif fmt and shutil.which("dot") is None:
            raise CliError(f"writing {suffix} needs Graphviz's `dot` program, which is not on PATH",
                           "install graphviz (e.g. `apt-get install graphviz`), write .svg (rnnc draws "
                           "it itself), or write a .dot file and render it elsewhere")
    prog = _load(args.spec)
    if fmt == "builtin-svg":
        _write_text(out, rnnc.graph_svg(prog, cell=args.cell))
        _out(f"wrote {out}")
        return EXIT_OK
    dot = rnnc.graph_dot(prog, cell=args.cell)
    if not out:
        _out(dot)
        return EXIT_OK
    if fmt is None:
        _write_text(out, dot if dot.endswith("\n") else dot + "\n")
    else:
        try:
            proc = subprocess.run(["dot", f"-T{fmt}"], input=dot.encode("utf-8"),
                                  capture_output=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CliError(f"running Graphviz `dot` failed: {e}",
                           "write a .dot file instead and render it yourself") from None
        if proc.returncode != 0:
            msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise CliError(f"Graphviz `dot -T{fmt}` failed: {msg[0] if msg else proc.returncode}",
                           "write a .dot file instead")
        _write_bytes(out, proc.stdout)
    _out(f"wrote {out}")
    return EXIT_OK


def _spec_title(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                stripped = line.strip()
                if not stripped:
                    continue
                if stripped.startswith("#"):
                    return stripped.lstrip("#").strip()
                return ""
    except OSError:
        pass
    return ""


def cmd_list(args: argparse.Namespace) -> int:
    rnnc = _rnnc()
    from rnnc.resources import specs_dir
    names = list(rnnc.library())
    folder = specs_dir()
    width = max((len(n) for n in names), default=0)
    for name in names:
        title = _spec_title(folder / f"{name}.rnn")
        _out(f"{name:<{width}}  {title}".rstrip())
    return EXIT_OK


# -- bench ------------------------------------------------------------------------------

_DIM_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
            ast.Mult: lambda a, b: a * b, ast.FloorDiv: lambda a, b: a // b}


def eval_dim(text: str | int, env: dict[str, int], default: int | None = None) -> int:
    """Evaluate a dim expression like "4*H" or "K + 1" with `env` (never `eval`).

    Integers, dim names, + - * //, unary minus and parentheses are allowed. A name missing from
    `env` takes `default` (and is recorded in `env`) or is an error when default is None.
    """
    if isinstance(text, bool):
        raise CliError(f"bad dim expression {text!r}")
    if isinstance(text, int):
        return text
    text = str(text).strip()
    if len(text) > 200:
        raise CliError(f"dim expression too long: {text[:40]}...")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CliError(f"bad dim expression {text!r}") from None

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in env:
                if default is None:
                    raise CliError(f"dim {node.id} is not bound", f"give it with -D {node.id}=INT")
                env[node.id] = default
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _DIM_OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.FloorDiv) and right == 0:
                raise CliError(f"division by zero in dim expression {text!r}")
            return _DIM_OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = ev(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        raise CliError(f"bad dim expression {text!r}",
                       "dims are integers, names, + - * // and parentheses")

    return ev(tree)


def _dim_names(text: str | int) -> list[str]:
    if not isinstance(text, str):
        return []
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return []
    return [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]


def _shape_of(entry: Any) -> list:
    """A port entry of report.to_dict(): a list of dims, or a dict with a 'shape' list."""
    if isinstance(entry, dict):
        entry = entry.get("shape", [])
    if isinstance(entry, str):  # "[K, V]" or "K, V"
        inner = entry.strip().strip("[]").strip()
        return [s.strip() for s in inner.split(",") if s.strip()] if inner else []
    return list(entry or [])


def _ports(section: Any) -> dict[str, list]:
    """{name: shape} from a report section given as a dict or as a list of {name, shape}."""
    if isinstance(section, dict):
        return {str(k): _shape_of(v) for k, v in section.items()}
    ports: dict[str, list] = {}
    for item in section or []:
        if isinstance(item, dict) and "name" in item:
            ports[str(item["name"])] = _shape_of(item)
    return ports


def _report_dims(section: Any) -> dict[str, int | None]:
    """{dim: default or bound size or None} from the report's "dims" entry, whatever its form."""
    result: dict[str, int | None] = {}
    items: list[tuple[str, Any]] = []
    if isinstance(section, dict):
        items = [(str(k), v) for k, v in section.items()]
    elif isinstance(section, (list, tuple)):
        for item in section:
            if isinstance(item, str):
                items.append((item, None))
            elif isinstance(item, dict) and "name" in item:
                items.append((str(item["name"]), item))
    for name, value in items:
        if isinstance(value, dict):
            value = next((value[k] for k in ("value", "size", "default") if
                          isinstance(value.get(k), int) and not isinstance(value.get(k), bool)),
                         None)
        result[name] = value if isinstance(value, int) and not isinstance(value, bool) else None
    return result


def bench_dims(info: dict, given: dict[str, int], default: int = DEFAULT_DIM
               ) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Resolve every dim of a cell and the per-step shape of each input.

    `info` is `rnnc.analyze(...).to_dict()`. Dims come from -D, then the spec's defaults, then
    `default`. Returns (dims, {input name: concrete per-step shape}).
    """
    declared = _report_dims(info.get("dims"))
    unknown = [n for n in given if declared and n not in declared]
    if unknown:
        raise CliError(f"cell '{info.get('cell', '?')}' has no dim '{unknown[0]}'",
                       f"its dims are: {', '.join(declared)}")
    env = dict(given)
    for name, value in declared.items():
        if name not in env and value is not None:
            env[name] = value
    raw = info.get("dims")
    for name, text in (raw.items() if isinstance(raw, dict) else ()):
        if name not in env and isinstance(text, str):  # a default of other dims (`dim M = 2*N`)
            env[name] = eval_dim(text, env, default)
    names: list[str] = list(declared)
    for key in ("inputs", "outputs", "states", "params"):
        for shape in _ports(info.get(key)).values():
            for d in shape:
                for n in _dim_names(d):
                    if n not in names:
                        names.append(n)
    for n in names:
        env.setdefault(n, default)
    shapes = {}
    for name, shape in _ports(info.get("inputs")).items():
        sizes = [eval_dim(d, env, default) for d in shape]
        bad = [s for s in sizes if s < 0]
        if bad:
            raise CliError(f"input {name} would have a negative size {sizes}",
                           "check the -D values")
        shapes[name] = sizes
    return env, shapes


def _tensors(obj: Any):
    import torch
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _bench_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"unknown device {name!r}", "use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda given but no CUDA GPU is available")
    return device


def _bench_jobs(cell, xs: list, torch) -> dict[str, Callable[[], Any]]:
    """forward (no grad) and forward+backward of the sum of every differentiable output."""
    def forward():
        with torch.no_grad():
            return cell(*xs)

    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in xs]

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        cell.zero_grad(set_to_none=True)
        result = cell(*leaves)
        loss = sum(t.float().sum() for t in _tensors(result) if t.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
        return result

    return {"forward": forward, "forward_backward": forward_backward}


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    rnnc = _rnnc()
    import torch
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise CliError("--plot needs matplotlib, which is not installed",
                       "pip install matplotlib, or leave out --plot (--json/--csv keep the numbers)")
    given = _dims(args)
    prog = _load(args.spec)
    info = rnnc.analyze(prog, cell=args.cell).to_dict()
    dims, shapes = bench_dims(info, given)
    available = list(rnnc.backends_for(prog, cell=args.cell))
    unknown = [b for b in args.backend or [] if b not in available]
    if unknown:
        raise CliError(f"backend '{unknown[0]}' cannot run this cell",
                       f"the backends that can: {', '.join(available) or 'none'}")
    device = _bench_device(args.device)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def progress(line: str) -> None:
        _err(f"rnnc bench: {line}")
        sys.stderr.flush()

    rows: list[bench.Row] = []
    cells = {}
    for backend in args.backend or available:
        if backend == "triton" and device.type != "cuda":
            note = f"skipped: the triton backend needs a CUDA GPU (this run is on {device.type})"
            progress(f"triton {note}")
            rows += [bench.Row(backend, T, note=note) for T in args.length]
            continue
        try:
            progress(f"building {backend}")
            cells[backend] = rnnc.build(prog, cell=args.cell, backend=backend, device=device, **dims).to(device)
        except Exception as e:
            rows += [bench.Row(backend, T, note=_bench_failure(rnnc, e)) for T in args.length]

    cell_name = info.get("cell") or args.cell or args.spec
    dim_text = ", ".join(f"{k}={v}" for k, v in dims.items()) or "none"
    lengths = ", ".join(map(str, args.length))
    _out(f"bench {cell_name}: B={args.batch} T={lengths} dims: {dim_text}; {device.type} {args.dtype}; "
         f"median ±IQR/2 of >= {args.repeat} runs (>= {args.min_time:g} s) interleaved across backends")
    gen = torch.Generator().manual_seed(args.seed)
    for i, T in enumerate(args.length):
        xs = [(torch.randn(args.batch, T, *shape, generator=gen) * 0.5).to(device=device, dtype=dtype)
              for shape in shapes.values()]
        jobs, timed = {}, []
        for backend, cell in cells.items():
            try:  # one trial call each: a backend that fails is reported, the others still run
                for name, fn in _bench_jobs(cell, xs, torch).items():
                    fn()
                    jobs[(backend, name)] = fn
                timed.append(backend)
            except Exception as e:
                rows.append(bench.Row(backend, T, note=_bench_failure(rnnc, e)))
        progress(f"T={T} ({i + 1}/{len(args.length)}): timing {', '.join(timed) or 'nothing'}")
        stats = bench.measure({f"{b} {n}": fn for (b, n), fn in jobs.items()}, args.repeat, args.min_time,
                              warmup=1, sync=sync, progress=progress)
        rows += [bench.Row(b, T, stats[f"{b} forward"], stats[f"{b} forward_backward"]) for b in timed]
    order = {b: k for k, b in enumerate(args.backend or available)}
    rows.sort(key=lambda r: (r.T, order[r.backend]))
    _bench_table(rows, len(args.length) > 1)

    meta = {"cell": cell_name, "device": device.type, "dtype": args.dtype, "batch": args.batch, "dims": dims,
            "repeat": args.repeat, "min_time_s": args.min_time}
    for path, write in ((args.json, lambda p: bench.write_json(p, meta, rows)),
                        (args.csv, lambda p: bench.write_csv(p, rows)),
                        (args.plot, lambda p: bench.plot(p, f"rnnc bench {cell_name} ({device.type}, B={args.batch})",
                                                         rows))):
        if path:
            try:
                write(Path(path))
            except OSError as e:
                raise CliError(f"cannot write {path}: {e.strerror or e}", "check the path") from None
            progress(f"wrote {path}")
    if not available:
        _err("rnnc: error: no backend can run this cell")
        return EXIT_ERROR
    return EXIT_ERROR if any(r.note and not r.note.startswith("skipped") for r in rows) else EXIT_OK


def _bench_failure(rnnc, e: Exception) -> str:
    if os.environ.get("RNNC_DEBUG"):
        traceback.print_exc()
    if isinstance(e, rnnc.RnncError):
        return f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return f"internal error: {type(e).__name__}: {e}"


def _bench_table(rows: list, with_length: bool) -> None:
    """The timings side by side, with each backend's fwd+bwd speed against the first one timed at that T."""
    base: dict[int, float] = {}
    lines = [("backend", "T", "forward ms", "fwd+bwd ms", "speed")]
    for r in rows:
        if r.forward_backward is None:
            lines.append((r.backend, str(r.T), "-", "-", r.note))
            continue
        ref = base.setdefault(r.T, r.forward_backward.median_ms)
        lines.append((r.backend, str(r.T), r.forward.text(), r.forward_backward.text(),
                      f"{ref / r.forward_backward.median_ms:.2f}x"))
    keep = [0, 1, 2, 3, 4] if with_length else [0, 2, 3, 4]
    widths = {i: max(len(line[i]) for line in lines) for i in keep}
    for line in lines:
        cells = [f"{line[i]:<{widths[i]}}" if i == 0 else f"{line[i]:>{widths[i]}}" for i in keep[:-1]]
        _out(("  ".join(cells) + "  " + line[4]).rstrip())


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------

def _format_user_error(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, CliError):
        return text
    if getattr(e, "loc", None) is None and not text.startswith("rnnc:"):
        text = f"rnnc: {text}" if text.startswith("error:") else f"rnnc: error: {text}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rnnc command line; returns the exit code (never raises for user errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:  # --help, --version, usage errors
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)

    try:
        import rnnc
        user_errors: tuple[type[BaseException], ...] = (CliError, rnnc.RnncError)
    except ImportError as e:
        _err(f"rnnc: error: cannot import rnnc or one of its dependencies: {e}\n"
             "  hint: install it with `pip install -c ci/constraints.txt .`")
        return EXIT_ERROR
    except Exception:
        user_errors = (CliError,)

    try:
        return int(args.func(args) or 0)
    except user_errors as e:
        try:
            sys.stdout.flush()
        except Exception:
            pass
        _err(_format_user_error(e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("rnnc: interrupted")
        return 130
    except BrokenPipeError:
        # `rnnc compile lstm | head`: the reader went away; not an error.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except Exception:
            pass
        return EXIT_OK
    except Exception as e:
        if os.environ.get("RNNC_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        _err(f"rnnc: internal error: {type(e).__name__}: {e}\n"
             "  this is a bug in rnnc, not in your spec; please report it with the command "
             "and the .rnn file\n  (set RNNC_DEBUG=1 to see the traceback)")
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())

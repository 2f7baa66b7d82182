"""The recurrence of a generated forward as a top-level function registered as one custom op
(rnnc/runtime/opaque.py), so that torch.compile and torch.export treat it as one node whose output
shapes follow from its input shapes, for every sequence length, instead of tracing each step.

A lowering's fragment is emitted as usual, into a function body instead of the forward; its
parameters are the forward's local variables that body reads (found by Python's own scope analysis,
`symtable`), typed from what they are: ints (T, N, dims), dtypes, the device, tensors, or compile-time
scalars. It returns what the fragment leaves bound (render.Recurrence): the loop outputs, [T, N, ...],
then the final states, [N, ...]; a generated fake gives those shapes from T, N and the dims. The op's
name is `rnnc::<kind>_<hash of the region's source>`: unique per region, and never spec text.
"""
from __future__ import annotations

import hashlib
import symtable
import textwrap
from dataclasses import dataclass, field

from rnnc.ir import Cell

from .link import _global_reads
from .render import Lines, Renderer
from .torch_expr import shape_text

#: Forward locals a custom op cannot take (a fragment reading one stays inline: Newton's reads `self`).
UNSUPPORTED = frozenset({"self", "state", "args", "kwargs", "dims", "origin", "lead", "cu_seqlens"})
_TYPES = {"float": "float", "bool": "bool"}


@dataclass
class Region:
    """One recurrence as a function: its body (depth 1), the names it returns and their fake shapes."""

    kind: str                      # the lowering, names the functions and the op: "loop", "chunk", ...
    body: Lines
    results: list[str]             # the values the forward binds: loop outputs, then final states
    shapes: list[tuple[str, str]]  # (shape text, dtype text) of every returned value, for the fake
    returned: list[str] = field(default_factory=list)  # what the body returns (results, then saved values)
    backward: Lines | None = None  # the loop's generated backward (reads `saved` and `grads`), or None
    tracked: list[str] = field(default_factory=list)  # the arguments `backward` returns gradients for


def forward_locals(lines: list[str]) -> set[str]:
    """The names a (partial) generated method binds: its parameters and every assignment so far."""
    text = textwrap.dedent("\n".join(lines)) + "\n    pass\n"
    (fn,) = symtable.symtable(text, "<forward>", "exec").get_children()
    return {s.get_name() for s in fn.get_symbols() if s.is_assigned() or s.is_parameter()}


def _reads(body: Lines) -> tuple[set[str], set[str]]:
    """(the outer names a function body at depth 1 reads, its nested functions included; the names it
    assigns)."""
    text = "def _region():\n" + "\n".join(body.lines) + "\n    pass\n"
    (fn,) = symtable.symtable(text, "<region>", "exec").get_children()
    return _global_reads(fn), {s.get_name() for s in fn.get_symbols() if s.is_assigned()}


def _annotation(name: str, r: Renderer, cell: Cell) -> str:
    if name in ("T", "B", "N") or name.startswith("d_"):
        return "int"
    if name == "save":
        return "bool"
    if name in ("cdt", "odt"):
        return "torch.dtype"
    if name == "dev":
        return "torch.device"
    if name == "extra":
        return "list[int]"
    node = next((cell.graph[n] for n, v in r.names.items() if v == name), None)
    if node is not None and node.scalar:
        return _TYPES.get(node.dtype, "float")
    return "torch.Tensor"


def _order(name: str) -> tuple:
    first = ("save", "T", "B", "N", "extra", "cdt", "odt", "dev")
    return (first.index(name), "") if name in first else (len(first) + (not name.startswith("d_")), name)


def result_shape(lead: str, shape, dtype: str) -> tuple[str, str]:
    """A returned value's (shape, dtype) in the fake: `lead` axes ("T, N" or "N"), then the declared ones."""
    return f"({lead}, *{shape_text(shape)})", "torch.bool" if dtype == "bool" else "cdt"


def emit(top: Lines, L: Lines, region: Region, locals_: set[str], r: Renderer, cell: Cell, traced: bool = False) -> bool:
    """Write the region's functions and op at the top of the module (`top`) and its call into the
    forward (`L`); False (nothing written) when the body reads a local an op cannot take or rebinds
    one of the forward's names. `traced`: a region whose kernels are ops of their own (the Triton
    chunk launchers), which torch.compile traces and torch.export takes as one op (`_run_traced_region`)."""
    reads, assigned = _reads(region.body)
    if region.backward is not None:
        more, assigned_too = _reads(region.backward)
        reads, assigned = reads | (more - {"saved", "grads"}), assigned | assigned_too
    used = reads & locals_
    if used & UNSUPPORTED or assigned & locals_:  # a rebound forward local would be read unbound
        return False
    shape_names = {w for shape, _ in region.shapes for w in _words(shape)} | {"cdt", "dev"}
    params = sorted(used | (shape_names & locals_), key=_order)
    signature = ", ".join(f"{p}: {_annotation(p, r, cell)}" for p in params)
    fn = f"_recurrence_{region.kind}"
    text = Lines()
    text(f"def {fn}({signature}) -> list[torch.Tensor]:")
    text.indent()
    text(f'"""The {region.kind} recurrence of the forward, as one function of tensors and ints (the op below)."""')
    text.lines += region.body.lines
    _list(text, "return", region.returned or region.results)
    text.dedent()
    text()
    text()
    text(f"def {fn}_fake({signature}) -> list[torch.Tensor]:")
    text('    """Its outputs\' shapes and dtypes, from the arguments\' (T may be symbolic)."""')
    text.indent()
    _list(text, "return", [f"torch.empty({shape}, dtype={dtype}, device=dev)" for shape, dtype in region.shapes])
    text.dedent()
    text()
    text()
    if region.backward is not None:
        text(f"def {fn}_backward({signature}, saved: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:")
        text.lines += region.backward.lines
        text()
        text()
    digest = hashlib.sha256("\n".join(text.lines).encode()).hexdigest()[:16]
    op = f"_RECURRENCE_{region.kind.upper()}"
    extra = ""
    if region.backward is not None:
        extra = f", {fn}_backward, {tuple(params.index(t) for t in region.tracked)!r}"
    text(f"{op} = _recurrence_op({f'{region.kind}_{digest}'!r}, {fn}, {fn}_fake, {len(region.results)}{extra})")
    text()
    text()
    top.lines += text.lines
    args = ", ".join("list(extra)" if p == "extra" else p for p in params)
    lhs = f"{', '.join(region.results)}{',' if len(region.results) == 1 else ''}"
    if region.backward is not None:
        L(f"{lhs} = {op}({args})[:{len(region.results)}]")
    else:
        L(f"{lhs} = {'_run_traced_region' if traced else '_run_region'}({op}, {fn}, {args})")
    return True


def _list(L: Lines, head: str, items: list[str]) -> None:
    """`head [a, b]` on one line, or one item a line when that would be long."""
    line = f"{head} [{', '.join(items)}]"
    if len(line) + 4 * L.depth <= 110:
        L(line)
        return
    L(f"{head} [")
    for item in items:
        L(f"    {item},")
    L("]")


def _words(text: str) -> set[str]:
    import re

    return set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text))

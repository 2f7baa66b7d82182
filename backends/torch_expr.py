"""IR node → PyTorch expression text, shared by every backend that emits PyTorch.

Values are emitted with at most one leading batch axis: a *batched* value (one that depends on
inputs or states) is `[rows, *shape]`; a constant one (params, literals) is just `[*shape]` and
broadcasts from the right. The per-step semantics are numpy's, so where a batched operand has
fewer per-step axes than the result it is padded with `[:, None]` after its batch axis.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

from rnnc import dims as D
from rnnc import registry
from rnnc.ir import Graph, Node

# Python operator precedence, for parenthesising only where needed.
ATOM, POW, UNARY, MUL, ADD, CMP, NOT = 100, 90, 80, 70, 60, 50, 40

#: Python's precedence of the operators the registry renders infix (Prim.infix).
INFIX_PREC = {"+": ADD, "-": ADD, "*": MUL, "/": MUL, "<": CMP, "<=": CMP, ">": CMP, ">=": CMP, "==": CMP, "!=": CMP}


@dataclass
class Operand:
    text: str
    prec: int
    batched: bool
    rank: int
    scalar: bool  # a Python number, not a tensor
    # (x, W, deferred) when this is F.linear(x, W) of a batched x; `deferred` names the per-call
    # _DeferredWeight wrapping W when W is a param used inside the recurrence (else None)
    linear: tuple[str, str, str | None] | None = None

    def at(self, prec: int) -> str:
        return self.text if self.prec >= prec else f"({self.text})"


def pyint(d: D.Dim) -> str:
    """A dim expression as Python over the generated code's `d_<name>` locals."""
    return D.to_python(d, _DimNames())


class _DimNames(dict):
    def __missing__(self, key: str) -> str:
        return f"d_{key}"


def shape_text(shape: D.Shape) -> str:
    """A Python tuple of the sizes: `()`, `(d_H,)`, `(d_K, d_V)`."""
    parts = [pyint(d) for d in shape]
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"


class TorchExpr:
    """Renders one node given its operands. `rows` names the batch size where one is needed."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def render(self, nid: int, args: list[Operand], batched: bool) -> tuple[str, int]:
        """The node's expression and its precedence: elementwise ops from their registry
        templates, the structural ones from a method `_<op>`."""
        node = self.graph[nid]
        prim = registry.get(node)
        if registry.broadcasts(node):  # numpy semantics per step: pad batched operands to the result's rank
            args = [self.pad(x, len(node.shape)) for x in args]
        if prim.elementwise:
            if prim.infix:
                return self._operator(node, prim.infix, args)
            if node.scalar and prim.math:
                return fill(prim.math, [a.text for a in args], [a.at(ATOM) for a in args])
            if prim.torch:
                texts = [self.tensor(a) for a in args]
                return fill(prim.torch, texts, texts)
        method = getattr(self, "_" + node.op, None)
        assert method is not None, node.op
        return method(node, args, batched)

    # -- helpers --
    @staticmethod
    def tensor(a: Operand) -> str:
        return f"torch.as_tensor({a.text}, dtype=cdt, device=dev)" if a.scalar else a.text

    @staticmethod
    def pad(a: Operand, rank: int) -> Operand:
        """Pad a batched operand's per-step axes on the left to `rank`."""
        if not a.batched or a.rank >= rank:
            return a
        return Operand(f"{a.at(ATOM)}[:{', None' * (rank - a.rank)}]", ATOM, True, rank, False)

    def _axis(self, ax: int, batched: bool) -> int:
        return ax + (1 if batched else 0)

    # -- leaves --
    def _const(self, node: Node, args, batched):
        v = node.attrs["value"]
        if v == math.inf:
            return "math.inf", ATOM
        return repr(float(v)) if isinstance(v, float) else repr(int(v)), (ATOM if v >= 0 else UNARY)

    def _dim(self, node: Node, args, batched):
        return f"d_{node.attrs['name']}", ATOM

    def _literal(self, node: Node, args, batched):
        return f"torch.tensor({node.attrs['value']!r}, dtype=cdt, device=dev)", ATOM

    def _eye(self, node: Node, args, batched):
        return f"torch.eye({pyint(node.attrs['n'])}, dtype=cdt, device=dev)", ATOM

    def _full(self, node: Node, args, batched):
        return f"torch.full({shape_text(node.shape)}, {float(node.attrs['value'])!r}, dtype=cdt, device=dev)", ATOM

    def _arange(self, node: Node, args, batched):
        lo, hi = pyint(node.attrs["lo"]), pyint(node.attrs["hi"])
        return f"torch.arange({lo}, {hi}, dtype=cdt, device=dev)", ATOM

    # -- elementwise (the rest come from registry templates) --
    def _operator(self, node: Node, sym: str, args: list[Operand]) -> tuple[str, int]:
        """A Python operator: prefix when unary (`-x`), else infix with its precedence."""
        if len(args) == 1:
            return f"{sym}{args[0].at(UNARY)}", UNARY
        a, b = args
        fused = self._fuse_linear(node, a, b)
        if fused:
            return fused
        prec = INFIX_PREC[sym]
        if a.scalar and b.scalar and not node.scalar:  # e.g. a comparison of two numbers
            a = Operand(self.tensor(a), ATOM, False, 0, False)
        right = prec if sym in ("+", "*") else prec + 1  # a - (b - c), a / (b * c), no chained comparisons
        return f"{a.at(prec)} {sym} {b.at(right)}", prec

    @staticmethod
    def _fuse_linear(node: Node, a: Operand, b: Operand) -> tuple[str, int] | None:
        """`F.linear(x, W) + c` as one op: addmm for a batched c, F.linear's bias for a constant one."""
        if node.op != "add" or len(node.shape) != 1:
            return None
        for lin, other in ((a, b), (b, a)):
            if lin.linear is None or other.scalar or other.rank != 1:
                continue
            x, w, deferred = lin.linear
            if deferred:
                return f"{deferred}({x}, {other.text})", ATOM
            if other.batched:
                return f"torch.addmm({other.text}, {x}, {w}.t())", ATOM
            return f"F.linear({x}, {w}, {other.text})", ATOM
        return None

    def _floordiv(self, node: Node, args, batched):
        """floor(a / b): same values as `//`, but differentiable (zero gradient) where torch's `//` is not."""
        a, b = args
        if node.scalar:
            return f"{a.at(MUL)} // {b.at(MUL + 1)}", MUL
        return f"torch.floor({self.tensor(a) if a.scalar else a.at(MUL)} / {b.at(MUL + 1)})", ATOM

    def _mod(self, node: Node, args, batched):
        """Python's (floored) modulo as a - floor(a / b) * b: differentiable where torch's `%` is not."""
        a, b = args
        if node.scalar:
            return f"{a.at(MUL)} % {b.at(MUL + 1)}", MUL
        a_t = self.tensor(a) if a.scalar else a.at(ADD)
        return f"{a_t} - torch.floor({a.at(MUL)} / {b.at(MUL + 1)}) * {b.at(MUL + 1)}", ADD

    def _pow(self, node: Node, args, batched):
        a, b = args
        return f"{a.at(POW + 1)} ** {b.at(UNARY)}", POW

    def _minimum(self, node: Node, args, batched):
        return self._minmax(node, args, "min")

    def _maximum(self, node: Node, args, batched):
        return self._minmax(node, args, "max")

    def _minmax(self, node: Node, args, which: str):
        a, b = args
        if node.scalar:
            return f"{which}({a.text}, {b.text})", ATOM
        bound = "max" if which == "min" else "min"  # minimum(x, s) clamps x from above at s
        if b.scalar:
            return f"torch.clamp({a.text}, {bound}={b.text})", ATOM
        if a.scalar:
            return f"torch.clamp({b.text}, {bound}={a.text})", ATOM
        return f"torch.{which}imum({a.text}, {b.text})", ATOM

    def _where(self, node: Node, args, batched):
        c, a, b = args
        if a.scalar and b.scalar:
            a = Operand(self.tensor(a), ATOM, False, 0, False)
        return f"torch.where({c.text}, {a.text}, {b.text})", ATOM

    def _broadcast(self, node: Node, args, batched):
        (a,) = args
        shape = shape_text(node.shape)
        if a.scalar:
            if batched:  # pragma: no cover - a scalar is never batched
                raise AssertionError
            return f"torch.full({shape}, {a.text}, dtype=cdt, device=dev)", ATOM
        if not a.batched:
            return f"{a.at(ATOM)}.expand{shape}", ATOM
        a = self.pad(a, len(node.shape))
        return f"{a.at(ATOM)}.expand(-1, {', '.join(pyint(d) for d in node.shape)})", ATOM

    # -- linear algebra --
    def _matmul(self, node: Node, args, batched):
        a, b = args
        ta, tb = self.tensor(a), self.tensor(b)
        if a.rank == 1 and b.rank == 1:
            if not a.batched and not b.batched:
                return f"{a.at(MUL + 1)} @ {b.at(MUL + 1)}", MUL
            return f"({a.at(MUL)} * {b.at(MUL + 1)}).sum(-1)", ATOM
        if a.rank == 2 and b.rank == 1:
            if not a.batched:
                return f"F.linear({tb}, {ta})", ATOM
            if b.batched:
                return f"({a.at(MUL)} @ {b.at(ATOM)}.unsqueeze(-1)).squeeze(-1)", ATOM
            return f"{a.at(MUL)} @ {b.at(MUL + 1)}", MUL
        if a.rank == 1 and b.rank == 2 and a.batched and b.batched:
            return f"({a.at(ATOM)}.unsqueeze(-2) @ {b.at(MUL + 1)}).squeeze(-2)", ATOM
        return f"{a.at(MUL)} @ {b.at(MUL + 1)}", MUL

    def _outer(self, node: Node, args, batched):
        a, b = args
        return f"{a.at(ATOM)}.unsqueeze(-1) * {b.at(ATOM)}.unsqueeze(-2)", MUL

    def _transpose(self, node: Node, args, batched):
        return f"{args[0].at(ATOM)}.transpose(-1, -2)", ATOM

    # -- reductions and normalisations --
    def _reduce(self, node: Node, args, batched):
        (a,) = args
        ax = node.attrs["axis"]
        if a.rank == 0:
            return a.text, a.prec
        off = 1 if a.batched else 0
        dims = (self._axis(ax, a.batched),) if ax is not None else tuple(range(off, off + a.rank))
        dim = str(dims[0]) if len(dims) == 1 else repr(dims)
        template = registry.get(node).torch
        if template:
            dim_kw = "" if not a.batched and ax is None else "dim=" + dim
            return template.format(x=a.at(ATOM), text=a.text, dim=dim_kw, axes=dim), ATOM
        # prod: one axis at a time
        if len(dims) == 1:
            return f"{a.at(ATOM)}.prod(dim={dim})", ATOM
        return (f"{a.at(ATOM)}.flatten({off}).prod(dim=-1)" if a.batched else f"{a.at(ATOM)}.prod()"), ATOM

    def _softmax(self, node: Node, args, batched):
        (a,) = args
        return f"torch.softmax({a.text}, dim={self._axis(node.attrs['axis'], a.batched)})", ATOM

    def _normalize(self, node: Node, args, batched):
        (a,) = args
        return f"F.normalize({a.text}, dim={self._axis(node.attrs['axis'], a.batched)})", ATOM

    # -- shape ops --
    def _concat(self, node: Node, args, batched):
        rows = next((a for a in args if a.batched), None)
        parts = []
        for a in args:
            if rows is not None and not a.batched:
                parts.append(f"{a.at(ATOM)}.expand({rows.at(ATOM)}.shape[0], *{a.at(ATOM)}.shape)")
            else:
                parts.append(a.text)
        ax = self._axis(node.attrs["axis"], batched)
        return f"torch.cat([{', '.join(parts)}], dim={ax})", ATOM

    def _split(self, node: Node, args, batched):
        (a,) = args
        sizes = ", ".join(pyint(s) for s in node.attrs["sizes"])
        return f"torch.split({a.text}, [{sizes}], dim={self._axis(node.attrs['axis'], a.batched)})", ATOM

    def _index(self, node: Node, args, batched):
        (a,) = args
        return f"{a.at(ATOM)}[{', '.join(index_parts(node.attrs['items'], a.batched))}]", ATOM

    def _pad(self, node: Node, args, batched):
        """Zeros around x: F.pad takes (before, after) pairs from the last axis back, so the
        batch axis in front is left alone."""
        (a,) = args
        widths = list(node.attrs["widths"])
        while widths and widths[0] == (0, 0):
            widths.pop(0)
        flat = [pyint(d) for lo, hi in reversed(widths) for d in (lo, hi)]
        return f"F.pad({a.text}, ({', '.join(flat)}))", ATOM


def index_parts(items: tuple, batched: bool, as_objects: bool = False) -> list[str]:
    """An IR index as subscript text (`:, 0:d_H, None`), or, with as_objects, as the
    `slice(...)` objects of an index tuple without its `None`s (what the backward assigns into)."""
    parts = (["slice(None)"] if as_objects else [":"]) if batched else []
    for item in items:
        kind = item[0]
        if kind == "int":
            parts.append(pyint(item[1]))
        elif kind == "slice":
            lo, hi = pyint(item[1]), pyint(item[2])
            parts.append(f"slice({lo}, {hi})" if as_objects else f"{lo}:{hi}")
        elif kind == "ellipsis":
            parts.append("Ellipsis" if as_objects else "...")
        elif not as_objects:
            parts.append("None")
    return parts


def fill(template: str, call_args: list[str], operator_args: list[str]) -> tuple[str, int]:
    """A registry template filled in, and its precedence. A single call (`torch.exp({0})`)
    delimits its arguments, so they go in bare (`call_args`) and it binds tightest; any other
    form (`{0} ** 2`) takes operands that bind tightest (`operator_args`) and is parenthesised
    wherever it is used."""
    if _is_call(template):
        return template.format(*call_args), ATOM
    return template.format(*operator_args), NOT


def _is_call(template: str) -> bool:
    """`name(...)` whose first parenthesis closes at the very end."""
    head, paren, _ = template.partition("(")
    if not paren or not head.replace(".", "").replace("_", "").isalnum():
        return False
    depth = 0
    for i, ch in enumerate(template[len(head):]):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i == len(template) - len(head) - 1
    return False

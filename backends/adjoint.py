"""Reverse-mode derivatives of IR ops, emitted as PyTorch text (the generated backward of a loop).

For one op y = f(x0, x1, ...), `AdjointRules.rule(node, g, vals, y)` returns the contributions
to the adjoints of its operands as (operand index, expression, kind): kind "bcast" means the
expression has the op's broadcast shape and must be summed back to the operand's shape; "exact"
means it already has the operand's shape. The elementwise rules are the registry's templates
(rnnc/registry.py: Prim.vjp, with Prim.needs saying which forward values they read, so the
forward saves exactly those); the structural ones are methods here.
"""
from __future__ import annotations

from rnnc import registry
from rnnc.ir import Graph, Node

from .torch_expr import index_parts, pyint

#: Ops whose adjoint backends/bptt.py emits itself (see the note at the end of AdjointRules).
EMITTED = frozenset({"matmul", "split", "item"})


class AdjointRules:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def rule(self, nid: int, g: str, vals: list[str], y: str, batched: list[bool]) -> list[tuple[int, str, str]]:
        node = self.graph[nid]
        prim = registry.get(node)
        if prim.grad == "none":
            return []
        if prim.elementwise:  # a broadcast result sums back to a broadcast operand
            kind = "exact" if len(node.args) == 1 else "bcast"
            return [(i, t.format(*vals, g=g, y=y), kind) for i, t in enumerate(prim.vjp) if t is not None]
        return getattr(self, "_" + node.op)(node, g, vals, y, batched)

    # -- linear algebra --
    def _outer(self, n, g, v, y, b):
        return [(0, f"({g} @ {v[1]}.unsqueeze(-1)).squeeze(-1)", "exact"),
                (1, f"({v[0]}.unsqueeze(-2) @ {g}).squeeze(-2)", "exact")]

    def _transpose(self, n, g, v, y, b):
        return [(0, f"{g}.transpose(-1, -2)", "exact")]

    # -- reductions --
    def _reduce(self, n, g, v, y, b):
        x = v[0]
        ax = n.attrs["axis"]
        rank = len(self.graph[n.args[0]].shape)
        if rank == 0:
            return [(0, g, "exact")]
        off = 1 if b[0] else 0
        if ax is None:
            dims = tuple(range(off, off + rank))
            ge = f"{g}.reshape({g}.shape + (1,) * {rank})"
            ye = f"{y}.reshape({y}.shape + (1,) * {rank})"
            count = f"math.prod({x}.shape[{off}:])"
        else:
            dims = (ax + off,)
            ge, ye = f"{g}.unsqueeze({ax + off})", f"{y}.unsqueeze({ax + off})"
            count = f"{x}.shape[{ax + off}]"
        template = registry.get(n).vjp[0]
        return [(0, template.format(x, ge=ge, ye=ye, count=count, dims=repr(dims)), "exact")]

    def _softmax(self, n, g, v, y, b):
        d = n.attrs["axis"] + (1 if b[0] else 0)
        return [(0, f"{y} * ({g} - ({g} * {y}).sum({d}, keepdim=True))", "exact")]

    def _normalize(self, n, g, v, y, b):
        d = n.attrs["axis"] + (1 if b[0] else 0)
        return [(0, f"_normalize_grad({g}, {v[0]}, {d})", "exact")]

    # -- shape ops --
    def _concat(self, n, g, v, y, b):
        d = n.attrs["axis"] + 1  # the result of a loop op is batched
        out, start = [], 0
        for i, a in enumerate(n.args):
            size = pyint(self.graph[a].shape[n.attrs["axis"]])
            out.append((i, f"{g}.narrow({d}, {start}, {size})", "bcast"))
            start = f"{start} + {size}" if start else size
        return out

    def _index(self, n, g, v, y, b):
        return [(0, f"_index_grad({g}, {v[0]}, {self.index_tuple(n, b[0])}, {self.newaxes(n)!r})", "exact")]

    def _broadcast(self, n, g, v, y, b):
        return [(0, g, "bcast")]

    def _pad(self, n, g, v, y, b):  # only in derivative graphs; the slice it padded
        items = ", ".join(f"{pyint(lo)}:{pyint(lo + d)}" for (lo, _), d in zip(n.attrs["widths"],
                                                                              self.graph[n.args[0]].shape))
        return [(0, f"{g}[{':, ' if b[0] else ''}{items}]", "exact")]

    # `matmul`, `split` and `item` (EMITTED) are handled by the emitter (bptt.py): a recurrent
    # weight's gradient is deferred to one matmul after the loop, and a split's adjoint is the
    # concatenation of its items' adjoints. The registry marks them differentiable.

    @staticmethod
    def index_tuple(n: Node, batched: bool) -> str:
        """The index without its `None`s, as a Python tuple expression."""
        return "(" + ", ".join(index_parts(n.attrs["items"], batched, as_objects=True)) + ",)"

    def newaxes(self, n: Node) -> tuple[int, ...]:
        """Positions (in the result) of the axes `None` inserted, counted from the end."""
        out_rank = len(n.shape)
        pos, k, src_rank = [], 0, len(self.graph[n.args[0]].shape)
        consumed = sum(1 for it in n.attrs["items"] if it[0] in ("int", "slice"))
        for item in n.attrs["items"]:
            kind = item[0]
            if kind == "new":
                pos.append(k - out_rank)
                k += 1
            elif kind == "slice":
                k += 1
            elif kind == "ellipsis":
                k += src_rank - consumed
        return tuple(pos)

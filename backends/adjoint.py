"""Reverse-mode derivatives of IR ops, emitted as PyTorch text (the generated backward of a loop).

For one op y = f(x0, x1, ...), `AdjointRules.rule(node, g, vals, y)` returns the contributions
to the adjoints of its operands as (operand index, expression, kind): kind "bcast" means the
expression has the op's broadcast shape and must be summed back to the operand's shape; "exact"
means it already has the operand's shape. `NEEDS[op]` says which forward values a rule reads
("args", "y"), so the forward saves exactly those.
"""
from __future__ import annotations

from rnnc.ir import Graph, Node

from .torch_expr import index_parts, pyint

# Which forward values each rule needs. Ops missing here have no derivative rule (the loop then
# falls back to autograd); ops in NO_GRAD pass no gradient at all.
NEEDS: dict[str, tuple[str, ...]] = {
    "add": (), "sub": (), "neg": (), "mul": ("args",), "div": ("args", "y"), "pow": ("args", "y"),
    "mod": ("args",), "floordiv": (), "minimum": ("args",), "maximum": ("args",), "where": ("args",),
    "sigmoid": ("y",), "tanh": ("y",), "exp": ("y",), "expm1": ("y",), "sqrt": ("y",), "rsqrt": ("y",),
    "relu": ("y",), "log": ("args",), "log1p": ("args",), "sin": ("args",), "cos": ("args",),
    "abs": ("args",), "sign": (), "softplus": ("args",), "silu": ("args",), "logsigmoid": ("args",),
    "gelu": ("args",), "elu": ("args", "y"), "square": ("args",),
    "matmul": ("args",), "outer": ("args",), "transpose": (), "reduce": ("args", "y"),
    "softmax": ("y",), "normalize": ("args",), "concat": (), "split": (), "item": (), "index": ("args",),
    "broadcast": ("args",),
}
NO_GRAD = frozenset({"lt", "le", "gt", "ge", "eq", "ne", "and", "or", "not", "floordiv", "sign"})
UNARY_D = {  # d/dx as an expression of g, x, y
    "sigmoid": "torch.ops.aten.sigmoid_backward({g}, {y})",
    "tanh": "torch.ops.aten.tanh_backward({g}, {y})",
    "exp": "{g} * {y}",
    "expm1": "{g} * ({y} + 1)",
    "sqrt": "{g} / (2 * {y})",
    "rsqrt": "-0.5 * {g} * {y} ** 3",
    "relu": "torch.ops.aten.threshold_backward({g}, {y}, 0)",
    "log": "{g} / {x}",
    "log1p": "{g} / (1 + {x})",
    "sin": "{g} * torch.cos({x})",
    "cos": "-{g} * torch.sin({x})",
    "abs": "{g} * torch.sign({x})",
    "softplus": "{g} * torch.sigmoid({x})",
    "silu": "torch.ops.aten.silu_backward({g}, {x})",
    "logsigmoid": "{g} * torch.sigmoid(-{x})",
    "gelu": "torch.ops.aten.gelu_backward({g}, {x})",
    "elu": "torch.where({x} > 0, {g}, {g} * ({y} + 1))",
    "square": "2 * {g} * {x}",
}


def has_rule(node: Node) -> bool:
    if node.op == "reduce" and node.attrs["fn"] == "prod":
        return False  # its gradient at zeros needs care: leave it to autograd
    return node.op in NEEDS or node.op in NO_GRAD


class AdjointRules:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def rule(self, nid: int, g: str, vals: list[str], y: str, batched: list[bool]) -> list[tuple[int, str, str]]:
        node = self.graph[nid]
        op = node.op
        if op in NO_GRAD:
            return []
        if op in UNARY_D:
            return [(0, UNARY_D[op].format(g=g, x=vals[0], y=y), "exact")]
        return getattr(self, "_" + op)(node, g, vals, y, batched)

    # -- arithmetic --
    def _add(self, n, g, v, y, b):
        return [(0, g, "bcast"), (1, g, "bcast")]

    def _sub(self, n, g, v, y, b):
        return [(0, g, "bcast"), (1, f"-{g}", "bcast")]

    def _neg(self, n, g, v, y, b):
        return [(0, f"-{g}", "exact")]

    def _mul(self, n, g, v, y, b):
        return [(0, f"{g} * {v[1]}", "bcast"), (1, f"{g} * {v[0]}", "bcast")]

    def _div(self, n, g, v, y, b):
        return [(0, f"{g} / {v[1]}", "bcast"), (1, f"-{g} * {y} / {v[1]}", "bcast")]

    def _pow(self, n, g, v, y, b):
        a, e = v
        return [(0, f"{g} * {e} * {a} ** ({e} - 1)", "bcast"),
                (1, f"torch.where(({a} == 0) & ({e} >= 0), 0.0, "
                    f"{g} * {y} * torch.log(torch.as_tensor({a}, dtype={y}.dtype, device={y}.device)))", "bcast")]

    def _mod(self, n, g, v, y, b):
        return [(0, g, "bcast"), (1, f"-{g} * torch.floor({v[0]} / {v[1]})", "bcast")]

    def _minimum(self, n, g, v, y, b):
        return self._minmax(g, v, "<")

    def _maximum(self, n, g, v, y, b):
        return self._minmax(g, v, ">")

    @staticmethod
    def _minmax(g, v, better):
        a, c = v  # ties share the gradient equally, as torch.minimum/maximum do
        return [(0, f"torch.where({a} {better} {c}, {g}, torch.where({a} == {c}, {g} / 2, 0.0))", "bcast"),
                (1, f"torch.where({c} {better} {a}, {g}, torch.where({a} == {c}, {g} / 2, 0.0))", "bcast")]

    def _where(self, n, g, v, y, b):
        return [(1, f"torch.where({v[0]}, {g}, 0.0)", "bcast"), (2, f"torch.where({v[0]}, 0.0, {g})", "bcast")]

    # -- linear algebra --
    def _outer(self, n, g, v, y, b):
        return [(0, f"({g} @ {v[1]}.unsqueeze(-1)).squeeze(-1)", "exact"),
                (1, f"({v[0]}.unsqueeze(-2) @ {g}).squeeze(-2)", "exact")]

    def _transpose(self, n, g, v, y, b):
        return [(0, f"{g}.transpose(-1, -2)", "exact")]

    # -- reductions --
    def _reduce(self, n, g, v, y, b):
        x = v[0]
        fn, ax = n.attrs["fn"], n.attrs["axis"]
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
        if fn == "sum":
            return [(0, f"{ge}.expand_as({x})", "exact")]
        if fn == "mean":
            return [(0, f"{ge}.expand_as({x}) / {count}", "exact")]
        if fn == "logsumexp":
            return [(0, f"{ge} * torch.exp({x} - {ye})", "exact")]
        # max / min: the gradient is shared equally by the extreme entries
        mask = f"({x} == {ye})"
        return [(0, f"{ge} * {mask} / {mask}.sum(dim={dims!r}, keepdim=True)", "exact")]

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

    # `matmul`, `split` and `item` are handled by the emitter (bptt.py): a recurrent weight's
    # gradient is deferred to one matmul after the loop, and a split's adjoint is the
    # concatenation of its items' adjoints. They are in NEEDS so they count as differentiable.

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

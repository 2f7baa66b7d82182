"""Derivative rules that build IR: the registry's `vjp_ir` and `jvp_ir` (rnnc/registry.py).

A rule gets a Builder (rnnc/irbuild.py), the op's node, its operand ids `xs`, its result id `y`
and the incoming (co)tangent, and returns IR node ids:

  vjp(b, node, xs, y, g)  -> one cotangent contribution per operand, each of that operand's
                             shape (None: no gradient flows to it);
  jvp(b, node, xs, y, ts) -> the tangent of the result, of its shape, from the operands'
                             tangents `ts` (None: zero), or None when it is zero.

The elementwise ops give, per operand, one function `scale(b, v, *xs, y) = v · ∂y/∂x_i`: their
Jacobian is diagonal, so the same product is both the tangent term and the cotangent contribution
(then summed back to the operand's shape: broadcasting is transposed explicitly, by `reduce` sums
and an index restoring size-1 axes). The structural ops (matmul, reductions, index, concat,
split, ...) have a pair of functions here. Everything is written with the IR's own ops, so the
derivative of a derivative is available too, and any back end that renders the IR renders it.

Two conventions follow torch, so gradients match it exactly: ties of maximum/minimum (and of a
max/min reduction) share the gradient equally, and relu passes none at 0.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from . import dims as D
from .ir import Node

if TYPE_CHECKING:
    from .irbuild import Builder

Scale = Callable[..., "int | None"]  # scale(b, v, *xs, y) -> v * dy/dx_i
VjpRule = Callable[["Builder", Node, tuple, int, Any], tuple]
JvpRule = Callable[["Builder", Node, tuple, int, tuple], "int | None"]


def elementwise(*scales: Scale | None) -> tuple[VjpRule, JvpRule]:
    """The vjp and jvp of an elementwise op from its per-operand `scale` functions."""

    def vjp(b: Builder, node: Node, xs: tuple, y: int, g: int) -> tuple:
        return tuple(None if f is None else b.unbroadcast(f(b, g, *xs, y), b.shape(x)) for f, x in zip(scales, xs))

    def jvp(b: Builder, node: Node, xs: tuple, y: int, ts: tuple) -> int | None:
        out = b.sum_all([f(b, t, *xs, y) for f, t in zip(scales, ts) if f is not None and t is not None])
        return None if out is None else b.broadcast(out, node.shape)

    return vjp, jvp


def linear(fn: Callable[..., int], transpose: Callable[..., tuple]) -> tuple[VjpRule, JvpRule]:
    """Rules of an op linear in its only operand: the jvp applies the op to the tangent
    (`fn(b, node, t)`), the vjp is its transpose (`transpose(b, node, xs, g)`)."""

    def vjp(b: Builder, node: Node, xs: tuple, y: int, g: Any) -> tuple:
        return transpose(b, node, xs, g)

    def jvp(b: Builder, node: Node, xs: tuple, y: int, ts: tuple) -> int | None:
        return None if ts[0] is None else fn(b, node, ts[0])

    return vjp, jvp


# ---- elementwise ----------------------------------------------------------------------------

def _tie(b: Builder, v: int, wins: int, tie: int) -> int:
    """v where this operand wins, v/2 on a tie (torch's convention), else 0."""
    return b.where(wins, v, b.where(tie, b.mul(v, 0.5), 0.0))


def min_max(cmp: str) -> tuple[VjpRule, JvpRule]:
    """minimum (cmp "lt") or maximum (cmp "gt")."""
    return elementwise(
        lambda b, v, x0, x1, y: _tie(b, v, b.apply(cmp, x0, x1), b.apply("eq", x0, x1)),
        lambda b, v, x0, x1, y: _tie(b, v, b.apply(cmp, x1, x0), b.apply("eq", x0, x1)))


def _where_vjp(b: Builder, node: Node, xs: tuple, y: int, g: int) -> tuple:
    c, x1, x2 = xs
    return (None, b.unbroadcast(b.where(c, g, 0.0), b.shape(x1)), b.unbroadcast(b.where(c, 0.0, g), b.shape(x2)))


def _where_jvp(b: Builder, node: Node, xs: tuple, y: int, ts: tuple) -> int | None:
    if ts[1] is None and ts[2] is None:
        return None
    zero = lambda t: 0.0 if t is None else t  # noqa: E731
    return b.broadcast(b.where(xs[0], zero(ts[1]), zero(ts[2])), node.shape)


WHERE = (_where_vjp, _where_jvp)
BROADCAST = linear(lambda b, n, t: b.broadcast(t, n.shape), lambda b, n, xs, g: (b.unbroadcast(g, b.shape(xs[0])),))

# ---- linear algebra ------------------------------------------------------------------------


def _matmul_vjp(b: Builder, node: Node, xs: tuple, y: int, g: int) -> tuple:
    x0, x1 = xs
    r0, r1 = b.rank(x0), b.rank(x1)
    if r0 == 1 and r1 == 1:  # a dot product: g is a scalar
        return b.mul(g, x1), b.mul(g, x0)
    if r0 == 2 and r1 == 1:  # A @ v: g is a vector
        return b.outer(g, x1), b.matmul(g, x0)
    if r0 == 1:  # v @ A
        return b.matmul(x1, g), b.outer(x0, g)
    return b.matmul(g, b.transpose(x1)), b.matmul(b.transpose(x0), g)


def _matmul_jvp(b: Builder, node: Node, xs: tuple, y: int, ts: tuple) -> int | None:
    return b.sum_all([None if ts[0] is None else b.matmul(ts[0], xs[1]),
                      None if ts[1] is None else b.matmul(xs[0], ts[1])])


def _outer_jvp(b: Builder, node: Node, xs: tuple, y: int, ts: tuple) -> int | None:
    return b.sum_all([None if ts[0] is None else b.outer(ts[0], xs[1]),
                      None if ts[1] is None else b.outer(xs[0], ts[1])])


MATMUL = (_matmul_vjp, _matmul_jvp)
OUTER = (lambda b, n, xs, y, g: (b.matmul(g, xs[1]), b.matmul(xs[0], g)), _outer_jvp)
TRANSPOSE = linear(lambda b, n, t: b.transpose(t), lambda b, n, xs, g: (b.transpose(g),))

# ---- reductions ------------------------------------------------------------------------------
# `kept(b, n, v)` is a reduction's result (or its cotangent) with the reduced axis back as size 1.


def _kept(b: Builder, n: Node, v: int) -> int:
    return b.keep_axis(v, n.attrs["axis"], len(b.shape(n.args[0])))


def _count(b: Builder, n: Node) -> int:
    shape, ax = b.shape(n.args[0]), n.attrs["axis"]
    return b.size(_prod(shape) if ax is None else shape[ax])


def _prod(shape: D.Shape) -> D.Dim:
    out = D.const(1)
    for d in shape:
        out = out * d
    return out


def _reduce_with(weight: Callable[[Builder, Node, int], int]) -> tuple[VjpRule, JvpRule]:
    """A reduction whose derivative is `weight(b, node, y)`·g per entry (shaped like the operand):
    the vjp spreads the kept cotangent with that weight, the jvp sums the weighted tangent."""

    def vjp(b: Builder, n: Node, xs: tuple, y: int, g: int) -> tuple:
        return (b.broadcast(b.mul(_kept(b, n, g), weight(b, n, y)), b.shape(xs[0])),)

    def jvp(b: Builder, n: Node, xs: tuple, y: int, ts: tuple) -> int | None:
        return None if ts[0] is None else b.reduce("sum", b.mul(ts[0], weight(b, n, y)), n.attrs["axis"])

    return vjp, jvp


def _arg_extreme(b: Builder, n: Node, y: int) -> int:
    """1/count where the entry attains the max (min), else 0: ties share the gradient."""
    hit = b.apply("eq", n.args[0], _kept(b, n, y))
    count = b.reduce("sum", b.where(hit, 1.0, 0.0), n.attrs["axis"])
    return b.where(hit, b.div(1.0, _kept(b, n, count)), 0.0)


def _others_product(b: Builder, n: Node, y: int) -> int:
    """∂prod/∂x_i = the product of the other entries, exact with zeros among them: y / x_i where
    x_i ≠ 0; where x_i is the only zero, the product of the nonzero entries; else 0."""
    x, ax = n.args[0], n.attrs["axis"]
    zero = b.apply("eq", x, 0.0)
    nonzero = b.where(zero, 1.0, x)
    zeros = b.reduce("sum", b.where(zero, 1.0, 0.0), ax)
    rest = b.where(b.apply("eq", zeros, 1.0), b.reduce("prod", nonzero, ax), 0.0)
    return b.where(zero, _kept(b, n, rest), b.div(_kept(b, n, y), nonzero))


def _sum_rule() -> tuple[VjpRule, JvpRule]:
    return linear(lambda b, n, t: b.reduce("sum", t, n.attrs["axis"]),
                  lambda b, n, xs, g: (b.broadcast(_kept(b, n, g), b.shape(xs[0])),))


def _mean_rule() -> tuple[VjpRule, JvpRule]:
    return linear(lambda b, n, t: b.reduce("mean", t, n.attrs["axis"]),
                  lambda b, n, xs, g: (b.broadcast(b.div(_kept(b, n, g), _count(b, n)), b.shape(xs[0])),))


REDUCE = {
    "sum": _sum_rule(),
    "mean": _mean_rule(),
    "max": _reduce_with(_arg_extreme),
    "min": _reduce_with(_arg_extreme),
    "logsumexp": _reduce_with(lambda b, n, y: b.apply("exp", b.sub(n.args[0], _kept(b, n, y)))),
    "prod": _reduce_with(_others_product),
}

# ---- normalisations along an axis ------------------------------------------------------------


def _along(b: Builder, n: Node, v: int) -> int:
    """sum(v, axis) with the axis kept, for softmax and normalize."""
    return b.keep_axis(b.reduce("sum", v, n.attrs["axis"]), n.attrs["axis"], len(n.shape))


def _softmax(b: Builder, n: Node, xs: tuple, y: int, v: int) -> int:
    """y ⊙ (v − Σ v⊙y): the softmax Jacobian is symmetric, so this is its vjp and its jvp."""
    return b.mul(y, b.sub(v, _along(b, n, b.mul(v, y))))


_EPS = 1e-12  # F.normalize's default


def _normalize(b: Builder, n: Node, xs: tuple, y: int, v: int) -> int:
    """v/‖x‖ − x (x·v)/‖x‖³ with F.normalize's floor ‖x‖ ≥ eps (below it x/eps is linear);
    symmetric like softmax's."""
    x = xs[0]
    norm = _along(b, n, b.mul(x, x))
    norm = b.apply("sqrt", norm)
    floor = b.apply("maximum", norm, _EPS)
    curved = b.div(b.mul(x, _along(b, n, b.mul(x, v))), b.apply("pow", floor, 3.0))
    return b.sub(b.div(v, floor), b.where(b.apply("gt", norm, _EPS), curved, 0.0))


def symmetric(f: Callable[..., int]) -> tuple[VjpRule, JvpRule]:
    """Rules of a one-operand op whose Jacobian is symmetric, from its product with a vector."""
    return (lambda b, n, xs, y, g: (f(b, n, xs, y, g),),
            lambda b, n, xs, y, ts: None if ts[0] is None else f(b, n, xs, y, ts[0]))


SOFTMAX = symmetric(_softmax)
NORMALIZE = symmetric(_normalize)

# ---- shape ops -------------------------------------------------------------------------------


def _index_transpose(b: Builder, n: Node, xs: tuple, g: int) -> tuple:
    """g placed back where x[items] read it, zeros elsewhere: axes the index added are dropped,
    axes an integer removed come back as size 1, then `pad` fills the rest of each axis."""
    src = b.shape(xs[0])
    back, widths, axis = [], [], 0
    consumed = sum(1 for it in n.attrs["items"] if it[0] in ("int", "slice"))
    for it in n.attrs["items"]:
        kind = it[0]
        if kind == "new":
            back.append(("int", D.const(0)))
        elif kind == "int":
            back.append(("new",))
            widths.append((it[1], src[axis] - 1 - it[1]))
            axis += 1
        elif kind == "slice":
            back.append(("slice", D.const(0), it[2] - it[1]))
            widths.append((it[1], src[axis] - it[2]))
            axis += 1
        else:
            k = len(src) - consumed
            back.append(("ellipsis",))
            widths.extend([(D.const(0), D.const(0))] * k)
            axis += k
    widths.extend([(D.const(0), D.const(0))] * (len(src) - axis))
    while back and (back[-1][0] == "ellipsis" or back[-1][0] == "slice" and D.equal(back[-1][1], 0)):
        back.pop()  # trailing whole-axis items change nothing
    return (b.pad(b.index(g, tuple(back)), tuple(widths)),)


def _pad_transpose(b: Builder, n: Node, xs: tuple, g: int) -> tuple:
    items = tuple(("slice", lo, lo + d) for (lo, hi), d in zip(n.attrs["widths"], b.shape(xs[0])))
    return (b.index(g, items),)


INDEX = linear(lambda b, n, t: b.index(t, n.attrs["items"]), _index_transpose)
PAD = linear(lambda b, n, t: b.pad(t, n.attrs["widths"]), _pad_transpose)


def _concat_vjp(b: Builder, n: Node, xs: tuple, y: int, g: int) -> tuple:
    ax, start, out = n.attrs["axis"], D.const(0), []
    for x in xs:
        stop = start + b.shape(x)[ax]
        out.append(b.slice_axis(g, ax, start, stop))
        start = stop
    return tuple(out)


def _concat_jvp(b: Builder, n: Node, xs: tuple, y: int, ts: tuple) -> int | None:
    if all(t is None for t in ts):
        return None
    return b.concat([b.zeros(b.shape(x)) if t is None else t for x, t in zip(xs, ts)], n.attrs["axis"])


CONCAT = (_concat_vjp, _concat_jvp)

# A split's value is the tuple of its items: its cotangent arrives as {item index: cotangent}
# (from the items' rules), its tangent is a split of the operand's tangent.


def _split_vjp(b: Builder, n: Node, xs: tuple, y: int, g: dict) -> tuple:
    ax, parts = n.attrs["axis"], []
    for i, size in enumerate(n.attrs["sizes"]):
        parts.append(g[i] if i in g else b.zeros(n.shape[:ax] + (size,) + n.shape[ax + 1:]))
    return (b.concat(parts, ax),)


SPLIT = (_split_vjp,
         lambda b, n, xs, y, ts: None if ts[0] is None else b.split(ts[0], n.attrs["axis"], n.attrs["sizes"]))
ITEM = (lambda b, n, xs, y, g: ({n.attrs["index"]: g},),
        lambda b, n, xs, y, ts: None if ts[0] is None else b.item(ts[0], n.attrs["index"]))

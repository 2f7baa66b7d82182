"""The op registry: one record per IR primitive, holding everything the compiler knows about it.

An op's meaning used to be spread over a table per back end (typing sets, PyTorch and Triton
templates, derivative rules, sympy functions), and the tables drifted apart. Here each op is
registered once, as a `Prim`, and every module that needs a fact about an op reads it from here:

  structure   kind, arity, result dtype, elementwise or not, the operand positions in which it
              is linear (`linear_in`), whether it also computes on compile-time numbers;
  renderings  the PyTorch template (and Python's `math` form for numbers), the Triton template,
              the sympy function;
  derivatives the rules that build an op's vjp and jvp as IR (`vjp_ir`, `jvp_ir`: see
              rnnc/derivatives.py; rnnc/autodiff.py differentiates whole graphs with them, and
              every generated backward is rendered from those graphs: the loop's through time,
              the fused Triton kernels'), or the fact that the op passes no gradient.

Templates are Python format strings over the operands `{0}`, `{1}`, `{2}`. A PyTorch rendering
that is None means the back end has a method of its own for the op, named `_<op>` (the
structural ops: matmul, index, reduce, concat, ...); a Triton template that is None means the
op does not fuse into a Triton kernel.

`reduce` is one IR op whose facts depend on its `fn` attribute (a sum is linear, a max is not),
so it is registered once per fn, as "reduce.sum", "reduce.max", ...; `get(node)` picks the right
one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy

from . import derivatives as dv
from .ir import Node

#: Kinds whose ops apply per entry, with numpy broadcasting of their operands.
ELEMENTWISE = frozenset({"unary", "arith", "compare", "logic", "select"})
#: `linear_in` of an op with any number of operands that is jointly linear in all of them.
ALL = "all"
_NO_TRITON_YET = "no Triton template written yet"


@dataclass(frozen=True)
class Prim:
    """What rnnc knows about one primitive (see the module docstring for the template syntax)."""

    name: str  # the IR op, or "reduce.<fn>"
    kind: str  # leaf | unary | arith | compare | logic | select | linalg | reduce | axis | shape
    arity: int | None  # operand count; None: any number (concat)
    typing: str  # "module:qualname" of the function that types it (or creates it, for leaves)
    out: str = "float"  # result dtype: float | bool | tuple
    symbol: str | None = None  # its operator in .rnn source (infix, or prefix when unary)
    builtins: tuple[str, ...] = ()  # the .rnn functions that elaborate to it
    scalar: bool = False  # computes on compile-time numbers too (the result stays a Python number)
    # groups of operand positions; the op is linear jointly in each group when the others are fixed
    linear_in: tuple[frozenset[int], ...] | str = ()
    torch: str | None = None  # PyTorch call template (None: TorchExpr._<op>)
    infix: str | None = None  # or the Python operator PyTorch code applies (unary when arity 1)
    math: str | None = None  # Python template for compile-time numbers (None: no scalar form)
    triton: str | None = None  # Triton template over same-shaped operands
    not_fusable: str | None = None  # why an elementwise float op has no Triton template
    sympy: Callable | None = None  # the op on sympy expressions (associativity proofs)
    grad: str = "rule"  # rule: has derivative rules (vjp_ir, jvp_ir) | none: passes no gradient
    vjp_ir: dv.VjpRule | None = None  # builds the cotangent contribution per operand (rnnc/derivatives.py)
    jvp_ir: dv.JvpRule | None = None  # builds the result's tangent from the operands' tangents

    @property
    def op(self) -> str:
        """The IR op (`reduce` for every reduce.<fn>)."""
        return self.name.split(".")[0]

    @property
    def elementwise(self) -> bool:
        return self.kind in ELEMENTWISE

    @property
    def bool_out(self) -> bool:
        return self.out == "bool"


_PRIMS: dict[str, Prim] = {}


def _register(*prims: Prim) -> None:
    for p in prims:
        assert p.name not in _PRIMS, f"op {p.name!r} registered twice"
        _PRIMS[p.name] = p


# ---- queries ----------------------------------------------------------------------------------

def key(op: str | Node) -> str:
    """The registry name of a node's op (reductions by fn)."""
    if isinstance(op, Node):
        return f"reduce.{op.attrs['fn']}" if op.op == "reduce" else op.op
    return op


def get(op: str | Node) -> Prim:
    """The record of an op name or of a node (a node's reduce fn selects among reduce.<fn>)."""
    name = key(op)
    if name not in _PRIMS:
        hint = " (reductions are registered per fn: pass the Node)" if name == "reduce" else ""
        raise KeyError(f"no op {name!r} in the registry{hint}")
    return _PRIMS[name]


def prims() -> tuple[Prim, ...]:
    """Every registered primitive, in registration order."""
    return tuple(_PRIMS.values())


def is_elementwise(op: str | Node) -> bool:
    name = key(op)
    return name != "reduce" and get(name).elementwise


def broadcasts(op: str | Node) -> bool:
    """An elementwise op of several operands: they broadcast against each other (numpy rules)."""
    return is_elementwise(op) and (get(op).arity or 0) >= 2


def linear_groups(node: Node) -> tuple[frozenset[int], ...]:
    """Groups of operand positions in which the node's op is jointly linear, the others held fixed."""
    groups = get(node).linear_in
    return (frozenset(range(len(node.args))),) if groups == ALL else groups


def linear_args(node: Node) -> frozenset[int]:
    """The operand positions in which the op is linear when the other operands are held fixed."""
    return frozenset().union(*linear_groups(node))


def has_vjp(node: Node) -> bool:
    """Whether derivatives pass through the node: it has IR rules or passes no gradient (a
    loop with an op that has neither would fall back to autograd)."""
    p = get(node)
    return p.grad == "none" or (p.vjp_ir is not None and p.jvp_ir is not None)


def triton_templates(arity: int) -> dict[str, str]:
    """Triton templates of the elementwise ops with `arity` operands."""
    return {p.name: p.triton for p in _PRIMS.values() if p.elementwise and p.arity == arity and p.triton}


def names(kind: str, arity: int | None = None, scalar: bool | None = None) -> frozenset[str]:
    """Op names of one kind (optionally one arity, or only those with/without a scalar form)."""
    return frozenset(p.name for p in _PRIMS.values() if p.kind == kind and (arity is None or p.arity == arity)
                     and (scalar is None or p.scalar == scalar))


def builtin_names(kind: str | None = None) -> frozenset[str]:
    """The .rnn functions that elaborate to ops of one kind (of any kind by default)."""
    return frozenset(b for p in _PRIMS.values() if kind in (None, p.kind) for b in p.builtins)


def symbols(arity: int = 2) -> dict[str, str]:
    """.rnn operator -> op name, for the binary (or, arity 1, the prefix) operators."""
    return {p.symbol: p.name for p in _PRIMS.values() if p.symbol and p.arity == arity}


# ---- records ----------------------------------------------------------------------------------

_ELAB = "rnnc.elaborate:Elaborator."
_ONE, _TWO, _BOTH = (frozenset({0}),), (frozenset({1}),), (frozenset({0, 1}),)


def _leaf(name: str, typing: str, builtins: tuple[str, ...] = (), scalar: bool = False) -> Prim:
    # no operands, so no gradient to pass; input/param/state are bound by name, the rest rendered
    return Prim(name, "leaf", 0, _ELAB + typing, builtins=builtins, scalar=scalar, grad="none")


_register(
    _leaf("input", "_input"), _leaf("param", "_param"), _leaf("state", "_state"),
    _leaf("const", "_const", scalar=True), _leaf("dim", "_dim_value", scalar=True),
    _leaf("literal", "_e_Literal"), _leaf("eye", "_builtin", ("eye",)),
    _leaf("full", "_builtin", ("zeros", "ones")), _leaf("arange", "_builtin", ("arange",)),
)


def _unary(name: str, torch: str, triton: str | None, d: dv.Scale | None, *,
           math: str | None = None, sympy_fn: Callable | None = None, not_fusable: str | None = None) -> Prim:
    """A unary function (a .rnn builtin of the same name); `d(b, v, x, y)` builds v·f'(x) in IR."""
    vjp_ir, jvp_ir = dv.elementwise(d) if d else (None, None)
    return Prim(name, "unary", 1, "rnnc.ops:elementwise", builtins=(name,), scalar=math is not None,
                torch=torch, math=math, triton=triton, not_fusable=not_fusable, sympy=sympy_fn,
                grad="rule" if d else "none",
                vjp_ir=vjp_ir, jvp_ir=jvp_ir)


def _silu(b, v, x, y):
    s = b.apply("sigmoid", x)
    return b.mul(v, b.mul(s, b.add(1.0, b.mul(x, b.sub(1.0, s)))))


def _gelu(b, v, x, y):
    """gelu'(x) = Φ(x) + x φ(x), with Φ(x) = gelu(x) / x (1/2 at 0): the IR has no erf."""
    cdf = b.where(b.apply("eq", x, 0.0), 0.5, b.div(y, x))
    pdf = b.mul(b.apply("exp", b.mul(-0.5, b.mul(x, x))), 0.3989422804014327)  # 1/sqrt(2π)
    return b.mul(v, b.add(cdf, b.mul(x, pdf)))


_NO_LIBDEVICE = "no accurate Triton form without libdevice (absent in the interpreter)"

_register(
    _unary("sigmoid", "torch.sigmoid({0})", "tl.sigmoid({0})",
           lambda b, v, x, y: b.apply("sigmoid_grad", v, y), sympy_fn=lambda x: 1 / (1 + sympy.exp(-x))),
    _unary("tanh", "torch.tanh({0})", "(2 * tl.sigmoid(2 * {0}) - 1)",  # no libdevice in the interpreter
           lambda b, v, x, y: b.apply("tanh_grad", v, y),
           math="math.tanh({0})", sympy_fn=sympy.tanh),
    _unary("relu", "torch.relu({0})", "tl.maximum({0}, 0.0)",
           lambda b, v, x, y: b.where(b.apply("gt", y, 0.0), v, 0.0), sympy_fn=lambda x: sympy.Max(x, 0)),
    _unary("exp", "torch.exp({0})", "tl.exp({0})", lambda b, v, x, y: b.mul(v, y),
           math="math.exp({0})", sympy_fn=sympy.exp),
    _unary("log", "torch.log({0})", "tl.log({0})", lambda b, v, x, y: b.div(v, x),
           math="math.log({0})", sympy_fn=sympy.log),
    # stable Triton forms: no exp of a large positive number
    _unary("softplus", "F.softplus({0})", "tl.maximum({0}, 0.0) + tl.log(1 + tl.exp(-tl.abs({0})))",
           lambda b, v, x, y: b.mul(v, b.apply("sigmoid", x)),
           sympy_fn=lambda x: sympy.log(1 + sympy.exp(x))),
    _unary("silu", "F.silu({0})", "{0} * tl.sigmoid({0})", _silu),
    _unary("logsigmoid", "F.logsigmoid({0})", "tl.minimum({0}, 0.0) - tl.log(1 + tl.exp(-tl.abs({0})))",
           lambda b, v, x, y: b.mul(v, b.apply("sigmoid", b.neg(x))),
           sympy_fn=lambda x: -sympy.log(1 + sympy.exp(-x))),
    _unary("abs", "torch.abs({0})", "tl.abs({0})",
           lambda b, v, x, y: b.mul(v, b.apply("sign", x)), math="abs({0})", sympy_fn=sympy.Abs),
    _unary("sqrt", "torch.sqrt({0})", "tl.sqrt({0})", lambda b, v, x, y: b.div(v, b.mul(2.0, y)),
           math="math.sqrt({0})", sympy_fn=sympy.sqrt),
    _unary("rsqrt", "torch.rsqrt({0})", "tl.rsqrt({0})",
           lambda b, v, x, y: b.mul(b.mul(-0.5, v), b.mul(y, b.mul(y, y))), sympy_fn=lambda x: 1 / sympy.sqrt(x)),
    _unary("sin", "torch.sin({0})", "tl.sin({0})", lambda b, v, x, y: b.mul(v, b.apply("cos", x)),
           math="math.sin({0})", sympy_fn=sympy.sin),
    _unary("cos", "torch.cos({0})", "tl.cos({0})",
           lambda b, v, x, y: b.neg(b.mul(v, b.apply("sin", x))), math="math.cos({0})", sympy_fn=sympy.cos),
    _unary("gelu", "F.gelu({0})", None, _gelu, not_fusable=_NO_TRITON_YET + " (needs erf)"),
    _unary("elu", "F.elu({0})", None,
           lambda b, v, x, y: b.where(b.apply("gt", x, 0.0), v, b.mul(v, b.add(y, 1.0))), not_fusable=_NO_TRITON_YET),
    _unary("sign", "torch.sign({0})", "tl.where({0} > 0, 1.0, tl.where({0} < 0, -1.0, 0.0))", None,
           sympy_fn=sympy.sign),
    _unary("log1p", "torch.log1p({0})", None, lambda b, v, x, y: b.div(v, b.add(1.0, x)), math="math.log1p({0})",
           sympy_fn=lambda x: sympy.log(1 + x), not_fusable=_NO_LIBDEVICE),
    _unary("expm1", "torch.expm1({0})", None, lambda b, v, x, y: b.mul(v, b.add(y, 1.0)), math="math.expm1({0})",
           sympy_fn=lambda x: sympy.exp(x) - 1, not_fusable=_NO_LIBDEVICE),
    _unary("square", "torch.square({0})", "{0} * {0}", lambda b, v, x, y: b.mul(v, b.mul(2.0, x)),
           math="{0} ** 2", sympy_fn=lambda x: x ** 2),
)

# Triton adjoints; ties of minimum/maximum share the gradient equally, as torch does

_V = lambda b, v, *xs: v  # noqa: E731 -- ∂y/∂x_i = 1
# a ** b: b a^(b-1) (0 where b = 0), and y log a (0 where a = 0 and b >= 0), as torch
_POW_D = (lambda b, v, x0, x1, y: b.where(b.apply("eq", x1, 0.0), 0.0,
                                          b.mul(v, b.mul(x1, b.apply("pow", x0, b.sub(x1, 1.0))))),
          lambda b, v, x0, x1, y: b.where(b.apply("and", b.apply("eq", x0, 0.0), b.apply("ge", x1, 0.0)), 0.0,
                                          b.mul(v, b.mul(y, b.apply("log", x0)))))


def _arith(name: str, symbol: str | None, linear_in: tuple, d: tuple[dv.Scale, ...] = (), *,
           rules: tuple | None = None, infix: str | None = None, torch: str | None = None,
           triton: str | None = None, sympy_fn: Callable | None = None,
           arity: int = 2, builtin: bool = False, scalar: bool = True) -> Prim:
    """Arithmetic on numbers (tensors or compile-time scalars); no infix or template: TorchExpr._<name>.
    `d` holds per operand `scale(b, v, *xs, y)`, which builds v·∂y/∂x_i in IR (or `rules` the
    vjp and jvp rules themselves); none: the op passes no gradient."""
    vjp_ir, jvp_ir = rules or (dv.elementwise(*d) if d else (None, None))
    not_fusable = None if triton else _NO_TRITON_YET if symbol or builtin else "not in the language"
    return Prim(name, "arith", arity, "rnnc.ops:elementwise", symbol=symbol,
                builtins=(name,) if builtin else (), scalar=scalar, linear_in=linear_in, infix=infix, torch=torch,
                triton=triton, not_fusable=not_fusable, sympy=sympy_fn,
                grad="rule" if vjp_ir else "none", vjp_ir=vjp_ir, jvp_ir=jvp_ir)


_register(
    _arith("add", "+", _BOTH, (_V, _V), infix="+", triton="{0} + {1}",
           sympy_fn=lambda a, b: a + b),
    _arith("sub", "-", _BOTH, (_V, lambda b, v, x0, x1, y: b.neg(v)), infix="-", triton="{0} - {1}",
           sympy_fn=lambda a, b: a - b),
    _arith("mul", "*", _ONE + _TWO, (lambda b, v, x0, x1, y: b.mul(v, x1), lambda b, v, x0, x1, y: b.mul(v, x0)),
           infix="*", triton="{0} * {1}", sympy_fn=lambda a, b: a * b),
    _arith("div", "/", _ONE,
           (lambda b, v, x0, x1, y: b.div(v, x1), lambda b, v, x0, x1, y: b.neg(b.div(b.mul(v, y), x1))),
           infix="/", triton="{0} / {1}", sympy_fn=lambda a, b: a / b),
    # floor(a / b) and a - floor(a / b) * b, rendered by methods so torch can differentiate them
    _arith("floordiv", "//", ()),
    _arith("mod", "%", (), (_V, lambda b, v, x0, x1, y: b.neg(b.mul(v, b.apply("floordiv", x0, x1))))),
    _arith("pow", "**", (), _POW_D, sympy_fn=lambda a, b: a ** b),
    _arith("minimum", None, (), rules=dv.min_max("lt"), triton="tl.minimum({0}, {1})",
           sympy_fn=sympy.Min, builtin=True),
    _arith("maximum", None, (), rules=dv.min_max("gt"), triton="tl.maximum({0}, {1})",
           sympy_fn=sympy.Max, builtin=True),
    _arith("neg", "-", _ONE, (lambda b, v, x, y: b.neg(v),), infix="-", triton="-{0}",
           sympy_fn=lambda a: -a, arity=1),
    # Not in the language: v times sigmoid's or tanh's derivative, read from y, as one kernel, which
    # torch's own backward uses too; generated backwards (through time, and the fused scans') call them.
    _arith("sigmoid_grad", None, _ONE, (lambda b, w, v, y, r: b.apply("sigmoid_grad", w, y),
                                        lambda b, w, v, y, r: b.mul(b.mul(w, v), b.sub(1.0, b.mul(2.0, y)))),
           torch="torch.ops.aten.sigmoid_backward({0}, {1})", triton="{0} * {1} * (1 - {1})",
           sympy_fn=lambda v, y: v * y * (1 - y), scalar=False),
    _arith("tanh_grad", None, _ONE, (lambda b, w, v, y, r: b.apply("tanh_grad", w, y),
                                     lambda b, w, v, y, r: b.mul(b.mul(-2.0, w), b.mul(v, y))),
           torch="torch.ops.aten.tanh_backward({0}, {1})", triton="{0} * (1 - {1} * {1})",
           sympy_fn=lambda v, y: v * (1 - y * y), scalar=False),
)


def _compare(name: str, symbol: str, sympy_fn: Callable) -> Prim:
    return Prim(name, "compare", 2, "rnnc.ops:elementwise", out="bool", symbol=symbol, infix=symbol,
                triton=f"{{0}} {symbol} {{1}}", sympy=sympy_fn, grad="none")


def _logic(name: str, symbol: str | None, torch: str, triton: str, sympy_fn: Callable, arity: int = 2) -> Prim:
    return Prim(name, "logic", arity, "rnnc.ops:elementwise", out="bool", symbol=symbol, torch=torch,
                triton=triton, sympy=sympy_fn, grad="none")


_register(
    _compare("lt", "<", sympy.Lt), _compare("le", "<=", sympy.Le), _compare("gt", ">", sympy.Gt),
    _compare("ge", ">=", sympy.Ge), _compare("eq", "==", sympy.Eq), _compare("ne", "!=", sympy.Ne),
    _logic("and", "and", "torch.logical_and({0}, {1})", "{0} & {1}", sympy.And),
    _logic("or", "or", "torch.logical_or({0}, {1})", "{0} | {1}", sympy.Or),
    _logic("not", "not", "torch.logical_not({0})", "{0} == 0", sympy.Not, arity=1),
    Prim("where", "select", 3, "rnnc.ops:elementwise", builtins=("where",), linear_in=(frozenset({1, 2}),),
         triton="tl.where({0}, {1}, {2})", sympy=lambda c, a, b: sympy.Piecewise((a, c), (b, True)), vjp_ir=dv.WHERE[0],
         jvp_ir=dv.WHERE[1]),
)

# Structural ops: rendered by TorchExpr methods, differentiated by rnnc/derivatives.py. Reduce
# templates take named fields: {x} (the operand, wrapped for a method call), {text} (bare), {dim}
# ("dim=..." or nothing), {axes} (always explicit).
_register(
    Prim("matmul", "linalg", 2, "rnnc.ops:matmul", symbol="@", linear_in=_ONE + _TWO,
         vjp_ir=dv.MATMUL[0], jvp_ir=dv.MATMUL[1]),
    Prim("outer", "linalg", 2, "rnnc.ops:outer", builtins=("outer",), linear_in=_ONE + _TWO,
         vjp_ir=dv.OUTER[0], jvp_ir=dv.OUTER[1]),
    Prim("transpose", "linalg", 1, "rnnc.ops:transpose", builtins=("transpose",), linear_in=_ONE,
         vjp_ir=dv.TRANSPOSE[0], jvp_ir=dv.TRANSPOSE[1]),
)


def _reduce(fn: str, torch: str | None, linear: bool) -> Prim:
    vjp_ir, jvp_ir = dv.REDUCE[fn]
    return Prim(f"reduce.{fn}", "reduce", 1, "rnnc.ops:reduce", builtins=(fn,), linear_in=_ONE if linear else (),
                torch=torch, vjp_ir=vjp_ir, jvp_ir=jvp_ir)


_register(
    _reduce("sum", "{x}.sum({dim})", True),
    _reduce("mean", "{x}.mean({dim})", True),
    _reduce("max", "{x}.amax({dim})", False),
    _reduce("min", "{x}.amin({dim})", False),
    _reduce("logsumexp", "torch.logsumexp({text}, dim={axes})", False),
    _reduce("prod", None, False),  # one axis at a time (TorchExpr._reduce)
    Prim("softmax", "axis", 1, _ELAB + "_builtin", builtins=("softmax",), vjp_ir=dv.SOFTMAX[0],
         jvp_ir=dv.SOFTMAX[1]),
    Prim("normalize", "axis", 1, _ELAB + "_builtin", builtins=("normalize",), vjp_ir=dv.NORMALIZE[0],
         jvp_ir=dv.NORMALIZE[1]),
    Prim("concat", "shape", None, "rnnc.ops:concat", builtins=("concat",), linear_in=ALL,
         vjp_ir=dv.CONCAT[0], jvp_ir=dv.CONCAT[1]),
    Prim("split", "shape", 1, _ELAB + "_split", out="tuple", builtins=("split",), linear_in=_ONE,
         vjp_ir=dv.SPLIT[0], jvp_ir=dv.SPLIT[1]),
    Prim("item", "shape", 1, _ELAB + "_split", linear_in=_ONE, vjp_ir=dv.ITEM[0], jvp_ir=dv.ITEM[1]),
    Prim("index", "shape", 1, _ELAB + "_e_Index", linear_in=_ONE, vjp_ir=dv.INDEX[0], jvp_ir=dv.INDEX[1]),
    # identity inside a same-shaped Triton body (leaves are broadcast first); the adjoint sums back
    Prim("broadcast", "shape", 1, _ELAB + "_fit", linear_in=_ONE, triton="{0}", sympy=lambda x: x,
         vjp_ir=dv.BROADCAST[0], jvp_ir=dv.BROADCAST[1]),
    # x surrounded by zeros, (before, after) per axis: not in the language, the transpose of an
    # index in derivative graphs (rnnc/derivatives.py)
    Prim("pad", "shape", 1, "rnnc.ops:pad", linear_in=_ONE, vjp_ir=dv.PAD[0], jvp_ir=dv.PAD[1]),
)

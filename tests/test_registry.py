"""rnnc/registry.py: every op has the rules its back ends need, and the rules are right.

The structural checks walk every registered Prim; the numerical ones build a tiny cell per op
and compare the loop's generated backward (rendered from the registry's IR derivative rules) with
autograd through the same loop, and the Triton scan (the registry's Triton templates and adjoints) with the loop.
"""
import importlib
import re
import string
from pathlib import Path

import pytest
import torch

import rnnc
from rnnc import elaborate, registry
from rnnc.backends import elementwise, torch_expr
from rnnc.ir import Node

from helpers import has_generated_backward

PRIMS = registry.prims()
ROOT = Path(__file__).resolve().parent.parent
IN_LANGUAGE = [p for p in PRIMS if p.symbol or p.builtins]  # the rest only appear in derivative graphs
DIFFERENTIABLE = [p.name for p in IN_LANGUAGE if p.elementwise and p.grad == "rule"]
TRITON_DIFFERENTIABLE = [p.name for p in IN_LANGUAGE if p.elementwise and p.triton and p.grad == "rule"]
BOUND_BY_NAME = {"input", "param", "state", "item"}  # the generated forward binds them (backends/assemble.py; an item by destructuring its split)
POSITIVE = {"log", "sqrt", "rsqrt", "log1p", "pow"}  # take their (first) operand from (1.5, 2.5)


def _resolve(ref: str):
    module, _, qualname = ref.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


@pytest.mark.parametrize("p", PRIMS, ids=lambda p: p.name)
def test_every_op_has_the_rules_its_backends_need(p):
    assert callable(_resolve(p.typing)), f"{p.name}: no type rule at {p.typing}"
    assert p.kind in registry.ELEMENTWISE | {"leaf", "linalg", "reduce", "axis", "shape"}
    operands = {str(i) for i in range(p.arity or 0)}
    # PyTorch: a template, a Python operator, or a TorchExpr method
    if p.name not in BOUND_BY_NAME:
        assert p.torch or p.infix or hasattr(torch_expr.TorchExpr, "_" + p.op), f"{p.name}: no PyTorch rendering"
    if p.infix:
        assert p.infix in torch_expr.INFIX_PREC or p.arity == 1
    if p.elementwise:
        for t in (p.torch, p.math, p.triton):
            assert t is None or _fields(t) <= operands, (p.name, t)
        if p.scalar and p.kind == "unary":
            assert p.math, f"{p.name}: a scalar unary function needs its math form"
    # Triton: every elementwise float op fuses (template, and adjoint if it has a gradient) or says why not
    if p.elementwise and p.out == "float":
        if p.triton is None:
            assert p.not_fusable, f"{p.name}: no Triton template and no reason why"
        else:
            assert not p.not_fusable
    # its adjoint in Triton, rendered from the vjp rule: one per operand, over operands, result and {g}
    adjoints = elementwise.adjoint(p.name) if p.elementwise else None
    if p.elementwise and p.triton and p.grad == "rule":
        assert len(adjoints) == p.arity and any(adjoints), p.name
        assert all(t is None or _fields(t) <= operands | {"g", "y"} for t in adjoints), (p.name, adjoints)
    else:
        assert adjoints is None
    # derivatives: IR rules when it has a gradient (tests/test_autodiff.py checks them), none when not
    assert p.grad in ("rule", "none")
    if p.grad == "rule":
        assert callable(p.vjp_ir) and callable(p.jvp_ir), f"{p.name}: differentiable but no derivative rule"
    else:
        assert p.vjp_ir is None and p.jvp_ir is None
    # linearity: groups of valid operand positions
    if p.linear_in != registry.ALL:
        assert all(g and max(g) < (p.arity or 0) for g in p.linear_in), p.name


def test_every_op_the_elaborator_creates_is_registered():
    made = set()
    for path in list((ROOT / "rnnc").glob("*.py")) + list((ROOT / "backends").glob("*.py")):
        made |= set(re.findall(r'Node\("(\w+)"', path.read_text()))
    made |= set(registry.symbols().values()) | set(registry.symbols(arity=1).values())
    assert made, "no Node(...) constructions found"
    for op in made - {"reduce"}:
        registry.get(op)
    builtins = {b for p in PRIMS for b in p.builtins}
    assert elaborate.BUILTINS - builtins == {"clamp"}  # clamp elaborates to maximum then minimum


def test_every_op_of_the_library_is_registered():
    for name in rnnc.library():
        for cell in rnnc.load(name).cells.values():
            for nid in cell.graph.ids():
                assert registry.get(cell.graph[nid]).op == cell.graph[nid].op


def _node(op: str, nargs: int, **attrs) -> Node:
    return Node(op, tuple(range(nargs)), (), attrs=attrs)


@pytest.mark.parametrize("fn", ["sum", "mean", "max", "min", "prod", "logsumexp"])
def test_only_sum_and_mean_reductions_are_linear(fn):
    node = _node("reduce", 1, fn=fn, axis=None)
    assert registry.linear_args(node) == (frozenset({0}) if fn in ("sum", "mean") else frozenset())
    assert registry.has_vjp(node)


def test_linear_args():
    expect = {("add", 2): {0, 1}, ("sub", 2): {0, 1}, ("neg", 1): {0}, ("mul", 2): {0, 1}, ("div", 2): {0},
              ("matmul", 2): {0, 1}, ("outer", 2): {0, 1}, ("where", 3): {1, 2}, ("concat", 3): {0, 1, 2},
              ("index", 1): {0}, ("transpose", 1): {0}, ("broadcast", 1): {0}, ("pow", 2): set(),
              ("maximum", 2): set(), ("tanh", 1): set(), ("softmax", 1): set(), ("lt", 2): set()}
    for (op, n), positions in expect.items():
        assert registry.linear_args(_node(op, n)) == positions, op
    # add is linear in both operands jointly; mul in each one separately (bilinear)
    assert registry.linear_groups(_node("add", 2)) == (frozenset({0, 1}),)
    assert registry.linear_groups(_node("mul", 2)) == (frozenset({0}), frozenset({1}))


def test_queries():
    assert registry.is_elementwise("tanh") and registry.is_elementwise(_node("where", 3))
    assert not registry.is_elementwise("matmul") and not registry.is_elementwise(_node("reduce", 1, fn="sum"))
    assert registry.broadcasts("add") and not registry.broadcasts("neg") and not registry.broadcasts("concat")
    assert registry.get(_node("reduce", 1, fn="max")).name == "reduce.max"
    assert registry.has_vjp(_node("reduce", 1, fn="prod")) and registry.has_vjp(_node("lt", 2))
    with pytest.raises(KeyError, match="per fn"):
        registry.get("reduce")


# ---- derivative rules against autograd --------------------------------------------------------

def _call(p, *args: str) -> str:
    """The op applied to .rnn operand expressions, spelled as the language spells it."""
    if p.arity == 1:
        return f"{p.symbol} {args[0]}" if p.symbol else f"{p.builtins[0]}({args[0]})"
    if p.symbol:
        return f"({args[0]}) {p.symbol} ({args[1]})"
    return f"{p.builtins[0]}({', '.join(args)})"


def _term(p) -> str:
    """u: any sign [K]; pos: in (1.5, 2.5) [K]; s: in (0.7, 1.7), a [] that broadcasts."""
    first = "pos" if p.name in POSITIVE else "u"
    if p.arity == 1:
        return _call(p, first)
    if p.arity == 2:  # both operand orders, one of them broadcast
        return f"{_call(p, first, 's')} + {_call(p, 's', 'pos')}"
    assert p.name == "where"
    return "where(u > 0, u, s) + where(u < 0.2, s, pos)"


def _cell(term: str) -> str:
    """A nonlinear recurrence through `term` (so the loop runs the op's derivative rule)."""
    return f"""cell c(x: [K]) -> (y: [K]) {{
    state h: [K] = 0.3
    let u = 2 * h + x
    let pos = 1.5 + sigmoid(u)
    let s = 0.7 + sigmoid(sum(h))
    h = 0.5 * tanh(0.3 * ({term})) + x
    y = h
}}"""


def _inputs(cell) -> list[torch.Tensor]:
    """Float64 leaves: each input as [B=2, T=5, K=3], then the initial state h [2, 3]."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 5, 3, generator=gen, dtype=torch.float64) * 0.7 for _ in cell.INPUTS]
    return [x.requires_grad_() for x in xs + [torch.randn(2, 3, generator=gen, dtype=torch.float64) * 0.5]]


def _run(cell, leaves: list[torch.Tensor]):
    """The outputs and the gradients of a loss over the outputs and the final state."""
    *xs, h0 = leaves
    y, final = cell(*xs, state={"h": h0})
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    return y, torch.autograd.grad((y * w).sum() + (final["h"] * 0.3).sum(), leaves)


def _agree(a, b, values: float = 1e-12) -> None:
    (y_a, g_a), (y_b, g_b) = a, b
    torch.testing.assert_close(y_a, y_b, rtol=values, atol=values)
    for u, v in zip(g_a, g_b):
        torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_generated_backward_matches_autograd(name):
    p = registry.get(name)
    text = _cell(_term(p))
    gen = rnnc.build(text, K=3, dtype=torch.float64, backend="loop", backward="generated")
    ref = rnnc.build(text, K=3, dtype=torch.float64, backend="loop", backward="autograd")
    assert has_generated_backward(gen), "the generated backward did not take the op"
    leaves = _inputs(gen)
    _agree(_run(gen, leaves), _run(ref, leaves))


def _scan_cell(term: str) -> str:
    """An elementwise-affine state whose update `b` the Triton scan computes in its kernel."""
    return f"""cell c(x: [K], z: [K]) -> (y: [K]) {{
    state h: [K] = 0.3
    let u = 2 * z + x
    let pos = 1.5 + sigmoid(u)
    let s = 0.7 + sigmoid(z)
    h = sigmoid(x) * h + 0.3 * ({term})
    y = h
}}"""


def _triton_against_loop(text: str, scan: bool) -> None:
    """Values and gradients of a Triton kernel against the loop in float64: the fused scan
    (elementwise.py) of an elementwise-affine cell, forced at 5 steps, or the fused recurrent
    kernel (tiles.py) that runs a nonlinear cell."""
    loop = rnnc.build(text, K=3, dtype=torch.float64, backend="loop")
    tri = rnnc.build(text, K=3, dtype=torch.float64, backend="triton")
    if scan:
        assert "def _scan_h_fwd" in tri.source
        tri.LOOP_BELOW = 0
    else:
        assert "class _Recurrent" in tri.source
    leaves = _inputs(loop)
    _agree(_run(tri, leaves), _run(loop, leaves), values=1e-10)


@pytest.mark.parametrize("name", TRITON_DIFFERENTIABLE)
def test_triton_adjoint_matches_the_loop(name):
    p = registry.get(name)
    text = _scan_cell(_term(p))
    assert name in _fused_ops(text)
    _triton_against_loop(text, scan=True)
    _triton_against_loop(_cell(_term(p)), scan=False)


def test_boolean_ops_fuse_into_the_triton_kernels():
    term = "where(u == s or not (u != u) and u < pos, u, -s)"
    text = _scan_cell(term)
    assert {"eq", "ne", "lt", "and", "or", "not", "where"} <= _fused_ops(text)
    _triton_against_loop(text, scan=True)
    _triton_against_loop(_cell(term), scan=False)


def _fused_ops(text: str) -> set[str]:
    """The ops the Triton scan computes in its kernel (the elementwise body of the update)."""
    cell = rnnc.parse(text).cell()
    _, body = elementwise.split_fusable(cell.graph, [cell.states[0].node_out])
    return {cell.graph[n].op for n in body}


@pytest.mark.parametrize("name", sorted(registry.names("unary", scalar=True)))
def test_compile_time_scalars_use_the_math_form(name):
    p = registry.get(name)
    cell = rnnc.build(f"cell c(x: [K]) -> (y: [K]) {{ y = x * {name}(0.5) + {name}(-(1 - 1.5)) ** 2 }}", K=3)
    assert p.torch.split("(")[0] not in cell.source  # a Python number, not a tensor op
    x = torch.randn(1, 2, 3)
    v = getattr(torch, name)(torch.tensor(0.5, dtype=torch.float64)).item()
    torch.testing.assert_close(cell(x)[0], x * v + v ** 2)

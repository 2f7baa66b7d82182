"""Derivatives as IR (rnnc/autodiff.py, the registry's vjp_ir/jvp_ir rules) against torch.

Every differentiable op of the registry is differentiated in a tiny graph (with broadcasting,
several axes, shapes over symbolic dims), and the vjp and jvp graphs, evaluated in float64 by
rnnc/interpret.py, are compared with torch.autograd and torch.func.jvp on the same forward graph;
then one step of every library cell, with respect to its states, inputs and params.
"""
from __future__ import annotations

from typing import Callable

import pytest
import sympy
import torch
import torch.nn.functional as F

import rnnc
from rnnc import autodiff, registry
from rnnc import dims as D
from rnnc.interpret import evaluate
from rnnc.ir import Graph, Node
from rnnc.irbuild import Builder, node_key

from helpers import DIMS, sizes

K, H = D.symbol("K"), D.symbol("H")
SIZES = {"K": 4, "H": 3}
ONE = D.ONE
Z = D.const(0)


class Case:
    """A tiny graph: leaves (inputs) and one op applied to them by `make(b, *leaves)`."""

    def __init__(self, shapes: list[tuple], make: Callable, positive: bool = False, values=None) -> None:
        self.shapes, self.make, self.positive, self.values = shapes, make, positive, values

    def build(self) -> tuple[Graph, list[int], int]:
        g = Graph()
        leaves = [g.add(Node("input", (), s, attrs={"name": f"x{i}"}, name=f"x{i}")) for i, s in enumerate(self.shapes)]
        out = self.make(Builder(g), *leaves)
        return g, leaves, out


def _unary(name: str) -> Case:
    positive = name in ("log", "sqrt", "rsqrt", "log1p")
    return Case([(K, H)], lambda b, x: b.apply(name, x), positive=positive)


def _binary(name: str) -> list[Case]:
    positive = name in ("pow", "mod", "floordiv")
    op = lambda b, x, y: b.apply(name, x, y)  # noqa: E731
    return [Case([(K, H), (H,)], op, positive), Case([(K, ONE), (ONE, H)], op, positive),
            Case([(K, H), ()], op, positive), Case([(K, H)], lambda b, x: b.apply(name, x, 2.0), positive),
            Case([(H,)], lambda b, x: b.apply(name, 3.0, x), positive)]


def _where() -> list[Case]:
    mk = lambda b, p, x, y: b.where(b.apply("gt", p, 0.0), x, y)  # noqa: E731
    return [Case([(K, H), (H,), (K, ONE)], mk), Case([(K, H), (K, H), ()], mk),
            Case([(K, H), (K, H)], lambda b, p, x: b.where(b.apply("gt", p, 0.0), 1.5, x))]


def _reduce(fn: str) -> list[Case]:
    mk = lambda ax: lambda b, x: b.reduce(fn, x, ax)  # noqa: E731
    return [Case([(K, H)], mk(ax)) for ax in (0, 1, None)] + [Case([(H,)], mk(0)), Case([()], mk(None))]


def _index(items: tuple) -> Case:
    return Case([(K, H)], lambda b, x: b.index(x, items))


def _split(b: Builder, x: int, use: tuple[int, ...]) -> int:
    parts = b.split(x, 1, (H, H, ONE))
    return b.sum_all([b.mul(b.item(parts, i), float(i + 1)) for i in use])


CASES: dict[str, list[Case]] = {
    **{p.name: [_unary(p.name)] for p in registry.prims() if p.kind == "unary" and p.grad != "none"},
    **{p.name: _binary(p.name) for p in registry.prims() if p.kind == "arith" and p.arity == 2},
    "neg": [Case([(K, H)], lambda b, x: b.neg(x))],
    "where": _where(),
    "matmul": [Case([a, c], lambda b, x, y: b.matmul(x, y))
               for a, c in (((K, H), (H,)), ((K,), (K, H)), ((K, H), (H, K)), ((H,), (H,)))],
    "outer": [Case([(K,), (H,)], lambda b, x, y: b.outer(x, y))],
    "transpose": [Case([(K, H)], lambda b, x: b.transpose(x))],
    **{p.name: _reduce(p.name.split(".")[1]) for p in registry.prims() if p.kind == "reduce"},
    "softmax": [Case([(K, H)], lambda b, x, ax=ax: b.apply_axis("softmax", x, ax)) for ax in (0, 1)],
    "normalize": [Case([(K, H)], lambda b, x, ax=ax: b.apply_axis("normalize", x, ax)) for ax in (0, 1)],
    "concat": [Case([(K, H), (K, ONE)], lambda b, x, y: b.concat([x, y], 1)),
               Case([(H,), (K,), (H,)], lambda b, x, y, z: b.concat([x, y, z], 0)),
               Case([(K, H), (K, H)], lambda b, x, y: b.concat([x, y], 0))],
    "split": [Case([(K, 2 * H + 1)], lambda b, x, u=u: _split(b, x, u)) for u in ((0, 1, 2), (1,), (0, 2))],
    "index": [_index(items) for items in (
        (("int", D.const(1)),), (("slice", D.const(1), D.const(3)), ("new",)), (("ellipsis",), ("new",)),
        (("new",), ("int", Z), ("slice", Z, D.const(2))), (("ellipsis",), ("int", H - 1)),
        (("slice", Z, K), ("new",), ("slice", D.const(1), H)))],
    "pad": [Case([(K, H)], lambda b, x: b.pad(x, ((D.const(1), Z), (Z, D.const(2))))),
            Case([(H,)], lambda b, x: b.pad(x, ((K, D.const(1)),)))],
    "broadcast": [Case([s], lambda b, x: b.broadcast(x, (K, H))) for s in ((H,), (K, ONE), (), (ONE, ONE))],
}
CASES["item"] = CASES["split"]
DIFFERENTIABLE = [p.name for p in registry.prims() if p.grad != "none"]


def test_every_differentiable_op_has_ir_rules():
    """The registry's completeness check for derivatives: a rule for each, a test case for each."""
    for p in registry.prims():
        if p.grad == "none":
            assert p.vjp_ir is None and p.jvp_ir is None, p.name
        else:
            assert callable(p.vjp_ir) and callable(p.jvp_ir), f"{p.name}: differentiable but no IR derivative rule"
            assert p.name in CASES, f"{p.name}: no derivative test case here"


def _values(shapes, positive: bool, seed: int, dims=SIZES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        size = [int(sympy.sympify(d).subs({D.symbol(k): v for k, v in dims.items()})) for d in s]
        x = torch.randn(size, generator=gen, dtype=torch.float64)
        out.append(x.abs() + 0.5 if positive else x)
    return out


def assert_tidy(before: int, g: Graph, results: list[int | None]) -> None:
    """The appended nodes are all needed by a result, and no two compute the same thing."""
    live = g.ancestors(r for r in results if r is not None)
    assert all(n in live for n in range(before, len(g))), "dead nodes in the derivative graph"
    old = {node_key(g[n]) for n in range(before)}
    new = [node_key(g[n]) for n in range(before, len(g))]
    assert len(new) == len(set(new)) and not old & set(new), "a subexpression computed twice"


def check_vjp(g: Graph, env: dict[int, torch.Tensor], wrt: list[int], outs: list[int], dims, seed=0,
              rtol=1e-9, atol=1e-10) -> None:
    """vjp(outs -> wrt) evaluated at `env` (every leaf's value) against torch.autograd."""
    gen = torch.Generator().manual_seed(seed + 1)
    cts = [g.add(Node("input", (), g[o].shape, attrs={"name": f"ct{i}"})) for i, o in enumerate(outs)]
    before = len(g)
    dg, grads = autodiff.vjp(g, outs, cts, wrt)
    assert_tidy(before, dg, grads)
    xs = {n: v.clone().requires_grad_() if n in wrt else v for n, v in env.items()}
    fwd = evaluate(g, xs, dims, outs)
    ys = [torch.as_tensor(fwd[o]) for o in outs]
    seeds = [torch.randn(y.shape, generator=gen, dtype=torch.float64) for y in ys]
    want = torch.autograd.grad(ys, [xs[n] for n in wrt], seeds, allow_unused=True)
    got = evaluate(dg, {**env, **dict(zip(cts, seeds))}, dims, [r for r in grads if r is not None])
    for n, r, w in zip(wrt, grads, want):
        x = env[n]
        w = torch.zeros_like(x) if w is None else w
        v = torch.zeros_like(x) if r is None else torch.as_tensor(got[r], dtype=torch.float64).expand_as(x)
        torch.testing.assert_close(v, w, rtol=rtol, atol=atol)


def check_jvp(g: Graph, env: dict[int, torch.Tensor], wrt: list[int], outs: list[int], dims, seed=0,
              rtol=1e-9, atol=1e-10) -> None:
    """jvp(wrt -> outs) evaluated at `env` in random directions against torch.func.jvp."""
    gen = torch.Generator().manual_seed(seed + 2)
    tans = [g.add(Node("input", (), g[x].shape, attrs={"name": f"t{i}"})) for i, x in enumerate(wrt)]
    before = len(g)
    dg, ts = autodiff.jvp(g, wrt, tans, outs)
    assert_tidy(before, dg, ts)
    dirs = [torch.randn(env[n].shape, generator=gen, dtype=torch.float64) for n in wrt]

    def f(*xs):
        vals = evaluate(g, {**env, **dict(zip(wrt, xs))}, dims, outs)
        return tuple(torch.as_tensor(vals[o], dtype=torch.float64) for o in outs)

    _, want = torch.func.jvp(f, tuple(env[n] for n in wrt), tuple(dirs))
    got = evaluate(dg, {**env, **dict(zip(tans, dirs))}, dims, [t for t in ts if t is not None])
    for t, w in zip(ts, want):
        v = torch.zeros_like(w) if t is None else torch.as_tensor(got[t], dtype=torch.float64).expand_as(w)
        torch.testing.assert_close(v, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_op_derivatives_match_torch(name):
    for i, case in enumerate(CASES[name]):
        g, leaves, out = case.build()
        env = dict(zip(leaves, case.values or _values(case.shapes, case.positive, seed=i)))
        check_vjp(g, env, leaves, [out], SIZES, seed=i)
        check_jvp(case.build()[0], env, leaves, [out], SIZES, seed=i)


@pytest.mark.parametrize("make, values", [
    (lambda b, x, y: b.apply("maximum", x, y), [torch.tensor([1., 2., 3.]), torch.tensor([1., 0., 3.])]),
    (lambda b, x, y: b.apply("minimum", x, y), [torch.tensor([1., 2., 3.]), torch.tensor([1., 0., 3.])]),
    (lambda b, x: b.reduce("max", x, 0), [torch.tensor([2., 1., 2.])]),
    (lambda b, x: b.reduce("min", x, None), [torch.tensor([-1., 1., -1.])]),
    (lambda b, x: b.apply("relu", x), [torch.tensor([-1., 0., 2.])]),
    (lambda b, x: b.reduce("prod", x, 0), [torch.tensor([2., 0., 3.])]),
    (lambda b, x: b.reduce("prod", x, 0), [torch.tensor([0., 0., 3.])]),
    (lambda b, x: b.apply_axis("normalize", x, 0), [torch.tensor([0., 0., 0.])]),
    (lambda b, x: b.apply("abs", x), [torch.tensor([-1., 0., 2.])]),
    (lambda b, x, y: b.apply("pow", x, y), [torch.tensor([0., 2., 0.]), torch.tensor([2., 1., 0.])]),
], ids=["maximum-tie", "minimum-tie", "max-tie", "min-tie", "relu-0", "prod-one-zero", "prod-two-zeros",
        "normalize-0", "abs-0", "pow-0"])
def test_ties_and_zeros_follow_torch(make, values):
    """Where the derivative is a convention (ties, kinks, zeros), it is torch's."""
    values = [v.double() for v in values]
    shapes = [(D.const(v.numel()),) for v in values]
    case = Case(shapes, make, values=values)
    g, leaves, out = case.build()
    check_vjp(g, dict(zip(leaves, values)), leaves, [out], {})


def test_derivative_graph_reads_like_hand_written():
    """sigmoid's vjp reuses the forward's y and folds the ones and zeros away."""
    g = Graph()
    x = g.add(Node("input", (), (H,), attrs={"name": "x"}))
    b = Builder(g)
    y = b.apply("relu", b.apply("sigmoid", x))
    ct = g.add(Node("input", (), (H,), attrs={"name": "g"}))
    dg, (dx,) = autodiff.vjp(g, [y], [ct], [x])
    ops = [dg[n].op for n in range(len(g), len(dg))]
    assert "broadcast" not in ops and ops.count("where") == 1 and "reduce" not in ops, ops
    assert sum(dg[n].op == "sigmoid" for n in range(len(dg))) == 1  # the forward's, reused


def test_constants_and_unused_values_get_no_cotangent():
    g = Graph()
    x = g.add(Node("input", (), (H,), attrs={"name": "x"}))
    w = g.add(Node("input", (), (H,), attrs={"name": "w"}))
    b = Builder(g)
    y = b.mul(b.apply("exp", x), 2.0)
    ct = g.add(Node("input", (), (H,), attrs={"name": "g"}))
    dg, (dx, dw) = autodiff.vjp(g, [y], [ct], [x, w])
    assert dw is None and dx is not None
    _, (t,) = autodiff.jvp(g, [w], [ct], [y])
    assert t is None


# ---- one step of every library cell -----------------------------------------------------

def _cell_values(cell, seed: int) -> dict[int, torch.Tensor]:
    """Inputs in the ranges their names imply in the library (as tests/helpers.py), params and
    states random (a denominator state, aaren's u, kept away from 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    ports = [(p.node, p.shape, p.name) for p in cell.inputs + cell.params] + [(s.node_in, s.shape, s.name)
                                                                              for s in cell.states]
    for nid, shape, name in ports:
        x = torch.randn(sizes(cell, shape), generator=gen, dtype=torch.float64)
        if name in ("g", "w"):
            x = F.logsigmoid(x + 3)
        elif name == "delta":
            x = F.softplus(x)
        elif name == "beta":
            x = torch.sigmoid(x)
        elif name == "k" and "delta" in cell.name:
            x = F.normalize(x, dim=-1)
        elif name == "u" and cell.name == "aaren":
            x = x.abs() + 1
        out[nid] = x
    return out


@pytest.mark.parametrize("name", rnnc.library())
def test_cell_step_vjp_and_jvp_match_torch(name):
    """The adjoint of one step (next states and outputs w.r.t. states, inputs and params), its
    Jacobian-vector product, and ∂(next states)/∂(states)·v alone, what a Newton solver needs."""
    cell = rnnc.load(name).cell()
    outs = [o.node for o in cell.outputs] + [s.node_out for s in cell.states]
    env = _cell_values(cell, seed=len(name))
    dims = {**{d: int(i.default) for d, i in cell.dims.items() if i.default is not None and i.default.is_Integer},
            **DIMS}  # the library's sizes, else the cell's defaults (lsrl_vec2vec's DIN)
    check_vjp(cell.graph, env, list(env), outs, dims, rtol=1e-8, atol=1e-9)
    check_jvp(rnnc.load(name).cell().graph, env, list(env), outs, dims, rtol=1e-8, atol=1e-9)
    check_jvp(rnnc.load(name).cell().graph, env, [s.node_in for s in cell.states],
              [s.node_out for s in cell.states], dims, rtol=1e-8, atol=1e-9)

"""The language's defs and constants: default and keyword arguments, sizes passed to defs, stateful
defs (a small block with states of its own per call), `pi`, literals of constant expressions and of
stacked values, and dim defaults that are dim expressions (`dim M = 2*N`). Values are checked against
plain PyTorch; the errors (file:line:col) are in tests/test_errors.py."""
import math

import pytest
import torch

import rnnc


def _run(src, x, backend="loop", **dims):
    return rnnc.build(src, backend=backend, dtype=torch.float64, **dims)(x)


def test_default_and_keyword_arguments():
    src = """def scaled(x, a = 2, b = a + 1) = a * x + b
cell c(x: [3]) -> (y: [3], z: [3], w: [3]) {
    y = scaled(x)
    z = scaled(x, b = -1)
    w = scaled(a = 0.5, x = x)
}"""
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    (y, z, w), _ = _run(src, x)
    torch.testing.assert_close(y, 2 * x + 3)
    torch.testing.assert_close(z, 2 * x - 1)
    torch.testing.assert_close(w, 0.5 * x + 1.5)


def test_defs_take_sizes():
    """A def's argument used as a size (arange, zeros, eye, slices, a state's shape), given a number, an
    expression of numbers or a dim."""
    src = """def ramp(d) = arange(d) * 2
def window(v, k) = v[0:k] + zeros(k)
cell c(x: [N]) -> (y: [N], z: [2]) {
    dim N = 4
    y = ramp(N) + x - ramp(2 * 2)[0:N] + eye(N) @ x
    z = window(x, 1 + 1)
}"""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    (y, z), _ = _run(src, x)
    torch.testing.assert_close(y, 2 * x)
    torch.testing.assert_close(z, x[..., :2])


def test_pi_and_literals_of_constant_expressions():
    src = """def rot(a) = [[cos(a), -sin(a)], [sin(a), cos(a)]]
cell c(x: [2]) -> (y: [2], z: [2]) {
    dim D = 3
    y = rot(pi / 3) @ x
    z = [cos(2 * pi / D), D + 0.5] * x
}"""
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    (y, z), _ = _run(src, x)
    a = math.pi / 3
    r = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    torch.testing.assert_close(y, x @ r.T)
    torch.testing.assert_close(z, torch.tensor([math.cos(2 * math.pi / 3), 3.5], dtype=torch.float64) * x)
    # D is known only when built: the literal reads it then
    (_, z5), _ = _run(src, x, D=5)
    torch.testing.assert_close(z5, torch.tensor([math.cos(2 * math.pi / 5), 5.5], dtype=torch.float64) * x)


def test_literals_stack_values():
    """`[a, b]` of values of one shape stacks them along a new leading axis (torch.stack)."""
    src = """cell c(x: [3], s: []) -> (m: [2, 3], v: [3]) {
    m = [x, 2 * x]
    v = [s, x[0], 1]
}"""
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    s = torch.randn(2, 5, dtype=torch.float64)
    for backend in rnnc.backends_for(src):
        (m, v), _ = rnnc.build(src, backend=backend, dtype=torch.float64)(x, s)
        torch.testing.assert_close(m, torch.stack([x, 2 * x], dim=-2))
        torch.testing.assert_close(v, torch.stack([s, x[..., 0], torch.ones_like(s)], dim=-1))


def test_dim_default_that_is_an_expression():
    src = """cell c(x: [N]) -> (y: [M]) {
    dim M = 2 * N + 1
    param w: [M, N] ~ normal(0, 1)
    y = w @ x
}"""
    cell = rnnc.build(src, N=3)
    assert cell.dims == {"N": 3, "M": 7} and cell.w.shape == (7, 3)
    assert rnnc.build(src, N=3, M=4).w.shape == (4, 3)  # a default: overridable
    lazy = rnnc.build("cell c(x: [N]) -> (y: [M]) {\n    dim M = 2 * N\n    y = arange(M) + sum(x)\n}")
    x = torch.randn(2, 3, 5)
    y, _ = lazy(x)  # N inferred from the input, M from N
    torch.testing.assert_close(y, torch.arange(10.0) + x.sum(-1, keepdim=True))
    assert rnnc.analyze(src).to_dict()["dims"] == {"N": None, "M": "2*N+1"}


def test_dim_defaults_in_dependency_order():
    src = """cell c(x: [1]) -> (y: [K]) {
    dim K = M + 1
    dim M = 2 * N
    dim N = 2
    y = arange(K) + x
}"""
    cell = rnnc.build(src)
    assert cell.dims == {"N": 2, "M": 4, "K": 5}
    with pytest.raises(rnnc.RnncError, match="not a positive size"):
        rnnc.build("cell c(x: [1]) -> (y: [M]) {\n    dim N = 2\n    dim M = N - 2\n    y = arange(M) + x\n}")


COUNTERS = """def counter(step = 1) {
    state n: [1] = 0
    n = n + step
    return n
}
def rotating(d) {
    state s: [2] = [1, 0]
    let before = s
    s = [[cos(2 * pi / d), -sin(2 * pi / d)], [sin(2 * pi / d), cos(2 * pi / d)]] @ s
    return s - before
}
def two_counters(x) {
    let a = counter()
    let b = counter(step = x)
    return a + b
}
cell c(x: [1]) -> (y: [1], z: [1], w: [2], v: [1]) {
    let a = counter()
    let b = counter(2)
    y = a + b
    z = two_counters(x)
    w = rotating(4)
    v = counter()
}"""


def _counters_reference(x):
    t = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
    k = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
    ang = math.pi / 2 * k
    s = torch.cat([torch.cos(ang), torch.sin(ang)], -1)
    before = torch.cat([torch.cos(ang - math.pi / 2), torch.sin(ang - math.pi / 2)], -1)
    t = t.expand_as(x)
    return 3 * t, t + x.cumsum(1), (s - before).expand(x.shape[0], -1, -1), t


@pytest.mark.parametrize("backend", ["loop", "scan", "auto"])
def test_stateful_defs_have_states_of_their_own(backend):
    """Each call makes its own states, named after the let it is bound to (nested: outer_inner_state),
    or after the def; the states are the cell's (final states, a second run continuing from them)."""
    cell = rnnc.parse(COUNTERS).cell()
    assert [s.name for s in cell.states] == ["a_n", "b_n", "two_counters_a_n", "two_counters_b_n", "rotating_s",
                                             "counter_n"]
    x = torch.randn(2, 70, 1, dtype=torch.float64)
    m = rnnc.build(COUNTERS, backend=backend, dtype=torch.float64)
    outs, final = m(x)
    for got, want in zip(outs, _counters_reference(x)):
        torch.testing.assert_close(got, want)
    assert final["two_counters_b_n"].shape == (2, 1)
    torch.testing.assert_close(final["two_counters_b_n"], x.sum(1))
    # streaming: the second half from the first half's final states
    (y1, *_), f1 = m(x[:, :30])
    (y2, *_), _ = m(x[:, 30:], state=f1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), outs[0])


def test_a_stateful_def_is_linear_in_its_states():
    """rotating(4)'s state is a constant dense 2x2 transition: the matrix scan takes it."""
    states = rnnc.analyze(COUNTERS).to_dict()["states"]
    assert states["rotating_s"]["matrix"]["kind"] == "dense"
    assert rnnc.analyze(COUNTERS).backend == "scan"

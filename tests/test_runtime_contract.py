"""The runtime conventions of built cells (DESIGN.md, "Runtime conventions"), over several specs.

- step() applied repeatedly reproduces forward();
- a sequence split in two, with the first half's final state passed on, equals the whole;
- bf16/fp16 inputs run: states float32, outputs in the input dtype, close to the fp32 result;
- float64 inputs give float64 results;
- wrong-rank / wrong-size inputs raise an error naming the input and its expected shape;
- torch.autograd.gradcheck on tiny float64 cases.
"""
from __future__ import annotations

import re

import pytest
import torch

import rnnc

RnncError = getattr(rnnc, "RnncError", None)
if RnncError is None:  # pragma: no cover - older layouts
    from rnnc.errors import RnncError

B, T = 2, 8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _as_tuple(y):
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _inputs(name: str, g: torch.Generator, extra=(), T_=T, dtype=torch.float32):
    """Per-spec example inputs [B, T, *extra, *declared] (positional, declaration order)."""
    def n(*shape):
        return torch.randn(B, T_, *extra, *shape, generator=g).to(dtype)

    if name == "lstm" or name == "gru" or name == "elman" or name in ("mingru", "minlstm"):
        return [n(5)]
    if name == "gla":
        return [n(4), n(4), n(6), torch.nn.functional.logsigmoid(2 + n(4).float()).to(dtype)]
    if name == "deltanet":
        return [n(4), torch.nn.functional.normalize(n(4).float(), dim=-1).to(dtype), n(6),
                torch.sigmoid(n().float()).to(dtype)]
    if name == "mamba":
        return [n(5), torch.nn.functional.softplus(n(5).float()).to(dtype), n(3), n(3)]
    if name == "lsrl_majority":
        return [torch.randint(0, 2, (B, T_, *extra, 1), generator=g).to(dtype)]
    raise KeyError(name)


DIMS = {
    "lstm": dict(I=5, H=6),
    "gru": dict(I=5, H=6),
    "elman": dict(I=5, H=6),
    "mingru": dict(I=5, H=6),
    "minlstm": dict(I=5, H=6),
    "gla": {},
    "deltanet": {},
    "mamba": dict(D=5, N=3),
    "lsrl_majority": {},
}
STATES = {
    "lstm": {"h": (6,), "c": (6,)},
    "gru": {"h": (6,)},
    "elman": {"h": (6,)},
    "mingru": {"h": (6,)},
    "minlstm": {"h": (6,)},
    "gla": {"S": (4, 6)},
    "deltanet": {"S": (4, 6)},
    "mamba": {"h": (5, 3)},
    "lsrl_majority": {"ones": (1,), "zeros": (1,)},
}


def build(name, **kw):
    torch.manual_seed(0)
    return rnnc.build(name, backend="loop", **DIMS[name], **kw)


SEVERAL = ["lstm", "gru", "mingru", "gla", "deltanet", "mamba", "lsrl_majority"]


@pytest.mark.parametrize("extra", [(), (2,)], ids=["noheads", "heads2"])
@pytest.mark.parametrize("name", SEVERAL)
def test_step_equals_forward(name, extra):
    cell = build(name)
    g = torch.Generator().manual_seed(1)
    xs = _inputs(name, g, extra)
    with torch.no_grad():
        ys, final = cell(*xs)
        ys = _as_tuple(ys)
        st = cell(*[x[:, :0] for x in xs])[1] if extra else None  # step() learns head axes from the state
        for t in range(T):
            y_t, st = cell.step(*[x[:, t] for x in xs], state=st)
            y_t = _as_tuple(y_t)
            assert len(y_t) == len(ys)
            for a, b in zip(y_t, ys):
                assert a.shape == b[:, t].shape
                assert rel_err(a, b[:, t]) <= 1e-6, t
            assert set(st) == set(STATES[name])
            for s, shape in STATES[name].items():
                assert st[s].shape == (B, *extra, *shape)
    for s in STATES[name]:
        assert rel_err(st[s], final[s]) <= 1e-6, s


@pytest.mark.parametrize("name", SEVERAL)
def test_step_with_explicit_initial_state(name):
    """step(state=None) is the spec's initial state; an explicit dict works the same."""
    cell = build(name)
    g = torch.Generator().manual_seed(2)
    xs = _inputs(name, g)
    init = {s: torch.randn(B, *shape, generator=g) for s, shape in STATES[name].items()}
    with torch.no_grad():
        ys, _ = cell(*xs, state=init)
        y0, _ = cell.step(*[x[:, 0] for x in xs], state=init)
    for a, b in zip(_as_tuple(y0), _as_tuple(ys)):
        assert rel_err(a, b[:, 0]) <= 1e-6


@pytest.mark.parametrize("name", SEVERAL)
def test_split_sequence_equals_whole(name):
    cell = build(name)
    g = torch.Generator().manual_seed(3)
    xs = _inputs(name, g, (2,), T_=12)
    with torch.no_grad():
        ys, final = cell(*xs)
        ys1, st = cell(*[x[:, :5] for x in xs])
        ys2, final2 = cell(*[x[:, 5:] for x in xs], state=st)
    for y, a, b in zip(_as_tuple(ys), _as_tuple(ys1), _as_tuple(ys2)):
        assert rel_err(torch.cat([a, b], 1), y) <= 1e-6
    for s in STATES[name]:
        assert rel_err(final2[s], final[s]) <= 1e-6


def test_partial_initial_state_uses_spec_default():
    """A missing entry takes the spec's initial value (0 for lstm's c)."""
    cell = build("lstm")
    g = torch.Generator().manual_seed(4)
    (x,) = _inputs("lstm", g)
    h0 = torch.randn(B, 6, generator=g)
    with torch.no_grad():
        y1, f1 = cell(x, state={"h": h0})
        y2, f2 = cell(x, state={"h": h0, "c": torch.zeros(B, 6)})
        y3, _ = cell(x, state=None)
        y4, _ = cell(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(f1["c"], f2["c"], rtol=0, atol=0)
    torch.testing.assert_close(y3, y4, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["lstm", "mingru", "gla", "deltanet", "mamba"])
def test_half_precision_inputs(name, dtype, tol):
    cell = build(name)
    g = torch.Generator().manual_seed(5)
    xs = _inputs(name, g, (2,), dtype=dtype)
    with torch.no_grad():
        ys, final = cell(*xs)
        ys32, final32 = cell(*[x.float() for x in xs])
    for y, y32 in zip(_as_tuple(ys), _as_tuple(ys32)):
        assert y.dtype == dtype
        assert torch.isfinite(y.float()).all()
        assert rel_err(y, y32) <= tol
    for s in STATES[name]:
        assert final[s].dtype == torch.float32, s  # states are carried in float32
        assert rel_err(final[s], final32[s]) <= tol, s
    # a float32 initial state is accepted with half inputs, and the step API too
    with torch.no_grad():
        y_t, st = cell.step(*[x[:, 0] for x in xs], state=final)
    for a in _as_tuple(y_t):
        assert a.dtype == dtype
    for s in STATES[name]:
        assert st[s].dtype == torch.float32


@pytest.mark.parametrize("name", ["lstm", "mingru", "gla", "deltanet", "mamba"])
def test_float64_inputs_give_float64(name):
    cell = build(name, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    xs = _inputs(name, g, dtype=torch.float64)
    with torch.no_grad():
        ys, final = cell(*xs)
    for y in _as_tuple(ys):
        assert y.dtype == torch.float64
    for s in STATES[name]:
        assert final[s].dtype == torch.float64, s


def test_float32_default_params_and_states():
    cell = build("mingru")
    for p in cell.parameters():
        assert p.dtype == torch.float32
    g = torch.Generator().manual_seed(7)
    (x,) = _inputs("mingru", g)
    with torch.no_grad():
        y, final = cell(x)
    assert y.dtype == torch.float32
    assert final["h"].dtype == torch.float32


def _word(name: str, msg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg) is not None


def _check_shape_error(excinfo, input_name: str, dim: str, size: int):
    """The message names the input and its expected shape (by dim name or by size)."""
    msg = str(excinfo.value)
    assert _word(input_name, msg), msg
    assert _word(dim, msg) or _word(str(size), msg), (msg, dim, size)


@pytest.mark.parametrize("bad_shape", [(B, T, 4), (B, T, 6), (B, 5), (5,)],
                         ids=["too_narrow", "too_wide", "rank2", "rank1"])
def test_bad_input_shape_names_input(bad_shape):
    cell = build("lstm")  # x: [I] with I = 5
    with pytest.raises((ValueError, RnncError)) as excinfo:
        cell(torch.randn(*bad_shape))
    _check_shape_error(excinfo, "x", "I", 5)


def test_bad_input_shape_names_input_in_step():
    cell = build("lstm")
    with pytest.raises((ValueError, RnncError)) as excinfo:
        cell.step(torch.randn(B, 7))
    _check_shape_error(excinfo, "x", "I", 5)


def test_bad_input_shape_among_several_inputs_names_it():
    cell = build("mamba")  # u, delta: [D] (D=5); B, C: [N] (N=3)
    g = torch.Generator().manual_seed(8)
    u, delta, Bm, Cm = _inputs("mamba", g)
    with pytest.raises((ValueError, RnncError)) as excinfo:
        cell(u, delta, Bm, torch.randn(B, T, 4))
    _check_shape_error(excinfo, "C", "N", 3)
    with pytest.raises((ValueError, RnncError)) as excinfo:
        cell(u, delta[..., :4], Bm, Cm)
    _check_shape_error(excinfo, "delta", "D", 5)


def test_inconsistent_inferred_dims_raise():
    """gla infers K from q; a k of another width is an error naming k (or the clash)."""
    cell = build("gla")
    g = torch.Generator().manual_seed(9)
    q, k, v, gg = _inputs("gla", g)
    with pytest.raises((ValueError, RnncError)) as excinfo:
        cell(q, k[..., :3], v, gg)
    msg = str(excinfo.value)
    assert _word("k", msg) or _word("K", msg), msg


def test_bad_state_shape_raises():
    cell = build("lstm")
    g = torch.Generator().manual_seed(10)
    (x,) = _inputs("lstm", g)
    with pytest.raises((ValueError, RnncError)) as excinfo:
        cell(x, state={"h": torch.zeros(B, 7)})
    assert _word("h", str(excinfo.value)), str(excinfo.value)


def test_gradcheck_gla():
    cell = build("gla", dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    q, k, v, gg = [x.double().requires_grad_() for x in _inputs("gla", g, (1,), T_=3,
                                                                    dtype=torch.float64)]
    S0 = torch.randn(B, 1, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, gg, S0):
        o, final = cell(q, k, v, gg, state={"S": S0})
        return o, final["S"]

    assert torch.autograd.gradcheck(f, (q, k, v, gg, S0), eps=1e-6, atol=1e-6)


def test_gradcheck_mingru_with_params():
    cell = build("mingru", dtype=torch.float64)
    g = torch.Generator().manual_seed(12)
    (x,) = _inputs("mingru", g, T_=3, dtype=torch.float64)
    x.requires_grad_()
    h0 = torch.randn(B, 6, generator=g, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in cell.named_parameters()]

    def f(x, h0, *ps):
        y, final = torch.func.functional_call(cell, dict(zip(names, ps)), (x,), {"state": {"h": h0}})
        return y, final["h"]

    assert torch.autograd.gradcheck(f, (x, h0, *params), eps=1e-6, atol=1e-6)


def test_gradcheck_deltanet():
    cell = build("deltanet", dtype=torch.float64)
    g = torch.Generator().manual_seed(13)
    xs = [x.double().requires_grad_() for x in _inputs("deltanet", g, T_=3, dtype=torch.float64)]

    def f(*xs):
        o, final = cell(*xs)
        return o, final["S"]

    assert torch.autograd.gradcheck(f, tuple(xs), eps=1e-6, atol=1e-6)

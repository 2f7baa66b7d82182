"""Calls at the edges (issue 13, item 5): empty batches and sequences on every backend, step() given
a sequence, non-float dtypes, bad state values, a non-float build dtype, params too large to build."""
from __future__ import annotations

import pytest
import torch

import rnnc
from rnnc.errors import BuildError, InputError

from helpers import DIMS, library_inputs

CELLS = ["lstm", "gla", "deltanet", "aaren", "mingru"]


def _dims(name: str) -> dict[str, int]:
    return {k: v for k, v in DIMS.items() if k in rnnc.load(name).cell().dims}


def _cases():
    for name in CELLS:
        for backend in rnnc.backends_for(name):
            yield pytest.param(name, backend, id=f"{name}-{backend}")


@pytest.mark.parametrize("name,backend", list(_cases()))
def test_empty_batch_and_sequence_give_empty_outputs_and_the_initial_state(name, backend):
    """Bug: B = 0 crashed every backend (`cannot reshape tensor of 0 elements`) and T = 0 was an error."""
    cell = rnnc.build(name, backend=backend, dtype=torch.float64, **_dims(name))
    xs = library_inputs(name, 2, 6, 1, False, torch.float64, seed=0)
    with torch.no_grad():
        ys, final = cell(*xs)
    ys = ys if isinstance(ys, tuple) else (ys,)
    _, initial = cell(*[x[:, :1] for x in xs])  # shapes of the states
    for B, T in ((0, 6), (2, 0), (0, 0)):
        given = {k: torch.randn(B, *v.shape[1:], dtype=torch.float64, requires_grad=True) for k, v in initial.items()}
        for state in (None, given):
            y, fin = cell(*[x[:B, :T] for x in xs], state=state)
            y = y if isinstance(y, tuple) else (y,)
            assert [tuple(v.shape) for v in y] == [(B, T, *v.shape[2:]) for v in ys]
            assert all(v.dtype == torch.float64 for v in y)
            assert set(fin) == set(final)
            for k, v in fin.items():
                assert v.shape == (B, *final[k].shape[1:])
                if state is not None:
                    torch.testing.assert_close(v, given[k])
        if B and T == 0:  # gradient flows from the final state to the state given
            fin = cell(*[x[:B, :0] for x in xs], state=given)[1]
            sum(v.sum() for v in fin.values()).backward()
            assert all(torch.equal(v.grad, torch.ones_like(v)) for v in given.values())


def test_t_zero_final_state_is_the_spec_initial_value():
    src = "cell c(x: [3]) -> (y: [3]) {\n  param h0: [3] = 2.5\n  state h: [3] = h0\n  h = tanh(h + x)\n  y = h\n}\n"
    for backend in rnnc.backends_for(src):
        y, fin = rnnc.build(src, backend=backend)(torch.randn(4, 0, 3))
        assert y.shape == (4, 0, 3)
        torch.testing.assert_close(fin["h"], torch.full((4, 3), 2.5))


def test_step_refuses_a_sequence():
    """Bug: step() given a whole [B, T, K] sequence silently treated T as a head axis."""
    cell = rnnc.build("lstm", H=4, I=3)
    x = torch.randn(2, 5, 3)
    with pytest.raises(InputError, match="one time step"):
        cell.step(x)
    # head axes are fine once the state shows them; the initial state from a T = 0 call
    heads = torch.randn(2, 7, 3, 3)  # [B, T, heads, I]
    y, want = cell(heads)
    _, st = cell(heads[:, :0])
    for t in range(7):
        yt, st = cell.step(heads[:, t], state=st)
        torch.testing.assert_close(yt, y[:, t])
    with pytest.raises(InputError, match="leading axes"):
        cell.step(heads[:, 0], state={k: v[:, :2] for k, v in st.items()})
    yt, _ = cell.step(x[:, 0])  # no extra axes: no state needed
    assert yt.shape == (2, 4)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
def test_non_float_inputs_are_refused(dtype):
    """Bug: int64, bool and complex inputs were accepted silently (complex lost its imaginary part)."""
    cell = rnnc.build("lstm", H=4, I=3)
    x = torch.ones(2, 5, 3).to(dtype)
    with pytest.raises(InputError, match=f"input 'x' has dtype {dtype}"):
        cell(x)
    with pytest.raises(InputError, match="dtype"):
        cell.step(x[:, 0])
    with pytest.raises(InputError, match="dtype"):
        cell(torch.randn(2, 5, 3), state={"h": torch.zeros(2, 4).to(dtype)})


@pytest.mark.parametrize("bad", [0.0, 1, "h", [0.0] * 4, None])
def test_bad_state_values(bad):
    """Bug: state={"S": 0.0} gave an AttributeError."""
    cell = rnnc.build("gla", K=4, V=3)
    q, k, v, g = library_inputs("gla", 2, 5, 1, False, torch.float32, seed=1)
    q, k, v, g = (x[:, :, 0] for x in (q, k, v, g))
    if bad is None:  # None means "the initial value"
        torch.testing.assert_close(cell(q, k, v, g, state={"S": None})[0], cell(q, k, v, g)[0])
        return
    with pytest.raises(InputError, match="initial state 'S'"):
        cell(q, k, v, g, state={"S": bad})
    with pytest.raises(InputError, match="initial state 'S'"):
        cell(q, k, v, g, state={"S": torch.zeros(2, 4)})  # wrong shape


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, "float32"])
def test_a_non_float_build_dtype_is_a_build_error(dtype):
    with pytest.raises(BuildError, match="dtype must be one of"):
        rnnc.build("lstm", H=4, I=3, dtype=dtype)


def test_params_too_large_are_refused_before_allocating(monkeypatch):
    """Bug: `lstm H=10**9` tried to allocate 64 GB at build."""
    with pytest.raises(BuildError, match=r"param 'weight_hh': \[4\*H, H\].*dim H") as e:
        rnnc.build("lstm", H=10**9)
    assert "RNNC_MAX_PARAMS" in e.value.hint
    monkeypatch.setenv("RNNC_MAX_PARAMS", "100")
    with pytest.raises(BuildError, match="over the limit of 100"):
        rnnc.build("lstm", H=4, I=3)
    monkeypatch.setenv("RNNC_MAX_PARAMS", "1000")
    assert sum(p.numel() for p in rnnc.build("lstm", H=4, I=3).parameters()) == 4 * 4 * (3 + 4 + 2)

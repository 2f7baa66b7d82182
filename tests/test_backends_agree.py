"""Differential test: every library spec × every applicable non-loop backend agrees with the
loop backend (which defines the semantics) in values and gradients, at awkward lengths and with
gates from mild to extreme. Never a NaN or an inf."""
import copy

import pytest
import torch

import rnnc
from rnnc.schedule import triton_kind

from helpers import DIMS, library_inputs as _inputs, outputs_and_grads as _grads  # noqa: E402


CASES = [(name, backend) for name in rnnc.library() for backend in rnnc.backends_for(name) if backend != "loop"]


LENGTHS = [1, 7, 63, 64, 65, 300]
# Cells whose triton lowering is the fused recurrent kernel.
RECURRENT = {name for name, backend in CASES
             if backend == "triton" and triton_kind(rnnc.analyze(name))[0] == "recurrent"}


#: Triton cells whose 65-step case runs long in the interpreter (per-key decays' row loops: 6-21 s each
#: single-process): the fast suite runs one gate magnitude there, this one is `slow`. kda's extreme case
#: is also test_triton_dplr's library-cell test (same cell, dims, inputs and check, at B = 1;
#: kda has no parameters to perturb).
SLOW_MAGNITUDE_AT_65 = {"kda": True, "rwkv7": False, "rwkv6": False, "hgrn2": True}


def _slow(name: str, backend: str, T: int, extreme: bool) -> bool:
    """Triton kernels run in the CPU interpreter here, a step at a time: the longest length is
    `slow`, and so are the lengths the recurrent kernel runs beyond 1 and 7 (no chunks, so no chunk
    boundaries to cross): every length for the recurrent cells, and below 65 steps for the others,
    whose modules run the recurrent kernel there (65 reaches their parallel kernels). One step runs
    mild gates only (7 steps take extreme gates through the same kernel), and 65 steps one magnitude
    for the cells in SLOW_MAGNITUDE_AT_65. Newton runs 7 and 65 here (its own tests take the other
    lengths)."""
    if backend == "newton":  # tests/test_newton.py covers more lengths (and gradients of initial states)
        return T not in (7, 65)
    if backend == "triton" and ((T == 1 and extreme) or (T == 65 and SLOW_MAGNITUDE_AT_65.get(name) is extreme)):
        return True
    return backend == "triton" and (T > 65 or (T > 7 and (name in RECURRENT or T < 65)))


LONG_CASES = [pytest.param(extreme, name, backend, T,
                           marks=[pytest.mark.slow] if _slow(name, backend, T, extreme) else [])
              for name, backend in CASES for T in LENGTHS for extreme in (False, True)]


@pytest.mark.parametrize("extreme,name,backend,T", LONG_CASES)
def test_backend_matches_loop(name, backend, T, extreme):
    dims = {k: v for k, v in DIMS.items() if k in rnnc.load(name).cell().dims}
    loop = rnnc.build(name, backend="loop", **dims)
    other = rnnc.build(name, backend=backend, **dims)
    other.load_state_dict(loop.state_dict())
    for p in loop.parameters():  # non-trivial params (rwkv6's bonus starts at zero)
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    other.load_state_dict(loop.state_dict())
    inputs = _inputs(name, 2, T, 2, extreme, torch.float32)
    ys_l, fin_l, g_l = _grads(loop, inputs)
    ys_o, fin_o, g_o = _grads(other, inputs)
    for a in ys_o + g_o:
        assert torch.isfinite(a).all()
    pairs = list(zip(ys_o, ys_l)) + [(fin_o[k], fin_l[k]) for k in fin_l] + list(zip(g_o, g_l))
    try:
        for a, b in pairs:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-6)
    except AssertionError:
        _as_close_as_the_loop(loop, inputs, pairs)


def _as_close_as_the_loop(loop, inputs, pairs):
    """Where two float32 backends disagree beyond the tolerance, the float64 loop decides.

    Some outputs are ill-conditioned in float32 whatever the order of operations (mLSTM's readout
    divides by max(|n.q|, exp(-m)), which extreme gates bring near zero), so two correct float32
    evaluations can differ by more than 1e-4. The other backend's worst error against the float64
    loop may then be at most 4x the float32 loop's own, plus the tolerance (the mLSTM chunk form
    measured 2.9x at extreme gates)."""
    loop64 = copy.deepcopy(loop).double()
    ys, fin, grads = _grads(loop64, [x.detach().double().requires_grad_() for x in inputs])
    refs = list(ys) + [fin[k] for k in fin] + list(grads)
    for (a, b), r in zip(pairs, refs):
        own = (b.double() - r).abs().max().item()
        err = (a.double() - r).abs().max().item()
        assert err <= 4 * own + 1e-4 * r.abs().max().item() + 1e-6, (err, own)


def test_a_backend_that_does_not_apply_names_the_state_and_its_class():
    with pytest.raises(rnnc.BuildError) as info:
        rnnc.build("lstm", I=2, H=3, backend="scan")
    assert "state 'h'" in str(info.value) and "nonlinear" in str(info.value)
    with pytest.raises(rnnc.BuildError) as info:
        rnnc.build("deltanet", backend="scan")
    assert "identity_minus_low_rank" in str(info.value)


@pytest.mark.parametrize("name,backend", [  # rwkv7's is slow: kda's runs the per-key DPLR kernels in bf16
    pytest.param(*case, marks=[pytest.mark.slow] if case == ("rwkv7", "triton") else []) for case in CASES])
def test_backend_matches_loop_with_bf16_inputs(name, backend):
    dims = {k: v for k, v in DIMS.items() if k in rnnc.load(name).cell().dims}
    loop = rnnc.build(name, backend="loop", **dims)
    other = rnnc.build(name, backend=backend, **dims)
    other.load_state_dict(loop.state_dict())
    inputs = _inputs(name, 2, 17 if backend == "triton" and name in RECURRENT else 65, 2, False, torch.bfloat16)
    ys_l, fin_l, g_l = _grads(loop, inputs)
    ys_o, fin_o, g_o = _grads(other, inputs)
    for a, b in list(zip(ys_o, ys_l)) + [(fin_o[k], fin_l[k]) for k in fin_l] + list(zip(g_o, g_l)):
        assert a.dtype == b.dtype and torch.isfinite(a.float()).all()
        scale = b.float().abs().max().item() + 1e-6
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * scale

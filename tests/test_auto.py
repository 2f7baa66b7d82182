"""backend="auto": which lowering it picks per cell, and its per-call choice by sequence length."""
import pytest
import torch

import rnnc
from rnnc.schedule import LOOP_BELOW, NEWTON_FROM, NEWTON_MAX_ENTRIES


@pytest.mark.parametrize("name,expected", [
    ("lstm", "loop"), ("gru", "loop"), ("mingru", "scan"), ("hgrn", "scan"), ("aaren", "scan"),
    ("gla", "chunk"), ("simple_gla", "chunk"), ("gated_deltanet", "chunk"),
    ("paragru", "newton"), ("indrnn", "loop"),  # newton: smooth diagonal Jacobians only (relu: piecewise)
])
def test_auto_picks_the_parallel_lowering_that_applies(name, expected):
    assert rnnc.analyze(name).backend == expected
    assert rnnc.analyze(name).to_dict()["backend"] == expected


def _counting(cell, method):
    calls = []
    original = getattr(cell, method)

    def wrapped(*args, **kwargs):
        calls.append(args[0].shape[1])
        return original(*args, **kwargs)

    setattr(cell, method, wrapped)
    return calls


@pytest.mark.parametrize("name,dims", [("gla", {"K": 4, "V": 3}), ("mingru", {"I": 3, "H": 4})])
def test_short_sequences_run_the_loop_and_long_ones_the_parallel_form(name, dims):
    cell = rnnc.build(name, **dims)
    loop = rnnc.build(name, backend="loop", **dims)
    loop.load_state_dict(cell.state_dict())
    parallel = cell.backend
    assert f"_forward_{parallel}" in cell.source and "_forward_loop" in cell.source
    short, long = _counting(cell, "_forward_loop"), _counting(cell, f"_forward_{parallel}")
    n = LOOP_BELOW[parallel]
    gen = torch.Generator().manual_seed(0)
    for T in (1, n - 1, n, 3 * n + 1):
        xs = [torch.randn(2, T, d, generator=gen) for d in _widths(cell)]
        if name == "gla":
            xs[3] = torch.nn.functional.logsigmoid(xs[3])
        y, final = cell(*xs)
        y_ref, final_ref = loop(*xs)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        for k in final:
            torch.testing.assert_close(final[k], final_ref[k], rtol=1e-4, atol=1e-5)
    assert short == [1, n - 1] and long == [n, 3 * n + 1]


def _widths(cell):
    return [cell.dims[{"q": "K", "k": "K", "v": "V", "g": "K", "x": "I"}[name]] for name in cell.INPUTS]


def test_varlen_under_auto_chooses_per_sequence_length():
    cell = rnnc.build("gla", K=4, V=3)
    loop = rnnc.build("gla", backend="loop", K=4, V=3)
    lengths = [3, LOOP_BELOW["chunk"] + 5, 1]
    T = sum(lengths)
    q, k, v = torch.randn(1, T, 4), torch.randn(1, T, 4), torch.randn(1, T, 3)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, 4))
    cu = torch.tensor([0, 3, 3 + lengths[1], T])
    y, final = cell(q, k, v, g, cu_seqlens=cu)
    y_ref, final_ref = loop(q, k, v, g, cu_seqlens=cu)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final["S"], final_ref["S"], rtol=1e-4, atol=1e-5)


def test_an_explicit_backend_has_no_dispatch():
    source = rnnc.compile("gla", backend="chunk")
    assert "LOOP_BELOW" not in source and "_forward_loop" not in source


@pytest.mark.parametrize("name,expected", [
    ("mingru", "triton"), ("gla", "triton"), ("simple_gla", "triton"), ("lstm", "loop"),
    ("kda", "triton"), ("rwkv7", "triton"), ("deltaproduct", "triton"), ("mlstm", "triton"),
    # nonlinear with a diagonal Jacobian: the fused recurrent kernel (measured faster than Newton on a GPU)
    ("paragru", "triton"), ("indrnn", "triton"), ("sru", "triton"), ("gru", "loop"), ("paralstm", "loop"),
])
def test_auto_on_cuda_takes_the_triton_kernels_where_they_apply(name, expected):
    assert rnnc.analyze(name, device="cuda").backend == expected
    assert rnnc.analyze(name, device="cpu").backend != "triton"


# The lowerings each library cell gets, and auto's choice on CPU: a change to the analysis that
# silently drops a parallel form (say, a combine's states relabelled) shows up here by name.
LOWERINGS = {
    "aaren": ("loop scan newton", "scan"), "deltanet": ("loop chunk triton", "chunk"),
    "elman": ("loop triton newton", "loop"), "gated_deltanet": ("loop chunk triton", "chunk"),
    "gla": ("loop scan chunk triton newton", "chunk"), "gru": ("loop triton newton", "loop"),
    "hgrn": ("loop scan triton newton", "scan"), "indrnn": ("loop triton newton", "loop"),
    "linear_attn": ("loop scan chunk triton newton", "chunk"), "lsrl_majority": ("loop scan triton newton", "scan"),
    "lsrl_modcounter": ("loop scan triton newton", "scan"), "lru": ("loop scan triton newton", "scan"),
    "s4d": ("loop scan triton newton", "scan"), "lstm": ("loop triton newton", "loop"),
    "mamba": ("loop scan triton newton", "loop"),
    "mingru": ("loop scan triton newton", "scan"), "minlstm": ("loop scan triton newton", "scan"),
    "paragru": ("loop triton newton", "newton"), "paralstm": ("loop triton newton", "loop"),
    "running_logsumexp": ("loop scan triton newton", "scan"), "running_max": ("loop scan triton newton", "scan"),
    "rwkv6": ("loop scan chunk triton newton", "chunk"), "simple_gla": ("loop scan chunk triton newton", "chunk"),
    "hgrn2": ("loop scan chunk triton newton", "chunk"), "mamba2": ("loop scan chunk triton newton", "chunk"),
    "mlstm": ("loop chunk triton", "chunk"), "qrnn": ("loop scan triton newton", "scan"),
    "retnet": ("loop scan chunk triton newton", "chunk"), "rglru": ("loop scan triton newton", "scan"),
    "slstm": ("loop triton newton", "loop"), "sru": ("loop triton newton", "newton"),
    "gsa": ("loop scan triton newton", "loop"),
    "deltanet_neg": ("loop chunk triton", "chunk"), "deltaproduct": ("loop chunk triton", "chunk"),
    "kda": ("loop chunk triton", "chunk"), "rwkv7": ("loop chunk triton", "chunk"),
    "lsrl_table": ("loop scan triton newton", "scan"), "lsrl_graph": ("loop scan triton newton", "scan"),
    "lsrl_vec2vec": ("loop scan triton newton", "scan"), "lsrl_tok2tok": ("loop scan newton", "scan"),
}


@pytest.mark.parametrize("name", sorted(LOWERINGS))
def test_library_lowerings(name):
    backends, chosen = LOWERINGS[name]
    assert " ".join(rnnc.backends_for(name)) == backends
    assert rnnc.analyze(name).backend == chosen


def test_every_library_cell_has_expected_lowerings():
    assert set(LOWERINGS) == set(rnnc.library())


def test_auto_runs_newton_only_where_it_measured_faster():
    """A smooth diagonal cell under auto: Newton for a long sequence whose steps hold few state entries
    (with or without a gradient); the loop for a short sequence, or with many entries per step. Both
    give the loop's values and gradients."""
    cell = rnnc.build("paragru", H=8, I=3)
    loop = rnnc.build("paragru", backend="loop", H=8, I=3)
    loop.load_state_dict(cell.state_dict())
    assert cell.backend == "newton" and "jacobian diagonal -> newton" in rnnc.analyze("paragru").summary()
    newton, stepwise = _counting(cell, "_forward_newton"), _counting(cell, "_forward_loop")
    gen = torch.Generator().manual_seed(0)
    wide = NEWTON_MAX_ENTRIES // 8 + 1  # sequences in a batch with more entries per step than that
    for B, T, grad in [(2, NEWTON_FROM, True), (2, NEWTON_FROM - 1, True), (2, NEWTON_FROM, False),
                       (wide, NEWTON_FROM, True)]:
        x = torch.randn(B, T, 3, generator=gen).requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y, final = cell(x)
            y_ref, final_ref = loop(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(final["h"], final_ref["h"], rtol=1e-4, atol=1e-5)
        if grad:
            w = torch.randn(y.shape, generator=gen)
            g, = torch.autograd.grad((y * w).sum(), x)
            g_ref, = torch.autograd.grad((y_ref * w).sum(), x)
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    assert newton == [NEWTON_FROM, NEWTON_FROM]
    assert stepwise == [NEWTON_FROM - 1, NEWTON_FROM]

"""States in layers: a state linear in itself once earlier states are known runs as a parallel
scan after them (LSRL-style stacks of linear layers), against the loop in values and gradients."""
import pytest
import torch

import rnnc

STACK = """cell stack(x: [2]) -> (y: [2]) {
    state n: [2] = 0
    state s: [2] = 0
    state u: [2] = 1
    n = 0.9 * n + x
    s = sigmoid(n) * s + tanh(x)
    u = exp(-abs(s)) * u + n * s
    y = u + s
}"""
# reads the earlier layer's value at the start of the step (before its update), and a fold
AFTER_FOLD = """combine max_merge(a, b) identity -inf = maximum(a, b)
cell after_fold(x: [3]) -> (y: [3]) {
    state s: [3] = 0
    state m: [3] = -inf
    s = sigmoid(m) * s + x
    m = max_merge(m, x)
    y = s * 2
}"""
# LSRL's majority written with a counter layer and a gated layer on top
COUNTER = """cell counter(x: [1]) -> (y: [1]) {
    state ones: [1] = 0
    state t: [1] = 0
    state avg: [1] = 0
    ones = ones + x
    t = t + 1
    avg = (1 - 1 / t) * avg + x / t
    y = avg - ones / t
}"""
CELLS = {"stack": STACK, "after_fold": AFTER_FOLD, "counter": COUNTER}


@pytest.mark.parametrize("name", sorted(CELLS))
def test_layered_cells_take_the_scan(name):
    rep = rnnc.analyze(CELLS[name])
    assert rep.backend == "scan", rep.summary()
    assert any(s.get("after") for s in rep.to_dict()["states"].values())
    assert "scan" in rnnc.backends_for(CELLS[name])


@pytest.mark.parametrize("T", [1, 7, 64, 65, 130])
@pytest.mark.parametrize("name", sorted(CELLS))
def test_layered_scan_matches_the_loop(name, T):
    text = CELLS[name]
    scan = rnnc.build(text, backend="scan", dtype=torch.float64)
    loop = rnnc.build(text, backend="loop", dtype=torch.float64)
    g = torch.Generator().manual_seed(T)
    width = rnnc.parse(text).cell().inputs[0].shape[0]
    x = torch.randn(2, T, 3, int(width), generator=g, dtype=torch.float64)  # no ties for the max fold
    if name == "counter":
        x = (x > 0).to(x.dtype)  # a 0/1 stream
    x.requires_grad_()
    (ys, fs), (yl, fl) = scan(x), loop(x)
    torch.testing.assert_close(ys, yl, rtol=1e-10, atol=1e-10)
    for k in fl:
        torch.testing.assert_close(fs[k], fl[k], rtol=1e-10, atol=1e-10)
    w = torch.cos(torch.arange(ys.numel(), dtype=ys.dtype)).view_as(ys)
    gs, = torch.autograd.grad((ys * w).sum() + sum(f.sum() for f in fs.values() if torch.isfinite(f).all()), x)
    gl, = torch.autograd.grad((yl * w).sum() + sum(f.sum() for f in fl.values() if torch.isfinite(f).all()), x)
    torch.testing.assert_close(gs, gl, rtol=1e-9, atol=1e-9)

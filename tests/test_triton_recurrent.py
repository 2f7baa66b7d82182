"""The fused recurrent kernel (backends/tiles.py, backends/triton_recurrent.py), run by Triton's
CPU interpreter here: the lowering that pushes split/slice/concat down to the loads, fp16 and
float64 inputs against the loop, its refusals. LSTM/GRU/Elman against torch.nn are in
test_library_torch_nn.py; every cell it takes is in the differential and varlen tests."""
import sys

import pytest
import torch

import rnnc
from rnnc.analysis import analyze_cell
from rnnc.backends import tiles
from rnnc.optimize import optimize
from tests.helpers import library_inputs


def _program(name):
    cell = optimize(rnnc.load(name).cell())
    return tiles.lower(cell, analyze_cell(cell).stages)


def test_split_becomes_row_views_of_the_weights():
    prog = _program("lstm")
    ops = [t.op for t in prog.tiles]
    assert "split" not in ops and "item" not in ops
    assert ops.count("mv") == 4  # one [H, H] block of weight_hh per gate
    views = sorted(str(t.attrs["view"][0][0]) for t in prog.tiles if t.op == "leaf" and len(t.shape) == 2)
    assert views == ["0", "2*H", "3*H", "H"]


def test_concat_in_a_product_is_split_into_column_blocks():
    prog = _program("lsrl_majority")
    assert "concat" not in [t.op for t in prog.tiles]


SLICED_STATE = """
cell c(x: [4]) -> (y: [2]) {
    state h: [4] = 0
    h = tanh(x + h)
    y = h[0:2]
}
"""


def test_a_slice_of_a_state_is_refused_with_the_reason():
    with pytest.raises(rnnc.BuildError, match="a slice of state 'h'"):
        rnnc.build(SLICED_STATE, backend="triton")


SLICES = """
cell c(x: [4]) -> (y: [2]) {
    param w: [6, 2] ~ normal(0, 0.5)
    state h: [2] = 0
    let a, b = split(w @ h + concat(x, x[1:3]), 2)
    h = tanh(a[0:2] * sigmoid(b[1:3]) + sum(b, axis=0))
    y = relu(h)[:, None][:, 0] - mean(x[1:3], axis=0)
}
"""


@pytest.mark.parametrize("T", [1, 9])
def test_nested_slices_and_reductions_match_the_loop(T):
    loop = rnnc.build(SLICES, backend="loop").double()
    tri = rnnc.build(SLICES, backend="triton").double()
    tri.load_state_dict(loop.state_dict())
    x = torch.randn(3, T, 4, dtype=torch.float64, requires_grad=True)
    h0 = {"h": torch.randn(3, 2, dtype=torch.float64, requires_grad=True)}
    (y_l, f_l), (y_t, f_t) = loop(x, state=h0), tri(x, state=h0)
    torch.testing.assert_close(y_t, y_l)
    torch.testing.assert_close(f_t["h"], f_l["h"])
    loss_l = (y_l * torch.cos(y_l)).sum() + f_l["h"].sum()
    loss_t = (y_t * torch.cos(y_t)).sum() + f_t["h"].sum()
    for a, b in zip(torch.autograd.grad(loss_t, [x, h0["h"], tri.w]), torch.autograd.grad(loss_l, [x, h0["h"], loop.w])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_fp16_inputs_match_the_loop(name):
    loop = rnnc.build(name, backend="loop", I=3, H=6)
    tri = rnnc.build(name, backend="triton", I=3, H=6)
    tri.load_state_dict(loop.state_dict())
    x = torch.randn(2, 21, 3).half().requires_grad_()
    (y_l, _), (y_t, _) = loop(x), tri(x)
    assert y_t.dtype == torch.float16
    torch.testing.assert_close(y_t.float(), y_l.float(), rtol=2e-3, atol=2e-3)
    (g_l,), (g_t,) = torch.autograd.grad(y_l.float().sum(), [x]), torch.autograd.grad(y_t.float().sum(), [x])
    torch.testing.assert_close(g_t.float(), g_l.float(), rtol=2e-2, atol=2e-2)


def test_inference_saves_no_history():
    """Without gradients the forward kernel writes only outputs and final states."""
    tri = rnnc.build("lstm", backend="triton", I=3, H=4)
    with torch.no_grad():
        y, final = tri(torch.randn(2, 5, 3))
    assert y.shape == (2, 5, 4) and final["c"].shape == (2, 4)
    assert "if SAVE:" in tri.source


def test_tiles_too_large_for_registers_are_a_clear_error():
    tri = rnnc.build("elman", backend="triton", I=2, H=300)  # [512, 512] padded weight block
    with pytest.raises(rnnc.InputError, match="registers"):
        tri(torch.randn(1, 2, 2))


def test_auto_on_cuda_keeps_the_loop_for_cells_only_the_recurrent_kernel_takes():
    assert "triton" in rnnc.backends_for("gru")
    assert rnnc.analyze("gru", device="cuda").backend == "loop"


def test_short_sequences_of_a_parallel_cell_run_the_recurrent_kernel():
    tri = rnnc.build("gla", backend="triton")
    assert "_forward_recurrent" in tri.source and tri.LOOP_BELOW == 65


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_the_delta_rule_steps_without_a_matrix_product(name, monkeypatch):
    """(I - b k kᵀ) S is lowered as S - b k (kᵀ S): no [K, K, V] block, and I - b k kᵀ is not even
    formed outside the kernel, so decoding (a short sequence) takes the recurrent kernel."""
    prog = _program(name)
    assert "mm" not in [t.op for t in prog.tiles]
    loop = rnnc.build(name, backend="loop", K=4, V=3)
    tri = rnnc.build(name, backend="triton", K=4, V=3)
    module = sys.modules[type(tri).__module__]
    applied = []
    monkeypatch.setattr(module._Recurrent, "apply", _recorded(module._Recurrent.apply, applied))
    eyes = []
    monkeypatch.setattr(torch, "eye", _recorded(torch.eye, eyes))
    xs = library_inputs(name, B=2, T=5, heads=1, extreme=False, dtype=torch.float32, seed=0)
    got = tri(*xs)[0]
    assert len(applied) == 1 and not eyes
    torch.testing.assert_close(got, loop(*xs)[0], rtol=1e-5, atol=1e-5)


def _recorded(fn, log):
    def wrapper(*args, **kwargs):
        log.append(fn)
        return fn(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "gla", "linear_attn"])
def test_outer_products_are_formed_in_the_kernel(name):
    """b k vᵀ comes from its vectors, not from a [T, N, K, V] tensor computed beforehand."""
    cell = optimize(rnnc.load(name).cell())
    prog = tiles.lower(cell, analyze_cell(cell).stages)
    assert "outer" in [t.op for t in prog.tiles]
    assert all(len(cell.graph[leaf].shape) <= 1 or cell.graph[leaf].op == "index" for leaf in prog.leaves)


def test_too_large_tiles_fall_back_to_the_parallel_form():
    """K = V = 512 would need a [512, 512] state block: the chunk kernel runs the short sequence."""
    loop, tri = rnnc.build("simple_gla", backend="loop"), rnnc.build("simple_gla", backend="triton")
    q, k, v = (torch.randn(1, 2, 1, 512) * 0.1 for _ in range(3))
    g = torch.full((1, 2, 1), -0.1)
    (y_t, f_t), (y_l, f_l) = tri(q, k, v, g), loop(q, k, v, g)
    torch.testing.assert_close(y_t, y_l, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f_t["S"], f_l["S"], rtol=1e-4, atol=1e-5)


def test_the_report_says_which_kernels_run():
    assert rnnc.analyze("lstm", backend="triton").notes == ["triton: the fused recurrent kernel (no parallel form applies)"]
    notes = rnnc.analyze("gla", backend="triton").notes
    assert notes[0] == "triton: chunkwise kernels" and "shorter than 65 steps" in notes[1]
    assert rnnc.analyze("mingru", backend="triton").notes[0] == "triton: fused scan kernels"

"""The library's elman/lstm/gru cells against torch.nn.RNN(tanh)/LSTM/GRU (single layer, batch_first).

The rnnc cells use torch's parameter names and shapes (without the `_l0` suffix), so weights are
copied with `load_state_dict`. Outputs, final states and every gradient (input, params, initial
state) must agree at fp32 relative error <= 1e-5 (max-abs error over max-abs value).
"""
from __future__ import annotations

import pytest
import torch

import rnnc

I, H = 5, 7
B, T = 3, 11
RTOL = 1e-5

# name -> (torch module factory, number of gates, state names)
CELLS = {
    "elman": (lambda: torch.nn.RNN(I, H, nonlinearity="tanh", batch_first=True), 1, ("h",)),
    "lstm": (lambda: torch.nn.LSTM(I, H, batch_first=True), 4, ("h", "c")),
    "gru": (lambda: torch.nn.GRU(I, H, batch_first=True), 3, ("h",)),
}
PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_pair(name: str, seed: int = 0, backend: str = "loop"):
    torch.manual_seed(seed)
    factory, gates, states = CELLS[name]
    ref = factory()
    cell = rnnc.build(name, I=I, H=H, backend=backend)
    sd = {k[: -len("_l0")]: v.detach().clone() for k, v in ref.state_dict().items()}
    assert set(sd) == set(PARAMS)
    result = cell.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    assert not (set(result.missing_keys) & set(PARAMS)), result.missing_keys
    return cell, ref, gates, states


@pytest.mark.parametrize("name", list(CELLS))
def test_param_names_and_shapes_match_torch(name):
    torch.manual_seed(0)
    factory, gates, _ = CELLS[name]
    cell = rnnc.build(name, I=I, H=H, backend="loop")
    params = dict(cell.named_parameters())
    assert set(params) == set(PARAMS)
    assert params["weight_ih"].shape == (gates * H, I)
    assert params["weight_hh"].shape == (gates * H, H)
    assert params["bias_ih"].shape == (gates * H,)
    assert params["bias_hh"].shape == (gates * H,)
    bound = 1 / H ** 0.5
    for p in params.values():
        assert p.dtype == torch.float32
        assert p.abs().max() <= bound + 1e-7  # torch's U(-1/sqrt(H), 1/sqrt(H)) init
        assert p.std() > 0


# triton: the fused recurrent kernel (tiles.py, triton_recurrent.py), in the CPU interpreter here
BACKENDS = ["loop", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("name", list(CELLS))
def test_matches_torch_nn(name, with_state, backend):
    cell, ref, gates, states = make_pair(name, seed=1 + with_state, backend=backend)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, T, I, generator=g)
    x_ref = x.clone().requires_grad_()
    x_rn = x.clone().requires_grad_()
    init = {s: (torch.randn(B, H, generator=g) * 0.5) for s in states}
    init_ref = {s: v.clone().requires_grad_() for s, v in init.items()}
    init_rn = {s: v.clone().requires_grad_() for s, v in init.items()}

    # torch.nn reference
    if with_state:
        if name == "lstm":
            hx = (init_ref["h"][None], init_ref["c"][None])
        else:
            hx = init_ref["h"][None]
        y_ref, fin = ref(x_ref, hx)
    else:
        y_ref, fin = ref(x_ref)
    if name == "lstm":
        final_ref = {"h": fin[0][0], "c": fin[1][0]}
    else:
        final_ref = {"h": fin[0]}

    # rnnc
    if with_state:
        y, final = cell(x_rn, state=init_rn)
    else:
        y, final = cell(x_rn)
    assert isinstance(final, dict)
    assert set(final) == set(states)
    assert y.shape == (B, T, H)
    assert y.dtype == torch.float32
    for s in states:
        assert final[s].shape == (B, H)
        assert final[s].dtype == torch.float32

    assert rel_err(y, y_ref) <= RTOL
    for s in states:
        assert rel_err(final[s], final_ref[s]) <= RTOL, s
    # the output h is the state h: its last step equals the final state
    assert torch.equal(y[:, -1].detach(), final["h"].detach())

    # gradients of a random linear functional of outputs and final states
    gy = torch.randn(B, T, H, generator=g)
    gs = {s: torch.randn(B, H, generator=g) for s in states}
    loss_ref = (y_ref * gy).sum() + sum((final_ref[s] * gs[s]).sum() for s in states)
    loss = (y * gy).sum() + sum((final[s] * gs[s]).sum() for s in states)
    ref_params = dict(ref.named_parameters())
    rn_params = dict(cell.named_parameters())
    ref_leaves = [x_ref] + [ref_params[p + "_l0"] for p in PARAMS]
    rn_leaves = [x_rn] + [rn_params[p] for p in PARAMS]
    if with_state:
        ref_leaves += [init_ref[s] for s in states]
        rn_leaves += [init_rn[s] for s in states]
    grads_ref = torch.autograd.grad(loss_ref, ref_leaves)
    grads = torch.autograd.grad(loss, rn_leaves)
    labels = ["x"] + list(PARAMS) + ([f"state {s}" for s in states] if with_state else [])
    for label, a, b in zip(labels, grads, grads_ref):
        assert a is not None, label
        assert rel_err(a, b) <= RTOL, (label, rel_err(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CELLS))
def test_step_matches_torch_cell(name, backend):
    """cell.step over a short sequence reproduces torch.nn's sequence output."""
    cell, ref, _, states = make_pair(name, seed=5, backend=backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, I, generator=g)
    with torch.no_grad():
        y_ref, _ = ref(x)
        st = None
        for t in range(x.shape[1]):
            y_t, st = cell.step(x[:, t], state=st)
            assert y_t.shape == (2, H)
            assert rel_err(y_t, y_ref[:, t]) <= RTOL
        assert set(st) == set(states)

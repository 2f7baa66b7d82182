"""rnnc.nn.LSTM/GRU/RNN against torch.nn's: torch's state_dict loads as is, and outputs, final states
and every gradient (input, initial states, parameters) agree in float64 for the options that change
the computation (layers, directions, layout, bias, projection, nonlinearity, PackedSequence, unbatched
input, dropout); plus the errors torch raises, and a tiny task that trains."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnc

I, H = 5, 6
B, T = 3, 7
F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}

CASES = [
    ("LSTM", {}),
    ("LSTM", {"num_layers": 2, "bidirectional": True}),
    ("LSTM", {"batch_first": True}),
    ("LSTM", {"proj_size": 4, "num_layers": 2, "bidirectional": True}),
    ("LSTM", {"bias": False, "batch_first": True}),
    ("GRU", {}),
    ("GRU", {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    ("GRU", {"bias": False}),
    ("RNN", {}),
    ("RNN", {"nonlinearity": "relu", "num_layers": 2}),
    ("RNN", {"bidirectional": True, "bias": False}),
]


def pair(mode: str, seed: int = 0, **options):
    """A torch.nn module and its rnnc.nn drop-in holding the same weights (torch's state_dict)."""
    torch.manual_seed(seed)
    ref = getattr(torch.nn, mode)(I, H, dtype=F64, **options)
    ours = getattr(rnnc.nn, mode)(I, H, dtype=F64, **options)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def initial_states(mode: str, ref, batch: tuple[int, ...], gen):
    layers = ref.num_layers * (2 if ref.bidirectional else 1)
    h0 = torch.randn(layers, *batch, ref.proj_size or H, generator=gen, dtype=F64)
    if mode != "LSTM":
        return h0
    return h0, torch.randn(layers, *batch, H, generator=gen, dtype=F64)


def leaves(hx):
    return [t.requires_grad_() for t in (hx if isinstance(hx, tuple) else (hx,))]


def flat(out):
    """The tensors of (output, h_n) / (output, (h_n, c_n)), PackedSequence data included."""
    y, hn = out
    y = y.data if isinstance(y, torch.nn.utils.rnn.PackedSequence) else y
    return [y, *(hn if isinstance(hn, tuple) else (hn,))]


def check_same(ref_out, out, ref_wrt, wrt, gen):
    """Equal values, and equal gradients of a random functional of every output."""
    ref_t, ours_t = flat(ref_out), flat(out)
    for a, b in zip(ours_t, ref_t):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL)
    weights = [torch.randn(t.shape, generator=gen, dtype=F64) for t in ref_t]
    ref_g = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ref_t, weights)), ref_wrt)
    ours_g = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ours_t, weights)), wrt)
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("mode,options", CASES, ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}"
                                                     for m, o in CASES])
def test_matches_torch_nn(mode, options):
    ref, ours = pair(mode, **options)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*((B, T) if options.get("batch_first") else (T, B)), I, generator=gen, dtype=F64)
    hx = initial_states(mode, ref, (B,), gen)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    hx_ref = tuple(t.clone() for t in hx) if mode == "LSTM" else hx.clone()
    hx_ours = tuple(t.clone() for t in hx) if mode == "LSTM" else hx.clone()
    wrt_ref = [x_ref, *leaves(hx_ref), *ref.parameters()]
    wrt_ours = [x_ours, *leaves(hx_ours), *ours.parameters()]
    check_same(ref(x_ref, hx_ref), ours(x_ours, hx_ours), wrt_ref, wrt_ours, gen)
    # zero initial states when hx is left out
    for a, b in zip(flat(ours(x)), flat(ref(x))):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("mode,options", [("LSTM", {"num_layers": 2, "bidirectional": True, "proj_size": 4}),
                                          ("GRU", {"bidirectional": True, "batch_first": True}),
                                          ("RNN", {"num_layers": 2})])
def test_packed_sequence(mode, options):
    """PackedSequence in and out, unsorted lengths (enforce_sorted=False): the reverse direction
    starts at each sequence's own last step, and h_n comes back in the caller's batch order."""
    ref, ours = pair(mode, seed=2, **options)
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([4, 7, 1, 4, 6])
    batch_first = options.get("batch_first", False)
    x = torch.randn(*((5, 7) if batch_first else (7, 5)), I, generator=gen, dtype=F64)
    hx = initial_states(mode, ref, (5,), gen)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    hx_ref = tuple(t.clone() for t in hx) if mode == "LSTM" else hx.clone()
    hx_ours = tuple(t.clone() for t in hx) if mode == "LSTM" else hx.clone()
    wrt_ref = [x_ref, *leaves(hx_ref), *ref.parameters()]
    wrt_ours = [x_ours, *leaves(hx_ours), *ours.parameters()]
    out_ref = ref(pack_padded_sequence(x_ref, lengths, batch_first, enforce_sorted=False), hx_ref)
    out = ours(pack_padded_sequence(x_ours, lengths, batch_first, enforce_sorted=False), hx_ours)
    assert isinstance(out[0], torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(out[0].batch_sizes, out_ref[0].batch_sizes)
    assert torch.equal(out[0].unsorted_indices, out_ref[0].unsorted_indices)
    check_same(out_ref, out, wrt_ref, wrt_ours, gen)
    padded, lens = pad_packed_sequence(out[0], batch_first)
    assert torch.equal(lens, lengths)


def test_unbatched_input():
    ref, ours = pair("LSTM", seed=4, num_layers=2, bidirectional=True)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(T, I, generator=gen, dtype=F64)
    hx = initial_states("LSTM", ref, (), gen)
    y, (h, c) = ours(x, hx)
    assert y.shape == (T, 2 * H) and h.shape == c.shape == (4, H)
    for a, b in zip(flat((y, (h, c))), flat(ref(x, hx))):
        torch.testing.assert_close(a, b, **TOL)


def test_dropout_between_layers_in_training_only():
    """dropout=1 zeroes every layer's output but the last's, in training; eval ignores it (as torch)."""
    ref, ours = pair("GRU", seed=6, num_layers=2, dropout=1.0)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(7), dtype=F64)
    for train in (True, False):
        ref.train(train), ours.train(train)
        for a, b in zip(flat(ours(x)), flat(ref(x))):
            torch.testing.assert_close(a, b, **TOL)
    ours.train()
    dropped = ours(x)[0]
    ours.eval()
    assert not torch.allclose(ours(x)[0], dropped)


def test_errors_are_clear():
    lstm = rnnc.nn.LSTM(I, H, num_layers=2)
    with pytest.raises(rnnc.InputError, match="input_size"):
        lstm(torch.randn(T, B, I + 1))
    with pytest.raises(rnnc.InputError, match=r"h0 of size \[2, 3, 6\]"):
        lstm(torch.randn(T, B, I), (torch.zeros(1, B, H), torch.zeros(2, B, H)))
    with pytest.raises(rnnc.InputError, match=r"tuple \(h0, c0\)"):
        lstm(torch.randn(T, B, I), torch.zeros(2, B, H))
    with pytest.raises(rnnc.InputError, match="float64"):
        lstm(torch.randn(T, B, I, dtype=F64))
    with pytest.raises(ValueError, match="proj_size"):
        rnnc.nn.LSTM(I, H, proj_size=H)
    with pytest.raises(ValueError, match="nonlinearity"):
        rnnc.nn.RNN(I, H, nonlinearity="gelu")


def test_trains_on_a_tiny_task():
    """Predict the running mean of the inputs: the loss must fall well below where it starts."""
    torch.manual_seed(0)
    lstm = rnnc.nn.LSTM(2, 16, batch_first=True)
    head = torch.nn.Linear(16, 2)
    opt = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=0.02)
    x = torch.randn(16, 12, 2)
    target = x.cumsum(1) / torch.arange(1, 13)[None, :, None]
    losses = []
    for _ in range(60):
        y, _ = lstm(x)
        loss = torch.nn.functional.mse_loss(head(y), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


@pytest.mark.parametrize("mode,options", [
    ("LSTM", {"num_layers": 2, "bidirectional": True, "proj_size": 4, "bias": False}),
    pytest.param("GRU", {"num_layers": 2, "bidirectional": True}, marks=pytest.mark.slow),
    pytest.param("RNN", {"nonlinearity": "relu", "bidirectional": True}, marks=pytest.mark.slow),
])
def test_triton_backend_matches_torch_nn(mode, options):
    """The cells on the triton backend's fused recurrent kernel (the CPU interpreter here), float32."""
    torch.manual_seed(8)
    ref = getattr(torch.nn, mode)(I, H, **options)
    ours = getattr(rnnc.nn, mode)(I, H, backend="triton", **options)
    ours.load_state_dict(ref.state_dict())
    assert {cell.backend for cell in ours._cells.values()} == {"triton"}
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(9))
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    tol = {"rtol": 1e-5, "atol": 1e-6}
    out_ref, out = flat(ref(x_ref)), flat(ours(x_ours))
    for a, b in zip(out, out_ref):
        torch.testing.assert_close(a, b, **tol)
    gen = torch.Generator().manual_seed(10)
    weights = [torch.randn(t.shape, generator=gen) for t in out_ref]
    wrt_ref, wrt_ours = [x_ref, *ref.parameters()], [x_ours, *ours.parameters()]
    grads_ref = torch.autograd.grad(sum((t * w).sum() for t, w in zip(out_ref, weights)), wrt_ref)
    grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(out, weights)), wrt_ours)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **tol)

"""Variable length: cell(..., cu_seqlens=...) over a packed batch equals running each sequence
on its own, for every library spec and every backend that applies, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

import rnnc

from helpers import sizes  # noqa: E402

DIMS = {"K": 3, "V": 2, "D": 3, "N": 2, "H": 3, "I": 2, "1": 1, "2": 2, "NH": 2, "P": 2, "M": 2}
LENGTHS = [5, 1, 9, 5]


def _inputs(name, total, heads, gen):
    out = []
    cell = rnnc.load(name).cell()
    for p in cell.inputs:
        x = torch.randn(1, total, heads, *sizes(cell, p.shape, DIMS), generator=gen, dtype=torch.float64)
        if p.name in ("g", "w"):
            x = F.logsigmoid(x + 2)
        elif p.name in ("delta", "dt"):
            x = F.softplus(x)
        elif p.name == "x" and name == "lsrl_majority":
            x = (x > 0).double()
        out.append(x.requires_grad_())
    return out


CASES = [(n, b) for n in rnnc.library() for b in rnnc.backends_for(n)]


@pytest.mark.parametrize("name,backend", CASES)
def test_packed_equals_separate(name, backend):
    dims = {k: v for k, v in DIMS.items() if k in rnnc.load(name).cell().dims}
    cell = rnnc.build(name, backend=backend, dtype=torch.float64, **dims)
    gen = torch.Generator().manual_seed(len(name))
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist())
    inputs = _inputs(name, sum(LENGTHS), 2, gen)
    prog = rnnc.load(name).cell()
    state = {s.name: torch.randn(len(LENGTHS), 2, *sizes(prog, s.shape, DIMS), generator=gen,
                                 dtype=torch.float64).requires_grad_() for s in prog.states}
    y, final = cell(*inputs, state=state, cu_seqlens=cu)
    ys = y if isinstance(y, tuple) else (y,)
    ref_ys, ref_final = [], {k: [] for k in state}
    for i in range(len(LENGTHS)):
        a, b = int(cu[i]), int(cu[i + 1])
        yi, fi = cell(*[x[:, a:b] for x in inputs], state={k: v[i:i + 1] for k, v in state.items()})
        ref_ys.append(yi if isinstance(yi, tuple) else (yi,))
        for k in fi:
            ref_final[k].append(fi[k])
    for k, out in enumerate(ys):
        torch.testing.assert_close(out, torch.cat([r[k] for r in ref_ys], 1))
    for k in final:
        torch.testing.assert_close(final[k], torch.cat(ref_final[k], 0))
    loss = sum(o.sum() for o in ys) + sum(f.sum() for f in final.values())
    ref_loss = sum(o.sum() for r in ref_ys for o in r) + sum(f.sum() for fs in ref_final.values() for f in fs)
    tensors = inputs + list(state.values())
    for a, b in zip(torch.autograd.grad(loss, tensors), torch.autograd.grad(ref_loss, tensors)):
        torch.testing.assert_close(a, b)


def test_bad_cu_seqlens_are_input_errors():
    cell = rnnc.build("gla")
    q = torch.randn(1, 6, 3)
    with pytest.raises(rnnc.InputError, match="cu_seqlens"):
        cell(q, q, q, q, cu_seqlens=torch.tensor([0, 4, 3, 6]))
    with pytest.raises(rnnc.InputError, match="cu_seqlens"):
        cell(q, q, q, q, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(rnnc.InputError, match="packed"):
        cell(*[torch.randn(2, 6, 3)] * 4, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(rnnc.InputError, match="one entry per sequence"):
        cell(q, q, q, q, state={"S": torch.zeros(1, 3, 3)}, cu_seqlens=torch.tensor([0, 2, 6]))

"""The chunk backend's `chunk_size` option: values and gradients agree with the loop at every
chunk size (powers of two and not, lengths that are not multiples of it, chunks longer than the
sequence), and bad values or backends are a BuildError with a hint."""
import pytest
import torch
import torch.nn.functional as F

import rnnc
from rnnc.cli import main

DIMS = {"K": 4, "V": 3}
CELLS = ["gla", "simple_gla", "deltanet", "gated_deltanet", "linear_attn"]
SIZES = [1, 8, 16, 24, 32, 64]


def _inputs(name: str, T: int, extreme: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in rnnc.load(name).cell().inputs:
        shape = [2, T, 2] + [DIMS[str(d)] for d in p.shape]
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        if p.name == "g":  # log-space decay: mild, or down to -20 per step
            x = -20 * torch.rand(*shape, generator=gen, dtype=torch.float64) if extreme else F.logsigmoid(x + 3)
        elif p.name == "beta":
            x = torch.sigmoid(x)
        elif p.name == "k" and "delta" in name:
            x = F.normalize(x, dim=-1)
        out.append(x.float().requires_grad_())
    return out


def _run(cell, inputs, h0):
    y, final = cell(*inputs, state={"S": h0})
    w = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    loss = (y * w).sum() + final["S"].sin().sum()
    grads = torch.autograd.grad(loss, list(inputs) + [h0])
    return [y, final["S"], *grads]


def _close(got, want):
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-6)


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("extreme", [False, True])
def test_chunk_sizes_match_loop(name, extreme):
    if extreme and "g" not in [p.name for p in rnnc.load(name).cell().inputs]:
        pytest.skip("no decay")
    loop = rnnc.build(name, backend="loop")
    for T in (37, 100):
        inputs = _inputs(name, T, extreme, seed=T)
        h0 = torch.randn(2, 2, DIMS["K"], DIMS["V"], generator=torch.Generator().manual_seed(1),
                         requires_grad=True)
        want = _run(loop, inputs, h0)
        for size in SIZES:
            cell = rnnc.build(name, backend="chunk", chunk_size=size)
            assert f", {size})" in cell.source  # the size reaches the chunkwise call
            _close(_run(cell, inputs, h0), want)


def test_default_chunk_size_is_unchanged_by_none():
    assert rnnc.compile("gla", backend="chunk", chunk_size=None) == rnnc.compile("gla", backend="chunk")


def test_auto_applies_chunk_size_only_where_chunk_is_chosen():
    cell = rnnc.build("gla", backend="auto", chunk_size=24)
    assert cell.backend == "chunk" and ", 24)" in cell.source
    lstm = rnnc.build("lstm", backend="auto", chunk_size=24, I=2, H=3)  # not chunkable: ignored
    assert lstm.backend != "chunk"


@pytest.mark.parametrize("bad", [0, -4, True, False, 2.0, "16", [8]])
def test_bad_chunk_size_is_a_build_error(bad):
    for call in (rnnc.compile, rnnc.build):
        with pytest.raises(rnnc.BuildError) as info:
            call("gla", backend="chunk", chunk_size=bad)
        assert "chunk_size must be a positive integer" in str(info.value)
        assert info.value.hint


@pytest.mark.parametrize("backend", ["loop", "scan"])
def test_chunk_size_with_another_backend_is_a_build_error(backend):
    for call in (rnnc.compile, rnnc.build):
        with pytest.raises(rnnc.BuildError) as info:
            call("gla", backend=backend, chunk_size=32)
        assert "chunk_size applies to the chunk backend" in str(info.value)
        assert info.value.hint


def test_chunk_size_cannot_name_a_dim():
    with pytest.raises(rnnc.RnncError) as info:
        rnnc.parse("cell c(x: [chunk_size]) -> (y: [chunk_size]) {\n    y = x\n}\n")
    assert "chunk_size" in str(info.value)


def test_cli_compile_chunk_size(tmp_path, capsys):
    out = tmp_path / "gla_chunk.py"
    assert main(["compile", "gla", "--backend", "chunk", "--chunk-size", "24", "-o", str(out)]) == 0
    assert ", 24)" in out.read_text()
    capsys.readouterr()
    assert main(["compile", "gla", "--backend", "chunk", "--chunk-size", "0"]) == 1
    assert "chunk_size must be a positive integer" in capsys.readouterr().err
    assert main(["compile", "gla", "--backend", "loop", "--chunk-size", "8"]) == 1
    assert "applies to the chunk backend" in capsys.readouterr().err

"""Shared test helpers: random inputs for a cell, a loss whose gradients reach everything, and the fast
suite's subsets of parametrized grids."""
from __future__ import annotations

import sys
import zlib

import pytest
import sympy

import torch
import torch.nn.functional as F

import rnnc

#: Sizes of the library's dims in the differential tests (small, distinct, awkward).
DIMS = {"K": 4, "V": 3, "D": 3, "N": 2, "H": 3, "I": 2, "NH": 2, "P": 3, "M": 5}


def sizes(cell, shape, dims=None) -> list[int]:
    """A declared shape's sizes with `dims` (DIMS), else the cell's dim defaults (`dim N = 3`, `M = 2*N`)."""
    env = {d: info.default for d, info in cell.dims.items() if info.default is not None}
    env = {sympy.Symbol(d, integer=True, positive=True): v for d, v in {**env, **(dims or DIMS)}.items()}
    return [int(sympy.sympify(d).subs(env).subs(env)) for d in shape]


def library_inputs(spec, B: int, T: int, heads: int, extreme: bool, dtype, seed=None, dims=None,
                   device="cpu") -> list[torch.Tensor]:
    """Inputs [B, T, heads, *shape] for the cell `spec` (name, path, source or Program), each
    drawn from the range its name implies in the library: log-space decays `g`/`w` mild or down
    to -20, mamba's positive `delta` and mamba2's `dt`, mLSTM's gate pre-activations (ten times wider
    when extreme, for its stabiliser), the delta rule's `beta` and RWKV-7's `a` in (0, 1) (1 when
    extreme) and unit keys `k` for delta-rule cells (`kk` for RWKV-7). `dims`: sizes (default DIMS).
    Drawn on the CPU in float64 (the same values on every machine), then moved to `device`."""
    prog = spec if isinstance(spec, rnnc.Program) else rnnc.parse(spec) if "{" in spec else rnnc.load(spec)
    cell = prog.cell()
    # crc32, not hash(): the inputs must not depend on PYTHONHASHSEED (a failure must reproduce anywhere)
    g = torch.Generator().manual_seed(zlib.crc32(repr((cell.name, T, extreme)).encode()) if seed is None else seed)
    out = []
    for p in cell.inputs:
        shape = [B, T, heads] + sizes(cell, p.shape, dims)
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        if p.name in ("g", "w"):
            x = -20 * torch.rand(*shape, generator=g, dtype=torch.float64) if extreme else F.logsigmoid(x + 3)
        elif p.name in ("delta", "dt"):
            x = F.softplus(x) * (8 if extreme else 1)
        elif p.name in ("igate", "fgate") and extreme:
            x = 10 * x
        elif p.name == "beta":
            x = torch.ones_like(x) if extreme else torch.sigmoid(x)
        elif p.name == "a" and cell.name == "rwkv7":  # RWKV-7's in-context learning rate, in (0, 1)
            x = torch.ones_like(x) if extreme else torch.sigmoid(x)
        elif (p.name == "k" and ("delta" in cell.name or cell.name == "kda")) \
                or (p.name == "kk" and cell.name == "rwkv7"):
            x = F.normalize(x, dim=-1)
        out.append(x.to(device, dtype).requires_grad_())
    return out


def outputs_and_grads(cell, inputs):
    """(outputs, final states, gradients of a weighted loss w.r.t. the inputs and the params)."""
    y, final = cell(*inputs)
    ys = y if isinstance(y, tuple) else (y,)
    w = [torch.cos(torch.arange(v.numel(), dtype=v.dtype, device=v.device)).view_as(v) for v in ys]
    loss = sum((v * wi).sum() for v, wi in zip(ys, w)) + sum(f.sum() for f in final.values())
    params = [p for _, p in sorted(cell.named_parameters())]
    grads = torch.autograd.grad(loss, list(inputs) + params)
    return ys, final, grads


def fla_naive(rel: str):
    """One of fla's pure-torch reference files (e.g. "ops/kda/naive.py"), loaded by path so triton is
    never imported; the test is skipped when fla-core (or its einops) is not installed."""
    import importlib.util
    import os

    import pytest

    pytest.importorskip("einops")
    spec = importlib.util.find_spec("fla")
    if spec is None or spec.origin is None:
        pytest.skip("flash-linear-attention (fla-core) is not installed")
    path = os.path.join(os.path.dirname(spec.origin), rel)
    if not os.path.isfile(path):
        pytest.skip(f"fla has no {rel}")
    module_spec = importlib.util.spec_from_file_location("fla_naive_" + rel.replace("/", "_")[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def has_generated_backward(cell) -> bool:
    """Whether the cell's loop runs with its generated backward through time (its module defines one)."""
    return hasattr(sys.modules[type(cell).__module__], "_recurrence_loop_backward")


def count_calls(monkeypatch, cell, name: str) -> list:
    """Wrap the global `name` of the cell's generated module so each call is recorded; returns the list
    of calls (one entry per call). The generated code looks its runtime functions up as module globals
    at call time, so this observes what a forward really runs, not what its source text mentions."""
    module = sys.modules[type(cell).__module__]
    inner, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(name)
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def slow_except(cases, fast) -> list:
    """pytest params for `cases` (tuples of arguments), those not in `fast` marked `slow`: the fast suite
    (CI, -m "not slow") keeps a subset of a grid that still reaches each path, `-m slow` runs the rest."""
    cases, fast = [tuple(c) for c in cases], {tuple(c) for c in fast}
    assert fast <= set(cases), f"fast cases outside the grid: {sorted(fast - set(cases))}"
    return [pytest.param(*c, marks=[] if c in fast else [pytest.mark.slow]) for c in cases]

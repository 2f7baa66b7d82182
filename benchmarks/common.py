"""Timing and input helpers shared by the benchmark scripts (run as `python benchmarks/X.py`)."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import rnnc


def median_ms(fn, repeats: int, warmup: int = 3, clock=time.perf_counter) -> float:
    """Median wall time (or `clock`'s time) of fn() in ms, after `warmup` calls. Several warm-up calls
    matter on CPU: the first calls with large tensors pay page faults until glibc's malloc raises its
    mmap threshold, a cost a training loop pays once."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append((clock() - t) * 1e3)
    return statistics.median(times)


def cpu_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median CPU time of this process per fn() in ms: on a shared host, where wall time counts the
    waits for a core, about what an idle core takes (one thread)."""
    return median_ms(fn, repeats, warmup, clock=time.process_time)


def fwd_bwd(cell, xs):
    """One forward+backward of the (first) output's sum, as a callable for median_ms."""
    def run():
        y, _ = cell(*xs)
        y.sum().backward()
    return run


def head_inputs(spec: str, B: int, T: int, H: int, K: int, seed: int = 0) -> list[torch.Tensor]:
    """Inputs of a linear-attention-style cell with heads as an extra axis: [B, T, H, K] for
    vectors (K = V), [B, T, H] for scalars; log-space gates g and w, beta in (0, 1), unit keys."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for port in rnnc.load(spec).cell().inputs:
        x = torch.randn(B, T, H, *[K] * len(port.shape), generator=gen)
        if port.name in ("g", "w"):  # log-space decays
            x = F.logsigmoid(x + 3)
        elif port.name == "beta":
            x = torch.sigmoid(x)
        elif port.name == "k":
            x = F.normalize(x, dim=-1)
        out.append(x.requires_grad_())
    return out


def gdelta_inputs(spec: str, cell: str | None, B: int, T: int, H: int, K: int, device="cpu",
                  dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """[B, T, H, *shape] inputs of a generalized-delta-rule (or mLSTM) cell, each in its range: log-decays
    g/w, beta and RWKV-7's a in (0, 1), unit keys k/kk, mLSTM's forget-gate pre-activations about 3
    (K = V; a literal size in a shape, DeltaProduct's n_h, as written)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for port in rnnc.load(spec).cell(cell).inputs:
        dims = [K if str(d) in ("K", "V") else int(d) for d in port.shape]
        x = torch.randn(B, T, H, *dims, generator=gen, device=device)
        if port.name in ("g", "w"):
            x = F.logsigmoid(x + 3)
        elif port.name in ("beta", "a"):
            x = torch.sigmoid(x)
        elif port.name in ("k", "kk"):
            x = F.normalize(x, dim=-1)
        elif port.name == "fgate":
            x = x + 3
        out.append(x.to(dtype).requires_grad_())
    return out

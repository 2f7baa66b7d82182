"""CPU benchmark: mLSTM (xLSTM's matrix memory with normaliser and max-stabiliser) on the chunk backend
(C and n in one chunk pass after a max-plus scan of the stabiliser) against the loop, fp32,
forward+backward of the output's sum.

    python benchmarks/bench_mlstm.py [--repeats 3] [--warmup 1] [--T 2048]

Shape from issue 10: B=2, T=2048, H=4 (heads as the extra dim), K=V=64; gate pre-activations with input
gates up to +10 (the stabiliser active). Outputs and final states are checked against the loop at
T=256 first. Both timings run in this process, interleaved (loop, chunk, loop, chunk, ...).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import rnnc

B, H, K = 2, 4, 64


def inputs(T: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
    igate = 5 * torch.randn(B, T, H, generator=gen)
    fgate = torch.randn(B, T, H, generator=gen) + 3
    return [x.requires_grad_() for x in (q, k, v, igate, fgate)]


def fwd_bwd(cell, xs) -> float:
    t = time.perf_counter()
    y, _ = cell(*xs)
    y.sum().backward()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--T", type=int, default=2048)
    args = ap.parse_args()
    loop, chunk = rnnc.build("mlstm", backend="loop"), rnnc.build("mlstm", backend="chunk")
    xs = inputs(256)
    with torch.no_grad():
        (y1, f1), (y2, f2) = loop(*xs), chunk(*xs)
    err = max([((y1 - y2).abs().max() / y1.abs().max()).item()]
              + [((f1[s] - f2[s]).abs().max() / f1[s].abs().max()).item() for s in f1])
    print(f"check at T=256: max relative difference chunk vs loop {err:.1e}")
    assert err < 1e-2  # the loop itself is ~1e-3 from float64 here: h divides by |q . n|, which can be small
    xs = inputs(args.T)
    for _ in range(args.warmup):
        fwd_bwd(loop, xs), fwd_bwd(chunk, xs)
    times = {"loop": [], "chunk": []}
    for _ in range(args.repeats):
        times["loop"].append(fwd_bwd(loop, xs))
        times["chunk"].append(fwd_bwd(chunk, xs))
    lo, ch = statistics.median(times["loop"]), statistics.median(times["chunk"])
    print(f"mlstm B={B} T={args.T} H={H} K=V={K} fwd+bwd fp32, {torch.get_num_threads()} threads: "
          f"loop {lo:.0f} ms, chunk {ch:.0f} ms, loop / chunk {lo / ch:.1f}x "
          f"(all: loop {[round(t) for t in times['loop']]}, chunk {[round(t) for t in times['chunk']]})")


if __name__ == "__main__":
    main()

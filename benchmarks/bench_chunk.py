"""CPU benchmark: the chunk backend against the loop backend, and simple_gla against fla's
pure-PyTorch chunked reference (fp32, forward+backward).

    python benchmarks/bench_chunk.py [--repeats 3]

Shape from issue 3: B=2, T=2048, H=4, K=V=64 (heads as the extra dim: inputs [B, T, H, K]).
The peer is flash-linear-attention's `naive_chunk_simple_gla` (optional: `pip install fla-core`),
loaded by file path so triton is not imported, called with scale=1 on the same inputs.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import torch
import torch.nn.functional as F

import rnnc

B, T, H, K = 2, 2048, 4, 64


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def inputs(name: str):
    g = torch.Generator().manual_seed(0)
    out = []
    for p in rnnc.load(name).cell().inputs:
        shape = [B, T, H] + [K] * len(p.shape)
        x = torch.randn(*shape, generator=g)
        if p.name == "g":
            x = F.logsigmoid(x + 3)
        elif p.name == "beta":
            x = torch.sigmoid(x)
        elif p.name == "k":
            x = F.normalize(x, dim=-1)
        out.append(x.requires_grad_())
    return out


def fwd_bwd(cell, xs):
    def run():
        y, _ = cell(*xs)
        y.sum().backward()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; B={B} T={T} H={H} K=V={K}")
    print("| cell | loop (ms) | chunk (ms) | loop / chunk |")
    print("|---|---:|---:|---:|")
    for name in ("gla", "simple_gla", "gated_deltanet"):
        xs = inputs(name)
        loop, chunk = rnnc.build(name, backend="loop"), rnnc.build(name, backend="chunk")
        with torch.no_grad():
            a, b = loop(*xs)[0], chunk(*xs)[0]
            assert (a - b).abs().max() <= 1e-3 * a.abs().max(), name
        tl = timed(fwd_bwd(loop, xs), args.repeats)
        tc = timed(fwd_bwd(chunk, xs), args.repeats)
        print(f"| {name} | {tl:.0f} | {tc:.0f} | {tl / tc:.1f}× |")
    try:
        spec = importlib.util.find_spec("fla")
    except ImportError:
        spec = None
    if spec is None:
        print("\nfla-core is not installed: peer comparison skipped")
        return
    path = os.path.join(os.path.dirname(spec.origin), "ops", "simple_gla", "naive.py")
    mspec = importlib.util.spec_from_file_location("fla_simple_gla_naive", path)
    naive = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(naive)
    q, k, v, g = inputs("simple_gla")
    cell = rnnc.build("simple_gla", backend="chunk")
    with torch.no_grad():
        ref = naive.naive_chunk_simple_gla(q, k, v, g, scale=1.0)[0]
        assert (cell(q, k, v, g)[0] - ref).abs().max() <= 1e-3 * ref.abs().max()

    def peer():
        o = naive.naive_chunk_simple_gla(q, k, v, g, scale=1.0)[0]
        o.sum().backward()

    tp = timed(peer, args.repeats)
    tc = timed(fwd_bwd(cell, (q, k, v, g)), args.repeats)
    print("\n| simple_gla | fla naive_chunk_simple_gla (ms) | rnnc chunk (ms) | peer / rnnc |")
    print("|---|---:|---:|---:|")
    print(f"| B={B} T={T} H={H} K=V={K} | {tp:.0f} | {tc:.0f} | {tp / tc:.2f}× |")


if __name__ == "__main__":
    main()

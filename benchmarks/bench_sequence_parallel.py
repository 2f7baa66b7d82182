"""What sequence parallelism costs a rank in local work: rnnc.SequenceParallel in a world of one process
(so no waiting for other ranks, and the same T steps as the plain cell) against the plain cell, forward
and forward+backward, process CPU time with one thread.

The difference is the primitives' extra work for the slice map: the cumulative gates of elementwise scans,
the second matrix scan and the product tree of dense/block ones, the K identity value columns of the delta
rule and the generalized delta rule, the readout correction of the chunk forms. Communication is not
measured (one process; a few state-sized all-gathers per primitive and call).

    python benchmarks/bench_sequence_parallel.py [--length 1024] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist

import rnnc
from common import cpu_ms, head_inputs

CELLS = [("mingru", "scan", {"I": 64, "H": 64}), ("lru", "scan", {"H": 64, "N": 64}),
         ("gla", "chunk", {}), ("simple_gla", "chunk", {}), ("gated_deltanet", "chunk", {}), ("kda", "chunk", {}),
         ("mlstm", "chunk", {})]


def _inputs(name: str, dims: dict, T: int) -> list[torch.Tensor]:
    if name in ("mingru",):
        return [torch.randn(4, T, dims["I"], requires_grad=True)]
    if name == "lru":
        return [torch.randn(4, T, dims["H"], requires_grad=True)]
    return head_inputs(name, 4, T, 4, 32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    init = os.path.join(tempfile.mkdtemp(), "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    print(f"T = {args.length}, B = 4 (4 heads of K = V = 32 for the chunk cells), CPU ms (median of {args.repeat})")
    print("| cell | backend | forward: cell / SequenceParallel | forward+backward: cell / SequenceParallel |")
    print("|---|---|---:|---:|")
    for name, backend, dims in CELLS:
        cell = rnnc.build(name, backend=backend, **dims)
        sp = rnnc.SequenceParallel(cell)
        xs = _inputs(name, dims, args.length)

        def fwd(m):
            def run():
                with torch.no_grad():
                    m(*xs)
            return run

        def fwd_bwd(m):
            def run():
                y, _ = m(*xs)
                y.sum().backward()
            return run
        f = [cpu_ms(fwd(m), args.repeat, 1) for m in (cell, sp)]
        b = [cpu_ms(fwd_bwd(m), args.repeat, 1) for m in (cell, sp)]
        print(f"| {name} | {backend} | {f[0]:.1f} / {f[1]:.1f} ({f[1] / f[0]:.2f}x) | "
              f"{b[0]:.1f} / {b[1]:.1f} ({b[1] / b[0]:.2f}x) |", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""torch.compile of a built cell: the time of the first call at one sequence length (the compilation),
then of the first call at a second length, and how many graphs Dynamo compiled in all.

    python benchmarks/bench_compile.py                       # lstm on the loop, inductor, T = 256 then 300
    python benchmarks/bench_compile.py --cell gla --rnnc-backend chunk -D K=64 -D V=64

The recurrence is one custom op (rnnc/runtime/opaque.py) whose fake gives the output shapes for any T,
so with `dynamic=True` the second length runs the same compiled graph: the report says how many graphs
there were (1 is the goal) and checks the compiled outputs and gradients against eager ones.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import rnnc



def inputs(name: str, cell, B: int, T: int) -> list[torch.Tensor]:
    """Random [B, T, *declared] inputs (log-space decays for inputs named g, w), requiring grad."""
    xs = []
    for p in rnnc.load(name).cell().inputs:
        x = torch.randn(B, T, *[cell.dims[str(d)] if str(d) in cell.dims else int(d) for d in p.shape])
        xs.append((torch.nn.functional.logsigmoid(x + 3) if p.name in ("g", "w") else x).requires_grad_())
    return xs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="lstm")
    parser.add_argument("--rnnc-backend", default="loop")
    parser.add_argument("--backend-compile", default="inductor", help="torch.compile's backend (inductor)")
    parser.add_argument("--lengths", type=int, nargs=2, default=[256, 300])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("-D", action="append", default=[], metavar="NAME=INT", help="dims, e.g. -D H=128 -D I=128")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = {k: int(v) for k, v in (d.split("=") for d in args.D)} or ({"I": 128, "H": 128} if args.cell == "lstm" else {})
    torch.manual_seed(0)
    cell = rnnc.build(args.cell, backend=args.rnnc_backend, **dims)
    compiled = torch.compile(cell, fullgraph=True, dynamic=True, backend=args.backend_compile)
    torch._dynamo.reset()
    counters.clear()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.cell} ({args.rnnc_backend}) {dims}, "
          f"B={args.batch}, torch.compile(fullgraph=True, dynamic=True, backend={args.backend_compile!r})")
    print("| T | first call, fwd+bwd (s) | second call (s) | eager call (s) | max abs diff (outputs, grads) |")
    print("|---|---:|---:|---:|---:|")
    for T in args.lengths:
        torch.manual_seed(T)
        xs = inputs(args.cell, cell, args.batch, T)
        times, results = [], []
        for module in (compiled, compiled, cell):
            t0 = time.perf_counter()
            out = module(*xs)[0]
            grads = torch.autograd.grad(out.sum(), xs)
            times.append(time.perf_counter() - t0)
            results.append((out.detach(), grads))
        diff = max([(results[0][0] - results[2][0]).abs().max().item()]
                   + [(a - b).abs().max().item() for a, b in zip(results[0][1], results[2][1])])
        print(f"| {T} | {times[0]:.2f} | {times[1]:.3f} | {times[2]:.3f} | {diff:.1e} |", flush=True)
    print(f"graphs compiled: {counters['stats']['unique_graphs']}")


if __name__ == "__main__":
    main()

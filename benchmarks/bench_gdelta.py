"""CPU benchmark: the generalized delta rule (kda, rwkv7, deltaproduct) on the chunk backend against
the loop, and against fla's pure-PyTorch chunked references where they exist (fp32, forward+backward).

    python benchmarks/bench_gdelta.py [--repeats 3] [--warmup 2] [--cells kda,rwkv7,deltaproduct] [--no-peer]
                                      [--threads 1 --cpu]

On a shared host, `--threads 1 --cpu` (one torch thread, the process's CPU time) is the comparable figure.

Shape from issue 10: B=2, T=2048, H=4, K=V=64 (heads as the extra dim: inputs [B, T, H, ...]).
Peers (optional: `pip install fla-core`; loaded by file path, so triton is not imported):
naive_chunk_kda (64-step chunks, its default scale K^-1/2 as the spec) for kda, and the DPLR chunked reference dplr_chunkwise
(head-first, 32-step chunks) that fla's RWKV-7 chunk op stands on for rwkv7. fla has no pure-PyTorch
chunked DeltaProduct (its chunk_ref calls Triton kernels). Each timing runs in a fresh Python process
(median of --repeats after --warmup calls); outputs are checked against the loop (and the peer) first.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

import torch

import rnnc
from common import cpu_ms, gdelta_inputs, median_ms

B, T, H, K = 2, 2048, 4, 64
CELLS = {"kda": ("kda", None), "rwkv7": ("rwkv7", None), "deltaproduct": ("deltaproduct", None),
         "deltaproduct3": ("deltaproduct", "deltaproduct3")}


def inputs(name: str, seed: int = 0) -> list[torch.Tensor]:
    """[B, T, H, *shape] inputs in each cell's range: log-decays, beta and RWKV-7's a in (0, 1), unit keys."""
    return gdelta_inputs(*CELLS[name], B, T, H, K, seed=seed)


def _fla_naive(family: str):
    try:
        spec = importlib.util.find_spec("fla")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "ops", *family.split("/"), "naive.py")
    mspec = importlib.util.spec_from_file_location(f"fla_naive_{family.replace('/', '_')}", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module


def peer(name: str):
    """fla's pure-PyTorch chunked reference for the cell as a function of its inputs (o only), or None."""
    if name == "kda":
        naive = _fla_naive("kda")
        return None if naive is None else \
            (lambda q, k, v, g, beta: naive.naive_chunk_kda(q, k, v, g, beta, chunk_size=64)[0])
    if name == "rwkv7":
        naive = _fla_naive("generalized_delta_rule/dplr")
        if naive is None:
            return None
        hf = lambda t: t.transpose(1, 2)  # noqa: E731  [B, T, H, D] <-> [B, H, T, D]
        # its q is scaled by K^-1/2 inside: r * sqrt(K) gives RWKV-7's scale 1
        return lambda r, w, k, v, kk, a: hf(naive.dplr_chunkwise(hf(r * K ** 0.5), hf(k), hf(v), hf(-kk), hf(kk * a),
                                                                 hf(w), chunk_size=32)[0])
    return None


def time_here(name: str, backend: str, repeats: int, warmup: int, chunk_size: int | None,
              cpu: bool = False) -> float:
    timer = cpu_ms if cpu else median_ms
    xs = inputs(name)
    if backend == "fla":
        fn = peer(name)

        def run():
            fn(*xs).sum().backward()
        return timer(run, repeats, warmup)
    spec, cell_name = CELLS[name]
    cell = rnnc.build(spec, cell=cell_name, backend=backend, chunk_size=chunk_size if backend == "chunk" else None)

    def run():
        cell(*xs)[0].sum().backward()
    return timer(run, repeats, warmup)


def time_isolated(name: str, backend: str, args) -> float:
    """time_here in a fresh Python process (a fresh allocator for each backend, as bench_chunk.py)."""
    repeats, warmup = (args.loop_repeats, 1) if backend == "loop" else (args.repeats, args.warmup)
    cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{name}:{backend}", "--repeats", str(repeats),
           "--warmup", str(warmup)]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.cpu:
        cmd.append("--cpu")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def check(name: str) -> None:
    """The chunk form against the loop (and the peer) at T = 256 before timing anything."""
    global T
    saved, T = T, 256
    try:
        xs = inputs(name)
        spec, cell_name = CELLS[name]
        with torch.no_grad():
            a = rnnc.build(spec, cell=cell_name, backend="loop")(*xs)[0]
            b = rnnc.build(spec, cell=cell_name, backend="chunk")(*xs)[0]
            assert (a - b).abs().max() <= 1e-3 * a.abs().max(), name
            fn = peer(name)
            if fn is not None:
                c = fn(*xs)
                assert (a - c).abs().max() <= 1e-3 * a.abs().max(), f"{name}: the peer disagrees"
    finally:
        T = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-repeats", type=int, default=1, help="timed loop calls (one warm-up; default 1)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before timing the chunk form and peers")
    ap.add_argument("--cells", default="kda,rwkv7,deltaproduct")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--cpu", action="store_true", help="time the process's CPU time instead of wall time")
    ap.add_argument("--one", metavar="CELL:BACKEND", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.one:
        name, backend = args.one.split(":")
        print(f"{time_here(name, backend, args.repeats, args.warmup, args.chunk_size, args.cpu):.3f}")
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {'CPU' if args.cpu else 'wall'} time; B={B} T={T} H={H} K=V={K}; fp32 fwd+bwd; "
          f"chunk/peer median of {args.repeats} after {args.warmup} warm-ups, loop median of {args.loop_repeats} "
          "after 1; each timing in a fresh process")
    rows = []
    for name in args.cells.split(","):
        check(name)
        tl = time_isolated(name, "loop", args)
        tc = time_isolated(name, "chunk", args)
        tp = None if args.no_peer or peer(name) is None else time_isolated(name, "fla", args)
        rows.append((name, tl, tc, tp))
        print(f"{name}: loop {tl:.0f} ms, chunk {tc:.0f} ms" + ("" if tp is None else f", fla {tp:.0f} ms"),
              flush=True)
    print("\n| cell | loop (ms) | chunk (ms) | loop / chunk | fla pure-PyTorch chunk (ms) | fla / rnnc |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, tl, tc, tp in rows:
        fla = "—" if tp is None else f"{tp:.0f}"
        ratio = "—" if tp is None else f"{tp / tc:.2f}×"
        print(f"| {name} | {tl:.0f} | {tc:.0f} | {tl / tc:.1f}× | {fla} | {ratio} |")


if __name__ == "__main__":
    main()

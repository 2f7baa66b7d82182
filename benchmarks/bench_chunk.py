"""CPU benchmark: the chunk backend against the loop backend, and simple_gla against fla's
pure-PyTorch chunked reference (fp32, forward+backward).

    python benchmarks/bench_chunk.py [--repeats 3] [--warmup 3] [--cells gla,rwkv6] [--chunk-size 16] [--same-process]

Shape from issue 3: B=2, T=2048, H=4, K=V=64 (heads as the extra dim: inputs [B, T, H, K]; retnet and
mamba2 declare them as the dim NH = 4, mamba2 with P = N = 64).
The peer is flash-linear-attention's `naive_chunk_simple_gla` (optional: `pip install fla-core`),
loaded by file path so triton is not imported, called with its default scale K^-1/2 (the spec's) on the same inputs.
Each timing runs in a fresh Python process (median of --repeats after --warmup calls); outputs are
checked against the loop (and the peer) first.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

import torch

import rnnc
from common import fwd_bwd, head_inputs, median_ms

B, T, H, K = 2, 2048, 4, 64


WARMUP = 3


def timed(fn, repeats: int) -> float:
    """Median ms of `repeats` calls after WARMUP warm-ups (benchmarks/common.py: the allocator settles)."""
    return median_ms(fn, repeats, WARMUP)


#: Cells that declare their heads as the dim NH (per-head constants or params): inputs [B, T, NH, ...].
HEAD_DIM_CELLS = ("retnet", "mamba2")


def inputs(name: str):
    if name not in HEAD_DIM_CELLS:
        return head_inputs(name, B, T, H, K)
    sizes = {"NH": H, "K": K, "V": K, "P": K, "N": K}  # mamba2: head width P and state size N as K, V
    gen = torch.Generator().manual_seed(0)
    out = []
    for port in rnnc.load(name).cell().inputs:
        x = torch.randn(B, T, *[sizes[str(d)] for d in port.shape], generator=gen)
        if port.name == "dt":  # Mamba-2's step, positive
            x = torch.nn.functional.softplus(x - 1)
        out.append(x.requires_grad_())
    return out


def _fla_naive():
    """fla's naive simple GLA module, loaded by file path (so triton is not imported), or None."""
    try:
        spec = importlib.util.find_spec("fla")
    except ImportError:
        spec = None
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "ops", "simple_gla", "naive.py")
    mspec = importlib.util.spec_from_file_location("fla_simple_gla_naive", path)
    naive = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(naive)
    return naive


def _dims(name: str) -> dict:
    if name in HEAD_DIM_CELLS:
        return {"NH": H}  # mamba2's A_log and D are params: [NH]
    return {"K": K} if name == "rwkv6" else {}  # rwkv6's bonus u is a param: [K]


def time_here(name: str, backend: str, repeats: int, chunk_size: int | None) -> float:
    """Median ms of forward+backward of one cell on one backend ("fla": fla's naive simple GLA)."""
    xs = inputs(name)
    if backend == "fla":
        naive = _fla_naive()

        def peer():
            naive.naive_chunk_simple_gla(*xs)[0].sum().backward()
        return timed(peer, repeats)
    cell = rnnc.build(name, backend=backend, chunk_size=chunk_size if backend == "chunk" else None, **_dims(name))
    return timed(fwd_bwd(cell, xs), repeats)


def time_isolated(name: str, backend: str, args) -> float:
    """time_here in a fresh Python process: each backend meets a fresh allocator (the loop's
    millions of small tensors leave glibc's heap in a state that makes later large tensors fault)."""
    if args.same_process:
        return time_here(name, backend, args.repeats, args.chunk_size)
    cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{name}:{backend}", "--repeats", str(args.repeats),
           "--warmup", str(args.warmup)]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cells", default="gla,simple_gla,gated_deltanet,rwkv6",
                    help="comma-separated cells for the loop-vs-chunk table")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="the chunk backend's steps per chunk (default: its choice per cell)")
    ap.add_argument("--no-peer", action="store_true", help="skip the comparison with fla")
    ap.add_argument("--same-process", action="store_true",
                    help="time every backend in this process, one after another (default: each in a fresh one)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    ap.add_argument("--one", metavar="CELL:BACKEND", help=argparse.SUPPRESS)  # a child's single timing
    args = ap.parse_args()
    global WARMUP
    WARMUP = args.warmup
    if args.one:
        name, backend = args.one.split(":")
        print(f"{time_here(name, backend, args.repeats, args.chunk_size):.3f}")
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; B={B} T={T} H={H} K=V={K}; median of "
          f"{args.repeats} after {args.warmup} warm-ups, "
          f"{'one process' if args.same_process else 'each backend timed in a fresh process'}")
    print("| cell | loop (ms) | chunk (ms) | loop / chunk |")
    print("|---|---:|---:|---:|")
    for name in args.cells.split(","):
        xs = inputs(name)
        loop = rnnc.build(name, backend="loop", **_dims(name))
        chunk = rnnc.build(name, backend="chunk", chunk_size=args.chunk_size, **_dims(name))
        chunk.load_state_dict(loop.state_dict())
        with torch.no_grad():
            a, b = loop(*xs)[0], chunk(*xs)[0]
            assert (a - b).abs().max() <= 1e-3 * a.abs().max(), name
        tl = time_isolated(name, "loop", args)
        tc = time_isolated(name, "chunk", args)
        print(f"| {name} | {tl:.0f} | {tc:.0f} | {tl / tc:.1f}× |")
    if args.no_peer:
        return
    naive = _fla_naive()
    if naive is None:
        print("\nfla-core is not installed: peer comparison skipped")
        return
    q, k, v, g = inputs("simple_gla")
    cell = rnnc.build("simple_gla", backend="chunk")
    with torch.no_grad():
        ref = naive.naive_chunk_simple_gla(q, k, v, g)[0]  # both K^-1/2
        assert (cell(q, k, v, g)[0] - ref).abs().max() <= 1e-3 * ref.abs().max()
    tp = time_isolated("simple_gla", "fla", args)
    tc = time_isolated("simple_gla", "chunk", args)
    print("\n| simple_gla | fla naive_chunk_simple_gla (ms) | rnnc chunk (ms) | peer / rnnc |")
    print("|---|---:|---:|---:|")
    print(f"| B={B} T={T} H={H} K=V={K} | {tp:.0f} | {tc:.0f} | {tp / tc:.2f}× |")


if __name__ == "__main__":
    main()

"""CPU benchmark: the matrix scan (dense and block transitions) against the loop, fp32.

    python benchmarks/bench_matscan.py [--repeats 3] [--skip-crossover]

1. The issue's cases, B=4, T=16384, forward and forward+backward (the loop, seconds per call
   here, timed once; the scan median of --repeats after a warm-up):
   - lsrl_modcounter: LSRL's modulo counters as one width-8 LinState (a constant dense 8×8 A);
   - lru with N=64 modes, H=64 channels (a 2×2 block per mode, constant in time).
2. The crossover that sets schedule.MATRIX_AUTO_PER_STEP: a vector state with a dense n×n transition
   that changes every step (`s = A_t @ s + x_t`, A_t an input) and one constant in time
   (`s = A @ s + x_t`, A a param), B=4, T=1024, forward+backward, n = 2 … 32 (per step), 8 … 256
   (constant).
"""
from __future__ import annotations

import argparse

import torch

import rnnc
from common import fwd_bwd, median_ms


def _forward(cell, xs):
    def run():
        with torch.no_grad():
            cell(*xs)
    return run


def _pair(spec, **dims):
    torch.manual_seed(0)
    loop = rnnc.build(spec, backend="loop", **dims)
    scan = rnnc.build(spec, backend="scan", **dims)
    scan.load_state_dict(loop.state_dict())
    return loop, scan


def issue_cases(repeats: int, cells: list[str]) -> None:
    print("| cell | B | T | pass | loop (ms) | scan (ms) | loop / scan |")
    print("|---|---:|---:|---|---:|---:|---:|")
    B, T = 4, 16384
    for spec, dims, width in (("lsrl_modcounter", {}, 1), ("lru", {"H": 64, "N": 64}, 64)):
        if spec not in cells:
            continue
        loop, scan = _pair(spec, **dims)
        x = torch.randn(B, T, width, requires_grad=True)
        with torch.no_grad():
            torch.testing.assert_close(scan(x)[0], loop(x)[0], rtol=1e-3, atol=1e-3)
        for name, make in (("fwd", _forward), ("fwd+bwd", fwd_bwd)):
            lo = median_ms(make(loop, [x]), 1, warmup=0)  # seconds per call: one timed call
            sc = median_ms(make(scan, [x]), repeats, warmup=1)
            print(f"| {spec} | {B} | {T} | {name} | {lo:.1f} | {sc:.1f} | {lo / sc:.1f}× |", flush=True)


PER_STEP = "cell c(x: [K], A: [K, K]) -> (y: [K]) {\n state s: [K] = 0\n s = A @ s + x\n y = s }"
CONSTANT = "cell c(x: [K]) -> (y: [K]) {\n param A: [K, K] ~ normal(0, 1 / K)\n state s: [K] = 0\n s = A @ s + x\n y = s }"


def crossover(repeats: int) -> None:
    print("\n| A | n | B | T | loop (ms) | scan (ms) | loop / scan |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    B, T = 4, 1024
    for kind, text in (("per step", PER_STEP), ("constant", CONSTANT)):
        for n in (2, 4, 8, 16, 32) if kind == "per step" else (8, 64, 256):
            loop, scan = _pair(text, K=n)
            x = torch.randn(B, T, n, requires_grad=True)
            xs = [x] if kind == "constant" else [x, (torch.randn(B, T, n, n) / n ** 0.5).requires_grad_()]
            lo = median_ms(fwd_bwd(loop, xs), repeats, warmup=1)
            sc = median_ms(fwd_bwd(scan, xs), repeats, warmup=1)
            print(f"| {kind} | {n} | {B} | {T} | {lo:.1f} | {sc:.1f} | {lo / sc:.2f}× |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-crossover", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); on a shared, "
                    "loaded machine 1 keeps a parallel op from waiting for a second core's time slice")
    ap.add_argument("--cells", default="lsrl_modcounter,lru", help="the issue's cases to run (comma-separated)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    issue_cases(args.repeats, args.cells.split(","))
    if not args.skip_crossover:
        crossover(args.repeats)


if __name__ == "__main__":
    main()

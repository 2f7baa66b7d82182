"""CPU benchmark: where the parallel lowerings overtake the loop (fp32, forward+backward).

    python benchmarks/bench_crossover.py [--repeats 7]

Sets `LOOP_BELOW` in rnnc/schedule.py: with backend="auto", a built module runs sequences shorter
than that on the loop. Times the loop against the scan (mingru, three widths) and against the
chunk form (gla, simple_gla, gated_deltanet at B=2, H=4, K=V=64) for short lengths; prints the
median milliseconds of forward+backward per call.
"""
from __future__ import annotations

import argparse

import torch

import rnnc
from common import fwd_bwd, head_inputs, median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    print("| cell | shape | T | loop (ms) | parallel (ms) |")
    print("|---|---|---|---|---|")
    for B, D in ((1, 64), (4, 256), (8, 1024)):
        loop = rnnc.build("mingru", backend="loop", I=D, H=D)
        scan = rnnc.build("mingru", backend="scan", I=D, H=D)
        for T in (1, 4, 16, 32, 64, 256):
            x = torch.randn(B, T, D, requires_grad=True)
            print(f"| mingru (scan) | B={B} D={D} | {T} | {median_ms(fwd_bwd(loop, [x]), args.repeats, 1):.2f} "
                  f"| {median_ms(fwd_bwd(scan, [x]), args.repeats, 1):.2f} |", flush=True)
    B, H, K = 2, 4, 64
    for name in ("gla", "simple_gla", "gated_deltanet"):
        loop = rnnc.build(name, backend="loop", K=K, V=K)
        chunk = rnnc.build(name, backend="chunk", K=K, V=K)
        for T in (1, 4, 8, 16, 64):
            xs = head_inputs(name, B, T, H, K)
            print(f"| {name} (chunk) | B={B} H={H} K=V={K} | {T} | {median_ms(fwd_bwd(loop, xs), args.repeats, 1):.2f} "
                  f"| {median_ms(fwd_bwd(chunk, xs), args.repeats, 1):.2f} |", flush=True)


if __name__ == "__main__":
    main()

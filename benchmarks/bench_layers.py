"""CPU benchmark: cells whose states are linear once earlier states are known (stacks of linear
layers), on the loop and as staged parallel scans (fp32, forward+backward).

    python benchmarks/bench_layers.py [--repeats 5]

`lsrl_majority` (two independent counters, LSRL primitives) and a three-layer stack whose second
and third layers are gated by the layers below (tests/test_layers.py's STACK, widened to D).
"""
from __future__ import annotations

import argparse

import torch

import rnnc
from common import fwd_bwd, median_ms

STACK = """cell stack(x: [D]) -> (y: [D]) {
    state n: [D] = 0
    state s: [D] = 0
    state u: [D] = 1
    n = 0.9 * n + x
    s = sigmoid(n) * s + tanh(x)
    u = exp(-abs(s)) * u + n * s
    y = u + s
}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| cell | B | T | D | loop (ms) | scan (ms) | loop / scan |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, spec, D in [("lsrl_majority", "lsrl_majority", 1), ("stack", STACK, 64)]:
        for B, T in [(8, 64), (8, 1024), (1, 8192)]:
            dims = {} if name == "lsrl_majority" else {"D": D}
            loop = rnnc.build(spec, backend="loop", **dims)
            scan = rnnc.build(spec, backend="scan", **dims)
            x = (torch.rand(B, T, D) > 0.5).float().requires_grad_()
            with torch.no_grad():
                torch.testing.assert_close(scan(x)[0], loop(x)[0], rtol=1e-4, atol=1e-4)
            lo = median_ms(fwd_bwd(loop, [x]), args.repeats, warmup=1)
            sc = median_ms(fwd_bwd(scan, [x]), args.repeats, warmup=1)
            print(f"| {name} | {B} | {T} | {D} | {lo:.1f} | {sc:.1f} | {lo / sc:.1f}× |")


if __name__ == "__main__":
    main()

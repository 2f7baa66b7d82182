"""CPU benchmark: Newton's method over time (backend "newton") against the loop on diagonal-Jacobian cells.

    python benchmarks/bench_newton.py [--cells paragru,indrnn] [--hidden 64,256] [--lengths 1024,4096,16384]
                                      [--batch 4] [--repeats 3]

Issue 11's shapes: paragru and indrnn (diagonal Jacobians, the case ParaRNN and DEER say Newton pays
for), B=4, H = I = 64 and 256, T = 1024, 4096, 16384, fp32; forward (no grad) and forward+backward
(the sum of the outputs). Both backends hoist the input projection; the difference is the recurrence:
the loop's T steps against Newton's few iterations of all-steps-at-once evaluations and parallel scans
(iterations reported). Each configuration builds both modules with the same params.
"""
from __future__ import annotations

import argparse
import os

import torch

import rnnc
from common import cpu_ms, fwd_bwd


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="paragru,indrnn")
    ap.add_argument("--hidden", type=_ints, default=[64, 256])
    ap.add_argument("--lengths", type=_ints, default=[1024, 4096, 16384])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine, 2 threads made every op ~20x slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={args.batch}, fp32, CPU time of this "
          f"process (median of {args.repeats}), load average {os.getloadavg()[0]:.1f}")
    print("| cell | H | T | loop fwd (ms) | newton fwd (ms) | speed-up | loop fwd+bwd (ms) | newton fwd+bwd (ms) "
          "| speed-up | iterations | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.cells.split(","):
        for H in args.hidden:
            torch.manual_seed(0)
            loop = rnnc.build(name, backend="loop", H=H, I=H)
            newton = rnnc.build(name, backend="newton", H=H, I=H)
            newton.load_state_dict(loop.state_dict())
            for T in args.lengths:
                x = torch.randn(args.batch, T, H)
                xs = [x.requires_grad_()]
                warm = 1 if T * H > 2**20 else 2
                row = []
                for cell in (loop, newton):
                    def forward(cell=cell):
                        with torch.no_grad():
                            cell(x)
                    row.append(cpu_ms(forward, args.repeats, warm))
                its = newton.newton_info["iterations"]
                for cell in (loop, newton):
                    row.append(cpu_ms(fwd_bwd(cell, xs), args.repeats, warm))
                print(f"| {name} | {H} | {T} | {row[0]:.0f} | {row[1]:.0f} | {row[0] / row[1]:.1f}× | {row[2]:.0f} "
                      f"| {row[3]:.0f} | {row[2] / row[3]:.1f}× | {its} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()

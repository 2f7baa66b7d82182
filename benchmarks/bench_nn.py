#!/usr/bin/env python
"""CPU benchmark: the drop-in `rnnc.nn.LSTM` against `torch.nn.LSTM`, same weights, same call.

    python benchmarks/bench_nn.py                 # both shapes (several minutes on 2 busy cores)
    python benchmarks/bench_nn.py --case small    # B=16, H=128 only

One fp32 layer, time-major input [T, B, I] with I = H, T = 256, at (B=16, H=128) and (B=64, H=512):
the forward under torch.inference_mode(), and forward + backward of out.sum() with respect to the
input and every parameter. rnnc.nn.LSTM loads torch's state_dict and its output is checked against
torch's first. The four measurements run in interleaved rounds (rnnc.bench.measure: each round calls
each once, in turn), so background load hits both sides alike; reported are the median, the
quartiles and the extremes of each.
"""
from __future__ import annotations

import argparse
import os

import torch

import rnnc
from rnnc.bench import measure

CASES = {"small": (16, 128), "large": (64, 512)}  # (B, H); I = H, T = 256
T = 256


def jobs(B: int, H: int) -> dict:
    torch.manual_seed(0)
    ref = torch.nn.LSTM(H, H)
    ours = rnnc.nn.LSTM(H, H)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)
    xg = x.clone().requires_grad_()

    def forward(module):
        def run():
            with torch.inference_mode():
                module(x)
        return run

    def forward_backward(module):
        def run():
            xg.grad = None
            module.zero_grad(set_to_none=True)
            module(xg)[0].sum().backward()
        return run

    return {"torch.nn.LSTM forward": forward(ref), "rnnc.nn.LSTM forward": forward(ours),
            "torch.nn.LSTM fwd+bwd": forward_backward(ref), "rnnc.nn.LSTM fwd+bwd": forward_backward(ours)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--repeat", type=int, default=15, help="timed runs of each at least (15)")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of runs of each at least (2)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; T={T}, I=H")
    print("| B | H | pass | torch.nn.LSTM ms (median [q1, q3]) | rnnc.nn.LSTM ms | rnnc/torch | "
          "torch min–max | rnnc min–max |")
    print("|---|---|---|---|---|---|---|---|")
    for case in CASES if args.case == "all" else [args.case]:
        B, H = CASES[case]
        stats = measure(jobs(B, H), args.repeat, args.min_time, warmup=3)
        for kind in ("forward", "fwd+bwd"):
            t, r = stats[f"torch.nn.LSTM {kind}"], stats[f"rnnc.nn.LSTM {kind}"]
            print(f"| {B} | {H} | {kind} | {t.median_ms:.1f} [{t.q1_ms:.1f}, {t.q3_ms:.1f}] | "
                  f"{r.median_ms:.1f} [{r.q1_ms:.1f}, {r.q3_ms:.1f}] | {r.median_ms / t.median_ms:.2f}× | "
                  f"{t.min_ms:.1f}–{t.max_ms:.1f} | {r.min_ms:.1f}–{r.max_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()

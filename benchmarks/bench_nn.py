#!/usr/bin/env python
"""CPU benchmark: the drop-in `rnnc.nn.LSTM` against `torch.nn.LSTM`, same weights, same call.

    python benchmarks/bench_nn.py                 # both shapes (several minutes on 2 busy cores)
    python benchmarks/bench_nn.py --case small    # B=16, H=128 only
    python benchmarks/bench_nn.py --compiled      # and torch.compile'd nn.LSTM and rnnc cell (inductor)

One fp32 layer, time-major input [T, B, I] with I = H, T = 256, at (B=16, H=128) and (B=64, H=512):
the forward under torch.inference_mode(), and forward + backward of out.sum() with respect to the
input and every parameter. rnnc.nn.LSTM loads torch's state_dict and its output is checked against
torch's first. The bare cell (`rnnc.build("lstm")`, batch-first input) runs alongside, to show what
the drop-in's wrapping (layout, state handling, functional_call) costs on top of the cell. The six
measurements run in interleaved rounds (rnnc.bench.measure: each round calls each once, in turn), so
background load hits all sides alike; reported are the median, the quartiles and the extremes.
"""
from __future__ import annotations

import argparse
import os

import torch

import rnnc
from rnnc.bench import measure

CASES = {"small": (16, 128), "large": (64, 512)}  # (B, H); I = H, T = 256
T = 256


def jobs(B: int, H: int, compiled: bool = False) -> dict:
    torch.manual_seed(0)
    ref = torch.nn.LSTM(H, H)
    ours = rnnc.nn.LSTM(H, H)
    ours.load_state_dict(ref.state_dict())
    cell = rnnc.build("lstm", I=H, H=H)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in ref.state_dict().items()})
    x = torch.randn(T, B, H)
    xb = x.transpose(0, 1).contiguous()
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)

    def forward(module, x):
        def run():
            with torch.inference_mode():
                module(x)
        return run

    def forward_backward(module, x):
        xg = x.clone().requires_grad_()

        def run():
            xg.grad = None
            module.zero_grad(set_to_none=True)
            module(xg)[0].sum().backward()
        return run

    modules = [("torch.nn.LSTM", ref, x), ("rnnc.nn.LSTM", ours, x), ("rnnc cell", cell, xb)]
    if compiled:  # torch.compile'd (inductor, dynamic T): rnnc's recurrence is one custom op there
        modules += [("torch.nn.LSTM compiled", torch.compile(ref, dynamic=True), x),
                    ("rnnc cell compiled", torch.compile(cell, fullgraph=True, dynamic=True), xb)]
    return {f"{name} {kind}": make(module, inp) for kind, make in (("forward", forward), ("fwd+bwd", forward_backward))
            for name, module, inp in modules}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--repeat", type=int, default=15, help="timed runs of each at least (15)")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of runs of each at least (2)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compiled", action="store_true",
                        help="also torch.compile'd torch.nn.LSTM and rnnc cell (inductor, dynamic=True)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; T={T}, I=H")
    names = ["torch.nn.LSTM", "rnnc.nn.LSTM", "rnnc cell"] + (["torch.nn.LSTM compiled", "rnnc cell compiled"]
                                                            if args.compiled else [])
    print(f"| B | H | pass | {' | '.join(f'{n} ms (median [q1, q3])' for n in names)} | rnnc.nn/torch | "
          f"rnnc cell/torch |{' rnnc cell compiled/torch |' if args.compiled else ''} torch min–max | rnnc.nn min–max |")
    print("|---" * (len(names) + 7 + args.compiled) + "|")
    for case in CASES if args.case == "all" else [args.case]:
        B, H = CASES[case]
        stats = measure(jobs(B, H, args.compiled), args.repeat, args.min_time, warmup=3)
        for kind in ("forward", "fwd+bwd"):
            got = [stats[f"{name} {kind}"] for name in names]
            t, r, c = got[:3]
            ratios = [r.median_ms / t.median_ms, c.median_ms / t.median_ms]
            ratios += [got[4].median_ms / t.median_ms] if args.compiled else []
            print(f"| {B} | {H} | {kind} | "
                  + " | ".join(f"{x.median_ms:.1f} [{x.q1_ms:.1f}, {x.q3_ms:.1f}]" for x in got) + " | "
                  + " | ".join(f"{q:.2f}×" for q in ratios)
                  + f" | {t.min_ms:.1f}–{t.max_ms:.1f} | {r.min_ms:.1f}–{r.max_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()

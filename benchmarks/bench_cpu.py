#!/usr/bin/env python
"""CPU benchmark: rnnc's `lstm` cell (loop backend) against torch.nn.LSTM, and compile latency.

    python benchmarks/bench_cpu.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_cpu.py --quick    # fewer repeats, for a smoke test

Part 1 times one fp32 LSTM layer on the CPU at (B=16, T=256, I=H=128) and (B=64, T=256,
I=H=512): the forward pass under `torch.inference_mode()` for both, and forward + backward of
`out.sum()` with respect to the input and all params. rnnc's cell gets torch's weights (same
names minus torch's `_l0` suffix) and its outputs are checked against torch's before timing.
Each number is the median of N timed runs after warm-up runs, the two implementations
alternating run by run. The thread count is torch's
default (printed).

Part 2 times `rnnc.compile(rnnc.parse(text))` (parse + analyse + codegen) for every library
spec: the first call for that spec in this process (after one warm-up compile of another spec so
the Lark grammar build is not counted), the median of 5 more calls (a fresh parse each time), and
the very first compile in a fresh Python process (`import rnnc` excluded; the Lark grammar
build and any lazy imports included).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import rnnc

CASES = [  # (B, T, I, H)
    (16, 256, 128, 128),
    (64, 256, 512, 512),
]
TARGET_RATIO = 3.0
TARGET_COMPILE_S = 0.5


# ---- helpers -----------------------------------------------------------------------------

def time_pair_ms(fns: dict, warmup: int, repeats: int) -> dict:
    """name -> (median, min, max) wall ms. The functions alternate run by run (A B A B ...) so
    that background load on a small shared machine hits both sides alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}


def copy_lstm_weights(ref: torch.nn.LSTM, cell: torch.nn.Module) -> None:
    """torch's `weight_ih_l0` → rnnc's `weight_ih` (matched on the last dotted component)."""
    src = {k.removesuffix("_l0"): v for k, v in ref.state_dict().items()}
    target = cell.state_dict()
    new = {}
    for key, value in target.items():
        short = key.rsplit(".", 1)[-1]
        if short in src:
            if tuple(src[short].shape) != tuple(value.shape):
                raise SystemExit(f"shape mismatch for {key}: rnnc {tuple(value.shape)} vs torch "
                                 f"{tuple(src[short].shape)}")
            new[key] = src[short]
    missing = sorted(set(src) - {k.rsplit(".", 1)[-1] for k in new})
    if missing:
        raise SystemExit(f"rnnc lstm lacks params {missing}; has {sorted(target)}")
    cell.load_state_dict(new, strict=False)


def machine() -> dict:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import os

    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


# ---- part 1: lstm vs torch.nn.LSTM -------------------------------------------------------

def bench_lstm(B: int, T: int, I: int, H: int, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, batch_first=True)
    cell = rnnc.build("lstm", backend="loop", I=I, H=H)
    copy_lstm_weights(ref, cell)
    x = torch.randn(B, T, I)

    with torch.inference_mode():
        y_t, (h_t, c_t) = ref(x)
        y_r, final = cell(x)
    err = max((y_r - y_t).abs().max().item(),
              (final["h"] - h_t[0]).abs().max().item(),
              (final["c"] - c_t[0]).abs().max().item())
    if err > 1e-3:
        raise SystemExit(f"rnnc lstm disagrees with torch.nn.LSTM at {(B, T, I, H)}: max |diff| {err:.3g}")

    def fwd(module):
        def run():
            with torch.inference_mode():
                module(x)
        return run

    xg = x.clone().requires_grad_(True)

    def fwd_bwd(module):
        def run():
            module.zero_grad(set_to_none=True)
            xg.grad = None
            out = module(xg)[0]
            out.sum().backward()
        return run

    # Gradients agree too (checked once, outside the timed region).
    fwd_bwd(ref)()
    g_t = [xg.grad.clone()] + [p.grad.clone() for _, p in sorted(ref.named_parameters())]
    fwd_bwd(cell)()
    by_short = {k.rsplit(".", 1)[-1]: p for k, p in cell.named_parameters()}
    g_r = [xg.grad.clone()] + [by_short[k.removesuffix("_l0")].grad
                               for k, _ in sorted(ref.named_parameters())]
    gerr = max(((a - b).abs().max() / (b.abs().max() + 1e-6)).item() for a, b in zip(g_r, g_t))
    if gerr > 1e-3:
        raise SystemExit(f"rnnc lstm gradients disagree with torch at {(B, T, I, H)}: rel {gerr:.3g}")

    row = {"B": B, "T": T, "I": I, "H": H, "max_abs_diff": err, "grad_rel_diff": gerr}
    for mode, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        timed = time_pair_ms({"torch": make(ref), "rnnc": make(cell)}, warmup, repeats)
        for who, (med, lo, hi) in timed.items():
            row[f"{mode}_{who}_ms"], row[f"{mode}_{who}_range_ms"] = med, (lo, hi)
        row[f"{mode}_ratio"] = row[f"{mode}_rnnc_ms"] / row[f"{mode}_torch_ms"]
    return row


# ---- part 2: compile latency -------------------------------------------------------------

COLD_SNIPPET = r"""
import sys, time, json
import rnnc
text = open(sys.argv[1]).read()
t0 = time.perf_counter()
rnnc.compile(rnnc.parse(text, filename=sys.argv[1]))
print(json.dumps(time.perf_counter() - t0))
"""


def spec_file(name: str) -> Path:
    from rnnc.resources import specs_dir

    return specs_dir() / f"{name}.rnn"


def compile_once(path: Path, text: str) -> float:
    t0 = time.perf_counter()
    rnnc.compile(rnnc.parse(text, filename=str(path)))
    return time.perf_counter() - t0


def bench_compile(repeats: int, fresh: bool) -> list[dict]:
    names = list(rnnc.library())
    texts = {n: spec_file(n).read_text() for n in names}
    # Warm-up: build the Lark grammar and import whatever rnnc imports lazily.
    warm = "elman" if "elman" in names else names[-1]
    compile_once(spec_file(warm), texts[warm])
    rows = []
    for name in names:
        path = spec_file(name)
        first = compile_once(path, texts[name])
        median = statistics.median(compile_once(path, texts[name]) for _ in range(repeats))
        row = {"spec": name, "first_s": first, "median_s": median}
        if fresh:
            out = subprocess.run([sys.executable, "-c", COLD_SNIPPET, str(path)],
                                 capture_output=True, text=True)
            row["fresh_process_s"] = json.loads(out.stdout) if out.returncode == 0 else None
            if out.returncode != 0:
                print(f"fresh-process compile of {name} failed:\n{out.stderr}", file=sys.stderr)
        rows.append(row)
    return rows


# ---- report ------------------------------------------------------------------------------

def lstm_table(rows: list[dict]) -> str:
    out = ["| B | T | I=H | pass | torch.nn.LSTM (ms) | rnnc lstm, loop (ms) | rnnc/torch | "
           "torch min–max | rnnc min–max | ratio of mins |",
           "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for mode in ("fwd", "fwd+bwd"):
            label = "forward (inference_mode)" if mode == "fwd" else "forward+backward"
            ratio = r[f"{mode}_ratio"]
            flag = "" if ratio <= TARGET_RATIO else " ✗"
            (tlo, thi), (rlo, rhi) = r[f"{mode}_torch_range_ms"], r[f"{mode}_rnnc_range_ms"]
            out.append(f"| {r['B']} | {r['T']} | {r['H']} | {label} | {r[f'{mode}_torch_ms']:.1f} | "
                       f"{r[f'{mode}_rnnc_ms']:.1f} | {ratio:.2f}×{flag} | {tlo:.0f}–{thi:.0f} | "
                       f"{rlo:.0f}–{rhi:.0f} | {rlo / tlo:.2f}× |")
    return "\n".join(out)


def compile_table(rows: list[dict], repeats: int) -> str:
    fresh = any("fresh_process_s" in r for r in rows)
    head = f"| spec | first call (ms) | median of {repeats} (ms) |"
    rule = "|---|---:|---:|"
    if fresh:
        head += " fresh process (ms) |"
        rule += "---:|"
    out = [head, rule]
    for r in rows:
        line = f"| {r['spec']} | {r['first_s'] * 1e3:.1f} | {r['median_s'] * 1e3:.1f} |"
        if fresh:
            v = r.get("fresh_process_s")
            line += f" {v * 1e3:.1f} |" if v is not None else " failed |"
        out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer warm-ups and repeats")
    ap.add_argument("--repeats", type=int, help="timed runs per LSTM measurement (default 7, quick 3)")
    ap.add_argument("--warmup", type=int, help="untimed runs first (default 2, quick 1)")
    ap.add_argument("--no-fresh", action="store_true", help="skip the fresh-process compile timing")
    ap.add_argument("--case", choices=["small", "large"], help="run only one LSTM size")
    ap.add_argument("--skip-lstm", action="store_true")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    compile_repeats = 5

    info = machine()
    print("# rnnc CPU benchmark\n")
    print(f"- CPU: {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
          f"torch.get_num_threads() = {info['threads']}, Python {info['python']}")
    print(f"- fp32; median of {repeats} runs after {warmup} warm-up runs, torch and rnnc alternating")
    print(f"- load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    results = {"machine": info, "repeats": repeats, "warmup": warmup}

    if not args.skip_lstm:
        rows = []
        cases = CASES if not args.case else [CASES[0] if args.case == "small" else CASES[1]]
        for case in cases:
            rows.append(bench_lstm(*case, warmup=warmup, repeats=repeats))
            print(f"  done {case}: max |y diff| {rows[-1]['max_abs_diff']:.2e}, "
                  f"grad rel diff {rows[-1]['grad_rel_diff']:.2e}", file=sys.stderr)
        results["lstm"] = rows
        print("## lstm: rnnc (backend=\"loop\") vs torch.nn.LSTM\n")
        print(lstm_table(rows))
        worst = max(max(r["fwd_ratio"], r["fwd+bwd_ratio"]) for r in rows)
        print(f"\nworst ratio {worst:.2f}× (target ≤ {TARGET_RATIO}×): "
              f"{'met' if worst <= TARGET_RATIO else 'NOT met'}\n")

    if not args.skip_compile:
        rows = bench_compile(compile_repeats, fresh=not args.no_fresh)
        results["compile"] = rows
        print("## compile latency: rnnc.compile(rnnc.parse(text)) per library spec\n")
        print(compile_table(rows, compile_repeats))
        worst = max(max(r["first_s"], r["median_s"]) for r in rows)
        print(f"\nslowest (in-process) {worst * 1e3:.1f} ms (target < {TARGET_COMPILE_S * 1e3:.0f} ms): "
              f"{'met' if worst < TARGET_COMPILE_S else 'NOT met'}")
        fresh = [r["fresh_process_s"] for r in rows if r.get("fresh_process_s") is not None]
        if fresh:
            print(f"slowest fresh-process compile {max(fresh) * 1e3:.1f} ms")

    print(f"\n- load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

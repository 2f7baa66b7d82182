"""GPU benchmark for issues 10 and 11: the generalized delta rule and mLSTM chunkwise, and Newton over time.

    python benchmarks/gpu_families.py [--part newton,gdelta] [--dtype bf16|fp32] [--quick] [--no-peer]

gdelta: kda, rwkv7, deltaproduct, mlstm at the issue's shape (B=2, T=2048, H=4, K=V=64) and at a GPU
training shape (B=8, T=4096, H=16, K=V=128), forward+backward of the output's sum, on the loop, chunk
(PyTorch) and triton backends, against fla's Triton kernels where fla has the family (chunk_kda,
chunk_rwkv7, chunk_gated_delta_product; bf16 only for the last). Each backend's output is first compared
with the loop's on the same inputs; a backend that disagrees is reported and not timed.

newton: paragru and indrnn (diagonal Jacobians), B=4, H = I = 64 and 256, T = 1024, 4096, 16384, fp32,
forward (no grad) and forward+backward: the loop, the triton backend's fused recurrent kernel and
backend "newton" (iterations reported).

Timing: wall time with torch.cuda.synchronize(), median of --repeats after a warm-up call (the loop: one
timed call). Without a CUDA device it prints a note and exits 0.
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch

import rnnc
from common import gdelta_inputs, median_ms

GDELTA_SHAPES = [(2, 2048, 4, 64), (8, 4096, 16, 128)]  # the loop is timed at the first only
DEV = "cuda"
GDELTA_CELLS = ("kda", "rwkv7", "deltaproduct", "mlstm")


def synced_clock() -> float:
    """time.perf_counter once the device has finished what was queued (CUDA runs asynchronously)."""
    if DEV == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def cuda_ms(fn, repeats: int, warmup: int = 1) -> float:
    return median_ms(fn, repeats, warmup, clock=synced_clock)


def fla_peer(name: str):
    """fla's Triton op for the family as a function of the rnnc cell's inputs (o only), or (None, why)."""
    try:
        import fla.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001 - not installed, or it fails to import against this triton
        return None, f"fla not importable ({type(e).__name__})"
    if name == "kda":
        from fla.ops.kda import chunk_kda
        return (lambda q, k, v, g, beta: chunk_kda(q, k, v, g, beta)[0]), "fla chunk_kda"
    if name == "rwkv7":
        from fla.ops.rwkv7 import chunk_rwkv7
        return (lambda r, w, k, v, kk, a: chunk_rwkv7(r, w, k, v, -kk, kk * a, scale=1.0)[0]), "fla chunk_rwkv7"
    if name == "deltaproduct":
        from fla.ops.gated_delta_product import chunk_gated_delta_product

        def run(q, k, v, beta, g):  # [B, T, H, n, D] -> fla's interleaved [B, T * n, H, D]
            B, T, H, n = beta.shape
            rows = lambda x: x.transpose(2, 3).reshape(B, T * n, H, *x.shape[4:])  # noqa: E731
            return chunk_gated_delta_product(q, rows(k), rows(v), g, rows(beta), num_householder=n)[0]
        return run, "fla chunk_gated_delta_product"
    return None, "no fla op for this family"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def part_gdelta(dtype, repeats: int, shapes, peers: bool = True) -> None:
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-3
    print(f"\n### generalized delta rule and mLSTM, {str(dtype)[6:]} inputs, fwd+bwd ms (median of {repeats})\n")
    print("| cell | B, T, H, K | loop | chunk | triton | fla | best rnnc speed-up over loop | over fla | notes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for shape in shapes:
        for name in GDELTA_CELLS:
            notes, ms = [], {}
            try:
                xs = gdelta_inputs(name, None, *shape, device=DEV, dtype=dtype)
                cells = {b: rnnc.build(name, backend=b, device=DEV)
                         for b in ("loop", "chunk", "triton")}
                print(f"  {name} {shape}: built", flush=True)
                with torch.no_grad():
                    ref = cells["loop"](*xs)[0]
                    fns = {b: (lambda *a, c=c: c(*a)[0]) for b, c in cells.items()}
                    peer, note = fla_peer(name) if peers else (None, "fla not asked for (--no-peer)")
                    if peer is not None:
                        fns["fla"] = peer
                    elif name != "mlstm":
                        notes.append(note)
                    for b in [b for b in fns if b != "loop"]:
                        try:
                            err = rel_err(fns[b](*xs), ref)
                        except Exception as e:  # noqa: BLE001 - a peer that rejects this dtype or shape
                            notes.append(f"{b} failed: {type(e).__name__}: {str(e)[:90]}")
                            del fns[b]
                            continue
                        if not err <= tol:
                            notes.append(f"{b} differs from the loop (rel. err {err:.1e}); not timed")
                            del fns[b]
                if shape != shapes[0]:
                    del fns["loop"]  # its autograd graph would hold T states; the check above used no grad
                for b, fn in fns.items():
                    def run(fn=fn):
                        fn(*xs).float().sum().backward()
                    ms[b] = cuda_ms(run, 1 if b == "loop" else repeats, 1 if b == "loop" else 2)
                    print(f"  {name} {shape} {b}: {ms[b]:.2f} ms", flush=True)  # progress, if a later one hangs
            except Exception as e:  # noqa: BLE001 - report and go on to the next row
                notes.append(f"{type(e).__name__}: {str(e)[:160]}")
                traceback.print_exc()
            best = min((ms[b] for b in ("chunk", "triton") if b in ms), default=None)
            cols = [f"{ms[b]:.2f}" if b in ms else "-" for b in ("loop", "chunk", "triton", "fla")]
            sp = f"{ms['loop'] / best:.1f}×" if best and "loop" in ms else "-"
            vs = f"{ms['fla'] / best:.2f}×" if best and "fla" in ms else "-"
            print(f"| {name} | {shape} | {' | '.join(cols)} | {sp} | {vs} | {'; '.join(notes)} |", flush=True)


def part_newton(repeats: int, hidden, lengths) -> None:
    print(f"\n### Newton over time, fp32, ms (median of {repeats}; loop: one call)\n")
    print("| cell | H | T | loop fwd | triton fwd | newton fwd | loop fwd+bwd | triton fwd+bwd | newton fwd+bwd "
          "| newton speed-up: over loop fwd | over loop fwd+bwd | over triton fwd+bwd | iterations | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in ("paragru", "indrnn"):
        for H in hidden:
            torch.manual_seed(0)
            cells = {b: rnnc.build(name, backend=b, device=DEV, H=H, I=H) for b in ("loop", "triton", "newton")}
            for c in cells.values():
                c.load_state_dict(cells["loop"].state_dict())
            for T in lengths:
                notes, f, fb, its = [], {}, {}, "-"
                try:
                    x = torch.randn(4, T, H, device=DEV, requires_grad=True)
                    with torch.no_grad():
                        ref = cells["loop"](x)[0]
                        for b in ("triton", "newton"):
                            err = rel_err(cells[b](x)[0], ref)
                            if not err <= 1e-3:
                                notes.append(f"{b} rel. err {err:.1e}")
                    its = cells["newton"].newton_info.get("iterations", "-")
                    for b, c in cells.items():
                        n = 1 if b == "loop" else repeats

                        def fwd(c=c):
                            with torch.no_grad():
                                c(x)

                        def train(c=c):
                            c(x)[0].sum().backward()
                        f[b] = cuda_ms(fwd, n)
                        fb[b] = cuda_ms(train, n)
                        print(f"  {name} H={H} T={T} {b}: fwd {f[b]:.1f} ms, fwd+bwd {fb[b]:.1f} ms", flush=True)
                except Exception as e:  # noqa: BLE001
                    notes.append(f"{type(e).__name__}: {str(e)[:160]}")
                    traceback.print_exc()
                cols = [f"{d[b]:.1f}" if b in d else "-" for d in (f, fb) for b in ("loop", "triton", "newton")]
                ratio = lambda d, a, b: f"{d[a] / d[b]:.1f}×" if a in d and b in d else "-"  # noqa: E731
                print(f"| {name} | {H} | {T} | {' | '.join(cols)} | {ratio(f, 'loop', 'newton')} | "
                      f"{ratio(fb, 'loop', 'newton')} | {ratio(fb, 'triton', 'newton')} | {its} | "
                      f"{'; '.join(notes)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="gdelta,newton")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="gdelta inputs (newton: fp32)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-peer", action="store_true", help="skip fla's ops (their autotuning takes minutes)")
    ap.add_argument("--quick", action="store_true", help="the first gdelta shape, H=64 and T<=4096 for newton")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a dry run of the script's logic
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing timed (this benchmark needs a GPU)")
        return
    print(f"{torch.cuda.get_device_name() if DEV == 'cuda' else DEV}, torch {torch.__version__}")
    if "newton" in args.part:
        part_newton(args.repeats, [64] if args.quick or DEV == "cpu" else [64, 256],
                    [100] if DEV == "cpu" else [1024, 4096] if args.quick else [1024, 4096, 16384])
    if "gdelta" in args.part:
        shapes = [(1, 128, 2, 16)] if DEV == "cpu" else GDELTA_SHAPES[:1] if args.quick else GDELTA_SHAPES
        part_gdelta(torch.bfloat16 if args.dtype == "bf16" else torch.float32, args.repeats, shapes, not args.no_peer)


if __name__ == "__main__":
    main()

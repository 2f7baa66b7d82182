"""GPU benchmark: rnnc's generated kernels against the hand-written peers (issue 4).

    python benchmarks/gpu.py [--tier M|S] [--dtype bf16|fp32] [--rows hgrn,mamba,gla,...]

For each row of shared/research/parallel.md §4 that rnnc has a cell for, it builds the cell for
CUDA (backend "triton" where it applies, else what `auto` picks there, named in the table),
checks its output against the peer on the same inputs, then times forward and forward+backward
with triton.testing.do_bench (median, L2 flushed). It prints milliseconds, the achieved TB/s or
TFLOP/s, the fraction of the physical bound (parallel.md §3: max(FLOPs / peak, bytes / HBM)) and
the ratio to the peer. A peer that is not installed is skipped with a note. Without a CUDA
device it prints a note and exits 0. Tier S is a small smoke shape; M is the canonical shape.
"""
from __future__ import annotations

import argparse
import importlib.util

import torch
import torch.nn.functional as F

import rnnc

TC_PEAK = 989e12  # bf16 dense tensor-core FLOP/s, H100 and H200 SXM (parallel.md §3.1)
SFU_EXP = 4.2e12  # exp2 per second (parallel.md §3.1)


def hbm_bandwidth(name: str) -> float:
    if "H200" in name:
        return 4.8e12
    if "H100" in name:
        return 2.0e12 if "PCIe" in name else 3.35e12
    return 3.35e12  # unknown part: the H100 SXM figure, say so in the output


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---- rows: (rnnc spec, dims, inputs(shape) -> tensors, peer(inputs, cell) or None, cost) ----------

def linear_inputs(spec: str, B: int, T: int, H: int, d: int, dtype) -> list[torch.Tensor]:
    xs = []
    for port in rnnc.load(spec).cell().inputs:
        x = torch.randn(B, T, H, *[d] * len(port.shape), device="cuda")
        if port.name == "g":
            x = F.logsigmoid(x + 3)
        elif port.name == "beta":
            x = torch.sigmoid(x)
        elif port.name in ("k", "q") and "delta" in spec:
            x = F.normalize(x, dim=-1)
        xs.append(x.to(dtype).requires_grad_())
    return xs


def fla_peer(name: str):
    if not installed("fla"):
        return None, "fla (flash-linear-attention) not installed"
    import fla.ops as ops

    fns = {
        "gla": lambda q, k, v, g: ops.gla.chunk_gla(q, k, v, g)[0],
        "simple_gla": lambda q, k, v, g: ops.simple_gla.chunk_simple_gla(q, k, v, g)[0],
        "deltanet": lambda q, k, v, beta: ops.delta_rule.chunk_delta_rule(q, k, v, beta)[0],
        "gated_deltanet": lambda q, k, v, g, beta: ops.gated_delta_rule.chunk_gated_delta_rule(
            q, k, v, g, beta)[0],
        "hgrn": lambda x, g: ops.hgrn.fused_recurrent_hgrn(x, g)[0],
    }
    return fns[name], f"fla {name}"


def accelerated_scan_peer():
    if not installed("accelerated_scan"):
        return None, "accelerated-scan not installed"
    try:  # the CUDA (warp) kernel is compiled on import; the Triton one is the fallback
        from accelerated_scan.warp import scan
        note = "accelerated_scan.warp.scan"
    except Exception:  # noqa: BLE001 - no nvcc, no CUDA_HOME, ...
        from accelerated_scan.scalar import scan
        note = "accelerated_scan.scalar.scan (Triton; the warp kernel did not build)"

    def run(x, g):  # h = exp(g) h + x in accelerated-scan's [B, D, T] layout
        return scan(torch.exp(g).transpose(1, 2).contiguous(), x.transpose(1, 2).contiguous()).transpose(1, 2)
    return run, note


def mamba_peer():
    if not installed("mamba_ssm"):
        return None, "mamba-ssm not installed"
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    def run(cell, u, delta, Bm, Cm):  # rnnc layout [B, T, D] / [B, T, N] -> mamba's [B, D, T] / [B, N, T]
        A = -torch.exp(cell.A_log.float())
        return selective_scan_fn(u.transpose(1, 2), delta.transpose(1, 2), A, Bm.transpose(1, 2),
                                 Cm.transpose(1, 2), cell.D_skip.float()).transpose(1, 2)
    return run, "mamba-ssm selective_scan_fn"


def rows(tier: str) -> dict:
    M = tier == "M"
    scan = (8, 4096, 4096) if M else (2, 256, 256)
    lin = (8, 4096, 32, 128) if M else (2, 256, 2, 64)
    mam = (8, 4096, 4096, 16) if M else (2, 256, 256, 16)
    lstm = (16, 1024, 768) if M else (2, 64, 128)
    fused = (16, 1024, 128) if M else (2, 64, 64)  # the recurrent kernel holds [H, H] weight blocks in registers
    return {"hgrn": scan, "mamba": mam, "gla": lin, "simple_gla": lin, "deltanet": lin, "gated_deltanet": lin,
            "lstm": lstm, "lstm_fused": fused}


def cost(name: str, shape: tuple, elem: int) -> tuple[float, float, float, float]:
    """(fwd FLOPs, fwd bytes, fwd+bwd FLOPs, fwd+bwd bytes) as in parallel.md §3."""
    if name == "hgrn":
        n = shape[0] * shape[1] * shape[2]
        return 2 * n, 3 * n * elem, 6 * n, 8 * n * elem
    if name == "mamba":
        B, T, D, N = shape
        n = B * T * D
        return 8 * n * N, (3 * n + 2 * B * T * N) * elem, 20 * n * N, (8 * n + 4 * B * T * N) * elem
    if name.startswith("lstm"):
        B, T, d = shape
        return 8 * B * T * d * d, 0.0, 24 * B * T * d * d, 0.0
    B, T, H, d = shape
    C = 64
    per_token = 10 * C * d + 6 * d * d + 2 * C * C / 3 if "delta" in name else 4 * C * d + 4 * d * d
    tokens = B * T * H
    io = (5 if name == "gla" else 4) * d * elem * tokens
    return per_token * tokens, io, 2.5 * per_token * tokens, 2.5 * io


def make(name: str, shape: tuple, dtype):
    """(cell, inputs, [(peer fn or None, note), ...])."""
    if name == "hgrn":
        B, T, D = shape
        cell = rnnc.build("hgrn", device="cuda", D=D)
        x = torch.randn(B, T, D, device="cuda").to(dtype).requires_grad_()
        g = F.logsigmoid(torch.randn(B, T, D, device="cuda")).to(dtype).requires_grad_()
        return cell, [x, g], [fla_peer("hgrn"), accelerated_scan_peer()]
    if name == "mamba":
        B, T, D, N = shape
        cell = rnnc.build("mamba", device="cuda", D=D, N=N)
        u = torch.randn(B, T, D, device="cuda")
        delta = F.softplus(torch.randn(B, T, D, device="cuda") - 2)
        Bm, Cm = torch.randn(B, T, N, device="cuda"), torch.randn(B, T, N, device="cuda")
        xs = [t.to(dtype).requires_grad_() for t in (u, delta, Bm, Cm)]
        run, note = mamba_peer()
        return cell, xs, [((None if run is None else (lambda *a: run(cell, *a))), note)]
    if name.startswith("lstm"):  # lstm: auto (the loop); lstm_fused: triton's fused recurrent kernel
        B, T, d = shape
        cell = rnnc.build("lstm", device="cuda", I=d, H=d, backend="triton" if name == "lstm_fused" else "auto")
        ref = torch.nn.LSTM(d, d, batch_first=True, device="cuda")
        with torch.no_grad():
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref, f"{n}_l0").copy_(getattr(cell, n))
        x = torch.randn(B, T, d, device="cuda").to(dtype).requires_grad_()
        ref = ref.to(dtype)
        return cell, [x], [((lambda x: ref(x)[0]), "torch.nn.LSTM (cuDNN)")]
    B, T, H, d = shape
    cell = rnnc.build(name, device="cuda", K=d, V=d)
    return cell, linear_inputs(name, B, T, H, d, dtype), [fla_peer(name)]


def bench(fn, inputs) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, grad_to_none=inputs, return_mode="median")


def fwd_bwd(f, inputs):
    def run():
        y = f(*inputs)
        y = y[0] if isinstance(y, tuple) else y
        y.float().sum().backward()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tier", choices=("S", "M"), default="M")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--rows", default=",".join(rows("M")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing timed (this benchmark needs a GPU)")
        return
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    elem = 2 if dtype == torch.bfloat16 else 4
    name_gpu = torch.cuda.get_device_name()
    bw = hbm_bandwidth(name_gpu)
    print(f"{name_gpu}, torch {torch.__version__}, rnnc backends per row below; {args.dtype} inputs, tier {args.tier}")
    print("| row | shape | rnnc backend | fwd ms | fwd+bwd ms | achieved | of bound | peer | peer fwd+bwd ms | peer / rnnc |")
    print("|---|---|---|---:|---:|---:|---:|---|---:|---:|")
    notes = []
    for name in args.rows.split(","):
        shape = rows(args.tier)[name]
        torch.manual_seed(0)
        cell, xs, peers = make(name, shape, dtype)
        ours = lambda *a: cell(*a)[0]  # noqa: E731
        t_f = bench(lambda: ours(*xs), xs)
        t_fb = bench(fwd_bwd(ours, xs), xs)
        flops, nbytes, flops_fb, nbytes_fb = cost(name, shape, elem)
        if name == "mamba":
            exps = shape[0] * shape[1] * shape[2] * shape[3]
            bound = max(nbytes_fb / bw, 2 * exps / SFU_EXP)
        else:
            bound = max(flops_fb / TC_PEAK, nbytes_fb / bw)
        achieved = (f"{nbytes_fb / (t_fb * 1e-3) / 1e12:.2f} TB/s" if nbytes_fb and name in ("hgrn", "mamba")
                    else f"{flops_fb / (t_fb * 1e-3) / 1e12:.1f} TFLOP/s")
        row = (f"| {name} | {shape} | {cell.backend} | {t_f:.3f} | {t_fb:.3f} | {achieved} | "
               f"{bound / (t_fb * 1e-3):.0%} |")
        timed = False
        for peer, note in peers:
            if peer is None:
                notes.append(f"{name}: {note}; skipped")
                continue
            try:
                with torch.no_grad():
                    a, b = ours(*xs).float(), peer(*xs).float()
            except Exception as e:  # a peer that rejects this dtype or shape: say so
                notes.append(f"{name}: {note} failed ({type(e).__name__}: {str(e)[:80]}); not timed")
                continue
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
            if not err <= (3e-2 if elem == 2 else 1e-3):
                notes.append(f"{name}: output differs from {note} (rel. err {err:.2e}); not timed")
                continue
            p_fb = bench(fwd_bwd(peer, xs), xs)
            print(row + f" {note} | {p_fb:.3f} | {p_fb / t_fb:.2f}× |", flush=True)
            timed = True
        if not timed:
            print(row + " - | | |", flush=True)
    if "H100" not in name_gpu and "H200" not in name_gpu:
        notes.append(f"bounds use the H100 SXM bandwidth (3.35 TB/s): {name_gpu} is not a known part")
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    main()

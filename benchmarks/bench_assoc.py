"""CPU benchmark: declared associative combines on the scan backend (fp32, forward+backward).

    python benchmarks/bench_assoc.py [--repeats 3]

aaren (the online-softmax accumulator of "Attention as an RNN") and running_logsumexp, scan vs
loop, on the shapes of the mingru scan benchmark: B=1, T=16384, D=64 and B=4, T=4096, D=256.
The peer for running_logsumexp is torch.logcumsumexp (a native kernel, not a scan written in
PyTorch). Outputs are checked against the loop (and the peer) before timing.
"""
from __future__ import annotations

import argparse
import torch

import rnnc
from common import fwd_bwd, median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print("| cell | shape | loop (ms) | scan (ms) | loop / scan | peer (ms) |")
    print("|---|---|---:|---:|---:|---:|")
    for B, T, D in ((1, 16384, 64), (4, 4096, 256)):
        for name in ("aaren", "running_logsumexp"):
            loop = rnnc.build(name, backend="loop", D=D)
            scan = rnnc.build(name, backend="scan", D=D)
            scan.load_state_dict(loop.state_dict())
            x = torch.randn(B, T, D, requires_grad=True)
            with torch.no_grad():
                ref = loop(x)[0]
                torch.testing.assert_close(scan(x)[0], ref, rtol=1e-4, atol=1e-4)
            peer = ""
            if name == "running_logsumexp":
                torch.testing.assert_close(torch.logcumsumexp(x.detach(), 1), ref, rtol=1e-4, atol=1e-4)
                peer = f"{median_ms(lambda: torch.logcumsumexp(x, 1).sum().backward(), args.repeats):.1f}"
            t_loop = median_ms(fwd_bwd(loop, x), args.repeats)
            t_scan = median_ms(fwd_bwd(scan, x), args.repeats)
            print(f"| {name} | B={B} T={T} D={D} | {t_loop:.1f} | {t_scan:.1f} | {t_loop / t_scan:.1f}× | {peer} |",
                  flush=True)


if __name__ == "__main__":
    main()

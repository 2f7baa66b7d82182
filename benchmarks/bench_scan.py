"""CPU benchmark: rnnc's scan backend against its loop backend and a peer (fp32, forward+backward).

    python benchmarks/bench_scan.py [--repeats 5]

Shapes from issue 3: B=1, T=16384, D=64 (few channels, long sequence: what a parallel scan is
for) and B=4, T=4096, D=256. mingru is built with I = H = D; the input projections are hoisted
in both backends, so the difference is the recurrence itself.

The peer, on the same shapes, is accelerated-scan's pure-PyTorch Blelloch scan
(`accelerated_scan.ref.scan`, optional: `pip install accelerated-scan`) solving the first-order
recurrence h = a h + x, against rnnc's `hgrn` cell (h = exp(g) h + x) on the scan backend.
"""
from __future__ import annotations

import argparse
import torch

import rnnc
from common import fwd_bwd, median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| B | T | D | loop (ms) | scan (ms) | loop / scan |")
    print("|---:|---:|---:|---:|---:|---:|")
    for B, T, D in [(1, 16384, 64), (4, 4096, 256)]:
        torch.manual_seed(0)
        loop = rnnc.build("mingru", backend="loop", I=D, H=D)
        scan = rnnc.build("mingru", backend="scan", I=D, H=D)
        scan.load_state_dict(loop.state_dict())
        x = torch.randn(B, T, D, requires_grad=True)
        with torch.no_grad():
            torch.testing.assert_close(scan(x)[0], loop(x)[0], rtol=1e-4, atol=1e-5)
        lo = median_ms(fwd_bwd(loop, [x]), args.repeats, warmup=1)
        sc = median_ms(fwd_bwd(scan, [x]), args.repeats, warmup=1)
        print(f"| {B} | {T} | {D} | {lo:.1f} | {sc:.1f} | {lo / sc:.1f}× |")
    try:
        from accelerated_scan.ref import scan as ref_scan
    except ImportError:
        print("\naccelerated-scan is not installed: peer comparison skipped")
        return
    print("\n| B | T | D | accelerated_scan.ref.scan (ms) | rnnc hgrn, scan (ms) | peer / rnnc |")
    print("|---:|---:|---:|---:|---:|---:|")
    for B, T, D in [(1, 16384, 64), (4, 4096, 256)]:
        torch.manual_seed(0)
        cell = rnnc.build("hgrn", backend="scan")
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, D)).requires_grad_()
        x = torch.randn(B, T, D, requires_grad=True)

        class Peer(torch.nn.Module):  # same inputs and layout as the cell: [B, T, D]
            def forward(self, g, x):
                a = torch.exp(g).transpose(1, 2).contiguous()
                return ref_scan(a, x.transpose(1, 2).contiguous()).transpose(1, 2), {}

        with torch.no_grad():
            torch.testing.assert_close(cell(x, g)[0], Peer()(g, x)[0], rtol=1e-4, atol=1e-4)
        peer = median_ms(fwd_bwd(Peer(), [g, x]), args.repeats, warmup=1)
        ours = median_ms(fwd_bwd(cell, [x, g]), args.repeats, warmup=1)
        print(f"| {B} | {T} | {D} | {peer:.1f} | {ours:.1f} | {peer / ours:.2f}× |")


if __name__ == "__main__":
    main()

"""CPU benchmark: LSRL's dictionary lookup (specs/lsrl_tok2tok.rnn) on 153-token prompts (n = 3 query
tokens, then 25 key/value pairs of 3 + 3 tokens, as in LSRL's paper and notebook), forward only, batch 1
and 25 (every key of one prompt as the query), on the loop and on the layered parallel scans (auto
picks the scan: every state is linear once the earlier ones are known).

    python benchmarks/bench_lsrl.py [--repeats 20] [--threads 1]

Every row first checks the answers: the last 3 outputs of each prompt are the value of its query,
exactly (LSRL's logic is exact on integer tokens, in float32 too). LSRL itself runs the program in a
Python interpreter at ~85 ms a token: ~13 s a prompt unsimplified, 2-6 s simplified, 25 s symbolic
(../shared/research/lsrl.md §5, run at LSRL HEAD 2675cd1).
"""
from __future__ import annotations

import argparse
import random

import torch

import rnnc
from common import cpu_ms, median_ms


def prompts(n: int = 3, pairs: int = 25, vocab: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[pairs, n + 2 n pairs, 1] prompts (one per key of one dictionary) and their answers [pairs, n]."""
    rng = random.Random(seed)
    keys: set[tuple[int, ...]] = set()
    while len(keys) < pairs:
        keys.add(tuple(rng.randrange(vocab) for _ in range(n)))
    ks = sorted(keys)
    vs = [tuple(rng.randrange(vocab) for _ in range(n)) for _ in ks]
    body = [t for k, v in zip(ks, vs) for t in k + v]
    x = torch.tensor([list(k) + body for k in ks], dtype=torch.float32)[..., None]
    return x, torch.tensor(vs, dtype=torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: no spinning on a shared host)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, answers = prompts()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, prompts {tuple(x.shape)}")
    print("| backend | B | T | forward, wall (ms) | forward, CPU (ms) | CPU ms / token | exact |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for backend in ("loop", "scan", "auto"):
        cell = rnnc.build("lsrl_tok2tok", backend=backend)
        for B in (1, 25):
            xb = x[:B]
            with torch.no_grad():
                y, _ = cell(xb)
                exact = bool((y[:, -3:, 0] == answers[:B]).all())
                repeats = args.repeats if backend != "loop" else max(args.repeats // 4, 3)
                ms = median_ms(lambda: cell(xb), repeats)
                cpu = cpu_ms(lambda: cell(xb), repeats)
            print(f"| {backend} ({cell.backend}) | {B} | {xb.shape[1]} | {ms:.2f} | {cpu:.2f} | {cpu / xb.shape[1]:.3f} "
                  f"| {exact} |")


if __name__ == "__main__":
    main()

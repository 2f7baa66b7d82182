"""A small language model of rnnc layers learns multi-query associative recall, on CPU, in minutes.

The task (MQAR, Arora et al., "Zoology", 2023) is generated here: a sequence lists `pairs` key-value
pairs, then asks `queries` of its keys again, each followed by its value:

    k1 v1 k2 v2 ... kP vP | kq1 vq1 kq2 vq2 ...

and the model is trained (next-token cross-entropy) to predict each queried value at its key, which
it can only do by recalling the pair from the first part. Keys and values are disjoint token ranges.
The same model (embedding, pre-norm blocks with a token mixer + SwiGLU MLP, head) is trained with
rnnc layers (`rnnc.layers.LM`, default: Gated DeltaNet with short convolutions) and with
`torch.nn.LSTM` as the mixer, same data, same seed; the script prints the loss, the recall accuracy
and the time per training step (median wall time, and the process's CPU time, steadier on a busy
host), and writes the loss curves to OUT/lm_recall.csv and, when matplotlib
is installed, OUT/lm_recall.png.

    python examples/lm_recall.py                        # both models, 400 steps each
    python examples/lm_recall.py --mixers rnnc --spec gla --steps 200
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import rnnc.layers
import rnnc.nn

IGNORE = -100


def make_batch(batch: int, pairs: int, queries: int, keys: int, values: int,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [batch, 2 * (pairs + queries)], targets: the queried value at each query key, else IGNORE).
    Keys are tokens [0, keys), values [keys, keys + values); a sequence's keys are distinct."""
    k = torch.rand(batch, keys, generator=gen).argsort(-1)[:, :pairs]
    v = keys + torch.randint(0, values, (batch, pairs), generator=gen)
    asked = torch.randint(0, pairs, (batch, queries), generator=gen)
    qk, qv = k.gather(1, asked), v.gather(1, asked)
    ids = torch.cat([torch.stack([k, v], -1).flatten(1), torch.stack([qk, qv], -1).flatten(1)], 1)
    targets = torch.full_like(ids, IGNORE)
    targets[:, 2 * pairs::2] = qv  # at each query key, predict its value
    return ids, targets


class LSTMMixer(nn.Module):
    """torch.nn.LSTM (or rnnc.nn.LSTM, its drop-in) with the layer call of rnnc.layers.Layer (no padding,
    no cache: training only)."""

    def __init__(self, hidden_size: int, lstm: type = nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm(hidden_size, hidden_size, batch_first=True)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None, None]:
        return self.lstm(hidden_states)[0], None, None


def build_model(kind: str, vocab: int, args: argparse.Namespace) -> nn.Module:
    """The LM with rnnc layers (`kind == "rnnc"`), torch.nn.LSTM mixers (`"lstm"`) or rnnc.nn.LSTM ones
    (`"rnnc-lstm"`: rnnc's lstm cell behind torch.nn.LSTM's interface)."""
    torch.manual_seed(args.seed)
    lstm = {"lstm": nn.LSTM, "rnnc-lstm": rnnc.nn.LSTM}.get(kind)
    mixer = (lambda i: LSTMMixer(args.hidden, lstm)) if lstm else None
    return rnnc.layers.LM(vocab, args.hidden, args.layers, spec=args.spec, num_heads=args.heads, mixer=mixer,
                          use_short_conv=not args.no_conv, backend=args.backend)


def train(kind: str, args: argparse.Namespace, log=print) -> dict:
    """Train one model; returns its per-step losses, accuracies and times, and the held-out accuracy."""
    vocab = args.keys + args.values
    model = build_model(kind, vocab, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.pairs, args.queries, args.keys, args.values)
    losses, accs, times, cpu = [], [], [], []
    for step in range(args.steps):
        ids, targets = make_batch(args.batch, *shape, gen)
        start, start_cpu = time.perf_counter(), time.process_time()
        logits, _ = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        asked = targets != IGNORE
        accs.append((logits.argmax(-1)[asked] == targets[asked]).float().mean().item())
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{kind}: loss is {losses[-1]} at step {step}")
        if log and (step % args.log_every == 0 or step == args.steps - 1):
            log(f"{kind:5s} step {step:4d}  loss {losses[-1]:.4f}  acc {accs[-1]:.3f}  {times[-1] * 1e3:.1f} ms")
    model.eval()
    with torch.no_grad():
        ids, targets = make_batch(1024, *shape, torch.Generator().manual_seed(args.seed + 1))
        pred = model(ids)[0].argmax(-1)
        asked = targets != IGNORE
        held_out = (pred[asked] == targets[asked]).float().mean().item()
    names = {"rnnc": f"rnnc {args.spec}", "lstm": "torch.nn.LSTM", "rnnc-lstm": "rnnc.nn.LSTM"}
    skip = min(5, len(times) - 1)  # the first steps allocate and generate code
    return {"name": names[kind], "losses": losses, "accs": accs, "times": times, "held_out_acc": held_out,
            "ms_per_step": 1e3 * statistics.median(times[skip:]), "cpu_ms_per_step": 1e3 * statistics.median(cpu[skip:]),
            "params": sum(p.numel() for p in model.parameters()),
            "backend": next((m.cell.backend for m in model.modules() if isinstance(m, rnnc.layers.Layer)), "-")}


def write_curves(results: dict, out: Path, log=print) -> None:
    """OUT/lm_recall.csv always; OUT/lm_recall.png when matplotlib is installed."""
    out.mkdir(parents=True, exist_ok=True)
    kinds = list(results)
    with open(out / "lm_recall.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + [f"{k}_{c}" for k in kinds for c in ("loss", "acc")])
        for step in range(max(len(r["losses"]) for r in results.values())):
            w.writerow([step] + [f"{results[k][c][step]:.5f}" for k in kinds for c in ("losses", "accs")])
    log(f"wrote {out / 'lm_recall.csv'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (the curves are in the CSV; pip install matplotlib for the PNG)")
        return
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, r in results.items():
        label = f"{r['name']} ({r['cpu_ms_per_step']:.0f} ms CPU/step)"
        ax_loss.plot(r["losses"], label=label)
        ax_acc.plot(r["accs"], label=label)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (query positions)", yscale="log", title="MQAR training loss")
    ax_acc.set(xlabel="step", ylabel="recall accuracy", ylim=(0, 1), title="MQAR recall accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "lm_recall.png", dpi=120)
    log(f"wrote {out / 'lm_recall.png'}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mixers", default="rnnc,lstm", help="comma-separated: rnnc, lstm, rnnc-lstm")
    p.add_argument("--spec", default="gated_deltanet", help="the rnnc layers' cell (a library name or .rnn path)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-conv", action="store_true", help="no short convolutions in the rnnc layers")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--keys", type=int, default=32)
    p.add_argument("--values", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("lm_recall_out"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = {kind: train(kind, args) for kind in args.mixers.split(",")}
    print(f"\nMQAR: {args.pairs} pairs, {args.queries} queries, T = {2 * (args.pairs + args.queries)}, "
          f"batch {args.batch}, {args.steps} steps, torch threads {torch.get_num_threads()}")
    for kind, r in results.items():
        name = f"{r['name']} ({r['backend']})" if kind == "rnnc" else r["name"]
        print(f"{name:32s} params {r['params']:7d}  loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}  "
              f"train acc {r['accs'][-1]:.3f}  held-out acc {r['held_out_acc']:.3f}  "
              f"{r['ms_per_step']:.1f} ms/step (CPU time {r['cpu_ms_per_step']:.1f} ms)")
    write_curves(results, args.out)
    return results


if __name__ == "__main__":
    main()

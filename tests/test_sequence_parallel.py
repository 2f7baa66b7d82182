"""Sequence (context) parallelism (rnnc.distributed.SequenceParallel) on 2 and 4 gloo CPU ranks.

Each rank runs its time slice of one batch (slices of unequal lengths, several chunks each); every
rank also runs the whole sequence in one process, the reference, and checks its slice against it:
outputs, the state at the end of its slice, the gradients of its inputs, of rank 0's initial state
(zero on the other ranks, whose `state=` is ignored) and of the params (summed over the ranks). One
spawn per world size runs every cell, one kind of scan or chunk primitive after another, in float64.
"""
from __future__ import annotations

import json
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rnnc
from rnnc.distributed import SequenceParallel, sequence_parallel
from rnnc.layers import LM

from helpers import DIMS, library_inputs

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

#: Cells given as source text: a decay per key and per value (no library cell has both).
SOURCES = {"key_value_decays": """cell kv(q: [K], k: [K], v: [V], g: [K], w: [V]) -> (o: [V]) {
    state S: [K, V] = 0
    S = exp(g)[:, None] * S * exp(w)[None, :] + outer(k, v)
    o = q @ S
}"""}
#: (cell, backend) in the fast run: each kind of primitive the scan and chunk forms call.
FAST = [("mingru", "scan"),                # _linear_scan
        ("running_logsumexp", "scan"),     # _fold_scan
        ("lru", "scan"),                   # _group_scan, 2x2 blocks
        ("gla", "auto"),                   # _chunk_linear, per-key decay (auto: its parallel form at any length)
        ("key_value_decays", "chunk"),     # _chunk_linear, per-key and per-value decays
        ("gated_deltanet", "chunk"),       # _chunk_delta with a decay
        ("kda", "chunk"),                  # _chunk_dplr, per-key decay
        ("mlstm", "chunk")]                # _maxplus_scan, _state_before, then the joined chunk pass over [C | n]
#: Cells run again with extreme gates (log-decays down to -20, mLSTM's gate pre-activations ten times wider).
EXTREME = [("gla", "chunk", True), ("gated_deltanet", "chunk", True), ("kda", "chunk", True),
           ("mlstm", "chunk", True), ("mingru", "scan", True), ("key_value_decays", "chunk", True)]
LENGTHS = {2: [9, 12], 4: [5, 6, 3, 7]}  # the ranks' slices: unequal, several 4-step chunks each


def _library() -> list[tuple[str, str]]:
    """Every library cell on each of its scan and chunk forms (analysed when a slow test asks, not at import)."""
    return [(name, backend) for name in rnnc.library() for backend in rnnc.backends_for(name)
            if backend in ("scan", "chunk")]


def _build(name: str, backend: str) -> torch.nn.Module:
    spec = SOURCES.get(name, name)
    dims = {k: v for k, v in DIMS.items() if k in (rnnc.parse(spec) if name in SOURCES else rnnc.load(spec)).cell().dims}
    torch.manual_seed(0)
    cell = rnnc.build(spec, backend=backend, dtype=torch.float64, chunk_size=4 if backend == "chunk" else None, **dims)
    with torch.no_grad():
        for p in cell.parameters():  # non-trivial params (rwkv6's bonus starts at zero)
            p.add_(0.1 * torch.randn_like(p))
    return cell


def _loss(ys, weights, final):
    return sum((y * w).sum() for y, w in zip(ys, weights)) + sum(f.sum() for f in final.values())


def _close(what: str, got, want, failures: list[str]) -> None:
    if got is None:
        got = torch.zeros_like(want)
    scale = want.abs().max().item() + 1e-12
    err = (got - want).abs().max().item() if want.numel() else 0.0
    if not (torch.isfinite(got).all() and err <= 1e-9 * scale + 1e-12):
        failures.append(f"{what}: max error {err:.3g} (scale {scale:.3g})")


def _case(name: str, backend: str, extreme: bool, lengths: list[int], failures: list[str]) -> None:
    """One cell on this rank's slice against the whole sequence in this process."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cell = _build(name, backend)
    params = [p for _, p in sorted(cell.named_parameters())]
    inputs = library_inputs(SOURCES.get(name, name), 2, sum(lengths), 2, extreme, torch.float64, seed=3)
    g = torch.Generator().manual_seed(4)
    _, shapes = cell(*[x[:, :1].detach() for x in inputs])
    h0 = {k: torch.randn(v.shape, generator=g, dtype=torch.float64).requires_grad_() for k, v in shapes.items()}

    ys, final = cell(*inputs, state=h0)
    ys = ys if isinstance(ys, tuple) else (ys,)
    weights = [torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y) for y in ys]
    want = torch.autograd.grad(_loss(ys, weights, final), inputs + params + list(h0.values()), allow_unused=True)

    lo, hi = sum(lengths[:rank]), sum(lengths[:rank + 1])
    mine = [x[:, lo:hi].detach().requires_grad_() for x in inputs]
    # only rank 0's initial state counts: the others pass different ones, which must be ignored
    state = {k: (v.detach() + rank).requires_grad_() for k, v in h0.items()}
    out, end = SequenceParallel(cell)(*mine, state=state)
    out = out if isinstance(out, tuple) else (out,)
    last = rank == world - 1
    loss = _loss(out, [w[:, lo:hi] for w in weights], end if last else {})
    got = list(torch.autograd.grad(loss, mine + params + list(state.values()), allow_unused=True))
    for i in range(len(mine), len(mine) + len(params)):  # param gradients: the sum over the ranks
        got[i] = torch.zeros_like(params[i - len(mine)]) if got[i] is None else got[i].clone()
        dist.all_reduce(got[i])

    for i, (a, b) in enumerate(zip(out, ys)):
        _close(f"{name} output {i}", a, b[:, lo:hi].detach(), failures)
    with torch.no_grad():
        _, at_end = cell(*[x[:, :hi] for x in inputs], state=h0)
    for k in at_end:
        _close(f"{name} state {k!r} at the end of the slice", end[k], at_end[k], failures)
    for i, x in enumerate(mine):
        _close(f"{name} gradient of input {cell.INPUTS[i]!r}", got[i], want[i][:, lo:hi], failures)
    for i, (pname, _) in enumerate(sorted(cell.named_parameters())):
        _close(f"{name} gradient of param {pname!r}", got[len(mine) + i], want[len(mine) + i], failures)
    for i, k in enumerate(h0):
        expected = want[len(mine) + len(params) + i]
        expected = torch.zeros_like(h0[k]) if expected is None or rank else expected
        _close(f"{name} gradient of the initial state {k!r}", got[len(mine) + len(params) + i], expected, failures)


def _lm(failures: list[str]) -> None:
    """A model of rnnc layers (short convolutions of width 5, wider than a 3-step slice; auto's chunk form)
    under sequence_parallel: logits and parameter gradients as one process on the whole sequence."""
    rank, world = dist.get_rank(), dist.get_world_size()
    lengths = LENGTHS[world]
    lo, hi = sum(lengths[:rank]), sum(lengths[:rank + 1])
    torch.manual_seed(0)
    model = LM(11, hidden_size=16, num_layers=2, spec="gated_deltanet", num_heads=2, use_short_conv=True,
               conv_size=5, dtype=torch.float64)
    ids = torch.randint(0, 11, (2, sum(lengths)), generator=torch.Generator().manual_seed(1))
    params = [p for _, p in sorted(model.named_parameters())]
    logits, _ = model(ids)
    w = torch.cos(torch.arange(logits.numel(), dtype=logits.dtype)).view_as(logits)
    want = torch.autograd.grad((logits * w).sum(), params)
    with sequence_parallel(model):
        mine, _ = model(ids[:, lo:hi])
    got = torch.autograd.grad((mine * w[:, lo:hi]).sum(), params)
    _close("LM logits", mine.detach(), logits[:, lo:hi].detach(), failures)
    for (name, _), g, expected in zip(sorted(model.named_parameters()), got, want):
        g = g.clone()
        dist.all_reduce(g)
        _close(f"LM gradient of {name}", g, expected, failures)


def _refusals(failures: list[str]) -> None:
    """Slices that cannot run are refused on every rank alike (no rank left waiting in a collective),
    and the group still works afterwards."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = SequenceParallel(_build("gla", "chunk"))
    x = library_inputs("gla", 2, 4 * world, 2, False, torch.float64, seed=3)
    x = [t.detach() for t in x]
    for what, mine in (("an empty slice on the last rank", [t[:, :0 if rank == world - 1 else 4] for t in x]),
                       ("batches of different sizes", [t[:1 if rank else 2, :4] for t in x]),
                       ("gradients on rank 0 only", [t[:, :4].requires_grad_(rank == 0) for t in x])):
        try:
            sp(*mine)
            failures.append(f"{what} was not refused")
        except rnnc.InputError as e:
            if "sequence parallelism" not in str(e):
                failures.append(f"{what}: unexpected message {e}")
    out, _ = sp(*[t[:, 4 * rank:4 * rank + 4] for t in x])
    _close("gla after the refusals", out.detach(), _build("gla", "chunk")(*x)[0][:, 4 * rank:4 * rank + 4].detach(),
           failures)


def _worker(rank: int, world: int, cases: list[tuple], init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    report = {"checked": [], "failures": []}
    try:
        for name, backend, *extreme in cases:
            failures: list[str] = []
            try:
                if name in ("refusals", "lm"):
                    (_refusals if name == "refusals" else _lm)(failures)
                else:
                    _case(name, backend, bool(extreme and extreme[0]), LENGTHS[world], failures)
            except Exception:  # every rank raises alike (or the parent's timeout catches a hang)
                failures.append(f"{name}: {traceback.format_exc()}")
            report["checked"].append(name)
            report["failures"] += failures
    finally:
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(report, f)
        dist.destroy_process_group()


def _spawn(world: int, cases: list[tuple], tmp_path, timeout: float) -> None:
    ctx = mp.spawn(_worker, args=(world, cases, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout:.0f} s")
    for rank in range(world):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["checked"] == [c[0] for c in cases], f"rank {rank} stopped early"
        assert not report["failures"], f"rank {rank}:\n" + "\n".join(report["failures"])


def test_two_ranks_match_one_process(tmp_path):
    _spawn(2, FAST + [("lm", ""), ("refusals", "")], tmp_path, 300)


@pytest.mark.slow
def test_two_ranks_match_one_process_on_every_library_cell(tmp_path):
    _spawn(2, [c for c in _library() if c not in FAST] + EXTREME, tmp_path, 600)


@pytest.mark.slow
def test_four_ranks_match_one_process_on_every_library_cell(tmp_path):
    _spawn(4, _library() + [("gla", "auto"), ("key_value_decays", "chunk")] + EXTREME + [("lm", ""), ("refusals", "")], tmp_path, 900)


def test_cells_without_a_scan_or_chunk_form_are_refused():
    with pytest.raises(rnnc.UnsupportedError, match="backend='chunk' or backend='scan'"):
        SequenceParallel(rnnc.build("lstm", I=2, H=3))
    with pytest.raises(rnnc.UnsupportedError, match="Newton"):
        SequenceParallel(rnnc.build("gru", I=2, H=3, backend="newton"))
    with pytest.raises(rnnc.UnsupportedError, match="from rnnc.build"):
        SequenceParallel(torch.nn.LSTM(2, 3))


def test_packed_sequences_and_an_uninitialised_group_are_refused():
    sp = SequenceParallel(rnnc.build("gla", backend="chunk"))
    x = torch.randn(1, 6, 4)
    with pytest.raises(rnnc.UnsupportedError, match="cu_seqlens"):
        sp(x, x, x, -torch.rand(1, 6, 4), cu_seqlens=torch.tensor([0, 2, 6]))
    if not dist.is_initialized():
        with pytest.raises(rnnc.UnsupportedError, match="init_process_group"):
            sp(x, x, x, -torch.rand(1, 6, 4))

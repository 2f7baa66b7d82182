"""Data-parallel training: an `rnnc.layers.LM` under torch's DistributedDataParallel on two CPU processes.

Each rank trains on half of a fixed batch with a mean loss, so DDP's averaged gradients equal the
gradients of the mean loss over the whole batch, and the weights after a few SGD steps must match
one process training on the whole batch. This checks that the generated modules import in spawned
processes, that every parameter a cell's layer uses is registered (DDP would miss it, or fail on it),
and that the generated backward composes with DDP's gradient hooks.
"""
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rnnc.layers import LM

WORLD, BATCH, T, VOCAB, STEPS, LR = 2, 4, 12, 11, 3, 0.5
SPECS = {"gla": {}, "deltanet": {"use_short_conv": True}}


def _model(spec: str) -> LM:
    torch.manual_seed(0)
    return LM(VOCAB, hidden_size=16, num_layers=2, spec=spec, num_heads=2, dtype=torch.float64,
              **SPECS[spec])


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, T + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


def _train(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        logits, _ = model(inputs)
        F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)).backward()
        opt.step()


def _worker(rank: int, spec: str, init_file: str, out_dir: str) -> None:
    """One rank: build the model (the cells are built here, in the spawned process), wrap it in DDP
    and train on this rank's half of the batch; save the final weights for the parent to compare."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model(spec))
        inputs, targets = _batch()
        half = BATCH // WORLD
        _train(model, inputs[rank * half:(rank + 1) * half], targets[rank * half:(rank + 1) * half])
        torch.save(model.module.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
@pytest.mark.parametrize("spec", ["gla", pytest.param("deltanet", marks=pytest.mark.slow)])
def test_ddp_two_ranks_match_one_process_on_the_whole_batch(spec, tmp_path):
    ctx = mp.spawn(_worker, args=(spec, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the DDP workers did not finish within 120 s")

    reference = _model(spec)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    _train(reference, *_batch())
    expected = reference.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in expected.items())  # the steps moved the weights
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=f"rank {rank}: {name}")

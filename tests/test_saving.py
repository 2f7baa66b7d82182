"""torch.save of a built cell (and of rnnc.nn modules) loads in a fresh process that never built it:
the pickle carries the spec's text and build arguments, and loading regenerates the module."""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rnnc

REPO = Path(__file__).resolve().parent.parent

LOAD = """
import sys, torch
obj = torch.load(sys.argv[1], weights_only=False)
x = torch.load(sys.argv[2])
out = obj(x)
torch.save({"out": out, "class": type(obj).__name__, "training": obj.training}, sys.argv[3])
"""


def load_elsewhere(tmp_path: Path, obj, x: torch.Tensor):
    """What `obj(x)` gives after torch.load in a new interpreter with an empty rnnc cache."""
    torch.save(obj, tmp_path / "obj.pt")
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, RNNC_CACHE_DIR=str(tmp_path / "fresh-cache"), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "obj.pt"), str(tmp_path / "x.pt"),
                           str(tmp_path / "out.pt")], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert any((tmp_path / "fresh-cache").glob("rnnc_gen_*.py"))  # regenerated there, not found in our cache
    return torch.load(tmp_path / "out.pt", weights_only=False)


def test_built_cell_loads_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    cell = rnnc.build("lstm", I=3, H=4)
    with torch.no_grad():
        cell.weight_hh.mul_(2)  # trained weights, not the initialiser's
    cell.eval()
    x = torch.randn(2, 5, 3)
    got = load_elsewhere(tmp_path, cell, x)
    assert got["class"] == type(cell).__name__ and got["training"] is False
    y, final = cell(x)
    torch.testing.assert_close(got["out"][0], y, rtol=0, atol=0)
    torch.testing.assert_close(got["out"][1], final, rtol=0, atol=0)


def test_cell_from_source_text_with_options(tmp_path):
    """A spec given as text (no file to find again), a non-default backend and chunk size."""
    text = "cell ema(x: [D]) -> (h: [D]) {\n    param w: [D] = 0.5\n    state h: [D] = 0\n    h = w * h + x\n}\n"
    cell = rnnc.build(text, backend="scan", D=3)
    x = torch.randn(2, 6, 3)
    got = load_elsewhere(tmp_path, cell, x)
    torch.testing.assert_close(got["out"][0], cell(x)[0], rtol=0, atol=0)


def test_nn_module_loads_in_a_fresh_process(tmp_path):
    torch.manual_seed(1)
    lstm = rnnc.nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    x = torch.randn(4, 2, 3)
    got = load_elsewhere(tmp_path, lstm, x)
    y, (h, c) = lstm(x)
    torch.testing.assert_close(got["out"][0], y, rtol=0, atol=0)
    torch.testing.assert_close(got["out"][1][1], c, rtol=0, atol=0)


def test_copies_are_independent_and_rebuild_the_same_class():
    cell = rnnc.build("gru", I=2, H=3)
    for twin in (copy.deepcopy(cell), pickle.loads(pickle.dumps(cell))):
        assert type(twin) is type(cell) and twin.source == cell.source
        assert twin.weight_ih is not cell.weight_ih and torch.equal(twin.weight_ih, cell.weight_ih)
        x = torch.randn(1, 4, 2)
        torch.testing.assert_close(twin(x)[0], cell(x)[0], rtol=0, atol=0)


def test_cell_built_for_a_missing_gpu_loads_on_the_cpu():
    """A recipe naming a device this machine lacks (a cell saved on a GPU, loaded with map_location="cpu")
    rebuilds for the CPU instead of failing to allocate on the missing device."""
    cell = rnnc.build("lstm", I=2, H=3)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cell._rnnc_recipe = dict(cell._rnnc_recipe, device="cuda:0")
    twin = pickle.loads(pickle.dumps(cell))
    x = torch.randn(1, 4, 2)
    torch.testing.assert_close(twin(x)[0], cell(x)[0], rtol=0, atol=0)

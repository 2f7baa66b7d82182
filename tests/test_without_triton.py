"""Triton is an optional extra (`rnnc[triton]`): without it every other backend builds and runs, and asking
for the triton backend is a clear BuildError saying what to install. Run in a subprocess whose import
system refuses `triton`, so this checks the real import paths, not a mock of one function."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = """
import sys
sys.modules["triton"] = None          # `import triton` now raises ImportError, as when it is absent
sys.modules["triton.language"] = None
import torch, rnnc
from rnnc.errors import BuildError
from tests.helpers import DIMS, library_inputs, outputs_and_grads
assert "triton" not in rnnc.backends_for("gla"), rnnc.backends_for("gla")
for spec in ("gla", "mingru", "lstm", "deltanet"):
    dims = {k: v for k, v in DIMS.items() if k in rnnc.load(spec).cell().dims}
    cell = rnnc.build(spec, **dims)                    # auto: chunk, scan or loop
    loop = rnnc.build(spec, **dims, backend="loop")
    loop.load_state_dict(cell.state_dict())
    xs = library_inputs(spec, B=2, T=70, heads=1, extreme=False, dtype=torch.float32, seed=0)
    got, want = outputs_and_grads(cell, xs), outputs_and_grads(loop, xs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
try:
    rnnc.build("gla", backend="triton")
except BuildError as e:
    assert "pip install" in str(e), str(e)
else:
    raise AssertionError("backend='triton' built without triton")
from rnnc.cli import main
assert main(["compile", "mingru", "-o", sys.argv[1]]) == 0
assert "triton" not in sys.modules or sys.modules["triton"] is None
print("ok")
"""


def test_rnnc_builds_and_compiles_without_triton(tmp_path):
    done = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / "mingru.py")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_a_standalone_newton_module_runs_without_triton(tmp_path):
    """`rnnc compile` where triton is installed still writes a newton module that needs only torch
    (the Triton solves are for built modules on CUDA, not copied into standalone files)."""
    import rnnc

    path = tmp_path / "paragru_newton.py"
    path.write_text(rnnc.compile("paragru", backend="newton", I=3, H=4))
    code = f"""
import sys
sys.modules["triton"] = None
sys.modules["triton.language"] = None
import importlib.util, torch
spec = importlib.util.spec_from_file_location("paragru_newton", {str(path)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
cell = next(v for v in vars(module).values() if isinstance(v, type) and issubclass(v, torch.nn.Module)
            and v.__module__ == "paragru_newton")()
y, _ = cell(torch.randn(2, 9, 3))
assert torch.isfinite(y).all() and y.shape == (2, 9, 4), y.shape
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")

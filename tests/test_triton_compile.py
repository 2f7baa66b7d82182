"""The generated Triton kernels compile for a real GPU (sm_90), not only run in the interpreter.

tests/aot_compile.py builds each cell's triton module with real @triton.jit kernels, intercepts every
launch of a forward and backward (nothing runs) and compiles each kernel with its actual argument
types to a cubin with Triton's bundled ptxas: no GPU needed. The fast path covers one cell per kind of
kernel (fused recurrent, fused scan, chunkwise with per-key decays, delta rule, generalized delta rule),
the delta rule's at 16-step chunks: its backward kernel at the default 64 steps (BT = 64) takes ptxas
over a minute (a 2.7 MB cubin; 2 s at BT = 16). `slow` covers every library cell the triton backend
takes, at its default chunk size (so the delta rule's kernels at BT = 64 too).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rnnc

triton = pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("aot_compile.py")


def _ptxas_available() -> bool:
    """Triton's wheels bundle ptxas for Linux x86-64/aarch64; elsewhere there is nothing to compile with."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or bool(os.environ.get("TRITON_PTXAS_PATH"))


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not available")


def _compile(names: list[str], tmp_path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RNNC_CACHE_DIR"] = str(tmp_path / "modules")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    # the rnnc this test imported (a worktree's, not the installed checkout's): the script's own
    # directory, not the working directory, heads its sys.path
    root = str(Path(rnnc.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, str(SCRIPT), *names], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_one_cell_per_kernel_kind_compiles_for_sm90(tmp_path):
    out = _compile(["lstm", "mingru", "gla", "gated_deltanet@16", "kda", ":per-value"], tmp_path)
    for kernel in ("_rec_fwd", "_rec_bwd", "_scan_h_fwd", "_scan_h_bwd", "_scan_h_sum", "_scan_h_rsum",
                   "_triton_chunk_fwd_vector",
                   "_triton_chunk_bwd_dh", "_triton_chunk_bwd_key", "_triton_chunk_bwd_value",
                   "_triton_delta_fwd", "_triton_delta_bwd_dh",
                   "_triton_delta_bwd", "_triton_dplr_fwd", "_triton_dplr_bwd_dh", "_triton_dplr_bwd"):
        assert f"{kernel}: " in out, (kernel, out)


@pytest.mark.slow
def test_every_triton_cell_compiles_for_sm90(tmp_path):
    names = [n for n in rnnc.library() if "triton" in rnnc.backends_for(n)]
    out = _compile(names, tmp_path)
    assert "_fold_0_fwd: " in out and "_triton_chunk_bwd_scalar: " in out
    assert "_triton_delta_bwd: " in out  # at BT = 64 here (the fast test compiles it at 16)


def test_newton_kernels_compile_for_sm90(tmp_path):
    """Newton's linear-step kernels (diagonal, 2x2 blocks; forward, reverse; float32, float64; one chunk
    of time and several): 16 specialisations."""
    out = _compile([":newton"], tmp_path)
    assert out.count("_triton_newton_diag: ") == 8 and out.count("_triton_newton_blk2: ") == 8, out

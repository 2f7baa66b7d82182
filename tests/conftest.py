"""Without a GPU, generated Triton kernels run in Triton's CPU interpreter.

The variable is read when a kernel is decorated (when a generated module is imported), so
setting it here, before any test builds a module, is enough. CI sets it too (.ci/run).

One intra-op thread per test process (OMP_NUM_THREADS overrides): the tests' tensors are tiny, and
under `pytest -n 2` on two cores each worker's two OpenMP threads wait on each other whenever the
other worker holds a core (tests/test_chunk_ops.py and test_equivalent_writings.py with -n 2 on the
2-core host: 39-42 s with two threads, 22-24 s with one)."""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads its OpenMP runtime
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """A throwaway code cache for a module that builds hundreds of generated modules (the fuzz tests),
    instead of the user's ~/.cache/rnnc."""
    old = os.environ.get("RNNC_CACHE_DIR")
    os.environ["RNNC_CACHE_DIR"] = str(tmp_path_factory.mktemp("rnnc-cache"))
    yield
    if old is None:
        os.environ.pop("RNNC_CACHE_DIR", None)
    else:
        os.environ["RNNC_CACHE_DIR"] = old

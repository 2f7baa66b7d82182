"""Without a GPU, generated Triton kernels run in Triton's CPU interpreter.

The variable is read when a kernel is decorated (when a generated module is imported), so
setting it here, before any test builds a module, is enough. CI sets it too (.ci/run)."""
import os

import pytest
import torch

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

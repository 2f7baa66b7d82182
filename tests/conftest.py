"""Without a GPU, generated Triton kernels run in Triton's CPU interpreter.

The variable is read when a kernel is decorated (when a generated module is imported), so
setting it here, before any test builds a module, is enough. CI sets it too (.ci/run)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

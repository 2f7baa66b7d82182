"""Regression tests for bugs found in review, one test per bug (the docstring names it)."""
import time

import pytest
import torch

import rnnc

NESTED_DEFS = ("def f0(a) = a * 0.00001 + 0.000001\n"
               + "".join(f"def f{i}(a) = f{i - 1}(a) + f{i - 1}(a)\n" for i in range(1, 17))
               + "cell deep(x: [H]) -> (h: [H]) {\n    state h: [H] = 0\n    h = tanh(f16(h) + x)\n}\n")


def test_nested_shared_defs_lower_in_linear_time():
    """Bug: a def nested 16 deep (f_i(a) = f_{i-1}(a) + f_{i-1}(a)) made elaboration, the sum
    regrouping and the tile lowering walk 2^16 copies (backends_for took minutes or overflowed the
    stack); each shared value is now built and lowered once."""
    start = time.perf_counter()
    assert rnnc.backends_for(NESTED_DEFS) == ["loop", "triton"]
    assert time.perf_counter() - start < 10
    assert len(rnnc.parse(NESTED_DEFS).cell().graph) < 100
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    loop = rnnc.build(NESTED_DEFS, backend="loop", H=4)
    triton = rnnc.build(NESTED_DEFS, backend="triton", H=4)
    h = torch.zeros(2, 4, dtype=torch.float64)
    want = []
    for t in range(3):  # f16(a) = 2^16 f0(a)
        h = torch.tanh(2.0 ** 16 * (0.00001 * h + 0.000001) + x[:, t])
        want.append(h)
    torch.testing.assert_close(loop(x)[0], torch.stack(want, 1))
    torch.testing.assert_close(triton(x)[0], torch.stack(want, 1))

"""Compile every Triton kernel a cell's triton module launches, for a real GPU, on a machine without one.

Usage: python tests/aot_compile.py CELL [CELL ...]   (TRITON_INTERPRET must be unset)
       CELL may also be `:per-value`: the chunk kernels for per-value decays, which no library cell uses;
       or `:newton`: Newton's linear-step kernels (rnnc/runtime/triton_newton.py), every variant;
       `NAME@C` builds the cell with chunk_size C instead of its default.

The interpreter (how the test suite runs kernels on CPU) accepts code that the compiler may reject, so
this builds each cell's triton module with real @triton.jit kernels, runs a forward and backward at a
small shape with every launch intercepted (nothing executes), and compiles each launch's kernel with
its actual argument types and constexprs to a cubin for sm_90 (H100/H200) with Triton's bundled ptxas.
Prints one line per distinct kernel specialisation; exits 1 on the first that does not compile.
"""
from __future__ import annotations

import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import rnnc
from helpers import sizes  # tests/helpers.py: this script's directory is on sys.path

TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}
DIMS = {"K": 32, "V": 24, "D": 8, "N": 4, "H": 8, "I": 6}
seen: dict[tuple, str] = {}


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def _compile(fn: JITFunction, args: tuple, kwargs: dict) -> None:
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature, constexprs = {}, {}
    for i, p in enumerate(fn.params):
        value = args[i] if i < len(args) else kwargs.get(p.name, p.default)
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
        else:
            signature[p.name] = _type(value)
    key = (fn.__name__, fn.src, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()),
           tuple(options.items()))
    if key in seen:
        return
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    seen[key] = f"{fn.__name__}: {len(compiled.asm['cubin'])} bytes of sm_90 cubin, {options or 'default options'}"
    print(seen[key], flush=True)


def _intercept(self, grid):
    return lambda *args, **kwargs: _compile(self, args, dict(kwargs))


def _dims(ir) -> dict[str, int]:
    """The cell's dims: DIMS's by name, 3 for any other without a default (the rest keep their defaults)."""
    return {d: DIMS.get(d, 3) for d, info in ir.dims.items() if d in DIMS or info.default is None}


def _inputs(ir, dims: dict[str, int]) -> list[torch.Tensor]:
    out = []
    for p in ir.inputs:
        shape = [2, 70, 2] + sizes(ir, p.shape, dims)  # expressions too (lsrl_vec2vec: 1 + DIN + DOUT)
        x = torch.randn(*shape)
        if p.name in ("g", "w"):
            x = torch.nn.functional.logsigmoid(x)
        out.append(x.requires_grad_())
    return out


def _per_value() -> None:
    from rnnc.runtime import triton_chunk

    T, N, K, V = 40, 2, 32, 24
    q, k = torch.randn(T, N, K), torch.randn(T, N, K)
    v, gv = torch.randn(T, N, V), torch.nn.functional.logsigmoid(torch.randn(T, N, V))
    for x in (q, k, v, gv):
        x.requires_grad_()
    o, S = triton_chunk._triton_chunk_linear(q, k, v, None, gv, None, 16)
    (o.sum() + S.sum()).backward()


def _newton() -> None:
    """Each variant of the Newton solves: diagonal and 2x2 blocks, forward and reverse, float32 and
    float64, one chunk of time and several (the summaries)."""
    from rnnc.runtime import triton_newton

    T, N, H = 40, 2, 3
    for dtype in (torch.float32, torch.float64):
        for reverse in (False, True):
            for steps in (None, 16):
                a = torch.randn(T - reverse, N, H, dtype=dtype)
                triton_newton._triton_newton_diagonal(a, torch.randn(T, N, H, dtype=dtype), reverse, steps)
                J = torch.randn(T - reverse, N, H, 2, 2, dtype=dtype)
                b0, b1 = torch.randn(T, N, H, dtype=dtype), torch.randn(T, N, H, dtype=dtype)
                triton_newton._triton_newton_block2(J, b0, b1, reverse, steps)


def main(names: list[str]) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the kernels must be real @triton.jit functions")
    JITFunction.__getitem__ = _intercept
    for name in names:
        if name == ":per-value":
            _per_value()
            continue
        if name == ":newton":
            _newton()
            continue
        name, _, chunk = name.partition("@")
        ir = rnnc.load(name).cell()
        dims = _dims(ir)
        cell = rnnc.build(name, backend="triton", chunk_size=int(chunk) if chunk else None, **dims)
        module = sys.modules[type(cell).__module__]
        if hasattr(module, "SCAN_CHUNK"):  # the fused scans' time-chunked variant too
            module.SCAN_CHUNK = 16
        os.environ["TRITON_INTERPRET"] = "1"  # only for the module's device check: CPU tensors are fine here
        for T in (70, 3):  # the parallel form, and the recurrent kernel where short sequences take it
            xs = [x[:, :T] for x in _inputs(ir, dims)]
            y, final = cell(*xs)
            ys = y if isinstance(y, tuple) else (y,)
            (sum(v.float().sum() for v in ys) + sum(f.sum() for f in final.values())).backward()
        del os.environ["TRITON_INTERPRET"]
    print(f"compiled {len(seen)} kernel specialisations for sm_90")


if __name__ == "__main__":
    main(sys.argv[1:])

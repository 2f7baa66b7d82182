"""The chunkwise Triton kernels' launchers as `torch.library.triton_op`s (rnnc/runtime/triton_launch.py,
`_kernel_op`): rnnc::triton_chunk_forward/backward and rnnc::triton_delta_forward/backward, with
fakes and their autograd (register_autograd). A triton build's chunk region is traced by torch.compile
(`_run_traced_region`), so the compiled graph holds these ops, one node per launch, instead of one
opaque region; torch.export keeps the region as one op.

Checked here on the CPU (Triton's interpreter, TRITON_INTERPRET=1): the ops are registered as triton
ops; their fakes give the real outputs' shapes and dtypes (FakeTensorMode) for every decay kind; they
pass torch.library.opcheck (schema, fake, autograd registration, AOT dispatch); eager calls equal the
PyTorch chunk form in values and gradients; torch.compile(fullgraph=True, dynamic=True,
backend="aot_eager") compiles a triton cell once for two lengths with the ops in its graph and eager's
values and gradients; an export with a dynamic length runs at other lengths. Not checked without a GPU:
that inductor inlines the kernels into its generated code (under the interpreter a kernel is plain
Python that no tracer captures, so there the ops stay whole while tracing)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton kernels run on the CPU only under TRITON_INTERPRET=1")
pytest.importorskip("triton")

import torch._dynamo  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.export import Dim  # noqa: E402

import rnnc  # noqa: E402
import rnnc.runtime.triton_chunk as tc  # noqa: E402
import rnnc.runtime.triton_delta as td  # noqa: E402
from rnnc.runtime.chunk import _chunk_delta, _chunk_linear  # noqa: E402

from helpers import library_inputs  # noqa: E402

T, N, K, V, C = 37, 2, 4, 3, 16
OPS = ("triton_chunk_forward", "triton_chunk_backward", "triton_delta_forward", "triton_delta_backward")


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, N, K, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(T, N, K, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(T, N, V, generator=g, dtype=dtype)
    gates = {"key": F.logsigmoid(torch.randn(T, N, K, generator=g, dtype=dtype) + 2),
             "value": F.logsigmoid(torch.randn(T, N, V, generator=g, dtype=dtype) + 2),
             "scalar": F.logsigmoid(torch.randn(T, N, 1, generator=g, dtype=dtype) + 2)}
    beta = torch.sigmoid(torch.randn(T, N, generator=g, dtype=dtype))
    h0 = torch.randn(N, K, V, generator=g, dtype=dtype)
    return q, k, v, gates, beta, h0


#: (gk, gv) by decay kind: none, scalar, per key, per value, both (the last recomputes its backward)
KINDS = {"none": (None, None), "scalar": ("scalar", None), "key": ("key", None), "value": (None, "value"),
         "both": ("key", "value")}


def _chunk_args(kind, save_h=True):
    q, k, v, gates, _, h0 = _inputs()
    gk, gv = (None if n is None else gates[n] for n in KINDS[kind])
    return (q, k, v, gk, gv, h0, C, save_h)


def _delta_args(gated=True, save_h=True):
    q, k, v, gates, beta, h0 = _inputs()
    return (q, k, v, beta, gates["scalar"][..., 0] if gated else None, h0, C, save_h)


def test_the_launchers_are_registered_as_triton_ops():
    from torch._library.triton import triton_ops_to_kernels

    for name in OPS:
        op = getattr(torch.ops.rnnc, name).default
        assert isinstance(op, torch._ops.OpOverload) and f"rnnc::{name}" in triton_ops_to_kernels


def _same_layout(fake, real):
    assert [(tuple(f.shape), f.dtype) for f in fake] == [(tuple(r.shape), r.dtype) for r in real]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("save_h", [True, False])
def test_chunk_fakes_give_the_real_shapes(kind, save_h):
    args = _chunk_args(kind, save_h)
    real = tc._TRITON_CHUNK_FORWARD(*args)
    with FakeTensorMode() as mode:
        fake = tc._TRITON_CHUNK_FORWARD(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    _same_layout(fake, real)
    if kind == "both" or not save_h:
        return
    q, k, v, gk, gv, h0, _, _ = args
    g = gv if kind == "value" else gk
    bkind = "value" if kind == "value" else "key" if kind == "key" else "scalar"
    g = None if g is None else g.reshape(T, N) if bkind == "scalar" else g
    bargs = (q, k, v, g, real[2], torch.randn_like(real[0]), torch.randn_like(real[1]), C, bkind)
    breal = tc._TRITON_CHUNK_BACKWARD(*bargs)
    with FakeTensorMode() as mode:
        bfake = tc._TRITON_CHUNK_BACKWARD(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in bargs])
    _same_layout(bfake, breal)


@pytest.mark.parametrize("gated", [True, False])
def test_delta_fakes_give_the_real_shapes(gated):
    args = _delta_args(gated)
    real = td._TRITON_DELTA_FORWARD(*args)
    with FakeTensorMode() as mode:
        fake = td._TRITON_DELTA_FORWARD(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    _same_layout(fake, real)
    q, k, v, beta, g, _, _, _ = args
    bargs = (q, k, v, beta, g, real[2], torch.randn_like(real[0]), torch.randn_like(real[1]), C)
    breal = td._TRITON_DELTA_BACKWARD(*bargs)
    with FakeTensorMode() as mode:
        bfake = td._TRITON_DELTA_BACKWARD(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in bargs])
    _same_layout(bfake, breal)


@pytest.mark.parametrize("kind", ["scalar", "key", "both"])
def test_chunk_forward_passes_opcheck(kind):
    args = list(_chunk_args(kind))
    args[:6] = [a if a is None else a.requires_grad_() for a in args[:6]]
    torch.library.opcheck(tc._TRITON_CHUNK_FORWARD, tuple(args))


def test_delta_forward_passes_opcheck():
    args = list(_delta_args())
    args[:6] = [a.requires_grad_() for a in args[:6]]
    torch.library.opcheck(td._TRITON_DELTA_FORWARD, tuple(args))


@pytest.mark.parametrize("kind", list(KINDS))
def test_chunk_op_values_and_gradients_are_the_pytorch_chunk_forms(kind):
    """Eager calls through the ops (register_autograd's backward: the Triton backward kernels, or the
    recomputed PyTorch form for both decays) against `_chunk_linear` in float64."""
    q, k, v, gk, gv, h0, _, _ = _chunk_args(kind)
    xs = [x for x in (q, k, v, gk, gv, h0)]
    got = _loss_grads(lambda *a: tc._triton_chunk_linear(*a, C), xs)
    want = _loss_grads(lambda *a: _chunk_linear(*a, C), [None if x is None else x.double() for x in xs])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_delta_op_values_and_gradients_are_the_pytorch_chunk_form():
    q, k, v, beta, g, h0, _, _ = _delta_args()
    xs = [q, k, v, beta, g, h0]
    got = _loss_grads(lambda *a: td._triton_delta_chunk(*a, C), xs)
    want = _loss_grads(lambda *a: _chunk_delta(*a, C), [x.double() for x in xs])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def _loss_grads(fn, xs):
    leaves = [None if x is None else x.detach().requires_grad_() for x in xs]
    o, S = fn(*leaves)
    loss = (o * torch.cos(torch.arange(o.numel(), dtype=o.dtype)).view_as(o)).sum() + (S * S).sum()
    wrt = [x for x in leaves if x is not None]
    return [o.detach(), S.detach(), *torch.autograd.grad(loss, wrt)]


def _cell_inputs(name, T, seed):
    return library_inputs(name, 2, T, 1, False, torch.float32, seed=seed)


DIMS = {"K": 4, "V": 3}


@pytest.mark.parametrize("name,op", [("gla", "rnnc.triton_chunk_forward.default"),
                                     ("gated_deltanet", "rnnc.triton_delta_forward.default")])
def test_a_triton_cell_compiles_once_with_the_kernel_ops_in_its_graph(name, op):
    """fullgraph=True (no graph break), dynamic T: lengths 70 and 90 (past RECURRENT_BELOW, so the chunk
    kernels run), one compilation, the launchers' ops in the traced graph, eager's values and gradients."""
    cell = rnnc.build(name, backend="triton", chunk_size=32, **DIMS)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(cell, fullgraph=True, dynamic=True, backend=counter)
    for T in (70, 90):
        xs = _cell_inputs(name, T, T)
        with torch._dynamo.config.patch(error_on_recompile=T == 90):
            got = _outputs_and_grads(compiled, xs)
        want = _outputs_and_grads(cell, xs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    targets = {str(n.target) for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert op in targets


def _outputs_and_grads(cell, xs):
    xs = [x.detach().requires_grad_() for x in xs]
    o, final = cell(*xs)
    loss = (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() + sum((s * 0.5).sum() for s in final.values())
    return [o.detach(), *(s.detach() for s in final.values()), *torch.autograd.grad(loss, xs)]


def test_a_triton_cell_exports_with_a_dynamic_length():
    cell = rnnc.build("gla", backend="triton", chunk_size=32, **DIMS)
    xs = [x.detach() for x in _cell_inputs("gla", 70, 1)]
    program = torch.export.export(cell, tuple(xs), dynamic_shapes={"args": tuple({1: Dim("T", min=65, max=4096)}
                                                                                  for _ in xs)})
    for T in (66, 100):
        xs = [x.detach() for x in _cell_inputs("gla", T, T)]
        (got, got_final), (want, want_final) = program.module()(*xs), cell(*xs)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_final["S"], want_final["S"])

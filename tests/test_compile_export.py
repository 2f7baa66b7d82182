"""torch.compile(fullgraph=True) and torch.export with a dynamic sequence length: the recurrence runs as
one custom op (rnnc/runtime/opaque.py, backends/opaque.py) whose fake gives the output shapes for any
T, so one compilation or one exported program serves every length, with eager's values and gradients.

The fast tests compile with the "aot_eager" backend (Dynamo and AOTAutograd trace the model, fake
tensors and the op's autograd included, without generating code); one slow test runs inductor."""
from __future__ import annotations

import os
import unittest.mock

import pytest
import torch
import torch._dynamo
from torch.export import Dim
from torch.utils._python_dispatch import TorchDispatchMode

import rnnc

from helpers import DIMS, library_inputs

#: Triton's kernels run on the CPU in its interpreter only (CI sets TRITON_INTERPRET=1)
_INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="the Triton backend runs on the CPU only under TRITON_INTERPRET=1")

#: (cell, backend): the loop, a scan (elementwise-affine), chunk forms (a matrix state), and the generated
#: Triton kernels (the fused recurrent kernel, the chunkwise ones) as one op each
CASES = [("lstm", "loop"), ("gru", "loop"), ("mingru", "scan"), ("gla", "chunk"), ("deltanet", "chunk"),
         pytest.param("lstm", "triton", marks=_INTERPRETED), pytest.param("gla", "triton", marks=_INTERPRETED)]


def _build(name: str, backend: str):
    torch.manual_seed(0)
    dims = {k: v for k, v in DIMS.items() if k in rnnc.load(name).cell().dims}
    return rnnc.build(name, backend=backend, **dims)


def _inputs(name: str, T: int, seed: int = 0):
    return library_inputs(name, B=2, T=T, heads=2, extreme=False, dtype=torch.float32, seed=seed)


def _values_and_grads(cell, xs):
    outs, final = cell(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outs)
    loss = loss + sum((s * 0.5).sum() for s in final.values())
    params = [p for p in cell.parameters()]
    grads = torch.autograd.grad(loss, [*xs, *params])
    return [o.detach() for o in outs], {k: v.detach() for k, v in final.items()}, grads


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,backend", CASES)
def test_compiled_once_for_every_length(name, backend):
    """fullgraph=True (no graph break), dynamic T: two lengths, one compilation, eager's values and grads."""
    cell = _build(name, backend)
    torch._dynamo.reset()
    compiled = torch.compile(cell, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (9, 23):
        xs = _inputs(name, T)
        with torch._dynamo.config.patch(error_on_recompile=T == 23):  # a second compilation raises
            got = _values_and_grads(compiled, xs)
        want = _values_and_grads(cell, xs)
        for g, w in zip(got[0], want[0]):
            _close(g, w)
        for k in want[1]:
            _close(got[1][k], want[1][k])
        for g, w in zip(got[2], want[2]):
            _close(g, w)


@pytest.mark.slow
def test_inductor_compiles_the_loop_once():
    """The real compiler (inductor generates the code around the op), the same contract."""
    cell = _build("lstm", "loop")
    torch._dynamo.reset()
    compiled = torch.compile(cell, fullgraph=True, dynamic=True)
    for T in (9, 23):
        xs = _inputs("lstm", T)
        with torch._dynamo.config.patch(error_on_recompile=T == 23):
            got = _values_and_grads(compiled, xs)
        want = _values_and_grads(cell, xs)
        for g, w in zip(got[0] + list(got[2]), want[0] + list(want[2])):
            _close(g, w)


@pytest.mark.parametrize("name", rnnc.library())
def test_every_library_cell_runs_its_recurrence_as_one_op(name):
    """On every backend it has but newton (whose iteration count depends on the data), the generated
    module registers its recurrence as a custom op (nothing fell back to the inline form), and what it
    computes through that op, as compiled code calls it, is the eager loop's output."""
    xs = [x.detach() for x in _inputs(name, 5)]
    want = _build(name, "loop")(*xs)[0]
    for backend in rnnc.backends_for(name):
        if backend == "newton" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"):
            continue
        source = rnnc.compile(name, backend=backend)
        namespace = {}
        exec(compile(source, f"<{name}:{backend}>", "exec"), namespace)  # noqa: S102 - rnnc's generated code
        ops = [v for k, v in namespace.items() if k.startswith("_RECURRENCE_")]
        assert ops and all(isinstance(op, torch._ops.OpOverload) and op.namespace == "rnnc" for op in ops), backend
        cell = _build(name, backend)
        with unittest.mock.patch.object(torch.compiler, "is_compiling", return_value=True):
            got = cell(*xs)[0]
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            _close(g, w)


def _export(name: str, cell, T: int):
    xs = [x.detach() for x in _inputs(name, T)]
    time = Dim("T", min=2, max=4096)
    return torch.export.export(cell, tuple(xs), dynamic_shapes={"args": tuple({1: time} for _ in xs)})


@pytest.mark.parametrize("name,backend", CASES + [("lstm", "auto"), ("gla", "auto"), ("running_max", "scan"),
                                                 ("lru", "scan"), ("kda", "chunk"),
                                                 pytest.param("mingru", "triton", marks=_INTERPRETED)])
def test_exported_with_a_dynamic_length_runs_at_other_lengths(name, backend):
    cell = _build(name, backend)
    program = _export(name, cell, 40)
    for T in (3, 17, 70):
        xs = [x.detach() for x in _inputs(name, T, seed=T)]
        got, got_final = program.module()(*xs)
        want, want_final = cell(*xs)
        _close(got, want)
        for k in want_final:
            _close(got_final[k], want_final[k])


def test_auto_under_export_takes_the_parallel_form_at_every_length():
    """gla's auto build runs sequences shorter than LOOP_BELOW on the loop in eager; exported (even at
    such a length) it holds the chunk form's op only: the choice would be a guard on T."""
    cell = _build("gla", "auto")
    assert cell.LOOP_BELOW > 5
    program = _export("gla", cell, 5)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(op.startswith("rnnc.chunk_") for op in ops), ops
    assert not any(op.startswith("rnnc.loop_") for op in ops), ops


def test_exporting_newton_says_what_to_do_instead():
    cell = _build("gru", "newton")
    xs = [x.detach() for x in _inputs("gru", 9)]
    with pytest.raises(Exception, match="newton backend cannot be exported.*backend='loop'"):
        torch.export.export(cell, tuple(xs))


def test_the_drop_in_lstm_compiles_once():
    """rnnc.nn.LSTM (two layers, time-major) under fullgraph=True with a dynamic T: one compilation."""
    torch.manual_seed(0)
    lstm = rnnc.nn.LSTM(4, 5, num_layers=2)
    torch._dynamo.reset()
    compiled = torch.compile(lstm, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (6, 11):
        x = torch.randn(T, 3, 4)
        with torch._dynamo.config.patch(error_on_recompile=T == 11):
            _close(compiled(x)[0], lstm(x)[0])


def test_op_names_come_from_the_content_hash_not_the_spec():
    spec = 'cell evil_x__import__(x: [3]) -> (y: [3]) {\n    state h: [3] = 0\n    h = tanh(x + h)\n    y = h\n}\n'
    cell = rnnc.build(spec, backend="loop")
    program = torch.export.export(cell, (torch.randn(2, 5, 3),))
    names = [str(n.target) for n in program.graph.nodes if n.op == "call_function" and "rnnc" in str(n.target)]
    assert len(names) == 1 and "evil" not in names[0] and "import" not in names[0]
    namespace, op, _ = names[0].split(".")
    assert namespace == "rnnc" and op.startswith("loop_") and len(op) == len("loop_") + 16
    int(op[len("loop_"):], 16)  # the hash's hex digits


class _Calls(TorchDispatchMode):
    """Records the forward calls of rnnc's custom ops (the OpOverload and its arguments)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rnnc" and not func.__name__.split(".")[0].endswith(("_backward", "_vjp")):
            self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def _op_calls(cell, xs):
    """The rnnc ops the cell's forward calls as compiled code would (regions through their op)."""
    with _Calls() as mode, unittest.mock.patch.object(torch.compiler, "is_compiling", return_value=True):
        cell(*xs)
    return mode.calls


def _opcheck(name: str, backend: str, T: int = 7) -> None:
    """torch.library.opcheck on every op the cell calls: the schema, the autograd registration, the
    fake's shapes and strides against the real outputs', and AOTAutograd with dynamic shapes. One head
    (an extra axis of 1): the time-major views the ops take are then not contiguous."""
    cell = _build(name, backend)
    calls = _op_calls(cell, library_inputs(name, B=2, T=T, heads=1, extreme=False, dtype=torch.float32, seed=0))
    assert calls, f"{name}: its forward called no rnnc op"
    for func, args in calls:
        args = [a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(func, args)


@pytest.mark.parametrize("name,backend", [("lstm", "loop"), ("lsrl_majority", "loop"), ("mlstm", "loop"),
                                          ("mingru", "scan"), ("gla", "chunk")])
def test_the_ops_pass_opcheck(name, backend):
    _opcheck(name, backend)


@pytest.mark.slow
@pytest.mark.parametrize("name", rnnc.library())
def test_every_library_loop_passes_opcheck(name):
    _opcheck(name, "loop")

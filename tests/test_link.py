"""The two forms of a generated module (backends/link.py): `rnnc.build` imports its runtime from
rnnc.runtime, `rnnc compile` vendors it into a standalone file.

Checked: both forms give the same numbers, bit for bit, values and gradients, on every backend; the
standalone file imports only torch and triton, reads no name it does not define, carries only
definitions something in it reads (tree-shaken), in rnnc.runtime's module order, and never the path
of the spec or of rnnc; each runtime entry point vendored alone runs like the imported one; the
runtime package keeps to what vendoring needs; compile and build pick the same backend by default.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rnnc
import rnnc.runtime
from helpers import DIMS, library_inputs, outputs_and_grads
from rnnc.backends import link

STANDALONE_IMPORTS = {"math", "os", "warnings", "torch", "torch.nn", "torch.nn.functional", "triton", "triton.language"}


def _dims(name: str) -> dict[str, int]:
    return {d: DIMS[d] for d in rnnc.load(name).cell().dims if d in DIMS}


def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"standalone_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (as for any imported file; Triton reads the module)
    spec.loader.exec_module(module)
    return module


def _standalone(name: str, backend: str, tmp_path: Path, **kw):
    path = tmp_path / f"{name}_{backend}.py"
    path.write_text(rnnc.compile(name, backend=backend, **kw))
    return _import_file(path).Cell


CASES = [  # (cell, backend, T): one cell per lowering, and auto's dispatch to the loop below its threshold
    ("lstm", "loop", 6), ("gru", "loop", 6), ("mingru", "scan", 9), ("running_logsumexp", "scan", 9),
    ("gla", "chunk", 11), ("deltanet", "chunk", 11), ("rwkv6", "chunk", 11),
    ("gla", "auto", 11), ("gla", "auto", 5), ("mingru", "auto", 70),
    ("mingru", "triton", 9), ("running_max", "triton", 9), ("lstm", "triton", 5),
    ("simple_gla", "triton", 70), ("gated_deltanet", "triton", 70), ("gla", "triton", 6),
    ("paralstm", "newton", 9), ("gru", "newton", 9),
]


@pytest.mark.parametrize("name,backend,T", CASES, ids=[f"{n}-{b}-T{t}" for n, b, t in CASES])
def test_build_and_compile_compute_the_same_numbers(name, backend, T, tmp_path):
    """The built module and the standalone file run the same runtime code: equal outputs, final states
    and gradients (inputs and params), bit for bit."""
    if backend == "triton":
        pytest.importorskip("triton")
    dims = _dims(name)
    built = rnnc.build(name, backend=backend, **dims)
    assert "from rnnc.runtime." in built.source
    standalone = _standalone(name, backend, tmp_path)(**dims)
    standalone.load_state_dict(built.state_dict())
    inputs = library_inputs(name, 2, T, 1, False, torch.float32, seed=0)
    ys, final, grads = outputs_and_grads(built, inputs)
    ys2, final2, grads2 = outputs_and_grads(standalone, [x.detach().requires_grad_() for x in inputs])
    for a, b in zip([*ys, *final.values(), *grads], [*ys2, *final2.values(), *grads2]):
        assert torch.equal(a, b)
    assert final.keys() == final2.keys()


def _vendored_names(source: str) -> list[str]:
    """Top-level names the file defines that come from the runtime (or stand in for an rnnc import)."""
    runtime = set(link.runtime().definitions) | {name for _, name in link.STANDINS}
    return [n for node in ast.parse(source).body for n in _defines(node) if n in runtime]


@pytest.mark.parametrize("name,backend", [("lstm", "loop"), ("lstm", "auto"), ("gla", "chunk"), ("mingru", "scan"),
                                          ("running_max", "scan"), ("gla", "triton"), ("deltanet", "triton"),
                                          ("lstm", "triton"), ("running_max", "triton"), ("lsrl_majority", "auto"),
                                          ("paragru", "newton")])
def test_standalone_file_is_complete_and_tree_shaken(name, backend):
    source = rnnc.compile(name, backend=backend)
    tree = ast.parse(source)
    imported = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert imported <= STANDALONE_IMPORTS
    assert not any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))
    assert link.free_names(source) == set()  # every name it reads, it defines (or imports)
    # nothing vendored that nothing reads: each definition is read by the cell's code or another one
    vendored = set(_vendored_names(source))
    for d in vendored:
        rest = ast.unparse(ast.Module([n for n in tree.body if d not in _defines(n)], []))
        assert d in link.free_names(rest), f"{d} is vendored but never read"
    # grouped by module, in rnnc.runtime.MODULES order
    groups = [line.split("rnnc.runtime.")[1].split()[0] for line in source.splitlines()
              if line.startswith("# ") and "vendored from rnnc.runtime." in line]
    assert groups == sorted(groups, key=rnnc.runtime.MODULES.index) and len(set(groups)) == len(groups)


def _defines(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    return set()


def test_only_what_the_cell_uses_is_vendored():
    loop = set(_vendored_names(rnnc.compile("lstm", backend="loop")))
    assert {"_recurrence_op", "_gather_inputs", "InputError"} <= loop
    assert not {n for n in loop if n.startswith(("_chunk", "_triton", "_linear_scan", "_fold", "_Deferred"))}
    autograd = set(_vendored_names(rnnc.compile("lstm", backend="loop", backward="autograd")))
    assert "_DeferredWeight" in autograd and "_or_zeros" not in autograd
    gla = set(_vendored_names(rnnc.compile("gla", backend="chunk")))
    assert "_chunk_linear" in gla and "_chunk_linear_key" in gla
    assert not {n for n in gla if n.startswith(("_chunk_delta", "_triton", "_or_zeros"))}
    delta = set(_vendored_names(rnnc.compile("deltanet", backend="triton")))
    assert {"_triton_delta_chunk", "_chunk_delta", "_triton_chunk_block"} <= delta
    assert "_triton_chunk_linear" not in delta and "_chunk_linear" not in delta
    kda = set(_vendored_names(rnnc.compile("kda", backend="triton")))
    assert {"_triton_chunk_dplr", "_chunk_dplr", "_triton_unit_tril_inverse", "_triton_chunk_tile"} <= kda
    assert not {n for n in kda if n.startswith(("_triton_delta_", "_triton_chunk_linear"))}


def test_generated_files_name_the_spec_not_its_path(tmp_path):
    spec = tmp_path / "private" / "my_cell.rnn"
    spec.parent.mkdir()
    spec.write_text("cell leaky(x: [D]) -> (y: [D]) {\n    state h: [D] = 0\n    h = 0.5 * h + x\n    y = h\n}\n")
    for source in (rnnc.compile(str(spec)), rnnc.build(str(spec), D=3).source, rnnc.compile("lstm")):
        assert str(tmp_path) not in source and "/private/" not in source
        assert str(Path(rnnc.__file__).parent.parent) not in source
    assert "from my_cell.rnn (cell leaky" in rnnc.compile(str(spec))
    assert "cell lstm (lstm.rnn)" in rnnc.compile("lstm")


ENTRY_POINTS = {  # runtime entry point -> arguments (time-major q, k, v, gates, h0, chunk)
    "_chunk_linear": lambda q, k, v, g, b: (q, k, v, g, None, None, 8),
    "_chunk_delta": lambda q, k, v, g, b: (q, k, v, b, g[..., 0], None, 8),
    "_triton_chunk_linear": lambda q, k, v, g, b: (q, k, v, g, None, None, 16),
    "_triton_delta_chunk": lambda q, k, v, g, b: (q, k, v, b, g[..., 0], None, 16),
    # KDA's micro-step: a = -b k, b = e^g k
    "_chunk_dplr": lambda q, k, v, g, b: (q, [k], [v * b[..., None]], [-b[..., None] * k], [g.exp() * k], [g], None, 8),
    "_triton_chunk_dplr": lambda q, k, v, g, b: (q, [k], [v * b[..., None]], [-b[..., None] * k], [g.exp() * k], [g],
                                                 None, 16),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_each_entry_point_vendored_alone_runs_as_imported(entry, tmp_path):
    """A file holding only `entry` and what it reads (here from a one-line caller) imports and computes
    what the imported function does, forward and backward (the copies the paste contract forced are gone:
    triton_delta reads triton_chunk's block helpers, both read chunk.py's PyTorch fallbacks)."""
    module_name = next(m for m in rnnc.runtime.MODULES if entry in link.runtime().definitions
                       and link.runtime().definitions[entry].module == m)
    if module_name.startswith("triton"):
        pytest.importorskip("triton")
    caller = f"def run(*args, **kwargs):\n    return {entry}(*args, **kwargs)\n"
    path = tmp_path / f"only{entry}.py"
    path.write_text(link.vendor(caller, rnnc.__version__) + "\n\n\n" + caller)
    vendored = _import_file(path)
    imported = getattr(importlib.import_module(f"rnnc.runtime.{module_name}"), entry)
    g = torch.Generator().manual_seed(0)
    T, N, K, V = 20, 2, 16, 16
    q, k, v = torch.randn(T, N, K, generator=g), torch.randn(T, N, K, generator=g), torch.randn(T, N, V, generator=g)
    k = torch.nn.functional.normalize(k, dim=-1)
    gates = torch.nn.functional.logsigmoid(torch.randn(T, N, K, generator=g) + 2)
    beta = torch.sigmoid(torch.randn(T, N, generator=g))
    results = []
    for fn in (vendored.run, imported):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, gates, beta)]
        o, S = fn(*ENTRY_POINTS[entry](*leaves))
        (o.sum() + (S * S).sum()).backward()
        results.append([o, S] + [x.grad for x in leaves if x.grad is not None])
    assert len(results[0]) == len(results[1]) > 2
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_the_runtime_package_keeps_to_what_vendoring_needs():
    """Every module listed in MODULES (and nothing else), no name defined twice, and a module imports
    from the package only modules listed before it (so a standalone file reads top-down)."""
    rt = link.runtime()
    assert set(rt.modules) == {p.stem for p in Path(rnnc.runtime.__file__).parent.glob("*.py")} - {"__init__"}
    folder = Path(rnnc.runtime.__file__).parent
    for i, module in enumerate(rt.modules):
        tree = ast.parse((folder / f"{module}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert rt.modules.index(node.module) < i, (module, node.module)


def test_a_runtime_module_that_a_standalone_file_could_not_carry_is_refused(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""doc"""\nimport numpy\n')
    with pytest.raises(rnnc.InternalError, match="not one of a standalone file's imports"):
        link._parse_module("bad", bad)
    bad.write_text("from rnnc.api import build\n")
    with pytest.raises(rnnc.InternalError, match="could not import from rnnc.api"):
        link._parse_module("bad", bad)
    bad.write_text("import torch\nif torch.cuda.is_available():\n    X = 1\n")
    with pytest.raises(rnnc.InternalError, match="only imports, functions, classes and constants"):
        link._parse_module("bad", bad)
    bad.write_text("def f():\n    return _chunk_linear()\n")  # defined in a sibling, but not imported here
    with pytest.raises(rnnc.InternalError, match="f reads _chunk_linear, which the module neither defines"):
        link._parse_module("bad", bad)
    with pytest.raises(rnnc.InternalError, match="reads 'nowhere'"):
        link.vendor("def f():\n    return nowhere()\n", "0")
    with pytest.raises(rnnc.InternalError, match="redefines _gather_inputs of rnnc.runtime"):  # _varlen reads it
        link.vendor("def _gather_inputs(*a):\n    return a\n\n\ndef f(*a):\n    return _varlen(*a)\n", "0")


def test_names_are_resolved_by_scope_not_by_text():
    """A local or a parameter that shares a runtime name is not a dependency; a global read in a nested
    scope (a comprehension, a lambda, a method) is."""
    code = ("def f(_chunk_linear):\n    _linear_scan = 1\n    return _chunk_linear, _linear_scan\n\n\n"
            "class C:\n    def m(self):\n        return [_time_major(x, 1, 2) for x in self]\n\n\n"
            "g = lambda: _acc(None, 1)\n")
    assert link.free_names(code) == {"_time_major", "_acc"}


@pytest.mark.parametrize("name", rnnc.library())
def test_compile_and_build_pick_the_same_backend(name):
    source = rnnc.compile(name)
    backend = source.splitlines()[0].split("backend ")[1].rstrip(").")
    assert rnnc.build(name, **_dims(name)).backend == backend == rnnc.analyze(name).backend


def test_compiling_imports_neither_torch_nor_triton():
    """The runtime is read as files, not imported: `rnnc compile` stays fast."""
    code = ("import sys, rnnc\n"
            "for n, b in [('lstm', 'auto'), ('gla', 'triton'), ('mingru', 'triton'), ('lstm', 'triton')]:\n"
            "    rnnc.compile(n, backend=b)\n"
            "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_runtime_definition_is_dead():
    """Every runtime definition is read by another one or named by the compiler's emitters (backends/,
    rnnc/ outside rnnc/runtime/): a helper whose last caller went away is deleted, not shipped."""
    root = Path(rnnc.__file__).resolve().parent.parent
    emitters = "\n".join(p.read_text() for p in [*(root / "backends").glob("*.py"), *(root / "rnnc").glob("*.py")])
    rt = link.runtime()
    dead = [name for name in rt.definitions
            if not any(name in d.reads for d in rt.definitions.values())
            and not re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", emitters)]
    assert not dead, dead

"""The `rnnc` command line: a few real subprocess runs, the rest in-process through main()."""
from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rnnc
from rnnc import cli
from rnnc.cli import main

REPO = Path(__file__).resolve().parent.parent

TWO_CELLS = """\
# Two tiny cells for the CLI tests
cell ema(x: [D]) -> (h: [D]) {
    state h: [D] = 0
    h = 0.9 * h + 0.1 * x
}

cell gated(x: [D], g: [D]) -> (y: [D]) {
    state s: [D] = 0
    s = sigmoid(g) * s + x
    y = tanh(s)
}
"""

ONE_CELL = """\
# A gated leaky accumulator with a parameter
cell leaky(x: [D]) -> (y: [D]) {
    param w: [D] = 0.5
    state s: [D] = 0
    s = sigmoid(w) * s + x
    y = tanh(s) * w
}
"""

SYNTAX_ERROR = """\
cell bad(x: [D]) -> (y: [D]) {
    y = x +* 2
}
"""

UNKNOWN_NAME = """\
cell bad(x: [D]) -> (y: [D]) {
    y = x + nowhere
}
"""

#: What a standalone module may import (the loop backend needs nothing but torch).
ALLOWED_IMPORTS = {"torch", "math", "typing", "__future__", "collections", "dataclasses",
                   "functools", "itertools", "operator", "warnings", "enum", "abc", "numbers"}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RNNC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "rnnc.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture
def specs(tmp_path: Path) -> dict[str, Path]:
    files = {"two": TWO_CELLS, "one": ONE_CELL, "syntax": SYNTAX_ERROR, "unknown": UNKNOWN_NAME}
    paths = {}
    for key, text in files.items():
        p = tmp_path / f"{key}.rnn"
        p.write_text(text)
        paths[key] = p
    return paths


# ---------------------------------------------------------------------------------------
# subprocess runs (each pays the torch import; keep them few)
# ---------------------------------------------------------------------------------------

def test_list_subprocess():
    res = run_cli("list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    names = [line.split()[0] for line in lines if line.strip()]
    assert names == list(rnnc.library())
    assert "gla" in names and "lstm" in names
    # every library spec starts with a title comment, shown next to its name
    assert all(len(line.split(None, 1)) == 2 for line in lines), res.stdout


def test_check_syntax_error_subprocess(specs):
    res = run_cli("check", str(specs["syntax"]))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr + res.stdout
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"{specs['syntax']}:2:"), res.stderr
    assert ": error: " in first
    assert "^" in res.stderr  # caret excerpt


def test_compile_writes_standalone_module_subprocess(specs, tmp_path):
    out = tmp_path / "leaky_cell.py"
    res = run_cli("compile", str(specs["one"]), "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert out.is_file()
    assert f"wrote {out}" in res.stdout
    assert "leaky" in res.stdout  # the analysis summary names the cell

    source = out.read_text()
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "standalone module uses a relative import"
            imported.add((node.module or "").split(".")[0])
    assert "rnnc" not in imported
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS

    module = _import_file(out)
    classes = [v for v in vars(module).values()
               if inspect.isclass(v) and issubclass(v, torch.nn.Module)
               and v.__module__ == module.__name__]
    assert classes, "the compiled module defines no nn.Module subclass"
    cell = _instantiate(classes[0], {"D": 4})
    x = torch.randn(2, 5, 4)
    result = cell(x)
    y = result[0] if isinstance(result, tuple) else result
    assert isinstance(y, torch.Tensor) and y.shape == (2, 5, 4)
    # agrees with the cell rnnc builds directly
    ref = rnnc.build(rnnc.load(str(specs["one"])), backend="loop", D=4)
    y_ref, _ = ref(x)
    torch.testing.assert_close(y, y_ref)


def test_unknown_spec_subprocess():
    res = run_cli("analyze", "no_such_cell_xyz")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "no_such_cell_xyz" in res.stderr
    assert res.stderr.startswith("rnnc: error:")


def test_bad_dim_syntax_subprocess():
    res = run_cli("compile", "gla", "-D", "K:16")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "NAME=INT" in res.stderr


# ---------------------------------------------------------------------------------------
# in-process
# ---------------------------------------------------------------------------------------

def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"_rnnc_cli_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _instantiate(cls, dims: dict[str, int]):
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return cls(**dims)
    return cls(**{k: v for k, v in dims.items() if k in params})


def test_check_ok_lists_cells(specs, capsys):
    assert main(["check", str(specs["two"])]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"{specs['two']}: ok (cells: ema, gated)"


def test_check_library_cell(capsys):
    assert main(["check", "gla"]) == 0
    assert capsys.readouterr().out.startswith("gla: ok (cells: gla")


def test_check_type_error(specs, capsys):
    assert main(["check", str(specs["unknown"])]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{specs['unknown']}:2:"), err
    assert "nowhere" in err and "Traceback" not in err


def test_check_several_files_reports_each(specs, capsys):
    assert main(["check", str(specs["one"]), str(specs["syntax"])]) == 1
    captured = capsys.readouterr()
    assert f"{specs['one']}: ok" in captured.out
    assert f"{specs['syntax']}:2:" in captured.err


def test_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.rnn"
    assert main(["check", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and str(missing) in err


def test_directory_is_not_a_spec(tmp_path, capsys):
    assert main(["analyze", str(tmp_path) + os.sep]) == 1
    assert "directory" in capsys.readouterr().err


def test_unknown_name_suggests(capsys):
    assert main(["analyze", "lstn"]) == 1
    err = capsys.readouterr().err
    assert "unknown spec 'lstn'" in err and "lstm" in err


def test_several_cells_need_cell_option(specs, capsys):
    assert main(["analyze", str(specs["two"])]) == 1
    err = capsys.readouterr().err
    assert "--cell" in err and "Traceback" not in err
    assert main(["analyze", str(specs["two"]), "--cell", "gated"]) == 0
    assert "gated" in capsys.readouterr().out


def test_analyze_text_and_json(capsys):
    assert main(["analyze", "gla"]) == 0
    text = capsys.readouterr().out
    assert text.strip() == str(rnnc.analyze(rnnc.load("gla"))).strip()
    assert main(["analyze", "gla", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cell"] == "gla"
    assert "S" in json.dumps(data["states"])
    for key in ("inputs", "outputs", "states", "params", "dims", "backend"):
        assert key in data


def test_compile_to_stdout_summary_to_stderr(capsys):
    assert main(["compile", "gla"]) == 0
    captured = capsys.readouterr()
    ast.parse(captured.out)  # the module source, valid Python
    assert captured.out.strip() == rnnc.compile(rnnc.load("gla")).strip()
    summary = rnnc.analyze(rnnc.load("gla")).summary()  # compile's default backend: auto, as build's
    assert captured.err.strip() == summary.strip()
    assert summary.startswith("cell gla") and "backend: chunk" in summary
    assert "(cell gla, backend chunk)" in captured.out.splitlines()[0]


def test_compile_unwritable_output(tmp_path, capsys):
    target = tmp_path / "missing_dir" / "x.py"
    assert main(["compile", "gla", "-o", str(target)]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_graph_dot(tmp_path, capsys):
    out = tmp_path / "g.dot"
    assert main(["graph", "gla", "-o", str(out)]) == 0
    assert out.read_text().lstrip().startswith("digraph")
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["graph", "gla"]) == 0
    assert capsys.readouterr().out.lstrip().startswith("digraph")


def test_graph_svg_without_graphviz_is_drawn_by_rnnc(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    out = tmp_path / "g.svg"
    assert main(["graph", "lstm", "-o", str(out)]) == 0
    svg = out.read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    for label in ("weight_ih = param", "c = add", "h = mul"):  # one box per IR node, named ones labelled
        assert label in svg
    assert svg.count("stroke-dasharray") == 2  # the carry edges of h and c


def test_graph_png_without_graphviz(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    assert main(["graph", "gla", "-o", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert "graphviz" in err.lower() and ".dot" in err
    assert not (tmp_path / "g.png").exists()


def test_graph_unknown_format(tmp_path, capsys):
    assert main(["graph", "gla", "-o", str(tmp_path / "g.txt")]) == 1
    assert "format" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["H", "=3", "H=x", "H=1.5", "1H=3", "H=-2"])
def test_bad_dim_binding_is_usage_error(bad, capsys):
    assert main(["bench", "lstm", "-D", bad]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_conflicting_dims(capsys):
    assert main(["bench", "lstm", "-D", "H=3", "-D", "H=4"]) == 1
    assert "twice" in capsys.readouterr().err


def test_usage_errors(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    assert "compile" in capsys.readouterr().out


def test_internal_error_exit_70(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise ZeroDivisionError("kaboom")
    monkeypatch.setattr(rnnc, "analyze", boom)
    monkeypatch.delenv("RNNC_DEBUG", raising=False)
    assert main(["analyze", "gla"]) == 70
    err = capsys.readouterr().err
    assert "rnnc: internal error" in err and "kaboom" in err and "Traceback" not in err
    monkeypatch.setenv("RNNC_DEBUG", "1")
    assert main(["analyze", "gla"]) == 70
    assert "Traceback" in capsys.readouterr().err


def test_list_in_process(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in rnnc.library():
        assert any(line.split()[0] == name for line in out.splitlines())


def test_bench_small(specs, capsys):
    code = main(["bench", str(specs["one"]), "-D", "D=4", "--batch", "2", "--length", "6",
                 "--repeat", "1", "--min-time", "0.01", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "forward ms" in out
    for backend in rnnc.backends_for(rnnc.load(str(specs["one"]))):
        assert any(line.startswith(backend) for line in out.splitlines()), out


def test_bench_library_cell_with_params(capsys):
    code = main(["bench", "lstm", "-D", "I=3", "-D", "H=5", "--batch", "2", "--length", "4",
                 "--repeat", "1", "--min-time", "0.01", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "H=5" in out and "I=3" in out


def test_bench_json_and_csv(specs, tmp_path, capsys):
    """Every backend at every length, with at least --repeat samples, the median inside the quartiles;
    triton is skipped on a CPU run (with the reason) and the run still exits 0; progress on stderr."""
    out_json, out_csv = tmp_path / "b.json", tmp_path / "b.csv"
    code = main(["bench", str(specs["one"]), "-D", "D=4", "--batch", "2", "--length", "4", "8", "--repeat", "3",
                 "--min-time", "0.001", "--device", "cpu", "--json", str(out_json), "--csv", str(out_csv)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "rnnc bench: T=8 (2/2)" in captured.err
    data = json.loads(out_json.read_text())
    assert data["device"] == "cpu" and data["dims"]["D"] == 4 and data["batch"] == 2
    backends = rnnc.backends_for(rnnc.load(str(specs["one"])))
    assert sorted((r["backend"], r["T"]) for r in data["results"]) == sorted((b, t) for b in backends for t in (4, 8))
    for r in data["results"]:
        if r["backend"] == "triton":
            assert r["forward"] is None and "needs a CUDA GPU" in r["note"]
            continue
        assert r["note"] == ""
        for name in ("forward", "forward_backward"):
            s = r[name]
            assert s["samples"] >= 3
            assert 0 < s["min_ms"] <= s["q1_ms"] <= s["median_ms"] <= s["q3_ms"] <= s["max_ms"]
    lines = out_csv.read_text().splitlines()
    assert lines[0].startswith("backend,T,pass,median_ms")
    assert len(lines) == 1 + 2 * len(data["results"])


def test_bench_plot_needs_matplotlib(specs, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code = main(["bench", str(specs["one"]), "-D", "D=4", "--length", "4", "--plot", str(tmp_path / "p.png"),
                 "--json", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert code == 1 and "needs matplotlib" in err and "Traceback" not in err
    assert not (tmp_path / "b.json").exists()  # refused before running anything


def test_bench_plot(specs, tmp_path):
    pytest.importorskip("matplotlib")
    code = main(["bench", str(specs["one"]), "-D", "D=4", "--batch", "2", "--length", "4", "8", "--repeat", "1",
                 "--min-time", "0.001", "--device", "cpu", "--plot", str(tmp_path / "p.png")])
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------
# the dim evaluator (no eval())
# ---------------------------------------------------------------------------------------

def test_eval_dim():
    env = {"H": 8}
    assert cli.eval_dim("4*H", env) == 32
    assert cli.eval_dim("(H + 2) // 3 - 1", env) == 2
    assert cli.eval_dim(7, env) == 7
    assert cli.eval_dim("K", env, default=16) == 16 and env["K"] == 16
    for bad in ["__import__('os')", "H ** 2", "H.real", "[H]", "1.5", "H if H else 1", "'a'"]:
        with pytest.raises(cli.CliError):
            cli.eval_dim(bad, env, default=16)
    with pytest.raises(cli.CliError):
        cli.eval_dim("Z", {}, default=None)


def test_bench_dims_resolution():
    info = {"inputs": {"x": ["I"], "g": ["4*H"]}, "params": {"w": ["4*H", "I"]},
            "dims": {"I": None, "H": None, "N": 3}}
    dims, shapes = cli.bench_dims(info, {"H": 2})
    assert dims == {"H": 2, "N": 3, "I": 16}
    assert shapes == {"x": [16], "g": [8]}


def test_bench_unknown_dim(capsys):
    assert main(["bench", "gla", "-D", "Q=4", "--repeat", "1"]) == 1
    err = capsys.readouterr().err
    assert "no dim 'Q'" in err and "K, V" in err

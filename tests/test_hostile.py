"""Hostile specs: paths, names and numbers an attacker (or a careless user) can choose.

Nothing in a spec may run as Python: a path, a name or a number reaches generated source only as an
escaped literal or a mangled identifier. Each test feeds such inputs through every entry point that
applies (build from a path, parse(text, filename=) + build, analyze, compile, `rnnc compile -o` and
importing its output) and every backend the cell allows, and checks that no payload ran, the results
are right, and bad input is a located RnncError. docs/security.md counts the inputs per category.
"""
from __future__ import annotations

import builtins
import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import rnnc
from rnnc.cli import main
from rnnc.elaborate import BUILTINS, RESERVED_DIMS, RESERVED_INPUTS
from rnnc.errors import InternalError, NumberError, RnncError, RnncSyntaxError, SpecNotFoundError
from rnnc.parser import RESERVED

PAYLOAD = 'open("PWNED", "w").write("1")'

#: File (and folder) names: each would run the payload, or break the generated module, if pasted.
HOSTILE_PATHS = [
    f'p""";{PAYLOAD};""".rnn',
    "p''';open('PWNED','w').write('1');'''.rnn",
    f'" + {PAYLOAD} + ".rnn',
    "a\\N.rnn", "b\\x.rnn", "c\\u.rnn", "d\\U0001.rnn", "e\\.rnn", "f\\\\.rnn", "g\\\"\"\".rnn",
    "q'\".rnn", "nl\nnl.rnn", "cr\rcr.rnn", "tab\ttab.rnn", "nul\x01.rnn", "ls\u2028ps\u2029.rnn",
    "é-ü-中.rnn", "{cell}-%s-$(touch PWNED)-`touch PWNED`.rnn", "#comment.rnn", os.fsdecode(b"bad\xff.rnn"),
]
#: Folders above the spec, just as hostile.
HOSTILE_DIRS = [f'd""";{PAYLOAD};"""', "dir\\N{x}", "dir\nnl"]

SPEC = """cell c(x: [H]) -> (h: [H]) {
    dim H = 3
    state h: [H] = 0
    h = 0.5 * h + x
}
"""


def _reference_decay(x: torch.Tensor) -> torch.Tensor:
    h, out = torch.zeros_like(x[:, 0]), []
    for t in range(x.shape[1]):
        h = 0.5 * h + x[:, t]
        out.append(h)
    return torch.stack(out, 1)


def _import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_payload(*folders: Path) -> None:
    for folder in folders:
        assert not any(p.name == "PWNED" for p in folder.rglob("*")), f"a payload ran in {folder}"


@pytest.fixture
def jail(tmp_path, monkeypatch):
    """A working directory where a payload's relative `open("PWNED")` would land."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _spec_at(root: Path, name: str, folder: str | None = None) -> Path:
    base = root / folder if folder else root
    base.mkdir(parents=True, exist_ok=True)
    path = base / name
    path.write_text(SPEC)
    return path


def _every_entry_point(path: Path, jail: Path, tag: str) -> None:
    x = torch.randn(2, 5, 3)
    expected = _reference_decay(x)
    built = [rnnc.build(path), rnnc.build(rnnc.parse(SPEC, filename=str(path)), backend="scan")]
    for m in built:
        torch.testing.assert_close(m(x)[0], expected)
    assert "cell c" in rnnc.analyze(path).summary()
    for backend in ("loop", "scan"):
        out = jail / f"out_{tag}_{backend}.py"
        assert main(["compile", str(path), "--backend", backend, "-o", str(out)]) == 0
        module = _import_file(out, f"hostile_{tag}_{backend}")
        torch.testing.assert_close(module.Cell()(x)[0], expected)
    source = rnnc.compile(rnnc.parse(SPEC, filename=str(path)))
    module_path = jail / f"api_{tag}.py"
    module_path.write_text(source)
    torch.testing.assert_close(_import_file(module_path, f"hostile_api_{tag}").Cell()(x)[0], expected)
    _no_payload(jail)


@pytest.mark.parametrize("name", HOSTILE_PATHS, ids=lambda s: ascii(s)[1:25])
def test_hostile_file_name_never_runs(jail, name):
    path = _spec_at(jail, name)
    _every_entry_point(path, jail, f"f{HOSTILE_PATHS.index(name)}")


@pytest.mark.parametrize("folder", HOSTILE_DIRS, ids=lambda s: ascii(s)[1:25])
def test_hostile_folder_name_never_runs(jail, folder):
    path = _spec_at(jail, HOSTILE_PATHS[0], folder)
    _every_entry_point(path, jail, f"d{HOSTILE_DIRS.index(folder)}")


def test_hostile_filename_given_to_parse_only(jail):
    """The filename of parse() is only a label: no file needs to exist for it to be escaped."""
    x = torch.randn(1, 4, 3)
    for k, name in enumerate(HOSTILE_PATHS + [f"/{d}/{HOSTILE_PATHS[0]}" for d in HOSTILE_DIRS]):
        prog = rnnc.parse(SPEC, filename=name)
        torch.testing.assert_close(rnnc.build(prog)(x)[0], _reference_decay(x))
        out = jail / f"label{k}.py"
        out.write_text(rnnc.compile(prog))
        _import_file(out, f"hostile_label_{k}")
    _no_payload(jail)


# ---- identifiers ----------------------------------------------------------------------------------

#: One cell per template; each role is a name a spec chooses. The elementwise one runs on loop, scan and
#: triton; the matrix one (linear attention) on the chunk form too.
ELEMENTWISE = """cell {cell}(x: [{dim}], {inp}: [{dim}]) -> ({out}: [{dim}], y: [{dim}]) {{
    dim {dim} = 3
    param {par}: [{dim}] = 0.5
    state {st}: [{dim}] = 0
    let {let} = sigmoid(x)
    {st} = {let} * {st} + {inp} * {par}
    {out} = {st}
    y = {st} * 2
}}
"""
MATRIX = """cell {cell}({inp}: [{dim}], k: [{dim}], v: [V]) -> ({out}: [V]) {{
    dim {dim} = 3
    dim V = 2
    param {par}: [{dim}] = 0.5
    state {st}: [{dim}, V] = 0
    let {let} = outer(k * {par}, v)
    {st} = {st} + {let}
    {out} = {inp} @ {st}
}}
"""
ROLES = ("cell", "dim", "inp", "out", "par", "st", "let")
#: The templates' own fixed names, and the language's (its builtins, `inf`): not for the sweep.
FIXED = {"x", "y", "k", "v", "V", "inf"} | set(BUILTINS) | {"uniform", "normal"}


def _reference(template: str, ins: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The cell in plain PyTorch (float64): outputs over time and the final state."""
    if template == "elementwise":
        x, u = ins
        s, outs = torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            s = torch.sigmoid(x[:, t]) * s + u[:, t] * 0.5
            outs.append(s)
        o = torch.stack(outs, 1)
        return [o, 2 * o], s
    q, k, v = ins
    S, outs = torch.zeros(q.shape[0], q.shape[-1], v.shape[-1], dtype=q.dtype), []
    for t in range(q.shape[1]):
        S = S + (k[:, t] * 0.5)[:, :, None] * v[:, t, None, :]
        outs.append(torch.einsum("bk,bkv->bv", q[:, t], S))
    return [torch.stack(outs, 1)], S


def _generated_globals() -> set[str]:
    """Every global name of generated modules (rnnc.build's and the standalone form), all backends."""
    names: set[str] = set()
    for template, text in (("elementwise", ELEMENTWISE), ("matrix", MATRIX)):
        spec = text.format(cell="c", dim="H", inp="u", out="o", par="w", st="s", let="a")
        for backend in rnnc.backends_for(spec):
            m = rnnc.build(spec, backend=backend)
            names |= set(vars(sys.modules[type(m).__module__]))
            names |= set(vars(type(m)))
            names |= {n for line in m.source.splitlines() for n in _words(line)}
    return names


def _words(line: str) -> set[str]:
    word, out = "", set()
    for ch in line + " ":
        if ch.isalnum() or ch == "_":
            word += ch
        else:
            if word and word.isidentifier():
                out.add(word)
            word = ""
    return out


def _hostile_names() -> list[str]:
    """nn.Module's attributes (class and instance), the generated modules' globals and words, Python's
    builtins: every one a valid rnnc name, none a language word."""
    pool = set(dir(nn.Module)) | set(vars(nn.Module())) | set(dir(builtins)) | _generated_globals()
    pool |= {"self", "cls", "super", "T_destination", "LOOP_BELOW", "SHADOWED", "Cell", "_", "__"}
    ok = {n for n in pool if n.isidentifier() and n.isascii() and n not in RESERVED and n not in FIXED}
    return sorted(ok)


#: The names the issue found crashing, and the ones most likely to collide: always swept.
NAMED = ["xpu", "register_forward_hook", "to_empty", "T_destination", "LOOP_BELOW", "self", "training",
         "forward", "dims", "source", "backend", "_parameters", "__class__", "__dict__", "SHADOWED", "DIMS",
         "state_dict", "Cell", "torch", "nn", "F", "math", "InputError", "B", "T", "N", "extra", "cdt", "dev",
         "odt", "lead", "final", "args", "kwargs", "len", "print", "float", "_forward_loop", "d_H", "in_x",
         "out_y", "s_s", "p_w", "lin_w", "t1", "v_a", "x_x"]


def _placements(names: list[str]) -> list[dict[str, str]]:
    """Specs covering every (name, role): spec i gives role r the name names[(i + r) % len]. A role a
    name cannot take (a dim named `device`, an input named `state`: build's and forward's own keywords)
    keeps its plain name."""
    out = []
    for i in range(len(names)):
        roles = {}
        for r, role in enumerate(ROLES):
            name = names[(i + r) % len(names)]
            if (role == "dim" and name in RESERVED_DIMS) or (role == "inp" and name in RESERVED_INPUTS):
                name = {"dim": "H", "inp": "u"}[role]
            roles[role] = name
        if len(set(roles.values())) == len(ROLES):
            out.append(roles)
    return out


def _check_names(roles: dict[str, str], backends=None) -> int:
    """Build the cell with these names on every backend that applies; outputs, final state, the state
    dict and the keyword call all use the spec's names. Returns the number of builds."""
    builds = 0
    g = torch.Generator().manual_seed(0)
    for template, text in (("elementwise", ELEMENTWISE), ("matrix", MATRIX)):
        spec = text.format(**roles)
        prog = rnnc.parse(spec)
        cell = prog.cell()
        shapes = [[3] if p.name != "v" else [2] for p in cell.inputs]
        ins = [torch.randn(2, 4, *s, generator=g, dtype=torch.float64) for s in shapes]
        expected, final = _reference(template, ins)
        for backend in backends or rnnc.backends_for(prog):
            if backend not in rnnc.backends_for(prog):
                continue
            m = rnnc.build(prog, backend=backend, dtype=torch.float64)
            assert set(m.state_dict()) == {roles["par"]}
            assert [n for n, _ in m.named_parameters()] == [roles["par"]]
            for call in ("positional", "keywords"):
                if call == "positional":
                    ys, states = m(*ins)
                else:
                    ys, states = m(**{p.name: x for p, x in zip(cell.inputs, ins)})
                ys = ys if isinstance(ys, tuple) else (ys,)
                assert list(states) == [roles["st"]]
                for got, want in zip(ys, expected):
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"{backend}: {roles}")
                torch.testing.assert_close(states[roles["st"]], final, rtol=1e-6, atol=1e-6)
            builds += 1
    return builds


@pytest.mark.parametrize("roles", _placements(NAMED), ids=lambda r: "-".join(r.values())[:60])
def test_colliding_names_build_and_run(roles):
    _check_names(roles, backends=("loop", "scan", "chunk"))


def test_colliding_names_on_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for roles in _placements(NAMED)[:3]:
        _check_names(roles, backends=("triton",))


def test_colliding_param_keeps_module_working():
    """A param named like an attribute nn.Module assigns later (`training`) or reads (`xpu`) is a
    param by the spec's name in state_dict, while train(), eval(), to() and state_dict loading work."""
    spec = ELEMENTWISE.format(cell="c", dim="H", inp="u", out="o", par="training", st="s", let="a")
    m = rnnc.build(spec)
    m.eval()
    assert m.training is False
    m.train()
    assert m.training is True
    m.load_state_dict({"training": torch.full((3,), 0.25)})
    assert dict(m.named_parameters())["training"].detach()[0].item() == 0.25
    m2 = rnnc.build(spec.replace("training", "xpu"))
    assert callable(m2.xpu) and set(m2.state_dict()) == {"xpu"}
    m2.to(torch.float64)
    assert dict(m2.named_parameters())["xpu"].dtype == torch.float64


def test_the_attribute_list_covers_the_installed_torch():
    """Generated code reads a param through `_parameters` when nn.Module has an attribute of that name;
    the list it checks is fixed (emitting imports no torch), so a torch adding attributes must extend it."""
    from rnnc.backends.assemble import NN_MODULE_ATTRS

    assert set(dir(nn.Module)) | set(vars(nn.Module())) <= NN_MODULE_ATTRS


def test_dim_named_self_is_bound_by_keyword():
    m = rnnc.build("cell c(x: [self]) -> (h: [self]) {\n state h: [self] = 0\n h = 0.5 * h + x\n}\n", self=4)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(m(x)[0], _reference_decay(x))
    assert m.step(x=x[:, 0])[0].shape == (2, 4)


@pytest.mark.parametrize("word", sorted(RESERVED)[:8] + ["class", "lambda", "import", "cell"])
def test_python_keywords_are_refused_as_names(word):
    with pytest.raises(RnncSyntaxError) as info:
        rnnc.parse(ELEMENTWISE.format(cell="c", dim="H", inp="u", out="o", par=word, st="s", let="a"))
    assert info.value.loc is not None and "reserved" in info.value.message


def test_very_long_cell_name():
    name = "c" * 5000
    m = rnnc.build(SPEC.replace("cell c(", f"cell {name}("))
    x = torch.randn(1, 3, 3)
    torch.testing.assert_close(m(x)[0], _reference_decay(x))


@pytest.mark.slow
def test_every_hostile_name_in_every_role():
    """The exhaustive sweep: every name of _hostile_names() in each of the seven roles, every backend
    (the triton one under the interpreter)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    names = _hostile_names()
    assert len(names) > 300
    builds = sum(_check_names(roles) for roles in _placements(names))
    assert builds >= 4 * len(names)


def test_sample_of_hostile_names():
    """A different sample of the exhaustive sweep's names each run (seed printed on failure)."""
    seed = random.randrange(2**32)
    names = random.Random(seed).sample(_hostile_names(), 14)
    for roles in _placements(names):
        try:
            _check_names(roles, backends=("loop", "scan", "chunk"))
        except Exception as e:  # pragma: no cover - the message names the seed to reproduce
            raise AssertionError(f"seed {seed}: {roles}: {e}") from e


# ---- numbers --------------------------------------------------------------------------------------

NUMBER_SPEC = "cell c(x: [H]) -> (h: [H]) {{\n    dim H = 3\n    state h: [H] = 0\n    h = ({e}) * h + x\n}}\n"

#: Constants whose value is finite: the cell runs with that value (float64, to hold 1e300).
FINITE = {
    "99999999999999999999999": 99999999999999999999999.0, "-99999999999999999999999": -1e23,
    "9223372036854775807": 9223372036854775807.0, "9223372036854775808": 9223372036854775808.0,
    "99999999999999999999999.0": 1e23, "1" + "0" * 300: 1e300, "1e-400": 0.0, "0.5**5000": 0.0,
    "2**-5000": 0.0, "2**62": float(2**62), "99999999999999999999999 // 7": 1e23 // 7,
    "1e308 * 1.5": 1.5e308, "-inf * 0.0 + 1 * 0": None,  # None: an error is also acceptable
    "0." + "0" * 390 + "1": 1e-391, "0.5": 0.5,
}
#: Constants that cannot be a finite real number: a NumberError at the constant's place.
BAD = ["2.0**4096", "1e400", "1" * 5000, "2**4096", "10**400", "1/0", "1 // 0", "5 % 0", "0*inf", "inf - inf",
       "(-1)**0.5", "exp(1e308)", "log(0)", "sqrt(-1)", "1e308 * 10", "-(2.0**1025)", "1." + "5" * 5000,
       "9" * 400 + ".0", "(0.1 ** -400)", "exp(710)", "99999999 ** 99999999"]


@pytest.mark.parametrize("text", list(FINITE), ids=lambda s: s[:30])
def test_finite_constants_run_with_their_value(text):
    value = FINITE[text]
    try:
        m = rnnc.build(NUMBER_SPEC.format(e=text), backend="loop", dtype=torch.float64)
    except NumberError as e:
        assert value is None, f"{text} refused: {e}"
        return
    x = torch.rand(1, 2, 3, dtype=torch.float64) + 1
    y = m(x)[0]
    c = value if value is not None else 0.0
    torch.testing.assert_close(y[:, 1], c * x[:, 0] + x[:, 1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("text", BAD, ids=lambda s: s[:30])
def test_out_of_range_constants_are_located_errors(text):
    for backend in ("loop", "scan"):
        with pytest.raises(NumberError) as info:
            rnnc.build(NUMBER_SPEC.format(e=text), backend=backend)
        err = info.value
        assert err.line == 4 and 5 <= err.column <= 12 and err.hint, str(err)
        assert len(str(err)) < 1000


#: Constants that read a dim: out of range only for the dims given to build() (H = 2000 here).
BAD_WITH_DIMS = ["2.0 ** H", "exp(H)", "1e306 * H", "1 / (H - 2000)", "log(2000 - H)", "sqrt(1999 - H)",
                 "(1999.0 - H) ** 0.5", "H ** H", "2 ** H", "0.0 * inf ** (H - 1999)"]


@pytest.mark.parametrize("text", BAD_WITH_DIMS)
def test_constants_that_read_dims_are_checked_at_build(text):
    """A NumberError at the expression naming the dims, from build(), instead of an OverflowError, a
    ZeroDivisionError or an inf when the cell runs; with a small H the same spec builds and runs."""
    spec = NUMBER_SPEC.replace("dim H = 3", "dim H").format(e=f"({text}) * 0.0 + 0.5")
    for given in ({"H": 2000}, {}):
        with pytest.raises(NumberError) as info:
            rnnc.build(spec.replace("dim H\n", "dim H = 2000\n") if not given else spec, backend="loop", **given)
        err = info.value
        assert err.line == 4 and 5 <= err.column <= 14, str(err)
        assert "H=2000" in err.message and "dims" in err.hint and len(str(err)) < 1000
    x = torch.rand(1, 2, 3, dtype=torch.float64)
    y = rnnc.build(spec, backend="loop", dtype=torch.float64, H=3)(x)[0]
    torch.testing.assert_close(y[:, 1], 0.5 * x[:, 0] + x[:, 1])


@pytest.mark.parametrize("shape", ["[99999999999999999999999]", "[H + 1" + "0" * 5000 + "]", "[1" + "0" * 19 + "]"])
def test_huge_dim_literals_are_errors(shape):
    with pytest.raises(NumberError) as info:
        rnnc.parse(f"cell c(x: [H]) -> (h: [H]) {{\n dim H = 3\n param w: {shape} = 1\n"
                   " state h: [H] = 0\n h = 0.5 * h + x\n}\n")
    assert info.value.line == 3 and len(str(info.value)) < 1000


def test_numbers_through_compile_cli(jail):
    spec = jail / "big.rnn"
    spec.write_text(NUMBER_SPEC.format(e="99999999999999999999999 * 1e-23"))
    assert main(["compile", str(spec), "-o", str(jail / "big.py")]) == 0
    x = torch.rand(1, 2, 3, dtype=torch.float64)
    y = _import_file(jail / "big.py", "hostile_big").Cell(dtype=torch.float64)(x)[0]
    torch.testing.assert_close(y[:, 1], 0.99999999999999999999999 * x[:, 0] + x[:, 1])
    spec.write_text(NUMBER_SPEC.format(e="2.0**4096"))
    assert main(["compile", str(spec), "-o", str(jail / "bad.py")]) == 1
    assert not (jail / "bad.py").exists()


# ---- imports --------------------------------------------------------------------------------------

CALLER = 'import "{target}"\ncell c(x: [H]) -> (y: [H]) {{\n    dim H = 2\n    y = f(x)\n}}\n'


@pytest.fixture
def tree(tmp_path):
    """root/ (the importing spec's folder) with lib.rnn, sub/s.rnn importing ../lib.rnn, a symlink out,
    a FIFO and a folder named .rnn, a non-rnnc file; outside/ with secrets."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "lib.rnn").write_text("def f(a) = a + 1\n")
    (root / "sub" / "s.rnn").write_text('import "../lib.rnn"\ndef g(a) = f(a) * 2\n')
    (outside / "secret.rnn").write_text("TOPSECRET password=hunter2\n")
    (outside / "ok.rnn").write_text("def f(a) = a - 1\n")
    (root / "notrnnc.rnn").write_text("TOPSECRET password=hunter2\n")
    (root / "link.rnn").symlink_to(outside / "ok.rnn")
    os.mkfifo(root / "fifo.rnn")
    (root / "dir.rnn").mkdir()
    (root / "big.rnn").write_text("# " + "x" * (1 << 20) + "\n")
    return root, outside


def _import(root: Path, target: str, **kw):
    return rnnc.parse(CALLER.format(target=target), filename=str(root / "main.rnn"), **kw)


def test_imports_inside_the_spec_folder_work(tree):
    root, _ = tree
    x = torch.randn(1, 2, 2)
    torch.testing.assert_close(rnnc.build(_import(root, "lib.rnn"))(x)[0], x + 1)
    prog = rnnc.parse(CALLER.format(target="sub/s.rnn").replace("f(x)", "g(x)"), filename=str(root / "main.rnn"))
    torch.testing.assert_close(rnnc.build(prog)(x)[0], (x + 1) * 2)


@pytest.mark.parametrize("target", ["../outside/ok.rnn", "{outside}/ok.rnn", "link.rnn", "sub/../../outside/ok.rnn",
                                    "fifo.rnn", "dir.rnn", "/dev/zero", "/etc/passwd", "{outside}/secret.rnn",
                                    "lib.rnnx", "missing.rnn", "big.rnn", "notrnnc.rnn", "../outside/secret.rnn"])
def test_imports_outside_the_policy_are_refused_without_content(tree, target):
    root, outside = tree
    with pytest.raises(RnncError) as info:
        _import(root, target.format(outside=outside))
    err = info.value
    assert not isinstance(err, InternalError) and err.loc is not None and err.hint
    assert "TOPSECRET" not in str(err) and "hunter2" not in str(err)


def test_import_roots_and_env_allow_more_folders(tree, monkeypatch):
    root, outside = tree
    x = torch.randn(1, 2, 2)
    prog = _import(root, f"{outside}/ok.rnn", import_roots=[outside])
    torch.testing.assert_close(rnnc.build(prog)(x)[0], x - 1)
    monkeypatch.setenv("RNNC_IMPORT_PATH", str(outside))
    torch.testing.assert_close(rnnc.build(_import(root, "../outside/ok.rnn"))(x)[0], x - 1)
    torch.testing.assert_close(rnnc.build(_import(root, "link.rnn"))(x)[0], x - 1)


def test_path_imports_from_text_are_off_by_default(tree, monkeypatch):
    root, _ = tree
    monkeypatch.chdir(root)
    monkeypatch.delenv("RNNC_IMPORT_PATH", raising=False)
    with pytest.raises(SpecNotFoundError) as info:
        rnnc.build(CALLER.format(target="lib.rnn"))
    assert "import_roots" in info.value.hint
    x = torch.randn(1, 2, 2)
    prog = rnnc.parse(CALLER.format(target="lib.rnn"), import_roots=[root])
    torch.testing.assert_close(rnnc.build(prog)(x)[0], x + 1)
    monkeypatch.setenv("RNNC_IMPORT_PATH", str(root))
    torch.testing.assert_close(rnnc.build(CALLER.format(target="lib.rnn"))(x)[0], x + 1)
    rnnc.parse('import gla\n' + SPEC)  # the library, by name, always


def test_a_3000_deep_import_chain_is_a_clean_error(tmp_path):
    for i in range(3000):
        text = f'import "a{i + 1}.rnn"\ndef f{i}(x) = x\n' if i < 2999 else "def f2999(x) = x\n"
        (tmp_path / f"a{i}.rnn").write_text(text)
    with pytest.raises(SpecNotFoundError) as info:
        rnnc.load(tmp_path / "a0.rnn")
    assert "deep" in info.value.message and info.value.loc is not None


# ---- resources ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [500])
def test_a_flat_sum_of_many_terms(n):
    terms = " + ".join(f"x * {k % 3}" for k in range(n))
    spec = f"cell c(x: [H]) -> (h: [H]) {{\n dim H = 2\n state h: [H] = 0\n h = 0.5 * h + {terms}\n}}\n"
    x = torch.randn(1, 3, 2, dtype=torch.float64)
    want = _reference_decay(x * sum(k % 3 for k in range(n)))
    for backend in ("loop", "scan"):
        torch.testing.assert_close(rnnc.build(spec, backend=backend, dtype=torch.float64)(x)[0], want)


def test_a_huge_literal_is_refused_before_parsing():
    n = 1000
    lit = "[" + ", ".join("[" + ", ".join(str(i % 7) for i in range(n)) + "]" for _ in range(n)) + "]"
    with pytest.raises(NumberError) as info:
        rnnc.parse(f"cell c(x: [{n}]) -> (h: [{n}]) {{\n state h: [{n}] = 0\n h = 0.5 * h + {lit} @ x\n}}\n")
    assert info.value.line == 3 and "param" in info.value.hint and len(str(info.value)) < 1000


def test_a_syntax_error_on_a_huge_line_has_a_short_message():
    for text in ["cell c(x: [H]) -> (h: [H]) { " + "x " * 5_000_000 + "}",
                 "cell c(x: [H]) -> (h: [H]) { h = " + "x" * 10_000_000 + " ! }",
                 "cell c(x: [H]) -> (h: [H]) { h = " + "y" * 10_000_000 + " x }"]:
        with pytest.raises(RnncSyntaxError) as info:
            rnnc.parse(text)
        assert len(str(info.value)) < 1000 and "^" in str(info.value)


#: Expressions nested n deep, each a different way elaboration (or index arithmetic) recurses.
DEEP = {
    "parens around sums": lambda n: "(x + " * n + "x" + ")" * n,
    "negations": lambda n: "-(" * n + "x" + ")" * n,
    "calls": lambda n: "tanh(" * n + "x" + ")" * n,
    "scalings": lambda n: "(0.5 * (" * n + "x" + "))" * n,
    "indexing": lambda n: "(" * n + "x" + ")[:]" * n,
    "index arithmetic": lambda n: "x[" + "(1 - " * n + "1" + ")" * n + "]",
    "a def's body": lambda n: "f(x)",
}


@pytest.mark.parametrize("shape", list(DEEP))
def test_deep_nesting_is_a_located_error(tmp_path, capsys, shape):
    """5000 levels: a RnncSyntaxError at the first operand past MAX_NESTING (line and column), from
    build and from `rnnc check`, never a RecursionError or an InternalError."""
    from rnnc.nesting import MAX_NESTING
    deep = DEEP[shape](5000)
    head = "def f(a) = " + DEEP["calls"](5000).replace("x", "a") + "\n" if shape == "a def's body" else ""
    spec = head + f"cell c(x: [H]) -> (h: [H]) {{\n dim H = 2\n state h: [H] = 0\n h = 0.5 * h + {deep}\n}}\n"
    with pytest.raises(RnncSyntaxError) as info:
        rnnc.build(spec)
    err = info.value
    assert f"more than {MAX_NESTING} deep" in err.message and "let" in err.hint
    assert (err.line, err.column > 1) == ((1, True) if head else (4, True))
    path = tmp_path / "deep.rnn"
    path.write_text(spec)
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr()
    assert f"deep.rnn:{err.line}:{err.column}: error: expression nested more than" in out.err
    assert "Traceback" not in out.err + out.out and len(out.err) < 2000


def test_nesting_within_the_limit_builds_and_runs():
    """Up to MAX_NESTING levels build and give the recurrence's values (loop backend, generated backward)."""
    from rnnc.nesting import MAX_NESTING
    n = MAX_NESTING - 5
    spec = f"cell c(x: [H]) -> (h: [H]) {{\n dim H = 2\n state h: [H] = 0\n h = 0.5 * h + {DEEP['calls'](n)}\n}}\n"
    x = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    y = rnnc.build(spec, backend="loop", dtype=torch.float64)(x)[0]
    z = x
    for _ in range(n):
        z = torch.tanh(z)
    torch.testing.assert_close(y, _reference_decay(z))
    (g,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(_reference_decay(z).sum(), x)
    torch.testing.assert_close(g, want)


def test_nested_defs_share_subexpressions():
    """16 levels of f(a) = g(a) + g(a): 2**16 copies as a tree, 17 values shared."""
    defs = "def f0(a) = a * 2\n" + "".join(f"def f{i}(a) = f{i - 1}(a) + f{i - 1}(a)\n" for i in range(1, 17))
    spec = defs + "cell c(x: [H]) -> (h: [H]) {\n dim H = 2\n state h: [H] = 0\n h = 0.5 * h + f16(x)\n}\n"
    assert len(rnnc.compile(spec, backend="loop")) < 200_000
    x = torch.randn(1, 3, 2, dtype=torch.float64)
    for backend in ("loop", "scan"):
        torch.testing.assert_close(rnnc.build(spec, backend=backend, dtype=torch.float64)(x)[0],
                                   _reference_decay(x * 2**17))

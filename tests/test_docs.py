"""Every fenced example in README.md and docs/*.md runs, verbatim (the rules are in docs/writing-docs.md).

- ```python: executed in a fresh namespace with a temporary working directory (torch seeded);
- ```rnn: written to a file in a temporary folder (one per document, so a later block can import an
  earlier one named by `<!-- file: NAME.rnn -->`), loaded without warnings, analysed, and every cell built and run on
  random inputs (B=2, T=5); a dim that neither the spec nor a `<!-- dims: K=4 V=3 -->` marker binds
  gets size 3;
- ```bash: each command (lines, `&&`, `\\` continuations) that starts with `rnnc` runs through
  rnnc.cli.main and must exit 0; setup commands (virtual environments, pip, pytest) are skipped by
  the rule SETUP below; any other command fails the test;
- ```text: a fragment, output or diagram, not run. A block with any other tag, or none, fails.
- `<!-- slow -->` above a block marks its test slow.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import rnnc
from rnnc import cli
from rnnc.dims import fmt

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = ("python", "rnn", "bash")
NOT_RUN = ("text",)
#: size of a dim an rnn example leaves unbound (neither the spec nor a dims marker gives it)
EXAMPLE_DIM = 3
#: bash commands that set up an environment or run the test suite: documented, not run here
SETUP = (re.compile(r"python3? -m venv\b"), re.compile(r"(\.|source) \S*activate$"),
         re.compile(r"pip3? install\b"), re.compile(r"(\w+=\S* )*python3? -m pytest\b"))
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<key>dims|file|slow)\s*:?\s*(?P<value>.*?)\s*-->\s*$")


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}:{self.lang or 'untagged'}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the markers in the comment lines just above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1
        markers: dict[str, str] = {}
        j = start - 1
        while j >= 0 and (mk := _MARKER.match(lines[j])):
            markers[mk["key"]] = mk["value"]
            j -= 1
        blocks.append(Block(path, start + 1, m["info"].strip().split()[0] if m["info"].strip() else "",
                            "\n".join(body) + "\n", markers))
    return blocks


BLOCKS = [b for doc in DOCS for b in fenced_blocks(doc)]


def _params(langs):
    return [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if "slow" in b.markers else [])
            for b in BLOCKS if b.lang in langs]


def test_docs_have_examples_and_every_block_is_tagged():
    """A block without a tag, or with one nobody runs, would be skipped silently: tag it text instead."""
    untagged = [b.id for b in BLOCKS if b.lang not in RUN + NOT_RUN]
    assert not untagged, f"tag these blocks python, rnn or bash (run) or text (not run): {untagged}"
    langs = {b.lang for b in BLOCKS}
    assert set(RUN) <= langs, "the docs should show examples of each kind"


def test_fence_parser_reads_markers_and_tags(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n<!-- dims: K=4 V=3 -->\n<!-- slow -->\n```rnn\ncell a(x: [K]) -> (y: [K]) {\n"
                   "    y = x\n}\n```\n\n  ```\n  indented\n  ```\n")
    first, second = fenced_blocks(doc)
    assert (first.line, first.lang, first.markers) == (4, "rnn", {"dims": "K=4 V=3", "slow": ""})
    assert first.code.startswith("cell a(") and first.code.endswith("}\n")
    assert (second.lang, second.code, second.markers) == ("", "indented\n", {})


# ----------------------------------------------------------------------------------- python


@pytest.mark.parametrize("block", _params(["python"]))
def test_python_example(block: Block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    # blank lines first, so that a traceback names the line of the document
    code = compile("\n" * block.line + block.code, str(block.doc), "exec")
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    try:
        exec(code, {"__name__": "__doc_example__"})
    finally:  # an example that changes torch's global settings does not change the next test's
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)


# ----------------------------------------------------------------------------------- rnn


def _dims(block: Block) -> dict[str, int]:
    text = block.markers.get("dims", "")
    return dict(cli._dim_binding(item) for item in text.replace(",", " ").split())


def _rnn_folder(block: Block, tmp_path: Path) -> Path:
    """The document's folder of named example files (`<!-- file: NAME.rnn -->`), written before any runs."""
    folder = tmp_path / "examples"
    folder.mkdir()
    for other in fenced_blocks(block.doc):
        if other.lang == "rnn" and "file" in other.markers:
            name = other.markers["file"]
            assert re.fullmatch(r"\w+\.rnn", name), f"{other.id}: file marker must be NAME.rnn, got {name!r}"
            (folder / name).write_text(other.code, encoding="utf-8")
    return folder


def run_cell(prog: rnnc.Program, name: str, given: dict[str, int]) -> None:
    """Build the cell with every dim bound and run it on random inputs: outputs finite, shapes as declared."""
    ir = prog.cell(name)
    env = {d: given.get(d, int(info.default) if info.default is not None else EXAMPLE_DIM)
           for d, info in ir.dims.items()}
    size = lambda shape: [cli.eval_dim(fmt(d), dict(env)) for d in shape]  # noqa: E731
    cell = rnnc.build(prog, cell=name, **env)
    B, T = 2, 5
    xs = [torch.randn(B, T, *size(p.shape)) for p in ir.inputs]
    ys, final = cell(*xs)
    ys = ys if isinstance(ys, tuple) else (ys,)
    for port, y in zip(ir.outputs, ys):
        assert y.shape == (B, T, *size(port.shape)), f"output {port.name}"
        assert torch.isfinite(y).all(), f"output {port.name} of cell {name} is not finite"
    assert set(final) == {s.name for s in ir.states}


@pytest.mark.parametrize("block", _params(["rnn"]))
def test_rnn_example(block: Block, tmp_path):
    folder = _rnn_folder(block, tmp_path)
    path = folder / block.markers.get("file", f"example_{block.line}.rnn")
    path.write_text(block.code, encoding="utf-8")
    prog = rnnc.load(path)
    assert not prog.warnings, f"{block.id}: an example should not warn: {[str(w) for w in prog.warnings]}"
    given = _dims(block)
    unknown = set(given) - {d for c in prog.cells.values() for d in c.dims}
    assert not unknown, f"dims marker names dims no cell has: {unknown}"
    if "file" in block.markers and not prog.cells:
        return  # a file of defs and combines that another example imports: loading it checked it
    assert prog.cells, f"{block.id}: an rnn example defines a cell (or is named by a file marker)"
    for name in prog.cells:
        rnnc.analyze(prog, cell=name)
        run_cell(prog, name, given)


# ----------------------------------------------------------------------------------- bash


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: lines joined at a trailing `\\`, split at `&&`; comments dropped."""
    joined = re.sub(r"\\\n", " ", code)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands += [c.strip() for c in line.split("&&") if c.strip()]
    return commands


def test_shell_commands_split_and_setup_rule():
    cmds = shell_commands("python3 -m venv .venv && . .venv/bin/activate \\\n && pip install -e .\n"
                          "# a comment\nrnnc list  # the library\nTRITON_INTERPRET=1 python -m pytest -q\n")
    assert cmds == ["python3 -m venv .venv", ". .venv/bin/activate", "pip install -e .", "rnnc list",
                    "TRITON_INTERPRET=1 python -m pytest -q"]
    assert [any(p.match(c) for p in SETUP) for c in cmds] == [True, True, True, False, True]


@pytest.mark.parametrize("block", _params(["bash"]))
def test_bash_example(block: Block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in shell_commands(block.code):
        if any(p.match(command) for p in SETUP):
            continue
        argv = shlex.split(command)
        assert argv[0] == "rnnc", (f"{block.id}: `{command}` is neither an rnnc command nor setup; "
                                   "tag the block text if it is not meant to run")
        assert not set(argv) & {"|", ">", "<", ";", "||"}, f"{block.id}: `{command}` needs a shell"
        code = cli.main(argv[1:])
        out = capsys.readouterr()
        assert code == 0, f"{block.id}: `{command}` exited {code}\n{out.err}"

"""The docs site: the spec library's generated pages (rnnc/docs_pages.py) say what the API computes,
and `mkdocs build --strict` succeeds (skipped where mkdocs and mkdocstrings are not installed)."""
from __future__ import annotations

import html
import importlib.util
import re
import subprocess
import sys
import xml.dom.minidom
from pathlib import Path

import pytest

import rnnc
from rnnc import docs_pages, schedule
from rnnc.resources import specs_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site_pages(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pages")
    assert docs_pages.main([str(out)]) == 0
    return out / docs_pages.FOLDER


def test_a_page_per_library_spec_and_an_index(site_pages):
    names = rnnc.library()
    assert sorted(p.stem for p in site_pages.glob("*.md")) == sorted(names + ["index"])
    index = (site_pages / "index.md").read_text()
    linked = re.findall(r"^\| \[`(\w+)`\]\(\1\.md\) \| (.+) \|$", index, flags=re.M)
    assert [n for n, _ in linked] == names
    assert all(title.strip() for _, title in linked), "every spec has a title line"


@pytest.mark.parametrize("name", rnnc.library())
def test_spec_page_shows_what_the_api_computes(site_pages, name):
    page = (site_pages / f"{name}.md").read_text()
    text = (specs_dir() / f"{name}.rnn").read_text()
    prog = rnnc.load(name)
    header, body = docs_pages.split_header(text)
    # the header (citation, equations) and the code after it, verbatim
    assert re.search(r"\b(19|20)\d\d\b", header) and header in page
    assert body.strip() in page and not body.lstrip().startswith("#")
    assert str(specs_dir()) not in page, "no machine's absolute path on a page"
    for cell in prog.cells:
        report = rnnc.analyze(prog, cell=cell)
        assert docs_pages.relative_paths(str(report)) in page
        available = rnnc.backends_for(prog, cell=cell)
        section = page.split(f"`rnnc analyze {name}" + ("" if len(prog.cells) == 1 else f" --cell {cell}"))[0]
        line = section.rsplit("Backends that can run it: ", 1)[1].splitlines()[0]
        assert re.findall(r"`(\w+)`", line.split(";")[0]) == available
        assert f"picks `{report.backend}`" in line
        for backend in schedule.BACKENDS:
            if backend not in available:
                assert f"- not `{backend}`: {docs_pages.markdown_text(schedule.why_not(backend, report))}" in section
        svg = site_pages / docs_pages.svg_name(name, cell)
        assert f"]({svg.name})" in page
        assert svg.read_text() == rnnc.graph_svg(prog, cell=cell)
        xml.dom.minidom.parse(str(svg))  # well-formed


def test_split_header():
    header, body = docs_pages.split_header("# Title\n# cite 2024\n#\n#   y = x\n\n# more\n\ncell a() {}\n")
    assert header == "Title\ncite 2024\n\n  y = x\n\nmore"
    assert body == "cell a() {}\n"
    assert docs_pages.title("# Title\ncell a() {}\n") == "Title"
    assert docs_pages.split_header("cell a() {}\n") == ("", "cell a() {}\n")


def test_markdown_text_escapes_only_outside_code_spans():
    assert docs_pages.markdown_text("K*V x_1 <b> `a*b_c`") == "K\\*V x\\_1 &lt;b> `a*b_c`"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
                    reason="the docs extra (mkdocs, mkdocstrings) is not installed: pip install -e '.[docs]'")
def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in rnnc.library():
        assert (site / docs_pages.FOLDER / name / "index.html").is_file()
    api = (site / "api" / "index.html").read_text()
    for function in ("build", "compile", "analyze", "backends_for", "parse", "load"):
        assert re.search(rf">{function}<", api), f"the API reference documents rnnc.{function}"
    # long signatures wrap (mkdocs.yml's line_length, formatted by Black from the docs extra): a
    # parameter a line, no line past 80 characters
    signatures = [html.unescape(re.sub(r"<[^>]+>", "", b)).strip()
                  for b in re.findall(r'<div class="doc-signature[^"]*"[^>]*>(.*?)</div>', api, flags=re.S)]
    assert signatures and max(len(line) for sig in signatures for line in sig.splitlines()) <= 80
    build = next(sig for sig in signatures if sig.startswith("build("))
    assert [line.strip() for line in build.splitlines()][1:3] == ["spec: Spec,", "cell: str | None = None,"]
    home = (site / "index.html").read_text()
    assert 'href="language/"' in home  # README's link into docs/ resolved

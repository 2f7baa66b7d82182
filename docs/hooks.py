"""MkDocs hooks (mkdocs.yml): the README becomes the home page and the spec library's pages are
generated from specs/ at build time (rnnc/docs_pages.py), so neither is copied into docs/."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's rnnc, also when it is not installed

from rnnc import api, docs_pages  # noqa: E402


def home_page() -> str:
    """README.md with its links into docs/ made relative to the site's root."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", text)


def on_config(config):
    cells = [f"{docs_pages.FOLDER}/index.md"] + [f"{docs_pages.FOLDER}/{n}.md" for n in api.library()]
    config["nav"].append({"Spec library": cells})
    return config


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "index.md", content=home_page()))
    files.append(File.generated(config, "grammar/rnnc.lark", abs_src_path=str(ROOT / "grammar" / "rnnc.lark")))
    for path, content in docs_pages.pages().items():
        files.append(File.generated(config, path, content=content))
    return files

"""`import rnnc` from the repository root imports the checkout, which must work without the editable install.

After a plain `pip install .`, `python -c "import rnnc"` run in the repository root finds the checkout's
rnnc/ first (the current directory leads sys.path), shadowing the installed package; backends/ (and
grammar/, specs/) sit beside rnnc/ there, not inside it, and failed to import (`No module named
'rnnc.backends'`). The editable install hid this: its finder maps rnnc.backends to backends/. Reproduced
without installing anything: Python without `site` (so no .pth file installs the editable finder), the
environment's site-packages appended by hand for torch and lark, run from the repository root.
"""
from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CODE = """
import sys
sys.path += {site!r}
import rnnc, rnnc.backends.assemble
assert rnnc.__file__.startswith({root!r}), rnnc.__file__
assert rnnc.backends.__file__.startswith({root!r}), rnnc.backends.__file__
assert not any('editable' in type(f).__name__.lower() for f in sys.meta_path)
from rnnc.cli import main
assert main(["analyze", "gla"]) == 0
import torch
cell = rnnc.build("mingru", I=2, H=3)
y, _ = cell(torch.randn(1, 4, 2))
print("ok", tuple(y.shape))
"""


def test_import_rnnc_from_the_repository_root_without_the_editable_finder():
    code = CODE.format(site=site.getsitepackages(), root=str(ROOT))
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok (1, 4, 3)")

"""The paste contract of the Triton chunk files (backends/triton_chunk.py, backends/triton_delta.py),
shared by their tests: generated modules paste a file's body from its first top-level `def` on, right
after chunk_ops.py's body, so the file must be importable that way."""
import ast
import importlib.util
import inspect

import rnnc.backends.chunk_ops as chunk_ops


def pasted(module, prefix: str, tmp_path):
    """Check the header imports only math/torch/triton/tl (+ relative imports of chunk_ops helpers),
    every top-level name starts with `prefix`, and the first definition is a plain function (so the
    extraction cuts no decorator off); return the body pasted after chunk_ops's body, imported."""
    text = inspect.getsource(module)
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, ast.Import):
            assert {a.name for a in node.names} <= {"math", "torch", "triton", "triton.language"}
        elif isinstance(node, ast.ImportFrom):
            assert node.module == "chunk_ops" and node.level == 1
            assert {a.name for a in node.names} <= {n for n in dir(chunk_ops) if n.startswith("_chunk")}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            assert node.name.startswith(prefix), node.name
        else:
            assert isinstance(node, ast.Expr) and node is tree.body[0], ast.dump(node)  # the docstring
    first = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
    assert isinstance(first, ast.FunctionDef) and not first.decorator_list, first.name
    body = text[text.index("\ndef ") + 1:]
    assert "import" not in body.split("\n@triton.jit")[0] and "\nimport " not in body and "\nfrom " not in body
    co = inspect.getsource(chunk_ops)
    src = ("import math\nimport torch\nimport torch.nn.functional as F\nimport triton\n"
           "import triton.language as tl\n\n" + co[co.index("\ndef ") + 1:] + "\n\n" + body)
    path = tmp_path / f"pasted{prefix}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"pasted{prefix}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

"""The fused recurrent lowering's fragment: every step in one Triton kernel, the states in
registers (backends/triton_recurrent.py renders the kernel from the loop stage's tile program).
"""
from __future__ import annotations

from rnnc.ir import Cell

from . import triton_recurrent
from .render import Lines, Recurrence
from .tiles import TileProgram


def kernels(L: Lines, cell: Cell, prog: TileProgram) -> None:
    """The kernel and its autograd wrapper `_Recurrent`, at the top of the module."""
    for line in triton_recurrent.source(cell, prog):
        L(line)
    L()
    L()


def emit(L: Lines, rec: Recurrence, prog: TileProgram) -> None:
    """Every step in one fused Triton kernel (backends/triton_recurrent.py)."""
    cell, r = rec.cell, rec.r
    L("# the recurrence in one fused Triton kernel: states in registers, hoisted values [T, N, ...] per step")
    leaves = [f"_time_major({r.operand(n, 'hoist').text}, B, T)" if per_step else f"{r.tensor(n, 'const')}.to(cdt)"
              for n, per_step in zip(prog.leaves, prog.per_step)]
    dims = triton_recurrent.kernel_dims(cell, prog)
    dims_text = f"({''.join(f'd_{n},' for n in dims)})"
    outs = [f"out_{name}" for name in prog.outputs] + [r.name(s.node_in) for s in cell.states]
    L(f"{', '.join(outs)}{',' if len(outs) == 1 else ''} = _Recurrent.apply(T, {dims_text}, "
      f"{', '.join(f's0_{s.name}' for s in cell.states)}, {', '.join(leaves)})".replace(", )", ")"))

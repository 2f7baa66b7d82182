"""Generated Triton for an elementwise-affine state h_t = a_t ⊙ h_{t-1} + b_t: a fused scan.

For each such state the module gets
  _scan_<s>_fwd   one program per block of channels (the state's elements over the batch), the
                  state in registers, sequential over time; a and b are computed in the kernel
                  from the leaf tensors (backends/elementwise.py), so they never reach memory;
  _scan_<s>_bwd   the reverse scan of the adjoint, λ_t = g_t + a_{t+1} λ_{t+1}, writing
                  ∂a_t = λ_t h_{t-1}, ∂b_t = λ_t and ∂h_0 = a_1 λ_1 (a recomputed from the leaves);
  _coef_<s>       the same a and b in PyTorch, which the backward differentiates with autograd to
                  carry ∂a, ∂b to the leaves (the prologue's backward is not fused yet);
  _Scan<S>        the autograd.Function tying them together.
Leaves are [T, M] (M = batch rows × C state elements) or, for params, [C]; the kernels compute in the
initial state's dtype (float32 or float64), loading every leaf with `.to(...)` first, so bf16
and fp16 inputs are upcast before any arithmetic (the CPU interpreter's bf16 rule).
"""
from __future__ import annotations

from rnnc.ir import Graph

from .elementwise import render, split_fusable

BLOCK = 128  # channels per program


def plan(g: Graph, stages: dict[int, str], a: int, b: int | None) -> tuple[list[int], list[int]]:
    """(leaves, body) of one state's a and b."""
    return split_fusable(g, stages, [a] + ([b] if b is not None else []))


def is_per_step(stages: dict[int, str], leaf: int) -> bool:
    """Leaves that change with the inputs are [T, M]; constant ones (params) are [C], one value per
    element of the state, shared by every step and batch row."""
    return stages.get(leaf) == "hoist"


def source(name: str, g: Graph, stages: dict[int, str], a: int, b: int | None, leaves: list[int],
           body: list[int]) -> list[str]:
    """Module-level source (kernels, PyTorch coefficients, autograd.Function) for state `name`."""
    ls = [f"l{i}" for i in range(len(leaves))]
    L: list[str] = []

    def coef(dialect: str, indent: str, load: bool = False) -> list[str]:
        names = dict(zip(leaves, ls))
        lines = []
        if load:
            for x, leaf in zip(ls, leaves):
                at = "t * M + offs" if is_per_step(stages, leaf) else "offs % C"
                lines.append(f"{indent}{x} = tl.load({x}_ptr + {at}, mask=mask, other=0.0).to(h.dtype)")
        lines += [indent + line for line in render(g, body, names, dialect)]
        lines.append(f"{indent}a = {names[a]}")
        lines.append(f"{indent}b = {names[b] if b is not None else '0.0'}")
        return lines

    ptrs = "".join(f"{x}_ptr, " for x in ls)
    L += ["@triton.jit",
          f"def _scan_{name}_fwd(h0_ptr, out_ptr, {ptrs}T, M, C, BLOCK: tl.constexpr):",
          '    """h_t = a_t * h_(t-1) + b_t for a block of channels; a, b from the leaves."""',
          "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
          "    mask = offs < M",
          "    h = tl.load(h0_ptr + offs, mask=mask, other=0.0)",
          "    for t in range(T):",
          *coef("triton", "        ", True),
          "        h = a * h + b",
          "        tl.store(out_ptr + t * M + offs, h, mask=mask)",
          "",
          "",
          "@triton.jit",
          f"def _scan_{name}_bwd(g_ptr, out_ptr, h0_ptr, da_ptr, db_ptr, dh0_ptr, {ptrs}T, M, C, BLOCK: tl.constexpr):",
          '    """The reverse scan of the adjoint: lam_t = g_t + a_(t+1) lam_(t+1); da_t = lam_t h_(t-1), db_t = lam_t."""',
          "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
          "    mask = offs < M",
          "    h = tl.load(h0_ptr + offs, mask=mask, other=0.0)",
          "    lam = h * 0",
          "    carry = h * 0  # a_(t+1), the factor that carries lam_(t+1) back to step t",
          "    for i in range(T):",
          "        t = T - 1 - i",
          "        lam = tl.load(g_ptr + t * M + offs, mask=mask, other=0.0).to(h.dtype) + carry * lam",
          "        first = (offs * 0 + t) == 0  # the step before t = 0 is the initial state",
          "        prev = tl.load(out_ptr + (t - 1) * M + offs, mask=mask & (first == 0), other=0.0)",
          "        prev = tl.where(first, h, prev)",
          *coef("triton", "        ", True),
          "        tl.store(da_ptr + t * M + offs, lam * prev, mask=mask)",
          "        tl.store(db_ptr + t * M + offs, lam, mask=mask)",
          "        carry = a + h * 0",
          "    tl.store(dh0_ptr + offs, carry * lam, mask=mask)",
          "",
          "",
          f"def _coef_{name}({', '.join(ls)}):",
          f'    """a, b of state {name} from its leaves, in PyTorch (for the backward)."""',
          *coef("torch", "    "),
          "    return a, b",
          "",
          "",
          f"class _Scan_{name}(torch.autograd.Function):",
          f'    """State {name} for all steps: [M] initial value and [T, M] leaves -> [T, M]."""',
          "",
          "    @staticmethod",
          "    def forward(ctx, T, C, h0, *leaves):",
          "        _check_triton_device(h0)",
          "        h0, leaves = h0.contiguous(), [x.contiguous() for x in leaves]",
          "        M = h0.numel()",
          "        out = torch.empty(T, M, dtype=h0.dtype, device=h0.device)",
          "        grid = (triton.cdiv(M, BLOCK),)",
          f"        _scan_{name}_fwd[grid](h0, out, *leaves, T, M, C, BLOCK=BLOCK)",
          "        ctx.save_for_backward(h0, out, *leaves)",
          "        ctx.C = C",
          "        return out",
          "",
          "    @staticmethod",
          "    def backward(ctx, g):",
          "        h0, out, *leaves = ctx.saved_tensors",
          "        (T, M), C = out.shape, ctx.C",
          "        da, db, dh0 = torch.empty_like(out), torch.empty_like(out), torch.empty_like(h0)",
          "        grid = (triton.cdiv(M, BLOCK),)",
          f"        _scan_{name}_bwd[grid](g.contiguous(), out, h0, da, db, dh0, *leaves, T, M, C, BLOCK=BLOCK)",
          "        rows = (T, M // C, C)  # per-step leaves [T, rows, C] broadcast against constant ones [C]",
          "        with torch.enable_grad():",
          "            xs = [x.detach().requires_grad_() for x in leaves]",
          f"            a, b = _coef_{name}(*[x.view(rows) if x.dim() == 2 else x for x in xs])",
          "            pairs = [(v.expand(rows), d.view(rows)) for v, d in ((a, da), (b, db))",
          "                     if isinstance(v, torch.Tensor) and v.requires_grad]",
          "            grads = torch.autograd.grad([v for v, _ in pairs], xs, [d for _, d in pairs], allow_unused=True)",
          "        return (None, None, dh0, *grads)",
          ]
    return L

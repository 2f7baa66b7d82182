"""Generated Triton for an elementwise-affine state h_t = a_t ⊙ h_{t-1} + b_t: a fused scan.

For each such state the module gets
  _scan_<s>_fwd   one program per (block of channels, chunk of steps) (channels: the state's
                  elements over the batch), the state in registers, sequential over the chunk's
                  steps; a and b are computed in the kernel from the leaf tensors
                  (backends/elementwise.py), so they never reach memory;
  _scan_<s>_sum   when time is cut into chunks (few channels, long T: `_scan_chunks`), each chunk
                  summarised as one step from zero (A = prod a, E = its state); the states entering
                  the chunks then follow from a scan over the P summaries (`_linear_scan`);
  _scan_<s>_bwd   the reverse scan of the adjoint, λ_t = g_t + a_{t+1} λ_{t+1}, with ∂a_t = λ_t h_{t-1}
                  and ∂b_t = λ_t carried back through the gate math to the leaves in the same
                  kernel (a, b recomputed, not saved), and ∂h_0 = a_1 λ_1; per chunk, entered with
                  what flows in from the later chunks;
  _scan_<s>_rsum  the adjoint's chunk summaries (for the backward's scan over chunks);
  _Scan_<s>       the autograd.Function tying them together.
Leaves are [T, M] (M = batch rows × C state elements) or, for params, [C]; the kernels compute in the
initial state's dtype (float32 or float64), loading every leaf with `.to(...)` first, so bf16
and fp16 inputs are upcast before any arithmetic (the CPU interpreter's bf16 rule).
"""
from __future__ import annotations

from rnnc import dims as D
from rnnc.ir import Combine, Graph

from .elementwise import render, render_adjoint, split_fusable

BLOCK = 128  # channels per program (the module's BLOCK; its SCAN_CHUNK cuts time, see _scan_chunks)

def plan(g: Graph, a: int, b: int | None) -> tuple[list[int], list[int]]:
    """(leaves, body) of one state's a and b."""
    return split_fusable(g, [a] + ([b] if b is not None else []))


def is_per_step(stages: dict[int, str], leaf: int) -> bool:
    """Leaves that change with the inputs are [T, M]; constant ones (params) are [C], one value per
    element of the state, shared by every step and batch row."""
    return stages.get(leaf) == "hoist"


def source(name: str, g: Graph, stages: dict[int, str], a: int, b: int | None, leaves: list[int],
           body: list[int]) -> list[str]:
    """Module-level source (the two kernels and their autograd.Function) for state `name`."""
    ls = [f"l{i}" for i in range(len(leaves))]
    per_step = [is_per_step(stages, leaf) for leaf in leaves]
    names = dict(zip(leaves, ls))
    indent = " " * 8
    loads = [f"{indent}{x} = tl.load({x}_ptr + {'t * M + offs' if p else 'offs % C'}, mask=mask, other=0.0)"
             ".to(h.dtype)" for x, p in zip(ls, per_step)]
    coef = [indent + line for line in render(g, body, names)]
    coef += [f"{indent}a = {names[a]}", f"{indent}b = {names[b] if b is not None else '0.0'}"]
    seeds = [(a, "lam * prev")] + ([(b, "lam")] if b is not None else [])
    adjoint, grads = render_adjoint(g, body, names, seeds)
    stores = []  # each leaf's gradient: per step, or summed over the steps here (over rows by the caller)
    for i, (leaf, p) in enumerate(zip(leaves, per_step)):
        d = grads.get(leaf, "0.0")
        stores.append(f"{indent}tl.store(dl{i}_ptr + t * M + offs, {d} + zero, mask=mask)" if p
                      else f"{indent}acc{i} = acc{i} + {d}")
    ptrs = "".join(f"{x}_ptr, " for x in ls)
    dptrs = "".join(f"d{x}_ptr, " for x in ls)
    consts = [i for i, p in enumerate(per_step) if not p]
    chunk = [  # this program's channels and its chunk of steps [t0, t0 + n)
        "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < M",
        "    t0 = tl.program_id(1) * L",
        "    n = tl.minimum(L, T - t0)",
    ]
    a_leaves, a_body = split_fusable(g, [a])  # the reverse summary needs a only
    a_names = dict(zip(leaves, ls))
    a_only = [indent + line for line in render(g, a_body, a_names)]
    a_loads = [x for x, leaf in zip(loads, leaves) if leaf in a_leaves]
    return [
        "@triton.jit",
        f"def _scan_{name}_fwd(h0_ptr, out_ptr, {ptrs}T, M, C, L, BLOCK: tl.constexpr):",
        '    """h_t = a_t * h_(t-1) + b_t for a block of channels over one chunk of steps, from the state',
        '    entering the chunk (h0 [P, M]); a, b from the leaves."""',
        *chunk,
        "    h = tl.load(h0_ptr + tl.program_id(1) * M + offs, mask=mask, other=0.0)",
        "    for t in range(t0, t0 + n):",
        *loads,
        *coef,
        "        h = a * h + b",
        "        tl.store(out_ptr + t * M + offs, h, mask=mask)",
        "",
        "",
        "@triton.jit",
        f"def _scan_{name}_sum(A_ptr, E_ptr, {ptrs}T, M, C, L, BLOCK: tl.constexpr):",
        '    """One chunk summarised as a single step from zero: A = prod a_t, E = the state it reaches."""',
        *chunk,
        "    h = tl.zeros([BLOCK], dtype=A_ptr.dtype.element_ty)",
        "    A = h + 1.0",
        "    for t in range(t0, t0 + n):",
        *loads,
        *coef,
        "        h = a * h + b",
        "        A = A * a",
        "    tl.store(A_ptr + tl.program_id(1) * M + offs, A, mask=mask)",
        "    tl.store(E_ptr + tl.program_id(1) * M + offs, h, mask=mask)",
        "",
        "",
        "@triton.jit",
        f"def _scan_{name}_bwd(g_ptr, out_ptr, h0_ptr, mu_ptr, dmu_ptr, {ptrs}{dptrs}T, M, C, L, BLOCK: tl.constexpr):",
        '    """The reverse scan of the adjoint over one chunk, lam_t = g_t + a_(t+1) lam_(t+1), entered with',
        '    mu = a_(t+1) lam_(t+1) from beyond the chunk (mu [P, M]); da_t = lam_t h_(t-1) and db_t = lam_t',
        '    carried back through the gate math to the leaves (a, b recomputed, not saved). Leaves dmu =',
        '    a_t0 lam_t0 (the initial state\'s gradient, for the first chunk)."""',
        *chunk,
        "    h = tl.load(h0_ptr + offs, mask=mask, other=0.0)",
        "    zero = tl.zeros([BLOCK], dtype=h.dtype)  # (not h * 0: an infinite h would give NaN)",
        "    lam = tl.load(mu_ptr + tl.program_id(1) * M + offs, mask=mask, other=0.0)",
        "    carry = zero + 1.0  # a_(t+1), the factor that carries lam_(t+1) back to step t",
        *[f"    acc{i} = zero  # the constant leaf's gradient, summed over the steps" for i in consts],
        "    for i in range(n):",
        "        t = t0 + n - 1 - i",
        "        lam = tl.load(g_ptr + t * M + offs, mask=mask, other=0.0).to(h.dtype) + carry * lam",
        "        first = (offs * 0 + t) == 0  # the step before t = 0 is the initial state",
        "        prev = tl.load(out_ptr + (t - 1) * M + offs, mask=mask & (first == 0), other=0.0)",
        "        prev = tl.where(first, h, prev)",
        *loads,
        *coef,
        *[indent + line for line in adjoint],
        *stores,
        "        carry = a + zero",
        "    tl.store(dmu_ptr + tl.program_id(1) * M + offs, carry * lam, mask=mask)",
        *[f"    tl.store(dl{i}_ptr + tl.program_id(1) * M + offs, acc{i}, mask=mask)" for i in consts],
        "",
        "",
        "@triton.jit",
        f"def _scan_{name}_rsum(g_ptr, A_ptr, E_ptr, {ptrs}T, M, C, L, BLOCK: tl.constexpr):",
        '    """One chunk of the adjoint\'s reverse scan summarised from zero: A = prod a_t over the chunk,',
        '    E = a_t0 lam_t0 with nothing entering from beyond the chunk."""',
        *chunk,
        "    h = tl.zeros([BLOCK], dtype=A_ptr.dtype.element_ty)",
        "    lam = h",
        "    carry = h",
        "    A = h + 1.0",
        "    for i in range(n):",
        "        t = t0 + n - 1 - i",
        "        lam = tl.load(g_ptr + t * M + offs, mask=mask, other=0.0).to(lam.dtype) + carry * lam",
        *a_loads,
        *a_only,
        f"        carry = {a_names[a]} + h",
        "        A = A * carry",
        "    tl.store(A_ptr + tl.program_id(1) * M + offs, A, mask=mask)",
        "    tl.store(E_ptr + tl.program_id(1) * M + offs, carry * lam, mask=mask)",
        "",
        "",
        f"class _Scan_{name}(torch.autograd.Function):",
        f'    """State {name} for all steps: [M] initial value, [T, M] or [C] leaves -> [T, M]. Time is cut',
        '    into P chunks of L steps when the channels alone give few programs (_scan_chunks): each chunk',
        '    is summarised (A = prod a, E = its state from zero), the states entering the chunks follow by',
        '    a scan over the P summaries, and the chunks then run in parallel from them; the backward',
        '    does the same for the adjoint in reverse."""',
        "",
        "    @staticmethod",
        "    def forward(ctx, T, C, h0, *leaves):",
        "        _check_triton_device(h0)",
        "        h0, leaves = h0.contiguous(), [x.contiguous() for x in leaves]",
        "        M = h0.numel()",
        "        P, L = _scan_chunks(T, M, BLOCK, SCAN_CHUNK)",
        "        out = torch.empty(T, M, dtype=h0.dtype, device=h0.device)",
        "        grid = (triton.cdiv(M, BLOCK), P)",
        "        enter = h0[None]",
        "        if P > 1:",
        "            A, E = (torch.empty(P, M, dtype=h0.dtype, device=h0.device) for _ in range(2))",
        f"            _scan_{name}_sum[grid](A, E, *leaves, T, M, C, L, BLOCK=BLOCK)",
        "            enter = torch.cat([h0[None], _linear_scan(A[:-1], E[:-1], h0)])",
        f"        _scan_{name}_fwd[grid](enter.contiguous(), out, *leaves, T, M, C, L, BLOCK=BLOCK)",
        "        ctx.save_for_backward(h0, out, *leaves)",
        "        ctx.C = C",
        "        return out",
        "",
        "    @staticmethod",
        "    def backward(ctx, g):",
        "        h0, out, *leaves = ctx.saved_tensors",
        "        (T, M), C = out.shape, ctx.C",
        "        P, L = _scan_chunks(T, M, BLOCK, SCAN_CHUNK)",
        "        g = g.contiguous()",
        "        grid = (triton.cdiv(M, BLOCK), P)",
        "        mu = torch.zeros(P, M, dtype=h0.dtype, device=h0.device)  # a lam entering each chunk from beyond",
        "        if P > 1:",
        "            A, E = (torch.empty(P, M, dtype=h0.dtype, device=h0.device) for _ in range(2))",
        f"            _scan_{name}_rsum[grid](g, A, E, *leaves, T, M, C, L, BLOCK=BLOCK)",
        "            mu[:-1] = _linear_scan(A[1:].flip(0), E[1:].flip(0), torch.zeros_like(h0)).flip(0)",
        "        dmu = torch.empty(P, M, dtype=h0.dtype, device=h0.device)",
        "        # per-step leaves get [T, M] gradients; constant ones [P, M], summed over chunks and rows below",
        "        dl = [torch.empty_like(out) if x.dim() == 2 else torch.empty(P, M, dtype=h0.dtype, device=h0.device)",
        "              for x in leaves]",
        f"        _scan_{name}_bwd[grid](g, out, h0, mu, dmu, *leaves, *dl, T, M, C, L, BLOCK=BLOCK)",
        "        grads = [d if x.dim() == 2 else d.view(-1, C).sum(0) for d, x in zip(dl, leaves)]",
        "        return (None, None, dmu[0], *[d.to(x.dtype) for d, x in zip(grads, leaves)])",
    ]


def fold_plan(g: Graph, c: Combine) -> tuple[list[int], list[int], list[int]] | None:
    """(leaves, right-operand body, combine body) when a fold with combine `c` fuses into one
    kernel: every component shaped alike (the kernel walks one block of elements), the combine's
    ops all elementwise; else None."""
    shapes = {tuple(D.fmt(d) for d in g[n].shape) for n in c.args_left + c.args_right}
    if len(shapes) != 1:
        return None
    inputs, cbody = split_fusable(c.graph, c.out)
    if not set(inputs) <= set(c.left) | set(c.right):
        return None
    leaves, body = split_fusable(g, c.args_right)
    return leaves, body, cbody


def fold_source(name: str, g: Graph, stages: dict[int, str], c: Combine, leaves: list[int], body: list[int],
                cbody: list[int]) -> list[str]:
    """Kernels and autograd.Function `_Fold_<name>` for states folded with combine `c`, one step
    after another per block of elements: s_t = f(s_(t-1), x_t); the backward runs the adjoint in
    reverse, differentiating f (rendered from its IR) with respect to both operands."""
    k = len(c.left)
    ls = [f"l{i}" for i in range(len(leaves))]
    per_step = [is_per_step(stages, leaf) for leaf in leaves]
    indent = " " * 8
    names = dict(zip(leaves, ls))
    loads = [f"{indent}{x} = tl.load({x}_ptr + {'t * M + offs' if p else 'offs % C'}, mask=mask, other=0.0)"
             ".to(h0.dtype)" for x, p in zip(ls, per_step)]
    right = [indent + line for line in render(g, body, names)]
    cnames = {n: f"s{i}" for i, n in enumerate(c.left)} | {n: names[a] for n, a in zip(c.right, c.args_right)}
    combine = [indent + line for line in render(c.graph, cbody, cnames, prefix="c")]
    new = [cnames[n] for n in c.out]
    cadj, cgrads = render_adjoint(c.graph, cbody, cnames, [(n, f"lam{i}") for i, n in enumerate(c.out)], "c")
    radj, rgrads = render_adjoint(g, body, names, [(a, cgrads[n]) for n, a in zip(c.right, c.args_right)
                                                   if n in cgrads])
    stores = []
    for i, (leaf, p) in enumerate(zip(leaves, per_step)):
        d = rgrads.get(leaf, "0.0")
        stores.append(f"{indent}tl.store(dl{i}_ptr + t * M + offs, {d} + zero, mask=mask)" if p
                      else f"{indent}acc{i} = acc{i} + {d}")
    consts = [i for i, p in enumerate(per_step) if not p]
    sp = "".join(f"h0{i}_ptr, " for i in range(k)) + "".join(f"out{i}_ptr, " for i in range(k))
    ptrs = "".join(f"{x}_ptr, " for x in ls)
    grads = "".join(f"g{i}_ptr, " for i in range(k)) + "".join(f"dh0{i}_ptr, " for i in range(k))
    dptrs = "".join(f"d{x}_ptr, " for x in ls)
    comps = range(k)
    return [
        "@triton.jit",
        f"def _fold_{name}_fwd({sp}{ptrs}T, M, C, BLOCK: tl.constexpr):",
        f'    """s_t = {c.name}(s_(t-1), x_t) for a block of elements, the combine fused from the IR."""',
        "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < M",
        "    h0 = tl.load(h00_ptr + offs, mask=mask, other=0.0)",
        "    zero = tl.zeros([BLOCK], dtype=h0.dtype)  # (not h0 * 0: an infinite h0 would give NaN)",
        *[f"    s{i} = tl.load(h0{i}_ptr + offs, mask=mask, other=0.0)" for i in comps],
        "    for t in range(T):",
        *loads, *right, *combine,
        f"{indent}{', '.join(f's{i}' for i in comps)} = {', '.join(f'{v} + zero' for v in new)}",
        *[f"{indent}tl.store(out{i}_ptr + t * M + offs, s{i}, mask=mask)" for i in comps],
        "",
        "",
        "@triton.jit",
        f"def _fold_{name}_bwd({sp}{ptrs}{grads}{dptrs}T, M, C, BLOCK: tl.constexpr):",
        '    """The adjoint in reverse: lam_t = g_t + (df/ds at step t+1)^T lam_(t+1); df/dx_t^T lam_t to the leaves."""',
        "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < M",
        "    h0 = tl.load(h00_ptr + offs, mask=mask, other=0.0)",
        "    zero = tl.zeros([BLOCK], dtype=h0.dtype)  # (not h0 * 0: an infinite h0 would give NaN)",
        *[f"    carry{i} = zero" for i in comps],
        *[f"    acc{i} = zero  # the constant leaf's gradient, summed over the steps" for i in consts],
        "    for i in range(T):",
        "        t = T - 1 - i",
        "        first = (offs * 0 + t) == 0  # the state before step 0 is the initial state",
        *[f"        lam{j} = tl.load(g{j}_ptr + t * M + offs, mask=mask, other=0.0).to(h0.dtype) + carry{j}"
          for j in comps],
        *[f"        s{j} = tl.where(first, tl.load(h0{j}_ptr + offs, mask=mask, other=0.0), "
          f"tl.load(out{j}_ptr + (t - 1) * M + offs, mask=mask & (first == 0), other=0.0))" for j in comps],
        *loads, *right, *combine,
        *[indent + line for line in cadj],
        *[indent + line for line in radj],
        *stores,
        *[f"        carry{j} = {cgrads.get(n, '0.0')} + zero" for j, n in enumerate(c.left)],
        *[f"    tl.store(dh0{j}_ptr + offs, carry{j}, mask=mask)" for j in comps],
        *[f"    tl.store(dl{i}_ptr + offs, acc{i}, mask=mask)" for i in consts],
        "",
        "",
        f"class _Fold_{name}(torch.autograd.Function):",
        f'    """{k} state(s) folded with `{c.name}`: [M] initial values, [T, M] or [C] leaves -> {k} x [T, M]."""',
        "",
        "    @staticmethod",
        "    def forward(ctx, T, C, *args):",
        f"        h0s, leaves = [x.contiguous() for x in args[:{k}]], [x.contiguous() for x in args[{k}:]]",
        "        _check_triton_device(h0s[0])",
        "        M = h0s[0].numel()",
        "        outs = [torch.empty(T, M, dtype=h0s[0].dtype, device=h0s[0].device) for _ in h0s]",
        "        grid = (triton.cdiv(M, BLOCK),)",
        f"        _fold_{name}_fwd[grid](*h0s, *outs, *leaves, T, M, C, BLOCK=BLOCK)",
        "        ctx.save_for_backward(*h0s, *outs, *leaves)",
        "        ctx.C = C",
        "        return tuple(outs)",
        "",
        "    @staticmethod",
        "    def backward(ctx, *gs):",
        "        saved = ctx.saved_tensors",
        f"        h0s, outs, leaves = saved[:{k}], saved[{k}:{2 * k}], saved[{2 * k}:]",
        "        (T, M), C = outs[0].shape, ctx.C",
        "        gs = [torch.zeros_like(o) if g is None else g.contiguous() for g, o in zip(gs, outs)]",
        "        dh0s = [torch.empty_like(h) for h in h0s]",
        "        dl = [torch.empty_like(outs[0]) if x.dim() == 2 else torch.empty_like(h0s[0]) for x in leaves]",
        "        grid = (triton.cdiv(M, BLOCK),)",
        f"        _fold_{name}_bwd[grid](*h0s, *outs, *leaves, *gs, *dh0s, *dl, T, M, C, BLOCK=BLOCK)",
        "        grads = [d if x.dim() == 2 else d.view(-1, C).sum(0) for d, x in zip(dl, leaves)]",
        "        return (None, None, *dh0s, *[d.to(x.dtype) for d, x in zip(grads, leaves)])",
    ]

"""Generated Triton for any cell, linear or not: one fused recurrent kernel and its backward.

  _rec_fwd     one program per sequence row (batch × extra): every state in registers, the
               steps in order, the cell's per-step ops (the tile program of tiles.py) computed
               in the kernel; hoisted values come in as [T, N, ...], params once; with SAVE it
               also writes every step's states, for the backward;
  _rec_bwd     the steps in reverse: each step recomputed from the saved states, then its
               adjoint; the states' adjoints carried in registers, per-step leaves' gradients
               written per step, constant leaves' summed in registers (a matrix times a vector
               instead leaves g and the vector per step, and the wrapper forms the weight's
               gradient as one matmul over all steps, as the loop backend does);
  _Recurrent   the autograd.Function tying them together (its launch helpers, _recurrent_warps and
               the register limit RECURRENT_MAX_TILE, are in rnnc/runtime/triton_launch.py).
Blocks are the sizes rounded up to powers of two; every reduction masks the padding (which may
hold anything, e.g. log(0)), so padded lanes never reach a result. The kernels compute in the
dtype of the tensors they get (the module's float32 or float64).
"""
from __future__ import annotations

import sympy

from rnnc import dims as D
from rnnc import registry

from .elementwise import BINARY, UNARY, WHERE, adjoint
from .tiles import TileProgram, nonneg

BOOL = registry.names("compare") | registry.names("logic")  # no adjoint flows through these


def _names(d) -> str:
    return D.to_python(d, _DimArgs())


class _DimArgs(dict):
    def __missing__(self, key: str) -> str:
        return f"d_{key}"


class _Sizes:
    """Each distinct size: a block constexpr BS<i> (a power of two), an arange r<i>, a mask m<i>."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.exprs: list = []

    def id(self, d) -> int:
        key = D.fmt(d)
        if key not in self.ids:
            self.ids[key] = len(self.exprs)
            self.exprs.append(d)
        return self.ids[key]

    def blocks(self, shape: tuple) -> str:
        return "[" + ", ".join(f"BS{self.id(d)}" for d in shape) + "]"

    def axis(self, d, axis: int, rank: int, var: str = "r") -> str:
        idx = "" if rank == 1 else "[" + ", ".join(":" if i == axis else "None" for i in range(rank)) + "]"
        return f"{var}{self.id(d)}{idx}"

    def mask(self, shape: tuple) -> str | None:
        if not shape:
            return None
        return " & ".join(self.axis(d, i, len(shape), "m") for i, d in enumerate(shape))

    def where(self, shape: tuple, expr: str) -> str:
        m = self.mask(shape)
        return expr if m is None else f"tl.where({m}, {expr}, 0.0)"


def _stride(shape: tuple, axis: int) -> str:
    rest = shape[axis + 1:]
    return _names(sympy.prod(rest)) if rest else "1"


def _times(factor: str) -> str:
    return "" if factor == "1" else f" * {factor}"


def _disjoint(views: list) -> bool:
    """Whether views of one leaf never overlap (each pair apart along some axis), so each
    step's gradient can be stored into them without atomics."""
    def apart(a, b) -> bool:
        for (oa, za), (ob, zb) in zip(a, b):
            if nonneg(ob - oa - za) or nonneg(oa - ob - zb):
                return True
        return False

    return all(apart(a, b) for i, a in enumerate(views) for b in views[i + 1:])


def _numel(shape: tuple) -> str:
    return _names(sympy.prod(shape)) if shape else "1"


class _Render:
    def __init__(self, prog: TileProgram, g) -> None:
        self.prog, self.g = prog, g
        self.sz = _Sizes()
        self.v = [f"v{i}" for i in range(len(prog.tiles))]
        for t in prog.tiles:
            for d in t.shape:
                self.sz.id(d)
        # matrix-vector products with a constant matrix: the weight's gradient is formed outside
        self.deferred = [i for i, t in enumerate(prog.tiles) if t.op in ("mv", "vm")
                         and self._const_leaf(t.args[0 if t.op == "mv" else 1])]
        # their vectors, each saved once (an LSTM's four gate products share h)
        self.vectors = list(dict.fromkeys(self.vector(i) for i in self.deferred))

    def vector(self, i: int) -> int:
        """The vector operand of a matrix-vector product tile."""
        t = self.prog.tiles[i]
        return t.args[1] if t.op == "mv" else t.args[0]

    def _const_leaf(self, i: int) -> bool:
        t = self.prog.tiles[i]
        return t.op == "leaf" and not self.prog.per_step[t.attrs["leaf"]]

    def leaf_shape(self, k: int) -> tuple:
        return self.g[self.prog.leaves[k]].shape

    def ptr(self, k: int, view: tuple, base: str) -> str:
        """Pointer block of leaf k (or its gradient, `base`) over `view`."""
        shape = self.leaf_shape(k)
        row = f" + row * {_numel(shape)}" if self.prog.per_step[k] else ""
        offs = [f"({_names(o)} + {self.sz.axis(z, i, len(view))}){_times(_stride(shape, i))}"
                if not D.equal(o, 0) else f"{self.sz.axis(z, i, len(view))}{_times(_stride(shape, i))}"
                for i, (o, z) in enumerate(view)]
        return base + row + "".join(f" + {o}" for o in offs)

    def load(self, k: int, view: tuple) -> str:
        m = self.sz.mask(tuple(z for _, z in view))
        p = self.ptr(k, view, f"l{k}_ptr")
        return f"tl.load({p})" if m is None else f"tl.load({p}, mask={m}, other=0.0)"

    def expr(self, i: int) -> str:
        """The forward value of tile i over earlier tiles' variables."""
        t = self.prog.tiles[i]
        a = [self.v[j] for j in t.args]
        sh = [self.prog.tiles[j].shape for j in t.args]
        sz = self.sz
        if t.op == "leaf":
            return self.load(t.attrs["leaf"], t.attrs["view"])
        if t.op == "mv":
            return f"tl.sum({sz.where(sh[0], f'{a[0]} * {a[1]}[None, :]')}, axis=1)"
        if t.op == "vm":
            return f"tl.sum({sz.where(sh[1], f'{a[0]}[:, None] * {a[1]}')}, axis=0)"
        if t.op == "mm":
            cube = (sh[0][0], sh[0][1], sh[1][1])
            return f"tl.sum({sz.where(cube, f'{a[0]}[:, :, None] * {a[1]}[None, :, :]')}, axis=1)"
        if t.op == "dot":
            return f"tl.sum({sz.where(sh[0], f'{a[0]} * {a[1]}')}, axis=0)"
        if t.op == "outer":
            return f"{a[0]}[:, None] * {a[1]}[None, :]"
        if t.op == "sum":
            return f"tl.sum({sz.where(sh[0], a[0])}, axis={t.attrs['axis']})"
        if t.op == "scale":
            return f"{a[0]} / {_names(t.attrs['by'])}"
        if t.op == "squeeze":
            return f"tl.sum({a[0]}, axis={t.attrs['axis']})"
        if t.op == "expand":
            return f"tl.expand_dims({a[0]}, {t.attrs['axis']})"
        if t.op == "trans":
            return f"tl.trans({a[0]})"
        if t.op == "bcast":
            return f"{a[0]} + tl.zeros({sz.blocks(t.shape)}, DT)"
        template = UNARY.get(t.op) or BINARY.get(t.op) or WHERE
        return template.format(*a)

    def forward_lines(self) -> list[str]:
        out = []
        for i, t in enumerate(self.prog.tiles):
            if t.op == "num":
                self.v[i] = repr(t.attrs["value"])
            elif t.op == "state":
                self.v[i] = f"s{t.attrs['state']}"
            else:
                out.append(f"{self.v[i]} = {self.expr(i)}")
        return out

    def sum_to(self, expr: str, shape: tuple, to: tuple) -> str:
        """An adjoint of a broadcast result summed back to its operand's shape."""
        lead = len(shape) - len(to)
        for _ in range(lead):
            expr = f"tl.sum({self.sz.where(shape, expr)}, axis=0)"
            shape = shape[1:]
        for i, (d, e) in enumerate(zip(to, shape)):
            if D.equal(d, 1) and not D.equal(e, 1):
                expr = f"tl.expand_dims(tl.sum({self.sz.where(shape, expr)}, axis={i}), {i})"
                shape = shape[:i] + (d,) + shape[i + 1:]
        return expr

    def adjoint_lines(self, seeds: list[tuple[int, str]]) -> tuple[list[str], dict[int, str]]:
        """Reverse-mode code for one step: {tile: its adjoint variable} for leaves and states,
        plus the lines; the deferred products' adjoints are `d<tile>` too."""
        tiles, sz = self.prog.tiles, self.sz
        adj: dict[int, str] = {}
        lines: list[str] = []

        def add(j: int, expr: str) -> None:
            t = tiles[j]
            if t.op == "num" or t.op in BOOL:
                return
            var = f"d{j}"
            lines.append(f"{var} = {expr}" if j not in adj else f"{var} = {var} + {expr}")
            adj[j] = var

        for j, expr in seeds:
            add(j, expr)
        for i in reversed(range(len(tiles))):
            t = tiles[i]
            if i not in adj or t.op in ("leaf", "state", "num"):
                continue
            g, a = adj[i], [self.v[j] for j in t.args]
            sh = [tiles[j].shape for j in t.args]
            if t.op == "mv":
                if i not in self.deferred:
                    add(t.args[0], f"{g}[:, None] * {a[1]}[None, :]")
                add(t.args[1], f"tl.sum({sz.where(sh[0], f'{a[0]} * {g}[:, None]')}, axis=0)")
            elif t.op == "vm":
                add(t.args[0], f"tl.sum({sz.where(sh[1], f'{a[1]} * {g}[None, :]')}, axis=1)")
                if i not in self.deferred:
                    add(t.args[1], f"{a[0]}[:, None] * {g}[None, :]")
            elif t.op == "mm":
                cube = (sh[0][0], sh[0][1], sh[1][1])
                add(t.args[0], f"tl.sum({sz.where(cube, f'{g}[:, None, :] * {a[1]}[None, :, :]')}, axis=2)")
                add(t.args[1], f"tl.sum({sz.where(cube, f'{a[0]}[:, :, None] * {g}[:, None, :]')}, axis=0)")
            elif t.op == "dot":
                add(t.args[0], f"{g} * {a[1]}")
                add(t.args[1], f"{g} * {a[0]}")
            elif t.op == "outer":
                add(t.args[0], f"tl.sum({sz.where(t.shape, f'{g} * {a[1]}[None, :]')}, axis=1)")
                add(t.args[1], f"tl.sum({sz.where(t.shape, f'{g} * {a[0]}[:, None]')}, axis=0)")
            elif t.op == "sum":
                add(t.args[0], f"tl.expand_dims({g}, {t.attrs['axis']}) + tl.zeros({sz.blocks(sh[0])}, DT)"
                    if t.shape else f"{g} + tl.zeros({sz.blocks(sh[0])}, DT)")
            elif t.op == "scale":
                add(t.args[0], f"{g} / {_names(t.attrs['by'])}")
            elif t.op == "squeeze":
                add(t.args[0], f"tl.expand_dims({g}, {t.attrs['axis']})" if t.shape
                    else f"{g} + tl.zeros({sz.blocks(sh[0])}, DT)")
            elif t.op == "expand":
                add(t.args[0], f"tl.sum({g}, axis={t.attrs['axis']})")
            elif t.op == "trans":
                add(t.args[0], f"tl.trans({g})")
            elif t.op == "bcast":
                add(t.args[0], self.sum_to(g, t.shape, sh[0]))
            elif (rules := adjoint(t.op) if t.op in UNARY or t.op in BINARY or t.op == "where" else None):
                for j, rule, s in zip(t.args, rules, sh):
                    if rule is not None:
                        add(j, self.sum_to("(" + rule.format(*a, g=g, y=self.v[i]) + ")", t.shape, s))
        return lines, adj


def source(cell, prog: TileProgram) -> list[str]:
    """Module-level source of the two kernels and `_Recurrent` for the cell's tile program."""
    r = _Render(prog, cell.graph)
    sz, tiles = r.sz, prog.tiles
    for s in cell.states:
        for d in s.shape:
            sz.id(d)
    body = r.forward_lines()
    ns, nl = len(cell.states), len(prog.leaves)
    outs = list(prog.outputs.items())
    shapes = [s.shape for s in cell.states]
    oshapes = [cell.graph[next(o.node for o in cell.outputs if o.name == name)].shape for name, _ in outs]
    # each output's parts (one, or a concat's) and the variable of each part's gradient in the backward
    pieces = [(i, p, view, t, f"go{i}" if len(parts) == 1 else f"go{i}_{p}")
              for i, (_, parts) in enumerate(outs) for p, (view, t) in enumerate(parts)]
    dims = kernel_dims(cell, prog)
    dim_args = "".join(f"d_{n}, " for n in dims)
    blocks = ", ".join(f"BS{i}: tl.constexpr" for i in range(len(sz.exprs)))
    ind = " " * 8

    def full(shape: tuple, base: str, row: str, view: tuple | None = None) -> str:
        """Pointers to a row's value of `shape`, or to the region `view` of it."""
        offs = ""
        for i, (o, z) in enumerate(view or tuple((sympy.Integer(0), d) for d in shape)):
            at = sz.axis(z, i, len(shape))
            offs += f" + {at if D.equal(o, 0) else f'({_names(o)} + {at})'}{_times(_stride(shape, i))}"
        return f"{base} + ({row}){_times(_numel(shape))}{offs}"

    def store(shape: tuple, base: str, row: str, value: str, op: str = "tl.store", view: tuple | None = None) -> str:
        m = sz.mask(tuple(z for _, z in view) if view else shape)
        return f"{op}({full(shape, base, row, view)}, {value}{'' if m is None else f', mask={m}'})"

    def load(shape: tuple, base: str, row: str, extra_mask: str | None = None, view: tuple | None = None) -> str:
        own = sz.mask(tuple(z for _, z in view) if view else shape)
        m = " & ".join(f"({x})" if x == extra_mask else x for x in (own, extra_mask) if x)
        return f"tl.load({full(shape, base, row, view)}{f', mask={m}, other=0.0' if m else ''})"

    setup = [f"    r{i} = tl.arange(0, BS{i})" for i in range(len(sz.exprs))]
    setup += [f"    m{i} = r{i} < {_names(e)}" for i, e in enumerate(sz.exprs)]
    state_vars = [f"s{i}" for i in range(ns)]
    new_state = [r.v[t] if _same_shape(tiles[t].shape, shapes[i]) else f"{r.v[t]} + tl.zeros({sz.blocks(shapes[i])}, DT)"
                 for i, t in enumerate(prog.states)]
    sp = "".join(f"s0{i}_ptr, " for i in range(ns))
    lp = "".join(f"l{k}_ptr, " for k in range(nl))
    op_ = "".join(f"o{i}_ptr, " for i in range(len(outs)))
    fp = "".join(f"f{i}_ptr, " for i in range(ns))
    hp = "".join(f"h{i}_ptr, " for i in range(ns))
    fwd = [
        "@triton.jit",
        f"def _rec_fwd({sp}{lp}{op_}{fp}{hp}T, N, {dim_args}SAVE: tl.constexpr, DT: tl.constexpr, {blocks}):",
        f'    """One row of `{cell.name}` through all T steps, the states in registers."""',
        "    n = tl.program_id(0).to(tl.int64)",
        *setup,
        *[f"    s{i} = {load(shapes[i], f's0{i}_ptr', 'n')}.to(DT)" for i in range(ns)],
        "    for t in range(T):",
        "        row = t * N + n",
        *[ind + line for line in body],
        *[ind + store(oshapes[i], f"o{i}_ptr", "row", r.v[t], view=view) for i, _, view, t, _ in pieces],
        f"{ind}{', '.join(state_vars)} = {', '.join(new_state)}",
        f"{ind}if SAVE:",
        *[ind + "    " + store(shapes[i], f"h{i}_ptr", "row", f"s{i}") for i in range(ns)],
        *[f"    {store(shapes[i], f'f{i}_ptr', 'n', f's{i}')}" for i in range(ns)],
    ]
    # backward: seeds are the outputs' gradients at step t and the states' carried adjoints
    seeds = [(t, go) for _, _, _, t, go in pieces] + [(t, f"lam{i}") for i, t in enumerate(prog.states)]
    adj_lines, adj = r.adjoint_lines(seeds)
    state_tile = {tl_.attrs["state"]: j for j, tl_ in enumerate(tiles) if tl_.op == "state"}
    leaf_tiles = {k: [j for j, t in enumerate(tiles) if t.op == "leaf" and t.attrs["leaf"] == k] for k in range(nl)}
    step_grads, const_acc = [], []
    for k in range(nl):
        for j in leaf_tiles[k]:
            if j not in adj:
                continue
            view = tiles[j].attrs["view"]
            shape = tiles[j].shape
            if prog.per_step[k]:
                p = r.ptr(k, view, f"dl{k}_ptr")
                m = sz.mask(shape)
                fn = "tl.store" if _disjoint([tiles[x].attrs["view"] for x in leaf_tiles[k]]) else "tl.atomic_add"
                step_grads.append(f"{fn}({p}, {adj[j]}{'' if m is None else f', mask={m}'})")
            else:
                const_acc.append((j, k, view, shape))
    dp = "".join(f"gy{i}_ptr, " for i in range(len(r.deferred))) + "".join(f"xv{i}_ptr, " for i in range(len(r.vectors)))
    deferred_stores = [store(tiles[j].shape, f"gy{i}_ptr", "row",
                             adj.get(j, f"tl.zeros({sz.blocks(tiles[j].shape)}, DT)")) for i, j in enumerate(r.deferred)]
    deferred_stores += [store(tiles[v].shape, f"xv{i}_ptr", "row", r.v[v]) for i, v in enumerate(r.vectors)]
    acc_init = [f"    a{j} = tl.zeros({sz.blocks(shape) if shape else '[1]'}, DT)" for j, _, _, shape in const_acc]
    acc_add = [f"{ind}a{j} = a{j} + {adj[j]}" for j, _, _, _ in const_acc]
    acc_out = []
    for j, k, view, shape in const_acc:
        m = sz.mask(shape)
        value = f"a{j}" if shape else f"tl.sum(a{j}, axis=0)"
        acc_out.append(f"    tl.atomic_add({r.ptr(k, view, f'dl{k}_ptr')}, {value}{'' if m is None else f', mask={m}'})")

    def new_lam(i: int) -> str:
        j = state_tile.get(i)
        if j is None or j not in adj:  # the step does not read the state: nothing flows back
            return f"tl.zeros({sz.blocks(shapes[i])}, DT)"
        return f"tl.where({sz.mask(shapes[i])}, {adj[j]}, 0.0)"

    gp = "".join(f"go{i}_ptr, " for i in range(len(outs))) + "".join(f"gf{i}_ptr, " for i in range(ns))
    dsp = "".join(f"ds{i}_ptr, " for i in range(ns))
    dlp = "".join(f"dl{k}_ptr, " for k in range(nl))
    bwd = [
        "@triton.jit",
        f"def _rec_bwd({sp}{lp}{hp}{gp}{dsp}{dlp}{dp}T, N, {dim_args}DT: tl.constexpr, {blocks}):",
        '    """The steps in reverse: recompute step t from the saved states, then its adjoint."""',
        "    n = tl.program_id(0).to(tl.int64)",
        *setup,
        *[f"    init{i} = {load(shapes[i], f's0{i}_ptr', 'n')}.to(DT)" for i in range(ns)],
        *[f"    lam{i} = {load(shapes[i], f'gf{i}_ptr', 'n')}.to(DT)" for i in range(ns)],
        *acc_init,
        "    for i in range(T):",
        "        t = T - 1 - i",
        "        row = t * N + n",
        *[f"{ind}s{i} = tl.where(t > 0, {load(shapes[i], f'h{i}_ptr', 'row - N', 't > 0')}, init{i})"
          for i in range(ns)],
        *[ind + line for line in body],
        *[f"{ind}{go} = {load(oshapes[i], f'go{i}_ptr', 'row', view=view)}" for i, _, view, _, go in pieces],
        *[ind + line for line in adj_lines],
        *[ind + line for line in step_grads],
        *[ind + line for line in deferred_stores],
        *acc_add,
        f"{ind}{', '.join(f'lam{i}' for i in range(ns))} = {', '.join(new_lam(i) for i in range(ns))}",
        *[f"    {store(shapes[i], f'ds{i}_ptr', 'n', f'lam{i}')}" for i in range(ns)],
        *acc_out,
    ]
    return fwd + ["", ""] + bwd + ["", ""] + _function(cell, r, prog, dims, shapes, oshapes)


def kernel_dims(cell, prog: TileProgram) -> list[str]:
    """The dims the kernels take as arguments (every size, offset and stride is over them)."""
    exprs = [d for s in cell.states for d in s.shape] + [d for o in cell.outputs for d in o.shape]
    exprs += [o for parts in prog.outputs.values() for view, _ in parts for o, _ in view]
    exprs += [d for n in prog.leaves for d in cell.graph[n].shape]
    for t in prog.tiles:
        exprs += list(t.shape) + [o for o, _ in t.attrs.get("view", ())]
        if "by" in t.attrs:
            exprs.append(t.attrs["by"])
    return sorted({n for e in exprs for n in D.free_names(sympy.sympify(e))})


def _same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(D.equal(x, y) for x, y in zip(a, b))


def _function(cell, r: _Render, prog: TileProgram, dims: list[str], shapes: list, oshapes: list) -> list[str]:
    """The autograd.Function: allocates, launches, and forms the deferred weight gradients."""
    ns, nl, no = len(cell.states), len(prog.leaves), len(oshapes)
    sz, tiles = r.sz, prog.tiles

    def shp(shape: tuple) -> str:
        return "".join(f", {_names(d)}" for d in shape)

    blocks = ", ".join(f"BS{i}=triton.next_power_of_2({_names(e)})" for i, e in enumerate(sz.exprs))
    shapes_in_registers = [t.shape for t in tiles] + [
        (tiles[t.args[0]].shape[0], tiles[t.args[0]].shape[1], tiles[t.args[1]].shape[1]) for t in tiles if t.op == "mm"]
    largest = ", ".join(sorted({" * ".join(f"blocks['BS{sz.id(d)}']" for d in shape)
                                for shape in shapes_in_registers if shape}))
    dim_vals = "".join(f"d_{n}, " for n in dims)
    unpack = f"        {', '.join(f'd_{n}' for n in dims)}{',' if len(dims) == 1 else ''} = dims" if dims else "        pass"
    weight_grads = []
    for i, j in enumerate(r.deferred):
        t = tiles[j]
        mat = tiles[t.args[0] if t.op == "mv" else t.args[1]]
        v = r.vectors.index(r.vector(j))
        sl = ", ".join(f"{_names(o)}:{_names(o + z)}" for o, z in mat.attrs["view"])
        m, kk = _names(sympy.prod(t.shape)), _names(sympy.prod(tiles[r.vector(j)].shape))
        gy, xv = f"gy[{i}].reshape(-1, {m})", f"xv[{v}].reshape(-1, {kk})"
        prod = f"{gy}.t() @ {xv}" if t.op == "mv" else f"{xv}.t() @ {gy}"
        weight_grads.append(f"        dl[{mat.attrs['leaf']}][{sl}] += {prod}")
    return [
        "class _Recurrent(torch.autograd.Function):",
        f'    """`{cell.name}` over all steps in the fused kernels: {ns} initial state(s) [N, ...] and '
        f'{nl} leaves ([T, N, ...] per step, or constant) -> {no} output(s) [T, N, ...] and the final states."""',
        "",
        "    @staticmethod",
        "    def forward(ctx, T, dims, *args):",
        unpack,
        f"        s0, leaves = [x.contiguous() for x in args[:{ns}]], [x.contiguous() for x in args[{ns}:]]",
        "        _check_triton_device(s0[0])",
        "        N, dt, dev = s0[0].shape[0], s0[0].dtype, s0[0].device",
        "        save = any(ctx.needs_input_grad)",
        f"        blocks = dict({blocks})",
        f"        warps = _recurrent_warps(max({largest}, 1))",
        *[f"        o{i} = torch.empty(T, N{shp(s)}, dtype=dt, device=dev)" for i, s in enumerate(oshapes)],
        "        fin = [torch.empty_like(x) for x in s0]",
        "        hist = [torch.empty(T, *x.shape, dtype=dt, device=dev) if save else x for x in s0]",
        f"        _rec_fwd[(N,)](*s0, *leaves, {''.join(f'o{i}, ' for i in range(no))}*fin, *hist, T, N, {dim_vals}"
        f"SAVE=save, DT=_TL_DTYPE[dt], num_warps=warps, **blocks)",
        "        ctx.save_for_backward(*s0, *leaves, *(hist if save else ()))",
        "        ctx.T, ctx.dims, ctx.blocks, ctx.warps = T, dims, blocks, warps",
        "        return (" + "".join(f"o{i}, " for i in range(no)) + "*fin)" if no else "        return tuple(fin)",
        "",
        "    @staticmethod",
        "    def backward(ctx, *grads):",
        "        T, dims, blocks = ctx.T, ctx.dims, ctx.blocks",
        unpack,
        "        saved = ctx.saved_tensors",
        f"        s0, leaves, hist = saved[:{ns}], saved[{ns}:{ns + nl}], saved[{ns + nl}:]",
        "        N, dt, dev = s0[0].shape[0], s0[0].dtype, s0[0].device",
        *[f"        go{i} = torch.zeros(T, N{shp(s)}, dtype=dt, device=dev) if grads[{i}] is None "
          f"else grads[{i}].contiguous()" for i, s in enumerate(oshapes)],
        f"        gf = [torch.zeros_like(x) if g is None else g.contiguous() for g, x in zip(grads[{no}:], s0)]",
        "        ds = [torch.empty_like(x) for x in s0]",
        "        dl = [torch.zeros_like(x) for x in leaves]",
        "        # per step: the adjoint of each product with a constant matrix, and its vector",
        f"        gy = [{', '.join(f'torch.empty(T, N{shp(tiles[j].shape)}, dtype=dt, device=dev)' for j in r.deferred)}]",
        f"        xv = [{', '.join(f'torch.empty(T, N{shp(tiles[v].shape)}, dtype=dt, device=dev)' for v in r.vectors)}]",
        f"        _rec_bwd[(N,)](*s0, *leaves, *hist, {''.join(f'go{i}, ' for i in range(no))}*gf, *ds, *dl, *gy, *xv, "
        f"T, N, {dim_vals}DT=_TL_DTYPE[dt], num_warps=ctx.warps, **blocks)",
        *weight_grads,
        "        return (None, None, *ds, *dl)",
    ]

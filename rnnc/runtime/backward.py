"""What the loop's backward runs: the recurrence as one autograd node whose backward is generated
(`_Recurrence`), the helpers the generated derivative rules call (backends/adjoint.py, bptt.py), and the
one-matmul weight gradient of the autograd fallback (`_DeferredWeight`).
"""
import torch
import torch.nn.functional as F


class _Recurrence(torch.autograd.Function):
    """The loop as one autograd node: `fwd` runs it without autograd, `bwd` is its generated
    backward through time. `inputs` are the tensors whose gradients `bwd` returns, in order."""

    @staticmethod
    def forward(ctx, fwd, bwd, *inputs):
        outputs, saved = fwd()
        ctx.bwd, ctx.saved = bwd, saved
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *ctx.bwd(ctx.saved, grads))


def _acc(total, part):
    return part if total is None else total + part


def _sum_to(g, shape):
    """Sum a broadcast gradient back to `shape` (leading axes, then axes of size 1)."""
    if g.shape == shape:
        return g
    lead = g.dim() - len(shape)
    if lead:
        g = g.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


def _grad_to(g, shape, pad):
    """The gradient of a batched operand that was padded with `pad` axes after its batch axis."""
    if pad:
        g = g.sum(dim=tuple(range(1, 1 + pad)))
    return _sum_to(g, shape)


def _matmul_grad(g, a, b, ra, rb):
    """Gradients of a @ b (per-step ranks ra, rb <= 2; either operand may lack the batch axis)."""
    if ra == 1 and rb == 1:  # a dot product: g has no per-step axes
        g = g.unsqueeze(-1)
        return _sum_to(g * b, a.shape), _sum_to(g * a, b.shape)
    A = a.unsqueeze(-2) if ra == 1 else a
    Bm = b.unsqueeze(-1) if rb == 1 else b
    G = g.unsqueeze(-2) if ra == 1 else g
    G = G.unsqueeze(-1) if rb == 1 else G
    da = G @ Bm.transpose(-1, -2)
    db = A.transpose(-1, -2) @ G
    da = da.squeeze(-2) if ra == 1 else da
    db = db.squeeze(-1) if rb == 1 else db
    return _sum_to(da, a.shape), _sum_to(db, b.shape)


def _normalize_grad(g, x, dim, eps=1e-12):
    norm = x.norm(dim=dim, keepdim=True)
    n = norm.clamp_min(eps)
    inner = (g * x).sum(dim, keepdim=True)
    return g / n - torch.where(norm > eps, x * inner / n ** 3, 0.0)


def _index_grad(g, x, index, newaxes):
    if newaxes:
        g = g.squeeze(newaxes)
    out = torch.zeros_like(x)
    out[index] = g
    return out


class _DeferredWeight:
    """x @ W.t() (+ add) at every step, with W's gradient computed once for all steps.

    Plain autograd computes dW = g_t^T x_t and accumulates it at every step: two full-size ops
    per step. Here each step's backward only records (g_t, x_t); W's gradient is one matmul
    over all of them, when autograd reaches W (through _WeightSink, which every step uses).
    """

    def __init__(self, w):
        self.w = w
        self.saved = []
        self.active = torch.is_grad_enabled() and w.requires_grad
        self.sink = _WeightSink.apply(w, self) if self.active else w

    def __call__(self, x, add=None):
        if self.active:
            return _StepLinear.apply(x, self.sink, add, self)
        return F.linear(x, self.w) if add is None else torch.addmm(add, x, self.w.t())


class _WeightSink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, owner):
        ctx.owner = owner
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        saved, ctx.owner.saved = ctx.owner.saved, []
        if saved:
            g = torch.cat([s[0] for s in saved])
            x = torch.cat([s[1] for s in saved])
            grad = grad + g.t() @ x
        return grad, None


class _StepLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, add, owner):
        ctx.save_for_backward(x, w)
        ctx.owner = owner
        ctx.add_rank = None if add is None else add.dim()
        return F.linear(x, w) if add is None else torch.addmm(add, x, w.t())

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        ctx.owner.saved.append((g, x))
        gx = g @ w if ctx.needs_input_grad[0] else None
        gadd = None
        if ctx.add_rank is not None and ctx.needs_input_grad[2]:
            gadd = g if ctx.add_rank == 2 else g.sum(0)
        return gx, None, gadd, None

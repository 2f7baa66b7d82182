"""What the loop's backward runs: the gradient accumulation its generated backward calls (`_acc`,
backends/bptt.py; the op running it is in opaque.py), and the one-matmul weight gradient of the
autograd fallback (`_DeferredWeight`).
"""
import torch
import torch.nn.functional as F


def _acc(total, part):
    return part if total is None else total + part


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

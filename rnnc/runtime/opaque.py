"""The recurrence as one opaque operator (a `torch.library` custom op), so that `torch.compile` and
`torch.export` see one node of known output shapes instead of tracing the steps.

A generated module defines its recurrence as a top-level function of tensors and ints (the
"region", backends/opaque.py) and registers it here under `rnnc::<kind>_<hash>`, the hash of the
region's own source (never spec text), with a fake (shapes from the input shapes, T symbolic) and
its autograd:
- the loop passes its generated backward through time (backends/bptt.py): the forward op also
  returns the per-step values that backward reads, stacked [T, ...], and a second op runs it;
- every other lowering (scan, chunk, Triton kernels) is differentiated by recomputing the region
  under autograd inside a second op (`<name>_vjp`): one more forward in training, only when compiled.
The loop calls its op always; the others only while compiling or exporting (`_run_region`), and run
the same function directly otherwise.
"""
import torch


def _unaliased(outputs, inputs):
    """Outputs of a custom op may alias neither an input nor another output: shared ones are copied.
    They are also made contiguous, the layout the fakes promise."""
    flat = [y for x in inputs for y in (x if isinstance(x, (list, tuple)) else [x])]
    seen = {x.untyped_storage().data_ptr() for x in flat if isinstance(x, torch.Tensor) and x.numel()}
    fresh = []
    for y in outputs:
        y = y.contiguous()
        if y.numel():
            ptr = y.untyped_storage().data_ptr()
            if ptr in seen:
                y = y.clone()
                ptr = y.untyped_storage().data_ptr()
            seen.add(ptr)
        fresh.append(y)
    return fresh


def _like(x):
    """A contiguous tensor of x's shape, dtype and device (what an op's outputs are, see _unaliased)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _existing_op(name):
    """The op `rnnc::<name>` if this process registered it already (the same region, loaded again)."""
    try:
        return getattr(torch.ops.rnnc, name).default
    except (AttributeError, RuntimeError):
        return None


def _recurrence_op(name, impl, fake, results, backward=None, tracked=()):
    """Register `impl` (a region: ints, dtypes and tensors in, a list of tensors out) as the custom op
    `rnnc::<name>`, its first `results` outputs differentiable. With `backward` (the loop's generated
    one: the region's arguments, the rest of its outputs, the first `results` outputs' gradients ->
    the gradients of the arguments at `tracked`), the other outputs are what that backward reads;
    without, gradients come from recomputing `impl` under autograd."""
    op = _existing_op(name)
    if op is not None:
        return op
    schema = torch.library.infer_schema(impl, mutates_args=())
    head, _, tail = schema.rpartition(") -> ")

    def run(*args):
        return _unaliased(impl(*args), args)

    op = torch.library.custom_op(f"rnnc::{name}", run, mutates_args=(), schema=schema)
    op.register_fake(fake)
    if backward is not None:
        lists = "Tensor[] saved, Tensor[] grads" if head.endswith("(") else ", Tensor[] saved, Tensor[] grads"
        bwd = torch.library.custom_op(f"rnnc::{name}_backward", lambda *a: _unaliased(backward(*a), a),
                                      mutates_args=(), schema=f"{head}{lists}) -> Tensor[]")
        bwd.register_fake(lambda *a: [_like(a[i]) for i in tracked])
    else:
        grads_arg = "Tensor[] grads" if head.endswith("(") else ", Tensor[] grads"
        bwd = torch.library.custom_op(f"rnnc::{name}_vjp", lambda *a: _unaliased(_recompute_vjp(impl, results, *a), a),
                                      mutates_args=(), schema=f"{head}{grads_arg}) -> Tensor[]")
        bwd.register_fake(lambda *a: [_like(x) for x in a[:-1] if isinstance(x, torch.Tensor) and x.is_floating_point()])

    def setup_context(ctx, inputs, output):
        ctx.positions = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        ctx.args = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        ctx.save_for_backward(*[inputs[i] for i in ctx.positions], *output)

    def gradient(ctx, grads):
        saved = ctx.saved_tensors
        args = list(ctx.args)
        for i, x in zip(ctx.positions, saved):
            args[i] = x
        outputs = saved[len(ctx.positions):]
        seeds = [torch.zeros_like(y) if g is None else g for g, y in zip(grads[:results], outputs)]
        out = [None] * len(args)
        if backward is not None:
            if outputs[results:] and args[0] is False:  # `save`, the first argument of a loop that saves
                raise RuntimeError("rnnc: the loop's op ran with save=False (it kept no steps), then was differentiated")
            for i, g in zip(tracked, bwd(*args, list(outputs[results:]), seeds)):
                out[i] = g
        else:
            floats = [i for i in ctx.positions if args[i].is_floating_point()]
            for i, g in zip(floats, bwd(*args, seeds)):
                out[i] = g
        return tuple(out)

    op.register_autograd(gradient, setup_context=setup_context)
    return _existing_op(name)  # the OpOverload, which torch.compile records as one node


def _recompute_vjp(impl, results, *args):
    """The region's vector-Jacobian product by running it again under autograd: the gradients of its
    floating-point tensor arguments (zeros for those the results do not read)."""
    *args, grads = args
    args = list(args)
    leaves = []
    with torch.enable_grad(), _autograd_keys():
        for i, x in enumerate(args):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                args[i] = x.detach().requires_grad_()
                leaves.append(args[i])
        outputs = impl(*args)[:results]
        pairs = [(y, g) for y, g in zip(outputs, grads) if y.requires_grad]
        if not pairs:
            raise RuntimeError("rnnc: recomputing the recurrence for its gradient recorded no autograd graph")
        found = torch.autograd.grad([y for y, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, found)]


def _autograd_keys():
    """A custom op's implementation runs below autograd (its dispatch keys excluded), so recording a
    graph there needs them back for the recomputation (torch has no public switch for this)."""
    keys = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView"):
        keys = keys.remove(getattr(torch._C.DispatchKey, key))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), keys)


def _needs_grad(*tensors):
    """Whether autograd will ask for the gradients of these tensors (the loop then keeps its steps)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def _or_zeros(grad, like):
    """A gradient the generated backward left None (no step contributed) as zeros."""
    return torch.zeros_like(like) if grad is None else grad


def _as_tensor(steps):
    """A loop output as one [T, N, ...] tensor (a fragment may leave it a list of T steps)."""
    return torch.stack(steps) if isinstance(steps, list) else steps


def _run_region(op, impl, *args):
    """A region that autograd differentiates directly in eager mode: its op only while compiling or
    exporting (where its steps must not be traced), else the function itself."""
    if torch.compiler.is_compiling():
        return op(*args)
    return impl(*args)


def _run_traced_region(op, impl, *args):
    """A region whose kernels are ops of their own (the Triton chunk launchers, rnnc/runtime/triton_launch.py):
    traced while compiling, so the compiled graph holds those ops (and on a GPU inductor sees their kernels),
    one op while exporting (a dynamic length's shape guards stay inside it), the function itself otherwise."""
    if torch.compiler.is_exporting():
        return op(*args)
    return impl(*args)

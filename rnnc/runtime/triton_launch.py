"""What the launchers of generated Triton kernels share: the device check, how the fused scans cut time
into chunks, the fused recurrent kernel's warps and register limit, and how a launcher becomes a
`torch.library.triton_op` (the chunkwise kernels' forward and backward launchers, triton_chunk.py and
triton_delta.py)."""
import os

import torch
import triton
import triton.language as tl

from rnnc.errors import InputError

from .opaque import _existing_op

#: The Triton dtype of a compute dtype (the recurrent kernel's DT constexpr).
_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}
#: The largest register tile (padded elements) the fused recurrent kernel takes: a [256, 256] weight
#: block. Larger ones would spill far past the register file; the module refuses them (InputError).
RECURRENT_MAX_TILE = 65536


def _check_triton_device(x):
    """Triton kernels run on CUDA tensors, or on CPU ones in the interpreter (TRITON_INTERPRET=1)."""
    if x.device.type == 'cpu' and os.environ.get('TRITON_INTERPRET') != '1':
        raise InputError('the triton backend runs on CUDA tensors (on CPU only under TRITON_INTERPRET=1); '
                         'move the inputs to the GPU, or build with backend="scan" or "chunk"')


def _scan_chunks(T, M, block, steps=None):
    """(P, L): a fused scan over M channels, `block` per program, runs as P chunks of L steps. Time is
    cut only when the channels give fewer than 256 programs and the sequence is long (>= 1024 steps):
    then into chunks of at least 256 steps, aiming at ~1024 programs. `steps` (the generated module's
    SCAN_CHUNK) forces the chunk length; nothing here is tuned on a GPU yet."""
    programs = triton.cdiv(M, block)
    if steps is not None:
        L = steps
    elif programs >= 256 or T < 1024:
        L = T
    else:
        L = max(256, triton.cdiv(T, triton.cdiv(1024, programs)))
    L = max(1, min(int(L), T))
    return triton.cdiv(T, L), L


def _recurrent_warps(largest):
    """Warps for the recurrent kernels: more for larger register tiles; refuse what would not fit
    (an InputError marked `tiles_too_large`: a module with a parallel form then runs that)."""
    if largest > RECURRENT_MAX_TILE:
        err = InputError(f'the fused recurrent kernel would hold {largest} elements in registers (the limit '
                         f'is {RECURRENT_MAX_TILE}); use smaller dims, or backend="loop" (or "auto")')
        err.tiles_too_large = True
        raise err
    return 4 if largest <= 4096 else 8 if largest <= 16384 else 16


def _kernel_op(name, launch, fake, backward=None, setup_context=None):
    """`launch` (tensors, ints, bools and strs in, a list of new tensors out, every kernel launched through
    `torch.library.wrap_triton`) registered as the op `rnnc::<name>`, a `torch.library.triton_op`:
    torch.compile records one node per call (no graph break), and on a GPU inductor sees the kernels
    inside (the op is decomposed into them while tracing). `fake` gives the outputs' shapes and dtypes
    without launching anything; `backward`/`setup_context` are its autograd (torch.library's
    register_autograd). Under Triton's CPU interpreter (TRITON_INTERPRET=1) a kernel is plain
    Python that no tracer can capture, so there the op stays whole while tracing (an opaque custom op
    that launches when run). Registered once per process: a standalone copy of this runtime (`rnnc
    compile`) reuses the op already registered by the same code."""
    op = _existing_op(name)
    if op is not None:
        return op
    op = torch.library.triton_op(f"rnnc::{name}", launch, mutates_args=())
    op.register_fake(fake)
    if os.environ.get("TRITON_INTERPRET") == "1":
        op.register_torch_dispatch(torch._subclasses.functional_tensor.FunctionalTensorMode, _kept_whole)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return _existing_op(name)  # the OpOverload, which torch.compile records as one node


def _kept_whole(mode, op, types, args, kwargs):
    """While tracing under the interpreter: the op itself, not the kernels inside it (see _kernel_op)."""
    return mode.__torch_dispatch__(op, types, args, kwargs)

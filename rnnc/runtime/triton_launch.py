"""What the launchers of generated Triton kernels share: the device check, how the fused scans cut time
into chunks, and the fused recurrent kernel's warps and register limit."""
import os

import torch
import triton
import triton.language as tl

from rnnc.errors import InputError

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

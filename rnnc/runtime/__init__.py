"""What built cells run: the helpers, parallel forms and Triton kernels that generated modules call.

A module from `rnnc.build` imports the names it uses from these modules; `rnnc compile` copies the same
definitions, and only those it uses, into a standalone file (backends/link.py). So every module here
imports only math, os, warnings, torch, triton, its siblings and `rnnc.errors.InputError`, holds only functions,
classes and constants at the top level, and no name is defined in two of them. Nothing is imported
here: a cell without Triton never imports triton.

  calling        inputs, dims, dtypes, initial states, time-major layout, packed batches
  backward       the helpers of the loop's generated backward and of its autograd fallback
  opaque         the recurrence as one torch.library custom op (for torch.compile and torch.export)
  scan           parallel prefix scans (linear, and by an associative combine)
  newton         Newton's method over time for nonlinear cells, and its adjoint
  chunk          chunkwise-parallel linear attention and delta rule, in PyTorch
  chunk_dplr     the generalized delta rule (DPLR, KDA, DeltaProduct) chunkwise, in PyTorch
  triton_launch  what the generated Triton kernels' launchers share (device check, grids, warps)
  triton_chunk   chunkwise linear attention as Triton kernels, forward and backward
  triton_delta   the chunkwise delta rule as Triton kernels, forward and backward
  triton_dplr    the generalized delta rule (KDA, RWKV-7, DeltaProduct) as Triton kernels, forward and backward
  triton_newton  Newton's linear step for diagonal and 2x2-block Jacobians as Triton kernels (handed to newton.py)
"""

#: The modules, in the order a standalone file holds what it vendors from them (a module before those
#: importing from it).
MODULES = ("calling", "backward", "opaque", "scan", "newton", "chunk", "chunk_dplr", "triton_launch", "triton_chunk",
           "triton_delta", "triton_dplr", "triton_newton")

"""The short causal convolution fla's layers put on their projections (fla.modules.ShortConvolution)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import _ACTIVE, _conv_halo


class ShortConvolution(nn.Module):
    """Causal depthwise conv1d over time, then SiLU (or nothing): y_t = act(b + Σ_j w[:, 0, j] x_{t-W+1+j}).

    The weight is nn.Conv1d's `[channels, 1, W]` (fla's layout, so its weights copy over). The W - 1
    inputs before a sequence's first step come from `cache` (zeros without one), and the call
    returns the W - 1 last inputs of every sequence as the next cache, so decoding one token a call
    equals one call over the whole sequence. With `cu_seqlens`, x is a packed batch `[1, total, C]`
    and no sequence sees another's inputs; a sequence of length 0 keeps its cache. Inside
    `rnnc.distributed.sequence_parallel`, the W - 1 inputs before a rank's slice are the ranks' before it.
    """

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = False, activation: str | None = "silu",
                 device=None, dtype=None) -> None:
        super().__init__()
        if activation not in ("silu", "swish", None):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive integer, got {kernel_size!r}")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv1d's initialisation: U(-1/sqrt(W), 1/sqrt(W)) for a depthwise kernel of width W."""
        bound = 1 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}, " \
               f"activation={self.activation}"

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C] (or [1, total, C] with cu_seqlens); cache: [N, W - 1, C]. Returns (y like x, cache)."""
        pad, C = self.kernel_size - 1, self.channels
        N = x.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
        if cu_seqlens is None and pad and _ACTIVE.get() is not None:  # sequence parallel: from the ranks before
            cache = _conv_halo(x, cache, pad)
        if cache is None:
            cache = x.new_zeros(N, pad, C)
        if x.shape[1] == 0:  # no tokens in this call: every sequence keeps its cache
            return x, cache
        if cu_seqlens is None:  # [B, T, C]: each sequence after its cache, one batched conv1d
            ext = torch.cat([cache.to(x.dtype), x], 1)
            y = F.conv1d(ext.transpose(1, 2), self.weight, self.bias, groups=C).transpose(1, 2)
            return self._act(y), ext[:, ext.shape[1] - pad:]
        # packed: every sequence laid out after its cache, all back to back; the W rows ending at a
        # token's row hold only that token's sequence and cache
        lengths = torch.as_tensor(cu_seqlens, device=x.device).diff().long()
        flat = x[0]
        ext_start = F.pad((lengths + pad).cumsum(0), (1, 0))[:-1]
        seq = torch.repeat_interleave(torch.arange(N, device=x.device), lengths)
        token_start = F.pad(lengths.cumsum(0), (1, 0))[:-1]
        rows = ext_start[seq] + pad + torch.arange(flat.shape[0], device=x.device) - token_start[seq]
        taps = torch.arange(pad, device=x.device)
        ext = flat.new_zeros(flat.shape[0] + N * pad, C).index_copy(0, rows, flat)
        ext = ext.index_copy(0, (ext_start[:, None] + taps).reshape(-1), cache.reshape(-1, C).to(flat.dtype))
        y = sum(ext[rows - pad + j] * self.weight[:, 0, j] for j in range(self.kernel_size))
        if self.bias is not None:
            y = y + self.bias
        return self._act(y).unsqueeze(0), ext[(ext_start + lengths)[:, None] + taps]

    def _act(self, y: torch.Tensor) -> torch.Tensor:
        return F.silu(y) if self.activation is not None else y

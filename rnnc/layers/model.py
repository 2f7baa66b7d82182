"""A small language-model stack of `Layer`s: pre-norm blocks (mixer + residual, SwiGLU MLP + residual)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..api import Spec
from .cache import Cache
from .layer import Layer


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), intermediate width 2/3 * ratio * hidden (fla's GatedMLP)."""

    def __init__(self, hidden_size: int, ratio: float = 4.0, device=None, dtype=None) -> None:
        super().__init__()
        inner = max(1, int(hidden_size * ratio * 2 / 3))
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, inner, bias=False, **factory)
        self.up_proj = nn.Linear(hidden_size, inner, bias=False, **factory)
        self.down_proj = nn.Linear(inner, hidden_size, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """x + mixer(norm(x)), then + mlp(norm(x)). The mixer follows Layer's call: (hidden_states,
    attention_mask=, past_key_values=, use_cache=, cu_seqlens=) -> (output, _, cache)."""

    def __init__(self, hidden_size: int, mixer: nn.Module, mlp_ratio: float = 4.0, norm_eps: float = 1e-5,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.mixer_norm = nn.RMSNorm(hidden_size, eps=norm_eps, **factory)
        self.mixer = mixer
        self.mlp_norm = nn.RMSNorm(hidden_size, eps=norm_eps, **factory)
        self.mlp = GatedMLP(hidden_size, mlp_ratio, **factory)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, Cache | None]:
        o, _, past_key_values = self.mixer(self.mixer_norm(x), attention_mask=attention_mask,
                                           past_key_values=past_key_values, use_cache=use_cache,
                                           cu_seqlens=cu_seqlens)
        x = x + o
        return x + self.mlp(self.mlp_norm(x)), past_key_values


class LM(nn.Module):
    """Embedding, `num_layers` blocks, a final RMSNorm and an output head: next-token logits.

    Each block's mixer is `Layer(spec, hidden_size, num_heads, layer_idx=i, **layer_kwargs)`, or
    `mixer(i)` when given (any module with Layer's call, e.g. a wrapped torch.nn.LSTM).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 128, num_layers: int = 2, spec: Spec = "gla",
                 num_heads: int = 4, mlp_ratio: float = 4.0, norm_eps: float = 1e-5,
                 mixer: Callable[[int], nn.Module] | None = None, device=None, dtype=None, **layer_kwargs) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(vocab_size, hidden_size, **factory)
        make = mixer or (lambda i: Layer(spec, hidden_size, num_heads, layer_idx=i, **factory, **layer_kwargs))
        self.blocks = nn.ModuleList(Block(hidden_size, make(i), mlp_ratio, norm_eps, **factory)
                                    for i in range(num_layers))
        self.norm = nn.RMSNorm(hidden_size, eps=norm_eps, **factory)
        self.head = nn.Linear(hidden_size, vocab_size, bias=False, **factory)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, Cache | None]:
        """input_ids: [B, T] (or [1, total] with cu_seqlens). Returns (logits [B, T, vocab], cache)."""
        if use_cache and past_key_values is None:
            past_key_values = Cache()
        x = self.embed(input_ids)
        for block in self.blocks:
            x, past_key_values = block(x, attention_mask, past_key_values, use_cache, cu_seqlens)
        return self.head(self.norm(x)), past_key_values

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding: the prompt in one call, then one token a call from the cache."""
        logits, cache = self(input_ids, attention_mask, use_cache=True)
        out = [input_ids]
        for _ in range(max_new_tokens):
            token = logits[:, -1:].argmax(-1)
            out.append(token)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(token.shape)], 1)
            logits, cache = self(token, attention_mask, cache, use_cache=True)
        return torch.cat(out, 1)

"""`Layer`: any rnnc cell as a token mixer with flash-linear-attention's layer conventions.

hidden states [B, T, hidden_size] -> a projection per input the cell declares (its names and shapes
read from the cell's signature) -> optional short causal convolution -> heads -> per-input activation
(by the input's role, table below) -> L2 norm of queries and keys for delta-rule cells -> query
scale -> the cell (any backend; `cu_seqlens` as the cells take it) -> RMSNorm per head -> output gate
(swish) -> output projection. The library's attention cells apply fla's K^-1/2 query scale themselves
(README), so the layer's own `scale` is 1 unless given. `attention_mask` (0 for padding, e.g. left padding) is unpadded into
`cu_seqlens` as fla does, and a `Cache` carries the cell's states and the convolutions' last inputs
between calls, so decoding a token a call gives the outputs of one call over the whole sequence.

Input roles come from the input's name, the names the library's cells share (README):

| role      | names             | activation                               | short conv | why                              |
|-----------|-------------------|------------------------------------------|------------|----------------------------------|
| query     | q, r              | identity, × scale (default 1)            | yes        | the cells apply fla's K^-1/2     |
| key       | k, kk             | identity                                 | yes        |                                  |
| value     | v, x, u, i        | identity                                 | yes        |                                  |
| log_decay | g, w, gk          | logsigmoid(x) / gate_logit_normalizer    | no         | a decay e^g in (0, 1) (fla's GLA) |
| beta      | beta, a           | sigmoid                                  | no         | delta-rule step in (0, 1) (fla)  |
| step      | dt, delta         | softplus (projection with Mamba's dt bias)| no        | Mamba's step Δ > 0               |
| other     | anything else     | identity                                 | no         |                                  |

The convolution ends in SiLU, as fla's. Queries and keys are L2-normalised over their last axis when
the analysis finds a low-rank transition (the delta rule and its relatives: I - β k kᵀ keeps its
eigenvalues in [-1, 1] only for unit keys), as fla's DeltaNet/Gated DeltaNet/KDA layers do
(`qk_norm="l2"` or `None` forces it). `activations={"g": "sigmoid", "v": torch.tanh}` overrides the
table per input (a name from ACTIVATIONS or any callable).
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..api import Spec, _program, analyze, build
from ..dims import symbol
from ..errors import BuildError, InputError
from .cache import Cache
from .conv import ShortConvolution

#: input name -> role (see the module docstring)
ROLE_OF_NAME = {"q": "query", "r": "query", "k": "key", "kk": "key", "v": "value", "x": "value", "u": "value",
                "i": "value", "g": "log_decay", "w": "log_decay", "gk": "log_decay", "beta": "beta", "a": "beta",
                "dt": "step", "delta": "step"}

#: role -> (default activation, short convolution when use_short_conv)
ROLES = {"query": ("identity", True), "key": ("identity", True), "value": ("identity", True),
         "log_decay": ("logsigmoid", False), "beta": ("sigmoid", False), "step": ("softplus", False),
         "other": ("identity", False)}

#: activations by name; "logsigmoid" is also divided by the layer's gate_logit_normalizer
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x, "silu": F.silu, "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid,
    "softplus": F.softplus, "relu": F.relu, "tanh": torch.tanh, "elu1": lambda x: F.elu(x) + 1}

Activation = Union[str, Callable[[torch.Tensor], torch.Tensor]]


def _dim_sizes(ir, given: dict[str, int], conventions: dict[str, int]) -> dict[str, int]:
    """A size for every dim of the cell: given, else the spec's default, else the layer's convention."""
    unknown = sorted(set(given) - set(ir.dims))
    if unknown:
        raise BuildError(f"cell '{ir.name}' has no dim '{unknown[0]}'", hint=f"its dims are: {', '.join(ir.dims)}")
    sizes: dict[str, int] = {}
    for name, info in ir.dims.items():
        if name in given:
            sizes[name] = given[name]
        elif info.default is None and name in conventions:
            sizes[name] = conventions[name]
        elif info.default is None:
            raise BuildError(f"the layer has no size for dim {name} of cell '{ir.name}'", info.loc,
                             f"pass dims={{'{name}': ...}}")
    for name, info in ir.dims.items():
        if name not in sizes:
            sizes[name] = _size(info.default, sizes)
    return sizes


def _size(expr, sizes: dict[str, int]) -> int:
    return int(expr.subs({symbol(k): v for k, v in sizes.items()}))


class Layer(nn.Module):
    """A cell with fla's layer around it: `Layer("gla", hidden_size=256, num_heads=4)`.

    - spec, cell: as in `rnnc.build` (a library name, a .rnn path, source text or a Program).
    - hidden_size, num_heads, expand_k, expand_v: key width hidden_size * expand_k and value width
      hidden_size * expand_v, split over the heads. The heads are an extra dim of the cell's inputs
      ([B, T, heads, *declared]), or the cell's own dim NH when it declares one (mamba2, retnet).
    - dims: sizes of the cell's dims; unset ones take the spec's default, else the conventions
      K = head_k_dim; V, D, H, I, P = head_v_dim; N = 16; M = 64; NH = num_heads.
    - backend, chunk_size: the cell's lowering, as in `rnnc.build`.
    - output: which output to read when the cell has several.
    - activations, qk_norm, scale (an extra factor on query inputs, default 1: the library's attention
      cells apply fla's head_k_dim^-1/2 themselves), gate_logit_normalizer:
      the input transforms (module docstring). low_rank={"g": 16}: that input's projection goes
      through a rank-16 bottleneck (with a bias), as fla's GLA gate.
    - use_short_conv, conv_size, conv_bias, conv_inputs: a ShortConvolution on each input of a role
      that takes one (or on `conv_inputs`).
    - norm, norm_eps, use_output_gate: RMSNorm of each head's output, times swish(a projection of
      the hidden states) (fla's FusedRMSNormGated).
    - layer_idx: this layer's entry in a Cache.
    """

    def __init__(self, spec: Spec = "gla", hidden_size: int = 256, num_heads: int = 4, *, cell: str | None = None,
                 expand_k: float = 1.0, expand_v: float = 1.0, dims: dict[str, int] | None = None,
                 backend: str = "auto", chunk_size: int | None = None, output: str | None = None,
                 activations: dict[str, Activation] | None = None, qk_norm: str | None = "auto",
                 scale: float | None = None, gate_logit_normalizer: float = 16.0,
                 low_rank: dict[str, int] | None = None, use_short_conv: bool = False, conv_size: int = 4,
                 conv_bias: bool = False, conv_inputs: tuple[str, ...] | None = None, norm: bool = True,
                 norm_eps: float = 1e-5, use_output_gate: bool = True, layer_idx: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__()
        prog = _program(spec)
        ir = prog.cell(cell)
        key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        if key_dim % num_heads or value_dim % num_heads:
            raise BuildError(f"key width {key_dim} and value width {value_dim} must divide into {num_heads} heads",
                             hint="change num_heads, expand_k or expand_v")
        head_k, head_v = key_dim // num_heads, value_dim // num_heads
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.head_k_dim, self.head_v_dim = head_k, head_v
        conventions = {"K": head_k, "V": head_v, "D": head_v, "H": head_v, "I": head_v, "P": head_v, "N": 16,
                       "M": 64, "NH": num_heads}
        self.dims = _dim_sizes(ir, dict(dims or {}), conventions)
        self.extra = () if "NH" in ir.dims else (num_heads,)
        options = {} if chunk_size is None else {"chunk_size": chunk_size}
        self.cell = build(prog, cell=cell, backend=backend, device=device, dtype=dtype, **options, **self.dims)
        self.inputs = {p.name: tuple(_size(d, self.dims) for d in p.shape) for p in ir.inputs}
        self.roles = {name: ROLE_OF_NAME.get(name, "other") for name in self.inputs}

        outputs = [p.name for p in ir.outputs]
        if output is None and len(outputs) > 1:
            raise BuildError(f"cell '{ir.name}' has outputs {', '.join(outputs)}", hint="pick one with output=...")
        if output is not None and output not in outputs:
            raise BuildError(f"cell '{ir.name}' has no output '{output}'", hint=f"its outputs: {', '.join(outputs)}")
        self.output_index = outputs.index(output) if output else 0
        out_shape = self.extra + tuple(_size(d, self.dims) for d in ir.outputs[self.output_index].shape)
        self.output_shape = out_shape

        activations = dict(activations or {})
        for name in (*activations, *(low_rank or {}), *(conv_inputs or ())):
            if name not in self.inputs:
                raise BuildError(f"cell '{ir.name}' has no input '{name}'", hint=f"its inputs: {', '.join(self.inputs)}")
        self.activations: dict[str, Activation] = {}
        for name, role in self.roles.items():
            act = activations.get(name, ROLES[role][0])
            if isinstance(act, str) and act not in ACTIVATIONS:
                raise BuildError(f"unknown activation '{act}' for input '{name}'",
                                 hint=f"one of {', '.join(ACTIVATIONS)}, or a callable")
            self.activations[name] = act
        self.gate_logit_normalizer = gate_logit_normalizer
        if qk_norm == "auto":
            report = analyze(prog, cell)
            delta = any("low_rank" in str(c.get("transition", "")) for c in report.classes.values())
            qk_norm = "l2" if delta else None
        if qk_norm not in ("l2", None):
            raise BuildError(f"qk_norm must be 'auto', 'l2' or None, got {qk_norm!r}")
        self.qk_norm = qk_norm
        self.scale = 1.0 if scale is None else scale

        factory = {"device": device, "dtype": dtype}
        self.proj = nn.ModuleDict()
        for name, shape in self.inputs.items():
            width = math.prod(self.extra + shape)
            rank = (low_rank or {}).get(name)
            if rank:
                self.proj[name] = nn.Sequential(nn.Linear(hidden_size, rank, bias=False, **factory),
                                                nn.Linear(rank, width, bias=True, **factory))
            else:
                self.proj[name] = nn.Linear(hidden_size, width, bias=self.roles[name] == "step", **factory)
                if self.roles[name] == "step":
                    _init_dt_bias(self.proj[name].bias)
        self.conv = nn.ModuleDict()
        if use_short_conv:
            chosen = conv_inputs if conv_inputs is not None else [n for n, r in self.roles.items() if ROLES[r][1]]
            for name in chosen:
                self.conv[name] = ShortConvolution(math.prod(self.extra + self.inputs[name]), conv_size, conv_bias,
                                                   "silu", **factory)
        width = math.prod(out_shape)
        self.o_norm = nn.RMSNorm(out_shape[-1] if out_shape else 1, eps=norm_eps, **factory) if norm else None
        self.gate_proj = nn.Linear(hidden_size, width, bias=False, **factory) if use_output_gate else None
        self.o_proj = nn.Linear(width, hidden_size, bias=False, **factory)

    def extra_repr(self) -> str:
        inputs = ", ".join(f"{n}: {list(s)} ({self.roles[n]})" for n, s in self.inputs.items())
        return f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, backend={self.cell.backend}, " \
               f"inputs: {inputs}, qk_norm={self.qk_norm}, scale={self.scale:.4g}"

    def _input(self, name: str, y: torch.Tensor) -> torch.Tensor:
        """A projected (and convolved) input to what the cell takes: heads, activation, norm, scale."""
        y = y.reshape(*y.shape[:2], *self.extra, *self.inputs[name])
        act = self.activations[name]
        y = ACTIVATIONS[act](y) if isinstance(act, str) else act(y)
        if act == "logsigmoid":
            y = y / self.gate_logit_normalizer
        role = self.roles[name]
        if role in ("query", "key") and self.qk_norm == "l2" and self.inputs[name]:
            y = F.normalize(y, dim=-1, eps=1e-6)
        return y * self.scale if role == "query" else y

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                output_attentions: bool = False) -> tuple[torch.Tensor, None, Cache | None]:
        """hidden_states: [B, T, hidden_size] ([1, total, hidden_size] with cu_seqlens).
        attention_mask: [B, T_seen + T], 1 for tokens and 0 for padding (its last T columns are this
        call's). Returns (output like hidden_states, None, the cache), as fla's layers; the cache is
        updated when given or when use_cache (a new one then). output_attentions is accepted for
        fla's call signature; there are no attention weights to return."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise InputError(f"hidden_states must be [B, T, {self.hidden_size}], got {list(hidden_states.shape)}")
        B, T, _ = hidden_states.shape
        last = past_key_values[self.layer_idx] if past_key_values is not None else None
        x, indices = hidden_states, None
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise InputError("pass attention_mask or cu_seqlens, not both")
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise InputError(f"attention_mask must be [B, T_seen + T] = [{B}, >= {T}] (0 for padding), "
                                 f"got {list(attention_mask.shape)}")
            mask = attention_mask[:, -T:].bool()
            indices = mask.reshape(-1).nonzero().squeeze(-1)
            cu_seqlens = F.pad(mask.sum(-1).cumsum(0), (1, 0))
            x = hidden_states.reshape(B * T, -1)[indices].unsqueeze(0)
        elif cu_seqlens is not None and B != 1:
            raise InputError(f"with cu_seqlens, hidden_states must be a packed batch [1, total, ...], got B = {B}")

        conv_state, inputs = {}, []
        for name in self.inputs:
            y = self.proj[name](x)
            if name in self.conv:
                cache = last["conv_state"].get(name) if last else None
                y, conv_state[name] = self.conv[name](y, cache, cu_seqlens)
            inputs.append(self._input(name, y))
        state = last["recurrent_state"] if last else None
        o, final = self._run_cell(inputs, state, cu_seqlens)

        if self.o_norm is not None:
            o = self.o_norm(o)
        if self.gate_proj is not None:
            o = o * F.silu(self.gate_proj(x).reshape(o.shape))
        o = self.o_proj(o.reshape(*o.shape[:2], self.o_proj.in_features))
        if indices is not None:
            o = o.new_zeros(B * T, o.shape[-1]).index_copy(0, indices, o[0]).reshape(B, T, -1)
        if past_key_values is None and use_cache:
            past_key_values = Cache()
        if past_key_values is not None:
            past_key_values.update(self.layer_idx, final, conv_state, T)
        return o, None, past_key_values

    def _run_cell(self, inputs: list[torch.Tensor], state: dict | None, cu_seqlens: torch.Tensor | None):
        """(the chosen output, final states). Sequences of length 0 (all-padding rows) keep their states."""
        if cu_seqlens is None:
            return self._output(self.cell(*inputs, state=state))
        lengths = torch.as_tensor(cu_seqlens).diff()
        keep = (lengths > 0).nonzero().squeeze(-1)
        if keep.numel() == lengths.numel():
            return self._output(self.cell(*inputs, state=state, cu_seqlens=cu_seqlens))
        # the cells take strictly rising cu_seqlens: run the other sequences, carry these rows' states over
        if state is None:
            state = self.initial_state(lengths.numel(), inputs[0])
        kept = {k: v[keep.to(v.device)] for k, v in state.items()}
        if keep.numel():
            y, fin = self._output(self.cell(*inputs, state=kept, cu_seqlens=F.pad(lengths[keep].cumsum(0), (1, 0))))
        else:
            y, fin = inputs[0].new_zeros(1, 0, *self.output_shape), kept
        return y, {k: v.index_copy(0, keep.to(v.device), fin[k].to(v.dtype)) for k, v in state.items()}

    def _output(self, result: tuple) -> tuple[torch.Tensor, dict]:
        y, final = result
        return (y[self.output_index] if isinstance(y, tuple) else y), final

    def initial_state(self, batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cell's initial states for `batch` sequences (what it starts from without a cache)."""
        empty = [like.new_zeros(batch, 0, *self.extra, *shape) for shape in self.inputs.values()]
        return self.cell(*empty)[1]


def _init_dt_bias(bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
    """Mamba's initialisation: softplus(bias) = dt, log-uniform in [dt_min, dt_max]."""
    with torch.no_grad():
        dt = torch.exp(torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))

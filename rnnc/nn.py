"""`rnnc.nn.LSTM`, `GRU`, `RNN`: drop-ins for torch.nn's, each layer and direction an rnnc cell.

Same constructor, parameter names (`weight_ih_l0`, ..., `_reverse`, `weight_hr_l0`), state_dict,
initialisation and forward contract as torch.nn: time-major input unless `batch_first`, unbatched
input, PackedSequence in and out, states `h0` (and `c0`) shaped [num_layers * num_directions, B, H],
dropout between layers while training, `bidirectional`, `proj_size` (LSTM), `nonlinearity` (RNN).

The cells are the library's lstm/gru/elman specs; an option those do not express (bias=False,
proj_size, relu) builds a variant written below in the same language. The parameters live on this
module under torch's names and are passed to the cells at each call (torch.func.functional_call),
so one cell per layer input width serves every layer and direction, and a torch.nn module's
state_dict loads as is. A PackedSequence runs in stretches of steps with the same sequences, each
stretch continuing from the states the last one ended with (the reverse direction reverses every
sequence in place first), so it costs max(lengths) steps as a padded batch would.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence

from .api import build
from .errors import InputError

__all__ = ["LSTM", "GRU", "RNN"]

#: mode -> (gates stacked in weight_ih's rows, the library spec, its states)
_MODES = {"LSTM": (4, "lstm", ("h", "c")), "GRU": (3, "gru", ("h",)),
          "RNN_TANH": (1, "elman", ("h",)), "RNN_RELU": (1, "elman", ("h",))}

_INIT = "~ uniform(-1/sqrt(H), 1/sqrt(H))"


def spec_for(mode: str, bias: bool, proj_size: int) -> str:
    """The spec of one layer and direction: the library cell's name where it expresses the options,
    else the variant's source text (the same cell with no biases, a projection or relu)."""
    gates, library, _ = _MODES[mode]
    if bias and not proj_size and mode != "RNN_RELU":
        return library
    out = "P" if proj_size else "H"
    rows = f"{gates}*H" if gates > 1 else "H"
    lines = [f"cell {library}(x: [I]) -> (h: [{out}]) {{",
             f"    param weight_ih: [{rows}, I] {_INIT}",
             f"    param weight_hh: [{rows}, {out}] {_INIT}"]
    if bias:
        lines += [f"    param bias_ih: [{rows}] {_INIT}", f"    param bias_hh: [{rows}] {_INIT}"]
    if proj_size:
        lines.append(f"    param weight_hr: [P, H] {_INIT}")
    b_ih, b_hh = (" + bias_ih", " + bias_hh") if bias else ("", "")
    lines.append(f"    state h: [{out}] = 0")
    if mode == "LSTM":
        project = "weight_hr @ " if proj_size else ""
        lines += ["    state c: [H] = 0",
                  f"    let i, f, g, o = split(weight_ih @ x{b_ih} + weight_hh @ h{b_hh}, 4)",
                  "    c = sigmoid(f) * c + sigmoid(i) * tanh(g)",
                  f"    h = {project}(sigmoid(o) * tanh(c))"]
    elif mode == "GRU":
        lines += [f"    let x_r, x_z, x_n = split(weight_ih @ x{b_ih}, 3)",
                  f"    let h_r, h_z, h_n = split(weight_hh @ h{b_hh}, 3)",
                  "    let r = sigmoid(x_r + h_r)", "    let z = sigmoid(x_z + h_z)",
                  "    let n = tanh(x_n + r * h_n)", "    h = (1 - z) * n + z * h"]
    else:
        act = "relu" if mode == "RNN_RELU" else "tanh"
        lines.append(f"    h = {act}(weight_ih @ x{b_ih} + weight_hh @ h{b_hh})")
    return "\n".join(lines + ["}", ""])


class _RNNBase(nn.Module):
    """What LSTM, GRU and RNN share (torch.nn.RNNBase's contract)."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout should be a number in range [0, 1] representing the probability of an "
                             f"element being zeroed, got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers=1")
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
            raise ValueError(f"proj_size should be a non-negative integer, got {proj_size!r}")
        if proj_size and mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.backend = bidirectional, proj_size, backend
        gates, _, self._states = _MODES[mode]
        out = proj_size or hidden_size
        directions = 2 if bidirectional else 1
        names = ["weight_ih", "weight_hh", *(["bias_ih", "bias_hh"] if bias else []),
                 *(["weight_hr"] if proj_size else [])]
        self._cell_params = tuple(names)
        self._flat_weights_names = []
        factory = {"device": device, "dtype": dtype}
        for layer in range(num_layers):
            width = input_size if layer == 0 else out * directions
            for direction in range(directions):
                shapes = {"weight_ih": (gates * hidden_size, width), "weight_hh": (gates * hidden_size, out),
                          "bias_ih": (gates * hidden_size,), "bias_hh": (gates * hidden_size,),
                          "weight_hr": (proj_size, hidden_size)}
                for name in names:
                    full = self._param_name(name, layer, direction)
                    setattr(self, full, nn.Parameter(torch.empty(shapes[name], **factory)))
                    self._flat_weights_names.append(full)
        spec = spec_for(mode, bias, proj_size)
        dims = {"H": hidden_size, **({"P": proj_size} if proj_size else {})}
        # one parameterless cell per layer input width (layer 0, and the rest); plain attributes, not
        # submodules, so that the parameters above are the module's only ones
        self._cells = {}
        for width in {input_size, out * directions} if num_layers > 1 else {input_size}:
            cell = build(spec, backend=backend, device=device, I=width, **dims)
            for name in list(cell._parameters):
                del cell._parameters[name]
            self._cells[width] = cell
        self.reset_parameters()

    @staticmethod
    def _param_name(name: str, layer: int, direction: int) -> str:
        return f"{name}_l{layer}{'_reverse' if direction else ''}"

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every parameter ~ U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)

    def flatten_parameters(self) -> None:
        """Nothing to do: there is no cuDNN weight buffer to compact (kept for torch.nn's callers)."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """The parameters per layer and direction, in torch.nn's order."""
        n = len(self._cell_params)
        flat = [getattr(self, name) for name in self._flat_weights_names]
        return [flat[i:i + n] for i in range(0, len(flat), n)]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.mode == "RNN_RELU":
            s += ", nonlinearity='relu'"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s

    def forward(self, input, hx=None):
        """input: [T, B, input_size] ([B, T, ...] with batch_first), [T, input_size], or a PackedSequence;
        hx: h0 (GRU, RNN) or (h0, c0) (LSTM), [num_layers * num_directions, B, H] ([.., H] unbatched),
        zeros when None. Returns (output, h_n) or (output, (h_n, c_n)), as torch.nn."""
        packed = isinstance(input, PackedSequence)
        if packed:  # x stays in the PackedSequence's row order: [total, I]
            x, sizes, batched, batch = input.data, input.batch_sizes.tolist(), True, int(input.batch_sizes[0])
            reverse = _reversed_rows(input.batch_sizes).to(x.device) if self.bidirectional else None
        else:
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                raise InputError(f"{type(self).__name__}: expected input to be a 2D (unbatched) or 3D tensor, got "
                                 f"{f'{input.dim()}D' if isinstance(input, torch.Tensor) else type(input).__name__}")
            batched = input.dim() == 3
            x = input if not batched else input if self.batch_first else input.transpose(0, 1)
            x = x if batched else x.unsqueeze(0)  # [B, T, I] from here on
            batch = x.shape[0]
        if x.shape[-1] != self.input_size:
            raise InputError(f"{type(self).__name__}: input.size(-1) must be equal to input_size. "
                             f"Expected {self.input_size}, got {x.shape[-1]}")
        if x.dtype != self.weight_ih_l0.dtype:
            raise InputError(f"{type(self).__name__}: input is {x.dtype} but the parameters are "
                             f"{self.weight_ih_l0.dtype}; convert one to the other (e.g. .to(torch.float32))")
        states = self._initial_states(hx, batched, batch, x)
        if packed and states is not None and input.sorted_indices is not None:
            states = [s.index_select(1, input.sorted_indices) for s in states]
        directions = 2 if self.bidirectional else 1
        finals = []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(directions):
                k = layer * directions + direction
                params = {n: getattr(self, self._param_name(n, layer, direction)) for n in self._cell_params}
                state = None if states is None else {name: s[k] for name, s in zip(self._states, states)}
                cell = self._cells[x.shape[-1]]

                def run(xin, st, cell=cell, params=params):
                    return functional_call(cell, params, (xin,), {"state": st})

                xin = x if not direction else x[reverse] if packed else x.flip(1)
                y, final = _run_packed(run, xin, sizes, state) if packed else run(xin, state)
                outs.append(y if not direction else y[reverse] if packed else y.flip(1))
                finals.append(final)
            x = torch.cat(outs, -1) if directions == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        final = tuple(torch.stack([f[name] for f in finals]) for name in self._states)
        if packed:
            if input.unsorted_indices is not None:
                final = tuple(s.index_select(1, input.unsorted_indices) for s in final)
            output = PackedSequence(x, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        elif batched:
            output = x if self.batch_first else x.transpose(0, 1)
        else:
            output, final = x[0], tuple(s.squeeze(1) for s in final)
        return output, (final if self.mode == "LSTM" else final[0])

    def _initial_states(self, hx, batched: bool, batch: int, x: torch.Tensor):
        """hx as one [L*D, B, width] tensor per state (LSTM: h, c), checked against torch's shapes."""
        if hx is None:
            return None
        lstm = self.mode == "LSTM"
        if lstm != isinstance(hx, tuple) or (lstm and len(hx) != 2):
            raise InputError(f"{type(self).__name__}: hx must be " +
                             ("a tuple (h0, c0)" if lstm else "one tensor h0"))
        hx = hx if lstm else (hx,)
        layers = self.num_layers * (2 if self.bidirectional else 1)
        widths = (self.proj_size or self.hidden_size, self.hidden_size)
        out = []
        for name, h, width in zip(self._states, hx, widths):
            expected = (layers, batch, width) if batched else (layers, width)
            if not isinstance(h, torch.Tensor) or tuple(h.shape) != expected:
                got = list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise InputError(f"{type(self).__name__}: expected hidden state {name}0 of size {list(expected)}, "
                                 f"got {got}")
            if h.dtype != x.dtype:
                raise InputError(f"{type(self).__name__}: hidden state {name}0 is {h.dtype}, input is {x.dtype}")
            out.append(h if batched else h.unsqueeze(1))
        return out


def _run_packed(run, data: torch.Tensor, sizes: list[int], state: dict | None):
    """Run a cell over PackedSequence rows (time-major, sequences sorted longest first, `sizes[t]`
    of them at step t): one call per stretch of steps with the same sequences, each continuing from
    the states the previous stretch ended with, so the steps run number max(lengths), not their sum.
    Returns (outputs in the same row order, final states [B, ...] in sorted order)."""
    outs, ended = [], []
    t = row = 0
    while t < len(sizes):
        n, start = sizes[t], t
        while t < len(sizes) and sizes[t] == n:
            t += 1
        steps = t - start
        x = data[row:row + steps * n].reshape(steps, n, -1).transpose(0, 1)
        y, state = run(x, None if state is None else {k: v[:n] for k, v in state.items()})
        outs.append(y.transpose(0, 1).reshape(steps * n, -1))
        later = sizes[t] if t < len(sizes) else 0
        ended.append({k: v[later:] for k, v in state.items()})  # the sequences that end here
        row += steps * n
    ended.reverse()
    return torch.cat(outs), {k: torch.cat([e[k] for e in ended]) for k in ended[0]}


def _reversed_rows(batch_sizes: torch.Tensor) -> torch.Tensor:
    """The permutation of PackedSequence rows that reverses every sequence in place: the row of
    sequence j at step s swaps with its row at step len_j - 1 - s (its own inverse)."""
    steps = batch_sizes.numel()
    rows = torch.arange(int(batch_sizes[0]))[:, None]
    t = torch.arange(steps)[None, :]
    lengths = (batch_sizes[None, :] > rows).sum(1)[:, None]
    present = t < lengths  # [B, T]: sequence j (sorted) has step t
    start = torch.cumsum(batch_sizes, 0) - batch_sizes  # where step t's rows begin
    perm = torch.empty(int(batch_sizes.sum()), dtype=torch.long)
    perm[(start[None, :] + rows)[present]] = (start[(lengths - 1 - t).clamp(min=0)] + rows)[present]
    return perm


class LSTM(_RNNBase):
    """torch.nn.LSTM on rnnc's lstm cell (see the module docstring); `backend` picks the cell's lowering."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype, backend)


class GRU(_RNNBase):
    """torch.nn.GRU on rnnc's gru cell (see the module docstring)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, device, dtype, backend)


class RNN(_RNNBase):
    """torch.nn.RNN (Elman, tanh or relu) on rnnc's elman cell (see the module docstring)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, backend: str = "auto") -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(f"RNN_{nonlinearity.upper()}", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype, backend)
        self.nonlinearity = nonlinearity

"""What a stack of layers carries between calls when decoding (fla's `past_key_values`)."""
from __future__ import annotations

import torch


class Cache:
    """Per layer (indexed by `layer_idx`): the cell's states after the last call
    (`"recurrent_state"`: {state name: [N, *extra, *declared]}), the short convolutions' last inputs
    (`"conv_state"`: {input name: [N, conv_size - 1, channels]}) and the tokens seen so far (`"offset"`).

    N is the batch, or the number of sequences with `cu_seqlens` / an `attention_mask`. A layer called
    with the cache continues each sequence where the previous call left it, so running a prompt and
    then one token a call gives the outputs of one call over the whole sequence.
    """

    def __init__(self) -> None:
        self._layers: list[dict | None] = []

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, layer_idx: int) -> dict | None:
        return self._layers[layer_idx] if layer_idx < len(self._layers) else None

    def update(self, layer_idx: int, recurrent_state: dict[str, torch.Tensor],
               conv_state: dict[str, torch.Tensor], offset: int) -> None:
        """Replace layer `layer_idx`'s states with those after a call over `offset` more tokens."""
        while len(self._layers) <= layer_idx:
            self._layers.append(None)
        seen = self._layers[layer_idx]["offset"] if self._layers[layer_idx] else 0
        self._layers[layer_idx] = {"recurrent_state": recurrent_state, "conv_state": conv_state,
                                   "offset": seen + offset}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by layer `layer_idx` (0 before the first call)."""
        entry = self[layer_idx]
        return entry["offset"] if entry else 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep (and reorder) the sequences at `index` in every layer (beam search, dropping finished rows)."""
        for entry in self._layers:
            if entry:
                for part in ("recurrent_state", "conv_state"):
                    entry[part] = {k: v.index_select(0, index.to(v.device)) for k, v in entry[part].items()}

"""`rnnc.layers`: rnnc cells as flash-linear-attention-style layers, and a small model stack.

    layer = rnnc.layers.Layer("gated_deltanet", hidden_size=256, num_heads=4, use_short_conv=True)
    o, _, cache = layer(x, use_cache=True)          # x: [B, T, 256]
    o1, _, cache = layer(x_next, past_key_values=cache)   # one more token

`Layer` (layer.py) wraps a cell; `ShortConvolution` (conv.py) is the causal depthwise convolution;
`Cache` (cache.py) carries states between calls; `LM`, `Block`, `GatedMLP` (model.py) stack layers.
"""
from .cache import Cache
from .conv import ShortConvolution
from .layer import ACTIVATIONS, ROLE_OF_NAME, ROLES, Layer
from .model import LM, Block, GatedMLP

__all__ = ["Layer", "ShortConvolution", "Cache", "LM", "Block", "GatedMLP", "ACTIVATIONS", "ROLES", "ROLE_OF_NAME"]

"""rnnc.layers: cells wrapped as fla-style layers (shapes, backends, padding, varlen, decoding, fla parity).

fla's own GatedLinearAttention / DeltaNet layers are not what the parity tests run: they live in the
`flash-linear-attention` distribution (fla-core, the oracle the test extra installs, ships fla.ops and
fla.modules only; the layers also import transformers), and every op they call (chunk_gla,
fused_recurrent_gla, ShortConvolution, FusedRMSNormGated) is a Triton kernel that needs a GPU driver
(on CPU they fail with "0 active drivers", even under TRITON_INTERPRET). So `FlaGLA` and `FlaDeltaNet`
below transcribe those layers' forward passes into plain PyTorch, with fla's parameter names and
shapes, their conventions (expand_k, gate_logit_normalizer, low-rank gate projection, SiLU short
convolutions, L2-normalised q/k, K^-1/2 query scale (in the cells), RMSNorm with swish gate, state_v_first cache) and
the recurrence from fla-core's own pure-torch naive references; rnnc's layer loads their state_dict
through a key map and must give the same outputs, states and gradients.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rnnc
from rnnc.layers import LM, Cache, Layer, ShortConvolution
from helpers import fla_naive

H, HEADS = 16, 2
LIBRARY = {"gla": {}, "deltanet": {"use_short_conv": True}, "gated_deltanet": {"use_short_conv": True},
           "mamba2": {"dims": {"N": 4}}, "hgrn": {}, "lstm": {}}


def _layer(spec, backend="auto", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return Layer(spec, H, HEADS, backend=backend, dtype=dtype, **{**LIBRARY.get(spec, {}), **kw})


def _x(B, T, seed=1, dtype=torch.float64):
    return torch.randn(B, T, H, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _grads(layer, x, out):
    w = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    params = [p for _, p in sorted(layer.named_parameters())]
    return torch.autograd.grad((out * w).sum(), [x] + params)


@pytest.mark.parametrize("spec", sorted(LIBRARY))
def test_projections_follow_the_declared_inputs(spec):
    layer = _layer(spec)
    cell = rnnc.load(spec).cell()
    assert list(layer.proj) == [p.name for p in cell.inputs]
    heads = () if "NH" in cell.dims else (HEADS,)
    for p in cell.inputs:
        shape = tuple(int(d.subs({s: layer.dims[s.name] for s in d.free_symbols})) for d in p.shape)
        assert layer.inputs[p.name] == shape
        assert layer.proj[p.name].out_features == math.prod(heads + shape)
    x = _x(3, 11).requires_grad_()
    o, none, cache = layer(x, use_cache=True)
    assert none is None and o.shape == x.shape and torch.isfinite(o).all()
    for s in cell.states:
        shape = tuple(int(d.subs({k: layer.dims[k.name] for k in d.free_symbols})) for d in s.shape)
        assert cache[0]["recurrent_state"][s.name].shape == (3, *heads, *shape)
    assert cache.get_seq_length() == 11
    grads = _grads(layer, x, o)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0].abs().sum() > 0
    # every input's projection reaches the output
    named = dict(sorted(layer.named_parameters()))
    for name in layer.proj:
        weight = next(k for k in named if k.startswith(f"proj.{name}."))
        assert grads[1 + sorted(named).index(weight)].abs().sum() > 0, name


def test_roles_pick_activations_and_qk_norm():
    gdn = _layer("gated_deltanet")
    assert gdn.roles == {"q": "query", "k": "key", "v": "value", "g": "log_decay", "beta": "beta"}
    assert gdn.qk_norm == "l2" and gdn.scale == 1.0  # the cell applies fla's K^-1/2 itself
    assert _layer("gla").qk_norm is None  # an additive state: no key normalisation
    y = torch.randn(2, 3, HEADS * 8, dtype=torch.float64)
    torch.testing.assert_close(gdn._input("g", y[..., :HEADS]), F.logsigmoid(y[..., :HEADS, None])[..., 0] / 16)
    torch.testing.assert_close(gdn._input("beta", y[..., :HEADS]), torch.sigmoid(y[..., :HEADS]))
    q = gdn._input("q", y)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(q.shape[:-1], dtype=q.dtype))
    mamba = _layer("mamba2")
    assert mamba.roles["dt"] == "step" and mamba.extra == () and mamba.dims["NH"] == HEADS
    assert (F.softplus(mamba.proj["dt"].bias) > 0.9e-3).all()  # Mamba's dt initialisation
    rwkv7 = _layer("rwkv7")  # the DPLR transition: kk unit-norm, a in (0, 1), as fla's RWKV7 layer
    assert rwkv7.qk_norm == "l2" and rwkv7.roles["kk"] == "key" and rwkv7.roles["a"] == "beta"
    assert torch.isfinite(rwkv7(_x(2, 40) * 10)[0]).all()
    override = _layer("gated_deltanet", activations={"beta": "identity", "g": lambda t: -t.abs()})
    torch.testing.assert_close(override._input("beta", y[..., :HEADS]), y[..., :HEADS])
    torch.testing.assert_close(override._input("g", y[..., :HEADS]), -y[..., :HEADS].abs())


def test_bad_options_are_build_errors():
    with pytest.raises(rnnc.BuildError, match="no input 'z'"):
        Layer("gla", H, HEADS, activations={"z": "silu"})
    with pytest.raises(rnnc.BuildError, match="unknown activation"):
        Layer("gla", H, HEADS, activations={"g": "gelu5"})
    with pytest.raises(rnnc.BuildError, match="no dim 'Q'"):
        Layer("gla", H, HEADS, dims={"Q": 3})
    with pytest.raises(rnnc.BuildError, match="heads"):
        Layer("gla", H, 3)
    with pytest.raises(rnnc.BuildError, match="no size for dim Z"):
        Layer("cell c(x: [Z]) -> (y: [Z]) {\n state h: [Z] = 0\n h = h + x\n y = h\n}", H, HEADS)
    layer = Layer("gla", H, HEADS)
    with pytest.raises(rnnc.InputError, match="hidden_states"):
        layer(torch.randn(2, 5, H + 1))
    with pytest.raises(rnnc.InputError, match="not both"):
        layer(torch.randn(1, 5, H), attention_mask=torch.ones(1, 5), cu_seqlens=torch.tensor([0, 5]))


@pytest.mark.parametrize("spec,backend", [("gla", "chunk"), ("deltanet", "chunk"), ("gated_deltanet", "chunk"),
                                          ("hgrn", "scan"), ("mamba2", "scan"), ("gla", "auto")])
def test_backends_agree_with_the_loop(spec, backend):
    loop, other = _layer(spec, "loop"), _layer(spec, backend)
    other.load_state_dict(loop.state_dict())
    assert other.cell.backend == (backend if backend != "auto" else "chunk")
    x = _x(2, 70).requires_grad_()
    ol, oo = loop(x)[0], other(x)[0]
    torch.testing.assert_close(oo, ol)
    for a, b in zip(_grads(other, x, oo), _grads(loop, x, ol)):
        torch.testing.assert_close(a, b)


LENGTHS = [7, 3, 1, 5]


@pytest.mark.parametrize("spec", ["gla", "gated_deltanet", "mamba2"])
def test_attention_mask_and_cu_seqlens_equal_separate_sequences(spec):
    layer = _layer(spec, use_short_conv=True)
    T = max(LENGTHS)
    seqs = [_x(1, n, seed=10 + i).requires_grad_() for i, n in enumerate(LENGTHS)]
    ref = [layer(s, use_cache=True) for s in seqs]
    # left padding, as a tokenizer pads for generation
    padded = torch.cat([F.pad(s, (0, 0, T - s.shape[1], 0)) for s in seqs])
    mask = torch.stack([torch.arange(T) >= T - n for n in LENGTHS]).long()
    o, _, cache = layer(padded, attention_mask=mask, use_cache=True)
    for i, (s, (oi, _, ci)) in enumerate(zip(seqs, ref)):
        torch.testing.assert_close(o[i, T - s.shape[1]:], oi[0])
        assert (o[i, :T - s.shape[1]] == 0).all()
        for part in ("recurrent_state", "conv_state"):
            for k, v in cache[0][part].items():
                torch.testing.assert_close(v[i], ci[0][part][k][0])
    # packed, sequences back to back
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist())
    packed, _, pcache = layer(torch.cat(seqs, 1), cu_seqlens=cu, use_cache=True)
    torch.testing.assert_close(packed[0], torch.cat([r[0][0] for r in ref]))
    for k, v in pcache[0]["recurrent_state"].items():
        torch.testing.assert_close(v, torch.cat([r[2][0]["recurrent_state"][k] for r in ref]))
    ref_out = torch.cat([r[0][0] for r in ref])
    w = torch.cos(torch.arange(ref_out.numel(), dtype=ref_out.dtype)).view_as(ref_out)
    g_ref = torch.autograd.grad((ref_out * w).sum(), seqs)
    g_packed = torch.autograd.grad((packed[0] * w).sum(), seqs)
    for a, b in zip(g_packed, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("spec", sorted(LIBRARY))
def test_decoding_with_the_cache_equals_the_full_forward(spec):
    layer = _layer(spec, use_short_conv=True)
    x = _x(2, 9)
    full, _, fcache = layer(x, use_cache=True)
    with torch.no_grad():
        o, _, cache = layer(x[:, :4], use_cache=True)  # a prompt, then one token a call
        outs = [o]
        for t in range(4, 9):
            o, _, cache = layer(x[:, t:t + 1], past_key_values=cache)
            outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full)
    assert isinstance(cache, Cache) and cache.get_seq_length() == 9
    for part in ("recurrent_state", "conv_state"):
        for k, v in fcache[0][part].items():
            torch.testing.assert_close(cache[0][part][k], v)


def test_decoding_left_padded_prompts_and_an_empty_row():
    """Generation from prompts of different lengths (left padding): each row decodes as it would
    alone; a row with no token in a call keeps its states."""
    layer = _layer("gated_deltanet", use_short_conv=True)
    T, steps = 6, 3
    lengths = [6, 2, 0]
    prompts = [_x(1, n, seed=20 + i) for i, n in enumerate(lengths)]
    nxt = _x(3, steps, seed=30)
    padded = torch.cat([F.pad(p, (0, 0, T - p.shape[1], 0)) for p in prompts])
    mask = torch.stack([torch.arange(T) >= T - n for n in lengths]).long()
    with torch.no_grad():
        _, _, cache = layer(padded, attention_mask=mask, use_cache=True)
        outs = []
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
            o, _, cache = layer(nxt[:, t:t + 1], attention_mask=mask, past_key_values=cache)
            outs.append(o)
        for i, p in enumerate(prompts):
            alone = layer(torch.cat([p, nxt[i:i + 1]], 1))[0]
            torch.testing.assert_close(torch.cat(outs, 1)[i], alone[0, -steps:])
    empty = layer.initial_state(1, x := _x(1, 1))
    _, _, c = layer(x, attention_mask=torch.zeros(1, 1), use_cache=True)
    assert all(torch.equal(c[0]["recurrent_state"][k], v) for k, v in empty.items())


def test_lm_decoding_equals_the_full_forward():
    torch.manual_seed(0)
    model = LM(11, hidden_size=H, num_layers=2, spec="gated_deltanet", num_heads=HEADS, dtype=torch.float64,
               use_short_conv=True)
    ids = torch.randint(0, 11, (2, 8))
    full, _ = model(ids)
    with torch.no_grad():
        logits, cache = model(ids[:, :3], use_cache=True)
        outs = [logits]
        for t in range(3, 8):
            logits, cache = model(ids[:, t:t + 1], past_key_values=cache)
            outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full)
    assert len(cache) == 2
    out = model.generate(ids[:, :3], 4)
    assert out.shape == (2, 7) and torch.equal(out[:, :3], ids[:, :3])
    step, _ = model(out[:, :-1])
    assert torch.equal(step[:, 2:].argmax(-1), out[:, 3:])  # greedy: each new token is the argmax


def test_short_convolution_is_a_causal_depthwise_conv1d():
    conv = ShortConvolution(5, 4, bias=True, dtype=torch.float64)
    ref = nn.Conv1d(5, 5, 4, padding=3, groups=5, bias=True, dtype=torch.float64)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(3, 9, 5, dtype=torch.float64)
    y, cache = conv(x)
    torch.testing.assert_close(y, F.silu(ref(x.transpose(1, 2))[..., :9].transpose(1, 2)))
    torch.testing.assert_close(cache, x[:, -3:])
    y2, _ = conv(x[:, 5:], cache=conv(x[:, :5])[1])
    torch.testing.assert_close(y2, y[:, 5:])
    # packed sequences of lengths 2, 0, 5, each after its own cache, as the batched path runs them
    cache = torch.randn(3, 3, 5, dtype=torch.float64)
    seqs = [x[0, :2], x[1, :0], x[2, :5]]
    yp, cp = conv(torch.cat(seqs)[None], cache=cache, cu_seqlens=torch.tensor([0, 2, 2, 7]))
    alone = [conv(s[None], cache=cache[i:i + 1]) for i, s in enumerate(seqs)]
    torch.testing.assert_close(yp[0], torch.cat([a[0][0] for a in alone]))
    torch.testing.assert_close(cp, torch.cat([a[1] for a in alone]))


# --- fla's layers, transcribed (see the module docstring) ------------------------------------------

class FlaGLA(nn.Module):
    """fla.layers.GatedLinearAttention's forward (mode chunk/fused_recurrent alike), plain PyTorch."""

    def __init__(self, hidden_size, num_heads, expand_k=0.5, expand_v=1.0, use_short_conv=False, conv_size=4,
                 gate_low_rank_dim=16, gate_logit_normalizer=16, norm_eps=1e-5):
        super().__init__()
        self.num_heads, self.normalizer, self.eps = num_heads, gate_logit_normalizer, norm_eps
        self.key_dim, self.value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.use_short_conv = use_short_conv
        if use_short_conv:  # fla's ShortConvolution is an nn.Conv1d (depthwise, padding W-1) + SiLU
            for name, width in (("q", self.key_dim), ("k", self.key_dim), ("v", self.value_dim)):
                setattr(self, f"{name}_conv1d", nn.Conv1d(width, width, conv_size, groups=width, padding=conv_size - 1,
                                                          bias=False))
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, self.key_dim, bias=True))
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.g_norm_swish_gate = nn.Module()  # FusedRMSNormGated: rmsnorm(o) * weight * silu(g)
        self.g_norm_swish_gate.weight = nn.Parameter(1 + 0.1 * torch.randn(self.head_v_dim))

    def _conv(self, name, x):
        if not self.use_short_conv:
            return x
        conv = getattr(self, f"{name}_conv1d")
        return F.silu(conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2))

    def forward(self, x):
        naive = fla_naive("ops/gla/naive.py")
        q, k, v = (self._conv(n, getattr(self, f"{n}_proj")(x)) for n in "qkv")
        gk = self.gk_proj(x)
        q, k, gk = (t.unflatten(-1, (self.num_heads, self.head_k_dim)) for t in (q, k, gk))
        v = v.unflatten(-1, (self.num_heads, self.head_v_dim))
        gk = F.logsigmoid(gk) / self.normalizer
        o, state = naive.naive_recurrent_gla(q, k, v, gk, output_final_state=True)
        g = self.g_proj(x).unflatten(-1, (self.num_heads, self.head_v_dim))
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.g_norm_swish_gate.weight * F.silu(g)
        return self.o_proj(o.flatten(-2)), state.transpose(-1, -2)  # the layer caches state_v_first


GLA_KEYS = {"q_proj": "proj.q", "k_proj": "proj.k", "v_proj": "proj.v", "gk_proj": "proj.g", "g_proj": "gate_proj",
            "g_norm_swish_gate": "o_norm", "o_proj": "o_proj", "q_conv1d": "conv.q", "k_conv1d": "conv.k",
            "v_conv1d": "conv.v"}


def _rename(key, keys):
    head, rest = key.split(".", 1)
    return f"{keys[head]}.{rest}"


def _load_fla(layer, ref, keys):
    layer.load_state_dict({_rename(k, keys): v for k, v in ref.state_dict().items()})


def _same_grads(layer, o, ref, o_ref, x, keys):
    """Gradients of the same loss w.r.t. the input and every parameter, matched by fla's names."""
    names = [k for k, _ in ref.named_parameters()]
    g_ref = torch.autograd.grad(o_ref.square().sum(), [x, *ref.parameters()])
    mine = dict(layer.named_parameters())
    g = torch.autograd.grad(o.square().sum(), [x, *(mine[_rename(k, keys)] for k in names)])
    for name, a, b in zip(["x", *names], g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("use_short_conv", [False, True])
def test_gla_layer_matches_fla_gated_linear_attention(use_short_conv):
    torch.manual_seed(0)
    hidden, heads = 32, 2
    ref = FlaGLA(hidden, heads, use_short_conv=use_short_conv)
    layer = Layer("gla", hidden, heads, expand_k=0.5, low_rank={"g": 16}, use_short_conv=use_short_conv)
    _load_fla(layer, ref, GLA_KEYS)
    x = torch.randn(2, 13, hidden, requires_grad=True)
    (o_ref, s_ref), (o, _, cache) = ref(x), layer(x, use_cache=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    # fla caches [N, H, V, K] (state_v_first); rnnc keeps the spec's [K, V]
    torch.testing.assert_close(cache[0]["recurrent_state"]["S"].transpose(-1, -2), s_ref, rtol=1e-5, atol=1e-5)
    _same_grads(layer, o, ref, o_ref, x, GLA_KEYS)


class FlaDeltaNet(nn.Module):
    """fla.layers.DeltaNet's forward with its defaults (short conv + SiLU on q, k, v; L2 q/k norm in
    the kernel; beta = sigmoid(b_proj); RMSNorm of the output, no gate), plain PyTorch."""

    def __init__(self, hidden_size, num_heads, conv_size=4, norm_eps=1e-5):
        super().__init__()
        self.num_heads, self.eps, self.head_dim = num_heads, norm_eps, hidden_size // num_heads
        for name in "qkv":
            setattr(self, f"{name}_proj", nn.Linear(hidden_size, hidden_size, bias=False))
            setattr(self, f"{name}_conv1d", nn.Conv1d(hidden_size, hidden_size, conv_size, groups=hidden_size,
                                                      padding=conv_size - 1, bias=False))
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.o_norm = nn.Module()
        self.o_norm.weight = nn.Parameter(1 + 0.1 * torch.randn(self.head_dim))
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x):
        naive = fla_naive("ops/delta_rule/naive.py")
        T = x.shape[1]
        q, k, v = (F.silu(getattr(self, f"{n}_conv1d")(getattr(self, f"{n}_proj")(x).transpose(1, 2))[..., :T])
                   .unflatten(1, (self.num_heads, self.head_dim)) for n in "qkv")  # [B, H, D, T]
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))  # the naive recurrence is head-first [B, H, T, D]
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        beta = self.b_proj(x).sigmoid().transpose(1, 2)
        o, state = naive.delta_rule_recurrence(q, k, v, beta)
        o = o.transpose(1, 2)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.o_norm.weight
        return self.o_proj(o.flatten(-2)), state


def test_deltanet_layer_matches_fla_deltanet():
    torch.manual_seed(0)
    hidden, heads = 32, 2
    ref = FlaDeltaNet(hidden, heads)
    layer = Layer("deltanet", hidden, heads, use_short_conv=True, use_output_gate=False)
    keys = {"q_proj": "proj.q", "k_proj": "proj.k", "v_proj": "proj.v", "b_proj": "proj.beta", "o_norm": "o_norm",
            "o_proj": "o_proj", "q_conv1d": "conv.q", "k_conv1d": "conv.k", "v_conv1d": "conv.v"}
    _load_fla(layer, ref, keys)
    x = torch.randn(2, 13, hidden, requires_grad=True)
    (o_ref, s_ref), (o, _, cache) = ref(x), layer(x, use_cache=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[0]["recurrent_state"]["S"], s_ref, rtol=1e-5, atol=1e-5)
    _same_grads(layer, o, ref, o_ref, x, keys)


def test_lm_recall_example_trains(tmp_path):
    """examples/lm_recall.py for a few steps: both models' losses fall, nothing is NaN, the curves are written."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "lm_recall.py"
    spec = importlib.util.spec_from_file_location("lm_recall", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    ids, targets = example.make_batch(4, 3, 2, 8, 8, torch.Generator().manual_seed(0))
    assert ids.shape == targets.shape == (4, 10)
    asked = targets != example.IGNORE
    assert (ids[asked] < 8).all() and (targets[asked] >= 8).all()  # a key asks, its value answers
    for row, ask in zip(range(4), range(3, 5)):  # the answer is the value the key had in the pairs
        key = ids[row, 2 * ask]
        pair = (ids[row, :6:2] == key).nonzero().item()
        assert targets[row, 2 * ask] == ids[row, 2 * pair + 1]
    args = example.parse_args(["--steps", "12", "--batch", "16", "--warmup", "1", "--lr", "1e-2", "--hidden", "32",
                               "--layers", "1", "--out", str(tmp_path)])
    results = {kind: example.train(kind, args, log=None) for kind in ("rnnc", "lstm")}
    for kind, r in results.items():
        losses = r["losses"]
        assert all(math.isfinite(v) for v in losses), kind
        assert sum(losses[-3:]) < sum(losses[:3]), (kind, losses)
    example.write_curves(results, tmp_path, log=lambda *_: None)
    rows = (tmp_path / "lm_recall.csv").read_text().splitlines()
    assert rows[0] == "step,rnnc_loss,rnnc_acc,lstm_loss,lstm_acc" and len(rows) == 13


def test_layer_pickles_with_its_cell():
    """torch.save(layer) carries the cell as its spec (rnnc/saving.py): the loaded layer computes the same."""
    import io

    layer = _layer("gated_deltanet")
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = _x(2, 6)
    torch.testing.assert_close(loaded(x)[0], layer(x)[0])
    assert loaded.roles == layer.roles and loaded.cell.backend == layer.cell.backend

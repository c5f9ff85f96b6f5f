"""Operator fusion as a transform: ``fuse(model)`` switches a finished model to
fused kernels and concatenated projections (lesson 09). ``model.py`` does
not change; the decoder blocks are swapped for fused ones that hold the same
weights.

What changes in each decoder block (N tokens, hidden size H, MLP width I):

* **QKV projection**: ``q_proj``, ``k_proj``, ``v_proj`` become one
  ``qkv_proj`` (their weights concatenated): one GEMM that reads x once
  instead of three GEMMs that read it three times.
* **gate/up projection**: ``gate_proj`` and ``up_proj`` become one
  ``gate_up_proj``.
* **RMSNorm fused with the residual add**: eager computes ``x = x + a``
  (read two, write one) and then RMSNorm (read x again, and several
  element-wise kernels between); :func:`~llmopt_lab.kernels.fused.add_rmsnorm`
  reads ``a`` and ``x`` once and writes the sum and the normed row once.
* **Rotary embedding** applied to q and k in place, in one launch
  (:func:`~llmopt_lab.kernels.fused.rope_`), instead of the chunk / neg / cat
  / mul / add chain per tensor.
* **SwiGLU**: ``silu(gate) * up`` in one kernel that reads the fused
  projection's output once (:func:`~llmopt_lab.kernels.fused.swiglu`).

With ``kernels=False`` the structure is the same but every fused op runs its
plain-torch reference (useful to separate the effect of concatenation from
that of the kernels, and on machines where the kernels would be interpreted).

A fused model is for inference: its in-place rotary kernel is invisible to
autograd, so a forward that needs gradients raises TransformError. To save a
checkpoint, :func:`unfuse` it first (it restores the plain modules, weights
split back exactly).
"""

from __future__ import annotations

import copy as _copy

import torch
import torch.nn as nn

from ..errors import TransformError
from ..kernels import fused as K
from ..kernels import reference as R
from ..kernels.rmsnorm import rmsnorm as rmsnorm_kernel
from ..model import MLP, Attention, DecoderLayer, apply_rope
from ..attention import attend

__all__ = ["fuse", "unfuse", "is_fused", "FusedAttention", "FusedMLP", "FusedDecoderLayer"]


class _Ops:
    """The fused operations, as kernels or as their references."""

    def __init__(self, kernels: bool):
        self.kernels = kernels

    def rmsnorm(self, x, w, eps):
        return rmsnorm_kernel(x, w, eps) if self.kernels else R.rmsnorm_ref(x, w, eps)

    def add_rmsnorm(self, x, residual, w, eps):
        return (K.add_rmsnorm if self.kernels else R.add_rmsnorm_ref)(x, residual, w, eps)

    def rope(self, q, k, cos, sin):
        """Rotate q (M, Hq, D) and k (M, Hk, D); returns the rotated pair
        (in place with kernels; new tensors with the references)."""
        if self.kernels:
            return K.rope_(q, k, cos, sin)
        return R.rope_ref(q, k, cos, sin)

    def swiglu(self, gate, up=None):
        if self.kernels:
            return K.swiglu(gate, up)
        if up is None:
            gate, up = gate.chunk(2, dim=-1)
        return R.swiglu_ref(gate, up)


def _plain_linears(*mods) -> bool:
    return all(type(m) is nn.Linear for m in mods) and len({m.bias is None for m in mods}) == 1


def _concat_linear(*mods: nn.Linear) -> nn.Linear:
    """One nn.Linear whose output is the outputs of ``mods`` side by side."""
    w = torch.cat([m.weight.detach() for m in mods], 0)
    out = nn.Linear(w.shape[1], w.shape[0], bias=mods[0].bias is not None, device=w.device,
                    dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if out.bias is not None:
            out.bias.copy_(torch.cat([m.bias.detach() for m in mods], 0))
    out.requires_grad_(False)
    return out


def _split_linear(fused: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    outs, start = [], 0
    for n in sizes:
        m = nn.Linear(fused.in_features, n, bias=fused.bias is not None,
                      device=fused.weight.device, dtype=fused.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(fused.weight[start:start + n])
            if m.bias is not None:
                m.bias.copy_(fused.bias[start:start + n])
        outs.append(m)
        start += n
    return outs


def _no_grad_check(x: torch.Tensor, *linears) -> None:
    if torch.is_grad_enabled() and (x.requires_grad or any(
            getattr(m, "weight", None) is not None and m.weight.requires_grad for m in linears)):
        raise TransformError("a fused model runs inference only (its rotary kernel works in "
                             "place, unseen by autograd); train the plain model, or call "
                             "unfuse(model) first")


class FusedAttention(nn.Module):
    """Attention with one QKV projection and the in-place rotary kernel.

    Built from an :class:`~llmopt_lab.model.Attention`; keeps its ``o_proj``.
    When the projections are not plain ``nn.Linear`` (a quantized model),
    they stay separate and only the rotary kernel changes.
    """

    def __init__(self, attn: Attention, ops: _Ops, concat: bool = True):
        super().__init__()
        for name in ("layer_idx", "num_heads", "num_kv_heads", "head_dim", "window", "scale"):
            setattr(self, name, getattr(attn, name))
        self.ops = ops
        self.sizes = [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                      self.num_kv_heads * self.head_dim]
        if concat and _plain_linears(attn.q_proj, attn.k_proj, attn.v_proj):
            self.qkv_proj = _concat_linear(attn.q_proj, attn.k_proj, attn.v_proj)
        else:
            self.qkv_proj = None
            self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.o_proj = attn.o_proj

    def forward(self, x, cos, sin, ctx, kv, attn_fn):
        """As :meth:`llmopt_lab.model.Attention.forward` (both layouts)."""
        _no_grad_check(x, self.qkv_proj, self.o_proj)
        lead = x.shape[:-1]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        if kv is None:  # rectangle: x (B, T, hidden), cos/sin (B, 1, T, D)
            B, T = lead
            q, k = self.ops.rope(q.reshape(B * T, H, D), k.reshape(B * T, Hk, D),
                                 cos[:, 0].reshape(B * T, D), sin[:, 0].reshape(B * T, D))
            q, k = q.view(B, T, H, D).transpose(1, 2), k.view(B, T, Hk, D).transpose(1, 2)
            v = v.reshape(B, T, Hk, D).transpose(1, 2)
            out = attn_fn(q, k, v, ctx, self.window, self.scale)  # (B, H, T, D)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        N = lead[0]  # packed step: x (N, hidden), cos/sin (N, 1, D)
        q, k = self.ops.rope(q.view(N, H, D), k.view(N, Hk, D), cos[:, 0], sin[:, 0])
        kv.write(self.layer_idx, k, v.reshape(N, Hk, D), ctx.where)
        out = attend(attn_fn, q, kv, self.layer_idx, ctx, self.window, self.scale)  # (N, H * D)
        return self.o_proj(out)


class FusedMLP(nn.Module):
    """SwiGLU with one gate/up projection and the fused SwiGLU kernel."""

    def __init__(self, mlp: MLP, ops: _Ops, concat: bool = True):
        super().__init__()
        self.ops = ops
        self.width = mlp.gate_proj.out_features
        if concat and _plain_linears(mlp.gate_proj, mlp.up_proj):
            self.gate_up_proj = _concat_linear(mlp.gate_proj, mlp.up_proj)
        else:
            self.gate_up_proj = None
            self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
        self.down_proj = mlp.down_proj

    def forward(self, x):
        if self.gate_up_proj is not None:
            return self.down_proj(self.ops.swiglu(self.gate_up_proj(x)))
        return self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class FusedDecoderLayer(nn.Module):
    """A decoder block on fused operations; same signature and result as
    :class:`~llmopt_lab.model.DecoderLayer`::

        h = rmsnorm(x)                       # one kernel
        a = attention(h)                     # QKV in one GEMM, rotary in place
        h, x = add_rmsnorm(a, x)             # x = x + a and h = rmsnorm(x): one kernel
        return x + mlp(h)                    # gate/up in one GEMM, SwiGLU in one kernel

    (The last residual add could be fused into the next block's input norm
    too, as vLLM does; that needs the layer loop to carry the residual
    separately, which :class:`~llmopt_lab.model.Transformer` does not.)
    """

    def __init__(self, layer: DecoderLayer, ops: _Ops, concat: bool = True):
        super().__init__()
        self.ops = ops
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.self_attn = FusedAttention(layer.self_attn, ops, concat)
        self.mlp = FusedMLP(layer.mlp, ops, concat)

    def forward(self, x, cos, sin, ctx, kv, attn_fn):
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        a = self.self_attn(self.ops.rmsnorm(x, n1.weight, n1.eps), cos, sin, ctx, kv, attn_fn)
        h, x = self.ops.add_rmsnorm(a, x, n2.weight, n2.eps)
        return x + self.mlp(h)


def is_fused(model) -> bool:
    """Whether ``model``'s decoder blocks are fused ones."""
    return any(isinstance(layer, FusedDecoderLayer) for layer in getattr(model, "layers", []))


def fuse(model, *, kernels: bool = True, concat: bool = True, copy: bool = False):
    """Switch ``model`` (a :class:`~llmopt_lab.model.Transformer`) to fused
    decoder blocks; in place, or on a deep copy with ``copy=True``. Returns
    the model.

    kernels: run the fused Triton kernels (compiled on a GPU; Triton's
    interpreter on a CPU, thousands of times slower: small models only)
    or, with False, their plain-torch references in the same structure.
    concat: concatenate q/k/v and gate/up into one projection each (plain
    ``nn.Linear`` layers only; quantized projections stay separate).

    Greedy tokens equal the plain model's in float32 (tested); in half
    precision the fused kernels round once where eager rounds after every op,
    so logits differ in the last bits.
    The fused model's parameters no longer require gradients.
    Raises TransformError for a model without decoder blocks or one already fused.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(isinstance(x, DecoderLayer) for x in layers):
        if is_fused(model):
            raise TransformError("this model is already fused; unfuse(model) restores it")
        raise TransformError(f"fuse needs an llmopt_lab Transformer with DecoderLayer blocks, got "
                             f"{type(model).__name__}")
    if copy:
        model = _copy.deepcopy(model)
    ops = _Ops(bool(kernels))
    for i, layer in enumerate(list(model.layers)):
        model.layers[i] = FusedDecoderLayer(layer, ops, concat)
    model.requires_grad_(False)  # inference only (a forward that needs gradients raises)
    return model


def unfuse(model):
    """Restore plain :class:`~llmopt_lab.model.DecoderLayer` blocks (weights
    split back exactly), in place. Returns the model. Raises TransformError
    for a model that is not fused."""
    if not is_fused(model):
        raise TransformError("this model is not fused")
    config = model.config
    for i, fl in enumerate(list(model.layers)):
        w = fl.input_layernorm.weight
        with torch.device("meta"):
            layer = DecoderLayer(config, i)
        layer.input_layernorm = fl.input_layernorm
        layer.post_attention_layernorm = fl.post_attention_layernorm
        a, m = fl.self_attn, fl.mlp
        if a.qkv_proj is not None:
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj = \
                _split_linear(a.qkv_proj, a.sizes)
        else:
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj = \
                a.q_proj, a.k_proj, a.v_proj
        layer.self_attn.o_proj = a.o_proj
        if m.gate_up_proj is not None:
            layer.mlp.gate_proj, layer.mlp.up_proj = _split_linear(m.gate_up_proj, [m.width, m.width])
        else:
            layer.mlp.gate_proj, layer.mlp.up_proj = m.gate_proj, m.up_proj
        layer.mlp.down_proj = m.down_proj
        leftover = [n for n, p in layer.named_parameters() if p.device.type == "meta"]
        if leftover:  # pragma: no cover - every parameter above is replaced
            raise TransformError(f"unfuse left {leftover} unset")
        model.layers[i] = layer.to(w.device)
    return model

"""Roofline: the FLOPs and bytes of a step, and the least time they can take.

:func:`step_cost` counts the FLOPs and bytes of a prefill or decode step of a
:class:`~llmopt_lab.config.ModelConfig`; with :func:`roofline_time` and
:func:`achieved_fraction` a measured step is placed against the roofline of
a :class:`~llmopt_lab.measure.device.DeviceLimits`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig, bytes_per_element
from ..errors import MeasureError
from .device import DeviceLimits

__all__ = ["StepCost", "step_cost", "arithmetic_intensity", "attainable_flops", "roofline_time",
           "achieved_fraction"]


@dataclass
class StepCost:
    """FLOPs and bytes of one forward step (see :func:`step_cost`).

    flops: total FLOPs (2 per multiply-accumulate); bytes: total bytes moved
    to and from device memory; breakdown: the parts, keys ``flops_linear``,
    ``flops_attention``, ``flops_lm_head``, ``bytes_weights``,
    ``bytes_kv_read``, ``bytes_kv_write``, ``bytes_activations``;
    tokens: tokens processed (batch x new_tokens).

    Raises: nothing on construction (a plain record); :attr:`intensity`
    raises ZeroDivisionError when ``bytes`` is 0.
    """

    flops: float
    bytes: float
    breakdown: dict[str, float]
    tokens: int

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOP/byte."""
        return self.flops / self.bytes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _nbytes(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else float(bytes_per_element(x))


def _visible_keys(context_len: int, new_tokens: int, window: int | None) -> int:
    """Sum over the new queries of the keys each sees (causal, optional window).

    The query at position p (0-based) sees positions max(0, p - window + 1)..p:
    min(p + 1, window) keys. Summed over p = context_len .. context_len + new - 1.
    """
    def upto(n: int) -> int:  # sum over p < n of min(p + 1, window)
        if window is None or n <= window:
            return n * (n + 1) // 2
        return window * (window + 1) // 2 + (n - window) * window
    return upto(context_len + new_tokens) - upto(context_len)


def step_cost(config: ModelConfig, batch: int, new_tokens: int, context_len: int = 0,
              dtype_bytes: Any = 2, kv_dtype_bytes: Any = None, *,
              act_bytes: Any = None, logit_tokens: int = 1,
              counted_context: int | None = None) -> StepCost:
    """FLOPs and bytes of one forward step over ``new_tokens`` tokens per sequence.

    Prefill of a T-token prompt: ``new_tokens=T, context_len=0``; a decode
    step after L tokens: ``new_tokens=1, context_len=L``. Every sequence of
    the batch has the same lengths. dtype_bytes / kv_dtype_bytes / act_bytes:
    bytes per element (a number, or a dtype / dtype name) of the weights, the
    KV cache (default: as the weights) and the activations (default: as the
    weights).

    FLOPs (2 per multiply-accumulate, matmuls only; bias adds, norms, RoPE,
    softmax, SiLU and residual adds are left out, as torch's FlopCounterMode
    leaves them out):

    * linear: per token and layer 2 x (h x q + 2 x h x kv + q x h + 3 x h x i)
      (q, k, v, o, gate, up, down projections);
    * lm_head: 2 x h x vocab per token whose logits are computed:
      ``logit_tokens`` per sequence (1: the last position, as
      :func:`~llmopt_lab.generate.prefill` and ``decode_one_token`` do; pass
      new_tokens for a plain forward);
    * attention: QK^T and PV, 2 x 2 x num_heads x head_dim per (query, key)
      pair. Causal counting is exact: the query at position p sees min(p + 1,
      window) keys (its own included), summed over the new queries and layers;
      a causal prefill from empty counts T (T + 1) / 2 pairs per head.
      ``counted_context``: charge every query this many keys instead, in every
      layer: what a kernel computes that does not skip masked keys (SDPA or
      naive attention over a static cache of max_len slots) and what
      FlopCounterMode counts (it charges SDPA's GPU kernels for every key,
      masked or not, and has no formula for SDPA's CPU kernel, which it
      counts as 0).

    Bytes (each moved once: the ideal of a fused, cache-friendly step):

    * weights: every projection, the lm_head (the embedding matrix again when
      tied) and the norms read once per step, plus the embedding rows of the
      tokens;
    * kv_read: per layer, keys and values of every position the step's queries
      see (the context, the new tokens and the window taken into account;
      ``counted_context`` slots when given);
    * kv_write: keys and values of the new tokens, every layer;
    * activations: each projection's input read and output written, the
      attention's q read and output written, the logits written (an
      approximation: norms, RoPE and residual adds are assumed fused).

    Returns a :class:`StepCost`. Raises MeasureError (a ValueError) on non-positive sizes.
    """
    if batch < 1 or new_tokens < 1 or context_len < 0:
        raise MeasureError(f"need batch >= 1, new_tokens >= 1, context_len >= 0; got {batch}, "
                         f"{new_tokens}, {context_len}")
    c = config
    wb = _nbytes(dtype_bytes)
    kvb = wb if kv_dtype_bytes is None else _nbytes(kv_dtype_bytes)
    ab = wb if act_bytes is None else _nbytes(act_bytes)
    h, kv, L = c.hidden_size, c.kv_size, c.num_layers
    tokens = batch * new_tokens
    logits = batch * logit_tokens

    # per layer: q/o projections and the MLP may be pruned to different widths (lesson 04)
    widths = [(c.num_heads_at(j) * c.head_dim, c.intermediate_size_at(j)) for j in range(L)]
    macs_per_token = sum(h * qj + 2 * h * kv + qj * h + 3 * h * ij for qj, ij in widths)
    flops_linear = 2 * macs_per_token * tokens
    flops_lm_head = 2 * h * c.vocab_size * logits
    pairs_heads = 0  # (query, key) pairs times query heads over all layers, per sequence
    keys_read = 0  # key positions read over all layers, per sequence
    for layer in range(L):
        window = c.layer_window(layer)
        if counted_context is not None:
            pairs_heads += new_tokens * counted_context * c.num_heads_at(layer)
            keys_read += counted_context
        else:
            pairs_heads += _visible_keys(context_len, new_tokens, window) * c.num_heads_at(layer)
            first = 0 if window is None else max(0, context_len - window + 1)
            keys_read += context_len + new_tokens - first
    flops_attention = 2 * 2 * c.head_dim * pairs_heads * batch

    weight_elems = c.num_parameters(include_embeddings=False)
    if c.tie_word_embeddings:
        weight_elems += c.vocab_size * h  # the lm_head reads the embedding matrix
    bytes_weights = weight_elems * wb + tokens * h * wb  # + embedding rows looked up
    bytes_kv_read = 2 * kv * keys_read * batch * kvb
    bytes_kv_write = 2 * kv * tokens * L * kvb
    act_per_token = sum((h + qj + 2 * kv)          # qkv: read x, write q, k, v
                        + (qj + qj)                # attention: read q, write out
                        + (qj + h)                 # o_proj
                        + (h + 2 * ij)             # gate, up
                        + (2 * ij + ij)            # silu(gate) * up
                        + (ij + h)                 # down
                        for qj, ij in widths)
    bytes_activations = (act_per_token * tokens + logits * (h + c.vocab_size)) * ab

    breakdown = {"flops_linear": float(flops_linear), "flops_attention": float(flops_attention),
                 "flops_lm_head": float(flops_lm_head), "bytes_weights": float(bytes_weights),
                 "bytes_kv_read": float(bytes_kv_read), "bytes_kv_write": float(bytes_kv_write),
                 "bytes_activations": float(bytes_activations)}
    flops = flops_linear + flops_attention + flops_lm_head
    nbytes = bytes_weights + bytes_kv_read + bytes_kv_write + bytes_activations
    return StepCost(flops=float(flops), bytes=float(nbytes), breakdown=breakdown, tokens=tokens)


def arithmetic_intensity(flops: float | StepCost, nbytes: float | None = None) -> float:
    """FLOP per byte: ``arithmetic_intensity(cost)`` or ``arithmetic_intensity(flops, bytes)``.

    Raises MeasureError (a ValueError) when ``nbytes`` is missing or 0 with a
    FLOP count: pass the bytes moved."""
    if isinstance(flops, StepCost):
        return flops.intensity
    if not nbytes:
        raise MeasureError("bytes must be positive")
    return flops / nbytes


def attainable_flops(intensity: float, limits: DeviceLimits, dtype: Any = "bf16") -> float:
    """The roofline: min(peak FLOP/s, bandwidth x intensity), in FLOP/s.

    Raises UnknownDtypeFigure (an UnsupportedDtypeError) when ``limits`` has
    no figure for ``dtype``, MeasureError as :func:`dtype_key` for a dtype with
    no key: pass a dtype the limits list."""
    return min(limits.flops(dtype), limits.bandwidth * intensity)


def roofline_time(cost: StepCost, limits: DeviceLimits, dtype: Any = "bf16") -> float:
    """The least time a step can take, in seconds:
    max(flops / peak FLOP/s, bytes / bandwidth).

    Raises UnknownDtypeFigure (an UnsupportedDtypeError) when ``limits`` has
    no figure for ``dtype``, MeasureError as :func:`dtype_key` for a dtype with
    no key: pass a dtype the limits list."""
    return max(cost.flops / limits.flops(dtype), cost.bytes / limits.bandwidth)


def achieved_fraction(bound_s: float, measured_s: float) -> float:
    """Fraction of the roofline reached: roofline-bound time / measured time
    (1.0 = at the roof; both in seconds).

    Raises MeasureError (a ValueError) when ``measured_s`` <= 0: pass the
    measured, positive time."""
    if measured_s <= 0:
        raise MeasureError("measured time must be positive")
    return bound_s / measured_s

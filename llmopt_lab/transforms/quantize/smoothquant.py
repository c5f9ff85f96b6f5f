"""W8A8 and SmoothQuant: int8 activations, and how to make them survive outliers.

With int8 weights *and* int8 activations a GPU can multiply in int8 on tensor
cores (twice the bf16 rate). Activations are quantized per token at run time
(each row's absmax / 127). The trouble is outlier channels: in trained LLMs a
few hidden dimensions carry values 10-100x larger than the rest, in every
token. A row's scale is then set by its outlier, and every ordinary channel
of that row is rounded on a grid far too coarse for it.

SmoothQuant moves the problem into the weights, which quantize per output
channel and do not mind a few large input columns: divide input channel j by
``s_j`` and multiply weight column j by it (exact in float)::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (alpha = 0.5 by default)

so activations and weights share the range. As with AWQ, 1/s is folded into
the RMSNorm (or the projection) before the layer when possible, else applied
to the layer's input (``input_scale``, fused into our W8A8 kernel).

Here: measuring outliers (:func:`channel_outliers`, :func:`activation_outliers`),
the error of int8 activations with and without smoothing on one layer
(:func:`w8a8_output_error`), planting outliers into a model or a layer for a
demonstration (:func:`plant_outliers`, :func:`plant_layer_outliers`; a small
trained model may show none), and the model transform (:func:`smoothquant_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ...errors import QuantizationError
from ...kernels.reference import quantize_per_token_int8_ref
from ..surgery import decoder_blocks, num_blocks, replace_module
from .awq import fold_scales
from .calibration import as_batches, check_calibration, collect_input_stats, decoder_groups, lm_head_group
from .formats import quantize_int8
from .layers import W8A8Linear
from .registry import register_method


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor,
                      alpha: float = 0.5) -> torch.Tensor:
    """``s = act_absmax^alpha / weight_absmax^(1 - alpha)`` per input channel,
    (K,) float32, clamped away from 0 (dead channels get s = 1)."""
    if not 0.0 <= alpha <= 1.0:
        raise QuantizationError(f"alpha must be in [0, 1], got {alpha}")
    a = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax.float().clamp(min=1e-5)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    dead = act_absmax.float() == 0
    return torch.where(dead, torch.ones_like(s), s).clamp(min=1e-5)


def weight_channel_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |W[:, j]| over the rows of all the weights (sharing an input), (K,)."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


@dataclass
class OutlierReport:
    """absmax: (K,) per input channel; channels / values: the ``top`` largest,
    descending; median: median channel absmax; ratio: max / median."""

    absmax: torch.Tensor
    channels: list[int]
    values: list[float]
    median: float
    ratio: float


def channel_outliers(x: torch.Tensor, top: int = 8) -> OutlierReport:
    """Outlier channels of activations x (..., K), or of a (K,) per-channel
    absmax given directly (``x.dim() == 1``)."""
    absmax = x.detach().float().abs() if x.dim() == 1 else \
        x.detach().float().reshape(-1, x.shape[-1]).abs().amax(0)
    k = min(top, absmax.numel())
    vals, idx = absmax.topk(k)
    median = float(absmax.median())
    return OutlierReport(absmax.cpu(), idx.tolist(), vals.tolist(), median,
                         float(absmax.max()) / median if median > 0 else float("inf"))


@torch.no_grad()
def activation_outliers(model: nn.Module, calibration, top: int = 8) -> dict[str, OutlierReport]:
    """Per-channel input absmax of every linear group of every decoder block
    over the calibration batches: name ('layers.3.attn_in', ...) -> report.
    Raises QuantizationError for missing or empty calibration data."""
    check_calibration(calibration, model, "activation_outliers")
    reps = {}
    for i in range(num_blocks(model)):
        for g in decoder_groups(model, i):
            reps[f"layers.{i}.{g.key}"] = g.modules[0]
    stats = collect_input_stats(model, as_batches(calibration), reps, hessian=False)
    return {name: channel_outliers(st.absmax, top) for name, st in stats.items()}


def _w8a8_ref(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    xq, sx = quantize_per_token_int8_ref(x)
    wq = quantize_int8(W)
    return (xq.float() @ wq.qweight.float().t()) * sx[..., None] * wq.scales


@torch.no_grad()
def w8a8_output_error(x: torch.Tensor, W: torch.Tensor, alpha: float | None = None) -> dict:
    """Relative output error of one layer y = x W^T computed in W8A8.

    x: (T, K) activations, W: (N, K). alpha None: naive (per-token int8
    activations, per-channel int8 weights); a float: SmoothQuant with that
    alpha first. Returns dict(rel_error (of y), act_rel_error (of x / s after
    int8), weight_rel_error (of W * s after int8), max_channel_ratio (of x / s)).
    """
    xf, Wf = x.detach().float().reshape(-1, x.shape[-1]), W.detach().float()
    ref = xf @ Wf.t()
    if alpha is not None:
        s = smoothing_factors(xf.abs().amax(0), Wf.abs().amax(0), alpha)
        xf, Wf = xf / s, Wf * s
    y = _w8a8_ref(xf, Wf)
    xq, sx = quantize_per_token_int8_ref(xf)
    act_err = (xq.float() * sx[:, None] - xf).norm() / xf.norm()
    w_err = (quantize_int8(Wf).dequantize() - Wf).norm() / Wf.norm()
    rep = channel_outliers(xf)
    return dict(rel_error=float((y - ref).norm() / ref.norm()), act_rel_error=float(act_err),
                weight_rel_error=float(w_err), max_channel_ratio=rep.ratio)


def plant_layer_outliers(x: torch.Tensor, W: torch.Tensor, channels: Sequence[int],
                         factor: float = 30.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Make ``channels`` of the activations x (..., K) ``factor`` times larger
    and divide the same columns of W (N, K): the layer's float output is
    unchanged, its activations now have outliers. Returns new (x, W)."""
    x, W = x.clone(), W.clone()
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    x[..., idx] *= factor
    W[:, idx] /= factor
    return x, W


@torch.no_grad()
def plant_outliers(model: nn.Module, num_channels: int = 4, factor: float = 30.0, seed: int = 0,
                   channels: Sequence[int] | None = None) -> list[int]:
    """Give a model the activation outliers of large trained LLMs, in place,
    without changing its float function: in every decoder block, multiply the
    RMSNorm weights of ``channels`` (default: ``num_channels`` random hidden
    dimensions, the same in every block, as in real models) by ``factor`` and
    divide the matching input columns of q/k/v and gate/up by it. The inputs
    of q/k/v and gate/up then carry outliers; their outputs are unchanged (up
    to float rounding). Returns the channels."""
    hidden = model.config.hidden_size
    if channels is None:
        g = torch.Generator().manual_seed(seed)
        channels = torch.randperm(hidden, generator=g)[:num_channels].sort().values.tolist()
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= hidden):
        raise QuantizationError(f"outlier channels must be in [0, {hidden})")
    for _, layer in decoder_blocks(model):
        for norm, linears in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                       layer.self_attn.v_proj)),
                              (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
            if not all(isinstance(m, nn.Linear) for m in linears):
                raise QuantizationError("plant_outliers works on a float model (before quantize)")
            norm.weight[idx] *= factor
            for m in linears:
                m.weight[:, idx] /= factor
    return list(map(int, idx))


@torch.no_grad()
def smoothquant_model(model: nn.Module, calibration, alpha: float = 0.5,
                      include_lm_head: bool = False, backend: str = "auto") -> dict:
    """SmoothQuant + W8A8 in place: per-channel input absmax of every linear
    group from one pass over the calibration batches (float model), smoothing
    factors ``s`` per group, folded into the previous op (or kept as the
    layer's input_scale), then every layer becomes a :class:`W8A8Linear` of
    ``W * s``. Returns a report {group: max activation ratio before -> after}.
    Raises QuantizationError for an alpha outside [0, 1] or missing or empty
    calibration data (no batches, a batch without tokens, bad token ids)."""
    if not 0.0 <= alpha <= 1.0:
        raise QuantizationError(f"alpha must be in [0, 1], got {alpha}")
    check_calibration(calibration, model, "smoothquant")
    groups = [g for i in range(num_blocks(model)) for g in decoder_groups(model, i)]
    if include_lm_head:
        groups.append(lm_head_group(model))
    stats = collect_input_stats(model, as_batches(calibration),
                                {g.names[0]: g.modules[0] for g in groups}, hessian=False)
    plan, report = [], {}
    for g in groups:
        amax = stats[g.names[0]].absmax
        s = smoothing_factors(amax, weight_channel_absmax([m.weight for m in g.modules]), alpha)
        plan.append((g, s))
        report[g.names[0]] = dict(ratio_before=channel_outliers(amax).ratio,
                                  ratio_after=channel_outliers(amax / s).ratio)
    folded = [(g, s, fold_scales(g, s)) for g, s in plan]
    for g, s, input_scale in folded:
        for name, m in zip(g.names, g.modules):
            w = quantize_int8(m.weight.float() * s)
            replace_module(model, name, W8A8Linear(w, m.bias, input_scale=input_scale, backend=backend))
    return report


@register_method("smoothquant", options=("alpha",), calibrated=True, rescales=True)
def smoothquant_method(model: nn.Module, targets: dict, *, calibration,
                       include_lm_head: bool = False, backend: str = "auto",
                       group_size: int | None = None, progress: bool = False,
                       **options) -> dict:
    """W8A8 after SmoothQuant's migration (calibrated): :func:`smoothquant_model`."""
    return {"smoothing": smoothquant_model(model, calibration, include_lm_head=include_lm_head,
                                           backend=backend, **options)}


__all__ = ["smoothing_factors", "weight_channel_absmax", "OutlierReport", "channel_outliers",
           "activation_outliers", "w8a8_output_error", "plant_layer_outliers", "plant_outliers",
           "smoothquant_model", "smoothquant_method"]

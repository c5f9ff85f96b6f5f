"""AWQ: activation-aware weight quantization.

A few input channels of a layer carry much larger activations than the rest,
and the weights they multiply matter most for the output. Rounding every
weight with the same relative error hurts those channels most. AWQ scales
input channel k of the weight up by ``s_k`` before quantizing (so it gets a
finer grid relative to its size) and divides the input by ``s_k``, which
leaves the float layer unchanged::

    y = x W^T = (x / s) (W * s)^T   ->   y ~= (x / s) Q(W * s)^T

with ``s = mean|x|^alpha`` (normalised so that ``max(s) * min(s) = 1``) and the
exponent alpha picked from a grid to minimise the layer's output error on
the calibration set. alpha = 0 is plain round-to-nearest, so the search never
does worse than RTN on the calibration inputs. Here the output error of a
candidate is computed from the inputs' second moment ``H = 2 X^T X / n``
instead of from stored activations: for a weight error D = Q(W s)/s - W,
``||X D^T||^2 = n/2 * tr(D H D^T)``, exact and cheap for every candidate.

The ``1/s`` is folded into the op before the layer where there is one that
scales per channel (an RMSNorm weight; the output rows of v_proj before
o_proj without grouped-query attention; of up_proj before down_proj), else
the quantized layer multiplies its input by it (``input_scale``).
Optionally (``clip=True``, as the original AWQ) a clipping ratio per group
and output channel is then searched: shrinking a group's range clips its
extreme weights but refines the grid for the others.

The result is the same packed int4 format as RTN and GPTQ, on the same kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ...errors import QuantizationError
from ..surgery import num_blocks, replace_module
from .calibration import (LinearGroup, as_batches, check_calibration, collect_input_stats, decoder_groups,
                          lm_head_group)
from .formats import Int4Weight, check_group_size, quantize_int4
from .layers import Int4Linear
from .registry import register_method

#: clipping ratios tried per (output channel, group): 1.0 down to 0.5 in steps of
#: 0.025. Half the step of the reference implementation's grid: on llmopt-tiny's
#: *validation* split (never the held-out one) it cut AWQ's KL to the float model
#: from 4.58e-3 to 4.21e-3 nats per token, for twice the (small) clip-search time.
CLIP_RATIOS = tuple(round(1.0 - 0.025 * i, 4) for i in range(21))


def _quad_error(D: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr(D H D^T): the output error (up to n/2) of a weight error D (N, K)."""
    return ((D @ H) * D).sum()


def awq_scales(x_abs_mean: torch.Tensor, alpha: float,
               w_rel_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``s = mean|x|^alpha`` (or, given the weights' relative magnitude per
    input channel, ``mean|x|^alpha / w_rel_mean^(1 - alpha)``: "duo" scaling,
    which also shrinks channels whose weights are large), normalised so that
    max(s) * min(s) = 1. (K,) float32."""
    s = x_abs_mean.float().clamp(min=1e-5).pow(alpha)
    if w_rel_mean is not None:
        s = s / w_rel_mean.float().clamp(min=1e-5).pow(1.0 - alpha)
    s = s.clamp(min=1e-5)
    return s / (s.max() * s.min()).sqrt()


def weight_rel_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output channels of |W| / (its group's max |W|), per input channel (K,)."""
    rows = []
    for W in weights:
        Wf = W.detach().float().abs()
        N, K = Wf.shape
        g = Wf.view(N, K // group_size, group_size)
        rows.append((g / g.amax(dim=-1, keepdim=True).clamp(min=1e-8)).view(N, K))
    return torch.cat(rows).mean(0)


def awq_scale_error(weights: Sequence[torch.Tensor], s: torch.Tensor, H: torch.Tensor,
                    group_size: int = 128) -> float:
    """Summed output error tr(D H D^T) over the layers sharing an input when
    each weight W is replaced by ``Q(W * s) / s`` (int4 RTN of the scaled weight)."""
    total = 0.0
    for W in weights:
        Wf = W.detach().float()
        D = quantize_int4(Wf * s, group_size).dequantize() / s - Wf
        total += float(_quad_error(D, H))
    return total


@dataclass
class AWQSearch:
    """scales: (K,) the chosen s; alpha: its exponent; duo: whether it is a
    duo-scaling candidate; errors: [(alpha, duo, error)] for every candidate
    (alpha = 0 without duo first: plain RTN); rtn_error: that first error."""

    scales: torch.Tensor
    alpha: float
    duo: bool = False
    errors: list = field(default_factory=list)

    @property
    def rtn_error(self) -> float:
        return self.errors[0][2]

    @property
    def error(self) -> float:
        return min(e for _, _, e in self.errors)


@torch.no_grad()
def awq_search_scale(weights: Sequence[torch.Tensor], x_abs_mean: torch.Tensor, H: torch.Tensor,
                     group_size: int = 128, grid: int = 20, duo: bool = True,
                     error_fn: Callable[[torch.Tensor], float] | None = None) -> AWQSearch:
    """Grid search of alpha in {0, 1/grid, ..., (grid-1)/grid} for layers
    sharing one input (e.g. q, k, v): the alpha whose ``s = mean|x|^alpha``
    gives the smallest summed output error (:func:`awq_scale_error`); with
    ``duo``, the duo-scaling candidates of :func:`awq_scales` compete too
    (the error is exact, so more candidates can only lower it).

    weights: (N_i, K) each; x_abs_mean: (K,) mean |x| per input channel;
    H: (K, K) = 2 X^T X / n. error_fn: scores a candidate s instead (e.g. the
    error of a whole attention or MLP block, see :func:`module_error_fn`).
    Returns an :class:`AWQSearch`.
    """
    if grid < 1:
        raise QuantizationError(f"grid must be >= 1, got {grid}")
    for W in weights:
        check_group_size(group_size, W.shape[-1])
    H = H.float().to(weights[0].device)
    x_abs_mean = x_abs_mean.to(weights[0].device)
    w_rel = weight_rel_mean(weights, group_size) if duo else None
    errors, best = [], None
    for use_duo in ((False, True) if duo else (False,)):
        for i in range(grid):
            alpha = i / grid
            s = awq_scales(x_abs_mean, alpha, w_rel if use_duo else None)
            err = error_fn(s) if error_fn is not None else awq_scale_error(weights, s, H, group_size)
            errors.append((alpha, use_duo, err))
            if best is None or err < best[1]:
                best = (alpha, err, s, use_duo)
    return AWQSearch(scales=best[2], alpha=best[0], duo=best[3], errors=errors)


class _Capture:
    """Inputs and outputs of a module's calls during calibration (for replays)."""

    def __init__(self, module: nn.Module):
        self.calls: list[tuple[tuple, dict]] = []
        self.outputs: list[torch.Tensor] = []
        self._hooks = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                       module.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        self.calls.append((args, kwargs))

    def _post(self, module, args, output):
        self.outputs.append(output.detach())

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def module_error_fn(module: nn.Module, linears: Sequence[nn.Linear], capture: _Capture,
                    group_size: int) -> Callable[[torch.Tensor], float]:
    """An ``error_fn`` for :func:`awq_search_scale`: for a candidate s, put
    ``Q(W * s) / s`` into the ``linears`` of ``module`` (e.g. q/k/v of an
    attention block), replay the module on its calibration inputs and return
    the squared error of its outputs (restoring the weights after). This is
    the block-level objective of AWQ's reference implementation: errors in q
    and k matter through the softmax, not one for one."""
    def error(s: torch.Tensor) -> float:
        saved = [lin.weight.data for lin in linears]
        try:
            for lin in linears:
                w = lin.weight.data.float()
                lin.weight.data = (quantize_int4(w * s, group_size).dequantize() / s).to(
                    lin.weight.dtype)
            total = 0.0
            for (args, kwargs), ref in zip(capture.calls, capture.outputs):
                total += float((module(*args, **kwargs).float() - ref.float()).pow(2).sum())
            return total
        finally:
            for lin, w in zip(linears, saved):
                lin.weight.data = w
    return error


@torch.no_grad()
def awq_search_clip(W: torch.Tensor, H: torch.Tensor, group_size: int = 128,
                    ratios: Sequence[float] = CLIP_RATIOS) -> torch.Tensor:
    """Best clipping ratio per (output channel, group) of W (N, K): for each
    ratio r the group's range is shrunk by r before RTN, and the group's
    share of the output error, ``d^T H_gg d`` with H_gg the group's diagonal
    block of H (interactions between groups ignored), is compared.
    Returns (N, K // group_size) float32 ratios."""
    N, K = W.shape
    check_group_size(group_size, K)
    ng = K // group_size
    Wf = W.detach().float()
    H = H.float().to(Wf.device)
    Hb = torch.stack([H[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                      for g in range(ng)])  # (ng, G, G)
    best_err = torch.full((N, ng), float("inf"), device=Wf.device)
    best = torch.ones(N, ng, device=Wf.device)
    for r in ratios:
        D = (quantize_int4(Wf, group_size, clip_ratio=r).dequantize() - Wf).view(N, ng, group_size)
        e = torch.einsum("ngi,gij,ngj->ng", D, Hb, D)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


@dataclass
class AWQResult:
    """weight: int4 of ``W * scales`` (clipped per group if asked); scales:
    (K,) s, the layer computes ``(x / s) @ dequant(weight).T``; alpha; error
    and rtn_error: tr(D H D^T) of AWQ and of plain RTN on the same H."""

    weight: Int4Weight
    scales: torch.Tensor
    alpha: float
    error: float
    rtn_error: float
    clip_ratios: torch.Tensor | None = None

    def effective_weight(self) -> torch.Tensor:
        """(N, K) float32: the weight the layer multiplies x by, dequant / s."""
        return self.weight.dequantize() / self.scales


@torch.no_grad()
def awq_quantize_layer(W: torch.Tensor, x_abs_mean: torch.Tensor, H: torch.Tensor,
                       group_size: int = 128, grid: int = 20, clip: bool = True,
                       duo: bool = True) -> AWQResult:
    """AWQ of one linear layer: scale search, then (``clip``) clip search, then
    int4 RTN of the scaled weight. W: (N, K); x_abs_mean: (K,); H: (K, K)."""
    search = awq_search_scale([W], x_abs_mean, H, group_size, grid, duo)
    s = search.scales
    Ws = W.detach().float() * s
    ratios = awq_search_clip(Ws, H.float().to(Ws.device) / (s[:, None] * s[None, :]),
                             group_size) if clip else None
    weight = quantize_int4(Ws, group_size, 1.0 if ratios is None else ratios)
    D = weight.dequantize() / s - W.detach().float()
    error = float(_quad_error(D, H.float().to(D.device)))
    return AWQResult(weight, s, search.alpha, error, search.rtn_error, ratios)


def fold_scales(group: LinearGroup, s: torch.Tensor) -> torch.Tensor | None:
    """Fold the input division by s (K,) into the op before the group, when
    there is one that scales per channel; returns None then, else 1/s for the
    layers' ``input_scale``. (The layers' weights are multiplied by s when
    they are quantized.)"""
    prev = group.prev
    if prev is None:
        return 1.0 / s
    if isinstance(prev, nn.Linear):  # its output rows feed our input channels
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
        return None
    prev.weight.div_(s.to(prev.weight.dtype))  # an RMSNorm
    return None


@torch.no_grad()
def awq_quantize_model(model: nn.Module, calibration, group_size: int = 128, grid: int = 20,
                       clip: bool = True, clip_ratios: Sequence[float] = CLIP_RATIOS,
                       duo: bool = True, objective: str = "layer",
                       include_lm_head: bool = False, backend: str = "auto",
                       progress: bool = False) -> dict:
    """AWQ every decoder block in place (and the lm_head when asked), block by
    block (block i calibrated on the outputs of the quantized blocks before
    it). Per block: statistics of the four input groups, a scale search per
    group (on the float block), the scales folded into the previous ops, then
    each layer's clip search and int4 quantization. ``objective``: what a
    candidate scale is scored by: 'layer' (the output error of the layers
    themselves, from H) or 'module' (q/k/v by the attention block's output,
    gate/up by the MLP's; o and down by their own output either way).
    Returns a report: {group name: chosen alpha}. Raises QuantizationError
    for an unknown objective or missing or empty calibration data (no
    batches, a batch without tokens, ids outside the vocabulary)."""
    if objective not in ("layer", "module"):
        raise QuantizationError(f"objective must be 'layer' or 'module', got {objective!r}")
    check_calibration(calibration, model, "awq")
    batches = as_batches(calibration)
    report: dict[str, float] = {}
    todo = list(range(num_blocks(model))) + (["lm_head"] if include_lm_head else [])
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc="awq", leave=False)
    for i in todo:
        caps = {}
        if i == "lm_head":
            groups = [lm_head_group(model)]
            stats = collect_input_stats(model, batches, {"lm_head": model.lm_head})
        else:
            groups = decoder_groups(model, i)
            layer = model.layers[i]
            caps = {}
            if objective == "module":
                caps = {"attn_in": _Capture(layer.self_attn), "mlp_in": _Capture(layer.mlp)}
            try:
                stats = collect_input_stats(model, batches,
                                            {g.names[0]: g.modules[0] for g in groups},
                                            stop_after=layer)
            finally:
                for c in caps.values():
                    c.remove()
            inspect = {"attn_in": layer.self_attn, "mlp_in": layer.mlp}
        plan = []
        for g in groups:  # search every group on the float block first ...
            st = stats[g.names[0]]
            H = st.hessian
            fn = None
            if i != "lm_head" and g.key in caps:
                fn = module_error_fn(inspect[g.key], g.modules, caps[g.key], group_size)
            search = awq_search_scale([m.weight for m in g.modules], st.abs_mean, H, group_size,
                                      grid, duo, error_fn=fn)
            report["lm_head" if i == "lm_head" else f"layers.{i}.{g.key}"] = search.alpha
            plan.append((g, search.scales, H))
        scaled = []
        for g, s, H in plan:  # ... then fold (exact in float) ...
            scaled.append((g, s, H, fold_scales(g, s)))
        for g, s, H, input_scale in scaled:  # ... then quantize the scaled weights
            Hs = H / (s[:, None] * s[None, :])
            for name, m in zip(g.names, g.modules):
                Ws = m.weight.float() * s
                ratios = awq_search_clip(Ws, Hs, group_size, clip_ratios) if clip else 1.0
                q = Int4Linear(quantize_int4(Ws, group_size, ratios), m.bias,
                               input_scale=input_scale, backend=backend)
                replace_module(model, name, q)
        del stats
        caps = {}
    return report


@register_method("awq", options=("grid", "clip", "clip_ratios", "duo", "objective"),
                 calibrated=True, group_size=True, rescales=True)
def awq_method(model: nn.Module, targets: dict, *, calibration, group_size: int = 128,
               include_lm_head: bool = False, backend: str = "auto", progress: bool = False,
               **options) -> dict:
    """The int4 format, AWQ scaling (calibrated): :func:`awq_quantize_model`."""
    return {"alphas": awq_quantize_model(model, calibration, group_size=group_size,
                                         include_lm_head=include_lm_head, backend=backend,
                                         progress=progress, **options)}


__all__ = ["awq_scales", "weight_rel_mean", "awq_scale_error", "awq_search_scale", "awq_search_clip",
           "awq_quantize_layer", "awq_quantize_model", "module_error_fn", "fold_scales", "AWQSearch", "AWQResult",
           "CLIP_RATIOS", "awq_method"]

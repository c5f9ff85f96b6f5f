"""The model transform ``quantize(model, method, ...)``: checks, then the
registered method (:mod:`.registry`) replaces the layers.

Which method runs is looked up by name in the registry; this module imports
none of them (the package ``__init__`` imports the built-in ones so that they
register).
"""

from __future__ import annotations

import copy as _copy
from typing import Sequence

import torch
import torch.nn as nn

from ...errors import QuantizationError, TransformError
from ..surgery import decoder_linears
from .calibration import check_calibration
from .formats import check_group_size
from .layers import BACKENDS
from .registry import get_method


def linear_layers(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Module]:
    """The layers :func:`quantize` replaces: name -> module (nn.Linear or an
    already quantized layer), in data-flow order: every linear layer of every
    decoder block, then ``lm_head`` when asked. Embeddings never.
    (:func:`~llmopt_lab.transforms.surgery.decoder_linears`.) Raises
    QuantizationError for a model that is not an llmopt_lab Transformer."""
    try:
        return decoder_linears(model, include_lm_head)
    except TransformError as e:
        raise QuantizationError(f"quantize() expects an llmopt_lab Transformer: {e}") from None


@torch.no_grad()
def quantize(model: nn.Module, method: str, *, group_size: int = 128,
             include_lm_head: bool = False, calibration: Sequence[torch.Tensor] | None = None,
             copy: bool = False, backend: str = "auto", progress: bool = False,
             **options) -> nn.Module:
    """Quantize the linear layers of a model with a registered method
    (:data:`~llmopt_lab.transforms.quantize.METHODS` are built in).

    method:
        * ``"int8"``: weight-only int8, per output channel, round to nearest.
        * ``"int4"``: weight-only int4, asymmetric per group of ``group_size``
          (32, 64, 128 or 256), round to nearest (RTN). Option: ``bits`` (4;
          3 or 2 use fewer levels of the same container).
        * ``"gptq"``: the int4 format, GPTQ (calibrated). Options: ``damp``
          (0.01), ``act_order`` (False), ``block_size`` (128),
          ``static_groups`` (False; forced by act_order), ``bits`` (4, 3, 2).
        * ``"awq"``: the int4 format, AWQ scaling (calibrated). Options:
          ``grid`` (20 values of alpha in [0, 1)), ``duo`` (True: also try
          duo-scaling candidates), ``objective`` ('layer', the default: score
          a candidate by the layers' own output error, exact from H; 'module':
          q/k/v by the attention block's output and gate/up by the MLP's, as
          AWQ's reference code, several times slower), ``clip`` (True: also
          search a clipping ratio per group).
        * ``"w8a8"``: int8 weights and per-token dynamic int8 activations, no
          smoothing (naive).
        * ``"smoothquant"``: W8A8 after SmoothQuant's migration (calibrated).
          Option: ``alpha`` (0.5).
        * ``"qat"``: the int4 format, quantization-aware training distilled
          from the float model on the calibration batches (training split;
          rows of T + 1 tokens). Options: ``bits`` (4, 3, 2), ``steps``
          (200), ``lr`` (2e-4), ``temperature`` (1.0). See :mod:`.qat`.
        * ``"mixed"``: a format per layer, round to nearest. Option: ``plan``
          ({layer name: (8, None) | (bits, group_size)}, or a
          :class:`~.mixed.MixedPlan` from :func:`~.mixed.plan_bits`).
        * ``"fp8"``: e4m3 weights and activations, per-tensor scales. Option:
          ``simulate`` (None: real on compute capability >= 8.9, simulated
          with a warning elsewhere; False: raise where it cannot be real).
    Which layers: q/k/v/o and gate/up/down of every decoder block; the
    lm_head too with ``include_lm_head=True``; never the embeddings.
    calibration: list of (B, T) int64 token batches from the training split
    (required by gptq, awq, smoothquant and qat; every token counts, no padding).
    copy: quantize a deep copy and leave ``model`` untouched; by default the
    model is modified **in place** (its nn.Linear layers are replaced; AWQ and
    SmoothQuant also rescale the RMSNorm weights and v/up projections they
    fold factors into) and returned.
    backend: 'auto' | 'triton' | 'torch' for every new layer (see
    :class:`~llmopt_lab.transforms.quantize.QuantLinear`).
    Returns the quantized model, with ``model.quantization`` describing what
    was done. Raises QuantizationError for an unknown method (the message
    lists the registered ones) or option, an unsupported group size or layer
    shape, or missing calibration data.
    """
    spec = get_method(method)
    unknown = set(options) - spec.options
    if unknown:
        known = ", ".join(sorted(spec.options)) or "none"
        raise QuantizationError(f"unknown option(s) {', '.join(sorted(unknown))} for method "
                                f"{method!r}; its options: {known}")
    if backend not in BACKENDS:
        raise QuantizationError(f"backend must be one of {BACKENDS}, got {backend!r}")
    targets = linear_layers(model, include_lm_head)
    already = [n for n, m in targets.items() if not isinstance(m, nn.Linear)]
    if already:
        raise QuantizationError(f"{already[0]} is already quantized ({type(targets[already[0]]).__name__}); "
                                "quantize a model that has not been quantized")
    if spec.group_size:
        for name, m in targets.items():
            check_group_size(group_size, m.in_features, name)
    if spec.calibrated:
        check_calibration(calibration, model, method)
    if copy:
        # the copy shares the float weights of the layers about to be replaced (no
        # needless copies), except where a method (AWQ, SmoothQuant) rescales them in place
        emb = getattr(getattr(model, "embed_tokens", None), "weight", None)
        memo = {} if spec.rescales else {
            id(m.weight): m.weight for m in targets.values() if m.weight is not emb}
        model = _copy.deepcopy(model, memo)
        targets = linear_layers(model, include_lm_head)
    details = spec.apply(model, targets, group_size=group_size, include_lm_head=include_lm_head,
                         calibration=calibration, backend=backend, progress=progress, **options)
    info = dict(method=method, include_lm_head=include_lm_head, **options, **(details or {}))
    if spec.group_size:
        info["group_size"] = group_size
    model.quantization = info
    return model


__all__ = ["linear_layers", "quantize"]

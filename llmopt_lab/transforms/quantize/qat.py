"""Quantization-aware training (QAT): fine-tune through the rounding.

Post-training methods (RTN, GPTQ, AWQ) choose integer codes for weights that
were trained in float. Below four bits the grid is so coarse (3 bits: 8
levels per group, 2 bits: 4) that no choice of codes keeps the model's
function, and perplexity falls off a cliff. QAT lets training see the grid:
every forward pass uses the quantized weights, so the loss measures the
quantized model, and the float weights ("latent" or "shadow" weights) move
to where their rounding serves the loss.

Rounding has zero gradient almost everywhere, so the backward pass uses the
**straight-through estimator** (STE, Bengio et al. 2013): treat
``q(w)`` as the identity when differentiating,

    forward:  w_q = q(w)                       (fake quantization, float values)
    backward: dL/dw = dL/dw_q                  (the rounding is "passed through")

written in one line as ``w + (q(w) - w).detach()``. The grid here is the
int4 container's asymmetric per-group grid (min/max of each group, as RTN),
recomputed from the current weights at every step, so no value is ever
clipped and the STE is exact identity.

The loss is distillation from the float model (its logits at temperature 1,
:func:`llmopt_lab.distill.kd_loss`, as LLM-QAT): the quantized model learns
to reproduce the float model's whole next-token distribution, which carries
far more signal per token than the one-hot labels, so a short fine-tune on
a few hundred thousand tokens suffices. Training uses the course's one loop
(:func:`llmopt_lab.training.train`).

After training, :func:`convert_qat` stores the learned codes in the real
:class:`~llmopt_lab.transforms.quantize.Int4Linear` format (the same kernels
as RTN/GPTQ/AWQ); its output equals the fake-quantized model's (tested).

    model = quantize(model, "qat", calibration=train_batches, bits=2, group_size=64, steps=200)
"""

from __future__ import annotations

import copy as _copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import QuantizationError, TrainingError
from ..surgery import replace_module
from .calibration import as_batches
from .formats import check_group_size, check_low_bits, fake_quantize, quantize_int4
from .layers import Int4Linear
from .registry import register_method


def ste_fake_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """Fake-quantize ``weight`` with a straight-through gradient.

    weight: (N, K) float (K a multiple of ``group_size``). Forward: the values
    of :func:`~llmopt_lab.transforms.quantize.fake_quantize` (asymmetric,
    per group of ``group_size`` inputs, ``bits`` bits, min/max grid), in
    weight's dtype. Backward: the gradient passes through unchanged
    (``d out / d weight = I``). Returns (N, K). Raises QuantizationError for
    bad bits or a K that is not a multiple of the group size.
    """
    check_low_bits(bits)
    if weight.dim() != 2:
        raise QuantizationError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if weight.shape[1] % group_size:
        raise QuantizationError(f"K = {weight.shape[1]} is not a multiple of group_size {group_size}")
    with torch.no_grad():
        q = fake_quantize(weight, bits=bits, symmetric=False, granularity="group",
                          group_size=group_size)
    return weight + (q - weight).detach()


class FakeQuantLinear(nn.Module):
    """An ``nn.Linear`` that computes with its weight fake-quantized (STE).

    Holds a float ``weight`` (N, K) Parameter (a copy of the linear's, never
    shared with it) and ``bias``; ``forward(x)``: x (..., K) ->
    (..., N) = ``x @ ste_fake_quantize(weight).T + bias``. :meth:`to_int4`
    stores the current codes as an :class:`Int4Linear`. Raises
    QuantizationError for bad bits or group size.
    """

    def __init__(self, linear: nn.Linear, bits: int = 4, group_size: int = 128):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise QuantizationError(f"FakeQuantLinear wraps an nn.Linear, got {type(linear).__name__}")
        check_low_bits(bits)
        check_group_size(group_size, linear.in_features)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, group_size
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def quantized_weight(self) -> torch.Tensor:
        """(N, K) the values the layer computes with (no gradient)."""
        with torch.no_grad():
            return fake_quantize(self.weight, bits=self.bits, symmetric=False,
                                 granularity="group", group_size=self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = ste_fake_quantize(self.weight, self.bits, self.group_size)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_int4(self, backend: str = "auto") -> Int4Linear:
        """The trained layer in the packed int4 format (codes of ``bits`` bits)."""
        w = quantize_int4(self.weight.detach().float(), self.group_size, bits=self.bits)
        return Int4Linear(w, None if self.bias is None else self.bias.detach(), backend=backend,
                          bits=self.bits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}")


def prepare_qat(model: nn.Module, targets: dict[str, nn.Module], bits: int = 4,
                group_size: int = 128) -> nn.Module:
    """Replace each ``targets`` layer (name -> nn.Linear) of ``model`` by a
    :class:`FakeQuantLinear`, in place; returns the model. Raises
    QuantizationError for a target that is not an nn.Linear, bad bits or
    group size."""
    for name, m in targets.items():
        replace_module(model, name, FakeQuantLinear(m, bits, group_size))
    return model


def convert_qat(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every :class:`FakeQuantLinear` of ``model`` by its
    :class:`Int4Linear` (:meth:`FakeQuantLinear.to_int4`), in place; returns
    the model. Raises QuantizationError if the model has none."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not names:
        raise QuantizationError("the model has no FakeQuantLinear layers: run prepare_qat first")
    for n in names:
        replace_module(model, n, model.get_submodule(n).to_int4(backend))
    return model


def qat_finetune(model: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor], *,
                 steps: int = 200, lr: float = 2e-4, temperature: float = 1.0,
                 progress: bool = False) -> dict:
    """Fine-tune a model prepared with :func:`prepare_qat` to match ``teacher``
    (the float model; frozen) on ``batches`` (token tensors (B, T), cycled:
    micro-batch i is ``batches[i % len(batches)]``), ``steps`` AdamW steps at
    peak learning rate ``lr`` (warm-up then cosine, no weight decay), loss
    :func:`~llmopt_lab.distill.kd_loss` at ``temperature`` (alpha 1: soft
    targets only). Every parameter of the model trains (the quantized
    layers' latent weights, norms, embeddings). Returns the training log
    (:func:`~llmopt_lab.training.train`). Raises QuantizationError if the
    model has no FakeQuantLinear layer, TrainingError for bad settings.
    """
    from ...distill import distill
    from ...training import TrainSettings

    if not any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise QuantizationError("qat_finetune needs a model prepared with prepare_qat")
    batches = list(batches)
    if not batches:
        raise QuantizationError("qat_finetune needs at least one token batch")
    B, T = batches[0].shape
    if T < 2:
        raise QuantizationError(f"token batches must hold at least 2 tokens per row, got {T}")
    settings = TrainSettings(steps=steps, batch_size=B, seq_len=T - 1, lr=lr, weight_decay=0.0,
                             warmup_frac=0.05, min_lr_ratio=0.1, eval_every=max(steps, 1))
    with torch.enable_grad():
        log = distill(model, teacher, batches, settings, temperature=temperature, alpha=1.0,
                      progress=progress)
    model.eval()
    return log


@register_method("qat", options=("bits", "steps", "lr", "temperature"), calibrated=True,
                 group_size=True, rescales=True)
def qat_method(model: nn.Module, targets: dict, *, calibration, group_size: int = 128,
               backend: str = "auto", progress: bool = False, bits: int = 4, steps: int = 200,
               lr: float = 2e-4, temperature: float = 1.0, **_) -> dict:
    """The int4 format (codes of ``bits`` bits), quantization-aware training
    distilled from the float model on the calibration batches (training split)."""
    check_low_bits(bits)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise QuantizationError(f"steps must be a positive integer, got {steps!r}")
    calibration = as_batches(calibration)
    teacher = _copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    prepare_qat(model, targets, bits, group_size)
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        log = qat_finetune(model, teacher, calibration, steps=steps, lr=lr,
                           temperature=temperature, progress=progress)
    except TrainingError as e:
        raise QuantizationError(f"QAT fine-tune: {e}") from None
    convert_qat(model, backend)
    for p in model.parameters():  # as they were (the quantized layers hold buffers only)
        p.requires_grad_(flags.get(id(p), False))
    kd = log.get("kd_loss", [])
    return dict(train_seconds=log.get("train_seconds"), train_tokens=steps * sum(
        b.numel() for b in calibration[:1]), kd_loss_first=kd[0] if kd else None,
        kd_loss_last=kd[-1] if kd else None)


__all__ = ["ste_fake_quantize", "FakeQuantLinear", "prepare_qat", "convert_qat", "qat_finetune",
           "qat_method"]

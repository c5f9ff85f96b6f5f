"""Round-to-nearest methods: every linear layer quantized on its own, no
calibration. Registered as ``"int8"``, ``"int4"``, ``"w8a8"`` and ``"fp8"``."""

from __future__ import annotations

import torch.nn as nn

from ..surgery import replace_module
from .formats import check_low_bits
from .layers import FP8Linear, Int4Linear, Int8Linear, W8A8Linear
from .registry import register_method


@register_method("int8")
def int8_method(model: nn.Module, targets: dict, *, backend: str = "auto", **_) -> dict:
    """Weight-only int8, per output channel, round to nearest."""
    for name, m in targets.items():
        replace_module(model, name, Int8Linear.from_linear(m, backend))
    return {}


@register_method("int4", options=("bits",), group_size=True)
def int4_method(model: nn.Module, targets: dict, *, group_size: int = 128, backend: str = "auto",
                bits: int = 4, **_) -> dict:
    """Weight-only int4, asymmetric per group, round to nearest (RTN)."""
    check_low_bits(bits)
    for name, m in targets.items():
        replace_module(model, name, Int4Linear.from_linear(m, group_size, backend, bits=bits))
    return {}


@register_method("w8a8")
def w8a8_method(model: nn.Module, targets: dict, *, backend: str = "auto", **_) -> dict:
    """int8 weights and per-token dynamic int8 activations, no smoothing (naive)."""
    for name, m in targets.items():
        replace_module(model, name, W8A8Linear.from_linear(m, backend))
    return {}


@register_method("fp8", options=("simulate",))
def fp8_method(model: nn.Module, targets: dict, *, backend: str = "auto",
               simulate: bool | None = None, **_) -> dict:
    """e4m3 weights and activations, per-tensor scales."""
    for name, m in targets.items():
        replace_module(model, name, FP8Linear.from_linear(m, simulate, backend))
    return {}


__all__ = ["int8_method", "int4_method", "w8a8_method", "fp8_method"]

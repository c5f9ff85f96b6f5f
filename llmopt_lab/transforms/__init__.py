"""Model -> model transforms applied to a finished model (model.py never changes).

Quantization (lesson 03)::

    from llmopt_lab.transforms.quantize import quantize
    model = quantize(model, "int4", group_size=128)      # in place; copy=True for a copy

Methods: "int8", "int4", "gptq", "awq", "w8a8", "smoothquant", "fp8", each
registered by name (:func:`~llmopt_lab.transforms.quantize.register_method`).
Everything lives in the package :mod:`~llmopt_lab.transforms.quantize`:
formats, layers, the registry, calibration and the methods (rtn, gptq, awq,
smoothquant). ``llmopt_lab.transforms.gptq``, ``.awq``, ``.smoothquant`` and
``.calibration`` remain importable under their old names.

Module surgery shared by every transform (find linear layers, replace a
module by name, iterate decoder blocks): :mod:`~llmopt_lab.transforms.surgery`.

As in :mod:`llmopt_lab.kernels`, names that would shadow a module are not
re-exported: ``llmopt_lab.transforms.quantize`` is the package; the function
is ``llmopt_lab.transforms.quantize.quantize``, also available here as
:func:`quantize_model`.
"""

from .quantize import (FP8Linear, Int4Linear, Int4Weight, Int8Linear, Int8Weight, METHODS,
                       QuantizationError, QuantLinear, W8A8Linear, bytes_breakdown,
                       compare_quality, dequantize, fake_quantize, model_bytes, quantize_int4,
                       quantize_int8, quantize_tensor, register_method, set_backend)
from .quantize import quantize as quantize_model
from .surgery import decoder_blocks, decoder_linears, find_linears, find_modules, replace_module

__all__ = ["quantize_model", "METHODS", "QuantizationError", "QuantLinear", "Int8Linear",
           "Int4Linear", "W8A8Linear", "FP8Linear", "Int8Weight", "Int4Weight", "quantize_tensor",
           "dequantize", "fake_quantize", "quantize_int8", "quantize_int4", "set_backend",
           "model_bytes", "bytes_breakdown", "compare_quality", "register_method",
           "decoder_blocks", "decoder_linears", "find_linears", "find_modules", "replace_module"]

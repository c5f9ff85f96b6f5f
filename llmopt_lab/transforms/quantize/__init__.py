"""Quantization: formats, quantized layers, and ``quantize(model, method)``.

    from llmopt_lab.transforms.quantize import quantize
    model = quantize(model, "int4", group_size=128)      # in place; copy=True for a copy

One module per concern, each importing only those above it:

* :mod:`.formats`: building blocks (:func:`quantize_tensor`, :func:`dequantize`,
  :func:`fake_quantize`, int4 packing) and the kernels' weight formats
  (:class:`Int8Weight`, :class:`Int4Weight`, fp8 e4m3);
* :mod:`.layers`: :class:`Int8Linear`, :class:`Int4Linear`, :class:`W8A8Linear`,
  :class:`FP8Linear`, the replacements of ``nn.Linear`` (``backend``: 'auto',
  'triton', 'torch');
* :mod:`.registry`: name -> method; :func:`register_method` adds one;
* :mod:`.calibration`: calibration batches and per-layer input statistics;
* the methods, each registering itself: :mod:`.rtn` ("int8", "int4", "w8a8",
  "fp8"), :mod:`.gptq` ("gptq"), :mod:`.awq` ("awq"), :mod:`.smoothquant`
  ("smoothquant"), :mod:`.qat` ("qat": quantization-aware training with a
  straight-through estimator), :mod:`.mixed` ("mixed": a format per layer,
  planned from a sensitivity scan under a byte budget);
* :mod:`.transform`: :func:`quantize`, which checks its arguments and runs the
  method it finds in the registry; :mod:`.quality`: bytes and quality against
  the float model.

The model transform :func:`quantize` replaces the linear layers of every
decoder block (and the lm_head if asked) **in place** and returns the same
model (``copy=True`` quantizes a deep copy instead and leaves the argument
alone). Calibrated methods (``"gptq"``, ``"awq"``, ``"smoothquant"``) take
``calibration=[LongTensor (B, T), ...]``: token batches from the training
split, never the held-out files (see
:func:`llmopt_lab.transforms.quantize.calibration.calibration_batches`).
"""

from ...errors import QuantizationError
from ..surgery import DECODER_LINEARS, replace_module
from .formats import (FP8_DTYPE, FP8_MAX, GRANULARITIES, GROUP_SIZES, Int4Weight, Int8Weight,
                      QTensor, check_group_size, dequantize, fake_quantize, fake_quantize_fp8,
                      fp8_support, int4_group_params, pack_int4, qrange, quantization_error,
                      quantize_fp8, quantize_int4, quantize_int8, quantize_tensor, unpack_int4)
from .layers import (_WARNED, BACKENDS, FP8Linear, Int4Linear, Int8Linear, QuantLinear,
                     W8A8Linear, set_backend)  # _WARNED: tests reset the warn-once set
from .quality import bytes_breakdown, compare_quality, layer_output_error, model_bytes
from .registry import QuantMethod, get_method, method_names, register_method
from .transform import linear_layers, quantize

# the built-in methods register themselves on import, in this order
from . import rtn, gptq, awq, smoothquant, qat, mixed  # noqa: E402,F401  (isort: skip)
from .formats import LOW_BITS, packed_nbytes  # noqa: E402
from .mixed import (MixedPlan, Sensitivity, layer_sensitivity, mixed_model_bytes,  # noqa: E402
                    plan_bits)
from .qat import FakeQuantLinear, convert_qat, prepare_qat, ste_fake_quantize  # noqa: E402

#: the built-in methods (:func:`method_names` also lists any registered later)
METHODS = method_names()
CALIBRATED_METHODS = method_names(calibrated=True)

__all__ = [
    "QuantizationError", "METHODS", "CALIBRATED_METHODS", "GRANULARITIES", "BACKENDS",
    "qrange", "QTensor", "quantize_tensor", "dequantize", "fake_quantize", "quantization_error",
    "pack_int4", "unpack_int4", "check_group_size", "Int8Weight", "Int4Weight", "quantize_int8",
    "quantize_int4", "int4_group_params", "QuantLinear", "Int8Linear", "Int4Linear", "W8A8Linear",
    "FP8Linear", "fp8_support", "quantize_fp8", "fake_quantize_fp8", "linear_layers",
    "replace_module", "set_backend", "quantize", "model_bytes", "bytes_breakdown",
    "compare_quality", "layer_output_error", "GROUP_SIZES", "DECODER_LINEARS", "FP8_DTYPE",
    "FP8_MAX", "QuantMethod", "register_method", "get_method", "method_names", "LOW_BITS",
    "packed_nbytes", "MixedPlan", "Sensitivity", "layer_sensitivity", "mixed_model_bytes",
    "plan_bits", "FakeQuantLinear", "convert_qat", "prepare_qat", "ste_fake_quantize",
]

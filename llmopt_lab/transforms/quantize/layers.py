"""Quantized linear layers: drop-in replacements of ``nn.Linear``.

:class:`Int8Linear`, :class:`Int4Linear` (weight-only), :class:`W8A8Linear`
(int8 weights and per-token int8 activations) and :class:`FP8Linear` (e4m3
weights and activations) have the same ``forward(x)`` as the ``nn.Linear``
they replace. Each has a ``backend``: ``"auto"`` runs our Triton kernel when
the input is on a CUDA GPU and a kernel can launch there (else the plain-torch
reference), ``"triton"`` forces the kernel (also under Triton's interpreter on
a CPU, for tests: slow) and ``"torch"`` forces the reference.
:meth:`QuantLinear.uses_kernel` says which one a given input takes.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ... import kernels
from ...errors import QuantizationError
from ...kernels.quant_matmul import int4_matmul, int8_matmul, w8a8_matmul
from ...kernels.reference import (dequantize_int4_ref, dequantize_int8_ref, int4_matmul_ref,
                                  int8_matmul_ref, w8a8_matmul_ref)
from ..surgery import find_modules
from .formats import (Int4Weight, Int8Weight, _nbytes, check_group_size, check_low_bits, fp8_support,
                      quantize_fp8, quantize_int4, quantize_int8)

BACKENDS = ("auto", "triton", "torch")

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class QuantLinear(nn.Module):
    """Base class of the quantized replacements of ``nn.Linear``.

    ``forward(x)``: x (..., in_features) float -> (..., out_features) in x's
    dtype. ``input_scale`` (in_features,) float32 or None: x is multiplied by
    it first (a smoothing / AWQ factor that could not be folded into the
    previous op). ``backend``: 'auto' | 'triton' | 'torch', see the module doc.

    Raises QuantizationError naming the value for a ``backend`` outside
    :data:`BACKENDS` (here and when it is set later), and from
    :meth:`uses_kernel` (so from ``forward``) with backend 'triton' where no
    Triton kernel can run on the input: use backend 'auto' or 'torch'.
    """

    format = "?"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("input_scale", None if input_scale is None
                             else input_scale.detach().float().clone())
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise QuantizationError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    def _kernel_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in self.buffers() if t is not None)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether forward(x) runs our Triton kernel (True) or the torch reference.

        'torch': never. 'triton': always; raises QuantizationError where no
        kernel can launch (no Triton; tensors on a device the Triton mode here
        cannot use). 'auto': on a CUDA input when a kernel can launch; a CUDA
        input that cannot (no Triton) takes the reference with a warning.
        """
        if self.backend == "torch":
            return False
        ok = kernels.can_launch(x, *self._kernel_tensors())
        if self.backend == "triton":
            if not ok:
                raise QuantizationError(
                    f"{type(self).__name__}: backend='triton' but no Triton kernel can run on "
                    f"{x.device} here (kernels mode: {kernels.mode()}); use backend='auto' or 'torch'")
            return True
        if x.is_cuda and not ok:
            _warn_once(f"nokernel-{self.format}",
                       f"{type(self).__name__}: no Triton kernel can run on {x.device} "
                       f"(kernels mode: {kernels.mode()}); using the plain-torch reference (slow)")
        return ok and x.is_cuda

    def _scaled_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_scale is None else x * self.input_scale.to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) float32 weight this layer effectively multiplies x by
        (input_scale folded in), for checks and error studies."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of everything the layer stores (codes, scales, zeros, bias...)."""
        return _nbytes(*self._kernel_tensors())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format}, backend={self.backend}"
                + (", input_scale=True" if self.input_scale is not None else ""))


class Int8Linear(QuantLinear):
    """Weight-only int8 (per output channel); activations stay in float.

    Raises QuantizationError as :class:`QuantLinear` (a ``backend`` outside
    :data:`BACKENDS`; backend 'triton' where no kernel can run); ValueError
    for an Int8Weight whose qweight is not 2-D."""

    format = "int8"

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None, backend: str = "auto"):
        N, K = weight.shape
        super().__init__(K, N, bias, input_scale, backend)
        # K-major (K, N): the GEMV kernel's threads read neighbouring output features
        self.register_buffer("qweight_t", weight.qweight.t().contiguous())
        self.register_buffer("scales", weight.scales.float().contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto") -> "Int8Linear":
        return cls(quantize_int8(linear.weight.detach()), linear.bias, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._scaled_input(x)
        if self.uses_kernel(x):
            return int8_matmul(x, self.qweight_t, self.scales, self.bias)
        return int8_matmul_ref(x, self.qweight_t, self.scales, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        w = dequantize_int8_ref(self.qweight_t, self.scales)
        return w if self.input_scale is None else w * self.input_scale[None, :]


class Int4Linear(QuantLinear):
    """Weight-only int4, packed, asymmetric per group (RTN, GPTQ, AWQ and QAT alike).

    ``bits`` (4, 3 or 2) records how many of the 16 code levels the weights
    use: 3- and 2-bit codes live in the same 4-bit slots and run on the same
    kernels (:func:`~llmopt_lab.transforms.quantize.formats.packed_nbytes`
    gives what they would take packed at their own width). Raises
    QuantizationError for a bad group size or bit width, or codes above
    2^bits - 1."""

    format = "int4"

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None, backend: str = "auto", bits: int = 4):
        N, K = weight.shape
        check_group_size(weight.group_size, K)
        check_low_bits(bits)
        if bits < 4 and int(weight.codes().max()) > 2 ** bits - 1:
            raise QuantizationError(f"the weight has codes above {2 ** bits - 1}: it is not a "
                                    f"{bits}-bit weight")
        super().__init__(K, N, bias, input_scale, backend)
        self.group_size = weight.group_size
        self.bits = bits
        self.register_buffer("packed", weight.packed.contiguous())
        self.register_buffer("scales", weight.scales.float().contiguous())
        self.register_buffer("zeros", weight.zeros.contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128,
                    backend: str = "auto", bits: int = 4) -> "Int4Linear":
        """RTN of ``linear`` at ``bits`` bits (4, 3, 2), groups of ``group_size``."""
        return cls(quantize_int4(linear.weight.detach(), group_size, bits=bits), linear.bias,
                   backend=backend, bits=bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._scaled_input(x)
        if self.uses_kernel(x):
            return int4_matmul(x, self.packed, self.scales, self.zeros, self.group_size, self.bias)
        return int4_matmul_ref(x, self.packed, self.scales, self.zeros, self.group_size, self.bias)

    def int4_weight(self) -> Int4Weight:
        return Int4Weight(self.packed, self.scales, self.zeros, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        w = dequantize_int4_ref(self.packed, self.scales, self.zeros, self.group_size)
        return w if self.input_scale is None else w * self.input_scale[None, :]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}" + (
            f", bits={self.bits}" if self.bits != 4 else "")


class W8A8Linear(QuantLinear):
    """int8 weights (per output channel) and int8 activations (per token,
    dynamic: each row's absmax, measured at run time). ``input_scale``: the
    SmoothQuant factor 1/s when it could not be folded into the previous op.

    Raises QuantizationError as :class:`QuantLinear` (a ``backend`` outside
    :data:`BACKENDS`; backend 'triton' where no kernel can run); ValueError
    for an Int8Weight whose qweight is not 2-D."""

    format = "w8a8"

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None, backend: str = "auto"):
        N, K = weight.shape
        super().__init__(K, N, bias, input_scale, backend)
        self.register_buffer("qweight", weight.qweight.contiguous())
        self.register_buffer("scales", weight.scales.float().contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto") -> "W8A8Linear":
        return cls(quantize_int8(linear.weight.detach()), linear.bias, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernel(x):
            return w8a8_matmul(x, self.qweight, self.scales, self.bias, self.input_scale)
        return w8a8_matmul_ref(x, self.qweight, self.scales, self.bias, self.input_scale)

    def dequantized_weight(self) -> torch.Tensor:
        w = self.qweight.float() * self.scales[:, None]
        return w if self.input_scale is None else w * self.input_scale[None, :]


class FP8Linear(QuantLinear):
    """e4m3 weights (per-tensor scale) and e4m3 activations (per-tensor scale,
    dynamic). ``mode``: 'scaled_mm' (a real fp8 tensor-core matmul,
    torch._scaled_mm, compute capability >= 8.9) or 'simulated' (cast to fp8
    and back, multiply in float32: the same numbers, none of the speed).
    ``simulate``: None picks 'scaled_mm' where the device allows it and
    'simulated' elsewhere (with a warning); False raises QuantizationError
    where real fp8 cannot run; True always simulates.

    Raises QuantizationError with ``simulate=False`` where real fp8 cannot run
    (the message says why; pass simulate=True), when this torch has no
    float8_e4m3fn (torch < 2.1), or for a ``backend`` outside
    :data:`BACKENDS`; ValueError for a weight that is not 2-D."""

    format = "fp8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 simulate: bool | None = None, backend: str = "auto"):
        N, K = weight.shape
        super().__init__(K, N, bias, None, backend)
        w8, s = quantize_fp8(weight.detach())
        self.register_buffer("weight_fp8", w8.contiguous())
        self.register_buffer("weight_scale", s)
        self.simulate = simulate
        self._check_mode(weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, simulate: bool | None = None,
                    backend: str = "auto") -> "FP8Linear":
        return cls(linear.weight, linear.bias, simulate=simulate, backend=backend)

    def _check_mode(self, device) -> str:
        ok, why = fp8_support(device)
        ok = ok and self.in_features % 16 == 0 and self.out_features % 16 == 0
        if not ok and not why:
            why = f"_scaled_mm needs in/out features divisible by 16, got {self.in_features}x{self.out_features}"
        if self.simulate is True:
            return "simulated"
        if ok:
            return "scaled_mm"
        if self.simulate is False:
            raise QuantizationError(f"real fp8 is not available: {why}; pass simulate=True for a "
                                    "simulated (cast to fp8 and back) layer")
        _warn_once(f"fp8-{why}", f"FP8Linear: {why}; running a SIMULATED fp8 matmul (fp8 "
                                 "rounding, float32 arithmetic: quality yes, speed no)")
        return "simulated"

    @property
    def mode(self) -> str:
        """'scaled_mm' or 'simulated' for this layer's current device."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._check_mode(self.weight_fp8.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x8, sx = quantize_fp8(x)
        if self.backend != "torch" and self._check_mode(x.device) == "scaled_mm":
            shape = x.shape
            a = x8.reshape(-1, self.in_features)
            M = a.shape[0]
            pad = (-M) % 16  # cuBLASLt wants every dimension a multiple of 16
            if pad:
                a = torch.cat([a, a.new_zeros(pad, self.in_features)])
            out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
            y = torch._scaled_mm(a, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale,
                                 out_dtype=out_dtype)
            y = y[0] if isinstance(y, tuple) else y  # torch < 2.5 returned (out, amax)
            y = y[:M].to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
            return y.reshape(*shape[:-1], self.out_features)
        y = torch.matmul(x8.float() * sx, self.dequantized_weight().t())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_fp8.float() * self.weight_scale


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` ('auto', 'triton', 'torch') on every quantized layer.
    Returns the model.

    Raises QuantizationError naming the value for a ``backend`` outside
    :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise QuantizationError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for ref in find_modules(model, types=QuantLinear):
        ref.module.backend = backend
    return model


__all__ = ["BACKENDS", "QuantLinear", "Int8Linear", "Int4Linear", "W8A8Linear", "FP8Linear",
           "set_backend"]

"""Quantization: building blocks, quantized linear layers, and ``quantize(model, method)``.

Building blocks (plain torch, each small enough to read in one go)
    :func:`quantize_tensor` / :func:`dequantize` / :func:`fake_quantize`:
    symmetric (absmax) or asymmetric (affine, zero point) integer quantization
    at per-tensor, per-channel (one scale per row) or per-group (one scale per
    ``group_size`` consecutive values of a row) granularity, round to nearest
    (half to even, as ``torch.round``). :func:`pack_int4` / :func:`unpack_int4`
    put two 4-bit codes in a byte.

Weight formats (the kernels' formats, see :mod:`llmopt_lab.kernels.reference`)
    * :class:`Int8Weight`: int8 codes in [-127, 127], symmetric, one float32
      scale per output channel: ``W = q * scale[:, None]``.
    * :class:`Int4Weight`: 4-bit codes in [0, 15] packed two per byte along
      the input dimension, **asymmetric** per group: one float32 scale and one
      uint8 zero point per ``group_size`` inputs of each output channel:
      ``W = (code - zero) * scale``. Asymmetric because weights of a group are
      rarely centred on zero and 16 levels are few: a zero point uses them
      all. Overhead at group 128: 40 bits per 128 weights (0.31 bit/weight).
      RTN, GPTQ and AWQ all produce this format and run on the same kernels.

Layers: :class:`Int8Linear`, :class:`Int4Linear` (weight-only),
:class:`W8A8Linear` (int8 weights and per-token int8 activations) and
:class:`FP8Linear` (e4m3 weights and activations) replace ``nn.Linear`` with the
same ``forward(x)``. Each has a ``backend``: ``"auto"`` runs our Triton kernel
when the input is on a CUDA GPU and a kernel can launch there (else the
plain-torch reference), ``"triton"`` forces the kernel (also under Triton's
interpreter on a CPU, for tests: slow) and ``"torch"`` forces the reference.
:meth:`QuantLinear.uses_kernel` says which one a given input takes.

The model transform :func:`quantize` replaces the linear layers of every
decoder block (and the lm_head if asked) **in place** and returns the same
model (``copy=True`` quantizes a deep copy instead and leaves the argument
alone). Calibrated methods (``"gptq"``, ``"awq"``, ``"smoothquant"``) take
``calibration=[LongTensor (B, T), ...]``: token batches from the training
split, never the held-out files (see :func:`llmopt_lab.transforms.calibration.calibration_batches`).
"""

from __future__ import annotations

import copy as _copy
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from .. import kernels
from ..errors import LlmoptError
from ..kernels.quant_matmul import GROUP_SIZES, int4_matmul, int8_matmul, w8a8_matmul
from ..kernels.reference import (dequantize_int4_ref, dequantize_int8_ref, int4_matmul_ref,
                                 int8_matmul_ref, pack_int4_ref, unpack_int4_ref,
                                 w8a8_matmul_ref)


class QuantizationError(LlmoptError, ValueError):
    """A quantization request the library cannot honour: unknown method or
    option, unsupported group size, a layer shape a format cannot take, a
    missing calibration set, a device without the needed feature."""


METHODS = ("int8", "int4", "gptq", "awq", "w8a8", "smoothquant", "fp8")
CALIBRATED_METHODS = ("gptq", "awq", "smoothquant")
GRANULARITIES = ("tensor", "channel", "group")
BACKENDS = ("auto", "triton", "torch")
#: the linear layers of a decoder block, in the order data flows through them
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

pack_int4 = pack_int4_ref
unpack_int4 = unpack_int4_ref


# =========================================================================== blocks
def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit code: symmetric [-(2^(b-1) - 1), 2^(b-1) - 1]
    (int8: [-127, 127], leaving -128 out so that the range is symmetric), or
    asymmetric [0, 2^b - 1] (int4: [0, 15])."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise QuantizationError(f"bits must be an integer in 2..8, got {bits!r}")
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _grouped(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """View x as (rows, groups, values): the last axis holds what one scale covers."""
    if granularity not in GRANULARITIES:
        raise QuantizationError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "tensor":
        return x.reshape(1, 1, -1)
    K = x.shape[-1]
    if granularity == "channel":
        return x.reshape(-1, 1, K)
    if not isinstance(group_size, int) or group_size < 1:
        raise QuantizationError(f"per-group quantization needs a positive group_size, got {group_size!r}")
    if K % group_size:
        raise QuantizationError(f"the last dimension {K} is not a multiple of group_size {group_size}")
    return x.reshape(-1, K // group_size, group_size)


def _param_shape(shape: torch.Size, granularity: str, group_size: int | None) -> tuple:
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        return tuple(shape[:-1])
    return tuple(shape[:-1]) + (shape[-1] // group_size,)


@dataclass
class QTensor:
    """A quantized tensor: integer codes plus what turns them back into numbers.

    q: int32 codes, the shape of the original; scale (and zero for asymmetric)
    shaped per granularity: () per tensor, x.shape[:-1] per channel (one per
    row of the last dimension), x.shape[:-1] + (K // group_size,) per group.
    ``x ~= (q - zero) * scale`` (zero = 0 when symmetric).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    symmetric: bool
    granularity: str
    group_size: int | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def quantize_tensor(x: torch.Tensor, bits: int = 8, symmetric: bool = True,
                    granularity: str = "channel", group_size: int | None = None,
                    clip_ratio: float | torch.Tensor = 1.0) -> QTensor:
    """Round-to-nearest quantization of a float tensor.

    Symmetric (absmax): ``scale = absmax / qmax``, ``q = clamp(round(x / scale),
    -qmax, qmax)``. Asymmetric (affine): the range [min(x, 0), max(x, 0)] is
    mapped onto [0, 2^bits - 1]: ``scale = (max - min) / (2^bits - 1)``,
    ``zero = round(-min / scale)``, ``q = clamp(round(x / scale) + zero, 0,
    2^bits - 1)``. Either way ``|x - dequantize(q)| <= scale / 2`` for every
    value (clip_ratio 1). A range of zero width gets scale 1.

    x: (..., K) float; granularity 'tensor', 'channel' (one scale per row of
    the last dimension) or 'group' (``group_size`` consecutive values of a
    row; K must be a multiple). clip_ratio: shrink the range by this factor
    (scalar, or one per scale) before computing the scale, trading clipping
    error on the extremes for a finer grid (AWQ searches it).
    Returns a :class:`QTensor`. Raises QuantizationError on bad arguments.
    """
    qmin, qmax = qrange(bits, symmetric)
    g = _grouped(x.float(), granularity, group_size)  # (R, G, S)
    ratio = clip_ratio if isinstance(clip_ratio, (int, float)) else (
        clip_ratio.float().reshape(g.shape[0], g.shape[1], 1) if clip_ratio.numel() > 1
        else clip_ratio.float().reshape(1, 1, 1))
    if symmetric:
        scale = g.abs().amax(dim=-1, keepdim=True) * ratio / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(g / scale), qmin, qmax)
        zero = None
    else:
        lo = g.amin(dim=-1, keepdim=True).clamp(max=0) * ratio
        hi = g.amax(dim=-1, keepdim=True).clamp(min=0) * ratio
        scale = (hi - lo) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
        q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
    pshape = _param_shape(x.shape, granularity, group_size)
    return QTensor(q=q.to(torch.int32).reshape(x.shape), scale=scale.reshape(pshape),
                   zero=None if zero is None else zero.to(torch.int32).reshape(pshape),
                   bits=bits, symmetric=symmetric, granularity=granularity,
                   group_size=group_size if granularity == "group" else None)


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero) * scale`` with each scale broadcast over the values it covers."""
    g = _grouped(qt.q.float(), qt.granularity, qt.group_size)
    scale = qt.scale.float().reshape(g.shape[0], g.shape[1], 1)
    if qt.zero is not None:
        g = g - qt.zero.float().reshape(g.shape[0], g.shape[1], 1)
    return (g * scale).reshape(qt.q.shape).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int = 8, symmetric: bool = True,
                  granularity: str = "channel", group_size: int | None = None,
                  clip_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Quantize then dequantize, in x's dtype: the values a quantized model
    computes with, for studying the error in plain float code."""
    return dequantize(quantize_tensor(x, bits, symmetric, granularity, group_size, clip_ratio),
                      x.dtype)


def quantization_error(x: torch.Tensor, **kw) -> dict:
    """Error of :func:`fake_quantize` on x: max and RMS absolute error, RMS
    relative to RMS(x), and the signal-to-quantization-noise ratio in dB."""
    err = (fake_quantize(x, **kw).float() - x.float())
    rms = err.pow(2).mean().sqrt()
    ref = x.float().pow(2).mean().sqrt()
    return dict(max_abs=float(err.abs().max()), rms=float(rms),
                rel_rms=float(rms / ref) if ref > 0 else 0.0,
                sqnr_db=float(20 * torch.log10(ref / rms)) if rms > 0 else math.inf)


# ===================================================================== weight formats
def check_group_size(group_size: int, in_features: int | None = None, name: str = "") -> None:
    """Raise QuantizationError unless the int4 kernels take this group size (and K)."""
    where = f"{name}: " if name else ""
    if group_size not in GROUP_SIZES:
        raise QuantizationError(f"{where}group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if in_features is not None and in_features % group_size:
        raise QuantizationError(
            f"{where}in_features {in_features} is not a multiple of group_size {group_size}; "
            f"choose a group size that divides it (one of {GROUP_SIZES})")


@dataclass
class Int8Weight:
    """int8 weight-only format: qweight (N, K) int8 in [-127, 127] (nn.Linear's
    layout), scales (N,) float32: ``W = qweight * scales[:, None]``. The layers
    store what their kernels read: :class:`Int8Linear` the transpose (K, N),
    :class:`W8A8Linear` this (N, K)."""

    qweight: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32."""
        return self.qweight.float() * self.scales.float()[:, None]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.qweight, self.scales)


@dataclass
class Int4Weight:
    """Packed int4 format, K-major as the kernels read it: packed (K // 2, N)
    uint8 (byte [j, n] = code[n, 2j] | code[n, 2j + 1] << 4), scales
    (K // G, N) float32, zeros (K // G, N) uint8 in [0, 15];
    ``W[n, k] = (code[n, k] - zeros[k // G, n]) * scales[k // G, n]``."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int) -> "Int4Weight":
        """From codes (N, K) in [0, 15] and per-group scales and zero points
        (N, K // G), the layout of :func:`quantize_tensor` (rows = output channels)."""
        check_group_size(group_size, codes.shape[-1])
        return cls(pack_int4(codes).t().contiguous(), scales.float().t().contiguous(),
                   zeros.to(torch.uint8).t().contiguous(), group_size)

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight it stands for."""
        return (self.packed.shape[1], self.packed.shape[0] * 2)

    def codes(self) -> torch.Tensor:
        """(N, K) uint8 codes."""
        return unpack_int4(self.packed.t())

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32."""
        return dequantize_int4_ref(self.packed, self.scales, self.zeros, self.group_size)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scales, self.zeros)


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 (round to nearest) of a (N, K) weight."""
    qt = quantize_tensor(weight, bits=8, symmetric=True, granularity="channel")
    return Int8Weight(qt.q.to(torch.int8).contiguous(), qt.scale.float().contiguous())


def quantize_int4(weight: torch.Tensor, group_size: int = 128,
                  clip_ratio: float | torch.Tensor = 1.0) -> Int4Weight:
    """Asymmetric per-group int4, round to nearest (RTN), of a (N, K) weight.

    clip_ratio: scalar or (N, K // group_size) range shrink factors (AWQ's clip
    search). Raises QuantizationError for an unsupported group size or K not
    a multiple of it.
    """
    check_group_size(group_size, weight.shape[-1])
    qt = quantize_tensor(weight, bits=4, symmetric=False, granularity="group",
                         group_size=group_size, clip_ratio=clip_ratio)
    return Int4Weight.from_codes(qt.q, qt.scale, qt.zero, group_size)


def int4_group_params(w: torch.Tensor, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (each (N,), float32) of one group of columns w (N, G):
    the affine int4 grid :func:`quantize_int4` would use (GPTQ calls this)."""
    qt = quantize_tensor(w, bits=4, symmetric=False, granularity="channel", clip_ratio=clip_ratio)
    return qt.scale.float(), qt.zero.float()


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ============================================================================ layers
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
    """Weight-only int8 (per output channel); activations stay in float."""

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
    """Weight-only int4, packed, asymmetric per group (RTN, GPTQ and AWQ alike)."""

    format = "int4"

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None, backend: str = "auto"):
        N, K = weight.shape
        check_group_size(weight.group_size, K)
        super().__init__(K, N, bias, input_scale, backend)
        self.group_size = weight.group_size
        self.register_buffer("packed", weight.packed.contiguous())
        self.register_buffer("scales", weight.scales.float().contiguous())
        self.register_buffer("zeros", weight.zeros.contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128,
                    backend: str = "auto") -> "Int4Linear":
        return cls(quantize_int4(linear.weight.detach(), group_size), linear.bias, backend=backend)

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
        return super().extra_repr() + f", group_size={self.group_size}"


class W8A8Linear(QuantLinear):
    """int8 weights (per output channel) and int8 activations (per token,
    dynamic: each row's absmax, measured at run time). ``input_scale``: the
    SmoothQuant factor 1/s when it could not be folded into the previous op."""

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


# ---------------------------------------------------------------------------- FP8
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite e4m3fn value


def fp8_support(device) -> tuple[bool, str]:
    """(True, '') where real fp8 matmuls (torch._scaled_mm) can run on
    ``device``; else (False, the reason)."""
    device = torch.device(device)
    if FP8_DTYPE is None or not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no float8_e4m3fn / _scaled_mm"
    if device.type != "cuda":
        return False, f"fp8 matmuls need an NVIDIA GPU of compute capability >= 8.9, not {device.type}"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        name = torch.cuda.get_device_name(device)
        return False, (f"{name} (compute capability {cc[0]}.{cc[1]}) has no fp8 tensor cores; "
                       "they need 8.9+ (Ada, Hopper, Blackwell)")
    return True, ""


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None = None):
    """Per-tensor e4m3 quantization: ``scale = absmax / 448`` (unless given),
    returns (x / scale cast to float8_e4m3fn, scale as a 0-d float32 tensor).
    e4m3 keeps 3 mantissa bits: a relative rounding error of at most 2^-4."""
    if FP8_DTYPE is None:
        raise QuantizationError(f"torch {torch.__version__} has no float8_e4m3fn (needs torch >= 2.1)")
    if scale is None:
        amax = x.detach().abs().amax().float()
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    x8 = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, scale.float().reshape(())


def fake_quantize_fp8(x: torch.Tensor) -> torch.Tensor:
    """Cast to e4m3 with a per-tensor scale and back (x's dtype): works on any device."""
    x8, s = quantize_fp8(x)
    return (x8.float() * s).to(x.dtype)


class FP8Linear(QuantLinear):
    """e4m3 weights (per-tensor scale) and e4m3 activations (per-tensor scale,
    dynamic). ``mode``: 'scaled_mm' (a real fp8 tensor-core matmul,
    torch._scaled_mm, compute capability >= 8.9) or 'simulated' (cast to fp8
    and back, multiply in float32: the same numbers, none of the speed).
    ``simulate``: None picks 'scaled_mm' where the device allows it and
    'simulated' elsewhere (with a warning); False raises QuantizationError
    where real fp8 cannot run; True always simulates."""

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


# ================================================================= model transform
def linear_layers(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Module]:
    """The layers :func:`quantize` replaces: name -> module (nn.Linear or an
    already quantized layer), in data-flow order: every linear layer of every
    decoder block, then ``lm_head`` when asked. Embeddings never."""
    out: dict[str, nn.Module] = {}
    layers = getattr(model, "layers", None)
    if layers is None:
        raise QuantizationError("quantize() expects an llmopt_lab Transformer (it has no .layers)")
    for i, layer in enumerate(layers):
        for name in DECODER_LINEARS:
            out[f"layers.{i}.{name}"] = layer.get_submodule(name)
    if include_lm_head:
        out["lm_head"] = model.lm_head
    return out


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` ('auto', 'triton', 'torch') on every quantized layer."""
    if backend not in BACKENDS:
        raise QuantizationError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = backend
    return model


_OPTIONS = {
    "int8": set(),
    "int4": set(),
    "gptq": {"damp", "act_order", "block_size", "static_groups"},
    "awq": {"grid", "clip", "clip_ratios", "duo", "objective"},
    "w8a8": set(),
    "smoothquant": {"alpha"},
    "fp8": {"simulate"},
}


@torch.no_grad()
def quantize(model: nn.Module, method: str, *, group_size: int = 128,
             include_lm_head: bool = False, calibration: Sequence[torch.Tensor] | None = None,
             copy: bool = False, backend: str = "auto", progress: bool = False,
             **options) -> nn.Module:
    """Quantize the linear layers of a model with one of :data:`METHODS`.

    method:
        * ``"int8"``: weight-only int8, per output channel, round to nearest.
        * ``"int4"``: weight-only int4, asymmetric per group of ``group_size``
          (32, 64, 128 or 256), round to nearest (RTN).
        * ``"gptq"``: the int4 format, GPTQ (calibrated). Options: ``damp``
          (0.01), ``act_order`` (False), ``block_size`` (128),
          ``static_groups`` (False; forced by act_order).
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
        * ``"fp8"``: e4m3 weights and activations, per-tensor scales. Option:
          ``simulate`` (None: real on compute capability >= 8.9, simulated
          with a warning elsewhere; False: raise where it cannot be real).
    Which layers: q/k/v/o and gate/up/down of every decoder block; the
    lm_head too with ``include_lm_head=True``; never the embeddings.
    calibration: list of (B, T) int64 token batches from the training split
    (required by gptq, awq and smoothquant; every token counts, no padding).
    copy: quantize a deep copy and leave ``model`` untouched; by default the
    model is modified **in place** (its nn.Linear layers are replaced; AWQ and
    SmoothQuant also rescale the RMSNorm weights and v/up projections they
    fold factors into) and returned.
    backend: 'auto' | 'triton' | 'torch' for every new layer (see
    :class:`QuantLinear`).
    Returns the quantized model, with ``model.quantization`` describing what
    was done. Raises QuantizationError for an unknown method or option, an
    unsupported group size or layer shape, or missing calibration data.
    """
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization method {method!r}; choose from {', '.join(METHODS)}")
    unknown = set(options) - _OPTIONS[method]
    if unknown:
        known = ", ".join(sorted(_OPTIONS[method])) or "none"
        raise QuantizationError(f"unknown option(s) {', '.join(sorted(unknown))} for method "
                                f"{method!r}; its options: {known}")
    if backend not in BACKENDS:
        raise QuantizationError(f"backend must be one of {BACKENDS}, got {backend!r}")
    targets = linear_layers(model, include_lm_head)
    already = [n for n, m in targets.items() if not isinstance(m, nn.Linear)]
    if already:
        raise QuantizationError(f"{already[0]} is already quantized ({type(targets[already[0]]).__name__}); "
                                "quantize a model that has not been quantized")
    if method in ("int4", "gptq", "awq"):
        for name, m in targets.items():
            check_group_size(group_size, m.in_features, name)
    if method in CALIBRATED_METHODS:
        from .calibration import check_calibration

        check_calibration(calibration, model, method)
    if copy:
        # the copy shares the float weights of the layers about to be replaced (no
        # needless copies), except where AWQ / SmoothQuant rescale them in place
        emb = getattr(getattr(model, "embed_tokens", None), "weight", None)
        memo = {} if method in ("awq", "smoothquant") else {
            id(m.weight): m.weight for m in targets.values() if m.weight is not emb}
        model = _copy.deepcopy(model, memo)
        targets = linear_layers(model, include_lm_head)
    details: dict = {}

    if method == "int8":
        for name, m in targets.items():
            replace_module(model, name, Int8Linear.from_linear(m, backend))
    elif method == "int4":
        for name, m in targets.items():
            replace_module(model, name, Int4Linear.from_linear(m, group_size, backend))
    elif method == "w8a8":
        for name, m in targets.items():
            replace_module(model, name, W8A8Linear.from_linear(m, backend))
    elif method == "fp8":
        simulate = options.get("simulate")
        for name, m in targets.items():
            replace_module(model, name, FP8Linear.from_linear(m, simulate, backend))
    elif method == "gptq":
        from .gptq import gptq_quantize_model

        gptq_quantize_model(model, calibration, group_size=group_size,
                            include_lm_head=include_lm_head, backend=backend, progress=progress,
                            **options)
    elif method == "awq":
        from .awq import awq_quantize_model

        details["alphas"] = awq_quantize_model(model, calibration, group_size=group_size,
                                               include_lm_head=include_lm_head, backend=backend,
                                               progress=progress, **options)
    elif method == "smoothquant":
        from .smoothquant import smoothquant_model

        details["smoothing"] = smoothquant_model(model, calibration,
                                                 include_lm_head=include_lm_head,
                                                 backend=backend, **options)
    info = dict(method=method, include_lm_head=include_lm_head, **options, **details)
    if method in ("int4", "gptq", "awq"):
        info["group_size"] = group_size
    model.quantization = info
    return model


# ============================================================== size and quality
def model_bytes(model: nn.Module) -> int:
    """Bytes of everything the model stores: parameters and persistent buffers
    (packed codes, scales, zero points, biases, norms, embeddings), each
    tensor counted once (tied embeddings are shared)."""
    return sum(bytes_breakdown(model).values())


def bytes_breakdown(model: nn.Module) -> dict[str, int]:
    """Bytes by kind: 'linear' (weights/codes of linear layers, quantized or
    not), 'quant_params' (scales, zero points, input scales), 'embeddings'
    (embed_tokens, and lm_head when it is a plain Linear: it is counted under
    'linear' only if quantized), 'other' (norms, biases)."""
    seen: set[int] = set()
    out = dict(linear=0, quant_params=0, embeddings=0, other=0)

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:
            return
        seen.add(key)
        out[kind] += t.numel() * t.element_size()

    for mname, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for bname, b in m.named_buffers(recurse=False):
                kind = ("linear" if bname in ("qweight", "qweight_t", "packed", "weight_fp8")
                        else "other" if bname == "bias" else "quant_params")
                add(kind, b)
        elif isinstance(m, nn.Linear):
            add("embeddings" if mname == "lm_head" else "linear", m.weight)
            add("other", m.bias)
        elif isinstance(m, nn.Embedding):
            add("embeddings", m.weight)
        else:
            for p in m.parameters(recurse=False):
                add("other", p)
            for bname, b in m.named_buffers(recurse=False):
                if bname not in m._non_persistent_buffers_set:
                    add("other", b)
    return out


@torch.no_grad()
def compare_quality(reference_model: nn.Module, model: nn.Module, evalset_ids: torch.Tensor,
                    lengths: torch.Tensor | None = None, batch_size: int = 8,
                    per_window: bool = False) -> dict:
    """Teacher-forced quality of ``model`` against ``reference_model`` on the
    same windows.

    evalset_ids: (N, W) int64 windows, right-padded; lengths: (N,) real tokens
    per window (default: all W). In each window, every token after the first
    is scored given the ones before it (as :func:`llmopt_lab.data.evaluate_nll`).
    Returns dict(ppl_ref, ppl, ppl_delta_pct (100 * (ppl / ppl_ref - 1)),
    kl (mean KL(P_ref || P) per scored token, nats), top1 (fraction of scored
    positions where both models' argmax agree), tokens (scored)). With
    ``per_window``, also ``windows``: dict of (N,) lists nll_ref, nll, kl
    (sums over each window's scored tokens, nats) and tokens, for
    :func:`llmopt_lab.metrics.ppl_delta_interval` and friends. Both models run
    on their own device; logits are compared in float32 on the CPU.
    """
    from ..metrics import position_kl, position_nll

    ids_all = evalset_ids
    N, W = ids_all.shape
    if lengths is None:
        lengths = torch.full((N,), W, dtype=torch.long)
    sums = {k: [] for k in ("nll_ref", "nll", "kl", "agree", "tokens")}
    for start in range(0, N, batch_size):
        ids = ids_all[start:start + batch_size]
        lens = lengths[start:start + batch_size].cpu()
        ref_logits = reference_model(ids.to(reference_model.device)).float().cpu()[:, :-1]
        logits = model(ids.to(model.device)).float().cpu()[:, :-1]
        targets = ids[:, 1:].cpu()
        mask = (torch.arange(1, W)[None, :] < lens[:, None]).double()  # (B, W-1) real targets
        per_token = {"nll_ref": position_nll(ref_logits, targets),
                     "nll": position_nll(logits, targets),
                     "kl": position_kl(ref_logits, logits),
                     "agree": ref_logits.argmax(-1) == logits.argmax(-1)}
        for k, v in per_token.items():
            sums[k] += (v.double() * mask).sum(1).tolist()
        sums["tokens"] += mask.sum(1).long().tolist()
    count = sum(sums["tokens"])
    if count == 0:
        raise QuantizationError("compare_quality: the windows score no tokens")
    nll_ref, nll = sum(sums["nll_ref"]), sum(sums["nll"])
    ppl_ref, ppl = math.exp(nll_ref / count), math.exp(nll / count)
    out = dict(ppl_ref=ppl_ref, ppl=ppl, ppl_delta_pct=100.0 * math.expm1((nll - nll_ref) / count),
               kl=sum(sums["kl"]) / count, top1=sum(sums["agree"]) / count, tokens=count)
    if per_window:
        out["windows"] = {k: sums[k] for k in ("nll_ref", "nll", "kl", "tokens")}
    return out


def layer_output_error(weight: torch.Tensor, approx_weight: torch.Tensor, x: torch.Tensor) -> float:
    """Relative output error ``||x W'^T - x W^T||_F / ||x W^T||_F`` of a layer
    whose weight W (N, K) is replaced by W' (N, K), on inputs x (T, K)."""
    ref = x.float() @ weight.float().t()
    return float((x.float() @ approx_weight.float().t() - ref).norm() / ref.norm())


__all__ = [
    "QuantizationError", "METHODS", "CALIBRATED_METHODS", "GRANULARITIES", "BACKENDS",
    "qrange", "QTensor", "quantize_tensor", "dequantize", "fake_quantize", "quantization_error",
    "pack_int4", "unpack_int4", "check_group_size", "Int8Weight", "Int4Weight", "quantize_int8",
    "quantize_int4", "int4_group_params", "QuantLinear", "Int8Linear", "Int4Linear", "W8A8Linear",
    "FP8Linear", "fp8_support", "quantize_fp8", "fake_quantize_fp8", "linear_layers",
    "replace_module", "set_backend", "quantize", "model_bytes", "bytes_breakdown",
    "compare_quality", "layer_output_error", "GROUP_SIZES",
]

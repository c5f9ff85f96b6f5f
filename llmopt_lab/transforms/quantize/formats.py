"""Quantization formats: the building blocks and the weight formats the kernels read.

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
    * fp8 e4m3 with a per-tensor scale (:func:`quantize_fp8`).

This module imports no quantization method and no layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import QuantizationError
from ...kernels.quant_matmul import GROUP_SIZES
from ...kernels.reference import dequantize_int4_ref, pack_int4_ref, unpack_int4_ref

GRANULARITIES = ("tensor", "channel", "group")
#: code widths the int4 container takes (fewer levels, same 4-bit slots)
LOW_BITS = (2, 3, 4)

pack_int4 = pack_int4_ref
unpack_int4 = unpack_int4_ref

# =========================================================================== blocks
def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit code: symmetric [-(2^(b-1) - 1), 2^(b-1) - 1]
    (int8: [-127, 127], leaving -128 out so that the range is symmetric), or
    asymmetric [0, 2^b - 1] (int4: [0, 15]).

    Raises QuantizationError naming ``bits`` when it is not an integer in 2..8."""
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

    Raises: nothing on construction (a plain record); :meth:`dequantize`
    raises as :func:`dequantize`.
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
    """``(q - zero) * scale`` with each scale broadcast over the values it covers.

    Raises QuantizationError for a QTensor whose granularity or group size is
    not one :func:`quantize_tensor` takes (an unknown granularity, a group size
    that is not positive or does not divide the last dimension); torch's
    RuntimeError for a scale or zero whose shape does not match the codes."""
    g = _grouped(qt.q.float(), qt.granularity, qt.group_size)
    scale = qt.scale.float().reshape(g.shape[0], g.shape[1], 1)
    if qt.zero is not None:
        g = g - qt.zero.float().reshape(g.shape[0], g.shape[1], 1)
    return (g * scale).reshape(qt.q.shape).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int = 8, symmetric: bool = True,
                  granularity: str = "channel", group_size: int | None = None,
                  clip_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Quantize then dequantize, in x's dtype: the values a quantized model
    computes with, for studying the error in plain float code.

    Raises QuantizationError as :func:`quantize_tensor`: bits outside 2..8, an
    unknown granularity, a group size that is not positive or does not divide
    the last dimension."""
    return dequantize(quantize_tensor(x, bits, symmetric, granularity, group_size, clip_ratio),
                      x.dtype)


def quantization_error(x: torch.Tensor, **kw) -> dict:
    """Error of :func:`fake_quantize` on x: max and RMS absolute error, RMS
    relative to RMS(x), and the signal-to-quantization-noise ratio in dB.

    Raises QuantizationError as :func:`fake_quantize` for bad ``kw`` (bits,
    granularity, group size); TypeError for a keyword it does not take."""
    err = (fake_quantize(x, **kw).float() - x.float())
    rms = err.pow(2).mean().sqrt()
    ref = x.float().pow(2).mean().sqrt()
    return dict(max_abs=float(err.abs().max()), rms=float(rms),
                rel_rms=float(rms / ref) if ref > 0 else 0.0,
                sqnr_db=float(20 * torch.log10(ref / rms)) if rms > 0 else math.inf)


# ===================================================================== weight formats
def check_group_size(group_size: int, in_features: int | None = None, name: str = "") -> None:
    """Check a group size for the int4 kernels (and that it divides K).

    Raises QuantizationError naming the value when ``group_size`` is not one of
    :data:`GROUP_SIZES` or ``in_features`` is not a multiple of it; the
    message lists the sizes to choose from."""
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
    :class:`W8A8Linear` this (N, K).

    Raises: nothing on construction (a plain record, not validated: build it
    with :func:`quantize_int8`)."""

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
    ``W[n, k] = (code[n, k] - zeros[k // G, n]) * scales[k // G, n]``.

    Raises: nothing on construction (a plain record, not validated: build it
    with :func:`quantize_int4` or :meth:`from_codes`); :meth:`from_codes`
    raises QuantizationError as :func:`check_group_size` (a group size the
    kernels do not take, or one that does not divide K)."""

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
    """Symmetric per-output-channel int8 (round to nearest) of a (N, K) weight.

    Raises nothing of its own for a (N, K) float weight (the arguments it
    passes :func:`quantize_tensor` are valid); torch's IndexError for a 0-d
    tensor."""
    qt = quantize_tensor(weight, bits=8, symmetric=True, granularity="channel")
    return Int8Weight(qt.q.to(torch.int8).contiguous(), qt.scale.float().contiguous())


def check_low_bits(bits: int) -> int:
    """Check a code width for the int4 container: 2, 3 or 4 (codes in
    [0, 2^bits - 1], stored in 4-bit slots); returns ``bits``.

    Raises QuantizationError naming ``bits`` for any other value."""
    if isinstance(bits, bool) or bits not in LOW_BITS:
        raise QuantizationError(f"bits must be one of {LOW_BITS} for the int4 format "
                                f"(codes stored in 4-bit slots), got {bits!r}")
    return bits


def quantize_int4(weight: torch.Tensor, group_size: int = 128,
                  clip_ratio: float | torch.Tensor = 1.0, bits: int = 4) -> Int4Weight:
    """Asymmetric per-group int4, round to nearest (RTN), of a (N, K) weight.

    clip_ratio: scalar or (N, K // group_size) range shrink factors (AWQ's clip
    search). bits: 4 (16 levels), or 3 / 2 (8 / 4 levels, codes in
    [0, 2^bits - 1]) in the same packed container, so the same kernels run
    them; their *packed* size, had they their own kernels, is
    :func:`packed_nbytes`. Raises QuantizationError for an unsupported group
    size or bit width, or K not a multiple of the group size.
    """
    check_group_size(group_size, weight.shape[-1])
    check_low_bits(bits)
    qt = quantize_tensor(weight, bits=bits, symmetric=False, granularity="group",
                         group_size=group_size, clip_ratio=clip_ratio)
    return Int4Weight.from_codes(qt.q, qt.scale, qt.zero, group_size)


def int4_group_params(w: torch.Tensor, clip_ratio: float = 1.0,
                      bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (each (N,), float32) of one group of columns w (N, G):
    the affine grid of ``bits`` bits :func:`quantize_int4` would use (GPTQ calls this).

    Raises QuantizationError as :func:`qrange` for ``bits`` outside 2..8."""
    qt = quantize_tensor(w, bits=bits, symmetric=False, granularity="channel", clip_ratio=clip_ratio)
    return qt.scale.float(), qt.zero.float()


def packed_nbytes(out_features: int, in_features: int, bits: int, group_size: int | None = None,
                  param_bytes: int = 5) -> int:
    """Bytes of a (N, K) weight stored at ``bits`` bits per code, packed with no
    slack, plus ``param_bytes`` per group (a float32 scale and a uint8 zero
    point: 5) or per output channel when ``group_size`` is None: what a
    format with its own kernel would need. bits/weight = bits + 8 *
    param_bytes / group_size. Raises QuantizationError for bad sizes."""
    for v, what in ((out_features, "out_features"), (in_features, "in_features"), (bits, "bits")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise QuantizationError(f"{what} must be a positive integer, got {v!r}")
    groups = in_features // group_size if group_size else 1
    return -(-out_features * in_features * bits // 8) + out_features * groups * param_bytes


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ============================================================================ fp8
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite e4m3fn value


def fp8_support(device) -> tuple[bool, str]:
    """(True, '') where real fp8 matmuls (torch._scaled_mm) can run on
    ``device``; else (False, the reason).

    Raises: nothing for a device without fp8 (it says why in the reason);
    torch's RuntimeError for a device it cannot parse."""
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
    e4m3 keeps 3 mantissa bits: a relative rounding error of at most 2^-4.

    Raises QuantizationError when this torch has no float8_e4m3fn (torch < 2.1):
    upgrade torch."""
    if FP8_DTYPE is None:
        raise QuantizationError(f"torch {torch.__version__} has no float8_e4m3fn (needs torch >= 2.1)")
    if scale is None:
        amax = x.detach().abs().amax().float()
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    x8 = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, scale.float().reshape(())


def fake_quantize_fp8(x: torch.Tensor) -> torch.Tensor:
    """Cast to e4m3 with a per-tensor scale and back (x's dtype): works on any device.

    Raises QuantizationError as :func:`quantize_fp8` when this torch has no
    float8_e4m3fn (torch < 2.1): upgrade torch."""
    x8, s = quantize_fp8(x)
    return (x8.float() * s).to(x.dtype)


__all__ = [
    "QuantizationError", "GRANULARITIES", "GROUP_SIZES", "qrange", "QTensor", "quantize_tensor",
    "dequantize", "fake_quantize", "quantization_error", "pack_int4", "unpack_int4",
    "check_group_size", "Int8Weight", "Int4Weight", "quantize_int8", "quantize_int4",
    "int4_group_params", "LOW_BITS", "check_low_bits", "packed_nbytes", "FP8_DTYPE", "FP8_MAX", "fp8_support", "quantize_fp8", "fake_quantize_fp8",
]

"""The device: what it computes natively and what it can do at most.

:func:`device_limits` gives the device's dense peak FLOP/s per dtype and its
memory bandwidth, from a table of vendor figures for known GPUs
(:data:`GPU_TABLE`, :func:`lookup_gpu`), or measured (copy bandwidth, a
large GEMM) for anything else, the CPU included. :func:`native_bf16` and
:func:`fastest_dtype` say which 16-bit dtype the hardware runs natively.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MeasureError, UnsupportedDtypeError
from .results import device_name
from .timing import GiB, MiB, _device, time_fn

__all__ = ["DeviceLimits", "GpuSpec", "GPU_TABLE", "DTYPE_KEYS", "lookup_gpu", "device_limits",
           "table_limits", "measure_bandwidth", "measure_gemm_flops", "dtype_key", "native_bf16",
           "fastest_dtype"]

#: Keys of DeviceLimits.peak_flops. fp32 means the plain FP32 units (no tensor
#: cores); tf32/fp16/bf16/fp8 are tensor-core matmul rates with FP32
#: accumulation; int8 is in OP/s.
DTYPE_KEYS = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8")


def native_bf16(device: Any = None) -> bool:
    """True where the device computes bfloat16 in hardware: a CUDA GPU of
    compute capability 8.0+, or a CPU with AVX512-BF16 or AMX (elsewhere torch
    emulates bfloat16 on the CPU, slower than float32).

    Raises: nothing of its own; torch's RuntimeError for a device it cannot
    parse."""
    dev = _device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: assume emulation
        return False


def fastest_dtype(device: Any = None) -> torch.dtype:
    """The 16-bit dtype serving would use where the hardware has it: bfloat16
    (native), float16 on a GPU without bf16, float32 on a CPU without bf16.

    Raises: nothing of its own; torch's RuntimeError for a device it cannot
    parse."""
    dev = _device(device)
    if native_bf16(dev):
        return torch.bfloat16
    return torch.float16 if dev.type == "cuda" else torch.float32


def dtype_key(dtype: Any) -> str:
    """The :data:`DTYPE_KEYS` name of a torch dtype or a name ('bfloat16', 'bf16').

    Raises MeasureError (a ValueError) for a dtype with no key, naming it and the
    known keys: pass one of those."""
    name = str(dtype).replace("torch.", "").lower()
    aliases = {"float32": "fp32", "float": "fp32", "fp32": "fp32", "tf32": "tf32",
               "float16": "fp16", "half": "fp16", "fp16": "fp16", "bfloat16": "bf16",
               "bf16": "bf16", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "fp8": "fp8",
               "float8_e4m3fnuz": "fp8", "float8_e5m2fnuz": "fp8", "int8": "int8"}
    if name not in aliases:
        raise MeasureError(f"no peak-FLOP/s key for dtype {dtype!r}; known: {', '.join(DTYPE_KEYS)}")
    return aliases[name]


@dataclass
class GpuSpec:
    """One row of :data:`GPU_TABLE`: vendor datasheet figures of a GPU model.

    peak_flops: dense (no structured sparsity) peak per :data:`DTYPE_KEYS` key,
    FLOP/s (OP/s for int8); bandwidth: memory bandwidth in bytes/s;
    memory_gb: nominal memory (decimal GB); source: where the figures come from.

    Raises: nothing; a plain record.
    """

    name: str
    peak_flops: dict[str, float]
    bandwidth: float
    memory_gb: float
    source: str


_TERA = 1e12
_GIGA = 1e9


def _spec(name, fp32, tf32, fp16, bf16, fp8, int8, gb_s, memory_gb, source) -> GpuSpec:
    """A table row from datasheet units: TFLOP/s (TOP/s for int8) and GB/s."""
    flops = {"fp32": fp32, "tf32": tf32, "fp16": fp16, "bf16": bf16, "fp8": fp8, "int8": int8}
    return GpuSpec(name=name, peak_flops={k: v * _TERA for k, v in flops.items() if v is not None},
                   bandwidth=gb_s * _GIGA, memory_gb=memory_gb, source=source)


# Dense figures. Data-center datasheets print the tensor-core rates "with
# sparsity" (marked *); the dense rate is half of that, and is what a plain
# matmul can reach. Consumer cards: NVIDIA's architecture whitepapers (Ampere
# GA102, Ada AD102) list dense and sparse rates; the FP16/BF16/FP8 figures
# used here are those "with FP32 accumulate" (what torch.matmul does), which
# on GeForce cards is half the FP16-accumulate rate.
GPU_TABLE: dict[str, GpuSpec] = {
    # NVIDIA H100 datasheet: SXM5 80 GB: FP32 67 TF, TF32 989*, BF16/FP16 1979*,
    # FP8 3958*, INT8 3958* TOPS, HBM3 3.35 TB/s.
    "H100 SXM": _spec("NVIDIA H100 SXM", 67, 494.7, 989.4, 989.4, 1978.9, 1978.9, 3350, 80,
                      "NVIDIA H100 datasheet (SXM5), sparse rates halved"),
    # same datasheet, PCIe 80 GB: FP32 51 TF, TF32 756*, BF16 1513*, FP8 3026*,
    # INT8 3026*, HBM2e 2.0 TB/s.
    "H100 PCIe": _spec("NVIDIA H100 PCIe", 51.2, 378, 756.5, 756.5, 1513, 1513, 2000, 80,
                       "NVIDIA H100 datasheet (PCIe), sparse rates halved"),
    # same datasheet, NVL 94 GB (per GPU): FP32 60 TF, TF32 835*, BF16 1671*,
    # FP8 3341*, INT8 3341*, HBM3 3.9 TB/s.
    "H100 NVL": _spec("NVIDIA H100 NVL", 60, 417.5, 835.5, 835.5, 1670.5, 1670.5, 3900, 94,
                      "NVIDIA H100 datasheet (NVL, per GPU), sparse rates halved"),
    # NVIDIA H200 datasheet: SXM 141 GB: FP32 67 TF, TF32 989*, BF16 1979*,
    # FP8 3958*, INT8 3958*, HBM3e 4.8 TB/s (the same compute as H100 SXM).
    "H200 SXM": _spec("NVIDIA H200 SXM", 67, 494.7, 989.4, 989.4, 1978.9, 1978.9, 4800, 141,
                      "NVIDIA H200 datasheet (SXM), sparse rates halved"),
    # same datasheet, H200 NVL: FP32 60 TF, TF32 835*, BF16 1671*, FP8 3341*, 4.8 TB/s.
    "H200 NVL": _spec("NVIDIA H200 NVL", 60, 417.5, 835.5, 835.5, 1670.5, 1670.5, 4800, 141,
                      "NVIDIA H200 datasheet (NVL), sparse rates halved"),
    # NVIDIA GH200 datasheet: the Hopper GPU of H100 SXM; 96 GB HBM3 at 4 TB/s
    # or 144 GB HBM3e at 4.9 TB/s.
    "GH200 96GB": _spec("NVIDIA GH200 (96 GB HBM3)", 67, 494.7, 989.4, 989.4, 1978.9, 1978.9,
                        4000, 96, "NVIDIA GH200 datasheet, sparse rates halved"),
    "GH200 144GB": _spec("NVIDIA GH200 (144 GB HBM3e)", 67, 494.7, 989.4, 989.4, 1978.9, 1978.9,
                         4900, 144, "NVIDIA GH200 datasheet, sparse rates halved"),
    # NVIDIA A100 datasheet: FP32 19.5 TF, TF32 156 (312*), BF16/FP16 312 (624*),
    # INT8 624 (1248*) TOPS, no FP8. Bandwidth: 40 GB PCIe 1,555 GB/s, 40 GB SXM
    # 1,555 GB/s, 80 GB PCIe 1,935 GB/s, 80 GB SXM 2,039 GB/s.
    "A100 SXM 80GB": _spec("NVIDIA A100 SXM 80GB", 19.5, 156, 312, 312, None, 624, 2039, 80,
                           "NVIDIA A100 datasheet"),
    "A100 SXM 40GB": _spec("NVIDIA A100 SXM 40GB", 19.5, 156, 312, 312, None, 624, 1555, 40,
                           "NVIDIA A100 datasheet"),
    "A100 PCIe 80GB": _spec("NVIDIA A100 PCIe 80GB", 19.5, 156, 312, 312, None, 624, 1935, 80,
                            "NVIDIA A100 datasheet"),
    "A100 PCIe 40GB": _spec("NVIDIA A100 PCIe 40GB", 19.5, 156, 312, 312, None, 624, 1555, 40,
                            "NVIDIA A100 datasheet"),
    # NVIDIA L4 datasheet: FP32 30.3 TF, TF32 120*, FP16/BF16 242*, FP8 485*,
    # INT8 485* TOPS, GDDR6 300 GB/s.
    "L4": _spec("NVIDIA L4", 30.3, 60, 121, 121, 242.5, 242.5, 300, 24,
                "NVIDIA L4 datasheet, sparse rates halved"),
    # NVIDIA L40S datasheet: FP32 91.6 TF, TF32 183 (366*), BF16/FP16 362.05
    # (733*), FP8 733 (1466*), INT8 733 (1466*), GDDR6 864 GB/s.
    "L40S": _spec("NVIDIA L40S", 91.6, 183, 362.05, 362.05, 733, 733, 864, 48,
                  "NVIDIA L40S datasheet"),
    # NVIDIA L40 datasheet: FP32 90.5 TF, TF32 90.5 (181*), BF16/FP16 181.05
    # (362.1*), FP8 362 (724*), INT8 362 (724*), GDDR6 864 GB/s.
    "L40": _spec("NVIDIA L40", 90.5, 90.5, 181.05, 181.05, 362, 362, 864, 48,
                 "NVIDIA L40 datasheet"),
    # NVIDIA A10 datasheet: FP32 31.2 TF, TF32 62.5 (125*), BF16/FP16 125 (250*),
    # INT8 250 (500*) TOPS, GDDR6 600 GB/s. (The A10G, an AWS-only variant,
    # has no NVIDIA datasheet: lookup_gpu returns None for it and it is measured.)
    "A10": _spec("NVIDIA A10", 31.2, 62.5, 125, 125, None, 250, 600, 24, "NVIDIA A10 datasheet"),
    # NVIDIA T4 datasheet: FP32 8.1 TF, mixed-precision FP16 65 TF, INT8 130 TOPS,
    # GDDR6 320 GB/s; no BF16, TF32 or FP8 tensor cores (Turing).
    "T4": _spec("NVIDIA T4", 8.1, None, 65, None, None, 130, 320, 16, "NVIDIA T4 datasheet"),
    # NVIDIA Ampere GA102 whitepaper, RTX 3090: FP32 35.6 TF, TF32 35.6, FP16 and
    # BF16 (FP32 accumulate) 71, INT8 284 TOPS, GDDR6X 936 GB/s.
    "RTX 3090": _spec("NVIDIA GeForce RTX 3090", 35.6, 35.6, 71, 71, None, 284, 936, 24,
                      "NVIDIA Ampere GA102 whitepaper (dense, FP32 accumulate)"),
    # same whitepaper, RTX 3080 (10 GB): FP32 29.8 TF, TF32 29.8, FP16/BF16 (FP32
    # accumulate) 59.5, INT8 238 TOPS, GDDR6X 760 GB/s.
    "RTX 3080": _spec("NVIDIA GeForce RTX 3080", 29.8, 29.8, 59.5, 59.5, None, 238, 760, 10,
                      "NVIDIA Ampere GA102 whitepaper (dense, FP32 accumulate)"),
    # NVIDIA Ada whitepaper, RTX 4090: FP32 82.6 TF, TF32 82.6, FP16/BF16 (FP32
    # accumulate) 165.2, FP8 (FP32 accumulate) 330.3, INT8 660.6 TOPS,
    # GDDR6X 1,008 GB/s.
    "RTX 4090": _spec("NVIDIA GeForce RTX 4090", 82.6, 82.6, 165.2, 165.2, 330.3, 660.6, 1008, 24,
                      "NVIDIA Ada whitepaper (dense, FP32 accumulate)"),
    # same whitepaper, RTX 4080 (16 GB): FP32 48.7 TF, TF32 48.7, FP16/BF16 (FP32
    # accumulate) 97.5, FP8 (FP32 accumulate) 194.9, INT8 389.9 TOPS, GDDR6X 716.8 GB/s.
    "RTX 4080": _spec("NVIDIA GeForce RTX 4080", 48.7, 48.7, 97.5, 97.5, 194.9, 389.9, 716.8, 16,
                      "NVIDIA Ada whitepaper (dense, FP32 accumulate)"),
}


def lookup_gpu(name: str, memory_bytes: int | None = None,
               sm_count: int | None = None) -> GpuSpec | None:
    """The :data:`GPU_TABLE` row for a device name as ``torch.cuda.get_device_name``
    reports it, or None when the GPU is not in the table.

    memory_bytes (``total_memory``) and sm_count (``multi_processor_count``)
    settle names that do not say the form factor: an H100 with 114 SMs is the
    PCIe card, one with more than 90 GiB is the NVL; an A100 with more than
    60 GiB is the 80 GB model; a GH200 with more than 120 GiB has HBM3e.
    Laptop parts, "D"/"Ti"/"SUPER" variants, the RTX 3080 12 GB and the A10G
    are not in the table (no matching datasheet figures): None.

    Raises: nothing for any name string (an unknown GPU gives None).
    """
    n = " ".join(name.lower().replace("-", " ").replace("_", " ").split())
    gib = memory_bytes / GiB if memory_bytes else None

    def has(pattern: str) -> bool:
        return re.search(pattern, n) is not None

    if has(r"laptop|mobile|max q"):
        return None
    if has(r"\bgh200\b"):
        return GPU_TABLE["GH200 144GB" if gib and gib > 120 else "GH200 96GB"]
    if has(r"\bh200\b"):
        return GPU_TABLE["H200 NVL" if has(r"\bnvl\b") else "H200 SXM"]
    if has(r"\bh100\b"):
        if has(r"\bpcie\b"):
            return GPU_TABLE["H100 PCIe"]
        if has(r"\bnvl\b"):
            return GPU_TABLE["H100 NVL"]
        if has(r"\bsxm\d*\b|\bhbm3\b"):
            return GPU_TABLE["H100 SXM"]
        if sm_count == 114:
            return GPU_TABLE["H100 PCIe"]
        if gib and gib > 90:
            return GPU_TABLE["H100 NVL"]
        return GPU_TABLE["H100 SXM"]
    if has(r"\ba100\b"):
        big = has(r"\b80gb\b") or bool(gib and gib > 60)
        form = "PCIe" if has(r"\bpcie\b") else "SXM"
        return GPU_TABLE[f"A100 {form} {'80GB' if big else '40GB'}"]
    if has(r"\bl40s\b"):
        return GPU_TABLE["L40S"]
    if has(r"\bl40\b"):
        return GPU_TABLE["L40"]
    if has(r"\bl4\b"):
        return GPU_TABLE["L4"]
    if has(r"\ba10\b"):  # not A10G, A100
        return GPU_TABLE["A10"]
    if has(r"\bt4\b"):
        return GPU_TABLE["T4"]
    m = re.search(r"\brtx (3080|3090|4080|4090)\b(?: (\w+))?", n)
    if m:
        if m.group(2) is not None:  # Ti, SUPER, D: other chips or clocks
            return None
        if m.group(1) == "3080" and gib and gib > 11:  # the 12 GB card has more SMs
            return None
        return GPU_TABLE[f"RTX {m.group(1)}"]
    return None


class UnknownDtypeFigure(UnsupportedDtypeError, KeyError):
    """A device's limits have no peak-FLOP/s figure for this dtype. A
    library error (UnsupportedDtypeError, a ValueError) and, for code written
    against the older behaviour, also a KeyError."""

    __str__ = BaseException.__str__  # the message, not KeyError's quoted repr


@dataclass
class DeviceLimits:
    """What a device can do at most.

    name: the device's name; peak_flops: dense peak per :data:`DTYPE_KEYS` key
    in FLOP/s (OP/s for int8); bandwidth: memory bandwidth in bytes/s;
    source: "table" (vendor datasheet, see :data:`GPU_TABLE`) or "measured"
    (copy bandwidth and GEMM rate measured here); measured: measured figures
    when they were taken ({"bandwidth": bytes/s, "flops": {key: FLOP/s}}),
    also alongside table figures.

    Raises: nothing on construction (a plain record); :meth:`flops` and
    :meth:`ridge_point` raise UnknownDtypeFigure (an UnsupportedDtypeError)
    for a dtype these limits have no figure for, and MeasureError as
    :func:`dtype_key` for a dtype with no key at all.
    """

    name: str
    peak_flops: dict[str, float]
    bandwidth: float
    source: str
    measured: dict = field(default_factory=dict)
    note: str = ""

    def flops(self, dtype: Any) -> float:
        """Peak FLOP/s for a dtype (torch dtype or key).

        Raises:
            UnknownDtypeFigure: (an UnsupportedDtypeError, also a KeyError as
                before) when these limits have no figure for the dtype.
        """
        key = dtype_key(dtype)
        if key not in self.peak_flops:
            raise UnknownDtypeFigure(f"{self.name} has no {key} figure ({self.source}); known: "
                                     f"{', '.join(self.peak_flops)}; pick one of those dtypes")
        return self.peak_flops[key]

    def ridge_point(self, dtype: Any) -> float:
        """Arithmetic intensity (FLOP/byte) where the compute roof meets the memory roof."""
        return self.flops(dtype) / self.bandwidth

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        flops = ", ".join(f"{k} {v / _TERA:.3g} TFLOP/s" for k, v in self.peak_flops.items())
        return f"{self.name}: {self.bandwidth / _GIGA:.4g} GB/s, {flops} ({self.source})"


def measure_bandwidth(device: Any = None, nbytes: int | None = None, repeat: int = 3) -> float:
    """Copy bandwidth in bytes/s: ``dst.copy_(src)`` over buffers larger than
    the caches (default 1 GiB each on a GPU, 256 MiB on the CPU), counting the
    bytes read plus the bytes written (2 x nbytes per copy). The fastest of
    ``repeat`` runs after one warm-up.

    Raises MeasureError as :func:`time_fn` for ``repeat`` < 1; torch's errors
    for buffers that do not fit in the device's memory (pass a smaller
    ``nbytes``) or a device it cannot parse."""
    dev = _device(device)
    if nbytes is None:
        nbytes = GiB if dev.type == "cuda" else 256 * MiB
    n = int(nbytes) // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=1, repeat=repeat, device=dev)
    return 2 * n * 4 / t.min


def measure_gemm_flops(device: Any = None, dtype: torch.dtype | None = None, n: int | None = None,
                       repeat: int = 3) -> float:
    """FLOP/s of an (n, n) x (n, n) matmul in ``dtype`` (2 n^3 FLOPs), the fastest
    of ``repeat`` runs after one warm-up. Defaults: bfloat16 with n = 8192 on a
    GPU (float16 where bf16 is unsupported), float32 with n = 1024 on the CPU.

    Raises MeasureError as :func:`time_fn` for ``repeat`` < 1; torch's errors for
    a dtype the device cannot multiply in, matrices that do not fit (pass a
    smaller ``n``) or a device it cannot parse."""
    dev = _device(device)
    if dtype is None:
        if dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    if n is None:
        n = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    t = time_fn(lambda: torch.mm(a, b), warmup=1, repeat=repeat, device=dev)
    return 2 * n ** 3 / t.min


def table_limits(key: str) -> DeviceLimits:
    """The datasheet limits of a GPU in :data:`GPU_TABLE` by its key (e.g.
    ``"H100 SXM"``), without that GPU being here: for what-if rooflines.

    Raises MeasureError (a ValueError) for a key not in the table, naming it and
    the known keys: pass one of those."""
    try:
        spec = GPU_TABLE[key]
    except KeyError:
        raise MeasureError(f"no GPU {key!r} in the table; known: {', '.join(GPU_TABLE)}") from None
    return DeviceLimits(name=spec.name, peak_flops=dict(spec.peak_flops), bandwidth=spec.bandwidth,
                        source="table", note=spec.source)


def device_limits(device: Any = None, measure: bool | None = None,
                  dtype: torch.dtype | None = None) -> DeviceLimits:
    """The peak FLOP/s and bandwidth of a device.

    GPU in :data:`GPU_TABLE`: the datasheet figures (source "table"), plus
    measured ones in ``.measured`` when ``measure=True``. Any other device
    (the CPU, an unknown GPU): measured copy bandwidth and GEMM FLOP/s in
    ``dtype`` (default: bf16 on a GPU, fp32 on the CPU), source "measured";
    ``measure=False`` then raises MeasureError. On the CPU this takes about a
    second (256 MiB copy, 1024^3 GEMM).

    Raises MeasureError (a ValueError) naming the device when it is not in the
    table and ``measure=False`` (pass ``measure=None`` to measure it), or as
    :func:`dtype_key` for a ``dtype`` with no key; torch's errors for a
    device it cannot parse or a dtype it cannot multiply in.
    """
    dev = _device(device)
    name = device_name(dev)
    spec = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        spec = lookup_gpu(name, props.total_memory, props.multi_processor_count)
    if spec is not None and not measure:
        return DeviceLimits(name=name, peak_flops=dict(spec.peak_flops), bandwidth=spec.bandwidth,
                            source="table", note=spec.source)
    if measure is False:
        raise MeasureError(f"{name} is not in the limits table and measure=False")
    bw = measure_bandwidth(dev)
    if dtype is None:
        dtype = torch.float32 if dev.type != "cuda" else (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    flops = {dtype_key(dtype): measure_gemm_flops(dev, dtype)}
    measured = {"bandwidth": bw, "flops": flops}
    if spec is not None:
        return DeviceLimits(name=name, peak_flops=dict(spec.peak_flops), bandwidth=spec.bandwidth,
                            source="table", measured=measured, note=spec.source)
    return DeviceLimits(name=name, peak_flops=dict(flops), bandwidth=bw, source="measured",
                        measured=measured,
                        note="copy bandwidth (read + write bytes) and GEMM rate measured here")

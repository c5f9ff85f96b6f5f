"""Measuring: timers, memory, the device's limits, roofline costs, provenance.

Every speed figure in the course goes through this module, so that all
lessons measure the same way:

* :func:`time_fn` warms up, synchronizes (CUDA events on a GPU,
  ``perf_counter`` on the CPU) and returns a :class:`Timing` (median, spread,
  every sample, in seconds). Kernels whose operands fit in the GPU's L2 cache
  are timed with ``flush_l2=True`` or with :class:`OperandRotation`, otherwise
  a weight-bound kernel looks faster than memory allows.
* :func:`peak_memory` is a context manager that reports the allocator's peak
  on a GPU and the resident set size on the CPU.
* :func:`device_limits` gives the device's dense peak FLOP/s per dtype and its
  memory bandwidth, from a table of vendor figures for known GPUs, or measured
  (copy bandwidth, a large GEMM) for anything else, the CPU included.
* :func:`step_cost` counts the FLOPs and bytes of a prefill or decode step of a
  :class:`~llmopt_lab.config.ModelConfig`; with :func:`roofline_time` and
  :func:`achieved_fraction` a measured step is placed against the roofline.
* :func:`profile_step` says where a step's time goes: how many ops and
  kernels it launches and how busy the device is (small models at batch 1 are
  bound by launch overhead, not by bandwidth).
* :func:`provenance`, :func:`save_result` and :func:`load_results` stamp every
  result with device, versions and commit, and keep it as JSON under
  ``results/<device-slug>/<name>.json`` for the lessons to show.

Quality and serving metrics live in :mod:`llmopt_lab.metrics` and are
re-exported here so that benchmark code needs one import.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .config import ModelConfig, bytes_per_element
from .metrics import (ServingStats, kl_divergence, percentile, perplexity_from_nll,  # noqa: F401
                      serving_stats, token_nll, top1_agreement)

__all__ = [
    # timing
    "Timing", "time_fn", "synchronize", "l2_cache_bytes", "OperandRotation",
    # memory
    "MemoryUsage", "peak_memory",
    # device limits
    "DeviceLimits", "GpuSpec", "GPU_TABLE", "DTYPE_KEYS", "lookup_gpu", "device_limits", "table_limits",
    "measure_bandwidth", "measure_gemm_flops", "dtype_key", "native_bf16", "fastest_dtype",
    # roofline
    "StepCost", "step_cost", "arithmetic_intensity", "attainable_flops", "roofline_time",
    "achieved_fraction",
    # profiling
    "OpRow", "StepProfile", "profile_step",
    # provenance and results
    "provenance", "device_name", "device_slug", "save_result", "load_results",
    "default_results_root",
    # re-exported metrics
    "token_nll", "perplexity_from_nll", "kl_divergence", "top1_agreement", "percentile",
    "ServingStats", "serving_stats",
]

MiB = 1 << 20
GiB = 1 << 30


def _device(device: Any = None) -> torch.device:
    """The device to measure on: the given one, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def synchronize(device: Any = None) -> None:
    """Wait until the device has finished all queued work (a no-op on the CPU)."""
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# =================================================================== timing
@dataclass
class Timing:
    """Result of :func:`time_fn`. All times in seconds.

    median: the reported figure; p10, p90: the 10th and 90th percentiles;
    min, max, mean: over ``samples``, the time of every timed run in order.
    """

    median: float
    p10: float
    p90: float
    min: float
    max: float
    mean: float
    samples: list[float]
    device: str = "cpu"
    unit: str = "s"

    @classmethod
    def from_samples(cls, samples: Sequence[float], device: str = "cpu") -> "Timing":
        if not samples:
            raise ValueError("no samples")
        s = [float(x) for x in samples]
        return cls(median=statistics.median(s), p10=percentile(s, 10), p90=percentile(s, 90),
                   min=min(s), max=max(s), mean=statistics.fmean(s), samples=s, device=device)

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative spread, 0 for perfectly steady runs."""
        return (self.p90 - self.p10) / self.median if self.median > 0 else float("nan")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        scale, unit = _time_unit(self.median)
        return (f"{self.median * scale:.3g} {unit} median (p10 {self.p10 * scale:.3g}, "
                f"p90 {self.p90 * scale:.3g}; {len(self.samples)} runs on {self.device})")


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 1:
        return 1.0, "s"
    if seconds >= 1e-3:
        return 1e3, "ms"
    return 1e6, "us"


def time_fn(fn: Callable, *, warmup: int = 2, repeat: int = 10, device: Any = None,
            flush_l2: bool = False, setup: Callable | None = None,
            flush_bytes: int | None = None) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed ones.

    device: where ``fn`` runs (default: CUDA when available, else CPU). On a
        GPU each run is bracketed by CUDA events and the stream synchronized
        once at the end; on the CPU ``time.perf_counter`` brackets each call.
        Pass ``device="cpu"`` to time CPU work on a machine that has a GPU.
    flush_l2: before every run (untimed), overwrite a buffer larger than the
        last-level cache (``flush_bytes``; default 256 MiB on a GPU, whose L2
        is 40-100 MB, and 2x the CPU's last-level cache on the CPU), so that
        each run starts with cold caches. See also :class:`OperandRotation`.
    setup: called before every run (warm-up included), outside the timed
        region; if it returns something other than None, ``fn`` is called with
        that value as its only argument (e.g. ``setup=rotation.next``).
    Returns a :class:`Timing` in seconds. Raises ValueError if repeat < 1.
    """
    if repeat < 1 or warmup < 0:
        raise ValueError(f"need repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    dev = _device(device)
    flush_buf = None
    if flush_l2:
        if flush_bytes is None:
            flush_bytes = 256 * MiB if dev.type == "cuda" else 2 * l2_cache_bytes(dev)
        flush_buf = torch.empty(int(flush_bytes), dtype=torch.uint8, device=dev)

    def call() -> Any:
        arg = setup() if setup is not None else None
        if flush_buf is not None:
            flush_buf.zero_()
        return arg

    def run(arg) -> None:
        if arg is None:
            fn()
        else:
            fn(arg)

    for _ in range(warmup):
        run(call())
    synchronize(dev)

    if dev.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        for i in range(repeat):
            arg = call()
            starts[i].record()
            run(arg)
            ends[i].record()
        torch.cuda.synchronize(dev)
        samples = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]  # ms -> s
    else:
        samples = []
        for _ in range(repeat):
            arg = call()
            t0 = time.perf_counter()
            run(arg)
            samples.append(time.perf_counter() - t0)
    return Timing.from_samples(samples, device=str(dev))


#: Fallback when the driver does not say (bytes): larger than any current GPU's L2.
_DEFAULT_L2_BYTES = 128 * MiB


def l2_cache_bytes(device: Any = None) -> int:
    """Size in bytes of the cache a kernel's operands could hide in.

    GPU: the L2 size reported by the driver (50 MB on an H100 SXM), or
    128 MiB when this torch does not report it. CPU: the largest
    cache level listed under /sys (the L3 on most machines), else 32 MiB.
    """
    dev = _device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        size = getattr(props, "L2_cache_size", None) or getattr(props, "l2_cache_size", None)
        return int(size) if size else _DEFAULT_L2_BYTES
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
            best = max(best, int(m.group(1)) * mult)
    return best or 32 * MiB


class OperandRotation:
    """Copies of a kernel's operands, cycled so that no run finds them in cache.

    A kernel whose operands total less than the L2 size (e.g. a 16 MB
    weight matrix on an H100 with 50 MB of L2) reads them from L2, not from
    HBM, when it is run again and again, and looks faster than the memory
    bandwidth allows. This class keeps ``copies`` sets of the operands whose
    total exceeds ``margin`` x the cache size, and :meth:`next` hands out the
    next set, round robin. The first set is the original tensors (no copy).

    operands: a tensor or a sequence of tensors (other items are passed
        through uncopied). l2_bytes: the cache size (default:
        :func:`l2_cache_bytes` of the first tensor's device). margin: how many
        times the cache the copies must exceed together (2 by default:
        caches do not evict in perfect LRU order). ``copies`` =
        floor(margin x l2_bytes / bytes_per_set) + 1, at least 1.

    Use: ``rot = OperandRotation((a, b)); time_fn(lambda ab: mm(*ab), setup=rot.next)``.
    """

    def __init__(self, operands, *, l2_bytes: int | None = None, margin: float = 2.0,
                 max_copies: int = 1024):
        single = isinstance(operands, torch.Tensor)
        self._single = single
        items = (operands,) if single else tuple(operands)
        tensors = [t for t in items if isinstance(t, torch.Tensor)]
        if not tensors:
            raise ValueError("OperandRotation needs at least one tensor")
        self.bytes_per_set = sum(t.numel() * t.element_size() for t in tensors)
        if l2_bytes is None:
            l2_bytes = l2_cache_bytes(tensors[0].device)
        self.l2_bytes = int(l2_bytes)
        self.copies = self.copies_needed(self.bytes_per_set, self.l2_bytes, margin, max_copies)
        self.sets = [items] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in items)
                               for _ in range(self.copies - 1)]
        self._i = 0

    @staticmethod
    def copies_needed(bytes_per_set: int, l2_bytes: int, margin: float = 2.0,
                      max_copies: int = 1024) -> int:
        """Smallest count of operand sets whose total exceeds margin x l2_bytes."""
        if bytes_per_set <= 0:
            raise ValueError("operands hold no bytes")
        return max(1, min(max_copies, math.floor(margin * l2_bytes / bytes_per_set) + 1))

    @property
    def total_bytes(self) -> int:
        return self.copies * self.bytes_per_set

    def __len__(self) -> int:
        return self.copies

    def next(self):
        """The next operand set (a tensor if one was given, else a tuple)."""
        items = self.sets[self._i]
        self._i = (self._i + 1) % self.copies
        return items[0] if self._single else items


# =================================================================== memory
@dataclass
class MemoryUsage:
    """Memory during a :func:`peak_memory` block, in bytes.

    GPU: ``start``/``end``: bytes allocated by torch's caching allocator;
    ``peak``: the allocator's peak inside the block (reset on entry).
    CPU: ``start``/``end``: the process's resident set size (RSS); ``peak``:
    the peak RSS (VmHWM). ``peak_scope`` says what the peak covers: "block"
    when it was reset on entry, "process" when it could not be and is the
    peak over the process's whole life (then it may predate the block).
    Without /proc (macOS, Windows) only the lifetime peak is known (from
    getrusage) and start, end and peak all hold it.
    """

    device: str
    start: int = 0
    end: int = 0
    peak: int = 0
    peak_scope: str = "block"

    @property
    def peak_increase(self) -> int:
        """Peak above the level at entry: the block's extra memory at its worst."""
        return max(0, self.peak - self.start)

    @property
    def delta(self) -> int:
        """What the block left allocated (end - start; may be negative)."""
        return self.end - self.start

    def __str__(self) -> str:
        return (f"peak {self.peak / MiB:.1f} MiB ({self.peak_increase / MiB:+.1f} MiB over the "
                f"start, scope: {self.peak_scope}), left {self.delta / MiB:+.1f} MiB "
                f"on {self.device}")


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_and_peak() -> tuple[int, int]:
    rss = _proc_status_bytes("VmRSS")
    hwm = _proc_status_bytes("VmHWM")
    if rss is not None and hwm is not None:
        return rss, hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB on Linux
    return peak, peak  # no portable current RSS without psutil


@contextmanager
def peak_memory(device: Any = None) -> Iterator[MemoryUsage]:
    """Measure the memory a block uses; the :class:`MemoryUsage` is filled on exit.

    ``with peak_memory("cuda") as mem: run(); print(mem.peak_increase)``

    GPU: resets ``torch.cuda`` peak statistics on entry and reads
    ``max_memory_allocated`` on exit (tensors only: not the allocator's cached
    free blocks, not the CUDA context).
    CPU: reads the resident set size from /proc/self/status. The peak (VmHWM)
    is reset on entry through /proc/self/clear_refs where the kernel allows it
    (Linux 4.0+); where it does not (other systems, restricted containers) the
    peak is the whole process's peak and ``peak_scope`` says "process". RSS
    counts every allocation of the process (Python objects, libraries, other
    threads), not only tensors, and memory freed to the allocator may stay
    resident.
    """
    dev = _device(device)
    usage = MemoryUsage(device=str(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        usage.start = torch.cuda.memory_allocated(dev)
        try:
            yield usage
        finally:
            torch.cuda.synchronize(dev)
            usage.end = torch.cuda.memory_allocated(dev)
            usage.peak = torch.cuda.max_memory_allocated(dev)
        return
    usage.peak_scope = "block" if _reset_peak_rss() else "process"
    usage.start, _ = _rss_and_peak()
    try:
        yield usage
    finally:
        usage.end, usage.peak = _rss_and_peak()
        usage.peak = max(usage.peak, usage.end)


# ============================================================ device limits
#: Keys of DeviceLimits.peak_flops. fp32 means the plain FP32 units (no tensor
#: cores); tf32/fp16/bf16/fp8 are tensor-core matmul rates with FP32
#: accumulation; int8 is in OP/s.
DTYPE_KEYS = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8")


def native_bf16(device: Any = None) -> bool:
    """True where the device computes bfloat16 in hardware: a CUDA GPU of
    compute capability 8.0+, or a CPU with AVX512-BF16 or AMX (elsewhere torch
    emulates bfloat16 on the CPU, slower than float32)."""
    dev = _device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: assume emulation
        return False


def fastest_dtype(device: Any = None) -> torch.dtype:
    """The 16-bit dtype serving would use where the hardware has it: bfloat16
    (native), float16 on a GPU without bf16, float32 on a CPU without bf16."""
    dev = _device(device)
    if native_bf16(dev):
        return torch.bfloat16
    return torch.float16 if dev.type == "cuda" else torch.float32


def dtype_key(dtype: Any) -> str:
    """The :data:`DTYPE_KEYS` name of a torch dtype or a name ('bfloat16', 'bf16')."""
    name = str(dtype).replace("torch.", "").lower()
    aliases = {"float32": "fp32", "float": "fp32", "fp32": "fp32", "tf32": "tf32",
               "float16": "fp16", "half": "fp16", "fp16": "fp16", "bfloat16": "bf16",
               "bf16": "bf16", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "fp8": "fp8",
               "float8_e4m3fnuz": "fp8", "float8_e5m2fnuz": "fp8", "int8": "int8"}
    if name not in aliases:
        raise ValueError(f"no peak-FLOP/s key for dtype {dtype!r}; known: {', '.join(DTYPE_KEYS)}")
    return aliases[name]


@dataclass
class GpuSpec:
    """One row of :data:`GPU_TABLE`: vendor datasheet figures of a GPU model.

    peak_flops: dense (no structured sparsity) peak per :data:`DTYPE_KEYS` key,
    FLOP/s (OP/s for int8); bandwidth: memory bandwidth in bytes/s;
    memory_gb: nominal memory (decimal GB); source: where the figures come from.
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


@dataclass
class DeviceLimits:
    """What a device can do at most.

    name: the device's name; peak_flops: dense peak per :data:`DTYPE_KEYS` key
    in FLOP/s (OP/s for int8); bandwidth: memory bandwidth in bytes/s;
    source: "table" (vendor datasheet, see :data:`GPU_TABLE`) or "measured"
    (copy bandwidth and GEMM rate measured here); measured: measured figures
    when they were taken ({"bandwidth": bytes/s, "flops": {key: FLOP/s}}),
    also alongside table figures.
    """

    name: str
    peak_flops: dict[str, float]
    bandwidth: float
    source: str
    measured: dict = field(default_factory=dict)
    note: str = ""

    def flops(self, dtype: Any) -> float:
        """Peak FLOP/s for a dtype (torch dtype or key). Raises KeyError when unknown."""
        key = dtype_key(dtype)
        if key not in self.peak_flops:
            raise KeyError(f"{self.name} has no {key} figure ({self.source}); known: "
                           f"{', '.join(self.peak_flops)}")
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
    ``repeat`` runs after one warm-up."""
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
    GPU (float16 where bf16 is unsupported), float32 with n = 1024 on the CPU."""
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
    ``"H100 SXM"``), without that GPU being here: for what-if rooflines."""
    try:
        spec = GPU_TABLE[key]
    except KeyError:
        raise ValueError(f"no GPU {key!r} in the table; known: {', '.join(GPU_TABLE)}") from None
    return DeviceLimits(name=spec.name, peak_flops=dict(spec.peak_flops), bandwidth=spec.bandwidth,
                        source="table", note=spec.source)


def device_limits(device: Any = None, measure: bool | None = None,
                  dtype: torch.dtype | None = None) -> DeviceLimits:
    """The peak FLOP/s and bandwidth of a device.

    GPU in :data:`GPU_TABLE`: the datasheet figures (source "table"), plus
    measured ones in ``.measured`` when ``measure=True``. Any other device
    (the CPU, an unknown GPU): measured copy bandwidth and GEMM FLOP/s in
    ``dtype`` (default: bf16 on a GPU, fp32 on the CPU), source "measured";
    ``measure=False`` then raises ValueError. On the CPU this takes about a
    second (256 MiB copy, 1024^3 GEMM).
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
        raise ValueError(f"{name} is not in the limits table and measure=False")
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


# ================================================================= roofline
@dataclass
class StepCost:
    """FLOPs and bytes of one forward step (see :func:`step_cost`).

    flops: total FLOPs (2 per multiply-accumulate); bytes: total bytes moved
    to and from device memory; breakdown: the parts, keys ``flops_linear``,
    ``flops_attention``, ``flops_lm_head``, ``bytes_weights``,
    ``bytes_kv_read``, ``bytes_kv_write``, ``bytes_activations``;
    tokens: tokens processed (batch x new_tokens).
    """

    flops: float
    bytes: float
    breakdown: dict[str, float]
    tokens: int

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOP/byte."""
        return self.flops / self.bytes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _nbytes(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else float(bytes_per_element(x))


def _visible_keys(context_len: int, new_tokens: int, window: int | None) -> int:
    """Sum over the new queries of the keys each sees (causal, optional window).

    The query at position p (0-based) sees positions max(0, p - window + 1)..p:
    min(p + 1, window) keys. Summed over p = context_len .. context_len + new - 1.
    """
    def upto(n: int) -> int:  # sum over p < n of min(p + 1, window)
        if window is None or n <= window:
            return n * (n + 1) // 2
        return window * (window + 1) // 2 + (n - window) * window
    return upto(context_len + new_tokens) - upto(context_len)


def step_cost(config: ModelConfig, batch: int, new_tokens: int, context_len: int = 0,
              dtype_bytes: Any = 2, kv_dtype_bytes: Any = None, *,
              act_bytes: Any = None, logit_tokens: int = 1,
              counted_context: int | None = None) -> StepCost:
    """FLOPs and bytes of one forward step over ``new_tokens`` tokens per sequence.

    Prefill of a T-token prompt: ``new_tokens=T, context_len=0``; a decode
    step after L tokens: ``new_tokens=1, context_len=L``. Every sequence of
    the batch has the same lengths. dtype_bytes / kv_dtype_bytes / act_bytes:
    bytes per element (a number, or a dtype / dtype name) of the weights, the
    KV cache (default: as the weights) and the activations (default: as the
    weights).

    FLOPs (2 per multiply-accumulate, matmuls only; bias adds, norms, RoPE,
    softmax, SiLU and residual adds are left out, as torch's FlopCounterMode
    leaves them out):

    * linear: per token and layer 2 x (h x q + 2 x h x kv + q x h + 3 x h x i)
      (q, k, v, o, gate, up, down projections);
    * lm_head: 2 x h x vocab per token whose logits are computed:
      ``logit_tokens`` per sequence (1: the last position, as
      :func:`~llmopt_lab.generate.prefill` and ``decode_one_token`` do; pass
      new_tokens for a plain forward);
    * attention: QK^T and PV, 2 x 2 x num_heads x head_dim per (query, key)
      pair. Causal counting is exact: the query at position p sees min(p + 1,
      window) keys (its own included), summed over the new queries and layers;
      a causal prefill from empty counts T (T + 1) / 2 pairs per head.
      ``counted_context``: charge every query this many keys instead, in every
      layer: what a kernel computes that does not skip masked keys (SDPA or
      naive attention over a static cache of max_len slots) and what
      FlopCounterMode counts (it charges SDPA's GPU kernels for every key,
      masked or not, and has no formula for SDPA's CPU kernel, which it
      counts as 0).

    Bytes (each moved once: the ideal of a fused, cache-friendly step):

    * weights: every projection, the lm_head (the embedding matrix again when
      tied) and the norms read once per step, plus the embedding rows of the
      tokens;
    * kv_read: per layer, keys and values of every position the step's queries
      see (the context, the new tokens and the window taken into account;
      ``counted_context`` slots when given);
    * kv_write: keys and values of the new tokens, every layer;
    * activations: each projection's input read and output written, the
      attention's q read and output written, the logits written (an
      approximation: norms, RoPE and residual adds are assumed fused).

    Returns a :class:`StepCost`. Raises ValueError on non-positive sizes.
    """
    if batch < 1 or new_tokens < 1 or context_len < 0:
        raise ValueError(f"need batch >= 1, new_tokens >= 1, context_len >= 0; got {batch}, "
                         f"{new_tokens}, {context_len}")
    c = config
    wb = _nbytes(dtype_bytes)
    kvb = wb if kv_dtype_bytes is None else _nbytes(kv_dtype_bytes)
    ab = wb if act_bytes is None else _nbytes(act_bytes)
    h, i, q, kv, L = c.hidden_size, c.intermediate_size, c.q_size, c.kv_size, c.num_layers
    tokens = batch * new_tokens
    logits = batch * logit_tokens

    macs_per_token_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    flops_linear = 2 * macs_per_token_layer * tokens * L
    flops_lm_head = 2 * h * c.vocab_size * logits
    pairs = 0  # (query, key) pairs over all layers, per sequence
    keys_read = 0  # key positions read over all layers, per sequence
    for layer in range(L):
        window = c.layer_window(layer)
        if counted_context is not None:
            pairs += new_tokens * counted_context
            keys_read += counted_context
        else:
            pairs += _visible_keys(context_len, new_tokens, window)
            first = 0 if window is None else max(0, context_len - window + 1)
            keys_read += context_len + new_tokens - first
    flops_attention = 2 * 2 * c.num_heads * c.head_dim * pairs * batch

    weight_elems = c.num_parameters(include_embeddings=False)
    if c.tie_word_embeddings:
        weight_elems += c.vocab_size * h  # the lm_head reads the embedding matrix
    bytes_weights = weight_elems * wb + tokens * h * wb  # + embedding rows looked up
    bytes_kv_read = 2 * kv * keys_read * batch * kvb
    bytes_kv_write = 2 * kv * tokens * L * kvb
    act_per_token_layer = ((h + q + 2 * kv)          # qkv: read x, write q, k, v
                           + (q + q)                 # attention: read q, write out
                           + (q + h)                 # o_proj
                           + (h + 2 * i)             # gate, up
                           + (2 * i + i)             # silu(gate) * up
                           + (i + h))                # down
    bytes_activations = (act_per_token_layer * tokens * L + logits * (h + c.vocab_size)) * ab

    breakdown = {"flops_linear": float(flops_linear), "flops_attention": float(flops_attention),
                 "flops_lm_head": float(flops_lm_head), "bytes_weights": float(bytes_weights),
                 "bytes_kv_read": float(bytes_kv_read), "bytes_kv_write": float(bytes_kv_write),
                 "bytes_activations": float(bytes_activations)}
    flops = flops_linear + flops_attention + flops_lm_head
    nbytes = bytes_weights + bytes_kv_read + bytes_kv_write + bytes_activations
    return StepCost(flops=float(flops), bytes=float(nbytes), breakdown=breakdown, tokens=tokens)


def arithmetic_intensity(flops: float | StepCost, nbytes: float | None = None) -> float:
    """FLOP per byte: ``arithmetic_intensity(cost)`` or ``arithmetic_intensity(flops, bytes)``."""
    if isinstance(flops, StepCost):
        return flops.intensity
    if not nbytes:
        raise ValueError("bytes must be positive")
    return flops / nbytes


def attainable_flops(intensity: float, limits: DeviceLimits, dtype: Any = "bf16") -> float:
    """The roofline: min(peak FLOP/s, bandwidth x intensity), in FLOP/s."""
    return min(limits.flops(dtype), limits.bandwidth * intensity)


def roofline_time(cost: StepCost, limits: DeviceLimits, dtype: Any = "bf16") -> float:
    """The least time a step can take, in seconds:
    max(flops / peak FLOP/s, bytes / bandwidth)."""
    return max(cost.flops / limits.flops(dtype), cost.bytes / limits.bandwidth)


def achieved_fraction(bound_s: float, measured_s: float) -> float:
    """Fraction of the roofline reached: roofline-bound time / measured time
    (1.0 = at the roof; both in seconds)."""
    if measured_s <= 0:
        raise ValueError("measured time must be positive")
    return bound_s / measured_s


# ================================================================ profiling
@dataclass
class OpRow:
    """One row of a :class:`StepProfile`, per step: calls, self CPU time (s),
    device time (s). CPU-side ops and runtime calls have device_s 0; GPU
    kernels (named "[gpu] <kernel>") have cpu_s 0."""

    name: str
    calls: float
    cpu_s: float
    device_s: float


@dataclass
class StepProfile:
    """Where a step's time goes (all times per step, in seconds).

    wall_s: median wall time of a step without the profiler;
    profiled_wall_s: the same under the profiler (which adds its own cost);
    op_time_s: self CPU time of all ops and runtime calls (under the profiler);
    device_time_s: time the GPU was busy running kernels (None on the CPU);
    ops_per_step: aten ops dispatched; kernels_per_step: GPU kernels and
    copies launched (None on the CPU); top_ops: the costliest ops.
    """

    device: str
    steps: int
    wall_s: float
    profiled_wall_s: float
    op_time_s: float
    device_time_s: float | None
    ops_per_step: float
    kernels_per_step: float | None
    top_ops: list[OpRow]

    @property
    def busy_fraction(self) -> float:
        """GPU: device busy time / wall time. CPU: op time / profiled wall time."""
        if self.device_time_s is not None:
            return self.device_time_s / self.wall_s
        return self.op_time_s / self.profiled_wall_s

    @property
    def overhead_s(self) -> float:
        """GPU: wall - device time (launch, Python and dispatch, idle device).
        CPU: profiled wall - op time (Python and dispatch outside the ops)."""
        if self.device_time_s is not None:
            return max(0.0, self.wall_s - self.device_time_s)
        return max(0.0, self.profiled_wall_s - self.op_time_s)

    def summary(self) -> str:
        """One paragraph in words."""
        ms = 1e3
        if self.device_time_s is not None:
            return (f"On {self.device} a step takes {self.wall_s * ms:.3f} ms of wall time and "
                    f"launches {self.kernels_per_step:.0f} kernels from {self.ops_per_step:.0f} "
                    f"ops; the GPU is busy {self.device_time_s * ms:.3f} ms of it "
                    f"({self.busy_fraction:.0%}), so {self.overhead_s * ms:.3f} ms per step "
                    f"({1 - min(1.0, self.busy_fraction):.0%}) go to Python, dispatch and "
                    f"kernel launches while the GPU waits"
                    + (": the step is bound by overhead, not by the GPU."
                       if self.busy_fraction < 0.5 else "."))
        return (f"On {self.device} a step takes {self.wall_s * ms:.3f} ms of wall time "
                f"({self.profiled_wall_s * ms:.3f} ms under the profiler) and dispatches "
                f"{self.ops_per_step:.0f} ops; the ops themselves account for "
                f"{self.op_time_s * ms:.3f} ms ({self.busy_fraction:.0%} of the profiled wall "
                f"time), the remaining {self.overhead_s * ms:.3f} ms are Python and dispatch "
                f"between them.")

    def table(self, limit: int = 10) -> str:
        """The top ops as a fixed-width text table (per step)."""
        lines = [f"{'op':<48} {'calls':>6} {'cpu ms':>9} {'device ms':>10}"]
        for r in self.top_ops[:limit]:
            lines.append(f"{r.name[:48]:<48} {r.calls:>6.1f} {r.cpu_s * 1e3:>9.3f} "
                         f"{r.device_s * 1e3:>10.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(busy_fraction=self.busy_fraction, overhead_s=self.overhead_s)
        return d


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile_step(fn: Callable[[], Any], *, steps: int = 5, warmup: int = 2, device: Any = None,
                 top: int = 15) -> StepProfile:
    """Profile ``fn()`` (one step, e.g. a decode step) with torch.profiler.

    Runs ``warmup`` steps plus a short profiled warm-up (the profiler's first
    session is slow), times 3 rounds of ``steps`` steps without the profiler
    (wall_s: the median round, synchronized, per step), then profiles
    ``steps`` steps. Counts the aten ops and (on a GPU) the
    kernels per step, sums the self CPU time of the ops and the time the GPU
    was busy (the union of kernel intervals), and ranks the ops by time.
    ``fn`` must be repeatable (e.g. a decode step writing the same cache slot).
    Returns a :class:`StepProfile`.
    """
    from torch.profiler import ProfilerActivity, profile

    dev = _device(device)
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for _ in range(warmup):
        fn()
    synchronize(dev)
    with profile(activities=activities):
        fn()
        synchronize(dev)
    walls = []
    for _ in range(3):  # wall time per step, unprofiled: the median of 3 rounds
        synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize(dev)
        walls.append((time.perf_counter() - t0) / steps)
    wall = statistics.median(walls)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize(dev)
        profiled_wall = (time.perf_counter() - t0) / steps

    ops_time, ops, kernels, intervals = 0.0, 0, 0, []
    rows: dict[str, list[float]] = {}  # name -> [calls, self cpu us, device us]
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU:
            # a kernel, memcpy or memset on the GPU: its own row, by kernel name
            kernels += 1
            intervals.append((e.time_range.start, e.time_range.end))
            row = rows.setdefault("[gpu] " + e.name, [0, 0.0, 0.0])
            row[0] += 1
            row[2] += e.time_range.elapsed_us()
            continue
        if (e.name.startswith("ProfilerStep") or getattr(e, "is_user_annotation", False)
                or "Synchronize" in e.name):  # our own wait for the GPU is not an op
            continue
        if e.name.startswith("aten::"):
            ops += 1
        ops_time += e.self_cpu_time_total
        row = rows.setdefault(e.name, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += e.self_cpu_time_total
    per = 1e-6 / steps  # us in total -> s per step
    top_ops = sorted((OpRow(n, c / steps, cpu * per, d * per) for n, (c, cpu, d) in rows.items()),
                     key=lambda r: -max(r.cpu_s, r.device_s))[:top]
    return StepProfile(device=device_name(dev), steps=steps, wall_s=wall,
                       profiled_wall_s=profiled_wall, op_time_s=ops_time * per,
                       device_time_s=_union_length(intervals) * per if cuda else None,
                       ops_per_step=ops / steps, kernels_per_step=kernels / steps if cuda else None,
                       top_ops=top_ops)


# ========================================================= provenance, I/O
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: Any = None) -> str:
    """A readable device name: the GPU's name, or the CPU's model name."""
    dev = _device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        return _cpu_name()
    return dev.type


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def device_slug(device: Any = None) -> str:
    """A folder name for a device's results: 'nvidia-h100-80gb-hbm3' for a GPU,
    'cpu-' plus the CPU model for the CPU (e.g. 'cpu-amd-epyc')."""
    dev = _device(device)
    if dev.type == "cpu":
        return "cpu-" + _slug(_cpu_name())
    return _slug(device_name(dev))


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _git_commit() -> str:
    """HEAD of the checkout this package lives in, '-dirty' when tracked files
    have uncommitted changes (untracked files and results/, which benchmarks
    write, do not count), 'unknown' without git or outside a repository."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)results"],
                               cwd=repo, capture_output=True, text=True, timeout=10)
        suffix = "-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
        return head.stdout.strip() + suffix
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device: Any = None) -> dict:
    """Where and with what a result was produced.

    Keys: device, device_slug, torch, triton, transformers, cuda (torch's CUDA
    version or None), python, platform, cpu, git_commit (with '-dirty' for
    uncommitted changes, 'unknown' without git), date (UTC, ISO 8601),
    llmopt_lab (package version). Versions are None when not installed.
    """
    from . import __version__

    dev = _device(device)
    return {
        "device": device_name(dev),
        "device_slug": device_slug(dev),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "llmopt_lab": __version__,
    }


def default_results_root() -> Path:
    """``results/`` of the checkout the package lives in (so that a notebook
    running in notebooks/ finds it), else ``results`` in the working directory."""
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file():
        return repo / "results"
    return Path("results")


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} as JSON")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def save_result(name: str, data: dict, root: str | Path | None = None, device: Any = None) -> Path:
    """Write ``data`` as JSON to ``<root>/<device-slug>/<name>.json``; return the path.

    A top-level "provenance" key (:func:`provenance` of ``device``) is added
    unless ``data`` has one. Dataclasses, tensors and dtypes are converted.
    root: default :func:`default_results_root`. Raises ValueError for a name
    that is not a plain file name, TypeError for data JSON cannot hold.
    """
    if not _NAME.fullmatch(name) or name.endswith(".json"):
        raise ValueError(f"result name {name!r} must be a plain name like 'decode_sweep'")
    if not isinstance(data, dict):
        raise TypeError(f"data must be a dict, got {type(data).__name__}")
    prov = data.get("provenance") or provenance(device)
    record = {"provenance": prov, **{k: v for k, v in data.items() if k != "provenance"}}
    root = default_results_root() if root is None else Path(root)
    folder = root / prov.get("device_slug", device_slug(device))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    text = json.dumps(record, indent=1, default=_jsonable)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_results(name: str, root: str | Path | None = None) -> dict[str, dict]:
    """Every device's stored result ``name``: {device_slug: data}, sorted by slug;
    empty when there is none."""
    root = default_results_root() if root is None else Path(root)
    out = {}
    for path in sorted(root.glob(f"*/{name}.json")):
        out[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
    return out

"""Timing: the one timer every speed figure in the course goes through.

:func:`time_fn` warms up, synchronizes (CUDA events on a GPU,
``perf_counter`` on the CPU) and returns a :class:`Timing` (median, spread,
every sample, in seconds). Kernels whose operands fit in the GPU's L2 cache
are timed with ``flush_l2=True`` or with :class:`OperandRotation`, otherwise
a weight-bound kernel looks faster than memory allows. :func:`synchronize`
is what library code (generation, speculative decoding) imports to wait for
the device.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import MeasureError
from .metrics import percentile

__all__ = ["Timing", "time_fn", "synchronize", "l2_cache_bytes", "OperandRotation"]

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
    """Wait until the device has finished all queued work (a no-op on the CPU).

    Raises: nothing of its own; torch's RuntimeError for a device it cannot
    parse or a CUDA device that is not there."""
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Result of :func:`time_fn`. All times in seconds.

    median: the reported figure; p10, p90: the 10th and 90th percentiles;
    min, max, mean: over ``samples``, the time of every timed run in order.

    Raises: nothing on construction (a plain record); :meth:`from_samples`
    raises MeasureError (a ValueError) for an empty list of samples.
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
            raise MeasureError("no samples")
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
    Returns a :class:`Timing` in seconds. Raises MeasureError (a ValueError) if repeat < 1.
    """
    if repeat < 1 or warmup < 0:
        raise MeasureError(f"need repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
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

    Raises: nothing of its own (unreadable /sys entries are skipped); torch's
    RuntimeError for a device it cannot parse.
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

    Raises MeasureError (a ValueError) when ``operands`` holds no tensor or its
    tensors hold no bytes: pass the kernel's (non-empty) tensors. Torch's
    out-of-memory error when the copies do not fit (lower ``margin`` or
    ``max_copies``).
    """

    def __init__(self, operands, *, l2_bytes: int | None = None, margin: float = 2.0,
                 max_copies: int = 1024):
        single = isinstance(operands, torch.Tensor)
        self._single = single
        items = (operands,) if single else tuple(operands)
        tensors = [t for t in items if isinstance(t, torch.Tensor)]
        if not tensors:
            raise MeasureError("OperandRotation needs at least one tensor")
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
            raise MeasureError("operands hold no bytes")
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


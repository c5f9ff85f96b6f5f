"""Memory: how much a block of code uses at its worst.

:func:`peak_memory` is a context manager that reports the allocator's peak
on a GPU and the resident set size on the CPU, as a :class:`MemoryUsage`.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .timing import MiB, _device

__all__ = ["MemoryUsage", "peak_memory"]


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

    Raises: nothing; a plain record.
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

    Raises: nothing of its own (an exception in the block propagates, with the
    usage filled in first); torch's RuntimeError for a device it cannot parse.
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

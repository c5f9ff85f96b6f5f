"""Profiling: where a step's time goes.

:func:`profile_step` counts the ops and kernels a step launches and how busy
the device is (small models at batch 1 are bound by launch overhead, not by
bandwidth), as a :class:`StepProfile`.

:func:`quiet_profiler_logs` keeps the profiler's native trace lines
(``USDT: ... profiler_start`` / ``profiler_stop``, written by libkineto straight
to file descriptor 2) out of notebooks and command output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import MeasureError
from .results import device_name
from .timing import _device, synchronize

#: native lines of libkineto that say nothing to a reader: its trace probes
#: (``USDT:... profiler_start``) and its start-up notice
_NOISE = re.compile(r"^(USDT:.*\] profiler_(start|stop)|INFO:.*\] Registering daemon config loader.*)\s*$")


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to flush (e.g. some Windows builds)
        pass


@contextlib.contextmanager
def quiet_profiler_logs():
    """Inside this block, torch.profiler's native trace lines do not reach stderr.

    libkineto writes them from C++ to file descriptor 2, under Python's
    ``sys.stderr``, so no Python setting hides them. The block points fd 2 at
    a temporary file, and on leaving (always, also on an exception) restores
    it and writes back every captured line except the trace probes
    (``USDT: ... profiler_start|stop``) and kineto's start-up notice, so a
    real error message from native code still shows. Where fd 2 cannot be
    redirected (no such descriptor), the block does nothing.

    Raises: nothing of its own; an exception in the block propagates after
    stderr is restored.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        capture = tempfile.TemporaryFile(mode="w+b")
    except OSError:  # nowhere to capture to: leave stderr as it is
        os.close(saved)
        yield
        return
    try:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            _flush_c_stdio()
            os.dup2(saved, 2)
    finally:
        os.close(saved)
        capture.seek(0)
        text = capture.read().decode("utf-8", "replace")
        capture.close()
        kept = [line for line in text.splitlines(keepends=True) if not _NOISE.match(line)]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()

__all__ = ["OpRow", "StepProfile", "profile_step", "quiet_profiler_logs"]


@dataclass
class OpRow:
    """One row of a :class:`StepProfile`, per step: calls, self CPU time (s),
    device time (s). CPU-side ops and runtime calls have device_s 0; GPU
    kernels (named "[gpu] <kernel>") have cpu_s 0.

    Raises: nothing; a plain record."""

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

    Raises: nothing on construction (a plain record); :attr:`busy_fraction`
    raises ZeroDivisionError for a zero wall time.
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

    Raises MeasureError (a ValueError) for ``steps`` < 1 or ``warmup`` < 0;
    whatever ``fn`` raises propagates; torch's RuntimeError for a device it
    cannot parse.
    """
    from torch.profiler import ProfilerActivity, profile

    for name, v, least in (("steps", steps, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise MeasureError(f"profile_step needs {name} >= {least} (an integer), got {v!r}")

    dev = _device(device)
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for _ in range(warmup):
        fn()
    synchronize(dev)
    with quiet_profiler_logs(), profile(activities=activities):
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
    with quiet_profiler_logs(), profile(activities=activities) as prof:
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

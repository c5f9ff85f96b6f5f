"""The process group every parallel mode talks through, with its bill.

:class:`Comm` wraps a ``torch.distributed`` process group (gloo on CPU, NCCL
on GPUs) and offers the few collectives the course needs: all-reduce,
all-gather, broadcast, point-to-point send/recv and gathering Python objects.
Each call is counted: how many, how many bytes the caller handed in, and
the wall time spent waiting in it. That is what lets lesson 11 split a
step's time into compute and communication.

Timing a collective means waiting for it: on CPU (gloo) every call here is
blocking anyway; on CUDA (NCCL) collectives are asynchronous, so with
``timed=True`` the current stream is synchronized before and after each call
(this slows the run a little and is what a measurement needs); with
``timed=False`` nothing is synchronized and only counts and bytes are kept.

A Comm is passed explicitly to the modules that need it (no global context):
``apply_tensor_parallel(model, comm)`` stores it in the sharded layers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import ParallelError


@dataclass
class CommStats:
    """Counters of one Comm: calls, bytes handed in (per rank) and seconds
    spent in the calls, per kind of operation ('all_reduce', 'all_gather',
    'send', 'recv', 'broadcast').

    Raises: nothing; a plain record of counters."""

    calls: dict = field(default_factory=dict)
    bytes: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def add(self, kind: str, nbytes: int, seconds: float) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    @property
    def total_bytes(self) -> int:
        return int(sum(self.bytes.values()))

    @property
    def total_calls(self) -> int:
        return int(sum(self.calls.values()))

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.seconds.clear()

    def as_dict(self) -> dict:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes),
                "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
                "total_seconds": round(self.total_seconds, 6), "total_bytes": self.total_bytes}


class Comm:
    """A process group and its counters.

    group: a ``torch.distributed`` ProcessGroup (None: the default group,
    which must be initialized). ``rank`` and ``world_size`` are this
    process's place in that group. ``Comm.single()`` is a group of one (no
    torch.distributed at all): every collective is the identity, so the
    same code runs in one process.

    Raises ParallelError when torch.distributed is not initialized.
    """

    def __init__(self, group=None, timed: bool = True):
        if group is not False:
            if not dist.is_available() or not dist.is_initialized():
                raise ParallelError(
                    "torch.distributed is not initialized: start the processes with torchrun "
                    "(python -m torch.distributed.run --nproc-per-node 2 ...) or "
                    "llmopt_lab.parallel.launch, or use Comm.single() for one process")
            self.group = group
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
            self.backend = str(dist.get_backend(group))
        else:
            self.group, self.rank, self.world_size, self.backend = None, 0, 1, "none"
        self.timed = timed
        self.stats = CommStats()

    @classmethod
    def single(cls) -> "Comm":
        """A group of one process: collectives return their input."""
        return cls(group=False)

    # ----------------------------------------------------------------- helpers
    def _sync(self, t: torch.Tensor) -> None:
        if self.timed and t.is_cuda:
            torch.cuda.synchronize(t.device)

    def _timed(self, kind: str, t: torch.Tensor, fn):
        self._sync(t)
        t0 = time.perf_counter()
        out = fn()
        self._sync(t)
        self.stats.add(kind, t.numel() * t.element_size(), time.perf_counter() - t0)
        return out

    def _global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # ------------------------------------------------------------- collectives
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the group, in place; returns ``t``."""
        if self.world_size == 1:
            return t
        return self._timed("all_reduce", t, lambda: (dist.all_reduce(t, group=self.group), t)[1])

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``t`` (same shape on all), concatenated along ``dim`` in
        rank order: (..., n, ...) -> (..., world_size * n, ...)."""
        if self.world_size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._timed("all_gather", t, lambda: dist.all_gather(parts, t, group=self.group))
        return torch.cat(parts, dim=dim)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``t`` copied into ``t`` on every rank (in place)."""
        if self.world_size == 1:
            return t
        return self._timed("broadcast", t, lambda: (
            dist.broadcast(t, self._global_rank(src), group=self.group), t)[1])

    def send(self, t: torch.Tensor, dst: int):
        """Start sending ``t`` to rank ``dst``; returns a handle with ``wait()``.

        Non-blocking, so that two stages may send to each other at once
        without a deadlock; keep ``t`` alive and unchanged until ``wait()``."""
        t = t.contiguous()
        t0 = time.perf_counter()
        work = dist.isend(t, self._global_rank(dst), group=self.group)
        self.stats.add("send", t.numel() * t.element_size(), time.perf_counter() - t0)
        return _Pending(work, t)

    def recv(self, shape, dtype: torch.dtype, src: int, device=None) -> torch.Tensor:
        """Receive a tensor of ``shape`` and ``dtype`` from rank ``src`` (blocking)."""
        t = torch.empty(shape, dtype=dtype, device=device)
        return self._timed("recv", t, lambda: (dist.recv(t, self._global_rank(src),
                                                         group=self.group), t)[1])

    def gather_objects(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        t0 = time.perf_counter()
        dist.all_gather_object(out, obj, group=self.group)
        self.stats.add("gather_objects", 0, time.perf_counter() - t0)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)


class _Pending:
    """A started send: ``wait()`` blocks until the data has left."""

    def __init__(self, work, tensor):
        self.work, self.tensor = work, tensor

    def wait(self) -> None:
        self.work.wait()


def init_from_env(backend: str | None = None, timed: bool = True) -> Comm:
    """Join the process group torchrun describes (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT in the environment) and return its Comm.

    backend: 'gloo' (CPU) or 'nccl' (one GPU per process; this process uses
    ``cuda:LOCAL_RANK``); default: nccl when CUDA is available, else gloo.
    Already initialized: the existing default group is used.
    Raises ParallelError outside torchrun or for an unknown backend.
    """
    if not dist.is_available():
        raise ParallelError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise ParallelError(
                f"no process group to join ({', '.join(missing)} not set): run under torchrun, "
                "e.g. torchrun --nproc-per-node 2 -m llmopt_lab parallel tp")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ParallelError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return Comm(timed=timed)


def device_for(comm: Comm) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` under NCCL, else CPU.

    Raises: ParallelError for a ``comm`` that is not a :class:`Comm`."""
    if not isinstance(comm, Comm):
        raise ParallelError(f"device_for takes a Comm (init_from_env() or Comm.single()), got "
                            f"{type(comm).__name__}")
    if comm.backend == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")

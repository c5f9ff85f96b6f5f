"""Starting the processes of a parallel run from Python (a notebook cell, a
test, the benchmark): torchrun in a subprocess, results back as JSON.

``launch("tp", nprocs=2, model="llmopt-tiny")`` runs

    python -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 \\
        --master-port <free port> -m llmopt_lab parallel tp --json-out <tmp> --kwargs '{...}'

and returns each rank's result dict. The workers are the course's own
command (:mod:`llmopt_lab.parallel.cli`), so what a notebook launches is what
a user types in a terminal. On several machines the same command takes
``--nnodes 2 --node-rank K --rdzv-backend c10d --rdzv-endpoint HOST:PORT``
instead of the local master address (see lesson 11).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ParallelError

__all__ = ["free_port", "launch", "torchrun_command"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Raises: OSError only when the system has no socket to give."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(mode: str, nprocs: int, port: int, out_dir: str, kwargs: dict) -> list[str]:
    """The argv of one local launch (see the module doc).

    Raises: ParallelError for an nprocs that is not a positive integer or a
    port outside 1..65535."""
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ParallelError(f"nprocs must be a positive integer, got {nprocs!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ParallelError(f"port must be an integer in 1..65535, got {port!r}")
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nprocs}",
            "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "llmopt_lab", "parallel", mode,
            "--json-out", out_dir, "--kwargs", json.dumps(kwargs)]


def launch(mode: str, nprocs: int = 2, timeout: float = 600, threads_per_process: int = 1,
           **kwargs) -> list[dict]:
    """Run parallel task ``mode`` ('tp', 'pp', 'dp', 'allreduce'; see
    :mod:`llmopt_lab.parallel.tasks`) in ``nprocs`` CPU processes (gloo) and
    return their results in rank order. ``kwargs`` go to the task (JSON-able).
    Each process gets ``threads_per_process`` torch threads, so that two
    processes on a two-core machine do not fight over the cores.

    A run whose workers die from a signal (a native crash, for example gloo
    aborting, not a Python error) is started once more, with a warning on
    stderr; its results are then those of the second run.

    Raises ParallelError for an unknown mode, an nprocs or timeout that is
    not positive, a run that fails (with the
    tail of its output: a worker's own traceback where it wrote one) or one
    that exceeds ``timeout`` seconds.
    """
    from .tasks import TASKS

    if mode not in TASKS:
        raise ParallelError(f"unknown parallel mode {mode!r}; choose from {', '.join(TASKS)}")
    if not isinstance(nprocs, int) or isinstance(nprocs, bool) or nprocs < 1:
        raise ParallelError(f"nprocs must be a positive integer, got {nprocs!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ParallelError(f"timeout must be a positive number of seconds, got {timeout!r}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_process), HF_HUB_OFFLINE="1",
               LLMOPT_PARALLEL_BACKEND="gloo", CUDA_VISIBLE_DEVICES="",
               TORCH_CPP_LOG_LEVEL=os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"))
    for attempt in (1, 2):
        try:
            return _launch_once(mode, nprocs, timeout, env, kwargs)
        except _Crashed as e:  # killed by a signal, not by an error of ours: once more, said aloud
            if attempt == 2:
                raise ParallelError(str(e)) from None
            print(f"warning: {e}\nretrying the parallel run once", file=sys.stderr)


class _Crashed(Exception):
    """A worker died from a signal (no Python error of its own)."""


def _launch_once(mode: str, nprocs: int, timeout: float, env: dict, kwargs: dict) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="llmopt-parallel-") as out:
        cmd = torchrun_command(mode, nprocs, free_port(), out, kwargs)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise ParallelError(f"parallel run '{mode}' took longer than {timeout:.0f} s and was "
                                "stopped") from None
        if proc.returncode != 0:
            errors = sorted(Path(out).glob("rank*.error"))
            if errors:  # a worker's own traceback: its last lines name the cause
                lines = errors[0].read_text().strip().splitlines()
                tail = f"{errors[0].stem}: " + "\n".join(lines[-3:])
            else:
                tail = _worker_error(proc.stdout + "\n" + proc.stderr)
            written = sorted(p.stem for p in Path(out).glob("rank*.json"))
            msg = (f"parallel run '{mode}' with {nprocs} processes failed (exit {proc.returncode}; "
                   f"results written by: {', '.join(written) or 'no rank'}):\n{tail}")
            if not errors and "Signal " in proc.stdout + proc.stderr:
                raise _Crashed(msg)
            raise ParallelError(msg)
        results = []
        for r in range(nprocs):
            path = Path(out) / f"rank{r}.json"
            if not path.exists():
                raise ParallelError(f"rank {r} of parallel run '{mode}' wrote no result")
            results.append(json.loads(path.read_text()))
    return results


def _worker_error(output: str) -> str:
    """The lines that say why a worker failed: an ``error:`` line of the
    command, or the end of the first rank's traceback (torchrun prefixes
    them with ``[rankN]:``), else the end of the output."""
    lines = output.strip().splitlines()
    native = [ln for ln in lines if "terminate called" in ln or "what():" in ln]
    if native:  # a C++ exception that aborted a worker (gloo, for example)
        return "\n".join(dict.fromkeys(native))
    errors = [ln for ln in lines if ln.startswith("error: ") or ": error: " in ln]
    if errors:
        return "\n".join(dict.fromkeys(errors))
    ranked = [ln for ln in lines if ln.startswith("[rank")]
    if ranked:
        first = ranked[0].split("]:", 1)[0]
        mine = [ln for ln in ranked if ln.startswith(first + "]:")]
        return "\n".join(mine[-6:])
    return "\n".join(lines[-15:])

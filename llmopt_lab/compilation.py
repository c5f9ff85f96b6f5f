"""The step function compiled by ``torch.compile``: same function, fewer launches.

:func:`llmopt_lab.step.step_logits` is the one function every cached forward
runs (prefill, decode, verification, an engine's mixed steps).
:class:`CompiledStep` hands exactly that function to ``torch.compile``, so the
compiled step and the eager step cannot drift apart: they differ only in who
runs the operations.

What the compiler does with it (TorchDynamo captures the Python into an FX
graph, Inductor lowers the graph to Triton on a GPU or C++/OpenMP on a CPU):

* element-wise chains (RMSNorm's square, mean, rsqrt, multiply; the rotary
  embedding; SiLU times up) become one generated kernel each, so
  intermediates stay in registers instead of round-tripping through memory;
* ``mode="reduce-overhead"`` additionally records the whole step as a CUDA
  graph (one launch per step; on a CPU the mode compiles but has no graph
  to record);
* ``mode="max-autotune"`` also benchmarks matmul configurations (long
  compiles; worth it for large batches).

Shapes: the first call compiles for the exact shapes seen; when a second
call brings another number of tokens (prefill of another prompt length),
Dynamo recompiles once with that size symbolic (``automatic dynamic
shapes``), and later lengths reuse it. Decode steps of one batch size
always hit the first graph.

The KV storage is written in place by the step. Under CUDA graphs
(``reduce-overhead``) its tensors must keep their addresses: they are marked
static (``torch._dynamo.mark_static_address``), and a storage that
reallocates as it grows is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .errors import LlmoptError
from .step import Step, step_logits

__all__ = ["CompileError", "CompiledStep", "GraphBreaks", "find_graph_breaks", "MODES"]

#: modes of torch.compile this wrapper accepts
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompileError(LlmoptError, ValueError):
    """A compilation request that cannot be honoured: an unknown mode, CUDA
    graphs over storage that reallocates, a torch without ``torch.compile``."""


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise CompileError(f"unknown compile mode {mode!r}; choose from {', '.join(MODES)}")


class CompiledStep:
    """``torch.compile`` of :func:`~llmopt_lab.step.step_logits` for one model
    and one KV storage.

    model: a :class:`~llmopt_lab.model.Transformer` (eager, fused or
    quantized: what its modules run is what gets compiled); kv: its KV
    storage; mode: one of :data:`MODES`; fullgraph: refuse graph breaks (an
    error names the break, instead of silently running pieces eagerly);
    backend: ``"inductor"`` (generated kernels), ``"aot_eager"`` (tracing only:
    checks that the graph captures, generates no code) or ``"eager"``.

    Call it like :func:`~llmopt_lab.step.run_step`: ``compiled(step)`` returns
    float32 logits (S, V), or (N, V) with ``every_token=True``. The first call
    compiles (seconds to a minute: ``first_call_s``); ``calls`` counts calls.
    Raises CompileError for an unknown mode or, with a CUDA-graph mode, a
    storage that reallocates.
    """

    def __init__(self, model, kv, *, mode: str = "default", fullgraph: bool = True,
                 backend: str = "inductor"):
        _check_mode(mode)
        if not hasattr(torch, "compile"):  # pragma: no cover - torch < 2.0
            raise CompileError("this torch has no torch.compile (it needs torch >= 2.0)")
        graphs = "cudagraphs" not in mode and mode in ("reduce-overhead", "max-autotune")
        if graphs and getattr(kv, "reallocates", False):
            raise CompileError(f"mode {mode!r} records CUDA graphs, and a dynamic cache "
                               "reallocates as it grows: use a static, int8 or paged pool")
        self.model, self.kv, self.mode, self.backend = model, kv, mode, backend
        if graphs and model.device.type == "cuda":
            # the storage is written in place by every replay: it must be a
            # static input (fixed address), not an input copied into the graph
            for t in kv._tensors():
                torch._dynamo.mark_static_address(t)
        kwargs = {} if backend != "inductor" or mode == "default" else {"mode": mode}
        self._fn = torch.compile(step_logits, fullgraph=fullgraph, backend=backend, **kwargs)
        self.calls = 0
        self.first_call_s: float | None = None

    def __call__(self, step: Step, every_token: bool = False) -> torch.Tensor:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self._fn(self.model, self.kv, step, every_token)
        if self.calls == 0:
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            self.first_call_s = time.perf_counter() - t0
        self.calls += 1
        return out


@dataclass
class GraphBreaks:
    """What TorchDynamo made of a function: ``graphs`` captured, ``breaks``
    between them, ``reasons`` (one line each, with the user code that caused
    it) and ``ops`` (operations captured in all graphs)."""

    graphs: int
    breaks: int
    ops: int
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.breaks:
            return f"1 graph, no break: {self.ops} operations captured whole"
        lines = [f"{self.graphs} graphs, {self.breaks} break(s), {self.ops} operations captured:"]
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


def find_graph_breaks(fn, *args, **kwargs) -> GraphBreaks:
    """Trace ``fn(*args, **kwargs)`` with ``torch._dynamo.explain`` (no code is
    generated, nothing is compiled) and report where the capture broke.

    Runs the function once (under ``torch.inference_mode``). Each reason is
    Dynamo's message, shortened to its first line, followed by the last line
    of user code it points at.
    """
    import torch._dynamo

    torch._dynamo.reset()  # a fresh trace: earlier compiles must not answer from the cache
    with torch.inference_mode():
        ex = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = []
    for b in ex.break_reasons:
        first = str(b.reason).strip().splitlines()[0][:200]
        where = ""
        if getattr(b, "user_stack", None):
            frame = b.user_stack[-1]
            where = f" (at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}: {(frame.line or '').strip()})"
        reasons.append(first + where)
    return GraphBreaks(graphs=ex.graph_count, breaks=ex.graph_break_count, ops=ex.op_count,
                       reasons=reasons)

"""Lesson benchmarks, reachable from the command line.

Each lesson with a benchmark has a module here with

* ``SIZES``: named sizes (``"quick"`` for tests, ``"cpu"``, ``"gpu"``), each a
  dict of parameters; ``"auto"`` picks ``"gpu"`` on a CUDA device and ``"cpu"``
  elsewhere;
* ``run(size, device, progress) -> dict``: measures and returns a
  JSON-able result (without provenance: the caller stamps it);
* ``summary_rows(result) -> list[dict]``: the rows ``tour`` prints;
* ``plot(result, provenance) -> Figure`` (optional).

``python -m llmopt_lab bench 01`` (or ``bench anatomy``) runs one;
``python -m llmopt_lab tour`` runs them all.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import LlmoptError


@dataclass(frozen=True)
class Benchmark:
    number: str
    name: str
    module: str
    title: str

    def load(self):
        return importlib.import_module(self.module)


BENCHMARKS: list[Benchmark] = [
    Benchmark("01", "anatomy", "llmopt_lab.benchmarks.anatomy",
              "prefill and decode throughput against the roofline"),
    Benchmark("02", "kv_cache", "llmopt_lab.benchmarks.kv_cache",
              "decode latency per token with and without a KV cache"),
    Benchmark("03", "quantization", "llmopt_lab.benchmarks.quantization",
              "int8/int4 kernels, quantized models' speed and memory, and quality per method"),
    Benchmark("04", "pruning", "llmopt_lab.benchmarks.pruning",
              "pruning's quality (magnitude, Wanda, SparseGPT; 50% and 2:4), structured pruning and recovery, 2:4 kernels"),
    Benchmark("05", "distillation", "llmopt_lab.benchmarks.distillation",
              "distilled students, low rank + LoRA, fewer and shared layers: quality beside size and speed"),
    Benchmark("06", "flash_attention", "llmopt_lab.benchmarks.flash_attention",
              "our flash-attention kernels against SDPA and naive attention"),
    Benchmark("07", "paged_attention", "llmopt_lab.benchmarks.paged_attention",
              "KV waste of paging, prefix caching, and the paged kernel against flash decoding"),
    Benchmark("08", "speculative", "llmopt_lab.benchmarks.speculative",
              "speculative decoding (draft model, prompt lookup) against plain decoding"),
    Benchmark("09", "fusion", "llmopt_lab.benchmarks.fusion",
              "fused kernels, torch.compile and CUDA graphs on a decode step (launches, tokens, speed)"),
    Benchmark("10", "batching", "llmopt_lab.benchmarks.batching",
              "static, dynamic and continuous batching on one workload (engine throughput, latency)"),
    Benchmark("11", "parallelism", "llmopt_lab.benchmarks.parallelism",
              "tensor, pipeline and data parallelism over gloo (2 processes), offloading"),
]


def target_lines(targets: list[dict]) -> list[str]:
    """The "targets:" block of a summary: one line per target, marked met,
    MISSED or info (reported only), with its goal and what was measured."""
    lines = ["targets:"]
    for t in targets:
        mark = "info" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"  [{mark}] {t['name']} ({t['goal']}): {t['text']}")
    return lines


def find(key: str) -> Benchmark:
    """A benchmark by lesson number ('01', '1') or name ('anatomy')."""
    key = key.strip().lower()
    for b in BENCHMARKS:
        if key in (b.number, b.number.lstrip("0"), b.name, f"{b.number}_{b.name}"):
            return b
    known = ", ".join(f"{b.number} ({b.name})" for b in BENCHMARKS)
    raise LlmoptError(f"no benchmark {key!r}; known: {known}")


def resolve_size(module, size: str, device) -> str:
    if size == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if size not in module.SIZES:
        raise LlmoptError(f"unknown size {size!r}; choose from auto, {', '.join(module.SIZES)}")
    return size

"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

At batch 1 a decode step is hundreds of small kernels, and on a GPU the time
goes to launching them. A CUDA graph records the launches of one step once
and replays them with a single call. What a replay reads must sit at the
addresses seen at capture, so the step is described by preallocated
:class:`~llmopt_lab.step.StepBuffers` updated in place (never rebound), and
the logits land in a tensor the graph owns.

One graph per bucket (1, 2, 4, 8, ... sequences): a batch of S sequences runs
the smallest bucket b >= S, its rows S..b-1 filled with dummies (position 0
of their own block, results dropped), so a batch that shrinks or grows does
not need a new capture.

Used by :func:`llmopt_lab.generate.generate` (``cuda_graph=True``) and by
benchmarks; on a machine without a CUDA GPU it is absent, with a clear error.
"""

from __future__ import annotations

import torch

from .errors import LlmoptError
from .step import HostStep, Step, StepBuffers, run_step


class GraphError(LlmoptError, RuntimeError):
    """CUDA graphs asked for where they cannot run (no CUDA device, storage
    that reallocates, a step that does not fit the captured shapes)."""


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, ... up to and including ``max_batch``."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class GraphedDecoder:
    """Capture and replay decode steps (one query per sequence).

    model: on a CUDA device; kv: its KV storage (a fixed pool: static, int8 or
    paged; a dynamic cache reallocates and cannot be captured); max_blocks:
    block-table width of the captured steps; buckets: batch sizes to capture
    (default 1, 2, 4, ... max_batch), each captured on first use.
    A contiguous cache (sequence s owns block s) needs at least max(buckets)
    blocks: the dummy rows of a padded bucket write into the blocks past the
    live ones. Raises GraphError on a CPU model or growing storage.
    """

    def __init__(self, model, kv, max_batch: int, max_blocks: int = 1,
                 buckets: list[int] | None = None):
        self.check_device(model)
        dev = model.device
        if kv.reallocates:
            raise GraphError("a dynamic cache reallocates as it grows and cannot be captured; "
                             "use a static, int8 or paged pool")
        self.model, self.kv = model, kv
        self.buckets = sorted(set(buckets or default_buckets(max_batch)))
        if self.buckets[0] < 1 or self.buckets[-1] < max_batch:
            raise GraphError(f"buckets {self.buckets} do not cover batches up to {max_batch}")
        self.buffers = StepBuffers(self.buckets[-1], self.buckets[-1], max_blocks, dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.steps: dict[int, Step] = {}
        self._pool = None
        self.current: tuple[int, int] | None = None  # (bucket, live rows) of the last run

    @staticmethod
    def check_device(model) -> None:
        """Raise GraphError unless the model is on a CUDA device."""
        if model.device.type != "cuda":
            raise GraphError(f"CUDA graphs need a CUDA GPU, and the model is on {model.device}; "
                             "decode eagerly instead (generate(..., cuda_graph=False), run_step)")

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise GraphError(f"a decode step of {n} sequences exceeds the largest bucket "
                         f"({self.buckets[-1]})")

    def _pad(self, host: HostStep, b: int, contiguous: bool) -> HostStep:
        """Add dummy rows S..b-1: one token at position 0 of block s (a
        contiguous cache) or of the scratch block ``kv.num_blocks - 1``."""
        S = len(host.num_queries)
        if max(host.num_queries) != 1:
            raise GraphError("only decode steps (one query per sequence) are captured")
        rows = range(S, b)
        blocks = [s if contiguous else self.kv.num_blocks - 1 for s in rows]
        if contiguous and b > self.kv.num_blocks:
            raise GraphError(f"bucket {b} needs {b} blocks of a contiguous cache, which has "
                             f"{self.kv.num_blocks}")
        bs, width = host.block_size, self.buffers.max_blocks
        if max(len(t) for t in host.block_tables) > width:
            raise GraphError(f"block tables wider than the captured {width} blocks")
        tables = [t + [0] * (width - len(t)) for t in host.block_tables + [[blk] for blk in blocks]]
        return HostStep(tokens=host.tokens + [0] * len(blocks), positions=host.positions + [0] * len(blocks),
                        slots=host.slots + [blk * bs for blk in blocks],
                        num_queries=host.num_queries + [1] * len(blocks),
                        context_lens=host.context_lens + [1] * len(blocks),
                        block_tables=tables, block_size=bs, contiguous=contiguous)

    def _capture(self, b: int) -> None:
        step = self.steps[b]
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # compile kernels and allocate outside the capture
                run_step(self.model, self.kv, step)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.logits[b] = run_step(self.model, self.kv, step)
        self._pool = graph.pool()
        self.graphs[b] = graph

    def run(self, host: HostStep) -> torch.Tensor:
        """Copy a decode step into the buffers (padded to its bucket) and
        replay; returns logits (S, V) float32, a view that the next replay
        overwrites. The dummy rows' writes go to their own slots; replaying
        the warm-up at capture time writes the same slots as the step itself."""
        S = len(host.num_queries)
        b = self.bucket_for(S)
        padded = self._pad(host, b, host.contiguous)
        self.steps[b] = self.buffers.fill(padded)  # views at the same addresses every time
        if b not in self.graphs:
            self._capture(b)
        self.current = (b, S)
        self.graphs[b].replay()
        return self.logits[b][:S]

    def replay(self) -> torch.Tensor:
        """Replay the last step as it is (timing); returns its logits (S, V)."""
        if self.current is None:
            raise GraphError("replay() needs a step started with run()")
        b, S = self.current
        self.graphs[b].replay()
        return self.logits[b][:S]

    def advance(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """The next decode step of the last :meth:`run`, advanced in place on
        the device (no host copy): next_tokens (S,) of the live rows. Returns
        logits (S, V) as :meth:`run`."""
        if self.current is None:
            raise GraphError("advance() needs a step started with run()")
        b, S = self.current
        step = self.steps[b]
        if not step.contiguous:
            raise GraphError("advance() is for a contiguous cache; a paged sequence may cross "
                             "into a new block: run() the next step instead")
        step.advance(next_tokens)  # the live rows; the dummy rows stay at position 0
        self.graphs[b].replay()
        return self.logits[b][:S]


def _check_distribution(counts) -> dict[int, float]:
    if isinstance(counts, dict):
        items = list(counts.items())
    else:
        items = [(int(b), 1.0) for b in counts]
    out: dict[int, float] = {}
    for b, c in items:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise GraphError(f"batch sizes must be positive integers, got {b!r}")
        if not c >= 0:
            raise GraphError(f"the count of batch size {b} must be >= 0, got {c!r}")
        out[b] = out.get(b, 0.0) + float(c)
    if not out or sum(out.values()) <= 0:
        raise GraphError("an empty batch-size distribution")
    return out


def padded_rows(buckets: list[int], counts) -> float:
    """Dummy rows computed when every decode step runs the smallest bucket
    that holds it, summed over a batch-size distribution.

    buckets: captured batch sizes; counts: {batch size: how often} (or a list
    of observed batch sizes). Returns sum over b of count(b) * (bucket(b) - b).
    Raises GraphError when a batch size exceeds the largest bucket.
    """
    dist = _check_distribution(counts)
    bs = sorted(set(buckets))
    total = 0.0
    for b, c in dist.items():
        fit = next((x for x in bs if x >= b), None)
        if fit is None:
            raise GraphError(f"batch size {b} exceeds the largest bucket ({bs[-1] if bs else None})")
        total += c * (fit - b)
    return total


def choose_buckets(counts, max_buckets: int) -> list[int]:
    """At most ``max_buckets`` batch sizes to capture that minimise
    :func:`padded_rows` over a batch-size distribution (the largest batch
    size seen is always one of them, so every step fits).

    Exact, by dynamic programming over the distinct batch sizes seen (an
    optimal bucket always equals a batch size that occurs): O(k n^2) for n
    distinct sizes. Ties go to the smaller buckets. Each captured graph costs
    capture time and memory, which is why their number is bounded.
    Raises GraphError for an empty distribution or max_buckets < 1.
    """
    if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
        raise GraphError(f"max_buckets must be a positive integer, got {max_buckets!r}")
    dist = _check_distribution(counts)
    sizes = sorted(b for b, c in dist.items() if c > 0)
    n = len(sizes)
    k = min(max_buckets, n)

    def cost(i: int, j: int) -> float:  # sizes[i..j] all padded to sizes[j]
        return sum(dist[sizes[t]] * (sizes[j] - sizes[t]) for t in range(i, j + 1))

    inf = float("inf")
    # best[m][j]: least padding for sizes[0..j] with m buckets, the last at sizes[j]
    best = [[inf] * n for _ in range(k + 1)]
    prev = [[-1] * n for _ in range(k + 1)]
    for j in range(n):
        best[1][j] = cost(0, j)
    for m in range(2, k + 1):
        for j in range(n):
            for i in range(j):  # previous bucket at sizes[i]
                c = best[m - 1][i] + cost(i + 1, j)
                if c < best[m][j] - 1e-12:
                    best[m][j], prev[m][j] = c, i
    m = min(range(1, k + 1), key=lambda mm: (best[mm][n - 1], mm))
    out, j = [], n - 1
    while j >= 0 and m >= 1:
        out.append(sizes[j])
        j, m = prev[m][j], m - 1
    return sorted(out)

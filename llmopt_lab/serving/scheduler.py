"""Which sequences run in the next step: three batching policies (lesson 10).

* ``static``: request-level batching. When no batch is running, the waiting
  requests (up to ``max_num_seqs``) form one; it runs until its *last* member
  finishes. Prompts are padded to the longest and a finished member keeps its
  row (a padding token every step) until the batch ends; nobody joins. KV
  blocks for every member's prompt + max_new_tokens are reserved when the
  batch forms, so a batch never runs out of memory.
* ``dynamic``: the same batches, but one forms only when ``max_num_seqs``
  requests wait or the oldest has waited ``max_wait_s`` (Triton Inference
  Server's dynamic batcher): fuller batches for a bounded added delay.
* ``continuous``: iteration-level scheduling (Orca, vLLM). Every step,
  finished sequences have left and waiting ones join while there are free
  sequence slots, tokens in the step budget and KV blocks. Prompts are
  packed (no padding computed); with ``chunked_prefill`` a long prompt is
  split into chunks that share steps with the decodes (Sarathi-Serve), so a
  long prompt never stalls the running sequences for a whole step.

Order of the continuous policy each step: running sequences that decode
(one token each), then running ones still in prefill (the next chunk), then
new or preempted ones in arrival order. When a running sequence needs a
new KV block and none is free, the *most recently arrived* running sequence
is preempted: its blocks are freed and it goes back to the front of the
queue, to be recomputed (prompt + what it generated) when blocks free up.
Victims are the newest, so the oldest requests always progress (no
starvation); the price is recomputation, counted in ``stats``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..cache.block_manager import BlockManager, _blocks_for
from ..errors import ServingError
from .sequence import Sequence, Status

POLICIES = ("static", "dynamic", "continuous")


@dataclass
class SchedulerConfig:
    """Batching settings. policy: one of POLICIES; max_num_seqs: sequences in
    a step (the batch size); max_num_batched_tokens: tokens in a step
    (continuous only); chunked_prefill: split prompts to fit that budget
    (continuous only); max_wait_s: the dynamic policy's longest wait.
    Raises ServingError for values out of range."""

    policy: str = "continuous"
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    chunked_prefill: bool = True
    max_wait_s: float = 0.05

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ServingError(f"unknown batching policy {self.policy!r}; choose one of "
                               f"{', '.join(POLICIES)}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ServingError(f"{name} must be a positive integer, got {v!r}")
        if self.chunked_prefill and self.policy != "continuous":
            raise ServingError(f"chunked prefill needs the continuous policy, not {self.policy!r}")
        if not isinstance(self.max_wait_s, (int, float)) or not self.max_wait_s >= 0:
            raise ServingError(f"max_wait_s must be a number >= 0, got {self.max_wait_s!r}")


@dataclass
class ScheduledBatch:
    """One step: ``seqs[i]`` feeds ``num_tokens[i]`` tokens from its
    ``num_computed``; ``padded_to``: static prefill pads every chunk to this
    length (0: no padding); ``pad_rows``: finished members of a static batch
    that compute one padding token each; ``copies``: (src, dst) block copies
    (copy-on-write) to make before the step; ``preempted``: sequences sent
    back to the queue while scheduling; ``admitted``: sequences that got their
    blocks in this step (their ``num_cached_tokens`` came from the prefix cache).

    Raises: nothing; a plain record."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    padded_to: int = 0
    pad_rows: int = 0
    copies: list = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs) + self.pad_rows


class Scheduler:
    """Queues and the policy. The engine calls :meth:`add`, then
    :meth:`schedule` before each step and :meth:`finish` for each sequence
    that ends.

    Raises: ServingError from its :class:`SchedulerConfig` (unknown policy,
    sizes out of range); CacheError from the block manager when a verb is
    used out of order."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config, self.bm = config, block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order (oldest first)
        self.batch: list[Sequence] = []  # static/dynamic: the members of the running batch

    # ------------------------------------------------------------------ queues
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.bm.free(seq)

    # ---------------------------------------------------------------- schedule
    def schedule(self, now: float) -> ScheduledBatch:
        """The next step (possibly empty: nothing to do, or the dynamic policy waiting)."""
        if self.config.policy == "continuous":
            return self._continuous()
        return self._request_level(now)

    def _request_level(self, now: float) -> ScheduledBatch:
        out = ScheduledBatch()
        if self.batch and all(s.finished for s in self.batch):
            self.batch = []
        if not self.batch:
            if not self.waiting:
                return out
            if self.config.policy == "dynamic":
                full = len(self.waiting) >= self.config.max_num_seqs
                if not full and now - self.waiting[0].arrival_time < self.config.max_wait_s:
                    return out  # wait for a fuller batch
            self._form_batch(out)
        live = [s for s in self.batch if not s.finished]
        if any(s.in_prefill for s in live):  # the batch's first step: every prompt, padded
            out.padded_to = max(s.to_compute for s in live)
        for s in live:
            if s.to_compute == 1 and s.num_output:
                out.copies.append(self.bm.append_slot(s))  # reserved: never OutOfBlocks
            out.seqs.append(s)
            out.num_tokens.append(s.to_compute)
        out.pad_rows = len(self.batch) - len(live)
        return out

    def _form_batch(self, out: ScheduledBatch) -> None:
        """Take waiting requests in order while their worst case (prompt +
        every token they may generate) fits the free blocks."""
        bs, free = self.bm.block_size, self.bm.num_free_blocks
        while self.waiting and len(self.batch) < self.config.max_num_seqs:
            s = self.waiting[0]
            need = _blocks_for(len(s.tokens) + s.max_tokens - s.num_output, bs)
            if need > free and self.batch:
                break
            self.waiting.popleft()
            free -= need
            self._admit(s, out)
            self.batch.append(s)

    def _admit(self, s: Sequence, out: ScheduledBatch) -> None:
        self.bm.allocate(s)
        out.admitted.append(s)
        s.num_computed = s.num_cached_tokens
        s.cached_tokens_total += s.num_cached_tokens
        s.status = Status.RUNNING
        self.running.append(s)
        self.running.sort(key=lambda x: (x.arrival_time, x.request_id))

    def _continuous(self) -> ScheduledBatch:
        cfg, out = self.config, ScheduledBatch()
        budget = cfg.max_num_batched_tokens
        decoding = [s for s in self.running if not s.in_prefill]
        prefilling = [s for s in self.running if s.in_prefill]
        for s in decoding:
            if budget == 0:
                break
            if s.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            if not self._make_room(s, out):
                continue
            out.copies.append(self.bm.append_slot(s))
            out.seqs.append(s)
            out.num_tokens.append(1)
            budget -= 1
        for s in prefilling:
            if budget == 0:
                break
            if s.status is not Status.RUNNING:
                continue
            n = min(s.to_compute, budget) if cfg.chunked_prefill else s.to_compute
            if n > budget:
                continue
            out.seqs.append(s)
            out.num_tokens.append(n)
            budget -= n
        # newcomers only when nobody was preempted (they would take the blocks just freed)
        while not out.preempted and self.waiting and budget > 0 and \
                len(self.running) < cfg.max_num_seqs:
            s = self.waiting[0]
            if not self.bm.can_allocate(s):
                break
            if not cfg.chunked_prefill and s.to_compute - self._cached(s) > budget and out.seqs:
                break  # whole prompts only: wait for a step with room (alone, it may exceed)
            self.waiting.popleft()
            self._admit(s, out)
            n = min(s.to_compute, budget) if cfg.chunked_prefill else s.to_compute
            out.seqs.append(s)
            out.num_tokens.append(n)
            budget -= n
        return out

    def _cached(self, s: Sequence) -> int:
        """Prompt tokens of s a prefix-cache hit would serve (0 without the cache)."""
        if not self.bm.enable_prefix_cache:
            return 0
        return len(self.bm._lookup(s.tokens)[0]) * self.bm.block_size

    def _make_room(self, s: Sequence, out: ScheduledBatch) -> bool:
        """Free a block for s's next token by preempting the newest running
        sequences; False when s itself had to go."""
        while not self.bm.can_append(s):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is s:
                return False
        return True

    def _preempt(self, s: Sequence, out: ScheduledBatch) -> None:
        """Recompute preemption: drop s's K/V, queue it first."""
        if s in out.seqs:  # scheduled earlier in this step: take it back
            i = out.seqs.index(s)
            del out.seqs[i], out.num_tokens[i]
        self.running.remove(s)
        self.bm.free(s)
        s.num_computed = 0
        s.status = Status.WAITING
        s.num_preemptions += 1
        self.waiting.appendleft(s)
        out.preempted.append(s)

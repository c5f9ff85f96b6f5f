"""The step description: what one forward pass computes, passed explicitly.

Every cached forward of the model (``generate``'s prefill and decode, the
verification of draft tokens, a batching engine's mixed steps) is described by
one :class:`Step`, built by the caller and handed to the model, the KV storage
and the attention function. Nothing travels through a global.

A step holds N tokens of S sequences, *packed*: sequence 0's queries first,
then sequence 1's, and so on, with no padding between them. Each sequence may
bring any number of queries: a whole prompt (prefill), a chunk of one (chunked
prefill), one token (decode) or k+1 tokens (speculative verification), so one
step can mix them. For every token the step says its position and the *slot*
of the KV storage its key and value are written to; for every sequence, its
block table (which storage blocks hold its positions, in order) and how many
keys it has once the step is written (its context length).

Storage is ``num_blocks x block_size`` slots per layer
(:class:`llmopt_lab.cache.KVPool`); position p of sequence s lives in block
``block_tables[s, p // block_size]`` at offset ``p % block_size``, i.e. in
slot ``block * block_size + offset``. A contiguous static cache is the special
case of one block per sequence (block_size = the longest sequence): sequence
s owns block s and ``contiguous=True`` lets the attention read the storage
in place instead of gathering blocks.

Device tensors that a CUDA graph captures must keep their addresses:
:class:`StepBuffers` preallocates them once and a decode step is advanced in
place (:meth:`Step.advance`), never rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import CacheError


@dataclass
class Step:
    """One forward pass over packed tokens of several sequences.

    tokens: (N,) int64 token ids, sequence by sequence.
    positions: (N,) int64 position of each token in its sequence; the queries
        of one sequence are consecutive positions.
    slots: (N,) int64 destination slot of each token's key and value
        (block * block_size + offset).
    query_start: (S + 1,) int64 cumulative query counts: sequence s owns tokens
        ``query_start[s]:query_start[s + 1]``.
    context_lens: (S,) int64 keys of each sequence once this step is written
        (its last position + 1).
    block_tables: (S, max_blocks) int64 storage blocks of each sequence in
        position order (entries past its length are ignored).
    block_size: slots per block (host int).
    num_queries: host copy of the query counts (S ints): shapes are chosen
        from it without reading the device.
    contiguous: True when sequence s owns block s whole (a static cache):
        attention then reads the storage in place.
    last_position: host int, the largest position in the step (None when
        not known): lets :meth:`advance` refuse to run past a block without
        reading the device.

    Raises:
        CacheError: from :meth:`advance`, for a step that is not a decode
            step of a contiguous cache or would run past its block (the
            record itself checks nothing; :func:`~llmopt_lab.step.host_step`
            raises CacheError for positions that do not fit).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    query_start: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    block_size: int
    num_queries: tuple[int, ...]
    contiguous: bool = False
    last_position: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_seqs(self) -> int:
        return len(self.num_queries)

    @property
    def max_queries(self) -> int:
        return max(self.num_queries)

    @property
    def uniform(self) -> bool:
        """Every sequence has the same number of queries (decode, a rectangle)."""
        return min(self.num_queries) == max(self.num_queries)

    def last_token_index(self) -> torch.Tensor:
        """(S,) index in the packed order of each sequence's last token."""
        return self.query_start[1:] - 1

    def advance(self, next_tokens: torch.Tensor) -> None:
        """Turn a decode step (one query per sequence) into the next one, in
        place: the sampled ``next_tokens`` are fed at the next position. They
        may cover only the first n <= S sequences (a CUDA graph's bucket padded
        with dummy rows): the others stay where they are.

        Every tensor keeps its storage (what a captured CUDA graph reads). Only
        for one query per sequence within a block (a contiguous cache): a paged
        sequence crossing into a new block needs a rebuilt step.

        Raises CacheError for a step that is not a decode step of a contiguous
        cache, and when the next position would be past the block (the
        cache's capacity per sequence: the write would land in the next
        sequence's slots); checked on the host copy ``last_position``, no
        device read.
        """
        if not self.contiguous or max(self.num_queries) != 1:
            raise CacheError("advance() is for decode steps of a contiguous cache; build the next "
                             "step instead")
        if self.last_position is not None and self.last_position + 1 >= self.block_size:
            raise CacheError(f"advance() would write position {self.last_position + 1}, past the "
                             f"cache's {self.block_size} slots per sequence: make the cache larger "
                             "(max_len) or generate fewer tokens")
        n = next_tokens.shape[0]
        self.tokens[:n].copy_(next_tokens)
        self.positions[:n].add_(1)
        self.slots[:n].add_(1)
        self.context_lens[:n].add_(1)
        if self.last_position is not None:
            self.last_position += 1


class StepBuffers:
    """Preallocated device tensors for steps of up to ``max_tokens`` tokens of
    ``max_seqs`` sequences with ``max_blocks`` blocks each.

    :meth:`fill` copies a step's host values into them in place and returns a
    :class:`Step` whose tensors are views of the buffers (same addresses every
    time), so a CUDA graph captured over one step can replay the next.
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device=None):
        if min(max_tokens, max_seqs, max_blocks) < 1:
            raise CacheError(f"step buffers need positive sizes, got {max_tokens} tokens, "
                             f"{max_seqs} sequences, {max_blocks} blocks")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        with torch.inference_mode(False):  # plain tensors: updated in place inside and outside
            z = lambda *shape: torch.zeros(shape, dtype=torch.long, device=dev)  # noqa: E731
            self.tokens, self.positions, self.slots = z(max_tokens), z(max_tokens), z(max_tokens)
            self.query_start = z(max_seqs + 1)
            self.context_lens = z(max_seqs)
            self.block_tables = z(max_seqs, max_blocks)

    def fill(self, host: "HostStep") -> Step:
        """Copy ``host`` into the buffers; raises CacheError when it does not fit."""
        n, s, b = len(host.tokens), len(host.num_queries), max(len(t) for t in host.block_tables)
        if n > self.max_tokens or s > self.max_seqs or b > self.max_blocks:
            raise CacheError(f"a step of {n} tokens, {s} sequences, {b} blocks does not fit buffers "
                             f"of {self.max_tokens}, {self.max_seqs}, {self.max_blocks}")
        t = host.tensors()
        out = {}
        for name in ("tokens", "positions", "slots", "query_start", "context_lens"):
            dst = getattr(self, name)[: t[name].shape[0]]
            dst.copy_(t[name])
            out[name] = dst
        tables = self.block_tables[:s, :b]
        tables.copy_(t["block_tables"])
        return Step(block_tables=tables, block_size=host.block_size,
                    num_queries=tuple(host.num_queries), contiguous=host.contiguous,
                    last_position=max(host.positions), **out)


@dataclass
class HostStep:
    """A step described with Python lists, before it goes to the device.

    Build one with :func:`host_step`; :meth:`to_step` makes a fresh
    :class:`Step`, :meth:`StepBuffers.fill` an in-place one.
    """

    tokens: list[int]
    positions: list[int]
    slots: list[int]
    num_queries: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    contiguous: bool

    def tensors(self, device=None) -> dict[str, torch.Tensor]:
        width = max(len(t) for t in self.block_tables)
        tables = [t + [0] * (width - len(t)) for t in self.block_tables]
        starts = [0]
        for q in self.num_queries:
            starts.append(starts[-1] + q)
        mk = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        return dict(tokens=mk(self.tokens), positions=mk(self.positions), slots=mk(self.slots),
                    query_start=mk(starts), context_lens=mk(self.context_lens),
                    block_tables=mk(tables))

    def to_step(self, device=None) -> Step:
        return Step(block_size=self.block_size, num_queries=tuple(self.num_queries),
                    contiguous=self.contiguous, last_position=max(self.positions),
                    **self.tensors(device))


def host_step(chunks: Sequence[Sequence[int]], starts: Sequence[int],
              block_tables: Sequence[Sequence[int]], block_size: int,
              contiguous: bool = False) -> HostStep:
    """Describe a step: sequence s feeds the tokens ``chunks[s]`` at positions
    ``starts[s], starts[s] + 1, ...``; its earlier keys are at positions
    0..starts[s]-1 in the blocks ``block_tables[s]``.

    Raises CacheError when a chunk is empty or a position falls outside the
    sequence's blocks.
    """
    if not (len(chunks) == len(starts) == len(block_tables)) or not chunks:
        raise CacheError(f"a step needs one chunk, start and block table per sequence, got "
                         f"{len(chunks)}, {len(starts)}, {len(block_tables)}")
    tokens, positions, slots, counts, ctx = [], [], [], [], []
    for s, (chunk, start, table) in enumerate(zip(chunks, starts, block_tables)):
        chunk = list(chunk)
        if not chunk:
            raise CacheError(f"sequence {s} brings no token to this step")
        end = start + len(chunk)
        if start < 0 or end > len(table) * block_size:
            raise CacheError(f"sequence {s}: positions {start}..{end - 1} do not fit its "
                             f"{len(table)} block(s) of {block_size} slots")
        tokens += chunk
        for p in range(start, end):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        counts.append(len(chunk))
        ctx.append(end)
    return HostStep(tokens=tokens, positions=positions, slots=slots, num_queries=counts,
                    context_lens=ctx, block_tables=[list(t) for t in block_tables],
                    block_size=block_size, contiguous=contiguous)


def step_logits(model, kv, step: Step, every_token: bool = False) -> torch.Tensor:
    """The step function itself: what :func:`run_step` runs eagerly and what
    :mod:`llmopt_lab.compilation` hands to ``torch.compile`` (one function,
    so compiled and eager compute the same thing). Call it under
    ``torch.inference_mode()``; arguments and result as :func:`run_step`."""
    hidden = model.step_hidden(step, kv)  # (N, H)
    if not every_token:
        hidden = hidden[step.last_token_index()]  # (S, H)
    return model.lm_head(hidden).float()


@torch.inference_mode()
def run_step(model, kv, step: Step, every_token: bool = False) -> torch.Tensor:
    """One forward of ``step`` through ``model`` with KV storage ``kv``.

    Returns float32 logits after each sequence's last token, (S, V), or after
    every token, (N, V), with ``every_token`` (verifying draft tokens).
    Raises CacheError when ``kv`` does not fit the model.
    """
    return step_logits(model, kv, step, every_token)

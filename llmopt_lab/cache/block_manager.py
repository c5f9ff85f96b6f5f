"""Which blocks of a :class:`~llmopt_lab.cache.KVPool` each sequence holds
(lesson 07): a block manager with reference counts, copy-on-write and a
prefix cache, in plain Python (no tensors; tested on CPU).

The pool stores K/V; this module only decides *where*. A sequence's
``block_table`` lists its blocks in position order: position p lives in block
``block_table[p // block_size]`` at offset ``p % block_size``, which is what
:func:`~llmopt_lab.step.host_step` turns into slots.

The verbs, as a scheduler calls them::

    bm = BlockManager(num_blocks=pool.num_blocks, block_size=pool.block_size,
                      enable_prefix_cache=True)
    seq = BlockSequence(prompt)
    if bm.can_allocate(seq):
        bm.allocate(seq)  # seq.block_table, seq.num_cached_tokens
    # prefill seq.tokens[seq.num_cached_tokens:] from that position, then per decode step:
    seq.tokens.append(next_token)
    copy_blocks(pool, [bm.append_slot(seq)])  # a (src, dst) pair on copy-on-write, else None
    bm.free(seq)  # when it ends or is preempted

Prefix cache: every *full* block is named by a chained hash,
``hash(previous block's hash, this block's token ids)``, so equal hashes mean
equal prefixes (up to collisions, which the stored token ids and parent
catch). A new prompt reuses the cached blocks of its longest cached prefix of
full blocks; freed blocks keep their content and hash and are handed out
again least-recently-freed first, so a later prompt can still hit them until
they are evicted.

Two choices worth knowing:

* A prompt never hits its own last token: only full blocks inside its first
  ``len - 1`` tokens can hit (vLLM's rule), so at least one token is computed
  (the model needs its logits) and the recomputed tokens go to private blocks:
  a shared block is never written.
* When is a block named? By default when it is handed out (``allocate``, and
  ``append_slot`` when a block fills), before the step that computes its K/V
  runs, as nano-vllm does. A step writes every token's K/V before any
  attention reads them, so a sequence that hits those blocks is safe in the
  same step or later. A scheduler that prefills prompts in chunks, or that
  may preempt a sequence before its blocks are computed, builds the manager
  with ``name_when="computed"`` and calls :meth:`BlockManager.mark_computed`
  after each step: a block is then named only once its K/V exist, so no
  prompt can hit a block that holds nothing yet.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import CacheError


class OutOfBlocks(CacheError):
    """Not enough free blocks for the request. Raised before any state
    changes, so a scheduler can catch it and preempt a sequence."""


@dataclass
class BlockSequence:
    """The state of one sequence the manager reads and writes.

    tokens: every token id so far (prompt, then generated ones); the caller
        appends to it. block_table: the sequence's blocks in position order
        (written by the manager). num_cached_tokens: prompt tokens whose K/V a
        prefix-cache hit already holds (written by ``allocate``): prefill
        ``tokens[num_cached_tokens:]`` from that position.

    Any object with these three attributes works in its place.

    Raises: nothing; a plain record (the :class:`BlockManager` raises).
    """

    tokens: list[int]
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0


def block_hash(prev: bytes | None, tokens) -> bytes:
    """Chained hash of a full block: sha256(previous block's hash, token ids as
    little-endian int64). Deterministic across runs and machines."""
    h = hashlib.sha256(prev if prev is not None else b"")
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def prefix_hashes(tokens, block_size: int) -> list[bytes]:
    """The chain hashes of the full blocks of ``tokens``: h_0 = block_hash(None,
    block 0), h_i = block_hash(h_{i-1}, block i); a partial last block has none.
    Raises CacheError for a block size below 1."""
    if block_size < 1:
        raise CacheError(f"block_size must be positive, got {block_size}")
    out, prev = [], None
    for i in range(len(tokens) // block_size):
        prev = block_hash(prev, tuple(tokens[i * block_size:(i + 1) * block_size]))
        out.append(prev)
    return out


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Hands out the ``num_blocks`` blocks of ``block_size`` slots of a pool.

    Every block has a reference count (the number of live sequences whose
    table holds it); a block with count 0 is free. ``enable_prefix_cache``
    reuses full blocks across sequences (see the module docstring);
    ``debug`` runs :meth:`check_invariants` at the end of every verb.

    Counters (prefix cache): ``hits`` prompt tokens served from the cache,
    ``misses`` prompt tokens computed, ``collisions`` hash matches whose token
    ids (or parent block) differed.

    Raises:
        CacheError: sizes that are not positive, an unknown ``name_when``, a
            verb used out of order (allocating twice, appending to a sequence
            that holds no blocks, a fork into a non-empty child), a broken
            invariant.
        OutOfBlocks: (a CacheError) allocate or append_slot with no free
            block left (preempt a sequence first).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = False,
                 debug: bool = False, name_when: str = "allocated"):
        if num_blocks < 1 or block_size < 1:
            raise CacheError(f"num_blocks and block_size must be positive, got {num_blocks}, "
                             f"{block_size}")
        if name_when not in ("allocated", "computed"):
            raise CacheError(f"name_when must be 'allocated' or 'computed', got {name_when!r}")
        self.name_when = name_when
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_cache, self.debug = enable_prefix_cache, debug
        self._ref = [0] * num_blocks
        # per full block: its chain hash, its token ids, a unique key and its parent's key
        # (the key is never reused, so matching parents proves the whole prefix matches)
        self._hash: list[bytes | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._key: list[int | None] = [None] * num_blocks
        self._parent: list[int | None] = [None] * num_blocks
        self._next_key = 0
        self._cached: dict[bytes, int] = {}  # hash -> block
        # free blocks, next to hand out first; a cached one is evicted when handed out
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._seqs: dict[int, object] = {}  # id -> live sequence (holding blocks)
        self._ntok: dict[int, int] = {}  # id -> tokens it has slots for
        self._named: dict[int, int] = {}  # id -> leading full blocks of its table that are named
        self.hits = self.misses = self.collisions = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they can be evicted)."""
        return len(self._free)

    def block_table(self, seq) -> list[int]:
        """A copy of ``seq``'s blocks in position order; CacheError if it holds none."""
        self._live(seq)
        return list(seq.block_table)

    def can_allocate(self, seq) -> bool:
        """Whether :meth:`allocate` would succeed now (prefix-cache hits counted)."""
        return self._allocation_need(seq)[2] <= len(self._free)

    def can_append(self, seq) -> bool:
        """Whether :meth:`append_slot` would succeed now."""
        return self._append_need(seq)[0] <= len(self._free)

    # -------------------------------------------------------------------- verbs
    def allocate(self, seq) -> None:
        """Give ``seq`` blocks for all its tokens, reusing cached blocks of its
        longest cached prefix; sets ``seq.block_table`` and
        ``seq.num_cached_tokens`` (a multiple of block_size, < len(tokens)).

        Raises CacheError if seq has no tokens or already holds blocks, and
        OutOfBlocks (nothing changed) when the free blocks do not suffice.
        """
        if id(seq) in self._seqs or seq.block_table:
            raise CacheError("this sequence already holds blocks: free it before allocating again")
        hits, hashes, need, collided = self._allocation_need(seq)
        if need > len(self._free):
            raise OutOfBlocks(f"a sequence of {len(seq.tokens)} tokens needs {need} free blocks, "
                              f"{len(self._free)} are free: preempt a sequence or add blocks")
        bs, table = self.block_size, []
        for b in hits:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
            table.append(b)
        eager = self.name_when == "allocated"
        for i in range(len(hits), _blocks_for(len(seq.tokens), bs)):
            b = self._take_free()
            table.append(b)
            if eager and i < len(hashes):  # a full block: name it for later prompts
                self._register(b, hashes[i], seq.tokens[i * bs:(i + 1) * bs],
                               self._key[table[i - 1]] if i else None)
        seq.block_table = table
        seq.num_cached_tokens = len(hits) * bs
        self._seqs[id(seq)], self._ntok[id(seq)] = seq, len(seq.tokens)
        self._named[id(seq)] = len(seq.tokens) // bs if eager else len(hits)
        if self.enable_prefix_cache:
            self.hits += seq.num_cached_tokens
            self.misses += len(seq.tokens) - seq.num_cached_tokens
            self.collisions += collided
        self._checked()

    def append_slot(self, seq) -> tuple[int, int] | None:
        """Make room for the token the caller just appended to ``seq.tokens``
        (its position is ``len(seq.tokens) - 1``): a new block when the last
        one is full; when the last block is partly filled and shared with
        another sequence (ref count > 1), copy-on-write: ``seq`` gets a fresh
        block and the call returns ``(src, dst)``, which the caller must copy
        in the pool (:func:`copy_blocks`) before the step writes. Else None.

        Raises CacheError if seq holds no blocks or did not grow by exactly
        one token since its last allocate/append_slot, and
        OutOfBlocks (nothing changed) when a block is needed and none is free.
        """
        need, pos = self._append_need(seq)
        if need > len(self._free):
            raise OutOfBlocks(f"position {pos} needs a free block and none is free: preempt a "
                              "sequence or add blocks")
        table, bs, pair = seq.block_table, self.block_size, None
        if pos % bs == 0:
            table.append(self._take_free())
        elif need:  # copy-on-write: the others keep the shared block as it is
            src, dst = table[-1], self._take_free()
            self._ref[src] -= 1
            table[-1], pair = dst, (src, dst)
        self._ntok[id(seq)] = pos + 1
        if self.name_when == "allocated" and (pos + 1) % bs == 0:  # the last block is now full
            self._name_block(seq, pos // bs)
            self._named[id(seq)] = (pos + 1) // bs
        self._checked()
        return pair

    def mark_computed(self, seq, num_tokens: int) -> None:
        """Record that the K/V of ``seq``'s first ``num_tokens`` positions are
        written: with ``name_when="computed"`` its full blocks among them are
        named (a later prompt may hit them from now on). A no-op for the
        default ``name_when="allocated"``. Raises CacheError if seq holds no
        blocks or num_tokens exceeds its slots.
        """
        self._live(seq)
        if not 0 <= num_tokens <= self._ntok[id(seq)]:
            raise CacheError(f"{num_tokens} computed tokens but the sequence has slots for "
                             f"{self._ntok[id(seq)]}")
        if self.name_when != "computed":
            return
        for i in range(self._named[id(seq)], num_tokens // self.block_size):
            self._name_block(seq, i)
        self._named[id(seq)] = max(self._named[id(seq)], num_tokens // self.block_size)
        self._checked()

    def _name_block(self, seq, i: int) -> None:
        """Name full block i of seq by its chained hash (prefix cache)."""
        if not self.enable_prefix_cache:
            return
        bs, table = self.block_size, seq.block_table
        prev = table[i - 1] if i else None
        if self._hash[table[i]] is not None:  # named already (shared through a fork)
            return
        self._register(table[i], block_hash(self._hash[prev] if i else None,
                                            seq.tokens[i * bs:(i + 1) * bs]),
                       seq.tokens[i * bs:(i + 1) * bs], self._key[prev] if i else None)

    def fork(self, parent, child) -> None:
        """Let ``child`` share every block of ``parent`` (ref counts +1): parallel
        sampling. ``child`` must hold no blocks; its tokens must be the
        parent's (an empty list is filled with a copy). Needs no free block.

        Raises CacheError if parent holds no blocks, child holds some, or
        their tokens differ.
        """
        self._live(parent)
        if id(child) in self._seqs or child.block_table:
            raise CacheError("the child of a fork must hold no blocks")
        if not child.tokens:
            child.tokens = list(parent.tokens)
        elif list(child.tokens) != list(parent.tokens):
            raise CacheError("a forked child must start with its parent's tokens")
        for b in parent.block_table:
            self._ref[b] += 1
        child.block_table = list(parent.block_table)
        child.num_cached_tokens = parent.num_cached_tokens
        self._seqs[id(child)], self._ntok[id(child)] = child, self._ntok[id(parent)]
        self._named[id(child)] = self._named[id(parent)]
        self._checked()

    def free(self, seq) -> None:
        """Release ``seq``'s blocks (finished or preempted): ref counts -1, and
        blocks reaching 0 become free. With the prefix cache a freed full block
        keeps its content and hash (a later prompt may hit it) and is handed
        out again after blocks that hold nothing reusable, least recently freed
        first; a sequence's tail is queued before its head, so heads, which
        more prompts share, live longer. Raises CacheError if seq holds no blocks.
        """
        self._live(seq)
        for b in reversed(seq.block_table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
                if self._hash[b] is None:  # nothing reusable: hand it out first
                    self._free.move_to_end(b, last=False)
        del self._seqs[id(seq)], self._ntok[id(seq)], self._named[id(seq)]
        seq.block_table = []
        seq.num_cached_tokens = 0
        self._checked()

    # --------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Raise CacheError if the books do not balance: every block is either
        free (ref 0, in the free list once) or held (ref = number of live
        sequences whose table holds it, never negative); every cache entry names
        a block carrying that hash; every named full block of a live table is
        named by its tokens (prefix cache: with ``name_when="allocated"``,
        every full block); with no live sequence every block is free."""
        held = [0] * self.num_blocks
        for key, seq in self._seqs.items():
            for b in seq.block_table:
                if not 0 <= b < self.num_blocks:
                    raise CacheError(f"invariant broken: block {b} out of range")
                held[b] += 1
            if len(seq.block_table) != _blocks_for(self._ntok[key], self.block_size):
                raise CacheError(f"invariant broken: {len(seq.block_table)} blocks for "
                                 f"{self._ntok[key]} tokens")
            if self.enable_prefix_cache:
                bs = self.block_size
                for i, b in enumerate(seq.block_table[:self._named[key]]):
                    if self._tokens[b] != tuple(seq.tokens[i * bs:(i + 1) * bs]):
                        raise CacheError(f"invariant broken: full block {b} is not named by its "
                                         "tokens")
        for b in range(self.num_blocks):
            if self._ref[b] < 0:
                raise CacheError(f"invariant broken: block {b} has ref count {self._ref[b]}")
            if self._ref[b] != held[b]:
                raise CacheError(f"invariant broken: block {b} has ref count {self._ref[b]} but "
                                 f"{held[b]} sequences hold it")
            if (b in self._free) != (self._ref[b] == 0):
                raise CacheError(f"invariant broken: block {b} (ref {self._ref[b]}) is "
                                 f"{'' if b in self._free else 'not '}in the free list")
        for h, b in self._cached.items():
            if self._hash[b] != h:
                raise CacheError(f"invariant broken: cache entry points at block {b}, which has "
                                 "another hash")
        if not self._seqs and len(self._free) != self.num_blocks:
            raise CacheError(f"invariant broken: no sequence is live but only {len(self._free)} "
                             f"of {self.num_blocks} blocks are free")

    # ------------------------------------------------------------------ helpers
    def _checked(self) -> None:
        if self.debug:
            self.check_invariants()

    def _live(self, seq) -> None:
        if self._seqs.get(id(seq)) is not seq:
            raise CacheError("this sequence holds no blocks of this manager: allocate it first")

    def _lookup(self, tokens) -> tuple[list[int], list[bytes], int]:
        """Cached blocks holding the longest cached prefix of full blocks within
        the first len - 1 tokens, the chain hashes of every full block of
        ``tokens`` and the number of collisions met. Changes nothing."""
        bs, hits, parent = self.block_size, [], None
        hashes = prefix_hashes(tokens, bs)
        hittable, collided = (len(tokens) - 1) // bs, 0
        for i, h in enumerate(hashes[:hittable]):
            if len(hits) < i:
                break  # a miss ends the prefix: only a prefix can be reused
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            b = self._cached.get(h)
            if b is not None and (self._tokens[b] != chunk or self._parent[b] != parent):
                collided, b = 1, None  # same hash, other content: never serve it
            if b is not None:
                hits.append(b)
                parent = self._key[b]
        return hits, hashes, collided

    def _allocation_need(self, seq) -> tuple[list[int], list[bytes], int, int]:
        if not seq.tokens:
            raise CacheError("cannot allocate blocks for a sequence without tokens")
        hits, hashes, collided = (self._lookup(seq.tokens) if self.enable_prefix_cache
                                  else ([], [], 0))
        fresh = _blocks_for(len(seq.tokens), self.block_size) - len(hits)
        revived = sum(self._ref[b] == 0 for b in hits)  # cached but free: leave the free list
        return hits, hashes, fresh + revived, collided

    def _append_need(self, seq) -> tuple[int, int]:
        self._live(seq)
        pos, bs, table = len(seq.tokens) - 1, self.block_size, seq.block_table
        if pos != self._ntok[id(seq)]:
            raise CacheError(f"append_slot makes room for one new token: the sequence has "
                             f"{len(seq.tokens)} tokens, {self._ntok[id(seq)]} with slots")
        if pos % bs == 0 or self._ref[table[-1]] > 1:
            return 1, pos
        return 0, pos

    def _take_free(self) -> int:
        """Hand out the next free block (ref 1), evicting its cached content."""
        b, _ = self._free.popitem(last=False)
        h = self._hash[b]
        if h is not None and self._cached.get(h) == b:
            del self._cached[h]
        self._hash[b] = self._tokens[b] = self._key[b] = self._parent[b] = None
        self._ref[b] = 1
        return b

    def _register(self, b: int, h: bytes, tokens, parent: int | None) -> None:
        """Name full block b by its hash, tokens and parent's key (prefix cache)."""
        if not self.enable_prefix_cache:
            return
        tokens = tuple(tokens)
        self._hash[b], self._tokens[b], self._parent[b] = h, tokens, parent
        self._key[b], self._next_key = self._next_key, self._next_key + 1
        old = self._cached.get(h)
        if old is None or self._tokens[old] != tokens or self._parent[old] != parent:
            self._cached[h] = b  # new, or a collision: the newest wins


def copy_blocks(pool, pairs) -> None:
    """Copy-on-write in the pool: for every layer, copy the keys and values
    (and ``k_scale``/``v_scale`` of an int8 pool) of each ``src`` block into
    its ``dst`` block. pairs: iterable of (src, dst) block ids; None entries
    (append_slot with nothing to copy) are skipped.

    Raises: nothing of its own; block ids come from a
    :class:`BlockManager` (an id outside the pool is an IndexError of torch:
    a bug of the caller, not a user input)."""
    pairs = [p for p in pairs if p is not None]
    if not pairs:
        return
    import torch  # only here: the manager itself is plain Python

    src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=pool.device)
    dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=pool.device)
    with torch.no_grad():
        for name in ("k", "v", "k_scale", "v_scale"):
            for store in getattr(pool, name, None) or []:
                store[dst] = store[src]  # (pairs, Hkv, block_size, D)


def kv_waste(prompt_lens, output_lens, block_size: int, max_len: int,
             budget_tokens: int | None = None) -> dict:
    """KV slots (one slot = one token's K and V in every layer) that a workload
    needs under three allocation schemes, at the end of every sequence:

    * ``max_len``: every sequence reserves ``max_len`` slots up front (a static cache);
    * ``exact``: every sequence reserves exactly prompt + output slots (contiguous,
      knowing the output length in advance: the unreachable ideal);
    * ``paged``: blocks of ``block_size`` slots, so only the last block of a
      sequence is partly empty (internal fragmentation < block_size per sequence).

    prompt_lens, output_lens: tokens per sequence. Returns a dict with
    ``tokens`` (slots holding K/V: the sum of lengths), ``slots`` and
    ``waste`` (fraction of the reserved slots that hold nothing) per scheme,
    and with ``budget_tokens`` (slots available) ``fit``: how many sequences
    run at once under each scheme, admitting the workload in order (repeated
    if it fits whole) until the next sequence does not fit.
    Raises CacheError for mismatched or non-positive lengths or a sequence
    longer than max_len.
    """
    lens = [p + o for p, o in zip(prompt_lens, output_lens)]
    if len(prompt_lens) != len(output_lens) or not lens:
        raise CacheError("kv_waste needs one output length per prompt length, at least one")
    if block_size < 1 or min(prompt_lens) < 1 or min(output_lens) < 0 or max(lens) > max_len:
        raise CacheError(f"lengths must be positive and at most max_len={max_len}, block_size "
                         f"positive (got block_size={block_size}, longest {max(lens)})")
    sizes = {"max_len": [max_len] * len(lens), "exact": lens,
             "paged": [_blocks_for(n, block_size) * block_size for n in lens]}
    used = sum(lens)
    out = {"num_seqs": len(lens), "tokens": used,
           "slots": {k: sum(v) for k, v in sizes.items()},
           "waste": {k: 1.0 - used / sum(v) for k, v in sizes.items()}}
    if budget_tokens is not None:
        out["fit"] = {k: _fit(v, budget_tokens) for k, v in sizes.items()}
    return out


def _fit(sizes: list[int], budget: int) -> int:
    whole, left = divmod(budget, sum(sizes))
    n = whole * len(sizes)
    for s in sizes:
        if s > left:
            break
        left -= s
        n += 1
    return n

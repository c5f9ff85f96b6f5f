"""Lesson 07's block manager: ref counts, copy-on-write, prefix cache, the
waste of each allocation scheme; and paged generation driven by it equals
plain generation."""

import hashlib
import random

import pytest
import torch
from conftest import scaled_model

from llmopt_lab import generate, preset
from llmopt_lab.cache import Int8KVPool, KVPool
from llmopt_lab.cache import block_manager as bmod
from llmopt_lab.cache.block_manager import (BlockManager, BlockSequence, OutOfBlocks, copy_blocks,
                                            kv_waste)
from llmopt_lab.errors import CacheError
from llmopt_lab.generate import run_step
from llmopt_lab.step import host_step


def _state(bm, seqs):
    return (bm.num_free_blocks, [list(s.block_table) for s in seqs],
            [s.num_cached_tokens for s in seqs], list(bm._ref), dict(bm._cached), list(bm._free))


# ------------------------------------------------------------------ each verb
def test_allocate_gives_ceil_blocks_and_free_restores():
    bm = BlockManager(10, 4, debug=True)
    a, b = BlockSequence(list(range(9))), BlockSequence([1, 2, 3, 4])
    assert bm.can_allocate(a)
    bm.allocate(a)
    bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert set(a.block_table).isdisjoint(b.block_table)
    assert bm.block_table(a) == a.block_table and a.num_cached_tokens == 0
    assert bm.num_free_blocks == 6
    bm.free(a)
    assert bm.num_free_blocks == 9 and a.block_table == []
    bm.free(b)
    assert bm.num_free_blocks == 10
    with pytest.raises(CacheError):
        bm.free(b)  # twice
    with pytest.raises(CacheError):
        bm.allocate(BlockSequence([]))


def test_append_crosses_a_block_boundary_only_when_the_last_is_full():
    bm = BlockManager(4, 4, debug=True)
    s = BlockSequence([5, 6, 7])
    bm.allocate(s)
    s.tokens.append(8)  # position 3: still block 0
    assert bm.can_append(s) and bm.append_slot(s) is None
    assert len(s.block_table) == 1 and bm.num_free_blocks == 3
    s.tokens.append(9)  # position 4: a new block
    assert bm.append_slot(s) is None
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2
    with pytest.raises(CacheError):  # two tokens at once: one append_slot per token
        s.tokens += [1, 2]
        bm.append_slot(s)


def test_fork_then_copy_on_write_of_the_shared_partly_filled_block():
    bm = BlockManager(8, 4, debug=True)
    parent = BlockSequence(list(range(6)))  # block 0 full, block 1 holds 2 of 4
    bm.allocate(parent)
    child = BlockSequence([])
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and child.tokens == parent.tokens
    assert bm.num_free_blocks == 6  # sharing costs nothing
    shared = parent.block_table[1]
    parent.tokens.append(100)
    assert bm.can_append(parent)
    src, dst = bm.append_slot(parent)  # the parent writes into a private copy
    assert src == shared and parent.block_table == [child.block_table[0], dst]
    assert bm.num_free_blocks == 5
    child.tokens.append(200)
    assert bm.append_slot(child) is None  # the child is now alone in the block: writes in place
    assert child.block_table[1] == shared
    bm.free(parent)
    assert bm.num_free_blocks == 6  # block 0 still held by the child
    bm.free(child)
    assert bm.num_free_blocks == 8
    with pytest.raises(CacheError):
        bm.fork(parent, BlockSequence([]))  # parent holds nothing now


def test_out_of_blocks_changes_nothing():
    bm = BlockManager(3, 2, enable_prefix_cache=True, debug=True)
    a = BlockSequence([1, 2, 3, 4])
    bm.allocate(a)
    b = BlockSequence([9, 9, 9])
    before = _state(bm, [a, b])
    assert not bm.can_allocate(b)
    with pytest.raises(OutOfBlocks):
        bm.allocate(b)
    assert _state(bm, [a, b]) == before and b.block_table == []
    c = BlockSequence([7])
    bm.allocate(c)  # the last block
    c.tokens.append(8)
    bm.append_slot(c)  # fills c's block
    for seq in (a, c):  # both need a new block
        seq.tokens.append(0)
        before = _state(bm, [a, c])
        assert not bm.can_append(seq)
        with pytest.raises(OutOfBlocks):
            bm.append_slot(seq)
        assert _state(bm, [a, c]) == before
    child = BlockSequence([])
    d = BlockSequence([1])
    bm2 = BlockManager(1, 4, debug=True)
    bm2.allocate(d)
    bm2.fork(d, child)
    d.tokens.append(2)  # copy-on-write needs a block: none left
    before = _state(bm2, [d, child])
    with pytest.raises(OutOfBlocks):
        bm2.append_slot(d)
    assert _state(bm2, [d, child]) == before
    assert issubclass(OutOfBlocks, CacheError)


def test_invariant_check_catches_a_tampered_table():
    bm = BlockManager(4, 2)
    s = BlockSequence([1, 2, 3])
    bm.allocate(s)
    bm.check_invariants()
    s.block_table[0] = s.block_table[1]
    with pytest.raises(CacheError, match="invariant"):
        bm.check_invariants()


# ---------------------------------------------------------- randomized stress
@pytest.mark.parametrize("prefix", [False, True])
def test_random_operations_keep_the_books_and_the_contents(prefix):
    """1,500 random allocate / append / fork / free operations. A simulated
    pool records, for every slot written, the whole prefix its K/V was computed
    from: every live sequence must read back exactly its own prefixes (the
    prefix cache never serves another prefix, copy-on-write never clobbers)."""
    rng = random.Random(1234 + prefix)
    bs, nb = 4, 24
    bm = BlockManager(nb, bs, enable_prefix_cache=prefix, debug=True)
    slots = {}  # (block, offset) -> tuple of tokens up to that position
    bases = [[rng.randrange(3) for _ in range(12)] for _ in range(3)]
    live = []

    def write(seq, start):
        for p in range(start, len(seq.tokens)):
            slots[seq.block_table[p // bs], p % bs] = tuple(seq.tokens[:p + 1])

    def verify(seq):
        for p in range(len(seq.tokens)):
            assert slots[seq.block_table[p // bs], p % bs] == tuple(seq.tokens[:p + 1])

    ops = {"alloc": 0, "append": 0, "fork": 0, "free": 0, "oob": 0, "cow": 0}
    for i in range(1500):
        op = rng.choices(["alloc", "append", "fork", "free"], [3, 8, 1, 2])[0] if live else "alloc"
        if op == "alloc":
            base = rng.choice(bases)
            tail = [rng.randrange(3) for _ in range(rng.randint(0, 6))]
            seq = BlockSequence(base[:rng.randint(1, 12)] + tail)
            can, before = bm.can_allocate(seq), _state(bm, live)
            try:
                bm.allocate(seq)
            except OutOfBlocks:
                assert not can and _state(bm, live) == before
                ops["oob"] += 1
            else:
                assert can and seq.num_cached_tokens % bs == 0 and seq.num_cached_tokens < len(seq.tokens)
                write(seq, seq.num_cached_tokens)
                live.append(seq)
        elif op == "append":
            seq = rng.choice(live)
            seq.tokens.append(rng.randrange(3))
            can, before = bm.can_append(seq), _state(bm, live)
            try:
                pair = bm.append_slot(seq)
            except OutOfBlocks:
                assert not can and _state(bm, live) == before
                ops["oob"] += 1
                seq.tokens.pop()
            else:
                assert can
                if pair is not None:  # copy-on-write in the simulated pool
                    ops["cow"] += 1
                    for off in range(bs):
                        if (pair[0], off) in slots:
                            slots[pair[1], off] = slots[pair[0], off]
                write(seq, len(seq.tokens) - 1)
        elif op == "fork":
            child = BlockSequence([])
            bm.fork(rng.choice(live), child)
            live.append(child)
        else:
            bm.free(live.pop(rng.randrange(len(live))))
        ops[op] += 1
        bm.check_invariants()
        if i % 10 == 0 or op != "free":
            for seq in live:
                verify(seq)
        if len(live) > 12 or (live and len(live[-1].tokens) > 40):
            bm.free(live.pop(0))
    assert min(ops.values()) > 0, ops  # every path taken, out-of-blocks and copy-on-write too
    if prefix:
        assert bm.hits > 0
    while live:
        bm.free(live.pop(rng.randrange(len(live))))
    bm.check_invariants()
    assert bm.num_free_blocks == nb


# --------------------------------------------------------------- prefix cache
def test_prefix_cache_reuses_a_shared_three_block_prefix():
    bs = 4
    bm = BlockManager(16, bs, enable_prefix_cache=True, debug=True)
    prefix = list(range(100, 112))  # 3 full blocks
    a = BlockSequence(prefix + [1, 2])
    b = BlockSequence(prefix + [3, 4, 5, 6, 7])
    bm.allocate(a)
    assert a.num_cached_tokens == 0 and (bm.hits, bm.misses) == (0, 14)
    free_before = bm.num_free_blocks
    bm.allocate(b)
    assert b.num_cached_tokens == 3 * bs
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert bm.num_free_blocks == free_before - 2  # only its own 2 blocks
    assert (bm.hits, bm.misses) == (12, 14 + 5)
    full = BlockSequence(list(prefix))  # cached in full: its last block is recomputed
    bm.allocate(full)
    assert full.num_cached_tokens == 2 * bs and full.block_table[2] != a.block_table[2]
    longer = BlockSequence(prefix + [1, 2, 3, 4])  # a's 4th block was never full: 3 blocks hit
    bm.allocate(longer)
    assert longer.num_cached_tokens == 3 * bs
    for s in (a, b, full, longer):
        bm.free(s)
    assert bm.num_free_blocks == 16


def test_prefix_cache_off_never_hits():
    bm = BlockManager(8, 2)
    a, b = BlockSequence([1, 2, 3, 4, 5]), BlockSequence([1, 2, 3, 4, 5])
    bm.allocate(a)
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and set(a.block_table).isdisjoint(b.block_table)


def test_hash_collision_is_caught_by_the_token_comparison(monkeypatch):
    monkeypatch.setattr(bmod, "block_hash", lambda prev, tokens: b"same")
    bm = BlockManager(8, 2, enable_prefix_cache=True, debug=True)
    a = BlockSequence([1, 2, 3])
    bm.allocate(a)
    b = BlockSequence([7, 8, 9])  # same "hash", other tokens
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and bm.collisions == 1
    assert set(a.block_table).isdisjoint(b.block_table)



def test_a_broken_chain_is_caught_by_the_parent_check(monkeypatch):
    # a "hash" that forgets the previous block: [5,6][1,1] and [7,8][1,1] name their
    # second blocks alike, though their K/V were computed from different prefixes
    monkeypatch.setattr(bmod, "block_hash", lambda prev, tokens: repr(tuple(tokens)).encode())
    bm = BlockManager(12, 2, enable_prefix_cache=True, debug=True)
    c, d = BlockSequence([5, 6, 1, 1, 0]), BlockSequence([7, 8, 1, 1, 0])
    bm.allocate(c)
    bm.allocate(d)  # its [1,1] block now answers to that name
    e = BlockSequence([5, 6, 1, 1, 4])
    bm.allocate(e)  # [5,6] hits c's block; [1,1] finds d's block, whose parent is not c's
    assert e.num_cached_tokens == 2 and e.block_table[0] == c.block_table[0]
    assert e.block_table[1] not in (c.block_table[1], d.block_table[1]) and bm.collisions == 1


def test_hash_is_deterministic_and_chained():
    h1 = bmod.block_hash(None, (1, 2, 3, 4))
    assert h1 == bmod.block_hash(None, [1, 2, 3, 4]) and len(h1) == 32
    assert bmod.block_hash(h1, (5, 6)) != bmod.block_hash(None, (5, 6))
    want = hashlib.sha256(b"".join(t.to_bytes(8, "little", signed=True) for t in (1, 2, 3, 4)))
    assert h1 == want.digest()  # sha256 of little-endian int64: the same on every run and machine


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_freed_first():
    bs = 2
    bm = BlockManager(4, bs, enable_prefix_cache=True, debug=True)
    a, b = BlockSequence([1, 1, 0]), BlockSequence([2, 2, 0])
    bm.allocate(a)
    bm.allocate(b)
    a_full, b_full = a.block_table[0], b.block_table[0]
    bm.free(a)  # a's full block: cached, queued first
    bm.free(b)  # then b's
    assert bm.num_free_blocks == 4
    again = BlockSequence([1, 1, 5])
    bm.allocate(again)  # a's prefix still hits after its sequence ended
    assert again.num_cached_tokens == 2 and again.block_table[0] == a_full
    bm.free(again)
    # blocks holding nothing reusable go first, then cached ones, least recently freed first
    x = BlockSequence([9] * 6)
    bm.allocate(x)  # 3 blocks: two uncached, then the oldest cached one, b's
    assert b_full in x.block_table and a_full not in x.block_table
    bm.free(x)
    z = BlockSequence([1, 1, 7])
    bm.allocate(z)  # a's survived: it was freed after b's (by `again`)
    assert z.num_cached_tokens == 2 and z.block_table[0] == a_full
    y = BlockSequence([2, 2, 0])
    bm.allocate(y)  # b's prefix was evicted
    assert y.num_cached_tokens == 0


# --------------------------------------------------------------- waste arithmetic
def test_kv_waste_on_a_hand_computed_example():
    # lengths 5+3=8, 2+1=3, 10+7=17; blocks of 4: 8, 4, 20 slots; max_len 32
    w = kv_waste([5, 2, 10], [3, 1, 7], block_size=4, max_len=32, budget_tokens=40)
    assert w["tokens"] == 28
    assert w["slots"] == {"max_len": 96, "exact": 28, "paged": 32}
    assert w["waste"]["max_len"] == pytest.approx(1 - 28 / 96)
    assert w["waste"]["exact"] == 0.0 and w["waste"]["paged"] == pytest.approx(4 / 32)
    # 40 slots: max_len 32 | exact 8+3+17=28, then 8 and 3 (39) | paged 8+4+20=32, then 8 (40)
    assert w["fit"] == {"max_len": 1, "exact": 5, "paged": 4}
    assert "fit" not in kv_waste([1], [1], 4, 8)
    with pytest.raises(CacheError):
        kv_waste([30], [5], 4, 32)


# ------------------------------------------------------------ end to end, model
@pytest.fixture(scope="module")
def model():
    # from_config's weights, scaled so that greedy choices are not near-ties
    return scaled_model(preset("tiny"), seed=3)


def _prompt(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _decode(model, pool, bm, seqs, logits, steps):
    """Greedy decode of live sequences whose last logits are given; returns the
    new tokens of each (steps + 1 of them)."""
    out = [[] for _ in seqs]
    for i in range(steps + 1):
        toks = logits.argmax(-1).tolist()
        for o, t in zip(out, toks):
            o.append(t)
        if i == steps:
            return out
        pairs = []
        for s, t in zip(seqs, toks):
            s.tokens.append(t)
            pairs.append(bm.append_slot(s))
        copy_blocks(pool, pairs)
        logits = run_step(model, pool, host_step([[t] for t in toks], [len(s.tokens) - 1 for s in seqs],
                                                 [s.block_table for s in seqs], bm.block_size).to_step())


def test_paged_generation_with_the_block_manager_equals_generate(model):
    bs = 4
    prompts = [_prompt(5, 1), _prompt(11, 2), _prompt(16, 3)]
    pool = KVPool(model.config, num_blocks=64, block_size=bs)
    bm = BlockManager(64, bs, debug=True)
    seqs = [BlockSequence(list(p)) for p in prompts]
    for s in seqs:
        bm.allocate(s)
    logits = run_step(model, pool, host_step(prompts, [0, 0, 0], [s.block_table for s in seqs], bs).to_step())
    got = _decode(model, pool, bm, seqs, logits, 10)
    assert got == generate(model, prompts, 11, ignore_eos=True).tolist()
    for s in seqs:
        bm.free(s)
    assert bm.num_free_blocks == 64


def test_prefix_cache_end_to_end_computes_only_the_suffix(model):
    bs = 4
    shared = _prompt(12, 4)
    first, second = shared + _prompt(3, 5), shared + _prompt(6, 6)
    pool = KVPool(model.config, num_blocks=32, block_size=bs)
    bm = BlockManager(32, bs, enable_prefix_cache=True, debug=True)
    a = BlockSequence(list(first))
    bm.allocate(a)
    logits = run_step(model, pool, host_step([first], [0], [a.block_table], bs).to_step())
    got_a = _decode(model, pool, bm, [a], logits, 5)[0]
    b = BlockSequence(list(second))  # while a is live: shared blocks
    bm.allocate(b)
    assert b.num_cached_tokens == 12 and b.block_table[:3] == a.block_table[:3]
    k = b.num_cached_tokens
    logits = run_step(model, pool, host_step([second[k:]], [k], [b.block_table], bs).to_step())
    got_b = _decode(model, pool, bm, [b], logits, 5)[0]
    bm.free(a)
    bm.free(b)
    c = BlockSequence(list(second))  # after both ended: the cached blocks kept their K/V
    bm.allocate(c)
    assert c.num_cached_tokens == 16
    k = c.num_cached_tokens
    logits = run_step(model, pool, host_step([second[k:]], [k], [c.block_table], bs).to_step())
    got_c = _decode(model, pool, bm, [c], logits, 5)[0]
    want = generate(model, [first, second], 6, ignore_eos=True).tolist()
    assert [got_a, got_b, got_c] == [want[0], want[1], want[1]]


@pytest.mark.parametrize("pool_cls", [KVPool, Int8KVPool])
def test_copy_on_write_end_to_end(model, pool_cls):
    """Fork after prefill; parent and child continue with different tokens in a
    shared, partly filled block: each equals its own run without the fork."""
    bs = 4
    prompt = _prompt(6, 7)  # block 1 holds 2 of 4 positions
    pool = pool_cls(model.config, num_blocks=16, block_size=bs)
    bm = BlockManager(16, bs, debug=True)
    parent = BlockSequence(list(prompt))
    bm.allocate(parent)
    logits = run_step(model, pool, host_step([prompt], [0], [parent.block_table], bs).to_step())
    child = BlockSequence([])
    bm.fork(parent, child)
    x = int(logits[0].argmax())
    y = (x + 1) % model.config.vocab_size
    parent.tokens.append(x)
    child.tokens.append(y)
    pairs = [bm.append_slot(parent), bm.append_slot(child)]
    assert pairs[0] is not None and pairs[1] is None and pairs[0][0] == child.block_table[1]
    copy_blocks(pool, pairs)
    seqs = [parent, child]
    logits = run_step(model, pool, host_step([[x], [y]], [6, 6], [s.block_table for s in seqs], bs).to_step())
    got = _decode(model, pool, bm, seqs, logits, 5)
    cache = "int8" if pool_cls is Int8KVPool else "static"  # the same storage, unforked
    assert got == generate(model, [prompt + [x], prompt + [y]], 6, ignore_eos=True, cache=cache).tolist()


def test_copy_blocks_copies_every_layer_and_the_scales():
    cfg = preset("tiny")
    pool = Int8KVPool(cfg, num_blocks=4, block_size=2)
    for t in pool.k + pool.v + pool.k_scale + pool.v_scale:
        t.copy_(torch.randint(-50, 50, t.shape).to(t.dtype))
    copy_blocks(pool, [(0, 3), None, (1, 2)])
    for t in pool.k + pool.v + pool.k_scale + pool.v_scale:
        assert torch.equal(t[3], t[0]) and torch.equal(t[2], t[1])

"""The one step contract: packed steps that mix prefill chunks, decode tokens and
draft verification; storage in blocks; per-row sampling; in-place decode steps."""

import pytest
import torch
from conftest import scaled_model

from llmopt_lab import SamplingParams, generate, preset
from llmopt_lab.cache import Int8KVPool, KVPool, StaticCache
from llmopt_lab.errors import CacheError, GenerationError
from llmopt_lab.generate import run_step
from llmopt_lab.step import StepBuffers, host_step


@pytest.fixture(scope="module")
def model():
    return scaled_model(preset("tiny"), seed=5)


def _seq(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _paged_tables(n_seqs, blocks_each, seed=0):
    """Disjoint block tables drawn in a shuffled order (not 0, 1, 2, ...)."""
    order = torch.randperm(n_seqs * blocks_each, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i * blocks_each:(i + 1) * blocks_each] for i in range(n_seqs)]


def test_mixed_step_equals_each_piece_alone(model):
    """One forward: a 37-token prefill chunk of one sequence, one decode token
    of three others, 5 verification tokens of a fifth, on paged storage."""
    bs = 8
    # (earlier tokens already in the cache, tokens of this step)
    plan = [(_seq(11, 1), _seq(37, 2)),  # chunked prefill: 11 done, 37 now
            (_seq(20, 3), _seq(1, 4)), (_seq(5, 5), _seq(1, 6)), (_seq(33, 7), _seq(1, 8)),
            (_seq(14, 9), _seq(5, 10))]  # verification of 5 tokens
    tables = _paged_tables(len(plan), 7)
    pools = [KVPool(model.config, 7 * len(plan), bs) for _ in range(2)]
    with torch.inference_mode():
        for pool in pools:  # the same earlier tokens in both, each sequence alone
            for (done, _), table in zip(plan, tables):
                run_step(model, pool, host_step([done], [0], [table], bs).to_step())
        mixed = run_step(model, pools[0], host_step([now for _, now in plan], [len(d) for d, _ in plan],
                                                    tables, bs).to_step(), every_token=True)
        alone = torch.cat([run_step(model, pools[1], host_step([now], [len(done)], [table], bs).to_step(),
                                    every_token=True) for (done, now), table in zip(plan, tables)])
        full = torch.cat([model((torch.tensor([done + now])))[0, len(done):].float() for done, now in plan])
    assert mixed.shape == (37 + 3 + 5, 512)
    torch.testing.assert_close(mixed, alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed, full, atol=1e-4, rtol=0)  # and equal to no cache at all


@pytest.mark.parametrize("pool_cls", [KVPool, Int8KVPool])
def test_static_cache_as_blocks_equals_the_static_cache(model, pool_cls):
    """The same prompts and decode steps on small shuffled blocks and on one
    block per sequence (the static cache) give the same logits."""
    prompts = [_seq(13, 11), _seq(4, 12), _seq(21, 13)]
    bs, nb = 4, 8
    tables = _paged_tables(3, nb)
    paged = pool_cls(model.config, 3 * nb, bs)
    static = pool_cls(model.config, 3, bs * nb)
    rows = [[i] for i in range(3)]
    with torch.inference_mode():
        a = run_step(model, paged, host_step(prompts, [0] * 3, tables, bs).to_step())
        b = run_step(model, static, host_step(prompts, [0] * 3, rows, bs * nb, contiguous=True).to_step())
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        lens = [len(p) for p in prompts]
        for _ in range(6):
            nxt = [[int(t)] for t in a.argmax(-1)]
            a = run_step(model, paged, host_step(nxt, lens, tables, bs).to_step())
            b = run_step(model, static, host_step(nxt, lens, rows, bs * nb, contiguous=True).to_step())
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            lens = [n + 1 for n in lens]


def test_static_cache_class_is_a_pool_of_one_block_per_sequence(model):
    cache = StaticCache(model.config, 2, 16)
    assert (cache.num_blocks, cache.block_size) == (2, 16)
    assert cache.k[0].shape == (2, model.config.num_kv_heads, 16, model.config.head_dim)


def test_rows_with_different_sampling_parameters_match_each_row_alone(model):
    prompts = [_seq(6, 21), _seq(3, 22), _seq(9, 23), _seq(2, 24)]
    params = [SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, seed=7),
              SamplingParams(max_new_tokens=12),  # greedy
              SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.9, seed=99),
              SamplingParams(max_new_tokens=5, temperature=1.0, seed=3, ignore_eos=True)]
    batch = generate(model, prompts, params=params).tolist()
    alone = [generate(model, [p], params=[q]).tolist()[0] for p, q in zip(prompts, params)]
    assert batch == alone
    assert len(batch[3]) == 5  # its own max_new_tokens
    # the seed matters (sampled rows are not accidentally greedy)
    other = generate(model, [prompts[0]], params=[SamplingParams(max_new_tokens=12, temperature=0.8,
                                                                 top_k=40, seed=8)]).tolist()[0]
    assert other != batch[0]


def test_integer_seed_gives_row_i_the_seed_plus_i(model):
    prompts = [_seq(4, 31), _seq(4, 32)]
    both = generate(model, prompts, 8, temperature=1.0, seed=40, ignore_eos=True).tolist()
    second = generate(model, [prompts[1]], 8, temperature=1.0, seed=41, ignore_eos=True).tolist()[0]
    assert both[1] == second


def test_per_row_stop_ids(model):
    prompt = _seq(5, 41)
    free = generate(model, [prompt], 10, ignore_eos=True).tolist()[0]
    stop = free[3]
    params = [SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)),
              SamplingParams(max_new_tokens=10, ignore_eos=True)]
    out = generate(model, [prompt, prompt], params=params).tolist()
    assert out[0] == free[:free.index(stop) + 1] and out[1] == free


def test_decode_step_tensors_keep_their_addresses(model):
    """A decode step advanced in place reads the same device tensors every time
    (what a CUDA graph captured over it needs)."""
    pool = KVPool(model.config, 2, 128)
    buffers = StepBuffers(2, 2, 1)
    with torch.inference_mode():
        logits = run_step(model, pool, host_step([_seq(5, 51), _seq(9, 52)], [0, 0], [[0], [1]], 128,
                                                 contiguous=True).to_step())
        step = buffers.fill(host_step([[int(t)] for t in logits.argmax(-1)], [5, 9], [[0], [1]], 128,
                                      contiguous=True))
        names = ("tokens", "positions", "slots", "query_start", "context_lens", "block_tables")
        ptrs = {n: getattr(step, n).data_ptr() for n in names}
        ptrs["k0"], ptrs["v_last"] = pool.k[0].data_ptr(), pool.v[-1].data_ptr()
        for _ in range(100):
            step.advance(run_step(model, pool, step).argmax(-1))
        after = {n: getattr(step, n).data_ptr() for n in names}
        after["k0"], after["v_last"] = pool.k[0].data_ptr(), pool.v[-1].data_ptr()
    assert after == ptrs
    assert step.positions.tolist() == [105, 109] and step.context_lens.tolist() == [106, 110]


def test_step_errors_are_clear(model):
    with pytest.raises(CacheError, match="do not fit"):
        host_step([[1, 2, 3]], [6], [[0]], 8)
    with pytest.raises(CacheError, match="no token"):
        host_step([[]], [0], [[0]], 8)
    with pytest.raises(CacheError, match="one chunk, start and block table"):
        host_step([[1]], [0, 1], [[0]], 8)
    with pytest.raises(CacheError, match="does not fit buffers"):
        StepBuffers(2, 1, 1).fill(host_step([[1, 2, 3]], [0], [[0]], 8))
    paged = host_step([[1]], [0], [[0]], 8).to_step()
    with pytest.raises(CacheError, match="advance"):
        paged.advance(torch.tensor([1]))
    with pytest.raises(CacheError, match="layers"):
        run_step(model, KVPool(preset("tiny").replace(num_layers=1), 1, 8), paged)
    with pytest.raises(GenerationError, match="one SamplingParams"):
        generate(model, [[1], [2]], params=[SamplingParams()])
    with pytest.raises(GenerationError, match="temperature"):
        SamplingParams(temperature=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_graphs_are_absent_on_cpu_with_a_clear_error(model):
    from llmopt_lab.graphs import GraphedDecoder, GraphError

    with pytest.raises(GraphError, match="CUDA graphs need a CUDA GPU"):
        generate(model, [[1, 2]], 3, cuda_graph=True)
    with pytest.raises(GraphError, match="CUDA graphs need a CUDA GPU"):
        GraphedDecoder(model, KVPool(model.config, 1, 8), max_batch=1)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flash"])
def test_graph_replay_equals_eager_tokens(attn):
    model = scaled_model(preset("tiny"), seed=5).cuda()
    model.attn_fn = __import__("llmopt_lab.attention", fromlist=["x"]).get_attention(attn)
    prompts = [_seq(6, 61), _seq(17, 62), _seq(2, 63)]
    eager = generate(model, prompts, 40, ignore_eos=True)
    graphed = generate(model, prompts, 40, ignore_eos=True, cuda_graph=True)
    assert graphed.tolist() == eager.tolist()
    sampled = dict(temperature=0.9, top_k=50, seed=4, ignore_eos=True)
    assert (generate(model, prompts, 20, cuda_graph=True, **sampled).tolist()
            == generate(model, prompts, 20, **sampled).tolist())


@pytest.mark.gpu
def test_graph_buckets_pad_with_dummy_rows():
    """3 sequences replayed in a bucket of 4 give the eager logits, step after step."""
    from llmopt_lab.graphs import GraphedDecoder

    model = scaled_model(preset("tiny"), seed=5).cuda()
    prompts = [_seq(6, 71), _seq(11, 72), _seq(3, 73)]
    kvs = [KVPool(model.config, 4, 64, device="cuda") for _ in range(2)]
    rows = [[0], [1], [2]]
    with torch.inference_mode():
        first = [run_step(model, kv, host_step(prompts, [0] * 3, rows, 64, contiguous=True).to_step("cuda"))
                 for kv in kvs]
        decoder = GraphedDecoder(model, kvs[1], max_batch=4, buckets=[2, 4])
        lens = [len(p) for p in prompts]
        tok = first[0].argmax(-1)
        host = host_step([[int(t)] for t in tok], lens, rows, 64, contiguous=True)
        eager_step = host.to_step("cuda")
        got = decoder.run(host)
        assert decoder.current == (4, 3)
        for _ in range(10):
            want = run_step(model, kvs[0], eager_step)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            tok = want.argmax(-1)
            eager_step.advance(tok)
            got = decoder.advance(tok)


@pytest.mark.parametrize("name", ["llmopt-tiny", "llmopt-tiny-draft"])
def test_zoo_greedy_tokens_of_packed_prefill_equal_the_no_cache_path(name):
    """Prompts of different lengths, packed into one prefill step (no padding),
    give the tokens of the rectangular no-cache reference, row by row."""
    from llmopt_lab import load_model

    model, tok = load_model(name)
    prompts = [tok(t).input_ids for t in ["import os\n", "def main(argv):\n    parser = ",
                                           "class Stack:\n    def push(self, item):\n", "x"]]
    got = generate(model, prompts, 24, ignore_eos=True).tolist()
    assert got == generate(model, prompts, 24, ignore_eos=True, use_cache=False).tolist()
    assert got == [generate(model, [p], 24, ignore_eos=True).tolist()[0] for p in prompts]


def test_paged_attention_function_reads_the_blocks_in_place(model, monkeypatch):
    """attn_fn='paged' on storage in blocks of 16: our Triton kernels (in the
    interpreter here) read the block tables directly, and a mixed step gives
    the logits of the gathering sdpa path."""
    import llmopt_lab.attention as A
    from llmopt_lab.kernels import paged_attention as kp

    if not kp.supports(torch.zeros(1, 4, 32), torch.zeros(1, 2, 16, 32)):
        pytest.skip("the paged kernels cannot run here (no Triton or a broken interpreter)")
    calls = []
    real = kp.paged_attention
    monkeypatch.setattr(kp, "paged_attention", lambda *a, **k: calls.append(a[6]) or real(*a, **k))
    cfg = preset("tiny").replace(num_layers=1)
    small = scaled_model(cfg, seed=9)
    tables = _paged_tables(3, 3, seed=4)
    chunks, starts = [_seq(20, 81), _seq(1, 82), _seq(3, 83)], [0, 9, 30]
    out = {}
    for name in ("sdpa", "paged"):
        small.attn_fn = A.get_attention(name)
        pool = KVPool(cfg, 9, 16)
        with torch.inference_mode():
            for (table, start) in zip(tables, starts):  # earlier tokens, each sequence alone
                if start:
                    run_step(small, pool, host_step([_seq(start, start)], [0], [table], 16).to_step())
            out[name] = run_step(small, pool, host_step(chunks, starts, tables, 16).to_step(),
                                 every_token=True)
    assert calls[-1] == 20  # the mixed step ran in the kernels, with the host's max queries per sequence
    torch.testing.assert_close(out["paged"], out["sdpa"], atol=1e-4, rtol=0)

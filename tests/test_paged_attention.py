"""Paged attention (Triton) against the plain-torch reference.

On CPU the kernels run under Triton's interpreter: small shapes, float32 and
float16 (the interpreter computes bfloat16 wrongly: bf16 values are tested
through float32 here, and for real on a GPU). Tiles under the interpreter are
16 x 16, so contexts like 17, 33 and 40 leave partial tiles and blocks.
"""

import pytest
import torch

from llmopt_lab import kernels
from llmopt_lab.kernels import paged_attention as pa
from llmopt_lab.kernels.paged_attention import paged_attention, supports
from llmopt_lab.kernels.reference import attention_ref, causal_mask, paged_attention_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(kernels.mode() == "reference",
                                   reason=kernels.interpreter_problem() or "Triton is not installed")
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_case(ctx_lens, n_queries, Hq, Hkv, D, block_size, dtype=torch.float32, seed=0,
              shuffle=True, spare_blocks=3, device=DEV):
    """A pool with the sequences' blocks scattered (a shuffled free list), nan in
    every slot no sequence owns (a kernel that reads one shows it), and packed
    queries. Returns q, k_cache, v_cache, block_tables, context_lens, query_start."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in ctx_lens]
    max_blocks = max(need) + 1  # one spare column: entries past a sequence's length
    num_blocks = sum(need) + spare_blocks
    order = torch.randperm(num_blocks, generator=g) if shuffle else torch.arange(num_blocks)
    k = torch.full((num_blocks, Hkv, block_size, D), float("nan"))
    v = torch.full((num_blocks, Hkv, block_size, D), float("nan"))
    tables = torch.zeros((len(ctx_lens), max_blocks), dtype=torch.long)
    used = 0
    for s, (c, nb) in enumerate(zip(ctx_lens, need)):
        blocks = order[used:used + nb]
        used += nb
        tables[s, :nb] = blocks
        tables[s, nb:] = order[-1]  # a block this sequence does not own (nan)
        for p in range(c):
            b, o = blocks[p // block_size], p % block_size
            k[b, :, o] = torch.randn(Hkv, D, generator=g)
            v[b, :, o] = torch.randn(Hkv, D, generator=g)
    q = torch.randn(sum(n_queries), Hq, D, generator=g)
    starts = torch.tensor([0] + n_queries).cumsum(0)
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), tables.to(device),
            torch.tensor(ctx_lens).to(device), starts.to(device))


def dense_ref(q, k_cache, v_cache, tables, ctx_lens, starts, window=None):
    """Gather each sequence's keys into a contiguous cache, then plain attention
    with the causal mask by position."""
    outs = []
    bs = k_cache.shape[2]
    for s, c in enumerate(ctx_lens.tolist()):
        q0, q1 = starts[s].item(), starts[s + 1].item()
        blocks = tables[s, :-(-c // bs)]
        k = k_cache[blocks].transpose(0, 1).flatten(1, 2)[None, :, :c]  # (1, Hkv, c, D)
        v = v_cache[blocks].transpose(0, 1).flatten(1, 2)[None, :, :c]
        qs = q[q0:q1].transpose(0, 1)[None]  # (1, Hq, n, D)
        mask = causal_mask(torch.arange(c - (q1 - q0), c)[None], torch.arange(c)[None],
                           window=window)
        outs.append(attention_ref(qs, k, v, mask)[0].transpose(0, 1))
    return torch.cat(outs)


def check(case, max_queries, window=None, **kw):
    q = case[0]
    out = paged_attention(*case, max_queries, window=window, **kw)
    want = paged_attention_ref(*case, window=window)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)


# ------------------------------------------------------------------ reference
@pytest.mark.parametrize("window", [None, 5])
def test_reference_equals_dense_attention(window):
    case = make_case([17, 40, 1, 33], [3, 40, 1, 1], Hq=4, Hkv=2, D=32, block_size=16,
                     device="cpu")
    out = paged_attention_ref(*case, window=window)
    torch.testing.assert_close(out, dense_ref(*case, window=window), atol=1e-5, rtol=1e-5)
    # scale is honoured
    torch.testing.assert_close(paged_attention_ref(*case, scale=0.5 * 32 ** -0.5),
                               paged_attention_ref(case[0] * 0.5, *case[1:]),
                               atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- decode
# (context lengths, queries per sequence, Hq, Hkv, D, block_size, dtype, window, num_splits)
DECODE_CASES = [
    ([17, 40, 1], [1, 1, 1], 4, 2, 32, 16, torch.float32, None, None),  # ragged, GQA 2
    ([33, 16], [1, 1], 2, 2, 64, 32, torch.float16, None, 2),  # MHA, block 32
    ([50, 9, 64], [3, 1, 4], 8, 2, 32, 16, torch.float32, None, 3),  # a few queries, GQA 4
    ([70, 20], [1, 2], 4, 1, 32, 16, torch.float32, 24, None),  # sliding window, MQA
    ([100, 7], [1, 1], 4, 2, 32, 64, torch.float16, None, 4),  # block 64, empty splits
]


@needs_kernels
@pytest.mark.parametrize("case", DECODE_CASES, ids=range(len(DECODE_CASES)))
def test_paged_decode_matches_reference(case):
    ctx, nq, Hq, Hkv, D, bs, dtype, window, splits = case
    data = make_case(ctx, nq, Hq, Hkv, D, bs, dtype)
    check(data, max(nq), window=window, kernel="decode", num_splits=splits)


@needs_kernels
def test_decode_is_the_default_for_few_queries(monkeypatch):
    """max_queries <= 16 runs the decode kernel, more the prefill kernel."""
    called = []
    for name in ("_paged_decode_kernel", "_paged_prefill_kernel"):
        monkeypatch.setattr(pa, name, _Recorder(getattr(pa, name), name, called))
    data = make_case([20, 20], [1, 16], 2, 1, 32, 16)
    paged_attention(*data, 16)
    paged_attention(*data, 17)
    assert called == ["_paged_decode_kernel", "_paged_prefill_kernel"]


class _Recorder:
    def __init__(self, fn, name, log):
        self.fn, self.name, self.log = fn, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.fn[grid]


# -------------------------------------------------------------------- prefill
# (context lengths, queries per sequence, Hq, Hkv, D, block_size, dtype, window)
PREFILL_CASES = [
    ([20, 33, 5], [20, 10, 1], 2, 1, 32, 16, torch.float32, None),  # prompt, chunk, decode
    ([40, 18], [17, 3], 4, 2, 32, 32, torch.float16, None),  # prefix-cache hit, block 32
    ([45, 30], [21, 30], 2, 2, 64, 16, torch.float32, 7),  # sliding window
    ([64, 3], [5, 3], 2, 1, 32, 64, torch.float32, None),  # block 64 (tiles of 16 inside)
]


@needs_kernels
@pytest.mark.parametrize("case", PREFILL_CASES, ids=range(len(PREFILL_CASES)))
def test_paged_prefill_matches_reference(case):
    ctx, nq, Hq, Hkv, D, bs, dtype, window = case
    data = make_case(ctx, nq, Hq, Hkv, D, bs, dtype, seed=1)
    check(data, max(nq), window=window, kernel="prefill")


@needs_kernels
def test_bfloat16_values_through_float32_and_scale_and_int32_metadata():
    q, k, v, tables, ctx, starts = make_case([30, 12], [2, 12], 2, 1, 32, 16, seed=2)
    q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))  # bf16 values, float32 kernel
    case = (q, k, v, tables.int(), ctx.int(), starts.int())
    for kernel in ("decode", "prefill"):
        out = paged_attention(*case, 12, scale=0.3, kernel=kernel)
        want = paged_attention_ref(*case, scale=0.3)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


@needs_kernels
def test_contiguous_tables_and_more_max_queries_than_needed():
    data = make_case([16, 31], [1, 4], 2, 2, 32, 16, shuffle=False)
    check(data, 16)  # max_queries is an upper bound: 16 >= 4
    check(data, 20)  # and through the prefill kernel


# --------------------------------------------------------------------- errors
def test_errors_are_clear_value_errors():
    q, k, v, tables, ctx, starts = make_case([20], [1], 2, 1, 32, 16, device="cpu")
    ok = (q, k, v, tables, ctx, starts, 1)

    def bad(match, *args, **kw):
        with pytest.raises(ValueError, match=match):
            paged_attention(*args, **kw)

    bad("q must be a 3-D", q[None], *ok[1:])
    bad("k_cache must be a 4-D", q, k[0], *ok[2:])
    bad("differ in shape", q, k, v[:, :, :8], *ok[3:])
    bad("differ in head_dim", q[..., :16], *ok[1:])
    k2 = torch.zeros(3, 2, 16, 32)
    bad("3 query heads are not a multiple of 2 KV heads", torch.zeros(1, 3, 32), k2, k2, *ok[3:])
    k48 = torch.zeros(3, 1, 16, 48)
    bad("head_dim 48 is not supported", torch.zeros(1, 2, 48), k48, k48, *ok[3:])
    for bs in (8, 24, 256):
        kb = torch.zeros(3, 1, bs, 32)
        bad(f"block_size {bs} is not supported", q, kb, kb, *ok[3:])
    bad("share a dtype", q.half(), *ok[1:])
    bad("unsupported dtype", q.double(), k.double(), v.double(), *ok[3:])
    bad("one device", q.to("meta"), *ok[1:])
    bad("block_tables must be a 2-D", q, k, v, tables[0], *ok[4:])
    bad("block_tables must be an int32 or int64", q, k, v, tables.float(), *ok[4:])
    bad(r"context_lens must have shape \(1,\)", q, k, v, tables, ctx.repeat(2), *ok[5:])
    bad(r"query_start must have shape \(2,\)", q, k, v, tables, ctx, starts[:1], 1)
    bad("context_lens is on meta", q, k, v, tables, ctx.to("meta"), starts, 1)
    bad("max_queries must be a positive int", *ok[:6], 0)
    bad("max_queries must be a positive int", *ok[:6], torch.tensor(1))
    bad("window must be a positive int", *ok, window=0)
    bad("kernel must be", *ok, kernel="fast")
    bad("1 to 16 queries", *ok[:6], 17, kernel="decode")
    bad("num_splits", *ok, num_splits=0)


def test_supports():
    q, k, v, *_ = make_case([20], [1], 2, 1, 32, 16, device="cpu")
    can = kernels.mode() != "reference"
    assert supports(q, k) is can
    assert supports(q.double(), k.double()) is False
    assert supports(q, torch.zeros(3, 1, 256, 32)) is False  # block too large
    assert supports(torch.zeros(1, 2, 48), torch.zeros(3, 1, 16, 48)) is False
    assert supports(q[None], k) is False


def test_falls_back_to_the_reference_where_no_kernel_runs(monkeypatch):
    monkeypatch.setattr(pa, "can_launch", lambda *t: False)
    case = make_case([20, 5], [3, 1], 2, 1, 32, 16, device="cpu")
    torch.testing.assert_close(paged_attention(*case, 3), paged_attention_ref(*case))


# ------------------------------------------------------------------------ GPU
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("nq", [[1] * 5, [1, 4, 16, 2, 1], [300, 1, 77, 128, 5]])
def test_gpu_paged_attention(dtype, block_size, nq):
    ctx = [1000, 700, 513, 2048, 96]
    data = make_case(ctx, nq, 32, 8, 128, block_size, dtype, device="cuda")
    for window in (None, 256):
        check(data, max(nq), window=window)

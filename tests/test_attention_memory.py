"""llmopt_lab.attention_memory: capacity and HBM-traffic counts, the online-softmax step."""

import pytest
import torch

from llmopt_lab import measure
from llmopt_lab.attention_memory import (H100_SMEM_BYTES, HbmTraffic, attend_query_block,
                                         flash_attention_io, flash_block_sizes, flash_max_seq_len,
                                         flash_peak_bytes, naive_attention_io, naive_max_seq_len,
                                         naive_peak_bytes, online_softmax_step, query_tiled_io,
                                         score_matrix_bytes)
from llmopt_lab.kernels.reference import attention_ref, causal_mask


# ------------------------------------------------------------------ capacity
def test_score_matrix_and_peak_bytes_by_hand():
    assert score_matrix_bytes(1024, batch=2, heads=4, dtype_bytes=2) == 2 * 4 * 1024 * 1024 * 2
    assert score_matrix_bytes(3, n_keys=5, dtype_bytes=4) == 60
    # 2 matrices of 10x10 fp16 + Q, K, V, O of 10 x 8 fp16
    assert naive_peak_bytes(10, head_dim=8, dtype_bytes=2) == 2 * 100 * 2 + 4 * 10 * 8 * 2
    assert naive_peak_bytes(10, head_dim=8, dtype_bytes=2, score_bytes=4, matrices=3,
                            include_inputs=False) == 3 * 100 * 4 + 10 * 8 * 2
    assert flash_peak_bytes(10, batch=2, heads=3, head_dim=8, dtype_bytes=2) == 6 * (4 * 80 * 2 + 40)
    assert flash_peak_bytes(10, head_dim=8, include_inputs=False) == 10 * 8 * 2 + 10 * 4


@pytest.mark.parametrize("fn", [naive_peak_bytes, flash_peak_bytes])
def test_peak_bytes_rejects_bad_sizes(fn):
    with pytest.raises(ValueError, match="n must be a positive int"):
        fn(0)
    with pytest.raises(ValueError, match="head_dim"):
        fn(8, head_dim=0)


def test_naive_grows_quadratically_flash_linearly():
    n0 = 4096
    assert naive_peak_bytes(2 * n0, include_inputs=False) / naive_peak_bytes(n0, include_inputs=False) == pytest.approx(4, rel=0.01)
    assert flash_peak_bytes(2 * n0) == 2 * flash_peak_bytes(n0)


@pytest.mark.parametrize("memory", [80e9, 24e9, 1e6, 12345.0])
def test_max_seq_len_is_the_boundary(memory):
    n = naive_max_seq_len(memory, batch=2, heads=8, head_dim=64)
    assert naive_peak_bytes(n, 2, 8, 64) <= memory < naive_peak_bytes(n + 1, 2, 8, 64)
    f = flash_max_seq_len(memory, batch=2, heads=8, head_dim=64)
    assert flash_peak_bytes(f, 2, 8, 64) <= memory < flash_peak_bytes(f + 1, 2, 8, 64)
    assert f >= n and (memory < 1e7 or f > 10 * n)


def test_max_seq_len_on_an_h100():
    mem = measure.GPU_TABLE["H100 SXM"].memory_gb * 1e9
    # 2 x 32 heads x N^2 x 2 bytes ~ 80e9  ->  N ~ 25k
    assert 24_000 < naive_max_seq_len(mem) < 25_000
    assert naive_max_seq_len(10.0) == 0 and naive_max_seq_len(0) == 0


# ------------------------------------------------------------------- traffic
def test_naive_io_by_hand():
    io = naive_attention_io(4, 2, dtype_bytes=1)
    assert (io.reads, io.writes) == (3 * 8 + 2 * 16, 8 + 2 * 16)
    assert naive_attention_io(4, 2, dtype_bytes=2, batch=3, heads=5).total == io.total * 2 * 15
    assert isinstance(io, HbmTraffic) and "MB" in str(io)


def test_flash_block_sizes_follow_the_paper():
    # M = 228 KiB / 2 bytes = 116736 elements; B_c = ceil(M / 4d)
    assert flash_block_sizes(128, H100_SMEM_BYTES) == (128, 228)
    assert flash_block_sizes(64, H100_SMEM_BYTES) == (64, 456)
    assert flash_block_sizes(16, 1024, 1) == (16, 16)


def test_flash_io_by_hand_and_theorem_2():
    # n = 8, d = 2, M = 16 elements: B_c = 2, T_c = 4
    io = flash_attention_io(8, 2, sram_bytes=16, dtype_bytes=1)
    assert io.reads == (2 * 16 + 4 * 2 * 16) * 1 + 4 * 2 * 8 * 4
    assert io.writes == (16 + 4 * 16) * 1 + 5 * 2 * 8 * 4
    # Theta(N^2 d^2 / M): doubling N about quadruples the traffic at large N ...
    a, b = flash_attention_io(1 << 15, 128), flash_attention_io(1 << 16, 128)
    assert b.total / a.total == pytest.approx(4, rel=0.02)
    # ... and it beats the naive count by about M / (3 d^2)
    m = H100_SMEM_BYTES // 2
    for d in (64, 128):
        ratio = naive_attention_io(1 << 16, d).total / flash_attention_io(1 << 16, d).total
        assert ratio == pytest.approx(m / (3 * d * d), rel=0.1)


def test_query_tiled_io():
    io = query_tiled_io(8, 2, block_m=4, dtype_bytes=1)
    assert io.reads == 16 + 2 * (2 * 8) * 2 and io.writes == 16 + 8 * 4
    causal = query_tiled_io(8, 2, block_m=4, dtype_bytes=1, causal=True)
    assert causal.reads == 16 + 2 * (4 + 8) * 2
    # large N: K and V read N / block_m times, about 2 N^2 d / block_m elements
    n, d = 1 << 14, 128
    assert query_tiled_io(n, d, 128).reads == pytest.approx(2 * n * n * d / 128 * 2, rel=0.01)


# ------------------------------------------------------- the on-chip step
def test_online_softmax_step_over_blocks_equals_softmax():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 10, generator=g, dtype=torch.float64) * 3
    v = torch.randn(10, 4, generator=g, dtype=torch.float64)
    m = torch.full((3,), float("-inf"), dtype=torch.float64)
    l = torch.zeros(3, dtype=torch.float64)
    acc = torch.zeros(3, 4, dtype=torch.float64)
    for start in range(0, 10, 3):
        m, l, acc = online_softmax_step(m, l, acc, s[:, start:start + 3], v[start:start + 3])
    torch.testing.assert_close(acc / l[:, None], torch.softmax(s, -1) @ v)
    torch.testing.assert_close(m + l.log(), torch.logsumexp(s, -1))


def test_online_softmax_step_keeps_fully_masked_rows_at_zero():
    s = torch.tensor([[float("-inf"), float("-inf")], [1.0, float("-inf")]])
    m, l, acc = online_softmax_step(torch.full((2,), float("-inf")), torch.zeros(2),
                                    torch.zeros(2, 3), s, torch.ones(2, 3))
    assert m[0] == float("-inf") and l[0] == 0 and (acc[0] == 0).all()
    assert m[1] == 1 and l[1] == 1 and torch.equal(acc[1], torch.ones(3))
    assert not torch.isnan(acc).any()


@pytest.mark.parametrize("M, S, block_n, causal, q_start", [
    (8, 8, 4, False, 0), (8, 21, 4, False, 0), (5, 21, 16, True, 16), (16, 16, 3, True, 0),
    (4, 9, 2, True, -2),  # the first rows see no key
])
def test_attend_query_block_matches_attention_ref(M, S, block_n, causal, q_start):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(M, 16, generator=g), torch.randn(S, 16, generator=g), torch.randn(S, 16, generator=g)
    mask = None
    if causal:
        mask = causal_mask(q_start + torch.arange(M)[None], torch.arange(S)[None])
    want = attention_ref(q[None, None], k[None, None], v[None, None], mask)[0, 0]
    got = attend_query_block(q, k, v, block_n, causal, q_start)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attend_query_block_checks_shapes():
    with pytest.raises(ValueError, match="q \\(M, D\\)"):
        attend_query_block(torch.zeros(2, 4), torch.zeros(3, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="block_n"):
        attend_query_block(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(3, 4), block_n=0)

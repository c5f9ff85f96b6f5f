"""Attention by position: causal masks aligned bottom-right, GQA, sliding window."""

import pytest
import torch
import torch.nn.functional as F

from llmopt_lab.attention import AttentionMeta, naive_attention, sdpa_attention
from llmopt_lab.kernels.reference import attention_ref, causal_mask


def _qkv(B=2, Hq=4, Hkv=2, T=5, S=12, D=16):
    return torch.randn(B, Hq, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)


def test_mask_is_bottom_right_when_queries_are_fewer_than_keys():
    # 3 queries at positions 9, 10, 11 against 12 keys at 0..11 (decode / verify)
    q_pos = torch.tensor([[9, 10, 11]])
    k_pos = torch.arange(12)[None]
    m = causal_mask(q_pos, k_pos)[0, 0]
    assert m.sum(-1).tolist() == [10, 11, 12]
    assert m[0, 9] and not m[0, 10]
    # torch's is_causal / tril(ones(T, S)) aligns top-left: the first query would see 1 key
    top_left = torch.ones(3, 12).tril().bool()
    assert top_left.sum(-1).tolist() == [1, 2, 3]


@pytest.mark.parametrize("fn", [sdpa_attention, naive_attention])
def test_chunked_queries_equal_the_rows_of_full_causal_attention(fn):
    """Attention for the last T queries against all S keys equals the last T
    rows of full causal attention (what a KV cache relies on)."""
    B, Hq, Hkv, S, D, T = 2, 4, 2, 12, 16, 5
    q, k, v = _qkv(B, Hq, Hkv, S, S, D)
    pos = torch.arange(S).expand(B, S)
    full = fn(q, k, v, AttentionMeta(pos, pos))
    part = fn(q[:, :, -T:], k, v, AttentionMeta(pos[:, -T:], pos))
    torch.testing.assert_close(part, full[:, :, -T:], atol=1e-5, rtol=1e-5)
    # and SDPA's is_causal=True gets this case wrong
    wrong = F.scaled_dot_product_attention(q[:, :, -T:], k, v, is_causal=True, enable_gqa=True)
    assert not torch.allclose(wrong, full[:, :, -T:], atol=1e-3)


def test_sdpa_matches_reference_with_padding_gqa_and_window():
    B, Hq, Hkv, T, S, D = 3, 8, 2, 4, 10, 32
    q, k, v = _qkv(B, Hq, Hkv, T, S, D)
    q_pos = torch.tensor([[6, 7, 8, 9], [2, 3, 4, 5], [0, 1, 2, 3]])
    k_pos = torch.arange(S).expand(B, S)
    k_valid = k_pos < torch.tensor([[10], [6], [4]])
    for window in (None, 3):
        meta = AttentionMeta(q_pos, k_pos, k_valid)
        torch.testing.assert_close(sdpa_attention(q, k, v, meta, window),
                                   naive_attention(q, k, v, meta, window), atol=1e-5, rtol=1e-5)


def test_reference_gqa_equals_explicitly_repeated_heads():
    q, k, v = _qkv(1, 6, 2, 3, 7, 8)
    mask = causal_mask(torch.tensor([[4, 5, 6]]), torch.arange(7)[None])
    grouped = attention_ref(q, k, v, mask)
    # query head h reads KV head h // 3
    for h in range(6):
        single = attention_ref(q[:, h:h + 1], k[:, h // 3:h // 3 + 1], v[:, h // 3:h // 3 + 1], mask)
        torch.testing.assert_close(grouped[:, h:h + 1], single)


def test_sliding_window_mask_counts():
    m = causal_mask(torch.arange(6)[None], torch.arange(6)[None], window=3)[0, 0]
    assert m.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    assert m[5].tolist() == [False, False, False, True, True, True]


def test_static_cache_and_plain_forward_give_flash_its_ranges_without_a_check(monkeypatch):
    """The flash path derives (q_start, k_len) from positions only when nobody
    vouched for the layout (that check costs a host sync per forward)."""
    import llmopt_lab.kernels.flash_attention as flash

    from llmopt_lab import StaticCache, Transformer, preset
    from llmopt_lab.generate import decode_one_token, prefill

    def no_check(*a, **k):
        raise AssertionError("ranges_from_positions was called")

    monkeypatch.setattr(flash, "ranges_from_positions", no_check)
    cfg = preset("tiny").replace(num_layers=1)
    model = Transformer.from_config(cfg, attn_fn="flash")
    cache = StaticCache(cfg, 2, 24)
    prefill(model, torch.randint(0, 512, (2, 20)), torch.tensor([20, 13]), cache)
    decode_one_token(model, torch.tensor([1, 2]), torch.tensor([20, 13]), cache)
    with torch.inference_mode():
        model(torch.randint(0, 512, (2, 20)), lengths=torch.tensor([20, 7]))

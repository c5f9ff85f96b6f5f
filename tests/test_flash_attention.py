"""Flash attention and flash decoding (Triton) against the naive reference.

On CPU the kernels run under Triton's interpreter: small shapes, float32 and
float16 (the interpreter computes bfloat16 wrongly: bf16 is tested on a GPU).
Tile sizes under the interpreter are 16 x 16, so lengths like 17 and 33 cross
tile boundaries and leave partial tiles.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import llmopt_lab.attention as attention
from llmopt_lab import kernels
from llmopt_lab.attention import AttentionMeta, flash_attention_fn, get_attention, naive_attention
from llmopt_lab.config import preset
from llmopt_lab.generate import generate
from llmopt_lab.kernels.flash_attention import flash_attention, prefix_mask, ranges_from_positions
from llmopt_lab.kernels.flash_decode import flash_decode
from llmopt_lab.kernels.reference import attention_ref, causal_mask, online_softmax_attention_ref
from llmopt_lab.model import Transformer

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(kernels.mode() == "reference",
                                   reason=kernels.interpreter_problem() or "Triton is not installed")
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _qkv(B, Hq, Hkv, T, S, D, dtype=torch.float32, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _per_seq(x, B):
    return x.to(DEV) if isinstance(x, torch.Tensor) else torch.full((B,), x, device=DEV)


def _lse_ref(q, k, mask, scale=None):
    """log-sum-exp of the masked scores, (B, Hq, T) float32."""
    D = q.shape[-1]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1).float()
    s = q.float() @ k.transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
    return torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)


def _check(out, lse, q, k, v, mask, dtype, scale=None):
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(out.float(), attention_ref(q, k, v, mask, scale).float(),
                               atol=tol, rtol=tol)
    want = _lse_ref(q, k, mask, scale)
    assert torch.equal(torch.isinf(lse), torch.isinf(want))  # rows that see no key: -inf
    fin = torch.isfinite(want)
    torch.testing.assert_close(lse[fin], want[fin], atol=max(tol, 1e-4), rtol=tol)


# ---------------------------------------------------------------- online softmax
@pytest.mark.parametrize("block_size", [1, 5, 16, 64])
def test_online_softmax_reference_equals_naive_attention(block_size):
    q, k, v = _qkv(2, 4, 2, 7, 23, 16, device="cpu")
    mask = causal_mask(torch.tensor([[16, 17, 18, 19, 20, 21, 22], [-1, 0, 1, 2, 3, 4, 5]]),
                       torch.arange(23).expand(2, 23), torch.arange(23).expand(2, 23) < 20)
    out, lse = online_softmax_attention_ref(q, k, v, mask, block_size=block_size, return_lse=True)
    torch.testing.assert_close(out, attention_ref(q, k, v, mask), atol=1e-5, rtol=1e-5)
    want = _lse_ref(q, k, mask)
    assert torch.isinf(lse[1, :, 0]).all() and (out[1, :, 0] == 0).all()  # position -1 sees nothing
    torch.testing.assert_close(lse[torch.isfinite(want)], want[torch.isfinite(want)])
    # without a mask, and out only
    torch.testing.assert_close(online_softmax_attention_ref(q, k, v, block_size=block_size),
                               attention_ref(q, k, v, None), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------- flash attention
# (B, Hq, Hkv, T, S, D, causal, q_start, k_len, window, dtype)
FA_CASES = [
    (1, 2, 2, 17, 17, 32, True, None, None, None, torch.float32),  # GQA 1, one partial tile
    (2, 4, 2, 33, 33, 64, False, None, None, None, torch.float32),  # GQA 2, non-causal
    (1, 4, 1, 1, 33, 128, True, None, None, None, torch.float32),  # GQA 4, one query, D 128
    (2, 4, 1, 17, 40, 32, True, torch.tensor([23, 5]), torch.tensor([40, 20]), None,
     torch.float32),  # chunked prefill against a cache: per-sequence offsets
    (2, 2, 1, 33, 33, 64, True, 0, torch.tensor([33, 10]), None, torch.float16),  # right padding
    (2, 4, 2, 20, 20, 128, False, None, torch.tensor([20, 7]), None, torch.float16),
    (1, 2, 1, 40, 40, 32, True, None, None, 7, torch.float32),  # sliding window < tile
    (1, 2, 1, 80, 80, 64, True, None, None, 40, torch.float16),  # window > tile: all 3 stages
    (1, 2, 2, 20, 20, 32, True, -5, 3, None, torch.float32),  # rows that see no key
]


@needs_kernels
@pytest.mark.parametrize("case", FA_CASES, ids=lambda c: "B{}-H{}/{}-T{}-S{}-D{}-{}".format(
    *c[:6], "causal" if c[6] else "full") + (f"-w{c[9]}" if c[9] else "") + "-" + str(c[10])[6:])
def test_flash_attention_matches_reference(case):
    B, Hq, Hkv, T, S, D, causal, q_start, k_len, window, dtype = case
    q, k, v = _qkv(B, Hq, Hkv, T, S, D, dtype)
    out, lse = flash_attention(q, k, v, causal=causal, q_start=q_start, k_len=k_len,
                               window=window)
    kl = _per_seq(S if k_len is None else k_len, B)
    qs = kl - T if q_start is None else _per_seq(q_start, B)
    _check(out, lse, q, k, v, prefix_mask(qs, kl, T, S, causal, window), dtype)


@needs_kernels
def test_flash_attention_strided_inputs_and_scale():
    """The model's q is a transposed view (B, T, H, D) -> (B, H, T, D); a
    non-contiguous last dimension is copied."""
    B, H, T, D = 2, 2, 18, 32
    q = torch.randn(B, T, H, D, device=DEV).transpose(1, 2)
    k = torch.randn(B, H, D, T, device=DEV).transpose(2, 3)  # last dim stride != 1
    v = torch.randn(B, H, T, D, device=DEV)
    out, lse = flash_attention(q, k, v, scale=0.3)
    mask = prefix_mask(torch.zeros(B, device=DEV), torch.full((B,), T, device=DEV), T, T)
    _check(out, lse, q, k, v, mask, torch.float32, scale=0.3)


@needs_kernels
def test_flash_attention_kernel_really_ran(monkeypatch):
    """Guard against a silent fallback to the reference."""
    if not kernels.can_launch(torch.empty(1, device=DEV)):
        pytest.skip("no Triton")
    import llmopt_lab.kernels.flash_attention as fa
    import llmopt_lab.kernels.flash_decode as fd

    def boom(*a, **kw):
        raise AssertionError("fell back to the reference")

    monkeypatch.setattr(fa, "online_softmax_attention_ref", boom)
    monkeypatch.setattr(fd, "online_softmax_attention_ref", boom)
    q, k, v = _qkv(1, 2, 1, 17, 17, 32)
    flash_attention(q, k, v)
    flash_decode(q[:, :, :2], k, v, 17)


# ----------------------------------------------------------------- flash decode
# (B, Hq, Hkv, T, S, D, k_len, num_splits, q_start, window, dtype)
FD_CASES = [
    (2, 4, 2, 1, 50, 32, [50, 23], 3, None, None, torch.float32),
    (2, 8, 2, 4, 70, 64, [70, 9], 4, None, None, torch.float32),  # chunks of 16 + a 6
    (1, 4, 1, 16, 40, 128, [37], 2, None, None, torch.float32),
    (2, 4, 4, 16, 40, 32, [37, 3], 5, None, None, torch.float32),  # splits with no keys
    (2, 4, 2, 4, 70, 32, [70, 30], 3, None, 9, torch.float32),  # sliding window
    (2, 4, 2, 4, 70, 32, [70, 30], 2, [10, 40], None, torch.float32),  # explicit positions
    (2, 4, 1, 1, 33, 64, [33, 0], None, None, None, torch.float16),  # an empty sequence
    (1, 8, 2, 16, 45, 32, [45], 1, None, None, torch.float16),  # 2 head blocks of 4 heads
]


@needs_kernels
@pytest.mark.parametrize("case", FD_CASES, ids=lambda c: "B{}-H{}/{}-T{}-S{}-D{}".format(
    *c[:6]) + f"-splits{c[7]}" + (f"-w{c[9]}" if c[9] else "") + "-" + str(c[10])[6:])
def test_flash_decode_matches_reference(case):
    B, Hq, Hkv, T, S, D, k_len, splits, q_start, window, dtype = case
    q, k, v = _qkv(B, Hq, Hkv, T, S, D, dtype)
    kl = torch.tensor(k_len, device=DEV)
    qs = None if q_start is None else torch.tensor(q_start, device=DEV)
    out, lse = flash_decode(q, k, v, kl, num_splits=splits, q_start=qs, window=window,
                            return_lse=True)
    mask = prefix_mask(kl - T if qs is None else qs, kl, T, S, True, window)
    _check(out, lse, q, k, v, mask, dtype)
    if splits != 1:  # splitting changes nothing but the rounding
        one = flash_decode(q, k, v, kl, num_splits=1, q_start=qs, window=window)
        torch.testing.assert_close(out, one, atol=TOL[dtype], rtol=TOL[dtype])


# --------------------------------------------------------------------- errors
def test_errors_are_clear_value_errors():
    q, k, v = _qkv(1, 2, 1, 4, 8, 32, device="cpu")
    for D in (48, 256):
        qq, kk, vv = _qkv(1, 2, 1, 4, 8, D, device="cpu")
        with pytest.raises(ValueError, match=f"head_dim {D} is not supported"):
            flash_attention(qq, kk, vv)
        with pytest.raises(ValueError, match=f"head_dim {D} is not supported"):
            flash_decode(qq, kk, vv, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        flash_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="batch and head_dim"):
        flash_attention(q.expand(2, -1, -1, -1), k, v)
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attention(q[:, :1].expand(1, 3, 4, 32), k.expand(1, 2, 8, 32), v.expand(1, 2, 8, 32))
    with pytest.raises(ValueError, match="4-D"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="one device"):
        flash_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="is on meta"):
        flash_attention(q, k, v, k_len=torch.tensor([8], device="meta"))
    with pytest.raises(ValueError, match="unsupported dtype"):
        flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="share a dtype"):
        flash_attention(q.half(), k, v)
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        flash_attention(q, k, v, q_start=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="integer tensor"):
        flash_attention(q, k, v, k_len=torch.tensor([8.0]))
    with pytest.raises(ValueError, match="causal=True"):
        flash_attention(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="1 to 16 queries"):
        flash_decode(*_qkv(1, 2, 1, 17, 20, 32, device="cpu"), 20)
    with pytest.raises(ValueError, match="num_splits"):
        flash_decode(q, k, v, 8, num_splits=0)
    with pytest.raises(ValueError, match="window"):
        flash_decode(q, k, v, 8, window=0)


# --------------------------------------------------- the model's attention function
def test_ranges_from_positions():
    B, S = 2, 10
    slots = torch.arange(S).expand(B, S)
    q_pos = torch.tensor([[7, 8, 9], [4, 5, 6]])
    q_start, k_len = ranges_from_positions(q_pos, slots, slots < torch.tensor([[10], [7]]))
    assert q_start.tolist() == [7, 4] and k_len.tolist() == [10, 7]
    assert q_start.dtype == k_len.dtype == torch.int32
    assert ranges_from_positions(q_pos, slots)[1].tolist() == [10, 10]
    assert ranges_from_positions(torch.tensor([[7, 9, 8], [4, 5, 6]]), slots) is None
    assert ranges_from_positions(q_pos, slots.flip(1)) is None
    assert ranges_from_positions(q_pos, slots, slots % 2 == 0) is None


def _metas(B, T, S, device=DEV):
    """AttentionMetas as the model builds them: (name, meta, T, S)."""
    pos_t = torch.arange(T, device=device).expand(B, T)
    slots = torch.arange(S, device=device).expand(B, S)
    yield "plain", AttentionMeta(pos_t, pos_t, is_plain_causal=True), T, T
    prompt_lengths = torch.tensor([T, T - 7][:B], device=device)  # right-padded prompts
    yield "padded", AttentionMeta(pos_t, pos_t, pos_t < prompt_lengths[:, None]), T, T
    lengths = torch.tensor([S, S - 7][:B], device=device)
    # a StaticCache step: 3 queries per sequence at the end of its own length
    q_pos = lengths[:, None] - 3 + torch.arange(3, device=device)
    yield "cache", AttentionMeta(q_pos, slots, slots < lengths[:, None]), 3, S


@needs_kernels
@pytest.mark.parametrize("window", [None, 5])
def test_flash_attention_fn_matches_naive_without_falling_back(window, monkeypatch):
    if not kernels.can_launch(torch.empty(1, device=DEV)):
        pytest.skip("no Triton")

    def boom(*a, **kw):
        raise AssertionError("fell back to sdpa")

    monkeypatch.setattr(attention, "sdpa_attention", boom)
    for name, meta, T, S in _metas(2, 20, 36):
        q, k, v = _qkv(2, 4, 2, T, S, 32)
        out = flash_attention_fn(q, k, v, meta, window, 32 ** -0.5)
        want = naive_attention(q, k, v, meta, window, 32 ** -0.5)
        valid_q = meta.q_pos < (meta.k_valid.sum(1, keepdim=True) if meta.k_valid is not None
                                else meta.q_pos.shape[1])
        # padding queries may differ (they see a different set of keys); real ones may not
        torch.testing.assert_close(out.transpose(1, 2)[valid_q], want.transpose(1, 2)[valid_q],
                                   atol=2e-5, rtol=2e-5, msg=name)


def test_flash_attention_fn_falls_back_to_sdpa_where_kernels_cannot_run(monkeypatch):
    calls = []
    sdpa = attention.sdpa_attention
    monkeypatch.setattr(attention, "sdpa_attention", lambda *a: calls.append(1) or sdpa(*a))
    B, T, S = 2, 3, 10
    slots = torch.arange(S, device=DEV).expand(B, S)
    holes = slots % 4 != 1  # valid keys that are not a prefix
    q_pos = torch.tensor([[7, 8, 9], [4, 5, 6]], device=DEV)
    q, k, v = _qkv(B, 4, 2, T, S, 32)
    meta = AttentionMeta(q_pos, slots, holes)
    torch.testing.assert_close(flash_attention_fn(q, k, v, meta, None, 0.2),
                               naive_attention(q, k, v, meta, None, 0.2), atol=1e-5, rtol=1e-5)
    q16, k16, v16 = _qkv(B, 4, 2, T, S, 16)  # head_dim 16: no kernel
    meta = AttentionMeta(q_pos, slots, slots < 10)
    torch.testing.assert_close(flash_attention_fn(q16, k16, v16, meta, None, 0.2),
                               naive_attention(q16, k16, v16, meta, None, 0.2),
                               atol=1e-5, rtol=1e-5)
    assert len(calls) == 2


def _tiny_model(device=DEV):
    config = dataclasses.replace(preset("tiny"), num_layers=2)  # head_dim 32, GQA 2
    model = Transformer.from_config(config, device=device, seed=0)
    with torch.no_grad():  # larger weights: logits far from ties
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(4)
    return model


@needs_kernels
def test_model_generates_the_same_tokens_with_flash_attention(monkeypatch):
    """Prefill (T > 16, flash kernel) and decode (flash decoding) through a
    StaticCache give the tokens of the no-cache reference path with sdpa."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (20, 33, 5)]
    ref = generate(model, prompts, 8, use_cache=False, ignore_eos=True, return_logits=True)
    top2 = ref.logits.topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3  # no near-ties to flip

    if kernels.can_launch(torch.empty(1, device=DEV)):
        monkeypatch.setattr(attention, "sdpa_attention",
                            lambda *a: (_ for _ in ()).throw(AssertionError("fell back to sdpa")))
    model.attn_fn = get_attention("flash")
    out = generate(model, prompts, 8, use_cache=True, ignore_eos=True, return_logits=True)
    assert out.tolist() == ref.tolist()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)

    # no cache, right-padded batch, passing the function to forward
    ids = torch.zeros(3, 33, dtype=torch.long, device=DEV)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([20, 33, 5], device=DEV)
    with torch.no_grad():
        got = model(ids, lengths=lengths, attn_fn=flash_attention_fn)
        want = model(ids, lengths=lengths, attn_fn=naive_attention)
    valid = torch.arange(33, device=DEV) < lengths[:, None]
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ GPU scale
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hkv", [8, 2])
def test_gpu_flash_attention_vs_sdpa(dtype, causal, Hkv):
    B, H, T, D = 2, 8, 1024, 128
    q, k, v = _qkv(B, H, Hkv, T, T, D, dtype, "cuda")
    out, lse = flash_attention(q, k, v, causal=causal)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hkv != H)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    mask = prefix_mask(torch.zeros(B, device="cuda"), torch.full((B,), T, device="cuda"), T, T,
                       causal)
    torch.testing.assert_close(lse, _lse_ref(q, k, mask), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_flash_attention_padding_and_offsets():
    B, H, Hkv, T, S, D = 2, 8, 2, 1000, 1500, 64
    q, k, v = _qkv(B, H, Hkv, T, S, D, torch.bfloat16, "cuda")
    k_len = torch.tensor([1500, 1111], device="cuda")
    q_start = torch.tensor([500, 3], device="cuda")
    out, lse = flash_attention(q, k, v, q_start=q_start, k_len=k_len)
    _check(out, lse, q, k, v, prefix_mask(q_start, k_len, T, S), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_float32_is_not_tf32():
    """float32 inputs use true float32 products (input_precision="ieee"):
    errors of 1e-6, where TF32 would give about 1e-3."""
    q, k, v = _qkv(1, 4, 4, 256, 256, 64, torch.float32, "cuda")
    out, _ = flash_attention(q, k, v)
    pos = torch.arange(256)[None]
    want = attention_ref(q.cpu(), k.cpu(), v.cpu(), causal_mask(pos, pos))  # CPU: no TF32
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_flash_decode_vs_sdpa(T, dtype):
    B, Hq, Hkv, S, D = 4, 32, 8, 4096, 128
    q, k, v = _qkv(B, Hq, Hkv, T, S, D, dtype, "cuda")
    k_len = torch.tensor([4096, 3000, 517, 17], device="cuda")
    out = flash_decode(q, k, v, k_len)
    mask = prefix_mask(k_len - T, k_len, T, S)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_model_generates_the_same_tokens():
    model = _tiny_model("cuda")
    prompts = [list(range(3, 40)), list(range(100, 120)), [7, 8, 9]]
    ref = generate(model, prompts, 16, use_cache=False, ignore_eos=True)
    model.attn_fn = get_attention("flash")
    assert generate(model, prompts, 16, use_cache=True, ignore_eos=True).tolist() == ref.tolist()

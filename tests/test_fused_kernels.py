"""The fused kernels of lesson 09 (kernels/fused.py) against their references.

On CPU they run under Triton's interpreter: small shapes only. bfloat16 is
tested on a GPU only (the interpreter computes it wrongly).
"""

import pytest
import torch
import torch.nn.functional as F

from llmopt_lab import kernels
from llmopt_lab.kernels import fused
from llmopt_lab.kernels.fused import add_rmsnorm, rope_, swiglu
from llmopt_lab.kernels.reference import add_rmsnorm_ref, rmsnorm_ref, rope_ref, swiglu_ref
from llmopt_lab.model import apply_rope

TOLS = {torch.float32: 1e-5, torch.float16: 2e-3}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16])


def _needs_kernels():
    if kernels.mode() == "reference":
        pytest.skip("Triton cannot run kernels here")


def _qkv_views(n, hq, hk, d, dtype, device="cpu"):
    """q and k as non-contiguous views of one fused qkv projection output."""
    qkv = torch.randn(n, (hq + 2 * hk) * d, device=device).to(dtype)
    q = qkv[:, :hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(n, hk, d)
    return qkv, q, k


def _cos_sin(n, d, dtype, device="cpu", heads_dim=True):
    """Llama-style cos/sin for positions 0 .. n-1 (both halves equal): (n, 1, d) or (n, d)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    freqs = torch.arange(n, device=device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    return (cos[:, None], sin[:, None]) if heads_dim else (cos, sin)


# ------------------------------------------------------------------ references

def test_references_match_the_eager_model():
    x, r, w = torch.randn(3, 40), torch.randn(3, 40), torch.randn(40)
    normed, summed = add_rmsnorm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(summed, x + r)
    torch.testing.assert_close(normed, rmsnorm_ref(x + r, w, 1e-6))
    _, q, k = _qkv_views(3, 4, 2, 16, torch.float32)
    cos, sin = _cos_sin(3, 16, torch.float32)
    q_rot, k_rot = rope_ref(q, k, cos, sin)
    torch.testing.assert_close(q_rot, apply_rope(q, cos, sin))
    torch.testing.assert_close(k_rot, apply_rope(k, cos, sin))
    g, u = torch.randn(3, 24), torch.randn(3, 24)
    torch.testing.assert_close(swiglu_ref(g, u), F.silu(g) * u)


# ------------------------------------------------------------------ add_rmsnorm

@DTYPES
@pytest.mark.parametrize("shape", [(3, 40), (3, 64), (2, 1, 40)])
def test_add_rmsnorm_matches_reference(shape, dtype):
    tol = TOLS[dtype]
    x = (torch.randn(shape) * 3).to(dtype)
    r = torch.randn(shape).to(dtype)
    w = torch.randn(shape[-1]).to(dtype)
    normed, summed = add_rmsnorm(x, r, w, 1e-6)
    ref_normed, ref_summed = add_rmsnorm_ref(x, r, w, 1e-6)
    assert normed.shape == summed.shape == x.shape and normed.dtype == summed.dtype == dtype
    torch.testing.assert_close(summed, ref_summed, atol=0, rtol=0)  # the same rounded add
    torch.testing.assert_close(normed, ref_normed, atol=tol, rtol=tol)


def test_add_rmsnorm_non_contiguous_rows():
    x, r = torch.randn(6, 40)[::2], torch.randn(3, 80)[:, :40]
    w = torch.randn(40)
    for got, want in zip(add_rmsnorm(x, r, w), add_rmsnorm_ref(x, r, w, 1e-5)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_add_rmsnorm_kernel_really_ran(monkeypatch):
    _needs_kernels()
    monkeypatch.setattr(fused, "add_rmsnorm_ref",
                        lambda *a: (_ for _ in ()).throw(AssertionError("fallback")))
    x, r, w = torch.randn(3, 40), torch.randn(3, 40), torch.randn(40)
    assert kernels.can_launch(x, r, w)
    fused.add_rmsnorm(x, r, w)


def test_add_rmsnorm_errors():
    x, w = torch.randn(3, 40), torch.randn(40)
    with pytest.raises(ValueError, match=r"add_rmsnorm: x \(3, 40\) and residual \(3, 41\)"):
        add_rmsnorm(x, torch.randn(3, 41), w)
    with pytest.raises(ValueError, match=r"add_rmsnorm: weight of shape \(39,\) does not match"):
        add_rmsnorm(x, x, torch.randn(39))
    with pytest.raises(ValueError, match="add_rmsnorm: .*float16"):
        add_rmsnorm(x, x.half(), w)
    with pytest.raises(ValueError, match="add_rmsnorm: .*float16"):
        add_rmsnorm(x, x, w.half())
    with pytest.raises(ValueError, match="add_rmsnorm: unsupported dtype torch.int32"):
        add_rmsnorm(x.int(), x.int(), w.int())


# ------------------------------------------------------------------ rope_

@DTYPES
@pytest.mark.parametrize("d", [16, 8])
@pytest.mark.parametrize("cos_shape", ["(N, 1, D)", "(N, D)"])
def test_rope_matches_reference_in_place_on_qkv_views(d, dtype, cos_shape):
    tol = TOLS[dtype]
    qkv, q, k = _qkv_views(3, 4, 2, d, dtype)
    v_before = qkv[:, 6 * d:].clone()
    cos, sin = _cos_sin(3, d, dtype, heads_dim=cos_shape == "(N, 1, D)")
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    q_ptr, k_ptr, q_before = q.data_ptr(), k.data_ptr(), q.clone()
    q_out, k_out = rope_(q, k, cos, sin)
    assert q_out is q and k_out is k
    assert q.data_ptr() == q_ptr and k.data_ptr() == k_ptr  # in place
    assert not torch.equal(q, q_before)  # and really rotated (positions 1, 2 are)
    torch.testing.assert_close(q, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k, k_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(qkv[:, :4 * d].view(3, 4, d), q_ref, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, 6 * d:], v_before)  # v untouched


def test_rope_random_cos_sin_and_contiguous_inputs():
    """Arbitrary cos/sin (halves differ), contiguous q/k with Hq < Hk, D=40 (half not a
    power of two)."""
    q, k = torch.randn(3, 3, 40), torch.randn(3, 5, 40)
    cos, sin = torch.randn(3, 40), torch.randn(3, 40)
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    rope_(q, k, cos, sin)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)


def test_rope_several_head_blocks_with_tails():
    """D=256: tiles of 16 heads, so 20 q heads take two blocks (one partial) and 5 k heads one."""
    _, q, k = _qkv_views(2, 20, 5, 256, torch.float32)
    cos, sin = _cos_sin(2, 256, torch.float32)
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    rope_(q, k, cos, sin)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)


def test_rope_float32_cos_with_half_q():
    _, q, k = _qkv_views(3, 4, 2, 16, torch.float16)
    cos, sin = _cos_sin(3, 16, torch.float32)
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    rope_(q, k, cos, sin)
    torch.testing.assert_close(q, q_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(k, k_ref, atol=2e-3, rtol=2e-3)


def test_rope_fallback_stays_in_place(monkeypatch):
    monkeypatch.setattr(fused, "can_launch", lambda *t: False)
    _, q, k = _qkv_views(3, 4, 2, 8, torch.float32)
    cos, sin = _cos_sin(3, 8, torch.float32)
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    q_ptr = q.data_ptr()
    q_out, k_out = fused.rope_(q, k, cos, sin)
    assert q_out is q and k_out is k and q.data_ptr() == q_ptr
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)


def test_rope_kernel_really_ran(monkeypatch):
    _needs_kernels()
    monkeypatch.setattr(fused, "rope_ref",
                        lambda *a: (_ for _ in ()).throw(AssertionError("fallback")))
    _, q, k = _qkv_views(3, 4, 2, 16, torch.float32)
    cos, sin = _cos_sin(3, 16, torch.float32)
    assert kernels.can_launch(q, k, cos, sin)
    fused.rope_(q, k, cos, sin)


def test_rope_errors():
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    cos, sin = torch.randn(3, 16), torch.randn(3, 16)
    with pytest.raises(ValueError, match=r"rope_: q \(3, 4, 16\) and k \(2, 2, 16\)"):
        rope_(q, torch.randn(2, 2, 16), cos, sin)
    with pytest.raises(ValueError, match=r"rope_: q \(3, 4, 16\) and k \(3, 2, 8\)"):
        rope_(q, torch.randn(3, 2, 8), cos, sin)
    with pytest.raises(ValueError, match=r"rope_: the head dimension must be even, got D=15"):
        rope_(torch.randn(3, 4, 15), torch.randn(3, 2, 15), torch.randn(3, 15), torch.randn(3, 15))
    with pytest.raises(ValueError, match=r"rope_: cos \(3, 8\) and sin \(3, 8\) must both be"):
        rope_(q, k, torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="rope_: q is torch.float32 and k torch.float16"):
        rope_(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="rope_: unsupported dtype torch.int64 for q"):
        rope_(q.long(), k.long(), cos, sin)
    with pytest.raises(ValueError, match="rope_: cos and sin are torch.float16"):
        rope_(q, k, cos.half(), sin.half())


# ------------------------------------------------------------------ swiglu

@DTYPES
@pytest.mark.parametrize("shape", [(3, 24), (2, 1, 24)])
def test_swiglu_two_tensors(shape, dtype):
    tol = TOLS[dtype]
    g, u = (torch.randn(shape) * 4).to(dtype), torch.randn(shape).to(dtype)
    y = swiglu(g, u)
    assert y.shape == shape and y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y, swiglu_ref(g, u), atol=tol, rtol=tol)


@DTYPES
def test_swiglu_fused_gate_up(dtype):
    tol = TOLS[dtype]
    gu = (torch.randn(3, 48) * 4).to(dtype)
    y = swiglu(gu)
    assert y.shape == (3, 24) and y.is_contiguous()
    torch.testing.assert_close(y, swiglu_ref(gu[:, :24], gu[:, 24:]), atol=tol, rtol=tol)


def test_swiglu_non_contiguous_and_wide():
    g = torch.randn(24, 3).t()  # (3, 24), stride (1, 3): last dim not unit-stride
    u = torch.randn(3, 24)
    torch.testing.assert_close(swiglu(g, u), swiglu_ref(g, u), atol=1e-5, rtol=1e-5)
    gu = torch.randn(2, 2 * 1100) * 4  # I = 1100: two column blocks of 1024
    torch.testing.assert_close(swiglu(gu), swiglu_ref(gu[:, :1100], gu[:, 1100:]),
                               atol=1e-5, rtol=1e-5)


def test_swiglu_kernel_really_ran(monkeypatch):
    _needs_kernels()
    monkeypatch.setattr(fused, "swiglu_ref",
                        lambda *a: (_ for _ in ()).throw(AssertionError("fallback")))
    g, u = torch.randn(3, 24), torch.randn(3, 24)
    assert kernels.can_launch(g, u)
    fused.swiglu(g, u)
    fused.swiglu(torch.cat((g, u), dim=-1))


def test_swiglu_errors():
    g = torch.randn(3, 24)
    with pytest.raises(ValueError, match=r"swiglu: gate \(3, 24\) and up \(3, 23\)"):
        swiglu(g, torch.randn(3, 23))
    with pytest.raises(ValueError, match="swiglu: gate is torch.float32 but up is torch.float16"):
        swiglu(g, g.half())
    with pytest.raises(ValueError, match="swiglu: unsupported dtype torch.int32 for gate"):
        swiglu(g.int(), g.int())
    with pytest.raises(ValueError, match=r"swiglu: a fused gate_up \(3, 47\) needs an even last"):
        swiglu(torch.randn(3, 47))


# ------------------------------------------------------------------ GPU, bfloat16

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 needs a GPU (the interpreter "
                    "computes it wrongly)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_kernels_on_gpu(dtype):
    tol = 2e-2
    x = torch.randn(64, 4096, device="cuda", dtype=dtype)
    r = torch.randn(64, 4096, device="cuda", dtype=dtype)
    w = torch.randn(4096, device="cuda", dtype=dtype)
    for got, want in zip(add_rmsnorm(x, r, w), add_rmsnorm_ref(x, r, w, 1e-5)):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    _, q, k = _qkv_views(37, 32, 8, 128, dtype, device="cuda")
    cos, sin = _cos_sin(37, 128, dtype, device="cuda")
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    rope_(q, k, cos, sin)
    torch.testing.assert_close(q, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k, k_ref, atol=tol, rtol=tol)
    gu = torch.randn(37, 2 * 1376, device="cuda", dtype=dtype) * 4
    torch.testing.assert_close(swiglu(gu), swiglu_ref(gu[:, :1376], gu[:, 1376:]),
                               atol=tol, rtol=tol)

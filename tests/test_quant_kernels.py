"""Quantized-matmul Triton kernels against their plain-torch references.

On a CPU the kernels run under Triton's interpreter (slow: small shapes only);
bfloat16 and GPU-scale shapes are checked on a GPU (marked ``gpu``).
"""

import pytest
import torch

from llmopt_lab import kernels
from llmopt_lab.kernels import quant_matmul as qm
from llmopt_lab.kernels.reference import (dequantize_int4_ref, dequantize_int8_ref,
                                          int4_matmul_ref, int8_matmul_ref, pack_int4_ref,
                                          quantize_per_token_int8_ref, unpack_int4_ref,
                                          w8a8_matmul_ref)

needs_kernels = pytest.mark.skipif(kernels.mode() == "reference",
                                   reason=kernels.interpreter_problem() or "Triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def int4_weight(N, K, G, device="cpu", seed=0):
    """Random weights in the kernels' int4 format: packed (K // 2, N), scales/zeros (K // G, N)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scales = torch.rand(K // G, N, generator=g) * 0.02 + 1e-3
    zeros = torch.randint(0, 16, (K // G, N), generator=g, dtype=torch.uint8)
    return pack_int4_ref(codes).t().contiguous().to(device), scales.to(device), zeros.to(device)


def int8_weight(N, K, device="cpu", seed=0, k_major=True):
    """Random int8 weights, (K, N) for the weight-only kernels, (N, K) for W8A8."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    q = q.t().contiguous() if k_major else q
    return q.to(device), (torch.rand(N, generator=g) * 0.01 + 1e-4).to(device)


def close(y, ref, tol):
    torch.testing.assert_close(y.float(), ref.float(), atol=tol * ref.float().abs().max().item(),
                               rtol=tol)


# ------------------------------------------------------------------ formats
def test_pack_int4_hand_example_and_round_trip():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_int4_ref(codes)
    assert packed.tolist() == [[0x21, 0x0F]]  # low nibble = even column
    assert torch.equal(unpack_int4_ref(packed), codes)
    rnd = torch.randint(0, 16, (5, 6, 8), dtype=torch.uint8)
    assert torch.equal(unpack_int4_ref(pack_int4_ref(rnd)), rnd)
    with pytest.raises(ValueError, match="even"):
        pack_int4_ref(torch.zeros(2, 3, dtype=torch.uint8))


def test_dequantize_references_by_hand():
    q_t = torch.tensor([[-127, 1], [64, -1]], dtype=torch.int8)  # (K, N): K-major
    s = torch.tensor([2 / 127, 0.5])
    torch.testing.assert_close(dequantize_int8_ref(q_t, s), torch.tensor([[-2.0, 128 / 127], [0.5, -0.5]]))
    codes = torch.tensor([[0, 5, 15, 7]], dtype=torch.uint8)  # N = 1, K = 4, group size 2
    packed = pack_int4_ref(codes).t()  # (K // 2, N)
    assert packed.tolist() == [[0x50], [0x7F]]
    w = dequantize_int4_ref(packed, torch.tensor([[0.2], [1.0]]),
                            torch.tensor([[5], [7]], dtype=torch.uint8), 2)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 8.0, 0.0]]))


def test_per_token_int8_reference():
    x = torch.tensor([[-2.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    q, s = quantize_per_token_int8_ref(x)
    assert q.tolist() == [[-127, 64, 32], [0, 0, 0]]
    torch.testing.assert_close(s, torch.tensor([2 / 127, 1.0]))


# ---------------------------------------------------------- int4 kernels
INT4_CASES = [  # (M, path, dtype, split_k, bias, group)
    (1, "gemv", torch.float32, None, True, 64),
    (3, "gemv", torch.float16, 3, False, 64),
    (4, "gemv", torch.float32, 2, False, 32),
    (5, "gemm", torch.float32, None, True, 64),
    (2, "gemm", torch.float16, 2, True, 128),
    (17, "gemm", torch.float16, None, False, 64),
]


@needs_kernels
@pytest.mark.parametrize("M, path, dtype, split_k, bias, group", INT4_CASES)
def test_int4_matmul_matches_reference(M, path, dtype, split_k, bias, group):
    # N not a multiple of any block (and 45: not even of 4, the GEMV's word)
    N, K = {64: (300, 640), 32: (92, 256), 128: (45, 256)}[group]
    packed, scales, zeros = int4_weight(N, K, group)
    x = torch.randn(M, K).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    y = qm.int4_matmul(x, packed, scales, zeros, group, b, path=path, config=dict(split_k=split_k))
    assert y.dtype == dtype and y.shape == (M, N)
    close(y, int4_matmul_ref(x, packed, scales, zeros, group, b), 2e-3 if dtype == torch.float16 else 1e-5)


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 3])
def test_gemv_with_gpu_tiles(M):
    """The GPU's default GEMV tiles (128 words; 16 k rows per step at M = 1, 2 or 1 above)."""
    packed, scales, zeros = int4_weight(136, 128, 32)
    q, s = int8_weight(136, 70)
    cfg = qm.choose_config("int4", M, 136, 128, device="cpu", group_size=32)
    cfg.update(block_w=128, rows={1: 16, 2: 2}.get(M, 1), split_k=2)
    x = torch.randn(M, 128)
    close(qm.int4_matmul(x, packed, scales, zeros, 32, config=cfg),
          int4_matmul_ref(x, packed, scales, zeros, 32), 1e-5)
    x = torch.randn(M, 70)
    close(qm.int8_matmul(x, q, s, config=cfg), int8_matmul_ref(x, q, s), 1e-5)


# ---------------------------------------------------------- int8 kernels
INT8_CASES = [  # (M, path, dtype, split_k); K = 203: not a multiple of any block
    (1, "gemv", torch.float16, None),
    (4, "gemv", torch.float32, 2),
    (19, "gemm", torch.float32, None),
    (6, "gemm", torch.float16, 3),
]


@needs_kernels
@pytest.mark.parametrize("M, path, dtype, split_k", INT8_CASES)
def test_int8_matmul_matches_reference(M, path, dtype, split_k):
    N, K = 76, 203
    q, s = int8_weight(N, K)
    x = torch.randn(M, K).to(dtype)
    b = torch.randn(N).to(dtype)
    y = qm.int8_matmul(x, q, s, b, path=path, config=dict(split_k=split_k))
    assert y.dtype == dtype and y.shape == (M, N)
    close(y, int8_matmul_ref(x, q, s, b), 2e-3 if dtype == torch.float16 else 1e-5)


@needs_kernels
@pytest.mark.parametrize("M, dtype, input_scale, split_k", [(1, torch.float32, True, None),
                                                          (7, torch.float16, False, 2)])
def test_w8a8_matmul_matches_reference(M, dtype, input_scale, split_k):
    N, K = 40, 200
    q, s = int8_weight(N, K, seed=1, k_major=False)
    x = torch.randn(M, K).to(dtype)
    sin = torch.rand(K) + 0.5 if input_scale else None
    b = torch.randn(N).to(dtype)
    y = qm.w8a8_matmul(x, q, s, b, sin, config=dict(split_k=split_k))
    ref = w8a8_matmul_ref(x, q, s, b, sin)
    # the kernel quantizes x itself; a code may differ by 1 where x / scale sits on a
    # rounding boundary (division is not rounded identically everywhere)
    close(y, ref, 5e-3)


@needs_kernels
def test_batched_and_strided_inputs():
    packed, scales, zeros = int4_weight(48, 128, 64)
    x = torch.randn(2, 3, 256)[..., ::2]  # (2, 3, 128), last-dim stride 2: copied
    y = qm.int4_matmul(x, packed, scales, zeros, 64)
    assert y.shape == (2, 3, 48)
    close(y, int4_matmul_ref(x, packed, scales, zeros, 64), 1e-5)


@needs_kernels
def test_kernel_really_runs(monkeypatch):
    """Guard against a silent fallback to the reference."""
    def boom(*a, **k):
        raise AssertionError("fell back to the reference")

    monkeypatch.setattr(qm, "int4_matmul_ref", boom)
    monkeypatch.setattr(qm, "int8_matmul_ref", boom)
    packed, scales, zeros = int4_weight(32, 64, 32)
    x = torch.randn(1, 64)
    if kernels.can_launch(x, packed):
        qm.int4_matmul(x, packed, scales, zeros, 32)
        qm.int8_matmul(x, *int8_weight(32, 64))


@needs_kernels
def test_gemv_needs_whole_words():
    packed, scales, zeros = int4_weight(45, 256, 128)
    x = torch.randn(1, 256)
    assert qm.choose_config("int4", 1, 45, 256, group_size=128)["path"] == "gemm"
    close(qm.int4_matmul(x, packed, scales, zeros, 128), int4_matmul_ref(x, packed, scales, zeros, 128), 1e-5)
    if kernels.can_launch(x, packed):
        with pytest.raises(ValueError, match="multiple of 4"):
            qm.int4_matmul(x, packed, scales, zeros, 128, path="gemv")


def test_default_configs():
    assert qm.choose_config("int4", 1, 4096, 4096, group_size=128)["path"] == "gemv"
    assert qm.choose_config("int8", qm.GEMV_MAX_ROWS + 1, 4096, 4096)["path"] == "gemm"
    assert qm.choose_config("w8a8", 1, 4096, 4096)["path"] == "gemm"
    cfg = qm.choose_config("int4", 1, 4096, 4096, group_size=32)
    assert 16 % cfg["rows"] == 0 and cfg["block_m"] == 1
    cfg = qm.choose_config("int4", 8, 4096, 4096, group_size=32)
    assert 32 % cfg["block_k"] == 0  # a K tile never straddles a group
    assert qm._split(640, 64, 10, torch.device("cpu"), 3) == (3, 4)  # chunks of whole tiles
    assert qm._split(640, 64, 10, torch.device("cpu"), None) == (1, 10)  # no split off a GPU


def test_errors():
    packed, scales, zeros = int4_weight(8, 128, 64)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="group_size"):
        qm.int4_matmul(x, packed, scales, zeros, 48)
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        qm.check_int4_weight(torch.zeros(8, 48, dtype=torch.uint8), torch.zeros(8, 1),
                             torch.zeros(8, 1, dtype=torch.uint8), 64)  # K = 96
    with pytest.raises(ValueError, match="in_features 128"):
        qm.int4_matmul(torch.randn(2, 100), packed, scales, zeros, 64)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        qm.int4_matmul(x.long(), packed, scales, zeros, 64)
    with pytest.raises(ValueError, match="scales"):
        qm.int4_matmul(x, packed, scales[:, :1], zeros, 64)
    q, s = int8_weight(8, 128)
    with pytest.raises(ValueError, match="int8"):
        qm.int8_matmul(x, q.float(), s)
    with pytest.raises(ValueError, match="bias"):
        qm.int8_matmul(x, q, s, torch.zeros(9))
    with pytest.raises(ValueError, match="unknown config"):
        qm.int8_matmul(x, q, s, config=dict(blockn=3))
    with pytest.raises(ValueError, match="path"):
        qm.int8_matmul(x, q, s, path="fast")
    # configs are checked whether a kernel runs here or the reference stands in
    with pytest.raises(ValueError, match="block_m"):
        qm.int8_matmul(torch.randn(8, 128), q, s, config=dict(path="gemv", block_m=4))
    with pytest.raises(ValueError, match="divide the group size"):
        qm.int4_matmul(x, packed, scales, zeros, 64, config=dict(path="gemm", block_k=128))
    with pytest.raises(ValueError, match="rows"):
        qm.int4_matmul(x, packed, scales, zeros, 64, config=dict(rows=3))


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 4, 16, 100])
def test_kernels_on_gpu(dtype, M):
    N, K = 1000, 4096  # default configs, split-K included
    packed, scales, zeros = int4_weight(N, K, 128, "cuda")
    q, s = int8_weight(N, K, "cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    close(qm.int4_matmul(x, packed, scales, zeros, 128, b),
          int4_matmul_ref(x, packed, scales, zeros, 128, b), 1e-2)
    close(qm.int8_matmul(x, q, s, b), int8_matmul_ref(x, q, s, b), 1e-2)
    q8, s8 = int8_weight(N, K, "cuda", k_major=False)
    close(qm.w8a8_matmul(x, q8, s8, b), w8a8_matmul_ref(x, q8, s8, b), 1e-2)


@pytest.mark.gpu
def test_kernels_on_gpu_fp32_and_odd_shapes():
    packed, scales, zeros = int4_weight(300, 640, 64, "cuda")
    for M in (1, 3, 33):
        x = torch.randn(M, 640, device="cuda")
        close(qm.int4_matmul(x, packed, scales, zeros, 64),
              int4_matmul_ref(x, packed, scales, zeros, 64), 1e-4)

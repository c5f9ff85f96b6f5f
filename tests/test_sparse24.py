"""2:4 semi-structured sparsity: the compressed format, its GEMV kernels, Sparse24Linear.

On a CPU the kernels run under Triton's interpreter (small shapes; float32 and
float16, the interpreter computes bfloat16 wrongly); bfloat16, bigger shapes
and torch's sparse tensor cores are checked on a GPU (marked ``gpu``).
"""

import pytest
import torch
from torch import nn

from llmopt_lab import kernels
from llmopt_lab.kernels import sparse24 as sp
from llmopt_lab.kernels.reference import (decompress_24_ref, sparse24_matmul_ref,
                                          unpack_meta_24_ref)

needs_kernels = pytest.mark.skipif(
    kernels.mode() == "reference",
    reason=kernels.interpreter_problem() or "Triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def random_24(N, K, dtype=torch.float32, seed=0, device="cpu", sparser=True):
    """A random 2:4 sparse (N, K) weight; with ``sparser`` some groups keep 1 or 0 nonzeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K // 4, 4, generator=g)
    rank = torch.rand(N, K // 4, 4, generator=g).argsort(-1).argsort(-1)  # a random order per group
    # nonzeros per group: 0, 1 or 2 (sparser), else 2
    n_keep = torch.randint(0, 3, (N, K // 4, 1), generator=g) if sparser else 2
    mask = rank < n_keep
    return (w * mask).reshape(N, K).to(dtype).to(device)


def close(y, ref, tol):
    scale = max(ref.float().abs().max().item(), 1.0)
    torch.testing.assert_close(y.float(), ref.float(), atol=tol * scale, rtol=tol)


# ------------------------------------------------------------------ format
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_random_including_sparser_groups(dtype):
    w = random_24(24, 64, dtype)
    per_group = (w.reshape(24, 16, 4) != 0).sum(-1)
    assert {0, 1, 2} <= set(per_group.flatten().tolist())  # the test covers all three cases
    values, meta = sp.compress_24(w)
    assert values.shape == (24, 32) and values.dtype == dtype
    assert meta.shape == (24, 8) and meta.dtype == torch.uint8
    assert torch.equal(decompress_24_ref(values, meta), w)
    assert sp.decompress_24 is decompress_24_ref
    # every nonzero survives, in column order, and indices inside a group increase
    idx = unpack_meta_24_ref(meta).reshape(24, 16, 2)
    assert bool((idx[..., 0] < idx[..., 1]).all())
    assert torch.equal((values != 0).sum(), (w != 0).sum())
    # compressing again is deterministic and the decompressed matrix compresses identically
    v2, m2 = sp.compress_24(decompress_24_ref(values, meta))
    assert torch.equal(v2, values) and torch.equal(m2, meta)


def test_meta_bit_layout_by_hand():
    # one row, K = 8: groups [a, 0, b, 0] and [0, 0, 0, c]  ->  indices (0, 2) and (0, 3)
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0],
                      # groups with 0 and 1 nonzero: lowest free positions are kept
                      [0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0],
                      # two nonzeros at the top of each group
                      [0.0, 0.0, 6.0, 7.0, 0.0, 8.0, 9.0, 0.0]])
    values, meta = sp.compress_24(w)
    assert values.tolist() == [[1.0, 2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 5.0], [6.0, 7.0, 8.0, 9.0]]
    # bits 2i..2i+1 of the byte = index of value i, first value in the low bits
    assert meta.tolist() == [[0 | 2 << 2 | 0 << 4 | 3 << 6],    # 0b11_00_10_00 = 200
                             [0 | 1 << 2 | 0 << 4 | 1 << 6],    # 0b01_00_01_00 = 68
                             [2 | 3 << 2 | 1 << 4 | 2 << 6]]    # 0b10_01_11_10 = 158
    assert meta.tolist() == [[200], [68], [158]]
    assert unpack_meta_24_ref(meta).tolist() == [[0, 2, 0, 3], [0, 1, 0, 1], [2, 3, 1, 2]]
    assert torch.equal(decompress_24_ref(values, meta), w)
    # a second byte covers the next 8 columns
    v2, m2 = sp.compress_24(torch.cat([w, w.flip(-1)], dim=1))
    assert m2.shape == (3, 2) and m2[:, 0].tolist() == [200, 68, 158]


def test_non_24_and_bad_shapes_are_refused():
    w = random_24(6, 32)
    w[4, 9:12] = torch.tensor([1.0, 2.0, 3.0])  # row 4, group 2 (columns 8..11): 3 nonzeros
    w[5, 0:4] = 1.0
    with pytest.raises(ValueError,
                       match=r"not 2:4 sparse: row 4, group 2 \(columns 8..11\) has 3 nonzeros"):
        sp.compress_24(w)
    w = random_24(2, 16)
    w[1, 12] = float("nan")  # NaN counts as nonzero
    w[1, 13:16] = torch.tensor([1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="row 1, group 3"):
        sp.compress_24(w)
    for K in (4, 12, 20, 0):
        with pytest.raises(ValueError, match=f"K={K} must be a positive multiple of 8"):
            sp.compress_24(torch.zeros(3, K))
    with pytest.raises(ValueError, match="2-D float"):
        sp.compress_24(torch.zeros(16))
    with pytest.raises(ValueError, match="2-D float"):
        sp.compress_24(torch.zeros(2, 16, dtype=torch.int32))
    values, meta = sp.compress_24(random_24(4, 32))
    with pytest.raises(ValueError, match=r"meta must be uint8 of shape \(N, K // 8\) = \(4, 4\)"):
        sp.check_sparse24(values, meta[:, :3])
    with pytest.raises(ValueError, match="meta must be uint8"):
        sp.check_sparse24(values, meta.to(torch.int8))
    with pytest.raises(ValueError, match="K a positive multiple of 8"):
        sp.check_sparse24(values[:, :6], meta[:, :1])
    with pytest.raises(ValueError, match="meta"):
        decompress_24_ref(values, meta[:, :3])


def test_bytes_ratio_is_0_5625_of_fp16_dense():
    N, K = 64, 256
    lin = nn.Linear(K, N, bias=False, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.copy_(random_24(N, K, torch.float16, sparser=False))
    layer = sp.Sparse24Linear.from_linear(lin)
    dense_bytes = lin.weight.numel() * lin.weight.element_size()
    assert layer.weight_bytes() == N * K // 2 * 2 + N * K // 8
    assert layer.weight_bytes() / dense_bytes == 0.5625
    values, meta = sp.compress_24(lin.weight.detach())
    assert (values.nbytes + meta.nbytes) / dense_bytes == 0.5625


# ------------------------------------------------------------------ kernels
SHAPES = [(40, 72, None),                            # N, K not multiples of the default tiles
          (40, 72, dict(block_n=16, block_b=4))]      # several tiles and K steps, ragged ends


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N,K,config", SHAPES)
def test_sparse24_matmul_matches_reference(dtype, M, bias, N, K, config):
    w = random_24(N, K, dtype, seed=M)
    values, meta = sp.compress_24(w)
    x = torch.randn(M, K).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    y = sp.sparse24_matmul(x, values, meta, b, config=config)
    assert y.shape == (M, N) and y.dtype == dtype
    close(y, sparse24_matmul_ref(x, values, meta, b), 1e-5 if dtype == torch.float32 else 2e-3)
    # and the reference is the dense product
    close(sparse24_matmul_ref(x, values, meta, b), nn.functional.linear(x.float(), w.float(),
          None if b is None else b.float()), 1e-5 if dtype == torch.float32 else 2e-3)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N,K,config", SHAPES + [(24, 50, dict(block_n=8, block_b=2))])  # K%8
def test_dense_gemv_matches_torch(dtype, M, bias, N, K, config):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(N, K, generator=g).to(dtype)
    x = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = sp.dense_gemv(x, w, b, config=config)
    ref = nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.shape == (M, N) and y.dtype == dtype
    close(y, ref, 1e-5 if dtype == torch.float32 else 2e-3)


@needs_kernels
def test_kernels_really_run(monkeypatch):
    """Guard against a silent fallback to the references."""
    def boom(*a, **k):
        raise AssertionError("fell back to the reference")

    monkeypatch.setattr(sp, "sparse24_matmul_ref", boom)
    monkeypatch.setattr(sp, "_linear_ref", boom)
    x = torch.randn(2, 32)
    values, meta = sp.compress_24(random_24(16, 32))
    if kernels.can_launch(x, values):
        sp.sparse24_matmul(x, values, meta)
        sp.dense_gemv(x, torch.randn(16, 32))
        with pytest.raises(AssertionError, match="fell back"):  # more rows than a GEMV takes
            sp.sparse24_matmul(torch.randn(sp.GEMV_MAX_ROWS + 1, 32), values, meta)


def test_batched_strided_and_many_rows():
    values, meta = sp.compress_24(random_24(16, 64))
    x = torch.randn(2, 3, 128)[..., ::2]  # (2, 3, 64), last-dim stride 2: copied
    y = sp.sparse24_matmul(x, values, meta)
    assert y.shape == (2, 3, 16)
    close(y, sparse24_matmul_ref(x, values, meta), 1e-5)
    xm = torch.randn(sp.GEMV_MAX_ROWS + 3, 64)  # prefill-sized: the reference stands in
    close(sp.sparse24_matmul(xm, values, meta), sparse24_matmul_ref(xm, values, meta), 1e-6)
    assert sp.sparse24_matmul(torch.randn(0, 64), values, meta).shape == (0, 16)


def test_errors():
    values, meta = sp.compress_24(random_24(8, 32))
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="in_features 32"):
        sp.sparse24_matmul(torch.randn(2, 16), values, meta)
    with pytest.raises(ValueError, match="dtype torch.float32"):
        sp.sparse24_matmul(x.half(), values, meta)
    with pytest.raises(ValueError, match="bias must be torch.float32 of shape \\(8,\\)"):
        sp.sparse24_matmul(x, values, meta, torch.zeros(9))
    with pytest.raises(ValueError, match="meta must be uint8"):
        sp.sparse24_matmul(x, values, meta.float())
    with pytest.raises(ValueError, match="unknown config"):
        sp.sparse24_matmul(x, values, meta, config=dict(blockn=4))
    with pytest.raises(ValueError, match="power of 2"):
        sp.sparse24_matmul(x, values, meta, config=dict(block_n=12))
    with pytest.raises(ValueError, match="block_m 1 < M 2"):  # checked whether a kernel runs or not
        sp.dense_gemv(x, torch.randn(8, 32), config=dict(block_m=1))
    with pytest.raises(ValueError, match="2-D float"):
        sp.dense_gemv(x, torch.randn(8, 32).long())
    with pytest.raises(ValueError, match="in_features 32"):
        sp.dense_gemv(torch.randn(2, 31), torch.randn(8, 32))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="x is on"):
            sp.sparse24_matmul(x.cuda(), values, meta)


# ------------------------------------------------------------------ module
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse24_linear_equals_the_dense_linear(dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(random_24(24, 64, dtype))
    layer = sp.Sparse24Linear.from_linear(lin)
    assert (layer.in_features, layer.out_features) == (64, 24)
    assert torch.equal(decompress_24_ref(layer.values, layer.meta), lin.weight)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    with torch.no_grad():
        for shape in [(1, 64), (3, 64), (2, 1, 64)]:  # GEMV (the kernel where it can run)
            x = torch.randn(shape).to(dtype)
            y = layer(x)
            assert y.shape == (*shape[:-1], 24) and y.dtype == dtype
            close(y, lin(x), tol)
        x = torch.randn(2, sp.GEMV_MAX_ROWS, 64).to(dtype)  # prefill: decompress + matmul
        assert torch.equal(layer(x), lin(x))
    text = repr(layer)
    assert "in_features=64, out_features=24" in text and f"bias={bias}" in text
    assert f"weight_bytes={24 * 32 * layer.values.element_size() + 24 * 8}" in text
    assert "weight" not in dict(layer.named_parameters())  # nothing dense is kept


def test_sparse24_linear_refuses_dense_weights():
    lin = nn.Linear(16, 4)
    with pytest.raises(ValueError, match="not 2:4 sparse: row 0, group 0"):
        sp.Sparse24Linear.from_linear(lin)
    with pytest.raises(ValueError, match="nn.Linear"):
        sp.Sparse24Linear.from_linear(nn.Conv1d(1, 1, 1))


def test_to_semi_structured_refuses_off_gpu():
    lin = nn.Linear(64, 64, dtype=torch.float16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA GPU of compute capability >= 8.0"):
            sp.to_semi_structured(lin)
    with pytest.raises(ValueError, match="nn.Linear"):
        sp.to_semi_structured(nn.ReLU())


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 4, 16])
def test_kernels_on_gpu(dtype, M):
    N, K = 1000, 4104  # default configs, ragged N and K
    w = random_24(N, K, dtype, device="cuda")
    values, meta = sp.compress_24(w)
    x = torch.randn(M, K, device="cuda").to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    close(sp.sparse24_matmul(x, values, meta, b), sparse24_matmul_ref(x, values, meta, b), tol)
    close(sp.dense_gemv(x, w, b), sparse24_matmul_ref(x, values, meta, b), tol)
    layer = sp.Sparse24Linear(values, meta, b)
    close(layer(x), sparse24_matmul_ref(x, values, meta, b), tol)


@pytest.mark.gpu
def test_to_semi_structured_on_gpu():
    if torch.cuda.get_device_capability() < (8, 0):
        with pytest.raises(ValueError, match="compute capability"):
            sp.to_semi_structured(nn.Linear(64, 64, dtype=torch.float16, device="cuda"))
        return
    lin = nn.Linear(128, 128, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        lin.weight.copy_(random_24(128, 128, torch.float16, device="cuda", sparser=False))
    fast = sp.to_semi_structured(lin)
    assert type(lin.weight) is nn.Parameter and type(fast.weight) is not type(lin.weight)
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        close(fast(x), lin(x), 1e-2)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        sp.to_semi_structured(lin.float())
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        sp.to_semi_structured(nn.Linear(128, 128, dtype=torch.float16, device="cuda"))

"""Below four bits: 3- and 2-bit codes in the int4 container, quantization-aware
training (STE), and mixed precision from a sensitivity scan under a byte budget."""

import itertools
import math

import pytest
import torch
import torch.nn as nn

from llmopt_lab.config import preset
from llmopt_lab.generate import generate
from llmopt_lab.model import Transformer
from llmopt_lab.transforms import quantize as Q
from llmopt_lab.transforms.calibration import calibration_batches
from llmopt_lab.transforms.gptq import gptq_quantize_layer
from llmopt_lab.transforms.quantize.formats import packed_nbytes, quantize_int4
from llmopt_lab.transforms.quantize.mixed import (Sensitivity, check_format, format_nbytes,
                                                  layer_sensitivity, mixed_model_bytes, plan_bits)
from llmopt_lab.transforms.quantize.qat import (FakeQuantLinear, convert_qat, prepare_qat,
                                                ste_fake_quantize)


@pytest.fixture(scope="module")
def tiny():
    return Transformer.from_config(preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def calib():
    stream = torch.randint(0, 512, (4000,), generator=torch.Generator().manual_seed(2))
    return calibration_batches(stream, num_sequences=8, seq_len=33, batch_size=4)


# ============================================================ fewer bits, same container
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_low_bit_codes_use_only_their_levels(bits):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(bits))
    q = quantize_int4(w, 64, bits=bits)
    codes = q.codes()
    assert int(codes.max()) <= 2 ** bits - 1
    assert len(torch.unique(codes)) == 2 ** bits  # every level used on Gaussian weights
    ref = Q.fake_quantize(w, bits=bits, symmetric=False, granularity="group", group_size=64)
    assert torch.allclose(q.dequantize(), ref, atol=1e-6)
    err = [(quantize_int4(w, 64, bits=b).dequantize() - w).pow(2).mean() for b in (2, 3, 4)]
    assert err[0] > err[1] > err[2]  # fewer levels, more error


def test_low_bit_errors_and_bytes():
    w = torch.randn(8, 64)
    with pytest.raises(Q.QuantizationError, match="bits must be one of"):
        quantize_int4(w, 64, bits=5)
    with pytest.raises(Q.QuantizationError, match="bits must be one of"):
        quantize_int4(w, 64, bits=True)
    with pytest.raises(Q.QuantizationError, match="codes above 3"):
        Q.Int4Linear(quantize_int4(w, 64, bits=4), bits=2)
    # bits per weight: codes plus 40 bits (float32 scale, uint8 zero) per group
    assert packed_nbytes(64, 128, 3, 64) == 64 * 128 * 3 // 8 + 64 * 2 * 5
    assert packed_nbytes(64, 128, 4, 64) == Q.Int4Linear(quantize_int4(torch.randn(64, 128), 64)).packed.numel() + 64 * 2 * 5
    with pytest.raises(Q.QuantizationError, match="positive integer"):
        packed_nbytes(0, 128, 3, 64)


@pytest.mark.parametrize("bits", [2, 3])
def test_rtn_and_gptq_at_low_bits(tiny, ids, calib, bits):
    ref = tiny(ids)
    for method, kw in (("int4", {}), ("gptq", dict(calibration=calib))):
        m = Q.quantize(tiny, method, copy=True, group_size=64, bits=bits, **kw)
        layer = m.layers[0].mlp.down_proj
        assert isinstance(layer, Q.Int4Linear) and layer.bits == bits
        assert int(layer.int4_weight().codes().max()) <= 2 ** bits - 1
        assert m.quantization["bits"] == bits
        assert torch.isfinite(m(ids)).all()
    assert torch.equal(tiny(ids), ref)  # copy=True left the float model alone


def test_gptq_low_bits_beats_rtn_on_its_objective():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(512, 128, generator=g)
    W = torch.randn(32, 128, generator=g)
    H = 2 * X.t() @ X / X.shape[0]
    for bits in (2, 3):
        gq = gptq_quantize_layer(W, H, group_size=64, bits=bits)
        assert int(gq.weight.codes().max()) <= 2 ** bits - 1
        rtn = quantize_int4(W, 64, bits=bits).dequantize()
        err = lambda Wq: float(((X @ (W - Wq).t()) ** 2).sum())
        assert err(gq.dequantized) < 0.8 * err(rtn)


# ====================================================================== QAT
def test_ste_forward_is_fake_quant_and_gradient_passes_through():
    w = torch.randn(16, 64, requires_grad=True)
    out = ste_fake_quantize(w, bits=2, group_size=32)
    ref = Q.fake_quantize(w.detach(), bits=2, symmetric=False, granularity="group", group_size=32)
    assert torch.equal(out.detach(), ref)
    g = torch.randn(16, 64)
    out.backward(g)
    assert torch.equal(w.grad, g)  # identity: straight through
    with pytest.raises(Q.QuantizationError, match="multiple of group_size"):
        ste_fake_quantize(torch.randn(4, 48), 2, 32)
    with pytest.raises(Q.QuantizationError, match="2-D"):
        ste_fake_quantize(torch.randn(64), 2, 32)


def test_fake_quant_linear_converts_to_the_same_function(tiny, ids):
    import copy

    m = copy.deepcopy(tiny)
    from llmopt_lab.transforms.quantize import linear_layers

    prepare_qat(m, linear_layers(m), bits=3, group_size=64)
    assert isinstance(m.layers[0].self_attn.q_proj, FakeQuantLinear)
    # the latent weights are copies: training them leaves the float model alone
    with torch.no_grad():
        m.layers[0].self_attn.q_proj.weight.add_(0.01)
    assert not torch.equal(m.layers[0].self_attn.q_proj.weight, tiny.layers[0].self_attn.q_proj.weight)
    fake = m(ids)
    convert_qat(m, backend="torch")
    assert isinstance(m.layers[0].self_attn.q_proj, Q.Int4Linear)
    assert m.layers[0].self_attn.q_proj.bits == 3
    assert torch.allclose(m(ids), fake, atol=1e-4, rtol=1e-4)
    with pytest.raises(Q.QuantizationError, match="no FakeQuantLinear"):
        convert_qat(m)
    with pytest.raises(Q.QuantizationError, match="wraps an nn.Linear"):
        FakeQuantLinear(m.layers[0].self_attn.q_proj)


def test_qat_lowers_the_distillation_loss_and_keeps_generation(tiny, ids, calib):
    batches = [torch.cat([b, b[:, :1]], 1) for b in calib]  # (B, T + 1) rows
    rtn = Q.quantize(tiny, "int4", copy=True, group_size=64, bits=2)
    m = Q.quantize(tiny, "qat", copy=True, group_size=64, bits=2, calibration=batches, steps=30,
                   lr=1e-3)
    info = m.quantization
    assert info["method"] == "qat" and info["bits"] == 2 and info["kd_loss_last"] < info["kd_loss_first"]
    assert all(isinstance(x, Q.Int4Linear) and x.bits == 2
               for x in Q.linear_layers(m).values())
    assert {p.requires_grad for p in m.parameters()} == {p.requires_grad for p in tiny.parameters()}
    # on the calibration text QAT's model is closer to the float one than RTN at the same bits
    full = torch.cat(calib)
    kl = lambda q: Q.compare_quality(tiny, q, full)["kl"]
    assert kl(m) < kl(rtn)
    out = generate(m, ids[:1, :5], 4)
    assert out.tokens.shape == (1, 4)


def test_qat_errors(tiny, calib):
    with pytest.raises(Q.QuantizationError, match="needs calibration"):
        Q.quantize(tiny, "qat", copy=True, group_size=64, bits=2)
    with pytest.raises(Q.QuantizationError, match="steps must be a positive integer"):
        Q.quantize(tiny, "qat", copy=True, group_size=64, bits=2, calibration=calib, steps=0)
    with pytest.raises(Q.QuantizationError, match="bits must be one of"):
        Q.quantize(tiny, "qat", copy=True, group_size=64, bits=1, calibration=calib, steps=1)


# ============================================================ mixed precision
def _table(kl, nbytes, formats=((8, None), (4, 64), (2, 64))):
    L = len(kl)
    return Sensitivity([f"l{i}" for i in range(L)], list(formats),
                       torch.tensor(kl, dtype=torch.float64), torch.tensor(nbytes, dtype=torch.int64))


def _brute(s: Sensitivity, byte_budget=None, kl_budget=None):
    best = None
    for picks in itertools.product(range(len(s.formats)), repeat=len(s.layers)):
        b = sum(int(s.nbytes[i, j]) for i, j in enumerate(picks))
        k = sum(float(s.kl[i, j]) for i, j in enumerate(picks))
        if byte_budget is not None and b <= byte_budget and (best is None or k < best[1] - 1e-12):
            best = (b, k)
        if kl_budget is not None and k <= kl_budget and (best is None or b < best[0]):
            best = (b, k)
    return best


def test_plan_bits_is_the_exact_knapsack_optimum():
    g = torch.Generator().manual_seed(3)
    for trial in range(5):
        L = 6
        kl = torch.rand(L, 3, generator=g)
        kl[:, 0] *= 0.01  # int8 nearly free, 2-bit costly
        kl[:, 1] *= 0.2
        size = torch.randint(100, 1000, (L,), generator=g)
        nbytes = torch.stack([size * 8, size * 4, size * 2], 1) + 7
        s = _table(kl.tolist(), nbytes.tolist())
        lo, hi = int(nbytes[:, 2].sum()), int(nbytes[:, 0].sum())
        budget = lo + (hi - lo) * (trial + 1) // 6
        plan = plan_bits(s, byte_budget=budget, max_units=100000)
        b, k = _brute(s, byte_budget=budget)
        assert plan.nbytes <= budget and plan.predicted_kl == pytest.approx(k, abs=1e-9)
        kl_budget = float(kl.min(1).values.sum()) * 1.5 + 0.05 * trial
        plan = plan_bits(s, kl_budget=kl_budget, max_units=100000)
        b, k = _brute(s, kl_budget=kl_budget)
        assert plan.predicted_kl <= kl_budget + 1e-12 and plan.nbytes == b


def test_plan_bits_errors():
    s = _table([[0.01, 0.1, 1.0]] * 2, [[800, 400, 200]] * 2)
    with pytest.raises(Q.QuantizationError, match="exactly one"):
        plan_bits(s)
    with pytest.raises(Q.QuantizationError, match="below the smallest assignment"):
        plan_bits(s, byte_budget=399)
    with pytest.raises(Q.QuantizationError, match="below the least predicted KL"):
        plan_bits(s, kl_budget=0.015)
    with pytest.raises(Q.QuantizationError, match="number >= 0"):
        plan_bits(s, kl_budget=-1.0)
    with pytest.raises(Q.QuantizationError, match="positive number of bytes"):
        plan_bits(s, byte_budget=float("nan"))
    with pytest.raises(Q.QuantizationError, match="Sensitivity"):
        plan_bits({"kl": 1}, byte_budget=100)
    with pytest.raises(Q.QuantizationError, match="unsupported format"):
        check_format((5, 64))
    with pytest.raises(Q.QuantizationError, match="bits, group_size"):
        check_format("int4")
    assert format_nbytes((8, None), 10, 64) == 10 * 64 + 40


def test_sensitivity_scan_and_mixed_model(tiny, ids, calib):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    s = layer_sensitivity(tiny, calib[:1], formats=[(8, None), (4, 64), (2, 64)])
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())  # restored
    L = len(Q.linear_layers(tiny))
    assert s.kl.shape == (L, 3) and (s.kl >= 0).all()
    # fewer bits hurt more, layer by layer (int8 is nearly free)
    assert (s.kl[:, 0] < s.kl[:, 1]).float().mean() > 0.9 and (s.kl[:, 1] < s.kl[:, 2]).all()
    # a single-layer KL agrees with quantizing that layer for real
    name = s.layers[3]
    one = Q.quantize(tiny, "mixed", copy=True, plan={
        n: ((2, 64) if n == name else (8, None)) for n in s.layers})
    # the budget of uniform 4-bit: the plan fits and predicts less damage than uniform 4-bit
    budget = s.uniform_bytes((4, 64))
    plan = plan_bits(s, byte_budget=budget)
    assert plan.nbytes <= budget and plan.predicted_kl <= s.uniform_kl((4, 64)) + 1e-12
    m = Q.quantize(tiny, "mixed", copy=True, plan=plan)
    assert mixed_model_bytes(m) == plan.nbytes
    assert sum(plan.counts().values()) == L and m.quantization["formats"] == plan.counts()
    assert torch.isfinite(m(ids)).all() and torch.isfinite(one(ids)).all()
    with pytest.raises(Q.QuantizationError, match="does not match"):
        Q.quantize(tiny, "mixed", copy=True, plan={s.layers[0]: (4, 64)})
    with pytest.raises(Q.QuantizationError, match="needs plan"):
        Q.quantize(tiny, "mixed", copy=True)
    with pytest.raises(Q.QuantizationError, match="not a decoder linear layer"):
        layer_sensitivity(tiny, calib[:1], layers=["lm_head.nope"])
    with pytest.raises(Q.QuantizationError, match="was not scanned"):
        s.uniform_bytes((3, 64))


# ============================================================ bench 03 --size lowbit
def test_lowbit_benchmark_quick_runs_on_cpu():
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from llmopt_lab.benchmarks import quantization

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = quantization.run("lowbit-quick", "cpu", progress=False)
    lb = res["lowbit"]
    labels = [r["label"] for r in lb["rows"]]
    assert labels == ["RTN 3-bit", "GPTQ 3-bit", "QAT 3-bit", "mixed @ 3-bit bytes"]
    by = {r["label"]: r for r in lb["rows"]}
    # same bits, same group size: the same packed bytes; the mixed plan fits the budget
    assert by["RTN 3-bit"]["packed_bytes"] == by["GPTQ 3-bit"]["packed_bytes"] == by["QAT 3-bit"]["packed_bytes"]
    assert by["mixed @ 3-bit bytes"]["packed_bytes"] <= lb["mixed"][0]["budget_bytes"]
    for r in lb["rows"]:
        lo, hi = r["ppl_delta_pct_ci90"]
        assert lo <= r["ppl_delta_pct"] <= hi and "windows" not in r
    assert len(lb["scan"]["kl"]) == len(lb["scan"]["layers"]) and lb["scan"]["formats"] == ["int8", "int3 g64"]
    rows = quantization.summary_rows(res)
    assert rows and all(set(r) == set(rows[0]) for r in rows)
    assert "below four bits" in quantization.summary_text(res)
    quantization.plot(res, {"device": "cpu"})


def test_compare_quality_refuses_what_is_not_a_model_or_a_window_tensor(tiny, ids):
    with pytest.raises(Q.QuantizationError, match="llmopt_lab Transformer"):
        Q.compare_quality(tiny, nn.Linear(2, 2), ids)
    with pytest.raises(Q.QuantizationError, match=r"\(N, W\) token tensor"):
        Q.compare_quality(tiny, tiny, ids[0])

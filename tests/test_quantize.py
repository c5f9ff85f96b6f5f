"""Quantization building blocks, layers, calibrated methods and the model transform."""

import math
import warnings

import pytest
import torch
import torch.nn as nn

from llmopt_lab import kernels
from llmopt_lab.config import preset
from llmopt_lab.errors import LlmoptError
from llmopt_lab.generate import generate
from llmopt_lab.model import Transformer
from llmopt_lab.transforms import quantize as Q
from llmopt_lab.transforms.awq import awq_quantize_layer, awq_scale_error, awq_search_scale
from llmopt_lab.transforms.calibration import calibration_batches, collect_input_stats
from llmopt_lab.transforms.gptq import gptq_column_update, gptq_prepare, gptq_quantize_layer
from llmopt_lab.transforms.smoothquant import (activation_outliers, channel_outliers,
                                               plant_layer_outliers, plant_outliers,
                                               smoothing_factors, w8a8_output_error)


@pytest.fixture(scope="module")
def tiny():
    return Transformer.from_config(preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def calib():
    stream = torch.randint(0, 512, (4000,), generator=torch.Generator().manual_seed(2))
    return calibration_batches(stream, num_sequences=8, seq_len=48, batch_size=4)


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def correlated_inputs(T, K, seed=0, structure=0):
    """Activations with correlated channels of very different magnitudes, as in
    LLMs: ``structure`` fixes the mixing and the channel scales, ``seed`` the samples."""
    gs = torch.Generator().manual_seed(1000 + structure)
    mix, scale = torch.randn(16, K, generator=gs), torch.logspace(-0.7, 0.7, K)[torch.randperm(K, generator=gs)]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, 16, generator=g) @ mix + 0.3 * torch.randn(T, K, generator=g)) * scale


# =============================================================== building blocks
def test_absmax_int8_hand_example():
    qt = Q.quantize_tensor(torch.tensor([-2.0, 1.0]), bits=8, granularity="tensor")
    assert qt.q.tolist() == [-127, 64]  # 1 / (2/127) = 63.5 rounds half to even: 64
    assert float(qt.scale) == pytest.approx(2 / 127)
    torch.testing.assert_close(qt.dequantize(), torch.tensor([-2.0, 64 * 2 / 127]))


def test_affine_int4_hand_example():
    qt = Q.quantize_tensor(torch.tensor([-1.0, 0.0, 2.0]), bits=4, symmetric=False,
                           granularity="tensor")
    assert float(qt.scale) == pytest.approx(0.2) and int(qt.zero) == 5
    assert qt.q.tolist() == [0, 5, 15]
    assert Q.qrange(8, True) == (-127, 127) and Q.qrange(4, False) == (0, 15)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity, group", [("tensor", None), ("channel", None), ("group", 32)])
@pytest.mark.parametrize("bits", [8, 4])
def test_error_is_at_most_half_a_step(symmetric, granularity, group, bits):
    x = torch.randn(6, 128) * torch.rand(6, 1) * 3
    x[0, 5] = 40.0  # an outlier
    qt = Q.quantize_tensor(x, bits, symmetric, granularity, group)
    err = (qt.dequantize() - x).abs()
    step = qt.scale if granularity == "tensor" else (
        qt.scale[:, None] if granularity == "channel" else qt.scale.repeat_interleave(group, -1))
    assert (err <= step / 2 + 1e-6).all()
    lo, hi = Q.qrange(bits, symmetric)
    assert qt.q.min() >= lo and qt.q.max() <= hi
    assert qt.scale.shape == {"tensor": (), "channel": (6,), "group": (6, 4)}[granularity]


def test_finer_granularity_is_more_accurate():
    x = torch.randn(16, 256) * torch.logspace(-1, 1, 16)[:, None]
    errs = [Q.quantization_error(x, bits=4, symmetric=False, granularity=g, group_size=32)["rms"]
            for g in ("tensor", "channel", "group")]
    assert errs[0] > errs[1] > errs[2]


def test_fake_quantize_keeps_dtype_and_zero_rows():
    x = torch.randn(4, 64).half()
    x[1] = 0
    y = Q.fake_quantize(x, bits=8)
    assert y.dtype == torch.float16 and (y[1] == 0).all()
    assert rel(y, x) < 0.01


def test_int4_weight_round_trip():
    w = torch.randn(24, 256)
    q = Q.quantize_int4(w, 64)
    assert q.packed.shape == (128, 24) and q.packed.dtype == torch.uint8  # K-major
    assert q.scales.shape == q.zeros.shape == (4, 24) and q.shape == (24, 256)
    qt = Q.quantize_tensor(w, 4, False, "group", 64)
    assert torch.equal(q.codes().long(), qt.q.long())
    torch.testing.assert_close(q.dequantize(), qt.dequantize())
    assert torch.equal(Q.unpack_int4(Q.pack_int4(q.codes())), q.codes())
    assert q.nbytes == 24 * 128 + 24 * 4 * 5
    torch.testing.assert_close(q.codes().float(), Q.unpack_int4(Q.pack_int4(qt.q)).float())


def test_building_block_errors():
    with pytest.raises(Q.QuantizationError, match="granularity"):
        Q.quantize_tensor(torch.randn(4, 8), granularity="row")
    with pytest.raises(Q.QuantizationError, match="not a multiple of group_size"):
        Q.quantize_tensor(torch.randn(4, 100), granularity="group", group_size=32)
    with pytest.raises(Q.QuantizationError, match="bits"):
        Q.quantize_tensor(torch.randn(4, 8), bits=16)
    with pytest.raises(Q.QuantizationError, match="group_size must be one of"):
        Q.quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(Q.QuantizationError, match="in_features 96 is not a multiple"):
        Q.quantize_int4(torch.randn(4, 96), 64)
    assert issubclass(Q.QuantizationError, LlmoptError) and issubclass(Q.QuantizationError, ValueError)


# ========================================================================= layers
def _linear(K=128, N=48, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    return lin


@pytest.mark.parametrize("cls", ["int8", "int4", "w8a8", "fp8"])
def test_quant_linear_matches_dequantized_weight(cls):
    lin = _linear()
    x = torch.randn(2, 5, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp8 on a CPU: the simulated path
        layer = {"int8": lambda: Q.Int8Linear.from_linear(lin),
                 "int4": lambda: Q.Int4Linear.from_linear(lin, 64),
                 "w8a8": lambda: Q.W8A8Linear.from_linear(lin),
                 "fp8": lambda: Q.FP8Linear.from_linear(lin)}[cls]()
        y = layer(x)
    assert y.shape == (2, 5, 48) and y.dtype == x.dtype
    ref = x @ layer.dequantized_weight().t() + lin.bias
    if cls == "w8a8":  # activations are quantized too: only close to the float layer
        assert rel(y, ref) < 0.02
    elif cls == "fp8":
        assert rel(y, ref) < 0.08
    else:
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert rel(y, lin(x)) < {"int8": 0.01, "int4": 0.15, "w8a8": 0.02, "fp8": 0.08}[cls]


def test_backend_choice_is_explicit(monkeypatch):
    layer = Q.Int4Linear.from_linear(_linear(), 64)
    x = torch.randn(3, 128)
    layer.backend = "torch"
    assert not layer.uses_kernel(x)
    layer.backend = "auto"
    assert layer.uses_kernel(x) == (x.is_cuda and kernels.can_launch(x))  # CPU: the reference
    ref = layer(x)
    if kernels.mode() == "interpreter":
        layer.backend = "triton"  # the kernel under the interpreter
        assert layer.uses_kernel(x)
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(kernels, "can_launch", lambda *t: False)
    layer.backend = "triton"
    with pytest.raises(Q.QuantizationError, match="no Triton kernel can run"):
        layer(x)
    with pytest.raises(Q.QuantizationError, match="backend"):
        layer.backend = "cuda"


@pytest.mark.skipif(kernels.mode() != "interpreter", reason="needs Triton's interpreter")
def test_w8a8_and_int8_layers_forced_through_the_kernels():
    lin = _linear(K=64, N=40)
    x = torch.randn(2, 64)
    for layer in (Q.Int8Linear.from_linear(lin), Q.W8A8Linear.from_linear(lin)):
        ref = layer(x)
        layer.backend = "triton"
        torch.testing.assert_close(layer(x), ref, atol=1e-3, rtol=1e-3)


def test_fp8_simulation_and_guard():
    x = torch.randn(64, 64)
    y = Q.fake_quantize_fp8(x)
    big = x.abs() > x.abs().max() / 50  # normal e4m3 range: relative error <= 2^-4
    assert ((y - x).abs()[big] <= x.abs()[big] * 2 ** -4 + 1e-6).all()
    ok, why = Q.fp8_support("cpu")
    assert not ok and "8.9" in why
    if not torch.cuda.is_available():
        with pytest.raises(Q.QuantizationError, match="simulate=True"):
            Q.FP8Linear.from_linear(_linear(), simulate=False)
        with pytest.warns(RuntimeWarning, match="SIMULATED"):
            Q._WARNED.clear()
            layer = Q.FP8Linear.from_linear(_linear())
        assert layer.mode == "simulated"


# ================================================================= model transform
def test_quantize_int8_and_int4_models(tiny, ids):
    ref = tiny(ids)
    m8 = Q.quantize(tiny, "int8", copy=True)
    m4 = Q.quantize(tiny, "int4", copy=True, group_size=64)
    assert torch.equal(tiny(ids), ref), "copy=True must leave the original alone"
    assert isinstance(tiny.layers[0].self_attn.q_proj, nn.Linear)
    assert rel(m8(ids), ref) < 0.05
    assert rel(m4(ids), ref) < 0.5
    assert isinstance(m8.layers[1].mlp.down_proj, Q.Int8Linear)
    assert isinstance(m8.lm_head, nn.Linear) and isinstance(m8.embed_tokens, nn.Embedding)
    assert m4.quantization == dict(method="int4", include_lm_head=False, group_size=64)
    out = generate(m4, ids[:, :8], 4)
    assert out.tokens.shape == (2, 4)


def test_in_place_by_default_and_lm_head_flag(ids):
    m = Transformer.from_config(preset("tiny"), seed=3)
    ref = m(ids)
    out = Q.quantize(m, "int8", include_lm_head=True)
    assert out is m and isinstance(m.lm_head, Q.Int8Linear)
    assert rel(m(ids), ref) < 0.05
    with pytest.raises(Q.QuantizationError, match="already quantized"):
        Q.quantize(m, "int4")


def test_model_bytes():
    c = preset("tiny")
    m = Transformer.from_config(c, seed=0)
    h, i, L = c.hidden_size, c.intermediate_size, c.num_layers
    lin = L * (h * c.q_size + 2 * h * c.kv_size + c.q_size * h + 3 * h * i)  # weights per layer
    rows = L * (c.q_size + 2 * c.kv_size + h + 2 * i + h)  # output channels
    other = 4 * (2 * L * h + h)  # norms, float32
    emb = 4 * 2 * c.vocab_size * h  # embed_tokens + untied lm_head
    assert Q.model_bytes(m) == 4 * lin + other + emb
    assert Q.model_bytes(Q.quantize(m, "int8", copy=True)) == lin + 4 * rows + other + emb
    groups = lin // 128
    assert Q.model_bytes(Q.quantize(m, "int4", copy=True)) == lin // 2 + 5 * groups + other + emb
    assert Q.bytes_breakdown(Q.quantize(m, "int4", copy=True))["linear"] == lin // 2


def test_compare_quality_of_identical_models(tiny, ids):
    q = Q.compare_quality(tiny, tiny, ids, torch.tensor([48, 30]))
    assert q["ppl"] == pytest.approx(q["ppl_ref"]) and q["kl"] == pytest.approx(0, abs=1e-6)
    assert q["top1"] == 1.0 and q["tokens"] == 47 + 29


def test_compare_quality_per_window_sums_to_the_totals(tiny, ids):
    q = Q.quantize(tiny, "int4", copy=True)
    res = Q.compare_quality(tiny, q, ids, torch.tensor([48, 30]), per_window=True)
    w = res["windows"]
    assert w["tokens"] == [47, 29]
    n = sum(w["tokens"])
    assert math.exp(sum(w["nll"]) / n) == pytest.approx(res["ppl"], rel=1e-9)
    assert math.exp(sum(w["nll_ref"]) / n) == pytest.approx(res["ppl_ref"], rel=1e-9)
    assert sum(w["kl"]) / n == pytest.approx(res["kl"], rel=1e-9) and res["kl"] > 0
    assert "windows" not in Q.compare_quality(tiny, q, ids)


def test_quality_verdict():
    from llmopt_lab.benchmarks.quantization import verdict

    assert verdict(0.7, (0.55, 0.9), 0.5) == "met"
    assert verdict(0.3, (0.1, 0.45), 0.5) == "missed"
    assert verdict(0.4, (0.2, 0.6), 0.5) == "unclear (point estimate missed)"
    assert verdict(0.6, (0.2, 0.8), 0.5) == "unclear (point estimate met)"
    assert verdict(float("nan"), (float("nan"), float("nan")), 0.5) == "undefined"


def test_recovery_is_undefined_when_rtn_lost_nothing():
    from llmopt_lab.benchmarks.quantization import _recovery

    win = lambda nll: dict(nll_ref=[10.0, 12.0], nll=nll, kl=[0.1, 0.1], tokens=[5, 5])
    rows = [dict(method="int4", options=dict(group_size=128), ppl=2.0, ppl_ref=2.0, kl=0.02,
                 windows=win([10.0, 12.0])),
            dict(method="awq", options=dict(group_size=128), ppl=1.9, ppl_ref=2.0, kl=0.01,
                 windows=win([9.5, 12.0]))]
    _recovery(rows)
    assert math.isnan(rows[1]["recovered"]) and all(math.isnan(v) for v in rows[1]["recovered_ci90"])
    assert rows[1]["recovered_kl"] == pytest.approx(0.5) and "windows" not in rows[0]
    assert rows[0]["ppl_delta_pct_ci90"] == [0.0, 0.0]


def test_quantize_errors(tiny, calib):
    with pytest.raises(Q.QuantizationError, match="unknown quantization method"):
        Q.quantize(tiny, "int3", copy=True)
    with pytest.raises(Q.QuantizationError, match="unknown option"):
        Q.quantize(tiny, "int4", copy=True, alpha=0.5)
    with pytest.raises(Q.QuantizationError, match="group_size must be one of"):
        Q.quantize(tiny, "int4", copy=True, group_size=100)
    with pytest.raises(Q.QuantizationError, match="in_features 128 is not a multiple of group_size 256"):
        Q.quantize(tiny, "int4", copy=True, group_size=256)
    with pytest.raises(Q.QuantizationError, match="needs calibration"):
        Q.quantize(tiny, "gptq", copy=True)
    with pytest.raises(Q.QuantizationError, match="vocabulary"):
        Q.quantize(tiny, "awq", copy=True, calibration=[torch.full((1, 8), 9999)])
    with pytest.raises(Q.QuantizationError, match="backend"):
        Q.quantize(tiny, "int8", copy=True, backend="fast")
    with pytest.raises(Q.QuantizationError, match="objective"):
        Q.quantize(tiny, "awq", copy=True, calibration=calib, objective="model")


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant", "w8a8", "fp8"])
def test_calibrated_and_activation_methods_on_a_model(tiny, ids, calib, method):
    ref = tiny(ids)
    kw = dict(calibration=calib) if method in Q.CALIBRATED_METHODS else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = Q.quantize(tiny, method, copy=True, group_size=64, **kw) if method in ("gptq", "awq") \
            else Q.quantize(tiny, method, copy=True, **kw)
        out = m(ids)
        generate(m, ids[:1, :6], 3)
    assert torch.equal(tiny(ids), ref)
    assert rel(out, ref) < (0.5 if method in ("gptq", "awq") else 0.15)
    layer = m.layers[0].self_attn.o_proj
    assert isinstance(layer, {"gptq": Q.Int4Linear, "awq": Q.Int4Linear, "smoothquant": Q.W8A8Linear,
                              "w8a8": Q.W8A8Linear, "fp8": Q.FP8Linear}[method])
    if method == "awq":  # the other objective runs too
        m2 = Q.quantize(tiny, method, copy=True, group_size=64, calibration=calib, objective="module")
        assert rel(m2(ids), ref) < 0.5 and set(m2.quantization["alphas"]) == set(m.quantization["alphas"])
    if method in ("awq", "smoothquant"):  # grouped-query attention: o_proj keeps its 1/s
        assert layer.input_scale is not None
        assert m.layers[0].mlp.down_proj.input_scale is None  # folded into up_proj


# ==================================================================== calibration
def test_collect_input_stats_matches_direct_computation(tiny, calib):
    q = tiny.layers[1].self_attn.q_proj
    seen = []
    h = q.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 128).clone()))
    stats = collect_input_stats(tiny, calib, {"q": q}, stop_after=tiny.layers[1])
    h.remove()
    x = torch.cat(seen)
    assert stats["q"].count == x.shape[0] == 8 * 48
    torch.testing.assert_close(stats["q"].hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats["q"].abs_mean, x.abs().mean(0))
    torch.testing.assert_close(stats["q"].absmax, x.abs().amax(0))


def test_calibration_batches_are_reproducible():
    s = torch.arange(1000)
    a, b = calibration_batches(s, 5, 16, 2, seed=4), calibration_batches(s, 5, 16, 2, seed=4)
    assert [t.shape for t in a] == [(2, 16), (2, 16), (1, 16)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(t[:, 1:] - t[:, :-1], torch.ones_like(t[:, 1:])) for t in a)  # windows


# ============================================================================ GPTQ
def test_gptq_column_update_by_hand():
    W = torch.tensor([[0.26, 0.5, -0.1], [1.0, -0.3, 0.2]])
    U = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.25], [0.0, 0.0, 1.0]])
    scale, zero = torch.tensor([0.1, 0.2]), torch.tensor([8.0, 8.0])
    Wn, codes, err = gptq_column_update(W, U, 0, scale, zero)
    assert codes.tolist() == [11.0, 13.0]  # round(2.6)+8, round(5)+8
    dq = torch.tensor([0.3, 1.0])
    e = (W[:, 0] - dq) / 2.0
    torch.testing.assert_close(err, e)
    torch.testing.assert_close(Wn[:, 0], dq)
    torch.testing.assert_close(Wn[:, 1:], W[:, 1:] - e[:, None] * U[0, 1:][None, :])
    assert not torch.equal(Wn, W)  # not in place by default


def layer_problem(seed: int, K: int = 256, N: int = 64):
    """A linear layer's weights (N, K) with calibration inputs x, their second
    moment H = 2 x^T x / n, and fresh test inputs x_test of the same structure."""
    torch.manual_seed(seed)
    x, x_test = correlated_inputs(2048, K, 2 * seed), correlated_inputs(1024, K, 2 * seed + 1)
    W = torch.randn(N, K) * 0.05
    return x, x_test, W, 2 * x.t() @ x / x.shape[0]


def test_gptq_beats_rtn_on_correlated_inputs():
    K = 256
    x, x_test, W, H = layer_problem(0, K)
    rtn = Q.quantize_int4(W, 64).dequantize()
    res = gptq_quantize_layer(W, H, 64)
    e_rtn, e_gptq = Q.layer_output_error(W, rtn, x_test), Q.layer_output_error(W, res.dequantized, x_test)
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)
    ordered = gptq_quantize_layer(W, H, 64, act_order=True)
    assert Q.layer_output_error(W, ordered.dequantized, x_test) < 0.6 * e_rtn
    # lazy batch updates change nothing but float rounding
    one_block = gptq_quantize_layer(W, H, 64, block_size=K)
    torch.testing.assert_close(one_block.dequantized, res.dequantized, atol=1e-5, rtol=1e-4)
    # the format is the packed int4 one: codes + per-group scales/zeros reproduce it
    torch.testing.assert_close(res.weight.dequantize(), res.dequantized)


def test_gptq_handles_dead_inputs():
    H = torch.eye(64)
    H[3, 3] = 0  # an input that was always zero
    U, dead = gptq_prepare(H)
    assert dead.tolist().count(True) == 1 and torch.isfinite(U).all()


# ============================================================================= AWQ
def test_awq_is_not_worse_than_rtn():
    K = 256
    x, x_test, W, H = layer_problem(1, K)
    search = awq_search_scale([W], x.abs().mean(0), H, 64)
    assert search.errors[0][:2] == (0.0, False) and search.error <= search.rtn_error  # RTN
    assert search.rtn_error == pytest.approx(awq_scale_error([W], torch.ones(K), H, 64), rel=1e-5)
    res = awq_quantize_layer(W, x.abs().mean(0), H, 64)
    e_rtn = Q.layer_output_error(W, Q.quantize_int4(W, 64).dequantize(), x_test)
    e_awq = Q.layer_output_error(W, res.effective_weight(), x_test)
    assert e_awq <= e_rtn, (e_awq, e_rtn)
    assert res.error < res.rtn_error


# ===================================================================== SmoothQuant
def test_smoothquant_tames_planted_outliers():
    torch.manual_seed(2)
    x = torch.randn(256, 128)
    W = torch.randn(64, 128) * 0.05
    xo, Wo = plant_layer_outliers(x, W, [3, 77], factor=60.0)
    torch.testing.assert_close(xo @ Wo.t(), x @ W.t(), atol=1e-4, rtol=1e-4)  # float: unchanged
    rep = channel_outliers(xo, top=2)
    assert sorted(rep.channels) == [3, 77] and rep.ratio > 30
    naive, smooth = w8a8_output_error(xo, Wo), w8a8_output_error(xo, Wo, alpha=0.5)
    assert smooth["rel_error"] < 0.5 * naive["rel_error"], (smooth, naive)
    assert smooth["max_channel_ratio"] < rep.ratio
    s = smoothing_factors(torch.tensor([4.0, 0.0]), torch.tensor([1.0, 1.0]), 0.5)
    assert s.tolist() == [2.0, 1.0]


def test_smoothquant_on_a_model_with_planted_outliers(ids, calib):
    m = Transformer.from_config(preset("tiny"), seed=5)
    ref = m(ids)
    channels = plant_outliers(m, num_channels=3, factor=50.0)
    assert rel(m(ids), ref) < 1e-4  # the float model is unchanged
    found = activation_outliers(m, calib[:1], top=3)
    assert sorted(found["layers.0.attn_in"].channels) == channels
    naive = Q.quantize(m, "w8a8", copy=True)
    smooth = Q.quantize(m, "smoothquant", copy=True, calibration=calib)
    assert rel(smooth(ids), ref) < 0.5 * rel(naive(ids), ref)


# ======================================================================= benchmark
def test_benchmark_quick_runs_on_cpu():
    import matplotlib

    matplotlib.use("Agg")
    from llmopt_lab.benchmarks import find, quantization

    assert find("03").module == "llmopt_lab.benchmarks.quantization"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = quantization.run("quick", "cpu", progress=False)
    labels = [r["label"] for r in res["quality"]["rows"]]
    assert labels[0] == "float32" and "int4 GPTQ g128" in labels and "W8A8 SmoothQuant" in labels
    assert res["kernels"] == [] and "GPU" in res["kernels_note"]
    formats = [r["format"] for r in res["models"][0]["rows"]]
    assert formats == ["float32", "int8", "int4", "w8a8"]
    for r in res["quality"]["rows"][1:]:
        lo, hi = r["ppl_delta_pct_ci90"]
        assert lo <= r["ppl_delta_pct"] <= hi and "windows" not in r
    gptq = next(r for r in res["quality"]["rows"] if r["label"] == "int4 GPTQ g128")
    assert len(gptq["recovered_ci90"]) == 2
    checks = res["quality"]["checks"]
    assert checks["int4 AWQ g128 recovers >= 50% of RTN's ppl increase, 90% interval"].startswith(
        ("met", "missed", "unclear", "undefined"))  # random tokens: RTN may lose nothing
    text = quantization.summary_text(res)
    assert "bootstrap" in text and "int8 ppl within 1% of float32: " in text
    rows = quantization.summary_rows(res)
    assert rows and all(set(r) == set(rows[0]) for r in rows)
    quantization.plot(res, {"device": "cpu"})


# ============================================================================= GPU
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["int8", "int4", "w8a8", "fp8"])
def test_quantized_model_runs_the_kernels_on_gpu(method):
    m = Transformer.from_config(preset("tiny"), device="cuda", dtype=torch.bfloat16, seed=0)
    ids = torch.randint(0, 512, (2, 32), device="cuda")
    q = Q.quantize(m, method, copy=True)
    layer = q.layers[0].mlp.up_proj
    if method != "fp8":
        assert layer.uses_kernel(ids.new_zeros(1, 128, dtype=torch.bfloat16))
    out = q(ids)
    Q.set_backend(q, "torch")
    torch.testing.assert_close(out.float(), q(ids).float(), atol=3e-2, rtol=3e-2)
    generate(q, ids[:, :8], 4)

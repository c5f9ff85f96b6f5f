"""Low-rank factorisation and LoRA (llmopt_lab.transforms.lowrank): the SVD
error equals the discarded spectrum, activation-aware SVD trades weight error
for output error, lowrank() on a model, LoRA adapters that train and merge
exactly, bad requests refused."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from llmopt_lab import Transformer, generate, preset  # noqa: E402
from llmopt_lab._checkpoint import check_saveable  # noqa: E402
from llmopt_lab.errors import ModelLoadError, TransformError  # noqa: E402
from llmopt_lab.transforms.lowrank import (LoRALinear, LowRankLinear, add_lora,  # noqa: E402
                                           lora_parameters, lowrank, merge_lora, param_count,
                                           rank_for_energy, rank_for_params, singular_values,
                                           svd_factors, whitening_factor)


def _tiny(seed=0):
    return Transformer.from_config(preset("tiny"), seed=seed).eval()


def _ids(B=2, T=12, seed=0):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def _layer(N=48, K=64, seed=0, loud=(3, 17, 40)):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    X = torch.randn(1024, K, generator=g)
    X[:, list(loud)] *= 30.0  # a few outlier input channels
    return W, X


# ------------------------------------------------------------------ SVD
@pytest.mark.parametrize("shape", [(48, 64), (64, 48)])
@pytest.mark.parametrize("r", [1, 7, 30])
def test_svd_error_is_the_discarded_spectrum(shape, r):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(r))
    up, down = svd_factors(W, r)
    assert up.shape == (shape[0], r) and down.shape == (r, shape[1])
    S = singular_values(W)
    assert S.shape == (min(shape),) and S.dtype == torch.float32
    assert bool((S[:-1] >= S[1:]).all())
    err = float((W - up @ down).norm())
    assert err == pytest.approx(float(S[r:].pow(2).sum().sqrt()), rel=1e-4)
    # both factors carry sqrt(S): the same column/row norms
    assert torch.allclose(up.norm(dim=0), down.norm(dim=1), rtol=1e-4)


def test_full_rank_reproduces_the_weight():
    W = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    up, down = svd_factors(W, 24)
    assert torch.allclose(up @ down, W, atol=1e-4)
    lin = nn.Linear(24, 40)
    low = LowRankLinear.from_linear(lin, 24)
    x = torch.randn(5, 24)
    assert torch.allclose(low(x), lin(x), atol=1e-5)
    assert torch.allclose(low.weight(), lin.weight, atol=1e-5)
    assert torch.equal(low.up.bias, lin.bias) and low.down.bias is None
    assert (low.in_features, low.out_features, low.rank) == (24, 40, 24)


def test_from_linear_keeps_dtype_and_bias():
    lin = nn.Linear(32, 16, bias=False).to(torch.bfloat16)
    low = LowRankLinear.from_linear(lin, 4)
    assert low.down.weight.dtype == torch.bfloat16 and low.up.bias is None
    assert low(torch.randn(3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_svd_bad_rank():
    W = torch.randn(8, 6)
    for r in (0, 7, 2.5):
        with pytest.raises(TransformError, match="rank must be"):
            svd_factors(W, r)
    with pytest.raises(TransformError, match="2-D float"):
        svd_factors(torch.randn(3, 4, 5), 1)
    with pytest.raises(TransformError, match="nn.Linear"):
        LowRankLinear.from_linear(nn.Conv1d(2, 2, 1), 1)


# ------------------------------------------------------------------ rank rules
def test_rank_for_energy_by_hand():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(S, 9 / 14) == 1
    assert rank_for_energy(S, 0.5) == 1
    assert rank_for_energy(S, 0.65) == 2
    assert rank_for_energy(S, 13 / 14) == 2
    assert rank_for_energy(S, 0.95) == 3
    assert rank_for_energy(S, 1.0) == 3  # the zero tail is never needed
    assert rank_for_energy(torch.zeros(5), 0.9) == 1
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(TransformError, match="energy"):
            rank_for_energy(S, bad)
    with pytest.raises(TransformError, match="1-D"):
        rank_for_energy(torch.ones(2, 2), 0.5)


def test_rank_for_params_by_hand():
    assert rank_for_params(128, 128, 0.5) == 32        # 32 * 256 = 8192 = half of 16384
    assert rank_for_params(384, 128, 0.5) == 48        # 48 * 512 = 24576 = half of 49152
    assert rank_for_params(64, 128, 0.5) == 21         # 21 * 192 = 4032 <= 4096 < 22 * 192
    assert rank_for_params(128, 128, 1.0) == 64        # break-even: r = out*in/(out+in)
    assert rank_for_params(10, 10, 0.01) == 1          # at least 1
    for bad in (0, 1.2, -0.5, None):
        with pytest.raises(TransformError, match="param_fraction"):
            rank_for_params(8, 8, bad)
    with pytest.raises(TransformError, match="positive integers"):
        rank_for_params(0, 8, 0.5)


# ------------------------------------------------------------------ activation aware
def test_activation_aware_trades_weight_error_for_output_error():
    W, X = _layer()
    lin = nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    r = 12
    plain = LowRankLinear.from_linear(lin, r)
    aware = LowRankLinear.from_linear(lin, r, input_gram=X.t() @ X)

    def out_err(m):
        return float((X @ (W - m.weight()).t()).norm())

    def w_err(m):
        return float((W - m.weight()).norm())

    assert out_err(aware) < 0.7 * out_err(plain)
    assert w_err(plain) < w_err(aware)
    # plain SVD's weight error is the optimum (Eckart–Young)
    S = singular_values(W)
    assert w_err(plain) == pytest.approx(float(S[r:].pow(2).sum().sqrt()), rel=1e-4)


def test_whitening_factor():
    _, X = _layer()
    G = X.t() @ X
    L = whitening_factor(G, damp=0.0)
    assert torch.allclose(L @ L.t(), G, rtol=1e-4, atol=1e-4 * float(G.diag().mean()))
    assert torch.equal(whitening_factor(torch.zeros(4, 4)), torch.eye(4))
    L = whitening_factor(torch.diag(torch.tensor([1.0, 0.0, 0.0, 0.0])))  # dead channels: damped
    assert torch.isfinite(L).all() and float(L.diag().min()) > 0
    with pytest.raises(TransformError, match="square"):
        whitening_factor(torch.ones(3, 4))
    with pytest.raises(TransformError, match="input_gram of shape"):
        LowRankLinear.from_linear(nn.Linear(8, 4), 2, input_gram=torch.eye(5))


# ------------------------------------------------------------------ lowrank()
def test_lowrank_half_params_runs_and_reports():
    model = _tiny()
    before = param_count(model)
    report = lowrank(model, param_fraction=0.5)
    assert len(report["layers"]) == 4 * 7 and report["skipped"] == []
    assert report["params_after"] / report["params_before"] == pytest.approx(0.5, abs=0.01)
    assert report["model_params_before"] == before
    assert report["model_params_after"] == param_count(model) == \
        before - report["params_before"] + report["params_after"]
    for name, e in report["layers"].items():
        assert 0 < e["rel_error"] < 1 and e["params_after"] <= e["params_before"] / 2
        assert isinstance(model.get_submodule(name), LowRankLinear)
        assert model.get_submodule(name).rank == e["rank"]
    assert report["layers"]["layers.0.self_attn.q_proj"]["rank"] == 32
    assert report["layers"]["layers.0.mlp.gate_proj"]["rank"] == 48
    assert isinstance(model.lm_head, nn.Linear)
    out = generate(model, [[1, 2, 3]], 5)
    assert out.tokens.shape == (1, 5)


def test_lowrank_full_rank_equals_dense():
    model = _tiny()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    report = lowrank(model, rank=10 ** 6, skip_if_no_savings=False)
    assert report["layers"]["layers.0.mlp.down_proj"]["rank"] == 128
    assert report["params_after"] > report["params_before"]  # full rank costs more
    with torch.no_grad():
        assert torch.allclose(model(ids), ref, atol=1e-4)


def test_lowrank_skips_layers_without_savings_and_copy():
    model = _tiny()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    report = lowrank(model, rank=70, copy=True)
    # 70 * (128 + 128) >= 128 * 128 for q/o, 70 * (64 + 128) >= 64 * 128 for k/v: no savings;
    # 70 * (384 + 128) < 384 * 128 for the MLP
    attn = {f"layers.{i}.self_attn.{p}_proj" for i in range(4) for p in "qkvo"}
    assert set(report["skipped"]) == attn
    assert len(report["layers"]) == 4 * 3
    assert isinstance(report["model"].layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(report["model"].layers[0].mlp.up_proj, LowRankLinear)
    assert type(model.layers[0].mlp.up_proj) is nn.Linear  # the original untouched
    with torch.no_grad():
        assert torch.equal(model(ids), ref)


def test_lowrank_energy_and_include():
    model = _tiny()
    report = lowrank(model, energy=0.9, include=r"mlp")
    assert set(report["layers"]) | set(report["skipped"]) == {
        f"layers.{i}.mlp.{p}" for i in range(4) for p in ("gate_proj", "up_proj", "down_proj")}
    for e in report["layers"].values():
        assert e["rel_error"] <= (1 - 0.9) ** 0.5 + 1e-4  # energy kept = 1 - rel_error^2
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
    # attention next, the MLP is already factorised
    report2 = lowrank(model, rank=8, include=[r"k_proj", r"v_proj"])
    assert len(report2["layers"]) == 8
    with pytest.raises(TransformError, match="not plain nn.Linear"):
        lowrank(model, rank=8, include=r"mlp")


def test_lowrank_asvd_with_calibration():
    torch.manual_seed(0)
    calib = [_ids(2, 16, seed=s) for s in (1, 2)]
    dense = _tiny()
    ids = _ids(seed=5)
    r_svd = lowrank(dense, param_fraction=0.5, copy=True)
    r_asvd = lowrank(dense, param_fraction=0.5, method="asvd", calibration=calib, copy=True)
    assert r_asvd["params_after"] == r_svd["params_after"]
    for name, e in r_asvd["layers"].items():
        assert 0 <= e["rel_output_error"] < 1
        assert e["rel_error"] >= r_svd["layers"][name]["rel_error"] - 1e-5  # SVD: least weight error
    m = r_asvd["model"]
    with torch.no_grad():
        assert torch.isfinite(m(ids)).all()
    assert isinstance(m.layers[3].mlp.down_proj, LowRankLinear)


def test_lowrank_bad_arguments():
    model = _tiny()
    with pytest.raises(TransformError, match="exactly one"):
        lowrank(model)
    with pytest.raises(TransformError, match="exactly one"):
        lowrank(model, rank=4, energy=0.9)
    with pytest.raises(TransformError, match="unknown low-rank method"):
        lowrank(model, rank=4, method="pca")
    with pytest.raises(TransformError, match="calibration"):
        lowrank(model, rank=4, method="asvd")
    with pytest.raises(TransformError, match="rank must be"):
        lowrank(model, rank=0)
    with pytest.raises(TransformError, match="energy"):
        lowrank(model, energy=1.5)
    with pytest.raises(TransformError, match="param_fraction"):
        lowrank(model, param_fraction=0)
    with pytest.raises(TransformError, match="matches no decoder layer"):
        lowrank(model, rank=4, include=r"lm_head")
    with pytest.raises(TransformError, match="include"):
        lowrank(model, rank=4, include=3)
    with pytest.raises(TransformError, match="decoder blocks"):
        lowrank(nn.Linear(4, 4), rank=2)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


# ------------------------------------------------------------------ LoRA
def test_lora_starts_equal_trains_and_merges_exactly():
    model = _tiny()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    names = add_lora(model, r=4, alpha=8)
    assert len(names) == 4 * 7 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    with torch.no_grad():
        assert torch.equal(model(ids), ref)  # B = 0: exactly the base model
    params = lora_parameters(model)
    assert len(params) == 2 * len(names)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    assert not model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad

    model.train()
    for _ in range(3):  # plain SGD steps on the adapters
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.5 * g
    model.eval()
    with torch.no_grad():
        tuned = model(ids)
    assert not torch.allclose(tuned, ref, atol=1e-4)

    assert merge_lora(model) == len(names)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(model(ids), tuned, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())
    assert merge_lora(model) == 0


def test_lora_targets_and_lowrank_factors():
    model = _tiny()
    lowrank(model, param_fraction=0.5, include=r"mlp")
    names = add_lora(model, r=2, targets=r"mlp")
    assert "layers.0.mlp.up_proj.down" in names and "layers.0.mlp.up_proj.up" in names
    assert len(names) == 4 * 3 * 2
    low = model.layers[0].mlp.up_proj
    assert isinstance(low.down, LoRALinear)
    with torch.no_grad():
        low.down.lora_b.normal_()
    w = low.weight()  # sees the adapter
    with pytest.raises(ModelLoadError, match="low-rank model"):
        check_saveable(model)
    with pytest.raises(TransformError, match="already has LoRA"):
        add_lora(model)
    assert merge_lora(model) == len(names)
    assert isinstance(low.down, nn.Linear) and torch.allclose(low.weight(), w, atol=1e-5)
    with pytest.raises(TransformError, match="matches no nn.Linear"):
        add_lora(model, targets=r"nothing_here")
    with pytest.raises(TransformError, match="LoRA rank"):
        add_lora(model, r=0)
    assert all(p.requires_grad for p in model.parameters())  # failed calls froze nothing


def test_lora_model_refused_by_save():
    model = _tiny()
    add_lora(model, r=2, targets=r"q_proj")
    with pytest.raises(ModelLoadError, match="merge_lora"):
        check_saveable(model)
    merge_lora(model)
    check_saveable(model)

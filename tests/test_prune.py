"""Pruning (llmopt_lab.transforms.prune): masks at the asked sparsity or N:M
pattern, Wanda and SparseGPT against magnitude, the model still generating,
bad requests refused."""

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from llmopt_lab import generate, load_model  # noqa: E402
from llmopt_lab.errors import PruningError  # noqa: E402
from llmopt_lab.transforms.prune import (is_n_m_sparse, mask_by_score, parse_pattern, prune,  # noqa: E402
                                         sparsegpt_prune_layer, sparsity_of, wanda_scores)


@pytest.fixture(scope="module")
def tiny():
    return load_model("llmopt-tiny", device="cpu")


@pytest.fixture(scope="module")
def calibration(tiny):
    from llmopt_lab.transforms.quantize.calibration import training_calibration_set

    return training_calibration_set(tiny[1], num_sequences=8, seq_len=64)


def _layer(N=48, K=64, seed=0, outlier=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)  # correlated input channels
    X = torch.randn(512, K, generator=g) @ mix
    if outlier is not None:
        X[:, outlier] *= 30.0
    return W, X


def _error(W, W2, X):
    return float(((X @ (W - W2).t()) ** 2).sum())


def test_mask_removes_exactly_the_asked_fraction_even_with_ties():
    scores = torch.ones(6, 10)  # all tied: the count must still be exact
    keep = mask_by_score(scores, 0.3)
    assert int((~keep).sum()) == 18
    keep = mask_by_score(torch.arange(40.).reshape(4, 10), 0.5, per_row=True)
    assert (keep.sum(1) == 5).all() and keep[:, 5:].all()  # the larger half of every row kept
    assert mask_by_score(torch.rand(3, 8), 0.0).all()


def test_n_m_mask_keeps_the_largest_of_each_group():
    s = torch.tensor([[4., 1., 3., 2., 0., 9., 8., 7.]])
    keep = mask_by_score(s, pattern="2:4")
    assert keep.tolist() == [[True, False, True, False, False, True, True, False]]
    w = torch.randn(16, 32) * mask_by_score(torch.rand(16, 32), pattern="2:4")
    assert is_n_m_sparse(w, 2, 4) and not is_n_m_sparse(torch.ones(2, 8), 2, 4)
    assert parse_pattern("1:4") == (1, 4) and parse_pattern(None) is None


def test_wanda_scores_weigh_weights_by_their_input_norm():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    s = wanda_scores(W, torch.tensor([4.0, 1.0]))  # input norms 2 and 1
    assert torch.allclose(s, torch.tensor([[2.0, 2.0], [6.0, 0.5]]))


def test_sparsegpt_at_zero_sparsity_changes_nothing():
    W, X = _layer()
    W2, keep = sparsegpt_prune_layer(W, 2 * X.t() @ X / len(X), 0.0)
    assert keep.all() and torch.allclose(W2, W, atol=1e-4)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_calibrated_rules_reconstruct_the_layer_output_better(pattern):
    W, X = _layer(outlier=5)
    H = 2 * X.t() @ X / len(X)
    mag = W * mask_by_score(W.abs(), 0.5, pattern, per_row=True)
    wanda = W * mask_by_score(wanda_scores(W, (X ** 2).sum(0)), 0.5, pattern, per_row=True)
    sgpt, keep = sparsegpt_prune_layer(W, H, 0.5, pattern, block_size=32)
    assert (sgpt[~keep] == 0).all()
    if pattern:
        assert is_n_m_sparse(sgpt) and is_n_m_sparse(wanda)
    else:
        assert abs(float((~keep).float().mean()) - 0.5) < 1e-6
    e_mag, e_wanda, e_sgpt = _error(W, mag, X), _error(W, wanda, X), _error(W, sgpt, X)
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)
    # Wanda keeps the weights that read the loud channel; magnitude does not care
    assert wanda[:, 5].ne(0).sum() > mag[:, 5].ne(0).sum()


def test_magnitude_per_layer_and_global(tiny):
    model = copy.deepcopy(tiny[0])
    rep = prune(model, "magnitude", 0.5)
    assert all(abs(v - 0.5) < 1e-3 for v in sparsity_of(model).values())
    assert abs(rep.achieved - 0.5) < 1e-3 and rep.total == sum(t for _, t in rep.layers.values())
    model = copy.deepcopy(tiny[0])
    rep = prune(model, "magnitude", 0.5, scope="global")
    per = sparsity_of(model)
    assert abs(rep.achieved - 0.5) < 1e-3 and max(per.values()) - min(per.values()) > 0.05
    assert model.embed_tokens.weight.ne(0).all()  # embeddings stay dense


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_rule_gives_a_2_4_model_that_still_generates(tiny, calibration, method):
    model = copy.deepcopy(tiny[0])
    rep = prune(model, method, pattern="2:4", calibration=calibration)
    assert abs(rep.achieved - 0.5) < 1e-6
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("layers."):
            assert is_n_m_sparse(m.weight, 2, 4), name
    out = generate(model, torch.tensor([[5, 17, 42]]), max_new_tokens=4)
    assert out.tokens.shape == (1, 4)


def test_sparsegpt_beats_magnitude_on_the_model(tiny, calibration):
    from llmopt_lab import data
    from llmopt_lab.transforms.quantize.quality import compare_quality

    ev = data.heldout_set(tiny[1], quick=True)
    ids, lens = ev.ids[:8], ev.lengths[:8]
    kl = {}
    for method in ("magnitude", "sparsegpt"):
        model = copy.deepcopy(tiny[0])
        prune(model, method, pattern="2:4", calibration=calibration)
        kl[method] = compare_quality(tiny[0], model, ids, lens)["kl"]
    assert kl["sparsegpt"] < 0.6 * kl["magnitude"], kl


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="magnitude", sparsity=1.0), "in \\[0, 1\\)"),
    (dict(method="magnitude", sparsity=-0.1), "in \\[0, 1\\)"),
    (dict(method="magnitude", sparsity="half"), "in \\[0, 1\\)"),
    (dict(method="random"), "unknown pruning method 'random'"),
    (dict(method="magnitude", pattern="4:2"), "0 < N < M"),
    (dict(method="magnitude", pattern="2-4"), "'N:M'"),
    (dict(method="magnitude", pattern="2:5"), "not a multiple of 5"),
    (dict(method="magnitude", scope="row"), "scope must be"),
    (dict(method="wanda", scope="global"), "unstructured magnitude"),
    (dict(method="wanda"), "needs calibration data"),
    (dict(method="sparsegpt", calibration=[]), "calibration list is empty"),
])
def test_bad_requests_are_refused(tiny, kwargs, match):
    model = copy.deepcopy(tiny[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=match):
        prune(model, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_a_quantized_model_is_refused(tiny):
    from llmopt_lab.transforms.quantize import quantize

    model = quantize(copy.deepcopy(tiny[0]), "int8")
    with pytest.raises(PruningError, match="prune before quantizing"):
        prune(model, "magnitude", 0.5)


def test_bad_hessian_shape():
    with pytest.raises(PruningError, match="Hessian of shape"):
        sparsegpt_prune_layer(torch.randn(4, 8), torch.eye(6))


def test_bench_04_quick():
    from llmopt_lab.benchmarks import pruning

    r = pruning.run("quick", device="cpu", progress=False)
    labels = [row["label"] for row in r["quality"]]
    assert labels == ["magnitude 50%", "wanda 50%", "sparsegpt 50%", "magnitude 2:4", "wanda 2:4",
                      "sparsegpt 2:4"]
    assert all(abs(row["achieved"] - 0.5) < 1e-6 for row in r["quality"])
    assert all(row["ppl_delta_pct_ci90"][0] <= row["ppl_delta_pct"] <= row["ppl_delta_pct_ci90"][1]
               for row in r["quality"])
    s = r["structured"]["plain"]
    assert s["params_after"] < s["params_before"] and s["mlp_after"][0] == 384
    assert s["recovery"]["steps"] >= 1
    assert r["structured"]["decode"][0]["flop_ratio"] > 1.3
    names = [t["name"] for t in r["targets"]]
    assert "sparsegpt below magnitude, 2:4" in names and any(n.startswith("50% MLP") for n in names)
    assert "windows" not in r["quality"][0]  # per-window sums are not stored
    assert pruning.summary_rows(r) and "targets:" in pruning.summary_text(r)
    assert len(pruning.plot(r, {"device": "test"}).axes) == 2


def test_sparse_cost_counts_exactly(tiny):
    from llmopt_lab.transforms.prune import sparse_cost

    model = copy.deepcopy(tiny[0])
    dense = sparse_cost(model)
    assert dense["nonzeros"] == dense["weights"] and dense["two_four_bytes"] is None
    prune(model, "magnitude", pattern="2:4")
    c = sparse_cost(model)
    assert c["weights"] == dense["weights"] and c["nonzeros"] == c["weights"] // 2
    assert c["two_four_bytes"] == 0.5625 * c["dense_bytes"]
    assert c["sparse_flops_per_token"] * 2 == c["dense_flops_per_token"]

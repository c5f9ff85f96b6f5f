"""Structured pruning (llmopt_lab.transforms.structured): channels and heads
really removed, the config and checkpoints following, network slimming's
gates, the recovery fine-tune, bad requests refused."""

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from llmopt_lab import Engine, ModelConfig, SamplingParams, generate, load_model  # noqa: E402
from llmopt_lab.errors import ConfigError, PruningError  # noqa: E402
from llmopt_lab.measure import step_cost  # noqa: E402
from llmopt_lab.transforms.structured import (channel_scores, gate_channels, prune_structured,  # noqa: E402
                                              recover, remove_gated, sensitivity_scan)


@pytest.fixture(scope="module")
def tiny():
    return load_model("llmopt-tiny", device="cpu")


@pytest.fixture(scope="module")
def calibration(tiny):
    from llmopt_lab.transforms.quantize.calibration import training_calibration_set

    return training_calibration_set(tiny[1], num_sequences=4, seq_len=64)


IDS = torch.tensor([[5, 17, 42, 99, 7, 13, 250, 31]])


def test_mlp_channels_are_removed_for_real(tiny, calibration, tmp_path):
    from llmopt_lab.weights import save_model

    model = copy.deepcopy(tiny[0])
    c = model.config
    rep = prune_structured(model, mlp_fraction=0.5, calibration=calibration)
    assert rep.mlp_before == [c.intermediate_size] * c.num_layers
    assert rep.mlp_after == [c.intermediate_size // 2] * c.num_layers
    removed = c.num_layers * 3 * c.hidden_size * (c.intermediate_size // 2)
    assert rep.params_before - rep.params_after == removed
    assert model.config.layer_intermediate_sizes == tuple(rep.mlp_after)
    assert model.config.num_parameters() == rep.params_after
    assert all(layer.mlp.down_proj.weight.shape == (c.hidden_size, c.intermediate_size // 2)
               for layer in model.layers)
    assert step_cost(model.config, 1, 1, 64).flops < step_cost(c, 1, 1, 64).flops
    save_model(model, tmp_path / "pruned", tokenizer=tiny[1])
    again, _ = load_model(str(tmp_path / "pruned"), device="cpu")
    assert again.config.layer_intermediate_sizes == model.config.layer_intermediate_sizes
    assert torch.equal(again(IDS), model(IDS))


def test_heads_are_removed_per_kv_group(tiny, calibration):
    model = copy.deepcopy(tiny[0])
    c = model.config
    scores = channel_scores(model, calibration)
    rep = prune_structured(model, mlp_fraction=0.0, head_fraction=0.5, scores=scores)
    assert rep.heads_after == [c.num_heads // 2] * c.num_layers
    att = model.layers[0].self_attn
    assert att.q_proj.out_features == att.num_heads * att.head_dim == att.o_proj.in_features
    # the head kept in each KV group is that group's most important one
    group = c.num_heads // c.num_kv_heads
    best = [int(scores[0]["heads"][g * group:(g + 1) * group].argmax()) + g * group
            for g in range(c.num_kv_heads)]
    full = tiny[0].layers[0].self_attn.q_proj.weight
    want = torch.cat([full[h * c.head_dim:(h + 1) * c.head_dim] for h in best])
    assert torch.equal(att.q_proj.weight, want)
    # the engine (paged KV, same KV heads) serves the pruned model exactly as generate does
    engine = Engine(model, max_num_seqs=2)
    outs = engine.generate([IDS[0].tolist(), IDS[0, :5].tolist()],
                           SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert outs[0].token_ids == generate(model, IDS, max_new_tokens=5, ignore_eos=True).tokens[0].tolist()


def test_nothing_removed_changes_nothing(tiny, calibration):
    model = copy.deepcopy(tiny[0])
    prune_structured(model, 0.0, 0.0, calibration=calibration)
    assert torch.equal(model(IDS), tiny[0](IDS))


def test_the_most_important_channel_survives(tiny, calibration):
    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight[:, 3] *= 1000.0  # make channel 3 dominate
    scores = channel_scores(model, calibration)
    assert int(scores[0]["mlp"].argmax()) == 3
    prune_structured(model, mlp_fraction=0.9, scores=scores)
    kept_col = model.layers[0].mlp.down_proj.weight
    assert (kept_col.abs().amax(0) > 100).any()


def test_gates_fold_and_remove_closed_channels(tiny):
    model = copy.deepcopy(tiny[0])
    gates = gate_channels(model)
    assert torch.allclose(model(IDS), tiny[0](IDS), atol=1e-5)  # gates at 1: the same model
    with torch.no_grad():
        for g in gates:
            g[::2] = 0.0  # close every other channel
            g[1::2] = torch.rand(g[1::2].shape) + 0.5
    gated = model(IDS)
    rep = remove_gated(model, threshold=1e-3)
    half = tiny[0].config.intermediate_size // 2
    assert rep.mlp_after == [half] * tiny[0].config.num_layers
    assert torch.allclose(model(IDS), gated, atol=1e-4)  # folded: the same function, smaller


def test_recover_runs_within_its_budget(tiny, calibration):
    model = copy.deepcopy(tiny[0])
    prune_structured(model, 0.5, calibration=calibration)
    r = recover(model, tiny[1], seconds=5, steps=4, batch_size=2, seq_len=32)
    assert 1 <= r["steps"] <= 4 and r["seconds"] < 30 and len(r["train_loss"]) == 2
    assert not model.training


def test_sensitivity_scan_gives_one_number_per_layer(tiny, calibration):
    model = tiny[0]
    counts = sensitivity_scan(model, calibration, lambda m: sum(p.numel() for p in m.parameters()))
    assert len(counts) == model.config.num_layers and len(set(counts)) == 1
    assert counts[0] < sum(p.numel() for p in model.parameters())


def test_config_round_trip_and_checks():
    c = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, layer_intermediate_sizes=(16, 48), layer_num_heads=(2, 4))
    again = ModelConfig.from_hf_dict(c.to_hf_dict())
    assert again.layer_intermediate_sizes == (16, 48) and again.layer_num_heads == (2, 4)
    assert c.intermediate_size_at(0) == 16 and c.num_heads_at(1) == 4
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        c.replace(layer_num_heads=(3, 4))
    with pytest.raises(ConfigError, match="2 positive integers"):
        c.replace(layer_intermediate_sizes=(16,))


@pytest.mark.parametrize("kwargs, match", [
    (dict(mlp_fraction=1.0), "in \\[0, 1\\)"),
    (dict(head_fraction=-0.5), "in \\[0, 1\\)"),
    (dict(mlp_fraction=[0.5, 0.5]), "2 entries for 8 layers"),
    (dict(mlp_fraction=0.5, calibration=None), "needs calibration data"),
])
def test_bad_requests(tiny, calibration, kwargs, match):
    model = copy.deepcopy(tiny[0])
    kwargs.setdefault("calibration", calibration)
    with pytest.raises(PruningError, match=match):
        prune_structured(model, **kwargs)
    assert torch.equal(model(IDS), tiny[0](IDS))  # untouched


def test_quantized_or_ungated_models_are_refused(tiny, calibration):
    from llmopt_lab.transforms.quantize import quantize

    with pytest.raises(PruningError, match="prune before quantizing"):
        prune_structured(quantize(copy.deepcopy(tiny[0]), "int8"), 0.5, calibration=calibration)
    with pytest.raises(PruningError, match="gate_channels first"):
        remove_gated(copy.deepcopy(tiny[0]))
    with pytest.raises(PruningError, match="seconds > 0"):
        recover(copy.deepcopy(tiny[0]), tiny[1], seconds=0)


def test_refit_reconstructs_the_layer_output_better(tiny, calibration):
    from llmopt_lab.transforms.structured import refit_columns

    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=g) @ (torch.eye(32) + 0.5 * torch.randn(32, 32, generator=g))
    W = torch.randn(8, 32, generator=g)
    keep = torch.arange(0, 32, 2)
    plain = W[:, keep]
    fitted = refit_columns(W, X.t() @ X, keep, damp=0.0)
    err = lambda Wk: float(((X[:, keep] @ Wk.t() - X @ W.t()) ** 2).sum())  # noqa: E731
    assert err(fitted) < 0.5 * err(plain)
    # and on the model: refit lowers the logits' distance to the unpruned model
    dist = {}
    for refit in (False, True):
        model = copy.deepcopy(tiny[0])
        prune_structured(model, 0.5, calibration=calibration, refit=refit)
        dist[refit] = float((model(IDS) - tiny[0](IDS)).pow(2).mean())
    assert dist[True] < dist[False]


def test_recover_with_a_teacher_lowers_the_kl(tiny, calibration):
    model = copy.deepcopy(tiny[0])
    prune_structured(model, 0.5, calibration=calibration)

    def kl():
        with torch.no_grad():
            t = torch.log_softmax(tiny[0](calibration[0]), -1)
            s = torch.log_softmax(model(calibration[0]), -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    before = kl()
    recover(model, tiny[1], seconds=60, steps=25, batch_size=4, seq_len=64, lr=5e-4, teacher=tiny[0])
    assert kl() < before


def test_slimming_gates_reach_exact_zeros_and_are_removed(tiny):
    model = copy.deepcopy(tiny[0])
    gates = gate_channels(model)
    recover(model, tiny[1], seconds=30, steps=3, batch_size=2, seq_len=32, teacher=tiny[0], l1=20.0,
            gates=gates, gate_lr_scale=100)
    zeros = sum(int((g == 0).sum()) for g in gates)
    assert zeros > 0  # the proximal step set some gates to exactly zero
    rep = remove_gated(model, threshold=1e-6)
    assert sum(rep.mlp_after) < sum(rep.mlp_before)

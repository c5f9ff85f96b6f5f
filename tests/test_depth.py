"""Lesson 05's depth transforms: block influence, removing layers, sharing layers."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmopt_lab import Transformer, generate, preset  # noqa: E402
from llmopt_lab.errors import TransformError  # noqa: E402
from llmopt_lab.transforms.depth import (block_influence, parameter_bytes, remove_layers,  # noqa: E402
                                         share_layers, unique_parameters)


@pytest.fixture()
def tiny():
    return Transformer.from_config(preset("tiny"), seed=1)


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (2, 16), generator=g) for _ in range(n)]


def test_block_influence_by_hand(tiny):
    bi = block_influence(tiny, batches())
    assert len(bi) == 4 and all(-1e-6 <= b <= 2 for b in bi)
    cos = []  # by hand for block 2: cosine between each token's hidden state entering and leaving it
    hook = tiny.layers[2].register_forward_hook(lambda m, a, o: cos.append(
        torch.nn.functional.cosine_similarity(a[0].reshape(-1, 128), o.reshape(-1, 128), dim=-1)))
    with torch.no_grad():
        for b in batches():
            tiny(b)
    hook.remove()
    assert bi[2] == pytest.approx(1 - float(torch.cat(cos).mean()), abs=1e-5)


def test_identity_block_has_zero_influence(tiny):
    layer = tiny.layers[1]
    with torch.no_grad():  # zero output projections: the block adds nothing to the residual
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    bi = block_influence(tiny, batches())
    assert bi[1] == pytest.approx(0.0, abs=1e-5)
    assert min(range(4), key=lambda i: bi[i]) == 1


def test_remove_layers_keeps_generation_working(tiny):
    with torch.no_grad():  # make block 1 an identity: removing it changes nothing
        tiny.layers[1].self_attn.o_proj.weight.zero_()
        tiny.layers[1].mlp.down_proj.weight.zero_()
    ref = generate(tiny, [[5, 6, 7, 8]], 8, ignore_eos=True).tokens
    cut = remove_layers(tiny, [1], copy=True)
    assert cut.config.num_layers == 3 and len(cut.layers) == 3 and tiny.config.num_layers == 4
    assert [layer.self_attn.layer_idx for layer in cut.layers] == [0, 1, 2]
    assert torch.equal(generate(cut, [[5, 6, 7, 8]], 8, ignore_eos=True).tokens, ref)
    for kind in ("static", "dynamic", "int8"):
        generate(cut, [[5, 6, 7]], 3, cache=kind)  # caches follow the new config
    from llmopt_lab import Engine, SamplingParams

    out = Engine(cut, num_blocks=16).generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert out[0].token_ids == ref[0].tolist()


def test_remove_layers_errors(tiny):
    for bad, msg in (([4], "outside"), ([1, 1], "repeat"), ([0, 1, 2, 3], "leaves none"), (["1"], "integers")):
        with pytest.raises(TransformError, match=msg):
            remove_layers(tiny, bad)
    with pytest.raises(TransformError, match="Transformer"):
        remove_layers(torch.nn.Linear(2, 2), [0])
    with pytest.raises(TransformError, match="at least one"):
        block_influence(tiny, [])


def test_share_layers_saves_bytes_not_flops(tiny):
    before = parameter_bytes(tiny)
    per_block = sum(p.numel() * p.element_size() for p in tiny.layers[1].parameters())
    shared = share_layers(tiny, [(0, 1), (2, 3)], copy=True)
    assert parameter_bytes(shared) == before - 2 * per_block
    assert unique_parameters(shared) * 4 == parameter_bytes(shared)
    assert shared.layers[1].self_attn.q_proj.weight is shared.layers[0].self_attn.q_proj.weight
    assert shared.layers[1].self_attn.layer_idx == 1  # its own KV slots
    generate(shared, [[1, 2, 3]], 4)
    # the shared block computes what block 0 computes on the same input
    x = torch.randn(1, 3, 128)
    from llmopt_lab.attention import AttentionMeta
    from llmopt_lab.model import rope_cos_sin

    pos = torch.arange(3)[None]
    meta = AttentionMeta(q_pos=pos, k_pos=pos, is_plain_causal=True)
    cos, sin = rope_cos_sin(shared.inv_freq, pos, x.dtype)
    with torch.no_grad():
        a = shared.layers[0](x, cos, sin, meta, None, shared.attn_fn)
        b = shared.layers[1](x, cos, sin, meta, None, shared.attn_fn)
    assert torch.equal(a, b)
    # training updates the one tensor through both blocks
    shared.train()
    loss = shared(torch.tensor([[1, 2, 3, 4]])).sum()
    loss.backward()
    assert shared.layers[0].mlp.up_proj.weight.grad is not None


def test_share_layers_errors(tiny):
    for pairs, msg in (([(0, 0)], "itself"), ([(0, 9)], "outside"), ([(0, 1), (1, 2)], "source"),
                       ([(0, 2), (1, 2)], "one source")):
        with pytest.raises(TransformError, match=msg):
            share_layers(tiny, pairs, copy=True)


def test_shared_and_cut_models_save_and_load(tiny, tmp_path):
    from llmopt_lab import load_model, save_model

    ids = torch.tensor([[1, 2, 3, 4]])
    for name, m in (("shared", share_layers(tiny, [(0, 1)], copy=True)),
                    ("cut", remove_layers(tiny, [2], copy=True))):
        save_model(m, tmp_path / name)
        back, _ = load_model(tmp_path / name)
        assert back.config.num_layers == m.config.num_layers
        with torch.no_grad():
            torch.testing.assert_close(back(ids), m(ids))


def test_bench_05_quick():
    from llmopt_lab.benchmarks import distillation as db

    r = db.run("quick", device="cpu", progress=False)
    names = [t["name"] for t in r["targets"]]
    assert any("distilled student" in n for n in names) and any("draft" in n for n in names)
    assert r["depth"]["layers"] == 6 and len(r["depth"]["dropped"]) == 2
    assert r["share"]["bytes"] < r["share"]["bytes_ref"]
    assert r["lowrank"]["healed"]["merged"] > 0
    assert "windows" not in r["lowrank"]["svd"] and r["params"]["windows"] == 4
    assert db.summary_rows(r) and "targets:" in db.summary_text(r)

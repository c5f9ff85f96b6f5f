"""Lesson 09 library: the fuse transform, the compiled step, launch accounting,
CUDA graphs in the engine (GPU tests skip without CUDA)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmopt_lab import Transformer, generate, preset  # noqa: E402
from llmopt_lab.benchmarks import fusion as bench  # noqa: E402
from llmopt_lab.compilation import CompiledStep, CompileError, find_graph_breaks  # noqa: E402
from llmopt_lab.errors import ModelLoadError, TransformError  # noqa: E402
from llmopt_lab.graphs import GraphError  # noqa: E402
from llmopt_lab.measure.launches import OverheadModel, count_launches  # noqa: E402
from llmopt_lab.step import step_logits  # noqa: E402
from llmopt_lab.transforms.fuse import FusedDecoderLayer, fuse, is_fused, unfuse  # noqa: E402

cuda = pytest.mark.gpu  # skipped without a CUDA GPU (conftest); run by .ci/gpu-measure tests


@pytest.fixture(scope="module")
def tiny():
    return Transformer.from_config(preset("tiny"), seed=3)


PROMPTS = [[5, 17, 99, 3, 250, 7], [42, 8, 1, 300]]


# ------------------------------------------------------------------ fuse
@pytest.mark.parametrize("kernels", [True, False])
def test_fused_model_gives_the_same_greedy_tokens(tiny, kernels):
    fused = fuse(tiny, kernels=kernels, copy=True)
    assert is_fused(fused) and not is_fused(tiny)
    assert all(isinstance(layer, FusedDecoderLayer) for layer in fused.layers)
    a = generate(tiny, PROMPTS, 8, ignore_eos=True).tokens
    b = generate(fused, PROMPTS, 8, ignore_eos=True).tokens
    assert torch.equal(a, b)


def test_fused_model_rectangle_forward_matches(tiny):
    fused = fuse(tiny, copy=True)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), tiny(ids), atol=1e-4, rtol=1e-4)
        lengths = torch.tensor([9, 5])
        torch.testing.assert_close(fused(ids, lengths=lengths)[1, :5], tiny(ids, lengths=lengths)[1, :5],
                                   atol=1e-4, rtol=1e-4)


def test_fuse_concatenates_projections(tiny):
    fused = fuse(tiny, copy=True)
    attn, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
    c = tiny.config
    assert attn.qkv_proj.weight.shape == ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size)
    assert mlp.gate_up_proj.weight.shape == (2 * c.intermediate_size, c.hidden_size)
    torch.testing.assert_close(attn.qkv_proj.weight[: c.num_heads * c.head_dim],
                               tiny.layers[0].self_attn.q_proj.weight)
    assert not hasattr(attn, "q_proj") or attn.q_proj is None


def test_fused_kernels_really_run_in_the_fused_model(tiny, monkeypatch):
    from llmopt_lab.kernels import fused as K

    calls = []
    real = K.add_rmsnorm
    monkeypatch.setattr(K, "add_rmsnorm", lambda *a: calls.append(1) or real(*a))
    generate(fuse(tiny, copy=True), PROMPTS[:1], 2, ignore_eos=True)
    assert len(calls) == 2 * tiny.config.num_layers  # prefill and one decode step


def test_unfuse_restores_the_plain_model_exactly(tiny):
    fused = fuse(tiny, copy=True)
    plain = unfuse(fused)
    assert not is_fused(plain)
    ref = tiny.state_dict()
    got = plain.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    with pytest.raises(TransformError, match="not fused"):
        unfuse(plain)


def test_fuse_errors(tiny, tmp_path):
    fused = fuse(tiny, copy=True)
    with pytest.raises(TransformError, match="already fused"):
        fuse(fused)
    with pytest.raises(TransformError, match="Transformer"):
        fuse(torch.nn.Linear(2, 2))
    with pytest.raises(ModelLoadError, match="unfuse"):
        from llmopt_lab import save_model

        save_model(fused, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    ids = torch.tensor([[1, 2, 3]])
    fused.layers[0].self_attn.qkv_proj.weight.requires_grad_(True)
    with pytest.raises(TransformError, match="inference only"):
        fused(ids)


def test_fuse_composes_with_int8_quantization(tiny):
    from llmopt_lab.transforms.quantize import quantize

    q = quantize(tiny, "int8", copy=True)
    fq = fuse(q, copy=True)
    attn = fq.layers[0].self_attn
    assert attn.qkv_proj is None and type(attn.q_proj).__name__ == "Int8Linear"
    assert torch.equal(generate(q, PROMPTS, 6, ignore_eos=True).tokens,
                       generate(fq, PROMPTS, 6, ignore_eos=True).tokens)


# ------------------------------------------------------------- compile
def test_graph_breaks_of_the_decode_step_and_of_a_broken_function(tiny):
    kv, _, step = bench.decode_step(tiny, 1, 8)
    gb = find_graph_breaks(step_logits, tiny, kv, step)
    assert (gb.graphs, gb.breaks) == (1, 0) and gb.ops > 50
    assert "no break" in gb.summary()

    def broken(x):
        y = x * 2
        if y.sum().item() > 0:  # data-dependent Python branch: Dynamo must break here
            y = y + 1
        return y - 3

    gb = find_graph_breaks(broken, torch.ones(4))
    assert gb.breaks >= 1 and gb.graphs >= 2
    assert any("item" in r or "Tensor.item" in r or "data-dependent" in r.lower() for r in gb.reasons), gb.reasons


def test_compiled_generation_matches_eager(tiny):
    a = generate(tiny, PROMPTS, 6, ignore_eos=True).tokens
    b = generate(tiny, PROMPTS, 6, ignore_eos=True, compile_mode="default").tokens
    assert torch.equal(a, b)


def test_compiled_step_recompiles_once_for_new_prompt_lengths(tiny):
    import torch._dynamo

    from llmopt_lab.cache import make_cache
    from llmopt_lab.step import host_step, run_step

    torch._dynamo.reset()
    kv = make_cache("static", tiny.config, 1, 40, dtype=tiny.dtype)
    cs = CompiledStep(tiny, kv, backend="aot_eager")
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n in (5, 9, 13, 17):
        st = host_step([list(range(1, n + 1))], [0], [[0]], kv.block_size, contiguous=True).to_step()
        torch.testing.assert_close(cs(st), run_step(tiny, kv, st), atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2  # static, then dynamic
    assert cs.calls == 4 and cs.first_call_s > 0


def test_compile_errors(tiny):
    from llmopt_lab.cache import make_cache

    kv = make_cache("static", tiny.config, 1, 16, dtype=tiny.dtype)
    with pytest.raises(CompileError, match="unknown compile mode"):
        CompiledStep(tiny, kv, mode="fastest")
    dyn = make_cache("dynamic", tiny.config, 1, 16, dtype=tiny.dtype)
    with pytest.raises(CompileError, match="reallocates"):
        CompiledStep(tiny, dyn, mode="reduce-overhead")
    with pytest.raises(CompileError, match="not both"):
        generate(tiny, PROMPTS, 2, compile_mode="default", cuda_graph=True)
    with pytest.raises(CompileError, match="use_cache"):
        generate(tiny, PROMPTS, 2, compile_mode="default", use_cache=False)
    with pytest.raises(CompileError, match="unknown compile mode"):
        generate(tiny, PROMPTS, 2, compile_mode="turbo")


# ------------------------------------------------------------ launches
def test_count_launches_counts_compute_ops_not_views():
    x = torch.randn(8, 8)
    assert count_launches(lambda: x.view(-1).t()).launches == 0
    lc = count_launches(lambda: (x + 1) * 2)
    assert lc.launches == 2 and lc.by_name == {"aten::add": 1, "aten::mul": 1}
    w = torch.randn(4, 8)
    lc = count_launches(lambda: torch.nn.functional.linear(x, w))  # linear -> mm: counted once
    assert lc.launches == 1, lc.by_name


def test_fusion_cuts_launches_per_decode_step(tiny):
    eager = bench.launches_per_step(tiny, 1, 8).launches
    fused = bench.launches_per_step(fuse(tiny, copy=True), 1, 8).launches
    concat = bench.launches_per_step(fuse(tiny, kernels=False, copy=True), 1, 8).launches
    L = tiny.config.num_layers
    assert concat == eager - 3 * L  # q/k/v: 3 GEMMs -> 1; gate/up: 2 -> 1
    assert fused < concat - 10 * L  # each norm and rope chain collapses to one launch


def test_overhead_model():
    m = OverheadModel(c_launch=5e-6, bandwidth=1e12)
    assert m.predict(200, 2e9) == pytest.approx(200 * 5e-6 + 2e-3)
    assert m.predict_overlapped(200, 2e9) == pytest.approx(2e-3)
    assert m.launch_share(200, 0) == 1.0
    with pytest.raises(ValueError, match="bandwidth"):
        OverheadModel(1e-6, 0)


# ------------------------------------------------------- CUDA graphs
def test_engine_cuda_graph_needs_a_gpu(tiny):
    from llmopt_lab import Engine

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(GraphError, match="CUDA GPU"):
        Engine(tiny, cuda_graph=True, num_blocks=8)


@cuda
def test_engine_cuda_graph_same_tokens_on_gpu():
    from llmopt_lab import Engine, SamplingParams

    model = Transformer.from_config(preset("tiny"), device="cuda", seed=3)
    prompts = [[1 + i, 5, 9, 11 + i] * (i + 1) for i in range(5)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    plain = Engine(model, num_blocks=64, max_num_seqs=8).generate(prompts, params)
    engine = Engine(model, num_blocks=64, max_num_seqs=8, cuda_graph=True)
    graphed = engine.generate(prompts, params)
    assert [o.token_ids for o in plain] == [o.token_ids for o in graphed]
    assert engine.runner.graph_steps > 0


@cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_generation_on_gpu(mode):
    model = Transformer.from_config(preset("tiny"), device="cuda", seed=3)
    a = generate(model, PROMPTS, 8, ignore_eos=True).tokens
    b = generate(model, PROMPTS, 8, ignore_eos=True, compile_mode=mode).tokens
    assert torch.equal(a, b)


@cuda
def test_fused_model_on_gpu_with_graphs():
    model = Transformer.from_config(preset("tiny"), device="cuda", seed=3)
    fused = fuse(model, copy=True)
    a = generate(model, PROMPTS, 8, ignore_eos=True).tokens
    assert torch.equal(a, generate(fused, PROMPTS, 8, ignore_eos=True, cuda_graph=True).tokens)


# -------------------------------------------------------------- bench
def test_bench_09_quick():
    r = bench.run("quick", device="cpu", progress=False)
    names = {t["name"]: t for t in r["targets"]}
    assert names["fused kernels match their references"]["met"]
    e = r["models"][0]
    assert e["tokens"]["fused_kernels"] and e["tokens"]["concat_only"]
    assert e["launches"]["fused kernels"]["launches"] < e["launches"]["eager"]["launches"]
    assert e["graph_breaks"]["decode"]["breaks"] == 0
    assert bench.summary_rows(r) and "targets:" in bench.summary_text(r)


# ------------------------------------------------------------ buckets
def test_choose_buckets_is_optimal_against_brute_force():
    import itertools
    import random

    from llmopt_lab.graphs import choose_buckets, padded_rows

    rng = random.Random(0)
    for _ in range(30):
        sizes = rng.sample(range(1, 40), rng.randint(1, 7))
        dist = {b: rng.randint(0, 9) + 1 for b in sizes}
        k = rng.randint(1, 4)
        got = choose_buckets(dist, k)
        top = max(sizes)
        assert top in got and len(got) <= k
        best = min(padded_rows(list(c) + [top], dist)
                   for r in range(0, min(k, len(sizes)))
                   for c in itertools.combinations(sorted(set(sizes) - {top}), r))
        assert padded_rows(got, dist) == best


def test_bucket_errors_and_padding():
    from llmopt_lab.graphs import choose_buckets, padded_rows

    assert padded_rows([1, 2, 4, 8], [3, 3, 5]) == 1 + 1 + 3
    assert choose_buckets([1, 1, 4, 4, 4], 8) == [1, 4]
    with pytest.raises(GraphError, match="exceeds the largest bucket"):
        padded_rows([1, 2], {3: 1})
    with pytest.raises(GraphError, match="max_buckets"):
        choose_buckets({1: 1}, 0)
    with pytest.raises(GraphError, match="positive integers"):
        choose_buckets({0: 1}, 2)
    with pytest.raises(GraphError, match="empty"):
        choose_buckets({}, 2)

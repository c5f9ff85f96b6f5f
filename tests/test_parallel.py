"""Lesson 11: tensor, pipeline and data parallelism over gloo (2 processes
launched with torchrun), offloading, and the arithmetic they rest on."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmopt_lab import generate, load_model  # noqa: E402
from llmopt_lab.errors import ModelLoadError, ParallelError  # noqa: E402
from llmopt_lab.parallel import (Comm, apply_tensor_parallel, bubble_fraction, column_split,  # noqa: E402
                                 decode_comm_bytes, init_from_env, kv_heads_for_rank, launch,
                                 make_stage, offload, offload_cost, partition_layers, row_split,
                                 shard_requests, split_cols_of_linear, split_rows_of_linear)
from llmopt_lab.transforms.quantize.layers import Int4Linear, Int8Linear  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("llmopt-tiny", device="cpu")
    return model, tok


# ------------------------------------------------------------- by hand
def test_column_then_row_split_reproduces_the_two_layer_product():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g)
    w1, w2 = torch.randn(12, 8, generator=g), torch.randn(8, 12, generator=g)
    full = torch.relu(x @ w1.T) @ w2.T
    for p in (1, 2, 3, 4):
        partial = [torch.relu(x @ column_split(w1, r, p).T) @ row_split(w2, r, p).T for r in range(p)]
        torch.testing.assert_close(sum(partial), full, rtol=1e-5, atol=1e-5)
    # a column split alone gives slices of the output, concatenated in rank order
    cols = torch.cat([x @ column_split(w1, r, 4).T for r in range(4)], dim=-1)
    torch.testing.assert_close(cols, x @ w1.T)
    with pytest.raises(ParallelError, match="12 output features over 5"):
        column_split(w1, 0, 5)
    with pytest.raises(ParallelError, match="12 input features over 5"):
        row_split(w2, 0, 5)


def test_sliced_linears_of_every_supported_format_match_their_slices():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    x = torch.randn(5, 256)
    formats = {"float": lin, "int8": Int8Linear.from_linear(lin),
               "int4": Int4Linear.from_linear(lin, group_size=64)}
    for name, layer in formats.items():
        y = layer(x)
        rows = split_rows_of_linear(layer, slice(32, 64))
        torch.testing.assert_close(rows(x), y[:, 32:64], rtol=1e-5, atol=1e-5, msg=name)
        parts = [split_cols_of_linear(layer, slice(r * 128, (r + 1) * 128), keep_bias=r == 0)(
            x[:, r * 128:(r + 1) * 128]) for r in range(2)]
        torch.testing.assert_close(parts[0] + parts[1], y, rtol=1e-4, atol=1e-4, msg=name)
    with pytest.raises(ParallelError, match="cuts a quantization group"):
        split_cols_of_linear(formats["int4"], slice(0, 96), keep_bias=True)
    with pytest.raises(ParallelError, match="not Conv1d"):
        split_rows_of_linear(torch.nn.Conv1d(2, 2, 1), slice(0, 1))


def test_heads_per_rank_split_or_replicate_kv_heads():
    assert kv_heads_for_rank(32, 8, 1, 4) == (slice(8, 16), slice(2, 4))
    # 8 ranks, 2 KV heads: ranks 0-3 share KV head 0, ranks 4-7 KV head 1
    assert [kv_heads_for_rank(8, 2, r, 8)[1].start for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    # every query head of a rank reads the KV head it keeps (group of 4 query heads)
    for r in range(8):
        q, kv = kv_heads_for_rank(8, 2, r, 8)
        assert {h // 4 for h in range(q.start, q.stop)} == {kv.start}
    with pytest.raises(ParallelError, match="3 query heads"):
        kv_heads_for_rank(3, 1, 0, 2)
    with pytest.raises(ParallelError, match="2 KV heads"):
        kv_heads_for_rank(6, 2, 0, 3)


def test_pipeline_arithmetic():
    assert partition_layers(8, 2) == [(0, 4), (4, 8)]
    assert partition_layers(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert bubble_fraction(2, 1) == 0.5
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(1, 1) == 0.0
    with pytest.raises(ParallelError, match="at least one layer"):
        partition_layers(2, 3)
    with pytest.raises(ParallelError):
        bubble_fraction(2, 0)


def test_decode_comm_bytes_counts_two_all_reduces_per_layer(tiny):
    cfg = tiny[0].config  # 8 layers, hidden 256, vocab 4096
    c = decode_comm_bytes(cfg, batch=4, world=2, bytes_per_element=2)
    assert c["all_reduce_calls"] == 17
    assert c["all_reduce_bytes"] == 17 * 4 * 256 * 2
    assert c["all_gather_bytes"] == 4 * 2048 * 2
    assert c["ring_bytes_sent"] == pytest.approx(17 * 4 * 256 * 2 + 4 * 2048 * 2)


def test_data_parallel_shards_are_disjoint_and_cover_everything():
    shards = [shard_requests(10, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    assert shards[1] == [1, 4, 7]
    with pytest.raises(ParallelError):
        shard_requests(4, 3, 3)


# ------------------------------------------------------- in one process
def test_a_group_of_one_is_the_identity(tiny):
    model, _ = load_model("llmopt-tiny", device="cpu")
    ids = [[5, 6, 7, 8], [9, 10]]
    ref = generate(model, ids, 6, ignore_eos=True).tolist()
    apply_tensor_parallel(model, Comm.single())
    assert generate(model, ids, 6, ignore_eos=True).tolist() == ref
    with pytest.raises(ParallelError, match="already tensor parallel"):
        apply_tensor_parallel(model, Comm.single())
    with pytest.raises(ModelLoadError, match="tensor-parallel shard"):
        from llmopt_lab import save_model
        save_model(model, "/tmp/never-written-tp")


def test_stage_refuses_wrong_ranges_and_saving(tiny):
    model, _ = load_model("llmopt-tiny", device="cpu")
    with pytest.raises(ParallelError, match="stage 2 is not in 0..1"):
        make_stage(model, 2, 2)
    make_stage(model, 1, 2)
    assert model.config.num_layers == 4 and [l.self_attn.layer_idx for l in model.layers] == [0, 1, 2, 3]
    from llmopt_lab import save_model
    with pytest.raises(ModelLoadError, match="pipeline stage"):
        save_model(model, "/tmp/never-written-pp")


def test_offloaded_model_generates_the_same_tokens(tiny):
    model, _ = load_model("llmopt-tiny", device="cpu")
    ids = [[5, 6, 7, 8], [9, 10, 11]]
    ref = generate(model, ids, 8, ignore_eos=True).tolist()
    offload(model, "cpu")
    assert generate(model, ids, 8, ignore_eos=True).tolist() == ref
    # prefill + 7 decode steps, each through 8 layers, one prefetch ahead
    assert model.offload_streamer.copies == 8 * 8 + 1
    with pytest.raises(ParallelError, match="already offloaded"):
        offload(model, "cpu")


def test_offload_cost_model():
    c = offload_cost(layer_params=1000, bytes_per_param=2, tokens=1, h2d_bytes_per_s=1e3,
                     flops_per_s=1e6, num_layers=4)
    assert c["copy_s"] == pytest.approx(8.0) and c["compute_s"] == pytest.approx(0.008)
    assert not c["copies_hidden"] and c["break_even_tokens"] == pytest.approx(1000)
    big = offload_cost(1000, 2, 4000, 1e3, 1e6, 4)
    assert big["copies_hidden"] and big["prefetch_s"] == pytest.approx(big["compute_s"])
    assert big["prefetch_speedup"] == pytest.approx(1 + 8 / 32)
    with pytest.raises(ParallelError, match="tokens must be positive"):
        offload_cost(1000, 2, 0, 1e3, 1e6)


def test_no_process_group_gives_a_clear_error(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ParallelError, match="torchrun"):
        Comm()
    with pytest.raises(ParallelError, match="RANK, WORLD_SIZE"):
        init_from_env()
    with pytest.raises(ParallelError, match="unknown parallel mode"):
        launch("zz")


# --------------------------------------------- 2 processes over gloo
def test_tensor_parallel_two_processes_match_one():
    res = launch("tp", 2, max_new_tokens=8)
    for r in res:
        assert r["same_tokens"], (r["tokens"], r["reference_tokens"])
        assert r["max_logit_diff"] < 1e-4
        assert r["kv_bytes_per_token"] * 2 == r["kv_bytes_per_token_whole"]
        # 8 forwards x (2 all-reduces per layer x 8 layers + embedding + head's all-gather)
        assert r["comm_calls"] == 8 * 18
    assert res[0]["tokens"] == res[1]["tokens"]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_tensor_parallel_quantized(quant):
    res = launch("tp", 2, max_new_tokens=6, quant=quant, group_size=64, repeats=1)
    assert all(r["same_tokens"] and r["max_logit_diff"] < 1e-4 for r in res)


def test_tensor_parallel_four_ranks_replicate_kv_heads():
    # llmopt-tiny has 2 KV heads: with 4 ranks each KV head lives on 2 of them
    res = launch("tp", 4, max_new_tokens=4, repeats=1)
    assert all(r["same_tokens"] and r["max_logit_diff"] < 1e-4 for r in res)
    assert all(r["kv_bytes_per_token"] * 2 == r["kv_bytes_per_token_whole"] for r in res)


def test_pipeline_two_stages_match_one_process():
    res = launch("pp", 2, max_new_tokens=6, micro_batches=[1, 2], repeats=1)
    assert [r["layers"] for r in res] == [[0, 4], [4, 8]]
    for r in res:
        for mb, run in r["runs"].items():
            assert run["same_tokens"], (mb, run["tokens"], r["reference_tokens"])
            assert 0 <= run["bubble"] < 1


def test_data_parallel_serves_each_request_once():
    res = launch("dp", 2, max_new_tokens=6)
    assert all(r["same_tokens"] for r in res)
    assert res[0]["served"] == [2, 2] and res[0]["served_by"] == [0, 1, 0, 1]


def test_a_failing_worker_reports_its_error():
    with pytest.raises(ParallelError, match="3 query heads cannot be split over 2 ranks"):
        launch("tp", 2, model="llmopt-tiny-draft", max_new_tokens=2)


# ------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("prefetch", [False, True])
def test_offload_to_gpu_same_tokens(prefetch):
    model, _ = load_model("llmopt-tiny", device="cuda")
    ids = [[5, 6, 7, 8], [9, 10, 11]]
    ref = generate(model, ids, 8, ignore_eos=True).tolist()
    model, _ = load_model("llmopt-tiny", device="cpu")
    offload(model, "cuda", prefetch=prefetch)
    assert generate(model, ids, 8, ignore_eos=True).tolist() == ref
    assert model.offload_streamer.bytes_copied > 0


# ------------------------------------------------------------ scaling model
def test_allreduce_fit_recovers_latency_and_bandwidth():
    from llmopt_lab.parallel.scaling import AllReduceModel

    true = AllReduceModel(50e-6, 2e9)
    sizes = [1e3, 1e5, 1e6, 4e6]
    fit = AllReduceModel.fit(sizes, [true.seconds(n, 4) for n in sizes], 4)
    assert fit.latency_s == pytest.approx(50e-6, rel=1e-6)
    assert fit.bytes_per_s == pytest.approx(2e9, rel=1e-6)
    assert AllReduceModel(1.0, 1.0).seconds(100, 1) == 0.0
    with pytest.raises(ParallelError, match="two or more"):
        AllReduceModel.fit([1e3], [1e-3], 2)
    with pytest.raises(ParallelError, match="do not grow"):
        AllReduceModel.fit([1e3, 1e6], [2e-3, 1e-3], 2)


def test_layer_gemms_shard_by_degree_and_predict_tp_step(tiny):
    from llmopt_lab.config import preset
    from llmopt_lab.parallel.scaling import AllReduceModel, layer_gemms, predict_tp_step

    c = preset("llama-70b")
    full, tp8 = dict((n, (N, K)) for n, N, K in layer_gemms(c)), dict(
        (n, (N, K)) for n, N, K in layer_gemms(c, 8))
    assert tp8["q_proj"] == (full["q_proj"][0] // 8, 8192) and tp8["o_proj"] == (8192, 8192 // 8)
    assert tp8["k_proj"] == (128, 8192)  # one KV head per rank
    assert dict((n, N) for n, N, K in layer_gemms(c, 16))["k_proj"] == 128  # replicated, not below one head
    free = AllReduceModel(0.0, 1e30)
    pred = predict_tp_step(tiny[0].config, [2], tokens=2, allreduce=free, repeats=2)
    assert [p["world"] for p in pred] == [1, 2] and pred[0]["speedup"] == 1.0
    slow = predict_tp_step(tiny[0].config, [2], tokens=2, allreduce=AllReduceModel(1.0, 1e9), repeats=2)
    assert slow[1]["comm_s"] == pytest.approx(2 * 8 * (1.0 + 2 * 256 * 4 / 1e9), rel=1e-12)
    assert slow[1]["speedup"] < 1.0


def test_tensor_parallel_three_ranks_on_the_real_model():
    # SmolLM2-135M: 9 query heads over 3 KV heads, MLP 1536, vocabulary 49,152: TP=3 splits
    # every one of them (TP=2 cannot: 9 heads); int4 groups of 64 stay whole at 576 / 3 and 1536 / 3
    from llmopt_lab.zoo.fetched import is_fetched

    if not is_fetched("smollm2-135m"):
        pytest.skip("smollm2-135m is not fetched here (python -m llmopt_lab zoo fetch smollm2-135m)")
    for quant in ("none", "int4"):
        res = launch("tp", 3, model="smollm2-135m", prompts=["def add(a, b):"], max_new_tokens=4,
                     quant=quant, group_size=64, repeats=1, timeout=600)
        # logits reach ~40 here over 30 layers: 5e-4 absolute (3.8e-5 measured in float32)
        assert all(r["same_tokens"] and r["max_logit_diff"] < 5e-4 for r in res), quant
        assert res[0]["kv_bytes_per_token"] * 3 == res[0]["kv_bytes_per_token_whole"]


def test_a_run_killed_by_a_signal_is_retried_once_and_said(monkeypatch, capsys):
    import importlib

    L = importlib.import_module("llmopt_lab.parallel.launch")  # the module (the package exports the function)

    calls = []

    def crash_then_work(mode, nprocs, timeout, env, kwargs):
        calls.append(mode)
        if len(calls) == 1:
            raise L._Crashed("parallel run 'pp' with 2 processes failed (exit 1): Signal 6")
        return [{"rank": 0}, {"rank": 1}]

    monkeypatch.setattr(L, "_launch_once", crash_then_work)
    assert L.launch("pp", 2) == [{"rank": 0}, {"rank": 1}] and len(calls) == 2
    assert "retrying the parallel run once" in capsys.readouterr().err

    def always_crash(*a):
        raise L._Crashed("Signal 6")

    monkeypatch.setattr(L, "_launch_once", always_crash)
    with pytest.raises(ParallelError, match="Signal 6"):
        L.launch("pp", 2)

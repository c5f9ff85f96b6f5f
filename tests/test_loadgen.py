"""Lesson 10's load generator and benchmark: named length distributions,
Poisson arrivals, percentiles, the in-process driver, bench 10 at the quick size."""

import math
import os
import random
import threading

import pytest
from conftest import scaled_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmopt_lab import Engine, generate, load_model, preset  # noqa: E402
from llmopt_lab.errors import ServingError  # noqa: E402
from llmopt_lab.serving.loadgen import (LENGTHS, LoadRequest, draw_lengths,  # noqa: E402
                                        make_requests, percentiles, run_load, run_load_http)
from llmopt_lab.serving.server import make_server  # noqa: E402


@pytest.mark.parametrize("name", sorted(LENGTHS))
def test_lengths_stay_in_their_range(name):
    xs = draw_lengths(name, 2000, random.Random(0))
    assert min(xs) >= 1 and max(xs) <= 1024
    if name == "uniform":
        assert min(xs) >= 100
    if name == "longtail":  # median near 128, a long right tail
        assert 100 < sorted(xs)[1000] < 160 and max(xs) > 4 * 128
    half = draw_lengths(name, 2000, random.Random(0), scale=0.5)
    assert sum(half) < 0.6 * sum(xs)


def test_poisson_arrivals_have_the_asked_rate():
    reqs = make_requests(4000, rate=20.0, seed=1, scale=0.01)
    gaps = [b.arrival - a.arrival for a, b in zip(reqs, reqs[1:])]
    assert abs(sum(gaps) / len(gaps) - 1 / 20) < 0.005
    assert all(r.arrival == 0 for r in make_requests(5, scale=0.01))  # rate inf: all at once
    assert make_requests(5, seed=3, scale=0.01) == make_requests(5, seed=3, scale=0.01)


def test_percentiles_nearest_rank():
    p = percentiles(list(range(1, 101)))
    assert (p["p50"], p["p90"], p["p99"], p["mean"]) == (50, 90, 99, 50.5)
    assert math.isnan(percentiles([])["p50"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "positive integer"), (dict(n=3, rate=0), "rate"),
    (dict(n=3, prompt="zipf"), "unknown length distribution"), (dict(n=3, scale=0), "scale"),
])
def test_bad_workloads_are_refused(kwargs, match):
    with pytest.raises(ServingError, match=match):
        make_requests(**kwargs)


def test_run_load_reports_metrics_and_matches_policies():
    model = scaled_model(preset("tiny"), seed=2)
    reqs = make_requests(10, seed=4, scale=0.03, rate=200.0, vocab=model.config.vocab_size)
    out = {}
    for policy in ("static", "continuous"):
        r = run_load(Engine(model, policy=policy, max_num_seqs=4), reqs)
        assert r["generated_tokens"] == sum(q.max_new_tokens for q in reqs)
        assert r["ttft_s"]["p50"] <= r["ttft_s"]["p99"] <= r["latency_s"]["p99"]
        assert 0 < r["kv_utilisation"] <= 1
        out[policy] = r
    assert out["static"]["outputs"] == out["continuous"]["outputs"]
    assert out["static"]["stats"]["padding_tokens"] > 0 == out["continuous"]["stats"]["padding_tokens"]


def test_bench_10_quick():
    from llmopt_lab.benchmarks import batching

    r = batching.run("quick", device="cpu", progress=False)
    assert r["outputs_identical"] and r["agreement"] == {"longtail": 1.0}
    assert {row["policy"] for row in r["rows"]} == {"static", "dynamic", "continuous"}
    names = [t["name"] for t in r["targets"]]
    assert names[0] == "continuous / static throughput, longtail outputs"
    assert any(n.startswith("chunked prefill: p99") for n in names) and "packed / padded prefill" in names
    # the padded prefill computes every prompt at the longest length, the packed one only real tokens
    pk = r["packed"]
    assert pk["padded"]["computed"] == pk["padded_tokens"] > pk["packed"]["computed"] == pk["prompt_tokens"]
    whole, chunked = r["chunked"]
    assert chunked["stats"]["steps"] > whole["stats"]["steps"]  # chunks take more steps
    assert chunked["budget"] < whole["budget"]
    static = next(x for x in r["rows"] if x["policy"] == "static")
    cont = next(x for x in r["rows"] if x["policy"] == "continuous")
    assert static["stats"]["padding_tokens"] > 0 == cont["stats"]["padding_tokens"]
    assert batching.summary_rows(r) and "targets:" in batching.summary_text(r)
    fig = batching.plot(r, {"device": "test"})
    assert len(fig.axes) == 3


# ------------------------------------------------------------- over loopback HTTP
@pytest.fixture(scope="module")
def tiny():
    return load_model("llmopt-tiny", device="cpu")


@pytest.fixture(scope="module")
def http_server(tiny):
    model, tok = tiny
    srv = make_server(Engine(model, tok, max_num_seqs=8), port=0, model_name="llmopt-tiny")
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown_all()
    t.join(10)


def _finite_positive(p):
    return all(math.isfinite(v) and v > 0 for v in p.values())


def test_run_load_http_matches_generate_and_run_load(http_server, tiny):
    model, tok = tiny
    reqs = make_requests(6, seed=5, scale=0.03, rate=50.0, vocab=model.config.vocab_size,
                         max_len=model.config.max_position_embeddings)
    assert len({r.arrival for r in reqs}) > 1  # a real arrival process
    assert max(q.max_new_tokens for q in reqs) > 1  # so there are gaps between tokens
    r = run_load_http(http_server.url, reqs)
    assert r["transport"] == "http" and r["requests"] == len(reqs)
    assert r["generated_tokens"] == sum(q.max_new_tokens for q in reqs)
    assert r["completion_tokens"] == [q.max_new_tokens for q in reqs]
    for key in ("ttft_s", "latency_s"):
        assert _finite_positive(r[key]), (key, r[key])
    assert all(math.isfinite(v) and v >= 0 for v in r["tbt_s"].values()) and r["tbt_s"]["mean"] > 0
    assert r["ttft_s"]["p50"] <= r["latency_s"]["p50"]
    assert r["ttft_s"]["p99"] <= r["latency_s"]["p99"]
    assert r["seconds"] >= max(q.arrival for q in reqs)
    assert r["throughput_tok_s"] > 0 and r["requests_per_s"] > 0
    # the stream carries text only: compare with the decoded greedy tokens
    alone = [generate(model, [q.prompt], max_new_tokens=q.max_new_tokens,
                      ignore_eos=True).tolist()[0] for q in reqs]
    assert r["outputs"] == [tok.decode(ids, skip_special_tokens=True) for ids in alone]
    local = run_load(Engine(model, tok, max_num_seqs=8), reqs)
    assert local["outputs"] == alone
    assert set(local) - {"kv_utilisation", "stats"} <= set(r)


def test_run_load_http_reports_the_servers_refusal(http_server, tiny):
    model, _ = tiny
    n = model.config.max_position_embeddings
    reqs = [LoadRequest([5, 17, 42], 4, 0.0), LoadRequest([7] * (n + 1), 4, 0.01)]
    with pytest.raises(ServingError, match=r"HTTP 400.*exceeds the model's context"):
        run_load_http(http_server.url, reqs)
    # the server keeps serving afterwards
    assert run_load_http(http_server.url + "/", reqs[:1])["generated_tokens"] == 4


@pytest.mark.parametrize("url,match", [
    ("127.0.0.1:8000", "http://"), ("https://127.0.0.1:1", "http://"), ("http://", "http://"),
    (None, "http://"),
])
def test_run_load_http_refuses_bad_urls(url, match):
    with pytest.raises(ServingError, match=match):
        run_load_http(url, [LoadRequest([1, 2, 3], 2)])


def test_run_load_http_refuses_empty_requests_and_dead_servers():
    with pytest.raises(ServingError, match="non-empty"):
        run_load_http("http://127.0.0.1:1", [])
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServingError, match="failed"):
        run_load_http(f"http://127.0.0.1:{port}", [LoadRequest([1, 2, 3], 2)], timeout=5)


def test_request_metrics_from_a_trace():
    from llmopt_lab.serving.loadgen import request_metrics

    m = request_metrics(1.0, [1.5, 1.7, 2.0, 2.1])
    assert m["ttft"] == pytest.approx(0.5) and m["latency"] == pytest.approx(1.1)
    assert m["tpot"] == pytest.approx(0.2)  # (2.1 - 1.5) / 3
    assert m["tbt"] == pytest.approx([0.2, 0.3, 0.1])
    one = request_metrics(0.0, [0.25])
    assert one["ttft"] == one["latency"] == 0.25 and math.isnan(one["tpot"]) and one["tbt"] == []
    for arrival, times in ((0.0, []), (2.0, [1.0]), (0.0, [1.0, 0.5])):
        with pytest.raises(ServingError):
            request_metrics(arrival, times)


def test_make_requests_scales_prompts_and_outputs_separately():
    base = make_requests(50, prompt="uniform", output="uniform", seed=3, scale=0.5)
    sep = make_requests(50, prompt="uniform", output="uniform", seed=3, prompt_scale=0.5, output_scale=0.05)
    assert [len(a.prompt) for a in base] == [len(b.prompt) for b in sep]  # same prompt draws
    assert max(b.max_new_tokens for b in sep) <= round(1024 * 0.05) < min(a.max_new_tokens for a in base)
    with pytest.raises(ServingError):
        make_requests(4, prompt_scale=0.0)

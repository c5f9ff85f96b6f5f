"""Lesson 10's load generator and benchmark: named length distributions,
Poisson arrivals, percentiles, the in-process driver, bench 10 at the quick size."""

import math
import os
import random

import pytest
from conftest import scaled_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmopt_lab import Engine, preset  # noqa: E402
from llmopt_lab.errors import ServingError  # noqa: E402
from llmopt_lab.serving.loadgen import (LENGTHS, draw_lengths, make_requests,  # noqa: E402
                                        percentiles, run_load)


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


def test_bench_10_quick(tmp_path):
    from llmopt_lab.benchmarks import batching

    r = batching.run("quick", device="cpu", progress=False)
    assert r["outputs_identical"]
    assert {row["policy"] for row in r["rows"]} == {"static", "dynamic", "continuous"}
    assert [t["name"] for t in r["targets"]][0] == "continuous / static throughput"
    assert batching.summary_rows(r) and "targets:" in batching.summary_text(r)

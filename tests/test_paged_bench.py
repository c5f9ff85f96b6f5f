"""Lesson 07 benchmark (llmopt_lab.benchmarks.paged_attention): exact counts,
targets, the kernel check, and the GPU code path (with fakes, and for real at
tiny CPU sizes)."""

import json
import math

import matplotlib
import pytest
import torch

from llmopt_lab.benchmarks import find
from llmopt_lab.benchmarks import paged_attention as pab

matplotlib.use("Agg")


def test_registered_as_lesson_07():
    assert find("07").module == "llmopt_lab.benchmarks.paged_attention"
    assert find("paged_attention").number == "07" and find("7").name == "paged_attention"
    assert set(pab.SIZES) == {"quick", "cpu", "gpu"}
    gpu = pab.SIZES["gpu"]["gpu"]
    assert gpu["decode"]["batch"] == 64 and gpu["decode"]["contexts"] == [1024, 2048, 4096, 8192]
    d = gpu["decode"]
    assert (d["q_heads"], d["kv_heads"], d["head_dim"]) == (32, 8, 128)
    assert gpu["decode"]["block_sizes"] == [16, 64] and gpu["decode"]["dtype"] == "bfloat16"
    assert gpu["ttft"]["model"] == "synthetic:llama-1b"
    assert "gpu" not in pab.SIZES["cpu"] and pab.SIZES["cpu"]["requests"] == 1000


@pytest.fixture(scope="module")
def quick():
    return pab.run("quick", "cpu", progress=False)


def test_quick_run_returns_every_part_as_json(quick):
    assert quick["benchmark"] == "paged_attention" and quick["lesson"] == "07"
    assert {"waste", "prefix", "kernel", "targets", "params"} <= set(quick)
    assert quick["gpu"] is None and "gpu_skipped" not in quick  # no GPU part at this size
    json.dumps(quick)  # stored as it is
    schemes = [(r["scheme"], r["block_size"]) for r in quick["waste"]["rows"]]
    assert schemes == [("max_len", None), ("exact", None), ("paged", 16), ("paged", 32),
                       ("paged", 64), ("paged", 128)]


def test_waste_counts_are_exact(quick):
    prompts, outputs = pab.long_tail_workload(200, **pab.WORKLOAD)
    lens = [p + o for p, o in zip(prompts, outputs)]
    rows = {(r["scheme"], r["block_size"]): r for r in quick["waste"]["rows"]}
    # max-length reservation: 4096 slots each, so 2^20 // 4096 sequences fit
    assert rows["max_len", None]["fit"] == 2 ** 20 // 4096 == 256
    assert rows["max_len", None]["waste"] == pytest.approx(1 - sum(lens) / (200 * 4096))
    assert rows["exact", None]["waste"] == 0.0 and rows["exact", None]["slots"] == sum(lens)
    assert rows["paged", 16]["slots"] == sum(-(-n // 16) * 16 for n in lens)
    assert quick["waste"]["prompt_stats"]["max"] == max(prompts)


def test_waste_table_by_hand():
    # lengths 15 and 50, block 16, max_len 64, a budget of 100 slots
    rows = pab.waste_table([10, 20], [5, 30], [16], 64, 100)
    by = {r["scheme"]: r for r in rows}
    assert by["max_len"]["slots"] == 128 and by["max_len"]["fit"] == 1
    assert by["exact"]["slots"] == 65 and by["exact"]["fit"] == 3  # 15 + 50, then 15 again
    assert by["paged"]["slots"] == 16 + 64 and by["paged"]["waste"] == pytest.approx(1 - 65 / 80)
    assert by["paged"]["fit"] == 3 and by["paged"]["block_size"] == 16


def test_long_tail_workload_is_seeded_and_bounded():
    a = pab.long_tail_workload(1000, **pab.WORKLOAD)
    assert a == pab.long_tail_workload(1000, **pab.WORKLOAD)
    assert a != pab.long_tail_workload(1000, **dict(pab.WORKLOAD, seed=1))
    prompts, outputs = a
    assert min(prompts) >= 1 and min(outputs) >= 1
    assert max(p + o for p, o in zip(prompts, outputs)) <= 4096
    assert 250 < sorted(prompts)[500] < 360 and 120 < sorted(outputs)[500] < 180


def test_prefix_cache_counts_are_exact(quick):
    pr = quick["prefix"]
    # 32 prompts of 2048 + 64 = 2112 tokens (132 blocks of 16): without the cache
    # every token is computed; with it the first prompt computes all 2112 and
    # each later one only its 64-token suffix (its 128 prefix blocks hit)
    assert pr["no_cache"] == dict(computed_tokens=32 * 2112, last_computed=2112,
                                  blocks_held=32 * 132)
    assert pr["cache"] == dict(computed_tokens=2112 + 31 * 64, last_computed=64,
                               blocks_held=132 + 31 * 4)
    assert pr["saving"] == pytest.approx(1 - 4096 / 67584)


def test_targets_are_evaluated(quick):
    t = {x["name"]: x for x in quick["targets"]}
    assert len(t) == 3 and all(isinstance(x["met"], bool) for x in t.values())
    saving = t["fraction of prompt tokens the prefix cache saves"]
    assert saving["met"] and saving["goal"] == ">= 0.9"
    waste = t["waste fraction of paging at block 16"]
    assert waste["met"] == (waste["value"] < 0.04) and waste["goal"] == "< 0.04"
    text = pab.summary_text(quick)
    assert text.count("[met]") + text.count("[MISSED]") == 3 and "not measured" in text


def test_kernel_check_rows(quick):
    rows = quick["kernel"]["rows"]
    assert [r["case"] for r in rows] == ["decode", "mixed"]
    assert [r["kernel"] for r in rows] == ["decode", "prefill"]
    for r in rows:
        ok = r["status"] == "ok" and r["max_abs_err"] <= 1e-4
        assert ok or (r["status"] == "skipped" and r["reason"])


def test_summary_rows_and_plot(quick):
    rows = pab.summary_rows(quick)
    assert all(list(r) == ["part", "case", "measured"] for r in rows)
    assert len(rows) == 6 + 2 + 2
    assert rows[0]["case"] == "max_len" and "256 seqs fit (1.00x max_len)" in rows[0]["measured"]
    fig = pab.plot(quick, {"device": "test device"})
    assert len(fig.axes) == 2 and "budget" in fig.axes[1].get_title()


# ---------------------------------------------------------------- GPU path
def _fake_decode(batch, context, q_heads, kv_heads, head_dim, block_size, dtype, device, warmup,
                 repeat):
    assert (batch, q_heads, kv_heads, head_dim, dtype) == (64, 32, 8, 128, torch.bfloat16)
    ratio = 0.97 if block_size == 64 else (0.85 if context == 8192 else 0.92)
    return dict(batch=batch, context=context, block_size=block_size, dtype="bfloat16", status="ok",
                flash_s=1e-4, paged_s=1e-4 / ratio, ratio=ratio)


def _fake_ttft(model, dtype, device, prompts, prefix, attn, warmup, repeat):
    assert model == "synthetic:llama-1b" and prompts is None and prefix["prefix_len"] == 2048
    return dict(model=model, no_cache=dict(ttft_s=0.08, computed_tokens=2112),
                cache=dict(ttft_s=0.01, computed_tokens=64), speedup=8.0, same_next_token=True)


def test_gpu_part_with_fakes(monkeypatch):
    monkeypatch.setattr(pab, "_gpu_ready", lambda dev: True)
    monkeypatch.setattr(pab, "measure_decode_pair", _fake_decode)
    monkeypatch.setattr(pab, "measure_ttft", _fake_ttft)
    monkeypatch.setattr(pab, "kernel_check", lambda c, dev: [
        dict(case="decode", kernel="decode", status="ok", max_abs_err=0.0)])
    out = pab.run("gpu", "cpu", progress=False, params=dict(pab.SIZES["gpu"], requests=50))
    assert len(out["gpu"]["decode"]) == 4 * 2
    t = {x["name"]: x for x in out["targets"]}
    assert len(t) == 6
    b16 = t["paged decode speed over flash decoding's, block 16, every context"]
    assert not b16["met"] and b16["value"] == pytest.approx(0.85) and "8192: 0.85x" in b16["text"]
    assert t["paged decode speed over flash decoding's, block 64, every context"]["met"]
    ttft = t["time to first token, no cache over prefix cache"]
    assert ttft["met"] and "80.00 ms -> 10.00 ms (8.0x)" in ttft["text"]
    text = pab.summary_text(out)
    assert "[MISSED] paged decode speed over flash decoding's, block 16" in text
    assert "same next token with and without the cache: True" in text
    rows = pab.summary_rows(out)
    assert sum(r["part"] == "GPU decode" for r in rows) == 8
    fig = pab.plot(out, {"device": "test device"})
    assert len(fig.axes) == 3 and len(fig.axes[2].get_lines()) == 3  # 2 block sizes + the 1x line


def test_gpu_part_is_skipped_without_cuda(monkeypatch):
    monkeypatch.setattr(pab, "kernel_check", lambda c, dev: [])
    out = pab.run("gpu", "cpu", progress=False)
    assert out["gpu"] is None and "needs a CUDA device" in out["gpu_skipped"]


def test_measure_decode_pair_runs_on_tiny_shapes():
    # the GPU measurement itself, at a CPU size (a context that is not a whole number of blocks)
    r = pab.measure_decode_pair(2, 40, 4, 2, 32, 16, torch.float32, "cpu", warmup=0, repeat=1)
    assert r["context"] == 40 and r["block_size"] == 16
    if r["status"] == "ok":
        assert r["max_abs_diff"] < 1e-4 and r["ratio"] > 0 and r["paged_gb_s"] > 0
    else:
        assert r["status"] == "unsupported" and r["reason"]


def test_measure_ttft_runs_on_a_tiny_model():
    prompts = pab.shared_prefix_prompts(3, 32, 8, vocab=512)
    assert [len(p) for p in prompts] == [40] * 3 and prompts[0][:32] == prompts[2][:32]
    r = pab.measure_ttft("synthetic:tiny", "float32", "cpu", prompts, dict(block_size=16),
                         attn="sdpa", warmup=0, repeat=1)
    assert r["no_cache"]["computed_tokens"] == 40 and r["cache"]["computed_tokens"] == 8
    assert r["same_next_token"] and r["speedup"] > 0 and not math.isnan(r["speedup"])

"""Lesson 06 benchmark (llmopt_lab.benchmarks.flash_attention): FLOP counts, the
naive implementation, failure statuses, the run's bookkeeping, summary and plot."""

import math

import matplotlib
import pytest
import torch

from llmopt_lab.benchmarks import find
from llmopt_lab.benchmarks import flash_attention as fab
from llmopt_lab.kernels.reference import attention_ref, causal_mask

matplotlib.use("Agg")


def test_registered_as_lesson_06():
    assert find("06").module == "llmopt_lab.benchmarks.flash_attention"
    assert find("flash_attention").number == "06"
    assert set(fab.SIZES) == {"quick", "cpu", "gpu"}
    gpu = fab.SIZES["gpu"]
    assert gpu["batch"] == 4 and gpu["heads"] == 32 and gpu["head_dims"] == [64, 128]
    assert gpu["seq_lens"][0] == 1024 and gpu["seq_lens"][-1] == 16384
    assert gpu["decode"]["keys"] == 32768 and gpu["decode"]["queries"] == [1, 8]


def test_attention_flops():
    assert fab.attention_flops(4, 32, 1024, 128) == 4 * 4 * 32 * 1024 ** 2 * 128
    assert fab.attention_flops(4, 32, 1024, 128, causal=True) == 2 * 4 * 32 * 1024 ** 2 * 128
    assert fab.attention_flops(1, 8, 1, 64, n_keys=1000) == 4 * 8 * 1000 * 64


@pytest.mark.parametrize("T, S, Hq, Hkv, causal", [(9, 9, 2, 2, False), (9, 9, 4, 2, True),
                                                    (3, 11, 4, 1, True), (1, 11, 2, 2, False)])
def test_eager_attention_matches_the_reference(T, S, Hq, Hkv, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, Hq, T, 16, generator=g)
    k, v = torch.randn(2, Hkv, S, 16, generator=g), torch.randn(2, Hkv, S, 16, generator=g)
    mask = causal_mask(torch.arange(S - T, S).expand(2, T), torch.arange(S).expand(2, S)) if causal else None
    torch.testing.assert_close(fab.eager_attention(q, k, v, causal), attention_ref(q, k, v, mask),
                               atol=1e-5, rtol=1e-5)


def test_measure_sorts_failures_into_statuses():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")

    def refused():
        raise RuntimeError("No available kernel. Aborting execution.")

    def broken():
        raise ValueError("bad shape\nmore text")

    assert fab.measure(oom, "cpu", warmup=0, repeat=1)["status"] == "OOM"
    assert fab.measure(refused, "cpu", warmup=0, repeat=1)["status"] == "unsupported"
    r = fab.measure(broken, "cpu", warmup=0, repeat=1)
    assert r == {"status": "error", "reason": "ValueError: bad shape"}
    ok = fab.measure(lambda: torch.ones(1000), "cpu", flops=1e6, nbytes=1e3, warmup=0, repeat=2)
    assert ok["status"] == "ok" and ok["tflops"] > 0 and ok["gb_per_s"] > 0 and ok["peak_bytes"] >= 0


def test_measure_prefill_runs_our_kernel_and_marks_cudnn_unavailable_on_cpu():
    r = fab.measure_prefill("ours", 1, 2, 16, 32, True, torch.float32, "cpu", warmup=0, repeat=1)
    assert r["status"] == "ok" and r["flops"] == 2 * 2 * 16 * 16 * 32 and r["tflops"] > 0
    c = fab.measure_prefill("sdpa_cudnn", 1, 2, 16, 32, True, torch.float32, "cpu")
    assert c["status"] == "unavailable" and "CUDA" in c["reason"]
    s = fab.measure_prefill("sdpa_flash", 1, 2, 64, 32, False, torch.float32, "cpu", 0, 1)
    assert s["status"] == "ok" and s["backend"] == "FLASH_ATTENTION"
    with pytest.raises(ValueError, match="unknown implementation"):
        fab.prefill_fn("magic", None, None, None, False)


def _fake_prefill(impl, batch, heads, n, head_dim, causal, dtype, device, warmup, repeat):
    row = dict(phase="prefill", impl=impl, dtype=str(dtype).replace("torch.", ""),
               head_dim=head_dim, causal=causal, n=n, batch=batch, heads=heads,
               flops=fab.attention_flops(batch, heads, n, head_dim, causal))
    if impl == "naive" and n >= 64:
        return dict(row, status="OOM", reason="fake")
    speed = {"ours": 2.0, "sdpa_flash": 1.0, "sdpa_cudnn": 4.0, "naive": 0.5}[impl]
    t = row["flops"] / (speed * 1e12)
    return dict(row, status="ok", time_s=t, spread=0.0, peak_bytes=n * 1000, tflops=speed)


def _fake_decode(impl, batch, q_heads, kv_heads, queries, keys, head_dim, dtype, device, warmup, repeat):
    row = dict(phase="decode", impl=impl, dtype=str(dtype).replace("torch.", ""), head_dim=head_dim,
               queries=queries, keys=keys, batch=batch, q_heads=q_heads, kv_heads=kv_heads,
               kv_bytes=1e6, flops=1.0)
    if impl == "sdpa_flash":
        return dict(row, status="unsupported", reason="fake")
    t = {"ours": 1e-3, "sdpa": 2e-3, "sdpa_efficient": 4e-3, "sdpa_cudnn": 8e-3, "naive": 1e-2}[impl]
    return dict(row, status="ok", time_s=t, spread=0.0, peak_bytes=10, gb_per_s=1e6 / t / 1e9)


@pytest.fixture
def fake_result(monkeypatch):
    monkeypatch.setattr(fab, "measure_prefill", _fake_prefill)
    monkeypatch.setattr(fab, "measure_decode", _fake_decode)
    params = dict(fab.SIZES["quick"], seq_lens=[32, 64, 128], head_dims=[32, 64], ours_max_n=64)
    return fab.run("quick", "cpu", progress=False, params=params)


def test_run_bookkeeping(fake_result):
    rows = fake_result["rows"]
    assert fake_result["benchmark"] == "flash_attention" and fake_result["lesson"] == "06"
    prefill = [r for r in rows if r["phase"] == "prefill"]
    assert len(prefill) == 2 * 2 * 3 * len(fab.PREFILL_IMPLS)  # head dims x causal x N x impls
    ours = {(r["head_dim"], r["causal"], r["n"]): r["status"] for r in prefill if r["impl"] == "ours"}
    assert ours[(32, False, 64)] == "ok" and ours[(32, False, 128)] == "skipped"
    naive = [r for r in prefill if r["impl"] == "naive" and r["n"] == 128]
    assert all(r["status"] == "OOM" and "smaller N" in r["reason"] for r in naive)
    decode = [r for r in rows if r["phase"] == "decode"]
    assert len(decode) == 2 * len(fab.DECODE_IMPLS)


def test_summary_rows(fake_result):
    rows = fab.summary_rows(fake_result)
    assert len(rows) == 2 * 2 * 3 + 2
    assert all(list(r) == list(rows[0]) for r in rows)  # one set of columns for the table
    first = rows[0]
    assert first["case"] == "prefill float32 D=32" and first["N"] == 32 and first["unit"] == "TFLOP/s"
    assert first["ours"] == 2.0 and first["naive"] == 0.5
    assert first["ours vs sdpa"] == pytest.approx(0.5)  # the fastest SDPA: cudnn at 4 TFLOP/s
    assert first["ours MiB"] == pytest.approx(32000 / 2 ** 20)
    big = next(r for r in rows if r["N"] == 128 and r["case"].startswith("prefill"))
    assert big["naive"] == "OOM" and big["ours"] is None and big["ours vs sdpa"] is None
    dec = [r for r in rows if r["case"].startswith("decode")]
    assert dec[0]["unit"] == "GB/s" and dec[0]["sdpa flash"] is None
    assert dec[0]["ours vs sdpa"] == pytest.approx(2.0)  # default sdpa, the fastest that ran


def test_series_and_plot(fake_result):
    ns, data = fab.series(fake_result)
    assert ns == [32, 64, 128] and set(data) == set(fab.PREFILL_IMPLS)
    assert math.isnan(data["ours"][2]) and math.isnan(data["naive"][1]) and data["sdpa_flash"] == [1.0] * 3
    fig = fab.plot(fake_result, {"device": "test device"}, head_dim=32, causal=False)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "TFLOP/s" and "D=32" in ax.get_title()
    assert len(ax.get_lines()) == 4


def test_targets(fake_result):
    t = fab.targets(fake_result, head_dim=64, min_n=64)
    # ours at 2 TFLOP/s, SDPA flash at 1: ratio 2 where ours ran (N = 64; 128 was skipped)
    assert [(r["causal"], r["n"]) for r in t["speed"]] == [(False, 64), (True, 64)]
    assert all(r["ratio"] == pytest.approx(2.0) and r["meets"] for r in t["speed"])
    # fake peak memory is 1000 bytes per token: linear
    assert len(t["memory"]) == 4
    assert all(m["spread"] == pytest.approx(1.0) for m in t["memory"])
    assert t["memory"][0]["bytes_per_token"] == [(32, 1000.0), (64, 1000.0)]
    assert fab.targets(fake_result, head_dim=128)["speed"] == []

"""The command line: info, tour/bench at the quick size, one-line errors."""

import json
import subprocess
import sys

import pytest

from llmopt_lab.cli import main
from llmopt_lab.commands.tour import format_table


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("info", "tour", "bench", "exercises", "train-zoo", "generate"):
        assert cmd in out


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "kernels run" in out and "limits" in out and "GB/s" in out


def _committed_results():
    from llmopt_lab.measure import default_results_root

    root = default_results_root()
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_short_tour_is_quick_and_never_touches_committed_results(tmp_path, capsys, monkeypatch):
    import time

    monkeypatch.setenv("LLMOPT_RESULTS", str(tmp_path / "mine"))
    before = _committed_results()
    t0 = time.perf_counter()
    assert main(["tour", "--quiet"]) == 0
    took = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert "roofline %" in out and "ridge point" in out and "continuous batching" in out
    assert "same tokens: yes" in out and "python -m llmopt_lab bench" in out
    assert "a real model" in out  # SmolLM2's answer, or why it was skipped (no registry, no cache)
    if "a real model: skipped" not in out:
        assert "Paris" in out.split("a real model", 1)[1]
    assert took < 120, f"the tour took {took:.0f} s (first contact: at most two minutes)"
    assert _committed_results() == before  # nothing under results/ written or changed
    first = list((tmp_path / "mine").glob("*/00_tour-*.json"))
    assert len(first) == 1
    data = json.loads(first[0].read_text())
    assert data["lesson"] == "00" and data["generate_tokens_per_s"] > 0
    assert {r["phase"] for r in data["rows"]} == {"prefill", "decode"}
    assert data["serving"]["static"]["stats"]["padding_tokens"] > 0
    assert data["serving"]["continuous"]["stats"]["padding_tokens"] == 0
    assert main(["tour", "--quiet", "--no-real-model"]) == 0  # a second run keeps the first
    assert len(list((tmp_path / "mine").glob("*/00_tour-*.json"))) == 2 and first[0].exists()


def test_bench_default_goes_to_the_learners_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMOPT_RESULTS", str(tmp_path))
    before = _committed_results()
    assert main(["bench", "08", "--size", "quick", "--no-plot", "--quiet"]) == 0
    assert _committed_results() == before
    assert len(list(tmp_path.glob("*/08_speculative-*.json"))) == 1


def test_save_result_stamped_names_never_overwrite(tmp_path):
    from llmopt_lab.measure import save_result

    prov = {"device_slug": "x", "date": "2026-12-03T08:00:00+00:00"}
    a = save_result("r", {"provenance": prov, "v": 1}, root=tmp_path, stamp=True)
    b = save_result("r", {"provenance": prov, "v": 2}, root=tmp_path, stamp=True)
    assert a.name == "r-20261203-080000.json" and b.name == "r-20261203-080000-2.json"
    assert json.loads(a.read_text())["v"] == 1 and json.loads(b.read_text())["v"] == 2


def test_tour_full_quick_writes_results_and_plot(tmp_path, capsys):
    assert main(["tour", "--full", "--size", "quick", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Lesson 01" in out and "prefill" in out and "decode" in out and "roofline %" in out
    assert "generate (HF)" in out
    files = list(tmp_path.glob("*/01_anatomy.json"))
    assert len(files) == 1 and files[0].with_suffix(".png").exists()
    data = json.loads(files[0].read_text())
    assert {"device", "torch", "git_commit", "date"} <= set(data["provenance"])
    rows = data["models"][0]["rows"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["fraction"] for r in rows)
    assert data["models"][0]["transformers"]["n_tokens"] == 8
    kv = json.loads(next(tmp_path.glob("*/02_kv_cache.json")).read_text())
    assert {r["kind"] for r in kv["rows"]} == {"none", "dynamic", "static", "int8"}
    assert len(kv["static_times_s"]) == 64 and kv["static_flatness"] > 0
    spec = json.loads(next(tmp_path.glob("*/08_speculative.json")).read_text())
    draft_rows = [r for r in spec["rows"] if r["method"] == "draft"]
    assert draft_rows and all(r["acceptance_rate"] == 1.0 for r in draft_rows)  # draft = target here
    assert all(r["alpha"] == 1.0 and r["tokens_per_step"] == r["k"] + 1 for r in draft_rows)
    # float32: lossless means the same tokens as plain greedy decoding
    assert all(r["identical_to_plain"] == 1.0 for r in draft_rows if r["mode"] == "greedy")
    assert all(r["verify_cost"] > 0 and r["draft_cost"] > 0 for r in draft_rows)
    for r in spec["rows"]:  # an interval over the prompts around every speed-up but plain's
        if r["method"] == "plain":
            assert "speedup_ci90" not in r
        else:
            lo, hi = r["speedup_ci90"]
            assert 0 < lo <= r["speedup"] <= hi


def test_bench_show_redraws_a_stored_result(tmp_path, capsys):
    # what a GPU machine sends back with --no-plot is summarized and plotted here
    assert main(["bench", "08", "--size", "quick", "--out", str(tmp_path), "--no-plot",
                 "--quiet"]) == 0
    stored = next(tmp_path.glob("*/08_speculative.json"))
    assert not stored.with_suffix(".png").exists()
    capsys.readouterr()
    assert main(["bench", "08", "--show", str(stored)]) == 0
    out = capsys.readouterr().out
    assert "Lesson 08" in out and "lookup" in out and stored.with_suffix(".png").exists()
    assert main(["bench", "02", "--show", str(stored)]) == 1
    assert "holds lesson 08's result" in capsys.readouterr().err
    assert main(["bench", "02", "--show", str(tmp_path / "missing.json")]) == 1


@pytest.mark.parametrize("argv, msg", [
    (["bench", "99"], "no benchmark '99'"),
    (["bench", "01", "--size", "huge"], "unknown size 'huge'"),
    (["bench", "01", "--device", "tpu"], "unknown device"),
])
def test_bad_arguments_are_one_line(argv, msg):
    proc = subprocess.run([sys.executable, "-m", "llmopt_lab", *argv], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and msg in proc.stderr, proc.stderr


def test_format_table():
    text = format_table([{"a": "x", "b": 1, "c": 1234.5678}, {"a": "yy", "b": 22, "c": None}])
    lines = text.splitlines()
    assert lines[0].split() == ["a", "b", "c"] and "1.23e+03" in lines[2] and lines[3].endswith("-")

"""Widget builders work without a browser: moving a slider recomputes the point."""

import pytest

from llmopt_lab import bench, preset
from llmopt_lab.widgets import roofline_explorer, roofline_point


def test_roofline_point_decode_is_memory_bound_and_prefill_compute_bound():
    h100 = bench.table_limits("H100 SXM")
    cfg = preset("llama-7b")
    d = roofline_point(cfg, h100, "bf16", "decode", 1, 1024)
    p = roofline_point(cfg, h100, "bf16", "prefill", 1, 4096)
    assert d["bound_by"] == "memory" and p["bound_by"] == "compute"
    # batch-1 decode of a 7B model in bf16 reads ~13.5 GB of weights: ~4 ms on 3.35 TB/s
    assert 3.5e-3 < d["bound_s"] < 4.5e-3
    with pytest.raises(ValueError):
        roofline_point(cfg, h100, "bf16", "train", 1, 1)


def test_explorer_reacts_to_sliders():
    box = roofline_explorer(preset("llama-7b"), bench.table_limits("H100 SXM"), "bf16")
    first = box.state["intensity"]
    box.controls["batch"].value = 64
    assert box.state["intensity"] > 10 * first  # batching raises intensity (KV reads cap it)
    box.controls["phase"].value = "prefill"
    assert box.state["bound_by"] == "compute"


def test_table_limits_unknown():
    with pytest.raises(ValueError, match="known"):
        bench.table_limits("Z9000")


def test_kv_memory_explorer():
    from llmopt_lab.widgets import kv_memory, kv_memory_explorer

    cfgs = {"llama-7b": preset("llama-7b"), "llama3-8b": preset("llama3-8b")}
    box = kv_memory_explorer(cfgs)
    small = box.state["kv_bytes"]
    assert box.state["kv_bytes"] == 2 * 32 * 32 * 128 * 2 * 1 * 4096  # 2 GiB-ish for 7B at 4k
    box.controls["model"].value = "llama3-8b"  # GQA 4:1: a quarter of the KV bytes
    assert box.state["kv_bytes"] == small / 4
    box.controls["dtype"].value = "int8"
    assert box.state["kv_bytes"] == small / 8
    big = kv_memory(preset("llama-7b"), 256, 4096)
    assert big["fits"] == []  # 512 GiB of KV cache fits on no single GPU


def test_speculative_explorer():
    from llmopt_lab.widgets import speculative_explorer

    box = speculative_explorer({1: 1.2, 2: 1.5})
    box.controls["alpha"].value = 0.0
    assert box.state["tokens_per_step"] == 1.0 and box.state["speedup"] < 1.0
    box.controls["alpha"].value = 0.9
    box.controls["ratio"].value = 0.0
    assert box.state["best_k"] == 12  # free drafts: propose as many as allowed
    box.controls["ratio"].value = 0.5
    assert box.state["best_k"] < 12

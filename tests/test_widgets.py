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

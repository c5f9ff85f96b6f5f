"""Widget builders work without a browser: moving a slider recomputes the point."""

import pytest

from llmopt_lab import measure, preset
from llmopt_lab.course.widgets import roofline_explorer, roofline_point


def test_roofline_point_decode_is_memory_bound_and_prefill_compute_bound():
    h100 = measure.table_limits("H100 SXM")
    cfg = preset("llama-7b")
    d = roofline_point(cfg, h100, "bf16", "decode", 1, 1024)
    p = roofline_point(cfg, h100, "bf16", "prefill", 1, 4096)
    assert d["bound_by"] == "memory" and p["bound_by"] == "compute"
    # batch-1 decode of a 7B model in bf16 reads ~13.5 GB of weights: ~4 ms on 3.35 TB/s
    assert 3.5e-3 < d["bound_s"] < 4.5e-3
    with pytest.raises(ValueError):
        roofline_point(cfg, h100, "bf16", "train", 1, 1)


def test_explorer_reacts_to_sliders():
    box = roofline_explorer(preset("llama-7b"), measure.table_limits("H100 SXM"), "bf16")
    first = box.state["intensity"]
    box.controls["batch"].value = 64
    assert box.state["intensity"] > 10 * first  # batching raises intensity (KV reads cap it)
    box.controls["phase"].value = "prefill"
    assert box.state["bound_by"] == "compute"


def test_table_limits_unknown():
    with pytest.raises(ValueError, match="known"):
        measure.table_limits("Z9000")


def test_kv_memory_explorer():
    from llmopt_lab.course.widgets import kv_memory, kv_memory_explorer

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
    from llmopt_lab.course.widgets import speculative_explorer

    box = speculative_explorer({1: 1.2, 2: 1.5})
    box.controls["alpha"].value = 0.0
    assert box.state["tokens_per_step"] == 1.0 and box.state["speedup"] < 1.0
    box.controls["alpha"].value = 0.9
    box.controls["ratio"].value = 0.0
    assert box.state["best_k"] == 12  # free drafts: propose as many as allowed
    box.controls["ratio"].value = 0.5
    assert box.state["best_k"] < 12


def test_bits_per_weight():
    from llmopt_lab.course.widgets import bits_per_weight

    # int4, zero point, groups of 128: 4 + (32 + 8) / 128 bits per weight
    assert bits_per_weight([(256, 768)], 4, "group", 128) == 4 + 40 / 128
    assert bits_per_weight([(256, 768)], 8, "channel", None, symmetric=True) == 8 + 32 / 768
    assert bits_per_weight([(10, 10), (30, 10)], 4, "tensor", None, True) == 4 + 2 * 32 / 400


def test_quantization_explorer_and_model_quality():
    import torch

    from llmopt_lab import Transformer
    from llmopt_lab.course.widgets import fake_quantized_quality, quantization_explorer

    cfg = preset("tiny").replace(num_layers=2)
    model = Transformer.from_config(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    quality = fake_quantized_quality(model, ids)
    before = [p.clone() for p in model.parameters()]
    box = quantization_explorer(model.layers[0].mlp.down_proj.weight, quality_fn=quality)
    options = box.controls["granularity"].options
    assert options[-1] == "group 32" and "group 256" not in options  # K = 384
    assert box.state["bits"] == 4 and box.state["quality"] is None
    at4 = box.state["rel_rms"]
    box.controls["bits"].value = 8
    assert box.state["rel_rms"] < at4 / 10  # 4 more bits: 16x finer steps
    box.controls["granularity"].value = "per tensor"
    coarse = box.state["rel_rms"]
    box.controls["granularity"].value = "group 32"
    assert box.state["rel_rms"] < coarse
    box.controls["measure"].click()
    q8 = box.state["quality"]
    assert q8["bits_per_weight"] == 8 + 40 / 32 and q8["top1"] > 0.9
    box.controls["bits"].value = 2
    assert box.state["quality"] is None  # a new setting: not measured yet
    box.controls["measure"].click()
    assert box.state["quality"]["kl"] > 10 * q8["kl"]
    # the model itself is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="2-D"):
        quantization_explorer(torch.zeros(4))


@pytest.mark.parametrize("build", ["roofline", "kv", "speculative", "quantization"])
def test_explorer_display_carries_a_static_fallback(build):
    """Where no kernel runs the widget (a fresh clone, GitHub), the stored output
    shows a picture of the default view and a line saying to run the cell,
    not the widget's 'VBox(children=...' repr."""
    import base64

    import torch

    from llmopt_lab.course import widgets as wd

    if build == "roofline":
        box = wd.roofline_explorer(preset("llama-7b"), measure.table_limits("H100 SXM"), "bf16")
    elif build == "kv":
        box = wd.kv_memory_explorer({"llama-7b": preset("llama-7b")})
    elif build == "speculative":
        box = wd.speculative_explorer({2: 1.5})
    else:
        box = wd.quantization_explorer(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)))
    first_png = box.fallback_png
    data = box._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data  # the live widget, in a kernel
    assert data["text/plain"].startswith(wd.FALLBACK_TEXT)
    assert "VBox(" not in data["text/plain"] and "<" not in data["text/plain"]
    assert base64.b64decode(data["image/png"])[:4] == b"\x89PNG"
    control, value = {"roofline": ("batch", 64), "kv": ("batch", 64), "speculative": ("k", 8),
                      "quantization": ("bits", 8)}[build]
    box.controls[control].value = value
    assert box.fallback_png is first_png  # the default view, not the latest one

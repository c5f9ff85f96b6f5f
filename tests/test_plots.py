"""Tests of llmopt_lab.measure.plots: figures built under Agg, their artists, the Pareto front."""

import matplotlib

matplotlib.use("Agg")

import io  # noqa: E402

import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from llmopt_lab import measure  # noqa: E402
from llmopt_lab.errors import MeasureError, UnsupportedDtypeError  # noqa: E402
from llmopt_lab.measure import plots  # noqa: E402

PROV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
        "transformers": "5.0.0", "git_commit": "0123456789abcdef0123456789abcdef01234567-dirty",
        "date": "2026-01-02T03:04:05+00:00"}

LIMITS = measure.DeviceLimits("NVIDIA H100 80GB HBM3", {"bf16": 989.4e12, "fp8": 1978.9e12},
                            bandwidth=3.35e12, source="table")


def _stamp(fig: Figure) -> str:
    texts = [t.get_text() for t in fig.texts if t.get_gid() == "provenance"]
    assert len(texts) == 1
    return texts[0]


def _renders(fig: Figure) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"


def test_stamp_text():
    text = plots.stamp_text(PROV)
    assert text == ("NVIDIA H100 80GB HBM3 | torch 2.11.0 | triton 3.6.0 | transformers 5.0.0 | "
                    "0123456789-dirty | 2026-01-02")
    assert plots.stamp_text({}) == "unknown device"


def test_roofline_artists():
    points = [("decode b=1", 1.0, 2.5e12), ("prefill 2k", 600.0, 700e12), ("gemm", 2000.0, 800e12)]
    fig = plots.roofline(LIMITS, points, dtypes=["bf16", "fp8"], provenance=PROV)
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # memory roof + two compute roofs
    assert len(ax.collections) == 3  # one scatter per point
    assert [t.get_text() for t in ax.texts] == [p[0] for p in points]
    memory = ax.lines[0]
    x, y = memory.get_data()
    assert y[1] / x[1] == pytest.approx(3.35e12 / 1e12)  # TFLOP/s per FLOP/byte
    assert x[1] == pytest.approx(1978.9e12 / 3.35e12)  # runs to the highest ridge
    assert ax.lines[1].get_ydata()[0] == pytest.approx(989.4)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "TFLOP/s" in ax.get_ylabel()
    assert "NVIDIA H100" in _stamp(fig)
    _renders(fig)
    assert len(plots.roofline(LIMITS, provenance=PROV).axes[0].lines) == 2  # bf16 by default
    with pytest.raises(UnsupportedDtypeError, match="has no int8 figure"):
        plots.roofline(LIMITS, dtypes=["int8"], provenance=PROV)


def test_speedup_bars_artists():
    labels = ["eager", "compiled", "cuda graph"]
    fig = plots.speedup_bars(labels, [1.0, 1.8, 3.2], baseline="eager", provenance=PROV)
    ax = fig.axes[0]
    assert len(ax.patches) == 3
    assert [t.get_text() for t in ax.texts] == ["1.00x", "1.80x", "3.20x"]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert len(ax.lines) == 1 and list(ax.lines[0].get_ydata()) == [1.0, 1.0]
    assert ax.patches[0].get_facecolor() != ax.patches[1].get_facecolor()  # baseline is grey
    _stamp(fig)
    _renders(fig)
    with pytest.raises(MeasureError):
        plots.speedup_bars(labels, [1.0], provenance=PROV)


def test_pareto_front_hand_example():
    # (speed, quality), both higher is better
    points = [(10, 0.90), (20, 0.85), (15, 0.80), (30, 0.60), (5, 0.95), (25, 0.60), (30, 0.55)]
    # (15, .80) is dominated by (20, .85); (25, .60) by (30, .60); (30, .55) by (30, .60)
    assert plots.pareto_front(points) == [4, 0, 1, 3]
    # quality as perplexity, lower is better
    ppl = [(10, 9.0), (20, 9.5), (15, 9.6), (30, 12.0)]
    assert plots.pareto_front(ppl, maximize=(True, False)) == [0, 1, 3]
    assert plots.pareto_front([(1, 1), (1, 1)]) == [0, 1]  # ties stay
    assert plots.pareto_front([]) == []


def test_pareto_artists():
    speed = [10, 20, 15, 30]
    ppl = [9.0, 9.5, 9.6, 12.0]
    labels = ["fp16", "int8", "int8-bad", "int4"]
    fig = plots.pareto(ppl, speed, labels, higher_quality_is_better=False,
                       quality_label="perplexity", provenance=PROV)
    ax = fig.axes[0]
    assert len(ax.collections) == 2  # all points, front highlighted
    assert len(ax.collections[0].get_offsets()) == 4
    assert len(ax.collections[1].get_offsets()) == 3
    assert list(ax.lines[0].get_xdata()) == [10, 20, 30]
    assert [t.get_text() for t in ax.texts] == labels
    assert "lower is better" in ax.get_ylabel()
    _stamp(fig)
    _renders(fig)


def test_sweep_artists():
    x = [1, 2, 4, 8, 16]
    series = {"eager": [10, 19, 36, 60, 80], "graph": [30, 55, 100, 150, float("nan")]}
    fig = plots.sweep(x, series, "batch size", "tokens/s", logx=True, logy=True, provenance=PROV)
    ax = fig.axes[0]
    assert len(ax.lines) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["eager", "graph"]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "batch size"
    _stamp(fig)
    _renders(fig)
    with pytest.raises(MeasureError):
        plots.sweep(x, {"short": [1, 2]}, "x", "y", provenance=PROV)


def test_draws_into_given_axes_and_stamps_own_provenance():
    fig = Figure()
    ax = fig.add_subplot()
    out = plots.sweep([1, 2], {"a": [1, 2]}, "x", "y", ax=ax)
    assert out is fig
    assert measure.device_name("cpu") in _stamp(fig)  # this process's provenance


def test_roofline_of_a_datasheet_says_so_in_its_stamp():
    """Datasheet roofs drawn on another machine must not read as measured there."""
    fig = plots.roofline(LIMITS, [("decode b=1", 1.0, 3e12)], provenance=None)
    text = _stamp(fig)
    assert text.startswith("datasheet roofs (NVIDIA H100 80GB HBM3); drawn on ")
    assert measure.device_name("cpu") in text  # the machine that drew it, named as such
    assert "(datasheet)" in fig.axes[0].get_title()
    measured = plots.roofline(LIMITS, [("decode b=1", 1.0, 3e12)], provenance=PROV)
    assert _stamp(measured).startswith("datasheet roofs (NVIDIA H100 80GB HBM3); points measured on "
                                       "NVIDIA H100")
    own = measure.DeviceLimits("AMD EPYC", {"fp32": 0.19e12}, bandwidth=37e9, source="measured")
    assert _stamp(plots.roofline(own, provenance=PROV)) == plots.stamp_text(PROV)


def test_roofline_labels_of_close_points_do_not_overlap():
    limits = measure.DeviceLimits("cpu", {"fp32": 0.19e12}, bandwidth=37e9, source="measured")
    points = [("prefill b=1 T=256", 40.0, 120e9), ("prefill b=4 T=256", 52.0, 130e9),
              ("prefill b=1 T=64", 19.0, 78e9), ("decode b=1", 0.5, 3.9e9)]
    fig = plots.roofline(limits, points, dtypes=["fp32"], provenance=PROV)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in fig.axes[0].texts]
    assert [t.get_text() for t in fig.axes[0].texts] == [p[0] for p in points]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (points[i][0], points[j][0])

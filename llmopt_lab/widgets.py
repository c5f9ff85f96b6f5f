"""Interactive controls for the lessons (ipywidgets).

Builders live here, not in the notebooks, so they are tested in plain pytest:
setting ``slider.value`` runs the callbacks at once, and each builder keeps
its latest computed numbers in ``widget.state``.
"""

from __future__ import annotations

from typing import Any

from . import bench
from .config import ModelConfig

POWERS_OF_TWO = [2 ** i for i in range(0, 15)]


def roofline_point(config: ModelConfig, limits: "bench.DeviceLimits", dtype: Any, phase: str,
                   batch: int, seq_len: int) -> dict:
    """Where one step lands on a device's roofline (analytic, no measurement).

    phase "prefill": a prompt of seq_len tokens per sequence; "decode": one
    token per sequence after seq_len tokens of context. Returns FLOPs, bytes,
    intensity (FLOP/byte), the roofline-bound time (s), which roof binds, the
    attainable FLOP/s and the tokens/s the bound allows.
    """
    if phase == "prefill":
        cost = bench.step_cost(config, batch, seq_len, 0, dtype)
        tokens = batch * seq_len
    elif phase == "decode":
        cost = bench.step_cost(config, batch, 1, seq_len, dtype)
        tokens = batch
    else:
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    t_compute = cost.flops / limits.flops(dtype)
    t_memory = cost.bytes / limits.bandwidth
    bound = max(t_compute, t_memory)
    return dict(flops=cost.flops, bytes=cost.bytes, intensity=cost.intensity, bound_s=bound,
                bound_by="memory" if t_memory >= t_compute else "compute",
                attainable_flops=cost.flops / bound, tokens_per_s=tokens / bound)


def roofline_explorer(config: ModelConfig, limits: "bench.DeviceLimits", dtype: Any = "bf16",
                      provenance: dict | None = None):
    """Sliders for batch size and sequence length (and the phase) that move a
    step's point on ``limits``' roofline and say which roof binds.

    Returns an ipywidgets VBox with ``.state`` (the latest
    :func:`roofline_point` dict) and ``.controls`` (batch, seq, phase widgets).
    """
    import ipywidgets as W
    import matplotlib.pyplot as plt

    from . import plots

    batch = W.SelectionSlider(options=POWERS_OF_TWO[:11], value=1, description="batch")
    seq = W.SelectionSlider(options=POWERS_OF_TWO[4:], value=1024, description="seq len")
    phase = W.ToggleButtons(options=["decode", "prefill"], value="decode", description="phase")
    label = W.HTML()
    out = W.Output()
    box = W.VBox([W.HBox([batch, seq]), phase, label, out])
    box.controls = {"batch": batch, "seq": seq, "phase": phase}
    key = bench.dtype_key(dtype)

    def redraw(_=None):
        p = roofline_point(config, limits, key, phase.value, batch.value, seq.value)
        box.state = p
        label.value = (
            f"<b>{config.name}</b>, {phase.value}, batch {batch.value}, seq {seq.value}: "
            f"{p['intensity']:.3g} FLOP/byte, bound by <b>{p['bound_by']}</b>; at best "
            f"{p['bound_s'] * 1e3:.3g} ms per step = {p['tokens_per_s']:.3g} tokens/s "
            f"on {limits.name}")
        fig = plots.roofline(limits, [(f"{phase.value} b={batch.value}", p["intensity"],
                                       p["attainable_flops"])], dtypes=[key],
                             provenance=provenance, intensity_range=(0.1, 1e5))
        with out:
            out.clear_output(wait=True)
            from IPython.display import display

            display(fig)
        plt.close("all")

    for w in (batch, seq, phase):
        w.observe(redraw, names="value")
    redraw()
    return box

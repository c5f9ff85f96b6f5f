"""Interactive controls for the lessons (ipywidgets).

Builders live here, not in the notebooks, so they are tested in plain pytest:
setting ``slider.value`` runs the callbacks at once, and each builder keeps
its latest computed numbers in ``widget.state``.

Each explorer is an :class:`Explorer` box: displayed, it sends the live widget
and, beside it, a static PNG of its default view and a plain-text line
(:data:`FALLBACK_TEXT`). A notebook opened without a running kernel (freshly
cloned, untrusted, on GitHub) shows that picture and line instead of the
widget's ``VBox(children=...`` repr.
"""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

from .. import measure
from ..config import ModelConfig

POWERS_OF_TWO = [2 ** i for i in range(0, 15)]

#: the plain-text line an explorer's stored output shows where no widget can run
FALLBACK_TEXT = ("Run this cell to use the interactive explorer "
                 "(the picture below is its default view).")

_EXPLORER_CLASS = None


def _explorer_box(children=()):
    """A new :class:`Explorer` (an ipywidgets VBox with a static fallback)."""
    global _EXPLORER_CLASS
    if _EXPLORER_CLASS is None:
        import ipywidgets as W

        class Explorer(W.VBox):
            """A VBox whose display carries, beside the widget view, a PNG of its
            default view (``fallback_png``) and :data:`FALLBACK_TEXT` plus that
            view's numbers (``fallback_text``) as text/plain."""

            fallback_png: bytes | None = None
            fallback_text: str = ""

            def _repr_mimebundle_(self, **kwargs):
                data = dict(super()._repr_mimebundle_(**kwargs) or {})
                data["text/plain"] = FALLBACK_TEXT + (
                    "\nDefault view: " + self.fallback_text if self.fallback_text else "")
                if self.fallback_png:
                    data["image/png"] = base64.b64encode(self.fallback_png).decode("ascii")
                return data

        _EXPLORER_CLASS = Explorer
    return _EXPLORER_CLASS(children)


def _remember_default_view(box, fig, label_html: str) -> None:
    """Keep the first drawn view (the default settings) as the box's fallback."""
    if box.fallback_png is not None:
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    box.fallback_png = buf.getvalue()
    box.fallback_text = html.unescape(re.sub(r"<[^>]+>", "", label_html))


def roofline_point(config: ModelConfig, limits: "measure.DeviceLimits", dtype: Any, phase: str,
                   batch: int, seq_len: int) -> dict:
    """Where one step lands on a device's roofline (analytic, no measurement).

    phase "prefill": a prompt of seq_len tokens per sequence; "decode": one
    token per sequence after seq_len tokens of context. Returns FLOPs, bytes,
    intensity (FLOP/byte), the roofline-bound time (s), which roof binds, the
    attainable FLOP/s and the tokens/s the bound allows.
    """
    if phase == "prefill":
        cost = measure.step_cost(config, batch, seq_len, 0, dtype)
        tokens = batch * seq_len
    elif phase == "decode":
        cost = measure.step_cost(config, batch, 1, seq_len, dtype)
        tokens = batch
    else:
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    t_compute = cost.flops / limits.flops(dtype)
    t_memory = cost.bytes / limits.bandwidth
    bound = max(t_compute, t_memory)
    return dict(flops=cost.flops, bytes=cost.bytes, intensity=cost.intensity, bound_s=bound,
                bound_by="memory" if t_memory >= t_compute else "compute",
                attainable_flops=cost.flops / bound, tokens_per_s=tokens / bound)


def roofline_explorer(config: ModelConfig, limits: "measure.DeviceLimits", dtype: Any = "bf16",
                      provenance: dict | None = None):
    """Sliders for batch size and sequence length (and the phase) that move a
    step's point on ``limits``' roofline and say which roof binds.

    Returns an ipywidgets VBox with ``.state`` (the latest
    :func:`roofline_point` dict) and ``.controls`` (batch, seq, phase widgets).
    """
    import ipywidgets as W
    import matplotlib.pyplot as plt

    from ..measure import plots

    batch = W.SelectionSlider(options=POWERS_OF_TWO[:11], value=1, description="batch")
    seq = W.SelectionSlider(options=POWERS_OF_TWO[4:], value=1024, description="seq len")
    phase = W.ToggleButtons(options=["decode", "prefill"], value="decode", description="phase")
    label = W.HTML()
    out = W.Output()
    box = _explorer_box([W.HBox([batch, seq]), phase, label, out])
    box.controls = {"batch": batch, "seq": seq, "phase": phase}
    key = measure.dtype_key(dtype)

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
        _remember_default_view(box, fig, label.value)
        with out:
            out.clear_output(wait=True)
            from IPython.display import display

            display(fig)
        plt.close("all")

    for w in (batch, seq, phase):
        w.observe(redraw, names="value")
    redraw()
    return box


#: GPUs whose memory the KV explorer draws (keys of measure.GPU_TABLE)
MEMORY_GPUS = ("T4", "L4", "A100 SXM 40GB", "A100 SXM 80GB", "H100 SXM", "H200 SXM")


def kv_memory(config: ModelConfig, batch: int, context: int, dtype: Any = "bfloat16",
              weight_dtype: Any = "bfloat16") -> dict:
    """KV-cache and weight bytes of a model at a batch and context, and which
    of :data:`MEMORY_GPUS` hold both (one GPU, no room left for activations)."""
    from ..config import bytes_per_element
    from ..cache import kv_cache_bytes

    kv = kv_cache_bytes(config, batch, context, dtype)
    weights = config.num_parameters() * bytes_per_element(weight_dtype)
    fits = [g for g in MEMORY_GPUS if kv + weights <= measure.GPU_TABLE[g].memory_gb * 1e9]
    return dict(kv_bytes=kv, weight_bytes=weights, total_bytes=kv + weights, fits=fits)


def kv_memory_explorer(configs: dict[str, ModelConfig]):
    """Pick a model, batch, context and cache dtype; see the KV cache's size
    next to the weights and the memory of common GPUs.

    configs: {label: ModelConfig}. Returns an ipywidgets VBox with ``.state``
    (the latest :func:`kv_memory` dict) and ``.controls``.
    """
    import ipywidgets as W
    from matplotlib.figure import Figure

    model = W.Dropdown(options=list(configs), description="model")
    batch = W.SelectionSlider(options=POWERS_OF_TWO[:11], value=1, description="batch")
    context = W.SelectionSlider(options=POWERS_OF_TWO[8:], value=4096, description="context")
    dtype = W.Dropdown(options=["float32", "bfloat16", "int8", "int4"], value="bfloat16",
                       description="KV dtype")
    label = W.HTML()
    out = W.Output()
    box = _explorer_box([W.HBox([model, dtype]), W.HBox([batch, context]), label, out])
    box.controls = {"model": model, "batch": batch, "context": context, "dtype": dtype}

    def redraw(_=None):
        cfg = configs[model.value]
        s = kv_memory(cfg, batch.value, context.value, dtype.value)
        box.state = s
        label.value = (f"KV cache <b>{s['kv_bytes'] / 1e9:.3g} GB</b> + weights (bf16) "
                       f"{s['weight_bytes'] / 1e9:.3g} GB; fits on: "
                       f"{', '.join(s['fits']) if s['fits'] else 'none of these GPUs'}")
        fig = Figure(figsize=(6.4, 2.6), layout="constrained")
        ax = fig.add_subplot()
        ax.barh(["weights", "KV cache"], [s["weight_bytes"] / 1e9, s["kv_bytes"] / 1e9],
                color=["0.6", "tab:blue"])
        for g in MEMORY_GPUS:
            gb = measure.GPU_TABLE[g].memory_gb
            ax.axvline(gb, color="tab:red", lw=0.8, ls="--")
            ax.text(gb, 1.45, g, rotation=90, fontsize=7, va="top", ha="right", color="tab:red")
        ax.set_xscale("log")
        ax.set_xlabel("GB")
        _remember_default_view(box, fig, label.value)
        with out:
            out.clear_output(wait=True)
            from IPython.display import display

            display(fig)

    for w in (model, batch, context, dtype):
        w.observe(redraw, names="value")
    redraw()
    return box


def speculative_explorer(measured: dict | None = None):
    """Sliders for the acceptance rate, k and the draft's cost ratio, showing
    the predicted tokens per target step and speed-up against k.

    measured: optional {k: measured speed-up} drawn as points. Returns an
    ipywidgets VBox with ``.state`` ({'tokens_per_step', 'speedup', 'best_k'})
    and ``.controls``.
    """
    import ipywidgets as W
    from matplotlib.figure import Figure

    from ..speculative import expected_speedup, expected_tokens_per_step

    alpha = W.FloatSlider(value=0.7, min=0.0, max=0.99, step=0.01, description="accept rate")
    k = W.IntSlider(value=4, min=1, max=12, description="k")
    ratio = W.FloatSlider(value=0.2, min=0.0, max=1.0, step=0.01, description="cost ratio")
    label = W.HTML()
    out = W.Output()
    box = _explorer_box([W.HBox([alpha, k, ratio]), label, out])
    box.controls = {"alpha": alpha, "k": k, "ratio": ratio}

    def redraw(_=None):
        ks = list(range(1, 13))
        curve = [expected_speedup(alpha.value, j, ratio.value) for j in ks]
        best = ks[max(range(len(ks)), key=lambda i: curve[i])]
        box.state = dict(tokens_per_step=expected_tokens_per_step(alpha.value, k.value),
                         speedup=expected_speedup(alpha.value, k.value, ratio.value), best_k=best)
        label.value = (f"k={k.value}: {box.state['tokens_per_step']:.2f} tokens per target step, "
                       f"predicted speed-up <b>{box.state['speedup']:.2f}x</b>; best k here: {best}")
        fig = Figure(figsize=(6.4, 3.2), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(ks, curve, marker="o", label="predicted")
        if measured:
            ax.plot(list(measured), list(measured.values()), "s", label="measured")
        ax.axhline(1.0, color="0.5", lw=0.8)
        ax.set_xlabel("k")
        ax.set_ylabel("speed-up")
        ax.legend()
        _remember_default_view(box, fig, label.value)
        with out:
            out.clear_output(wait=True)
            from IPython.display import display

            display(fig)

    for w in (alpha, k, ratio):
        w.observe(redraw, names="value")
    redraw()
    return box


#: granularities the quantization explorer offers: label -> (granularity, group size)
QUANT_GRANULARITIES = {"per tensor": ("tensor", None), "per channel": ("channel", None),
                       "group 256": ("group", 256), "group 128": ("group", 128),
                       "group 64": ("group", 64), "group 32": ("group", 32)}


def bits_per_weight(shapes, bits: int, granularity: str = "group", group_size: int | None = 128,
                    symmetric: bool = False) -> float:
    """Storage per weight, in bits, of ``bits``-bit codes plus their scales
    (float32) and zero points (uint8, when not symmetric), as the course's
    formats store them, averaged over weights of the given (N, K) shapes."""
    per_scale = 32 + (0 if symmetric else 8)
    total = weights = 0
    for N, K in shapes:
        if granularity == "tensor":
            scales = 1
        else:
            scales = N if granularity == "channel" else N * (K // group_size)
        total += N * K * bits + scales * per_scale
        weights += N * K
    return total / weights


def fake_quantized_quality(model, evalset_ids, lengths=None, include_lm_head: bool = False):
    """A function that measures ``model`` with its linear weights rounded
    (:func:`~llmopt_lab.transforms.quantize.fake_quantize`) at any setting.

    The returned ``quality(bits=4, granularity="group", group_size=128,
    symmetric=False)`` writes the fake-quantized weights of ``model``'s
    decoder-block linear layers (and the lm_head if asked) into one private
    copy of the model, compares it with ``model`` on the windows
    ``evalset_ids`` (N, W) / ``lengths`` (N,) with
    :func:`~llmopt_lab.transforms.quantize.compare_quality`, and returns that
    dict plus ``bits_per_weight`` (:func:`bits_per_weight`). Results are
    cached per setting; ``model`` itself is never modified.
    """
    import copy

    import torch

    from ..transforms.quantize import compare_quality, fake_quantize, linear_layers

    source = linear_layers(model, include_lm_head)
    work = copy.deepcopy(model)
    targets = linear_layers(work, include_lm_head)
    shapes = [tuple(m.weight.shape) for m in source.values()]
    cache: dict = {}

    def quality(bits: int = 4, granularity: str = "group", group_size: int | None = 128,
                symmetric: bool = False) -> dict:
        key = (bits, granularity, group_size if granularity == "group" else None, symmetric)
        if key not in cache:
            with torch.no_grad():
                for name, m in targets.items():
                    m.weight.copy_(fake_quantize(source[name].weight.detach(), bits, symmetric,
                                                 granularity, key[2]))
            res = compare_quality(model, work, evalset_ids, lengths)
            res["bits_per_weight"] = bits_per_weight(shapes, bits, granularity, key[2], symmetric)
            cache[key] = res
        return dict(cache[key])

    return quality


def quantization_explorer(weight, quality_fn=None, name: str = "weight"):
    """Sliders for bits (2-8), granularity and symmetric/zero-point rounding of
    one weight matrix (N, K): shows the reconstruction error (relative rms,
    SQNR, bits per weight) and a histogram of the rounding error.

    quality_fn: optional ``f(bits, granularity, group_size, symmetric) -> dict``
    (e.g. :func:`fake_quantized_quality`) run by a button, for the whole
    model's perplexity delta, KL and top-1 agreement at the same setting.
    Returns an ipywidgets VBox with ``.state`` (the latest
    :func:`~llmopt_lab.transforms.quantize.quantization_error` dict plus
    bits, granularity, group_size, symmetric, bits_per_weight, and ``quality``:
    the last measurement at this setting or None) and ``.controls``.
    """
    import ipywidgets as W
    from matplotlib.figure import Figure

    from ..transforms.quantize import fake_quantize, quantization_error

    w = weight.detach().float()
    if w.dim() != 2:
        raise ValueError("quantization_explorer expects a 2-D weight (N, K), got shape "
                         f"{tuple(w.shape)}")
    options = [k for k, (_, gs) in QUANT_GRANULARITIES.items()
               if gs is None or w.shape[1] % gs == 0]
    bits = W.IntSlider(value=4, min=2, max=8, description="bits")
    start = "group 128" if "group 128" in options else "per channel"
    gran = W.Dropdown(options=options, value=start, description="scales")
    sym = W.ToggleButtons(options=[("zero point", False), ("absmax", True)], value=False,
                          description="rounding")
    label = W.HTML()
    out = W.Output()
    rows = [W.HBox([bits, gran]), sym, label, out]
    box = _explorer_box()
    box.controls = {"bits": bits, "granularity": gran, "symmetric": sym}
    if quality_fn is not None:
        button = W.Button(description="measure the model")
        qlabel = W.HTML("whole model: press the button")
        rows[3:3] = [W.HBox([button, qlabel])]
        box.controls["measure"] = button
    box.children = rows

    def setting():
        g, gs = QUANT_GRANULARITIES[gran.value]
        return dict(bits=bits.value, granularity=g, group_size=gs, symmetric=sym.value)

    def redraw(_=None):
        s = setting()
        err = quantization_error(w, **s)
        box.state = dict(err, **s, bits_per_weight=bits_per_weight([tuple(w.shape)], **s),
                         quality=None)
        label.value = (f"<b>{name}</b> {tuple(w.shape)}, {s['bits']}-bit {gran.value}, "
                       f"{'absmax' if s['symmetric'] else 'zero point'}: relative rms error "
                       f"<b>{err['rel_rms']:.2%}</b>, SQNR {err['sqnr_db']:.1f} dB, "
                       f"{box.state['bits_per_weight']:.2f} bits per weight")
        if quality_fn is not None:
            qlabel.value = "whole model: press the button"
        e = (fake_quantize(w, **s) - w).flatten()
        fig = Figure(figsize=(6.4, 2.8), layout="constrained")
        ax = fig.add_subplot()
        ax.hist(e.numpy(), bins=101, color="tab:purple")
        ax.set_yscale("log")
        ax.set_xlabel("rounding error")
        ax.set_ylabel("weights")
        _remember_default_view(box, fig, label.value)
        with out:
            out.clear_output(wait=True)
            from IPython.display import display

            display(fig)

    def measure(_=None):
        s = setting()
        r = quality_fn(**s)
        box.state["quality"] = r
        qlabel.value = (f"whole model: perplexity {r['ppl']:.4g} ({r['ppl_delta_pct']:+.3g}%), "
                        f"KL {r['kl']:.2g} nats/token, top-1 agreement {100 * r['top1']:.1f}%")

    for c in (bits, gran, sym):
        c.observe(redraw, names="value")
    if quality_fn is not None:
        button.on_click(measure)
    redraw()
    return box

"""The course's standard plots, each stamped with the device and versions.

Every function returns a :class:`matplotlib.figure.Figure` and never calls
``plt.show()``: a notebook displays the returned figure, a script saves it.
Figures are made with ``matplotlib.figure.Figure`` (not through pyplot), so
a notebook shows each one once and nothing piles up in pyplot's registry.
Pass ``ax=`` to draw into an existing axes instead.

Each figure carries a small grey line in its bottom-right corner saying
where the numbers come from (device, torch / triton / transformers versions,
commit, date), taken from a :func:`llmopt_lab.measure.provenance` dict: the
one stored with a result, or this process's when none is given.
"""

from __future__ import annotations

from typing import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine

from ..errors import MeasureError
from . import results
from .device import DeviceLimits

__all__ = ["stamp", "stamp_text", "roofline", "speedup_bars", "pareto_front", "pareto", "sweep"]

_FRONT_COLOR = "tab:red"


def stamp_text(provenance: dict) -> str:
    """One line: device | torch | triton | transformers | commit | date."""
    p = provenance
    parts = [str(p.get("device", "unknown device"))]
    for key in ("torch", "triton", "transformers"):
        if p.get(key):
            parts.append(f"{key} {p[key]}")
    commit = str(p.get("git_commit", ""))
    if commit and commit != "unknown":
        parts.append(commit[:10] + ("-dirty" if commit.endswith("-dirty") else ""))
    if p.get("date"):
        parts.append(str(p["date"])[:10])
    return " | ".join(parts)


def stamp(fig: Figure, provenance: dict | None = None, prefix: str = "") -> None:
    """Write :func:`stamp_text` small and grey in the figure's bottom-right corner
    (this process's provenance when none is given), after ``prefix`` (e.g. a
    note that the figures come from a datasheet, not from this machine)."""
    text = prefix + stamp_text(provenance if provenance is not None else results.provenance())
    engine = fig.get_layout_engine()
    if isinstance(engine, ConstrainedLayoutEngine):
        engine.set(rect=(0, 0.03, 1, 0.97))  # keep the bottom strip for the stamp
    fig.text(0.995, 0.005, text, ha="right", va="bottom", fontsize=6, color="0.45",
             gid="provenance")


def _axes(ax: Axes | None, figsize=(6.4, 4.2)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _flops_unit(value: float) -> tuple[float, str]:
    for scale, unit in ((1e12, "TFLOP/s"), (1e9, "GFLOP/s")):
        if value >= scale:
            return scale, unit
    return 1e6, "MFLOP/s"


def roofline(limits: DeviceLimits, points: Sequence[tuple[str, float, float]] = (), *,
             dtypes: Sequence[str] | None = None, provenance: dict | None = None,
             ax: Axes | None = None, title: str | None = None,
             intensity_range: tuple[float, float] | None = None) -> Figure:
    """A log-log roofline: attainable FLOP/s against arithmetic intensity.

    limits: a :class:`~llmopt_lab.measure.DeviceLimits`. points: (label,
    intensity in FLOP/byte, achieved FLOP/s) per measurement. dtypes: which
    compute roofs to draw (keys of ``limits.peak_flops``; default bf16 if
    present, else every dtype known). Draws one memory roof (bandwidth x
    intensity, up to the highest ridge point), one compute roof per dtype
    (from its ridge point on), one scatter per point, labelled.
    Returns the Figure. Raises KeyError for a dtype the limits lack.
    """
    fig, ax = _axes(ax)
    if dtypes is None:
        dtypes = ["bf16"] if "bf16" in limits.peak_flops else list(limits.peak_flops)
    peaks = {d: limits.flops(d) for d in dtypes}
    ridges = {d: p / limits.bandwidth for d, p in peaks.items()}
    xs = [i for _, i, _ in points]
    lo = min([min(ridges.values()) / 100] + [x / 2 for x in xs])
    hi = max([max(ridges.values()) * 100] + [x * 2 for x in xs])
    if intensity_range is not None:
        lo, hi = intensity_range
    scale, unit = _flops_unit(max(peaks.values()))
    top_ridge = max(ridges.values())
    ax.plot([lo, top_ridge], [limits.bandwidth * lo / scale, limits.bandwidth * top_ridge / scale],
            color="k", lw=2, label=f"memory {limits.bandwidth / 1e9:.0f} GB/s")
    for d in dtypes:
        ax.plot([ridges[d], hi], [peaks[d] / scale] * 2, lw=2, ls="-",
                label=f"{d} peak {peaks[d] / scale:.3g} {unit}")
    for label, intensity, achieved in points:
        ax.scatter([intensity], [achieved / scale], zorder=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel(unit)
    source = "datasheet" if limits.source == "table" else limits.source
    ax.set_title(title or f"Roofline of {limits.name} ({source})")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    prefix = ""
    if limits.source == "table":
        # the roofs are a vendor's figures, not a measurement on the machine that drew them
        prefix = f"datasheet roofs ({limits.name}); " + (
            "points measured on " if provenance is not None and points else "drawn on ")
    stamp(fig, provenance, prefix=prefix)
    _label_points(ax, [(label, x, y / scale) for label, x, y in points])
    return fig


#: where a point's label may go, in points from the point: (dx, dy, ha, va),
#: first choice first (below-right keeps clear of a rising memory roof)
_LABEL_SPOTS = [(6, -3, "left", "top"), (6, 3, "left", "bottom"), (-6, 3, "right", "bottom"),
                (-6, -3, "right", "top"), (6, -14, "left", "top"), (6, 14, "left", "bottom"),
                (-6, 14, "right", "bottom"), (-6, -14, "right", "top"), (0, -8, "center", "top"),
                (0, 8, "center", "bottom"), (6, -25, "left", "top"), (6, 25, "left", "bottom")]


def _label_points(ax: Axes, points: Sequence[tuple[str, float, float]], fontsize: float = 8) -> None:
    """Annotate each (label, x, y) point, one text per point in the given order,
    at the first spot of :data:`_LABEL_SPOTS` whose text box (estimated from
    the label's length) overlaps no marker and no label already placed; the
    spot it overlaps least when none is free."""
    fig = ax.figure
    ax.autoscale_view()
    if fig.get_layout_engine() is not None:
        fig.draw_without_rendering()  # settle the layout: positions below are final
    to_pts = 72.0 / fig.dpi
    height = fontsize * 1.2
    where = [tuple(v * to_pts for v in ax.transData.transform((x, y))) for _, x, y in points]
    # the markers are obstacles too (about 6 points across)
    placed: list[tuple[float, float, float, float]] = [(px - 4, py - 4, px + 4, py + 4)
                                                       for px, py in where]
    for (label, x, y), (px, py) in zip(points, where):
        width = 0.6 * fontsize * len(label)
        best = None  # (overlap with what is placed, spot, box): the first free spot, else the least covered
        for spot in _LABEL_SPOTS:
            dx, dy, ha, va = spot
            x0 = px + dx - {"left": 0.0, "center": width / 2, "right": width}[ha]
            y0 = py + dy - (height if va == "top" else 0)
            cand = (x0, y0, x0 + width, y0 + height)
            overlap = sum(max(0.0, min(cand[2], b[2]) - max(cand[0], b[0]))
                          * max(0.0, min(cand[3], b[3]) - max(cand[1], b[1])) for b in placed)
            if best is None or overlap < best[0]:
                best = (overlap, spot, cand)
            if overlap == 0:
                break
        _, (dx, dy, ha, va), box = best
        placed.append(box)
        far = abs(dy) > 20  # a label pushed away keeps a thin line to its point
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                    fontsize=fontsize,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5") if far else None)


def speedup_bars(labels: Sequence[str], speedups: Sequence[float], baseline: str = "baseline", *,
                 provenance: dict | None = None, ax: Axes | None = None,
                 title: str | None = None, ylabel: str = "speed-up") -> Figure:
    """Bars of speed-up over a baseline (1.0 = as fast), each labelled "1.8x".

    labels, speedups: one per variant (speed-up = baseline time / variant
    time). baseline: its name, written on the dashed line at 1; the bar of a
    label equal to it is grey. Returns the Figure. Raises MeasureError (a ValueError) when the
    lengths differ.
    """
    if len(labels) != len(speedups):
        raise MeasureError(f"{len(labels)} labels for {len(speedups)} speed-ups")
    fig, ax = _axes(ax)
    colors = ["0.6" if lab == baseline else "tab:blue" for lab in labels]
    bars = ax.bar(range(len(labels)), speedups, color=colors)
    for bar, s in zip(bars, speedups):
        ax.annotate(f"{s:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    textcoords="offset points", xytext=(0, 2), ha="center", va="bottom",
                    fontsize=8)
    ax.axhline(1.0, color="k", ls="--", lw=1, label=f"{baseline} = 1x")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(list(speedups) + [1.0]) * 1.15)
    ax.set_title(title or f"Speed-up over {baseline}")
    ax.legend(fontsize=8, loc="upper left")
    stamp(fig, provenance)
    return fig


def pareto_front(points: Sequence[tuple[float, float]],
                 maximize: tuple[bool, bool] = (True, True)) -> list[int]:
    """Indices of the points no other point dominates, sorted by the first coordinate.

    points: (a, b) pairs; maximize: for each coordinate whether larger is
    better. A point dominates another when it is at least as good in both
    coordinates and better in one; equal points do not dominate each other
    (both stay on the front). O(n^2), fine for the few dozen points of a lesson.
    """
    signs = [1 if m else -1 for m in maximize]
    p = [(signs[0] * a, signs[1] * b) for a, b in points]
    front = []
    for i, (a, b) in enumerate(p):
        dominated = any(c >= a and d >= b and (c > a or d > b) for j, (c, d) in enumerate(p)
                        if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def pareto(quality: Sequence[float], speed: Sequence[float], labels: Sequence[str], *,
           higher_quality_is_better: bool = True, quality_label: str = "quality",
           speed_label: str = "tokens/s", provenance: dict | None = None,
           ax: Axes | None = None, title: str | None = None) -> Figure:
    """Quality against speed, with the Pareto front highlighted.

    quality: e.g. top-1 agreement (higher is better) or perplexity (pass
    ``higher_quality_is_better=False``); speed: higher is better (tokens/s);
    labels: one per point. Draws all points (one scatter), the front's points
    (a second scatter) joined by a line, and a label per point.
    Returns the Figure. Raises MeasureError (a ValueError) when the lengths differ.
    """
    if not len(quality) == len(speed) == len(labels):
        raise MeasureError("quality, speed and labels must have the same length")
    fig, ax = _axes(ax)
    front = pareto_front(list(zip(speed, quality)), maximize=(True, higher_quality_is_better))
    ax.scatter(speed, quality, color="tab:blue", label="variants")
    ax.scatter([speed[i] for i in front], [quality[i] for i in front], s=80,
               facecolors="none", edgecolors=_FRONT_COLOR, linewidths=1.5, label="Pareto front")
    ax.plot([speed[i] for i in front], [quality[i] for i in front], color=_FRONT_COLOR, lw=1)
    for x, y, lab in zip(speed, quality, labels):
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(speed_label + " (higher is better)")
    ax.set_ylabel(quality_label + (" (higher is better)" if higher_quality_is_better
                                   else " (lower is better)"))
    ax.set_title(title or "Quality versus speed")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    stamp(fig, provenance)
    return fig


def sweep(x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str, *,
          logx: bool = False, logy: bool = False, provenance: dict | None = None,
          ax: Axes | None = None, title: str | None = None) -> Figure:
    """One line per series over a shared x (e.g. tokens/s against batch size).

    x: the swept values; series: {name: y values, one per x (NaN for a missing
    point)}. Returns the Figure. Raises MeasureError (a ValueError) when a series' length
    differs from x's.
    """
    fig, ax = _axes(ax)
    for name, ys in series.items():
        if len(ys) != len(x):
            raise MeasureError(f"series {name!r} has {len(ys)} values for {len(x)} x values")
        ax.plot(x, ys, marker="o", label=name)
    if logx:
        powers_of_two = all(v > 0 and float(v).is_integer() and int(v) & (int(v) - 1) == 0
                            for v in x)
        ax.set_xscale("log", base=2 if powers_of_two else 10)
        if powers_of_two:  # batch sizes, lengths: label the swept values themselves
            ax.set_xticks(list(x), [str(int(v)) for v in x])
            ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    stamp(fig, provenance)
    return fig

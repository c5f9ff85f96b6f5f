"""Mixed precision: more bits where the model is sensitive, fewer where it is not.

Uniform quantization spends the same bits on every layer, but layers differ
in how much their rounding hurts the output: some (often the first blocks'
down projections, or v/o) move the next-token distribution far more than
others. Given a byte budget, the best model spends its bytes where they buy
the most quality. Three steps (in the spirit of HAWQ and of llama.cpp's
mixed "K-quants"):

1. **Sensitivity scan** (:func:`layer_sensitivity`): quantize ONE layer at a
   time at each candidate format (int8; 4, 3, 2 bits per group), everything
   else in float, and measure ``s[l, f]`` = mean KL(P_float || P) per token
   on calibration text (training split). Cost: layers x formats forward
   passes.
2. **Allocation** (:func:`plan_bits`): assume the damage adds up across
   layers (first order: small, independent perturbations), and choose one
   format per layer to minimise ``sum_l s[l, f_l]`` subject to
   ``sum_l bytes[l, f_l] <= budget``: a multiple-choice knapsack, solved
   exactly by dynamic programming over the budget in small byte units
   (costs rounded *up*, so the plan always fits). The same table answers
   the dual question, the fewest bytes whose predicted KL meets a budget.
3. **Apply** (``quantize(model, "mixed", plan=plan.assignment)``): each layer
   in its format (:class:`~llmopt_lab.transforms.quantize.Int8Linear`, or
   :class:`~llmopt_lab.transforms.quantize.Int4Linear` with 4-, 3- or 2-bit
   codes), then measure the real KL: the additive prediction is checked,
   not trusted.

Bytes are the formats' packed sizes (:func:`format_nbytes`): 3- and 2-bit
codes run here in the int4 container, whose kernels would need a 3- or 2-bit
sibling to realise the saving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import QuantizationError
from ..surgery import replace_module
from .calibration import as_batches, check_calibration
from .formats import GROUP_SIZES, LOW_BITS, check_group_size, fake_quantize, packed_nbytes
from .layers import Int4Linear, Int8Linear
from .registry import register_method

#: the candidate formats of the scan: (bits, group_size); int8 is per output channel
DEFAULT_FORMATS: tuple[tuple[int, int | None], ...] = ((8, None), (4, 64), (3, 64), (2, 64))


def format_name(fmt: tuple[int, int | None]) -> str:
    """'int8' for (8, None), 'int3 g64' for (3, 64)."""
    bits, g = fmt
    return f"int{bits}" + (f" g{g}" if g else "")


def check_format(fmt) -> tuple[int, int | None]:
    """Return ``fmt`` as a (bits, group_size) tuple, or raise QuantizationError:
    (8, None) is int8 per output channel; (4 | 3 | 2, G) the int4 container
    with groups of G (one of the kernels' group sizes)."""
    try:
        bits, g = fmt
    except (TypeError, ValueError):
        raise QuantizationError(f"a format is a (bits, group_size) pair such as (8, None) or "
                                f"(4, 64), got {fmt!r}") from None
    if bits == 8 and g is None and not isinstance(bits, bool):
        return (8, None)
    if isinstance(bits, bool) or bits not in LOW_BITS or g not in GROUP_SIZES:
        raise QuantizationError(f"unsupported format {fmt!r}: use (8, None), or (bits, group) with "
                                f"bits in {LOW_BITS} and group in {GROUP_SIZES}")
    return (int(bits), int(g))


def format_nbytes(fmt: tuple[int, int | None], out_features: int, in_features: int) -> int:
    """Bytes of a (out, in) weight in format ``fmt``: int8 codes plus a float32
    scale per output channel; b-bit codes packed plus a float32 scale and a
    uint8 zero point per group. Raises QuantizationError for a bad format."""
    bits, g = check_format(fmt)
    if bits == 8:
        return out_features * in_features + 4 * out_features
    return packed_nbytes(out_features, in_features, bits, g)


def _fake(weight: torch.Tensor, fmt) -> torch.Tensor:
    bits, g = fmt
    if bits == 8:
        return fake_quantize(weight, bits=8, symmetric=True, granularity="channel")
    return fake_quantize(weight, bits=bits, symmetric=False, granularity="group", group_size=g)


@dataclass
class Sensitivity:
    """The scan's table. layers: names (data-flow order); formats: (bits,
    group) pairs; kl: (L, F) float64 tensor, mean KL per calibration token
    (nats) with only that layer in that format; nbytes: (L, F) int64 tensor,
    the layer's bytes in that format; tokens: calibration tokens scored.

    Raises: nothing on construction (a plain record); :meth:`uniform_bytes`
    and :meth:`uniform_kl` raise QuantizationError for a format that is
    malformed or was not scanned (the message lists the scanned ones)."""

    layers: list[str]
    formats: list[tuple[int, int | None]]
    kl: torch.Tensor
    nbytes: torch.Tensor
    tokens: int = 0

    def uniform_bytes(self, fmt) -> int:
        """Total bytes with every layer in ``fmt`` (one of :attr:`formats`)."""
        return int(self.nbytes[:, self._col(fmt)].sum())

    def uniform_kl(self, fmt) -> float:
        """The additive prediction of the KL with every layer in ``fmt``."""
        return float(self.kl[:, self._col(fmt)].sum())

    def _col(self, fmt) -> int:
        fmt = check_format(fmt)
        if fmt not in self.formats:
            raise QuantizationError(f"{format_name(fmt)} was not scanned; formats: "
                                    f"{', '.join(map(format_name, self.formats))}")
        return self.formats.index(fmt)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, calibration: Sequence[torch.Tensor],
                      formats: Sequence = DEFAULT_FORMATS, layers: Sequence[str] | None = None,
                      progress: bool = False) -> Sensitivity:
    """Scan every (layer, format): quantize that layer alone (round to
    nearest), measure the mean KL(float || quantized) per token over the
    calibration batches, restore the layer.

    model: an llmopt_lab Transformer in float; calibration: token batches
    (B, T) from the training split; formats: (bits, group_size) pairs
    (:func:`check_format`); layers: names of nn.Linear layers (default: every
    decoder block's, as :func:`~llmopt_lab.transforms.quantize.linear_layers`).
    Cost: len(layers) x len(formats) forward passes over the batches. The
    model is left as it was. Returns a :class:`Sensitivity`. Raises
    QuantizationError for bad calibration data, formats or layer names, or a
    layer whose in_features a format's group size does not divide.
    """
    from .transform import linear_layers

    check_calibration(calibration, model, "mixed-precision scan")
    batches = as_batches(calibration)
    formats = [check_format(f) for f in formats]
    if not formats:
        raise QuantizationError("formats is empty: give at least one (bits, group_size) pair")
    all_linear = linear_layers(model)
    names = list(all_linear) if layers is None else list(layers)
    for n in names:
        m = all_linear.get(n)
        if m is None:
            raise QuantizationError(f"{n!r} is not a decoder linear layer of the model")
        if not isinstance(m, nn.Linear):
            raise QuantizationError(f"{n} is already quantized ({type(m).__name__}); scan a float model")
        for bits, g in formats:
            if g is not None:
                check_group_size(g, m.in_features, n)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    ref = [F.log_softmax(model(b.to(dev)).float(), -1) for b in batches]
    tokens = sum(r.shape[0] * r.shape[1] for r in ref)
    kl = torch.zeros(len(names), len(formats), dtype=torch.float64)
    nbytes = torch.zeros(len(names), len(formats), dtype=torch.int64)
    todo = [(i, j) for i in range(len(names)) for j in range(len(formats))]
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc="sensitivity scan", leave=False)
    try:
        for i, j in todo:
            m = all_linear[names[i]]
            nbytes[i, j] = format_nbytes(formats[j], m.out_features, m.in_features)
            orig = m.weight.detach().clone()
            try:
                m.weight.copy_(_fake(orig, formats[j]))
                total = 0.0
                for b, r in zip(batches, ref):
                    lp = F.log_softmax(model(b.to(dev)).float(), -1)
                    # per token, clamped at 0: float rounding can make a near-zero KL negative
                    total += float((r.exp() * (r - lp)).sum(-1).clamp(min=0).sum())
            finally:
                m.weight.copy_(orig)
            kl[i, j] = total / tokens
    finally:
        model.train(was_training)
    return Sensitivity(names, formats, kl, nbytes, tokens)


@dataclass
class MixedPlan:
    """A format per layer. assignment: {layer name: (bits, group)}; nbytes:
    their total bytes; predicted_kl: the sum of the scan's KLs (the additive
    prediction); budget: what it was planned for ({'bytes': ...} or
    {'kl': ...}).

    Raises: nothing; a plain record (:func:`plan_bits` checks what goes in,
    the "mixed" method checks it against the model)."""

    assignment: dict[str, tuple[int, int | None]]
    nbytes: int
    predicted_kl: float
    budget: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """How many layers got each format, e.g. {'int8': 3, 'int4 g64': 40, ...}."""
        out: dict[str, int] = {}
        for f in self.assignment.values():
            out[format_name(f)] = out.get(format_name(f), 0) + 1
        return out


def _knapsack(kl: torch.Tensor, units: torch.Tensor, capacity: int):
    """Multiple-choice knapsack: best[r] = the least sum of kl[l, f_l] with
    sum of units[l, f_l] <= r, and the choices to rebuild it."""
    L, Fm = kl.shape
    inf = float("inf")
    best = torch.full((capacity + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choice = torch.full((L, capacity + 1), -1, dtype=torch.int8)
    for i in range(L):
        new = torch.full_like(best, inf)
        arg = torch.full((capacity + 1,), -1, dtype=torch.int8)
        for j in range(Fm):
            w = int(units[i, j])
            if w > capacity:
                continue
            cand = torch.full_like(best, inf)
            cand[w:] = best[:capacity + 1 - w] + float(kl[i, j])
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.full_like(arg, j), arg)
        best, choice[i] = new, arg
    return torch.cummin(best, 0).values, best, choice


def _rebuild(choice: torch.Tensor, units: torch.Tensor, r: int) -> list[int]:
    picks = []
    for i in range(choice.shape[0] - 1, -1, -1):
        j = int(choice[i, r])
        picks.append(j)
        r -= int(units[i, j])
    return picks[::-1]


def plan_bits(sens: Sensitivity, *, byte_budget: int | None = None, kl_budget: float | None = None,
              max_units: int = 1_000_000) -> MixedPlan:
    """Choose a format per layer from a scan (:func:`layer_sensitivity`).

    byte_budget: the least predicted KL whose bytes fit. kl_budget (nats per
    token): the fewest bytes whose predicted KL (sum over layers) is at most
    ``kl_budget``. Give exactly one. The dynamic program counts bytes in
    units of the greatest common divisor of the layers' sizes (exact); if
    that needs more than ``max_units`` units, in coarser units with every
    cost rounded up (the plan still fits, but may be slightly suboptimal).
    Returns a :class:`MixedPlan`. Raises QuantizationError when neither or
    both budgets are given, or when no assignment meets it (the message says
    the least bytes / least KL possible).
    """
    if not isinstance(sens, Sensitivity):
        raise QuantizationError(f"plan_bits needs a Sensitivity (layer_sensitivity's result), "
                                f"got {type(sens).__name__}")
    if (byte_budget is None) == (kl_budget is None):
        raise QuantizationError("give exactly one of byte_budget= or kl_budget=")
    if isinstance(max_units, bool) or not isinstance(max_units, int) or max_units < 10:
        raise QuantizationError(f"max_units must be an integer >= 10, got {max_units!r}")
    least = int(sens.nbytes.min(1).values.sum())
    most = int(sens.nbytes.max(1).values.sum())
    if byte_budget is not None:
        if isinstance(byte_budget, bool) or not isinstance(byte_budget, (int, float)) \
                or not math.isfinite(byte_budget) or byte_budget <= 0:
            raise QuantizationError(f"byte_budget must be a positive number of bytes, got {byte_budget!r}")
        if byte_budget < least:
            raise QuantizationError(f"byte_budget {int(byte_budget):,} B is below the smallest "
                                    f"assignment ({least:,} B: every layer in its smallest format)")
        span = min(int(byte_budget), most)
    else:
        if isinstance(kl_budget, bool) or not isinstance(kl_budget, (int, float)) \
                or not math.isfinite(kl_budget) or kl_budget < 0:
            raise QuantizationError(f"kl_budget must be a number >= 0 (nats per token), got {kl_budget!r}")
        floor = float(sens.kl.min(1).values.sum())
        if kl_budget < floor:
            raise QuantizationError(f"kl_budget {kl_budget:.3g} is below the least predicted KL "
                                    f"({floor:.3g}: every layer in its best format)")
        span = most
    unit = math.gcd(*(int(v) for v in sens.nbytes.flatten().tolist()))
    if span // unit > max_units:
        unit = math.ceil(span / max_units)
    cap = span // unit
    units = -(-sens.nbytes // unit)  # rounded up: a plan within capacity fits in real bytes
    cummin, best, choice = _knapsack(sens.kl, units, cap)
    if byte_budget is not None:
        r = int(torch.argmin(best[:cap + 1]))  # the capacity where the least KL is reached
        if not math.isfinite(float(best[r])):
            raise QuantizationError(f"no assignment fits {int(byte_budget):,} B in units of {unit} B; "
                                    "raise max_units or the budget")
    else:
        ok = (cummin <= kl_budget + 1e-12).nonzero()
        r = int(ok[0])
        r = int(torch.argmin(best[:r + 1]))  # the exact capacity holding that KL
    picks = _rebuild(choice, units, r)
    assignment = {n: sens.formats[j] for n, j in zip(sens.layers, picks)}
    nbytes = int(sum(int(sens.nbytes[i, j]) for i, j in enumerate(picks)))
    kl = float(sum(float(sens.kl[i, j]) for i, j in enumerate(picks)))
    budget = {"bytes": int(byte_budget)} if byte_budget is not None else {"kl": float(kl_budget)}
    return MixedPlan(assignment, nbytes, kl, budget)


def mixed_model_bytes(model: nn.Module) -> int:
    """Packed bytes of a model's decoder linear layers (:func:`format_nbytes`
    of each layer's format: Int8Linear, Int4Linear at its ``bits``; float
    layers at 4 bytes per weight). The layers' own storage is
    :func:`~llmopt_lab.transforms.quantize.bytes_breakdown`.

    Raises QuantizationError for a model that is not an llmopt_lab
    Transformer, or one with a decoder layer this count does not know
    (W8A8Linear, FP8Linear, ...), naming its type: use
    :func:`~llmopt_lab.transforms.quantize.bytes_breakdown` for those."""
    from .transform import linear_layers

    total = 0
    for m in linear_layers(model).values():
        if isinstance(m, Int8Linear):
            total += format_nbytes((8, None), m.out_features, m.in_features)
        elif isinstance(m, Int4Linear):
            total += format_nbytes((m.bits, m.group_size), m.out_features, m.in_features)
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * 4
        else:
            raise QuantizationError(f"mixed_model_bytes does not know {type(m).__name__}")
    return total


@register_method("mixed", options=("plan",))
def mixed_method(model: nn.Module, targets: dict, *, plan=None, backend: str = "auto", **_) -> dict:
    """A format per layer from a plan (:func:`plan_bits`), round to nearest."""
    if isinstance(plan, MixedPlan):
        plan = plan.assignment
    if not isinstance(plan, dict) or not plan:
        raise QuantizationError("method 'mixed' needs plan={layer name: (bits, group_size)} "
                                "(e.g. plan_bits(layer_sensitivity(model, calib), byte_budget=...))")
    missing = [n for n in targets if n not in plan]
    extra = [n for n in plan if n not in targets]
    if missing or extra:
        raise QuantizationError(f"the plan does not match the model's layers: missing "
                                f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unknown "
                                f"{extra[:3]}{'...' if len(extra) > 3 else ''}")
    fmts = {n: check_format(plan[n]) for n in targets}
    for name, m in targets.items():
        if fmts[name][1] is not None:
            check_group_size(fmts[name][1], m.in_features, name)
    for name, m in targets.items():
        bits, g = fmts[name]
        new = (Int8Linear.from_linear(m, backend) if bits == 8
               else Int4Linear.from_linear(m, g, backend, bits=bits))
        replace_module(model, name, new)
    counts: dict[str, int] = {}
    for f in fmts.values():
        counts[format_name(f)] = counts.get(format_name(f), 0) + 1
    return dict(formats=counts)


__all__ = ["DEFAULT_FORMATS", "format_name", "check_format", "format_nbytes", "Sensitivity",
           "layer_sensitivity", "MixedPlan", "plan_bits", "mixed_model_bytes", "mixed_method"]

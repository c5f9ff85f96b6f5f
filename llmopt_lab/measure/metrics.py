"""Quality and serving metrics shared by every lesson.

Quality compares a model (quantised, pruned, distilled...) with a reference on
the same tokens: negative log-likelihood / perplexity, the KL divergence of the
next-token distributions, and top-1 agreement. Serving metrics summarise
per-request timings (time to first token, time per output token) with p50/p99.
All take plain tensors or lists, so they are easy to test and reuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import MeasureError


def position_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats) of each target: logits (..., V) predicting
    targets (...) int64 (already shifted); returns (...) float32.

    Raises: nothing of its own; torch's RuntimeError/IndexError for shapes
    that do not match or a target outside [0, V)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="none").view(targets.shape)


def token_nll(logits: torch.Tensor, targets: torch.Tensor,
              mask: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and the number of scored tokens.

    logits: (B, T, V) predicting targets (B, T) int64 (already shifted: logits
    at t predict targets at t); mask: (B, T) bool, True = score this token.

    Raises: nothing of its own; torch's errors as :func:`position_nll` (shapes
    that do not match, a target outside [0, V), a mask of another shape).
    """
    nll = position_nll(logits, targets)
    if mask is not None:
        return float(nll[mask].sum()), int(mask.sum())
    return float(nll.sum()), int(nll.numel())


def perplexity_from_nll(total_nll: float, count: int) -> float:
    """exp(mean NLL): the token-weighted perplexity.

    Raises MeasureError (a ValueError) when ``count`` <= 0: no tokens were scored;
    score at least one token. OverflowError for a mean NLL too large for exp."""
    if count <= 0:
        raise MeasureError("no tokens were scored")
    return math.exp(total_nll / count)


def position_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) in nats at each position, P = softmax(logits):
    ref_logits, logits (..., V); returns (...) float32.

    Raises: nothing of its own; torch's RuntimeError for shapes that do not
    broadcast."""
    ref_logp = F.log_softmax(ref_logits.float(), -1)
    logp = F.log_softmax(logits.float(), -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor,
                  mask: torch.Tensor | None = None) -> float:
    """Mean KL(P_ref || P) in nats over positions, where P = softmax(logits).

    ref_logits, logits: (..., V); mask: (...) bool of positions to average.
    An empty mask gives NaN.

    Raises: nothing of its own; torch's errors for shapes that do not match.
    """
    kl = position_kl(ref_logits, logits)
    if mask is not None:
        kl = kl[mask]
    return float(kl.mean())


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor,
                   mask: torch.Tensor | None = None) -> float:
    """Fraction of positions where both models' most likely next token agree
    (NaN for an empty mask).

    Raises: nothing of its own; torch's errors for shapes that do not match."""
    same = ref_logits.argmax(-1) == logits.argmax(-1)
    if mask is not None:
        same = same[mask]
    return float(same.float().mean())


def bootstrap_interval(statistic, num_items: int, samples: int = 2000, level: float = 0.9,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of a statistic of ``num_items`` items.

    statistic: callable taking an index tensor (S, num_items) int64 (each row
    a resample of the items, drawn with replacement) and returning (S,) values.
    Returns (low, high), the central ``level`` share of the resampled values.
    The items are the unit of resampling, so they should be roughly
    independent (for text: windows, not the correlated tokens within one).
    (NaN, NaN) when no resample gives a finite value.

    Raises MeasureError (a ValueError) naming the value for ``num_items`` < 2
    (score more items) or ``level`` outside (0, 1).
    """
    if num_items < 2:
        raise MeasureError(f"a bootstrap needs at least 2 items, got {num_items}")
    if not 0.0 < level < 1.0:
        raise MeasureError(f"level must be in (0, 1), got {level}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, num_items, (samples, num_items), generator=g)
    vals = statistic(idx).double()
    vals = vals[torch.isfinite(vals)]
    if vals.numel() == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2
    return float(torch.quantile(vals, tail)), float(torch.quantile(vals, 1.0 - tail))


def _mean_nll(nll: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return nll[idx].sum(-1) / tokens[idx].sum(-1)


def ppl_delta_interval(nll_ref: Sequence[float], nll: Sequence[float], tokens: Sequence[int],
                       samples: int = 2000, level: float = 0.9, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the perplexity change ``100 * (ppl / ppl_ref - 1)``
    (percent) when both models are scored on the same windows: nll_ref, nll:
    (N,) summed NLL (nats) per window; tokens: (N,) scored tokens per window.
    Windows are resampled in pairs, so what both models find hard cancels.

    Raises MeasureError as :func:`bootstrap_interval` (fewer than 2 windows,
    ``level`` outside (0, 1)); torch's errors for lists of different lengths."""
    a, b, n = (torch.as_tensor(v, dtype=torch.float64) for v in (nll_ref, nll, tokens))
    return bootstrap_interval(
        lambda i: 100.0 * torch.expm1(_mean_nll(b, n, i) - _mean_nll(a, n, i)),
        len(n), samples, level, seed)


def recovery(ppl_ref, ppl_base, ppl):
    """The share of a baseline's perplexity increase that a method undoes,
    ``(ppl_base - ppl) / (ppl_base - ppl_ref)``: 1 = all of it, 0 = none,
    < 0 = worse than the baseline. Floats or tensors (elementwise).

    Raises ZeroDivisionError for floats with ``ppl_base == ppl_ref`` (tensors
    give inf/NaN instead)."""
    return (ppl_base - ppl) / (ppl_base - ppl_ref)


def recovery_interval(nll_ref: Sequence[float], nll_base: Sequence[float], nll: Sequence[float],
                      tokens: Sequence[int], samples: int = 2000, level: float = 0.9,
                      seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of :func:`recovery`, all three models scored on the
    same windows (per-window summed NLL, (N,) each; tokens (N,)).

    Raises MeasureError as :func:`bootstrap_interval` (fewer than 2 windows,
    ``level`` outside (0, 1)); torch's errors for lists of different lengths."""
    a, base, b, n = (torch.as_tensor(v, dtype=torch.float64) for v in (nll_ref, nll_base, nll, tokens))
    return bootstrap_interval(lambda i: recovery(*(torch.exp(_mean_nll(x, n, i)) for x in (a, base, b))),
                              len(n), samples, level, seed)


def speedup_interval(base_seconds: Sequence[float], base_tokens: Sequence[int],
                     seconds: Sequence[float], tokens: Sequence[int], samples: int = 2000,
                     level: float = 0.9, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of a throughput ratio measured on the same N items
    (prompts): ``(sum tokens / sum seconds) / (sum base_tokens / sum
    base_seconds)``, items resampled in pairs. Each argument is (N,): the
    seconds and tokens of one item under the method and under the baseline.
    It covers how the speed-up varies from prompt to prompt (and the timing
    noise within one run), not a drift of the machine between runs.

    Raises MeasureError as :func:`bootstrap_interval` (fewer than 2 items,
    ``level`` outside (0, 1)); torch's errors for lists of different lengths."""
    bs, bt, s, t = (torch.as_tensor(v, dtype=torch.float64) for v in
                    (base_seconds, base_tokens, seconds, tokens))
    return bootstrap_interval(
        lambda i: (t[i].sum(-1) / s[i].sum(-1)) / (bt[i].sum(-1) / bs[i].sum(-1)),
        len(t), samples, level, seed)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN when empty.

    Raises: nothing of its own; torch's RuntimeError for q outside [0, 100]."""
    if len(values) == 0:
        return float("nan")
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100.0))


@dataclass
class ServingStats:
    """Latency summary of a set of requests (seconds, tokens/s).

    Raises: nothing; a plain record (:func:`serving_stats` checks its input)."""

    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    throughput: float
    requests: int
    tokens: int


def serving_stats(ttft: Sequence[float], tpot: Sequence[float], total_tokens: int,
                  wall_time: float) -> ServingStats:
    """Summarise per-request time to first token (s) and time per output
    token (s, the mean inter-token latency of each request after its first
    token), with the total generated tokens over the wall time (tokens/s).

    Raises MeasureError (a ValueError) when ``wall_time`` <= 0: pass the measured,
    positive wall time."""
    if wall_time <= 0:
        raise MeasureError("wall_time must be positive")
    return ServingStats(percentile(ttft, 50), percentile(ttft, 99), percentile(tpot, 50),
                        percentile(tpot, 99), total_tokens / wall_time, len(ttft), total_tokens)

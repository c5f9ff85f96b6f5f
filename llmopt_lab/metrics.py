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


def token_nll(logits: torch.Tensor, targets: torch.Tensor,
              mask: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and the number of scored tokens.

    logits: (B, T, V) predicting targets (B, T) int64 (already shifted: logits
    at t predict targets at t); mask: (B, T) bool, True = score this token.
    """
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          reduction="none")
    if mask is not None:
        m = mask.reshape(-1)
        return float(nll[m].sum()), int(m.sum())
    return float(nll.sum()), int(nll.numel())


def perplexity_from_nll(total_nll: float, count: int) -> float:
    """exp(mean NLL): the token-weighted perplexity."""
    if count <= 0:
        raise ValueError("no tokens were scored")
    return math.exp(total_nll / count)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor,
                  mask: torch.Tensor | None = None) -> float:
    """Mean KL(P_ref || P) in nats over positions, where P = softmax(logits).

    ref_logits, logits: (..., V); mask: (...) bool of positions to average.
    """
    ref_logp = F.log_softmax(ref_logits.float(), -1)
    logp = F.log_softmax(logits.float(), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (...)
    if mask is not None:
        kl = kl[mask]
    return float(kl.mean())


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor,
                   mask: torch.Tensor | None = None) -> float:
    """Fraction of positions where both models' most likely next token agree."""
    same = ref_logits.argmax(-1) == logits.argmax(-1)
    if mask is not None:
        same = same[mask]
    return float(same.float().mean())


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN when empty."""
    if len(values) == 0:
        return float("nan")
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100.0))


@dataclass
class ServingStats:
    """Latency summary of a set of requests (seconds, tokens/s)."""

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
    token), with the total generated tokens over the wall time (tokens/s)."""
    if wall_time <= 0:
        raise ValueError("wall_time must be positive")
    return ServingStats(percentile(ttft, 50), percentile(ttft, 99), percentile(tpot, 50),
                        percentile(tpot, 99), total_tokens / wall_time, len(ttft), total_tokens)

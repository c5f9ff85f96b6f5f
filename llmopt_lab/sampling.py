"""From logits to tokens: greedy, temperature, top-k, top-p (nucleus).

All functions take logits of shape (B, V) and work in float32.
"""

from __future__ import annotations

import torch

from .errors import GenerationError


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise GenerationError for out-of-range sampling parameters."""
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise GenerationError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Scaled and filtered logits (B, V) float32; removed entries are -inf.

    top_k keeps the k largest; top_p keeps the smallest set of tokens whose
    probability sums to at least p (the most likely token is always kept).
    """
    x = logits.float() / max(temperature, 1e-8)
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_x.softmax(-1)) >= top_p  # mass before this token already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def probabilities(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """The sampling distribution (B, V) float32 after temperature/top-k/top-p."""
    return filter_logits(logits, temperature, top_k, top_p).softmax(-1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) int64. temperature 0 means greedy (argmax)."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

"""From logits to tokens: greedy, temperature, top-k, top-p (nucleus).

All functions take logits of shape (B, V) and work in float32.
:class:`SamplingParams` describes one request; :func:`sample_rows` samples a
batch whose rows have different parameters and random streams.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import GenerationError


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise GenerationError for out-of-range or non-numeric sampling parameters
    (a NaN, a string or a bool is refused, not compared)."""
    if not _real(temperature) or temperature < 0:
        raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise GenerationError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not _real(top_p) or not (0.0 < top_p <= 1.0)):
        raise GenerationError(f"top_p must be a number in (0, 1], got {top_p!r}")


def check_seed(seed) -> None:
    """GenerationError unless ``seed`` is None or an integer torch can seed a
    generator with (-2**63 <= seed < 2**64)."""
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not -2**63 <= seed < 2**64):
        raise GenerationError(f"seed must be an integer in [-2**63, 2**64) or None, got {seed!r}")


def stop_token_tuple(ids, what: str = "eos_token_id") -> tuple[int, ...]:
    """One token id or several (a list, tuple or 1-D integer tensor) as a tuple
    of ints. Raises GenerationError for anything else (a string, a float, a
    bool, a negative id): such a stop id would never match, or crash later."""
    out = items = None
    if not isinstance(ids, (str, bytes)):
        try:
            operator.index(ids)  # one id: an int, a NumPy int, a 0-dim integer tensor
            items = [ids]
        except TypeError:
            try:
                items = list(ids)  # several: a list, tuple, range, 1-D tensor or array
            except TypeError:
                items = None
    if items is not None:
        try:
            out = tuple(operator.index(i) for i in items)
        except TypeError:
            out = None
    if out is None or any(isinstance(i, bool) for i in items) or any(i < 0 for i in out):
        raise GenerationError(f"{what} must be a token id >= 0 or a list of them, got {ids!r}")
    return out


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


@dataclass
class SamplingParams:
    """How one request is sampled.

    max_new_tokens: the most tokens to generate (>= 1); temperature: 0 is
    greedy; top_k / top_p: filters (None: off); seed: the row's own random
    stream (None: a fresh one), so that a request samples the same tokens
    alone or in any batch; stop_token_ids: ids that end the request (None: the
    model's EOS ids); ignore_eos: never stop early.
    Raises GenerationError for out-of-range values.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            raise GenerationError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        check_seed(self.seed)
        if self.stop_token_ids is not None:
            self.stop_token_ids = stop_token_tuple(self.stop_token_ids, "stop_token_ids (eos_token_id)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def stop_ids(self, default: Sequence[int]) -> list[int]:
        """The ids that end this request, given the model's EOS ids."""
        if self.ignore_eos:
            return []
        return list(self.stop_token_ids) if self.stop_token_ids is not None else list(default)

    def generator(self, device) -> torch.Generator | None:
        """The row's random stream (None for greedy rows)."""
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Next tokens (B,) int64, each row with its own parameters and random stream.

    logits: (B, V). Greedy rows take the argmax (computed for the whole batch at
    once); each sampled row draws from its own filtered distribution with its
    own generator, so its tokens do not depend on the other rows.
    """
    if len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise GenerationError(f"{logits.shape[0]} rows of logits but {len(params)} sampling "
                              f"parameters and {len(generators)} generators")
    tokens = logits.argmax(dim=-1)
    for i, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            probs = probabilities(logits[i:i + 1], p.temperature, p.top_k, p.top_p)  # (1, V)
            tokens[i] = torch.multinomial(probs, 1, generator=g)[0, 0]
    return tokens

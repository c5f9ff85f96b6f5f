"""The state of one request inside the engine, in plain Python (lesson 10).

A request is a :class:`Sequence`: its prompt, its sampling parameters, the
tokens generated so far, how many of its tokens already have their keys and
values in the KV storage (``num_computed``), the blocks that hold them
(``block_table``, written by the block manager) and its timings. What the
client sees is a :class:`RequestOutput`, a snapshot made after each step.

The engine's invariant: K/V exist for ``tokens[:num_computed]``. A step feeds
``tokens[num_computed:num_computed + n]``; when that reaches the end of
``tokens`` the step's logits give the next token, which is appended (its own
K/V are computed by the next step). So prefill, chunked prefill, decode and
the recomputation after a preemption are one rule.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams


class Status(enum.Enum):
    """Where a sequence is in the engine. Raises: nothing."""

    WAITING = "waiting"  # not admitted yet, or preempted (holds no blocks)
    RUNNING = "running"  # holds blocks; scheduled in the steps
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What a request has produced so far (a snapshot; later steps do not change it).

    token_ids: every generated token id; new_token_ids: those added by the
    step that made this snapshot; text / new_text: their decoded text when the
    engine has a tokenizer (else None); finish_reason: None while running,
    "stop" (a stop token, included in token_ids), "length" (max_new_tokens or
    the model's context) or "abort". Times are seconds on the engine's clock:
    arrival_time (added), first_token_time, finish_time (None until then).

    Raises: nothing; a plain record (the :class:`~llmopt_lab.serving.Engine`
    raises ServingError for bad requests).
    """

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    text: str | None = None
    new_text: str | None = None

    @property
    def ttft(self) -> float | None:
        """Time to first token (s): first token - arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        """End-to-end latency (s): finish - arrival."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass(eq=False)
class Sequence:
    """One request in the engine (the block manager reads ``tokens``,
    ``block_table`` and ``num_cached_tokens``).

    Raises: nothing; a plain record (the engine validates requests)."""

    request_id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset
    max_tokens: int  # generated tokens allowed (max_new_tokens, within the context)
    arrival_time: float
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_computed: int = 0
    status: Status = Status.WAITING
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    cached_tokens_total: int = 0  # prompt tokens served by the prefix cache (all admissions)
    # token times (s), one per generated token: what time-between-tokens is measured on
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    _reported: int = 0  # generated tokens already handed to the client

    def __post_init__(self):
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def output(self) -> list[int]:
        """The generated token ids."""
        return self.tokens[len(self.prompt):]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def to_compute(self) -> int:
        """Tokens whose K/V are still missing (1 while decoding)."""
        return len(self.tokens) - self.num_computed

    @property
    def in_prefill(self) -> bool:
        """True while more than the last token is missing (a prompt, or a
        recomputation after preemption)."""
        return self.to_compute > 1 or self.num_output == 0

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

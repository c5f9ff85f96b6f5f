"""Speculative decoding: a cheap proposer guesses k tokens, the target checks
them all in one forward pass, and the output is exactly what the target alone
would produce.

(Over 400 lines: the statistics, the exact rejection rule and the four step
functions read together as one algorithm, top to bottom.)

* :func:`speculative_generate` with a draft model (its own KV cache) or with
  prompt lookup (``draft=None``: n-gram matches copied from earlier text of
  the context, no model at all).
* Greedy: a proposal is kept while it equals the target's argmax; the first
  mismatch is replaced by the target's own token. Token-identical to plain
  greedy decoding.
* Sampling: the rejection rule of Leviathan et al. (2023) and Chen et al.
  (2023): keep proposal x ~ q with probability min(1, p(x) / q(x)); on
  rejection draw from normalize(max(0, p - q)); when all k are kept, draw a
  bonus token from p. The output distribution is exactly the target's.
* Both caches roll back past the first rejection: a sequence's length in
  each cache is a number in its :class:`SpecSequence`; the rejected slots are
  simply overwritten later.

One step is four named functions, each usable alone (and by a batching
engine): :func:`propose` (the draft's k guesses, or prompt lookup),
:func:`verify` (one target forward over every row's last token and its
guesses), :func:`accept` (the rule above, per row) and :func:`roll_back`.
Batches: every sequence keeps its own length, acceptances and rollback; the
draft's k passes and the target's verification run as packed steps
(:mod:`llmopt_lab.step`) over the sequences still running, so a finished
sequence simply leaves the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .cache import KVPool
from .errors import GenerationError
from .generate import _prompt_lists, check_token_ids, pad_prompts
from .measure.timing import synchronize
from .sampling import check_sampling_args, check_seed, probabilities, stop_token_tuple
from .step import host_step, run_step


@dataclass
class SpecStats:
    """What happened: proposals made and kept, forward passes and time (s).

    Two acceptance figures, because they answer different questions:
    :attr:`acceptance_rate` (kept / proposed, the serving engines' "draft
    acceptance rate": how much drafting work was useful) and :attr:`alpha`
    (kept / judged: the per-proposal acceptance probability that the formula
    (1 - alpha^(k+1)) / (1 - alpha) takes; proposals after the first rejection
    of a step are never judged, so kept / proposed underestimates it).
    """

    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    new_tokens: int = 0
    draft_time_s: float = 0.0
    target_time_s: float = 0.0  # verification passes
    prefill_time_s: float = 0.0  # the target's pass over the prompt
    accepted_per_step: list[int] = field(default_factory=list)
    proposed_per_step: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of proposed tokens the target kept."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def rejected(self) -> int:
        """Verification steps that ended in a rejection (at most one per step)."""
        return sum(a < p for a, p in zip(self.accepted_per_step, self.proposed_per_step))

    @property
    def alpha(self) -> float:
        """Per-proposal acceptance probability, kept / (kept + rejected): the
        maximum-likelihood estimate when each judged proposal is kept
        independently with the same probability."""
        judged = self.accepted + self.rejected
        return self.accepted / judged if judged else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Mean new tokens per verification step (kept proposals + 1): the
        quantity the formula predicts; the prompt's forward pass not counted."""
        return (self.accepted + self.steps) / self.steps if self.steps else float("nan")

    @property
    def steps(self) -> int:
        """Verification steps (target passes after the prompt's)."""
        return len(self.accepted_per_step)

    @property
    def tokens_per_target_forward(self) -> float:
        """New tokens per forward pass of the target, the prompt's included
        (1.0 for plain decoding)."""
        return self.new_tokens / self.target_forwards if self.target_forwards else float("nan")

    @classmethod
    def combine(cls, many) -> "SpecStats":
        """The sum of several runs' statistics (e.g. one per prompt)."""
        out = cls()
        for s in many:
            for name in ("proposed", "accepted", "target_forwards", "draft_forwards", "new_tokens",
                         "draft_time_s", "target_time_s", "prefill_time_s"):
                setattr(out, name, getattr(out, name) + getattr(s, name))
            out.accepted_per_step += s.accepted_per_step
            out.proposed_per_step += s.proposed_per_step
        return out

    def as_dict(self) -> dict:
        return dict(proposed=self.proposed, accepted=self.accepted,
                    acceptance_rate=self.acceptance_rate, alpha=self.alpha,
                    target_forwards=self.target_forwards, draft_forwards=self.draft_forwards,
                    new_tokens=self.new_tokens, tokens_per_step=self.tokens_per_step,
                    tokens_per_target_forward=self.tokens_per_target_forward,
                    draft_time_s=self.draft_time_s, target_time_s=self.target_time_s,
                    prefill_time_s=self.prefill_time_s)


@dataclass
class SpecOutput:
    """sequences: the new tokens of each prompt (cut at EOS and at the limit);
    stats: summed over the batch."""

    sequences: list[list[int]]
    stats: SpecStats

    @property
    def tokens(self) -> list[int]:
        """The new tokens of the only prompt (batch size 1)."""
        if len(self.sequences) != 1:
            raise GenerationError(f"{len(self.sequences)} prompts were generated: use .sequences")
        return self.sequences[0]


def check_same_tokenizer(target_tokenizer, draft_tokenizer) -> None:
    """Raise GenerationError unless both tokenizers map the same strings to the
    same ids (vocabulary sizes of the models may still differ by padding)."""
    if target_tokenizer is None or draft_tokenizer is None:
        return
    a, b = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if a != b:
        shared = len(set(a.items()) & set(b.items()))
        raise GenerationError(
            f"draft and target tokenizers differ ({shared} of {len(a)} / {len(b)} entries agree); "
            "speculative decoding needs the same tokenizer")


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """E[new tokens per target forward] = (1 - alpha^(k+1)) / (1 - alpha) for
    an acceptance rate alpha (each proposal kept independently with prob alpha)."""
    if not 0 <= alpha <= 1:
        raise ValueError("alpha must be in [0, 1]")
    if alpha == 1:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """Predicted speed-up over plain decoding: tokens per step divided by the
    cost of a step, k draft forwards (each ``cost_ratio`` of a target forward)
    plus one target forward over k+1 tokens (counted as one)."""
    return expected_tokens_per_step(alpha, k) / (k * cost_ratio + 1)


def prompt_lookup(seq: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Propose up to k tokens by matching the last n tokens (n = max_ngram..1)
    with an earlier place in ``seq`` and copying what followed it there.
    Returns [] when nothing matches."""
    n_seq = len(seq)
    for n in range(min(max_ngram, n_seq - 1), 0, -1):
        tail = seq[n_seq - n:]
        for start in range(n_seq - n - 1, -1, -1):  # the most recent earlier match
            if seq[start:start + n] == tail:
                return seq[start + n:start + n + k]
    return []


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, x: int) -> float:
    """min(1, p(x) / q(x)): the chance of keeping proposal x drawn from q.
    p, q: (V,) probabilities of the target and the proposer."""
    qx = float(q[x])
    return min(1.0, float(p[x]) / qx) if qx > 0 else 0.0


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(0, p - q)), (V,): where to draw from after a rejection, so
    that kept and replaced tokens together are distributed exactly as p."""
    r = torch.clamp(p - q, min=0)
    total = r.sum()
    return r / total if float(total) > 0 else p  # p == q: no rejection can happen


def verify_step(p: torch.Tensor, q: torch.Tensor, x: int, u: float) -> tuple[bool, torch.Tensor | None]:
    """The rejection rule with the uniform draw u given: (True, None) when x is
    kept, else (False, the residual distribution to sample the replacement from)."""
    if u < acceptance_probability(p, q, x):
        return True, None
    return False, residual_distribution(p, q)


def _accept_or_resample(p: torch.Tensor, q: torch.Tensor, x: int, gen) -> tuple[bool, int | None]:
    u = torch.rand((), generator=gen, device=p.device).item()
    ok, residual = verify_step(p, q, x, u)
    if ok:
        return True, None
    return False, int(torch.multinomial(residual, 1, generator=gen))


def cache_lengths_after_step(seq_len: int, accepted: int, draft_len: int) -> tuple[int, int]:
    """Cache lengths after a verification step (the rollback).

    seq_len: tokens in the sequence before the step (its last token was fed to
    the target in this step, not before); accepted: proposals kept; draft_len:
    tokens in the draft's cache after proposing. The step adds accepted + 1
    tokens; both caches then hold every token but the new last one (the draft
    cannot hold more than it was fed). Returns (target_len, draft_len).
    """
    keep = seq_len + accepted  # the sequence is now seq_len + accepted + 1 long
    return keep, min(draft_len, keep)


@dataclass
class SpecSequence:
    """One sequence being decoded speculatively.

    tokens: the prompt and every token generated so far; new: the generated
    ones; block: its block in both caches (one block per sequence);
    target_len / draft_len: tokens whose keys and values each cache holds (the
    target holds every token but the last, which is fed in the next step).
    """

    tokens: list[int]
    block: int
    new: list[int] = field(default_factory=list)
    target_len: int = 0
    draft_len: int = 0
    done: bool = False


@dataclass
class Sampler:
    """How a speculative run turns logits into tokens: greedy or sampled from
    the filtered distribution, one random stream for the batch."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def dist(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) sampling distribution of one row of logits."""
        return probabilities(logits[None], self.temperature, self.top_k, self.top_p)[0]

    def pick(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(self.dist(logits), 1, generator=self.generator))


def _step(model, kv: KVPool, seqs: list[SpecSequence], chunks: list[list[int]], starts: list[int],
          every_token: bool) -> torch.Tensor:
    """Feed chunk i of sequence i at positions starts[i].. (one packed step)."""
    step = host_step(chunks, starts, [[s.block] for s in seqs], kv.block_size, contiguous=False)
    return run_step(model, kv, step.to_step(model.device), every_token=every_token)


def propose(draft, draft_kv: KVPool | None, seqs: list[SpecSequence], k: int, sampler: Sampler,
            vocab: int, max_ngram: int = 3) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Up to k guesses per sequence.

    With a draft model: k batched draft steps (the first feeds each
    sequence's tokens the draft has not seen, then one guess per step), greedy
    or sampled; the draft's cache grows by what it was fed. Without one
    (``draft=None``): prompt lookup, no model at all (possibly fewer than k,
    or none). Returns the proposals and, for sampled drafts, each proposal's
    distribution q (V,) (empty lists otherwise, a point mass is implied).
    """
    q_dists: list[list[torch.Tensor]] = [[] for _ in seqs]
    if draft is None:
        return [prompt_lookup(s.tokens, k, max_ngram) for s in seqs], q_dists
    shared = min(vocab, draft.config.vocab_size)
    proposals: list[list[int]] = [[] for _ in seqs]
    chunks = [s.tokens[s.draft_len:] for s in seqs]
    for _ in range(k):
        logits = _step(draft, draft_kv, seqs, chunks, [s.draft_len for s in seqs], False)[:, :shared]
        for s, c in zip(seqs, chunks):
            s.draft_len += len(c)
        if sampler.greedy:
            xs = logits.argmax(-1).tolist()
        else:
            xs = []
            for i in range(len(seqs)):
                q = torch.zeros(vocab, device=logits.device)
                q[:shared] = sampler.dist(logits[i])
                q_dists[i].append(q)
                xs.append(int(torch.multinomial(q, 1, generator=sampler.generator)))
        for p, x in zip(proposals, xs):
            p.append(x)
        chunks = [[x] for x in xs]
    return proposals, q_dists


def verify(target, target_kv: KVPool, seqs: list[SpecSequence],
           proposals: list[list[int]]) -> list[torch.Tensor]:
    """One target forward over each sequence's last token followed by its
    proposals (a packed step: rows of different lengths, no padding). Returns,
    per sequence, float32 logits (1 + len(proposal), V): row i is the
    target's prediction after proposal i - 1 (row 0: after the last token)."""
    chunks = [[s.tokens[-1]] + p for s, p in zip(seqs, proposals)]
    logits = _step(target, target_kv, seqs, chunks, [len(s.tokens) - 1 for s in seqs], True)
    return list(logits.split([len(c) for c in chunks]))


def accept(logits: torch.Tensor, proposal: list[int], q_dists: list[torch.Tensor],
           sampler: Sampler, rule=None) -> tuple[int, int]:
    """How many of one sequence's proposals the target keeps, and the token
    that follows them: the target's own choice at the first rejection, or a
    bonus token when all are kept.

    logits: (1 + len(proposal), V) from :func:`verify`. Greedy: keep while the
    proposal is the target's argmax. Sampled: the exact rejection rule
    (``rule(p, q, x, generator) -> (kept, replacement)``, default
    :func:`verify_step` with a uniform draw), q a point mass for prompt lookup.
    """
    if sampler.greedy:
        choices = logits.argmax(-1).tolist()  # one host sync for the row
        accepted = 0
        while accepted < len(proposal) and choices[accepted] == proposal[accepted]:
            accepted += 1
        return accepted, choices[accepted]
    rule = rule or _accept_or_resample
    vocab = logits.shape[-1]
    for i, x in enumerate(proposal):
        p = sampler.dist(logits[i])
        q = q_dists[i] if q_dists else torch.nn.functional.one_hot(
            torch.tensor(x, device=logits.device), vocab).float()
        ok, replacement = rule(p, q, x, sampler.generator)
        if not ok:
            return i, replacement
    return len(proposal), sampler.pick(logits[len(proposal)])


def roll_back(seq: SpecSequence, proposal: list[int], accepted: int, extra: int) -> list[int]:
    """Append what a step decided (the kept proposals and the extra token) to
    ``seq`` and cut both caches back to what is now certain
    (:func:`cache_lengths_after_step`): the slots of rejected proposals are
    forgotten and overwritten later. Returns the step's new tokens."""
    seq.target_len, seq.draft_len = cache_lengths_after_step(len(seq.tokens), accepted,
                                                             seq.draft_len)
    new = proposal[:accepted] + [extra]
    seq.tokens.extend(new)
    seq.new.extend(new)
    return new


@torch.inference_mode()
def speculative_generate(target, draft, input_ids, max_new_tokens: int, k: int = 4, *,
                         temperature: float = 0.0, top_k: int | None = None,
                         top_p: float | None = None, seed: int | None = None,
                         eos_token_id: int | Sequence[int] | None = None, ignore_eos: bool = False,
                         max_ngram: int = 3, target_tokenizer=None, draft_tokenizer=None,
                         acceptance_rule=None, attention_mask=None) -> SpecOutput:
    """Generate with speculative decoding.

    input_ids: one prompt or several (a list of token lists of any lengths, a
    (B, T) tensor, or a tokenizer's padded output): each sequence proposes, is
    verified and rolls back on its own, in one batched draft and one batched
    target forward per step. attention_mask: (B, T) 0/1 marking each row's
    prompt in a left- or right-padded tensor, as in
    :func:`llmopt_lab.generate.generate`.
    draft: a model sharing the target's tokenizer, or None for prompt lookup.
    k: proposals per step (>= 1). Sampling parameters as in
    :func:`llmopt_lab.generate.generate`; temperature 0 is greedy; a sequence
    ends at any of ``eos_token_id`` (one id or several; default: the target's
    EOS ids) unless ``ignore_eos``.
    acceptance_rule: for experiments only (the lesson's negative control):
    ``fn(p, q, x, generator) -> (accepted, replacement)`` replacing the exact rule.
    Returns a :class:`SpecOutput`: the new tokens of each prompt and the
    :class:`SpecStats` of the batch. Raises GenerationError for bad arguments
    (k, max_new_tokens, sampling parameters, seed, stop ids, a draft that is
    not a model, prompts as :func:`~llmopt_lab.generate.generate` refuses
    them) or a request longer than a model's context.
    """
    check_sampling_args(temperature, top_k, top_p)
    if draft is not None and not hasattr(draft, "config"):
        raise GenerationError(f"draft must be a model (llmopt_lab Transformer) or None for prompt "
                              f"lookup, got {type(draft).__name__}")
    check_seed(seed)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise GenerationError(f"k must be an integer >= 1, got {k!r}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    check_same_tokenizer(target_tokenizer, draft_tokenizer)
    ids, lengths = pad_prompts(_prompt_lists(input_ids, attention_mask))
    B = ids.shape[0]
    seqs = [SpecSequence(tokens=row[:n].tolist(), block=i)
            for i, (row, n) in enumerate(zip(ids, lengths.tolist()))]
    cfg = target.config
    check_token_ids([s.tokens for s in seqs], cfg.vocab_size, "the target")
    if draft is not None:
        check_token_ids([s.tokens for s in seqs], draft.config.vocab_size, "the draft")
    size = int(lengths.max()) + max_new_tokens + k + 2
    if size > cfg.max_position_embeddings or (draft is not None and size > draft.config.max_position_embeddings):
        raise GenerationError(f"prompt + max_new_tokens + k ({size}) exceeds a model's context")
    if eos_token_id is None:
        eos = list(cfg.eos_token_ids)
    else:
        eos = list(stop_token_tuple(eos_token_id))
    eos = [] if ignore_eos else eos
    dev = target.device
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=dev).manual_seed(seed if seed is not None else torch.seed())
    sampler = Sampler(temperature, top_k, top_p, gen)
    stats = SpecStats()

    def timed(fn, which: str):
        synchronize(dev)
        t0 = time.perf_counter()
        out = fn()
        synchronize(dev)
        setattr(stats, which, getattr(stats, which) + time.perf_counter() - t0)
        return out

    def finished(s: SpecSequence) -> bool:
        return len(s.new) >= max_new_tokens or any(x in eos for x in s.new)

    t_kv = KVPool(cfg, B, size, device=dev, dtype=target.dtype)
    d_kv = None if draft is None else KVPool(draft.config, B, size, device=dev, dtype=draft.dtype)
    # the target's cache holds every token but the last; the first new token
    # comes from the prompt's logits
    logits = timed(lambda: _step(target, t_kv, seqs, [s.tokens for s in seqs], [0] * B, False),
                   "prefill_time_s")  # (B, V)
    stats.target_forwards += 1
    for s, row in zip(seqs, logits):
        s.target_len = len(s.tokens)
        first = sampler.pick(row)
        s.tokens.append(first)
        s.new.append(first)
        s.done = finished(s)

    while True:
        live = [s for s in seqs if not s.done]
        if not live:
            break
        if draft is None:
            proposals, q_dists = propose(None, None, live, k, sampler, cfg.vocab_size, max_ngram)
        else:
            proposals, q_dists = timed(lambda: propose(draft, d_kv, live, k, sampler, cfg.vocab_size,
                                                       max_ngram), "draft_time_s")
            stats.draft_forwards += k
        rows = timed(lambda: verify(target, t_kv, live, proposals), "target_time_s")
        stats.target_forwards += 1
        for s, proposal, q, row in zip(live, proposals, q_dists, rows):
            accepted, extra = accept(row, proposal, q, sampler, acceptance_rule)
            stats.proposed += len(proposal)
            stats.accepted += accepted
            stats.accepted_per_step.append(accepted)
            stats.proposed_per_step.append(len(proposal))
            roll_back(s, proposal, accepted, extra)
            s.done = finished(s)
    # cut at EOS and at the limit (tokens past them are what the target would
    # have produced anyway; they are simply not wanted)
    news = []
    for s in seqs:
        new = s.new
        for i, x in enumerate(new):
            if x in eos:
                new = new[:i + 1]
                break
        news.append(new[:max_new_tokens])
    stats.new_tokens = sum(len(n) for n in news)
    return SpecOutput(sequences=news, stats=stats)

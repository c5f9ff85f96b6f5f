"""Speculative decoding: a cheap proposer guesses k tokens, the target checks
them all in one forward pass, and the output is exactly what the target alone
would produce.

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
* Both caches roll back past the first rejection (``cache.truncate``).

Batch size 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .bench import synchronize
from .errors import GenerationError
from .generate import pad_prompts
from .kv_cache import StaticCache
from .sampling import check_sampling_args, probabilities


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
        steps = self.accepted_per_step
        return (sum(steps) + len(steps)) / len(steps) if steps else float("nan")

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
    tokens: list[int]
    stats: SpecStats


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


def _forward(model, tokens: list[int], start: int, cache, last_only: bool = False) -> torch.Tensor:
    """Feed tokens at positions start.. into cache; logits (T, V) float32, or
    (1, V) for the last token only (``last_only``: the rest are not needed)."""
    dev = model.device
    ids = torch.tensor([tokens], device=dev)
    pos = torch.arange(start, start + len(tokens), device=dev)[None]
    with torch.inference_mode():
        hidden = model.hidden_states(ids, pos, cache=cache)[0]  # (T, H)
        return model.lm_head(hidden[-1:] if last_only else hidden).float()


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


@torch.inference_mode()
def speculative_generate(target, draft, input_ids, max_new_tokens: int, k: int = 4, *,
                         temperature: float = 0.0, top_k: int | None = None,
                         top_p: float | None = None, seed: int | None = None,
                         eos_token_id: int | None = None, ignore_eos: bool = False,
                         max_ngram: int = 3, target_tokenizer=None, draft_tokenizer=None,
                         acceptance_rule=None) -> SpecOutput:
    """Generate with speculative decoding (batch size 1).

    draft: a model sharing the target's tokenizer, or None for prompt lookup.
    k: proposals per step (>= 1). Sampling parameters as in
    :func:`llmopt_lab.generate.generate`; temperature 0 is greedy.
    acceptance_rule: for experiments only (the lesson's negative control):
    ``fn(p, q, x, generator) -> (accepted, replacement)`` replacing the exact rule.
    Returns the new tokens and :class:`SpecStats`.
    """
    check_sampling_args(temperature, top_k, top_p)
    if not isinstance(k, int) or k < 1:
        raise GenerationError(f"k must be an integer >= 1, got {k!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    check_same_tokenizer(target_tokenizer, draft_tokenizer)
    ids, _ = pad_prompts(input_ids)
    if ids.shape[0] != 1:
        raise GenerationError(f"speculative_generate runs batch size 1, got {ids.shape[0]} prompts")
    seq = ids[0].tolist()
    T = len(seq)
    cfg = target.config
    size = T + max_new_tokens + k + 2
    if size > cfg.max_position_embeddings or (draft is not None and size > draft.config.max_position_embeddings):
        raise GenerationError(f"prompt + max_new_tokens + k ({size}) exceeds a model's context")
    vocab = cfg.vocab_size
    if draft is not None:
        shared = min(vocab, draft.config.vocab_size)
    eos = [] if ignore_eos else ([eos_token_id] if eos_token_id is not None else cfg.eos_token_ids)
    greedy = temperature == 0
    dev = target.device
    gen = None
    if not greedy:
        gen = torch.Generator(device=dev).manual_seed(seed if seed is not None else torch.seed())
    rule = acceptance_rule or _accept_or_resample
    stats = SpecStats()

    def dist(logits: torch.Tensor) -> torch.Tensor:  # (V,) sampling distribution
        return probabilities(logits[None], temperature, top_k, top_p)[0]

    def pick(logits: torch.Tensor) -> int:
        if greedy:
            return int(logits.argmax())
        return int(torch.multinomial(dist(logits), 1, generator=gen))

    def timed(fn, which: str):
        synchronize(dev)
        t0 = time.perf_counter()
        out = fn()
        synchronize(dev)
        setattr(stats, which, getattr(stats, which) + time.perf_counter() - t0)
        return out

    t_cache = StaticCache(cfg, 1, size, device=dev, dtype=target.dtype)
    d_cache = None
    if draft is not None:
        d_cache = StaticCache(draft.config, 1, size, device=dev, dtype=draft.dtype)
    # the target's cache holds seq[:-1]; its first token comes from the prompt's logits
    logits = timed(lambda: _forward(target, seq, 0, t_cache, last_only=True), "prefill_time_s")
    stats.target_forwards += 1
    new = [pick(logits[-1])]
    seq.append(new[0])
    d_len = 0  # tokens of seq in the draft cache

    while len(new) < max_new_tokens and not (eos and new[-1] in eos):
        n = len(seq)
        # ---- propose
        q_dists: list[torch.Tensor] = []
        if draft is None:
            proposal = prompt_lookup(seq, k, max_ngram)
        else:
            proposal = []

            def propose():
                nonlocal d_len
                chunk = seq[d_len:]
                for _ in range(k):
                    dl = _forward(draft, chunk, d_len, d_cache, last_only=True)[0, :shared]
                    d_len += len(chunk)
                    if greedy:
                        x = int(dl.argmax())
                    else:
                        qd = torch.zeros(vocab, device=dev)
                        qd[:shared] = dist(dl)
                        q_dists.append(qd)
                        x = int(torch.multinomial(qd, 1, generator=gen))
                    proposal.append(x)
                    chunk = [x]
                stats.draft_forwards += k

            timed(propose, "draft_time_s")
        # ---- verify: the last token and the proposals in one target forward
        logits = timed(lambda: _forward(target, [seq[-1]] + proposal, n - 1, t_cache),
                       "target_time_s")  # (len(proposal) + 1, V)
        stats.target_forwards += 1
        accepted, extra = 0, None
        choices = logits.argmax(-1).tolist() if greedy else None  # one host sync for all
        for i, x in enumerate(proposal):
            if greedy:
                if choices[i] == x:
                    accepted += 1
                    continue
                extra = choices[i]
                break
            p = dist(logits[i])
            q = q_dists[i] if draft is not None else torch.nn.functional.one_hot(
                torch.tensor(x, device=dev), vocab).float()
            ok, replacement = rule(p, q, x, gen)
            if ok:
                accepted += 1
                continue
            extra = replacement
            break
        if extra is None:  # everything kept: a bonus token from the target
            extra = choices[len(proposal)] if greedy else pick(logits[len(proposal)])
        stats.proposed += len(proposal)
        stats.accepted += accepted
        stats.accepted_per_step.append(accepted)
        stats.proposed_per_step.append(len(proposal))
        step_tokens = proposal[:accepted] + [extra]
        # ---- roll both caches back to what is now certain: the sequence but its last token
        t_len, d_len = cache_lengths_after_step(n, accepted, d_len)
        seq.extend(step_tokens)
        new.extend(step_tokens)
        t_cache.truncate(torch.tensor([t_len], device=dev))
        if d_cache is not None:
            d_cache.truncate(torch.tensor([d_len], device=dev))
    # cut at EOS and at the limit (tokens past them are what the target would
    # have produced anyway; they are simply not wanted)
    if eos:
        for i, x in enumerate(new):
            if x in eos:
                new = new[:i + 1]
                break
    new = new[:max_new_tokens]
    stats.new_tokens = len(new)
    return SpecOutput(tokens=new, stats=stats)

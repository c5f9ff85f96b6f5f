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

Batches: every sequence keeps its own length, acceptances and rollback (the
caches hold per-sequence lengths); the draft's k passes and the target's
verification run batched. A finished sequence idles as a dummy until the
others are done.
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


def _forward_rows(model, rows: list[list[int]], starts: list[int], cache,
                  last_only: bool = False) -> torch.Tensor:
    """Feed row i's tokens at positions starts[i].. into the cache (rows of
    different lengths are right-padded and masked). Returns float32 logits
    (B, W, V), W the longest row, or (B, V) after each row's last token
    (``last_only``: the rest are not needed)."""
    dev = model.device
    widths = [len(r) for r in rows]
    W = max(widths)
    ids = torch.tensor([r + [0] * (W - len(r)) for r in rows], device=dev)
    pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(W, device=dev)
    lengths = None if min(widths) == W else torch.tensor(widths, device=dev)
    hidden = model.hidden_states(ids, pos, cache=cache, lengths=lengths)  # (B, W, H)
    if last_only:
        hidden = hidden[torch.arange(len(rows), device=dev), torch.tensor(widths, device=dev) - 1]
    return model.lm_head(hidden).float()


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
    """Generate with speculative decoding.

    input_ids: one prompt or several (a list of token lists of any lengths, or
    a (B, T) tensor): each sequence proposes, is verified and rolls back on its
    own, in one batched draft and one batched target forward per step.
    draft: a model sharing the target's tokenizer, or None for prompt lookup.
    k: proposals per step (>= 1). Sampling parameters as in
    :func:`llmopt_lab.generate.generate`; temperature 0 is greedy.
    acceptance_rule: for experiments only (the lesson's negative control):
    ``fn(p, q, x, generator) -> (accepted, replacement)`` replacing the exact rule.
    Returns a :class:`SpecOutput`: the new tokens of each prompt and the
    :class:`SpecStats` of the batch.
    """
    check_sampling_args(temperature, top_k, top_p)
    if not isinstance(k, int) or k < 1:
        raise GenerationError(f"k must be an integer >= 1, got {k!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    check_same_tokenizer(target_tokenizer, draft_tokenizer)
    ids, lengths = pad_prompts(input_ids)
    B = ids.shape[0]
    seqs = [row[:n].tolist() for row, n in zip(ids, lengths.tolist())]
    T = int(lengths.max())
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

    def finished(i: int) -> bool:
        return len(news[i]) >= max_new_tokens or any(x in eos for x in news[i])

    t_cache = StaticCache(cfg, B, size, device=dev, dtype=target.dtype)
    d_cache = None
    if draft is not None:
        d_cache = StaticCache(draft.config, B, size, device=dev, dtype=draft.dtype)
    # the target's cache holds seq[:-1]; the first new token comes from the prompt's logits
    logits = timed(lambda: _forward_rows(target, seqs, [0] * B, t_cache, last_only=True),
                   "prefill_time_s")  # (B, V)
    stats.target_forwards += 1
    news = [[pick(logits[i])] for i in range(B)]
    for i in range(B):
        seqs[i].append(news[i][0])
    d_lens = [0] * B  # tokens of each sequence in the draft cache
    done = [finished(i) for i in range(B)]

    while not all(done):
        # A finished row no longer advances: it stands in as a one-token dummy
        # at position 0 (its caches emptied), so the batch keeps its shape and
        # no row runs past the caches; its results are ignored.
        views = [[0] if done[i] else seqs[i] for i in range(B)]
        # ---- propose
        q_dists: list[list[torch.Tensor]] = [[] for _ in range(B)]
        if draft is None:
            proposals = [[] if done[i] else prompt_lookup(views[i], k, max_ngram) for i in range(B)]
        else:
            proposals = [[] for _ in range(B)]

            def propose():
                chunks = [views[i][d_lens[i]:] for i in range(B)]
                for _ in range(k):
                    dl = _forward_rows(draft, chunks, d_lens, d_cache, last_only=True)[:, :shared]
                    for i in range(B):
                        d_lens[i] += len(chunks[i])
                    if greedy:
                        xs = dl.argmax(-1).tolist()
                    else:
                        xs = []
                        for i in range(B):
                            qd = torch.zeros(vocab, device=dev)
                            qd[:shared] = dist(dl[i])
                            q_dists[i].append(qd)
                            xs.append(int(torch.multinomial(qd, 1, generator=gen)))
                    for i in range(B):
                        proposals[i].append(xs[i])
                    chunks = [[x] for x in xs]
                stats.draft_forwards += k

            timed(propose, "draft_time_s")
        # ---- verify: each row's last token and its proposals in one target forward
        logits = timed(lambda: _forward_rows(target, [[v[-1]] + p for v, p in zip(views, proposals)],
                                             [len(v) - 1 for v in views], t_cache),
                       "target_time_s")  # (B, 1 + longest proposal, V)
        stats.target_forwards += 1
        choices = logits.argmax(-1).tolist() if greedy else None  # one host sync for all
        t_lens, new_d_lens = [0] * B, [0] * B
        for r in range(B):
            if done[r]:
                continue
            proposal, accepted, extra = proposals[r], 0, None
            for i, x in enumerate(proposal):
                if greedy:
                    if choices[r][i] == x:
                        accepted += 1
                        continue
                    extra = choices[r][i]
                    break
                p = dist(logits[r, i])
                q = q_dists[r][i] if draft is not None else torch.nn.functional.one_hot(
                    torch.tensor(x, device=dev), vocab).float()
                ok, replacement = rule(p, q, x, gen)
                if ok:
                    accepted += 1
                    continue
                extra = replacement
                break
            if extra is None:  # everything kept: a bonus token from the target
                extra = choices[r][len(proposal)] if greedy else pick(logits[r, len(proposal)])
            stats.proposed += len(proposal)
            stats.accepted += accepted
            stats.accepted_per_step.append(accepted)
            stats.proposed_per_step.append(len(proposal))
            # ---- roll both caches back to what is now certain: the sequence but its last token
            t_lens[r], new_d_lens[r] = cache_lengths_after_step(len(seqs[r]), accepted, d_lens[r])
            step_tokens = proposal[:accepted] + [extra]
            seqs[r].extend(step_tokens)
            news[r].extend(step_tokens)
            if finished(r):  # from now on a dummy: empty caches
                done[r] = True
                t_lens[r] = new_d_lens[r] = 0
        d_lens = new_d_lens
        t_cache.truncate(torch.tensor(t_lens, device=dev))
        if d_cache is not None:
            d_cache.truncate(torch.tensor(d_lens, device=dev))
    # cut at EOS and at the limit (tokens past them are what the target would
    # have produced anyway; they are simply not wanted)
    for r in range(B):
        for i, x in enumerate(news[r]):
            if x in eos:
                news[r] = news[r][:i + 1]
                break
        news[r] = news[r][:max_new_tokens]
    stats.new_tokens = sum(len(n) for n in news)
    return SpecOutput(sequences=news, stats=stats)

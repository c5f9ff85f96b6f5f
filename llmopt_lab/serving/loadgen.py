"""A load generator for the engine (lesson 10): Poisson arrivals, named length
distributions, prompts from the course corpus, and the serving metrics.

::

    reqs = make_requests(128, prompt="uniform", output="longtail", seed=0,
                         tokens=corpus_tokens(tok))
    report = run_load(engine, reqs, rate=8.0)   # requests per second; inf = all at once
    report["throughput_tok_s"], report["ttft_s"]["p99"], report["tbt_s"]["p99"]

Length distributions (``LENGTHS``; ``scale`` shrinks them for a CPU):
``uniform`` 100-1024 tokens; ``longtail`` log-normal (median 128, sigma 1,
capped at 1024): most requests short, a few very long, as in chat traffic;
``exponential`` mean 256 capped at 1024 (Anyscale's LLMPerf-style load).

Metrics: throughput (generated tokens per second of wall time, from the
first arrival to the last finish), TTFT (first token - arrival), TBT (time
between consecutive tokens of one request), end-to-end latency, each with
p50/p90/p99, and the mean fraction of KV blocks held per step.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from ..errors import ServingError
from ..sampling import SamplingParams

#: name -> (kind, parameters) at scale 1
LENGTHS = {
    "uniform": ("uniform", dict(low=100, high=1024)),
    "longtail": ("lognormal", dict(median=128, sigma=1.0, cap=1024)),
    "exponential": ("exponential", dict(mean=256, cap=1024)),
}


def draw_lengths(name: str, n: int, rng: random.Random, scale: float = 1.0) -> list[int]:
    """``n`` lengths (>= 1) from the named distribution, every length parameter
    multiplied by ``scale``. Raises ServingError for an unknown name."""
    if name not in LENGTHS:
        raise ServingError(f"unknown length distribution {name!r}; known: {', '.join(LENGTHS)}")
    if not scale > 0:
        raise ServingError(f"scale must be positive, got {scale!r}")
    kind, p = LENGTHS[name]
    s = lambda x: max(1, round(x * scale))  # noqa: E731
    if kind == "uniform":
        return [rng.randint(s(p["low"]), s(p["high"])) for _ in range(n)]
    if kind == "lognormal":
        mu = math.log(p["median"] * scale)
        return [min(s(p["cap"]), max(1, round(rng.lognormvariate(mu, p["sigma"])))) for _ in range(n)]
    return [min(s(p["cap"]), max(1, round(rng.expovariate(1 / (p["mean"] * scale))))) for _ in range(n)]


@dataclass
class LoadRequest:
    """One request of a workload: prompt token ids, tokens to generate, and
    its arrival offset (s) from the start of the run."""

    prompt: list[int]
    max_new_tokens: int
    arrival: float = 0.0


def corpus_tokens(tokenizer, max_files: int = 8) -> list[int]:
    """Token ids of a few held-out files of the course corpus (prompts are cut from them)."""
    from ..data import encode_files, split_files

    files = split_files("heldout")[:max_files]
    ids = [t for f in encode_files(tokenizer, files) for t in f]
    if not ids:
        raise ServingError("the course corpus gave no tokens")
    return ids


def make_requests(n: int, prompt: str = "uniform", output: str = "longtail", seed: int = 0,
                  rate: float = math.inf, tokens: list[int] | None = None, vocab: int = 4096,
                  scale: float = 1.0, max_len: int | None = None) -> list[LoadRequest]:
    """``n`` requests: prompt and output lengths from the named distributions
    (``scale`` applies to both), prompts cut from ``tokens`` (the corpus) or
    random ids below ``vocab``, arrivals a Poisson process of ``rate``
    requests/s (inf: all at time 0). ``max_len`` trims prompt + output to fit
    a context. Deterministic for a seed."""
    if not isinstance(n, int) or n < 1:
        raise ServingError(f"n must be a positive integer, got {n!r}")
    if not rate > 0:
        raise ServingError(f"rate must be positive (inf: all at once), got {rate!r}")
    rng = random.Random(seed)
    plens = draw_lengths(prompt, n, rng, scale)
    olens = draw_lengths(output, n, rng, scale)
    t, out = 0.0, []
    for p, o in zip(plens, olens):
        if max_len is not None:
            o = max(1, min(o, max_len // 2))
            p = max(1, min(p, max_len - o))
        if tokens:
            start = rng.randrange(0, max(1, len(tokens) - p))
            ids = list(tokens[start:start + p]) or [tokens[0]]
        else:
            ids = [rng.randrange(1, vocab) for _ in range(p)]
        out.append(LoadRequest(ids, o, t))
        if math.isfinite(rate):
            t += rng.expovariate(rate)
    return out


def percentiles(xs, ps=(50, 90, 99)) -> dict:
    """{'p50': ..., 'p90': ..., 'p99': ..., 'mean': ...} (nearest-rank); NaN when empty."""
    xs = sorted(xs)
    if not xs:
        return {f"p{p}": math.nan for p in ps} | {"mean": math.nan}
    out = {f"p{p}": xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))] for p in ps}
    out["mean"] = sum(xs) / len(xs)
    return out


def run_load(engine, requests: list[LoadRequest], progress: bool = False,
             ignore_eos: bool = True) -> dict:
    """Drive ``engine`` in process with ``requests`` at their arrival offsets
    (wall clock); greedy, ``ignore_eos`` so each generates its length.

    Returns a dict: requests, generated tokens, seconds, throughput_tok_s,
    requests_per_s, ttft_s / tbt_s / latency_s percentiles, kv_utilisation,
    the engine's stats, and ``outputs`` (token ids per request, in order).
    """
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="requests", unit="req", leave=False)
    engine.reset_stats()
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
    t0 = engine.clock()
    ids, nxt, done, finals = {}, 0, 0, {}
    while done < len(requests):
        now = engine.clock()
        while nxt < len(order) and requests[order[nxt]].arrival <= now - t0:
            r = requests[order[nxt]]
            rid = engine.add_request(r.prompt, SamplingParams(max_new_tokens=r.max_new_tokens,
                                                              ignore_eos=ignore_eos),
                                     arrival_time=t0 + r.arrival)
            ids[rid] = order[nxt]
            nxt += 1
        outs = engine.step()
        for o in outs:
            if o.finished:
                finals[ids[o.request_id]] = engine._seqs[o.request_id]
                done += 1
                if bar is not None:
                    bar.update(1)
        if not outs and not engine.scheduler.running and nxt < len(order):
            wait = t0 + requests[order[nxt]].arrival - engine.clock()
            if wait > 0:
                time.sleep(min(wait, 0.01))
    end = engine.clock()
    if bar is not None:
        bar.close()
    seqs = [finals[i] for i in range(len(requests))]
    gen = sum(s.num_output for s in seqs)
    tbt = [b - a for s in seqs for a, b in zip(s.token_times, s.token_times[1:])]
    st = engine.stats
    span = end - t0
    return dict(
        requests=len(requests), generated_tokens=gen, seconds=span,
        throughput_tok_s=gen / span, requests_per_s=len(requests) / span,
        ttft_s=percentiles([s.first_token_time - s.arrival_time for s in seqs]),
        tbt_s=percentiles(tbt),
        latency_s=percentiles([s.finish_time - s.arrival_time for s in seqs]),
        kv_utilisation=st.kv_blocks_used / max(1, st.steps) / engine.num_blocks,
        stats=st.as_dict(), outputs=[s.output for s in seqs])

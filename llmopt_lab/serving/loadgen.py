"""A load generator for the engine (lesson 10): Poisson arrivals, named length
distributions, prompts from the course corpus, and the serving metrics.

::

    reqs = make_requests(128, prompt="uniform", output="longtail", seed=0,
                         rate=8.0, tokens=corpus_tokens(tok))  # requests/s; inf = all at once
    report = run_load(engine, reqs)
    report["throughput_tok_s"], report["ttft_s"]["p99"], report["tbt_s"]["p99"]

Length distributions (``LENGTHS``; ``scale`` shrinks them for a CPU):
``uniform`` 100-1024 tokens; ``longtail`` log-normal (median 128, sigma 1,
capped at 1024): most requests short, a few very long, as in chat traffic;
``exponential`` mean 256 capped at 1024 (Anyscale's LLMPerf-style load).

Metrics: throughput (generated tokens per second of wall time, from the
first arrival to the last finish), TTFT (first token - arrival), TBT (time
between consecutive tokens of one request), end-to-end latency, each with
p50/p90/p99, and the mean fraction of KV blocks held per step.

:func:`run_load_http` sends the same workload to the OpenAI-compatible server
(:mod:`llmopt_lab.serving.server`) over loopback HTTP with streaming, one
thread per request, and reports the same metrics as seen by the client
(``outputs`` are then texts: the stream carries no token ids).
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

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
                  scale: float = 1.0, max_len: int | None = None, prompt_scale: float | None = None,
                  output_scale: float | None = None) -> list[LoadRequest]:
    """``n`` requests: prompt and output lengths from the named distributions
    (``scale`` applies to both; ``prompt_scale`` / ``output_scale`` override
    it for one), prompts cut from ``tokens`` (the corpus) or random ids below
    ``vocab``, arrivals a Poisson process of ``rate`` requests/s (inf: all at
    time 0). ``max_len`` trims prompt + output to fit a context.
    Deterministic for a seed. Raises ServingError for bad counts, rates,
    scales or distribution names."""
    if not isinstance(n, int) or n < 1:
        raise ServingError(f"n must be a positive integer, got {n!r}")
    if not rate > 0:
        raise ServingError(f"rate must be positive (inf: all at once), got {rate!r}")
    rng = random.Random(seed)
    plens = draw_lengths(prompt, n, rng, scale if prompt_scale is None else prompt_scale)
    olens = draw_lengths(output, n, rng, scale if output_scale is None else output_scale)
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


def request_metrics(arrival: float, token_times: list[float]) -> dict:
    """The latency of one request from its trace (seconds on one clock).

    arrival: when the request arrived; token_times: when each generated
    token reached the client, in order (at least one). Returns a dict:
    ``ttft`` (time to first token: first token - arrival), ``latency``
    (last token - arrival), ``tpot`` (time per output token after the first:
    (last - first) / (n - 1); NaN for a single token) and ``tbt`` (the list of
    the n - 1 gaps between consecutive tokens).
    Raises ServingError for an empty trace, times going backwards, or a
    token before the arrival.
    """
    times = [float(t) for t in token_times]
    if not times:
        raise ServingError("a request trace needs at least one token time")
    if times[0] < arrival or any(b < a for a, b in zip(times, times[1:])):
        raise ServingError("token times must not precede the arrival or go backwards")
    n = len(times)
    return dict(ttft=times[0] - arrival, latency=times[-1] - arrival,
                tpot=(times[-1] - times[0]) / (n - 1) if n > 1 else math.nan,
                tbt=[b - a for a, b in zip(times, times[1:])])


def run_load(engine, requests: list[LoadRequest], progress: bool = False,
             ignore_eos: bool = True) -> dict:
    """Drive ``engine`` in process with ``requests`` at their arrival offsets
    (wall clock); greedy, ``ignore_eos`` so each generates its length.

    Returns a dict: requests, generated tokens, seconds, throughput_tok_s,
    requests_per_s, ttft_s / tbt_s / tpot_s / latency_s percentiles (see
    :func:`request_metrics`), kv_utilisation,
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
    per = [request_metrics(s.arrival_time, s.token_times) for s in seqs]
    tbt = [g for m in per for g in m["tbt"]]
    st = engine.stats
    span = end - t0
    return dict(
        requests=len(requests), generated_tokens=gen, seconds=span,
        throughput_tok_s=gen / span, requests_per_s=len(requests) / span,
        ttft_s=percentiles([m["ttft"] for m in per]), tbt_s=percentiles(tbt),
        tpot_s=percentiles([m["tpot"] for m in per if not math.isnan(m["tpot"])]),
        latency_s=percentiles([s.finish_time - s.arrival_time for s in seqs]),
        kv_utilisation=st.kv_blocks_used / max(1, st.steps) / engine.num_blocks,
        stats=st.as_dict(), outputs=[s.output for s in seqs])


@dataclass
class _HttpResult:
    """What one streamed request saw on the client (perf_counter seconds)."""

    sent: float = math.nan
    event_times: list[float] = field(default_factory=list)
    text: str = ""
    completion_tokens: int | None = None
    finished: float = math.nan


def _http_error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode("utf-8", "replace")
    except OSError:
        body = ""
    try:
        msg = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = body.strip() or e.reason
    return f"HTTP {e.code}: {msg}"


def _stream_one(url: str, r: LoadRequest, ignore_eos: bool, timeout: float,
                stop: threading.Event) -> _HttpResult:
    """POST one streaming completion and record the time of every event."""
    body = json.dumps({"prompt": list(r.prompt), "max_tokens": r.max_new_tokens,
                       "temperature": 0, "ignore_eos": ignore_eos, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Accept": "text/event-stream"})
    res = _HttpResult(sent=time.perf_counter())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            done = False
            for raw in resp:  # one SSE line at a time, as the chunks arrive
                now = time.perf_counter()
                if stop.is_set():
                    raise ServingError("cancelled: another request failed")
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.startswith("data:"):
                    continue  # blank separators, comments
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if "error" in ev:
                    raise ServingError(f"the server failed the request in its stream: "
                                       f"{ev['error'].get('message', ev['error'])}")
                choices = ev.get("choices") or []
                if choices:
                    res.event_times.append(now)
                    res.text += choices[0].get("text") or ""
                if ev.get("usage"):
                    res.completion_tokens = ev["usage"].get("completion_tokens")
            if not done:
                raise ServingError("the stream ended without [DONE]")
    except urllib.error.HTTPError as e:
        raise ServingError(f"{url}/v1/completions answered {_http_error_message(e)}") from None
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
        reason = getattr(e, "reason", e)
        raise ServingError(f"request to {url}/v1/completions failed: {reason}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ServingError(f"a bad server-sent event from {url}: {e}") from None
    res.finished = time.perf_counter()
    if not res.event_times:
        raise ServingError("the stream carried no tokens")
    return res


def run_load_http(url: str, requests: list[LoadRequest], progress: bool = False,
                  ignore_eos: bool = True, timeout: float = 600.0) -> dict:
    """Drive the OpenAI-compatible server at ``url`` (e.g. ``srv.url``,
    ``http://127.0.0.1:8000``) with ``requests``: each is sent at its arrival
    offset (wall clock, ``time.perf_counter``) from its own thread as a
    streaming ``POST /v1/completions`` with the prompt as token ids,
    ``temperature`` 0 (greedy) and ``ignore_eos``.

    The stream gives, per engine step, one server-sent event with the new
    *text* (no token ids) and, on the last one, ``usage.completion_tokens``.
    An event is timestamped when the client reads it; the tokens of one
    request are counted from ``usage`` (the events if it is missing), and if
    one event carried several tokens they share its timestamp (TBT 0).

    Returns a dict like :func:`run_load`: requests, generated_tokens,
    seconds (first send to last finish), throughput_tok_s, requests_per_s,
    ttft_s (first event - send), tbt_s (between consecutive tokens of one
    request), tpot_s (per request: (last event - first event) / (tokens - 1)),
    latency_s (end of stream - send), each a :func:`percentiles`
    dict in seconds; ``outputs``: the generated *text* per request, in
    request order (the concatenated stream deltas, not token ids: compare
    with ``tokenizer.decode(ids, skip_special_tokens=True)``);
    ``completion_tokens``: tokens per request; ``transport``: ``"http"``.
    No kv_utilisation / stats: the server does not expose them.

    timeout: seconds any one socket operation may block (connect, a read
    between events). Raises ServingError for an empty ``requests``, a
    ``url`` that is not ``http://...`` (before sending anything), a server
    that cannot be reached, a non-2xx answer (with its status and message),
    or an error event in a stream; the first failure stops the other
    requests (those not yet sent are not sent).
    """
    if not isinstance(url, str) or not url.startswith("http://") or len(url) <= len("http://"):
        raise ServingError(f"url must be an http:// address such as http://127.0.0.1:8000, "
                           f"got {url!r}")
    url = url.rstrip("/")
    if not requests:
        raise ServingError("requests must be a non-empty list of LoadRequest")
    if not all(isinstance(r, LoadRequest) for r in requests):
        raise ServingError("requests must be a list of LoadRequest")
    if not timeout > 0:
        raise ServingError(f"timeout must be positive, got {timeout!r}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="requests", unit="req", leave=False)
    stop = threading.Event()
    lock = threading.Lock()
    results: list[_HttpResult | None] = [None] * len(requests)
    errors: list[tuple[float, int, ServingError]] = []
    t0 = time.perf_counter()

    def worker(i: int) -> None:
        r = requests[i]
        if stop.wait(max(0.0, t0 + r.arrival - time.perf_counter())):
            return  # another request failed before this one was due
        try:
            res = _stream_one(url, r, ignore_eos, timeout, stop)
        except ServingError as e:
            with lock:
                errors.append((time.perf_counter(), i, e))
            stop.set()
            return
        except Exception as e:  # noqa: BLE001 - reported to the caller below
            with lock:
                errors.append((time.perf_counter(), i, ServingError(
                    f"request {i} failed: {type(e).__name__}: {e}")))
            stop.set()
            return
        results[i] = res
        if bar is not None:
            with lock:
                bar.update(1)

    threads = [threading.Thread(target=worker, args=(i,), name=f"loadgen-http-{i}", daemon=True)
               for i in range(len(requests))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()  # on Ctrl-C too: the threads stop at their next event
        if bar is not None:
            bar.close()
    if errors:
        errors.sort(key=lambda x: x[0])
        first = [e for e in errors if "cancelled:" not in str(e[2])] or errors
        _, i, e = first[0]
        raise ServingError(f"request {i} of {len(requests)}: {e}")
    res = [x for x in results if x is not None]
    assert len(res) == len(requests)
    counts, ttft, tbt, lat, tpot = [], [], [], [], []
    for x in res:
        n = x.completion_tokens if x.completion_tokens is not None else len(x.event_times)
        counts.append(n)
        ttft.append(x.event_times[0] - x.sent)
        lat.append(x.finished - x.sent)
        tbt += [b - a for a, b in zip(x.event_times, x.event_times[1:])]
        tbt += [0.0] * max(0, n - len(x.event_times))  # tokens that shared an event
        if n > 1:
            tpot.append((x.event_times[-1] - x.event_times[0]) / (n - 1))
    end = max(x.finished for x in res)
    span = end - t0
    gen = sum(counts)
    return dict(
        requests=len(requests), generated_tokens=gen, seconds=span,
        throughput_tok_s=gen / span, requests_per_s=len(requests) / span,
        ttft_s=percentiles(ttft), tbt_s=percentiles(tbt), tpot_s=percentiles(tpot),
        latency_s=percentiles(lat), outputs=[x.text for x in res], completion_tokens=counts, transport="http")

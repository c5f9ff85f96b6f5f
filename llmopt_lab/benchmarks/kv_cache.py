"""Lesson 02 benchmark: decode latency per token with and without a KV cache.

* Per-token decode latency at a few positions (batch 1): no cache (the whole
  prefix recomputed), the dynamic (concatenating) cache, the static cache and
  the int8 cache; bytes of each cache.
* Flatness: the static cache's time per token over a long generation (the last
  10% of the tokens against the first 10%).
* On a GPU, the profiler's view of one cached step (launch-bound at 1B).
* The int8 cache's cost: its bytes against a bfloat16 cache of the same size,
  and its quality against the exact cache on llmopt-tiny's held-out windows
  (perplexity delta, KL divergence, top-1 agreement; device-independent).

A position the model's context cannot reach (2048 on llmopt-tiny, whose
context is 2048 tokens, leaves no room for the timed steps) is measured at
the last position that fits, and recorded as such.
"""

from __future__ import annotations

import torch

from .. import measure
from ..generate import decode_one_token, prefill
from ..cache import make_cache
from ..weights import ZOO, load_model

KINDS = ("none", "dynamic", "static", "int8")
WARMUP = 3  # untimed steps before each measurement

SIZES = {
    "quick": dict(model="synthetic:tiny", dtype="float32", positions=[16, 64], steps=3,
                  flat_tokens=64, profile=False, quality_windows=2),
    "cpu": dict(model="llmopt-tiny", dtype="float32", positions=[128, 512, 2048], steps=5,
                flat_tokens=2048, profile=True, quality_windows=None),
    "gpu": dict(model="synthetic:llama-1b", dtype="bfloat16", positions=[128, 512, 2048],
                steps=20, flat_tokens=2048, profile=True, quality_windows=None),
}


def _ids(model, n: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, n), device=model.device)


def step_latency(model, kind: str, position: int, steps: int = 5, max_len: int | None = None) -> dict:
    """Median seconds for the decode step of the token at ``position`` (batch 1).

    kind 'none' recomputes the whole prefix (a forward over position + 1
    tokens); the caches first prefill ``position`` tokens, then each timed
    call feeds one token. ``max_len``: the static/int8 caches' size (their
    step cost depends on it, not on the position).
    """
    dev = model.device
    if kind == "none":
        ids = _ids(model, position + 1)

        def step():
            with torch.inference_mode():
                h = model.hidden_states(ids)
                model.lm_head(h[:, -1])

        t = measure.time_fn(step, warmup=WARMUP, repeat=steps, device=dev)
        return dict(kind=kind, position=position, time_s=t.median, cache_bytes=0)
    max_len = max_len or min(position + WARMUP + steps + 1, model.config.max_position_embeddings)
    cache = make_cache(kind, model.config, 1, max_len, device=dev, dtype=model.dtype)
    prefill(model, _ids(model, position), torch.tensor([position], device=dev), cache)
    tok = torch.zeros(1, dtype=torch.long, device=dev)
    state = {"pos": torch.tensor([position], device=dev)}

    def step():
        decode_one_token(model, tok, state["pos"], cache)
        state["pos"] = state["pos"] + 1

    t = measure.time_fn(step, warmup=WARMUP, repeat=steps, device=dev)
    return dict(kind=kind, position=position, time_s=t.median, cache_bytes=cache.nbytes)


def per_token_times(model, kind: str, n_tokens: int) -> list[float]:
    """Seconds of each of ``n_tokens`` decode steps from a 1-token prompt."""
    import time

    dev = model.device
    cache = make_cache(kind, model.config, 1, n_tokens + 2, device=dev, dtype=model.dtype)
    prefill(model, _ids(model, 1), torch.tensor([1], device=dev), cache)
    tok = torch.zeros(1, dtype=torch.long, device=dev)
    pos = torch.tensor([1], device=dev)
    times = []
    for _ in range(n_tokens):
        measure.synchronize(dev)
        t0 = time.perf_counter()
        decode_one_token(model, tok, pos, cache)
        measure.synchronize(dev)
        times.append(time.perf_counter() - t0)
        pos = pos + 1
    return times


def flatness(times: list[float]) -> float:
    """Mean time of the last 10% of the steps over the first 10% (1.0 = flat)."""
    k = max(1, len(times) // 10)
    return (sum(times[-k:]) / k) / (sum(times[:k]) / k)


def run(size: str = "cpu", device=None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    p = SIZES[size]
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    name = p["model"]
    if name in ZOO and not (ZOO[name] / "config.json").exists():
        name = "synthetic:tiny"
    torch.manual_seed(0)
    model, _ = load_model(name, device=dev, dtype=p["dtype"])
    context = model.config.max_position_embeddings
    # warm-up and timed steps write positions position .. position + WARMUP + steps
    positions = sorted({min(pos, context - WARMUP - p["steps"] - 1) for pos in p["positions"]})
    top = min(max(positions) + WARMUP + p["steps"] + 1, context)
    rows = []
    bar = tqdm(total=len(positions) * len(KINDS) + 3, desc="lesson 02", disable=not progress,
               leave=False)
    for position in positions:
        for kind in KINDS:
            bar.set_postfix_str(f"{kind} @ {position}")
            rows.append(step_latency(model, kind, position, p["steps"],
                                     max_len=top if kind in ("static", "int8") else None))
            bar.update()
    bar.set_postfix_str("static cache over a long generation")
    flat_tokens = min(p["flat_tokens"], context - 2)
    times = per_token_times(model, "static", flat_tokens)
    bar.update()
    out = dict(benchmark="kv_cache", lesson="02", size=size, model=name,
               dtype=str(model.dtype).replace("torch.", ""), parameters=model.config.num_parameters(),
               positions_asked=p["positions"], rows=rows, flat_tokens=flat_tokens,
               static_flatness=flatness(times), static_times_s=times)
    bar.set_postfix_str("int8 cache: bytes and quality")
    out["int8"] = int8_cost(model.config, top, p["quality_windows"], dev)
    bar.update()
    last = max(positions)
    t = {r["kind"]: r["time_s"] for r in rows if r["position"] == last}
    out["speedup_static_vs_none_at_last"] = t["none"] / t["static"]
    if p["profile"]:
        cache = make_cache("static", model.config, 1, top, device=dev, dtype=model.dtype)
        prefill(model, _ids(model, last), torch.tensor([last], device=dev), cache)
        tok, pos = torch.zeros(1, dtype=torch.long, device=dev), torch.tensor([last], device=dev)
        prof = measure.profile_step(lambda: decode_one_token(model, tok, pos, cache), steps=5,
                                  device=dev)
        out["profile"] = dict(prof.to_dict(), summary=prof.summary())
        cost = measure.step_cost(model.config, 1, 1, last, model.dtype)
        out["flop_ratio_none_vs_static"] = (
            measure.step_cost(model.config, 1, last + 1, 0, model.dtype).flops / cost.flops)
    bar.update()
    bar.close()
    return out


def int8_cost(config, tokens: int, windows: int | None, device) -> dict:
    """The int8 cache against the exact one: bytes of each for ``tokens``
    tokens of ``config`` (int8 against bfloat16), and the quality on
    llmopt-tiny's held-out windows (the first ``windows``, or all of the quick
    set) when the zoo model is present."""
    bf16 = make_cache("static", config, 1, tokens, device="cpu", dtype=torch.bfloat16).nbytes
    int8 = make_cache("int8", config, 1, tokens, device="cpu", dtype=torch.bfloat16).nbytes
    out = dict(tokens=tokens, bytes_bf16=bf16, bytes_int8=int8, bytes_ratio_vs_bf16=int8 / bf16)
    if not (ZOO["llmopt-tiny"] / "config.json").exists():
        out["quality"] = None
        return out
    from ..data import heldout_set

    tiny, tok = load_model("llmopt-tiny", device=device, dtype="float32")
    held = heldout_set(tok, quick=True)
    n = len(held) if windows is None else min(windows, len(held))
    out["quality"] = dict(model="llmopt-tiny", windows=n,
                          **cache_quality(tiny, held.ids[:n], held.lengths[:n], kind="int8"))
    return out


def summary_rows(result: dict) -> list[dict]:
    rows = []
    by_pos: dict[int, dict] = {}
    for r in result["rows"]:
        by_pos.setdefault(r["position"], {})[r["kind"]] = r
    for position, kinds in sorted(by_pos.items()):
        for kind in KINDS:
            r = kinds[kind]
            rows.append({"model": result["model"], "position": position, "cache": kind,
                         "ms/token": r["time_s"] * 1e3,
                         "x vs none": kinds["none"]["time_s"] / r["time_s"],
                         "cache MB": r["cache_bytes"] / 1e6})
    return rows


def summary_text(result: dict) -> str:
    """The targets' figures in words: the static cache's speed-up over no cache
    at the last position, flatness, and the int8 cache's bytes and quality."""
    last = max(r["position"] for r in result["rows"])
    lines = [f"static cache vs no cache at position {last}: "
             f"{result['speedup_static_vs_none_at_last']:.1f}x faster per token",
             f"static cache over {result['flat_tokens']} tokens: the last 10% cost "
             f"{result['static_flatness']:.2f}x the first 10%"]
    if "profile" in result:
        lines.append(f"one cached step: {result['profile']['summary']}")
    i8 = result.get("int8")
    if i8:
        lines.append(f"int8 cache: {100 * i8['bytes_ratio_vs_bf16']:.0f}% of a bfloat16 cache's bytes")
        q = i8.get("quality")
        if q:
            lines.append(f"int8 cache on {q['model']} ({q['tokens']} held-out tokens): perplexity "
                         f"{q['ppl']:.3f} vs {q['ppl_exact']:.3f} exact ({q['ppl_delta_pct']:+.2f}%), "
                         f"KL {q['kl']:.2e}, top-1 agreement {100 * q['top1']:.2f}%")
    return "\n".join(lines)


def plot(result: dict, provenance: dict):
    """Time per token against position, one line per cache."""
    from ..measure import plots

    positions = sorted({r["position"] for r in result["rows"]})
    series = {kind: [next(r["time_s"] * 1e3 for r in result["rows"]
                          if r["kind"] == kind and r["position"] == p) for p in positions]
              for kind in KINDS}
    return plots.sweep(positions, series, "position of the generated token", "ms per token",
                       logx=True, logy=True, provenance=provenance,
                       title=f"{result['model']}: decode time per token")


@torch.inference_mode()
def cache_quality(model, ids: torch.Tensor, lengths: torch.Tensor, kind: str = "int8",
                  batch_size: int = 8) -> dict:
    """Quality of a lossy cache against the exact static cache on the same windows.

    ids: (N, W) right-padded windows; lengths: (N,). Each window is run as one
    prefill through both caches (keys and values pass through the lossy cache
    before attention reads them). Returns the perplexity with each cache over
    every token after a window's first, the mean KL(exact || lossy) of the
    next-token distributions and their top-1 agreement.
    """
    from ..measure.metrics import kl_divergence, perplexity_from_nll, token_nll, top1_agreement

    dev = model.device
    nll = {"static": 0.0, kind: 0.0}
    count, kl_sum, agree_sum = 0, 0.0, 0.0
    for start in range(0, ids.shape[0], batch_size):
        x = ids[start:start + batch_size].to(dev)
        n = lengths[start:start + batch_size].to(dev)
        B, W = x.shape
        mask = torch.arange(1, W, device=dev)[None, :] < n[:, None]  # scored targets
        logits = {}
        for k in ("static", kind):
            cache = make_cache(k, model.config, B, W, device=dev, dtype=model.dtype)
            logits[k] = model(x, cache=cache, lengths=n)[:, :-1]
            nll[k] += token_nll(logits[k], x[:, 1:], mask)[0]
        m = int(mask.sum())
        count += m
        kl_sum += kl_divergence(logits["static"], logits[kind], mask) * m
        agree_sum += top1_agreement(logits["static"], logits[kind], mask) * m
    ppl_exact = perplexity_from_nll(nll["static"], count)
    ppl = perplexity_from_nll(nll[kind], count)
    return dict(kind=kind, tokens=count, ppl_exact=ppl_exact, ppl=ppl,
                ppl_delta_pct=100 * (ppl / ppl_exact - 1), kl=kl_sum / count,
                top1=agree_sum / count)

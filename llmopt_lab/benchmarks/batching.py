"""Lesson 10's benchmark: static, dynamic and continuous batching, chunked
prefill and packed prefill, each on one workload in one run.

1. **Policies.** Every policy serves the same requests (prompt lengths
   uniform, output lengths long-tail and, at GPU sizes, uniform too; all
   arriving at once) with the same maximum batch and the same KV budget
   (bytes). Static and dynamic batching reserve each member's worst case
   (prompt + max_new_tokens) when a batch forms, so the budget caps their
   batch; continuous batching admits on the prompt and pages the rest.
   Reported per policy: throughput (generated tokens / s), TTFT,
   time-between-tokens and latency percentiles, padding computed, steps,
   preemptions, KV utilisation. Each policy runs ``repeats`` times; the
   continuous / static ratio is given as the median with the range over
   the repeats (repeat i of one policy against repeat i of the other).
2. **Chunked prefill.** Long prompts arriving (Poisson) while others
   decode, under the continuous policy with whole-prompt steps and with a
   per-step token budget: p99 time between tokens and throughput.
3. **Packed prefill.** A batch of ragged prompts prefilled once padded to
   the longest (the static policy's first step) and once packed (the
   continuous policy, one step, no padding): prompt tokens per second.

Greedy outputs must be identical across policies in float32; in bfloat16
batch-dependent rounding may flip a near-tie, so the agreement is reported
but is not a target there.

Sizes: ``quick`` (tests), ``cpu`` (llmopt-tiny, 128 requests, batch 32,
lengths scaled by 1/8), ``gpu`` (a 1B-shaped synthetic model in bf16,
1,024 requests, batch 256, lengths scaled by 1/4 to fit a 10-minute call)
and ``gpu-full`` (the issue's workload at full length: uniform 100-1024,
long-tail up to 1024; a long run).
"""

from __future__ import annotations

import statistics
import time

import torch

from . import target_lines

#: goals per size class ("cpu" for quick and cpu, "gpu" for gpu and gpu-full)
TARGETS = {
    "cpu": dict(continuous_over_static={"longtail": 3.0}, chunked_tbt_ratio=2.0,
                chunked_max_throughput_loss=0.10, packed_over_padded=1.3),
    "gpu": dict(continuous_over_static={"longtail": 8.0, "uniform": 2.5}, chunked_tbt_ratio=2.0,
                chunked_max_throughput_loss=0.10, packed_over_padded=1.3),
}

_CPU = dict(model="llmopt-tiny", dtype="float32", requests=128, max_num_seqs=32, scale=0.125,
            prompt="uniform", outputs=["longtail"], seed=0, max_wait_s=0.05, kv_bytes=None,
            repeats=3, policies=["static", "dynamic", "continuous"],
            chunked=dict(requests=48, prompt="uniform", output="longtail", prompt_scale=0.5,
                         output_scale=0.125, rate=16.0, budget=128, max_num_seqs=32, seed=1),
            packed=dict(prompts=32, prompt="uniform", prompt_scale=0.25, repeats=5, seed=2))
SIZES = {
    "quick": dict(_CPU, requests=12, max_num_seqs=4, scale=0.03, repeats=1,
                  chunked=dict(_CPU["chunked"], requests=8, prompt_scale=0.1, output_scale=0.03,
                               rate=50.0, budget=16, max_num_seqs=8),
                  packed=dict(_CPU["packed"], prompts=4, prompt_scale=0.05, repeats=1)),
    "cpu": _CPU,
    "gpu": dict(_CPU, model="synthetic:llama-1b", dtype="bfloat16", requests=1024, max_num_seqs=256,
                scale=0.25, outputs=["longtail", "uniform"], kv_bytes=1 << 30, repeats=1,
                chunked=dict(_CPU["chunked"], requests=256, prompt_scale=1.0, output_scale=0.25,
                             rate=32.0, budget=512, max_num_seqs=256),
                packed=dict(_CPU["packed"], prompts=64, prompt_scale=1.0, repeats=5)),
}
SIZES["gpu-full"] = dict(SIZES["gpu"], scale=1.0, kv_bytes=4 << 30)


def _goals(size: str) -> dict:
    return TARGETS["gpu" if size.startswith("gpu") else "cpu"]


def _engine(model, tok, p: dict, **options):
    from ..serving import Engine

    return Engine(model, tok, max_num_seqs=p["max_num_seqs"], kv_bytes=p.get("kv_bytes"), **options)


def run_policies(model, tok, p: dict, tokens, progress: bool = False) -> tuple[list, dict]:
    """Experiment 1: rows (one per output distribution, policy and repeat)
    and, per distribution, the fraction of requests whose greedy outputs
    agree across the policies."""
    from ..serving.loadgen import make_requests, run_load

    ctx = model.config.max_position_embeddings
    rows, agreement = [], {}
    for dist in p["outputs"]:
        reqs = make_requests(p["requests"], prompt=p["prompt"], output=dist, seed=p["seed"],
                             tokens=tokens, vocab=model.config.vocab_size, scale=p["scale"],
                             max_len=ctx)
        outputs = {}
        for rep in range(p["repeats"]):
            for policy in p["policies"]:
                engine = _engine(model, tok, p, policy=policy, max_wait_s=p["max_wait_s"])
                r = run_load(engine, reqs, progress=progress)
                outs = r.pop("outputs")
                outputs.setdefault(policy, outs)
                rows.append(dict(output=dist, policy=policy, repeat=rep,
                                 prompt_tokens=sum(len(q.prompt) for q in reqs),
                                 max_output=max(q.max_new_tokens for q in reqs),
                                 mean_output=sum(q.max_new_tokens for q in reqs) / len(reqs),
                                 num_blocks=engine.num_blocks, **r))
        first = outputs[p["policies"][0]]
        same = sum(all(outputs[pol][i] == first[i] for pol in outputs) for i in range(len(first)))
        agreement[dist] = same / len(first)
    return rows, agreement


def run_chunked(model, tok, p: dict, tokens, progress: bool = False) -> list[dict]:
    """Experiment 2: the continuous policy with whole prompts per step and
    with chunks under a token budget, on long prompts arriving at a rate."""
    from ..serving.loadgen import make_requests, run_load

    c, ctx = p["chunked"], model.config.max_position_embeddings
    reqs = make_requests(c["requests"], prompt=c["prompt"], output=c["output"], seed=c["seed"],
                         rate=c["rate"], tokens=tokens, vocab=model.config.vocab_size,
                         prompt_scale=c["prompt_scale"], output_scale=c["output_scale"],
                         max_len=ctx)
    rows = []
    for label, chunked, budget in (("whole prompts", False, ctx), ("chunked", True, c["budget"])):
        engine = _engine(model, tok, dict(p, max_num_seqs=c["max_num_seqs"]), policy="continuous",
                         chunked_prefill=chunked, max_num_batched_tokens=budget)
        r = run_load(engine, reqs, progress=progress)
        r.pop("outputs")
        rows.append(dict(mode=label, budget=budget, **r))
    return rows


def run_packed(model, tok, p: dict, tokens) -> dict:
    """Experiment 3: one prefill of ragged prompts, padded (static) and packed
    (continuous, one step): the median time over repeats, prompt tokens/s."""
    from ..sampling import SamplingParams
    from ..serving.loadgen import make_requests

    c = p["packed"]
    reqs = make_requests(c["prompts"], prompt=c["prompt"], output="uniform", seed=c["seed"],
                         tokens=tokens, vocab=model.config.vocab_size,
                         prompt_scale=c["prompt_scale"], output_scale=0.01,
                         max_len=model.config.max_position_embeddings)
    prompts = [q.prompt for q in reqs]
    total = sum(len(q) for q in prompts)
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    out = dict(prompts=len(prompts), prompt_tokens=total,
               padded_tokens=len(prompts) * max(len(q) for q in prompts))
    for label, options in (("padded", dict(policy="static")),
                           ("packed", dict(policy="continuous", chunked_prefill=False,
                                           max_num_batched_tokens=total))):
        engine = _engine(model, tok, dict(p, max_num_seqs=len(prompts)), **options)
        engine.generate(prompts, one)  # warm-up
        times = []
        for _ in range(c["repeats"]):
            engine.reset_stats()
            t0 = time.perf_counter()
            engine.generate(prompts, one)
            times.append(time.perf_counter() - t0)
            assert engine.stats.steps == 1, "the prefill must be one step"
        out[label] = dict(seconds=statistics.median(times), times=times,
                          tokens_per_s=total / statistics.median(times),
                          computed=engine.stats.batch_tokens)
    return out


def run(size: str = "cpu", device=None, progress: bool = True, params: dict | None = None) -> dict:
    """Run the lesson 10 benchmark at a named size; returns a JSON-able dict."""
    from ..sampling import SamplingParams
    from ..serving import Engine
    from ..serving.loadgen import corpus_tokens
    from ..weights import load_model

    p = dict(params or SIZES[size])
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    model, tok = load_model(p["model"], device=dev, dtype=p["dtype"])
    # prompts from the course corpus when the model speaks its tokenizer; random ids otherwise
    tokens = corpus_tokens(tok) if tok is not None and not p["model"].startswith("synthetic:") else None
    Engine(model, tok).generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    rows, agreement = run_policies(model, tok, p, tokens, progress)
    out = dict(benchmark="batching", lesson="10", size=size, params=p, device=str(dev), rows=rows,
               agreement=agreement,
               outputs_identical=all(a == 1.0 for a in agreement.values()),
               chunked=run_chunked(model, tok, p, tokens, progress) if p.get("chunked") else None,
               packed=run_packed(model, tok, p, tokens) if p.get("packed") else None)
    out["targets"] = targets(out)
    return out


def _runs(result, dist, policy):
    return [r for r in result["rows"] if r.get("output", "longtail") == dist and r["policy"] == policy]


def _median_row(result, dist, policy):
    runs = _runs(result, dist, policy)
    if not runs:
        return None
    return sorted(runs, key=lambda r: r["throughput_tok_s"])[len(runs) // 2]


def _dists(result) -> list[str]:
    return list(dict.fromkeys(r.get("output", "longtail") for r in result["rows"]))


def targets(result: dict) -> list[dict]:
    """Each target measured: name, goal, value, met, figures in words."""
    goals, out = _goals(result.get("size", "cpu")), []
    for dist in _dists(result):
        s, c = _runs(result, dist, "static"), _runs(result, dist, "continuous")
        goal = goals["continuous_over_static"].get(dist)
        if not (s and c and goal):
            continue
        ratios = sorted(b["throughput_tok_s"] / a["throughput_tok_s"] for a, b in zip(s, c))
        value = statistics.median(ratios)
        span = f", range {ratios[0]:.2f}-{ratios[-1]:.2f} over {len(ratios)} runs" if len(ratios) > 1 \
            else " (one run)"
        ms, mc = _median_row(result, dist, "static"), _median_row(result, dist, "continuous")
        out.append(dict(name=f"continuous / static throughput, {dist} outputs", value=value,
                        goal=f">= {goal:g}", met=bool(value >= goal),
                        text=f"{mc['throughput_tok_s']:.0f} vs {ms['throughput_tok_s']:.0f} tokens/s: "
                             f"median {value:.2f}x{span}"))
    ch = result.get("chunked")
    if ch:
        whole, chunk = ch
        ratio = whole["tbt_s"]["p99"] / chunk["tbt_s"]["p99"]
        loss = 1 - chunk["throughput_tok_s"] / whole["throughput_tok_s"]
        out.append(dict(name="chunked prefill: p99 time between tokens, whole / chunked", value=ratio,
                        goal=f">= {goals['chunked_tbt_ratio']:g}", met=bool(ratio >= goals["chunked_tbt_ratio"]),
                        text=f"{1e3 * whole['tbt_s']['p99']:.1f} vs {1e3 * chunk['tbt_s']['p99']:.1f} ms = "
                             f"{ratio:.2f}x (one run, budget {chunk['budget']} tokens)"))
        cap = goals["chunked_max_throughput_loss"]
        out.append(dict(name="chunked prefill: throughput lost", value=loss, goal=f"<= {cap:.0%}",
                        met=bool(loss <= cap),
                        text=f"{chunk['throughput_tok_s']:.0f} vs {whole['throughput_tok_s']:.0f} tokens/s "
                             f"= {loss:+.1%} (one run)"))
    pk = result.get("packed")
    if pk:
        ratio = pk["packed"]["tokens_per_s"] / pk["padded"]["tokens_per_s"]
        goal = goals["packed_over_padded"]
        out.append(dict(name="packed / padded prefill", value=ratio, goal=f">= {goal:g}",
                        met=bool(ratio >= goal),
                        text=f"{pk['prompts']} prompts, {pk['prompt_tokens']} tokens ({pk['padded_tokens']} "
                             f"padded): {ratio:.2f}x (median of {len(pk['packed']['times'])} runs)"))
    fp32 = result.get("params", {}).get("dtype") == "float32"
    agree = result.get("agreement") or {}
    text = ", ".join(f"{d} {a:.1%}" for d, a in agree.items()) or (
        "identical" if result.get("outputs_identical") else "differ")
    out.append(dict(name="outputs identical across policies" + ("" if fp32 else " (bf16: reported only)"),
                    value=float(result["outputs_identical"]), goal=">= 1" if fp32 else "info",
                    met=bool(result["outputs_identical"]) if fp32 else None,
                    text=f"requests whose greedy tokens agree under every policy: {text}"))
    return out


def summary_rows(result: dict) -> list[dict]:
    rows = []
    for dist in _dists(result):
        for policy in dict.fromkeys(r["policy"] for r in result["rows"]):
            r = _median_row(result, dist, policy)
            if r is None:
                continue
            rows.append({"outputs": dist, "policy": policy, "tok/s": round(r["throughput_tok_s"], 1),
                         "TTFT p50 (s)": round(r["ttft_s"]["p50"], 3),
                         "TTFT p99 (s)": round(r["ttft_s"]["p99"], 3),
                         "TBT p99 (ms)": round(1e3 * r["tbt_s"]["p99"], 1),
                         "padding": r["stats"]["padding_tokens"], "steps": r["stats"]["steps"],
                         "preempt": r["stats"]["preemptions"],
                         "KV used": f"{100 * r['kv_utilisation']:.1f}%"})
    for r in result.get("chunked") or []:
        rows.append({"outputs": "chunked test", "policy": f"continuous, {r['mode']}",
                     "tok/s": round(r["throughput_tok_s"], 1), "TTFT p50 (s)": round(r["ttft_s"]["p50"], 3),
                     "TTFT p99 (s)": round(r["ttft_s"]["p99"], 3),
                     "TBT p99 (ms)": round(1e3 * r["tbt_s"]["p99"], 1),
                     "padding": r["stats"]["padding_tokens"], "steps": r["stats"]["steps"],
                     "preempt": r["stats"]["preemptions"], "KV used": f"{100 * r['kv_utilisation']:.1f}%"})
    return rows


def summary_text(result: dict) -> str:
    p = result["params"]
    lines = []
    for dist in _dists(result):
        r = _median_row(result, dist, "static") or result["rows"][0]
        lines.append(f"workload: {p['requests']} requests, {r.get('prompt_tokens', '?')} prompt tokens, "
                     f"outputs {dist} (mean {r.get('mean_output', float('nan')):.1f}, max "
                     f"{r.get('max_output', '?')}), batch {p['max_num_seqs']}, KV budget "
                     f"{r.get('num_blocks', '?')} blocks, all arriving at once")
    lines += target_lines(result["targets"])
    return "\n".join(lines)


def plot(result: dict, provenance: dict):
    """Throughput per policy (median, range over repeats), computed tokens
    (real and padding), and the chunked-prefill comparison."""
    from matplotlib.figure import Figure

    from ..measure import plots

    dists = _dists(result)
    policies = list(dict.fromkeys(r["policy"] for r in result["rows"]))
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    width = 0.8 / len(dists)
    for k, dist in enumerate(dists):
        xs = [i + k * width for i in range(len(policies))]
        med = [_median_row(result, dist, pol)["throughput_tok_s"] for pol in policies]
        runs = [[r["throughput_tok_s"] for r in _runs(result, dist, pol)] for pol in policies]
        err = [[m - min(rs) for m, rs in zip(med, runs)], [max(rs) - m for m, rs in zip(med, runs)]]
        bars = a.bar(xs, med, width, yerr=err, label=f"{dist} outputs", capsize=3)
        a.bar_label(bars, [f"{m:.0f}" for m in med], fontsize=7)
        real = [_median_row(result, dist, pol)["stats"]["batch_tokens"]
                - _median_row(result, dist, pol)["stats"]["padding_tokens"] for pol in policies]
        pad = [_median_row(result, dist, pol)["stats"]["padding_tokens"] for pol in policies]
        b.bar(xs, real, width, color=f"C{k}", label=f"real ({dist})")
        b.bar(xs, pad, width, bottom=real, color="0.6", label="padding" if k == 0 else None)
    for ax in (a, b):
        ax.set_xticks([i + width * (len(dists) - 1) / 2 for i in range(len(policies))], policies)
        ax.legend(fontsize=7)
    a.set_ylabel("generated tokens / s")
    a.set_title(f"{result['params']['requests']} requests, batch {result['params']['max_num_seqs']}",
                fontsize=9)
    b.set_ylabel("tokens computed")
    b.set_title("computed tokens: real and padding", fontsize=9)
    ch = result.get("chunked")
    if ch:
        labels = [f"{r['mode']}\n(budget {r['budget']})" for r in ch]
        bars = c.bar(labels, [1e3 * r["tbt_s"]["p99"] for r in ch], color=["tab:red", "tab:green"])
        c.bar_label(bars, [f"{1e3 * r['tbt_s']['p99']:.0f} ms\n{r['throughput_tok_s']:.0f} tok/s"
                           for r in ch], fontsize=7)
        c.margins(y=0.25)
        c.set_ylabel("p99 time between tokens (ms)")
        c.set_title("chunked prefill", fontsize=9)
    else:
        c.set_visible(False)
    plots.stamp(fig, provenance)
    return fig

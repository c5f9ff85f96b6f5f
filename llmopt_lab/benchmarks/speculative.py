"""Lesson 08 benchmark: speculative decoding against plain decoding.

Wall-clock tokens/s, acceptance rate and tokens per target forward for plain
decoding (static cache), draft speculation for k = 1..8 and prompt lookup,
greedy and sampled, on llmopt-tiny with llmopt-tiny-draft (held-out code as
prompts). Both sides use the same decode path (the static cache).
"""

from __future__ import annotations

import time

import torch

from .. import bench
from ..generate import generate
from ..speculative import expected_speedup, speculative_generate
from ..weights import ZOO, load_model

SIZES = {
    "quick": dict(target="synthetic:tiny", draft="synthetic:tiny", dtype="float32", prompts=2,
                  prompt_len=32, new_tokens=16, ks=[1, 2], sampled=True),
    "cpu": dict(target="llmopt-tiny", draft="llmopt-tiny-draft", dtype="float32", prompts=8,
                prompt_len=128, new_tokens=96, ks=[1, 2, 3, 4, 5, 6, 8], sampled=True),
    "gpu": dict(target="llmopt-tiny", draft="llmopt-tiny-draft", dtype="float32", prompts=8,
                prompt_len=128, new_tokens=128, ks=[1, 2, 3, 4, 5, 6, 8], sampled=True),
}


def heldout_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n prompts of ``length`` tokens cut from the held-out files (deterministic)."""
    from ..data import heldout_set

    held = heldout_set(tokenizer, quick=True)
    rows = [i for i in range(len(held)) if int(held.lengths[i]) >= length]
    step = max(1, len(rows) // n)
    return [held.ids[rows[i * step], :length].tolist() for i in range(min(n, len(rows)))]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(size: str = "cpu", device=None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    p = SIZES[size]
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    names = (p["target"], p["draft"])
    if any(n in ZOO and not (ZOO[n] / "config.json").exists() for n in names):
        names = ("synthetic:tiny", "synthetic:tiny")
    target, tok = load_model(names[0], device=dev, dtype=p["dtype"])
    draft, _ = load_model(names[1], device=dev, dtype=p["dtype"])
    if tok is not None:
        prompts = heldout_prompts(tok, p["prompts"], p["prompt_len"])
    else:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, target.config.vocab_size, (p["prompt_len"],), generator=g).tolist()
                   for _ in range(p["prompts"])]
    n = p["new_tokens"]
    modes = [("greedy", 0.0)] + ([("sampled", 1.0)] if p["sampled"] else [])
    configs = [("plain", None)] + [("draft", k) for k in p["ks"]] + [("lookup", k) for k in (2, 4)]
    bar = tqdm(total=len(modes) * len(configs), desc="lesson 08", disable=not progress, leave=False)
    # warm up both models once
    generate(target, [prompts[0]], 4, ignore_eos=True)
    speculative_generate(target, draft, [prompts[0]], 4, k=2, ignore_eos=True)
    # the draft's cost per token relative to the target's, with the same decode path
    t_target = _timed(lambda: generate(target, [prompts[0]], n, ignore_eos=True))[1]
    t_draft = _timed(lambda: generate(draft, [prompts[0]], n, ignore_eos=True))[1]
    cost_ratio = t_draft / t_target
    rows = []
    for mode, temp in modes:
        base_tps = None
        for kind, k in configs:
            bar.set_postfix_str(f"{mode} {kind} k={k}")
            total_t, total_tokens, stats = 0.0, 0, []
            for i, prompt in enumerate(prompts):
                if kind == "plain":
                    out, dt = _timed(lambda: generate(target, [prompt], n, temperature=temp, seed=i,
                                                      ignore_eos=True))
                    total_tokens += n
                else:
                    out, dt = _timed(lambda: speculative_generate(
                        target, draft if kind == "draft" else None, [prompt], n, k=k,
                        temperature=temp, seed=i, ignore_eos=True))
                    total_tokens += len(out.tokens)
                    stats.append(out.stats)
                total_t += dt
            tps = total_tokens / total_t
            if kind == "plain":
                base_tps = tps
            row = dict(mode=mode, method=kind, k=k, tokens_per_s=tps, speedup=tps / base_tps)
            if stats:
                proposed = sum(s.proposed for s in stats)
                accepted = sum(s.accepted for s in stats)
                row.update(acceptance_rate=accepted / proposed if proposed else 0.0,
                           tokens_per_target_forward=sum(s.new_tokens for s in stats)
                           / sum(s.target_forwards for s in stats),
                           draft_time_s=sum(s.draft_time_s for s in stats),
                           target_time_s=sum(s.target_time_s for s in stats))
                if kind == "draft":
                    row["predicted_speedup"] = expected_speedup(row["acceptance_rate"], k, cost_ratio)
            rows.append(row)
            bar.update()
    bar.close()
    return dict(benchmark="speculative", lesson="08", size=size, target=names[0], draft=names[1],
                new_tokens=n, prompts=len(prompts), prompt_len=p["prompt_len"],
                draft_cost_ratio=cost_ratio, rows=rows)


def summary_rows(result: dict) -> list[dict]:
    return [{"mode": r["mode"], "method": r["method"], "k": r["k"] or "-",
             "tokens/s": r["tokens_per_s"], "speed-up": r["speedup"],
             "accept": r.get("acceptance_rate"), "tok/fwd": r.get("tokens_per_target_forward"),
             "predicted": r.get("predicted_speedup")} for r in result["rows"]]


def plot(result: dict, provenance: dict):
    """Measured and predicted speed-up of greedy draft speculation against k."""
    from .. import plots

    rows = [r for r in result["rows"] if r["mode"] == "greedy" and r["method"] == "draft"]
    ks = [r["k"] for r in rows]
    return plots.sweep(ks, {"measured": [r["speedup"] for r in rows],
                            "predicted": [r["predicted_speedup"] for r in rows]},
                       "k (proposals per step)", "speed-up over plain decoding",
                       provenance=provenance,
                       title=f"{result['target']} with {result['draft']} (greedy)")

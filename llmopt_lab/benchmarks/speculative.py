"""Lesson 08 benchmark: speculative decoding against plain decoding.

Wall-clock tokens/s, acceptance rate and tokens per target forward for plain
decoding (static cache), draft speculation for k = 1..8 and prompt lookup,
greedy and sampled, on llmopt-tiny with llmopt-tiny-draft (held-out code as
prompts). Both sides use the same decode path (the static cache) and the
same dtype: bfloat16 where the hardware computes it natively, else float32.
Methods run interleaved, prompt by prompt, so that drift in the machine's
speed hits all of them alike; ``speedup_ci90`` is a 90% bootstrap interval of
the speed-up over the prompts (resampled in pairs with plain decoding's times),
which shows how much of it depends on the prompts drawn.

Besides the speed-up, each row explains it: ``alpha`` (per-proposal
acceptance), ``tokens_per_step``, and the measured costs inside the loop, in
plain decode steps: ``verify_cost`` (one target pass over k+1 tokens) and
``draft_cost`` (one draft forward) and ``other_cost`` (the rest of a step:
acceptance, rollback, lookup, Python). ``predicted_speedup`` is the formula with
a free verification and the draft's stand-alone cost;
``predicted_measured_costs`` the same formula with the costs measured in the
loop. Greedy rows record ``identical_to_plain``, the fraction of prompts whose
tokens equal plain decoding's, and ``divergence_gap_ulps``: where they differ
(16-bit runs), the largest gap at the first differing step between plain's
choice and speculation's, in rounding units (a tie that a pass over k+1
tokens may round the other way).
"""

from __future__ import annotations

import time

import torch

from .. import measure
from ..generate import generate
from ..measure.metrics import speedup_interval
from ..speculative import SpecStats, expected_speedup, speculative_generate
from ..weights import ZOO, load_model

SIZES = {
    "quick": dict(target="synthetic:tiny", draft="synthetic:tiny", dtype="float32", prompts=2,
                  prompt_len=32, new_tokens=16, ks=[1, 2], sampled=True),
    # "fastest": bfloat16 where the hardware has it (as served), else float32
    "cpu": dict(target="llmopt-tiny", draft="llmopt-tiny-draft", dtype="fastest", prompts=8,
                prompt_len=128, new_tokens=96, ks=[1, 2, 3, 4, 5, 6, 8], sampled=True),
    "gpu": dict(target="llmopt-tiny", draft="llmopt-tiny-draft", dtype="fastest", prompts=8,
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


def _tie_gap(logits: torch.Tensor, want: list[int], got: list[int], dtype: torch.dtype) -> float:
    """At the first step where ``got`` leaves plain greedy decoding's ``want``:
    how far below plain's choice the chosen token's logit was, in units of the
    model dtype's spacing (ulps) at that size. 0 or 1 means a tie that
    rounding in a different batch shape can flip. logits: (steps, V)."""
    s = next(j for j, (a, b) in enumerate(zip(want, got)) if a != b)
    top, chosen = float(logits[s, want[s]]), float(logits[s, got[s]])
    ulp = torch.finfo(dtype).eps * max(abs(top), 1e-30)
    return (top - chosen) / ulp


def run(size: str = "cpu", device=None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    p = SIZES[size]
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    names = (p["target"], p["draft"])
    if any(n in ZOO and not (ZOO[n] / "config.json").exists() for n in names):
        names = ("synthetic:tiny", "synthetic:tiny")
    dtype = measure.fastest_dtype(dev) if p["dtype"] == "fastest" else p["dtype"]
    target, tok = load_model(names[0], device=dev, dtype=dtype)
    draft, _ = load_model(names[1], device=dev, dtype=dtype)
    if tok is not None:
        prompts = heldout_prompts(tok, p["prompts"], p["prompt_len"])
    else:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, target.config.vocab_size, (p["prompt_len"],), generator=g).tolist()
                   for _ in range(p["prompts"])]
    n = p["new_tokens"]
    modes = [("greedy", 0.0)] + ([("sampled", 1.0)] if p["sampled"] else [])
    configs = [("plain", None)] + [("draft", k) for k in p["ks"]] + [("lookup", k) for k in (2, 4)]
    bar = tqdm(total=len(modes) * len(configs) * len(prompts), desc="lesson 08",
               disable=not progress, leave=False)
    # warm up both models once
    generate(target, [prompts[0]], 4, ignore_eos=True)
    speculative_generate(target, draft, [prompts[0]], 4, k=2, ignore_eos=True)
    # the draft's cost per token relative to the target's, with the same decode path
    t_target = measure.time_fn(lambda: generate(target, [prompts[0]], n, ignore_eos=True),
                             warmup=0, repeat=3, device=dev).median
    t_draft = measure.time_fn(lambda: generate(draft, [prompts[0]], n, ignore_eos=True),
                            warmup=0, repeat=3, device=dev).median
    cost_ratio = t_draft / t_target
    rows = []
    for mode, temp in modes:
        time_s = {c: [] for c in configs}  # per prompt
        made = {c: [] for c in configs}
        stats = {c: [] for c in configs}
        same = {c: 0 for c in configs}  # prompts whose tokens equal plain decoding's
        gaps = {c: [] for c in configs}  # where they differ: how close the tie was
        plain_tokens, plain_logits = {}, {}
        # interleaved: every method runs on a prompt before the next prompt, so
        # a drift in the machine's speed hits all of them alike
        for i, prompt in enumerate(prompts):
            for cfg in configs:
                kind, k = cfg
                bar.set_postfix_str(f"{mode} {kind} k={k} prompt {i + 1}/{len(prompts)}")
                if kind == "plain":
                    out, dt = _timed(lambda: generate(target, [prompt], n, temperature=temp,
                                                      seed=i, ignore_eos=True,
                                                      return_logits=mode == "greedy"))
                    made[cfg].append(n)
                    plain_tokens[i] = out.tolist()[0]
                    plain_logits[i] = out.logits
                else:
                    out, dt = _timed(lambda: speculative_generate(
                        target, draft if kind == "draft" else None, [prompt], n, k=k,
                        temperature=temp, seed=i, ignore_eos=True))
                    made[cfg].append(len(out.tokens))
                    stats[cfg].append(out.stats)
                    same[cfg] += out.tokens == plain_tokens[i]
                    if mode == "greedy" and out.tokens != plain_tokens[i]:
                        gaps[cfg].append(_tie_gap(plain_logits[i][0], plain_tokens[i], out.tokens,
                                                  target.dtype))
                time_s[cfg].append(dt)
        plain = ("plain", None)
        plain_s_per_token = sum(time_s[plain]) / sum(made[plain])
        for cfg in configs:
            kind, k = cfg
            tps = sum(made[cfg]) / sum(time_s[cfg])
            row = dict(mode=mode, method=kind, k=k, tokens_per_s=tps,
                       speedup=tps * plain_s_per_token)
            if cfg != plain and len(prompts) > 1:  # prompts resampled in pairs with plain's
                row["speedup_ci90"] = list(speedup_interval(time_s[plain], made[plain],
                                                            time_s[cfg], made[cfg]))
            if stats[cfg]:
                st = SpecStats.combine(stats[cfg])
                if mode == "greedy":  # lossless: the same tokens (near-ties aside in 16 bits)
                    row["identical_to_plain"] = same[cfg] / len(prompts)
                    # lossless up to rounding: each divergence starts at a near-tie
                    row["divergence_gap_ulps"] = max(gaps[cfg]) if gaps[cfg] else None
                row.update(acceptance_rate=st.acceptance_rate, alpha=st.alpha,
                           tokens_per_step=st.tokens_per_step,
                           tokens_per_target_forward=st.tokens_per_target_forward,
                           draft_time_s=st.draft_time_s, target_time_s=st.target_time_s,
                           prefill_time_s=st.prefill_time_s,
                           # one verification pass over k+1 tokens, in plain decode steps
                           verify_cost=st.target_time_s / st.steps / plain_s_per_token)
                # per step, the rest: proposing by lookup, acceptance, rollback, Python
                rest = sum(time_s[cfg]) - st.prefill_time_s - st.target_time_s - st.draft_time_s
                row["other_cost"] = rest / st.steps / plain_s_per_token
                draft_cost = 0.0
                if kind == "draft":
                    # one draft forward inside the loop, in plain decode steps
                    draft_cost = st.draft_time_s / st.draft_forwards / plain_s_per_token
                    row["draft_cost"] = draft_cost
                    row["predicted_speedup"] = expected_speedup(st.alpha, k, cost_ratio)
                # the formula with the costs measured in the loop (the prompt's pass aside)
                row["predicted_measured_costs"] = st.tokens_per_step / (
                    row["verify_cost"] + k * draft_cost + row["other_cost"])
            rows.append(row)
            bar.update(len(prompts))
    bar.close()
    return dict(benchmark="speculative", lesson="08", size=size, target=names[0], draft=names[1],
                dtype=measure.dtype_key(target.dtype),
                new_tokens=n, prompts=len(prompts), prompt_len=p["prompt_len"],
                draft_cost_ratio=cost_ratio, rows=rows)


def summary_rows(result: dict) -> list[dict]:
    return [{"mode": r["mode"], "method": r["method"], "k": r["k"] or "-",
             "tokens/s": r["tokens_per_s"], "speed-up": r["speedup"],
             "90% interval": ("[{:.2f}, {:.2f}]".format(*r["speedup_ci90"])
                              if "speedup_ci90" in r else None),
             "same": r.get("identical_to_plain"), "tie gap (ulp)": r.get("divergence_gap_ulps"),
             "accept": r.get("acceptance_rate"), "alpha": r.get("alpha"),
             "tok/step": r.get("tokens_per_step"), "verify cost": r.get("verify_cost"),
             "draft cost": r.get("draft_cost"), "other cost": r.get("other_cost"),
             "predicted": r.get("predicted_speedup"),
             "predicted (loop costs)": r.get("predicted_measured_costs")} for r in result["rows"]]


def plot(result: dict, provenance: dict):
    """Measured and predicted speed-up of greedy draft speculation against k."""
    from ..measure import plots

    rows = [r for r in result["rows"] if r["mode"] == "greedy" and r["method"] == "draft"]
    ks = [r["k"] for r in rows]
    return plots.sweep(ks, {"measured": [r["speedup"] for r in rows],
                            "formula (free verify, stand-alone draft cost)":
                                [r["predicted_speedup"] for r in rows],
                            "formula with the costs measured in the loop":
                                [r.get("predicted_measured_costs", float("nan")) for r in rows]},
                       "k (proposals per step)", "speed-up over plain decoding",
                       provenance=provenance,
                       title=f"{result['target']} with {result['draft']} "
                             f"(greedy, {result.get('dtype', 'fp32')})")

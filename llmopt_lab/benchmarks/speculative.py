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
    # prompt lookup on a real instruction-tuned model (SmolLM2-135M-Instruct, fetched once) for
    # tasks whose answer copies from the prompt: a few minutes on a 2-core CPU
    "real": dict(target="smollm2-135m", dtype="float32", ks=[2, 4, 8], code_tokens=128,
                 passage_tokens=64),
}

#: tasks whose answers copy from the prompt (written for this benchmark): (kind, instruction)
_CODE = [
    ("Rename the variable `n` to `count` everywhere in this function. Reply with the whole "
     "function only, in a code block.",
     "def mean_of_positive(values):\n    total = 0.0\n    n = 0\n    for v in values:\n"
     "        if v > 0:\n            total += v\n            n += 1\n    if n == 0:\n"
     "        return 0.0\n    return total / n\n"),
    ("Add type hints to this function. Reply with the whole function only, in a code block.",
     "def read_pairs(path, sep):\n    pairs = {}\n    with open(path) as f:\n"
     "        for line in f:\n            key, value = line.rstrip('\\n').split(sep, 1)\n"
     "            pairs[key] = value\n    return pairs\n"),
    ("This function should skip empty lines but does not. Fix it and reply with the whole "
     "function only, in a code block.",
     "def count_words(lines):\n    counts = {}\n    for line in lines:\n"
     "        for word in line.split():\n            counts[word] = counts.get(word, 0) + 1\n"
     "    return counts\n"),
]
_PASSAGES = [
    ("During decoding, a language model produces one token per step. Each step must read every "
     "weight of the model from memory, but performs only two floating-point operations per weight "
     "and token. Because memory bandwidth grows more slowly than arithmetic throughput, decoding "
     "one sequence at a time leaves most of the arithmetic units idle. Batching many sequences "
     "reuses each weight that is read for several tokens.",
     "Why does decoding one sequence at a time leave the arithmetic units idle? Answer with a "
     "sentence from the passage."),
    ("The bisect module keeps a list in sorted order without sorting it again after each "
     "insertion. Its function bisect_left returns the position where a new item should be "
     "inserted, to the left of any equal items. The function insort inserts the item at that "
     "position. Both run a binary search, so finding the position takes logarithmic time, "
     "although inserting into a Python list still moves the items after it.",
     "What does bisect_left return? Answer with a sentence from the passage."),
    ("A pipeline splits a model's layers into stages placed on different devices. The first "
     "stage processes a micro-batch and passes its activations to the second stage, then starts "
     "on the next micro-batch. With p stages and m micro-batches, each stage is idle for a "
     "fraction (p - 1) / (m + p - 1) of the time, which is called the bubble. More micro-batches "
     "make the bubble smaller.",
     "What is the bubble? Answer with a sentence from the passage."),
]


def copy_tasks(tokenizer) -> list[dict]:
    """The real-model tasks as chat prompts: ``{"kind", "ids", "max_new_tokens"}``
    (code edits, then questions answered by quoting a passage)."""
    from ..commands.chat import encode_chat

    def chat(text):
        return encode_chat(tokenizer, [{"role": "user", "content": text}])

    tasks = [dict(kind="code edit", ids=chat(f"{ask}\n\n```python\n{code}```")) for ask, code in _CODE]
    tasks += [dict(kind="answer from a passage", ids=chat(f"Passage: {text}\n\nQuestion: {q}"))
              for text, q in _PASSAGES]
    return tasks


def run_real(p: dict, dev, progress: bool = True) -> dict:
    """Prompt lookup (k in ``p["ks"]``) against plain greedy decoding on
    SmolLM2-135M-Instruct, for code edits and answers quoted from a passage;
    methods interleaved prompt by prompt. Per task kind and k: speed-up with
    a 90% interval over the prompts, acceptance, tokens per step, and whether
    the tokens equal plain decoding's."""
    from tqdm.auto import tqdm

    target, tok = load_model(p["target"], device=dev, dtype=p["dtype"])
    tasks = copy_tasks(tok)
    for t in tasks:
        t["max_new_tokens"] = p["code_tokens"] if t["kind"] == "code edit" else p["passage_tokens"]
    configs = [None] + list(p["ks"])
    bar = tqdm(total=len(tasks) * len(configs), desc="lesson 08 (real model)", disable=not progress,
               leave=False)
    generate(target, [tasks[0]["ids"]], 4)  # warm-up
    speculative_generate(target, None, [tasks[0]["ids"]], 4, k=2)
    per = []
    for i, t in enumerate(tasks):
        entry = dict(kind=t["kind"], prompt_tokens=len(t["ids"]), runs={})
        for k in configs:
            bar.set_postfix_str(f"{t['kind']} {i + 1}: {'plain' if k is None else f'lookup k={k}'}")
            if k is None:
                out, dt = _timed(lambda: generate(target, [t["ids"]], t["max_new_tokens"]))
                toks, st = out.tolist()[0], None
            else:
                out, dt = _timed(lambda: speculative_generate(target, None, [t["ids"]],
                                                              t["max_new_tokens"], k=k))
                toks, st = out.tokens, out.stats
            run = dict(seconds=dt, tokens=len(toks), text=tok.decode(toks, skip_special_tokens=True))
            if st is not None:
                run.update(acceptance_rate=st.acceptance_rate, tokens_per_step=st.tokens_per_step,
                           same_as_plain=toks == entry["runs"]["plain"]["ids"])
            else:
                run["ids"] = toks
            entry["runs"]["plain" if k is None else str(k)] = run
            bar.update()
        entry["runs"]["plain"].pop("ids")
        per.append(entry)
    bar.close()
    rows = []
    for kind in dict.fromkeys(t["kind"] for t in tasks):
        mine = [e for e in per if e["kind"] == kind]
        plain_s = [e["runs"]["plain"]["seconds"] for e in mine]
        plain_n = [e["runs"]["plain"]["tokens"] for e in mine]
        for k in p["ks"]:
            rs = [e["runs"][str(k)] for e in mine]
            s = [r["seconds"] for r in rs]
            n = [r["tokens"] for r in rs]
            rows.append(dict(kind=kind, k=k, speedup=(sum(n) / sum(s)) / (sum(plain_n) / sum(plain_s)),
                             speedup_ci90=list(speedup_interval(plain_s, plain_n, s, n)),
                             acceptance_rate=sum(r["acceptance_rate"] for r in rs) / len(rs),
                             tokens_per_step=sum(r["tokens_per_step"] for r in rs) / len(rs),
                             identical_to_plain=sum(r["same_as_plain"] for r in rs) / len(rs),
                             plain_tokens_per_s=sum(plain_n) / sum(plain_s)))
    return dict(benchmark="speculative", lesson="08", size="real", target=p["target"],
                dtype=measure.dtype_key(target.dtype), prompts=len(tasks), tasks=per, rows=rows)


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
    if size == "real":
        return run_real(p, dev, progress)
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
    if result.get("size") == "real":
        return [{"task": r["kind"], "k": r["k"], "speed-up": r["speedup"],
                 "90% interval": "[{:.2f}, {:.2f}]".format(*r["speedup_ci90"]),
                 "accept": r["acceptance_rate"], "tok/step": r["tokens_per_step"],
                 "same": r["identical_to_plain"], "plain tok/s": r["plain_tokens_per_s"]}
                for r in result["rows"]]
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

    if result.get("size") == "real":
        kinds = list(dict.fromkeys(r["kind"] for r in result["rows"]))
        ks = sorted({r["k"] for r in result["rows"]})
        return plots.sweep(ks, {kind: [next(r["speedup"] for r in result["rows"]
                                            if r["kind"] == kind and r["k"] == k) for k in ks]
                                for kind in kinds},
                           "k (tokens proposed by prompt lookup)", "speed-up over plain decoding",
                           provenance=provenance,
                           title=f"prompt lookup on {result['target']} (greedy, {result['dtype']})")
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

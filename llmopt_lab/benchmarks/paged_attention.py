"""Lesson 07 benchmark: paged KV storage, the prefix cache and the paged kernel.

Exact counts, the same on every machine: KV waste of a seeded long-tail
workload under max-length reservation, exact contiguous allocation and paging
at several block sizes, and the sequences each fits in a budget of token
slots (:func:`~llmopt_lab.cache.block_manager.kv_waste`); prompt tokens to
compute for requests sharing a long prefix, allocated through a
:class:`~llmopt_lab.cache.BlockManager` with and without the prefix cache;
the paged kernel against its reference on a small ragged float32 batch.
On a CUDA GPU (size "gpu"): the paged decode kernel against our contiguous
flash-decoding kernel on the same keys and values, and the time to first
token of the shared-prefix workload's last request with and without the
cache. Targets are reported as met or missed; the workload is not tuned to them.
"""

from __future__ import annotations

import itertools
import math
import random

import torch
import torch.nn.functional as F

from ..cache import KVPool
from ..cache.block_manager import BlockManager, BlockSequence, kv_waste
from ..kernels import HAS_TRITON, interpreter_problem, mode
from ..kernels.flash_decode import flash_decode
from ..kernels.paged_attention import DECODE_MAX_QUERIES, paged_attention, supports
from ..kernels.reference import paged_attention_ref
from ..measure import time_fn
from ..step import host_step, run_step

# log-normal medians and sigma (of the log): sigma 1 puts p99 at ~10x the median, a long tail
WORKLOAD = dict(prompt_median=300, prompt_sigma=1.0, output_median=150, output_sigma=1.0,
                max_len=4096, seed=0)
PREFIX = dict(requests=32, prefix_len=2048, suffix_len=64, block_size=16)
KERNEL_CHECK = dict(q_heads=4, kv_heads=2, head_dim=32, block_size=16, tolerance=1e-4,
                    decode=dict(contexts=[17, 50, 93], queries=[1, 1, 1]),
                    mixed=dict(contexts=[61, 40, 88], queries=[24, 1, 5]))
TARGETS = dict(max_waste_block16=0.04, min_fit_vs_max_len=2.0, min_prefix_saving=0.90,
               min_ratio_block16=0.90, min_ratio_block64=0.95, min_ttft_speedup=5.0)

_COUNTS = dict(block_sizes=[16, 32, 64, 128], budget_tokens=2 ** 20, workload=WORKLOAD,
               prefix=PREFIX, kernel=KERNEL_CHECK)
SIZES = {
    "quick": dict(_COUNTS, requests=200),
    "cpu": dict(_COUNTS, requests=1000),
    # an H100/H200: the counts, then the kernels and time to first token
    "gpu": dict(_COUNTS, requests=1000,
                gpu=dict(decode=dict(batch=64, contexts=[1024, 2048, 4096, 8192], q_heads=32,
                                     kv_heads=8, head_dim=128, dtype="bfloat16",
                                     block_sizes=[16, 64], warmup=5, repeat=20),
                         ttft=dict(model="synthetic:llama-1b", dtype="bfloat16", attn="paged",
                                   warmup=2, repeat=5))),
}


# ============================================================== workloads
def long_tail_workload(n: int, prompt_median: float, prompt_sigma: float, output_median: float,
                       output_sigma: float, max_len: int, seed: int = 0
                       ) -> tuple[list[int], list[int]]:
    """(prompt lengths, output lengths) of ``n`` requests, each log-normal
    (median, sigma of the log), rounded, prompt clipped to [1, max_len - 1] and
    output to [1, max_len - prompt]. Deterministic for a seed on any machine."""
    rng, prompts, outputs = random.Random(seed), [], []
    for _ in range(n):
        p = round(rng.lognormvariate(math.log(prompt_median), prompt_sigma))
        o = round(rng.lognormvariate(math.log(output_median), output_sigma))
        prompts.append(min(max(1, p), max_len - 1))
        outputs.append(min(max(1, o), max_len - prompts[-1]))
    return prompts, outputs


def shared_prefix_prompts(requests: int, prefix_len: int, suffix_len: int, vocab: int = 32000,
                          seed: int = 0) -> list[list[int]]:
    """``requests`` prompts of one shared random prefix plus a suffix of their
    own; suffix i starts with token i + 1, so no two suffixes share a block."""
    rng = random.Random(seed)
    prefix = [rng.randrange(1, vocab) for _ in range(prefix_len)]
    return [prefix + [1 + i % (vocab - 1)]
            + [rng.randrange(1, vocab) for _ in range(suffix_len - 1)] for i in range(requests)]


def _stats(xs: list[int]) -> dict:
    s = sorted(xs)  # order statistics: median and p99 are drawn lengths
    return dict(median=s[len(s) // 2], mean=sum(s) / len(s), p99=s[int(0.99 * (len(s) - 1))],
                max=s[-1])


# ========================================================= CPU measurements
def waste_table(prompts: list[int], outputs: list[int], block_sizes, max_len: int,
                budget_tokens: int) -> list[dict]:
    """One row per scheme (max_len, exact, paged at each block size): slots
    reserved, waste fraction, sequences that fit in ``budget_tokens``."""
    ws = [kv_waste(prompts, outputs, bs, max_len, budget_tokens) for bs in block_sizes]
    cases = [(s, None, ws[0]) for s in ("max_len", "exact")] + [
        ("paged", bs, w) for bs, w in zip(block_sizes, ws)]
    return [dict(scheme=s, block_size=bs, slots=w["slots"][s], waste=w["waste"][s], fit=w["fit"][s])
            for s, bs, w in cases]


def prefix_cache_counts(prompts: list[list[int]], block_size: int) -> dict:
    """Allocate ``prompts`` one after another (all kept live) through a block
    manager with and without the prefix cache; count prompt tokens to compute
    (len - num_cached_tokens), overall and for the last request, and blocks held."""
    need = sum(-(-len(p) // block_size) for p in prompts)
    out = dict(requests=len(prompts), prompt_tokens=sum(len(p) for p in prompts),
               block_size=block_size)
    for cached in (False, True):
        bm = BlockManager(need, block_size, enable_prefix_cache=cached)
        computed = []
        for p in prompts:  # the manager keeps each allocated sequence live
            seq = BlockSequence(list(p))
            bm.allocate(seq)
            computed.append(len(p) - seq.num_cached_tokens)
        key = "cache" if cached else "no_cache"
        out[key] = dict(computed_tokens=sum(computed), last_computed=computed[-1],
                        blocks_held=need - bm.num_free_blocks)
    out["saving"] = 1 - out["cache"]["computed_tokens"] / out["no_cache"]["computed_tokens"]
    return out


def _ragged_case(contexts, queries, q_heads, kv_heads, head_dim, block_size, device, seed=0):
    """Random float32 queries and a pool whose blocks are scattered (a seeded
    permutation); returns the arguments of paged_attention (without max_queries)."""
    g = torch.Generator().manual_seed(seed)
    nbs = [-(-c // block_size) for c in contexts]
    num_blocks = sum(nbs) + 2  # a couple never used
    perm = torch.randperm(num_blocks, generator=g).tolist()
    ends = list(itertools.accumulate(nbs))
    tables = [perm[e - nb:e] + [0] * (max(nbs) - nb) for nb, e in zip(nbs, ends)]
    q = torch.randn(sum(queries), q_heads, head_dim, generator=g)  # (N, Hq, D)
    k, v = (torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g) for _ in "kv")
    mk = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return (q.to(device), k.to(device), v.to(device), mk(tables), mk(list(contexts)),
            mk([0, *itertools.accumulate(queries)]))


def _skip_reason() -> str:
    return ("Triton is not installed" if not HAS_TRITON else interpreter_problem()
            or "the paged kernels cannot take these tensors on this device")


def kernel_check(c: dict, device) -> list[dict]:
    """Max abs error of the paged kernel against the reference, per case."""
    rows = []
    for case in ("decode", "mixed"):
        ctx, nq = c[case]["contexts"], c[case]["queries"]
        args = _ragged_case(ctx, nq, c["q_heads"], c["kv_heads"], c["head_dim"], c["block_size"],
                            device)
        row = dict(case=case, contexts=ctx, queries=nq, tolerance=c["tolerance"],
                   kernel="decode" if max(nq) <= DECODE_MAX_QUERIES else "prefill")
        if not supports(args[0], args[1]):
            rows.append(dict(row, status="skipped", reason=_skip_reason()))
            continue
        err = (paged_attention(*args, max(nq)) - paged_attention_ref(*args)).abs().max().item()
        rows.append(dict(row, status="ok" if err <= c["tolerance"] else "error", max_abs_err=err))
    return rows


# ========================================================= GPU measurements
def measure_decode_pair(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int,
                        block_size: int, dtype: torch.dtype, device, warmup: int = 5,
                        repeat: int = 20, seed: int = 0) -> dict:
    """One query per sequence against ``context`` keys: flash_decode on a
    contiguous (B, Hkv, context, D) cache, paged_attention on the same keys and
    values in blocks scattered through a pool. Median seconds of each, ratio =
    flash / paged (1: as fast), GB/s of K and V, largest output difference."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(batch, q_heads, 1, head_dim, generator=g, device=dev, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, context, head_dim, generator=g, device=dev, dtype=dtype)
            for _ in "kv")
    nb = -(-context // block_size)
    perm = torch.randperm(batch * nb, generator=torch.Generator().manual_seed(seed)).to(dev)
    # (B, Hkv, S, D) -> (B * nb, Hkv, bs, D) blocks; block i of sequence b goes to perm[b * nb + i]
    blocks = lambda x: (F.pad(x, (0, 0, 0, nb * block_size - context))  # noqa: E731
                        .view(batch, kv_heads, nb, block_size, head_dim).transpose(1, 2)
                        .reshape(batch * nb, kv_heads, block_size, head_dim))
    k_pool, v_pool = (torch.empty_like(b).index_copy_(0, perm, b) for b in (blocks(k), blocks(v)))
    tables, lens = perm.view(batch, nb), torch.full((batch,), context, device=dev)
    starts, q2 = torch.arange(batch + 1, device=dev), q[:, :, 0]  # q2: (B, Hq, D), packed
    row = dict(batch=batch, context=context, block_size=block_size, dtype=str(dtype)[6:])
    if not supports(q2, k_pool):
        return dict(row, status="unsupported", reason=_skip_reason())
    flash = lambda: flash_decode(q, k, v, context)  # noqa: E731
    paged = lambda: paged_attention(q2, k_pool, v_pool, tables, lens, starts, 1)  # noqa: E731
    err = (paged().float() - flash()[:, :, 0].float()).abs().max().item()
    t_flash = time_fn(flash, warmup=warmup, repeat=repeat, device=dev)
    t_paged = time_fn(paged, warmup=warmup, repeat=repeat, device=dev)
    kv_bytes = 2 * batch * kv_heads * context * head_dim * q.element_size()
    return dict(row, status="ok", flash_s=t_flash.median, paged_s=t_paged.median,
                ratio=t_flash.median / t_paged.median, flash_gb_s=kv_bytes / t_flash.median / 1e9,
                paged_gb_s=kv_bytes / t_paged.median / 1e9, max_abs_diff=err)


def measure_ttft(model_name: str, dtype: str, device, prompts: list[list[int]] | None,
                 prefix: dict, attn: str = "paged", warmup: int = 2, repeat: int = 5) -> dict:
    """Time to first token of the last shared-prefix prompt (built for the
    model's vocabulary when ``prompts`` is None) with and without the prefix
    cache: each prompt is allocated and prefilled in turn from num_cached_tokens;
    the last prefill ``run_step`` is timed (median; a repeat rewrites its slots)."""
    from ..weights import load_model

    dev = torch.device(device)
    model, _ = load_model(model_name, device=dev, dtype=getattr(torch, dtype), attn_fn=attn)
    if prompts is None:
        prompts = shared_prefix_prompts(prefix["requests"], prefix["prefix_len"],
                                        prefix["suffix_len"], vocab=model.config.vocab_size)
    bs = prefix["block_size"]
    num_blocks = sum(-(-len(p) // bs) for p in prompts)
    out = dict(model=model_name, dtype=dtype, attn=attn, block_size=bs)
    for cached in (False, True):
        pool = KVPool(model.config, num_blocks, bs, device=dev, dtype=model.dtype)
        bm = BlockManager(num_blocks, bs, enable_prefix_cache=cached)
        for prompt in prompts:
            seq = BlockSequence(list(prompt))
            bm.allocate(seq)
            start = seq.num_cached_tokens
            step = host_step([prompt[start:]], [start], [seq.block_table], bs).to_step(dev)
            logits = run_step(model, pool, step)
        t = time_fn(lambda: run_step(model, pool, step), warmup=warmup, repeat=repeat, device=dev)
        out["cache" if cached else "no_cache"] = dict(
            ttft_s=t.median, computed_tokens=len(prompts[-1]) - start,
            next_token=int(logits[-1].argmax()))
        del pool
    out["speedup"] = out["no_cache"]["ttft_s"] / out["cache"]["ttft_s"]
    out["same_next_token"] = out["no_cache"]["next_token"] == out["cache"]["next_token"]
    return out


def _gpu_ready(dev: torch.device) -> bool:
    return dev.type == "cuda" and torch.cuda.is_available()


# ==================================================================== run
def run(size: str = "cpu", device=None, progress: bool = True, params: dict | None = None) -> dict:
    """Run the lesson 07 benchmark at a named size (or with ``params`` shaped
    like a :data:`SIZES` entry); returns a JSON-able dict."""
    from tqdm.auto import tqdm

    p = dict(params or SIZES[size])
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    gpu, w, pre = p.get("gpu"), p["workload"], p["prefix"]
    bar = tqdm(total=4, desc="lesson 07", disable=not progress, leave=False)
    bar.set_postfix_str("KV waste")
    prompts, outputs = long_tail_workload(p["requests"], **w)
    waste = dict(requests=p["requests"], budget_tokens=p["budget_tokens"], **w,
                 prompt_stats=_stats(prompts), output_stats=_stats(outputs),
                 rows=waste_table(prompts, outputs, p["block_sizes"], w["max_len"],
                                  p["budget_tokens"]))
    bar.update()
    bar.set_postfix_str("prefix cache")
    shared = shared_prefix_prompts(pre["requests"], pre["prefix_len"], pre["suffix_len"])
    prefix = dict(prefix_len=pre["prefix_len"], suffix_len=pre["suffix_len"],
                  **prefix_cache_counts(shared, pre["block_size"]))
    bar.update()
    bar.set_postfix_str("kernel vs reference")
    c = p["kernel"]
    kernel = dict(mode=mode(), q_heads=c["q_heads"], kv_heads=c["kv_heads"],
                  head_dim=c["head_dim"], block_size=c["block_size"], rows=kernel_check(c, dev))
    bar.update()
    out = dict(benchmark="paged_attention", lesson="07", size=size, params=p, waste=waste,
               prefix=prefix, kernel=kernel, gpu=None)
    if gpu and _gpu_ready(dev):
        d, tt = gpu["decode"], gpu["ttft"]
        rows = [measure_decode_pair(d["batch"], ctx, d["q_heads"], d["kv_heads"], d["head_dim"],
                                    bs, getattr(torch, d["dtype"]), dev, d["warmup"], d["repeat"])
                for ctx in d["contexts"] for bs in d["block_sizes"]]
        bar.set_postfix_str("time to first token")
        out["gpu"] = dict(decode=rows, ttft=measure_ttft(tt["model"], tt["dtype"], dev, None, pre,
                                                         tt["attn"], tt["warmup"], tt["repeat"]))
    elif gpu:
        out["gpu_skipped"] = f"the GPU part needs a CUDA device (ran on {dev})"
    bar.update()
    bar.close()
    out["targets"] = targets(out)
    return out


# ================================================================ reading
def targets(result: dict) -> list[dict]:
    """Each target measured: name, goal, value (a number), met, figures in words."""
    t, out = TARGETS, []

    def add(name, value, goal, text, below=False):
        out.append(dict(name=name, value=value, goal=f"{'<' if below else '>='} {goal:g}",
                        met=bool(value < goal if below else value >= goal), text=text))

    by = {(r["scheme"], r["block_size"]): r for r in result["waste"]["rows"]}
    p16, full = by.get(("paged", 16)), by[("max_len", None)]
    if p16:
        add("waste fraction of paging at block 16", p16["waste"], t["max_waste_block16"],
            f"{100 * p16['waste']:.2f}% of reserved slots empty (max-length reservation: "
            f"{100 * full['waste']:.1f}%)", below=True)
        add("sequences in the budget, paged 16 over max-length", p16["fit"] / full["fit"],
            t["min_fit_vs_max_len"], f"{p16['fit']} vs {full['fit']} in "
            f"{result['waste']['budget_tokens']} slots: {p16['fit'] / full['fit']:.2f}x")
    pr = result["prefix"]
    add("fraction of prompt tokens the prefix cache saves", pr["saving"], t["min_prefix_saving"],
        f"{pr['no_cache']['computed_tokens']} -> {pr['cache']['computed_tokens']} computed "
        f"({100 * pr['saving']:.1f}% fewer)")
    gpu = result.get("gpu") or {}
    for bs, key in ((16, "min_ratio_block16"), (64, "min_ratio_block64")):
        dec = [r for r in gpu.get("decode", []) if r["block_size"] == bs]
        if dec:  # the worst context counts; a failed case counts as 0
            add(f"paged decode speed over flash decoding's, block {bs}, every context",
                min(r["ratio"] if r["status"] == "ok" else 0.0 for r in dec), t[key],
                ", ".join(f"{r['context']}: " + (f"{r['ratio']:.2f}x" if r["status"] == "ok"
                                                  else r["status"]) for r in dec))
    tt = gpu.get("ttft")
    if tt:
        add("time to first token, no cache over prefix cache", tt["speedup"],
            t["min_ttft_speedup"], f"{1e3 * tt['no_cache']['ttft_s']:.2f} ms -> "
            f"{1e3 * tt['cache']['ttft_s']:.2f} ms ({tt['speedup']:.1f}x)")
    return out


def summary_rows(result: dict) -> list[dict]:
    """One row per allocation scheme, prefix-cache case, kernel check and GPU
    decode case: part, case, and the figures in words."""
    pr = result["prefix"]
    full = next(r for r in result["waste"]["rows"] if r["scheme"] == "max_len")
    rows = [("KV waste", r["scheme"] + (f" {r['block_size']}" if r["block_size"] else ""),
             f"waste {100 * r['waste']:.2f}%, {r['fit']} seqs fit ({r['fit'] / full['fit']:.2f}x "
             "max_len)") for r in result["waste"]["rows"]]
    rows += [("prefix cache", k.replace("_", " "), f"{pr[k]['computed_tokens']} prompt tokens "
              f"computed (last request {pr[k]['last_computed']}), {pr[k]['blocks_held']} blocks "
              "held") for k in ("no_cache", "cache")]
    rows += [("kernel vs reference", f"{r['case']} ({r['kernel']} kernel)",
              f"max abs error {r['max_abs_err']:.2e} ({r['status']})" if "max_abs_err" in r
              else f"{r['status']}: {r.get('reason')}") for r in result["kernel"]["rows"]]
    rows += [("GPU decode", f"ctx {r['context']} block {r['block_size']}",
              f"paged {1e6 * r['paged_s']:.1f} us, flash {1e6 * r['flash_s']:.1f} us: "
              f"{r['ratio']:.2f}x" if r["status"] == "ok" else f"{r['status']}: {r.get('reason')}")
             for r in (result.get("gpu") or {}).get("decode", [])]
    return [{"part": a, "case": b, "measured": c} for a, b, c in rows]


def summary_text(result: dict) -> str:
    """The workloads in words and every target as met / MISSED with its figures."""
    w, pr = result["waste"], result["prefix"]
    drawn = lambda k: (f"median {w[k]['median']}, mean {w[k]['mean']:.0f}, "  # noqa: E731
                       f"p99 {w[k]['p99']}")
    lines = [f"workload: {w['requests']} requests, log-normal lengths (seed {w['seed']}, max_len "
             f"{w['max_len']}): prompts median {w['prompt_median']} sigma {w['prompt_sigma']} "
             f"(drawn: {drawn('prompt_stats')}), outputs median {w['output_median']} sigma "
             f"{w['output_sigma']} (drawn: {drawn('output_stats')})",
             f"prefix workload: {pr['requests']} requests x ({pr['prefix_len']}-token shared "
             f"prefix + {pr['suffix_len']}-token suffix), block {pr['block_size']}", "targets:"]
    lines += [f"  [{'met' if t['met'] else 'MISSED'}] {t['name']} ({t['goal']}): {t['text']}"
              for t in result["targets"]]
    tt = (result.get("gpu") or {}).get("ttft")
    if tt:
        lines.append(f"  same next token with and without the cache: {tt['same_next_token']}")
    if not result.get("gpu"):
        lines.append("GPU part (paged vs flash decoding, time to first token): not measured ("
                     + result.get("gpu_skipped", "it runs at size 'gpu' on a CUDA device") + ")")
    return "\n".join(lines)


def plot(result: dict, provenance: dict):
    """Bars of KV waste and of sequences fitting the budget per scheme; on a
    GPU also the paged kernel's speed over flash decoding's by context."""
    from matplotlib.figure import Figure

    from ..measure import plots

    rows, dec = result["waste"]["rows"], (result.get("gpu") or {}).get("decode", [])
    labels = [r["scheme"] + (f" {r['block_size']}" if r["block_size"] else "") for r in rows]
    colors = [{"max_len": "0.6", "exact": "tab:green"}.get(r["scheme"], "tab:blue") for r in rows]
    fig = Figure(figsize=(11.5 if dec else 8.5, 3.8), layout="constrained")
    axes = fig.subplots(1, 3 if dec else 2)
    for ax, key, scale, ylabel, title in (
            (axes[0], "waste", 100, "reserved KV slots left empty (%)",
             f"KV waste, {result['waste']['requests']} long-tail requests"),
            (axes[1], "fit", 1, "sequences that fit",
             f"in a budget of {result['waste']['budget_tokens']} token slots")):
        vals = [r[key] * scale for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=colors)
        ax.bar_label(bars, [f"{v:.1f}" if key == "waste" else f"{v:.0f}" for v in vals], fontsize=7)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
    axes[0].axhline(100 * TARGETS["max_waste_block16"], color="k", ls="--", lw=1,
                    label="target at block 16")
    axes[0].legend(fontsize=7)
    if dec:  # the kernel's speed as a fraction of flash decoding's, by context
        ctxs, sizes = sorted({r["context"] for r in dec}), sorted({r["block_size"] for r in dec})
        ratio = {(r["context"], r["block_size"]): r.get("ratio", math.nan) for r in dec}
        axes[2].axhline(1.0, color="k", ls="--", lw=1)
        return plots.sweep(ctxs, {f"block {bs}": [ratio[c, bs] for c in ctxs] for bs in sizes},
                           "context (keys per sequence)", "paged speed / flash decoding's",
                           logx=True, provenance=provenance, ax=axes[2],
                           title=f"paged decode kernel, batch {dec[0]['batch']}")
    plots.stamp(fig, provenance)
    return fig

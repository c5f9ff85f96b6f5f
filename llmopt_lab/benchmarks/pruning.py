"""Lesson 04's benchmark: pruning's quality and speed, side by side.

1. **Quality** (every size): magnitude, Wanda and SparseGPT at 50%
   unstructured and at 2:4 on llmopt-tiny, held-out perplexity change with
   a 90% bootstrap interval over the windows, KL and top-1 agreement against
   the dense model; Wanda and SparseGPT against magnitude as a paired
   interval (the same windows).
2. **Structured** (every size): 50% of every MLP's channels removed (scored
   by activation x output norm), then a recovery fine-tune distilled from the
   unpruned model within a time budget (90 s on the CPU size): the share of
   the perplexity increase it recovers, with its interval; also with the
   least-squares refit. Decode speed of the pruned model against the dense
   one at batch 1 and 16, next to the FLOP and byte reductions the cost
   model predicts.
3. **Kernels** (GPU sizes): our 2:4 Triton GEMV against our dense Triton
   GEMV at batch 1 on 4096x14336 and 14336x4096 (fp16), and torch's
   semi-structured sparse matmul (cuSPARSELt / CUTLASS) against the dense
   matmul at prefill and decode sizes.

Targets are judged as pre-registered in TARGETS: the paired interval's
upper bound below 0 for "lower perplexity than magnitude".
"""

from __future__ import annotations

import copy
import time

import torch

from . import target_lines

TARGETS = dict(recovered_share=0.5, recovery_seconds=90.0, gemv24_speedup=1.4,
               semi_structured_prefill_speedup=1.1)

_CPU = dict(model="llmopt-tiny", dtype="float32", windows=48, calibration=(32, 128),
            methods=["magnitude", "wanda", "sparsegpt"], patterns=[None, "2:4"], sparsity=0.5,
            mlp_fraction=0.5, recovery_seconds=90.0, recovery_steps=400, decode_batches=[1, 16],
            kernels=None)
SIZES = {
    "quick": dict(_CPU, windows=4, calibration=(4, 64), recovery_seconds=3.0, recovery_steps=3,
                  decode_batches=[1], kernels=None),
    "cpu": _CPU,
    "gpu": dict(_CPU, windows=96, kernels=dict(shapes=[(14336, 4096), (4096, 14336)],
                                               dtype="float16", prefill_m=[4096, 8192],
                                               decode_m=[1, 16], repeat=50)),
}


def _quality(ref, model, ev, n):
    from ..transforms.quantize.quality import compare_quality

    return compare_quality(ref, model, ev.ids[:n], ev.lengths[:n], per_window=True)


def _row(label, q, extra=None):
    from ..measure.metrics import ppl_delta_interval

    w = q["windows"]
    return dict(label=label, ppl=q["ppl"], ppl_ref=q["ppl_ref"], ppl_delta_pct=q["ppl_delta_pct"],
                ppl_delta_pct_ci90=list(ppl_delta_interval(w["nll_ref"], w["nll"], w["tokens"])),
                kl=q["kl"], top1=q["top1"], windows=w, **(extra or {}))


def run_quality(model, tok, p, ev, cal, progress=False) -> list[dict]:
    from ..transforms.prune import prune

    rows = []
    for pattern in p["patterns"]:
        for method in p["methods"]:
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            rep = prune(m, method, p["sparsity"], pattern=pattern, calibration=cal)
            took = time.perf_counter() - t0
            rows.append(_row(f"{method} {pattern or '50%'}", _quality(model, m, ev, p["windows"]),
                             dict(method=method, pattern=pattern, achieved=rep.achieved,
                                  prune_seconds=took)))
    return rows


def _decode_pair(dense, pruned, batches, limits, rounds: int = 3) -> dict:
    """Median decode step time (s) of both models per batch size, measured in
    alternating rounds so that a slow spell of the machine hits both."""
    from .anatomy import measure_decode

    times = {(k, b): [] for k in ("dense", "pruned") for b in batches}
    for _ in range(rounds):
        for b in batches:
            for k, m in (("dense", dense), ("pruned", pruned)):
                times[(k, b)].append(measure_decode(m, b, 128, limits, steps=16)["time_s"])
    return {key: sorted(v)[len(v) // 2] for key, v in times.items()}


def run_structured(model, tok, p, ev, cal, progress=False) -> dict:
    from .. import measure
    from ..transforms.structured import channel_scores, prune_structured, recover

    scores = channel_scores(model, cal, keep_gram=True)
    out = {}
    limits = measure.device_limits(model.device)
    for refit in (False, True):
        m = copy.deepcopy(model)
        rep = prune_structured(m, p["mlp_fraction"], 0.0, scores=scores, refit=refit)
        pruned = _quality(model, m, ev, p["windows"])
        rec = recover(m, tok, seconds=p["recovery_seconds"], steps=p["recovery_steps"], teacher=model,
                      progress=progress)
        recovered = _quality(model, m, ev, p["windows"])
        key = "refit" if refit else "plain"
        out[key] = dict(mlp_after=rep.mlp_after, params_before=rep.params_before,
                        params_after=rep.params_after, pruned=_row("pruned", pruned),
                        recovered=_row("recovered", recovered), recovery=rec)
        if not refit:
            cost = [measure.step_cost(c, b, 1, 128, m.dtype) for c in (model.config, m.config)
                    for b in p["decode_batches"]]
            k = len(p["decode_batches"])
            t = _decode_pair(model, m, p["decode_batches"], limits)
            out["decode"] = [dict(batch=b, dense_s=t[("dense", b)], pruned_s=t[("pruned", b)],
                                  speedup=t[("dense", b)] / t[("pruned", b)],
                                  flop_ratio=cost[i].flops / cost[k + i].flops,
                                  byte_ratio=cost[i].bytes / cost[k + i].bytes)
                             for i, b in enumerate(p["decode_batches"])]
    return out


def _time_cuda(fn, repeat):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def run_kernels(k: dict, device) -> list[dict]:
    """GPU only: our 2:4 GEMV vs our dense GEMV; torch's semi-structured vs dense."""
    from ..kernels import sparse24
    from ..transforms.prune import mask_by_score

    dtype = getattr(torch, k["dtype"])
    rows = []
    for N, K in k["shapes"]:
        w = torch.randn(N, K, device=device, dtype=dtype)
        w = w * mask_by_score(w.float().abs(), pattern="2:4").to(dtype)
        values, meta = sparse24.compress_24(w)
        for M in k["decode_m"]:
            x = torch.randn(M, K, device=device, dtype=dtype)
            t_dense = _time_cuda(lambda: sparse24.dense_gemv(x, w), k["repeat"])
            t_sparse = _time_cuda(lambda: sparse24.sparse24_matmul(x, values, meta), k["repeat"])
            ok = torch.allclose(sparse24.sparse24_matmul(x, values, meta).float(), (x @ w.t()).float(),
                                rtol=2e-2, atol=2e-2)
            rows.append(dict(kind="ours 2:4 vs ours dense", N=N, K=K, M=M, dense_s=t_dense,
                             sparse_s=t_sparse, speedup=t_dense / t_sparse, correct=bool(ok),
                             dense_gb_s=(N * K * 2) / t_dense / 1e9))
        try:
            lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
            semi = sparse24.to_semi_structured(copy.deepcopy(lin))
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            rows.append(dict(kind="torch semi-structured", N=N, K=K, error=str(e)[:200]))
            continue
        for M in list(k["prefill_m"]) + list(k["decode_m"]):
            x = torch.randn(M, K, device=device, dtype=dtype)
            t_dense = _time_cuda(lambda: lin(x), k["repeat"])
            try:
                t_semi = _time_cuda(lambda: semi(x), k["repeat"])
            except Exception as e:  # noqa: BLE001
                rows.append(dict(kind="torch semi-structured", N=N, K=K, M=M, error=str(e)[:200]))
                continue
            rows.append(dict(kind="torch semi-structured", N=N, K=K, M=M, dense_s=t_dense,
                             sparse_s=t_semi, speedup=t_dense / t_semi,
                             phase="prefill" if M in k["prefill_m"] else "decode"))
    return rows


def run(size: str = "cpu", device=None, progress: bool = True, params: dict | None = None) -> dict:
    """Run the lesson 04 benchmark at a named size; returns a JSON-able dict."""
    from .. import data
    from ..transforms.quantize.calibration import training_calibration_set
    from ..weights import load_model

    p = dict(params or SIZES[size])
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    model, tok = load_model(p["model"], device=dev, dtype=p["dtype"])
    cal = training_calibration_set(tok, num_sequences=p["calibration"][0], seq_len=p["calibration"][1])
    ev = data.heldout_set(tok, quick=True)
    p["windows"] = min(p["windows"], len(ev.ids))
    out = dict(benchmark="pruning", lesson="04", size=size, params=p, device=str(dev))
    out["quality"] = run_quality(model, tok, p, ev, cal, progress)
    out["structured"] = run_structured(model, tok, p, ev, cal, progress)
    if p.get("kernels") and dev.type == "cuda":
        out["kernels"] = run_kernels(p["kernels"], dev)
    out["targets"] = targets(out)
    for r in out["quality"]:
        r.pop("windows", None)
    for key in ("plain", "refit"):
        for part in ("pruned", "recovered"):
            out["structured"][key][part].pop("windows", None)
    return out


def targets(result: dict) -> list[dict]:
    """Each target measured: name, goal, value, met, figures in words."""
    from ..measure.metrics import ppl_delta_interval, recovery, recovery_interval

    out = []
    q = {(r["method"], r["pattern"]): r for r in result["quality"]}
    for pattern in dict.fromkeys(r["pattern"] for r in result["quality"]):
        mag = q.get(("magnitude", pattern))
        for method in ("wanda", "sparsegpt"):
            r = q.get((method, pattern))
            if not (mag and r and "windows" in r):
                continue
            lo, hi = ppl_delta_interval(mag["windows"]["nll"], r["windows"]["nll"], r["windows"]["tokens"])
            delta = 100 * (r["ppl"] / mag["ppl"] - 1)
            out.append(dict(name=f"{method} below magnitude, {pattern or '50% unstructured'}", value=delta,
                            goal="90% interval < 0", met=bool(hi < 0),
                            text=f"perplexity {r['ppl']:.2f} vs {mag['ppl']:.2f}: {delta:+.1f}% "
                                 f"[{lo:+.1f}, {hi:+.1f}]"))
    s = result["structured"]["plain"]
    pr, rc = s["pruned"], s["recovered"]
    share = float(recovery(pr["ppl_ref"], pr["ppl"], rc["ppl"]))
    ci = ""
    if "windows" in pr and "windows" in rc:
        lo, hi = recovery_interval(pr["windows"]["nll_ref"], pr["windows"]["nll"], rc["windows"]["nll"],
                                   rc["windows"]["tokens"])
        ci = f" [{lo:.2f}, {hi:.2f}]"
    sec = s["recovery"]["seconds"]
    within = sec <= TARGETS["recovery_seconds"] * 1.05
    out.append(dict(name="50% MLP channels removed, recovery fine-tune recovers", value=share,
                    goal=f">= {TARGETS['recovered_share']:g} within {TARGETS['recovery_seconds']:g} s",
                    met=bool(share >= TARGETS["recovered_share"] and within),
                    text=f"perplexity {pr['ppl_ref']:.2f} -> {pr['ppl']:.2f} pruned -> {rc['ppl']:.2f} "
                         f"after {s['recovery']['steps']} steps in {sec:.0f} s: {share:.2f}{ci} of "
                         "the increase recovered"))
    for d in result["structured"].get("decode", []):
        out.append(dict(name=f"structured decode speed-up, batch {d['batch']}", value=d["speedup"],
                        goal="reported", met=None,
                        text=f"{d['speedup']:.2f}x measured; the cost model: {d['flop_ratio']:.2f}x "
                             f"fewer FLOPs, {d['byte_ratio']:.2f}x fewer bytes"))
    for r in result.get("kernels", []):
        if "speedup" not in r:
            continue
        if r["kind"].startswith("ours") and r["M"] == 1:
            goal = TARGETS["gemv24_speedup"]
            out.append(dict(name=f"our 2:4 GEMV vs dense, {r['N']}x{r['K']}, batch 1", value=r["speedup"],
                            goal=f">= {goal:g}", met=bool(r["speedup"] >= goal and r["correct"]),
                            text=f"{r['speedup']:.2f}x ({r['dense_gb_s']:.0f} GB/s dense)"))
        elif r["kind"] == "torch semi-structured":
            goal = TARGETS["semi_structured_prefill_speedup"] if r["phase"] == "prefill" else None
            out.append(dict(name=f"torch semi-structured, {r['N']}x{r['K']}, M={r['M']} ({r['phase']})",
                            value=r["speedup"], goal=f">= {goal:g}" if goal else "reported",
                            met=bool(r["speedup"] >= goal) if goal else None,
                            text=f"{r['speedup']:.2f}x"))
    return out


def summary_rows(result: dict) -> list[dict]:
    rows = [{"model": r["label"], "ppl": round(r["ppl"], 3), "ppl change %": round(r["ppl_delta_pct"], 1),
             "90% interval": f"[{r['ppl_delta_pct_ci90'][0]:+.1f}, {r['ppl_delta_pct_ci90'][1]:+.1f}]",
             "KL": round(r["kl"], 4), "top-1": round(r["top1"], 3)} for r in result["quality"]]
    for key, s in result["structured"].items():
        if key == "decode":
            continue
        for part in ("pruned", "recovered"):
            r = s[part]
            rows.append({"model": f"MLP -50% ({key}) {part}", "ppl": round(r["ppl"], 3),
                         "ppl change %": round(r["ppl_delta_pct"], 1),
                         "90% interval": f"[{r['ppl_delta_pct_ci90'][0]:+.1f}, {r['ppl_delta_pct_ci90'][1]:+.1f}]",
                         "KL": round(r["kl"], 4), "top-1": round(r["top1"], 3)})
    return rows


def summary_text(result: dict) -> str:
    p = result["params"]
    lines = [f"{p['model']} ({p['dtype']}), {p['windows']} held-out windows, calibration "
             f"{p['calibration'][0]} x {p['calibration'][1]} tokens of the training split", "targets:"]
    lines += target_lines(result["targets"])[1:]
    return "\n".join(lines)


def plot(result: dict, provenance: dict):
    """Perplexity change per method and pattern (with intervals); structured
    pruning before and after recovery."""
    from matplotlib.figure import Figure

    from ..measure import plots

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    a, b = fig.subplots(1, 2, width_ratios=[2, 1])
    q = result["quality"]
    patterns = list(dict.fromkeys(r["pattern"] for r in q))
    methods = list(dict.fromkeys(r["method"] for r in q))
    width = 0.8 / len(patterns)
    for k, pattern in enumerate(patterns):
        rs = [next(r for r in q if r["method"] == m and r["pattern"] == pattern) for m in methods]
        xs = [i + k * width for i in range(len(methods))]
        val = [r["ppl_delta_pct"] for r in rs]
        err = [[v - r["ppl_delta_pct_ci90"][0] for v, r in zip(val, rs)],
               [r["ppl_delta_pct_ci90"][1] - v for v, r in zip(val, rs)]]
        bars = a.bar(xs, val, width, yerr=err, capsize=3, label=pattern or "50% unstructured")
        a.bar_label(bars, [f"{v:+.1f}%" for v in val], fontsize=7)
    a.set_xticks([i + width * (len(patterns) - 1) / 2 for i in range(len(methods))], methods)
    a.set_ylabel("held-out perplexity change (%)")
    a.legend(fontsize=8)
    a.set_title("unstructured and 2:4 at 50% sparsity (90% intervals)", fontsize=9)
    labels, vals = [], []
    for key in ("plain", "refit"):
        s = result["structured"][key]
        labels += [f"{key}\npruned", f"{key}\nrecovered"]
        vals += [s["pruned"]["ppl_delta_pct"], s["recovered"]["ppl_delta_pct"]]
    bars = b.bar(labels, vals, color=["tab:red", "tab:green"] * 2)
    b.bar_label(bars, [f"{v:+.1f}%" for v in vals], fontsize=7)
    b.set_ylabel("perplexity change (%)")
    b.set_title("50% of MLP channels removed", fontsize=9)
    b.tick_params(axis="x", labelsize=7)
    plots.stamp(fig, provenance)
    return fig

"""Lesson 05's benchmark: distillation, low rank, fewer layers and shared layers.

Each part trades training time for inference cost and reports both sides:
bytes (parameters), decode speed on the device, and held-out perplexity
with a 90% bootstrap interval over the windows (paired: every model is
scored on the same windows).

1. **Distillation**: a student of the draft's shape (1 layer), trained from
   scratch for the same tokens on the same batches, on labels alone and
   with logit distillation from llmopt-tiny (target: perplexity ratio
   <= 0.95, its interval reported).
2. **Low rank**: SVD of every decoder linear at the rank that halves its
   parameters, plain and activation-aware; then LoRA adapters on the
   factors, trained by distillation from the full model within a time
   budget and merged back (target: recover >= half of the plain SVD's
   perplexity increase).
3. **Fewer layers**: the quarter of the blocks with the lowest block
   influence removed, then healed by distillation (reported: the remaining
   perplexity increase).
4. **Shared layers**: adjacent blocks sharing weights, healed the same way
   (reported: bytes saved, FLOPs unchanged, quality).
5. **A distilled draft** for speculative decoding (lesson 08): part 1's
   two students used as drafts, greedy acceptance at k = 4 (target: the
   distilled one accepted more often than the one trained on labels for
   the same tokens); and the zoo's fully trained draft fine-tuned by
   distillation against the same fine-tune on labels (reported).
6. **GPU speed** (gpu size): half the layers of a Llama-3.2-1B-shaped model
   removed (target >= 1.8x faster decode), and rank d/4 factors on
   4096-wide layers at batch 1 (target >= 1.6x).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from . import target_lines

TARGETS = dict(kd_ratio=0.95, lowrank_recovered=0.5, depth_speedup=1.8, rank_speedup=1.6)

_CPU = dict(teacher="llmopt-tiny", draft="llmopt-tiny-draft", dtype="float32", windows=48,
            student=dict(steps=150, batch_size=8, seq_len=128, lr=2e-3, temperature=2.0, alpha=0.5,
                         eval_every=25, eval_windows=12,
                         sweep=[(1.0, 0.5, "forward"), (4.0, 0.5, "forward"), (2.0, 1.0, "forward"),
                                (2.0, 0.5, "reverse")]),
            calibration=(16, 128), svd_fraction=0.5, lora_rank=16, heal_seconds=75.0,
            heal_steps=300, heal_lr=1e-3, drop_fraction=0.25, share_pairs=[(3, 4), (5, 6)],
            draft_tune=dict(steps=120, batch_size=8, seq_len=128, lr=5e-4, temperature=1.0, alpha=0.9),
            acceptance=dict(prompts=24, prompt_len=64, new_tokens=48, k=4),
            decode=dict(prompt_len=32, new_tokens=48), gpu=None)
SIZES = {
    "quick": dict(_CPU, windows=4,
                  student=dict(_CPU["student"], steps=3, batch_size=2, seq_len=32, eval_every=3,
                               eval_windows=2, sweep=[(1.0, 1.0, "reverse")]),
                  calibration=(2, 32), heal_seconds=2.0, heal_steps=2,
                  draft_tune=dict(_CPU["draft_tune"], steps=2, batch_size=2, seq_len=32),
                  acceptance=dict(prompts=2, prompt_len=16, new_tokens=8, k=4),
                  decode=dict(prompt_len=8, new_tokens=4)),
    "cpu": _CPU,
    "gpu": dict(_CPU, windows=96, gpu=dict(model="synthetic:llama-1b", dtype="bfloat16", context=512,
                                           steps=50, repeat=5, shapes=[(4096, 4096), (14336, 4096),
                                                                       (4096, 14336)])),
}


# ----------------------------------------------------------------- quality
def _quality(ref, model, ev, n):
    from ..transforms.quantize.quality import compare_quality

    return compare_quality(ref, model, ev.ids[:n], ev.lengths[:n], per_window=True)


def _row(label, q, **extra):
    from ..measure.metrics import ppl_delta_interval

    w = q["windows"]
    return dict(label=label, ppl=q["ppl"], ppl_ref=q["ppl_ref"], ppl_delta_pct=q["ppl_delta_pct"],
                ppl_delta_pct_ci90=list(ppl_delta_interval(w["nll_ref"], w["nll"], w["tokens"])),
                kl=q["kl"], top1=q["top1"], windows=w, **extra)


def _params(model) -> int:
    from ..transforms.depth import unique_parameters

    return unique_parameters(model)


def _decode_speed(model, prompt, new_tokens: int, repeat: int = 3) -> float:
    """Median seconds per generated token, greedy batch 1 with the static cache."""
    from ..generate import generate
    from ..measure.timing import synchronize

    generate(model, prompt, 2, ignore_eos=True)
    times = []
    for _ in range(repeat):
        synchronize(model.device)
        t0 = time.perf_counter()
        generate(model, prompt, new_tokens, ignore_eos=True)
        synchronize(model.device)
        times.append((time.perf_counter() - t0) / new_tokens)
    return statistics.median(times)


def _batches(tok, steps: int, batch_size: int, seq_len: int, seed: int):
    from ..transforms.quantize.calibration import training_calibration_set

    data = training_calibration_set(tok, num_sequences=steps * batch_size, seq_len=seq_len,
                                    batch_size=batch_size, seed=seed)
    return lambda i: data[i % len(data)]


def heal(model, teacher, tok, seconds: float, max_steps: int, lr: float, *, seed: int = 3,
         batch_size: int = 8, seq_len: int = 128) -> dict:
    """Distil ``teacher`` into ``model`` (its trainable parameters: all of
    them, or only LoRA adapters) for as many steps of ``batch_size x
    seq_len`` tokens as fit in ``seconds`` (one step timed first), at most
    ``max_steps``. Returns dict(steps, seconds, tokens)."""
    from ..distill import distill, distill_loss_fn
    from ..training import TrainSettings

    batches = _batches(tok, max_steps, batch_size, seq_len, seed)
    dev = next(model.parameters()).device
    if not any(p.requires_grad for p in model.parameters()):  # a copy of the frozen teacher: train it all
        model.requires_grad_(True)
    loss_fn = distill_loss_fn(teacher, temperature=1.0, alpha=1.0)
    model.train()
    t0 = time.perf_counter()
    loss_fn(model, batches(0).to(dev)).backward()
    per_step = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    steps = max(1, min(max_steps, int(0.9 * seconds / max(per_step, 1e-6))))
    settings = TrainSettings(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                             warmup_frac=0.05, weight_decay=0.0, eval_every=steps, seed=seed)
    t0 = time.perf_counter()
    distill(model, teacher, batches, settings, temperature=1.0, alpha=1.0)
    model.eval()
    return dict(steps=steps, seconds=time.perf_counter() - t0, tokens=steps * batch_size * seq_len)


# ------------------------------------------------------------------- parts
def run_student(teacher, tok, p, ev, progress=False) -> dict:
    """Part 1: the same student trained on labels and by distillation."""
    from ..distill import distill
    from ..model import Transformer
    from ..training import TrainSettings, lm_loss, train
    from ..weights import load_model
    from .. import data

    s = p["student"]
    draft_cfg = load_model(p["draft"], device="cpu")[0].config
    batches = _batches(tok, s["steps"], s["batch_size"], s["seq_len"], seed=11)
    few = data.EvalSet(ids=ev.ids[:s["eval_windows"]], lengths=ev.lengths[:s["eval_windows"]],
                       window=ev.window, name="curve")

    def evaluate(m):
        return {"loss": data.evaluate_nll(m, few).nll}

    settings = TrainSettings(steps=s["steps"], batch_size=s["batch_size"], seq_len=s["seq_len"],
                             lr=s["lr"], warmup_frac=0.05, weight_decay=0.1, eval_every=s["eval_every"],
                             seed=0)
    dev = teacher.device
    out = {}
    students = {}
    for kind in ("labels", "distilled"):
        student = Transformer.from_config(draft_cfg, device=dev, seed=0)
        t0 = time.perf_counter()
        if kind == "labels":
            log = train(student, batches, settings, loss_fn=lm_loss, evaluate=evaluate, progress=progress)
        else:
            log = distill(student, teacher, batches, settings, temperature=s["temperature"],
                          alpha=s["alpha"], evaluate=evaluate, progress=progress)
        student.eval()
        students[kind] = student
        out[kind] = dict(seconds=time.perf_counter() - t0,
                         curve=[(h["tokens"], h.get("loss")) for h in log["heldout"]])
    q = _quality(students["labels"], students["distilled"], ev, p["windows"])
    out["comparison"] = _row("distilled vs labels", q)
    out["ratio"] = q["ppl"] / q["ppl_ref"]
    out["tokens"] = settings.tokens
    out["params"] = _params(students["labels"])
    # T and lambda: the same student, batches and steps, other settings of the loss
    out["sweep"] = []
    for T, alpha, kind in s.get("sweep", []):
        student = Transformer.from_config(draft_cfg, device=dev, seed=0)
        distill(student, teacher, batches, settings, temperature=T, alpha=alpha, kind=kind)
        student.eval()
        qs = _quality(students["labels"], student, ev, p["windows"])
        out["sweep"].append(_row(f"T={T:g}, lambda={alpha:g}, {kind} KL", qs, temperature=T, alpha=alpha,
                                 kind=kind, ratio=qs["ppl"] / qs["ppl_ref"]))
    return out, students


def run_lowrank(teacher, tok, p, ev, cal) -> dict:
    """Part 2: SVD (plain, activation-aware) at half the parameters, then
    LoRA healing by distillation, merged back."""
    from ..measure.metrics import recovery, recovery_interval
    from ..transforms.lowrank import add_lora, lowrank, merge_lora

    out = {}
    rows = {}
    for method in ("svd", "asvd"):
        rep = lowrank(teacher, param_fraction=p["svd_fraction"], method=method,
                      calibration=cal if method == "asvd" else None, copy=True)
        m = rep["model"]
        q = _quality(teacher, m, ev, p["windows"])
        rows[method] = (m, q)
        out[method] = _row(f"{method} at {p['svd_fraction']:.0%} of the linear parameters", q,
                           params=_params(m), params_ref=_params(teacher),
                           mean_rel_error=statistics.mean(v["rel_error"] for v in rep["layers"].values()))
    m, q_svd = rows["svd"]
    add_lora(m, r=p["lora_rank"], alpha=2 * p["lora_rank"])
    info = heal(m, teacher, tok, p["heal_seconds"], p["heal_steps"], p["heal_lr"])
    merged = merge_lora(m)
    q = _quality(teacher, m, ev, p["windows"])
    w0, w1 = q_svd["windows"], q["windows"]
    out["healed"] = _row("svd + LoRA healed, merged", q, params=_params(m), merged=merged, **info)
    out["recovered"] = recovery(q_svd["ppl_ref"], q_svd["ppl"], q["ppl"])
    out["recovered_ci90"] = list(recovery_interval(w0["nll_ref"], w0["nll"], w1["nll"], w0["tokens"]))
    out["_model"] = m
    return out


def run_depth(teacher, tok, p, ev, cal) -> dict:
    """Part 3: drop the least influential blocks, heal by distillation."""
    from ..transforms.depth import block_influence, remove_layers

    bi = block_influence(teacher, cal)
    n_drop = max(1, round(p["drop_fraction"] * len(bi)))
    drop = sorted(sorted(range(len(bi)), key=lambda i: bi[i])[:n_drop])
    m = remove_layers(teacher, drop, copy=True)
    q0 = _quality(teacher, m, ev, p["windows"])
    info = heal(m, teacher, tok, p["heal_seconds"], p["heal_steps"], p["heal_lr"])
    q1 = _quality(teacher, m, ev, p["windows"])
    return dict(influence=bi, dropped=drop, layers=m.config.num_layers,
                removed=_row(f"{n_drop} of {len(bi)} blocks removed", q0, params=_params(m)),
                healed=_row(f"{n_drop} of {len(bi)} blocks removed, healed", q1, params=_params(m), **info),
                _model=m)


def run_share(teacher, tok, p, ev) -> dict:
    """Part 4: blocks sharing weights, healed by distillation."""
    from ..measure.roofline import step_cost
    from ..transforms.depth import parameter_bytes, share_layers

    m = share_layers(teacher, p["share_pairs"], copy=True)
    q0 = _quality(teacher, m, ev, p["windows"])
    info = heal(m, teacher, tok, p["heal_seconds"], p["heal_steps"], p["heal_lr"])
    q1 = _quality(teacher, m, ev, p["windows"])
    flops = step_cost(teacher.config, 1, 1, 64, teacher.dtype).flops
    return dict(pairs=p["share_pairs"], bytes=parameter_bytes(m), bytes_ref=parameter_bytes(teacher),
                flops_per_token=flops, flops_per_token_ref=flops,
                shared=_row("shared", q0, params=_params(m)),
                healed=_row("shared, healed", q1, params=_params(m), **info), _model=m)


def acceptance(target, draft, prompts, new_tokens: int, k: int) -> dict:
    """Greedy speculative decoding with ``draft``: acceptance over all prompts."""
    from ..speculative import speculative_generate

    per_prompt = []  # (accepted, proposed) of each prompt: the unit of the bootstrap
    judged_alpha = []
    for pr in prompts:
        out = speculative_generate(target, draft, [pr], new_tokens, k=k, ignore_eos=True)
        per_prompt.append((out.stats.accepted, out.stats.proposed))
        judged_alpha.append(out.stats.alpha)
    accepted = sum(a for a, _ in per_prompt)
    proposed = sum(n for _, n in per_prompt)
    return dict(acceptance_rate=accepted / max(proposed, 1), alpha=statistics.mean(judged_alpha),
                proposed=proposed, accepted=accepted, per_prompt=per_prompt)


def acceptance_difference_interval(base: dict, other: dict, level: float = 0.9) -> list[float] | None:
    """Paired bootstrap interval (over prompts) of ``other``'s acceptance rate
    minus ``base``'s, both measured on the same prompts; None without per-prompt data."""
    from ..measure.metrics import bootstrap_interval

    if "per_prompt" not in base or "per_prompt" not in other or len(base["per_prompt"]) < 2:
        return None
    a = torch.tensor(base["per_prompt"], dtype=torch.float64)
    b = torch.tensor(other["per_prompt"], dtype=torch.float64)

    def stat(i):
        return b[i, 0].sum(1) / b[i, 1].sum(1) - a[i, 0].sum(1) / a[i, 1].sum(1)
    return list(bootstrap_interval(stat, len(a), level=level))


def run_draft(teacher, tok, p, ev, students: dict | None = None, progress=False) -> dict:
    """Part 5: speculative acceptance at k of (a) part 1's two students as
    drafts (trained from scratch for the same tokens, on labels or by
    distillation: the equal-budget comparison) and (b) the zoo's fully
    trained draft, fine-tuned by distillation and (control) on labels for
    the same tokens."""
    from ..distill import distill
    from ..training import TrainSettings, lm_loss, train
    from ..weights import load_model

    a = p["acceptance"]
    keep = ev.lengths >= a["prompt_len"]
    prompts = ev.ids[keep][: a["prompts"], : a["prompt_len"]].tolist()
    dt = p["draft_tune"]
    batches = _batches(tok, dt["steps"], dt["batch_size"], dt["seq_len"], seed=21)
    settings = TrainSettings(steps=dt["steps"], batch_size=dt["batch_size"], seq_len=dt["seq_len"],
                             lr=dt["lr"], warmup_frac=0.05, weight_decay=0.0, eval_every=dt["steps"], seed=0)
    out = {}
    if students:
        out["scratch"] = {kind: acceptance(teacher, m, prompts, a["new_tokens"], a["k"])
                          for kind, m in students.items()}
    plain, _ = load_model(p["draft"], device=teacher.device)
    out["plain"] = acceptance(teacher, plain, prompts, a["new_tokens"], a["k"])
    for kind in ("labels", "distilled"):
        d, _ = load_model(p["draft"], device=teacher.device)
        t0 = time.perf_counter()
        if kind == "labels":
            train(d, batches, settings, loss_fn=lm_loss, progress=progress)
        else:
            distill(d, teacher, batches, settings, temperature=dt["temperature"], alpha=dt["alpha"],
                    progress=progress)
        d.eval()
        out[kind] = dict(acceptance(teacher, d, prompts, a["new_tokens"], a["k"]),
                         seconds=time.perf_counter() - t0)
    out["k"] = a["k"]
    out["tokens"] = settings.tokens
    return out


def run_gpu_speed(g: dict, device) -> dict:
    """Part 6: decode with half the layers removed (CUDA graphs, batch 1) and
    rank d/4 factors against dense layers (batch 1 GEMV)."""
    from .. import measure
    from ..transforms.depth import remove_layers
    from ..transforms.lowrank import LowRankLinear
    from ..weights import load_model
    from .fusion import time_decode

    model, _ = load_model(g["model"], device=device, dtype=g["dtype"])
    n_layers = model.config.num_layers
    full = time_decode(model, 1, g["context"], "graph", g["steps"], g["repeat"])
    half = remove_layers(model, list(range(1, n_layers, 2)))  # in place: every other block
    cut = time_decode(half, 1, g["context"], "graph", g["steps"], g["repeat"])
    out = dict(depth=dict(layers=[n_layers, half.config.num_layers],
                          full_step_s=full["step_s"], half_step_s=cut["step_s"],
                          speedup=full["step_s"] / cut["step_s"]))
    del model, half
    dtype = getattr(torch, g["dtype"])
    rows = []
    for n_out, n_in in g["shapes"]:
        dense = torch.nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
        r = min(n_out, n_in) // 4
        low = LowRankLinear.from_linear(dense, r)
        x = torch.randn(1, n_in, device=device, dtype=dtype)
        with torch.inference_mode():
            td = measure.time_fn(lambda: dense(x), warmup=5, repeat=100, device=device).median
            tl = measure.time_fn(lambda: low(x), warmup=5, repeat=100, device=device).median
        rows.append(dict(shape=[n_out, n_in], rank=r, dense_s=td, lowrank_s=tl, speedup=td / tl,
                         param_ratio=r * (n_out + n_in) / (n_out * n_in)))
    out["rank"] = rows
    return out


# --------------------------------------------------------------------- run
def run(size: str = "cpu", device=None, progress: bool = True, params: dict | None = None) -> dict:
    """Run the lesson 05 benchmark at a named size; returns a JSON-able dict."""
    from tqdm.auto import tqdm

    from .. import data
    from ..transforms.quantize.calibration import training_calibration_set
    from ..weights import load_model

    p = copy.deepcopy(params or SIZES[size])
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    teacher, tok = load_model(p["teacher"], device=dev, dtype=p["dtype"])
    teacher.requires_grad_(False)
    ev = data.heldout_set(tok, quick=True)
    p["windows"] = min(p["windows"], len(ev.ids))
    cal = training_calibration_set(tok, num_sequences=p["calibration"][0], seq_len=p["calibration"][1])
    out = dict(benchmark="distillation", lesson="05", size=size, params=p, device=str(dev))
    bar = tqdm(total=6, desc="lesson 05", disable=not progress, leave=False)
    prompt = ev.ids[:1, : p["decode"]["prompt_len"]].to(dev)

    bar.set_postfix_str("student: labels vs distillation")
    out["student"], students = run_student(teacher, tok, p, ev)
    bar.update()
    bar.set_postfix_str("low rank + LoRA")
    out["lowrank"] = run_lowrank(teacher, tok, p, ev, cal)
    bar.update()
    bar.set_postfix_str("fewer layers")
    out["depth"] = run_depth(teacher, tok, p, ev, cal)
    bar.update()
    bar.set_postfix_str("shared layers")
    out["share"] = run_share(teacher, tok, p, ev)
    bar.update()
    bar.set_postfix_str("distilled draft")
    out["draft"] = run_draft(teacher, tok, p, ev, students)
    bar.update()
    # decode speed of every model, timed together in interleaved rounds (a
    # machine that drifts during the run then biases none of them)
    models = {"teacher": teacher, "lowrank (merged)": out["lowrank"].pop("_model"),
              "fewer layers": out["depth"].pop("_model"), "shared layers": out["share"].pop("_model")}
    rounds = {k: [] for k in models}
    for _ in range(3):
        for k, m in models.items():
            rounds[k].append(_decode_speed(m, prompt, p["decode"]["new_tokens"], repeat=1))
    out["decode_s_per_token"] = {k: statistics.median(v) for k, v in rounds.items()}
    if p.get("gpu") and dev.type == "cuda":
        bar.set_postfix_str("GPU speed")
        out["gpu"] = run_gpu_speed(p["gpu"], dev)
    bar.update()
    bar.close()
    out["targets"] = targets(out)
    _strip_windows(out)
    return out


def _strip_windows(obj):
    if isinstance(obj, dict):
        if isinstance(obj.get("windows"), dict):  # per-window sums: only for the intervals
            obj.pop("windows")
        for v in obj.values():
            _strip_windows(v)
    elif isinstance(obj, list):
        for v in obj:
            _strip_windows(v)


# ----------------------------------------------------------------- report
def targets(result: dict) -> list[dict]:
    """Each target with its measurement and whether it was met (None:
    reported only)."""
    T, out = TARGETS, []
    st = result["student"]
    c = st["comparison"]
    lo, hi = (1 + x / 100 for x in c["ppl_delta_pct_ci90"])
    out.append(dict(name="distilled student vs the same student on labels (same tokens)",
                    value=st["ratio"], goal=f"<= {T['kd_ratio']:g}x perplexity",
                    met=bool(st["ratio"] <= T["kd_ratio"]),
                    text=f"perplexity {c['ppl_ref']:.2f} (labels) -> {c['ppl']:.2f} (distilled): "
                         f"{st['ratio']:.3f}x [90%: {lo:.3f}, {hi:.3f}] after {st['tokens']:,} tokens"))
    for r in st.get("sweep", []):
        lo, hi = (1 + x / 100 for x in r["ppl_delta_pct_ci90"])
        out.append(dict(name=f"the same student distilled with {r['label']}", value=r["ratio"],
                        goal="reported", met=None,
                        text=f"perplexity {r['ppl']:.2f}: {r['ratio']:.3f}x the labels-only student "
                             f"[90%: {lo:.3f}, {hi:.3f}]"))
    lr = result["lowrank"]
    out.append(dict(name="SVD at half the parameters, LoRA-healed and merged: share of the increase recovered",
                    value=lr["recovered"], goal=f">= {T['lowrank_recovered']:g}",
                    met=bool(lr["recovered"] >= T["lowrank_recovered"]),
                    text=f"perplexity {lr['svd']['ppl_ref']:.2f} -> {lr['svd']['ppl']:.2f} (SVD) -> "
                         f"{lr['healed']['ppl']:.2f} (healed, {lr['healed']['steps']} steps in "
                         f"{lr['healed']['seconds']:.0f} s): {lr['recovered']:.2f} "
                         f"[{lr['recovered_ci90'][0]:.2f}, {lr['recovered_ci90'][1]:.2f}] recovered; "
                         f"activation-aware SVD before healing: {lr['asvd']['ppl']:.2f}"))
    d = result["depth"]
    out.append(dict(name=f"{len(d['dropped'])} least influential of {len(d['influence'])} blocks removed, healed",
                    value=d["healed"]["ppl_delta_pct"], goal="reported", met=None,
                    text=f"perplexity +{d['removed']['ppl_delta_pct']:.1f}% removed, "
                         f"+{d['healed']['ppl_delta_pct']:.1f}% "
                         f"[{d['healed']['ppl_delta_pct_ci90'][0]:+.1f}, {d['healed']['ppl_delta_pct_ci90'][1]:+.1f}] "
                         f"after healing (blocks {d['dropped']})"))
    s = result["share"]
    out.append(dict(name="shared blocks: bytes saved, FLOPs unchanged", value=s["bytes"] / s["bytes_ref"],
                    goal="reported", met=None,
                    text=f"{s['bytes_ref'] / 1e6:.1f} -> {s['bytes'] / 1e6:.1f} MB, perplexity "
                         f"+{s['shared']['ppl_delta_pct']:.1f}% shared, +{s['healed']['ppl_delta_pct']:.1f}% healed"))
    dr = result["draft"]
    if "scratch" in dr:
        sc = dr["scratch"]
        better = sc["distilled"]["acceptance_rate"] > sc["labels"]["acceptance_rate"]
        ci = acceptance_difference_interval(sc["labels"], sc["distilled"])
        out.append(dict(name=f"distilled draft vs the same draft on labels (part 1's students, same "
                             f"tokens), greedy acceptance at k={dr['k']}",
                        value=sc["distilled"]["acceptance_rate"], goal="higher", met=bool(better),
                        text=f"{sc['labels']['acceptance_rate']:.3f} ({sc['labels']['accepted']}/"
                             f"{sc['labels']['proposed']}, labels) -> {sc['distilled']['acceptance_rate']:.3f} "
                             f"({sc['distilled']['accepted']}/{sc['distilled']['proposed']}, distilled)"
                             + (f"; difference 90% [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")))
    ci = acceptance_difference_interval(dr["plain"], dr["distilled"])
    ci_l = acceptance_difference_interval(dr["labels"], dr["distilled"])
    out.append(dict(name=f"the zoo's trained draft fine-tuned for {dr['tokens']:,} tokens, acceptance at k={dr['k']}",
                    value=dr["distilled"]["acceptance_rate"], goal="reported", met=None,
                    text=f"{dr['plain']['acceptance_rate']:.3f} (zoo draft) -> "
                         f"{dr['distilled']['acceptance_rate']:.3f} (fine-tuned by distillation"
                         + (f"; difference 90% [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
                         + f"); the same fine-tune on labels: {dr['labels']['acceptance_rate']:.3f}"
                         + (f" (distillation minus labels 90% [{ci_l[0]:+.3f}, {ci_l[1]:+.3f}])" if ci_l else "")))
    g = result.get("gpu")
    if g:
        sp = g["depth"]["speedup"]
        out.append(dict(name="half the layers removed, decode speed-up (1B shape, CUDA graphs)", value=sp,
                        goal=f">= {T['depth_speedup']:g}x", met=bool(sp >= T["depth_speedup"]),
                        text=f"{sp:.2f}x"))
        for r in g["rank"]:
            if r["shape"][0] == 4096 or r["shape"][1] == 4096:
                out.append(dict(name=f"rank d/4 factors vs dense, {r['shape'][0]}x{r['shape'][1]}, batch 1",
                                value=r["speedup"], goal=f">= {T['rank_speedup']:g}x",
                                met=bool(r["speedup"] >= T["rank_speedup"]), text=f"{r['speedup']:.2f}x"))
    return out


def summary_rows(result: dict) -> list[dict]:
    rows = []
    sp = result.get("decode_s_per_token", {})
    t0 = sp.get("teacher")
    for label, key, part in (("student: distilled vs labels", "student", "comparison"),
                             ("SVD half params", "lowrank", "svd"), ("ASVD half params", "lowrank", "asvd"),
                             ("SVD + LoRA healed", "lowrank", "healed"),
                             ("fewer layers", "depth", "removed"), ("fewer layers, healed", "depth", "healed"),
                             ("shared layers", "share", "shared"), ("shared layers, healed", "share", "healed")):
        r = result[key][part]
        speed_key = {"lowrank": "lowrank (merged)", "depth": "fewer layers", "share": "shared layers"}.get(key)
        rows.append({"model": label, "ppl": round(r["ppl"], 2),
                     "ppl change %": round(r["ppl_delta_pct"], 1),
                     "90% interval": f"[{r['ppl_delta_pct_ci90'][0]:+.1f}, {r['ppl_delta_pct_ci90'][1]:+.1f}]",
                     "params": r.get("params", ""),
                     "decode speed-up": (round(t0 / sp[speed_key], 2) if speed_key and t0 and
                                         part in ("healed",) else "")})
    return rows


def summary_text(result: dict) -> str:
    lines = [f"teacher {result['params']['teacher']}; perplexity on {result['params']['windows']} "
             "held-out windows; intervals: 90% paired bootstrap over the windows (acceptance: over "
             "the prompts)"]
    return "\n".join(lines + target_lines(targets(result)))  # recomputed from the stored measurements


def plot(result: dict, provenance: dict):
    """Learning curves of the student (labels vs distilled) and perplexity
    change per transform, before and after healing."""
    from matplotlib.figure import Figure

    from ..measure import plots

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    a, b = fig.subplots(1, 2)
    for kind, style in (("labels", "o-"), ("distilled", "s-")):
        pts = [(t, l) for t, l in result["student"][kind]["curve"] if l is not None]
        if pts:
            a.plot([t / 1e3 for t, _ in pts], [l for _, l in pts], style, label=kind)
    a.set_xlabel("training tokens (thousands)")
    a.set_ylabel("held-out loss (nats/token)")
    a.set_title("the same student: labels vs distillation", fontsize=9)
    a.legend(fontsize=8)
    labels, before, after = [], [], []
    for key, part0 in (("lowrank", "svd"), ("depth", "removed"), ("share", "shared")):
        labels.append({"lowrank": "SVD, half\nparameters", "depth": "fewer\nlayers", "share": "shared\nlayers"}[key])
        before.append(result[key][part0]["ppl_delta_pct"])
        after.append(result[key]["healed"]["ppl_delta_pct"])
    xs = range(len(labels))
    b1 = b.bar([x - 0.2 for x in xs], before, 0.4, label="before healing", color="tab:red")
    b2 = b.bar([x + 0.2 for x in xs], after, 0.4, label="healed (distillation)", color="tab:green")
    b.bar_label(b1, [f"+{v:.0f}%" for v in before], fontsize=7)
    b.bar_label(b2, [f"+{v:.0f}%" for v in after], fontsize=7)
    b.set_xticks(list(xs), labels)
    b.set_ylabel("held-out perplexity change (%)")
    b.legend(fontsize=8)
    b.set_title("smaller models, before and after healing", fontsize=9)
    plots.stamp(fig, provenance)
    return fig

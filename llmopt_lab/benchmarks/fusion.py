"""Lesson 09 benchmark: fusion, torch.compile and CUDA graphs on a decode step.

On every device:

* each fused kernel against its reference (max error, within tolerance?);
* greedy tokens of the fused model and of the compiled step against eager
  generation (identical, or the benchmark says so);
* graph breaks of the decode and prefill steps under TorchDynamo;
* kernel launches per decode step: eager, concatenated projections only,
  fused kernels (on a CPU: the compute-op proxy of
  :mod:`llmopt_lab.measure.launches`);
* the overhead model ``launches x c_launch + bytes / bandwidth`` with both
  constants measured here, against the measured eager step.

On a GPU (size ``gpu``), bf16, a Llama-3.2-1B-shaped and a Llama-2-7B-shaped
synthetic model: decode at batch 1 eager, CUDA graph, compiled
(reduce-overhead), fused, fused + graph, each as tokens/s and as a fraction
of the measured-bandwidth roofline; batch 64 graph against eager; the fused
RMSNorm + residual against the eager op chain at hidden size 4096; our
fastest decode against transformers' ``generate``.
"""

from __future__ import annotations

import statistics
import time

import torch

from . import target_lines

from .. import measure
from ..cache import make_cache
from ..generate import generate
from ..measure.launches import (OverheadModel, count_launches, measure_copy_bandwidth,
                                measure_launch_cost, skeleton_launch_cost)
from ..step import StepBuffers, host_step, run_step, step_logits

SIZES = {
    # seconds: for tests (no torch.compile, which alone takes tens of seconds)
    "quick": dict(models=["synthetic:tiny"], dtype="float32", new_tokens=4, context=16,
                  decode_batches=[1], compile=None, graphs=False, steps=3, repeat=3,
                  norm_rows=[1, 4], hidden=64, hf_tokens=0),
    # a few minutes on a 2-core CPU: the fused kernels run in Triton's interpreter
    "cpu": dict(models=["llmopt-tiny"], dtype="float32", new_tokens=12, context=64,
                decode_batches=[1, 8], compile="default", graphs=False, steps=10, repeat=5,
                norm_rows=[1, 16], hidden=256, hf_tokens=0),
    # an H100/H200
    # compiles cost tens of seconds each on the GPU machine's CPU: torch.compile and the
    # comparison with transformers run on the 1B shape only, to fit one 10-minute call
    "gpu": dict(models=["synthetic:llama-1b", "synthetic:llama-7b"], dtype="bfloat16",
                new_tokens=32, context=512, decode_batches=[1, 64], compile="reduce-overhead",
                compile_models=["synthetic:llama-1b"], graphs=True, steps=50, repeat=5,
                norm_rows=[1, 64, 4096], hidden=4096, hf_tokens=128,
                hf_models=["synthetic:llama-1b"]),
}

TARGETS = dict(graph_1b=2.5, compiled_vs_graph=0.9, roofline_1b=0.6, roofline_7b=0.8,
               graph_b64=1.2, fused_norm=1.5, vs_hf=3.0)


def _load(name: str, device, dtype):
    from ..weights import ZOO, load_model

    if name in ZOO and not (ZOO[name] / "config.json").exists():
        name = "synthetic:tiny"  # the trained zoo is not built in this checkout
    model, _ = load_model(name, device=device, dtype=dtype)
    return name, model


# ----------------------------------------------------------------- kernels
def check_kernels(rows: int, hidden: int, device, dtype=torch.float32) -> list[dict]:
    """Each fused kernel against its reference on random inputs: max abs
    error and whether it is within the dtype's tolerance."""
    from ..kernels import fused as K
    from ..kernels import reference as R

    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    out = []
    x, res, w = rnd(rows, hidden), rnd(rows, hidden), rnd(hidden)
    a, b = K.add_rmsnorm(x, res, w, 1e-5), R.add_rmsnorm_ref(x, res, w, 1e-5)
    err = max(float((a[0] - b[0]).abs().max()), float((a[1] - b[1]).abs().max()))
    out.append(dict(kernel="add_rmsnorm", shape=[rows, hidden], max_error=err, ok=err <= tol))
    H, Hk, D = 4, 2, 32
    q, k = rnd(rows, H, D), rnd(rows, Hk, D)
    pos = torch.arange(rows, device=device)[:, None].float()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device).float() / D))
    ang = torch.cat([pos * inv, pos * inv], -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    rq, rk = R.rope_ref(q, k, cos, sin)
    q2, k2 = K.rope_(q.clone(), k.clone(), cos, sin)
    err = max(float((rq - q2).abs().max()), float((rk - k2).abs().max()))
    out.append(dict(kernel="rope_ (in place)", shape=[rows, H + Hk, D], max_error=err, ok=err <= tol))
    gu = rnd(rows, 2 * hidden)
    err = float((K.swiglu(gu) - R.swiglu_ref(*gu.chunk(2, -1))).abs().max())
    out.append(dict(kernel="swiglu", shape=[rows, 2 * hidden], max_error=err, ok=err <= tol))
    return out


def time_norm_chain(rows: int, hidden: int, device, dtype, repeat: int = 50) -> dict:
    """Fused RMSNorm + residual against the eager chain (add, then the
    reference RMSNorm's ops); seconds per call and bytes moved."""
    from ..kernels import fused as K
    from ..kernels import reference as R

    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device=device, dtype=dtype)
    eager = measure.time_fn(lambda: R.add_rmsnorm_ref(x, res, w, 1e-5), warmup=3, repeat=repeat,
                            device=device)
    fused = measure.time_fn(lambda: K.add_rmsnorm(x, res, w, 1e-5), warmup=3, repeat=repeat,
                            device=device)
    e = x.element_size()
    return dict(rows=rows, hidden=hidden, eager_s=eager.median, fused_s=fused.median,
                speedup=eager.median / fused.median,
                fused_bytes=4 * rows * hidden * e + hidden * e,  # read x, res; write sum, out
                fused_gb_s=(4 * rows * hidden * e) / fused.median / 1e9)


# ------------------------------------------------------------ decode steps
def decode_step(model, batch: int, context: int, seed: int = 0):
    """A static cache holding ``context`` random tokens per sequence and the
    decode step at position ``context`` (tensors in StepBuffers: the step can
    be replayed, compiled or graphed). Returns (kv, host, step)."""
    c, dev = model.config, model.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    kv = make_cache("static", c, batch, context + 1, device=dev, dtype=model.dtype)
    prompts = torch.randint(0, c.vocab_size, (batch, context), generator=g).tolist()
    tables = [[i] for i in range(batch)]
    run_step(model, kv, host_step(prompts, [0] * batch, tables, kv.block_size,
                                  contiguous=True).to_step(dev))
    host = host_step([[p[-1]] for p in prompts], [context] * batch, tables, kv.block_size,
                     contiguous=True)
    step = StepBuffers(batch, batch, 1, dev).fill(host)
    return kv, host, step


def time_decode(model, batch: int, context: int, how: str, steps: int, repeat: int,
                compile_mode: str | None = None) -> dict:
    """Median seconds of one decode step (``how``: eager, graph, compiled);
    the step writes the same slot every time, so it is repeatable."""
    kv, host, step = decode_step(model, batch, context)
    dev = model.device
    extra = {}
    if how == "eager":
        fn = lambda: run_step(model, kv, step)  # noqa: E731
    elif how == "graph":
        from ..graphs import GraphedDecoder

        dec = GraphedDecoder(model, kv, max_batch=batch, buckets=[batch])
        dec.run(host)
        fn = dec.replay
    elif how == "compiled":
        from ..compilation import CompiledStep

        cs = CompiledStep(model, kv, mode=compile_mode or "default")
        cs(step)
        extra["compile_s"] = cs.first_call_s
        fn = lambda: cs(step)  # noqa: E731
    else:
        raise ValueError(how)
    rounds = []
    for _ in range(repeat):
        t = measure.time_fn(fn, warmup=2, repeat=steps, device=dev)
        rounds.append(t.median)
    med = statistics.median(rounds)
    return dict(how=how, batch=batch, context=context, step_s=med, range_s=[min(rounds), max(rounds)],
                tokens_per_s=batch / med, **extra)


def same_tokens(model, other, n: int, prompts, **kw) -> bool:
    """Greedy tokens of ``other`` (a model, or the same model with generate
    options in ``kw``) equal the plain model's."""
    a = generate(model, prompts, n, ignore_eos=True)
    b = generate(other, prompts, n, ignore_eos=True, **kw)
    return bool(torch.equal(a.tokens, b.tokens))


def launches_per_step(model, batch: int, context: int) -> float:
    kv, _, step = decode_step(model, batch, context)
    return count_launches(lambda: run_step(model, kv, step), calls=2, device=model.device)


def vs_transformers(model, fast, fast_kwargs: dict, n_tokens: int, prompt_len: int = 32,
                    repeat: int = 3) -> dict:
    """Our fastest greedy decode (``fast``: ``model`` transformed, e.g. fused,
    run with ``fast_kwargs``, e.g. a CUDA graph) against transformers'
    ``generate`` on ``model``'s weights and dtype (exactly n_tokens each, EOS
    ignored)."""
    from transformers import GenerationConfig

    from ..weights import to_transformers

    dev = model.device
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=dev)
    hf = to_transformers(model)
    gcfg = GenerationConfig(max_new_tokens=n_tokens, do_sample=False, eos_token_id=None,
                            pad_token_id=0, use_cache=True)
    ours = lambda: generate(fast, ids, n_tokens, ignore_eos=True, **fast_kwargs)  # noqa: E731
    ours()
    t_ours = measure.time_fn(ours, warmup=1, repeat=repeat, device=dev)
    with torch.inference_mode():
        t_hf = measure.time_fn(lambda: hf.generate(ids, generation_config=gcfg), warmup=1,
                               repeat=repeat, device=dev)
    del hf
    return dict(n_tokens=n_tokens, ours_tokens_per_s=n_tokens / t_ours.median,
                hf_tokens_per_s=n_tokens / t_hf.median, speedup=t_hf.median / t_ours.median)


# --------------------------------------------------------------------- run
def run(size: str = "cpu", device=None, progress: bool = True) -> dict:
    """Run the lesson 09 benchmark at a named size; returns a JSON-able dict."""
    from tqdm.auto import tqdm

    from ..compilation import find_graph_breaks
    from ..kernels import mode as kernel_mode
    from ..transforms.fuse import fuse

    p = SIZES[size]
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    cuda = dev.type == "cuda"
    dtype = getattr(torch, p["dtype"])
    out = dict(benchmark="fusion", lesson="09", size=size, kernel_mode=kernel_mode(), models=[])
    bar = tqdm(total=3 + 7 * len(p["models"]), desc="lesson 09", disable=not progress, leave=False)

    bar.set_postfix_str("fused kernels vs references")
    out["kernels"] = check_kernels(4, p["hidden"], dev, dtype)
    bar.update()
    bar.set_postfix_str("fused RMSNorm + residual vs the eager chain")
    # timed only where the kernel is compiled: the interpreter's times say nothing about fusion
    out["norm_chain"] = ([time_norm_chain(r, p["hidden"], dev, dtype) for r in p["norm_rows"]]
                         if kernel_mode() == "compiled" and cuda else [])
    bar.update()
    bar.set_postfix_str("launch cost and bandwidth")
    c_launch, bw = measure_launch_cost(dev), measure_copy_bandwidth(dev, 64 * 2**20 if not cuda else 2**30)
    out["constants"] = dict(c_launch_s=c_launch, bandwidth_b_s=bw)
    bar.update()

    for name in p["models"]:
        torch.manual_seed(0)
        name, model = _load(name, dev, dtype)
        c = model.config
        entry = dict(model=name, dtype=p["dtype"], parameters=c.num_parameters(), decode=[])
        g = torch.Generator(device="cpu").manual_seed(1)
        prompts = torch.randint(0, c.vocab_size, (2, 8), generator=g).tolist()
        n = p["new_tokens"]

        bar.set_postfix_str(f"{name}: fused model tokens")
        fused_ref = fuse(model, kernels=False, copy=True)
        fused = fuse(model, kernels=True, copy=True)
        entry["tokens"] = dict(new_tokens=n, prompts=len(prompts),
                               fused_kernels=same_tokens(model, fused, n, prompts),
                               concat_only=same_tokens(model, fused_ref, n, prompts))
        bar.update()

        bar.set_postfix_str(f"{name}: graph breaks")
        kv, _, step = decode_step(model, 1, p["context"])
        gb = find_graph_breaks(step_logits, model, kv, step)
        pre = host_step([prompts[0]], [0], [[0]], kv.block_size, contiguous=True).to_step(dev)
        gb_pre = find_graph_breaks(step_logits, model, kv, pre)
        entry["graph_breaks"] = dict(decode=gb.__dict__, prefill=gb_pre.__dict__)
        bar.update()

        bar.set_postfix_str(f"{name}: compiled step tokens")
        compile_here = p["compile"] and name in p.get("compile_models", [name])
        if compile_here:
            t0 = time.perf_counter()
            entry["tokens"]["compiled"] = same_tokens(model, model, n, prompts,
                                                      compile_mode=p["compile"])
            entry["tokens"]["compile_and_generate_s"] = time.perf_counter() - t0
        bar.update()

        bar.set_postfix_str(f"{name}: launches per decode step")
        cost = measure.step_cost(c, 1, 1, p["context"], model.dtype)
        launches = {}
        for label, m in (("eager", model), ("concatenated projections", fused_ref),
                         ("fused kernels", fused)):
            lc = launches_per_step(m, 1, p["context"])
            launches[label] = dict(launches=lc.launches, source=lc.source, top=lc.top(12))
        entry["launches"] = launches
        entry["overhead_model"] = []
        bar.update()

        bar.set_postfix_str(f"{name}: decode timings")
        for b in p["decode_batches"]:
            cost_b = measure.step_cost(c, b, 1, p["context"], model.dtype)
            hows = [("eager", model, None), ("concatenated projections", fused_ref, None)]
            if cuda:
                hows += [("fused kernels", fused, None)]
            for label, m, _ in hows:
                r = time_decode(m, b, p["context"], "eager", p["steps"], p["repeat"])
                r["how"] = label
                entry["decode"].append(r)
            if p["graphs"]:
                for label, m in (("CUDA graph", model), ("fused + CUDA graph", fused)):
                    r = time_decode(m, b, p["context"], "graph", p["steps"], p["repeat"])
                    r["how"] = label
                    entry["decode"].append(r)
            if compile_here and b == 1:
                r = time_decode(model, b, p["context"], "compiled", p["steps"], p["repeat"],
                                compile_mode=p["compile"])
                r["how"] = f"torch.compile ({p['compile']})"
                entry["decode"].append(r)
            for r in entry["decode"]:
                if r["batch"] == b:
                    r["bytes"] = cost_b.bytes
                    r["roofline_fraction"] = cost_b.bytes / bw / r["step_s"]
        bar.update()

        bar.set_postfix_str(f"{name}: the overhead model")
        # c_launch per variant from its skeleton (same kernels, almost no bytes)
        variants = [("eager", None, False, "eager"),
                    ("concatenated projections", lambda m: fuse(m, kernels=False), False,
                     "concatenated projections")]
        if cuda:
            variants += [("fused kernels", lambda m: fuse(m), False, "fused kernels"),
                         ("CUDA graph", None, True, "eager"),
                         ("fused + CUDA graph", lambda m: fuse(m), True, "fused kernels")]
        om_rows = []
        for label, tf, graphed, count_key in variants:
            sk = skeleton_launch_cost(model, transform=tf, graphs=graphed, context=p["context"])
            L = launches[count_key]["launches"]
            om = OverheadModel(sk["c_launch_s"], bw)
            meas = _decode(entry, label, 1)
            om_rows.append(dict(variant=label, launches=L, bytes=cost.bytes,
                                c_launch_s=sk["c_launch_s"], skeleton_step_s=sk["step_s"],
                                predicted_serial_s=om.predict(L, cost.bytes),
                                predicted_overlapped_s=om.predict_overlapped(L, cost.bytes),
                                launch_share=om.launch_share(L, cost.bytes),
                                measured_s=meas["step_s"] if meas else None))
        entry["overhead_model"] = om_rows
        bar.update()

        if p["hf_tokens"] and name in p.get("hf_models", [name]):
            bar.set_postfix_str(f"{name}: against transformers")
            entry["vs_transformers"] = vs_transformers(model, fused, dict(cuda_graph=True), p["hf_tokens"])
        bar.update()
        out["models"].append(entry)
        del model, fused, fused_ref
        if cuda:
            torch.cuda.empty_cache()
    bar.close()
    out["targets"] = targets(out)
    return out


# ----------------------------------------------------------------- report
def _decode(entry: dict, how: str, batch: int) -> dict | None:
    return next((r for r in entry["decode"] if r["how"] == how and r["batch"] == batch), None)


def targets(result: dict) -> list[dict]:
    """Each target of the issue with its measured value and whether it was met
    (None: reported only, or not measured at this size)."""
    T, out = TARGETS, []
    ok = all(k["ok"] for k in result["kernels"])
    out.append(dict(name="fused kernels match their references", value=ok, goal="all", met=ok,
                    text=", ".join(f"{k['kernel']} {k['max_error']:.1e}" for k in result["kernels"])))
    for e in result["models"]:
        t = e["tokens"]
        for key, label in (("fused_kernels", "fused model"), ("concat_only", "concatenated projections"),
                           ("compiled", "compiled step")):
            if key in t:
                out.append(dict(name=f"{e['model']}: {label} gives the eager greedy tokens",
                                value=t[key], goal="identical", met=bool(t[key]),
                                text=f"{t['new_tokens']} tokens x {t['prompts']} prompts"))
        la = e["launches"]
        out.append(dict(name=f"{e['model']}: launches per decode step", value=la["fused kernels"]["launches"],
                        goal="fewer after fusion",
                        met=la["fused kernels"]["launches"] < la["eager"]["launches"],
                        text=f"eager {la['eager']['launches']:.0f}, concatenated "
                             f"{la['concatenated projections']['launches']:.0f}, fused "
                             f"{la['fused kernels']['launches']:.0f} ({la['eager']['source']})"))
        big = "7b" in e["model"]
        eager1, graph1 = _decode(e, "eager", 1), _decode(e, "CUDA graph", 1)
        comp1 = next((r for r in e["decode"] if r["how"].startswith("torch.compile") and r["batch"] == 1), None)
        if graph1 and not big:
            s = eager1["step_s"] / graph1["step_s"]
            out.append(dict(name=f"{e['model']}: CUDA-graph decode vs eager, batch 1", value=s,
                            goal=f">= {T['graph_1b']:g}x", met=s >= T["graph_1b"], text=f"{s:.2f}x"))
        if graph1 and comp1:
            s = graph1["step_s"] / comp1["step_s"]
            out.append(dict(name=f"{e['model']}: compiled decode vs manual graph", value=s,
                            goal=f">= {T['compiled_vs_graph']:g}x", met=s >= T["compiled_vs_graph"],
                            text=f"{s:.2f}x (compile took {comp1.get('compile_s', 0):.0f} s)"))
        if graph1:
            best = max((r for r in e["decode"] if r["batch"] == 1), key=lambda r: r["tokens_per_s"])
            goal = T["roofline_7b"] if big else T["roofline_1b"]
            f = best["roofline_fraction"]
            out.append(dict(name=f"{e['model']}: fastest decode vs the bandwidth roofline, batch 1",
                            value=f, goal=f">= {goal:.0%}", met=f >= goal,
                            text=f"{best['how']}: {best['tokens_per_s']:.0f} tok/s, {f:.0%}"))
        eager64, graph64 = _decode(e, "eager", 64), _decode(e, "CUDA graph", 64)
        if eager64 and graph64 and not big:
            s = eager64["step_s"] / graph64["step_s"]
            out.append(dict(name=f"{e['model']}: CUDA graph vs eager, batch 64", value=s,
                            goal=f">= {T['graph_b64']:g}x", met=s >= T["graph_b64"], text=f"{s:.2f}x"))
        if "vs_transformers" in e and not big:
            s = e["vs_transformers"]["speedup"]
            out.append(dict(name=f"{e['model']}: our fastest decode vs transformers' generate",
                            value=s, goal=f">= {T['vs_hf']:g}x", met=s >= T["vs_hf"],
                            text=f"{e['vs_transformers']['ours_tokens_per_s']:.0f} vs "
                                 f"{e['vs_transformers']['hf_tokens_per_s']:.0f} tok/s"))
    for r in result["norm_chain"]:
        gpu = result.get("size") == "gpu"
        goal = T["fused_norm"] if gpu and r["hidden"] == 4096 else None
        out.append(dict(name=f"fused RMSNorm + residual vs eager chain, {r['rows']} x {r['hidden']}",
                        value=r["speedup"], goal=f">= {goal:g}x" if goal else "reported",
                        met=bool(r["speedup"] >= goal) if goal else None,
                        text=f"{r['speedup']:.2f}x ({r['fused_gb_s']:.0f} GB/s fused)"))
    if not result["norm_chain"]:
        out.append(dict(name="fused RMSNorm + residual vs eager chain", value=None,
                        goal="measured on a GPU", met=None,
                        text=f"not timed: kernels run as '{result['kernel_mode']}' here"))
    return out


def summary_rows(result: dict) -> list[dict]:
    rows = []
    for e in result["models"]:
        for r in e["decode"]:
            rows.append({"model": e["model"], "decode": r["how"], "batch": r["batch"],
                         "ms/step": round(r["step_s"] * 1e3, 3),
                         "tok/s": round(r["tokens_per_s"], 1),
                         "of roofline": f"{r.get('roofline_fraction', 0):.1%}"})
    return rows


def summary_text(result: dict) -> str:
    c = result["constants"]
    lines = [f"kernels: {result['kernel_mode']}; one trivial op costs {c['c_launch_s'] * 1e6:.1f} us "
             f"from Python; copy bandwidth {c['bandwidth_b_s'] / 1e9:.1f} GB/s"]
    for e in result["models"]:
        lines.append(f"{e['model']}: the overhead model, batch 1 (c_launch measured on the model's "
                     "skeleton; bytes / copy bandwidth):")
        for om in e["overhead_model"]:
            meas = f"{om['measured_s'] * 1e3:.3f} ms measured" if om["measured_s"] else "not timed"
            lines.append(f"  {om['variant']:<26} {om['launches']:>5.0f} launches x "
                         f"{om['c_launch_s'] * 1e6:.2f} us + {om['bytes'] / 1e6:.1f} MB -> "
                         f"{om['predicted_serial_s'] * 1e3:.3f} ms serial, "
                         f"{om['predicted_overlapped_s'] * 1e3:.3f} ms overlapped; {meas}")
        gb = e["graph_breaks"]
        lines.append(f"{e['model']}: TorchDynamo: decode {gb['decode']['graphs']} graph(s), "
                     f"{gb['decode']['breaks']} break(s); prefill {gb['prefill']['graphs']} graph(s), "
                     f"{gb['prefill']['breaks']} break(s)")
    lines += target_lines(result["targets"])
    return "\n".join(lines)


def plot(result: dict, provenance: dict):
    """Launches per decode step (eager, concatenated, fused) and decode
    speed per variant and batch."""
    from matplotlib.figure import Figure

    from ..measure import plots

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    a, b = fig.subplots(1, 2)
    models = result["models"]
    labels = ["eager", "concatenated projections", "fused kernels"]
    width = 0.8 / max(1, len(models))
    for i, e in enumerate(models):
        vals = [e["launches"][k]["launches"] for k in labels]
        bars = a.bar([j + i * width for j in range(3)], vals, width, label=e["model"])
        a.bar_label(bars, [f"{v:.0f}" for v in vals], fontsize=7)
    a.set_xticks([j + width * (len(models) - 1) / 2 for j in range(3)],
                 ["eager", "QKV + gate/up\nconcatenated", "fused\nkernels"])
    a.set_ylabel("kernel launches per decode step")
    a.set_title(f"launches ({models[0]['launches']['eager']['source'] if models else ''})", fontsize=9)
    a.legend(fontsize=7)
    rows = [(f"{e['model'].replace('synthetic:', '')}\n{r['how']}, b={r['batch']}", r["tokens_per_s"])
            for e in models for r in e["decode"]]
    b.barh([r[0] for r in rows], [r[1] for r in rows], color="tab:blue")
    b.set_xlabel("decode tokens/s")
    b.tick_params(axis="y", labelsize=6)
    b.invert_yaxis()
    b.set_title("decode speed per variant", fontsize=9)
    plots.stamp(fig, provenance)
    return fig

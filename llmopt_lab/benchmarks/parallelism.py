"""Lesson 11 benchmark: tensor, pipeline and data parallelism, and offloading.

On every device (the parallel runs are 2 CPU processes over gloo, started
with torchrun by :func:`llmopt_lab.parallel.launch`; one thread each):

* TP=2 generation against one process: same greedy tokens, logits within
  tolerance (fp32 and int8 weights), time split into compute and
  communication, and the time of the same work in one process;
* PP=2: same tokens, and the bubble of a prefill-only run measured for 1, 2,
  4 and 8 micro-batches next to (p - 1) / (m + p - 1), with each stage's
  time in send/recv (waiting included);
* DP=2: same tokens as one engine, requests per replica;
* gloo all-reduce times by size, fitted to latency + bytes / bandwidth, and
  the TP speed-up that the fit and this device's measured shard GEMMs
  predict, next to the measured one;
* the offloading cost model for a Llama-2-7B layer (copy vs compute per
  layer at a stated PCIe bandwidth and FLOP rate).

On a GPU (size ``gpu``): the pinned host-to-device bandwidth; a
Llama-2-7B-shaped model (8 layers; bf16) offloaded, decode (1 token) and an
8k-token prefill with synchronous copies and with prefetching on a side
stream, as a fraction of that bandwidth; and the TP speed-up predicted for
Llama-2-7B at batch 1 from bf16 shard GEMMs measured on this GPU plus an
NVLink all-reduce model (assumed constants, stated), set beside gpt-fast's
published A100 figures. One GPU cannot measure multi-GPU scaling: the
benchmark says so.
"""

from __future__ import annotations

import torch

from . import target_lines

SIZES = {
    "quick": dict(tp_tokens=3, tp_quant=[], prompts=2, pp_prompt_len=16, pp_prompts=4,
                  micro_batches=[1, 2], allreduce_sizes=[256, 262144], dp_tokens=3, repeats=1,
                  predict_tokens=4, gpu=False),
    "cpu": dict(tp_tokens=16, tp_quant=["int8"], prompts=4, pp_prompt_len=96, pp_prompts=8,
                micro_batches=[1, 2, 4, 8], allreduce_sizes=[256, 4096, 65536, 262144, 1048576],
                dp_tokens=16, repeats=3, predict_tokens=4, gpu=False),
    "gpu": dict(tp_tokens=16, tp_quant=["int8"], prompts=4, pp_prompt_len=96, pp_prompts=8,
                micro_batches=[1, 2, 4, 8], allreduce_sizes=[256, 4096, 65536, 262144, 1048576],
                dp_tokens=16, repeats=3, predict_tokens=4, gpu=True, offload_layers=8,
                prefill_tokens=8192, tp_worlds=[2, 4, 8]),
}

TARGETS = dict(offload_bandwidth=0.8, prefetch_speedup=1.6)

#: assumptions stated wherever they are used (not measured here)
PCIE5_BYTES_PER_S = 50e9  # PCIe 5.0 x16, what a host-to-device copy reaches in practice (~50 GB/s)
H200_BF16_FLOPS = 989e12  # H200 dense bf16 peak (datasheet)
NVLINK_ALLREDUCE = dict(latency_s=10e-6, bytes_per_s=360e9,
                        source="assumed: NCCL ring all-reduce on NVLink 4, ~10 us + bus bandwidth 360 GB/s")
#: published: gpt-fast (pytorch-labs) README, Llama-2-7B decode at batch 1 on A100-80GB GPUs,
#: tokens/s under tensor parallelism divided by one GPU's
PUBLISHED_TP = {"source": "gpt-fast README: Llama-2-7B, A100-80GB, tensor parallel",
                "speedup": {"2": 1.61, "8": 3.13}}


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=g).tolist()


def run(size: str = "cpu", device=None, progress: bool = True) -> dict:
    """Run the lesson 11 benchmark at a named size; returns a JSON-able dict."""
    from tqdm.auto import tqdm

    from ..config import preset
    from ..errors import ParallelError
    from ..parallel import launch
    from ..parallel.offload import offload_cost
    from ..parallel.scaling import AllReduceModel, predict_tp_step
    from ..weights import load_model

    p = SIZES[size]
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    out = dict(benchmark="parallelism", lesson="11", size=size, processes=2, backend="gloo",
               threads_per_process=1)
    steps = 6 + (3 if p["gpu"] and dev.type == "cuda" else 0)
    bar = tqdm(total=steps, desc="lesson 11", disable=not progress, leave=False)
    tiny, _ = load_model("llmopt-tiny", device="cpu")
    prompts = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def",
               "for i in range(10):"][:p["prompts"]]

    bar.set_postfix_str("tensor parallel, 2 processes")
    tp = []
    for quant in ["none", *p["tp_quant"]]:
        res = launch("tp", 2, prompts=prompts, max_new_tokens=p["tp_tokens"], quant=quant,
                     repeats=p["repeats"])
        r0 = res[0]
        tp.append({"quant": quant, "same_tokens": all(r["same_tokens"] for r in res),
                   "max_logit_diff": max(r["max_logit_diff"] for r in res),
                   "seconds": max(r["seconds"] for r in res),
                   "comm_seconds": max(r["comm_seconds"] for r in res),
                   "compute_seconds": r0["compute_seconds"], "comm_calls": r0["comm_calls"],
                   "comm_bytes": r0["comm"]["total_bytes"],
                   "reference_seconds": r0["reference_seconds"],
                   "generated_tokens": r0["generated_tokens"],
                   "kv_bytes_per_token": r0["kv_bytes_per_token"],
                   "kv_bytes_per_token_whole": r0["kv_bytes_per_token_whole"]})
    out["tp"] = tp
    bar.update()

    bar.set_postfix_str("pipeline parallel: the bubble")
    pp_prompts = _prompts(p["pp_prompts"], p["pp_prompt_len"], tiny.config.vocab_size)
    res = launch("pp", 2, prompts=pp_prompts, max_new_tokens=1, micro_batches=p["micro_batches"],
                 repeats=p["repeats"])
    gen = launch("pp", 2, prompts=prompts, max_new_tokens=p["tp_tokens"], micro_batches=[1, 2],
                 repeats=1)
    out["pp"] = {"layers": [r["layers"] for r in res],
                 "same_tokens": all(run["same_tokens"] for r in res + gen for run in r["runs"].values()),
                 "prompt_len": p["pp_prompt_len"], "prompts": p["pp_prompts"],
                 "bubble": [{"micro_batches": int(m), "formula": res[0]["runs"][m]["formula"],
                             "measured": [r["runs"][m]["bubble"] for r in res],
                             "wall_s": res[0]["runs"][m]["wall_s"],
                             "compute_s": [r["runs"][m]["compute_s"] for r in res],
                             "comm_s": [r["runs"][m]["comm_seconds"] for r in res]}
                            for m in res[0]["runs"]]}
    bar.update()

    bar.set_postfix_str("data parallel")
    dp_prompts = _prompts(8, 12, tiny.config.vocab_size, seed=1)
    res = launch("dp", 2, prompts=dp_prompts, max_new_tokens=p["dp_tokens"])
    out["dp"] = {"same_tokens": all(r["same_tokens"] for r in res), "served": res[0]["served"],
                 "seconds": res[0]["seconds"]}
    bar.update()

    bar.set_postfix_str("all-reduce over gloo")
    res = launch("allreduce", 2, sizes=p["allreduce_sizes"], repeats=10)
    sizes = [int(n) for n in res[0]["seconds"]]
    secs = [max(r["seconds"][str(n)] for r in res) for n in sizes]
    try:
        fit = AllReduceModel.fit([4 * n for n in sizes], secs, 2, source="fitted to gloo, 2 processes")
        fitted = {"latency_s": fit.latency_s, "bytes_per_s": fit.bytes_per_s}
    except ParallelError as e:  # a busy machine: times that do not grow with size
        fit = AllReduceModel(min(secs), 1e30, source="latency only")
        fitted = {"latency_s": fit.latency_s, "bytes_per_s": None, "note": f"no fit: {e}"}
    out["allreduce"] = {"elements": sizes, "bytes": [4 * n for n in sizes], "seconds": secs,
                        "fit": fitted}
    bar.update()

    bar.set_postfix_str("TP speed-up predicted vs measured (CPU)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker process: one thread
    try:
        pred = predict_tp_step(tiny.config, [2], p["predict_tokens"], fit, device="cpu",
                               repeats=10 * p["repeats"])
    finally:
        torch.set_num_threads(threads)
    meas = tp[0]["reference_seconds"] / tp[0]["seconds"]
    out["tp_prediction_cpu"] = {"model": "llmopt-tiny", "tokens_per_step": p["predict_tokens"],
                                "predicted": pred, "measured_speedup": meas,
                                "note": "the prediction counts the decoder GEMMs and two modelled "
                                        "all-reduces per layer; the measurement is whole generation"}
    bar.update()

    bar.set_postfix_str("offloading: the cost model")
    cfg7 = preset("llama-7b")
    layer_params = (cfg7.num_parameters(include_embeddings=False) - cfg7.hidden_size) // cfg7.num_layers
    out["offload_model"] = {
        "model": "Llama-2-7B layer", "layer_params": layer_params, "bytes_per_param": 2,
        "h2d_bytes_per_s": PCIE5_BYTES_PER_S, "flops_per_s": H200_BF16_FLOPS,
        "assumed": "PCIe 5 x16 at 50 GB/s; H200 dense bf16 peak 989 TFLOP/s",
        "rows": [dict(tokens=t, **offload_cost(layer_params, 2, t, PCIE5_BYTES_PER_S,
                                               H200_BF16_FLOPS, cfg7.num_layers))
                 for t in (1, 64, 1024, 8192, 16384, 65536)]}
    bar.update()

    if p["gpu"] and dev.type == "cuda":
        out["gpu"] = _gpu_parts(p, dev, bar)
    out["targets"] = targets(out)
    bar.close()
    return out


def _gpu_parts(p: dict, dev, bar) -> dict:
    from ..config import preset
    from ..model import Transformer
    from ..parallel import offload
    from ..parallel.offload import measure_h2d_bandwidth, time_offloaded_forward
    from ..parallel.scaling import AllReduceModel, predict_tp_step

    g = {"device": torch.cuda.get_device_name(dev)}
    bar.set_postfix_str("pinned host-to-device bandwidth")
    bw = measure_h2d_bandwidth(dev)
    g["h2d_bytes_per_s"] = bw
    bar.update()
    bar.set_postfix_str("offloaded 7B-shaped layers: decode and 8k prefill")
    cfg = preset("llama-7b").replace(num_layers=p["offload_layers"])
    rows = []
    for prefetch in (False, True):
        model = Transformer.from_config(cfg, device="cpu", dtype=torch.bfloat16)
        offload(model, dev, prefetch=prefetch)
        for tokens in (1, p["prefill_tokens"]):
            r = time_offloaded_forward(model, tokens)
            r.update(prefetch=prefetch, bandwidth_fraction=r["bytes"] / r["seconds"] / bw)
            rows.append(r)
        del model
        torch.cuda.empty_cache()
    g["offload"] = {"model": f"Llama-2-7B shape, {cfg.num_layers} layers, bf16", "rows": rows}
    bar.update()
    bar.set_postfix_str("TP speed-up predicted from shard GEMMs + NVLink model")
    nv = AllReduceModel(NVLINK_ALLREDUCE["latency_s"], NVLINK_ALLREDUCE["bytes_per_s"],
                        NVLINK_ALLREDUCE["source"])
    g["tp_prediction"] = {"model": "Llama-2-7B, batch 1 decode, bf16", "allreduce": NVLINK_ALLREDUCE,
                          "predicted": predict_tp_step(preset("llama-7b"), p["tp_worlds"], 1, nv,
                                                       device=dev, dtype=torch.bfloat16),
                          "published": PUBLISHED_TP,
                          "note": "one GPU: shard GEMMs measured here, all-reduces modelled; real "
                                  "multi-GPU scaling needs several GPUs"}
    bar.update()
    return g


def targets(result: dict) -> list[dict]:
    """Each target of the issue with its measured value and whether it was met
    (None: reported only, or not measured at this size)."""
    out = []
    for t in result["tp"]:
        ok = t["same_tokens"] and t["max_logit_diff"] < 1e-4
        out.append(dict(name=f"TP=2 ({t['quant']}) matches one process", value=ok,
                        goal="same greedy tokens, |logit diff| < 1e-4", met=ok,
                        text=f"same tokens: {t['same_tokens']}, max |diff| {t['max_logit_diff']:.1e}"))
    pp = result["pp"]
    out.append(dict(name="PP=2 matches one process", value=pp["same_tokens"], goal="same greedy tokens",
                    met=pp["same_tokens"], text=f"micro-batches 1 and {pp['bubble'][-1]['micro_batches']}"))
    out.append(dict(name="bubble measured for each number of micro-batches", value=None,
                    goal="reported beside (p-1)/(m+p-1)", met=None,
                    text=", ".join(f"m={b['micro_batches']}: {max(b['measured']):.2f} "
                                   f"(formula {b['formula']:.2f})" for b in pp["bubble"])))
    out.append(dict(name="DP=2 matches one engine", value=result["dp"]["same_tokens"],
                    goal="same tokens", met=result["dp"]["same_tokens"],
                    text=f"requests per replica {result['dp']['served']}"))
    g = result.get("gpu")
    if g is None:
        out.append(dict(name="offloaded decode and 8k prefill vs pinned bandwidth", value=None,
                        goal=f">= {TARGETS['offload_bandwidth']:.0%}", met=None,
                        text="measured on a GPU (size gpu)"))
        out.append(dict(name="prefetching vs synchronous copies", value=None,
                        goal=f">= {TARGETS['prefetch_speedup']:g}x", met=None,
                        text="measured on a GPU (size gpu)"))
        return out
    rows = g["offload"]["rows"]
    for tokens in sorted({r["tokens"] for r in rows}):
        pre = next(r for r in rows if r["tokens"] == tokens and r["prefetch"])
        syn = next(r for r in rows if r["tokens"] == tokens and not r["prefetch"])
        f = pre["bandwidth_fraction"]
        out.append(dict(name=f"offloaded forward of {tokens} token(s), prefetching, vs pinned "
                             f"bandwidth", value=f, goal=f">= {TARGETS['offload_bandwidth']:.0%}",
                        met=f >= TARGETS["offload_bandwidth"], text=f"{f:.0%}"))
        s = syn["seconds"] / pre["seconds"]
        out.append(dict(name=f"prefetching vs synchronous copies, {tokens} token(s)", value=s,
                        goal=f">= {TARGETS['prefetch_speedup']:g}x" if tokens > 1 else "reported",
                        met=(s >= TARGETS["prefetch_speedup"]) if tokens > 1 else None,
                        text=f"{s:.2f}x"))
    return out


def summary_rows(result: dict) -> list[dict]:
    rows = []
    for t in result["tp"]:
        rows.append({"mode": f"TP=2 {t['quant']}", "same tokens": t["same_tokens"],
                     "s": round(t["seconds"], 3), "comm s": round(t["comm_seconds"], 3),
                     "1 process s": round(t["reference_seconds"], 3)})
    for b in result["pp"]["bubble"]:
        rows.append({"mode": f"PP=2, {b['micro_batches']} micro-batches",
                     "same tokens": result["pp"]["same_tokens"], "s": round(b["wall_s"], 3),
                     "comm s": round(max(b.get("comm_s", [0.0])), 3),
                     "bubble": round(max(b["measured"]), 3), "formula": round(b["formula"], 3)})
    return rows


def summary_text(result: dict) -> str:
    a = result["allreduce"]
    bw = a["fit"]["bytes_per_s"]
    lines = [f"gloo all-reduce (2 processes): latency {a['fit']['latency_s'] * 1e6:.0f} us, "
             + (f"bandwidth {bw / 1e9:.2f} GB/s (fitted)" if bw else a["fit"].get("note", "no fit"))]
    pr = result["tp_prediction_cpu"]
    two = next(x for x in pr["predicted"] if x["world"] == 2)
    lines.append(f"TP=2 on llmopt-tiny: predicted {two['speedup']:.2f}x (GEMMs + modelled "
                 f"all-reduces), measured {pr['measured_speedup']:.2f}x")
    om = result["offload_model"]
    be = om["rows"][0]["break_even_tokens"]
    lines.append(f"offloading a 7B layer ({om['assumed']}): copies hide behind compute from "
                 f"{be:,.0f} tokens per step")
    g = result.get("gpu")
    if g:
        lines.append(f"{g['device']}: pinned host-to-device {g['h2d_bytes_per_s'] / 1e9:.1f} GB/s")
        for r in g["offload"]["rows"]:
            lines.append(f"  offloaded forward, {r['tokens']} tokens, "
                         f"{'prefetch' if r['prefetch'] else 'synchronous'}: {r['seconds'] * 1e3:.1f} ms, "
                         f"{r['bandwidth_fraction']:.0%} of bandwidth")
        for x in g["tp_prediction"]["predicted"]:
            lines.append(f"  TP={x['world']} predicted {x['speedup']:.2f}x (Llama-2-7B batch 1)")
    lines += target_lines(result["targets"])
    return "\n".join(lines)


def plot(result: dict, provenance: dict):
    """The bubble against micro-batches (measured, formula) and the time of
    TP=2 split into compute and communication."""
    from matplotlib.figure import Figure

    from ..measure import plots

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    a, b = fig.subplots(1, 2)
    bub = result["pp"]["bubble"]
    ms = [x["micro_batches"] for x in bub]
    a.plot(ms, [x["formula"] for x in bub], "k--", label="(p-1)/(m+p-1)")
    for s in range(len(bub[0]["measured"])):
        a.plot(ms, [x["measured"][s] for x in bub], "o-", label=f"measured, stage {s}")
    a.set_xscale("log", base=2)
    a.set_xlabel("micro-batches m")
    a.set_ylabel("idle share of the stage")
    a.set_title("pipeline bubble, 2 stages (prefill)")
    a.legend(fontsize=8)
    labels = [f"TP=2 {t['quant']}" for t in result["tp"]] + ["1 process (none)"]
    comp = [t["seconds"] - t["comm_seconds"] for t in result["tp"]] + [result["tp"][0]["reference_seconds"]]
    comm = [t["comm_seconds"] for t in result["tp"]] + [0.0]
    b.bar(labels, comp, label="compute")
    b.bar(labels, comm, bottom=comp, label="communication (gloo)")
    b.set_ylabel("seconds per generation")
    b.set_title("tensor parallel generation, llmopt-tiny")
    b.legend(fontsize=8)
    plots.stamp(fig, provenance)
    return fig

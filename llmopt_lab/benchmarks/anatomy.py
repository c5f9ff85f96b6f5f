"""Lesson 01 benchmark: prefill and decode throughput against the roofline.

For each measured step we report tokens/s, the step's FLOPs and bytes
(:func:`llmopt_lab.measure.step_cost`), its arithmetic intensity, the
roofline-bound time on this device and the fraction of it we reach. Decode
runs on the static KV cache, one real token per sequence per step. Our decode
stands next to Hugging Face transformers' ``generate`` on the same weights,
both with a cache, both producing exactly N tokens.
"""

from __future__ import annotations

import torch

from .. import measure
from ..generate import decode_one_token, generate, prefill
from ..cache import StaticCache
from ..weights import ZOO, load_model, to_transformers

SIZES = {
    # seconds, for tests
    "quick": dict(models=["synthetic:tiny"], dtype="float32", prefill=[(1, 32)], decode=[(1, 32), (4, 32)],
                  steps=4, repeat=2, hf_tokens=8, profile=False),
    # tens of seconds on a 2-core CPU
    "cpu": dict(models=["llmopt-tiny"], dtype="float32",
                prefill=[(1, 64), (1, 256), (4, 256)], decode=[(1, 256), (4, 256), (16, 256)],
                steps=16, repeat=5, hf_tokens=64, profile=True),
    # an H100/H200: a Llama-3.2-1B-shaped and a Llama-2-7B-shaped model, random bf16 weights
    "gpu": dict(models=["synthetic:llama-1b", "synthetic:llama-7b"], dtype="bfloat16",
                prefill=[(1, 512), (1, 2048), (8, 2048)],
                decode=[(1, 1024), (8, 1024), (32, 1024), (128, 1024)],
                steps=32, repeat=10, hf_tokens=128, profile=True),
}


def _load(name: str, device, dtype):
    if name in ZOO and not (ZOO[name] / "config.json").exists():
        name = "synthetic:tiny"  # the trained zoo is not built in this checkout
    model, _ = load_model(name, device=device, dtype=dtype)
    return name, model


def measure_prefill(model, batch: int, prompt_len: int, limits, repeat: int = 5) -> dict:
    """Time the prefill of ``batch`` prompts of ``prompt_len`` tokens (into a
    static cache); place it on the roofline. Times in seconds."""
    c, dev = model.config, model.device
    ids = torch.randint(0, c.vocab_size, (batch, prompt_len), device=dev)
    lengths = torch.full((batch,), prompt_len, device=dev)
    cache = StaticCache(c, batch, prompt_len, device=dev, dtype=model.dtype)

    def step():
        cache.reset()
        prefill(model, ids, lengths, cache)

    t = measure.time_fn(step, warmup=1, repeat=repeat, device=dev)
    cost = measure.step_cost(c, batch, prompt_len, 0, model.dtype)
    bound = measure.roofline_time(cost, limits, model.dtype)
    return dict(phase="prefill", batch=batch, tokens=prompt_len, context=0, time_s=t.median,
                spread=t.spread, tokens_per_s=batch * prompt_len / t.median, flops=cost.flops,
                bytes=cost.bytes, intensity=cost.intensity, bound_s=bound,
                fraction=measure.achieved_fraction(bound, t.median),
                flops_per_s=cost.flops / t.median)


def measure_decode(model, batch: int, context: int, limits, steps: int = 16,
                   warmup: int = 2) -> dict:
    """Time single-token decode steps of ``batch`` sequences after ``context``
    tokens, with the static cache; place the median step on the roofline."""
    c, dev = model.config, model.device
    cache = StaticCache(c, batch, context + warmup + steps + 1, device=dev, dtype=model.dtype)
    prefill(model, torch.randint(0, c.vocab_size, (batch, context), device=dev),
            torch.full((batch,), context, device=dev), cache)
    tok = torch.randint(0, c.vocab_size, (batch,), device=dev)
    state = {"pos": torch.full((batch,), context, device=dev)}

    def step():
        decode_one_token(model, tok, state["pos"], cache)
        state["pos"] = state["pos"] + 1

    t = measure.time_fn(step, warmup=warmup, repeat=steps, device=dev)
    mid = context + warmup + steps // 2
    cost = measure.step_cost(c, batch, 1, mid, model.dtype)
    bound = measure.roofline_time(cost, limits, model.dtype)
    return dict(phase="decode", batch=batch, tokens=1, context=mid, time_s=t.median,
                spread=t.spread, tokens_per_s=batch / t.median, flops=cost.flops, bytes=cost.bytes,
                intensity=cost.intensity, bound_s=bound,
                fraction=measure.achieved_fraction(bound, t.median),
                flops_per_s=cost.flops / t.median)


def compare_with_transformers(model, n_tokens: int, prompt_len: int = 32, repeat: int = 3) -> dict:
    """Batch-1 greedy generation of exactly ``n_tokens`` tokens (EOS ignored):
    ours (static cache) against transformers' ``generate`` (its default
    dynamic cache) on the same weights, measured in one run."""
    from transformers import GenerationConfig

    dev = model.device
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=dev)
    hf = to_transformers(model)
    gcfg = GenerationConfig(max_new_tokens=n_tokens, do_sample=False, eos_token_id=None,
                            pad_token_id=0, use_cache=True)
    ours_out = generate(model, ids, n_tokens, ignore_eos=True)
    with torch.inference_mode():
        hf_out = hf.generate(ids, generation_config=gcfg)[:, prompt_len:]
    if ours_out.tokens.shape[1] != n_tokens or hf_out.shape[1] != n_tokens:
        raise RuntimeError("a generator did not produce exactly the requested tokens")
    t_ours = measure.time_fn(lambda: generate(model, ids, n_tokens, ignore_eos=True),
                           warmup=1, repeat=repeat, device=dev)
    with torch.inference_mode():
        t_hf = measure.time_fn(lambda: hf.generate(ids, generation_config=gcfg), warmup=1,
                             repeat=repeat, device=dev)
    return dict(n_tokens=n_tokens, prompt_len=prompt_len,
                ours_tokens_per_s=n_tokens / t_ours.median, hf_tokens_per_s=n_tokens / t_hf.median,
                ours_time_s=t_ours.median, hf_time_s=t_hf.median,
                same_tokens=bool((ours_out.tokens.cpu() == hf_out.cpu()).all()))


def run(size: str = "cpu", device=None, progress: bool = True) -> dict:
    """Run the lesson 01 benchmark at a named size; returns a JSON-able dict."""
    from tqdm.auto import tqdm

    p = SIZES[size]
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    limits = measure.device_limits(dev)
    out = dict(benchmark="anatomy", lesson="01", size=size, limits=limits.to_dict(), models=[])
    work = len(p["models"]) * (len(p["prefill"]) + len(p["decode"]) + 1 + int(p["profile"]))
    bar = tqdm(total=work, desc="lesson 01", disable=not progress, leave=False)
    for name in p["models"]:
        torch.manual_seed(0)
        name, model = _load(name, dev, p["dtype"])
        entry = dict(model=name, dtype=str(model.dtype).replace("torch.", ""),
                     parameters=model.config.num_parameters(), rows=[])
        for batch, length in p["prefill"]:
            bar.set_postfix_str(f"{name} prefill b={batch} T={length}")
            entry["rows"].append(measure_prefill(model, batch, length, limits, p["repeat"]))
            bar.update()
        for batch, context in p["decode"]:
            bar.set_postfix_str(f"{name} decode b={batch} ctx={context}")
            entry["rows"].append(measure_decode(model, batch, context, limits, p["steps"]))
            bar.update()
        bar.set_postfix_str(f"{name} vs transformers")
        entry["transformers"] = compare_with_transformers(model, p["hf_tokens"], repeat=p["repeat"] // 2 + 1)
        bar.update()
        if p["profile"]:
            entry["profile"] = _profile_decode(model)
            bar.update()
        out["models"].append(entry)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return out


def _profile_decode(model, context: int = 128) -> dict:
    c, dev = model.config, model.device
    cache = StaticCache(c, 1, context + 32, device=dev, dtype=model.dtype)
    prefill(model, torch.randint(0, c.vocab_size, (1, context), device=dev),
            torch.tensor([context], device=dev), cache)
    tok = torch.zeros(1, dtype=torch.long, device=dev)
    pos = torch.tensor([context], device=dev)
    prof = measure.profile_step(lambda: decode_one_token(model, tok, pos, cache), steps=5, device=dev)
    d = prof.to_dict()
    d["summary"] = prof.summary()
    return d


def summary_rows(result: dict) -> list[dict]:
    rows = []
    for m in result["models"]:
        for r in m["rows"]:
            rows.append({"model": m["model"], "phase": r["phase"], "batch": r["batch"],
                         "tokens/context": r["tokens"] if r["phase"] == "prefill" else r["context"],
                         "tokens/s": r["tokens_per_s"], "roofline %": 100 * r["fraction"]})
        t = m["transformers"]
        rows.append({"model": m["model"], "phase": "generate (ours)", "batch": 1,
                     "tokens/context": t["n_tokens"], "tokens/s": t["ours_tokens_per_s"],
                     "roofline %": None})
        rows.append({"model": m["model"], "phase": "generate (HF)", "batch": 1,
                     "tokens/context": t["n_tokens"], "tokens/s": t["hf_tokens_per_s"],
                     "roofline %": None})
    return rows


def plot(result: dict, provenance: dict):
    """The device's roofline with every measured step as a point."""
    from ..measure import plots

    limits = measure.DeviceLimits(**result["limits"])
    dtype = result["models"][0]["dtype"]
    points = []
    for m in result["models"]:
        short = m["model"].replace("synthetic:", "")
        for r in m["rows"]:
            label = f"{short} {r['phase']} b={r['batch']}" + (
                f" T={r['tokens']}" if r["phase"] == "prefill" else "")
            points.append((label, r["intensity"], r["flops_per_s"]))
    return plots.roofline(limits, points, dtypes=[measure.dtype_key(dtype)], provenance=provenance)

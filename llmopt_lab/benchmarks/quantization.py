"""Lesson 03 benchmark: quantized kernels, quantized models, and what they cost in quality.

(a) Kernels (a GPU only): y = x @ W.T at batch 1 (GEMV, decode) and batch 16
    for the Llama-3-8B MLP shapes (in x out: 4096x4096, 4096x14336,
    14336x4096): bf16 ``torch.matmul`` against our int8 and int4 (group 128)
    Triton kernels, W8A8, and fp8 ``torch._scaled_mm`` where the GPU has it.
    Reported as weight bytes moved per second (GB/s), the fraction of the
    device's memory bandwidth, and the speed-up over bf16. The weights are
    rotated through copies larger than the L2 cache
    (:class:`llmopt_lab.measure.OperandRotation`), so every run reads them from
    memory. On a GPU a small sweep of GEMV launch configurations (block_n,
    split_k) is recorded beside the defaults.
(b) Models: decode tokens/s (static KV cache; eager, and replayed as a CUDA
    graph on a GPU) and memory for bf16, int8, int4 and W8A8 (and fp8 where
    real) on Llama-2-7B- and Llama-3.2-1B-shaped models with random weights.
    GPTQ and AWQ produce the int4 format and run on the same kernel: their
    speed is int4's. The lm_head stays in bf16.
(c) Quality of every method on llmopt-tiny (synthetic:tiny with a note when
    the zoo model is missing): held-out perplexity, KL to the float model,
    top-1 agreement, bytes; GPTQ's and AWQ's share of RTN's perplexity
    increase that they recover. Calibration: windows of the training split.

Targets (checked on a GPU): int4 GEMV at batch 1 >= 3.0x bf16 and int8 >= 1.8x
on the 14336-sized shapes; on llmopt-tiny, int8 perplexity within 1% of
float32 and GPTQ and AWQ (group 128) each recovering >= half of RTN's
perplexity increase.
"""

from __future__ import annotations

import math

import torch

from .. import measure
from ..weights import ZOO, load_model

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K in, N out)

#: part (d), below four bits on llmopt-tiny: RTN, GPTQ and QAT at each bit width (groups of 64,
#: the same bytes), and mixed precision against uniform bits at the same bytes
LOWBIT = dict(bits=[4, 3, 2], group_size=64, qat_bits=[2], qat_steps=150, qat_lr=2e-4,
              qat_sequences=512, qat_len=257, scan_formats=[(8, None), (4, 64), (3, 64), (2, 64)],
              scan_sequences=8, scan_len=256, mixed_budgets=[(3, 64), (4, 64)])
LOWBIT_QUICK = dict(LOWBIT, bits=[3], qat_bits=[3], qat_steps=4, qat_sequences=8, qat_len=33,
                    scan_formats=[(8, None), (3, 64)], scan_sequences=2, scan_len=32,
                    mixed_budgets=[(3, 64)])

SIZES = {
    # seconds on a CPU, for tests
    "quick": dict(kernel_shapes=[(256, 384)], kernel_rows=[1, 16], sweep=False,
                  models=["synthetic:tiny"], model_dtype="float32", formats=["float", "int8", "int4", "w8a8"],
                  decode_batches=[1], context=32, steps=3,
                  quality_model="synthetic:tiny", eval_windows=4, eval_window=64,
                  calib_sequences=4, calib_len=64, quality_methods=None),
    # a few minutes on a 2-core CPU (quality: the quick held-out set, ~30k tokens)
    "cpu": dict(kernel_shapes=[], kernel_rows=[1, 16], sweep=False,
                models=["llmopt-tiny"], model_dtype="float32", formats=["float", "int8", "int4", "w8a8"],
                decode_batches=[1, 8], context=128, steps=8,
                quality_model="llmopt-tiny", eval_windows=None, eval_window=None,
                calib_sequences=64, calib_len=256, quality_methods=None),
    # an H100/H200
    "gpu": dict(kernel_shapes=SHAPES, kernel_rows=[1, 16], sweep=True,
                models=["synthetic:llama-1b", "synthetic:llama-7b"], model_dtype="bfloat16",
                formats=["float", "int8", "int4", "w8a8", "fp8"],
                decode_batches=[1, 16], context=512, steps=32,
                quality_model="llmopt-tiny", eval_windows=None, eval_window=None,
                calib_sequences=128, calib_len=256, quality_methods=None),
    # (c) only, on a real pretrained model with natural activation outliers (SmolLM2-135M-Instruct,
    # fetched once): tens of minutes on a 2-core CPU (GPTQ and AWQ calibrate 30 layers)
    "real": dict(kernel_shapes=[], kernel_rows=[], sweep=False, models=[], model_dtype="float32",
                 formats=[], decode_batches=[], context=0, steps=0,
                 quality_model="smollm2-135m", eval_windows=48, eval_window=256,
                 calib_sequences=32, calib_len=256, quality_methods="real", planted=False),
    # (d) only: below four bits on llmopt-tiny (QAT fine-tunes: ~10 minutes on a 2-core CPU)
    "lowbit": dict(lowbit=LOWBIT, quality_model="llmopt-tiny", eval_windows=None, eval_window=None,
                   calib_sequences=64, calib_len=256),
    # (d) in seconds, for tests
    "lowbit-quick": dict(lowbit=LOWBIT_QUICK, quality_model="synthetic:tiny", eval_windows=4,
                         eval_window=64, calib_sequences=4, calib_len=64),
}

#: part (c) on SmolLM2-135M (hidden 576: int4 groups of 64, not 128, divide its layers)
REAL_METHODS = [
    ("int8", "int8", {}),
    ("int4 RTN g64", "int4", dict(group_size=64)),
    ("int4 GPTQ g64", "gptq", dict(group_size=64)),
    ("int4 AWQ g64", "awq", dict(group_size=64)),
    ("W8A8 naive", "w8a8", {}),
    ("W8A8 SmoothQuant", "smoothquant", dict(alpha=0.5)),
]
#: the real model's targets: share of RTN's perplexity increase recovered, and the lowest
#: acceptable lower bound of its 90% interval
REAL_TARGETS = {"int4 AWQ g64": (0.5, 0.25), "int4 GPTQ g64": (0.4, 0.25)}

#: (label, method, options) of part (c), in the order of the table
QUALITY_METHODS = [
    ("int8", "int8", {}),
    ("int4 RTN g128", "int4", dict(group_size=128)),
    ("int4 GPTQ g128", "gptq", dict(group_size=128)),
    ("int4 AWQ g128", "awq", dict(group_size=128)),
    ("int4 RTN g64", "int4", dict(group_size=64)),
    ("int4 GPTQ g64 act-order", "gptq", dict(group_size=64, act_order=True)),
    ("W8A8 naive", "w8a8", {}),
    ("W8A8 SmoothQuant", "smoothquant", dict(alpha=0.5)),
    ("fp8 e4m3", "fp8", {}),
]


#: part (c) again on the model with planted activation outliers
PLANTED = dict(num_channels=4, factor=30.0)
PLANTED_METHODS = [
    ("int4 RTN g128", "int4", dict(group_size=128)),
    ("int4 GPTQ g128", "gptq", dict(group_size=128)),
    ("int4 AWQ g128", "awq", dict(group_size=128)),
    ("W8A8 naive", "w8a8", {}),
    ("W8A8 SmoothQuant", "smoothquant", dict(alpha=0.5)),
]


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))


# ==================================================================== (a) kernels
def _weight_bytes(kind: str, N: int, K: int, group: int = 128) -> int:
    if kind == "bf16":
        return 2 * N * K
    if kind in ("int8", "w8a8"):
        return N * K + 4 * N
    if kind == "fp8":
        return N * K + 4
    return N * K // 2 + (N * K // group) * 5  # packed codes + float32 scale + uint8 zero


def _kernel_fns(kind: str, W: torch.Tensor, group: int, config: dict | None = None):
    """(operands, fn(operands, x)) for one implementation; W (N, K) bf16."""
    from ..kernels.quant_matmul import int4_matmul, int8_matmul, w8a8_matmul
    from ..transforms.quantize import FP8Linear, quantize_int4, quantize_int8

    if kind == "bf16":
        return (W,), lambda ops, x: torch.matmul(x, ops[0].t())
    if kind == "int8":
        w = quantize_int8(W)
        return (w.qweight.t().contiguous(), w.scales), lambda ops, x: int8_matmul(x, *ops, config=config)
    if kind == "w8a8":
        w = quantize_int8(W)
        return (w.qweight, w.scales), lambda ops, x: w8a8_matmul(x, *ops)
    if kind == "int4":
        w = quantize_int4(W, group)
        return (w.packed, w.scales, w.zeros), lambda ops, x: int4_matmul(x, *ops, group, config=config)
    if kind == "fp8":
        lin = FP8Linear(W, simulate=False)
        return ((lin.weight_fp8, lin.weight_scale),
                lambda ops, x: _fp8_mm(x, *ops))
    raise ValueError(kind)


def _fp8_mm(x, w8, ws):
    from ..transforms.quantize import quantize_fp8

    x8, sx = quantize_fp8(x)
    M = x8.shape[0]
    pad = (-M) % 16
    if pad:
        x8 = torch.cat([x8, x8.new_zeros(pad, x8.shape[1])])
    y = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=ws, out_dtype=torch.bfloat16)
    y = y[0] if isinstance(y, tuple) else y
    return y[:M]


def time_matmul(kind: str, M: int, K: int, N: int, device, dtype=torch.bfloat16, group: int = 128,
                config: dict | None = None, repeat: int = 50) -> dict:
    """Median time of x (M, K) @ W.T for one implementation, weights rotated
    through copies larger than twice the L2; bytes are the weight format's."""
    g = torch.Generator(device=device).manual_seed(0)
    W = (torch.randn(N, K, generator=g, device=device) * 0.02).to(dtype)
    x = torch.randn(M, K, generator=g, device=device).to(dtype)
    ops, fn = _kernel_fns(kind, W, group, config)
    del W
    rot = measure.OperandRotation(ops)
    t = measure.time_fn(lambda o: fn(o, x), warmup=3, repeat=repeat, device=device, setup=rot.next)
    nbytes = _weight_bytes(kind, N, K, group) + x.numel() * x.element_size()
    return dict(kind=kind, M=M, K=K, N=N, time_s=t.median, spread=t.spread, bytes=nbytes,
                gb_s=nbytes / t.median / 1e9, copies=rot.copies)


def measure_kernels(shapes, rows, device, limits, sweep: bool = False, progress=None) -> list[dict]:
    from ..transforms.quantize import fp8_support

    kinds = ["bf16", "int8", "int4", "w8a8"] + (["fp8"] if fp8_support(device)[0] else [])
    out = []
    for K, N in shapes:
        for M in rows:
            base = None
            for kind in kinds:
                if progress:
                    progress(f"kernel {kind} M={M} {K}x{N}")
                r = time_matmul(kind, M, K, N, device)
                base = r if kind == "bf16" else base
                r["speedup"] = base["time_s"] / r["time_s"]
                r["bandwidth_fraction"] = r["gb_s"] * 1e9 / limits.bandwidth
                out.append(r)
            if sweep and M == 1:
                for kind in ("int8", "int4"):
                    swept = _sweep_gemv(kind, M, K, N, device, limits, base)
                    timed = [r for r in swept if "time_s" in r]
                    if timed:
                        min(timed, key=lambda r: r["time_s"])["best_of_sweep"] = True
                    out.extend(swept)
    return out


#: the GEMV launch configurations swept on a GPU (block_w: words per program, one warp per 128)
SWEEP = dict(block_w=(64, 128, 256), warps=(1, 4), rows_per_warp=(2, 4, 8), split_k=(None, 1, 8))


def _sweep_gemv(kind, M, K, N, device, limits, base) -> list[dict]:
    """Time GEMV launch configurations other than the default: words per
    program (one warp per 128), k rows per step, split-K (None = the default
    heuristic)."""
    rows_out = []
    for block_w in SWEEP["block_w"]:
        for warps in SWEEP["warps"]:
            for rpw in SWEEP["rows_per_warp"]:
                for split_k in SWEEP["split_k"]:
                    cfg = dict(path="gemv", block_w=block_w, num_warps=warps, rows=rpw * warps,
                               split_k=split_k)
                    try:
                        r = time_matmul(kind, M, K, N, device, config=cfg, repeat=20)
                    except Exception as e:  # a config the compiler rejects: record, go on
                        rows_out.append(dict(kind=kind, M=M, K=K, N=N, sweep=cfg,
                                             error=str(e)[:200]))
                        continue
                    r.update(sweep=cfg, speedup=base["time_s"] / r["time_s"],
                             bandwidth_fraction=r["gb_s"] * 1e9 / limits.bandwidth)
                    rows_out.append(r)
    return rows_out


# ===================================================================== (b) models
def _load(name: str, device, dtype):
    note = None
    if name in ZOO and not (ZOO[name] / "config.json").exists():
        note = f"{name} is not built in this checkout: synthetic:tiny stands in"
        name = "synthetic:tiny"
    model, tok = load_model(name, device=device, dtype=dtype)
    return name, model, tok, note


def decode_speed(model, batch: int, context: int, steps: int, graph: bool) -> dict:
    """Median seconds of one decode step (batch sequences after ``context``
    tokens, static cache), eager or replayed from a CUDA graph
    (:class:`llmopt_lab.graphs.GraphedDecoder`)."""
    from ..cache import StaticCache
    from ..generate import prefill
    from ..graphs import GraphedDecoder
    from ..step import host_step, run_step

    c, dev = model.config, model.device
    cache = StaticCache(c, batch, context + 8, device=dev, dtype=model.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, c.vocab_size, (batch, context), generator=g).to(dev)
    prefill(model, ids, torch.full((batch,), context, device=dev), cache)
    host = host_step([[0]] * batch, [context] * batch, [[i] for i in range(batch)], cache.block_size,
                     contiguous=True)
    if graph:
        decoder = GraphedDecoder(model, cache, max_batch=batch, buckets=[batch])
        decoder.run(host)
        step = decoder.replay
    else:
        eager = host.to_step(dev)
        step = lambda: run_step(model, cache, eager)  # noqa: E731
    t = measure.time_fn(step, warmup=2, repeat=steps, device=dev)
    return dict(time_s=t.median, spread=t.spread, tokens_per_s=batch / t.median)


def measure_models(p: dict, device, progress=None) -> list[dict]:
    from ..transforms import model_bytes, quantize_model as quantize
    from ..transforms.quantize import fp8_support

    out = []
    for name in p["models"]:
        name, base, _, note = _load(name, device, p["model_dtype"])
        entry = dict(model=name, dtype=str(base.dtype).replace("torch.", ""), note=note, rows=[])
        for fmt in p["formats"]:
            if fmt == "fp8" and not fp8_support(device)[0]:
                entry["rows"].append(dict(format=fmt, skipped=fp8_support(device)[1]))
                continue
            if progress:
                progress(f"{name} {fmt}")
            model = base if fmt == "float" else quantize(base, fmt, copy=True)
            row = dict(format=fmt if fmt != "float" else entry["dtype"], bytes=model_bytes(model),
                       kernels=device.type == "cuda" and fmt not in ("float", "fp8"))
            for batch in p["decode_batches"]:
                with measure.peak_memory(device) as mem:
                    eager = decode_speed(model, batch, p["context"], p["steps"], graph=False)
                r = dict(batch=batch, eager_tokens_per_s=eager["tokens_per_s"],
                         eager_time_s=eager["time_s"], peak_bytes=mem.peak)
                if device.type == "cuda":
                    try:
                        gr = decode_speed(model, batch, p["context"], p["steps"], graph=True)
                        r.update(graph_tokens_per_s=gr["tokens_per_s"], graph_time_s=gr["time_s"])
                    except Exception as e:  # record why a capture failed, keep the eager figure
                        r["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                row.setdefault("decode", []).append(r)
            entry["rows"].append(row)
            if model is not base:
                del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base_rows = {r["batch"]: r for r in entry["rows"][0]["decode"]}
        for row in entry["rows"]:
            for r in row.get("decode", []):
                b = base_rows[r["batch"]]
                key = "graph_tokens_per_s" if "graph_tokens_per_s" in r and "graph_tokens_per_s" in b \
                    else "eager_tokens_per_s"
                r["speedup"] = r[key] / b[key]
                r["speedup_of"] = key
        out.append(entry)
        del base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ==================================================================== (c) quality
def quality_data(model, tokenizer, p: dict):
    """(eval ids, lengths, calibration batches, note): held-out windows and
    training-split calibration with a tokenizer; random tokens without one."""
    if tokenizer is not None:
        from .. import data
        from ..transforms.calibration import training_calibration_set

        ev = data.heldout_set(tokenizer, quick=True)
        ids, lengths = ev.ids, ev.lengths
        if p["eval_windows"] and p["eval_windows"] < len(ids):  # evenly spaced: every file
            keep = torch.linspace(0, len(ids) - 1, p["eval_windows"]).round().long()
            ids, lengths = ids[keep], lengths[keep]
        if p.get("eval_window") and p["eval_window"] < ids.shape[1]:  # the first W tokens of each
            ids, lengths = ids[:, :p["eval_window"]], lengths.clamp(max=p["eval_window"])
        calib = training_calibration_set(tokenizer, p["calib_sequences"], p["calib_len"])
        return ids, lengths, calib, "held-out quick set; calibration from the training split"
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    n, w = p["eval_windows"] or 16, p["eval_window"] or 128
    ids = torch.randint(0, V, (n, w), generator=g)
    lengths = torch.full((n,), w)
    stream = torch.randint(0, V, (p["calib_sequences"] * p["calib_len"] * 2,), generator=g)
    from ..transforms.calibration import calibration_batches

    calib = calibration_batches(stream, p["calib_sequences"], p["calib_len"])
    return ids, lengths, calib, "random tokens (no tokenizer): quality numbers are not meaningful"


def _quality_rows(base, methods, ids, lengths, calib, progress=None, tag: str = "") -> list[dict]:
    """One compare_quality row per (label, method, options), each against ``base``."""
    import warnings

    from ..transforms import bytes_breakdown, compare_quality, quantize_model as quantize

    rows = []
    for label, method, opts in methods:
        if progress:
            progress(f"quality {label}{tag}")
        kw = dict(opts)
        if method in ("gptq", "awq", "smoothquant"):
            kw["calibration"] = calib
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = quantize(base, method, copy=True, **kw)
            res = compare_quality(base, q, ids, lengths, per_window=True)
        bd = bytes_breakdown(q)
        res.update(label=label, method=method, options=dict(opts), bytes=sum(bd.values()),
                   linear_bytes=bd["linear"] + bd["quant_params"],
                   warnings=sorted({str(w.message)[:160] for w in caught}))
        if method == "fp8":
            res["simulated"] = any(m.mode == "simulated" for m in q.modules() if hasattr(m, "mode"))
        rows.append(res)
        del q
    _recovery(rows)
    return rows


def _recovery(rows: list[dict]) -> None:
    """Add to every row a 90% bootstrap interval of its perplexity change
    (windows resampled, paired across models), and to GPTQ/AWQ rows the share
    of RTN's damage (same group size) they undo: in perplexity, with its
    interval (wide when RTN's increase is small), and in KL (steadier).
    Drops the per-window sums afterwards."""
    from ..measure.metrics import ppl_delta_interval, recovery, recovery_interval

    for r in rows:
        w = r["windows"]
        r["ppl_delta_pct_ci90"] = list(ppl_delta_interval(w["nll_ref"], w["nll"], w["tokens"]))
    rtn = {r["options"].get("group_size"): r for r in rows if r["method"] == "int4"}
    for r in rows:
        base = rtn.get(r["options"].get("group_size"))
        if base is not None and r["method"] in ("gptq", "awq"):
            lost = base["ppl"] - base["ppl_ref"]
            if lost > 0:
                r["recovered"] = recovery(base["ppl_ref"], base["ppl"], r["ppl"])
                r["recovered_ci90"] = list(recovery_interval(
                    r["windows"]["nll_ref"], base["windows"]["nll"], r["windows"]["nll"],
                    r["windows"]["tokens"]))
            else:  # RTN lost nothing here: there is nothing to recover
                r["recovered"], r["recovered_ci90"] = float("nan"), [float("nan")] * 2
            r["recovered_kl"] = 1.0 - r["kl"] / base["kl"] if base["kl"] > 0 else float("nan")
    for r in rows:
        del r["windows"]


def verdict(value: float, interval, target: float) -> str:
    """'met' / 'missed' when the whole interval is on one side of the target,
    else 'unclear (the point estimate says met|missed)'; 'undefined' for a NaN
    value (e.g. a recovery where the baseline lost nothing)."""
    lo, hi = interval
    if math.isnan(value):
        return "undefined"
    if lo >= target:
        return "met"
    if hi < target:
        return "missed"
    return f"unclear (point estimate {'met' if value >= target else 'missed'})"


def measure_quality(p: dict, device, progress=None) -> dict:
    """Part (c): every method on the quality model, then a few on the same model
    with planted activation outliers (:func:`~llmopt_lab.transforms.smoothquant.plant_outliers`:
    its float function unchanged), where AWQ and SmoothQuant have something to
    protect. Also the natural outlier ratios (max / median channel absmax)."""
    import copy

    from ..transforms import bytes_breakdown, model_bytes
    from ..transforms.smoothquant import activation_outliers, plant_outliers

    name, base, tok, note = _load(p["quality_model"], device, "float32")
    ids, lengths, calib, data_note = quality_data(base, tok, p)
    outliers = {k: dict(ratio=v.ratio, top_channels=v.channels[:4], top_values=v.values[:4])
                for k, v in activation_outliers(base, calib[:2]).items()}
    rows = [dict(label="float32", method="none", options={}, bytes=model_bytes(base),
                 linear_bytes=bytes_breakdown(base)["linear"])]
    methods = REAL_METHODS if p["quality_methods"] == "real" else (p["quality_methods"] or QUALITY_METHODS)
    rows += _quality_rows(base, methods, ids, lengths, calib, progress)
    if rows[1:]:
        rows[0].update(ppl=rows[1]["ppl_ref"], ppl_ref=rows[1]["ppl_ref"], ppl_delta_pct=0.0,
                       kl=0.0, top1=1.0)
    planted, channels = [], []
    if p.get("planted", True):
        planted_model = copy.deepcopy(base)
        channels = plant_outliers(planted_model, **PLANTED)
        planted = _quality_rows(planted_model, PLANTED_METHODS, ids, lengths, calib, progress,
                                " [planted outliers]")
    by = {r["label"]: r for r in rows}
    checks = {}
    for lab, (goal, floor) in REAL_TARGETS.items():
        if lab in by and "recovered" in by[lab] and not math.isnan(by[lab]["recovered"]):
            rec, (lo, hi) = by[lab]["recovered"], by[lab]["recovered_ci90"]
            checks[f"{lab} recovers >= {goal:.0%} of RTN's ppl increase "
                   f"(90% interval's lower bound > {floor:.0%})"] = (
                f"{'met' if rec >= goal and lo > floor else 'MISSED'}: {rec:.0%} [{lo:.0%}, {hi:.0%}]")
    if "W8A8 naive" in by and "W8A8 SmoothQuant" in by and "ppl_delta_pct_ci90" in by["W8A8 naive"]:
        nv, sq = by["W8A8 naive"], by["W8A8 SmoothQuant"]
        checks["SmoothQuant's W8A8 ppl increase below naive W8A8's"] = (
            f"{'yes' if sq['ppl_delta_pct'] < nv['ppl_delta_pct'] else 'NO'}: "
            f"{sq['ppl_delta_pct']:+.2f}% [{sq['ppl_delta_pct_ci90'][0]:+.2f}, "
            f"{sq['ppl_delta_pct_ci90'][1]:+.2f}] vs {nv['ppl_delta_pct']:+.2f}% "
            f"[{nv['ppl_delta_pct_ci90'][0]:+.2f}, {nv['ppl_delta_pct_ci90'][1]:+.2f}]")
    if "int8" in by:
        checks["int8 ppl within 1% of float32"] = abs(by["int8"]["ppl_delta_pct"]) <= 1.0
    for lab in ("int4 GPTQ g128", "int4 AWQ g128"):
        if lab in by and "recovered" in by[lab]:
            checks[f"{lab} recovers >= 50% of RTN's ppl increase"] = bool(by[lab]["recovered"] >= 0.5)
            checks[f"{lab} recovers >= 50% of RTN's ppl increase, 90% interval"] = verdict(
                by[lab]["recovered"], by[lab]["recovered_ci90"], 0.5)
            checks[f"{lab} recovers >= 50% of RTN's KL"] = bool(by[lab]["recovered_kl"] >= 0.5)
    return dict(model=name, note=note, data=data_note, eval_tokens=rows[-1].get("tokens"),
                calibration_tokens=sum(b.numel() for b in calib), rows=rows, checks=checks,
                outliers=outliers, planted=dict(PLANTED, channels=channels, rows=planted))


# ================================================================= (d) below four bits
def _token_batches(tok, model, sequences: int, length: int, seed: int) -> list[torch.Tensor]:
    """Training-split windows (random tokens without a tokenizer)."""
    from ..transforms.calibration import calibration_batches, training_calibration_set

    if tok is not None:
        return training_calibration_set(tok, sequences, length, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    stream = torch.randint(0, model.config.vocab_size, (sequences * length * 2,), generator=g)
    return calibration_batches(stream, sequences, length)


def measure_lowbit(p: dict, device, progress=None) -> dict:
    """Part (d): below four bits on the quality model.

    * At each bit width (groups of 64, the int4 container): RTN, GPTQ and,
      at the widths in ``qat_bits``, QAT (distilled from the float model on
      training-split text); the share of RTN's perplexity increase each
      recovers, QAT against GPTQ (paired interval), all at the same bytes.
    * Mixed precision: a sensitivity scan, then the plan with the least
      predicted KL within the bytes of uniform b bits, against uniform b bits
      (paired interval); and the fewest bytes whose predicted KL meets the KL
      uniform 4-bit measures.
    """
    import time

    from ..measure.metrics import ppl_delta_interval, recovery, recovery_interval
    from ..transforms import compare_quality, quantize_model as quantize
    from ..transforms.quantize.mixed import (format_name, layer_sensitivity, mixed_model_bytes,
                                             plan_bits)

    lb = p["lowbit"]
    g = lb["group_size"]
    name, base, tok, note = _load(p["quality_model"], device, "float32")
    ids, lengths, calib, data_note = quality_data(base, tok, p)
    train = _token_batches(tok, base, lb["qat_sequences"], lb["qat_len"], seed=1)
    rows: dict[str, dict] = {}

    def score(label, q, **extra):
        if progress:
            progress(f"lowbit {label}")
        res = compare_quality(base, q, ids, lengths, per_window=True)
        res.update(label=label, packed_bytes=mixed_model_bytes(q), **extra)
        res["ppl_delta_pct_ci90"] = list(ppl_delta_interval(res["windows"]["nll_ref"],
                                                            res["windows"]["nll"],
                                                            res["windows"]["tokens"]))
        rows[label] = res
        return res

    for bits in lb["bits"]:
        score(f"RTN {bits}-bit", quantize(base, "int4", copy=True, group_size=g, bits=bits),
              method="int4", bits=bits)
        if progress:
            progress(f"lowbit GPTQ {bits}-bit")
        t0 = time.perf_counter()
        q = quantize(base, "gptq", copy=True, group_size=g, bits=bits, calibration=calib)
        score(f"GPTQ {bits}-bit", q, method="gptq", bits=bits, seconds=time.perf_counter() - t0)
        if bits in lb["qat_bits"]:
            if progress:
                progress(f"lowbit QAT {bits}-bit ({lb['qat_steps']} steps)")
            t0 = time.perf_counter()
            q = quantize(base, "qat", copy=True, group_size=g, bits=bits, calibration=train,
                         steps=lb["qat_steps"], lr=lb["qat_lr"])
            score(f"QAT {bits}-bit", q, method="qat", bits=bits, seconds=time.perf_counter() - t0,
                  train_tokens=lb["qat_steps"] * train[0].numel(),
                  kd_loss_first=q.quantization["kd_loss_first"],
                  kd_loss_last=q.quantization["kd_loss_last"])
        del q
    W = lambda lab: rows[lab]["windows"]
    for bits in lb["bits"]:
        rtn = rows[f"RTN {bits}-bit"]
        for kind in ("GPTQ", "QAT"):
            r = rows.get(f"{kind} {bits}-bit")
            if r is None:
                continue
            if rtn["ppl"] > rtn["ppl_ref"]:
                r["recovered"] = recovery(rtn["ppl_ref"], rtn["ppl"], r["ppl"])
                r["recovered_ci90"] = list(recovery_interval(
                    W(r["label"])["nll_ref"], W(rtn["label"])["nll"], W(r["label"])["nll"],
                    W(r["label"])["tokens"]))
        qat, gptq = rows.get(f"QAT {bits}-bit"), rows.get(f"GPTQ {bits}-bit")
        if qat and gptq:
            qat["vs_gptq_pct"] = 100.0 * (qat["ppl"] / gptq["ppl"] - 1)
            qat["vs_gptq_pct_ci90"] = list(ppl_delta_interval(W(gptq["label"])["nll"],
                                                              W(qat["label"])["nll"],
                                                              W(qat["label"])["tokens"]))

    # mixed precision
    if progress:
        progress("lowbit sensitivity scan")
    scan_batches = _token_batches(tok, base, lb["scan_sequences"], lb["scan_len"], seed=2)
    t0 = time.perf_counter()
    sens = layer_sensitivity(base, scan_batches, formats=lb["scan_formats"])
    scan_seconds = time.perf_counter() - t0
    mixed = []
    for fmt in lb["mixed_budgets"]:
        fmt = tuple(fmt)
        budget = sens.uniform_bytes(fmt)
        plan = plan_bits(sens, byte_budget=budget)
        uni_label = f"RTN {fmt[0]}-bit"
        if uni_label not in rows:
            score(uni_label, quantize(base, "int4", copy=True, group_size=g, bits=fmt[0]),
                  method="int4", bits=fmt[0])
        uni = rows[uni_label]
        r = score(f"mixed @ {fmt[0]}-bit bytes", quantize(base, "mixed", copy=True, plan=plan),
                  method="mixed", bits=None, formats=plan.counts())
        r["vs_uniform_pct"] = 100.0 * (r["ppl"] / uni["ppl"] - 1)
        r["vs_uniform_pct_ci90"] = list(ppl_delta_interval(W(uni_label)["nll"], W(r["label"])["nll"],
                                                           W(r["label"])["tokens"]))
        mixed.append(dict(budget_format=format_name(fmt), budget_bytes=budget, label=r["label"],
                          uniform=uni_label, plan_bytes=plan.nbytes, predicted_kl=plan.predicted_kl,
                          uniform_predicted_kl=sens.uniform_kl(fmt), measured_kl=r["kl"],
                          uniform_measured_kl=uni["kl"], formats=plan.counts(),
                          assignment={k: list(v) for k, v in plan.assignment.items()}))
    kl_target = None
    if "RTN 4-bit" in rows and (4, g) in sens.formats:
        kl_target = dict(kl_budget=rows["RTN 4-bit"]["kl"], uniform_bytes=sens.uniform_bytes((4, g)))
        plan = plan_bits(sens, kl_budget=kl_target["kl_budget"])
        r = score("mixed @ 4-bit KL", quantize(base, "mixed", copy=True, plan=plan), method="mixed",
                  bits=None, formats=plan.counts())
        kl_target.update(plan_bytes=plan.nbytes, predicted_kl=plan.predicted_kl, measured_kl=r["kl"],
                         formats=plan.counts(), label=r["label"])
    checks = {}
    for bits in lb["qat_bits"]:
        q = rows.get(f"QAT {bits}-bit")
        if q is None or "recovered" not in q:
            continue
        rec, (lo, hi) = q["recovered"], q["recovered_ci90"]
        checks[f"QAT {bits}-bit recovers >= 50% of RTN's ppl increase"] = verdict(rec, (lo, hi), 0.5) \
            + f": {rec:.0%} [{lo:.0%}, {hi:.0%}]"
        if "vs_gptq_pct" in q:
            v, (lo, hi) = q["vs_gptq_pct"], q["vs_gptq_pct_ci90"]
            checks[f"QAT {bits}-bit perplexity below GPTQ {bits}-bit's (same bytes)"] = (
                f"{'met' if hi < 0 else 'missed' if lo > 0 else 'unclear'}: {v:+.1f}% [{lo:+.1f}, {hi:+.1f}]")
    for m in mixed:
        r = rows[m["label"]]
        v, (lo, hi) = r["vs_uniform_pct"], r["vs_uniform_pct_ci90"]
        checks[f"mixed precision below uniform {m['budget_format']}'s perplexity at its bytes"] = (
            f"{'met' if hi < 0 else 'missed' if lo > 0 else 'unclear'}: {v:+.1f}% [{lo:+.1f}, {hi:+.1f}]")
    for r in rows.values():
        del r["windows"]
    return dict(model=name, note=note, data=data_note, eval_tokens=next(iter(rows.values()))["tokens"],
                calibration_tokens=sum(b.numel() for b in calib),
                qat_train_tokens_per_step=train[0].numel(), settings=dict(lb),
                rows=list(rows.values()),
                scan=dict(layers=sens.layers, formats=[format_name(f) for f in sens.formats],
                          kl=sens.kl.tolist(), nbytes=sens.nbytes.tolist(), tokens=sens.tokens,
                          seconds=scan_seconds),
                mixed=mixed, kl_target=kl_target, checks=checks)


# ========================================================================== run
def run(size: str = "cpu", device=None, progress: bool = True) -> dict:
    """Run the lesson 03 benchmark at a named size; returns a JSON-able dict."""
    from tqdm.auto import tqdm

    p = SIZES[size]
    dev = _device(device)
    limits = measure.device_limits(dev)
    out = dict(benchmark="quantization", lesson="03", size=size, limits=limits.to_dict())
    bar = tqdm(desc="lesson 03", disable=not progress, leave=False)

    def note(text):
        bar.set_postfix_str(text)
        bar.update()

    torch.manual_seed(0)
    if "lowbit" in p:  # part (d) alone
        out["lowbit"] = measure_lowbit(p, dev, note)
        bar.close()
        return out
    if dev.type == "cuda" and p["kernel_shapes"]:
        out["kernels"] = measure_kernels(p["kernel_shapes"], p["kernel_rows"], dev, limits,
                                         p["sweep"], note)
    else:
        out["kernels"] = []
        out["kernels_note"] = "kernel timings need a CUDA GPU (run with --size gpu there)"
    out["models"] = measure_models(p, dev, note)
    out["quality"] = measure_quality(p, dev, note)
    bar.close()
    return out


def summary_rows(result: dict) -> list[dict]:
    rows = []
    lowbit = result.get("lowbit")
    if lowbit:
        for r in lowbit["rows"]:
            note = f"{r['ppl_delta_pct']:+.1f}% [{r['ppl_delta_pct_ci90'][0]:+.1f}, " \
                   f"{r['ppl_delta_pct_ci90'][1]:+.1f}] KL {r['kl']:.3f}"
            if "recovered" in r:
                note += " recovered {:.0%} [{:.0%}, {:.0%}]".format(r["recovered"], *r["recovered_ci90"])
            if "vs_uniform_pct" in r:
                note += " vs uniform {:+.1f}% [{:+.1f}, {:+.1f}]".format(r["vs_uniform_pct"],
                                                                        *r["vs_uniform_pct_ci90"])
            rows.append({"part": "below 4 bits", "case": lowbit["model"], "variant": r["label"],
                         "value": r["ppl"], "unit": "ppl", "vs base": None,
                         "note": f"{r['packed_bytes'] / 2**20:.2f} MiB; " + note})
    for r in result.get("kernels", []):
        if "sweep" in r and not r.get("best_of_sweep"):
            continue
        cfg = r.get("sweep")
        rows.append({"part": "kernel", "case": f"M={r['M']} {r['K']}x{r['N']}",
                     "variant": r["kind"] + (" (best swept)" if cfg else ""),
                     "value": r["gb_s"], "unit": "GB/s", "vs base": r["speedup"],
                     "note": f"{100 * r['bandwidth_fraction']:.0f}% of bandwidth"
                             + (f" w={cfg['block_w']} warps={cfg['num_warps']} rows={cfg['rows']}"
                                f" split={cfg['split_k']}"
                                if cfg else "")})
    for m in result.get("models", []):
        for row in m["rows"]:
            if "skipped" in row:
                rows.append({"part": "model", "case": m["model"], "variant": row["format"],
                             "value": None, "unit": "", "vs base": None, "note": row["skipped"][:60]})
                continue
            for d in row["decode"]:
                best = d.get("graph_tokens_per_s", d["eager_tokens_per_s"])
                rows.append({"part": "model", "case": f"{m['model']} b={d['batch']}",
                             "variant": row["format"], "value": best, "unit": "tok/s",
                             "vs base": d["speedup"],
                             "note": f"{row['bytes'] / 2**20:.0f} MiB"
                                     + (" graph" if "graph_tokens_per_s" in d else " eager")})
    q = result.get("quality", {})
    planted = [dict(r, label=r["label"] + " [planted]") for r in q.get("planted", {}).get("rows", [])]
    for r in q.get("rows", []) + planted:
        rows.append({"part": "quality", "case": q["model"], "variant": r["label"],
                     "value": r.get("ppl"), "unit": "ppl", "vs base": None,
                     "note": (f"{r['ppl_delta_pct']:+.2f}% KL {r['kl']:.4f} top1 {r['top1']:.3f}"
                              if "kl" in r else "")
                             + (" [{:+.2f}, {:+.2f}]".format(*r["ppl_delta_pct_ci90"])
                                if "ppl_delta_pct_ci90" in r else "")
                             + (f" recovered {100 * r['recovered']:.0f}%" if "recovered" in r
                                and not math.isnan(r["recovered"]) else "")
                             + (" [{:.0f}, {:.0f}]%".format(*(100 * v for v in r["recovered_ci90"]))
                                if "recovered_ci90" in r and not math.isnan(r["recovered"]) else "")
                             + (f" (KL {100 * r['recovered_kl']:.0f}%)" if "recovered_kl" in r
                                and not math.isnan(r["recovered_kl"]) else "")})
    return rows


def summary_text(result: dict) -> str:
    """The quality targets in words: each check, and the noise behind the
    perplexity figures (90% bootstrap intervals over the scored windows)."""
    lowbit = result.get("lowbit")
    if lowbit:
        lines = [f"below four bits on {lowbit['model']} ({lowbit['eval_tokens']} held-out tokens; "
                 "intervals: 90% bootstrap over windows):"]
        lines += [f"  {k}: {v}" for k, v in lowbit["checks"].items()]
        kt = lowbit.get("kl_target")
        if kt:
            lines.append(f"  fewest bytes with predicted KL <= uniform 4-bit's ({kt['kl_budget']:.4f}): "
                         f"{kt['plan_bytes'] / 2**20:.2f} MiB vs {kt['uniform_bytes'] / 2**20:.2f} MiB "
                         f"(measured KL {kt['measured_kl']:.4f})")
        return "\n".join(lines)
    q = result.get("quality", {})
    if not q:
        return ""
    lines = [f"quality on {q['model']} ({q.get('eval_tokens')} held-out tokens; intervals: 90% "
             "bootstrap over windows):"]
    for name, value in q.get("checks", {}).items():
        shown = ("yes" if value else "NO") if isinstance(value, bool) else value
        lines.append(f"  {name}: {shown}")
    return "\n".join(lines)


def plot(result: dict, provenance: dict):
    """Kernel speed-ups over bf16 (a GPU), else quality (perplexity increase
    per method, with its 90% interval where the result has one)."""
    from ..measure import plots

    kern = [r for r in result.get("kernels", []) if "sweep" not in r and r["kind"] != "bf16"]
    if kern:
        labels = [f"{r['kind']} M={r['M']} {r['K']}x{r['N']}" for r in kern]
        return plots.speedup_bars(labels, [r["speedup"] for r in kern], baseline="bf16 matmul",
                                  provenance=provenance,
                                  title="Quantized matmul kernels: speed-up over bf16")
    from matplotlib.figure import Figure

    if "lowbit" in result:
        return plot_lowbit(result["lowbit"], provenance)
    rows = [r for r in result["quality"]["rows"] if r["method"] != "none"]
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    vals = [r["ppl_delta_pct"] for r in rows]
    ci = [r.get("ppl_delta_pct_ci90", (v, v)) for r, v in zip(rows, vals)]
    ax.bar(range(len(rows)), vals, color="tab:blue",
           yerr=[[v - lo for v, (lo, _) in zip(vals, ci)], [hi - v for v, (_, hi) in zip(vals, ci)]],
           capsize=3, ecolor="0.3")
    ax.text(0.99, 0.97, "whiskers: 90% bootstrap interval over the scored windows",
            transform=ax.transAxes, ha="right", va="top", fontsize=8, color="0.3")
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("perplexity increase over float32 (%)")
    ax.set_title(f"Quantization quality on {result['quality']['model']}")
    ax.axhline(0, color="k", lw=0.8)
    plots.stamp(fig, provenance)
    return fig


def plot_lowbit(lowbit: dict, provenance: dict | None = None):
    """Perplexity against packed bytes of the decoder's linear layers: RTN,
    GPTQ and QAT at each bit width, and mixed precision (90% intervals)."""
    from matplotlib.figure import Figure

    from ..measure import plots

    fig = Figure(figsize=(6.6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    style = {"int4": ("RTN", "o", "tab:gray"), "gptq": ("GPTQ", "s", "tab:blue"),
             "qat": ("QAT", "^", "tab:green"), "mixed": ("mixed precision", "D", "tab:red")}
    for method, (name, marker, color) in style.items():
        rs = sorted((r for r in lowbit["rows"] if r["method"] == method), key=lambda r: r["packed_bytes"])
        if not rs:
            continue
        x = [r["packed_bytes"] / 2**20 for r in rs]
        y = [r["ppl"] for r in rs]
        lo = [r["ppl_ref"] * (1 + r["ppl_delta_pct_ci90"][0] / 100) for r in rs]
        hi = [r["ppl_ref"] * (1 + r["ppl_delta_pct_ci90"][1] / 100) for r in rs]
        ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                    marker=marker, color=color, label=name, capsize=3,
                    linestyle="-" if method != "mixed" else "none")
    ref = lowbit["rows"][0]["ppl_ref"]
    ax.axhline(ref, color="k", lw=0.8, ls=":", label=f"float32 ({ref:.2f})")
    ax.set_xlabel("decoder linear layers, packed (MiB)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Below four bits on {lowbit['model']}: same bytes, different methods")
    ax.legend(fontsize=8)
    if provenance:
        plots.stamp(fig, provenance)
    return fig

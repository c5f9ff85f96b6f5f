"""Lesson 06 benchmark: our flash-attention kernels against torch SDPA and naive attention.

(Over 400 lines: prefill, decode and memory sweeps share one result format,
summary and plot; they are one benchmark.)

* Prefill (forward only), queries = keys = N: TFLOP/s and peak memory of

  - ``ours``: :func:`llmopt_lab.kernels.flash_attention.flash_attention`;
  - ``sdpa_flash``: ``F.scaled_dot_product_attention`` pinned to its flash
    backend (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``);
  - ``sdpa_cudnn``: pinned to cuDNN (``SDPBackend.CUDNN_ATTENTION``), where
    this torch and device have it;
  - ``naive``: :func:`eager_attention`, the scores and probabilities
    materialised, until it runs out of memory (recorded as "OOM").

  FLOPs: 4 B H N^2 D (two matmuls of 2 B H N^2 D), halved when causal.
* Decode: 1 and 8 queries per sequence against a long KV cache (grouped-
  query heads): latency and effective bandwidth (K and V bytes / time) of
  :func:`llmopt_lab.kernels.flash_decode.flash_decode` against SDPA (its
  default dispatch and each pinned backend that accepts the inputs) and naive.

Every measurement is a row with a ``status``: "ok", "OOM", "unsupported"
(the backend refused the inputs, with its reason), "unavailable" (not on this
device) or "skipped" (the size is too large for this mode, e.g. our kernel
under Triton's CPU interpreter, thousands of times slower than compiled).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import math
import sys
import warnings

import torch
import torch.nn.functional as F

from ..kernels import INTERPRETED, can_launch
from ..kernels.flash_attention import flash_attention
from ..kernels.flash_decode import flash_decode
from ..measure import peak_memory, time_fn

PREFILL_IMPLS = ("ours", "sdpa_flash", "sdpa_cudnn", "naive")
DECODE_IMPLS = ("ours", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "naive")

SIZES = {
    # seconds on a CPU (tests, tour): our kernel through the interpreter at N = 32 only
    "quick": dict(batch=1, heads=2, head_dims=[32], seq_lens=[32, 64], dtypes=["float32"],
                  causal=[False, True], ours_max_n=32, naive_max_n=None, warmup=1, repeat=2,
                  decode=dict(batch=1, q_heads=4, kv_heads=2, head_dim=32, keys=64,
                              queries=[1, 8])),
    # a CPU in about half a minute: SDPA and naive up to 2k, our kernel at tiny N
    "cpu": dict(batch=1, heads=4, head_dims=[64], seq_lens=[32, 64, 128, 256, 512, 1024, 2048],
                dtypes=["float32"], causal=[False, True], ours_max_n=64, naive_max_n=2048,
                warmup=1, repeat=3,
                decode=dict(batch=1, q_heads=8, kv_heads=2, head_dim=64, keys=512, queries=[1, 8])),
    # an H100/H200: the full grid; naive runs until it runs out of memory
    "gpu": dict(batch=4, heads=32, head_dims=[64, 128], seq_lens=[1024, 2048, 4096, 8192, 16384],
                dtypes=["float16", "bfloat16"], causal=[False, True], ours_max_n=None,
                naive_max_n=None, warmup=3, repeat=10,
                decode=dict(batch=4, q_heads=32, kv_heads=8, head_dim=128, keys=32768,
                            queries=[1, 8])),
}


# ======================================================== implementations
def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    causal: bool = False) -> torch.Tensor:
    """Naive attention as model code writes it ("eager"), in q's dtype.

    q: (B, H, T, D); k, v: (B, Hkv, S, D), H a multiple of Hkv (K and V are
    expanded per query head, as eager code does). Causal aligns bottom-right:
    query i sees keys j <= S - T + i. Materialises the (B, H, T, S) scores and
    then the probabilities: at its peak both are alive, 2 B H T S elements.
    Returns (B, H, T, D).
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    s = torch.matmul(q, k.transpose(-1, -2))  # (B, H, T, S)
    s.mul_(D ** -0.5)
    if causal:
        hidden = torch.ones(T, S, dtype=torch.bool, device=q.device).triu_(S - T + 1)
        s.masked_fill_(hidden, float("-inf"))
    p = torch.softmax(s, dim=-1)
    del s
    return torch.matmul(p, v)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}.get(name)


def _pinned(impl: str):
    """A context that pins SDPA to the backend an impl names (none for 'sdpa')."""
    backend = _sdpa_backend(impl)
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backend)


def prefill_fn(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """A no-argument function computing attention of (B, H, N, D) q, k, v with ``impl``."""
    if impl == "ours":
        return lambda: flash_attention(q, k, v, causal=causal)
    if impl == "naive":
        return lambda: eager_attention(q, k, v, causal)
    if impl.startswith("sdpa"):
        def run():
            with _pinned(impl), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "backend not available" warnings: we record why
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run
    raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(PREFILL_IMPLS)}")


def decode_fn(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """A no-argument function for T queries (B, Hq, T, D) against a full cache
    (B, Hkv, S, D): query i at position S - T + i sees keys j <= its position."""
    T, S = q.shape[2], k.shape[2]
    if impl == "ours":
        return lambda: flash_decode(q, k, v, S)
    if impl == "naive":
        return lambda: eager_attention(q, k, v, causal=T > 1)
    if impl == "sdpa" or impl.startswith("sdpa_"):
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(T, S) if T > 1 else None

        def run():
            with _pinned(impl), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                      enable_gqa=q.shape[1] != k.shape[1])
        return run
    raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(DECODE_IMPLS)}")


# ============================================================ measurement
def attention_flops(batch: int, heads: int, n_queries: int, head_dim: int, causal: bool = False,
                    n_keys: int | None = None) -> float:
    """FLOPs of attention's two matmuls: 4 B H T S D (2 per multiply-add for Q K^T
    and for P V), halved when causal (about half the pairs are masked; the
    usual convention for square causal attention)."""
    n_keys = n_queries if n_keys is None else n_keys
    flops = 4.0 * batch * heads * n_queries * n_keys * head_dim
    return flops / 2 if causal else flops


_LIBC = None


def release_free_memory() -> None:
    """Collect garbage, empty torch's CUDA cache, and on Linux ask the C
    allocator to return freed memory to the system (``malloc_trim``), so that
    a following CPU peak-RSS measurement sees a block's own allocations."""
    global _LIBC
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        if _LIBC is None:
            try:
                _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            except OSError:
                _LIBC = False
        if _LIBC and hasattr(_LIBC, "malloc_trim"):
            _LIBC.malloc_trim(0)


def peak_bytes(fn, device) -> int:
    """Memory one call of ``fn()`` needs beyond what exists before it, in bytes:
    the allocator's peak on a GPU, the peak resident set size on the CPU
    (after one untimed warm-up call and :func:`release_free_memory`)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        out = fn()
        del out
    release_free_memory()
    with peak_memory(dev) as mem:
        out = fn()
        del out
    return mem.peak_increase


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _classify(e: BaseException) -> dict:
    """{"status": "OOM" | "unsupported" | "error", "reason": ...} for an exception."""
    reason = _first_line(e)
    if _is_oom(e):
        return dict(status="OOM", reason=reason)
    if isinstance(e, RuntimeError) and any(
            m in reason.lower() for m in ("no available kernel", "no viable backend",
                                          "not supported")):
        return dict(status="unsupported", reason=reason)
    return dict(status="error", reason=f"{type(e).__name__}: {reason}")


def measure(fn, device, flops: float | None = None, nbytes: float | None = None,
            warmup: int = 2, repeat: int = 10) -> dict:
    """Time ``fn()`` and measure its peak memory; never raises for an expected
    failure: returns {"status": "OOM" | "unsupported" | "error", "reason": ...}.

    On success: status "ok", time_s (median), spread, peak_bytes, and
    tflops = flops / time_s / 1e12 and gb_per_s = nbytes / time_s / 1e9 when given.
    """
    failure = None
    try:
        t = time_fn(fn, warmup=warmup, repeat=repeat, device=device)
        peak = peak_bytes(fn, device)
    except Exception as e:  # noqa: BLE001 - sorted into statuses below
        failure = _classify(e)
    if failure is not None:
        # outside the except block: the traceback (and the tensors its frames
        # hold, e.g. a half-built score matrix) is gone, so the memory can go too
        release_free_memory()
        return failure
    row = dict(status="ok", time_s=t.median, spread=t.spread, peak_bytes=peak)
    if flops is not None:
        row["tflops"] = flops / t.median / 1e12
    if nbytes is not None:
        row["gb_per_s"] = nbytes / t.median / 1e9
    return row


def _available(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run on ``device`` (None when it can be tried)."""
    if impl in ("sdpa_cudnn", "sdpa_efficient") and device.type != "cuda":
        return f"{impl.split('_')[1]} attention needs a CUDA device"
    if impl.startswith("sdpa") and _sdpa_backend(impl) is None and impl != "sdpa":
        return f"this torch has no backend for {impl}"
    if impl == "ours" and not can_launch(torch.empty(0, device=device)):
        return "Triton cannot launch on this device here"
    return None


def measure_prefill(impl: str, batch: int, heads: int, n: int, head_dim: int, causal: bool,
                    dtype: torch.dtype, device, warmup: int = 2, repeat: int = 10,
                    seed: int = 0) -> dict:
    """One prefill measurement (queries = keys = n) as a result row."""
    dev = torch.device(device)
    row = dict(phase="prefill", impl=impl, dtype=str(dtype).replace("torch.", ""),
               head_dim=head_dim, causal=causal, n=n, batch=batch, heads=heads,
               flops=attention_flops(batch, heads, n, head_dim, causal))
    why = _available(impl, dev)
    if why:
        return dict(row, status="unavailable", reason=why)
    try:
        g = torch.Generator(device=dev).manual_seed(seed)
        q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g, device=dev, dtype=dtype)
                   for _ in range(3))
    except torch.OutOfMemoryError as e:
        reason = "inputs: " + _first_line(e)
        q = k = v = None
    if q is None:
        release_free_memory()
        return dict(row, status="OOM", reason=reason)
    result = measure(prefill_fn(impl, q, k, v, causal), dev, flops=row["flops"], warmup=warmup,
                     repeat=repeat)
    if impl.startswith("sdpa"):
        result["backend"] = str(_sdpa_backend(impl)).split(".")[-1]
    del q, k, v
    return dict(row, **result)


def measure_decode(impl: str, batch: int, q_heads: int, kv_heads: int, queries: int, keys: int,
                   head_dim: int, dtype: torch.dtype, device, warmup: int = 2, repeat: int = 10,
                   seed: int = 0) -> dict:
    """One decode measurement (``queries`` new queries against ``keys`` cached keys)."""
    dev = torch.device(device)
    dbytes = torch.empty(0, dtype=dtype).element_size()
    kv_bytes = 2 * batch * kv_heads * keys * head_dim * dbytes
    row = dict(phase="decode", impl=impl, dtype=str(dtype).replace("torch.", ""),
               head_dim=head_dim, queries=queries, keys=keys, batch=batch, q_heads=q_heads,
               kv_heads=kv_heads, kv_bytes=kv_bytes,
               flops=attention_flops(batch, q_heads, queries, head_dim, n_keys=keys))
    why = _available(impl, dev)
    if why:
        return dict(row, status="unavailable", reason=why)
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(batch, q_heads, queries, head_dim, generator=g, device=dev, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, keys, head_dim, generator=g, device=dev, dtype=dtype)
            for _ in range(2))
    result = measure(decode_fn(impl, q, k, v), dev, flops=row["flops"], nbytes=kv_bytes,
                     warmup=warmup, repeat=repeat)
    if impl.startswith("sdpa"):
        result["backend"] = str(_sdpa_backend(impl)).split(".")[-1] if impl != "sdpa" else "default"
    return dict(row, **result)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _not_measured(impl: str, n: int, p: dict, naive_oom: bool) -> tuple[str | None, str]:
    """(status, reason) for a prefill case not to measure, or (None, "")."""
    if impl == "naive" and naive_oom:
        return "OOM", "ran out at a smaller N"
    if impl == "ours" and p["ours_max_n"] is not None and n > p["ours_max_n"]:
        return "skipped", f"N > {p['ours_max_n']}: too slow for Triton's interpreter"
    if impl == "naive" and p["naive_max_n"] is not None and n > p["naive_max_n"]:
        return "skipped", f"N > {p['naive_max_n']} in this size"
    return None, ""


def run(size: str = "cpu", device=None, progress: bool = True, params: dict | None = None) -> dict:
    """Run the lesson 06 benchmark at a named size (or with ``params`` shaped
    like a :data:`SIZES` entry); returns a JSON-able dict."""
    from tqdm.auto import tqdm

    p = dict(params or SIZES[size])
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dec = p["decode"]
    work = (len(p["dtypes"]) * len(p["head_dims"]) * len(p["causal"]) * len(p["seq_lens"])
            * len(PREFILL_IMPLS) + len(p["dtypes"]) * len(dec["queries"]) * len(DECODE_IMPLS))
    bar = tqdm(total=work, desc="lesson 06", disable=not progress, leave=False)
    rows = []
    for dtype_name in p["dtypes"]:
        dtype = _dtype(dtype_name)
        for head_dim in p["head_dims"]:
            for causal in p["causal"]:
                naive_oom = False
                for n in p["seq_lens"]:
                    for impl in PREFILL_IMPLS:
                        bar.set_postfix_str(f"{impl} {dtype_name} D={head_dim} "
                                            f"causal={causal} N={n}")
                        status, reason = _not_measured(impl, n, p, naive_oom)
                        if status:
                            rows.append(dict(
                                phase="prefill", impl=impl, dtype=dtype_name, head_dim=head_dim,
                                causal=causal, n=n, batch=p["batch"], heads=p["heads"],
                                flops=attention_flops(p["batch"], p["heads"], n, head_dim, causal),
                                status=status, reason=reason))
                        else:
                            r = measure_prefill(impl, p["batch"], p["heads"], n, head_dim, causal,
                                                dtype, dev, p["warmup"], p["repeat"])
                            naive_oom |= impl == "naive" and r["status"] == "OOM"
                            rows.append(r)
                        bar.update()
        for queries in dec["queries"]:
            for impl in DECODE_IMPLS:
                bar.set_postfix_str(f"decode {impl} {dtype_name} T={queries}")
                rows.append(measure_decode(impl, dec["batch"], dec["q_heads"], dec["kv_heads"],
                                           queries, dec["keys"], dec["head_dim"], dtype, dev,
                                           p["warmup"], p["repeat"]))
                bar.update()
    bar.close()
    return dict(benchmark="flash_attention", lesson="06", size=size, params=p,
                kernel_mode="interpreter" if INTERPRETED else "compiled", rows=rows)


# ================================================================ reading
def _value(r: dict | None, key: str):
    return r.get(key) if r and r.get("status") == "ok" else None


def summary_rows(result: dict) -> list[dict]:
    """One row per prefill case (TFLOP/s of each implementation) and per decode
    case (effective GB/s of K and V); "ours vs sdpa": our speed over the best
    SDPA backend's (> 1: ours is faster); peak memory of ours and naive in MiB."""
    out = []
    index: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        if r["phase"] == "prefill":
            key = ("prefill", r["dtype"], r["head_dim"], r["causal"], r["n"])
        else:
            key = ("decode", r["dtype"], r["head_dim"], r["queries"], r["keys"])
        index.setdefault(key, {})[r["impl"]] = r
    for key, impls in index.items():
        phase = key[0]
        metric = "tflops" if phase == "prefill" else "gb_per_s"
        sdpa = [r for i, r in impls.items() if i.startswith("sdpa") and _value(r, "time_s")]
        best = min(sdpa, key=lambda r: r["time_s"]) if sdpa else None
        ours = impls.get("ours")
        ratio = (best["time_s"] / ours["time_s"]
                 if best and _value(ours, "time_s") else None)
        if phase == "prefill":
            case = f"prefill {key[1]} D={key[2]}{' causal' if key[3] else ''}"
            n = key[4]
        else:
            case = f"decode {key[1]} D={key[2]} T={key[3]}"
            n = key[4]
        peak = {i: _value(impls.get(i), "peak_bytes") for i in ("ours", "naive")}

        def shown(impl):
            r = impls.get(impl)
            if r is None:
                return None
            return _value(r, metric) if r["status"] == "ok" else (
                r["status"] if r["status"] == "OOM" else None)

        out.append({"case": case, "N": n, "unit": "TFLOP/s" if phase == "prefill" else "GB/s",
                    "ours": shown("ours"), "sdpa flash": shown("sdpa_flash"),
                    "sdpa cudnn": shown("sdpa_cudnn"), "naive": shown("naive"),
                    "ours vs sdpa": ratio,
                    "ours MiB": peak["ours"] / 2 ** 20 if peak["ours"] is not None else None,
                    "naive MiB": peak["naive"] / 2 ** 20 if peak["naive"] is not None else None})
    return out


def series(result: dict, dtype: str | None = None, head_dim: int | None = None,
           causal: bool | None = None, metric: str = "tflops") -> tuple[list[int], dict[str, list]]:
    """Prefill rows of one (dtype, head_dim, causal) case as plot series:
    (sequence lengths, {impl: values, NaN where not measured}). Defaults: the
    first dtype, the largest head_dim, causal if measured."""
    rows = [r for r in result["rows"] if r["phase"] == "prefill"]
    dtype = dtype or rows[0]["dtype"]
    head_dim = head_dim or max(r["head_dim"] for r in rows)
    if causal is None:
        causal = any(r["causal"] for r in rows)
    rows = [r for r in rows if r["dtype"] == dtype and r["head_dim"] == head_dim
            and r["causal"] == causal]
    ns = sorted({r["n"] for r in rows})
    out = {}
    for impl in PREFILL_IMPLS:
        vals = [next((r.get(metric) for r in rows if r["impl"] == impl and r["n"] == n
                      and r["status"] == "ok"), None) for n in ns]
        if any(v is not None for v in vals):
            out[impl] = [math.nan if v is None else v for v in vals]
    return ns, out


def plot(result: dict, provenance: dict, dtype: str | None = None, head_dim: int | None = None,
         causal: bool | None = None):
    """Prefill throughput (TFLOP/s, or GFLOP/s below 1 TFLOP/s) against the
    sequence length, one line per implementation, for one case."""
    from ..measure import plots

    rows = [r for r in result["rows"] if r["phase"] == "prefill"]
    dtype = dtype or rows[0]["dtype"]
    head_dim = head_dim or max(r["head_dim"] for r in rows)
    if causal is None:
        causal = any(r["causal"] for r in rows)
    ns, data = series(result, dtype, head_dim, causal)
    top = max((v for vals in data.values() for v in vals if not math.isnan(v)), default=0.0)
    scale, unit = (1.0, "TFLOP/s") if top >= 1 else (1e3, "GFLOP/s")
    data = {k: [v * scale for v in vals] for k, vals in data.items()}
    p = result.get("params", {})
    title = (f"attention forward, {dtype}, B={p.get('batch')} H={p.get('heads')} D={head_dim}"
             f"{', causal' if causal else ''}")
    return plots.sweep(ns, data, "sequence length N", unit, logx=True, logy=True,
                       provenance=provenance, title=title)


def targets(result: dict, min_ratio: float = 0.9, head_dim: int = 128,
            min_n: int = 2048) -> dict:
    """The lesson's GPU targets, read from a result.

    speed: one row per prefill case with ``head_dim`` and N >= ``min_n`` where
    both ours and SDPA's flash backend ran: our TFLOP/s over SDPA flash's and
    whether it reaches ``min_ratio``. memory: per (dtype, head_dim, causal)
    case, our peak bytes per token at each N (constant when memory is linear
    in N) and the largest over the smallest.
    """
    prefill = [r for r in result["rows"] if r["phase"] == "prefill" and r["status"] == "ok"]
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in prefill:
        by_case.setdefault((r["dtype"], r["head_dim"], r["causal"], r["n"]), {})[r["impl"]] = r
    speed = []
    for (dtype, d, causal, n), impls in sorted(by_case.items()):
        if d != head_dim or n < min_n or "ours" not in impls or "sdpa_flash" not in impls:
            continue
        ratio = impls["ours"]["tflops"] / impls["sdpa_flash"]["tflops"]
        speed.append(dict(dtype=dtype, head_dim=d, causal=causal, n=n,
                          ours_tflops=impls["ours"]["tflops"],
                          sdpa_flash_tflops=impls["sdpa_flash"]["tflops"], ratio=ratio,
                          meets=ratio >= min_ratio))
    memory = []
    cases = sorted({k[:3] for k in by_case})
    for dtype, d, causal in cases:
        per_token = [(n, impls["ours"]["peak_bytes"] / n)
                     for (dt, dd, c, n), impls in sorted(by_case.items())
                     if (dt, dd, c) == (dtype, d, causal) and "ours" in impls]
        if per_token:
            values = [b for _, b in per_token]
            spread = max(values) / min(values) if min(values) > 0 else math.inf
            memory.append(dict(dtype=dtype, head_dim=d, causal=causal, bytes_per_token=per_token,
                               spread=spread))
    return dict(speed=speed, memory=memory)

"""What each process of a parallel run does: one function per mode.

Each task runs on every rank with the same keyword arguments and returns a
JSON-able dict (this rank's view). ``python -m llmopt_lab parallel MODE``
(under torchrun) and :func:`llmopt_lab.parallel.launch` both call them, so
the notebook, the benchmark, the tests and a user's terminal run the same
code. Every task that changes the model also runs the unchanged model in
the same process first, so its result carries its own check (same greedy
tokens, logits within tolerance) without trusting a second run elsewhere.
"""

from __future__ import annotations

import time

import torch

from ..errors import ParallelError
from .comm import Comm, device_for

DEFAULT_PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def",
                   "for i in range(10):"]


def _load(model_name: str, device, quant: str | None = None, group_size: int = 64):
    from ..weights import load_model

    model, tok = load_model(model_name, device=device, dtype=torch.float32)
    if quant in (None, "none"):
        return model, tok
    from ..transforms.quantize import quantize

    if quant == "int4":
        return quantize(model, "int4", group_size=group_size), tok
    if quant == "int8":
        return quantize(model, "int8"), tok
    raise ParallelError(f"quant must be 'none', 'int8' or 'int4', got {quant!r}")


def _prompt_ids(prompts, tok) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tok is None:
                raise ParallelError("text prompts need a model with a tokenizer")
            out.append(tok(p).input_ids)
        else:
            out.append([int(t) for t in p])
    return out


def _greedy(model, ids, n: int) -> list[list[int]]:
    from ..generate import generate

    return generate(model, ids, n, ignore_eos=True).tolist()


@torch.inference_mode()
def _last_logits(model, ids) -> torch.Tensor:
    from ..generate import pad_prompts

    x, lengths = pad_prompts(ids, device=model.device)
    logits = model(x, lengths=lengths)  # (B, T, V)
    return logits[torch.arange(len(ids)), lengths - 1].float()


def tensor_parallel_task(comm: Comm, model: str = "llmopt-tiny", prompts=None,
                         max_new_tokens: int = 16, quant: str | None = None, group_size: int = 64,
                         repeats: int = 3) -> dict:
    """Generate with the model sharded over the group; the same prompts with
    the whole model first (in this process) as the reference.

    Returns tokens (TP), reference_tokens, max_logit_diff (TP vs whole, last
    prompt token, fp32), kv_bytes_per_token on this rank vs whole, the
    time of one TP generation split into communication (all-reduce and
    all-gather calls, waited for) and the rest (compute), and the time of
    the same generation by the whole model in this process
    (reference_seconds; medians of ``repeats``)."""
    from ..cache import kv_cache_bytes
    from .tensor import apply_tensor_parallel

    dev = device_for(comm)
    m, tok = _load(model, dev, quant, group_size)
    ids = _prompt_ids(prompts or DEFAULT_PROMPTS, tok)
    ref_tokens = _greedy(m, ids, max_new_tokens)
    ref_logits = _last_logits(m, ids)
    ref_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _greedy(m, ids, max_new_tokens)
        ref_times.append(time.perf_counter() - t0)
    ref_times.sort()
    full_kv = kv_cache_bytes(m.config, 1, 1, "float32")
    apply_tensor_parallel(m, comm)
    logits = _last_logits(m, ids)
    tokens = _greedy(m, ids, max_new_tokens)  # also the warm-up
    times, comm_times, calls = [], [], 0
    for _ in range(repeats):
        comm.stats.reset()
        comm.barrier()
        t0 = time.perf_counter()
        _greedy(m, ids, max_new_tokens)
        times.append(time.perf_counter() - t0)
        comm_times.append(comm.stats.total_seconds)
        calls = comm.stats.total_calls
        last_stats = comm.stats.as_dict()
    k = sorted(range(repeats), key=lambda i: times[i])[repeats // 2]
    return {"rank": comm.rank, "world_size": comm.world_size, "tokens": tokens,
            "reference_tokens": ref_tokens, "same_tokens": tokens == ref_tokens,
            "max_logit_diff": float((logits - ref_logits).abs().max()),
            "kv_bytes_per_token": kv_cache_bytes(m.config, 1, 1, "float32"),
            "kv_bytes_per_token_whole": full_kv, "seconds": times[k], "comm_seconds": comm_times[k],
            "compute_seconds": times[k] - comm_times[k], "comm_calls": calls, "comm": last_stats,
            "reference_seconds": ref_times[len(ref_times) // 2],
            "generated_tokens": len(ids) * max_new_tokens, "config": m.config.name}


def pipeline_task(comm: Comm, model: str = "llmopt-tiny", prompts=None, max_new_tokens: int = 16,
                  micro_batches=(1,), repeats: int = 3) -> dict:
    """Generate through a pipeline of ``world_size`` stages for each number
    of micro-batches in ``micro_batches``; the reference is the whole model's
    greedy generation (no EOS stop) in this process.

    Returns per micro-batch count: tokens, same_tokens, this stage's
    compute and wall seconds and its bubble (median of ``repeats`` runs),
    next to the formula's (p - 1) / (m + p - 1)."""
    from .pipeline import bubble_fraction, make_stage, pipeline_generate

    dev = device_for(comm)
    m, tok = _load(model, dev)
    ids = _prompt_ids(prompts or DEFAULT_PROMPTS, tok)
    ref = _greedy(m, ids, max_new_tokens)
    make_stage(m, comm.rank, comm.world_size)
    runs = {}
    for mb in (micro_batches if isinstance(micro_batches, (list, tuple)) else [micro_batches]):
        out = pipeline_generate(m, comm, ids, max_new_tokens, micro_batches=mb)  # warm-up
        rs = []
        for _ in range(repeats):
            comm.stats.reset()
            rs.append(pipeline_generate(m, comm, ids, max_new_tokens, micro_batches=mb))
        rs.sort(key=lambda r: r["wall_s"])
        r = rs[len(rs) // 2]
        runs[str(mb)] = {"tokens": out["tokens"], "same_tokens": out["tokens"] == ref,
                         "compute_s": r["compute_s"], "wall_s": r["wall_s"], "bubble": r["bubble"],
                         "formula": bubble_fraction(comm.world_size, mb),
                         "comm_seconds": r["comm"]["total_seconds"]}
    return {"rank": comm.rank, "world_size": comm.world_size, "layers": list(m.pipeline.layers),
            "reference_tokens": ref, "runs": runs}


def data_parallel_task(comm: Comm, model: str = "llmopt-tiny", prompts=None,
                       max_new_tokens: int = 16) -> dict:
    """Serve the prompts with one engine per rank (round robin); the
    reference is one engine serving all of them in this process."""
    from ..sampling import SamplingParams
    from ..serving import Engine
    from .data import data_parallel_generate

    dev = device_for(comm)
    m, tok = _load(model, dev)
    ids = _prompt_ids(prompts or DEFAULT_PROMPTS, tok)
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    ref = [list(o.token_ids) for o in Engine(m).generate(ids, params)]
    out = data_parallel_generate(m, comm, ids, params)
    tokens = [o["token_ids"] for o in out["outputs"]]
    return {"rank": comm.rank, "world_size": comm.world_size, "tokens": tokens,
            "same_tokens": tokens == ref, "served": out["served"], "seconds": out["seconds"],
            "served_by": [o["rank"] for o in out["outputs"]]}


def allreduce_task(comm: Comm, sizes=(1024, 16384, 262144, 1048576), repeats: int = 10,
                   rounds: int = 9) -> dict:
    """Seconds per all-reduce of float32 tensors of each size (elements)
    over the group: the median of ``rounds`` rounds of ``repeats`` back-to-back calls;
    the model latency + bytes / bandwidth is fitted by the caller."""
    dev = device_for(comm)
    out = {}
    for n in sizes:
        t = torch.ones(int(n), device=dev)
        for _ in range(3):  # warm-up
            comm.all_reduce(t)
        times = []
        for _ in range(rounds):  # the median of rounds of back-to-back calls: the ranks'
            comm.barrier()  # skew leaving the barrier is paid once per round, not per call
            comm.stats.reset()
            for _ in range(repeats):
                comm.all_reduce(t)
            times.append(comm.stats.total_seconds / repeats)
        times.sort()
        out[str(int(n))] = times[len(times) // 2]
    return {"rank": comm.rank, "world_size": comm.world_size, "backend": comm.backend,
            "seconds": out}


TASKS = {"tp": tensor_parallel_task, "pp": pipeline_task, "dp": data_parallel_task,
         "allreduce": allreduce_task}

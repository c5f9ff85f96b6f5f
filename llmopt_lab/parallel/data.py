"""Data parallelism for serving: replicas that serve disjoint requests.

Every rank holds the whole model and its own engine; request i goes to rank
``i % world_size`` (round robin), each rank runs its share to completion,
and the outputs are gathered back in request order. Nothing is exchanged
while generating: throughput grows with the replicas as long as the load
splits evenly; latency of one request does not improve at all, and every
replica pays the whole model's memory (which is why tensor and pipeline
parallelism exist).
"""

from __future__ import annotations

import time

from ..errors import ParallelError
from .comm import Comm

__all__ = ["shard_requests", "data_parallel_generate"]


def shard_requests(num_requests: int, rank: int, world: int) -> list[int]:
    """The request indices rank ``rank`` serves: rank, rank + world, ...
    Raises ParallelError for a rank outside 0..world-1."""
    if not 0 <= rank < world:
        raise ParallelError(f"rank {rank} is not in 0..{world - 1}")
    return list(range(rank, num_requests, world))


def data_parallel_generate(model, comm: Comm, prompts, params=None, tokenizer=None,
                           **engine_options) -> dict:
    """Serve ``prompts`` (the same list on every rank) with one
    :class:`~llmopt_lab.serving.Engine` per rank.

    params: one SamplingParams for all prompts or one per prompt.
    engine_options: passed to the Engine (policy, num_blocks, ...).
    Returns, on every rank: ``outputs`` (per prompt, in order: a dict with
    token_ids, finish_reason and the rank that served it), ``seconds`` (each
    rank's time in its own generate, in rank order) and ``served`` (requests
    per rank). Raises ServingError as Engine.generate does.
    """
    from ..serving import Engine

    prompts = list(prompts)
    if not prompts:
        raise ParallelError("data_parallel_generate needs at least one prompt")
    mine = shard_requests(len(prompts), comm.rank, comm.world_size)
    if params is not None and not hasattr(params, "max_new_tokens"):
        params = list(params)
        if len(params) != len(prompts):
            raise ParallelError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        params = [params[i] for i in mine]
    local = []
    t0 = time.perf_counter()
    if mine:
        engine = Engine(model, tokenizer, **engine_options)
        outs = engine.generate([prompts[i] for i in mine], params)
        local = [(i, {"token_ids": list(o.token_ids), "finish_reason": o.finish_reason,
                      "rank": comm.rank}) for i, o in zip(mine, outs)]
    seconds = time.perf_counter() - t0
    gathered = comm.gather_objects({"outputs": local, "seconds": seconds})
    outputs = [None] * len(prompts)
    for part in gathered:
        for i, out in part["outputs"]:
            outputs[i] = out
    return {"outputs": outputs, "seconds": [g["seconds"] for g in gathered],
            "served": [len(g["outputs"]) for g in gathered]}

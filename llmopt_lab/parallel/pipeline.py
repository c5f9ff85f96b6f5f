"""Pipeline parallelism: the model cut into stages of consecutive layers.

Stage s of p keeps layers ``[a_s, b_s)`` (:func:`partition_layers`) and the
KV cache of those layers only; stage 0 embeds the tokens, the last stage
applies the final norm and the head. Activations (N, hidden) travel from
stage to stage with point-to-point send/recv; the last stage sends the
chosen tokens back to stage 0, which needs them to embed the next step.

**Micro-batches and the bubble.** With one batch, stage s waits for stages
0..s-1 before it can start: p stages, each busy 1/p of the time. Cut the
batch into m micro-batches and stage 0 starts micro-batch 2 while stage 1
works on micro-batch 1 (GPipe's schedule, forward only). With equal stage
times t per micro-batch the run takes (m + p - 1) t, of which each stage is
busy m t: the idle share, the *bubble*, is

    bubble = (p - 1) / (m + p - 1)          (:func:`bubble_fraction`)

In generation the pipeline stays full in steady state when m >= p: while the
last stage finishes micro-batch j's token, stage 0 already runs micro-batch
j + 1 of the same step.

A stage here is an ordinary :class:`~llmopt_lab.model.Transformer` whose
``layers`` are the stage's slice (renumbered from 0, so its KV cache holds
only its layers) and whose ``config.num_layers`` says so; it runs its slice
with ``step_hidden(step, kv, hidden=..., final_norm=...)``. Each stage keeps
the embedding table (the last stage needs it for the tied head; dropping it
from middle stages would save vocabulary x hidden elements each).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..cache import StaticCache
from ..errors import ParallelError
from ..generate import check_token_ids, pad_prompts, token_id_lists
from .comm import Comm

__all__ = ["partition_layers", "make_stage", "StageInfo", "pipeline_generate", "bubble_fraction"]


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """The idle share of a forward-only pipeline with equal stage times:
    (p - 1) / (m + p - 1). Raises ParallelError for counts that are not
    integers >= 1."""
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (stages, micro_batches)) \
            or stages < 1 or micro_batches < 1:
        raise ParallelError(f"stages and micro-batches must be integers >= 1, got {stages!r}, "
                            f"{micro_batches!r}")
    return (stages - 1) / (micro_batches + stages - 1)


def partition_layers(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous [a, b) layer ranges, as equal as possible (earlier stages
    take the extra layer). Raises ParallelError when there are fewer layers
    than stages or counts that are not integers."""
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (num_layers, stages)):
        raise ParallelError(f"num_layers and stages must be integers, got {num_layers!r}, {stages!r}")
    if stages < 1 or num_layers < stages:
        raise ParallelError(f"cannot cut {num_layers} layers into {stages} pipeline stages: "
                            "each stage needs at least one layer")
    base, extra = divmod(num_layers, stages)
    out, a = [], 0
    for s in range(stages):
        b = a + base + (1 if s < extra else 0)
        out.append((a, b))
        a = b
    return out


@dataclass
class StageInfo:
    """Where a pipeline stage sits: its index, the number of stages, its
    [a, b) layer range in the full model and the full model's config.

    Raises: nothing; a plain record (:func:`make_stage` raises ParallelError).
    """

    stage: int
    num_stages: int
    layers: tuple[int, int]
    full_config: object

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


def _slice_field(values, a: int, b: int):
    return None if values is None else tuple(values[a:b])


@torch.no_grad()
def make_stage(model, stage: int, num_stages: int, layers: tuple[int, int] | None = None):
    """Cut ``model`` in place down to stage ``stage`` of ``num_stages`` and
    return it: layers ``layers`` (default: :func:`partition_layers`),
    renumbered from 0; ``model.config`` describes the stage
    (``num_layers = b - a``, per-layer fields sliced); ``model.pipeline``
    is its :class:`StageInfo`. Raises ParallelError for a stage outside
    0..num_stages-1, for an empty layer range or a model already cut."""
    if getattr(model, "pipeline", None) is not None:
        raise ParallelError("this model is already a pipeline stage")
    if not 0 <= stage < num_stages:
        raise ParallelError(f"stage {stage} is not in 0..{num_stages - 1}")
    cfg = model.config
    a, b = layers if layers is not None else partition_layers(cfg.num_layers, num_stages)[stage]
    if not 0 <= a < b <= cfg.num_layers:
        raise ParallelError(f"layer range {a}:{b} is not a non-empty part of {cfg.num_layers} layers")
    kept = list(model.layers[a:b])
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    model.layers = torch.nn.ModuleList(kept)
    model.config = cfg.replace(
        num_layers=b - a, layer_types=_slice_field(cfg.layer_types, a, b),
        layer_num_heads=_slice_field(cfg.layer_num_heads, a, b),
        layer_intermediate_sizes=_slice_field(cfg.layer_intermediate_sizes, a, b),
        name=f"{cfg.name} (pipeline stage {stage} of {num_stages}: layers {a}:{b})")
    model.pipeline = StageInfo(stage, num_stages, (a, b), cfg)
    return model


@torch.inference_mode()
def pipeline_generate(stage_model, comm: Comm, prompts, max_new_tokens: int,
                      micro_batches: int = 1) -> dict:
    """Greedy generation through a pipeline of ``comm.world_size`` stages.

    Every rank calls it with its stage (:func:`make_stage` with
    ``stage = comm.rank``) and the same prompts (token id lists). The batch
    is cut into ``micro_batches`` groups of rows that flow
    through the stages one after another; each group has its own KV cache
    on every stage. Exactly ``max_new_tokens`` tokens are generated per
    prompt (no stop at EOS), so the result equals
    ``generate(full_model, prompts, max_new_tokens, ignore_eos=True)``.
    Micro-batch j holds prompts j, j + m, j + 2m, ... (m = micro_batches).

    Returns, on every rank: ``tokens`` (one list per prompt), ``compute_s``
    (seconds this stage spent computing), ``wall_s`` (between barriers before
    the first step and after the last, the same on every stage), ``bubble`` (1 -
    compute / wall on this stage) and ``comm`` (its :class:`CommStats`).
    Raises ParallelError when the model is not a stage of this group, for
    more micro-batches than prompts; GenerationError for bad prompts (text,
    ids that are not integers or lie outside the vocabulary).
    """
    info: StageInfo | None = getattr(stage_model, "pipeline", None)
    if info is None or info.num_stages != comm.world_size or info.stage != comm.rank:
        raise ParallelError("pipeline_generate needs this rank's stage: make_stage(model, "
                            "comm.rank, comm.world_size) on every rank")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ParallelError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    prompts = token_id_lists(prompts)
    if not prompts:
        raise ParallelError("pipeline_generate needs at least one prompt")
    check_token_ids(prompts, info.full_config.vocab_size)
    if not 1 <= micro_batches <= len(prompts):
        raise ParallelError(f"micro_batches must be between 1 and the {len(prompts)} prompts, "
                            f"got {micro_batches}")
    device, dtype = stage_model.device, stage_model.dtype
    H = info.full_config.hidden_size
    prev, nxt, last = comm.rank - 1, comm.rank + 1, comm.world_size - 1
    groups = [list(range(len(prompts)))[j::micro_batches] for j in range(micro_batches)]
    groups = [g for g in groups if g]
    mbs = []
    for rows in groups:
        ids, lengths = pad_prompts([prompts[i] for i in rows], device=device)
        total = int(lengths.max()) + max_new_tokens
        cache = StaticCache(stage_model.config, len(rows), total, device=device, dtype=dtype)
        mbs.append({"rows": rows, "ids": ids, "lengths": lengths, "cache": cache,
                    "next": None, "out": [[] for _ in rows]})
    pending = []
    compute = 0.0
    comm.barrier()
    t_start = time.perf_counter()
    for t in range(max_new_tokens):
        for mb in mbs:
            B = len(mb["rows"])
            if t == 0:
                ids = mb["ids"]
                T = ids.shape[1]
                positions = torch.arange(T, device=device).expand(B, T)
                valid = positions < mb["lengths"][:, None]
            else:
                if info.is_first and not info.is_last:
                    mb["next"] = comm.recv((B,), torch.long, last, device)
                ids = mb["next"][:, None] if info.is_first else torch.zeros(B, 1, dtype=torch.long,
                                                                            device=device)
                positions = (mb["lengths"] + t - 1)[:, None]
                valid = None
            N = ids.numel()
            hidden = None if info.is_first else comm.recv((N, H), dtype, prev, device)
            t0 = time.perf_counter()
            step = mb["cache"].rect_step(ids, positions, valid)
            x = stage_model.step_hidden(step, mb["cache"], hidden=hidden, final_norm=info.is_last)
            if info.is_last:
                x = x.view(B, -1, H)
                pick = mb["lengths"] - 1 if t == 0 else torch.zeros_like(mb["lengths"])
                logits = stage_model.lm_head(x[torch.arange(B, device=device), pick])  # (B, V)
                tokens = logits.float().argmax(-1)
                for i, tok in enumerate(tokens.tolist()):
                    mb["out"][i].append(tok)
                mb["next"] = tokens
            compute += time.perf_counter() - t0
            if not info.is_last:
                pending.append(comm.send(x, nxt))
            elif not info.is_first and t + 1 < max_new_tokens:
                pending.append(comm.send(tokens, 0))
    for p in pending:
        p.wait()
    comm.barrier()  # a common end: a stage that finished early was idle until here
    wall = time.perf_counter() - t_start
    result = [None] * len(prompts)
    if info.is_last:
        for mb in mbs:
            for i, row in enumerate(mb["rows"]):
                result[row] = mb["out"][i]
    gathered = comm.gather_objects(result if info.is_last else None)
    tokens = gathered[last]
    return {"tokens": tokens, "compute_s": compute, "wall_s": wall,
            "bubble": max(0.0, 1.0 - compute / wall) if wall > 0 else 0.0,
            "comm": comm.stats.as_dict(), "micro_batches": len(mbs), "stage": info.stage,
            "layers": list(info.layers)}

"""``python -m llmopt_lab parallel MODE``: one process of a parallel run.

Run it under torchrun, one process per rank (gloo on CPU, NCCL on GPUs):

    torchrun --nproc-per-node 2 -m llmopt_lab parallel tp --model llmopt-tiny
    torchrun --nproc-per-node 2 -m llmopt_lab parallel pp --micro-batches 1 2 4
    torchrun --nproc-per-node 2 -m llmopt_lab parallel dp
    torchrun --nproc-per-node 2 -m llmopt_lab parallel allreduce

Rank 0 prints a summary; ``--json-out DIR`` writes every rank's result to
``DIR/rank<r>.json`` (that is how :func:`llmopt_lab.parallel.launch` reads
them back).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("mode", choices=["tp", "pp", "dp", "allreduce"],
                   help="tp: tensor parallel, pp: pipeline, dp: data parallel, "
                        "allreduce: time the collective")
    p.add_argument("--model", default="llmopt-tiny", help="zoo name or checkpoint folder")
    p.add_argument("--prompt", action="append", default=None,
                   help="a text prompt (repeat for a batch; default: four code prompts)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=16)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2],
                   help="pp: numbers of micro-batches to run")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                   help="tp: quantize the weights before sharding")
    p.add_argument("--group-size", type=int, default=64, help="tp with int4: the group size")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                   help="default: nccl with CUDA, else gloo")
    p.add_argument("--json-out", default=None, help="write rank<r>.json into this folder")
    p.add_argument("--kwargs", default=None, help="(for launch) the task's arguments as JSON")


def _summary(mode: str, res: dict) -> str:
    if mode == "tp":
        return (f"TP={res['world_size']}: same greedy tokens as one process: {res['same_tokens']}; "
                f"max |logit diff| {res['max_logit_diff']:.2e}; {res['generated_tokens']} tokens in "
                f"{res['seconds']:.3f} s, of which {res['comm_seconds']:.3f} s in "
                f"{res['comm_calls']} collectives")
    if mode == "pp":
        lines = [f"PP={res['world_size']}, stage 0 holds layers {res['layers'][0]}:{res['layers'][1]}"]
        for mb, r in res["runs"].items():
            lines.append(f"  {mb} micro-batch(es): same tokens {r['same_tokens']}, wall "
                         f"{r['wall_s']:.3f} s, bubble {r['bubble']:.2f} (formula {r['formula']:.2f})")
        return "\n".join(lines)
    if mode == "dp":
        return (f"DP={res['world_size']}: same tokens as one engine: {res['same_tokens']}; "
                f"requests per rank {res['served']}")
    return "all-reduce seconds by size: " + ", ".join(
        f"{n}: {s * 1e6:.0f} us" for n, s in res["seconds"].items())


def run(args) -> int:
    try:
        return _run(args)
    except BaseException:
        if args.json_out:  # what launch() reports when this rank fails
            import traceback

            Path(args.json_out).mkdir(parents=True, exist_ok=True)
            rank = os.environ.get("RANK", "0")
            (Path(args.json_out) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def _run(args) -> int:
    from ..errors import ParallelError
    from .comm import init_from_env
    from .tasks import TASKS

    # the arguments first: a bad one is named before any process group is joined
    if args.kwargs:
        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as e:
            raise ParallelError(f"--kwargs must be a JSON object of the task's arguments, got "
                                f"{args.kwargs[:60]!r} ({e.msg})") from None
        if not isinstance(kwargs, dict):
            raise ParallelError(f"--kwargs must be a JSON object (a dict), got {args.kwargs[:60]!r}")
    else:
        if args.max_new_tokens < 1:
            raise ParallelError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.mode == "pp" and min(args.micro_batches) < 1:
            raise ParallelError(f"--micro-batches must be >= 1, got {args.micro_batches}")
    backend = args.backend or os.environ.get("LLMOPT_PARALLEL_BACKEND") or None
    comm = init_from_env(backend)
    if not args.kwargs:
        kwargs = {} if args.mode == "allreduce" else {"model": args.model, "prompts": args.prompt,
                                                       "max_new_tokens": args.max_new_tokens}
        if args.mode == "pp":
            kwargs["micro_batches"] = args.micro_batches
        if args.mode == "tp":
            kwargs.update(quant=args.quant, group_size=args.group_size)
    try:
        res = TASKS[args.mode](comm, **kwargs)
        if args.json_out:
            Path(args.json_out).mkdir(parents=True, exist_ok=True)
            tmp = Path(args.json_out) / f".rank{comm.rank}.json.tmp"
            tmp.write_text(json.dumps(res))
            tmp.replace(Path(args.json_out) / f"rank{comm.rank}.json")
        if comm.rank == 0:
            print(_summary(args.mode, res), flush=True)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:  # tear down together: a rank that leaves first can make the other's gloo abort
                dist.barrier()
            finally:
                dist.destroy_process_group()
    return 0

"""One rank of the composition test "tensor parallelism x int8 weights x the
engine" (tests/test_composition.py starts two of these under torchrun, gloo).

Every rank builds the same synthetic model, serves the workload through
``Recipe(weights="int8", kv_dtype="int8", prefix_caching=True, tp=2).build(model,
comm=comm)`` and, in the same process, through the same recipe at tp=1 as the
reference, then writes its tokens to ``OUT/rank<r>.json``.

Usage (what the test runs)::

    python -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 \\
        --master-port PORT tests/recipe_tp_worker.py OUT
"""

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # conftest's scaled_model

from conftest import scaled_model  # noqa: E402
from llmopt_lab import Recipe, SamplingParams, preset  # noqa: E402
from llmopt_lab.parallel import init_from_env  # noqa: E402


def workload(vocab: int, n: int = 6):
    rng = random.Random(3)
    shared = [rng.randrange(1, vocab) for _ in range(20)]
    prompts = [shared + [rng.randrange(1, vocab) for _ in range(rng.randint(1, 12))]
               for _ in range(n)]
    return prompts, SamplingParams(max_new_tokens=8, ignore_eos=True)


def serve(engine, prompts, params) -> list[list[int]]:
    # the first request alone, then the rest: they find its prefix blocks cached
    outs = engine.generate(prompts[:1], params) + engine.generate(prompts[1:], params)
    engine.check_drained()
    return [o.token_ids for o in outs]


def main(out: str) -> None:
    torch.set_num_threads(1)
    comm = init_from_env(backend="gloo")
    try:
        run(comm, out)
    finally:  # leave together: a rank that exits first can make the other's gloo abort
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def run(comm, out: str) -> None:
    model = scaled_model(preset("tiny"), seed=5)
    prompts, params = workload(model.config.vocab_size)
    one = Recipe(weights="int8", kv_dtype="int8", prefix_caching=True, num_blocks=64)
    _, engine = one.build(model)
    ref = serve(engine, prompts, params)
    served, engine = replace(one, tp=2).build(model, comm=comm)
    tokens = serve(engine, prompts, params)
    res = {"rank": comm.rank, "tokens": tokens, "reference": ref,
           "sharded_heads": served.config.num_heads, "full_heads": model.config.num_heads,
           "cached": engine.stats.prompt_tokens_cached, "comm_calls": comm.stats.total_calls}
    Path(out, f"rank{comm.rank}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1])

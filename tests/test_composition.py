"""Issue 23: the optimizations of the course, stacked (through :class:`Recipe`).

Two kinds of technique, two kinds of check:

* exact ones (paged KV, continuous / static batching, prefix caching,
  chunked prefill, speculative decoding, tensor parallelism) change how the
  work is scheduled and stored, never what is computed: every request served
  by a stack of them gets exactly the greedy tokens that plain ``generate``
  gives it alone on the same (transformed) model with the same KV storage;
* lossy ones (int8 weights, int8 KV) change the numbers: they are compared
  with the float model teacher-forced (same context for both, on the lossy
  model's own greedy path), within the budgets stated below.

Because every engine stack equals its ``generate`` reference token for token,
the lossy budgets measured on ``generate`` hold for the engine's outputs too.

The model is a synthetic "tiny" (4 layers, 128 wide) with its matrices
scaled (conftest.scaled_model) so that greedy choices are rarely near-ties;
the workload is 32 requests of varied prompt lengths, three quarters of them
behind one of three shared prefixes (20, 35, 50 tokens), so the prefix cache
hits.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import scaled_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmopt_lab import Recipe, SamplingParams, generate, preset  # noqa: E402
from llmopt_lab.errors import ServingError  # noqa: E402
from llmopt_lab.parallel import free_port  # noqa: E402
from llmopt_lab.speculative import speculative_generate  # noqa: E402

N_REQUESTS = 32

# ---------------------------------------------------------------- budgets
# Teacher-forced comparison with the float model over the 32 requests' new
# tokens (276 positions). Measured on this workload's generator for model
# seeds 5, 11, 21, 33 x workload seeds 0, 1 (8 runs; the test uses 5 / 0):
#   int8 weights:           top-1 agreement 0.928-0.949, mean KL 3.7e-4-4.3e-4 nats
#   int8 KV:                top-1 agreement 0.971-0.984, mean KL 6.1e-5-7.1e-5 nats
#   int8 weights + int8 KV: top-1 agreement 0.912-0.967, mean KL 4.2e-4-5.2e-4 nats
# Each bound sits 2-3 points of agreement below the worst run and 2-3x above
# its KL. What they reject, measured the same way: int4 (group 64) weights
# give 0.40 / 6.8e-2 nats; int8 with one layer's scales 1.5x too large gives
# 0.53 / 3.6e-2 nats.
# The agreement is below 1 although the KL is tiny because a random model's
# next-token distributions are flat: its top two logits are often within
# the int8 rounding noise.
BUDGETS = {  # name: (min top-1 agreement, max mean KL(float || lossy) in nats)
    "int8_weights": (0.90, 1e-3),
    "int8_kv": (0.95, 2e-4),
    "int8_weights+int8_kv": (0.88, 1.2e-3),
}


@pytest.fixture(scope="module")
def model():
    return scaled_model(preset("tiny"), seed=5)


@pytest.fixture(scope="module")
def qmodel(model):
    return Recipe(weights="int8").transform(model)


@pytest.fixture(scope="module")
def workload(model):
    rng = random.Random(0)
    V = model.config.vocab_size
    prefixes = [[rng.randrange(1, V) for _ in range(n)] for n in (20, 35, 50)]
    prompts, params = [], []
    for i in range(N_REQUESTS):
        prefix = prefixes[i % 3] if i % 4 else []
        prompts.append(prefix + [rng.randrange(1, V) for _ in range(rng.randint(1, 24))])
        params.append(SamplingParams(max_new_tokens=rng.randint(4, 14), ignore_eos=True))
    return prompts, params


class References:
    """Plain ``generate``, one request at a time, per (weights, KV storage);
    computed once per module and shared by the exact and the lossy tests."""

    def __init__(self, models, workload):
        self.models, self.workload, self._memo = models, workload, {}

    def get(self, weights: str, kv: str):
        key = (weights, kv)
        if key not in self._memo:
            m = self.models[weights]
            cache = {"int8": {"cache": "int8"}, "auto": {}}[kv]
            toks, logits = [], []
            for p, sp in zip(*self.workload):
                g = generate(m, [p], params=sp, return_logits=True, **cache)
                toks.append(g.tolist()[0])
                logits.append(g.logits[0, :len(toks[-1])].float())
            self._memo[key] = (toks, logits)
        return self._memo[key]


@pytest.fixture(scope="module")
def refs(model, qmodel, workload):
    return References({"float": model, "int8": qmodel}, workload)


def _stack(**options) -> Recipe:
    # a KV budget that holds 8 running requests (no default 256 MiB pool per engine)
    return Recipe(num_blocks=160, block_size=8, max_num_seqs=8, **options)


# --------------------------------------------------------- exact, pairwise
# Paged KV is in every engine. Chunked prefill is switched off where it is
# not part of the pair, so each case stacks exactly the two named techniques.
PAIRS = {
    "int8w+paged": _stack(weights="int8", chunked_prefill=False),
    "int8w+int8kv": _stack(weights="int8", kv_dtype="int8", chunked_prefill=False),
    "int8w+prefix": _stack(weights="int8", prefix_caching=True, chunked_prefill=False),
    "int8w+static": _stack(weights="int8", policy="static"),
    "int8w+chunked": _stack(weights="int8", max_num_batched_tokens=24),
    "int8kv+prefix": _stack(kv_dtype="int8", prefix_caching=True, chunked_prefill=False),
    "int8kv+static": _stack(kv_dtype="int8", policy="static"),
    "int8kv+chunked": _stack(kv_dtype="int8", max_num_batched_tokens=24),
    "prefix+continuous": _stack(prefix_caching=True, chunked_prefill=False),
    "prefix+static": _stack(prefix_caching=True, policy="static"),
    "prefix+chunked": _stack(prefix_caching=True, max_num_batched_tokens=24),
    "continuous+chunked": _stack(max_num_batched_tokens=24),
    "static": _stack(policy="static"),
}
FULL_STACK = _stack(weights="int8", kv_dtype="int8", prefix_caching=True, policy="continuous",
                    chunked_prefill=True, max_num_batched_tokens=24)


def _serve(recipe: Recipe, model, workload):
    prompts, params = workload
    served, engine = recipe.build(model)
    outs = engine.generate(prompts, params)
    engine.check_drained()  # no block leaked, whatever the stack
    assert all(o.finished and o.finish_reason == "length" for o in outs)
    return [o.token_ids for o in outs], engine


@pytest.mark.parametrize("name", list(PAIRS))
def test_each_pair_gives_every_request_its_plain_generate_tokens(name, model, workload, refs):
    recipe = PAIRS[name]
    tokens, engine = _serve(recipe, model, workload)
    ref, _ = refs.get(recipe.weights or "float", recipe.kv_dtype)
    mismatched = [i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b]
    assert not mismatched, f"{name}: requests {mismatched} differ from generate alone"
    if recipe.prefix_caching:  # the shared prefixes were served from the cache
        assert engine.stats.prompt_tokens_cached > 0
    if recipe.chunked_prefill is not False and recipe.policy == "continuous":
        longest = max(len(p) for p in workload[0])
        assert longest > recipe.max_num_batched_tokens  # some prompt was really split


def test_static_batching_cannot_take_chunked_prefill():
    # the one illegal pair among these techniques: refused with the reason
    with pytest.raises(ServingError, match="chunked prefill needs the continuous policy"):
        _stack(policy="static", chunked_prefill=True).validate()


def test_full_stack_on_32_requests_equals_generate_on_the_same_storage(model, workload, refs):
    tokens, engine = _serve(FULL_STACK, model, workload)
    ref, _ = refs.get("int8", "int8")
    assert tokens == ref
    assert len(tokens) >= 32 and engine.stats.prompt_tokens_cached >= 100  # the prefix cache hit
    assert max(len(p) for p in workload[0]) > 24  # and chunked prefill split prompts


# ------------------------------------------------------------------ lossy
def _teacher_forced(float_model, workload, toks, logits):
    """(top-1 agreement, mean KL(float || lossy)) over every new token: the
    float model reads the lossy run's own context (prompt + its tokens)."""
    agree = total = 0
    kl = 0.0
    with torch.no_grad():
        for p, t, lq in zip(workload[0], toks, logits):
            lf = float_model(torch.tensor([p + t[:-1]]))[0, len(p) - 1:].float()
            lf, lq = lf.log_softmax(-1), lq.log_softmax(-1)  # (n, V) each
            agree += int((lf.argmax(-1) == lq.argmax(-1)).sum())
            kl += float((lf.exp() * (lf - lq)).sum())
            total += len(t)
    return agree / total, kl / total


@pytest.mark.parametrize("name, weights, kv", [("int8_weights", "int8", "auto"),
                                               ("int8_kv", "float", "int8"),
                                               ("int8_weights+int8_kv", "int8", "int8")])
def test_lossy_storage_stays_within_its_budget_of_the_float_model(name, weights, kv, model,
                                                                   workload, refs):
    toks, logits = refs.get(weights, kv)
    agreement, kl = _teacher_forced(model, workload, toks, logits)
    min_agree, max_kl = BUDGETS[name]
    assert agreement >= min_agree, f"{name}: top-1 agreement {agreement:.3f} < {min_agree}"
    assert kl <= max_kl, f"{name}: mean KL {kl:.2e} nats > {max_kl:.0e}"
    assert kl > 0  # it is lossy: an identical model would mean the transform did nothing


# ------------------------------------------------------------ speculative
@pytest.mark.parametrize("proposer", ["float draft", "prompt lookup"])
def test_speculative_decoding_on_int8_weights_equals_generate(proposer, model, qmodel, workload,
                                                              refs):
    prompts, params = workload
    ref, _ = refs.get("int8", "auto")
    draft = model if proposer == "float draft" else None
    n = max(sp.max_new_tokens for sp in params)
    out = speculative_generate(qmodel, draft, prompts, n, k=4, ignore_eos=True)
    for i, (seq, sp) in enumerate(zip(out.sequences, params)):
        assert seq[:sp.max_new_tokens] == ref[i], f"request {i}"
    if draft is not None:  # the float model mostly agrees with its own int8 copy
        assert out.stats.acceptance_rate > 0.7  # measured 0.85-0.91 over the 8 runs above


def test_speculative_recipe_is_refused_by_the_engine_with_the_reason(model):
    recipe = Recipe(weights="int8", speculative={"draft": "prompt_lookup", "k": 4})
    with pytest.raises(ServingError, match="inside the Engine it is not supported yet"):
        recipe.build(model)


# -------------------------------------------------------- tensor parallel
def test_tensor_parallel_two_ranks_int8_weights_int8_kv_prefix_cache_equal_one_process():
    """TP=2 over gloo (torchrun, two CPU processes) x int8 weights x int8 KV x
    prefix caching, through the engine: the same tokens as tp=1 on every rank."""
    worker = Path(__file__).with_name("recipe_tp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               TORCH_CPP_LOG_LEVEL="ERROR")
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(worker), out]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        res = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    seconds = time.perf_counter() - t0
    for r in res:
        assert r["tokens"] == r["reference"]
        assert r["sharded_heads"] * 2 == r["full_heads"]  # really sharded
        assert r["cached"] > 0 and r["comm_calls"] > 0
    assert res[0]["tokens"] == res[1]["tokens"]
    assert seconds < 120

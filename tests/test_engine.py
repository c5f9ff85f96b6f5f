"""Lesson 10's engine: every policy gives each request the tokens `generate`
gives it alone, under preemption and prefix caching, in any arrival order;
no block leaks; padding and preemptions are counted; bad input is refused."""

import os
import random

import pytest
import torch
from conftest import scaled_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmopt_lab import Engine, SamplingParams, generate, preset  # noqa: E402
from llmopt_lab.errors import GenerationError, LlmoptError, ServingError  # noqa: E402
from llmopt_lab.serving import SchedulerConfig  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return scaled_model(preset("tiny"), seed=11)


def _workload(n, seed, vocab, max_prompt=40, max_new=20):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(1, max_prompt))] for _ in range(n)]
    params = [SamplingParams(max_new_tokens=rng.randint(1, max_new), ignore_eos=True)
              for _ in prompts]
    return prompts, params


def _alone(model, prompts, params):
    return [generate(model, [p], params=sp).tolist()[0] for p, sp in zip(prompts, params)]


@pytest.fixture(scope="module")
def workload(model):
    prompts, params = _workload(10, 0, model.config.vocab_size)
    return prompts, params, _alone(model, prompts, params)


OPTIONS = [
    dict(policy="continuous"),
    dict(policy="continuous", chunked_prefill=False),
    dict(policy="continuous", max_num_batched_tokens=7),  # prompts in many chunks
    dict(policy="continuous", num_blocks=8, block_size=8),  # 64 slots: preemption
    dict(policy="continuous", num_blocks=8, block_size=8, prefix_caching=True),
    dict(policy="static"),
    dict(policy="static", prefix_caching=True),
    dict(policy="dynamic", max_wait_s=0.0),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_each_policy_gives_every_request_its_solo_tokens(model, workload, opts):
    prompts, params, ref = workload
    engine = Engine(model, max_num_seqs=4, **opts)
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == ref
    assert all(o.finished and o.finish_reason == "length" for o in outs)
    engine.block_manager.check_invariants()
    if not opts.get("prefix_caching"):
        engine.check_drained()
    if opts.get("num_blocks") == 8:
        assert engine.stats.preemptions > 0, "the small budget should force preemption"
        assert engine.stats.prompt_tokens_computed > engine.stats.prompt_tokens  # recomputed


def test_arrival_order_does_not_change_outputs(model, workload):
    prompts, params, ref = workload
    order = list(range(len(prompts)))
    random.Random(3).shuffle(order)
    engine = Engine(model, max_num_seqs=3, num_blocks=8, block_size=8)
    outs = engine.generate([prompts[i] for i in order], [params[i] for i in order])
    assert [o.token_ids for o in outs] == [ref[i] for i in order]


def test_requests_joining_mid_flight_match_solo(model, workload):
    prompts, params, ref = workload
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=16)
    ids, finals = {}, {}
    for k, (p, sp) in enumerate(zip(prompts, params)):
        ids[engine.add_request(p, sp)] = k
        for o in engine.step():  # one step between arrivals: requests join a running batch
            if o.finished:
                finals[ids[o.request_id]] = o.token_ids
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                finals[ids[o.request_id]] = o.token_ids
    assert [finals[k] for k in range(len(prompts))] == ref
    engine.check_drained()


def test_no_block_leaks_after_500_random_requests(model):
    rng = random.Random(5)
    prompts, params = _workload(500, 6, model.config.vocab_size, max_prompt=12, max_new=6)
    engine = Engine(model, max_num_seqs=16, num_blocks=12, block_size=4, prefix_caching=True,
                    max_num_batched_tokens=24)
    engine.block_manager.debug = True  # invariants checked after every verb
    pending = list(zip(prompts, params))
    done = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 4)):
            if pending:
                engine.add_request(*pending.pop())
        done += sum(o.finished for o in engine.step())
    assert done == 500
    assert engine.stats.preemptions > 0
    engine.check_drained()  # free or held only by the prefix cache: all free


def test_stop_tokens_and_stream_increments(model):
    prompts, params = _workload(4, 9, model.config.vocab_size)
    ref = _alone(model, prompts, params)
    stop = ref[0][2] if len(ref[0]) > 2 else ref[0][0]
    sp = SamplingParams(max_new_tokens=20, stop_token_ids=[stop])
    engine = Engine(model)
    out = engine.generate([prompts[0]], sp)[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop
    assert out.token_ids == ref[0][:ref[0].index(stop) + 1]
    pieces = {}
    for o in Engine(model).stream(prompts, params):
        pieces.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert [pieces[i] for i in sorted(pieces)] == ref


def test_sampling_is_per_request_and_seeded(model):
    prompts, _ = _workload(4, 2, model.config.vocab_size)
    params = [SamplingParams(max_new_tokens=8, temperature=0.8, top_k=50, seed=100 + i,
                             ignore_eos=True) for i in range(4)]
    a = [o.token_ids for o in Engine(model, max_num_seqs=4).generate(prompts, params)]
    b = [o.token_ids for o in Engine(model, max_num_seqs=1).generate(prompts, params)]
    assert a == b  # a request samples the same tokens in any batch


def test_static_counts_padding_and_continuous_none(model, workload):
    prompts, params, _ = workload
    lens = [len(p) for p in prompts[:4]]
    outs = [sp.max_new_tokens for sp in params[:4]]
    static = Engine(model, policy="static", max_num_seqs=4)
    static.generate(prompts[:4], params[:4])
    # prefill pads to the longest prompt; each finished row pads until the longest output ends
    # (its last sampled token needs no forward: the batch stops at max_tokens - 1 decode steps)
    expect = sum(max(lens) - n for n in lens) + sum(max(outs) - o for o in outs)
    assert static.stats.padding_tokens == expect
    cont = Engine(model, max_num_seqs=4)
    cont.generate(prompts[:4], params[:4])
    assert cont.stats.padding_tokens == 0
    assert cont.stats.prompt_tokens_computed == sum(lens)
    assert cont.stats.generated_tokens == static.stats.generated_tokens == sum(outs)


def test_prefix_cache_serves_shared_prompts(model):
    shared = list(range(1, 33))
    prompts = [shared + [40 + i, 50 + i] for i in range(4)]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    ref = _alone(model, prompts, [params] * 4)
    engine = Engine(model, prefix_caching=True, block_size=8, max_num_seqs=1)
    assert [o.token_ids for o in engine.generate(prompts, params)] == ref
    assert engine.stats.prompt_tokens_cached == 3 * 32  # the last three hit the 4 shared blocks
    assert engine.stats.prompt_tokens_computed == engine.stats.prompt_tokens - 3 * 32


def test_text_prompts_with_a_tokenizer():
    from llmopt_lab import load_model

    model, tok = load_model("llmopt-tiny")
    engine = Engine(model, tok)
    out = engine.generate("def add(a, b):", SamplingParams(max_new_tokens=8))[0]
    ids = tok("def add(a, b):")["input_ids"]
    assert out.prompt_token_ids == ids
    assert out.token_ids == generate(model, [ids], 8).tolist()[0]
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    assert out.first_token_time >= out.arrival_time and out.finish_time >= out.first_token_time


def test_abort_frees_blocks(model):
    engine = Engine(model)
    rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort(rid)
    assert engine.output(rid).finish_reason == "abort"
    engine.check_drained()


@pytest.mark.parametrize("prompt,params,match", [
    ([], None, "empty prompt"),
    ([1, 10**9], None, "outside the vocabulary"),
    ([1.5, 2], None, "integers"),
    ("text", None, "tokenizer"),
    ([1] * 2040, SamplingParams(max_new_tokens=20), "context"),
    ([1, 2], "greedy", "SamplingParams"),
    (torch.ones(2, 2, dtype=torch.long), None, "1-D"),
])
def test_bad_requests_are_refused(model, prompt, params, match):
    engine = Engine(model)
    with pytest.raises(ServingError, match=match):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("opts,match", [
    (dict(policy="fifo"), "unknown batching policy"),
    (dict(policy="static", chunked_prefill=True), "continuous"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(num_blocks=4, kv_bytes=10**6), "not both"),
    (dict(kv_bytes=10), "at least one block"),
    (dict(block_size=0), "block_size"),
    (dict(kv_dtype="fp8"), "kv_dtype"),
    (dict(max_wait_s=-1), "max_wait_s"),
])
def test_bad_engine_options_are_refused(model, opts, match):
    with pytest.raises(ServingError, match=match):
        Engine(model, **opts)


def test_a_request_larger_than_the_budget_is_refused_up_front(model):
    engine = Engine(model, num_blocks=2, block_size=4)
    with pytest.raises(ServingError, match="KV blocks"):
        engine.generate([[1, 2, 3], [1] * 6], SamplingParams(max_new_tokens=4))
    assert not engine.has_unfinished()  # nothing queued when one prompt is refused
    with pytest.raises(ServingError, match="one SamplingParams"):
        engine.generate([[1], [2]], [SamplingParams()])
    with pytest.raises(ServingError, match="no request"):
        engine.abort(99)
    with pytest.raises(GenerationError):
        SamplingParams(max_new_tokens=0)
    assert issubclass(ServingError, LlmoptError)


def test_int8_kv_runs(model, workload):
    prompts, params, ref = workload
    outs = Engine(model, kv_dtype="int8").generate(prompts[:3], params[:3])
    assert all(len(o.token_ids) == sp.max_new_tokens for o, sp in zip(outs, params[:3]))


def test_scheduler_config_defaults():
    assert SchedulerConfig().policy == "continuous"


def test_streamed_text_holds_back_partial_characters():
    """A token that ends inside a UTF-8 character decodes to U+FFFD; the
    stream must wait for the character instead of sending the replacement
    and then the whole text again."""
    from llmopt_lab import load_model
    from llmopt_lab.serving.sequence import Sequence

    model, tok = load_model("llmopt-tiny", device="cpu")
    engine = Engine(model, tok)
    word = "x日本€"
    ids = tok(word).input_ids
    seq = Sequence(request_id=0, prompt=[5], params=SamplingParams(), stop_ids=frozenset(),
                   max_tokens=len(ids), arrival_time=0.0)
    pieces = []
    for t in ids:
        seq.tokens.append(t)
        pieces.append(engine._snapshot(seq, [t]).new_text)
    assert all("\ufffd" not in p for p in pieces), pieces
    assert "".join(pieces) == word
    assert sum(1 for p in pieces if p == "") >= 2  # partial characters were held back
    # a generation that ends inside a character sends what it has
    seq2 = Sequence(request_id=1, prompt=[5], params=SamplingParams(), stop_ids=frozenset(),
                    max_tokens=2, arrival_time=0.0)
    seq2.tokens.append(ids[0])
    first = engine._snapshot(seq2, [ids[0]]).new_text
    seq2.tokens.append(tok("€").input_ids[0])
    engine._finish(seq2, "length", 1.0)
    last = engine._snapshot(seq2, []).new_text
    assert first + last == tok.decode(seq2.output, skip_special_tokens=True)

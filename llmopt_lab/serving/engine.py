"""The serving engine: many requests, one model, one step at a time (lesson 10).

::

    from llmopt_lab import Engine, SamplingParams, load_model
    model, tok = load_model("llmopt-tiny")
    engine = Engine(model, tok, policy="continuous", num_blocks=256)
    outs = engine.generate(["def add(a, b):", "class Stack:"], SamplingParams(max_new_tokens=32))

Each :meth:`Engine.step` asks the scheduler which sequences run
(:mod:`~llmopt_lab.serving.scheduler`), turns them into one packed step
(:mod:`~llmopt_lab.serving.runner`), samples a token for every sequence whose
prompt is complete, and retires those that stop. :meth:`add_request` and
:meth:`step` are what a server's loop calls; :meth:`generate` and
:meth:`stream` drive them for a list of prompts.
"""

from __future__ import annotations

import math
import operator
import os
import time
from dataclasses import dataclass, fields
from typing import Iterator, Sequence as Seq

import torch

from ..cache import KVPool, copy_blocks
from ..cache.block_manager import BlockManager, _blocks_for
from ..cache.pool import Int8KVPool
from ..config import ModelConfig
from ..errors import GenerationError, ServingError
from ..generate import check_token_ids, row_params
from ..sampling import SamplingParams, sample_rows
from .runner import ModelRunner
from .scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from .sequence import RequestOutput, Sequence, Status

#: default KV budget when none is given (bytes of K/V storage)
DEFAULT_KV_BYTES = 256 * 2**20


@dataclass
class EngineStats:
    """Counters since the engine was made (or :meth:`Engine.reset_stats`).

    steps: forwards run; idle_steps: calls to step() with nothing to run;
    prompt_tokens: prompt tokens of admitted requests (each once);
    prompt_tokens_computed: tokens run through prefill (recomputation after a
    preemption included); prompt_tokens_cached: prompt tokens served by the
    prefix cache; generated_tokens: tokens sampled; padding_tokens: padding
    computed (static and dynamic batching); preemptions: sequences sent back
    to the queue; batch_tokens / batch_seqs: sums over steps (divide by steps
    for the mean step size); kv_blocks_used: sum over steps of the blocks held
    (divide by steps x num_blocks for the mean KV utilisation).

    Raises: nothing; a plain record of counters.
    """

    steps: int = 0
    idle_steps: int = 0
    prompt_tokens: int = 0
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0
    generated_tokens: int = 0
    padding_tokens: int = 0
    preemptions: int = 0
    batch_tokens: int = 0
    batch_seqs: int = 0
    kv_blocks_used: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Engine:
    """Serve many requests on ``model`` with paged KV storage.

    Options (keywords):
      policy: "continuous" (default), "static" or "dynamic" (see the scheduler);
      max_num_seqs: sequences per step (default 32);
      max_num_batched_tokens: tokens per step for the continuous policy
        (default 512 with chunked prefill, else the model's context);
      chunked_prefill: split long prompts across steps (default: True for
        the continuous policy; the other policies refuse it);
      max_wait_s: how long the dynamic policy waits for a full batch (0.05);
      num_blocks / kv_bytes: the KV budget in blocks or in bytes (default:
        256 MiB, at least one full-context sequence); block_size: slots per
        block (16); kv_dtype: "auto" (the model's) or "int8";
      prefix_caching: reuse the K/V of shared prompt prefixes (False);
      cuda_graph: replay pure decode steps from CUDA graphs, one per batch-size
        bucket 1, 2, 4, ... max_num_seqs (False; raises GraphError without a
        CUDA GPU);
      clock: a function returning seconds (time.perf_counter).

    Raises ServingError for a ``model`` that is not a model, unknown options
    and values out of range (GraphError for ``cuda_graph`` without a GPU).
    """

    def __init__(self, model, tokenizer=None, *, policy: str = "continuous",
                 max_num_seqs: int = 32, max_num_batched_tokens: int | None = None,
                 chunked_prefill: bool | None = None, max_wait_s: float = 0.05,
                 num_blocks: int | None = None, kv_bytes: int | None = None,
                 block_size: int = 16, kv_dtype: str = "auto", prefix_caching: bool = False,
                 cuda_graph: bool = False, clock=time.perf_counter):
        if not isinstance(getattr(model, "config", None), ModelConfig):
            raise ServingError(f"Engine takes a model (an llmopt_lab Transformer, e.g. from "
                               f"load_model(name)[0]), got {type(model).__name__}")
        config = model.config
        self.model, self.tokenizer, self.clock = model, tokenizer, clock
        self.max_model_len = config.max_position_embeddings
        if chunked_prefill is None:
            chunked_prefill = policy == "continuous"
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 512 if chunked_prefill else self.max_model_len
        self.scheduler_config = SchedulerConfig(
            policy=policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            chunked_prefill=bool(chunked_prefill), max_wait_s=max_wait_s)
        if not isinstance(block_size, int) or isinstance(block_size, bool) or not \
                1 <= block_size <= self.max_model_len:
            raise ServingError(f"block_size must be an integer in 1..{self.max_model_len}, "
                               f"got {block_size!r}")
        if kv_dtype not in ("auto", "int8"):
            raise ServingError(f"kv_dtype must be 'auto' or 'int8', got {kv_dtype!r}")
        pool_cls = Int8KVPool if kv_dtype == "int8" else KVPool
        self.num_blocks = self._budget(num_blocks, kv_bytes, block_size, pool_cls)
        self.block_size = block_size
        self.prefix_caching = bool(prefix_caching)
        # blocks are named for the prefix cache only once computed: chunked
        # prefill and preemption leave blocks allocated but not yet written
        self.block_manager = BlockManager(self.num_blocks, block_size,
                                          enable_prefix_cache=self.prefix_caching,
                                          name_when="computed")
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        self.runner = ModelRunner(model, self.num_blocks, block_size, pool_cls, pad_token_id=pad,
                                  cuda_graph=cuda_graph, max_num_seqs=max_num_seqs)
        self.stats = EngineStats()
        #: the batch the last step ran (a :class:`ScheduledBatch`; None before the first step)
        self.last_batch: ScheduledBatch | None = None
        self._seqs: dict[int, Sequence] = {}
        self._next_id = 0

    def _budget(self, num_blocks, kv_bytes, block_size, pool_cls) -> int:
        if num_blocks is not None and kv_bytes is not None:
            raise ServingError("give the KV budget as num_blocks or kv_bytes, not both")
        probe = pool_cls(self.model.config, 1, block_size, device="meta", dtype=self.model.dtype)
        per_block = probe.nbytes
        if num_blocks is None:
            budget = DEFAULT_KV_BYTES if kv_bytes is None else kv_bytes
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < per_block:
                raise ServingError(f"kv_bytes must be an integer of at least one block "
                                   f"({per_block} bytes), got {budget!r}")
            num_blocks = budget // per_block
            if kv_bytes is None:  # the default: at least one sequence of the full context
                num_blocks = max(num_blocks, _blocks_for(self.max_model_len, block_size))
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ServingError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        return num_blocks

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> int:
        """Queue a request; returns its id.

        prompt: a list of token ids, or a string when the engine has a
        tokenizer. params: a :class:`SamplingParams` (default: greedy, 32
        tokens). arrival_time: on the engine's clock (default: now).
        Raises ServingError for an empty prompt, ids outside the vocabulary,
        prompt + max_new_tokens beyond the model's context, a request that
        cannot fit the whole KV budget, or (without chunked prefill) a prompt
        longer than max_num_batched_tokens, token ids that are not integers
        (floats, bools, a float tensor), and an arrival_time that is not a
        finite number.
        """
        ids = self._encode(prompt)
        params = SamplingParams() if params is None else params
        self._validate(ids, params)
        if arrival_time is not None and (isinstance(arrival_time, bool)
                                         or not isinstance(arrival_time, (int, float))
                                         or not math.isfinite(arrival_time)):
            raise ServingError(f"arrival_time must be a finite number of seconds on the engine's "
                               f"clock (or None for now), got {arrival_time!r}")
        rid = self._next_id
        self._next_id += 1
        seq = Sequence(request_id=rid, prompt=ids, params=params,
                       stop_ids=frozenset(params.stop_ids(self.model.config.eos_token_ids)),
                       max_tokens=params.max_new_tokens,
                       arrival_time=self.clock() if arrival_time is None else arrival_time,
                       generator=params.generator(self.model.device))
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        self.stats.prompt_tokens += len(ids)
        return rid

    def _validate(self, ids: list[int], params) -> None:
        if not isinstance(params, SamplingParams):
            raise ServingError(f"params must be a SamplingParams, got {type(params).__name__}")
        total = len(ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise ServingError(f"prompt ({len(ids)} tokens) + max_new_tokens "
                               f"({params.max_new_tokens}) = {total} exceeds the model's context "
                               f"of {self.max_model_len} tokens")
        if _blocks_for(total, self.block_size) > self.num_blocks:
            raise ServingError(f"a request of {total} tokens needs "
                               f"{_blocks_for(total, self.block_size)} KV blocks but the budget "
                               f"is {self.num_blocks}: raise num_blocks/kv_bytes")
        cfg = self.scheduler_config
        if not cfg.chunked_prefill and cfg.policy == "continuous" and \
                len(ids) > cfg.max_num_batched_tokens:
            raise ServingError(f"a prompt of {len(ids)} tokens exceeds max_num_batched_tokens="
                               f"{cfg.max_num_batched_tokens} without chunked prefill")

    def abort(self, request_id: int) -> None:
        """Stop a request now (finish reason "abort"); its blocks are freed.
        Raises ServingError for an unknown id; a finished request is left as is."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise ServingError(f"no request with id {request_id!r}")
        if not seq.finished:
            self._finish(seq, "abort", self.clock())

    def has_unfinished(self) -> bool:
        """True while some request waits or runs."""
        return self.scheduler.has_unfinished()

    def output(self, request_id: int) -> RequestOutput:
        """The current snapshot of a request (ServingError for an unknown id)."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise ServingError(f"no request with id {request_id!r}")
        return self._snapshot(seq, [])

    def release(self, request_id: int) -> None:
        """Forget a finished request (a long-running server calls this so the
        engine's table of requests does not grow)."""
        seq = self._seqs.get(request_id)
        if seq is not None and seq.finished:
            del self._seqs[request_id]

    # ---------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one step; returns a snapshot of every request that got new
        tokens or finished in it (empty when there was nothing to run)."""
        batch = self.scheduler.schedule(self.clock())
        self.last_batch = batch
        self.stats.preemptions += len(batch.preempted)
        if not len(batch):
            self.stats.idle_steps += 1
            return []
        copy_blocks(self.runner.pool, batch.copies)
        logits, rows, padding = self.runner.run(batch)
        self._account(batch, padding)
        for s, n in zip(batch.seqs, batch.num_tokens):
            s.num_computed += n
            self.block_manager.mark_computed(s, s.num_computed)
        now = self.clock()
        outs = []
        if rows:
            seqs = [batch.seqs[i] for i in rows]
            if all(s.params.greedy for s in seqs):
                tokens = logits.argmax(dim=-1)
            else:
                tokens = sample_rows(logits, [s.params for s in seqs], [s.generator for s in seqs])
            for s, t in zip(seqs, tokens.tolist()):
                outs.append(self._append(s, t, now))
        return outs

    def _account(self, batch: ScheduledBatch, padding: int) -> None:
        st = self.stats
        st.steps += 1
        st.padding_tokens += padding
        for s, n in zip(batch.seqs, batch.num_tokens):
            if s.in_prefill:
                st.prompt_tokens_computed += n
        st.prompt_tokens_cached += sum(s.num_cached_tokens for s in batch.admitted)
        st.batch_tokens += sum(batch.num_tokens) + padding
        st.batch_seqs += len(batch)
        st.kv_blocks_used += self.block_manager.num_blocks - self.block_manager.num_free_blocks

    def _append(self, s: Sequence, token: int, now: float) -> RequestOutput:
        s.tokens.append(token)
        s.token_times.append(now)
        self.stats.generated_tokens += 1
        if s.first_token_time is None:
            s.first_token_time = now
        if token in s.stop_ids:
            self._finish(s, "stop", now)
        elif s.num_output >= s.max_tokens:
            self._finish(s, "length", now)
        new = s.output[s._reported:]
        s._reported = s.num_output
        return self._snapshot(s, new)

    def _finish(self, s: Sequence, reason: str, now: float) -> None:
        s.status = Status.FINISHED
        s.finish_reason, s.finish_time = reason, now
        self.scheduler.finish(s)

    def _snapshot(self, s: Sequence, new: list[int]) -> RequestOutput:
        text = new_text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(s.output, skip_special_tokens=True)
            # what may be streamed: a token that ends inside a UTF-8 character
            # decodes to U+FFFD until the rest arrives, so hold that tail back
            # (all of it once finished); s.text is what was streamed so far
            ready = text if s.finished else text.rstrip("\ufffd")
            old = s.text
            if ready.startswith(old):
                new_text = ready[len(old):]
                s.text = ready
            else:  # the decoder rewrote streamed text (rare): stream only what is new after the common part
                common = len(os.path.commonprefix([old, ready]))
                new_text = ready[max(common, len(old)):] if len(ready) > len(old) else ""
                s.text = old + new_text
        return RequestOutput(
            request_id=s.request_id, prompt_token_ids=list(s.prompt), token_ids=list(s.output),
            new_token_ids=list(new), finished=s.finished, finish_reason=s.finish_reason,
            arrival_time=s.arrival_time, first_token_time=s.first_token_time,
            finish_time=s.finish_time, num_preemptions=s.num_preemptions,
            num_cached_tokens=s.cached_tokens_total, text=text, new_text=new_text)

    # ------------------------------------------------------------------ drivers
    def generate(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` to completion; their final outputs in prompt order.

        prompts: a list of token-id lists (or strings with a tokenizer), or
        one prompt. params: one SamplingParams for all or one per prompt.
        progress: show a tqdm bar of finished requests.
        Raises ServingError as :meth:`add_request` does (before anything is queued).
        """
        ids = self._add_all(prompts, params)
        finals = {o.request_id: o for o in self._drive(ids, progress) if o.finished}
        return [finals[i] for i in ids]

    def stream(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None,
               progress: bool = False) -> Iterator[RequestOutput]:
        """Like :meth:`generate`, but yields each request's increments as the
        steps produce them (``new_token_ids``, ``new_text``; the last one has
        ``finished=True``). The requests are queued when this is called."""
        return self._drive(self._add_all(prompts, params), progress)

    def _add_all(self, prompts, params) -> list[int]:
        prompts = self._prompt_list(prompts)
        plist = self._params_list(params, len(prompts))
        encoded = [self._encode(p) for p in prompts]
        for ids, sp in zip(encoded, plist):  # every request checked before any is queued
            self._validate(ids, sp)
        return [self.add_request(ids, sp) for ids, sp in zip(encoded, plist)]

    def _drive(self, ids: list[int], progress: bool) -> Iterator[RequestOutput]:
        pending = {i for i in ids if not self._seqs[i].finished}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="requests", unit="req")
        try:
            while pending:
                outs = self.step()
                if not outs and not self.scheduler.running:
                    # the dynamic batcher is waiting for a fuller batch: do not spin
                    time.sleep(min(0.002, self.scheduler_config.max_wait_s))
                for o in outs:
                    if o.request_id in pending:
                        if o.finished:
                            pending.discard(o.request_id)
                            if bar is not None:
                                bar.update(1)
                        yield o
        finally:
            if bar is not None:
                bar.close()

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    # ------------------------------------------------------------------ helpers
    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ServingError("a text prompt needs an engine with a tokenizer; give token ids")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise ServingError(f"a prompt tensor must be 1-D, got shape {tuple(prompt.shape)}")
            if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
                raise ServingError(f"token ids must be integers, got a {prompt.dtype} tensor; token ids "
                                   "come from a tokenizer")
            ids = prompt.tolist()
        else:
            try:
                prompt = list(prompt)
            except TypeError:
                raise ServingError("a prompt is a list of token ids (or a string with a "
                                   f"tokenizer), got {type(prompt).__name__}") from None
            try:  # ints of any kind (numpy's too), never floats or bools
                if any(isinstance(t, bool) for t in prompt):
                    raise TypeError
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise ServingError("token ids must be integers") from None
        self._check_prompt(ids)
        return ids

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ServingError("empty prompt: give at least one token")
        try:
            check_token_ids([ids], self.model.config.vocab_size)
        except GenerationError as e:
            raise ServingError(str(e)) from None

    @staticmethod
    def _prompt_list(prompts) -> list:
        if isinstance(prompts, str) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1):
            return [prompts]
        if isinstance(prompts, torch.Tensor):
            return list(prompts)
        try:
            prompts = list(prompts)
        except TypeError:
            raise ServingError("prompts must be a list of prompts (token-id lists, or strings with a "
                               f"tokenizer) or one prompt, got {type(prompts).__name__}") from None
        if prompts and isinstance(prompts[0], int) and not isinstance(prompts[0], bool):
            return [prompts]  # one prompt of token ids
        if not prompts:
            raise ServingError("no prompts given")
        return prompts

    @staticmethod
    def _params_list(params, n: int) -> list[SamplingParams]:
        try:
            return row_params(n, params)
        except GenerationError as e:
            raise ServingError(str(e)) from None

    def check_drained(self) -> None:
        """Raise ServingError unless every block is free or held only by the
        prefix cache (what must hold once no request is unfinished)."""
        if self.has_unfinished():
            raise ServingError("requests are still running")
        self.block_manager.check_invariants()
        if self.block_manager.num_free_blocks != self.num_blocks:
            raise ServingError(f"{self.num_blocks - self.block_manager.num_free_blocks} KV blocks "
                               "are still held after the engine drained")

"""Autoregressive generation: the reference loop and the cached loop.

Two paths produce the same tokens:

* ``use_cache=False``: every step runs the model over the whole prefix again.
  Quadratic, slow, obviously right: the reference each speed-up is checked
  against.
* ``use_cache=True``: steps (:class:`~llmopt_lab.step.Step`) run through
  :func:`run_step`: one prefill step packs every prompt (no padding computed
  in the linear layers) and writes their keys and values into the KV storage;
  then each decode step feeds one token per sequence, advanced in place in
  preallocated buffers (the same tensors every step: what a CUDA graph
  replays). Speculative decoding (:mod:`llmopt_lab.speculative`) and a
  batching engine run the same step function.

Every sequence keeps its own length, positions and sampling parameters
(:class:`~llmopt_lab.sampling.SamplingParams`: rows with different
temperatures and seeds share a batch, each drawing from its own random stream).

:func:`prefill` and :func:`decode_one_token` are the rectangular versions for
running steps by hand with a lesson-02 cache (right-padded prompts, the cache
keeping each sequence's length).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Sequence

import torch

from .cache import KVPool, make_cache
from .errors import GenerationError
from .sampling import SamplingParams, check_seed, sample_rows, stop_token_tuple
from .step import StepBuffers, host_step, run_step  # noqa: F401 (run_step: one of the step functions)


@dataclass
class Generation:
    """Result of :func:`generate`.

    tokens: (B, max_new_tokens) int64 new tokens, padded with ``pad_id`` after a
        sequence's end; num_tokens: (B,) how many are real (the EOS included);
    prompt_lengths: (B,); logits: (B, steps, V) float32 per-step logits when
    asked for (``return_logits=True``), else None.

    Raises: nothing; a plain result record (:func:`generate` raises).
    """

    tokens: torch.Tensor
    num_tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    pad_id: int
    logits: torch.Tensor | None = None

    def tolist(self) -> list[list[int]]:
        """The real new tokens of each sequence."""
        return [row[:n].tolist() for row, n in zip(self.tokens.cpu(), self.num_tokens.tolist())]


def _check_integer_ids(dtype: torch.dtype, what: str) -> None:
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise GenerationError(f"{what} must hold integer token ids, got dtype {dtype}; token ids "
                              "come from a tokenizer (tok(text).input_ids)")


def _token_row(p, i: int) -> torch.Tensor:
    """Prompt ``i`` of a list as a 1-D int64 tensor (GenerationError unless it
    is a list or tensor of integer token ids)."""
    if isinstance(p, (str, bytes)):
        raise GenerationError(f"prompt {i} is text ({str(p)[:40]!r}): tokenize it first, e.g. "
                              "tok(text).input_ids")
    try:
        t = torch.as_tensor(p)
    except (TypeError, ValueError, RuntimeError):
        raise GenerationError(f"prompt {i} is not a list of token ids (got {type(p).__name__}: "
                              f"{str(p)[:40]})") from None
    if t.numel() == 0:  # [] is float32 to torch: an empty prompt, not a dtype problem
        return t.long().flatten()
    _check_integer_ids(t.dtype, f"prompt {i}")
    return t.long().flatten()


def token_id_lists(prompts, error=GenerationError) -> list[list[int]]:
    """Prompts (a list of token-id lists or 1-D integer tensors) as lists of
    ints. Raises ``error`` (GenerationError by default) for text, or ids that
    are not integers (floats and bools are refused, not rounded)."""
    if isinstance(prompts, (str, bytes)):
        raise error(f"prompts are lists of token ids, got text ({str(prompts)[:40]!r}): tokenize it first")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise error(f"prompt {i} is text ({str(p)[:40]!r}): tokenize it first")
        try:
            p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
            if any(isinstance(t, bool) for t in p):
                raise TypeError
            out.append([operator.index(t) for t in p])
        except TypeError:
            raise error(f"prompt {i} must be a list of integer token ids, got {str(p)[:40]}") from None
    return out


def pad_prompts(prompts, device=None, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompts into (B, T_max) int64 plus lengths (B,).

    prompts: a (T,) or (B, T) integer tensor, one list of token ids (one
    prompt, like a (T,) tensor), or a list of token lists / 1-D tensors of
    possibly different lengths. Raises GenerationError on an empty prompt, on
    text (tokenize it first), and on ids that are not integers (float or bool
    values are refused, not rounded).
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise GenerationError(f"input_ids must be 1-D or 2-D, got shape {tuple(prompts.shape)}")
        if prompts.shape[1] == 0:
            raise GenerationError("empty prompt: give at least one token")
        _check_integer_ids(prompts.dtype, "input_ids")
        ids = prompts.to(device=device, dtype=torch.long)
        return ids, torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
    if isinstance(prompts, (str, bytes)):
        raise GenerationError(f"input_ids is text ({str(prompts)[:40]!r}): tokenize it first, e.g. "
                              "tok(text, return_tensors='pt').input_ids")
    try:
        prompts = list(prompts)
    except TypeError:
        raise GenerationError(f"input_ids must be a tensor or a list of token-id lists, got "
                              f"{type(prompts).__name__}") from None
    if prompts and all(isinstance(p, int) for p in prompts):  # one prompt as a flat list
        prompts = [prompts]
    rows = [_token_row(p, i) for i, p in enumerate(prompts)]
    if not rows or any(r.numel() == 0 for r in rows):
        raise GenerationError("empty prompt: give at least one token per sequence")
    lengths = torch.tensor([r.numel() for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
    return ids.to(device), lengths.to(device)


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, lengths: torch.Tensor, cache) -> torch.Tensor:
    """Run right-padded prompts through the model, filling a lesson-02 ``cache``
    from position 0.

    input_ids: (B, T) right-padded; lengths: (B,) real tokens per row.
    Returns the logits after each prompt's last real token, (B, V) float32.

    Raises:
        GenerationError: input_ids not a (B, T) integer tensor, lengths not
            (B,) integers in 1..T (a length of 0 would read the logits of
            the last padding token; values checked for CPU tensors only,
            reading a GPU tensor would cost a host sync).
        CacheError: a cache built for another model or batch, or too short.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise GenerationError(f"prefill takes input_ids (B, T), got "
                              f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    _check_integer_ids(input_ids.dtype, "input_ids")
    B, T = input_ids.shape
    if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (B,) \
            or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise GenerationError(f"prefill takes lengths as a ({B},) integer tensor (real tokens per row), "
                              f"got {getattr(lengths, 'shape', lengths)!r}")
    if B and lengths.device.type == "cpu" and not 1 <= int(lengths.min()) <= int(lengths.max()) <= T:
        raise GenerationError(f"prefill lengths must lie in 1..{T} (the padded prompt length), got "
                              f"{lengths.tolist()}")
    positions = torch.arange(T, device=input_ids.device).expand(B, T)
    hidden = model.hidden_states(input_ids, positions, cache=cache, lengths=lengths)  # (B, T, H)
    last = hidden[torch.arange(B, device=hidden.device), lengths - 1]  # (B, H)
    return model.lm_head(last).float()


@torch.inference_mode()
def decode_one_token(model, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """One decode step with a lesson-02 cache: tokens (B,) at positions (B,) ->
    next logits (B, V) float32. Shapes are the same at every step.

    Raises:
        GenerationError: tokens and positions that are not 1-D tensors of
            the same shape (checked without reading the device).
        CacheError: a position past the cache's capacity or negative, a
            cache built for another model or batch.
    """
    if not (isinstance(tokens, torch.Tensor) and isinstance(positions, torch.Tensor)
            and tokens.dim() == 1 and positions.shape == tokens.shape):
        raise GenerationError(f"decode_one_token takes tokens (B,) and positions (B,), got "
                              f"{getattr(tokens, 'shape', tokens)!r} and "
                              f"{getattr(positions, 'shape', positions)!r}")
    logits = model(tokens[:, None], positions[:, None], cache=cache)  # (B, 1, V)
    return logits[:, 0].float()


def row_params(n: int, params, **defaults) -> list[SamplingParams]:
    """One SamplingParams per row: ``params`` (one for all or a list of n), or
    built from ``defaults``; an integer seed s gives row i the seed s + i.
    Raises GenerationError on a list of the wrong length."""
    if params is None:
        seed = defaults.pop("seed", None)
        return [SamplingParams(**defaults, seed=None if seed is None else seed + i) for i in range(n)]
    if isinstance(params, SamplingParams):
        params = [params] * n
    params = list(params)
    if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
        raise GenerationError(f"give one SamplingParams for all prompts or one per prompt "
                              f"({n}), got {len(params)}")
    return params


def check_token_ids(prompts: list[list[int]], vocab_size: int, what: str = "the model") -> None:
    """Raise GenerationError when a prompt holds an id outside [0, vocab_size)."""
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary of "
                                  f"{what} (0..{vocab_size - 1}); was it made by another tokenizer?")


def _prompt_lists(input_ids, attention_mask=None) -> list[list[int]]:
    """The prompts as token lists. input_ids: as :func:`pad_prompts` takes, or a
    tokenizer's output (a mapping with "input_ids" and maybe "attention_mask").
    attention_mask: (B, T) 0/1 for a padded (B, T) tensor: each row's ones
    must be one contiguous run (left or right padding); only those tokens are
    the prompt."""
    if hasattr(input_ids, "keys"):  # BatchEncoding, dict
        if "input_ids" not in input_ids.keys():
            raise GenerationError(f"a mapping given as input_ids must hold 'input_ids' (a tokenizer's "
                                  f"output), got the keys {sorted(map(str, input_ids.keys()))[:5]}")
        if attention_mask is None:
            attention_mask = input_ids.get("attention_mask")
        input_ids = input_ids["input_ids"]
    if attention_mask is None:
        ids, lengths = pad_prompts(input_ids)
        return [row[:n].tolist() for row, n in zip(ids, lengths.tolist())]
    try:
        ids = torch.as_tensor(input_ids) if not isinstance(input_ids, torch.Tensor) else input_ids
        mask = (torch.as_tensor(attention_mask) if not isinstance(attention_mask, torch.Tensor)
                else attention_mask)
    except (TypeError, ValueError, RuntimeError):
        raise GenerationError("with an attention_mask, input_ids and the mask must be padded (B, T) "
                              "tensors or lists of equal-length rows; for prompts of different "
                              "lengths, pass a list of token lists without a mask") from None
    _check_integer_ids(ids.dtype, "input_ids")
    if ids.dim() == 1:
        ids, mask = ids[None], mask.reshape(1, -1) if mask.dim() == 1 else mask
    if ids.dim() != 2 or mask.shape != ids.shape:
        raise GenerationError(f"attention_mask of shape {tuple(mask.shape)} does not match input_ids of "
                              f"shape {tuple(ids.shape)}: give one 0/1 per token")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise GenerationError("attention_mask must hold only 0 and 1")
    out = []
    for b in range(ids.shape[0]):
        keep = mask[b].bool().nonzero().flatten()
        if keep.numel() == 0:
            raise GenerationError(f"row {b} of the attention mask is all zeros: an empty prompt")
        if int(keep[-1] - keep[0]) + 1 != keep.numel():
            raise GenerationError(f"row {b} of the attention mask has a hole: each row's tokens must be "
                                  "one contiguous run (left or right padding)")
        out.append(ids[b, int(keep[0]):int(keep[-1]) + 1].tolist())
    return out


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int | None = None, *, use_cache: bool = True,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             ignore_eos: bool = False, pad_id: int | None = None, cache=None,
             return_logits: bool = False,
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             cuda_graph: bool = False, compile_mode: str | None = None,
             attention_mask=None) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    input_ids: (T,), (B, T), one list of token ids (one prompt), a list of
    prompts of different lengths, or a tokenizer's output (a BatchEncoding or
    dict with "input_ids" and "attention_mask", e.g. ``tok(texts,
    padding=True, return_tensors="pt")``).
    attention_mask: (B, T) 0/1 for a padded (B, T) tensor (taken from the
    tokenizer's output when not given): padding tokens, left or right, are
    not part of the prompt, so each row generates what it would alone.
    temperature 0 is greedy; otherwise sampling with optional top_k / top_p,
    reproducible for a given ``seed`` (row i of a batch uses seed + i, so it
    samples what it would alone with that seed). Generation of a sequence
    stops at EOS (the config's ``eos_token_id`` unless given) unless
    ``ignore_eos``. ``params``: instead of those keywords, one
    :class:`SamplingParams` for all prompts or one per prompt (each row its
    own temperature, filters, seed, stop ids and max_new_tokens).
    ``cache``: the kind of KV storage to create ('static', the default;
    'dynamic'; 'int8'), or a cache object with room for the batch; generate
    writes from position 0 (an existing cache's content is discarded) and
    leaves its ``lengths`` at each sequence's final length.
    ``cuda_graph``: replay the decode steps from a CUDA graph
    (:class:`llmopt_lab.graphs.GraphedDecoder`; same tokens as eager; raises
    GraphError without a CUDA GPU or with a dynamic cache).
    ``compile_mode``: run prefill and decode steps through ``torch.compile``
    (:class:`llmopt_lab.compilation.CompiledStep`: "default",
    "reduce-overhead", "max-autotune"; the first call compiles, for seconds
    to a minute); not together with ``cuda_graph``, and it needs the cache.
    Raises GenerationError when prompt + max_new_tokens exceeds the model's
    context or the cache (or ``cache`` is not a cache), for token ids outside
    the vocabulary or not integers (float or bool ids, text, a mapping
    without "input_ids"), for bad sampling arguments or stop ids
    (CacheError for an unknown cache name), or for an attention mask that
    does not match the ids, holds other values than 0/1, or has a hole or an
    all-zero row.
    """
    config = model.config
    prompts = _prompt_lists(input_ids, attention_mask)
    B = len(prompts)
    check_token_ids(prompts, config.vocab_size)
    if params is None:
        check_seed(seed)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        stop = None if eos_token_id is None else stop_token_tuple(eos_token_id)
        rows = row_params(B, None, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop,
                          ignore_eos=ignore_eos)
    else:
        rows = row_params(B, params)
    device = model.device
    limits = [p.max_new_tokens for p in rows]
    steps = max(limits)
    lengths = [len(p) for p in prompts]
    total = max(n + m for n, m in zip(lengths, limits))
    if total > config.max_position_embeddings:
        raise GenerationError(
            f"prompt ({max(lengths)} tokens) + max_new_tokens ({steps}) = {total} "
            f"exceeds the model's context of {config.max_position_embeddings} tokens")
    stops = [p.stop_ids(config.eos_token_ids) for p in rows]
    pad = pad_id if pad_id is not None else next((s[0] for s in stops if s), 0)
    width = max((len(s) for s in stops), default=0)
    stop_t = torch.tensor([s + [-1] * (width - len(s)) for s in stops], dtype=torch.long,
                          device=device).view(B, width)  # (B, stops), -1 never matches
    limit_t = torch.tensor(limits, device=device)
    ragged_limits = min(limits) != steps
    greedy = all(p.greedy for p in rows)
    gens = [p.generator(device) for p in rows]

    out = torch.full((B, steps), pad, dtype=torch.long, device=device)
    num = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    all_logits = []

    decoder = None
    if compile_mode is not None:
        from .compilation import CompileError, _check_mode

        _check_mode(compile_mode)
        if cuda_graph:
            raise CompileError("choose cuda_graph=True or compile_mode, not both (mode "
                               "'reduce-overhead' records CUDA graphs itself)")
        if not use_cache:
            raise CompileError("compile_mode compiles the cached step: use_cache must be True")
    if cuda_graph:
        from .graphs import GraphedDecoder, GraphError  # only when asked: CUDA graphs are optional

        if not use_cache:
            raise GraphError("CUDA graphs replay cached decode steps: use_cache must be True")
        GraphedDecoder.check_device(model)
    if use_cache:
        # every row takes `steps` decode steps (a row that has finished keeps writing padding),
        # so the cache must hold the longest prompt plus the largest limit, not only the
        # longest single request (clipped to the context: beyond it no request can reach)
        kv_len = min(max(lengths) + steps, config.max_position_embeddings)
        kv = _storage_for(cache, config, B, max(total, kv_len), device, model.dtype)
        if cuda_graph:
            decoder = GraphedDecoder(model, kv, max_batch=B, buckets=[B])
        if compile_mode is not None:
            from .compilation import CompiledStep

            forward = CompiledStep(model, kv, mode=compile_mode)
        else:
            forward = functools.partial(run_step, model, kv)
        tables = [[i] for i in range(B)]
        logits = forward(host_step(prompts, [0] * B, tables, kv.block_size,
                                               contiguous=True).to_step(device))
        buffers, step = StepBuffers(B, B, 1, device), None
    else:
        ids, lens = pad_prompts(prompts, device)
        buf = torch.cat([ids, torch.zeros(B, steps, dtype=torch.long, device=device)], 1)
        cur = lens.clone()
        logits = _full_forward_last(model, buf, cur)

    rows_idx = torch.arange(B, device=device)
    for i in range(steps):
        if return_logits:
            all_logits.append(logits)
        tok = logits.argmax(dim=-1) if greedy else sample_rows(logits, rows, gens)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out[:, i] = tok
        num += (~done).long()
        if width or ragged_limits:
            done |= (tok[:, None] == stop_t).any(dim=1) | (num >= limit_t)
            if bool(done.all()):
                break
        if i == steps - 1:
            break
        if decoder is not None:
            if i == 0:
                logits = decoder.run(host_step([[t] for t in tok.tolist()], lengths, tables,
                                               kv.block_size, contiguous=True))
            else:
                logits = decoder.advance(tok)
        elif use_cache:
            if step is None:  # the first decode step: every later one is this one, advanced
                step = buffers.fill(host_step([[t] for t in tok.tolist()], lengths, tables,
                                              kv.block_size, contiguous=True))
            else:
                step.advance(tok)  # in place: the step's tensors keep their addresses
            logits = forward(step)
        else:
            buf[rows_idx, cur] = tok
            cur = cur + 1
            logits = _full_forward_last(model, buf, cur)

    if use_cache and hasattr(kv, "lengths"):
        kv.lengths[:B].copy_(torch.tensor(lengths, device=device) + num)
    return Generation(tokens=out, num_tokens=num,
                      prompt_lengths=torch.tensor(lengths, device=device), pad_id=pad,
                      logits=torch.stack(all_logits, 1) if return_logits else None)


def _storage_for(cache, config, batch: int, total: int, device, dtype):
    """The KV storage generate writes to: a new cache of the named kind, or
    the given one after checking it has room (and emptying it)."""
    if cache is None or isinstance(cache, str):
        return make_cache(cache or "static", config, batch, total, device=device, dtype=dtype)
    if not isinstance(cache, KVPool):
        raise GenerationError(f"cache must be 'static', 'dynamic', 'int8' or a cache object "
                              f"(llmopt_lab.cache.make_cache), got {type(cache).__name__}")
    if cache.block_size < total:
        raise GenerationError(f"the cache holds {cache.block_size} tokens but this request needs {total} "
                              f"(prompt + max_new_tokens): make it with max_len >= {total}")
    if cache.num_blocks < batch:
        raise GenerationError(f"the cache holds {cache.num_blocks} sequences but {batch} prompts were given: "
                              f"make it with batch_size >= {batch}")
    if hasattr(cache, "reset"):
        cache.reset()
    return cache


def _full_forward_last(model, buf: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """No-cache step: run the whole (right-padded) prefix, return the logits
    after each row's last real token, (B, V) float32."""
    width = int(lengths.max())
    hidden = model.hidden_states(buf[:, :width], lengths=lengths)
    last = hidden[torch.arange(buf.shape[0], device=buf.device), lengths - 1]
    return model.lm_head(last).float()

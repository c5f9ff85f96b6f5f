"""Autoregressive generation: the reference loop and the cached loop.

Two paths produce the same tokens:

* ``use_cache=False``: every step runs the model over the whole prefix again.
  Quadratic, slow, obviously right: the reference each speed-up is checked
  against.
* ``use_cache=True``: :func:`prefill` writes the prompt's keys and values into
  a :class:`~llmopt_lab.kv_cache.StaticCache` and returns the first logits;
  :func:`decode_one_token` then feeds one token per sequence per step, with
  fixed shapes. Each phase can be timed, compiled or graphed on its own.

Prompts of different lengths are right-padded; every sequence keeps its own
length and positions (no left padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import GenerationError
from .kv_cache import make_cache
from .sampling import check_sampling_args, sample


@dataclass
class Generation:
    """Result of :func:`generate`.

    tokens: (B, max_new_tokens) int64 new tokens, padded with ``pad_id`` after a
        sequence's end; num_tokens: (B,) how many are real (the EOS included);
    prompt_lengths: (B,); logits: (B, steps, V) float32 per-step logits when
    asked for (``return_logits=True``), else None.
    """

    tokens: torch.Tensor
    num_tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    pad_id: int
    logits: torch.Tensor | None = None

    def tolist(self) -> list[list[int]]:
        """The real new tokens of each sequence."""
        return [row[:n].tolist() for row, n in zip(self.tokens.cpu(), self.num_tokens.tolist())]


def pad_prompts(prompts, device=None, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompts into (B, T_max) int64 plus lengths (B,).

    prompts: a (T,) or (B, T) tensor, or a list of token lists / 1-D tensors of
    possibly different lengths. Raises GenerationError on an empty prompt.
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise GenerationError(f"input_ids must be 1-D or 2-D, got shape {tuple(prompts.shape)}")
        if prompts.shape[1] == 0:
            raise GenerationError("empty prompt: give at least one token")
        ids = prompts.to(device=device, dtype=torch.long)
        return ids, torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not rows or any(r.numel() == 0 for r in rows):
        raise GenerationError("empty prompt: give at least one token per sequence")
    lengths = torch.tensor([r.numel() for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
    return ids.to(device), lengths.to(device)


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, lengths: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompts through the model, filling ``cache`` from position 0.

    input_ids: (B, T) right-padded; lengths: (B,) real tokens per row.
    Returns the logits after each prompt's last real token, (B, V) float32.
    """
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device).expand(B, T)
    hidden = model.hidden_states(input_ids, positions, cache=cache, lengths=lengths)  # (B, T, H)
    last = hidden[torch.arange(B, device=hidden.device), lengths - 1]  # (B, H)
    return model.lm_head(last).float()


@torch.inference_mode()
def decode_one_token(model, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """One decode step: tokens (B,) at positions (B,) -> next logits (B, V) float32.

    Shapes are the same at every step, so the step can be compiled or captured
    in a CUDA graph.
    """
    logits = model(tokens[:, None], positions[:, None], cache=cache)  # (B, 1, V)
    return logits[:, 0].float()


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int, *, use_cache: bool = True,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             ignore_eos: bool = False, pad_id: int | None = None, cache=None,
             return_logits: bool = False) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    input_ids: (T,), (B, T) or a list of prompts of different lengths.
    temperature 0 is greedy; otherwise sampling with optional top_k / top_p,
    reproducible for a given ``seed``. Generation of a sequence stops at EOS
    (the config's ``eos_token_id`` unless given) unless ``ignore_eos``.
    ``cache``: the kind of cache to create ('static', the default; 'dynamic';
    'int8'), or an existing empty cache object.
    Raises GenerationError when prompt + max_new_tokens exceeds the model's
    context or the cache.
    """
    config = model.config
    check_sampling_args(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    device = model.device
    ids, lengths = pad_prompts(input_ids, device)
    B, T = ids.shape
    total = int(lengths.max()) + max_new_tokens
    if total > config.max_position_embeddings:
        raise GenerationError(
            f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's context of {config.max_position_embeddings} tokens")
    if eos_token_id is None:
        eos = config.eos_token_ids
    else:
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if ignore_eos:
        eos = []
    pad = pad_id if pad_id is not None else (eos[0] if eos else 0)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else torch.seed())

    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    num = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    all_logits = []

    if use_cache:
        if cache is None or isinstance(cache, str):
            cache = make_cache(cache or "static", config, B, total, device=device, dtype=model.dtype)
        elif cache.max_len < total:
            raise GenerationError(f"the cache holds {cache.max_len} tokens but this request needs {total}")
        logits = prefill(model, ids, lengths, cache)
    else:
        buf = torch.cat([ids, torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)], 1)
        cur = lengths.clone()
        logits = _full_forward_last(model, buf, cur)

    rows = torch.arange(B, device=device)
    pos = lengths.clone()  # position of the token about to be fed
    for step in range(max_new_tokens):
        if return_logits:
            all_logits.append(logits)
        tok = sample(logits, temperature, top_k, top_p, gen)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out[:, step] = tok
        num += (~done).long()
        if eos:
            done |= torch.isin(tok, eos_t)
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break
        if use_cache:
            logits = decode_one_token(model, tok, pos, cache)
        else:
            buf[rows, cur] = tok
            cur = cur + 1
            logits = _full_forward_last(model, buf, cur)
        pos = pos + 1

    return Generation(tokens=out, num_tokens=num, prompt_lengths=lengths, pad_id=pad,
                      logits=torch.stack(all_logits, 1) if return_logits else None)


def _full_forward_last(model, buf: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """No-cache step: run the whole (right-padded) prefix, return the logits
    after each row's last real token, (B, V) float32."""
    width = int(lengths.max())
    hidden = model.hidden_states(buf[:, :width], lengths=lengths)
    last = hidden[torch.arange(buf.shape[0], device=buf.device), lengths - 1]
    return model.lm_head(last).float()

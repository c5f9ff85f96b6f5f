"""A Llama-family decoder in plain torch.

One file, no optimisations hidden in it: RMSNorm, rotary position embeddings
(default, linear and Llama-3 frequency scaling), grouped-query attention with
optional q/k/v bias (Qwen2), a SwiGLU MLP, tied or untied embeddings, sliding-
window attention (Mistral).

The model knows nothing of quantisation, paging or kernels. What varies is
passed in: a KV cache object (``cache=``) and an attention function
(``attn_fn=``, see :mod:`llmopt_lab.attention`). Optimisations that change
weights are transforms applied to a finished model.

Parameter names follow Hugging Face's LlamaForCausalLM without the leading
``model.`` (``layers.0.self_attn.q_proj.weight``, ``lm_head.weight``), so
checkpoints load by renaming keys only.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionMeta, StepView, attend, get_attention
from .config import ModelConfig
from .errors import ConfigError
from .kernels.reference import rmsnorm_ref


class RMSNorm(nn.Module):
    """y = weight * x / rms(x), normalising over the last dim (float32 inside)."""

    def __init__(self, size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm_ref(x, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """Rotary inverse frequencies, (head_dim // 2,) float32, with the config's scaling.

    Llama-3 scaling leaves high frequencies (short wavelengths) alone, divides
    low frequencies by ``factor`` and interpolates smoothly in between.
    """
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (
        torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = config.rope_scaling
    if not s:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / float(s["factor"])
    # llama3
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin for positions (B, T) -> each (B, 1, T, head_dim), in dtype.

    Computed in float32 from the positions every forward: no table to outgrow.
    """
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by position; the halves convention of Llama/HF."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        c = config
        kw = dict(device=device, dtype=dtype)
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads_at(layer_idx), c.num_kv_heads, c.head_dim
        self.window = c.layer_window(layer_idx)
        self.scale = c.head_dim ** -0.5
        q_size = self.num_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, q_size, bias=c.qkv_bias, **kw)
        self.k_proj = nn.Linear(c.hidden_size, c.kv_size, bias=c.qkv_bias, **kw)
        self.v_proj = nn.Linear(c.hidden_size, c.kv_size, bias=c.qkv_bias, **kw)
        self.o_proj = nn.Linear(q_size, c.hidden_size, bias=c.o_bias, **kw)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx, kv,
                attn_fn: Callable) -> torch.Tensor:
        """Two layouts. Without KV storage (``kv`` None): x (B, T, hidden), a
        rectangle (training, perplexity), ``ctx`` its AttentionMeta, cos/sin
        (B, 1, T, D). With KV storage: x (N, hidden), the packed tokens of a
        step, ``ctx`` its StepView, cos/sin (N, 1, D); this step's keys and
        values are written to ``kv`` before the attention reads it."""
        lead = x.shape[:-1]  # (B, T) or (N,)
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        if kv is None:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = attn_fn(q, k, v, ctx, self.window, self.scale)  # (B, Hq, T, D)
            return self.o_proj(out.transpose(1, 2).reshape(*lead, -1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (N, H, D)
        kv.write(self.layer_idx, k, v, ctx.where)
        out = attend(attn_fn, q, kv, self.layer_idx, ctx, self.window, self.scale)  # (N, Hq * D)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, device=None, dtype=None, layer_idx: int = 0):
        super().__init__()
        kw = dict(bias=config.mlp_bias, device=device, dtype=dtype)
        width = config.intermediate_size_at(layer_idx)
        self.gate_proj = nn.Linear(config.hidden_size, width, **kw)
        self.up_proj = nn.Linear(config.hidden_size, width, **kw)
        self.down_proj = nn.Linear(width, config.hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.self_attn = Attention(config, layer_idx, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.mlp = MLP(config, device, dtype, layer_idx)

    def forward(self, x, cos, sin, ctx, kv, attn_fn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, kv, attn_fn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The decoder: ``forward(input_ids, positions, cache, lengths) -> logits``.

    Build one with :meth:`from_config` (random weights) or
    :func:`llmopt_lab.load_model` (a checkpoint).

    Raises:
        ConfigError: ``config`` is not a :class:`ModelConfig` (a preset's
            name must go through :func:`llmopt_lab.preset`), an unknown
            attention name, or (from_config) a device, dtype or seed it
            cannot use.
        ValueError, CacheError: from :meth:`forward` (see there).
    """

    def __init__(self, config: ModelConfig, attn_fn: str | Callable = "sdpa", device=None,
                 dtype=None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            hint = f" (use preset({config!r}))" if isinstance(config, str) else ""
            raise ConfigError(f"Transformer takes a ModelConfig, got {type(config).__name__}{hint}")
        self.config = config
        self.attn_fn = get_attention(attn_fn)
        kw = dict(device=device, dtype=dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(DecoderLayer(config, i, **kw) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **kw)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config, device), persistent=False)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: ModelConfig, device=None, dtype=torch.float32, seed: int = 0,
                    attn_fn: str | Callable = "sdpa") -> "Transformer":
        """A model with random weights (normal, std 0.02), created directly on
        ``device`` in ``dtype`` (no full-size float32 copy on the CPU first).
        Raises ConfigError for a config that is not a ModelConfig, an unknown
        device, a dtype that is not a floating torch.dtype, or a seed that is
        not an integer."""
        if not isinstance(config, ModelConfig):
            hint = f" (use preset({config!r}))" if isinstance(config, str) else ""
            raise ConfigError(f"from_config takes a ModelConfig, got {type(config).__name__}{hint}")
        try:
            gen_device = torch.device(device) if device is not None else torch.device("cpu")
        except (RuntimeError, TypeError):
            raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, "
                              f"...), got {dtype!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        model = cls(config, attn_fn=attn_fn, device=gen_device, dtype=dtype)
        g = torch.Generator(device=gen_device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        return model.eval()

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after loading onto a meta model)."""
        self.inv_freq = rope_inv_freq(self.config, self.embed_tokens.weight.device)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    # ----------------------------------------------------------------- forward
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache=None, lengths: torch.Tensor | None = None,
                      attn_fn: Callable | None = None) -> torch.Tensor:
        """Final (normed) hidden states of a rectangle of tokens, (B, T, hidden_size).

        input_ids: (B, T) int64, right-padded when rows differ in length.
        positions: (B, T) int64, consecutive in each row; default: continue
            after the cache's lengths (or start at 0 without a cache).
        lengths: (B,) int64, the number of real tokens in each row (default:
            all T). Padding is never attended to.
        cache: a lesson-02 cache (:class:`llmopt_lab.cache.StaticCache`,
            DynamicCache, Int8Cache) that this step's keys and values are
            written into and read from; the rectangle becomes a step
            (:meth:`~llmopt_lab.cache.BatchCache.rect_step`) run by
            :meth:`step_hidden`.
        Raises ValueError for input that is not 2-D, CacheError for a cache
        built for another model, batch or dtype, and for positions that are
        not a (B, T) integer tensor, are negative, or lie past the cache's
        capacity (max_len).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        dev = input_ids.device
        steps = torch.arange(T, device=dev)
        token_valid = None if lengths is None else steps[None, :] < lengths[:, None]  # (B, T)
        if cache is not None:
            cache.check_batch(self.config, B, self.dtype, dev)
            if positions is None:
                positions = (cache.lengths[:, None] + steps).expand(B, T)
            step = cache.rect_step(input_ids, positions, token_valid)
            return self.step_hidden(step, cache, attn_fn).view(B, T, -1)
        plain = positions is None and lengths is None
        ranges = None
        if positions is None:  # queries and keys are the tokens 0..T-1 (valid: a prefix)
            positions = steps.expand(B, T)
            k_len = lengths if lengths is not None else torch.full((B,), T, device=dev)
            ranges = (torch.zeros(B, dtype=torch.long, device=dev), k_len)
        meta = AttentionMeta(q_pos=positions, k_pos=positions, k_valid=token_valid,
                             is_plain_causal=plain, ranges=ranges)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # (B, 1, T, D)
        for layer in self.layers:
            x = layer(x, cos, sin, meta, None, attn_fn or self.attn_fn)
        return self.norm(x)

    def step_hidden(self, step, kv, attn_fn: Callable | None = None,
                    hidden: torch.Tensor | None = None, final_norm: bool = True) -> torch.Tensor:
        """Final (normed) hidden states (N, hidden_size) of a step's packed tokens.

        step: a :class:`llmopt_lab.step.Step` (tokens, positions, slots, block
            tables, query counts of S sequences); kv: the KV storage
            (:class:`llmopt_lab.cache.KVPool` or a cache built on it) that the
            step's keys and values are written to and read from.
        hidden: (N, hidden_size) inputs of the first layer instead of the
            embedding of ``step.tokens``; with ``final_norm=False`` the last
            layer's output is returned unnormed. A pipeline stage
            (:mod:`llmopt_lab.parallel.pipeline`) runs its slice of layers so.
        Raises CacheError when ``kv`` was built for another model or dtype.
        """
        kv.check_compatible(self.config, self.dtype, step.tokens.device)
        kv.prepare(step)
        view = StepView(step, kv)
        x = self.embed_tokens(step.tokens) if hidden is None else hidden  # (N, hidden)
        cos, sin = rope_cos_sin(self.inv_freq, step.positions[None], x.dtype)  # (1, 1, N, D)
        cos, sin = cos[0, 0, :, None], sin[0, 0, :, None]  # (N, 1, D)
        for layer in self.layers:
            x = layer(x, cos, sin, view, kv, attn_fn or self.attn_fn)
        return self.norm(x) if final_norm else x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                lengths: torch.Tensor | None = None, attn_fn: Callable | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) in the model's dtype. Arguments as in
        :meth:`hidden_states`."""
        return self.lm_head(self.hidden_states(input_ids, positions, cache, lengths, attn_fn))


def check_dtype_for_device(dtype: torch.dtype, device: torch.device) -> None:
    """Raise a clear error when the device cannot compute in dtype."""
    from .errors import UnsupportedDtypeError

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedDtypeError(
            f"model dtype {dtype} is not supported; use float32, float16 or bfloat16 "
            "(quantised formats are applied with llmopt_lab.transforms)")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise UnsupportedDtypeError(
            f"{name} cannot compute in bfloat16 (it needs compute capability 8.0+); "
            "use dtype=torch.float16")


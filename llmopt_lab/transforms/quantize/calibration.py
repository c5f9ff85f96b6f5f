"""Calibration: what the inputs of each linear layer look like on real text.

GPTQ needs each layer's input second moment ``H = 2 X^T X / n`` (the Hessian
of the layer's squared output error), AWQ the mean magnitude of each input
channel (and H to score its candidate scales), SmoothQuant each input
channel's absmax. All three are sums over calibration tokens, so they are
accumulated by forward pre-hooks while the model runs over the calibration
batches; the activations themselves are never stored.

Calibration data are plain token tensors, ``list[LongTensor (B, T)]``, cut
from the **training** split (:func:`training_calibration_set`), never from
the held-out files that quality is measured on.

Linear layers that read the same input form a :class:`LinearGroup`
(q/k/v read the normed residual; gate/up too), because AWQ and SmoothQuant
must give them one shared per-input-channel scale, folded into the op before
them (:func:`decoder_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ... import data
from ...errors import QuantizationError
from ..surgery import num_blocks


@dataclass
class InputStats:
    """Sums over the calibration tokens of one layer input (K channels).

    xtx: (K, K) float32 sum of x^T x (None when not collected); abs_sum,
    absmax: (K,) float32; count: tokens seen.
    """

    xtx: torch.Tensor | None
    abs_sum: torch.Tensor
    absmax: torch.Tensor
    count: int = 0

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n, (K, K) float32 (GPTQ's Hessian of the squared error)."""
        if self.xtx is None:
            raise QuantizationError("these statistics were collected without the Hessian")
        return 2.0 * self.xtx / max(self.count, 1)

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean |x| per input channel, (K,)."""
        return self.abs_sum / max(self.count, 1)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (T, K)
        if self.xtx is not None:
            self.xtx += x.t() @ x
        self.abs_sum += x.abs().sum(0)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.count += x.shape[0]

    @classmethod
    def empty(cls, K: int, device, hessian: bool = True) -> "InputStats":
        return cls(torch.zeros(K, K, device=device) if hessian else None,
                   torch.zeros(K, device=device), torch.zeros(K, device=device), 0)


@dataclass
class LinearGroup:
    """Linear layers reading the same input, and the op that produces it.

    names/modules: the layers (e.g. q, k, v); prev: the module whose output is
    their input and that a per-channel factor can be folded into: an RMSNorm
    (scale its weight), a Linear (scale its output rows: v_proj before o_proj,
    up_proj before down_proj), or None (the factor stays on the layer's input).
    """

    key: str
    names: list[str]
    modules: list[nn.Module]
    prev: nn.Module | None = None
    prev_name: str | None = None

    @property
    def in_features(self) -> int:
        return self.modules[0].in_features


def decoder_groups(model: nn.Module, layer_idx: int) -> list[LinearGroup]:
    """The four input groups of decoder block ``layer_idx``: attention input
    (q, k, v after input_layernorm), attention output (o after v_proj: foldable
    only without grouped-query attention, where o's input channels map one to
    one onto v's output channels), MLP input (gate, up after
    post_attention_layernorm), MLP output (down after up_proj).
    Raises QuantizationError for a block index out of range (TransformError
    for a model without decoder blocks)."""
    n = num_blocks(model)
    if not 0 <= layer_idx < n:
        raise QuantizationError(f"decoder block {layer_idx} does not exist (the model has {n})")
    layer = model.layers[layer_idx]
    p = f"layers.{layer_idx}."
    att, mlp = layer.self_attn, layer.mlp
    mha = att.num_heads == att.num_kv_heads
    return [
        LinearGroup("attn_in", [p + "self_attn." + n for n in ("q_proj", "k_proj", "v_proj")],
                    [att.q_proj, att.k_proj, att.v_proj], layer.input_layernorm,
                    p + "input_layernorm"),
        LinearGroup("attn_out", [p + "self_attn.o_proj"], [att.o_proj],
                    att.v_proj if mha else None, p + "self_attn.v_proj" if mha else None),
        LinearGroup("mlp_in", [p + "mlp.gate_proj", p + "mlp.up_proj"], [mlp.gate_proj, mlp.up_proj],
                    layer.post_attention_layernorm, p + "post_attention_layernorm"),
        LinearGroup("mlp_out", [p + "mlp.down_proj"], [mlp.down_proj], mlp.up_proj,
                    p + "mlp.up_proj"),
    ]


def lm_head_group(model: nn.Module) -> LinearGroup:
    """The lm_head reads the final norm's output (tied to the embeddings or
    not, it is never rescaled: the norm is folded into by AWQ only when the
    lm_head is quantized)."""
    return LinearGroup("lm_head", ["lm_head"], [model.lm_head], model.norm, "norm")


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (nothing after it is needed)."""


@torch.no_grad()
def collect_input_stats(model: nn.Module, batches: Sequence[torch.Tensor],
                        modules: dict[str, nn.Module], hessian: bool = True,
                        stop_after: nn.Module | None = None) -> dict[str, InputStats]:
    """Run the model over the calibration batches and accumulate, for each
    module in ``modules`` (name -> module), statistics of its input.

    batches: (B, T) int64 token tensors (moved to the model's device).
    hessian: also accumulate x^T x (K x K per module: skip it when only
    magnitudes are needed). stop_after: a module after whose forward the pass
    is cut short (e.g. the decoder block being calibrated).
    Returns name -> :class:`InputStats`.
    """
    stats: dict[str, InputStats] = {}
    hooks = []

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            if name not in stats:
                stats[name] = InputStats.empty(x.shape[-1], x.device, hessian)
            stats[name].add(x)
        return hook

    for name, m in modules.items():
        hooks.append(m.register_forward_pre_hook(make_hook(name)))
    if stop_after is not None:
        def stop(module, args, output):
            raise _Stop
        hooks.append(stop_after.register_forward_hook(stop))
    dev = model.device
    try:
        for ids in batches:
            try:
                model(ids.to(dev))
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in modules if n not in stats]
    if missing:
        raise QuantizationError(f"calibration never reached {', '.join(missing)}")
    return stats


def check_calibration(calibration, model: nn.Module, method: str) -> None:
    """Raise QuantizationError unless ``calibration`` is a non-empty list of
    (B, T) integer token tensors within the model's vocabulary."""
    hint = ("pass calibration=[LongTensor (B, T), ...] cut from the training split, e.g. "
            "llmopt_lab.transforms.calibration.training_calibration_set(tokenizer)")
    if calibration is None or isinstance(calibration, torch.Tensor) and calibration.dim() != 2:
        raise QuantizationError(f"method {method!r} needs calibration data: {hint}")
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches:
        raise QuantizationError(f"method {method!r}: the calibration list is empty; {hint}")
    vocab = model.config.vocab_size
    for b in batches:
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.dtype not in (torch.int64, torch.int32):
            raise QuantizationError(f"calibration batches must be (B, T) int64 tensors; {hint}")
        if b.shape[0] == 0 or b.shape[1] == 0:
            raise QuantizationError(f"a calibration batch of shape {tuple(b.shape)} holds no tokens; {hint}")
        if b.numel() and (int(b.min()) < 0 or int(b.max()) >= vocab):
            raise QuantizationError(f"calibration tokens outside the vocabulary [0, {vocab})")


def as_batches(calibration) -> list[torch.Tensor]:
    return [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)


def calibration_batches(tokens: torch.Tensor, num_sequences: int = 64, seq_len: int = 256,
                        batch_size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """Cut ``num_sequences`` random windows of ``seq_len`` tokens from a 1-D
    token stream (reproducible for a seed); returns them as (batch_size,
    seq_len) int64 batches (the last one may be smaller)."""
    tokens = tokens.reshape(-1).long()
    if tokens.numel() < seq_len + 1:
        raise QuantizationError(f"the token stream has {tokens.numel()} tokens, fewer than one "
                                f"window of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (num_sequences,), generator=g)
    windows = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])  # (S, T)
    return list(windows.split(batch_size))


def training_calibration_set(tokenizer, num_sequences: int = 64, seq_len: int = 256,
                             batch_size: int = 8, seed: int = 0,
                             max_files: int = 200) -> list[torch.Tensor]:
    """Calibration batches from the course corpus's **training** split
    (:func:`llmopt_lab.data.split_files` ('train')): every k-th training file
    (at most ``max_files``, in the corpus order) joined into a token stream,
    then :func:`calibration_batches`. The held-out files are never read."""
    files = data.split_files("train")
    step = max(1, len(files) // max_files)
    chosen = files[::step][:max_files]
    sep = getattr(tokenizer, "eos_token_id", None)
    stream = data.token_stream(tokenizer, chosen, 0 if sep is None else sep)
    return calibration_batches(stream, num_sequences, seq_len, batch_size, seed)


__all__ = ["InputStats", "LinearGroup", "decoder_groups", "lm_head_group", "collect_input_stats",
           "check_calibration", "calibration_batches", "training_calibration_set"]

"""Size and quality of a quantized model: bytes by kind, and quality against
the float model (perplexity, KL, top-1 agreement) on the same windows."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...errors import QuantizationError
from ...measure.metrics import position_kl, position_nll
from .layers import QuantLinear


def model_bytes(model: nn.Module) -> int:
    """Bytes of everything the model stores: parameters and persistent buffers
    (packed codes, scales, zero points, biases, norms, embeddings), each
    tensor counted once (tied embeddings are shared).

    Raises nothing for an nn.Module."""
    return sum(bytes_breakdown(model).values())


def bytes_breakdown(model: nn.Module) -> dict[str, int]:
    """Bytes by kind: 'linear' (weights/codes of linear layers, quantized or
    not), 'quant_params' (scales, zero points, input scales), 'embeddings'
    (embed_tokens, and lm_head when it is a plain Linear: it is counted under
    'linear' only if quantized), 'other' (norms, biases).

    Raises nothing for an nn.Module."""
    seen: set[int] = set()
    out = dict(linear=0, quant_params=0, embeddings=0, other=0)

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:
            return
        seen.add(key)
        out[kind] += t.numel() * t.element_size()

    for mname, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for bname, b in m.named_buffers(recurse=False):
                kind = ("linear" if bname in ("qweight", "qweight_t", "packed", "weight_fp8")
                        else "other" if bname == "bias" else "quant_params")
                add(kind, b)
        elif isinstance(m, nn.Linear):
            add("embeddings" if mname == "lm_head" else "linear", m.weight)
            add("other", m.bias)
        elif isinstance(m, nn.Embedding):
            add("embeddings", m.weight)
        else:
            for p in m.parameters(recurse=False):
                add("other", p)
            for bname, b in m.named_buffers(recurse=False):
                if bname not in m._non_persistent_buffers_set:
                    add("other", b)
    return out


@torch.no_grad()
def compare_quality(reference_model: nn.Module, model: nn.Module, evalset_ids: torch.Tensor,
                    lengths: torch.Tensor | None = None, batch_size: int = 8,
                    per_window: bool = False) -> dict:
    """Teacher-forced quality of ``model`` against ``reference_model`` on the
    same windows.

    evalset_ids: (N, W) int64 windows, right-padded; lengths: (N,) real tokens
    per window (default: all W). In each window, every token after the first
    is scored given the ones before it (as :func:`llmopt_lab.data.evaluate_nll`).
    Returns dict(ppl_ref, ppl, ppl_delta_pct (100 * (ppl / ppl_ref - 1)),
    kl (mean KL(P_ref || P) per scored token, nats), top1 (fraction of scored
    positions where both models' argmax agree), tokens (scored)). With
    ``per_window``, also ``windows``: dict of (N,) lists nll_ref, nll, kl
    (sums over each window's scored tokens, nats) and tokens, for
    :func:`llmopt_lab.metrics.ppl_delta_interval` and friends. Both models run
    on their own device; logits are compared in float32 on the CPU.

    Raises QuantizationError when the windows score no tokens (every length
    below 2: pass windows of at least 2 real tokens), ``evalset_ids`` that is
    not an (N, W) tensor, or a model without a ``device`` (an llmopt_lab
    Transformer has one); whatever the models raise on the input (e.g.
    windows longer than their context).
    """
    for m, what in ((reference_model, "reference_model"), (model, "model")):
        if not isinstance(getattr(m, "device", None), torch.device):
            raise QuantizationError(f"compare_quality: {what} must be an llmopt_lab Transformer "
                                    f"(a model with a .device), got {type(m).__name__}")
    if not isinstance(evalset_ids, torch.Tensor) or evalset_ids.dim() != 2:
        raise QuantizationError("compare_quality: evalset_ids must be an (N, W) token tensor, got "
                                f"{getattr(evalset_ids, 'shape', type(evalset_ids).__name__)}")
    ids_all = evalset_ids
    N, W = ids_all.shape
    if lengths is None:
        lengths = torch.full((N,), W, dtype=torch.long)
    sums = {k: [] for k in ("nll_ref", "nll", "kl", "agree", "tokens")}
    for start in range(0, N, batch_size):
        ids = ids_all[start:start + batch_size]
        lens = lengths[start:start + batch_size].cpu()
        ref_logits = reference_model(ids.to(reference_model.device)).float().cpu()[:, :-1]
        logits = model(ids.to(model.device)).float().cpu()[:, :-1]
        targets = ids[:, 1:].cpu()
        mask = (torch.arange(1, W)[None, :] < lens[:, None]).double()  # (B, W-1) real targets
        per_token = {"nll_ref": position_nll(ref_logits, targets),
                     "nll": position_nll(logits, targets),
                     "kl": position_kl(ref_logits, logits),
                     "agree": ref_logits.argmax(-1) == logits.argmax(-1)}
        for k, v in per_token.items():
            sums[k] += (v.double() * mask).sum(1).tolist()
        sums["tokens"] += mask.sum(1).long().tolist()
    count = sum(sums["tokens"])
    if count == 0:
        raise QuantizationError("compare_quality: the windows score no tokens")
    nll_ref, nll = sum(sums["nll_ref"]), sum(sums["nll"])
    ppl_ref, ppl = math.exp(nll_ref / count), math.exp(nll / count)
    out = dict(ppl_ref=ppl_ref, ppl=ppl, ppl_delta_pct=100.0 * math.expm1((nll - nll_ref) / count),
               kl=sum(sums["kl"]) / count, top1=sum(sums["agree"]) / count, tokens=count)
    if per_window:
        out["windows"] = {k: sums[k] for k in ("nll_ref", "nll", "kl", "tokens")}
    return out


def layer_output_error(weight: torch.Tensor, approx_weight: torch.Tensor, x: torch.Tensor) -> float:
    """Relative output error ``||x W'^T - x W^T||_F / ||x W^T||_F`` of a layer
    whose weight W (N, K) is replaced by W' (N, K), on inputs x (T, K).
    NaN or inf when the reference output is all zero.

    Raises: nothing of its own; torch's RuntimeError for shapes that do not
    match."""
    ref = x.float() @ weight.float().t()
    return float((x.float() @ approx_weight.float().t() - ref).norm() / ref.norm())


__all__ = ["model_bytes", "bytes_breakdown", "compare_quality", "layer_output_error"]

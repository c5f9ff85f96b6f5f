"""Structured pruning (lesson 04): remove whole MLP channels and attention
heads, so the matrices really get smaller (and faster on any hardware).

::

    from llmopt_lab.transforms.structured import prune_structured, recover
    report = prune_structured(model, mlp_fraction=0.5, calibration=batches)
    log = recover(model, tokenizer, seconds=60)        # a short fine-tune

**MLP channels.** Channel c of a SwiGLU MLP is row c of gate and up and
column c of down; removing it removes ``3 x hidden`` weights. Its importance
is the size of what it adds to the residual stream: the L2 norm of its
activation ``a_c = silu(g_c) u_c`` over the calibration tokens times the norm
of its output column ``down[:, c]``.

**Heads.** Query head h is a block of ``head_dim`` rows of q_proj and the
same columns of o_proj; scored the same way from o_proj's input. The KV heads
are kept (so the caches do not change): every KV group keeps the same number
of query heads, the most important of its group.

The new widths go into the config (``layer_intermediate_sizes``,
``layer_num_heads``), so ``save_model`` / ``load_model``, the caches and the
cost model follow. :func:`gate_channels` and :func:`remove_gated` implement
network slimming: a learned gate per MLP channel, an L1 penalty that drives
gates to zero during a fine-tune, and the removal of the closed channels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import PruningError, QuantizationError
from .quantize.calibration import as_batches, check_calibration, collect_input_stats
from .surgery import num_blocks


@dataclass
class StructuredReport:
    """Widths before and after, per layer: MLP channels and query heads;
    parameters before and after (the whole model)."""

    mlp_before: list[int] = field(default_factory=list)
    mlp_after: list[int] = field(default_factory=list)
    heads_before: list[int] = field(default_factory=list)
    heads_after: list[int] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0


def _fraction(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
        raise PruningError(f"{name} is the fraction removed, in [0, 1); got {v!r}")
    return float(v)


def _per_layer(name: str, v, n: int) -> list[float]:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise PruningError(f"{name} has {len(v)} entries for {n} layers")
        return [_fraction(name, x) for x in v]
    return [_fraction(name, v)] * n


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None,
            cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the given output rows / input columns of ``linear``."""
    w = linear.weight.detach()
    b = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        w = w[rows]
        b = None if b is None else b[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def channel_scores(model: nn.Module, calibration, keep_gram: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """Importance of every MLP channel and query head, per layer index:
    {"mlp": (I,), "heads": (H,)} float32, from one pass over ``calibration``
    ((B, T) token batches of the training split). keep_gram: also return
    the inputs' Gram matrices {"mlp_gram": (I, I), "o_gram": (H*D, H*D)}
    (sums of x^T x) for :func:`prune_structured`'s ``refit``. Raises
    PruningError for a missing or malformed calibration set."""
    try:
        check_calibration(calibration, model, "structured pruning")
    except QuantizationError as e:  # the quantization checks, with pruning's error class
        raise PruningError(str(e)) from None
    mods = {}
    for i in range(num_blocks(model)):
        mods[f"down.{i}"] = model.layers[i].mlp.down_proj
        mods[f"o.{i}"] = model.layers[i].self_attn.o_proj
    stats = collect_input_stats(model, as_batches(calibration), mods, hessian=True)
    out = {}
    for i in range(num_blocks(model)):
        att = model.layers[i].self_attn
        a_sq = torch.diag(stats[f"down.{i}"].xtx)  # (I,) sum of squared activations
        col = model.layers[i].mlp.down_proj.weight.detach().float().norm(dim=0)  # (I,)
        o_sq = torch.diag(stats[f"o.{i}"].xtx)  # (H * D,)
        ocol = att.o_proj.weight.detach().float().pow(2).sum(0)  # (H * D,)
        heads = (o_sq * ocol).reshape(att.num_heads, att.head_dim).sum(1).sqrt()
        out[i] = {"mlp": a_sq.sqrt() * col, "heads": heads}
        if keep_gram:
            out[i].update(mlp_gram=stats[f"down.{i}"].xtx, o_gram=stats[f"o.{i}"].xtx)
    return out


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor,
                  damp: float = 0.01) -> torch.Tensor:
    """The least-squares weight on the kept input channels: the (N, k)
    matrix W' minimizing ||X_keep W'^T - X W^T||^2 over the calibration
    inputs X (``gram`` = X^T X, (K, K)), W' = W G[:, keep] (G[keep, keep] +
    damp x mean diag x I)^-1. The removed channels' contribution is
    re-expressed through the kept ones they correlate with."""
    G = gram.double()
    Gkk = G[keep][:, keep]
    Gkk = Gkk + damp * Gkk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=G.dtype,
                                                                             device=G.device)
    rhs = weight.double() @ G[:, keep]  # (N, k)
    return torch.linalg.solve(Gkk, rhs.t()).t().to(weight.dtype)


def _keep_channels(scores: torch.Tensor, fraction: float, multiple: int) -> torch.Tensor:
    n = scores.numel()
    keep = max(multiple, int(round(n * (1 - fraction) / multiple)) * multiple)
    keep = min(n, keep)
    return scores.topk(keep).indices.sort().values


def _keep_heads(scores: torch.Tensor, fraction: float, num_kv: int) -> torch.Tensor:
    H = scores.numel()
    group = H // num_kv
    per = max(1, int(round(group * (1 - fraction))))
    kept = []
    for g in range(num_kv):
        s = scores[g * group:(g + 1) * group]
        kept += (s.topk(per).indices.sort().values + g * group).tolist()
    return torch.tensor(kept, dtype=torch.long)


@torch.no_grad()
def prune_structured(model: nn.Module, mlp_fraction=0.5, head_fraction=0.0, calibration=None,
                     scores: dict | None = None, multiple: int = 8,
                     refit: bool = False) -> StructuredReport:
    """Remove the least important MLP channels and query heads of every
    decoder layer, in place; the model's config records the new widths.

    mlp_fraction / head_fraction: fraction removed, in [0, 1); one number for
    every layer or a list with one per layer (e.g. from
    :func:`sensitivity_scan`). MLP widths are kept a multiple of ``multiple``
    (fast kernels like aligned sizes); heads: each KV group keeps
    ``round(group x (1 - head_fraction))`` of its query heads (at least one).
    calibration: (B, T) token batches (training split) for the scores, or
    ``scores`` from :func:`channel_scores`. refit: refit down_proj and o_proj
    on the kept channels by least squares over the calibration inputs
    (:func:`refit_columns`; needs ``calibration`` or scores with Gram
    matrices). Returns a :class:`StructuredReport`.
    Raises PruningError for fractions out of range, a missing calibration set,
    or a model with quantized layers.
    """
    n = num_blocks(model)
    mlp_f = _per_layer("mlp_fraction", mlp_fraction, n)
    head_f = _per_layer("head_fraction", head_fraction, n)
    for i in range(n):
        layer = model.layers[i]
        for name, m in (("gate_proj", layer.mlp.gate_proj), ("up_proj", layer.mlp.up_proj),
                        ("down_proj", layer.mlp.down_proj), ("q_proj", layer.self_attn.q_proj),
                        ("o_proj", layer.self_attn.o_proj)):
            if type(m) is not nn.Linear:
                raise PruningError(f"layers.{i}.{name} is a {type(m).__name__}, not nn.Linear: "
                                   "prune before quantizing")
    if scores is None:
        scores = channel_scores(model, calibration, keep_gram=refit)
    if refit and any("mlp_gram" not in scores[i] for i in range(n)):
        raise PruningError("refit needs the Gram matrices: pass calibration, or scores from "
                           "channel_scores(..., keep_gram=True)")
    cfg = model.config
    rep = StructuredReport(params_before=sum(p.numel() for p in model.parameters()))
    mlp_sizes, head_counts = [], []
    for i in range(n):
        layer, att = model.layers[i], model.layers[i].self_attn
        mlp = layer.mlp
        rep.mlp_before.append(mlp.down_proj.in_features)
        rep.heads_before.append(att.num_heads)
        keep = _keep_channels(scores[i]["mlp"].to(mlp.down_proj.weight.device), mlp_f[i], multiple)
        new_down = None
        if refit:
            new_down = refit_columns(mlp.down_proj.weight.detach(), scores[i]["mlp_gram"].to(keep.device), keep)
        mlp.gate_proj = _sliced(mlp.gate_proj, rows=keep)
        mlp.up_proj = _sliced(mlp.up_proj, rows=keep)
        mlp.down_proj = _sliced(mlp.down_proj, cols=keep)
        if new_down is not None:
            mlp.down_proj.weight.copy_(new_down)
        heads = _keep_heads(scores[i]["heads"], head_f[i], att.num_kv_heads).to(att.q_proj.weight.device)
        idx = (heads[:, None] * att.head_dim + torch.arange(att.head_dim, device=heads.device)).reshape(-1)
        new_o = None
        if refit and len(idx) < att.o_proj.in_features:
            new_o = refit_columns(att.o_proj.weight.detach(), scores[i]["o_gram"].to(idx.device), idx)
        att.q_proj = _sliced(att.q_proj, rows=idx)
        att.o_proj = _sliced(att.o_proj, cols=idx)
        if new_o is not None:
            att.o_proj.weight.copy_(new_o)
        att.num_heads = len(heads)
        mlp_sizes.append(len(keep))
        head_counts.append(len(heads))
    rep.mlp_after, rep.heads_after = mlp_sizes, head_counts
    model.config = cfg.replace(layer_intermediate_sizes=tuple(mlp_sizes), layer_num_heads=tuple(head_counts))
    rep.params_after = sum(p.numel() for p in model.parameters())
    return rep


def sensitivity_scan(model: nn.Module, calibration, evaluate, fraction: float = 0.5,
                     part: str = "mlp") -> list[float]:
    """How much each layer minds being pruned alone: for every layer i, a copy
    of the model with only layer i's MLP channels (``part="mlp"``) or query
    heads (``"heads"``) pruned by ``fraction``, scored by ``evaluate(model) ->
    float`` (e.g. the KL to the original on held-out windows). Returns one
    number per layer. Raises PruningError for an unknown part."""
    import copy

    if part not in ("mlp", "heads"):
        raise PruningError(f"part must be 'mlp' or 'heads', got {part!r}")
    scores = channel_scores(model, calibration)
    n, out = num_blocks(model), []
    for i in range(n):
        m = copy.deepcopy(model)
        fr = [0.0] * n
        fr[i] = fraction
        prune_structured(m, fr if part == "mlp" else 0.0, fr if part == "heads" else 0.0,
                         scores=scores)
        out.append(float(evaluate(m)))
    return out


# ------------------------------------------------------------- network slimming
class GatedMLP(nn.Module):
    """A SwiGLU MLP with a learned gate per channel: down((silu(g) * u) * gate)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.channel_gate = nn.Parameter(torch.ones(mlp.down_proj.in_features,
                                                    device=mlp.down_proj.weight.device,
                                                    dtype=mlp.down_proj.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h * self.channel_gate)


def gate_channels(model: nn.Module) -> list[nn.Parameter]:
    """Wrap every decoder MLP in a :class:`GatedMLP` (gates start at 1: the
    model computes the same); returns the gates, for :func:`l1_penalty`."""
    gates = []
    for i in range(num_blocks(model)):
        layer = model.layers[i]
        if not isinstance(layer.mlp, GatedMLP):
            layer.mlp = GatedMLP(layer.mlp)
        gates.append(layer.mlp.channel_gate)
    return gates


def l1_penalty(gates: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the absolute gate values (add ``lam x`` this to the loss):
    each gate feels a constant pull ``lam`` toward zero, which only a gate
    the loss needs can resist."""
    return torch.cat([g.reshape(-1) for g in gates]).abs().sum()


@torch.no_grad()
def remove_gated(model: nn.Module, threshold: float = 1e-2, multiple: int = 8) -> StructuredReport:
    """Fold each gate into down_proj's columns, drop the channels whose |gate|
    is below ``threshold`` (keeping a multiple of ``multiple``: the largest
    gates among the rest), and put plain MLPs back. Returns the widths.
    Raises PruningError when the model has no gated MLPs."""
    from ..model import MLP

    n = num_blocks(model)
    if not all(isinstance(model.layers[i].mlp, GatedMLP) for i in range(n)):
        raise PruningError("remove_gated needs the MLPs wrapped by gate_channels first")
    rep = StructuredReport(params_before=sum(p.numel() for p in model.parameters()))
    sizes = []
    for i in range(n):
        g = model.layers[i].mlp
        gate = g.channel_gate.detach()
        rep.mlp_before.append(gate.numel())
        alive = int((gate.abs() >= threshold).sum())
        keep_n = min(gate.numel(), max(multiple, int(math.ceil(alive / multiple)) * multiple))
        keep = gate.abs().topk(keep_n).indices.sort().values
        g.down_proj.weight.mul_(gate[None, :].to(g.down_proj.weight.dtype))
        mlp = MLP.__new__(MLP)
        nn.Module.__init__(mlp)
        mlp.gate_proj = _sliced(g.gate_proj, rows=keep)
        mlp.up_proj = _sliced(g.up_proj, rows=keep)
        mlp.down_proj = _sliced(g.down_proj, cols=keep)
        model.layers[i].mlp = mlp
        sizes.append(keep_n)
    rep.mlp_after = sizes
    rep.heads_before = rep.heads_after = [model.layers[i].self_attn.num_heads for i in range(n)]
    model.config = model.config.replace(layer_intermediate_sizes=tuple(sizes))
    rep.params_after = sum(p.numel() for p in model.parameters())
    return rep


class _ProxAdamW(torch.optim.AdamW):
    """AdamW, then for every group with an ``l1`` key the L1 proximal step
    (soft-thresholding): p <- sign(p) max(|p| - lr x l1, 0). Adam alone moves
    every gate at about the same rate whatever the size of its gradient, so
    an L1 term in the loss would shrink all gates alike; the proximal step
    sets the gates the loss does not defend to exactly zero."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if group.get("l1"):
                for p in group["params"]:
                    p.copy_(p.sign() * (p.abs() - group["lr"] * group["l1"]).clamp_min(0))
        return loss


# -------------------------------------------------------------------- recovery
def recover(model: nn.Module, tokenizer, seconds: float = 60.0, steps: int = 200,
            batch_size: int = 8, seq_len: int = 128, lr: float = 7e-4, seed: int = 0,
            l1: float = 0.0, gates: list[torch.Tensor] | None = None, teacher: nn.Module | None = None,
            gate_lr_scale: float = 30.0, progress: bool = False) -> dict:
    """A short fine-tune of a pruned model on the corpus's training split,
    with the shared training loop (:func:`llmopt_lab.training.train`).

    Loss: the next-token cross-entropy, or with a ``teacher`` (the model
    before pruning) the KL divergence from the teacher's next-token
    distribution to the pruned model's, per token (distillation,
    :func:`llmopt_lab.distill.kd_loss` at T=1 with alpha=1: every
    position teaches a whole distribution, not one token, so it recovers
    far more per step).

    The budget is ``steps`` optimizer steps of ``batch_size x seq_len``
    tokens, cut to what fits in ``seconds`` on this machine (one step is
    timed first, so the learning-rate schedule still runs to its end). With
    ``gates`` (network slimming) the gates learn ``gate_lr_scale`` times
    faster than the weights (they must travel from 1 to 0 in a short run)
    and, with ``l1 > 0``, the L1 penalty ``l1 x`` :func:`l1_penalty` is
    applied by its proximal step after each optimizer step (exact zeros). Returns
    dict(steps, seconds, tokens, train_loss [first, last]). Raises
    PruningError for a non-positive budget.
    """
    from ..distill import kd_loss
    from ..training import TrainSettings, lm_loss, train
    from .quantize.calibration import training_calibration_set

    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0 \
            or not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise PruningError(f"recover needs seconds > 0 and steps >= 1, got {seconds!r}, {steps!r}")

    def loss_fn(m, batch):
        if teacher is None:
            return lm_loss(m, batch)
        with torch.no_grad():
            t = teacher(batch)
        return kd_loss(m(batch), t, temperature=1.0, alpha=1.0, kind="forward")

    data = training_calibration_set(tokenizer, num_sequences=steps * batch_size, seq_len=seq_len,
                                    batch_size=batch_size, seed=seed + 1)
    dev = next(model.parameters()).device
    model.train()
    t0 = time.perf_counter()
    loss_fn(model, data[0].to(dev)).backward()  # one timed step (its gradients are dropped)
    per_step = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    fit = max(1, min(steps, int(0.9 * seconds / max(per_step, 1e-6))))
    settings = TrainSettings(steps=fit, batch_size=batch_size, seq_len=seq_len, lr=lr,
                             warmup_frac=0.05, weight_decay=0.0, eval_every=fit, seed=seed)
    optimizer = None
    if gates:
        gate_ids = {id(g) for g in gates}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
        optimizer = _ProxAdamW(
            [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": settings.weight_decay},
             {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
             {"params": list(gates), "weight_decay": 0.0, "lr_scale": gate_lr_scale, "l1": l1}],
            lr=settings.lr, betas=tuple(settings.betas))
    t0 = time.perf_counter()
    log = train(model, lambda i: data[i % len(data)], settings, loss_fn=loss_fn, optimizer=optimizer,
                progress=progress, desc="recover", log_every=1)
    took = time.perf_counter() - t0
    model.eval()
    losses = [x[1] for x in log["train_loss"]]
    return dict(steps=fit, seconds=took, tokens=settings.tokens,
                train_loss=[losses[0], losses[-1]] if losses else None)

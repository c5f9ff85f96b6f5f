"""Low-rank factorisation and LoRA (lesson 05): fewer parameters per layer, and
a cheap way to heal what that costs.

::

    from llmopt_lab.transforms.lowrank import lowrank, add_lora, merge_lora
    report = lowrank(model, param_fraction=0.5)                          # plain SVD
    report = lowrank(model, param_fraction=0.5, method="asvd",
                     calibration=batches)                                # activation-aware
    names = add_lora(model, r=8, alpha=16)       # only the adapters train now
    ...                                          # a few steps of training
    merge_lora(model)                            # back to plain linears, no added latency

**Low rank.** A linear layer's weight ``W`` (out x in) is replaced by two thin
matrices, ``up`` (out x r) and ``down`` (r x in), and the layer computes
``up @ (down @ x)``. That stores and multiplies ``r * (out + in)`` weights
instead of ``out * in``, so it only saves anything when
``r < out * in / (out + in)`` (half of ``min(out, in)`` for a square layer).
The best rank-r approximation in the Frobenius norm is the truncated SVD
(Eckart–Young): ``W = U S V^T``, keep the r largest singular values, and the
error is exactly ``sqrt(sum of the discarded S^2)``: :func:`svd_factors`.

**Activation-aware SVD** (``method="asvd"``, in the style of SVD-LLM, Wang et
al. 2024): what matters is not the weight error ``||W - W'||`` but the error
of the layer's *outputs* on real inputs, ``||X (W - W')^T||`` with X (tokens x
in). With ``G = X^T X = L L^T`` (Cholesky, damped), that error is
``||(W - W') L||``, so the truncated SVD of ``W L`` gives the best rank-r
output error; the factors are ``up = U_r sqrt(S_r)``, ``down = sqrt(S_r)
V_r^T L^{-1}`` (a triangular solve, never an explicit inverse). Input
channels that carry large activations (LLMs have a few outlier channels)
weigh more in ``W L``, so their weights are kept: the weight error grows a
little and the output error (and the perplexity) falls.

**LoRA** (Hu et al., 2021): freeze every weight and learn a low-rank update
``W + (alpha / r) B A`` with ``A`` (r x in) random and ``B`` (out x r) zero,
so the wrapped model starts exactly equal to the base. :func:`add_lora` wraps
the decoder's linears (including the thin ``down``/``up`` linears of a
:class:`LowRankLinear`: LoRA then heals the factorised model itself), and
:func:`merge_lora` folds ``B A`` back into the weight, exactly, so serving
pays nothing for the adapters.

A model holding :class:`LowRankLinear` or :class:`LoRALinear` layers has no
faithful Hugging Face checkpoint (``save_model`` refuses it).
Everything raises :class:`~llmopt_lab.errors.TransformError` on bad input.
"""

from __future__ import annotations

import copy as _copy
import math
import re
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import QuantizationError, TransformError
from .surgery import decoder_blocks, decoder_linears, find_modules, replace_module

METHODS = ("svd", "asvd")


# ------------------------------------------------------------------ spectra
def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TransformError(f"a weight must be a 2-D float tensor (out, in), got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """The singular values of ``weight`` (out, in), computed in float32:
    (min(out, in),) float32, descending. Raises TransformError for a tensor
    that is not a 2-D float matrix."""
    _check_weight(weight)
    return torch.linalg.svdvals(weight.detach().float())


def _check_rank(rank, out_features: int, in_features: int) -> int:
    full = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise TransformError(f"rank must be an integer in [1, min(out, in)] = [1, {full}] for a "
                             f"({out_features}, {in_features}) weight; got {rank!r}")
    return rank


def _factors_from_svd(U, S, Vh, rank, chol=None):
    """up (out, r) = U_r sqrt(S_r); down (r, in) = sqrt(S_r) V_r^T (L^-1 when
    ``chol`` is the whitening factor L)."""
    root = S[:rank].sqrt()
    up = U[:, :rank] * root[None, :]
    down = root[:, None] * Vh[:rank]
    if chol is not None:  # down @ L^-1: solve X L = down for X
        down = torch.linalg.solve_triangular(chol, down, upper=False, left=False)
    return up, down


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of ``weight`` as two factors.

    weight: (out, in) float. Truncated SVD ``W = U S V^T`` in float32;
    returns (up, down), float32: up (out, r) = U_r sqrt(S_r), down (r, in) =
    sqrt(S_r) V_r^T, so ``up @ down`` is the rank-r approximation with the
    least Frobenius error (Eckart–Young), ``sqrt(sum(S[r:]^2))``; the square
    root is split evenly so both factors have the same scale. Raises
    TransformError for a bad weight or rank < 1 or rank > min(out, in).
    """
    _check_weight(weight)
    rank = _check_rank(rank, *weight.shape)
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return _factors_from_svd(U, S, Vh, rank)


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """The smallest rank r that keeps a fraction ``energy`` of the spectrum's
    energy: ``sum(S[:r]^2) / sum(S^2) >= energy``.

    S: (k,) singular values, descending (:func:`singular_values`). energy: in
    (0, 1]; 1 gives the full rank k minus any exactly-zero tail (a rank-
    deficient matrix needs no more). The energy kept is ``1 - rel_error^2``,
    with rel_error the Frobenius ||W - W'|| / ||W||. Returns at least 1.
    Raises TransformError for energy outside (0, 1] or S not 1-D.
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or \
            not 0.0 < float(energy) <= 1.0:
        raise TransformError(f"energy is the fraction of sum(S^2) kept, in (0, 1]; got {energy!r}")
    if not isinstance(S, torch.Tensor) or S.dim() != 1 or S.numel() == 0:
        raise TransformError(f"S must be a non-empty 1-D tensor of singular values, got "
                             f"{getattr(S, 'shape', type(S).__name__)}")
    cum = torch.cumsum(S.detach().double() ** 2, 0)
    if float(cum[-1]) == 0.0:
        return 1
    ratio = cum / cum[-1]  # the last entry is exactly 1
    return max(1, int((ratio < float(energy)).sum()) + 1)


def rank_for_params(out_features: int, in_features: int, fraction: float) -> int:
    """The largest rank r whose factors hold at most ``fraction`` of the dense
    layer's weights: ``r * (out + in) <= fraction * out * in`` (at least 1).

    A rank-r factorisation stores ``r * (out + in)`` weights against
    ``out * in``, so it saves parameters only when ``r < out * in / (out +
    in)``: for a square layer that is half of its full rank, so a layer kept
    at 60% of its rank is *bigger* than the dense one. ``fraction=0.5`` halves
    the layer's weights (up to rounding r down); ``fraction=1`` gives the
    break-even rank (no saving; :func:`lowrank` then leaves the layer dense).
    Raises TransformError for fraction outside (0, 1] or non-positive sizes.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or \
            not 0.0 < float(fraction) <= 1.0:
        raise TransformError(f"param_fraction is the fraction of a layer's weights kept by its "
                             f"factors, in (0, 1]; got {fraction!r}")
    for v in (out_features, in_features):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TransformError(f"layer sizes must be positive integers, got "
                                 f"({out_features!r}, {in_features!r})")
    budget = float(fraction) * out_features * in_features
    r = int(budget // (out_features + in_features))
    while (r + 1) * (out_features + in_features) <= budget:
        r += 1
    while r > 0 and r * (out_features + in_features) > budget:
        r -= 1
    return max(1, r)


def whitening_factor(input_gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The lower Cholesky factor L of ``X^T X + damp * mean(diag) * I``.

    input_gram: (in, in) the sum over calibration tokens of x^T x (as
    :func:`~llmopt_lab.transforms.quantize.calibration.collect_input_stats`
    accumulates it). Returns L (in, in) float32 with ``L L^T`` = the damped
    Gram matrix, so ``||X E^T||_F^2 = ||E L||_F^2`` for any error E (out,
    in). Raises TransformError for a bad shape, a negative damp or a matrix
    that stays indefinite.
    """
    if not isinstance(input_gram, torch.Tensor) or input_gram.dim() != 2 or \
            input_gram.shape[0] != input_gram.shape[1]:
        raise TransformError(f"input_gram must be a square (in, in) matrix X^T X, got "
                             f"{getattr(input_gram, 'shape', type(input_gram).__name__)}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or damp < 0:
        raise TransformError(f"damp must be a non-negative number, got {damp!r}")
    G = input_gram.detach().float()
    G = (G + G.t()) / 2
    K = G.shape[0]
    mean_diag = float(torch.diag(G).mean())
    if not math.isfinite(mean_diag):
        raise TransformError("input_gram holds NaN or inf values")
    if mean_diag <= 0.0:  # no signal at all: every channel counts the same
        return torch.eye(K, device=G.device)
    eye = torch.eye(K, device=G.device)
    d = float(damp)
    for _ in range(4):  # a near-singular Gram (few tokens): raise the damping
        L, info = torch.linalg.cholesky_ex(G + d * mean_diag * eye)
        if int(info) == 0:
            return L
        d = max(d * 10.0, 1e-6)
    raise TransformError(f"X^T X is not positive definite even with damp={d / 10:g}: raise damp "
                         "or use more calibration tokens")


# ------------------------------------------------------------------ modules
def _effective_weight(m: nn.Module) -> torch.Tensor:
    """The (out, in) weight a linear-like module applies, in float32."""
    if isinstance(m, LoRALinear):
        return m.merged_weight().float()
    if isinstance(m, LowRankLinear):
        return m.weight().float()
    return m.weight.detach().float()


class LowRankLinear(nn.Module):
    """A linear layer stored as two thin ones: ``up(down(x))``.

    down: nn.Linear(in_features -> rank, no bias); up: nn.Linear(rank ->
    out_features, with the original's bias). Costs ``rank * (in + out)``
    weights (and as many multiply-adds per token) against ``in * out``.
    x (..., in) -> (..., out).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        _check_rank(rank, out_features, in_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @torch.no_grad()
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight it applies, ``up.weight @ down.weight``
        (float32 products in the layer's dtype; LoRA adapters on the factors
        included)."""
        up, down = _effective_weight(self.up), _effective_weight(self.down)
        return (up @ down).to(self._dtype())

    def _dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int, input_gram: torch.Tensor | None = None,
                    damp: float = 0.01) -> "LowRankLinear":
        """Factorise ``linear`` at ``rank``, on its device and in its dtype.

        input_gram None: plain truncated SVD of the weight (least weight
        error, :func:`svd_factors`). input_gram (in, in) = X^T X of the
        layer's calibration inputs: activation-aware SVD (least *output*
        error ``||X (W - W')^T||``; see the module doc) with the Gram matrix
        damped by ``damp`` times its mean diagonal. The bias is copied.
        Raises TransformError for a module that is not an nn.Linear, a bad
        rank, or a Gram matrix of the wrong size.
        """
        if not isinstance(linear, nn.Linear):
            raise TransformError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        W = linear.weight.detach()
        out_f, in_f = W.shape
        rank = _check_rank(rank, out_f, in_f)
        chol = None
        if input_gram is not None:
            if tuple(input_gram.shape) != (in_f, in_f):
                raise TransformError(f"input_gram of shape {tuple(input_gram.shape)} for a layer "
                                     f"with {in_f} input features (expected ({in_f}, {in_f}))")
            chol = whitening_factor(input_gram.to(W.device), damp)
        up, down = _factorise(W, rank, chol)
        new = cls(in_f, out_f, rank, bias=linear.bias is not None, device=W.device, dtype=W.dtype)
        new.down.weight.copy_(down)
        new.up.weight.copy_(up)
        if linear.bias is not None:
            new.up.bias.copy_(linear.bias.detach())
        return new


def _svd(W: torch.Tensor, chol: torch.Tensor | None):
    """U, S, Vh of W (plain) or of W L (whitened), float32."""
    A = W.detach().float()
    if chol is not None:
        A = A @ chol
    return torch.linalg.svd(A, full_matrices=False)


def _factorise(W, rank, chol=None, usv=None):
    U, S, Vh = usv if usv is not None else _svd(W, chol)
    return _factors_from_svd(U, S, Vh, rank, chol)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    base: the original nn.Linear (its parameters frozen); lora_a (r, in),
    Kaiming-uniform; lora_b (out, r), zeros, so the wrapped layer starts
    equal to the base; scale = alpha / r. Forward:
    ``base(x) + scale * (x @ A^T) @ B^T`` (x (..., in) -> (..., out)), which
    never forms the (out, in) update.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TransformError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise TransformError(f"the LoRA rank r must be a positive integer, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not \
                math.isfinite(alpha):
            raise TransformError(f"alpha must be a finite number, got {alpha!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale = r, float(alpha), float(alpha) / r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_a.t()) @ self.lora_b.t())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + scale * B A`` (out, in), summed in float32, in the base's dtype."""
        W = self.base.weight
        return (W.float() + self.scale * (self.lora_b.float() @ self.lora_a.float())).to(W.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"


# ------------------------------------------------------------------ lowrank()
def _compile_include(include):
    if include is None:
        return None
    pats = [include] if isinstance(include, str) else include
    if not isinstance(pats, (list, tuple)) or not pats or \
            not all(isinstance(p, str) for p in pats):
        raise TransformError(f"include must be a regex string or a list of them, got {include!r}")
    try:
        return [re.compile(p) for p in pats]
    except re.error as e:
        raise TransformError(f"include: {e} in the pattern") from None


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def param_count(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor (tied embeddings) counted once."""
    return sum(p.numel() for p in model.parameters())


def lowrank_bytes(model: nn.Module) -> int:
    """Bytes of every parameter of ``model`` (shared tensors once): what
    a factorised model holds in memory."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def lowrank(model: nn.Module, *, rank: int | None = None, energy: float | None = None,
            param_fraction: float | None = None, method: str = "svd", calibration=None,
            include: str | Sequence[str] | None = None, skip_if_no_savings: bool = True,
            damp: float = 0.01, copy: bool = False) -> dict:
    """Replace the decoder's linear layers (q, k, v, o, gate, up, down of
    every block; never the lm_head or the embeddings) by :class:`LowRankLinear`.

    Exactly one of the rank selectors, per layer:

    * rank: this rank in every layer (capped at each layer's min(out, in)).
    * energy: the least rank keeping that fraction of the spectrum's energy
      (:func:`rank_for_energy`; for "asvd" the spectrum of the whitened W L).
    * param_fraction: the largest rank whose factors hold at most that
      fraction of the layer's weights (:func:`rank_for_params`; 0.5 halves
      every layer).

    method: "svd" (least weight error) or "asvd" (least output error on the
    ``calibration`` inputs: a list of (B, T) token tensors from the training
    split, e.g. ``training_calibration_set(tokenizer, 16, 128)``). Calibration
    goes block by block: block i's input statistics are collected on the
    model whose earlier blocks are already factorised, so it sees their
    errors; the layers of one block reading the same input share one X^T X.
    include: a regex (``re.search`` on names like ``layers.3.mlp.up_proj``)
    or a list of them; only matching layers are factorised. A layer whose
    chosen rank saves no parameters (``r * (out + in) >= out * in``) stays
    dense when ``skip_if_no_savings`` (listed under "skipped"). damp: the
    Gram matrix damping (asvd). copy: work on a deep copy, returned as
    ``report["model"]`` (otherwise in place).

    Returns a dict: "layers": name -> {rank, params_before, params_after,
    rel_error (Frobenius ||W - W'|| / ||W||), and for asvd rel_output_error
    (||X (W - W')^T|| / ||X W^T|| on the calibration inputs)}; "skipped": the
    names left dense; "params_before", "params_after": the replaced layers'
    parameters (biases included); "model_params_before",
    "model_params_after": the whole model's (tied tensors once); "method";
    and "model" with copy=True.

    Raises TransformError for none or several selectors, a bad selector
    value, an unknown method, asvd without (valid) calibration, an include
    that matches nothing, a matched layer that is not a plain nn.Linear
    (already quantized or factorised), or a model without decoder layers.
    """
    chosen = [k for k, v in (("rank", rank), ("energy", energy),
                             ("param_fraction", param_fraction)) if v is not None]
    if len(chosen) != 1:
        raise TransformError("give exactly one of rank=, energy=, param_fraction= to choose each "
                             f"layer's rank (got {', '.join(chosen) or 'none'})")
    if method not in METHODS:
        raise TransformError(f"unknown low-rank method {method!r}; choose one of {', '.join(METHODS)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise TransformError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None:
        rank_for_energy(torch.ones(1), energy)  # validates energy
    if param_fraction is not None:
        rank_for_params(1, 1, param_fraction)  # validates the fraction
    pats = _compile_include(include)
    batches = None
    if method == "asvd":
        from .quantize.calibration import as_batches, check_calibration

        try:
            check_calibration(calibration, model, method)
        except QuantizationError as e:
            raise TransformError(str(e)) from None
        batches = as_batches(calibration)

    all_layers = decoder_linears(model)  # TransformError without decoder blocks
    targets = {n: m for n, m in all_layers.items()
               if pats is None or any(p.search(n) for p in pats)}
    if not targets:
        raise TransformError(f"include={include!r} matches no decoder layer (names look like "
                             f"{next(iter(all_layers))!r})")
    bad = [n for n, m in targets.items() if type(m) is not nn.Linear]
    if bad:
        raise TransformError(f"these layers are not plain nn.Linear (already quantized or "
                             f"factorised?): {', '.join(bad[:4])}; factorise the float model, or "
                             "restrict include= to the dense layers")

    if copy:
        model = _copy.deepcopy(model)
        all_layers = decoder_linears(model)
        targets = {n: all_layers[n] for n in targets}
    report = dict(method=method, layers={}, skipped=[], params_before=0, params_after=0,
                  model_params_before=param_count(model))

    def choose_rank(W, S):
        out_f, in_f = W.shape
        if rank is not None:
            return min(rank, out_f, in_f)
        if energy is not None:
            return rank_for_energy(S, energy)
        return rank_for_params(out_f, in_f, param_fraction)

    def factorise(name, lin, gram):
        W = lin.weight.detach()
        out_f, in_f = W.shape
        chol = whitening_factor(gram.to(W.device), damp) if gram is not None else None
        usv = _svd(W, chol)
        r = choose_rank(W, usv[1])
        if skip_if_no_savings and r * (out_f + in_f) >= out_f * in_f:
            report["skipped"].append(name)
            return
        up, down = _factorise(W, r, chol, usv)
        new = LowRankLinear(in_f, out_f, r, bias=lin.bias is not None, device=W.device,
                            dtype=W.dtype)
        new.down.weight.copy_(down)
        new.up.weight.copy_(up)
        if lin.bias is not None:
            new.up.bias.copy_(lin.bias.detach())
        Wf = W.float()
        E = Wf - new.weight().float()  # the error of the stored (possibly half) factors
        entry = dict(rank=r, params_before=_params(lin), params_after=_params(new),
                     rel_error=float(E.norm() / Wf.norm().clamp_min(1e-30)))
        if gram is not None:
            G = gram.float().to(W.device)
            num = torch.trace(E @ G @ E.t()).clamp_min(0).sqrt()
            den = torch.trace(Wf @ G @ Wf.t()).clamp_min(1e-30).sqrt()
            entry["rel_output_error"] = float(num / den)
        report["layers"][name] = entry
        report["params_before"] += entry["params_before"]
        report["params_after"] += entry["params_after"]
        replace_module(model, name, new)

    if method == "svd":
        for name, lin in targets.items():
            factorise(name, lin, None)
    else:
        from .quantize.calibration import collect_input_stats

        for i, block in decoder_blocks(model):
            here = {n: m for n, m in targets.items() if n.startswith(f"layers.{i}.")}
            if not here:
                continue
            # layers reading the same tensor share one X^T X
            share = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                     "mlp.up_proj": "mlp.gate_proj"}
            prefix = f"layers.{i}."
            source = {n: prefix + share.get(n[len(prefix):], n[len(prefix):]) for n in here}
            hooked = {s: model.get_submodule(s) for s in set(source.values())}
            try:
                stats = collect_input_stats(model, batches, hooked, hessian=True, stop_after=block)
            except QuantizationError as e:
                raise TransformError(str(e)) from None
            for name, lin in here.items():
                factorise(name, lin, stats[source[name]].xtx)
            del stats
    report["model_params_after"] = param_count(model)
    if copy:
        report["model"] = model
    return report


# ------------------------------------------------------------------ LoRA
_SAVED_GRAD = "_lora_saved_requires_grad"


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0,
             targets: str | Sequence[str] | None = None) -> list[str]:
    """Wrap linear layers of the decoder blocks in :class:`LoRALinear` and
    freeze everything else, so that only the adapters train.

    Wraps every plain ``nn.Linear`` inside ``model.layers`` (the seven
    projections of each block, or the ``down``/``up`` linears of each
    :class:`LowRankLinear`, so LoRA heals the factors themselves), or only
    those whose dotted name matches ``targets`` (a regex, ``re.search``, or a
    list of them). Never the lm_head or the embeddings. scale = alpha / r.
    Every parameter that is not an adapter gets ``requires_grad=False``;
    :func:`merge_lora` restores the previous flags. Returns the wrapped names.

    Raises TransformError for a bad r or alpha, targets matching no linear,
    a model that already has LoRA adapters (merge them first), or a model
    without decoder blocks.
    """
    blocks = list(decoder_blocks(model))  # TransformError without decoder blocks
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise TransformError("the model already has LoRA adapters; merge_lora(model) first")
    pats = _compile_include(targets)
    names = []
    for i, _ in blocks:
        for ref in find_modules(model, f"layers.{i}.*", nn.Linear):
            if type(ref.module) is nn.Linear and (pats is None or any(p.search(ref.name)
                                                                       for p in pats)):
                names.append(ref.name)
    if not names:
        raise TransformError(f"targets={targets!r} matches no nn.Linear inside the decoder blocks")
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    wrapped = {n: LoRALinear(model.get_submodule(n), r, alpha) for n in names}  # validates r, alpha
    for p in model.parameters():
        p.requires_grad_(False)
    for n, w in wrapped.items():
        replace_module(model, n, w)
        w.lora_a.requires_grad_(True)
        w.lora_b.requires_grad_(True)
    object.__setattr__(model, _SAVED_GRAD, saved)
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (lora_a, lora_b of every :class:`LoRALinear`),
    in module order: what the optimizer should get."""
    out = []
    for m in model.modules():
        if isinstance(m, LoRALinear):
            out += [m.lora_a, m.lora_b]
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` by a plain ``nn.Linear`` holding
    ``W + scale * B A`` (and the base's bias): the same function, computed by
    one matrix as before, so the adapters cost nothing at inference. Restores
    the ``requires_grad`` flags :func:`add_lora` saved (parameters it did not
    see become trainable). Returns how many layers were merged (0 when there
    are none)."""
    refs = find_modules(model, None, LoRALinear)
    for ref in refs:
        lora, base = ref.module, ref.module.base
        new = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        new.weight.copy_(lora.merged_weight())
        if base.bias is not None:
            new.bias.copy_(base.bias)
        replace_module(model, ref.name, new)
    saved = getattr(model, _SAVED_GRAD, None)
    if refs or saved is not None:
        saved = saved or {}
        for n, p in model.named_parameters():
            p.requires_grad_(saved.get(n, True))
        if hasattr(model, _SAVED_GRAD):
            object.__delattr__(model, _SAVED_GRAD)
    return len(refs)


__all__ = ["METHODS", "svd_factors", "singular_values", "rank_for_energy", "rank_for_params",
           "whitening_factor", "LowRankLinear", "LoRALinear", "lowrank", "add_lora",
           "merge_lora", "lora_parameters", "param_count", "lowrank_bytes"]

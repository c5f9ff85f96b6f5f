"""Pruning (lesson 04): zero out the weights that matter least, by three rules.

::

    from llmopt_lab.transforms.prune import prune
    report = prune(model, "wanda", sparsity=0.5, calibration=batches)      # unstructured 50%
    report = prune(model, "sparsegpt", pattern="2:4", calibration=batches)  # semi-structured

Every rule scores each weight ``W[i, j]`` of a linear layer (out x in) and
removes the lowest-scored ones *within a comparison group*:

* **magnitude**: score ``|W_ij|``; groups: the whole layer (``scope="layer"``)
  or every decoder linear together (``scope="global"``).
* **Wanda** (Sun et al., 2023): score ``|W_ij| * ||X_j||_2``, the weight times
  the L2 norm of its input channel over the calibration tokens, so a small
  weight on a large activation survives; groups: each output row (the
  paper's finding: per-output comparison works best for LLMs). No weight
  update.
* **SparseGPT** (Frantar & Alistarh, 2023): the optimal-brain-surgeon rule
  with the layer's Hessian ``H = 2 X^T X / n`` (the one GPTQ uses): remove
  the weights with the least ``W_ij^2 / [H^-1]_jj^2`` in blocks of columns,
  and after each column update the columns to its right by the error times
  the row of the inverse Hessian's Cholesky factor, so the rest of the layer
  compensates (exactly GPTQ's update with "round to zero" in place of "round
  to the grid").

``pattern="N:M"`` (e.g. "2:4") keeps N of every M consecutive weights along
the input dimension instead of a free fraction: the layout NVIDIA's sparse
tensor cores (and :mod:`llmopt_lab.kernels.sparse24`) compute with.

Masks zero weights in place; the matrices stay dense (and as slow) until a
sparse format stores them: the lesson's point. Calibrated rules (Wanda,
SparseGPT) go block by block like GPTQ: block i's inputs come from the model
whose blocks 0..i-1 are already pruned, so later blocks see (and correct)
the earlier errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import PruningError, QuantizationError
from .quantize.calibration import as_batches, check_calibration, collect_input_stats, decoder_groups
from .surgery import decoder_linears, num_blocks

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """"N:M" -> (N, M) (keep N of every M), None -> None. Raises PruningError
    unless 0 < N < M."""
    if pattern is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise PruningError(f"pattern must be 'N:M' with 0 < N < M (keep N of every M), "
                           f"e.g. '2:4'; got {pattern!r}")
    return int(m.group(1)), int(m.group(2))


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or \
            not 0.0 <= float(sparsity) < 1.0:
        raise PruningError(f"sparsity is the fraction of weights removed, in [0, 1); got {sparsity!r}")
    return float(sparsity)


def mask_by_score(scores: torch.Tensor, sparsity: float = 0.5, pattern: str | None = None,
                  per_row: bool = False) -> torch.Tensor:
    """Which weights to keep, from their scores.

    scores: (N, K) float, higher = more important. sparsity: the fraction
    removed (ties at the threshold are broken by position, so exactly
    ``round(sparsity * count)`` go). per_row: compare within each row (else
    over the whole matrix). pattern "N:M": keep the N highest of every M
    consecutive scores along K instead (``sparsity`` is then ignored).
    Returns a bool (N, K) mask, True = keep. Raises PruningError for a bad
    sparsity or pattern, or K not a multiple of M.
    """
    if scores.dim() != 2:
        raise PruningError(f"scores must be (out, in), got shape {tuple(scores.shape)}")
    nm = parse_pattern(pattern)
    N, K = scores.shape
    if nm is not None:
        n, m = nm
        if K % m:
            raise PruningError(f"an {n}:{m} pattern needs the input size ({K}) to be a multiple of {m}")
        groups = scores.reshape(N, K // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(n, dim=2).indices, True)
        return keep.reshape(N, K)
    sparsity = _check_sparsity(sparsity)
    flat = scores.reshape(N, K) if per_row else scores.reshape(1, -1)
    drop = round(sparsity * flat.shape[1])
    keep = torch.ones_like(flat, dtype=torch.bool)
    if drop:
        keep.scatter_(1, flat.argsort(dim=1, stable=True)[:, :drop], False)
    return keep.reshape(N, K)


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda's scores |W_ij| * ||X_j||_2: weight (N, K), input_sq_sum (K,) the
    sum over calibration tokens of x_j^2 (the diagonal of X^T X). (N, K) float32."""
    if input_sq_sum.shape != (weight.shape[1],):
        raise PruningError(f"input statistics of shape {tuple(input_sq_sum.shape)} do not match "
                           f"a weight with {weight.shape[1]} input channels")
    return weight.detach().float().abs() * input_sq_sum.float().clamp_min(0).sqrt()[None, :]


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise PruningError(f"block_size must be a positive integer (columns pruned together), "
                           f"got {block_size!r}")


def sparsegpt_prune_layer(weight: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5,
                          pattern: str | None = None, block_size: int = 128,
                          damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer: returns (new weight, keep mask), both (N, K).

    weight: (N, K); H: (K, K) the Hessian 2 X^T X / n of its input. Within each
    block of ``block_size`` columns the weights with the least
    ``w^2 / [H^-1]_jj^2`` are removed (a fraction ``sparsity`` of the block,
    or the pattern's M - N of every M), then column by column the removed
    weights' error is spread over the columns to the right through the
    upper Cholesky factor U of H^-1 (W[:, j:] -= err_j * U[j, j:] / U[j, j]).
    ``damp`` adds that fraction of the mean diagonal to H (a dead input
    channel gets a unit diagonal). Computed in float32; the result has the
    weight's dtype. Raises PruningError for mismatched shapes, a
    ``block_size`` that is not a positive integer, or a Hessian that stays
    singular.
    """
    _check_block_size(block_size)
    W = weight.detach().float().clone()
    N, K = W.shape
    if H.shape != (K, K):
        raise PruningError(f"Hessian of shape {tuple(H.shape)} for a weight with {K} input channels")
    nm = parse_pattern(pattern)
    if nm is None:
        sparsity = _check_sparsity(sparsity)
    elif K % nm[1] or block_size % nm[1]:
        raise PruningError(f"an {nm[0]}:{nm[1]} pattern needs the input size ({K}) and block_size "
                           f"({block_size}) to be multiples of {nm[1]}")
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, device=H.device)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as e:
        raise PruningError(f"the Hessian is not positive definite even with damp={damp}: raise "
                           f"damp or use more calibration tokens ({e})") from None
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = torch.diag(U1)
        err1 = torch.zeros_like(W1)
        if nm is None:  # this block's share of the removals, by the OBS saliency
            keep[:, i1:i2] = mask_by_score(W1 ** 2 / d[None, :] ** 2, sparsity)
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                sal = W1[:, j:j + nm[1]] ** 2 / d[None, j:j + nm[1]] ** 2
                keep[:, i1 + j:i1 + j + nm[1]] = mask_by_score(sal, pattern=pattern)
            w = W1[:, j]
            q = torch.where(keep[:, i1 + j], w, torch.zeros_like(w))
            err = (w - q) / d[j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            W1[:, j] = q
            err1[:, j] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
    W[~keep] = 0.0
    return W.to(weight.dtype), keep


@dataclass
class PruneReport:
    """What :func:`prune` did: per layer name, (zeros, total) weights; the
    method, sparsity and pattern asked for."""

    method: str
    sparsity: float
    pattern: str | None
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def zeros(self) -> int:
        return sum(z for z, _ in self.layers.values())

    @property
    def total(self) -> int:
        return sum(t for _, t in self.layers.values())

    @property
    def achieved(self) -> float:
        """The fraction of the pruned layers' weights that are zero."""
        return self.zeros / max(self.total, 1)


def _targets(model: nn.Module, include_lm_head: bool) -> dict[str, nn.Module]:
    layers = decoder_linears(model, include_lm_head=include_lm_head)
    bad = [n for n, m in layers.items() if not isinstance(m, nn.Linear)]
    if bad:
        raise PruningError(f"these layers are not plain nn.Linear (already quantized?): "
                           f"{', '.join(bad[:4])}; prune before quantizing")
    return layers


@torch.no_grad()
def prune(model: nn.Module, method: str = "magnitude", sparsity: float = 0.5,
          pattern: str | None = None, calibration=None, scope: str = "layer",
          include_lm_head: bool = False, block_size: int = 128, damp: float = 0.01,
          progress: bool = False) -> PruneReport:
    """Prune every decoder linear layer of ``model`` in place (the embeddings,
    norms and, unless asked, the lm_head stay dense).

    method: "magnitude", "wanda" or "sparsegpt" (the module docstring explains
    each). sparsity: fraction of each comparison group removed, in [0, 1)
    (ignored with a pattern). pattern: "N:M" to keep N of every M consecutive
    input weights. calibration: (B, T) token batches from the training split
    (Wanda and SparseGPT). scope: "layer" or "global" (magnitude only: one
    threshold over all the pruned layers). Returns a :class:`PruneReport`.
    Raises PruningError for an unknown method or scope, a bad sparsity,
    pattern or block_size, or a missing or bad calibration set;
    TransformError for a model without decoder blocks.
    """
    _check_block_size(block_size)
    if method not in METHODS:
        raise PruningError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if scope not in ("layer", "global"):
        raise PruningError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "global" and (method != "magnitude" or pattern is not None):
        raise PruningError("scope='global' is for unstructured magnitude pruning only")
    nm = parse_pattern(pattern)
    if nm is None:
        sparsity = _check_sparsity(sparsity)
    targets = _targets(model, include_lm_head)
    for name, m in targets.items():
        if nm is not None and m.in_features % nm[1]:
            raise PruningError(f"{name} has {m.in_features} inputs, not a multiple of {nm[1]} "
                               f"(pattern {pattern})")
    report = PruneReport(method, sparsity, pattern)
    if method == "magnitude":
        if scope == "global":
            scores = torch.cat([m.weight.detach().float().abs().reshape(-1) for m in targets.values()])
            keep = mask_by_score(scores[None, :], sparsity).reshape(-1)
            start = 0
            for m in targets.values():
                k = keep[start:start + m.weight.numel()].reshape(m.weight.shape)
                start += m.weight.numel()
                m.weight.mul_(k.to(m.weight.dtype))
        else:
            for m in targets.values():
                m.weight.mul_(mask_by_score(m.weight.detach().float().abs(), sparsity, pattern)
                              .to(m.weight.dtype))
    else:
        try:
            check_calibration(calibration, model, method)
        except QuantizationError as e:  # the same checks as quantization's; pruning's error class
            raise PruningError(str(e)) from None
        _prune_calibrated(model, method, sparsity, pattern, as_batches(calibration),
                          include_lm_head, block_size, damp, progress)
    for name, m in targets.items():
        report.layers[name] = (int((m.weight == 0).sum()), m.weight.numel())
    return report


def _prune_calibrated(model, method, sparsity, pattern, batches, include_lm_head, block_size,
                      damp, progress) -> None:
    layers = range(num_blocks(model))
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc=method, leave=False)

    def prune_group(names, modules, stats):
        for name, m in zip(names, modules):
            if method == "wanda":  # the diagonal of X^T X: each input channel's sum of squares
                scores = wanda_scores(m.weight, torch.diag(stats.xtx))
                m.weight.mul_(mask_by_score(scores, sparsity, pattern, per_row=True).to(m.weight.dtype))
            else:
                new, _ = sparsegpt_prune_layer(m.weight, stats.hessian, sparsity, pattern,
                                               block_size, damp)
                m.weight.copy_(new)

    for i in layers:
        groups = decoder_groups(model, i)
        stats = collect_input_stats(model, batches, {g.names[0]: g.modules[0] for g in groups},
                                    hessian=True, stop_after=model.layers[i])
        for g in groups:
            prune_group(g.names, g.modules, stats[g.names[0]])
        del stats
    if include_lm_head:
        stats = collect_input_stats(model, batches, {"lm_head": model.lm_head}, hessian=True)
        prune_group(["lm_head"], [model.lm_head], stats["lm_head"])


def is_n_m_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every M consecutive entries of each row (along the input
    dimension) hold at most N nonzeros. Raises PruningError unless
    0 <= n <= m are integers with m >= 1 and ``weight`` is 2-D."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not 0 <= n <= m \
            or m < 1:
        raise PruningError(f"an N:M pattern needs integers 0 <= n <= m, m >= 1; got n={n!r}, m={m!r}")
    if weight.dim() != 2:
        raise PruningError(f"is_n_m_sparse takes a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if K % m:
        return False
    return bool(((weight.reshape(N, K // m, m) != 0).sum(-1) <= n).all())


def sparsity_of(model: nn.Module, include_lm_head: bool = False) -> dict[str, float]:
    """Fraction of zero weights of each decoder linear layer (name -> fraction)."""
    return {n: float((m.weight == 0).float().mean()) for n, m in
            decoder_linears(model, include_lm_head=include_lm_head).items()}


def sparse_cost(model: nn.Module, include_lm_head: bool = False, dtype_bytes: float = 2.0) -> dict:
    """What the decoder's linear layers of a pruned model cost, counted
    exactly from their weights (the embeddings, norms and attention are not
    included).

    Returns dict(weights, nonzeros, sparsity, dense_bytes (every weight
    stored, ``dtype_bytes`` each), two_four_bytes (the 2:4 compressed format:
    half the values plus a 2-bit index each; None unless every layer is 2:4),
    dense_flops_per_token (2 x weights: what a dense kernel computes, zeros
    included), sparse_flops_per_token (2 x nonzeros: what a kernel that skips
    every zero would compute)).
    """
    layers = decoder_linears(model, include_lm_head=include_lm_head)
    weights = sum(m.weight.numel() for m in layers.values())
    nonzeros = sum(int((m.weight != 0).sum()) for m in layers.values())
    two_four = all(is_n_m_sparse(m.weight, 2, 4) for m in layers.values())
    return dict(weights=weights, nonzeros=nonzeros, sparsity=1 - nonzeros / max(weights, 1),
                dense_bytes=weights * dtype_bytes,
                two_four_bytes=weights / 2 * dtype_bytes + weights / 2 * 0.25 if two_four else None,
                dense_flops_per_token=2 * weights, sparse_flops_per_token=2 * nonzeros)

"""GPTQ: quantize a layer's weights one input column at a time, pushing each
column's rounding error onto the columns not yet quantized.

A linear layer's output error on calibration inputs X (n x K) is
``||X (W - Q)^T||^2 = tr((W - Q) H (W - Q)^T) / 2`` with ``H = 2 X^T X / n``.
Rounding column j alone leaves an error ``e_j = w_j - q_j`` (a column over all
output rows). Because the input channels are correlated (H is not diagonal),
that error can be partly cancelled by nudging the remaining columns: the
optimal nudge (Optimal Brain Surgeon, restricted to the columns after j) is

    W[:, j+1:] -= (e_j / U[j, j]) * U[j, j+1:]

where U is the upper Cholesky factor of H^-1 (``H^-1 = U^T U``). Doing this
for j = 0, 1, ..., K-1 is GPTQ. Its pieces here:

* :func:`gptq_prepare`: dampen H (``+ damp * mean(diag H) * I``), handle dead
  inputs, factor: U.
* :func:`gptq_column_update`: ONE step, the algorithm's heart (an exercise
  of lesson 03 is graded against it).
* :func:`gptq_quantize_layer`: all columns, with lazy batch updates: within a
  block of columns the update is applied to the block only, and the block's
  accumulated errors are pushed onto the rest in one matmul
  (``W[:, end:] -= E @ U[block, end:]``), the same arithmetic in far fewer
  passes over W. Group scales/zeros are computed when the first column of a
  group is reached (from the already-updated columns), or up front
  (``static_groups``); ``act_order`` processes the columns in order of
  decreasing H diagonal (the most active inputs first, while there is most
  freedom left to compensate), which forces static groups so that the
  result keeps the contiguous-group format of the kernels.
* :func:`gptq_quantize_model`: the model, block by block, each block
  calibrated on the outputs of the blocks before it, already quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...errors import QuantizationError
from ..surgery import num_blocks, replace_module
from .calibration import as_batches, check_calibration, collect_input_stats, decoder_groups
from .formats import Int4Weight, check_group_size, check_low_bits, int4_group_params
from .layers import Int4Linear
from .registry import register_method

QMAX = 15  # int4 codes are 0..15


def gptq_prepare(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Dampen H and factor its inverse.

    H: (K, K) symmetric positive semi-definite (2 X^T X / n). Inputs that were
    always zero (H[j, j] == 0) get H[j, j] = 1 so that H can be inverted (their
    columns are then simply rounded: no other column feels them). Then
    ``H += damp * mean(diag H) * I``; if the Cholesky factorisation still
    fails, the damping is multiplied by 10, up to 3 times.
    Returns (U, dead): U (K, K) float32 upper triangular with H^-1 = U^T U,
    and dead (K,) bool. Raises QuantizationError if H cannot be factored.
    """
    H = H.detach().float().clone()
    K = H.shape[0]
    if H.shape != (K, K):
        raise QuantizationError(f"H must be square, got {tuple(H.shape)}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(K, device=H.device)
    for attempt in range(4):
        L, info = torch.linalg.cholesky_ex(H + (damp * 10 ** attempt) * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, dead
    raise QuantizationError("GPTQ: the Hessian is not positive definite even with 1000x the "
                            "damping; use more calibration tokens or a larger damp")


def gptq_column_update(W: torch.Tensor, U: torch.Tensor, j: int, scale: torch.Tensor,
                       zero: torch.Tensor, inplace: bool = False, qmax: int = QMAX):
    """One GPTQ step: quantize column j of W and spread its error onto the
    columns after it.

    W: (N, K) float32 current weights (columns < j already quantized, columns
    >= j updated by the earlier steps); U: (K, K) upper Cholesky factor of the
    damped H^-1 (:func:`gptq_prepare`; or its diagonal block for the columns
    W holds); scale, zero: (N,) the int4 grid of column j's group; qmax: the
    largest code (15 at 4 bits, 2^bits - 1 below). Does::

        q   = clamp(round(W[:, j] / scale) + zero, 0, qmax)    # codes
        dq  = (q - zero) * scale                               # the value kept
        err = (W[:, j] - dq) / U[j, j]
        W[:, j+1:] -= err[:, None] * U[j, j+1:][None, :]       # compensate
        W[:, j] = dq

    Returns (W_new, codes, err): W_new (N, K) (W itself when ``inplace``, else
    a new tensor), codes (N,) float32 in [0, qmax], err (N,) the scaled error.
    """
    if not inplace:
        W = W.clone()
    w = W[:, j].clone()
    codes = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
    dq = (codes - zero) * scale
    err = (w - dq) / U[j, j]
    W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
    W[:, j] = dq
    return W, codes, err


@dataclass
class GPTQResult:
    """weight: the layer in the packed int4 format; dequantized: (N, K)
    float32 of the same values; perm: the column order used (act_order) or None."""

    weight: Int4Weight
    dequantized: torch.Tensor
    perm: torch.Tensor | None = None


@torch.no_grad()
def gptq_quantize_layer(W: torch.Tensor, H: torch.Tensor, group_size: int = 128,
                        damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                        static_groups: bool = False, bits: int = 4) -> GPTQResult:
    """GPTQ of one linear layer into the int4 format (asymmetric, per group).

    W: (N, K) weight (any float dtype; computed in float32 on its device);
    H: (K, K) = 2 X^T X / n of the layer's calibration inputs. group_size:
    32/64/128/256, dividing K. block_size: columns per lazy-update block
    (rounded up to a multiple of group_size; the result does not depend on
    it beyond float rounding). act_order / static_groups: see the module doc.
    bits: 4, or 3 / 2 (fewer levels in the same container, see
    :func:`~llmopt_lab.transforms.quantize.formats.quantize_int4`).
    Returns a :class:`GPTQResult`. Raises QuantizationError on bad shapes or bits.
    """
    N, K = W.shape
    check_group_size(group_size, K)
    check_low_bits(bits)
    qmax = 2 ** bits - 1
    if H.shape != (K, K):
        raise QuantizationError(f"H has shape {tuple(H.shape)}, expected ({K}, {K})")
    Wf = W.detach().float().clone()
    Hf = H.detach().to(Wf.device).float()
    n_groups = K // group_size
    static = static_groups or act_order
    if static:  # every group's grid from the original weights, before any update
        scales = torch.empty(N, n_groups, device=Wf.device)
        zeros = torch.empty(N, n_groups, device=Wf.device)
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = int4_group_params(Wf[:, g * group_size:(g + 1) * group_size],
                                                          bits=bits)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(Hf), descending=True)
        Wf = Wf[:, perm]
        Hf = Hf[perm][:, perm]
    U, _ = gptq_prepare(Hf, damp)
    col_group = (perm if perm is not None else torch.arange(K, device=Wf.device)) // group_size
    col_group = col_group.tolist()
    codes = torch.zeros(N, K, device=Wf.device)
    if not static:
        scales = torch.empty(N, n_groups, device=Wf.device)
        zeros = torch.empty(N, n_groups, device=Wf.device)
    B = max(1, -(-block_size // group_size)) * group_size
    for b0 in range(0, K, B):
        b1 = min(b0 + B, K)
        W1 = Wf[:, b0:b1].clone()  # this block's columns, updated as we go
        U1 = U[b0:b1, b0:b1]
        E1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            j = b0 + i
            g = col_group[j]
            if not static and j % group_size == 0:  # a new group: its grid from the updated weights
                scales[:, g], zeros[:, g] = int4_group_params(W1[:, i:i + group_size], bits=bits)
            W1, q, err = gptq_column_update(W1, U1, i, scales[:, g], zeros[:, g], inplace=True,
                                            qmax=qmax)
            codes[:, j] = q
            E1[:, i] = err
        Wf[:, b0:b1] = W1
        Wf[:, b1:] -= E1 @ U[b0:b1, b1:]  # the block's errors onto every later column at once
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        Wf = Wf[:, inv]
    weight = Int4Weight.from_codes(codes.to(torch.uint8), scales, zeros.to(torch.uint8), group_size)
    return GPTQResult(weight=weight, dequantized=weight.dequantize(), perm=perm)


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, calibration, group_size: int = 128, damp: float = 0.01,
                        act_order: bool = False, block_size: int = 128,
                        static_groups: bool = False, include_lm_head: bool = False,
                        backend: str = "auto", progress: bool = False, bits: int = 4) -> nn.Module:
    """GPTQ every decoder block's linear layers in place (and the lm_head when
    asked), block by block: the inputs of block i are computed by the model
    whose blocks 0..i-1 are already quantized, so each block learns to
    compensate for the errors before it. Layers reading the same input (q/k/v,
    gate/up) share one Hessian. Returns the model. Raises QuantizationError
    for missing or empty calibration data (no batches, a batch without
    tokens, ids that are not integer tokens of the model's vocabulary)."""
    check_calibration(calibration, model, "gptq")
    batches = as_batches(calibration)
    layers = range(num_blocks(model))
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="gptq", leave=False)
    check_low_bits(bits)
    kw = dict(group_size=group_size, damp=damp, block_size=block_size, act_order=act_order,
              static_groups=static_groups, bits=bits)
    for i in layers:
        groups = decoder_groups(model, i)
        stats = collect_input_stats(model, batches, {g.names[0]: g.modules[0] for g in groups},
                                    stop_after=model.layers[i])
        for g in groups:
            H = stats[g.names[0]].hessian
            for name, m in zip(g.names, g.modules):
                res = gptq_quantize_layer(m.weight, H, **kw)
                replace_module(model, name, Int4Linear(res.weight, m.bias, backend=backend, bits=bits))
        del stats
    if include_lm_head:
        stats = collect_input_stats(model, batches, {"lm_head": model.lm_head})
        res = gptq_quantize_layer(model.lm_head.weight, stats["lm_head"].hessian, **kw)
        replace_module(model, "lm_head", Int4Linear(res.weight, None, backend=backend, bits=bits))
    return model


@register_method("gptq", options=("damp", "act_order", "block_size", "static_groups", "bits"),
                 calibrated=True, group_size=True)
def gptq_method(model: nn.Module, targets: dict, *, calibration, group_size: int = 128,
                include_lm_head: bool = False, backend: str = "auto", progress: bool = False,
                **options) -> dict:
    """The int4 format, GPTQ (calibrated): :func:`gptq_quantize_model`."""
    gptq_quantize_model(model, calibration, group_size=group_size, include_lm_head=include_lm_head,
                        backend=backend, progress=progress, **options)
    return {}


__all__ = ["gptq_prepare", "gptq_column_update", "gptq_quantize_layer", "gptq_quantize_model",
           "GPTQResult", "gptq_method"]

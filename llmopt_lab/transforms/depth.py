"""Fewer layers and shared layers: the two depth transforms of lesson 05.

**Fewer layers.** In a trained decoder, some blocks change the residual
stream very little: their output is nearly parallel to their input. The
*block influence* of block i (ShortGPT, Men et al. 2024) measures that,

    BI_i = 1 - E_tokens[ cos(h_i, h_{i+1}) ]

with h_i the hidden state entering block i and h_{i+1} the one leaving it,
averaged over calibration tokens. Blocks with the lowest influence are the
first candidates for removal (:func:`block_influence`,
:func:`remove_layers`); the model's config, its per-layer lists and every
attention module's layer index follow, so KV caches built afterwards have
the new number of layers. Decode time falls with the number of blocks;
quality falls too, and a short healing fine-tune (distillation from the
full model, or LoRA) recovers part of it.

**Shared layers.** A block can reuse another block's weights (ALBERT-style
cross-layer sharing): the same tensors serve both, each block keeps its own
layer index and KV cache. Bytes fall, FLOPs do not (each block still
computes), so at batch 1 on a GPU, where decode reads every *distinct* byte
once per step, shared layers that stay in cache could help; on most
hardware the gain is memory, not speed (:func:`share_layers`).
"""

from __future__ import annotations

import copy as _copy
import dataclasses
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import TransformError

__all__ = ["block_influence", "remove_layers", "share_layers", "unique_parameters", "parameter_bytes"]


def _layers(model) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "config"):
        raise TransformError(f"expected an llmopt_lab Transformer with decoder layers, got "
                             f"{type(model).__name__}")
    return layers


@torch.no_grad()
def block_influence(model, batches: Sequence[torch.Tensor]) -> list[float]:
    """Block influence ``1 - mean cos(h_in, h_out)`` of every decoder block,
    over all tokens of ``batches`` ((B, T) int64 token tensors, e.g. from
    :func:`~llmopt_lab.transforms.quantize.calibration.training_calibration_set`;
    use the training split, never the held-out files).

    Returns a list of floats, one per block (0: the block leaves the
    residual stream's direction unchanged; larger: it changes it more).
    Raises TransformError for a model without decoder layers, no batches,
    or batches that are not (B, T) integer token tensors within the
    vocabulary (or hold no tokens).
    """
    from ..errors import QuantizationError
    from .quantize.calibration import check_calibration

    layers = _layers(model)
    if batches is None or (isinstance(batches, (list, tuple)) and not batches):
        raise TransformError("block_influence needs at least one calibration batch")
    try:
        check_calibration(batches, model, "block_influence")
    except QuantizationError as e:  # the same checks as quantization's; this module's error class
        raise TransformError(str(e)) from None
    sums = [0.0] * len(layers)
    count = 0
    hooks = []

    def make_hook(i):
        def hook(module, args, output):
            h_in = args[0].float().reshape(-1, args[0].shape[-1])
            h_out = output.float().reshape(-1, output.shape[-1])
            sums[i] += float(torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).sum())
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(make_hook(i)))
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            ids = ids.to(model.device)
            model(ids)
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [1.0 - s / count for s in sums]


def remove_layers(model, indices: Sequence[int], *, copy: bool = False):
    """Remove the decoder blocks at ``indices`` (in place, or on a deep copy
    with ``copy=True``); returns the model.

    The config's ``num_layers`` and per-layer lists (``layer_types``,
    ``layer_intermediate_sizes``, ``layer_num_heads``) are cut to the blocks
    that stay, and each remaining attention module gets its new layer index,
    so KV caches built from the new config fit. Raises TransformError for an
    index out of range, a repeated index, or removing every block.
    """
    layers = _layers(model)
    n = len(layers)
    idx = list(indices)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in idx):
        raise TransformError(f"layer indices must be integers, got {idx!r}")
    if len(set(idx)) != len(idx):
        raise TransformError(f"layer indices repeat: {idx}")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise TransformError(f"layer indices {bad} are outside 0..{n - 1}")
    if len(idx) >= n:
        raise TransformError(f"removing {len(idx)} of {n} layers leaves none")
    if copy:
        model = _copy.deepcopy(model)
        layers = model.layers
    keep = [i for i in range(n) if i not in set(idx)]
    c = model.config
    changes = dict(num_layers=len(keep))
    for name in ("layer_types", "layer_intermediate_sizes", "layer_num_heads"):
        values = getattr(c, name)
        if values is not None:
            changes[name] = tuple(values[i] for i in keep)
    model.config = dataclasses.replace(c, **changes)
    new_layers = nn.ModuleList(layers[i] for i in keep)
    for new_i, layer in enumerate(new_layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_i
    model.layers = new_layers
    return model


def share_layers(model, pairs: Sequence[tuple[int, int]], *, copy: bool = False):
    """Make block ``dst`` reuse block ``src``'s weights for each ``(src, dst)``
    in ``pairs`` (in place, or on a deep copy); returns the model.

    Every parameter of ``dst`` (its projections and norms) becomes the very
    tensor of ``src``: one copy in memory, trained by both blocks' gradients.
    Each block keeps its own layer index (and so its own KV cache slots).
    FLOPs do not change. Raises TransformError for an index out of range, a
    block shared with itself, a block that is both a source and a
    destination, or blocks of different shapes (per-layer pruning).
    """
    layers = _layers(model)
    n = len(layers)
    pairs = [tuple(p) for p in pairs]
    srcs, dsts = {s for s, _ in pairs}, [d for _, d in pairs]
    for s, d in pairs:
        if not (0 <= s < n and 0 <= d < n):
            raise TransformError(f"layer pair ({s}, {d}) is outside 0..{n - 1}")
        if s == d:
            raise TransformError(f"layer {s} cannot share weights with itself")
    if len(set(dsts)) != len(dsts) or srcs & set(dsts):
        raise TransformError(f"each block may take one source, and a source may not itself be "
                             f"replaced: {pairs}")
    if copy:
        model = _copy.deepcopy(model)
        layers = model.layers
    for s, d in pairs:
        src, dst = layers[s], layers[d]
        for (name, p_src), (_, p_dst) in zip(src.named_parameters(), dst.named_parameters()):
            if p_src.shape != p_dst.shape:
                raise TransformError(f"layers {s} and {d} differ in shape at {name}: "
                                     f"{tuple(p_src.shape)} vs {tuple(p_dst.shape)}")
        for mod_name, m_dst in dst.named_modules():
            m_src = src.get_submodule(mod_name) if mod_name else src
            for pname, _ in list(m_dst.named_parameters(recurse=False)):
                setattr(m_dst, pname, getattr(m_src, pname))
    return model


def unique_parameters(model: nn.Module) -> int:
    """Number of parameters counting each shared tensor once."""
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters (shared tensors once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total

"""Module surgery: find layers in a finished model and put others in their place.

Every transform (quantization, pruning, low rank, tensor parallelism) does the
same three things: walk the decoder blocks, pick out the linear layers it
rewrites, and swap a module for its replacement. They live here once:

* :func:`decoder_blocks`: ``(index, block)`` for each decoder block of an
  llmopt_lab :class:`~llmopt_lab.model.Transformer` (anything with ``.layers``).
* :func:`decoder_linears`: the linear layers of every block by name, in the
  order data flows through them (q, k, v, o, gate, up, down), lm_head optional.
* :func:`find_modules` / :func:`find_linears`: modules by dotted-name pattern
  and type, each with its parent and attribute name (:class:`ModuleRef`).
* :func:`replace_module`: put a module where a dotted name points.

Nothing here knows about a particular transform; it raises
:class:`~llmopt_lab.errors.TransformError` for a name that is not there or
a model without decoder blocks.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch.nn as nn

from ..errors import TransformError

#: the linear layers of a decoder block, in the order data flows through them
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class ModuleRef:
    """A module found in a model: ``name`` (dotted, as ``named_modules``),
    ``module``, and where it hangs: ``getattr(parent, attr) is module``."""

    name: str
    module: nn.Module
    parent: nn.Module
    attr: str


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, (nn.ModuleList, list, tuple)):
        raise TransformError(f"{type(model).__name__} has no decoder blocks (.layers); "
                             "expected an llmopt_lab Transformer")
    return layers


def decoder_blocks(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """``(index, block)`` for every decoder block of ``model``, first to last.

    Raises TransformError if the model has no ``.layers`` list of blocks.
    """
    return iter(list(enumerate(_blocks(model))))


def num_blocks(model: nn.Module) -> int:
    """Number of decoder blocks. Raises TransformError as :func:`decoder_blocks`."""
    return len(_blocks(model))


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the submodule called ``name``
    (e.g. ``"layers.0.mlp.up_proj"`` -> (the block's mlp, ``"up_proj"``)).

    Raises TransformError if ``name`` is empty or no such submodule exists.
    """
    if not name:
        raise TransformError("a module name is needed (the model itself has no parent)")
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise TransformError(f"{type(model).__name__} has no submodule {parent_name!r} "
                             f"(looking for {name!r})") from None
    if not isinstance(getattr(parent, attr, None), nn.Module):
        raise TransformError(f"{type(model).__name__} has no submodule {name!r}")
    return parent, attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule called ``name`` is; returns the old one.

    ``name`` is dotted as in ``model.named_modules()`` (``"lm_head"``,
    ``"layers.3.self_attn.q_proj"``; an index into a ModuleList is a name
    part). Raises TransformError if there is no such submodule or ``new`` is
    not an ``nn.Module``.
    """
    if not isinstance(new, nn.Module):
        raise TransformError(f"replace_module({name!r}): the replacement must be an nn.Module, "
                             f"got {type(new).__name__}")
    parent, attr = parent_of(model, name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def find_modules(model: nn.Module, pattern: str | Sequence[str] | None = None,
                 types: type | tuple[type, ...] = nn.Module) -> list[ModuleRef]:
    """Submodules whose dotted name matches ``pattern`` and whose type is one of
    ``types``, in ``named_modules()`` order (the model itself excluded).

    pattern: a shell-style glob on the full dotted name (``"*.mlp.*"``,
    ``"layers.0.self_attn.?_proj"``), a list of globs (any may match), or None
    (every name). Returns :class:`ModuleRef` items. A pattern that matches
    nothing gives an empty list (not an error); raises TransformError for a
    pattern that is neither a string nor a list of strings.

    Raises TransformError naming ``pattern`` when it is neither a glob string
    nor a list of them; TypeError for ``types`` that is not a type or tuple
    of types.
    """
    if pattern is None:
        globs = None
    elif isinstance(pattern, str):
        globs = [pattern]
    elif isinstance(pattern, (list, tuple)) and all(isinstance(p, str) for p in pattern):
        globs = list(pattern)
    else:
        raise TransformError(f"pattern must be a glob string or a list of them, got {pattern!r}")
    out = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, types):
            continue
        if globs is not None and not any(fnmatch.fnmatchcase(name, g) for g in globs):
            continue
        parent, attr = parent_of(model, name)
        out.append(ModuleRef(name, module, parent, attr))
    return out


def find_linears(model: nn.Module, pattern: str | Sequence[str] | None = None,
                 types: type | tuple[type, ...] = nn.Linear) -> list[ModuleRef]:
    """:func:`find_modules` restricted to linear layers (``nn.Linear`` by
    default; pass ``types`` to include quantized replacements as well).

    Raises TransformError as :func:`find_modules` for a ``pattern`` that is
    neither a glob string nor a list of them."""
    return find_modules(model, pattern, types)


def decoder_linears(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Module]:
    """name -> module for the linear layers of every decoder block, in
    data-flow order (:data:`DECODER_LINEARS` of block 0, then block 1, ...),
    then ``lm_head`` when asked. Embeddings never. Whatever sits at those
    names is returned (nn.Linear or an already replaced layer).

    Raises TransformError if the model has no decoder blocks or a block lacks
    one of the layers.
    """
    out: dict[str, nn.Module] = {}
    for i, block in decoder_blocks(model):
        for name in DECODER_LINEARS:
            try:
                out[f"layers.{i}.{name}"] = block.get_submodule(name)
            except AttributeError:
                raise TransformError(f"decoder block {i} has no {name}") from None
    if include_lm_head:
        if not isinstance(getattr(model, "lm_head", None), nn.Module):
            raise TransformError(f"{type(model).__name__} has no lm_head")
        out["lm_head"] = model.lm_head
    return out


__all__ = ["DECODER_LINEARS", "ModuleRef", "decoder_blocks", "num_blocks", "parent_of",
           "replace_module", "find_modules", "find_linears", "decoder_linears"]

"""The registry of quantization methods: name -> :class:`QuantMethod`.

A method module registers itself with the :func:`register_method` decorator
when it is imported (``quantize/__init__.py`` imports the built-in ones once);
:func:`~llmopt_lab.transforms.quantize.quantize` looks the name up here. This
module imports no method, so methods can import it (and the formats and
layers) without an import circle, and a later lesson adds a method by
registering it, without touching the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from ...errors import QuantizationError


@dataclass(frozen=True)
class QuantMethod:
    """A registered quantization method.

    apply: ``apply(model, targets, *, group_size, include_lm_head, calibration,
    backend, progress, **options) -> dict``: replaces the layers of
    ``targets`` (name -> nn.Linear, in data-flow order) in ``model`` in place
    and returns details to record in ``model.quantization`` ({} if none).
    options: the keyword options it accepts beyond the common ones.
    calibrated: needs ``calibration`` token batches. group_size: produces the
    int4 format, whose group size is checked up front and recorded.
    rescales: modifies float weights outside the replaced layers (norms,
    v/up projections), so ``copy=True`` must not share them.

    Raises: nothing; a frozen record (:func:`register_method` builds it and
    checks the name).
    """

    name: str
    apply: Callable[..., dict]
    options: frozenset = frozenset()
    calibrated: bool = False
    group_size: bool = False
    rescales: bool = False
    summary: str = ""


_METHODS: dict[str, QuantMethod] = {}


def register_method(name: str, *, options: Iterable[str] = (), calibrated: bool = False,
                    group_size: bool = False, rescales: bool = False):
    """Decorator: register ``fn`` as quantization method ``name`` (see
    :class:`QuantMethod` for the signature it must have); returns ``fn``.
    The first line of ``fn``'s docstring is the method's summary.

    Raises QuantizationError if ``name`` is already registered to another function.
    """
    def decorate(fn: Callable[..., dict]) -> Callable[..., dict]:
        old = _METHODS.get(name)
        if old is not None and old.apply is not fn:
            raise QuantizationError(f"quantization method {name!r} is already registered "
                                    f"(by {old.apply.__module__}.{old.apply.__qualname__})")
        summary = (fn.__doc__ or "").strip().split("\n")[0]
        _METHODS[name] = QuantMethod(name, fn, frozenset(options), calibrated, group_size,
                                     rescales, summary)
        return fn
    return decorate


def get_method(name: str) -> QuantMethod:
    """The method registered as ``name``. Raises QuantizationError naming the
    known methods if there is none."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise QuantizationError(f"unknown quantization method {name!r}; choose from "
                                f"{', '.join(_METHODS) or '(none registered)'}") from None


def method_names(calibrated: bool | None = None) -> tuple[str, ...]:
    """Names of the registered methods, in registration order (only the
    calibrated ones, or only the others, when ``calibrated`` is given).

    Raises nothing."""
    return tuple(n for n, m in _METHODS.items() if calibrated is None or m.calibrated == calibrated)


__all__ = ["QuantMethod", "register_method", "get_method", "method_names"]

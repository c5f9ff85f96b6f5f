"""Graders for the exercises: run a learner's function on several cases and
compare with the library's answer.

A check prints one line per case (✅ or ❌ with the input, the expected
value, what came back and a hint) and then, if any case failed, raises
:class:`GradingError` chained from the first exception the learner's code
raised (for example the ``NotImplementedError`` of an untouched exercise), so
the notebook shows a report rather than a bare traceback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class GradingError(AssertionError):
    """An exercise check failed; the message summarises which cases."""


@dataclass
class Case:
    """One input to grade: positional/keyword arguments, a label and a hint
    shown when the learner's answer is wrong."""

    label: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    hint: str = ""


def _short(x: Any, limit: int = 120) -> str:
    if isinstance(x, torch.Tensor):
        if x.numel() <= 8:
            text = f"tensor({[round(v, 5) if isinstance(v, float) else v for v in x.flatten().tolist()]}, shape={tuple(x.shape)}, dtype={x.dtype})"
        else:
            text = f"tensor(shape={tuple(x.shape)}, dtype={x.dtype}, mean={x.float().mean():.4g})"
    elif isinstance(x, float):
        text = f"{x:.6g}"
    else:
        text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def close(expected: Any, got: Any, rtol: float = 1e-5, atol: float = 1e-6) -> tuple[bool, str]:
    """Compare numbers, tensors, or (nested) tuples/lists/dicts of them.

    Returns (ok, reason): the reason says what differs (shape, dtype, value).
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return False, f"expected a tensor, got {type(got).__name__}"
        if got.shape != expected.shape:
            return False, f"shape {tuple(got.shape)} instead of {tuple(expected.shape)}"
        if got.dtype != expected.dtype:
            return False, f"dtype {got.dtype} instead of {expected.dtype}"
        if expected.dtype in (torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
            bad = (got != expected).sum().item()
            return bad == 0, f"{bad} of {expected.numel()} elements differ"
        diff = (got.double() - expected.double()).abs()
        tol = atol + rtol * expected.double().abs()
        bad = (diff > tol) | torch.isnan(got.double()) != torch.isnan(expected.double())
        n = int(bad.sum())
        return n == 0, f"{n} of {expected.numel()} elements differ (max abs diff {diff.max():.3g})"
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        if not isinstance(got, (int, float, torch.Tensor)) or isinstance(got, bool):
            return False, f"expected a number, got {type(got).__name__}"
        got_f = float(got)
        ok = math.isclose(got_f, float(expected), rel_tol=rtol, abs_tol=atol)
        return ok, "" if ok else f"off by {got_f - float(expected):.4g}"
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return False, f"expected a sequence of {len(expected)} items, got {_short(got)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            ok, why = close(e, g, rtol, atol)
            if not ok:
                return False, f"item {i}: {why}"
        return True, ""
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return False, f"expected keys {sorted(expected)}, got {_short(got)}"
        for k in expected:
            ok, why = close(expected[k], got[k], rtol, atol)
            if not ok:
                return False, f"[{k!r}]: {why}"
        return True, ""
    return expected == got, "" if expected == got else "values differ"


def check(fn: Callable, reference: Callable, cases: list[Case], *, name: str | None = None,
          rtol: float = 1e-5, atol: float = 1e-6,
          compare: Callable[[Any, Any], tuple[bool, str]] | None = None) -> int:
    """Grade ``fn`` against ``reference`` on ``cases``; print a report.

    Returns the number of cases passed when all pass; otherwise raises
    GradingError (chained from the first exception ``fn`` raised, if any).
    ``compare(expected, got) -> (ok, reason)`` replaces the default
    :func:`close` with the given tolerances.
    """
    name = name or getattr(fn, "__name__", "your function")
    compare = compare or (lambda e, g: close(e, g, rtol, atol))
    failures, first_exc = [], None
    for case in cases:
        expected = reference(*_clone(case.args), **_clone(case.kwargs))
        try:
            got = fn(*_clone(case.args), **_clone(case.kwargs))
        except NotImplementedError as e:
            first_exc = first_exc or e
            failures.append(case.label)
            print(f"❌ {case.label}: not implemented yet ({e})")
            continue
        except Exception as e:  # the learner's code crashed: report it as a failed case
            first_exc = first_exc or e
            failures.append(case.label)
            print(f"❌ {case.label}: raised {type(e).__name__}: {e}")
            if case.hint:
                print(f"   hint: {case.hint}")
            continue
        ok, why = compare(expected, got)
        if ok:
            print(f"✅ {case.label}")
        else:
            failures.append(case.label)
            print(f"❌ {case.label}: {why}")
            print(f"   input:    {_short(case.args)}{' ' + _short(case.kwargs) if case.kwargs else ''}")
            print(f"   expected: {_short(expected)}")
            print(f"   got:      {_short(got)}")
            if case.hint:
                print(f"   hint: {case.hint}")
    if failures:
        msg = f"{name}: {len(failures)} of {len(cases)} cases failed ({', '.join(failures)})"
        if first_exc is not None:
            raise GradingError(msg) from first_exc
        raise GradingError(msg)
    print(f"All {len(cases)} checks of {name} passed." if len(cases) != 1 else
          f"The check of {name} passed.")
    return len(cases)


def _clone(x: Any) -> Any:
    """Copy tensors so a learner's in-place edits cannot change the reference."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(_clone(v) for v in x)
    if isinstance(x, list):
        return [_clone(v) for v in x]
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x

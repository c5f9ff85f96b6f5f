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
    _raise_if_failed(name, failures, len(cases), first_exc, sep=", ")
    print(f"All {len(cases)} checks of {name} passed." if len(cases) != 1 else
          f"The check of {name} passed.")
    return len(cases)


def _raise_if_failed(name: str, failures: list, total: int, first_exc: BaseException | None,
                     sep: str = "; ") -> None:
    """Raise GradingError summarising the failed cases (chained from the first
    exception the learner's code raised, if any); nothing when all passed."""
    if failures:
        msg = f"{name}: {len(failures)} of {total} cases failed ({sep.join(failures)})"
        if first_exc is not None:
            raise GradingError(msg) from first_exc
        raise GradingError(msg)


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


def decode_intensity(config, batch: int, context: int, dtype) -> float:
    """FLOP/byte of one decode step (``batch`` sequences, one new token each after
    ``context`` cached tokens): :func:`llmopt_lab.measure.step_cost`'s count."""
    from .. import measure

    return measure.step_cost(config, batch, 1, context, dtype).intensity


def ridge_batch_reference(config, limits, dtype, context: int, max_batch: int = 65536) -> int | None:
    """The smallest batch (an integer >= 1) whose decode step at ``context``
    reaches ``limits``' ridge point (intensity >= peak FLOP/s / bandwidth for
    ``dtype``), or None when no batch up to ``max_batch`` does. The library's
    answer to lesson 01's experiment; intensity grows with the batch, so a
    bisection finds it."""
    ridge = limits.ridge_point(dtype)
    if decode_intensity(config, max_batch, context, dtype) < ridge:
        return None
    lo, hi = 0, max_batch  # intensity(lo) < ridge <= intensity(hi); intensity(0) counts as below
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if decode_intensity(config, mid, context, dtype) >= ridge:
            hi = mid
        else:
            lo = mid
    return hi


def check_ridge_batch(fn: Callable, config, limits, dtype, contexts, *, max_batch: int = 65536,
                      rel_tol: float = 0.02, name: str | None = None) -> dict:
    """Grade a learner's ``fn(config, limits, dtype, context)`` that returns the
    batch size at which decode reaches the ridge point (or None if it never
    does), against :func:`ridge_batch_reference`, at each of ``contexts``.

    An answer passes when it is within ``rel_tol`` of the library's batch (at
    least 1 sequence either way: an analytic solution may round differently).
    Each case prints ✅ or ❌ with the numbers behind the verdict: the ridge
    point, the intensity at the returned batch, the smallest batch that reaches
    it, or where the intensity levels off when none does. Returns {context:
    the library's batch} when all pass; otherwise raises GradingError.
    """
    name = name or getattr(fn, "__name__", "your function")
    ridge = limits.ridge_point(dtype)
    failures, first_exc, answers = [], None, {}
    for context in contexts:
        label = f"{getattr(config, 'name', 'model')}, {dtype}, context {context}, on {limits.name}"
        expected = ridge_batch_reference(config, limits, dtype, context, max_batch)
        answers[context] = expected
        try:
            got = fn(config, limits, dtype, context)
        except NotImplementedError as e:
            first_exc = first_exc or e
            failures.append(label)
            print(f"❌ {label}: not implemented yet ({e})")
            continue
        except Exception as e:  # the learner's code crashed: a failed case
            first_exc = first_exc or e
            failures.append(label)
            print(f"❌ {label}: raised {type(e).__name__}: {e}")
            continue
        why = _ridge_verdict(config, dtype, context, ridge, expected, got, max_batch, rel_tol)
        if why is None:
            print(f"✅ {label}: " + (f"batch {got}" if got is not None else "never (None)"))
        else:
            failures.append(label)
            print(f"❌ {label}: {why}")
    _raise_if_failed(name, failures, len(contexts), first_exc)
    print(f"All {len(contexts)} checks of {name} passed (ridge point {ridge:.3g} FLOP/byte).")
    return answers


def _ridge_verdict(config, dtype, context, ridge, expected, got, max_batch, rel_tol) -> str | None:
    """None when ``got`` is an acceptable answer, else what is wrong with it."""
    if got is not None and (isinstance(got, bool) or not isinstance(got, (int, float))
                            or (isinstance(got, float) and not math.isfinite(got))):
        return f"return a batch size (a number) or None, got {_short(got)}"
    if expected is None:
        if got is None:
            return None
        top = decode_intensity(config, max_batch, context, dtype)
        return (f"you returned {_short(got)}, but decode at context {context} never reaches the "
                f"ridge point ({ridge:.3g} FLOP/byte): its intensity levels off near {top:.3g} "
                f"(at batch {max_batch}) because every sequence reads its own KV cache; return None")
    at_expected = decode_intensity(config, expected, context, dtype)
    if got is None:
        return (f"you returned None, but batch {expected} already reaches the ridge point: "
                f"intensity {at_expected:.3g} >= {ridge:.3g} FLOP/byte")
    if abs(got - expected) <= max(1.0, rel_tol * expected):
        return None
    if got < expected:
        at_got = decode_intensity(config, max(1, math.ceil(got)), context, dtype)
        return (f"at batch {_short(got)} the intensity is {at_got:.3g} FLOP/byte, still below the "
                f"ridge point {ridge:.3g}; expected about {expected} (intensity {at_expected:.3g})")
    return (f"batch {_short(got)} is past the ridge point, but a smaller batch already reaches it: "
            f"{expected} (intensity {at_expected:.3g} >= {ridge:.3g} FLOP/byte); return the smallest")


def check_kl_budget_plan(fn: Callable, sens, kl_budgets, *, rel_tol: float = 0.02,
                         name: str | None = None) -> dict:
    """Grade a learner's mixed-precision planner ``fn(kl, nbytes, kl_budget)``
    that returns one format index per layer (a list of L integers), for a
    scan ``sens`` (:class:`~llmopt_lab.transforms.quantize.mixed.Sensitivity`:
    ``kl`` and ``nbytes`` are (L, F) tensors) at each of ``kl_budgets``.

    A plan passes when its predicted KL (the sum of ``kl[l, f_l]``) is at most
    the budget and its bytes are within ``rel_tol`` of the fewest possible
    (:func:`~llmopt_lab.transforms.quantize.mixed.plan_bits`). Each case
    prints ✅ or ❌ with the bytes and KL behind the verdict. Returns
    {kl_budget: (optimal bytes, your bytes)} when all pass; otherwise raises
    GradingError.
    """
    from ..transforms.quantize.mixed import plan_bits

    name = name or getattr(fn, "__name__", "your function")
    L, F = sens.kl.shape
    failures, first_exc, answers = [], None, {}
    for budget in kl_budgets:
        label = f"KL budget {budget:.4g} nats/token"
        best = plan_bits(sens, kl_budget=budget)
        try:
            got = fn(sens.kl.clone(), sens.nbytes.clone(), budget)
            picks = [int(v) for v in got]
        except NotImplementedError as e:
            first_exc = first_exc or e
            failures.append(label)
            print(f"❌ {label}: not implemented yet ({e})")
            continue
        except Exception as e:  # the learner's code crashed, or returned something else
            first_exc = first_exc or e
            failures.append(label)
            print(f"❌ {label}: raised {type(e).__name__}: {e}")
            continue
        if len(picks) != L or any(not 0 <= j < F for j in picks):
            failures.append(label)
            print(f"❌ {label}: return {L} format indices, each in 0..{F - 1}; got {_short(got)}")
            continue
        kl = sum(float(sens.kl[i, j]) for i, j in enumerate(picks))
        nbytes = sum(int(sens.nbytes[i, j]) for i, j in enumerate(picks))
        if kl > budget * (1 + 1e-9) + 1e-12:
            failures.append(label)
            print(f"❌ {label}: your plan's predicted KL is {kl:.4g}, over the budget; "
                  f"upgrade the layers whose KL falls most per extra byte")
        elif nbytes > best.nbytes * (1 + rel_tol):
            failures.append(label)
            print(f"❌ {label}: your plan meets the budget (KL {kl:.4g}) with {nbytes:,} B, but "
                  f"{best.nbytes:,} B suffice ({100 * (nbytes / best.nbytes - 1):.1f}% more, "
                  f"tolerance {100 * rel_tol:.0f}%): spend bytes where they cut the most KL")
        else:
            answers[budget] = (best.nbytes, nbytes)
            print(f"✅ {label}: {nbytes:,} B (the fewest: {best.nbytes:,} B), predicted KL {kl:.4g}")
    _raise_if_failed(name, failures, len(kl_budgets), first_exc)
    print(f"All {len(kl_budgets)} checks of {name} passed.")
    return answers

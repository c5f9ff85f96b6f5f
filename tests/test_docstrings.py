"""Every function and class of the exported API says what it raises.

The exported API here: the names in ``llmopt_lab.__all__`` and in the
``__all__`` of the packages a learner imports from directly (cache, serving,
parallel, measure, kernels, transforms, transforms.quantize). Each docstring
(a class's, or its ``__init__``'s) must have a "Raises" part naming what it
raises, or saying that it raises nothing.
"""

import importlib
import inspect

import pytest

PACKAGES = ["llmopt_lab", "llmopt_lab.cache", "llmopt_lab.serving", "llmopt_lab.parallel",
            "llmopt_lab.measure", "llmopt_lab.kernels", "llmopt_lab.transforms",
            "llmopt_lab.transforms.quantize"]


def exported():
    seen = {}
    for name in PACKAGES:
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if not callable(obj) or (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            seen.setdefault(f"{getattr(obj, '__module__', name)}.{getattr(obj, '__qualname__', attr)}", obj)
    return sorted(seen.items())


def _doc(obj) -> str:
    doc = obj.__doc__ or ""
    if inspect.isclass(obj) and "__init__" in vars(obj):
        doc += obj.__init__.__doc__ or ""
    return doc


@pytest.mark.parametrize("name, obj", exported(), ids=[n for n, _ in exported()])
def test_exported_docstrings_say_what_they_raise(name, obj):
    assert "Raises" in _doc(obj), f"{name}: the docstring does not say what it raises"


def test_the_audit_covers_the_main_entry_points():
    names = {n.rsplit(".", 1)[-1] for n, _ in exported()}
    assert {"generate", "load_model", "Engine", "SamplingParams", "apply_tensor_parallel",
            "StaticCache", "launch", "time_fn", "device_limits", "can_launch", "quantize",
            "quantize_tensor", "Int4Linear", "find_modules"} <= names

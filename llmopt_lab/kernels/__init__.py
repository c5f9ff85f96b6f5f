"""Triton kernels of the course, each beside a plain-torch reference.

Importing this package decides, once and before any kernel is defined, how
kernels run:

* a CUDA GPU and Triton: compiled kernels;
* no CUDA GPU but Triton (a Linux laptop, CI): Triton's interpreter, chosen
  here by setting ``TRITON_INTERPRET=1`` (Triton reads it when ``@triton.jit``
  runs, so it must be set before the kernel modules are imported). A value the
  user set themselves is respected;
* no Triton at all (macOS, Windows): the plain-torch references in
  :mod:`llmopt_lab.kernels.reference`, with a one-line notice.

Known limits of the interpreter: it computes bfloat16 wrongly (test bf16 on a
GPU, or through float32), it is thousands of times slower than torch (small
shapes only), and it accepts programs the GPU compiler rejects (e.g. ``tl.dot``
with an inner dimension below 16). ``tests/test_cross_compile.py`` therefore
compiles every kernel listed in :func:`compile_specs` for sm_80 and sm_90.

This package imports nothing from the rest of llmopt_lab.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

try:  # Triton wheels exist for Linux only
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on macOS/Windows
    HAS_TRITON = False
    print("llmopt_lab: Triton is not installed (it needs Linux); kernels fall back to "
          "their plain-torch references.", file=sys.stderr)

INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mode() -> str:
    """How kernels run here: 'compiled', 'interpreter' or 'reference'."""
    if not HAS_TRITON:
        return "reference"
    return "interpreter" if INTERPRETED else "compiled"


def can_launch(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on these tensors in this process.

    Compiled kernels need CUDA tensors; the interpreter needs CPU tensors.
    """
    if not HAS_TRITON:
        return False
    want_cuda = not INTERPRETED
    return all(t.is_cuda == want_cuda for t in tensors)


from . import reference  # noqa: E402

#: kernel modules; each defines its kernels, a checked wrapper and COMPILE_SPECS.
#: Import the wrappers from their modules (``from llmopt_lab.kernels.rmsnorm
#: import rmsnorm``): re-exporting them here would shadow the module names.
KERNEL_MODULES = ("rmsnorm", "flash_attention", "flash_decode", "quant_matmul")


def compile_specs() -> list[dict]:
    """Every Triton kernel of the package with a signature to compile it for a
    GPU target (used by the cross-compilation test). A kernel module lists its
    own in a ``COMPILE_SPECS`` list of dicts: ``fn`` (the jitted function),
    ``signature`` and ``constexprs`` as :class:`triton.compiler.ASTSource`
    takes them."""
    import importlib

    specs: list[dict] = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        specs.extend(getattr(module, "COMPILE_SPECS", []))
    return specs


__all__ = ["HAS_TRITON", "INTERPRETED", "mode", "can_launch", "reference", "compile_specs",
           "KERNEL_MODULES"]

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

#: Triton was imported before this package chose the interpreter: its own
#: jitted helpers (tl.zeros, tl.sum, ...) were then built for compiling
_TRITON_BEFORE_US = False
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    _TRITON_BEFORE_US = "triton" in sys.modules
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

_interpreter_problem: str | None = None
_interpreter_probed = False

if HAS_TRITON:
    # tl must be a global of the kernel's module: the interpreter patches the
    # language modules it finds among a kernel's globals
    import triton.language as tl

    @triton.jit
    def _probe_kernel(X, Y, n):  # Y[0] = X[0] + ... + X[n-1], in a loop bounded at run time
        acc = tl.zeros((1,), tl.float32)
        for i in range(0, n):
            acc += tl.load(X + i + tl.arange(0, 1))
        tl.store(Y + tl.arange(0, 1), acc)


def _probe_interpreter() -> str | None:
    """Run a tiny kernel with a loop bounded by a runtime value under the
    interpreter; None if it works, else what went wrong. Triton releases
    without the fix of triton-lang/triton#9171 (3.6 and older) fail there under
    numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python
    scalars"), and every kernel of the course has such a loop."""
    import triton

    x, y = torch.arange(1.0, 4.0), torch.zeros(1)
    try:
        _probe_kernel[(1,)](x, y, 3)
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        import numpy

        what = f"Triton {triton.__version__}'s interpreter fails here ({type(e).__name__}: {str(e)[:100]})"
        if _TRITON_BEFORE_US:
            return (f"{what}: triton was imported before llmopt_lab chose the interpreter; "
                    "import llmopt_lab first, or set TRITON_INTERPRET=1 before importing triton")
        if "0-dimensional" in str(e):
            return (f"{what}: Triton 3.6 and older need numpy < 2.4 in the interpreter "
                    f"(triton-lang/triton#9171; numpy {numpy.__version__} here): install "
                    "numpy<2.4 or a newer Triton")
        return what
    if float(y[0]) != 6.0:
        return f"Triton {triton.__version__}'s interpreter computed a wrong sum ({float(y[0])} for 6)"
    return None


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here, or None (it can,
    or kernels are compiled, or there is no Triton). Probed once, lazily; the
    kernels then fall back to their references, with a one-line notice.

    Raises nothing: a failing probe is caught and reported as the string."""
    global _interpreter_problem, _interpreter_probed
    if INTERPRETED and not _interpreter_probed:
        _interpreter_probed = True
        _interpreter_problem = _probe_interpreter()
        if _interpreter_problem:
            print(f"llmopt_lab: {_interpreter_problem}; kernels fall back to their plain-torch "
                  "references.", file=sys.stderr)
    return _interpreter_problem


def mode() -> str:
    """How kernels run here: 'compiled', 'interpreter' or 'reference' (no
    Triton, or an interpreter that cannot run them: :func:`interpreter_problem`).

    Raises nothing."""
    if not HAS_TRITON or interpreter_problem():
        return "reference"
    return "interpreter" if INTERPRETED else "compiled"


def can_launch(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on these tensors in this process.

    Compiled kernels need CUDA tensors; the interpreter needs CPU tensors (and
    an interpreter that works, see :func:`interpreter_problem`).

    Raises: nothing for tensors (False where a kernel cannot run);
    AttributeError for an argument that is not a tensor.
    """
    if not HAS_TRITON:
        return False
    want_cuda = not INTERPRETED
    if not all(t.is_cuda == want_cuda for t in tensors):
        return False
    return not (INTERPRETED and interpreter_problem())


def launch_scope(name: str):
    """Context for one kernel launch: under the interpreter a profiler range
    ``triton::<name>`` (so that launch accounting on a CPU counts the launch
    once, not the interpreter's tensor work inside it); compiled, nothing
    (the profiler sees the GPU kernel itself).

    Raises nothing of its own; an exception in the block propagates."""
    import contextlib

    if INTERPRETED:
        return torch.profiler.record_function(f"triton::{name}")
    return contextlib.nullcontext()


from . import reference  # noqa: E402

#: kernel modules; each defines its kernels, a checked wrapper and COMPILE_SPECS
#: (and JIT_HELPERS: jitted functions its kernels call, compiled within them).
#: Import the wrappers from their modules (``from llmopt_lab.kernels.rmsnorm
#: import rmsnorm``): re-exporting them here would shadow the module names.
KERNEL_MODULES = ("rmsnorm", "flash_attention", "flash_decode", "quant_matmul", "paged_attention",
                  "sparse24", "fused")


def compile_specs() -> list[dict]:
    """Every Triton kernel of the package with a signature to compile it for a
    GPU target (used by the cross-compilation test). A kernel module lists its
    own in a ``COMPILE_SPECS`` list of dicts: ``fn`` (the jitted function),
    ``signature`` and ``constexprs`` as :class:`triton.compiler.ASTSource`
    takes them.

    Raises nothing of its own (without Triton the list is empty); an error
    from importing a broken kernel module propagates."""
    import importlib

    specs: list[dict] = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        specs.extend(getattr(module, "COMPILE_SPECS", []))
    return specs


__all__ = ["HAS_TRITON", "INTERPRETED", "mode", "can_launch", "launch_scope", "interpreter_problem", "reference",
           "compile_specs", "KERNEL_MODULES"]

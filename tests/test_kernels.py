"""Triton kernels against their plain-torch references (interpreter on CPU)."""

import pytest
import torch

from llmopt_lab import kernels
from llmopt_lab.kernels.rmsnorm import rmsnorm
from llmopt_lab.kernels.reference import rmsnorm_ref


def test_interpreter_is_chosen_without_cuda():
    if torch.cuda.is_available():
        assert kernels.mode() in ("compiled", "interpreter")
    else:
        assert kernels.mode() in ("interpreter", "reference")


def test_interpreter_probe_passes_here():
    if kernels.INTERPRETED:
        assert kernels.interpreter_problem() is None  # CI's Triton runs the kernels
        assert kernels.mode() == "interpreter"


@pytest.mark.skipif(torch.cuda.is_available() or kernels.mode() == "reference",
                    reason="needs Triton's interpreter (no CUDA GPU)")
def test_triton_imported_first_falls_back_with_a_clear_notice():
    import os
    import subprocess
    import sys

    code = ("import triton\nfrom llmopt_lab import kernels\n"
            "print(kernels.mode(), kernels.can_launch())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["reference", "False"]
    assert "import llmopt_lab first" in proc.stderr


@pytest.mark.parametrize("shape", [(1, 7), (3, 128), (5, 257), (2, 3, 1000)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_rmsnorm_matches_reference(shape, dtype, tol):
    x = (torch.randn(shape) * 3).to(dtype)
    w = torch.randn(shape[-1]).to(dtype)
    torch.testing.assert_close(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6), atol=tol, rtol=tol)


def test_rmsnorm_non_contiguous_rows():
    x = torch.randn(6, 64)[::2]  # row stride 128
    w = torch.randn(64)
    torch.testing.assert_close(rmsnorm(x, w), rmsnorm_ref(x, w, 1e-5))


def test_rmsnorm_kernel_really_ran(monkeypatch):
    """Guard against a silent fallback: with Triton present the kernel path runs."""
    if kernels.mode() == "reference":
        pytest.skip("Triton is not installed")
    import llmopt_lab.kernels.rmsnorm as mod

    monkeypatch.setattr(mod, "rmsnorm_ref", lambda *a: (_ for _ in ()).throw(AssertionError("fallback")))
    x, w = torch.randn(2, 32), torch.randn(32)
    if kernels.can_launch(x, w):
        mod.rmsnorm(x, w)


def test_rmsnorm_errors():
    with pytest.raises(ValueError, match="does not match"):
        rmsnorm(torch.randn(2, 8), torch.randn(9))
    with pytest.raises(ValueError, match="float16"):
        rmsnorm(torch.randn(2, 8), torch.randn(8).half())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rmsnorm_on_gpu(dtype):
    x = torch.randn(64, 4096, device="cuda", dtype=dtype)
    w = torch.randn(4096, device="cuda", dtype=dtype)
    torch.testing.assert_close(rmsnorm(x, w), rmsnorm_ref(x, w, 1e-5), atol=2e-2, rtol=2e-2)


def test_without_triton_the_references_serve_with_a_notice():
    """Simulate macOS/Windows (no Triton): a one-line notice, kernels fall back."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from llmopt_lab import kernels\n"
            "from llmopt_lab.kernels.rmsnorm import rmsnorm\n"
            "from llmopt_lab.kernels.reference import rmsnorm_ref\n"
            "x, w = torch.randn(3, 16), torch.randn(16)\n"
            "assert kernels.mode() == 'reference' and not kernels.can_launch(x)\n"
            "assert torch.equal(rmsnorm(x, w), rmsnorm_ref(x, w, 1e-5))\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    notice = [line for line in proc.stderr.splitlines() if "Triton" in line]
    assert len(notice) == 1 and "plain-torch references" in notice[0]

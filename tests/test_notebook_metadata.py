"""Opening a notebook in JupyterLab must not modify it: the stored kernelspec
is the one the installed ipykernel provides (otherwise JupyterLab rewrites the
metadata and autosaves, and a learner's checkout shows changed lessons)."""

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for d in ("notebooks", "solutions", "exercises") for p in (ROOT / d).glob("*.ipynb"))


def _installed():
    kernelspec = pytest.importorskip("jupyter_client.kernelspec")
    try:
        spec = kernelspec.KernelSpecManager().get_kernel_spec("python3")
    except Exception as e:  # noqa: BLE001 - no kernel installed: nothing to compare with
        pytest.skip(f"no python3 kernel installed here ({e})")
    return {"name": "python3", "display_name": spec.display_name, "language": spec.language}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_kernelspec_is_what_jupyterlab_writes(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec") == _installed(), (
        f"{path.name}: kernelspec {nb.metadata.get('kernelspec')} differs from the installed kernel's; "
        "JupyterLab would rewrite it on opening")

"""Provenance and results: every result stamped with where it was made.

:func:`provenance`, :func:`save_result` and :func:`load_results` stamp every
result with device, versions and commit, and keep it as JSON under
``results/<device-slug>/<name>.json`` for the lessons to show.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import MeasureError
from .timing import _device

__all__ = ["provenance", "device_name", "device_slug", "save_result", "load_results",
           "default_results_root"]

#: The checkout this package lives in (llmopt_lab/measure/ -> the repository).
_REPO = Path(__file__).resolve().parent.parent.parent


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: Any = None) -> str:
    """A readable device name: the GPU's name, or the CPU's model name.

    Raises: nothing of its own; torch's RuntimeError for a device it cannot
    parse or a CUDA device that is not there."""
    dev = _device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        return _cpu_name()
    return dev.type


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def device_slug(device: Any = None) -> str:
    """A folder name for a device's results: 'nvidia-h100-80gb-hbm3' for a GPU,
    'cpu-' plus the CPU model for the CPU (e.g. 'cpu-amd-epyc').

    Raises: nothing of its own; torch's RuntimeError as :func:`device_name`."""
    dev = _device(device)
    if dev.type == "cpu":
        return "cpu-" + _slug(_cpu_name())
    return _slug(device_name(dev))


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _git_commit() -> str:
    """HEAD of the checkout this package lives in, '-dirty' when tracked files
    have uncommitted changes (untracked files and results/, which benchmarks
    write, do not count), 'unknown' without git or outside a repository."""
    repo = _REPO
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)results"],
                               cwd=repo, capture_output=True, text=True, timeout=10)
        suffix = "-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
        return head.stdout.strip() + suffix
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device: Any = None) -> dict:
    """Where and with what a result was produced.

    Keys: device, device_slug, torch, triton, transformers, cuda (torch's CUDA
    version or None), python, platform, cpu, git_commit (with '-dirty' for
    uncommitted changes, 'unknown' without git), date (UTC, ISO 8601),
    llmopt_lab (package version). Versions are None when not installed.

    Raises: nothing of its own (no git gives 'unknown'); torch's RuntimeError
    as :func:`device_name` for a device it cannot parse.
    """
    from .. import __version__

    dev = _device(device)
    return {
        "device": device_name(dev),
        "device_slug": device_slug(dev),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "llmopt_lab": __version__,
    }


def default_results_root() -> Path:
    """``results/`` of the checkout the package lives in (so that a notebook
    running in notebooks/ finds it), else ``results`` in the working directory.

    Raises nothing."""
    repo = _REPO
    if (repo / "pyproject.toml").is_file():
        return repo / "results"
    return Path("results")


def user_results_root() -> Path:
    """Where a learner's own runs go by default: ``my-results/`` of the
    checkout (ignored by git), else ``my-results`` in the working directory;
    ``LLMOPT_RESULTS`` overrides it. Never the committed ``results/``.

    Raises nothing."""
    env = os.environ.get("LLMOPT_RESULTS")
    if env:
        return Path(env).expanduser()
    if (_REPO / "pyproject.toml").is_file():
        return _REPO / "my-results"
    return Path("my-results")


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} as JSON")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def save_result(name: str, data: dict, root: str | Path | None = None, device: Any = None,
                stamp: bool = False) -> Path:
    """Write ``data`` as JSON to ``<root>/<device-slug>/<name>.json``; return the path.

    A top-level "provenance" key (:func:`provenance` of ``device``) is added
    unless ``data`` has one. Dataclasses, tensors and dtypes are converted.
    root: default :func:`default_results_root`. stamp: add the provenance's
    date to the file name (``<name>-YYYYmmdd-HHMMSS.json``, then ``-2``,
    ``-3``, ... if taken) so that no earlier run is overwritten. Raises
    MeasureError (a ValueError) for a name that is not a plain file name, TypeError for data
    JSON cannot hold.
    """
    if not _NAME.fullmatch(name) or name.endswith(".json"):
        raise MeasureError(f"result name {name!r} must be a plain name like 'decode_sweep'")
    if not isinstance(data, dict):
        raise TypeError(f"data must be a dict, got {type(data).__name__}")
    prov = data.get("provenance") or provenance(device)
    record = {"provenance": prov, **{k: v for k, v in data.items() if k != "provenance"}}
    root = default_results_root() if root is None else Path(root)
    folder = root / prov.get("device_slug", device_slug(device))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    if stamp:
        when = re.sub(r"[^0-9T]", "", str(prov.get("date", "")))[:15].replace("T", "-") or "undated"
        path, n = folder / f"{name}-{when}.json", 1
        while path.exists():
            n += 1
            path = folder / f"{name}-{when}-{n}.json"
    text = json.dumps(record, indent=1, default=_jsonable)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_results(name: str, root: str | Path | None = None) -> dict[str, dict]:
    """Every device's stored result ``name``: {device_slug: data}, sorted by slug;
    empty when there is none.

    Raises: nothing of its own; json.JSONDecodeError (a ValueError) for a
    stored file that is not valid JSON (rerun the benchmark that wrote it),
    OSError for one that cannot be read."""
    root = default_results_root() if root is None else Path(root)
    out = {}
    for path in sorted(root.glob(f"*/{name}.json")):
        out[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
    return out

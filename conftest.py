"""Test set-up for the whole repository (unit tests and nbval notebooks).

* the hub is offline (HF_HUB_OFFLINE=1): everything runs on the built-in zoo;
* tests marked ``gpu`` are skipped with a reason where there is no CUDA GPU;
* nbval does not compare stderr (deprecation warnings differ between machines);
* every notebook has a time budget on the 2-core CI machine (lesson 120 s,
  solution 60 s); the last test of the session, ``notebook-time-budget``,
  fails and names any notebook that went over. Exercises (30 s) are timed by
  tests/test_exercises.py, which runs them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).parent
#: seconds per notebook folder, on the 2-core CI machine (override for slower
#: machines with LLMOPT_BUDGET_SCALE=2)
BUDGETS = {"notebooks": 120.0, "solutions": 60.0, "exercises": 30.0}
_durations: dict[str, float] = defaultdict(float)


def budget_violations(durations: dict[str, float], budgets: dict[str, float] = BUDGETS,
                      scale: float = 1.0) -> list[str]:
    """Messages for notebooks whose total run time exceeds their folder's budget.

    durations: notebook path relative to the repository root -> seconds.
    """
    out = []
    for path, seconds in sorted(durations.items()):
        folder = Path(path).parts[0]
        limit = budgets.get(folder)
        if limit is not None and seconds > limit * scale:
            out.append(f"{path} took {seconds:.1f} s, over its budget of {limit * scale:.0f} s")
    return out


def pytest_collectstart(collector):
    if type(collector).__name__ == "IPyNbFile":
        collector.skip_compare = tuple(collector.skip_compare) + ("stderr",)


class NotebookBudget(pytest.Item):
    """Fails when a notebook run in this session went over its time budget."""

    def runtest(self):
        scale = float(os.environ.get("LLMOPT_BUDGET_SCALE", "1"))
        problems = budget_violations(dict(_durations), scale=scale)
        if problems:
            raise AssertionError("; ".join(problems))

    def reportinfo(self):
        return self.path, None, "notebook-time-budget"


def pytest_collection_modifyitems(session, config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if any(str(item.path).endswith(".ipynb") for item in items):
        items.append(NotebookBudget.from_parent(session, name="notebook-time-budget"))


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _durations[path] += report.duration  # setup (kernel start) + call + teardown


@pytest.fixture(autouse=True)
def _seed(request):
    if isinstance(request.node, pytest.Function):
        torch.manual_seed(0)
    yield


def scaled_model(config, seed: int, factor: float = 4.0):
    """A random model whose matrices are ``factor`` times the default init, so
    that its logits are spread out and greedy choices are not near-ties."""
    from llmopt_lab import Transformer

    model = Transformer.from_config(config, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    return model

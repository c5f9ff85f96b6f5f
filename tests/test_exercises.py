"""Exercise notebooks stay honest.

* exercises/ is exactly what the generator makes from solutions/;
* solutions pass their graders (nbval runs solutions/ in the main test run);
* each exercise notebook, run with errors allowed, fails only in its grader
  cells, and every grader cell fails; and it runs within its 30 s budget.
"""

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # absent on bare GPU machines: skip there

from llmopt_lab.course.exercises import GRADER_TAG, build

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
EXERCISE_BUDGET_S = 30.0 * float(os.environ.get("LLMOPT_BUDGET_SCALE", "1"))


def test_every_solution_has_an_exercise_and_a_lesson():
    for sol in SOLUTIONS:
        assert (ROOT / "exercises" / sol.name).exists(), f"exercises/{sol.name} is missing"
        number = sol.name[:2]
        assert list((ROOT / "notebooks").glob(f"{number}_*.ipynb")), f"no lesson {number} in notebooks/"


def test_regenerating_changes_nothing(tmp_path):
    changed = build(ROOT / "solutions", ROOT / "exercises", check_only=True)
    assert changed == [], f"exercises are stale, run `python -m llmopt_lab exercises build`: {changed}"


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.name)
def test_solution_has_grader_cells(solution):
    nb = nbformat.read(solution, as_version=4)
    graders = [c for c in nb.cells if GRADER_TAG in c.metadata.get("tags", [])]
    assert graders, f"{solution.name} has no cell tagged '{GRADER_TAG}'"


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.name)
def test_exercise_fails_only_and_always_in_grader_cells(solution):
    from nbclient import NotebookClient

    path = ROOT / "exercises" / solution.name
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    errors, silent_graders = [], []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        failed = any(o.get("output_type") == "error" for o in cell.outputs)
        is_grader = GRADER_TAG in cell.metadata.get("tags", [])
        if failed and not is_grader:
            err = next(o for o in cell.outputs if o.get("output_type") == "error")
            errors.append(f"cell {i} ({err['ename']}: {err['evalue'][:100]})")
        if is_grader and not failed:
            silent_graders.append(f"cell {i}")
        if is_grader and failed:
            err = next(o for o in cell.outputs if o.get("output_type") == "error")
            assert err["ename"] == "GradingError", f"grader cell {i} raised {err['ename']}, not a report"
    assert not errors, f"{path.name}: non-grader cells failed: {errors}"
    assert not silent_graders, f"{path.name}: grader cells passed on the blank exercise: {silent_graders}"
    assert elapsed <= EXERCISE_BUDGET_S, f"{path.name} took {elapsed:.1f} s (budget {EXERCISE_BUDGET_S:.0f} s)"

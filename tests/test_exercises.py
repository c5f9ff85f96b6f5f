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


def _notebook(*cells):
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    nb = new_notebook()
    for kind, source, tags in cells:
        cell = (new_markdown_cell if kind == "md" else new_code_cell)(source)
        if tags:
            cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)
    return nb


def test_hints_become_collapsed_tiers_with_a_pointer_to_the_solution():
    from llmopt_lab.course.exercises import make_exercise

    nb = _notebook(
        ("md", "## Exercise 1", ()),
        ("md", "**Hints**\n\nHint: which roofs can bind?\n\nHint: compute both times,\n"
               "keep the larger.", ("hints",)),
        ("code", "def bound(f, b):\n    ### BEGIN SOLUTION\n    return max(f, b)\n    ### END SOLUTION",
         ()),
    )
    ex = make_exercise(nb, source_name="01_x.ipynb")
    text = ex.cells[1].source
    assert text.startswith("**Hints**\n\n<details><summary>Hint 1 · a nudge</summary>\n\n"
                           "which roofs can bind?\n\n</details>")
    assert "<details><summary>Hint 2 · the idea</summary>\n\ncompute both times,\nkeep the larger." in text
    assert ("<details><summary>Hint 3 · the solution</summary>\n\nCompare with "
            "`solutions/01_x.ipynb`, the cell that defines `bound()`") in text
    assert text.count("<details>") == 3 == text.count("</details>")
    assert ex.cells[1].metadata["tags"] == ["hints"]
    assert nb.cells[1].source.startswith("**Hints**\n\nHint:")  # the solution keeps its text
    assert "NotImplementedError" in ex.cells[2].source


def test_hint_labels_and_format_errors():
    from llmopt_lab.course.exercises import ExerciseFormatError, make_exercise, parse_hints

    title, tiers = parse_hints("Hint (look at the shapes): B, H, T, D\nHint: scatter_")
    assert title == "" and tiers == [("look at the shapes", "B, H, T, D"), ("the idea", "scatter_")]
    code = ("code", "def f():\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION", ())
    with pytest.raises(ExerciseFormatError, match="at least one"):
        make_exercise(_notebook(("md", "just text", ("hints",)), code))
    with pytest.raises(ExerciseFormatError, match="must be markdown"):
        make_exercise(_notebook(("code", "# Hint: x", ("hints",)), code))
    with pytest.raises(ExerciseFormatError, match="no solution block after"):
        make_exercise(_notebook(code, ("md", "Hint: late", ("hints",))))
    with pytest.raises(ExerciseFormatError, match="hint 2 is empty"):
        make_exercise(_notebook(("md", "Hint: a\nHint:  ", ("hints",)), code))


@pytest.mark.parametrize("number", ["01", "02", "06", "08"])
def test_every_task_of_these_lessons_has_hints(number):
    """Lessons 01, 02, 06 and 08: each solution block has a hints cell before it
    (after the previous task's code)."""
    from llmopt_lab.course.exercises import BEGIN, HINTS_TAG

    (solution,) = (ROOT / "solutions").glob(f"{number}_*.ipynb")
    nb = nbformat.read(solution, as_version=4)
    seen_hints, missing = False, []
    for i, cell in enumerate(nb.cells):
        if HINTS_TAG in cell.metadata.get("tags", []):
            seen_hints = True
        elif cell.cell_type == "code" and any(BEGIN.match(line) for line in cell.source.split("\n")):
            if not seen_hints:
                missing.append(f"cell {i}")
            seen_hints = False
    assert not missing, f"{solution.name}: tasks without hints: {missing}"

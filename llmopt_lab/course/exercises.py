"""Exercise notebooks are generated from solution notebooks.

``solutions/NN_topic.ipynb`` is the single source. In its code cells, the
parts a learner writes sit between ``### BEGIN SOLUTION`` and
``### END SOLUTION`` lines, always inside a function body. :func:`make_exercise`
replaces each such block with one line that raises NotImplementedError
saying what to implement (the text after ``### BEGIN SOLUTION:`` if given,
else the function's name), and clears every output.

Inside a ``@triton.jit`` function a ``raise`` runs under the interpreter but
does not compile for a GPU, so there the marker must give a stub that does
compile, ``### BEGIN SOLUTION [stub: return m_i, l_i, acc]: what to write``:
the exercise gets a comment saying what to write and the stub line (which
computes nothing useful, so the grader fails with wrong values on both the
interpreter and a GPU).

Grader cells carry the cell tag ``grader``: they call
:func:`llmopt_lab.course.grading.check` on the learner's function. In a solution
notebook they pass; in an exercise notebook each of them must fail.

Hints come in tiers, written in the solution notebook as a markdown cell with
the cell tag ``hints``, placed before the task's code cell: an optional title,
then one paragraph per tier, each starting with ``Hint:``, from a nudge to the
idea::

    Hint: which two roofs can bind a step?

    Hint: compute both times and keep the larger one.

In the exercise each tier becomes a collapsed ``<details>`` block ("Hint 1 ·
a nudge", "Hint 2 · the idea", ...), and the builder adds a last tier that
points to the solution notebook and the function the task asks for (the
first solution block after the hints cell), so a learner opens one tier at
a time. In the solution notebook the cell reads as plain paragraphs.

Command line::

    python -m llmopt_lab exercises build    # write exercises/ from solutions/
    python -m llmopt_lab exercises check    # fail if exercises/ is stale
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

BEGIN = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION(?:\s*\[stub:\s*(?P<stub>[^\]]+)\])?"
                   r"(?::\s*(?P<what>.*))?$")
JIT = re.compile(r"^[ \t]*@(?:triton\.)?jit\b")
END = re.compile(r"^[ \t]*### END SOLUTION\s*$")
DEF = re.compile(r"^(?P<indent>[ \t]*)(?:async\s+)?def\s+(?P<name>\w+)\s*\(")
GRADER_TAG = "grader"
HINTS_TAG = "hints"
HINT = re.compile(r"^Hint(?:\s*\((?P<label>[^)]*)\))?:\s*", re.IGNORECASE)
#: names of the tiers an author writes, in order; later ones are just numbered
TIER_NAMES = ("a nudge", "the idea", "more of the idea")


class ExerciseFormatError(ValueError):
    """A solution notebook whose markers cannot be turned into an exercise."""


def strip_solutions(source: str, where: str = "cell") -> tuple[str, int]:
    """Replace every solution block of a cell's source; return (new source, blocks).

    Raises ExerciseFormatError for an unclosed/unopened block or a block that
    is not inside a function body.
    """
    lines = source.split("\n")
    out: list[str] = []
    blocks, i = 0, 0
    while i < len(lines):
        m = BEGIN.match(lines[i])
        if END.match(lines[i]):
            raise ExerciseFormatError(f"{where}: '### END SOLUTION' without a BEGIN (line {i + 1})")
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group("indent")
        func = _enclosing_function(lines, i, indent)
        if func is None:
            raise ExerciseFormatError(
                f"{where}: a solution block must sit inside a function body (line {i + 1})")
        j = i + 1
        while j < len(lines) and not END.match(lines[j]):
            if BEGIN.match(lines[j]):
                raise ExerciseFormatError(f"{where}: nested '### BEGIN SOLUTION' (line {j + 1})")
            j += 1
        if j == len(lines):
            raise ExerciseFormatError(f"{where}: '### BEGIN SOLUTION' without an END (line {i + 1})")
        what = (m.group("what") or f"the body of {func}()").strip().replace('"', "'")
        if _is_jit(lines, i, indent):
            stub = (m.group("stub") or "").strip()
            if not stub:
                raise ExerciseFormatError(
                    f"{where}: a solution block in the @triton.jit function {func}() needs a stub "
                    "that compiles ('### BEGIN SOLUTION [stub: return ...]: ...'): a raise does "
                    f"not compile for a GPU (line {i + 1})")
            out.append(f"{indent}# Exercise: {what}")
            out.append(f"{indent}# (the line below is a placeholder that compiles; replace it)")
            out.append(f"{indent}{stub}")
        else:
            out.append(f'{indent}raise NotImplementedError("Exercise: {what}")')
        blocks += 1
        i = j + 1
    return "\n".join(out), blocks


def _is_jit(lines: list[str], i: int, indent: str) -> bool:
    """Whether the function enclosing line i is decorated with @triton.jit (or @jit)."""
    for k in range(i - 1, -1, -1):
        m = DEF.match(lines[k])
        if m and len(m.group("indent")) < len(indent):
            j = k - 1
            while j >= 0 and lines[j].strip().startswith("@"):
                if JIT.match(lines[j]):
                    return True
                j -= 1
            return False
    return False


def _enclosing_function(lines: list[str], i: int, indent: str) -> str | None:
    for k in range(i - 1, -1, -1):
        m = DEF.match(lines[k])
        if m and len(m.group("indent")) < len(indent):
            return m.group("name")
    return None


def parse_hints(source: str, where: str = "hints cell") -> tuple[str, list[tuple[str, str]]]:
    """Split a hints cell's markdown into (title, [(label, text), ...]).

    A tier starts at a line ``Hint:`` (or ``Hint (label):``) and runs to the
    next one. Raises ExerciseFormatError when there is none.
    """
    title: list[str] = []
    tiers: list[tuple[str | None, list[str]]] = []
    for line in source.split("\n"):
        m = HINT.match(line)
        if m:
            tiers.append((m.group("label"), [line[m.end():]]))
        elif tiers:
            tiers[-1][1].append(line)
        else:
            title.append(line)
    if not tiers:
        raise ExerciseFormatError(f"{where}: a cell tagged '{HINTS_TAG}' needs at least one "
                                  "paragraph starting with 'Hint:'")
    out = []
    for n, (label, lines) in enumerate(tiers):
        text = "\n".join(lines).strip()
        if not text:
            raise ExerciseFormatError(f"{where}: hint {n + 1} is empty")
        out.append(((label or (TIER_NAMES[n] if n < len(TIER_NAMES) else "")).strip(), text))
    return "\n".join(title).strip(), out


def render_hints(title: str, tiers: list[tuple[str, str]], pointer: str) -> str:
    """Markdown of collapsed hint tiers (HTML <details>), the pointer last."""
    parts = [title] if title else []
    for n, (label, text) in enumerate(tiers + [("the solution", pointer)], start=1):
        summary = f"Hint {n}" + (f" · {label}" if label else "")
        parts.append(f"<details><summary>{summary}</summary>\n\n{text}\n\n</details>")
    return "\n\n".join(parts)


def _task_function(cells, start: int) -> str | None:
    """Name of the function of the first solution block at or after cell ``start``."""
    for cell in cells[start:]:
        if cell.cell_type != "code":
            continue
        lines = cell.source.split("\n")
        for i, line in enumerate(lines):
            m = BEGIN.match(line)
            if m:
                return _enclosing_function(lines, i, m.group("indent"))
    return None


def make_exercise(solution_nb, source_name: str | None = None):
    """An exercise notebook (nbformat node) from a solution notebook node.

    source_name: the solution's file name, for the hints' pointer to it.
    """
    import copy

    nb = copy.deepcopy(solution_nb)
    where_solution = f"`solutions/{source_name}`" if source_name else "the solution notebook"
    for n, cell in enumerate(nb.cells):
        if HINTS_TAG not in cell.metadata.get("tags", []):
            continue
        if cell.cell_type != "markdown":
            raise ExerciseFormatError(f"cell {n}: a cell tagged '{HINTS_TAG}' must be markdown")
        title, tiers = parse_hints(cell.source, where=f"cell {n}")
        func = _task_function(nb.cells, n + 1)
        if func is None:
            raise ExerciseFormatError(f"cell {n}: hints with no solution block after them")
        cell.source = render_hints(title, tiers, f"Compare with {where_solution}, the cell that "
                                                 f"defines `{func}()` (only after trying).")
    total = 0
    for n, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        cell.source, blocks = strip_solutions(cell.source, where=f"cell {n}")
        total += blocks
        cell.outputs = []
        cell.execution_count = None
        cell.metadata.pop("execution", None)
    if total == 0:
        raise ExerciseFormatError("no '### BEGIN SOLUTION' block found")
    nb.metadata.pop("widgets", None)
    return nb


def build(solutions: Path, exercises: Path, check_only: bool = False) -> list[str]:
    """Generate every exercise; return the names that changed (or would)."""
    import nbformat

    changed = []
    exercises.mkdir(parents=True, exist_ok=True)
    for src in sorted(solutions.glob("[0-9][0-9]_*.ipynb")):
        try:
            solution = nbformat.read(src, as_version=4)
        except Exception as e:  # noqa: BLE001 - not JSON, not a notebook: name the file
            raise ExerciseFormatError(f"{src} is not a readable notebook ({type(e).__name__}: "
                                      f"{str(e)[:120]})") from None
        try:
            ex = make_exercise(solution, source_name=src.name)
        except ExerciseFormatError as e:
            raise ExerciseFormatError(f"{src}: {e}") from None
        text = nbformat.writes(ex) + "\n"
        dst = exercises / src.name
        if not dst.exists() or dst.read_text(encoding="utf-8") != text:
            changed.append(src.name)
            if not check_only:
                dst.write_text(text, encoding="utf-8")
    stale = sorted({p.name for p in exercises.glob("*.ipynb")} - {p.name for p in solutions.glob("*.ipynb")})
    if stale:
        changed += [f"{name} (no solution)" for name in stale]
    return changed


def add_arguments(p) -> None:
    p.add_argument("action", choices=["build", "check"],
                   help="build: write exercises/ from solutions/; check: fail if stale")
    p.add_argument("--root", default=".", help="repository root (default: current folder)")


def run(args) -> int:
    root = Path(args.root)
    if not (root / "solutions").is_dir():
        from ..errors import LlmoptError

        raise LlmoptError(f"no solutions/ folder under {root.resolve()}; run from the repository root")
    try:
        changed = build(root / "solutions", root / "exercises", check_only=args.action == "check")
    except ExerciseFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.action == "check":
        if changed:
            print("exercises are stale: " + ", ".join(changed)
                  + " (run `python -m llmopt_lab exercises build`)")
            return 1
        print("exercises are up to date")
        return 0
    print(f"wrote {len(changed)} exercise notebook(s)" + (": " + ", ".join(changed) if changed else ""))
    return 0

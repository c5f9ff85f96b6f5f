"""The exercise machinery: solution stripping and graders that report clearly."""

import pytest
import torch

nbformat = pytest.importorskip("nbformat")  # absent on bare GPU machines: skip there

from llmopt_lab.course.exercises import ExerciseFormatError, make_exercise, strip_solutions
from llmopt_lab.course.grading import Case, GradingError, check, close

SOLUTION = '''import math

def area(r):
    """Area of a circle."""
    ### BEGIN SOLUTION: return pi r squared
    return math.pi * r * r
    ### END SOLUTION

class Shape:
    def scale(self, k):
        x = 1
        ### BEGIN SOLUTION
        return k * x
        ### END SOLUTION'''


def test_strip_keeps_indentation_and_says_what_to_do():
    src, n = strip_solutions(SOLUTION)
    assert n == 2
    assert '    raise NotImplementedError("Exercise: return pi r squared")' in src
    assert '        raise NotImplementedError("Exercise: the body of scale()")' in src
    assert "math.pi * r" not in src and "k * x" not in src
    ns = {}
    exec(src, ns)
    with pytest.raises(NotImplementedError, match="pi r squared"):
        ns["area"](1.0)


@pytest.mark.parametrize("bad, match", [
    ("### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "inside a function"),
    ("def f():\n    ### BEGIN SOLUTION\n    return 1", "without an END"),
    ("def f():\n    return 1\n    ### END SOLUTION", "without a BEGIN"),
])
def test_malformed_blocks_are_refused(bad, match):
    with pytest.raises(ExerciseFormatError, match=match):
        strip_solutions(bad)


def test_make_exercise_clears_outputs():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(SOLUTION, execution_count=3,
                                     outputs=[nbformat.v4.new_output("stream", text="hi")])
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), cell]
    ex = make_exercise(nb)
    assert ex.cells[1].outputs == [] and ex.cells[1].execution_count is None
    assert nb.cells[1].outputs  # the solution is untouched


def test_check_passes_and_prints(capsys):
    cases = [Case("small", (2.0,)), Case("zero", (0.0,))]
    assert check(lambda r: 3.0 * r, lambda r: 3.0 * r, cases, name="triple") == 2
    assert capsys.readouterr().out.count("✅") == 2


def test_check_reports_expected_got_and_hint(capsys):
    cases = [Case("ok", (0.0,)), Case("two", (2.0,), hint="multiply by three")]
    with pytest.raises(GradingError, match="1 of 2 cases failed"):
        check(lambda r: 2.0 * r, lambda r: 3.0 * r, cases, name="triple")
    out = capsys.readouterr().out
    assert "❌ two" in out and "expected: 6" in out and "got:      4" in out
    assert "hint: multiply by three" in out


def test_not_implemented_is_chained(capsys):
    def todo(x):
        raise NotImplementedError("Exercise: the body of todo()")

    with pytest.raises(GradingError) as e:
        check(todo, lambda x: x, [Case("a", (1,))])
    assert isinstance(e.value.__cause__, NotImplementedError)
    assert "not implemented yet" in capsys.readouterr().out


def test_close_explains_tensor_differences():
    a = torch.zeros(2, 3)
    assert close(a, a.clone())[0]
    assert "shape" in close(a, torch.zeros(3, 2))[1]
    assert "dtype" in close(a, torch.zeros(2, 3, dtype=torch.float64))[1]
    ok, why = close(a, a + torch.tensor([[0, 0, 1.0], [0, 0, 0]]))
    assert not ok and "1 of 6" in why
    assert close((1, 2.0), (1, 2.0 + 1e-9))[0] and not close({"a": 1}, {"b": 1})[0]


def test_reference_cannot_be_fooled_by_in_place_edits():
    def inplace(t):
        t.add_(1)
        return t

    x = torch.zeros(3)
    check(inplace, inplace, [Case("inplace", (x,))])
    assert x.eq(0).all()


JIT_SOLUTION = '''@triton.jit
def update(m_i, l_i, acc, s, v):
    # shapes
    ### BEGIN SOLUTION [stub: return m_i, l_i, acc]: the update with tl operations
    m_new = tl.maximum(m_i, tl.max(s, 1))
    return m_new, l_i, acc
    ### END SOLUTION
'''


def test_triton_jit_blocks_get_a_stub_that_compiles():
    src, n = strip_solutions(JIT_SOLUTION)
    assert n == 1 and "raise" not in src and "tl.maximum" not in src
    assert "    # Exercise: the update with tl operations" in src
    assert src.rstrip().endswith("return m_i, l_i, acc")
    compile(src, "<exercise>", "exec")  # still valid Python
    with pytest.raises(ExerciseFormatError, match="needs a stub that compiles"):
        strip_solutions(JIT_SOLUTION.replace(" [stub: return m_i, l_i, acc]", ""))
    # a plain function keeps the raise (and ignores nothing)
    plain, _ = strip_solutions(JIT_SOLUTION.replace("@triton.jit\n", ""))
    assert 'raise NotImplementedError("Exercise: the update with tl operations")' in plain


def test_ridge_batch_reference_and_grader():
    """Lesson 01's experiment: the batch at which decode reaches the ridge point."""
    from llmopt_lab import measure, preset
    from llmopt_lab.course.grading import check_ridge_batch, decode_intensity, ridge_batch_reference

    cfg = preset("tiny")
    cpu = measure.DeviceLimits("test CPU", {"fp32": 0.1e12}, bandwidth=25e9, source="measured")
    ridge = cpu.ridge_point("fp32")  # 4 FLOP/byte
    b = ridge_batch_reference(cfg, cpu, "fp32", 64)
    assert b is not None and b > 1
    assert decode_intensity(cfg, b, 64, "fp32") >= ridge > decode_intensity(cfg, b - 1, 64, "fp32")
    assert ridge_batch_reference(cfg, cpu, "fp32", 1024) is None  # the KV reads cap the intensity

    answers = check_ridge_batch(lambda c, lim, d, t: ridge_batch_reference(c, lim, d, t),
                                cfg, cpu, "fp32", [64, 1024])
    assert answers == {64: b, 1024: None}
    check_ridge_batch(lambda c, lim, d, t: None if t == 1024 else b + 1, cfg, cpu, "fp32",
                      [64, 1024])  # one off: an analytic answer may round the other way


@pytest.mark.parametrize("answer, says", [
    (lambda b: 1, "still below the ridge point"),
    (lambda b: 4 * b, "a smaller batch already reaches it"),
    (lambda b: None, "already reaches the ridge point"),
    (lambda b: "eight", "return a batch size"),
])
def test_ridge_batch_grader_says_what_is_wrong(answer, says, capsys):
    from llmopt_lab import measure, preset
    from llmopt_lab.course.grading import GradingError, check_ridge_batch, ridge_batch_reference

    cfg = preset("tiny")
    cpu = measure.DeviceLimits("test CPU", {"fp32": 0.1e12}, bandwidth=25e9, source="measured")
    b = ridge_batch_reference(cfg, cpu, "fp32", 64)
    with pytest.raises(GradingError, match="1 of 1 cases failed"):
        check_ridge_batch(lambda *a: answer(b), cfg, cpu, "fp32", [64])
    assert says in capsys.readouterr().out


def test_ridge_batch_grader_never_and_not_implemented(capsys):
    from llmopt_lab import measure, preset
    from llmopt_lab.course.grading import GradingError, check_ridge_batch

    cfg = preset("tiny")
    cpu = measure.DeviceLimits("test CPU", {"fp32": 0.1e12}, bandwidth=25e9, source="measured")
    with pytest.raises(GradingError):
        check_ridge_batch(lambda *a: 64, cfg, cpu, "fp32", [1024])
    assert "never reaches the ridge point" in capsys.readouterr().out

    def blank(*a):
        raise NotImplementedError("Exercise: the body of blank()")

    with pytest.raises(GradingError) as e:
        check_ridge_batch(blank, cfg, cpu, "fp32", [64])
    assert isinstance(e.value.__cause__, NotImplementedError)
    assert "not implemented yet" in capsys.readouterr().out


def test_kl_budget_plan_grader_accepts_near_optimal_plans_and_says_what_is_wrong(capsys):
    import pytest
    import torch

    from llmopt_lab.course.grading import GradingError, check_kl_budget_plan
    from llmopt_lab.transforms.quantize.mixed import Sensitivity, plan_bits

    kl = torch.tensor([[0.0, 0.01, 0.2], [0.0, 0.02, 0.05], [0.0, 0.001, 0.01]], dtype=torch.float64)
    nbytes = torch.tensor([[800, 400, 200], [800, 400, 200], [800, 400, 200]])
    sens = Sensitivity(["a", "b", "c"], [(8, None), (4, 64), (2, 64)], kl, nbytes)
    best = plan_bits(sens, kl_budget=0.04)
    exact = lambda k, b, budget: [sens.formats.index(best.assignment[n]) for n in sens.layers]
    assert check_kl_budget_plan(exact, sens, [0.04]) == {0.04: (best.nbytes, best.nbytes)}
    with pytest.raises(GradingError, match="1 of 1"):
        check_kl_budget_plan(lambda k, b, budget: [2, 2, 2], sens, [0.04])  # the cheapest: over budget
    assert "over the budget" in capsys.readouterr().out
    with pytest.raises(GradingError):
        check_kl_budget_plan(lambda k, b, budget: [0, 0, 0], sens, [0.04])  # all int8: wasteful
    assert "suffice" in capsys.readouterr().out
    with pytest.raises(GradingError) as e:
        check_kl_budget_plan(lambda k, b, budget: (_ for _ in ()).throw(NotImplementedError("todo")), sens, [0.04])
    assert isinstance(e.value.__cause__, NotImplementedError)
    with pytest.raises(GradingError):
        check_kl_budget_plan(lambda k, b, budget: [0, 1], sens, [0.04])  # wrong length
    assert "format indices" in capsys.readouterr().out

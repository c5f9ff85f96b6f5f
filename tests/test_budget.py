"""The notebook time-budget check itself must be able to fail."""

from conftest import budget_violations


def test_over_budget_is_reported_with_the_notebook_name():
    msgs = budget_violations({"notebooks/01_x.ipynb": 130.0, "solutions/01_x.ipynb": 20.0,
                              "exercises/01_x.ipynb": 31.0})
    assert len(msgs) == 2
    text = " | ".join(msgs)
    assert "notebooks/01_x.ipynb took 130.0 s, over its budget of 120 s" in text
    assert "exercises/01_x.ipynb took 31.0 s" in text and "solutions" not in text


def test_within_budget_and_scale():
    assert budget_violations({"notebooks/a.ipynb": 119.0}) == []
    assert budget_violations({"notebooks/a.ipynb": 200.0}, scale=2) == []

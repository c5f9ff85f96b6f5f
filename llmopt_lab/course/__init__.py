"""What only the notebooks use: interactive widgets, graders and the
generator of exercise notebooks.

Nothing in the inference core imports this package (``import llmopt_lab``
does not load it); it sits on top of the library and of
:mod:`llmopt_lab.measure`:

* :mod:`~llmopt_lab.course.widgets`: ipywidgets controls for the lessons;
* :mod:`~llmopt_lab.course.grading`: :func:`~llmopt_lab.course.grading.check`,
  the grader cells' test runner;
* :mod:`~llmopt_lab.course.exercises`: exercises/ generated from solutions/
  (``python -m llmopt_lab exercises build``).
"""

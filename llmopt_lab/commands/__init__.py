"""Command-line commands (see :mod:`llmopt_lab.cli`)."""

"""``python -m llmopt_lab``: see :mod:`llmopt_lab.cli`."""

from .cli import main

raise SystemExit(main())

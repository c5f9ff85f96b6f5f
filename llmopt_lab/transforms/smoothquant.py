"""Moved to :mod:`llmopt_lab.transforms.quantize.smoothquant`; this module keeps the
old import path (``from llmopt_lab.transforms.smoothquant import ...``) working."""

from .quantize.smoothquant import *  # noqa: F401,F403
from .quantize.smoothquant import __all__  # noqa: F401

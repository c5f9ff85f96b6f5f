"""Moved to :mod:`llmopt_lab.transforms.quantize.awq`; this module keeps the
old import path (``from llmopt_lab.transforms.awq import ...``) working."""

from .quantize.awq import *  # noqa: F401,F403
from .quantize.awq import __all__  # noqa: F401

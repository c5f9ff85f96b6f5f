"""Moved to :mod:`llmopt_lab.transforms.quantize.gptq`; this module keeps the
old import path (``from llmopt_lab.transforms.gptq import ...``) working."""

from .quantize.gptq import *  # noqa: F401,F403
from .quantize.gptq import __all__  # noqa: F401

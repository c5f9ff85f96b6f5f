"""Moved to :mod:`llmopt_lab.transforms.quantize.calibration`; this module keeps the
old import path (``from llmopt_lab.transforms.calibration import ...``) working."""

from .quantize.calibration import *  # noqa: F401,F403
from .quantize.calibration import __all__  # noqa: F401

"""llmopt_lab: the library of the llmopt-lab course on fast LLM inference.

Quick use::

    from llmopt_lab import load_model, generate
    model, tok = load_model("llmopt-tiny")
    out = generate(model, tok("def add(a, b):", return_tensors="pt").input_ids, 32)
"""

from .config import ModelConfig, preset
from .errors import LlmoptError
from .generate import Generation, decode_one_token, generate, prefill
from .kv_cache import StaticCache
from .model import Transformer
from .weights import ZOO, load_model, save_model

__version__ = "0.1.0"

__all__ = ["ModelConfig", "preset", "LlmoptError", "Generation", "decode_one_token", "generate",
           "prefill", "StaticCache", "Transformer", "ZOO", "load_model", "save_model",
           "__version__"]

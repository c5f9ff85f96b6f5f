"""llmopt_lab: the library of the llmopt-lab course on fast LLM inference.

Quick use::

    from llmopt_lab import load_model, generate
    model, tok = load_model("llmopt-tiny")
    out = generate(model, tok("def add(a, b):", return_tensors="pt").input_ids, 32)
"""

from .cache import KVPool, StaticCache
from .config import ModelConfig, preset
from .errors import LlmoptError
from .generate import Generation, decode_one_token, generate, prefill, run_step
from .model import Transformer
from .recipe import Recipe
from .sampling import SamplingParams
from .serving import Engine, RequestOutput
from .step import Step
from .weights import ZOO, load_model, save_model

__version__ = "0.1.0"

__all__ = ["KVPool", "StaticCache", "ModelConfig", "preset", "LlmoptError", "Generation",
           "decode_one_token", "generate", "prefill", "run_step", "Transformer", "SamplingParams",
           "Step", "Engine", "RequestOutput", "Recipe", "ZOO", "load_model", "save_model",
           "__version__"]

"""A recipe: which optimizations a deployment stacks, in one checked record.

::

    from llmopt_lab import Recipe, load_model
    model, tok = load_model("llmopt-tiny")
    recipe = Recipe(weights="int8", kv_dtype="int8", prefix_caching=True)
    recipe.validate(model.config)          # every combination checked, with the reason
    served, engine = recipe.build(model, tok)   # model untouched; served is a transformed copy
    recipe.save("deploy.json")

The lessons each add one technique; a real deployment combines several, and
not every combination is legal. :class:`Recipe` names the transforms applied
to the finished model (pruning, then weight quantization, then tensor
parallelism; the same order a user would follow by hand, because pruning
needs plain ``nn.Linear`` layers and tensor parallelism slices whatever
format the weights are in) and the runtime options of the
:class:`~llmopt_lab.serving.Engine` (paged KV in "auto" or int8 storage,
block size, prefix caching, batching policy and limits, CUDA graphs).

What it refuses, and why, lives in :meth:`Recipe.validate`: each check reuses
the library's own rule (the quantization registry, the int4 group sizes,
the tensor-parallel head split, the scheduler's settings) so the recipe and
the transforms cannot disagree.

Not yet inside the engine (the recipe records them, ``build`` refuses them
with the reason): speculative decoding (it runs through
:func:`llmopt_lab.speculative.speculative_generate`) and ``torch.compile``
of the engine's step.
"""

from __future__ import annotations

import copy as _copy
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import ParallelError, PruningError, QuantizationError, ServingError

__all__ = ["Recipe", "RECIPE_FORMAT"]

#: the "format" key of a saved recipe (and its version)
RECIPE_FORMAT = "llmopt-recipe"
_VERSION = 1

# options every quantization method takes besides its own (see quantize())
_COMMON_QUANT_OPTIONS = frozenset({"group_size", "include_lm_head", "backend"})
# quantization methods whose layers tensor parallelism can slice: their
# layers are Int8Linear or Int4Linear (split_rows_of_linear / split_cols_of_linear)
_TP_SLICEABLE = frozenset({"int8", "int4", "gptq", "awq", "qat", "mixed"})
_PRUNE_OPTIONS = frozenset({"sparsity", "pattern", "scope", "include_lm_head", "block_size", "damp"})
_SPEC_KEYS = frozenset({"draft", "k", "max_ngram"})
#: the proposer of speculative decoding that needs no draft model
PROMPT_LOOKUP = "prompt_lookup"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class Recipe:
    """The optimizations of one deployment: model transforms and engine options.

    Transforms (applied to a copy of the model by :meth:`transform`, in this order):
      pruning: None or a pruning method ("magnitude", "wanda", "sparsegpt");
        pruning_options: its keywords (``sparsity`` in [0, 1), ``pattern``
        "N:M", ``scope``, ...; see :func:`llmopt_lab.transforms.prune.prune`).
      weights: None (float weights) or a quantization method name ("int8",
        "int4", "gptq", "awq", "w8a8", "smoothquant", "fp8", "qat", "mixed");
        weight_options: its keywords, e.g. ``group_size`` (input features per
        int4 group: 32, 64, 128 or 256; int4-format methods only),
        ``include_lm_head``, method options such as ``alpha`` or ``bits``.
      tp: tensor-parallel degree (processes); 1 = one process.
    Engine options (see :class:`~llmopt_lab.serving.Engine`):
      kv_dtype: "auto" (the model's dtype) or "int8" (1 byte per K/V element
        plus one float32 scale per (token, head));
      block_size: KV slots per block (tokens); num_blocks / kv_bytes: the KV
        budget in blocks or bytes (None: the engine's default);
      prefix_caching: reuse the K/V of shared prompt prefixes (whole blocks);
      policy: "continuous", "dynamic" or "static"; max_num_seqs: sequences per
        step; max_num_batched_tokens: tokens per step (None: the engine's
        default); chunked_prefill: split long prompts (None: on for continuous);
        max_wait_s: the dynamic policy's wait (seconds);
      cuda_graph: replay decode steps from CUDA graphs (needs a CUDA GPU).
    Recorded, refused by :meth:`build` for now (see :meth:`validate`):
      speculative: None, or {"draft": zoo model name or "prompt_lookup",
        "k": proposals per step (default 4), "max_ngram": prompt lookup's
        longest n-gram (default 3)};
      compile: run the engine's step through ``torch.compile``.

    Raises: nothing on construction (a plain record); :meth:`validate` says
    what is wrong with it.
    """

    weights: str | None = None
    weight_options: dict = field(default_factory=dict)
    pruning: str | None = None
    pruning_options: dict = field(default_factory=dict)
    kv_dtype: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    kv_bytes: int | None = None
    prefix_caching: bool = False
    speculative: dict | None = None
    policy: str = "continuous"
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None
    chunked_prefill: bool | None = None
    max_wait_s: float = 0.05
    cuda_graph: bool = False
    compile: bool = False
    tp: int = 1

    # ---------------------------------------------------------------- checks
    def validate(self, model_config: ModelConfig | None = None, *, device=None,
                 comm=None) -> "Recipe":
        """Check that :meth:`build` can run this recipe; return self.

        model_config: the (whole, unsharded) model's config; with it the
        shape rules are checked too (group sizes that divide every layer's
        input features, a tensor-parallel degree that splits the heads, MLP
        width and vocabulary, int4 groups that row-parallel slices keep
        whole). device: where the model lives (default: "cuda" if this
        machine has a CUDA GPU, else "cpu"). comm: the
        :class:`~llmopt_lab.parallel.Comm` of a tensor-parallel run (required
        when tp > 1; its world size must equal tp).

        Raises:
            QuantizationError: unknown weight method or option, a group size
                that is not one of 32/64/128/256, that does not divide a
                layer's input features, or given to a method without groups.
            PruningError: unknown pruning method or option, bad sparsity or
                N:M pattern, a pattern that does not divide the input features.
            ParallelError: tp not a positive integer; tp > 1 without a Comm of
                that size (it must run under launch()/torchrun); a degree
                that does not split heads, KV heads, MLP width or vocabulary;
                an int4 group size a row-parallel slice would cut; a weight
                format tensor parallelism cannot slice.
            ServingError: engine options out of range (kv_dtype, block_size,
                policy, limits, chunked prefill without the continuous
                policy); cuda_graph on a device without CUDA; speculative
                decoding or compile (not supported inside the Engine yet);
                a malformed speculative spec.
        """
        self._check_fields()
        if model_config is not None:
            self._check_shapes(model_config)
        self._check_runtime(device, comm)
        return self

    def _check_fields(self) -> None:
        """The checks that need neither a model nor a device (also run by
        :meth:`from_json`, so that a saved recipe is well-formed)."""
        self._check_weights()
        self._check_pruning()
        if self.kv_dtype not in ("auto", "int8"):
            raise ServingError(f"kv_dtype must be 'auto' or 'int8', got {self.kv_dtype!r}")
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ServingError(f"block_size (KV slots per block) must be a positive integer, "
                               f"got {self.block_size!r}")
        for name in ("num_blocks", "kv_bytes"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ServingError(f"{name} must be a positive integer or None, got {v!r}")
        if self.num_blocks is not None and self.kv_bytes is not None:
            raise ServingError("give the KV budget as num_blocks or kv_bytes, not both")
        for name in ("prefix_caching", "cuda_graph", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ServingError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.chunked_prefill is not None and not isinstance(self.chunked_prefill, bool):
            raise ServingError(f"chunked_prefill must be True, False or None (the policy's "
                               f"default), got {self.chunked_prefill!r}")
        from .serving.scheduler import SchedulerConfig

        chunked = self.policy == "continuous" if self.chunked_prefill is None else self.chunked_prefill
        # the scheduler's own checks (policy name, limits, chunked prefill needs continuous)
        SchedulerConfig(policy=self.policy, max_num_seqs=self.max_num_seqs,
                        max_num_batched_tokens=self.max_num_batched_tokens or 512,
                        chunked_prefill=chunked, max_wait_s=self.max_wait_s)
        if not _is_int(self.tp) or self.tp < 1:
            raise ParallelError(f"tp (the tensor-parallel degree, one process per rank) must be a "
                                f"positive integer, got {self.tp!r}")
        if self.tp > 1 and self.weights is not None and self.weights not in _TP_SLICEABLE:
            raise ParallelError(f"tensor parallelism cannot slice the layers of weight method "
                                f"{self.weights!r} (it slices float, int8 weight-only and int4 "
                                f"layers: {', '.join(sorted(_TP_SLICEABLE))}); use one of those "
                                f"or tp=1")
        self._check_speculative_spec()

    def _check_weights(self) -> None:
        if not isinstance(self.weight_options, dict):
            raise QuantizationError(f"weight_options must be a dict of quantize() keywords, got "
                                    f"{type(self.weight_options).__name__}")
        if self.weights is None:
            if self.weight_options:
                raise QuantizationError(f"weight_options {sorted(self.weight_options)} given but "
                                        "weights is None: name a quantization method")
            return
        from .transforms.quantize import check_group_size, get_method

        spec = get_method(self.weights)  # QuantizationError naming the known methods
        unknown = set(self.weight_options) - spec.options - _COMMON_QUANT_OPTIONS
        if unknown:
            raise QuantizationError(f"unknown option(s) {', '.join(sorted(unknown))} for weight "
                                    f"method {self.weights!r}; its options: "
                                    f"{', '.join(sorted(spec.options | _COMMON_QUANT_OPTIONS))}")
        if "group_size" in self.weight_options:
            if not spec.group_size:
                raise QuantizationError(f"group_size applies to the int4-format methods (groups of "
                                        f"input features share a scale), not {self.weights!r}, "
                                        f"which has no groups")
            check_group_size(self.weight_options["group_size"])

    def _check_pruning(self) -> None:
        if not isinstance(self.pruning_options, dict):
            raise PruningError(f"pruning_options must be a dict of prune() keywords, got "
                               f"{type(self.pruning_options).__name__}")
        if self.pruning is None:
            if self.pruning_options:
                raise PruningError(f"pruning_options {sorted(self.pruning_options)} given but "
                                   "pruning is None: name a pruning method")
            return
        from .transforms.prune import METHODS, _check_sparsity, parse_pattern

        if self.pruning not in METHODS:
            raise PruningError(f"unknown pruning method {self.pruning!r}; choose one of "
                               f"{', '.join(METHODS)}")
        unknown = set(self.pruning_options) - _PRUNE_OPTIONS
        if unknown:
            raise PruningError(f"unknown pruning option(s) {', '.join(sorted(unknown))}; prune() "
                               f"takes {', '.join(sorted(_PRUNE_OPTIONS))}")
        parse_pattern(self.pruning_options.get("pattern"))
        _check_sparsity(self.pruning_options.get("sparsity", 0.5))

    def _check_speculative_spec(self) -> None:
        s = self.speculative
        if s is None:
            return
        if not isinstance(s, dict) or "draft" not in s:
            raise ServingError(f"speculative must be None or a dict {{'draft': zoo model name or "
                               f"'{PROMPT_LOOKUP}', 'k': proposals per step}}, got {s!r}")
        unknown = set(s) - _SPEC_KEYS
        if unknown:
            raise ServingError(f"unknown speculative key(s) {', '.join(sorted(unknown))}; known: "
                               f"{', '.join(sorted(_SPEC_KEYS))}")
        if not isinstance(s["draft"], str) or not s["draft"]:
            raise ServingError(f"speculative['draft'] must be a model name or '{PROMPT_LOOKUP}', "
                               f"got {s['draft']!r}")
        for key in ("k", "max_ngram"):
            if key in s and (not _is_int(s[key]) or s[key] < 1):
                raise ServingError(f"speculative[{key!r}] must be a positive integer, got {s[key]!r}")

    def _linear_inputs(self, cfg: ModelConfig) -> dict[str, int]:
        """Input features of every decoder linear (name -> K), as quantize sees them."""
        out = {}
        for i in range(cfg.num_layers):
            q = cfg.num_heads_at(i) * cfg.head_dim
            for name in ("q_proj", "k_proj", "v_proj"):
                out[f"layers.{i}.self_attn.{name}"] = cfg.hidden_size
            out[f"layers.{i}.self_attn.o_proj"] = q
            out[f"layers.{i}.mlp.gate_proj"] = cfg.hidden_size
            out[f"layers.{i}.mlp.up_proj"] = cfg.hidden_size
            out[f"layers.{i}.mlp.down_proj"] = cfg.intermediate_size_at(i)
        return out

    def _check_shapes(self, cfg: ModelConfig) -> None:
        if not isinstance(cfg, ModelConfig):
            raise ServingError(f"model_config must be a ModelConfig (model.config), got "
                               f"{type(cfg).__name__}")
        if self.block_size > cfg.max_position_embeddings:
            raise ServingError(f"block_size {self.block_size} exceeds the model's context of "
                               f"{cfg.max_position_embeddings} tokens")
        inputs = self._linear_inputs(cfg)
        if self.weight_options.get("include_lm_head"):
            inputs["lm_head"] = cfg.hidden_size
        group = None
        if self.weights is not None:
            from .transforms.quantize import check_group_size, get_method

            if get_method(self.weights).group_size:
                group = self.weight_options.get("group_size", 128)  # quantize()'s default
                for name, k in inputs.items():
                    check_group_size(group, k, name)
        nm = None
        if self.pruning is not None:
            from .transforms.prune import parse_pattern

            nm = parse_pattern(self.pruning_options.get("pattern"))
            for name, k in inputs.items():
                if nm is not None and k % nm[1]:
                    raise PruningError(f"{name} has {k} input features, not a multiple of {nm[1]} "
                                       f"(pattern {self.pruning_options['pattern']})")
        if self.tp > 1:
            self._check_tp_shapes(cfg, group)

    def _check_tp_shapes(self, cfg: ModelConfig, group: int | None) -> None:
        from .parallel.tensor import column_split, kv_heads_for_rank

        p = self.tp
        meta = lambda n: torch.empty(n, 0, device="meta")  # noqa: E731 (a shape, no memory)
        try:  # the same checks apply_tensor_parallel makes, on shapes only
            column_split(meta(cfg.vocab_size), 0, p)
        except ParallelError as e:
            raise ParallelError(f"tp={p}: the vocabulary of {cfg.vocab_size} does not split: {e}") from None
        for i in range(cfg.num_layers):
            heads, width = cfg.num_heads_at(i), cfg.intermediate_size_at(i)
            kv_heads_for_rank(heads, cfg.num_kv_heads, 0, p)
            try:
                column_split(meta(width), 0, p)
            except ParallelError as e:
                raise ParallelError(f"tp={p}: layer {i}'s MLP width does not split: {e}") from None
            if group is None:
                continue
            # row-parallel o_proj and down_proj: rank r multiplies input features
            # [r K/p, (r+1) K/p); an int4 group must not straddle two ranks
            for name, k in (("self_attn.o_proj", heads * cfg.head_dim), ("mlp.down_proj", width)):
                if (k // p) % group:
                    raise ParallelError(
                        f"tp={p} with group_size {group}: layers.{i}.{name} has {k} input "
                        f"features, {k // p} per rank, not a multiple of {group}, so a row-parallel "
                        f"slice would cut an int4 group; use a group size that divides {k // p} "
                        f"or a smaller tp")

    def _check_runtime(self, device, comm) -> None:
        if self.speculative is not None:
            raise ServingError("speculative decoding runs through speculative_generate; inside the "
                               "Engine it is not supported yet (set speculative=None to build an "
                               "engine, and call llmopt_lab.speculative.speculative_generate on "
                               "the transformed model from Recipe.transform)")
        if self.compile:
            raise ServingError("compile=True: torch.compile of the Engine's step is not supported "
                               "yet; generate(..., compile_mode=...) compiles the plain path")
        if self.cuda_graph:
            dev = torch.device(device) if device is not None else torch.device(
                "cuda" if torch.cuda.is_available() else "cpu")
            if dev.type != "cuda":
                raise ServingError(f"cuda_graph=True needs a CUDA GPU (a CUDA graph replays recorded "
                                   f"GPU kernel launches), and the model is on {dev}: set "
                                   "cuda_graph=False on this device")
        self._check_comm(comm)

    def _check_comm(self, comm) -> None:
        if comm is None:
            if self.tp > 1:
                raise ParallelError(
                    f"tp={self.tp} shards the model over {self.tp} processes, which build() in one "
                    f"process cannot do: run it under launch()/torchrun (one process per rank) and "
                    f"pass comm=init_from_env() to build() on every rank")
            return
        from .parallel.comm import Comm

        if not isinstance(comm, Comm):
            raise ParallelError(f"comm must be a llmopt_lab.parallel.Comm (init_from_env()), got "
                                f"{type(comm).__name__}")
        if comm.world_size != self.tp:
            raise ParallelError(f"the recipe asks for tp={self.tp} but the process group has "
                                f"{comm.world_size} processes: launch tp processes")

    # ---------------------------------------------------------------- build
    def transform(self, model, calibration=None, *, comm=None):
        """The recipe's model transforms applied to a copy of ``model``:
        pruning, then weight quantization, then tensor parallelism. Returns
        the transformed copy (``model`` itself is never modified; with no
        transform at all, ``model`` itself is returned).

        calibration: list of (B, T) int64 token batches from the training
        split, for calibrated methods (gptq, awq, smoothquant, qat; wanda,
        sparsegpt). comm: the Comm of a tensor-parallel run (tp > 1).

        Raises: QuantizationError, PruningError, ParallelError as
        :meth:`validate` and the transforms do (e.g. missing calibration);
        ServingError for a model that is not an llmopt_lab Transformer.
        """
        cfg = getattr(model, "config", None)
        if not isinstance(cfg, ModelConfig):
            raise ServingError(f"a recipe transforms an llmopt_lab Transformer (load_model(name)[0]), "
                               f"got {type(model).__name__}")
        self._check_fields()
        self._check_shapes(cfg)
        self._check_comm(comm)
        out = model
        if self.pruning is not None:
            from .transforms.prune import prune

            out = _copy.deepcopy(model)
            prune(out, self.pruning, calibration=calibration, **self.pruning_options)
        if self.weights is not None:
            from .transforms.quantize import quantize

            # quantize(copy=True) shares the float weights it is about to replace
            # instead of copying them; a pruned copy is ours already
            out = quantize(out, self.weights, calibration=calibration, copy=out is model,
                           **self.weight_options)
        if self.tp > 1:
            from .parallel.tensor import apply_tensor_parallel

            if out is model:
                out = _copy.deepcopy(model)
            apply_tensor_parallel(out, comm)
        return out

    def engine_options(self) -> dict:
        """The keyword arguments of :class:`~llmopt_lab.serving.Engine` this
        recipe sets (policy, limits, KV storage, prefix caching, CUDA graphs).

        Raises: nothing."""
        return dict(policy=self.policy, max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=self.max_num_batched_tokens,
                    chunked_prefill=self.chunked_prefill, max_wait_s=self.max_wait_s,
                    num_blocks=self.num_blocks, kv_bytes=self.kv_bytes,
                    block_size=self.block_size, kv_dtype=self.kv_dtype,
                    prefix_caching=self.prefix_caching, cuda_graph=self.cuda_graph)

    def build(self, model, tokenizer=None, calibration=None, *, comm=None):
        """Validate, transform a copy of ``model`` and start an engine on it.

        Returns ``(served_model, engine)``: the transformed copy (see
        :meth:`transform`; ``model`` is left as it was) and an
        :class:`~llmopt_lab.serving.Engine` with the recipe's runtime
        options. tokenizer: for text prompts. calibration: (B, T) token
        batches for calibrated methods. comm: under torchrun with tp > 1,
        this rank's :class:`~llmopt_lab.parallel.Comm` (every rank calls
        build with the same model and recipe).

        Raises: everything :meth:`validate` raises (checked against the
        model's config and device before any work); QuantizationError or
        PruningError from the transforms (missing calibration);
        ServingError from the Engine.
        """
        cfg = getattr(model, "config", None)
        if not isinstance(cfg, ModelConfig):
            raise ServingError(f"a recipe builds on an llmopt_lab Transformer (load_model(name)[0]), "
                               f"got {type(model).__name__}")
        self.validate(cfg, device=model.device, comm=comm)
        served = self.transform(model, calibration, comm=comm)
        from .serving import Engine

        return served, Engine(served, tokenizer, **self.engine_options())

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict:
        """A JSON-able dict of every field (plus "format" and "version").

        Raises: nothing (options that are not JSON-able fail in :meth:`to_json`)."""
        d = {"format": RECIPE_FORMAT, "version": _VERSION}
        d.update(asdict(self))
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """The recipe as JSON text (:meth:`from_json` reads it back equal).

        Raises ServingError when an option is not JSON-able (a tensor, an object)."""
        try:
            return json.dumps(self.to_dict(), indent=indent, sort_keys=False)
        except (TypeError, ValueError) as e:
            raise ServingError(f"this recipe cannot be written as JSON: {e}") from None

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """A recipe from :meth:`to_dict`'s output, checked as :meth:`from_json` does.

        Raises ServingError for a dict of another format or version, or with
        unknown keys; the field errors of :meth:`validate` (without model,
        device or comm checks)."""
        if not isinstance(d, dict):
            raise ServingError(f"a recipe is a JSON object, got {type(d).__name__}")
        d = dict(d)
        fmt, version = d.pop("format", None), d.pop("version", None)
        if fmt != RECIPE_FORMAT:
            raise ServingError(f"not a recipe: format is {fmt!r}, expected {RECIPE_FORMAT!r}")
        if version != _VERSION:
            raise ServingError(f"recipe version {version!r} is not supported (this library reads "
                               f"version {_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ServingError(f"unknown recipe field(s) {', '.join(sorted(unknown))}; known: "
                               f"{', '.join(sorted(known))}")
        recipe = cls(**d)
        recipe._check_fields()
        return recipe

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        """Read a recipe written by :meth:`to_json`.

        Raises ServingError for text that is not JSON or not a recipe (see
        :meth:`from_dict`); the field errors of :meth:`validate`."""
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as e:
            raise ServingError(f"a recipe must be JSON text: {e}") from None
        return cls.from_dict(d)

    def save(self, path, overwrite: bool = False) -> Path:
        """Write the recipe as JSON to ``path`` atomically (a temporary file in
        the same folder, then a rename: a reader never sees half a file).
        Returns the path.

        Raises ServingError when ``path`` exists and ``overwrite`` is False,
        or its folder does not exist; the errors of :meth:`to_json`."""
        path = Path(path)
        text = self.to_json()
        if path.exists() and not overwrite:
            raise ServingError(f"{path} exists; pass overwrite=True to replace it")
        if not path.parent.is_dir():
            raise ServingError(f"cannot save a recipe to {path}: folder {path.parent} does not exist")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path) -> "Recipe":
        """Read a recipe saved by :meth:`save`.

        Raises ServingError for a missing file or one that is not a recipe."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ServingError(f"no recipe file at {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ServingError(f"cannot read recipe {path}: {e}") from None
        return cls.from_json(text)

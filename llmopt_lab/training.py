"""One training loop for every lesson that trains: the zoo, distillation, recovery fine-tunes.

    log = train(model, batches, TrainSettings(steps=1000), loss_fn=lm_loss,
                evaluate=lambda m: {"loss": ...}, checkpoint=Path("run.ckpt"), resume=True)

What it does each optimizer step: set the learning rate (linear warm-up, then
cosine decay, :meth:`TrainSettings.lr_at`), run ``grad_accum`` micro-batches
(``batches(step * grad_accum + i)``) through ``loss_fn(model, batch)`` under
autocast, clip the gradients' global L2 norm, step AdamW (decoupled weight
decay on matrices only). Every ``eval_every`` steps and at the end it calls
``evaluate(model)`` and writes a checkpoint.

Device-agnostic: it trains the model where it is. :func:`autocast_plan`
chooses the precision from the device: ``"auto"`` is bfloat16 autocast where
the device computes bfloat16 natively (a CUDA GPU of compute capability 8.0+;
a CPU with AVX512-BF16 or AMX), float16 autocast with a gradient scaler on an
older GPU, float32 elsewhere. Master weights, the loss and evaluation stay in
float32 either way.

Reproducible: batches are a function of the step (the caller's ``batches``),
and a checkpoint holds the model, the optimizer, the gradient scaler, the RNG
state and the log, loaded back with ``torch.load(weights_only=True)``, so an
interrupted run resumed from it continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import TrainingError, UnsupportedDtypeError
from .measure.device import native_bf16

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainSettings:
    """A training budget, fixed before the run: steps x batch_size x seq_len
    (x grad_accum) tokens.

    AdamW (decoupled weight decay on matrices only), linear warm-up for
    ``warmup_frac`` of the steps, then cosine decay to ``min_lr_ratio`` x lr;
    gradients clipped to ``grad_clip`` (global L2 norm; 0 or None: no
    clipping). Evaluation (and a checkpoint) every ``eval_every`` steps.
    ``grad_accum`` micro-batches per optimizer step. batch_size and seq_len
    describe what ``batches`` returns (the loop counts tokens with them).
    Raises TrainingError on a value that cannot train.
    """

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: int = 50
    #: "bf16": matmuls under bfloat16 autocast (float32 master weights, loss
    #: and evaluation in float32); "fp16": float16 autocast with a gradient
    #: scaler (CUDA only); "fp32": everything in float32; "auto": chosen from
    #: the device (:func:`autocast_plan`).
    precision: str = "fp32"
    grad_accum: int = 1

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TrainingError(f"TrainSettings.{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise TrainingError(f"TrainSettings.lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.warmup_frac <= 1.0:
            raise TrainingError(f"TrainSettings.warmup_frac must be in [0, 1], got {self.warmup_frac!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainingError(f"TrainSettings.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise TrainingError(f"TrainSettings.grad_clip must be >= 0 or None, got {self.grad_clip!r}")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"TrainSettings.precision must be one of {PRECISIONS}, "
                                f"got {self.precision!r}")

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len * self.grad_accum

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_frac * self.steps))

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclass(frozen=True)
class AutocastPlan:
    """What :func:`train` computes in on a device: ``dtype`` None means
    float32 (autocast off); ``scaler``: a GradScaler is needed (float16)."""

    device_type: str
    dtype: torch.dtype | None
    scaler: bool = False

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)


def autocast_plan(precision: str, device: Any) -> AutocastPlan:
    """The autocast dtype (and whether a gradient scaler is needed) for
    ``precision`` on ``device``.

    'auto': bfloat16 where the device has it natively (CUDA capability 8.0+,
    a CPU with AVX512-BF16/AMX), else float16 with a scaler on CUDA, else
    float32. 'bf16': bfloat16 (raises UnsupportedDtypeError on a GPU without
    it). 'fp16': float16 with a scaler (CUDA only). 'fp32': no autocast.
    Raises TrainingError for an unknown precision, UnsupportedDtypeError
    for one the device cannot run.
    """
    if precision not in PRECISIONS:
        raise TrainingError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = torch.device(device)
    kind = dev.type
    if precision == "auto":
        if native_bf16(dev):
            return AutocastPlan(kind, torch.bfloat16)
        return AutocastPlan(kind, torch.float16, True) if kind == "cuda" else AutocastPlan(kind, None)
    if precision == "fp32":
        return AutocastPlan(kind, None)
    if precision == "bf16":
        if kind == "cuda" and not torch.cuda.is_bf16_supported():
            raise UnsupportedDtypeError(f"{torch.cuda.get_device_name(dev)} has no bfloat16; "
                                        "train with precision='fp16' or 'auto'")
        if kind not in ("cpu", "cuda"):
            raise UnsupportedDtypeError(f"bf16 training is supported on cpu and cuda, not {kind}")
        return AutocastPlan(kind, torch.bfloat16)
    if kind != "cuda":
        raise UnsupportedDtypeError(f"fp16 training needs a CUDA GPU (a gradient scaler); on "
                                    f"{kind} use precision='bf16' or 'fp32'")
    return AutocastPlan(kind, torch.float16, True)


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy of a (B, T + 1) token batch: inputs
    ``batch[:, :-1]``, targets ``batch[:, 1:]``; mean over B * T tokens, in
    float32 whatever the autocast dtype."""
    logits = model(batch[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (dim >= 2) only, lr set per step."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=s.lr, betas=tuple(s.betas))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise TrainingError("the model has no parameters to train") from None


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` atomically (to a temporary file, then renamed), so a run
    killed while saving leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint of :func:`train` (tensors and plain data only:
    ``torch.load(weights_only=True)``). Raises TrainingError if it is not one."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, ...
        raise TrainingError(f"cannot read the checkpoint {path}: {e}") from None
    missing = {"model", "optimizer", "log", "step"} - set(state)
    if missing:
        raise TrainingError(f"{path} is not a training checkpoint (missing {', '.join(sorted(missing))})")
    return state


def train(model: nn.Module, batches: Callable[[int], Any], settings: TrainSettings, *,
          loss_fn: Callable[[nn.Module, Any], torch.Tensor] = lm_loss,
          evaluate: Callable[[nn.Module], dict] | None = None,
          checkpoint: str | Path | None = None, resume: bool = False,
          optimizer: torch.optim.Optimizer | None = None, desc: str = "train",
          progress: bool = True, log_every: int = 10) -> dict:
    """Train ``model`` in place for ``settings.steps`` optimizer steps; returns the log.

    batches: ``batches(i) -> batch`` for micro-batch i (a pure function of i,
    so that a resumed run sees the same data); tensors in it (also inside a
    tuple, list or dict) are moved to the model's device. loss_fn:
    ``loss_fn(model, batch) -> scalar tensor`` (default :func:`lm_loss`; a
    distillation loss for lesson 05). evaluate: ``evaluate(model) -> dict``
    of numbers (e.g. {"loss": ..., "perplexity": ...}), called every
    ``settings.eval_every`` steps and at the end, in eval mode without
    gradients. checkpoint: a file written at each evaluation step (and at the
    end); with ``resume`` and an existing file, training continues from it.
    optimizer: default :func:`make_optimizer`.

    Returns the log: ``train_loss`` [[step, mean loss of the last log_every
    steps]], ``heldout`` [{"step", "tokens", **evaluate(model)}],
    ``train_seconds`` (evaluations and checkpoints excluded), ``precision``.
    The model is left in eval mode. Raises TrainingError for bad arguments
    or a checkpoint that does not fit, UnsupportedDtypeError for a precision
    the device cannot run.
    """
    if not isinstance(settings, TrainSettings):
        raise TrainingError(f"settings must be a TrainSettings, got {type(settings).__name__}")
    if not callable(batches) or not callable(loss_fn):
        raise TrainingError("batches and loss_fn must be callables: batches(step) -> batch, "
                            "loss_fn(model, batch) -> loss")
    if evaluate is not None and not callable(evaluate):
        raise TrainingError("evaluate must be a callable evaluate(model) -> dict, or None")
    if resume and checkpoint is None:
        raise TrainingError("resume=True needs a checkpoint path")
    if not isinstance(log_every, int) or log_every < 1:
        raise TrainingError(f"log_every must be a positive integer, got {log_every!r}")
    s = settings
    device = _model_device(model)
    plan = autocast_plan(s.precision, device)
    opt = optimizer if optimizer is not None else make_optimizer(model, s)
    scaler = torch.amp.GradScaler(device.type) if plan.scaler else None
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    log = {"train_loss": [], "heldout": [], "train_seconds": 0.0}
    window: list[float] = []
    start = 0
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise TrainingError(f"the checkpoint {checkpoint} does not fit this model: {e}") from None
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        log, start, window = state["log"], int(state["step"]), list(state.get("window", []))
        if start > s.steps:
            raise TrainingError(f"the checkpoint is at step {start}, past settings.steps={s.steps}")
        if progress:
            print(f"resumed {desc} from {checkpoint} at step {start}", file=sys.stderr)
    log["precision"] = plan.precision
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.steps, initial=start, desc=desc, mininterval=2.0, file=sys.stderr,
                   dynamic_ncols=True)
    tokens_per_step = s.batch_size * s.seq_len * s.grad_accum
    run_seconds = 0.0
    for step in range(start, s.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:  # a group may scale the schedule ("lr_scale", default 1)
            group["lr"] = s.lr_at(step) * group.get("lr_scale", 1.0)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(s.grad_accum):
            batch = _to_device(batches(step * s.grad_accum + micro), device)
            with plan.autocast():
                loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TrainingError("loss_fn must return a scalar tensor")
            scaled = loss.float() / s.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += loss.item()
        if scaler is not None:
            scaler.unscale_(opt)
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        elapsed = time.perf_counter() - t0
        log["train_seconds"] += elapsed
        run_seconds += elapsed
        window.append(total / s.grad_accum)
        done = step + 1
        if done % log_every == 0 or done == s.steps:
            log["train_loss"].append([done, round(statistics.fmean(window), 4)])
            window = []
        if done % s.eval_every == 0 or done == s.steps:
            if evaluate is not None:
                model.eval()
                with torch.no_grad():
                    result = evaluate(model)
                model.train()
                log["heldout"].append({"step": done, "tokens": done * tokens_per_step, **result})
            if checkpoint is not None:
                save_checkpoint(checkpoint, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": torch.get_rng_state(), "log": log, "step": done, "window": window})
        if bar is not None:
            held = log["heldout"][-1].get("loss", float("nan")) if log["heldout"] else float("nan")
            last = window[-1] if window else log["train_loss"][-1][1]
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3f}", heldout=f"{held:.3f}",
                            tok_s=f"{(done - start) * tokens_per_step / max(run_seconds, 1e-9):.0f}",
                            refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    return log


__all__ = ["PRECISIONS", "TrainSettings", "AutocastPlan", "autocast_plan", "lm_loss",
           "make_optimizer", "train", "save_checkpoint", "load_checkpoint"]

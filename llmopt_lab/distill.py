"""Knowledge distillation (lesson 05): train a small student to imitate a big teacher.

::

    from llmopt_lab.distill import distill, TeacherCache, HiddenDistiller
    log = distill(student, teacher, lambda i: batches[i % len(batches)],
                  TrainSettings(steps=150, batch_size=8, seq_len=128), temperature=2.0, alpha=0.5)

**Logit distillation** (Hinton, Vinyals & Dean 2015, :func:`kd_loss`). At every
position the teacher gives a whole next-token distribution, not one token:
the student learns which wrong answers are *almost* right ("dark knowledge").
Both distributions are softened with a temperature T (``softmax(z / T)``,
:func:`soft_targets`), the student is pulled towards the teacher's with a KL
divergence, and mixed with the ordinary cross-entropy on the real next token::

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)

``kind="forward"`` is that KL(p_teacher || p_student): mean-seeking, the
student must cover every token the teacher gives mass to. ``kind="reverse"``
is KL(p_student || p_teacher): mode-seeking, the student may drop some of the
teacher's modes but is punished for putting mass where the teacher has none.

**Hidden-state distillation** (FitNets, Romero et al. 2015; TinyBERT,
:class:`HiddenDistiller`): a learned projection maps a student layer's output
to the width of a teacher layer's output, and an MSE pulls the two together.

**Teacher caching** (:class:`TeacherCache`): the teacher's forward is often
the biggest cost of a distillation step. Run it once per batch, keep only its
top-k logits (float16) and train many epochs from the cache.

**Sequence-level distillation** (Kim & Rush 2016, :func:`teacher_sequences`,
:func:`sequence_batches`): train the student with the plain next-token loss
on text the teacher *wrote*. No logits needed, so the teacher may even be a
model behind an API.

Everything runs on the models' devices (CPU or GPU) through the one training
loop, :func:`llmopt_lab.training.train`. Bad arguments raise TrainingError.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import TrainingError
from .training import TrainSettings, train

KINDS = ("forward", "reverse")


# ------------------------------------------------------------------ checks
def _check_kd_args(temperature: Any, alpha: Any, kind: Any) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or not temperature > 0:
        raise TrainingError(f"temperature must be a positive number, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise TrainingError(f"alpha must be in [0, 1], got {alpha!r}")
    if kind not in KINDS:
        raise TrainingError(f"kind must be one of {KINDS}, got {kind!r}")


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None) is not None:
        return int(config.vocab_size)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        return head.out_features
    raise TrainingError(f"cannot tell the vocabulary size of {type(model).__name__} "
                        "(no config.vocab_size, no lm_head)")


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise TrainingError(f"{type(model).__name__} has no parameters") from None


# ------------------------------------------------------------------ losses
def soft_targets(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The softened distribution ``softmax(logits / T)`` over the last
    dimension, in float32. T > 1 flattens it (the small probabilities of the
    "almost right" tokens become visible), T < 1 sharpens it, T -> 0 is
    the argmax. Raises TrainingError for T <= 0."""
    _check_kd_args(temperature, 1.0, "forward")
    return torch.softmax(logits.float() / temperature, dim=-1)


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from log-probabilities (last dim: classes)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _combine(student_logits, soft_per_position, labels, temperature, alpha, ignore_index):
    ce = None
    if alpha < 1.0:
        ce = F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]),
                             labels.reshape(-1).long(), ignore_index=ignore_index)
        if alpha == 0.0:
            return ce
    mask = None if labels is None else labels != ignore_index
    soft = temperature * temperature * _masked_mean(soft_per_position, mask)
    return soft if ce is None else alpha * soft + (1.0 - alpha) * ce


def _check_labels(student_logits, labels, alpha, ignore_index=-100):
    if labels is None:
        if alpha < 1.0:
            raise TrainingError(f"alpha={alpha} < 1 mixes in the cross-entropy on the labels; "
                                "pass labels (or alpha=1 for the soft term only)")
        return
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TrainingError(f"labels must be integer token ids, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise TrainingError(f"labels {tuple(labels.shape)} must have the logits' shape without "
                            f"the vocabulary dimension, {tuple(student_logits.shape[:-1])}")
    real = labels[labels != ignore_index]
    V = student_logits.shape[-1]
    if real.numel():
        lo, hi = torch.stack(torch.aminmax(real)).tolist()  # one host sync for both
        if lo < 0 or hi >= V:
            raise TrainingError(f"labels hold token id {hi if hi >= V else lo}, outside the vocabulary "
                                f"of the logits (0..{V - 1}; {ignore_index} marks ignored positions)")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: torch.Tensor | None = None, *, temperature: float = 2.0, alpha: float = 0.5,
            kind: str = "forward", ignore_index: int = -100) -> torch.Tensor:
    """The distillation loss of Hinton et al. (2015), a scalar in float32.

    student_logits, teacher_logits: (..., V), same shape. labels: (...) the
    real next tokens (needed when alpha < 1); positions whose label is
    ``ignore_index`` are left out of both terms (with labels None every
    position counts).

    ``loss = alpha * soft + (1 - alpha) * CE(student_logits, labels)`` with
    ``soft = T^2 * mean over positions of KL`` between the two distributions
    softened at temperature T (:func:`soft_targets`):
    ``kind="forward"`` KL(p_teacher,T || p_student,T) (mean-seeking: the
    student must cover all of the teacher's mass), ``kind="reverse"``
    KL(p_student,T || p_teacher,T) (mode-seeking).

    Why T^2: the gradient of the soft term with respect to a student logit
    is ``(p_student,T - p_teacher,T) / T``, and for large T the probability
    difference itself shrinks like ``(z_s - z_t) / T`` (softmax(z / T) is
    nearly linear in z / T), so the gradient scales as 1/T^2. Multiplying by
    T^2 keeps the soft term's gradients the same size whatever T is, so the
    balance alpha sets between the soft term and the cross-entropy (whose
    gradients do not depend on T) stays the same when T is changed.

    alpha=1: the soft term only (labels not needed); alpha=0: the plain
    cross-entropy. Raises TrainingError for T <= 0, alpha outside [0, 1],
    an unknown kind, logits of different shapes, alpha < 1 without labels.
    """
    _check_kd_args(temperature, alpha, kind)
    if tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise TrainingError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                            f"{tuple(teacher_logits.shape)} differ (distillation over logits "
                            "needs the same vocabulary)")
    _check_labels(student_logits, labels, alpha, ignore_index)
    if alpha == 0.0:
        return _combine(student_logits, None, labels, temperature, alpha, ignore_index)
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = _kl(log_t, log_s) if kind == "forward" else _kl(log_s, log_t)
    return _combine(student_logits, kl, labels, temperature, alpha, ignore_index)


def kd_loss_topk(student_logits: torch.Tensor, teacher_values: torch.Tensor,
                 teacher_indices: torch.Tensor, labels: torch.Tensor | None = None, *,
                 temperature: float = 2.0, alpha: float = 0.5, kind: str = "forward",
                 ignore_index: int = -100) -> torch.Tensor:
    """:func:`kd_loss` from the teacher's top-k logits only (``teacher_values``,
    ``teacher_indices``: (..., k), e.g. from a :class:`TeacherCache`).

    The approximation: the teacher's distribution is its top-k logits
    renormalised at temperature T over those k classes (the mass it gives the
    other V - k tokens, usually tiny, is dropped). ``kind="forward"``: the KL
    over those k classes against the student's log-softmax over the **full**
    vocabulary gathered at the same indices (so the student is still pushed
    to move mass from the other tokens onto the teacher's top k).
    ``kind="reverse"``: KL(student || teacher) with the student also
    renormalised over the k classes (the student's mass outside the teacher's
    top k is not penalised by the soft term; the cross-entropy still sees it).
    With k = V both are exactly :func:`kd_loss`.
    """
    _check_kd_args(temperature, alpha, kind)
    if tuple(teacher_values.shape) != tuple(teacher_indices.shape) \
            or tuple(teacher_values.shape[:-1]) != tuple(student_logits.shape[:-1]):
        raise TrainingError(f"top-k values {tuple(teacher_values.shape)} and indices "
                            f"{tuple(teacher_indices.shape)} must be the student logits' shape "
                            f"{tuple(student_logits.shape)} with k classes")
    _check_labels(student_logits, labels, alpha, ignore_index)
    if alpha == 0.0:
        return _combine(student_logits, None, labels, temperature, alpha, ignore_index)
    idx = teacher_indices.long()
    log_t = torch.log_softmax(teacher_values.detach().float() / temperature, dim=-1)
    s = student_logits.float() / temperature
    if kind == "forward":
        log_s = torch.log_softmax(s, dim=-1).gather(-1, idx)
        kl = _kl(log_t, log_s)
    else:
        log_s = torch.log_softmax(s.gather(-1, idx), dim=-1)
        kl = _kl(log_s, log_t)
    return _combine(student_logits, kl, labels, temperature, alpha, ignore_index)


# ------------------------------------------------------------------ hidden states
class HiddenDistiller(nn.Module):
    """Hidden-state distillation: the output of student layer i is projected
    to the teacher's width and pulled towards the output of teacher layer
    ``layer_map[i]`` with an MSE.

    layer_map: {student layer: teacher layer}; default: evenly spaced, student
    layer i -> teacher layer ``round((i + 1) * L_t / L_s) - 1`` (the last onto
    the last). One learned ``nn.Linear(student_hidden, teacher_hidden,
    bias=False)`` per pair (``projections[str(i)]``), on the student's device,
    float32.

    The projections are this module's **only** parameters (the student and
    the teacher are referenced, not registered as submodules), so they must
    be optimised together with the student: :func:`distill` does it (it
    trains a :class:`StudentWithProjections` wrapper); with
    :func:`llmopt_lab.training.train` directly, train
    ``StudentWithProjections(student, distiller)`` with
    :func:`distill_loss_fn` (..., hidden=distiller).

    The layer outputs are captured with forward hooks, only while
    :meth:`capture` is active (other forwards of the models are not
    affected); the teacher's are detached. ``close()`` (or leaving a
    ``with`` block) removes the hooks. The MSE is on the raw residual stream,
    so its size follows the teacher's hidden-state scale (about 4e-3 for a
    random-init model, far larger for a trained one): size ``hidden_weight``
    in :func:`distill` against the KD loss accordingly. Raises TrainingError for a model
    without ``layers`` or a layer index out of range.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 layer_map: dict[int, int] | None = None, seed: int = 0):
        super().__init__()
        for name, m in (("student", student), ("teacher", teacher)):
            if not isinstance(getattr(m, "layers", None), (nn.ModuleList, list)) or not len(m.layers):
                raise TrainingError(f"the {name} has no decoder layers (model.layers)")
        if student is teacher:
            raise TrainingError("the student and the teacher must be different models")
        ns, nt = len(student.layers), len(teacher.layers)
        if layer_map is None:
            layer_map = {i: max(0, round((i + 1) * nt / ns) - 1) for i in range(ns)}
        if not isinstance(layer_map, dict) or not layer_map:
            raise TrainingError(f"layer_map must be a non-empty dict {{student layer: teacher "
                                f"layer}}, got {layer_map!r}")
        for i, j in layer_map.items():
            if not (isinstance(i, int) and isinstance(j, int) and 0 <= i < ns and 0 <= j < nt):
                raise TrainingError(f"layer_map entry {i!r}: {j!r} is out of range (student has "
                                    f"{ns} layers, teacher {nt})")
        self.layer_map = dict(sorted(layer_map.items()))
        self._models = (student, teacher)  # a tuple: not registered, not optimised
        hs, ht = _hidden_size(student), _hidden_size(teacher)
        dev = _device(student)
        g = torch.Generator().manual_seed(seed)
        self.projections = nn.ModuleDict()
        for i in self.layer_map:
            proj = nn.Linear(hs, ht, bias=False, device=dev, dtype=torch.float32)
            with torch.no_grad():
                bound = 1.0 / math.sqrt(hs)
                proj.weight.copy_(torch.empty(ht, hs).uniform_(-bound, bound, generator=g))
            self.projections[str(i)] = proj
        self._capturing = False
        self._student_out: dict[int, torch.Tensor] = {}
        self._teacher_out: dict[int, torch.Tensor] = {}
        self._handles = []
        for i, j in self.layer_map.items():
            hook = self._hook(self._student_out, i, False)
            self._handles.append(student.layers[i].register_forward_hook(hook))
        for j in sorted(set(self.layer_map.values())):
            hook = self._hook(self._teacher_out, j, True)
            self._handles.append(teacher.layers[j].register_forward_hook(hook))

    @property
    def student(self) -> nn.Module:
        return self._models[0]

    @property
    def teacher(self) -> nn.Module:
        return self._models[1]

    def _hook(self, store: dict, idx: int, detach: bool):
        def hook(module, inputs, output):
            if self._capturing:
                out = output[0] if isinstance(output, tuple) else output
                store[idx] = out.detach() if detach else out
        return hook

    def capture(self):
        """Context manager: record the mapped layers' outputs of the forwards
        run inside it (then read by :meth:`captured_loss`)."""
        distiller = self

        class _Capture:
            def __enter__(self):
                distiller._student_out.clear()
                distiller._teacher_out.clear()
                distiller._capturing = True
                return distiller

            def __exit__(self, *exc):
                distiller._capturing = False
                return False

        return _Capture()

    def captured_loss(self) -> torch.Tensor:
        """Mean over the mapped pairs of MSE(proj(h_student), h_teacher) of
        the last captured forwards (float32); clears what was captured.
        Raises TrainingError when a layer's output was not captured."""
        missing = [i for i in self.layer_map if i not in self._student_out] + \
                  [j for j in set(self.layer_map.values()) if j not in self._teacher_out]
        if missing:
            raise TrainingError("run the student and the teacher inside HiddenDistiller.capture() "
                                "before captured_loss()")
        terms = []
        for i, j in self.layer_map.items():
            h_s = self._student_out[i].float()
            h_t = self._teacher_out[j].to(h_s.device).float()
            pred = self.projections[str(i)](h_s).float()
            terms.append(F.mse_loss(pred, h_t))
        self._student_out.clear()
        self._teacher_out.clear()
        return torch.stack(terms).mean()

    def loss(self, student: nn.Module, teacher: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """The hidden-state loss of a (B, T) token batch: runs both models
        (the teacher without gradients) and returns :meth:`captured_loss`.
        Raises TrainingError for models other than the ones it hooks."""
        self._check_models(student, teacher)
        with self.capture():
            student(batch.to(_device(student)))
            with torch.no_grad():
                teacher(batch.to(_device(teacher)))
        return self.captured_loss()

    def _check_models(self, student, teacher) -> None:
        if student is not self.student or teacher is not self.teacher:
            raise TrainingError("this HiddenDistiller was built for another student/teacher pair")

    def close(self) -> None:
        """Remove the forward hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._capturing = False

    def __enter__(self) -> "HiddenDistiller":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    raise TrainingError(f"cannot tell the hidden size of {type(model).__name__} (no config)")


class StudentWithProjections(nn.Module):
    """What :func:`distill` trains when it distils hidden states: the student
    and the :class:`HiddenDistiller`'s projections as submodules, so that
    :func:`llmopt_lab.training.train` (which optimises ``model.parameters()``,
    clips their gradients and checkpoints ``model.state_dict()``) covers
    both. ``forward`` is the student's."""

    def __init__(self, student: nn.Module, hidden: HiddenDistiller):
        super().__init__()
        self.student = student
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return self.student(*args, **kwargs)


# ------------------------------------------------------------------ teacher cache
class TeacherCache:
    """The teacher's logits of a fixed list of token batches, computed once.

    ``TeacherCache.build(teacher, batches, topk=64)``: for each (B, T + 1)
    batch the teacher runs once (no gradients, eval mode) on ``batch[:, :-1]``
    (the inputs :func:`distill_loss_fn` feeds the student) and the cache keeps,
    on the CPU, either its full logits (``topk=None``; float16, (B, T, V)) or
    its top-k logits (float16) and their indices (int32), (B, T, k).
    ``cache[i]`` is a dict ``{"tokens", "teacher_logits"}`` or ``{"tokens",
    "teacher_values", "teacher_indices"}`` that :func:`distill_loss_fn` uses
    instead of running the teacher (train moves it to the student's device).
    The top-k soft term is an approximation: see :func:`kd_loss_topk`.

    ``nbytes``: the bytes of the cached teacher outputs (logits, or values +
    indices); the token batches, which are the training data anyway, are
    not counted (``tokens_nbytes``).
    """

    def __init__(self, tokens: list[torch.Tensor], vocab_size: int, topk: int | None,
                 logits: list[torch.Tensor] | None = None, values: list[torch.Tensor] | None = None,
                 indices: list[torch.Tensor] | None = None):
        self.tokens = tokens
        self.vocab_size = vocab_size
        self.topk = topk
        self.logits = logits
        self.values = values
        self.indices = indices

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, batches: Sequence[torch.Tensor],
              topk: int | None = 64) -> "TeacherCache":
        """Run ``teacher`` once on each batch and keep its logits (see the
        class doc). Raises TrainingError for an empty list, a batch that is
        not a (B, T + 1) integer tensor with T >= 1, or a topk outside
        [1, vocab size]."""
        vocab = _vocab_size(teacher)
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int)
                                 or not 1 <= topk <= vocab):
            raise TrainingError(f"topk must be None or an integer in [1, {vocab}], got {topk!r}")
        batches = list(batches)
        if not batches:
            raise TrainingError("TeacherCache.build needs at least one batch")
        dev = _device(teacher)
        was_training = teacher.training
        teacher.eval()
        tokens, logits, values, indices = [], [], [], []
        try:
            for b in batches:
                if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[1] < 2 \
                        or b.dtype.is_floating_point:
                    raise TrainingError("each batch must be a (B, T + 1) integer token tensor "
                                        f"with T >= 1, got {getattr(b, 'shape', type(b))}")
                tokens.append(b.detach().long().cpu())
                out = teacher(b[:, :-1].to(dev)).float()
                if topk is None:
                    logits.append(out.half().cpu())
                else:
                    v, i = out.topk(topk, dim=-1)
                    values.append(v.half().cpu())
                    indices.append(i.to(torch.int32).cpu())
        finally:
            teacher.train(was_training)
        if topk is None:
            return cls(tokens, vocab, None, logits=logits)
        return cls(tokens, vocab, topk, values=values, indices=indices)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        if self.topk is None:
            return {"tokens": self.tokens[i], "teacher_logits": self.logits[i]}
        return {"tokens": self.tokens[i], "teacher_values": self.values[i],
                "teacher_indices": self.indices[i]}

    @property
    def nbytes(self) -> int:
        parts = self.logits if self.topk is None else self.values + self.indices
        return sum(t.numel() * t.element_size() for t in parts)

    @property
    def tokens_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tokens)


# ------------------------------------------------------------------ the LM loss for train
def distill_loss_fn(teacher: nn.Module, *, temperature: float = 2.0, alpha: float = 0.5,
                    kind: str = "forward", hidden: HiddenDistiller | None = None,
                    hidden_weight: float = 1.0) -> Callable[[nn.Module, Any], torch.Tensor]:
    """``loss_fn(model, batch)`` for :func:`llmopt_lab.training.train`:
    :func:`kd_loss` of the model's next-token logits against the teacher's.

    batch: a (B, T + 1) token tensor (inputs ``batch[:, :-1]``, labels the
    next tokens ``batch[:, 1:]``, as :func:`~llmopt_lab.training.lm_loss`),
    or a :class:`TeacherCache` item (a dict with the tokens and the cached
    teacher logits: the teacher is then not run). The teacher otherwise runs
    under ``torch.no_grad()`` in eval mode, on its own device. model: the
    student, or a :class:`StudentWithProjections`. With ``hidden`` (a
    :class:`HiddenDistiller` for these models) ``hidden_weight x`` its MSE is
    added (it needs the teacher's layers: not with cached batches).

    The returned function keeps the parts of each call's loss in
    ``loss_fn.history`` ({"kd": [...], "hidden": [...]}, floats).
    """
    _check_kd_args(temperature, alpha, kind)
    if hidden is not None and not isinstance(hidden, HiddenDistiller):
        raise TrainingError(f"hidden must be a HiddenDistiller or None, got {type(hidden).__name__}")
    if isinstance(hidden_weight, bool) or not isinstance(hidden_weight, (int, float)) \
            or not hidden_weight >= 0:
        raise TrainingError(f"hidden_weight must be a number >= 0, got {hidden_weight!r}")
    history: dict[str, list[float]] = {"kd": [], "hidden": []}

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        student = model.student if isinstance(model, StudentWithProjections) else model
        cached = isinstance(batch, dict)
        tokens = batch["tokens"] if cached else batch
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
            raise TrainingError("a distillation batch must be a (B, T + 1) token tensor "
                                f"(or a TeacherCache item), got {getattr(tokens, 'shape', type(tokens))}")
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise TrainingError(f"a distillation batch must hold integer token ids, got {tokens.dtype}")
        vocab = getattr(getattr(student, "config", None), "vocab_size", None)
        lo, hi = torch.stack(torch.aminmax(tokens)).tolist()  # one host sync for both
        if vocab is not None and (lo < 0 or hi >= vocab):
            raise TrainingError(f"a distillation batch holds token id {hi if hi >= vocab else lo}, "
                                f"outside the vocabulary (0..{vocab - 1}); was it made by another "
                                "tokenizer?")
        s_dev = _device(student)
        tokens = tokens.to(s_dev)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        if cached and hidden is not None:
            raise TrainingError("hidden-state distillation needs the teacher's layers; "
                                "a TeacherCache holds logits only")
        if hidden is not None:
            hidden._check_models(student, teacher)
            with hidden.capture():
                s_logits = student(inputs)
                t_logits = _run_teacher(teacher, inputs)
            h_loss = hidden.captured_loss()
        else:
            s_logits = student(inputs)
            t_logits = None if cached else _run_teacher(teacher, inputs)
        lab = labels if alpha < 1.0 else None
        kw = dict(temperature=temperature, alpha=alpha, kind=kind)
        if not cached:
            loss = kd_loss(s_logits, t_logits.to(s_dev), lab, **kw)
        elif "teacher_logits" in batch:
            loss = kd_loss(s_logits, batch["teacher_logits"].to(s_dev), lab, **kw)
        else:
            loss = kd_loss_topk(s_logits, batch["teacher_values"].to(s_dev),
                                batch["teacher_indices"].to(s_dev), lab, **kw)
        history["kd"].append(loss.item())
        if hidden is not None:
            history["hidden"].append(h_loss.item())
            loss = loss + hidden_weight * h_loss
        return loss

    loss_fn.history = history
    return loss_fn


def _run_teacher(teacher: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    if teacher.training:
        teacher.eval()
    with torch.no_grad():
        return teacher(inputs.to(_device(teacher)))


# ------------------------------------------------------------------ sequence-level
@torch.no_grad()
def teacher_sequences(teacher: nn.Module, prompts: list[list[int]], new_tokens: int, *,
                      temperature: float = 0.0, seed: int = 0,
                      batch_size: int = 32) -> list[list[int]]:
    """Sequence-level distillation data (Kim & Rush 2016): each prompt followed
    by the teacher's own continuation of up to ``new_tokens`` tokens
    (:func:`llmopt_lab.generate.generate`; greedy at temperature 0, else
    sampled, reproducible for ``seed``: prompt i uses seed + i; a sequence
    stops early at EOS). Prompts are generated ``batch_size`` at a time.
    Train the student on them with the plain next-token loss
    (:func:`sequence_batches`, then ``train(..., loss_fn=lm_loss)``).
    Raises TrainingError for no prompts, prompts that are not lists of
    integer token ids (text), or new_tokens < 1; GenerationError for ids
    outside the teacher's vocabulary."""
    from .generate import generate, token_id_lists

    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TrainingError("teacher_sequences needs a non-empty list of prompts (lists of token ids)")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise TrainingError(f"new_tokens must be a positive integer, got {new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TrainingError(f"batch_size must be a positive integer, got {batch_size!r}")
    prompts = token_id_lists(prompts, TrainingError)
    was_training = teacher.training
    teacher.eval()
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            gen = generate(teacher, chunk, new_tokens, temperature=temperature, seed=seed + start)
            out.extend(p + g for p, g in zip(chunk, gen.tolist()))
    finally:
        teacher.train(was_training)
    return out


def sequence_batches(sequences: Sequence[Sequence[int]], batch_size: int, seq_len: int,
                     separator: int | None = None) -> list[torch.Tensor]:
    """Cut token sequences into (batch_size, seq_len) int64 batches for
    :func:`~llmopt_lab.training.lm_loss`: the sequences are joined in order
    into one stream (with ``separator``, e.g. the EOS id, between them when
    given), cut into consecutive windows of ``seq_len`` tokens (a last
    partial window is dropped), and grouped ``batch_size`` windows at a time
    (the last batch may have fewer rows). Raises TrainingError when there
    is not one full window."""
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TrainingError(f"{name} must be a positive integer, got {v!r}")
    stream: list[int] = []
    for i, s in enumerate(sequences):
        if i and separator is not None:
            stream.append(int(separator))
        stream.extend(int(t) for t in s)
    n = len(stream) // seq_len
    if n == 0:
        raise TrainingError(f"the sequences hold {len(stream)} tokens, fewer than one window "
                            f"of seq_len={seq_len}")
    windows = torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)
    return list(windows.split(batch_size))


# ------------------------------------------------------------------ the driver
def distill(student: nn.Module, teacher: nn.Module, batches, settings: TrainSettings, *,
            temperature: float = 2.0, alpha: float = 0.5, kind: str = "forward",
            hidden: HiddenDistiller | None = None, hidden_weight: float = 1.0,
            cache: TeacherCache | None = None, evaluate: Callable[[nn.Module], dict] | None = None,
            progress: bool = False) -> dict:
    """Distil ``teacher`` into ``student`` (trained in place) with
    :func:`llmopt_lab.training.train` and :func:`distill_loss_fn`; returns
    train's log, plus ``kd_loss`` (and ``hidden_loss`` with ``hidden``): the
    parts of the loss of each micro-batch.

    batches: ``batches(i) -> (B, T + 1)`` token tensor for micro-batch i (as
    for ``train``), or a list of them (cycled). cache: a :class:`TeacherCache`
    instead (then ``batches`` is None and micro-batch i is
    ``cache[i % len(cache)]``; the teacher is not run). hidden: a
    :class:`HiddenDistiller` built for these two models; its projections are
    trained with the student (through a :class:`StudentWithProjections`
    wrapper), ``hidden_weight x`` its MSE is added to the loss; its hooks stay
    (``hidden.close()`` when done). evaluate: ``evaluate(student) -> dict``.
    The teacher is left unchanged (no gradients; it runs in eval mode; its
    train/eval mode is restored at the end).

    Raises TrainingError for temperature <= 0, alpha outside [0, 1], an
    unknown kind, teacher and student with different vocabulary sizes
    (distillation over logits needs the same vocabulary), a student that
    shares trainable parameters with the teacher (shared frozen ones are
    fine), a ``hidden`` built for other models,
    ``cache`` together with ``batches`` or ``hidden``, or a cache of another
    vocabulary.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TrainingError("distill needs the student and the teacher as nn.Modules")
    _check_kd_args(temperature, alpha, kind)
    vs, vt = _vocab_size(student), _vocab_size(teacher)
    if vs != vt:
        raise TrainingError(f"the student's vocabulary ({vs}) differs from the teacher's ({vt}); "
                            "distillation over logits needs the same vocabulary (tokenizer)")
    teacher_ids = {id(p) for p in teacher.parameters()}
    if student is teacher or any(id(p) in teacher_ids for p in student.parameters() if p.requires_grad):
        raise TrainingError("the student shares trainable parameters with the teacher; distil "
                            "into a separate model (e.g. a copy.deepcopy)")
    if hidden is not None:
        if not isinstance(hidden, HiddenDistiller):
            raise TrainingError(f"hidden must be a HiddenDistiller, got {type(hidden).__name__}")
        if hidden.student is not student or hidden.teacher is not teacher:
            raise TrainingError("hidden (a HiddenDistiller) was built for another student/teacher "
                                "pair; build it as HiddenDistiller(student, teacher)")
        if not hidden._handles:
            raise TrainingError("hidden was closed (its hooks are removed); build a new one")
    if cache is not None:
        if not isinstance(cache, TeacherCache):
            raise TrainingError(f"cache must be a TeacherCache, got {type(cache).__name__}")
        if batches is not None:
            raise TrainingError("give batches or a cache, not both (the cache holds its batches)")
        if hidden is not None:
            raise TrainingError("hidden-state distillation needs the teacher's layers; "
                                "a TeacherCache holds logits only")
        if cache.vocab_size != vs:
            raise TrainingError(f"the cache holds logits over {cache.vocab_size} tokens, the "
                                f"student has {vs}")
        fetch = lambda i: cache[i % len(cache)]  # noqa: E731
    elif isinstance(batches, (list, tuple)):
        if not batches:
            raise TrainingError("batches is an empty list")
        data = list(batches)
        fetch = lambda i: data[i % len(data)]  # noqa: E731
    elif callable(batches):
        fetch = batches
    else:
        raise TrainingError("batches must be a callable batches(i) -> tokens, a list of token "
                            "batches, or None with a cache")
    if evaluate is not None and not callable(evaluate):
        raise TrainingError("evaluate must be a callable evaluate(student) -> dict, or None")
    loss_fn = distill_loss_fn(teacher, temperature=temperature, alpha=alpha, kind=kind,
                              hidden=hidden, hidden_weight=hidden_weight)
    model = StudentWithProjections(student, hidden) if hidden is not None else student
    run_eval = None if evaluate is None else (lambda m: evaluate(student))
    was_training = teacher.training
    teacher.eval()
    try:
        log = train(model, fetch, settings, loss_fn=loss_fn, evaluate=run_eval,
                    progress=progress, desc="distill")
    finally:
        teacher.train(was_training)
    log["kd_loss"] = list(loss_fn.history["kd"])
    if hidden is not None:
        log["hidden_loss"] = list(loss_fn.history["hidden"])
    return log


__all__ = ["KINDS", "soft_targets", "kd_loss", "kd_loss_topk", "HiddenDistiller",
           "StudentWithProjections", "TeacherCache", "distill_loss_fn", "teacher_sequences",
           "sequence_batches", "distill"]

"""Knowledge distillation (llmopt_lab.distill): kd_loss against hand
computations (the T^2 factor, forward and reverse KL, alpha, ignored
positions), the gradient scale, distill() with and without hidden states,
the teacher cache, sequence-level data, bad requests refused."""

import dataclasses
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from llmopt_lab import Transformer, generate, preset  # noqa: E402
from llmopt_lab.distill import (HiddenDistiller, StudentWithProjections, TeacherCache,  # noqa: E402
                                distill, distill_loss_fn, kd_loss, kd_loss_topk,
                                sequence_batches, soft_targets, teacher_sequences)
from llmopt_lab.errors import TrainingError  # noqa: E402
from llmopt_lab.training import TrainSettings  # noqa: E402

S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
T_ = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.5]])
LABELS = torch.tensor([1, 2])


def _softmax(row, temp):
    e = [math.exp(x / temp) for x in row]
    z = sum(e)
    return [x / z for x in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _hand_soft(temp, kind, rows=(0, 1)):
    kls = []
    for r in rows:
        ps, pt = _softmax(S[r].tolist(), temp), _softmax(T_[r].tolist(), temp)
        kls.append(_kl(pt, ps) if kind == "forward" else _kl(ps, pt))
    return temp * temp * sum(kls) / len(kls)


def _hand_ce(rows=(0, 1)):
    out = [-math.log(_softmax(S[r].tolist(), 1.0)[LABELS[r]]) for r in rows]
    return sum(out) / len(out)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_kd_loss_matches_the_hand_computation(kind):
    soft = _hand_soft(2.0, kind)
    got = kd_loss(S, T_, temperature=2.0, alpha=1.0, kind=kind)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(soft, rel=1e-5)
    # the T^2 factor is there: 4 x the mean plain KL at T=2
    plain = [_softmax(S[r].tolist(), 2.0) for r in (0, 1)], [_softmax(T_[r].tolist(), 2.0) for r in (0, 1)]
    kls = [_kl(t, s) if kind == "forward" else _kl(s, t) for s, t in zip(*plain)]
    assert got.item() == pytest.approx(4 * (kls[0] + kls[1]) / 2, rel=1e-5)
    mixed = kd_loss(S, T_, LABELS, temperature=2.0, alpha=0.3, kind=kind)
    assert mixed.item() == pytest.approx(0.3 * soft + 0.7 * _hand_ce(), rel=1e-5)


def test_forward_and_reverse_differ_and_t_squared_is_applied():
    fwd = kd_loss(S, T_, temperature=2.0, alpha=1.0, kind="forward").item()
    rev = kd_loss(S, T_, temperature=2.0, alpha=1.0, kind="reverse").item()
    assert abs(fwd - rev) > 1e-3
    plain_kl = sum(_kl(_softmax(T_[r].tolist(), 2.0), _softmax(S[r].tolist(), 2.0)) for r in (0, 1)) / 2
    assert fwd == pytest.approx(4.0 * plain_kl, rel=1e-5)


def test_alpha_extremes_and_ignored_positions():
    ce = torch.nn.functional.cross_entropy(S, LABELS)
    assert kd_loss(S, T_, LABELS, alpha=0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    assert kd_loss(S, T_, LABELS, alpha=0.0).item() == pytest.approx(_hand_ce(), rel=1e-5)
    assert kd_loss(S, T_, LABELS, alpha=1.0, temperature=2.0).item() == pytest.approx(
        _hand_soft(2.0, "forward"), rel=1e-5)
    # position 0 ignored: only row 1 counts, in both terms
    lab = torch.tensor([-100, 2])
    got = kd_loss(S, T_, lab, temperature=2.0, alpha=0.5).item()
    assert got == pytest.approx(0.5 * _hand_soft(2.0, "forward", rows=(1,)) + 0.5 * _hand_ce(rows=(1,)),
                                rel=1e-5)
    # extra leading dimensions are positions too
    got3 = kd_loss(S[None], T_[None], LABELS[None], temperature=2.0, alpha=0.5).item()
    assert got3 == pytest.approx(kd_loss(S, T_, LABELS, temperature=2.0, alpha=0.5).item(), rel=1e-6)


def test_soft_targets_flatten_with_temperature():
    p1, p4 = soft_targets(S, 1.0), soft_targets(S, 4.0)
    assert torch.allclose(p1.sum(-1), torch.ones(2)) and torch.allclose(p4.sum(-1), torch.ones(2))
    assert (p4.max(-1).values < p1.max(-1).values).all()
    assert p1[0].tolist() == pytest.approx(_softmax(S[0].tolist(), 1.0), rel=1e-5)


def test_t_squared_keeps_the_gradient_scale():
    g = torch.Generator().manual_seed(0)
    s0 = torch.randn(64, 50, generator=g)
    t = torch.randn(64, 50, generator=g)

    def grad_norm(temp, scaled):
        s = s0.clone().requires_grad_(True)
        loss = kd_loss(s, t, temperature=temp, alpha=1.0)
        if not scaled:
            loss = loss / temp ** 2
        loss.backward()
        return s.grad.norm().item()

    with_t2 = grad_norm(1.0, True) / grad_norm(4.0, True)
    without = grad_norm(1.0, False) / grad_norm(4.0, False)
    assert 0.5 < with_t2 < 2.0
    assert without == pytest.approx(16 * with_t2, rel=1e-4) and without > 8


# ------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def teacher():
    m = Transformer.from_config(preset("tiny"), seed=0)
    with torch.no_grad():  # sharper next-token distributions than a plain random init
        m.lm_head.weight.mul_(25.0)
    return m


def _student(seed=1):
    cfg = dataclasses.replace(preset("tiny"), num_layers=2, hidden_size=64, intermediate_size=128,
                              num_heads=2, num_kv_heads=1, head_dim=None)
    return Transformer.from_config(cfg, seed=seed)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 512, (4, 33), generator=g) for _ in range(4)]


def _kd_of(student, teacher, data, **kw):
    fn = distill_loss_fn(teacher, **kw)
    with torch.no_grad():
        return sum(fn(student, b).item() for b in data) / len(data)


def _teacher_state(teacher):
    return {k: v.clone() for k, v in teacher.state_dict().items()}


def test_distill_lowers_the_kd_loss_and_leaves_the_teacher_alone(teacher, data):
    student = _student()
    before_t = _teacher_state(teacher)
    kw = dict(temperature=2.0, alpha=0.5)
    before = _kd_of(student, teacher, data, **kw)
    log = distill(student, teacher, data, TrainSettings(steps=10, batch_size=4, seq_len=32, lr=1e-2,
                                                        eval_every=10), **kw)
    after = _kd_of(student, teacher, data, **kw)
    assert after < before - 0.05
    assert len(log["kd_loss"]) == 10 and log["heldout"] == []
    assert not student.training and not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before_t[k]) for k, v in teacher.state_dict().items())


def test_hidden_distillation_trains_the_projections(teacher, data):
    student = _student()
    before_t = _teacher_state(teacher)
    with HiddenDistiller(student, teacher) as hidden:
        assert hidden.layer_map == {0: 1, 1: 3}
        assert [n for n, _ in hidden.named_parameters()] == ["projections.0.weight", "projections.1.weight"]
        assert hidden.projections["0"].weight.shape == (128, 64)
        proj0 = {k: p.detach().clone() for k, p in hidden.named_parameters()}
        h_before = sum(hidden.loss(student, teacher, b[:, :-1]).item() for b in data) / len(data)
        seen = {}
        evaluate = lambda m: seen.setdefault("model", m) and {}  # noqa: E731
        # the random teacher's hidden states are small (MSE ~4e-3): a large weight
        log = distill(student, teacher, lambda i: data[i % len(data)],
                      TrainSettings(steps=40, batch_size=4, seq_len=32, lr=5e-3, eval_every=40),
                      temperature=2.0, alpha=1.0, hidden=hidden, hidden_weight=1000.0,
                      evaluate=evaluate)
        assert seen["model"] is student  # evaluate sees the student, not the wrapper
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hidden.parameters())
        assert all(not torch.equal(p, proj0[k]) for k, p in hidden.named_parameters())
        h_after = sum(hidden.loss(student, teacher, b[:, :-1]).item() for b in data) / len(data)
        assert h_after < 0.8 * h_before
        assert len(log["hidden_loss"]) == 40 and log["kd_loss"][-1] < log["kd_loss"][0]
    assert hidden._handles == []  # closed: the hooks are gone
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before_t[k]) for k, v in teacher.state_dict().items())
    assert not any(k.startswith("projections") for k in student.state_dict())


def test_custom_layer_map_and_wrapper(teacher):
    student = _student()
    hidden = HiddenDistiller(student, teacher, layer_map={1: 2})
    wrapper = StudentWithProjections(student, hidden)
    names = {n for n, _ in wrapper.named_parameters()}
    assert "hidden.projections.1.weight" in names and not any(n.startswith("teacher") for n in names)
    assert len(names) == len(list(student.parameters())) + 1
    ids = torch.randint(0, 512, (2, 8))
    assert torch.equal(wrapper(ids), student(ids))
    hidden.close()


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_cache_with_the_whole_vocabulary_is_exact(data, kind):
    # a plain random teacher: logits small enough that float16 storage loses < 1e-4
    teacher = Transformer.from_config(preset("tiny"), seed=0)
    student = _student()
    cache = TeacherCache.build(teacher, data, topk=512)
    full = TeacherCache.build(teacher, data, topk=None)
    fn = distill_loss_fn(teacher, temperature=2.0, alpha=0.5, kind=kind)
    with torch.no_grad():
        for i, b in enumerate(data):
            ref = fn(student, b).item()
            assert fn(student, cache[i]).item() == pytest.approx(ref, abs=1e-4)
            assert fn(student, full[i]).item() == pytest.approx(ref, abs=1e-4)


def test_cache_topk_is_close_and_counts_its_bytes(teacher, data):
    student = _student()
    cache = TeacherCache.build(teacher, data, topk=64)
    assert len(cache) == len(data)
    item = cache[0]
    assert item["teacher_values"].shape == (4, 32, 64) and item["teacher_values"].dtype == torch.float16
    assert item["teacher_indices"].dtype in (torch.int32, torch.int64)
    assert torch.equal(item["tokens"], data[0])
    n = len(data) * 4 * 32
    assert cache.nbytes == n * 64 * (2 + item["teacher_indices"].element_size())
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.values + cache.indices)
    full = TeacherCache.build(teacher, data[:1], topk=None)
    assert full.nbytes == 4 * 32 * 512 * 2 and full[0]["teacher_logits"].dtype == torch.float16
    fn = distill_loss_fn(teacher, temperature=1.0, alpha=1.0)
    with torch.no_grad():
        ref = fn(student, data[0]).item()
        approx = fn(student, cache[0]).item()
    assert approx == pytest.approx(ref, rel=0.15)
    # kd_loss_topk with k = V from exact float32 logits equals kd_loss
    s, t = torch.randn(3, 5, 20), torch.randn(3, 5, 20)
    v, i = t.topk(20, dim=-1)
    for kind in ("forward", "reverse"):
        assert kd_loss_topk(s, v, i, alpha=1.0, kind=kind).item() == pytest.approx(
            kd_loss(s, t, alpha=1.0, kind=kind).item(), rel=1e-5)


def test_distill_from_a_cache_never_runs_the_teacher(teacher, data):
    student = _student()
    cache = TeacherCache.build(teacher, data, topk=64)
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        before = sum(distill_loss_fn(teacher, temperature=2.0, alpha=0.5)(student, cache[i]).item()
                     for i in range(len(cache)))
        distill(student, teacher, None, TrainSettings(steps=8, batch_size=4, seq_len=32, lr=1e-2),
                cache=cache)
        after = sum(distill_loss_fn(teacher, temperature=2.0, alpha=0.5)(student, cache[i]).item()
                    for i in range(len(cache)))
    finally:
        handle.remove()
    assert calls == [] and after < before


def test_teacher_sequences_are_the_teachers_generations(teacher):
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11]]
    seqs = teacher_sequences(teacher, prompts, 6)
    gen = generate(teacher, prompts, 6).tolist()
    assert seqs == [p + g for p, g in zip(prompts, gen)]
    # chunked generation gives the same sequences
    assert teacher_sequences(teacher, prompts, 6, batch_size=1) == seqs
    sampled = teacher_sequences(teacher, prompts, 6, temperature=1.0, seed=3)
    assert sampled == teacher_sequences(teacher, prompts, 6, temperature=1.0, seed=3)
    batches = sequence_batches([list(range(10)), list(range(10, 25))], batch_size=2, seq_len=4)
    assert [tuple(b.shape) for b in batches] == [(2, 4), (2, 4), (2, 4)]
    assert batches[0][0].tolist() == [0, 1, 2, 3] and batches[-1][-1].tolist() == [20, 21, 22, 23]
    assert batches[0].dtype == torch.long
    sep = sequence_batches([[1, 2], [3, 4]], batch_size=1, seq_len=5, separator=0)
    assert sep[0].tolist() == [[1, 2, 0, 3, 4]]


def test_bad_requests_are_refused(teacher, data):
    student = _student()
    s = TrainSettings(steps=1, batch_size=4, seq_len=32)
    with pytest.raises(TrainingError, match="temperature"):
        kd_loss(S, T_, temperature=0.0, alpha=1.0)
    with pytest.raises(TrainingError, match="alpha"):
        kd_loss(S, T_, LABELS, alpha=1.5)
    with pytest.raises(TrainingError, match="kind"):
        kd_loss(S, T_, alpha=1.0, kind="sideways")
    with pytest.raises(TrainingError, match="labels"):
        kd_loss(S, T_, alpha=0.5)
    with pytest.raises(TrainingError, match="same vocabulary"):
        kd_loss(S, T_[:, :2], alpha=1.0)
    with pytest.raises(TrainingError, match="temperature"):
        distill(student, teacher, data, s, temperature=-1.0)
    with pytest.raises(TrainingError, match="alpha"):
        distill(student, teacher, data, s, alpha=-0.1)
    with pytest.raises(TrainingError, match="kind"):
        distill(student, teacher, data, s, kind="both")
    other = Transformer.from_config(dataclasses.replace(preset("tiny"), vocab_size=256, num_layers=1))
    with pytest.raises(TrainingError, match="vocabulary"):
        distill(other, teacher, data, s)
    with pytest.raises(TrainingError, match="shares trainable parameters"):
        distill(teacher, teacher, data, s)
    hidden = HiddenDistiller(_student(), teacher)
    with pytest.raises(TrainingError, match="another student/teacher"):
        distill(student, teacher, data, s, hidden=hidden)
    hidden.close()
    with pytest.raises(TrainingError, match="out of range"):
        HiddenDistiller(student, teacher, layer_map={0: 9})
    cache = TeacherCache.build(teacher, data[:1], topk=8)
    with pytest.raises(TrainingError, match="not both"):
        distill(student, teacher, data, s, cache=cache)
    with pytest.raises(TrainingError, match="topk"):
        TeacherCache.build(teacher, data[:1], topk=0)
    with pytest.raises(TrainingError, match="new_tokens"):
        teacher_sequences(teacher, [[1, 2]], 0)
    with pytest.raises(TrainingError, match="fewer than one window"):
        sequence_batches([[1, 2, 3]], batch_size=1, seq_len=8)

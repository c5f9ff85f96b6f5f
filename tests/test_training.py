"""The training loop (llmopt_lab.training): it learns, it resumes exactly, it
refuses bad arguments, and its precision follows the device."""

import pytest
import torch

from llmopt_lab import Transformer, preset
from llmopt_lab.errors import LlmoptError, TrainingError, UnsupportedDtypeError
from llmopt_lab.training import (TrainSettings, autocast_plan, lm_loss, load_checkpoint,
                                 make_optimizer, train)


def _model():
    cfg = preset("tiny").replace(vocab_size=64, num_layers=1)
    return Transformer.from_config(cfg, seed=0)


def _batches():
    g = torch.Generator().manual_seed(0)
    fixed = torch.randint(0, 64, (4, 17), generator=g)  # (B, T + 1), the same every step
    return lambda step: fixed


def _settings(**kw):
    base = dict(steps=8, batch_size=4, seq_len=16, lr=3e-3, warmup_frac=0.25, eval_every=4)
    return TrainSettings(**{**base, **kw})


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    model, batches = _model(), _batches()
    with torch.no_grad():
        before = float(lm_loss(model, batches(0)))
    log = train(model, batches, _settings(), progress=False, log_every=1,
                evaluate=lambda m: {"loss": float(lm_loss(m, batches(0)))})
    assert log["heldout"][-1]["loss"] < before - 0.1
    assert [e["step"] for e in log["heldout"]] == [4, 8]
    assert log["heldout"][0]["tokens"] == 4 * 4 * 16
    assert len(log["train_loss"]) == 8 and log["precision"] == "fp32"
    assert not model.training


def test_pluggable_loss_and_grad_accumulation():
    calls = []

    def loss_fn(model, batch):  # e.g. a distillation loss: any (model, batch) -> scalar
        calls.append(batch.shape)
        return lm_loss(model, batch) * 0.5

    log = train(_model(), _batches(), _settings(steps=3, grad_accum=2), loss_fn=loss_fn,
                progress=False)
    assert len(calls) == 6 and log["train_loss"][-1][0] == 3


def test_resume_continues_exactly(tmp_path):
    s = _settings(steps=8, eval_every=3)
    ref_model = _model()
    ref = train(ref_model, _batches(), s, progress=False, log_every=1)

    ckpt = tmp_path / "run.ckpt"
    fixed = _batches()

    def interrupted(step):
        if step == 5:
            raise KeyboardInterrupt  # the run dies after the checkpoint of step 3
        return fixed(step)

    with pytest.raises(KeyboardInterrupt):
        train(_model(), interrupted, s, checkpoint=ckpt, progress=False, log_every=1)
    assert load_checkpoint(ckpt)["step"] == 3
    resumed_model = _model()  # fresh weights: everything comes from the checkpoint
    resumed = train(resumed_model, fixed, s, checkpoint=ckpt, resume=True, progress=False,
                    log_every=1)
    assert resumed["train_loss"] == ref["train_loss"]
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), n
    assert load_checkpoint(ckpt)["step"] == 8


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(TrainingError, match="steps must be a positive integer"):
        TrainSettings(steps=0)
    with pytest.raises(TrainingError, match="precision must be one of"):
        TrainSettings(precision="int8")
    with pytest.raises(TrainingError, match="warmup_frac"):
        TrainSettings(warmup_frac=2.0)
    with pytest.raises(TrainingError, match="resume=True needs a checkpoint"):
        train(_model(), _batches(), _settings(), resume=True, progress=False)
    with pytest.raises(TrainingError, match="must be a TrainSettings"):
        train(_model(), _batches(), {"steps": 3}, progress=False)
    with pytest.raises(TrainingError, match="scalar tensor"):
        train(_model(), _batches(), _settings(steps=1), loss_fn=lambda m, b: m(b), progress=False)
    bad = tmp_path / "bad.ckpt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(TrainingError, match="not a training checkpoint"):
        train(_model(), _batches(), _settings(), checkpoint=bad, resume=True, progress=False)
    other = tmp_path / "other.ckpt"
    big = Transformer.from_config(preset("tiny").replace(vocab_size=64, num_layers=2), seed=0)
    opt = make_optimizer(big, _settings())
    torch.save({"model": big.state_dict(), "optimizer": opt.state_dict(), "log": {}, "step": 1},
               other)
    with pytest.raises(TrainingError, match="does not fit this model"):
        train(_model(), _batches(), _settings(), checkpoint=other, resume=True, progress=False)
    assert issubclass(TrainingError, LlmoptError)


def test_precision_follows_the_device(monkeypatch):
    import llmopt_lab.training as T

    assert autocast_plan("fp32", "cpu").dtype is None
    assert autocast_plan("bf16", "cpu").dtype is torch.bfloat16
    monkeypatch.setattr(T, "native_bf16", lambda dev: True)
    assert autocast_plan("auto", "cpu").precision == "bf16"
    monkeypatch.setattr(T, "native_bf16", lambda dev: False)
    assert autocast_plan("auto", "cpu").precision == "fp32"
    plan = autocast_plan("auto", "cuda")  # a GPU without bf16: fp16 with a scaler
    assert plan.dtype is torch.float16 and plan.scaler
    with pytest.raises(UnsupportedDtypeError, match="fp16 training needs a CUDA GPU"):
        autocast_plan("fp16", "cpu")


def test_bf16_autocast_trains_on_cpu():
    log = train(_model(), _batches(), _settings(steps=2, precision="bf16"), progress=False)
    assert log["precision"] == "bf16" and log["train_loss"][-1][1] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_precision_trains_on_cuda():
    model = _model().cuda()
    log = train(model, _batches(), _settings(steps=4, precision="auto"), progress=False,
                log_every=1)
    assert log["precision"] in ("bf16", "fp16")
    assert log["train_loss"][-1][1] < log["train_loss"][0][1]

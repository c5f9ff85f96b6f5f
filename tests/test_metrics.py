"""The statistics shared by the lessons' benchmarks: bootstrap intervals."""

import math

import pytest
import torch

from llmopt_lab.errors import MeasureError
from llmopt_lab.measure.metrics import (bootstrap_interval, ppl_delta_interval, recovery_interval,
                                speedup_interval)


def test_bootstrap_intervals():
    g = torch.Generator().manual_seed(1)
    tokens = torch.full((400,), 100.0)
    ref = 300.0 + 20.0 * torch.randn(400, generator=g)  # per-window NLL sums (mean 3 nats/token)
    noise = 0.5 * torch.randn(400, generator=g)
    worse = ref + 1.0 + noise                           # +0.01 nats/token: ppl +1.005%
    half = ref + 0.5 + 0.5 * torch.randn(400, generator=g)
    full = ppl_delta_interval(ref, worse, tokens)
    assert full[0] < 100 * math.expm1(0.01) < full[1] and full[1] - full[0] < 0.2
    # paired: the spread of the windows' difficulty (20 nats) cancels
    assert ppl_delta_interval(ref, ref + 1.0, tokens) == pytest.approx((100 * math.expm1(0.01),) * 2)
    lo, hi = recovery_interval(ref, worse, half, tokens)
    assert lo < 0.5 < hi and hi - lo < 0.3
    lo, hi = recovery_interval(ref, worse, worse, tokens)
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(0.0, abs=1e-9)
    # fewer windows, a wider interval (about sqrt(400 / 25) = 4x); the level is honoured
    few = ppl_delta_interval(ref[:25], worse[:25], tokens[:25])
    assert few[1] - few[0] > 2.5 * (full[1] - full[0])
    x = torch.arange(1000.0)
    lo, hi = bootstrap_interval(lambda i: x[i[:, 0]], 1000, samples=20000, level=0.5)
    assert lo == pytest.approx(250, abs=25) and hi == pytest.approx(750, abs=25)
    with pytest.raises(MeasureError, match="at least 2"):
        bootstrap_interval(lambda i: i.float().mean(-1), 1)
    with pytest.raises(MeasureError, match="level"):
        bootstrap_interval(lambda i: i.float().mean(-1), 10, level=1.5)


def test_speedup_interval():
    g = torch.Generator().manual_seed(2)
    base_s = 1.0 + 0.05 * torch.rand(200, generator=g)
    tokens = torch.full((200,), 64)
    # every prompt exactly 1.5x faster: a point interval
    lo, hi = speedup_interval(base_s, tokens, base_s / 1.5, tokens)
    assert lo == pytest.approx(1.5) and hi == pytest.approx(1.5)
    # prompts that differ (some 1.2x, some 1.8x): an interval around the pooled ratio
    fast = torch.where(torch.arange(200) % 2 == 0, base_s / 1.2, base_s / 1.8)
    pooled = float(base_s.sum() / fast.sum())
    lo, hi = speedup_interval(base_s, tokens, fast, tokens)
    assert lo < pooled < hi and 0.02 < hi - lo < 0.2

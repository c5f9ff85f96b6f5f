"""Measuring: timers, memory, the device's limits, roofline costs, profiles,
results with their provenance, quality metrics and plots.

Every figure in the course goes through this package, so that all lessons
measure the same way. It works on whatever model or function it is given and
imports no technique; library code imports it only for its timer
(:func:`synchronize`). One module per concern:

* :mod:`~llmopt_lab.measure.timing`: :func:`time_fn`, :class:`Timing`,
  :func:`synchronize`, :class:`OperandRotation`, :func:`l2_cache_bytes`;
* :mod:`~llmopt_lab.measure.memory`: :func:`peak_memory`, :class:`MemoryUsage`;
* :mod:`~llmopt_lab.measure.device`: :func:`device_limits`, the GPU datasheet
  table, :func:`native_bf16`, :func:`fastest_dtype`, :func:`dtype_key`;
* :mod:`~llmopt_lab.measure.roofline`: :func:`step_cost` and the roofline;
* :mod:`~llmopt_lab.measure.profile`: :func:`profile_step`;
* :mod:`~llmopt_lab.measure.results`: :func:`provenance`, :func:`save_result`,
  :func:`load_results`;
* :mod:`~llmopt_lab.measure.metrics`: perplexity, KL, top-1 agreement,
  bootstrap intervals, serving statistics;
* :mod:`~llmopt_lab.measure.plots`: the course's standard figures (imported
  on its own, ``from llmopt_lab.measure import plots``: it needs matplotlib).

The public names of all but plots are re-exported here:
``from llmopt_lab import measure; measure.time_fn(fn)``.
"""

from .device import (DTYPE_KEYS, GPU_TABLE, DeviceLimits, GpuSpec, device_limits, dtype_key,
                     fastest_dtype, lookup_gpu, measure_bandwidth, measure_gemm_flops,
                     native_bf16, table_limits)
from .memory import MemoryUsage, peak_memory
from .metrics import (ServingStats, bootstrap_interval, kl_divergence, percentile,
                      perplexity_from_nll, position_kl, position_nll, ppl_delta_interval,
                      recovery, recovery_interval, serving_stats, speedup_interval,
                      token_nll, top1_agreement)
from .profile import OpRow, StepProfile, profile_step, quiet_profiler_logs
from .results import (default_results_root, device_name, device_slug, load_results, provenance,
                      save_result, user_results_root)
from .roofline import (StepCost, achieved_fraction, arithmetic_intensity, attainable_flops,
                       roofline_time, step_cost)
from .timing import OperandRotation, Timing, l2_cache_bytes, synchronize, time_fn

__all__ = [
    # timing
    "Timing", "time_fn", "synchronize", "l2_cache_bytes", "OperandRotation",
    # memory
    "MemoryUsage", "peak_memory",
    # device limits
    "DeviceLimits", "GpuSpec", "GPU_TABLE", "DTYPE_KEYS", "lookup_gpu", "device_limits", "table_limits",
    "measure_bandwidth", "measure_gemm_flops", "dtype_key", "native_bf16", "fastest_dtype",
    # roofline
    "StepCost", "step_cost", "arithmetic_intensity", "attainable_flops", "roofline_time",
    "achieved_fraction",
    # profiling
    "OpRow", "StepProfile", "profile_step", "quiet_profiler_logs",
    # provenance and results
    "provenance", "device_name", "device_slug", "save_result", "load_results",
    "default_results_root", "user_results_root",
    # metrics
    "position_nll", "token_nll", "perplexity_from_nll", "position_kl", "kl_divergence",
    "top1_agreement", "bootstrap_interval", "ppl_delta_interval", "recovery", "recovery_interval",
    "speedup_interval", "percentile", "ServingStats", "serving_stats",
]

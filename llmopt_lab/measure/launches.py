"""Launch accounting: how many kernels a step launches, and what that costs.

At batch 1 a decode step of a small model is a few hundred small kernels.
Each costs a roughly fixed launch overhead (Python, the dispatcher, the
driver: microseconds) on top of the time it takes to move its bytes, so a
first model of a step's time is

    t_step ~ launches x c_launch + bytes / bandwidth

(:class:`OverheadModel`). It predicts what the optimizations of lesson 09 can
gain: fusion removes launches *and* the bytes of intermediates that no
longer round-trip through memory; a CUDA graph keeps the launches but
replays them with a per-kernel cost of about a microsecond instead of the
eager launch cost; nothing removes the weights' bytes.

:func:`count_launches` counts them with ``torch.profiler``:

* on a GPU: the kernels (and copies) the device ran;
* on a CPU there are no kernels; it counts the *compute ops* each of which
  would be one kernel on a GPU (the outermost aten ops that are not views,
  reshapes, allocations or composite wrappers), plus each Triton kernel launch (our wrappers
  mark theirs with ``record_function("triton::<name>")``). This proxy is
  what the notebooks show on a CPU; on a GPU both are reported.
"""

from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import MeasureError
from .timing import _device, synchronize

__all__ = ["LaunchCount", "count_launches", "OverheadModel", "measure_launch_cost",
           "measure_copy_bandwidth", "NON_KERNEL_OPS"]

#: aten ops that launch no kernel: views, shape changes, allocations, metadata
NON_KERNEL_OPS = frozenset({
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::slice",
    "aten::select", "aten::transpose", "aten::t", "aten::expand", "aten::as_strided",
    "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::detach", "aten::alias",
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::lift_fresh",
    "aten::split", "aten::chunk", "aten::unbind", "aten::narrow", "aten::view_as",
    "aten::flatten", "aten::unflatten", "aten::contiguous", "aten::to", "aten::_to_copy_noop",
    "aten::result_type", "aten::is_nonzero", "aten::size", "aten::stride", "aten::dim",
    "aten::_has_compatible_shallow_copy_type", "aten::set_", "aten::split_with_sizes",
    "aten::expand_as", "aten::numpy_T", "aten::matrix_H", "aten::diagonal", "aten::unfold",
    "aten::_nested_tensor_from_mask_left_aligned", "aten::scalar_tensor", "aten::zeros_like_noop",
    "aten::lift", "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_split",
})

TRITON_PREFIX = "triton::"


@dataclass
class LaunchCount:
    """Kernel launches of one call.

    launches: kernels per call; by_name: launches per kernel or op name;
    source: "gpu kernels" (counted on the device) or "cpu compute ops" (the
    CPU proxy: leaf aten ops that are not views, plus Triton launches).
    """

    launches: float
    by_name: dict[str, float] = field(default_factory=dict)
    source: str = "cpu compute ops"

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        return sorted(self.by_name.items(), key=lambda kv: -kv[1])[:n]

    def table(self, n: int = 10) -> str:
        lines = [f"{'kernel or op':<52} {'per call':>8}"]
        lines += [f"{k[:52]:<52} {v:>8.1f}" for k, v in self.top(n)]
        return "\n".join(lines)


#: composite ops that only dispatch to the op doing the work: counted by
#: what they call (``aten::linear`` -> ``aten::mm``)
COMPOSITE_OPS = frozenset({"aten::linear", "aten::matmul", "aten::einsum",
                           "aten::scaled_dot_product_attention", "aten::dropout"})


def _count_tree(e, counts: collections.Counter) -> int:
    """Launches in the profiler event ``e`` and below it (CPU proxy). The
    top-most compute op counts once, whatever it calls inside (an add with a
    Python scalar wraps the scalar in a tensor first: still one kernel);
    views, allocations, non-aten ranges and composite wrappers count what
    they contain; a Triton range counts once."""
    if e.device_type != torch.autograd.DeviceType.CPU:
        return 0
    if e.name.startswith(TRITON_PREFIX):
        counts[e.name] += 1
        return 1
    compute = e.name.startswith("aten::") and e.name not in NON_KERNEL_OPS
    if compute and e.name not in COMPOSITE_OPS:
        counts[e.name] += 1
        return 1
    below = sum(_count_tree(c, counts) for c in e.cpu_children)
    if compute and not below:  # a composite that did the work itself
        counts[e.name] += 1
        return 1
    return below


def count_launches(fn: Callable[[], Any], *, calls: int = 3, warmup: int = 1,
                   device: Any = None) -> LaunchCount:
    """Count the kernels ``fn()`` launches per call (mean over ``calls``).

    On a CUDA device: every kernel, copy and memset the device ran. On a
    CPU: the compute-op proxy described in the module docstring (a Triton
    kernel under the interpreter counts once, not the numpy work inside it).
    ``fn`` must be repeatable; it runs ``warmup + calls`` times.
    """
    from torch.profiler import ProfilerActivity, profile

    from .profile import quiet_profiler_logs

    dev = _device(device)
    cuda = dev.type == "cuda"
    for _ in range(warmup):
        fn()
    synchronize(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with quiet_profiler_logs(), profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(dev)
    counts: collections.Counter = collections.Counter()
    if cuda:
        for e in prof.events():
            if e.device_type != torch.autograd.DeviceType.CPU:
                counts[e.name] += 1
    else:
        for e in prof.events():
            if e.cpu_parent is None:  # a root: walk its tree
                _count_tree(e, counts)
    by_name = {k: v / calls for k, v in counts.items()}
    return LaunchCount(launches=sum(by_name.values()), by_name=by_name,
                       source="gpu kernels" if cuda else "cpu compute ops")


def measure_launch_cost(device: Any = None, n: int = 2000, repeats: int = 5) -> float:
    """Seconds per launch of a trivial op (an in-place add on a 1-element
    tensor), issued back to back from Python: the eager per-launch cost
    ``c_launch`` of :class:`OverheadModel` (median of ``repeats`` rounds).
    On a GPU the kernels queue up asynchronously, so this is the CPU-side
    issue rate, which bounds an eager step when its kernels are tiny."""
    dev = _device(device)
    x = torch.zeros(1, device=dev)
    rounds = []
    for _ in range(repeats):
        synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1.0)
        synchronize(dev)
        rounds.append((time.perf_counter() - t0) / n)
    return statistics.median(rounds)


def measure_copy_bandwidth(device: Any = None, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second of a device-to-device copy of ``nbytes`` (read +
    write counted: 2 x nbytes per copy); the median of ``repeats``."""
    dev = _device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    rounds = []
    for _ in range(repeats):
        synchronize(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(dev)
        rounds.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(rounds)


@dataclass
class OverheadModel:
    """``t = launches x c_launch + bytes / bandwidth`` (seconds).

    c_launch: seconds per launch (eager: :func:`measure_launch_cost`; inside
    a CUDA graph about 1e-6); bandwidth: bytes per second
    (:func:`measure_copy_bandwidth` or the datasheet). The model is serial on
    purpose: on a GPU the CPU issues launches while earlier kernels run, so
    the truth lies between ``max`` of the two terms and their sum; the
    notebook compares both with the measurement.
    """

    c_launch: float
    bandwidth: float

    def __post_init__(self):
        if not (self.c_launch >= 0 and self.bandwidth > 0):
            raise MeasureError(f"c_launch must be >= 0 and bandwidth > 0, got {self.c_launch}, "
                             f"{self.bandwidth}")

    def predict(self, launches: float, nbytes: float) -> float:
        """Serial estimate: launch overhead plus memory time."""
        return launches * self.c_launch + nbytes / self.bandwidth

    def predict_overlapped(self, launches: float, nbytes: float) -> float:
        """Overlapped estimate: the larger of the two terms."""
        return max(launches * self.c_launch, nbytes / self.bandwidth)

    def launch_share(self, launches: float, nbytes: float) -> float:
        """Fraction of the serial estimate spent on launches (0..1)."""
        t = self.predict(launches, nbytes)
        return launches * self.c_launch / t if t else 0.0


def skeleton_config(config):
    """``config`` with every width shrunk to a few elements (head_dim 8,
    hidden = heads x 8, MLP width 16, vocabulary 64) but the same layers,
    heads and structure: a step of it launches the same kernels as the real
    model while moving almost no bytes, so its time is the launch overhead."""
    import dataclasses

    heads = config.num_heads
    return dataclasses.replace(config, name=f"{config.name}-skeleton", vocab_size=64,
                               hidden_size=heads * 8, head_dim=8, intermediate_size=16,
                               layer_intermediate_sizes=None, layer_num_heads=None,
                               tie_word_embeddings=False)


def skeleton_launch_cost(model, *, transform=None, graphs: bool = False, context: int = 32,
                         steps: int = 20, repeat: int = 5) -> dict:
    """Measure ``c_launch`` for :class:`OverheadModel` the way a decode step
    pays it: time a decode step of the *skeleton* of ``model``
    (:func:`skeleton_config`; same kernels, almost no bytes) and divide by
    its launches. Includes everything a launch costs in this code: Python,
    module calls, the dispatcher and the launch itself (on a GPU with
    ``graphs=True``: a CUDA-graph replay, where only the per-kernel cost on
    the device remains). ``transform``: applied to the skeleton first (e.g.
    :func:`llmopt_lab.transforms.fuse.fuse`). Returns a dict: c_launch_s,
    launches, step_s."""
    from ..model import Transformer
    from ..step import StepBuffers, host_step, run_step
    from ..cache import make_cache

    dev = model.device
    sk = Transformer.from_config(skeleton_config(model.config), device=dev, dtype=model.dtype)
    if transform is not None:
        sk = transform(sk)
    kv = make_cache("static", sk.config, 1, context + 1, device=dev, dtype=sk.dtype)
    run_step(sk, kv, host_step([[1] * context], [0], [[0]], kv.block_size, contiguous=True).to_step(dev))
    host = host_step([[2]], [context], [[0]], kv.block_size, contiguous=True)
    step = StepBuffers(1, 1, 1, dev).fill(host)
    fn = lambda: run_step(sk, kv, step)  # noqa: E731
    launches = count_launches(fn, calls=2, device=dev).launches
    if graphs:
        from ..graphs import GraphedDecoder

        dec = GraphedDecoder(sk, kv, max_batch=1, buckets=[1])
        dec.run(host)
        fn = dec.replay
    rounds = []
    from .timing import time_fn

    for _ in range(repeat):
        rounds.append(time_fn(fn, warmup=2, repeat=steps, device=dev).median)
    t = statistics.median(rounds)
    return dict(c_launch_s=t / launches, launches=launches, step_s=t)

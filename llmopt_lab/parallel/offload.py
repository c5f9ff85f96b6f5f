"""Offloading: decoder weights kept in (pinned) CPU memory and streamed to the
GPU one layer at a time, the next layer's copy overlapping this layer's
compute.

``offload(model, device, prefetch=True)`` leaves the embedding, final norm
and head on ``device`` and keeps every decoder layer's weights on the host.
Each layer is wrapped in a :class:`StreamedLayer`: before it runs, its
weights are copied to the device; with ``prefetch`` the copy of layer i + 1
is started on a side CUDA stream as soon as layer i has its weights, so
copy and compute overlap (after the last layer, layer 0 is prefetched for
the next step). Without prefetch every copy runs on the compute stream and
the GPU waits for it.

When does it pay? Per layer, copying takes ``bytes / B`` (B: host-to-device
bandwidth, ~25 GB/s over PCIe 4 x16, ~50 over PCIe 5) and computing
``2 params tokens / F`` (F: the device's FLOP/s). The copy hides behind the
compute when

    tokens >= bytes_per_param * F / (2 B)            (:func:`offload_cost`)

For bfloat16 weights on a GPU with F = 500 TFLOP/s and B = 50 GB/s that is
10,000 tokens per step: a long prefill hides the copies, decode (a few
tokens per step) waits for every byte. Offloading trades speed for fitting
at all.

On a CPU-only machine ``offload(model, "cpu")`` keeps the same structure
(every layer still goes through the streamer) but there is nothing to copy:
the cost model is what a CPU can teach.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
from torch.func import functional_call

from ..errors import ParallelError

__all__ = ["offload", "LayerStreamer", "StreamedLayer", "offload_cost", "is_offloaded",
           "measure_h2d_bandwidth", "time_offloaded_forward", "time_layer_compute"]


class LayerStreamer:
    """Host copies of the decoder layers' tensors and the copies in flight.

    ``get(i)`` returns layer i's tensors on the device (a name -> tensor
    dict), waiting for its copy; with prefetch it then starts copying layer
    i + 1 (mod the number of layers) on a side stream. ``bytes_copied`` and
    ``copies`` count what moved.

    Raises: nothing of its own (:func:`offload` raises ParallelError for a
    model or device it cannot use)."""

    def __init__(self, layers: nn.ModuleList, device: torch.device, prefetch: bool = True):
        self.device = torch.device(device)
        self.prefetch = prefetch
        pin = self.device.type == "cuda"
        self.host: list[dict[str, torch.Tensor]] = []
        for layer in layers:
            tensors = {}
            for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
                cpu = t.detach().to("cpu")
                tensors[name] = cpu.pin_memory() if pin else cpu
            self.host.append(tensors)
        self.stream = torch.cuda.Stream(self.device) if pin and prefetch else None
        self._inflight: dict[int, tuple[dict, object]] = {}
        self.bytes_copied = 0
        self.copies = 0

    def layer_bytes(self, i: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.host[i].values())

    def _start(self, i: int) -> None:
        if i in self._inflight:
            return
        src = self.host[i]
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                out = {n: t.to(self.device, non_blocking=True) for n, t in src.items()}
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            out = {n: t.to(self.device) for n, t in src.items()}
            event = None
        self.bytes_copied += self.layer_bytes(i) if self.device.type != "cpu" else 0
        self.copies += 1
        self._inflight[i] = (out, event)

    def get(self, i: int) -> dict[str, torch.Tensor]:
        self._start(i)
        out, event = self._inflight.pop(i)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in out.values():  # allocated on the side stream, used on this one
                t.record_stream(current)
        if self.prefetch:
            self._start((i + 1) % len(self.host))
        return out

    def drop_prefetched(self) -> None:
        """Forget copies in flight (after the weights changed on the host)."""
        self._inflight.clear()


class StreamedLayer(nn.Module):
    """A decoder layer whose weights live on the host: forward fetches them
    from the :class:`LayerStreamer` and runs the layer with them
    (``torch.func.functional_call``), arguments as DecoderLayer.forward.

    Raises: what DecoderLayer.forward raises (nothing of its own)."""

    def __init__(self, layer: nn.Module, index: int, streamer: LayerStreamer):
        super().__init__()
        self.layer = layer
        self.index = index
        self._streamer = [streamer]  # a list: not a submodule, not in state_dict

    @property
    def self_attn(self):
        return self.layer.self_attn

    @property
    def mlp(self):
        return self.layer.mlp

    def forward(self, *args):
        weights = self._streamer[0].get(self.index)
        return functional_call(self.layer, weights, args)


def is_offloaded(model) -> bool:
    """True for a model :func:`offload` has prepared. Raises: nothing."""
    return getattr(model, "offload_streamer", None) is not None


@torch.no_grad()
def offload(model, device=None, prefetch: bool = True):
    """Keep ``model``'s decoder layers on the host and stream them to
    ``device`` layer by layer (in place; returns the model). The embedding,
    final norm and head move to ``device``. ``model.offload_streamer`` is
    the :class:`LayerStreamer` (its ``bytes_copied`` says what moved).

    Generation, perplexity and the engine run unchanged on the result, with
    the same tokens. Raises ParallelError for a model already offloaded,
    one without decoder layers (not an llmopt_lab Transformer) or an unknown
    device.
    """
    if not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise ParallelError(f"offload takes an llmopt_lab Transformer (decoder layers in "
                            f"model.layers), got {type(model).__name__}")
    if is_offloaded(model):
        raise ParallelError("this model is already offloaded")
    try:
        device = torch.device(device if device is not None else
                              ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ParallelError(f"unknown device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParallelError("offload to CUDA needs a CUDA GPU; none is available here")
    layers = model.layers
    streamer = LayerStreamer(layers, device, prefetch)
    for name, module in model.named_children():
        if name != "layers":
            module.to(device)
    model.inv_freq = model.inv_freq.to(device)
    for layer in layers:  # the host copies are the streamer's; free the rest
        layer.to("cpu")
    model.layers = nn.ModuleList(StreamedLayer(layer, i, streamer) for i, layer in enumerate(layers))
    model.offload_streamer = streamer
    return model


def offload_cost(layer_params: int, bytes_per_param: float, tokens: int, h2d_bytes_per_s: float,
                 flops_per_s: float, num_layers: int = 1) -> dict:
    """The time of one step of ``tokens`` tokens through ``num_layers`` offloaded
    layers of ``layer_params`` parameters each.

    Per layer: copy = params x bytes / bandwidth; compute = 2 params tokens /
    FLOP/s. Synchronous copies add (copy + compute); prefetching overlaps
    them (max(copy, compute)). Returns seconds for both, the speed-up of
    prefetching, whether the copies hide (compute >= copy) and the break-even
    ``tokens`` (bytes_per_param x F / (2 B)).
    Raises ParallelError for non-positive inputs.
    """
    for name, v in (("layer_params", layer_params), ("bytes_per_param", bytes_per_param),
                    ("tokens", tokens), ("h2d_bytes_per_s", h2d_bytes_per_s),
                    ("flops_per_s", flops_per_s), ("num_layers", num_layers)):
        if not v > 0:
            raise ParallelError(f"{name} must be positive, got {v!r}")
    copy = layer_params * bytes_per_param / h2d_bytes_per_s
    compute = 2 * layer_params * tokens / flops_per_s
    sync, overlapped = num_layers * (copy + compute), num_layers * max(copy, compute)
    return {"copy_s": num_layers * copy, "compute_s": num_layers * compute,
            "sync_s": sync, "prefetch_s": overlapped, "prefetch_speedup": sync / overlapped,
            "copies_hidden": compute >= copy,
            "break_even_tokens": bytes_per_param * flops_per_s / (2 * h2d_bytes_per_s)}


def time_layer_compute(model, tokens: int, repeats: int = 5) -> float:
    """Median seconds one decoder layer of ``model`` takes on ``tokens``
    tokens (a plain forward without cache, on the model's device)."""
    from ..attention import AttentionMeta
    from ..model import rope_cos_sin

    layer = model.layers[0]
    dev, dt = model.device, model.dtype
    x = torch.randn(1, tokens, model.config.hidden_size, device=dev, dtype=dt)
    pos = torch.arange(tokens, device=dev)[None]
    meta = AttentionMeta(q_pos=pos, k_pos=pos, is_plain_causal=True)
    cos, sin = rope_cos_sin(model.inv_freq, pos, dt)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            layer(x, cos, sin, meta, None, model.attn_fn)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def measure_h2d_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a copy from pinned host memory to ``device``
    (median of ``repeats``). Raises ParallelError without CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ParallelError("host-to-device bandwidth is measured on a CUDA device")
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return nbytes / times[len(times) // 2]


@torch.inference_mode()
def time_offloaded_forward(model, tokens: int, repeats: int = 3) -> dict:
    """Median seconds of one forward of ``tokens`` tokens (batch 1, no KV
    cache) through an offloaded model, and the bytes its layers copied per
    forward. Raises ParallelError for a model that is not offloaded."""
    if not is_offloaded(model):
        raise ParallelError("time_offloaded_forward needs a model from offload()")
    streamer = model.offload_streamer
    dev = model.device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=dev)
    times = []
    for _ in range(repeats + 1):  # steady state: layer 0 was prefetched by the forward before
        copied = streamer.bytes_copied
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        model.hidden_states(ids)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
        per_forward = streamer.bytes_copied - copied
    times = sorted(times[1:])
    return {"seconds": times[len(times) // 2], "bytes": per_forward, "tokens": tokens}

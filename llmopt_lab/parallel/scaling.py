"""What tensor parallelism should buy: shard GEMM times plus an all-reduce model.

A decoder layer's matrix multiplies under TP degree p are the full ones
with N (column-parallel) or K (row-parallel) divided by p; two all-reduces
of (tokens, hidden) join them. So the time of one step is predicted as

    t_p = sum over GEMMs of t_gemm(M, N / p or N, K or K / p) + 2 L t_allreduce(M hidden bytes)

with ``t_gemm`` measured on this device (:func:`time_matmul`) and the
all-reduce modelled as ``latency + 2 (p - 1) / p bytes / bandwidth``
(:class:`AllReduceModel`: a ring, each rank sends and receives that share).
Attention, norms and element-wise work are left out (they split over the
heads too but are small at decode); the prediction is an upper bound on the
speed-up for that reason and because real GEMMs on thin shards run below
their full-size efficiency, which ``time_matmul`` captures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import ParallelError

__all__ = ["AllReduceModel", "layer_gemms", "time_matmul", "predict_tp_step"]


@dataclass
class AllReduceModel:
    """``seconds(nbytes, world) = latency_s + 2 (world - 1) / world x nbytes / bytes_per_s``."""

    latency_s: float
    bytes_per_s: float
    source: str = ""

    def seconds(self, nbytes: float, world: int) -> float:
        if world <= 1:
            return 0.0
        return self.latency_s + 2 * (world - 1) / world * nbytes / self.bytes_per_s

    @classmethod
    def fit(cls, nbytes: list[float], seconds: list[float], world: int, source: str = "") -> "AllReduceModel":
        """Least-squares fit of latency and bandwidth to measured all-reduce
        times (at least two sizes). Raises ParallelError for fewer points or
        a fit without a positive bandwidth."""
        if len(nbytes) < 2 or len(nbytes) != len(seconds):
            raise ParallelError("fitting an all-reduce model needs two or more (bytes, seconds) points")
        share = 2 * (world - 1) / world
        x = torch.tensor([share * b for b in nbytes], dtype=torch.float64)
        y = torch.tensor(seconds, dtype=torch.float64)
        A = torch.stack([torch.ones_like(x), x], dim=1)
        sol = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
        latency, inv_bw = float(sol[0]), float(sol[1])
        if inv_bw <= 0:
            raise ParallelError("the all-reduce times do not grow with size: no bandwidth to fit")
        return cls(max(latency, 0.0), 1.0 / inv_bw, source)


def layer_gemms(config, world: int = 1) -> list[tuple[str, int, int]]:
    """(name, N, K) of one decoder layer's projections under TP degree
    ``world`` (config: the whole model). KV projections never go below one
    head (replicated past the KV heads)."""
    h, d = config.hidden_size, config.head_dim
    kv = max(config.num_kv_heads // world, 1) * d
    q = config.num_heads * d // world
    i = config.intermediate_size // world
    return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
            ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]


def time_matmul(M: int, N: int, K: int, device, dtype=torch.float32, repeats: int = 20) -> float:
    """Median seconds of ``x (M, K) @ W^T`` with W (N, K) on ``device``."""
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = torch.randn(N, K, device=device, dtype=dtype)
    cuda = torch.device(device).type == "cuda"
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    times = sorted(times[2:])
    return times[len(times) // 2]


def predict_tp_step(config, worlds, tokens: int, allreduce: AllReduceModel, device="cpu",
                    dtype=torch.float32, repeats: int = 20) -> list[dict]:
    """Predicted step time of the decoder layers under each TP degree in
    ``worlds`` for ``tokens`` tokens per step: measured shard GEMMs plus
    two modelled all-reduces per layer. Returns one dict per degree: gemm_s,
    comm_s, step_s, speedup (against degree 1 computed the same way)."""
    esize = torch.empty((), dtype=dtype).element_size()
    out, base = [], None
    cache: dict = {}
    for p in sorted(set([1, *worlds])):
        gemm = 0.0
        for _, N, K in layer_gemms(config, p):
            if (N, K) not in cache:
                cache[(N, K)] = time_matmul(tokens, N, K, device, dtype, repeats)
            gemm += cache[(N, K)]
        gemm *= config.num_layers
        comm = 2 * config.num_layers * allreduce.seconds(tokens * config.hidden_size * esize, p)
        step = gemm + comm
        base = step if p == 1 else base
        out.append({"world": p, "gemm_s": gemm, "comm_s": comm, "step_s": step,
                    "speedup": base / step})
    return [o for o in out if o["world"] in worlds or o["world"] == 1]
